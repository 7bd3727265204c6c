//! The `fuzz/` target's check, run on stable over a fixed pseudo-random corpus of 20,000 inputs,
//! so CI exercises it without nightly or cargo-fuzz (DESIGN.md invariant 4: no input panics the
//! decoder). The corpus is mutations of valid requests of every mode plus plain random bytes;
//! it is deterministic, so a failure here reproduces exactly.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_check;
mod support;

use ackgate::forward::entries::deflate_gzip;
use fuzz_check::check_frame_stream;
use support::Rng;

const INPUTS: usize = 20_000;

/// Valid requests of every mode, the starting points for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let entry = [
        0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
    ];
    let meta_entry = [
        0x92, 0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0xdf, 0, 0, 0, 0, 0x81, 0xa1, b'k', 0xc0,
    ];
    let entries = [&entry[..], &meta_entry, &entry].concat();
    let str32 = |b: &[u8]| [&[0xdb][..], &(b.len() as u32).to_be_bytes(), b].concat();
    let chunk_opt = b"\x81\xa5chunk\xb9ZhKAyItCQhNAiWuQNNH2ZQ==\n".to_vec();
    let gz = [deflate_gzip(&entry), deflate_gzip(&meta_entry)].concat();
    vec![
        // v0.10 PackedForward.
        [&[0x92, 0xa3, b'a', b'.', b'b'][..], &str32(&entries)].concat(),
        // v0.12 with chunk.
        [&[0x93, 0xa1, b't'][..], &str32(&entries), &chunk_opt].concat(),
        // Forward with a map32 option.
        [
            &[0x93, 0xa1, b't', 0x93][..],
            &entries,
            &[0xdf, 0, 0, 0, 1, 0xa4, b's', b'i', b'z', b'e', 0x03],
        ]
        .concat(),
        // Message, ext8 EventTime, with and without option.
        vec![
            0x94, 0xa1, b'm', 0xc7, 0x08, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x81, 0xa1, b'a', 0x01,
            0x80,
        ],
        vec![0x93, 0xa1, b'm', 0xcb, 0x41, 0xd9, 0, 0, 0, 0, 0, 0, 0x80],
        // CompressedPackedForward, two gzip members in a bin32.
        [
            &[0x93, 0xa1, b'z', 0xc6][..],
            &(gz.len() as u32).to_be_bytes(),
            &gz,
            b"\x81\xaacompressed\xa4gzip",
        ]
        .concat(),
        // nil no-ops and an ack.
        vec![0xc0, 0xc0],
        b"\x81\xa3ack\xa2id".to_vec(),
    ]
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        let last = data.len().saturating_sub(1);
        match rng.below(6) {
            0 if !data.is_empty() => data[at.min(last)] ^= 1 << rng.below(8),
            1 => data.insert(at, rng.byte()),
            2 if at < data.len() => {
                data.remove(at);
            }
            3 if !data.is_empty() => {
                let interesting = [0x00, 0x7f, 0x80, 0xc0, 0xc1, 0xdb, 0xdd, 0xdf, 0xff];
                data[at.min(last)] = interesting[rng.below(interesting.len())];
            }
            4 => data.truncate(at),
            _ => {
                let len = data.len();
                if len > 0 {
                    let start = rng.below(len);
                    let end = start + rng.below(len - start + 1);
                    let copy = data[start..end].to_vec();
                    let at = rng.below(len + 1);
                    data.splice(at..at, copy);
                }
            }
        }
    }
}

#[test]
fn fuzz_check_over_a_fixed_corpus() {
    let seeds = seeds();
    // The seeds themselves, at every read size class, must pass.
    for seed in &seeds {
        for control in [0u8, 1, 7, 64, 200, 255] {
            check_frame_stream(&[&[control][..], seed].concat());
        }
    }
    let mut rng = Rng(0x0dd_ba11_5eed);
    for _ in 0..INPUTS {
        let mut input = vec![rng.byte()];
        match rng.below(8) {
            // Plain random bytes.
            0 => {
                let len = rng.below(64);
                input.extend((0..len).map(|_| rng.byte()));
            }
            // Several seeds back to back, then mutated.
            1 => {
                for _ in 0..2 + rng.below(3) {
                    input.extend_from_slice(&seeds[rng.below(seeds.len())]);
                }
                mutate(&mut rng, &mut input);
            }
            // One mutated seed.
            _ => {
                input.extend_from_slice(&seeds[rng.below(seeds.len())]);
                mutate(&mut rng, &mut input);
            }
        }
        check_frame_stream(&input);
    }
}
