//! The check behind the `frame` fuzz target, shared with the stable smoke test
//! `tests/fuzz_smoke.rs` (which includes this file by path).
//!
//! Arbitrary bytes go into `forward::FrameDecoder` (DESIGN.md invariant 4: hostile input is an
//! error, never a panic or an unbounded allocation). The first byte picks how the rest is split
//! into reads; the same bytes are also decoded whole, and both runs must agree, because a frame
//! boundary that depends on read sizes would corrupt a connection. Every frame that comes out
//! must be self-consistent: its entries walk to its event count, its chunk is one msgpack value,
//! and the wire lengths add up to what the decoder consumed.

use ackgate::forward::ack::decode_ack;
use ackgate::forward::entries::count_entries;
use ackgate::forward::msgpack::value_len;
use ackgate::forward::{Decoded, FrameDecoder, FrameError, Limits, Mode};
use bytes::BytesMut;

/// Small limits keep one fuzz input cheap (a gzip bomb stops at 1 MiB, not 256 MiB).
pub const FUZZ_LIMITS: Limits = Limits {
    max_frame_bytes: 1 << 20,
    max_decompressed_bytes: 1 << 20,
    max_depth: 32,
};

/// What one connection's bytes decoded to.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub decoded: Vec<Decoded>,
    pub error: Option<FrameError>,
    /// Bytes taken off the buffer (including a request that was rejected).
    pub consumed: usize,
}

/// Feed `input` in pieces of `piece` bytes (the last may be shorter), decoding after each.
pub fn decode_in_pieces(input: &[u8], piece: usize) -> Outcome {
    let mut decoder = FrameDecoder::new(FUZZ_LIMITS);
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    let mut fed = 0;
    for chunk in input.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(d)) => decoded.push(d),
                Ok(None) => break,
                Err(error) => {
                    return Outcome {
                        decoded,
                        error: Some(error),
                        consumed: fed - buf.len(),
                    }
                }
            }
        }
    }
    Outcome {
        decoded,
        error: None,
        consumed: fed - buf.len(),
    }
}

/// Piece size for the split run: byte 0 means one read; otherwise 1..=64 bytes, or a
/// multiple of 256 for the top values.
fn piece_size(control: u8) -> usize {
    match control {
        0 => usize::MAX,
        1..=191 => 1 + (control as usize - 1) % 64,
        _ => (control as usize - 191) * 256,
    }
}

/// Panics if the decoder misbehaves on `data` (first byte: read size; rest: the stream).
pub fn check_frame_stream(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let whole = decode_in_pieces(input, input.len().max(1));
    let split = decode_in_pieces(input, piece_size(control));
    assert_eq!(whole, split, "result depends on read sizes ({control})");

    assert!(whole.consumed <= input.len());
    let mut wire = 0;
    for d in &whole.decoded {
        match d {
            Decoded::Nil => wire += 1,
            Decoded::Frame(f) => {
                // An empty batch is a valid frame (acked, nothing stored): no entry bytes.
                assert_eq!(f.events == 0, f.entries.is_empty(), "{f:?}");
                assert_eq!(
                    count_entries(&f.entries, FUZZ_LIMITS.max_depth),
                    Ok(f.events),
                    "entries do not walk to the event count"
                );
                assert!(f.tag.len() < f.wire_len);
                assert!(f.wire_len <= FUZZ_LIMITS.max_frame_bytes);
                match f.mode {
                    Mode::Message => {
                        assert_eq!(f.events, 1);
                        assert_eq!(f.entries[0], 0x92);
                        assert!(f.entries.len() <= f.wire_len);
                    }
                    Mode::Forward | Mode::PackedForward => {
                        assert!(f.entries.len() < f.wire_len);
                    }
                    Mode::CompressedPackedForward(_) => {
                        assert!(f.entries.len() <= FUZZ_LIMITS.max_decompressed_bytes);
                    }
                }
                if let Some(chunk) = &f.chunk {
                    assert_eq!(
                        value_len(chunk, FUZZ_LIMITS.max_depth),
                        Ok(Some(chunk.len())),
                        "chunk is not one msgpack value"
                    );
                }
                wire += f.wire_len;
            }
        }
    }
    if whole.error.is_none() {
        assert_eq!(wire, whole.consumed, "wire lengths do not add up");
    } else {
        assert!(wire <= whole.consumed);
    }

    // The same bytes as an aggregator's response: never a panic, and an ack is inside the input.
    if let Ok(Some((value, used))) = decode_ack(input, 1024) {
        assert!(used <= input.len());
        assert!(value.len() < used);
    }
    if let Ok(Some(len)) = value_len(input, FUZZ_LIMITS.max_depth) {
        assert!(len >= 1 && len <= input.len());
    }
}
