//! Throughput of the Forward decoder (`FrameDecoder`) on typical requests.
//!
//! Inputs, 1000 events each: (a) a v0.10-style PackedForward (str32 entries, 150-byte events),
//! (b) Forward mode with 1000 inline entries, (c) both fed in 64 KiB reads (the decoder resumes
//! its walk instead of restarting: PROTOCOL.md §13.10), (d) gzip CompressedPackedForward.
//! Group `decode_events` reports events/s, `decode_bytes` wire bytes/s. Each group also runs a
//! `baseline_sum` over the same bytes (a plain byte sum, no msgpack), so the decoder's figures
//! can be quoted as a ratio to memory bandwidth on the machine that ran them.
//!
//! Quick run: `cargo bench --bench codec -- --quick` (or `-- --sample-size 10`).

use std::hint::black_box;
use std::time::Duration;

use ackgate::forward::entries::deflate_gzip;
use ackgate::forward::{Decoded, FrameDecoder, Limits};
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const EVENTS: u32 = 1000;
const EVENT_BYTES: usize = 150;
const READ_SIZE: usize = 64 * 1024;

/// One `[uint32 time, {"seq": n, "host": "...", "msg": "..."}]` entry of exactly 150 bytes.
fn entry(seq: u32) -> Vec<u8> {
    let mut e = vec![0x92, 0xce, 0x6b, 0x07, 0xd1, 0x6d, 0x83];
    e.extend_from_slice(&[0xa3, b's', b'e', b'q', 0xcd]);
    e.extend_from_slice(&(seq as u16).to_be_bytes());
    e.extend_from_slice(&[0xa4, b'h', b'o', b's', b't', 0xab]);
    e.extend_from_slice(b"web-01.prod");
    e.extend_from_slice(&[0xa3, b'm', b's', b'g', 0xd9]);
    let msg_len = EVENT_BYTES - e.len() - 1;
    e.push(msg_len as u8);
    e.extend((0..msg_len).map(|i| b'a' + ((i + seq as usize) % 26) as u8));
    assert_eq!(e.len(), EVENT_BYTES);
    e
}

fn entries() -> Vec<u8> {
    (0..EVENTS).flat_map(entry).collect()
}

/// (a) `92 <tag> db <len> <entries>`, as fluentd v0.10 writes it.
fn packed_forward() -> Vec<u8> {
    let entries = entries();
    let mut out = vec![0x92, 0xa7];
    out.extend_from_slice(b"app.log");
    out.push(0xdb);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    out.extend_from_slice(&entries);
    out
}

/// (b) `92 <tag> dc 03 e8 <entries>`, inline entries as fluent-bit sends them.
fn forward() -> Vec<u8> {
    let mut out = vec![0x92, 0xa7];
    out.extend_from_slice(b"app.log");
    out.push(0xdc);
    out.extend_from_slice(&(EVENTS as u16).to_be_bytes());
    out.extend_from_slice(&entries());
    out
}

/// (d) `93 <tag> c6 <len> <gzip> {"compressed": "gzip"}`.
fn gzip_packed_forward() -> Vec<u8> {
    let gz = deflate_gzip(&entries());
    let mut out = vec![0x93, 0xa7];
    out.extend_from_slice(b"app.log");
    out.push(0xc6);
    out.extend_from_slice(&(gz.len() as u32).to_be_bytes());
    out.extend_from_slice(&gz);
    out.extend_from_slice(&[0x81, 0xaa]);
    out.extend_from_slice(b"compressed");
    out.extend_from_slice(&[0xa4, b'g', b'z', b'i', b'p']);
    out
}

/// Decode one request from a buffer that already holds it all.
fn decode_whole(mut buf: BytesMut) -> u32 {
    let mut decoder = FrameDecoder::new(Limits::default());
    match decoder.decode(&mut buf) {
        Ok(Some(Decoded::Frame(f))) => f.events,
        other => panic!("bench input did not decode: {other:?}"),
    }
}

/// Decode one request arriving in `READ_SIZE` reads (the copy into the buffer is included,
/// as a socket read would do it).
fn decode_in_reads(data: &[u8]) -> u32 {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    for piece in data.chunks(READ_SIZE) {
        buf.extend_from_slice(piece);
        match decoder.decode(&mut buf) {
            Ok(Some(Decoded::Frame(f))) => return f.events,
            Ok(None) => {}
            other => panic!("bench input did not decode: {other:?}"),
        }
    }
    panic!("request never completed");
}

/// Memory-bandwidth reference: touch every byte once, no parsing.
fn baseline_sum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
}

fn bench_group(c: &mut Criterion, name: &str, throughput: fn(&[u8]) -> Throughput) {
    let inputs = [
        ("packed_forward", packed_forward()),
        ("forward", forward()),
        ("gzip_packed_forward", gzip_packed_forward()),
    ];
    for (_, data) in &inputs {
        assert_eq!(decode_whole(BytesMut::from(&data[..])), EVENTS);
        assert_eq!(decode_in_reads(data), EVENTS);
    }
    let mut group = c.benchmark_group(name);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (label, data) in &inputs {
        group.throughput(throughput(data));
        group.bench_function(format!("{label}/whole"), |b| {
            b.iter_batched(
                || BytesMut::from(&data[..]),
                |buf| black_box(decode_whole(buf)),
                BatchSize::SmallInput,
            )
        });
        if *label != "gzip_packed_forward" {
            group.bench_function(format!("{label}/64KiB_reads"), |b| {
                b.iter(|| black_box(decode_in_reads(black_box(data))))
            });
        }
        group.bench_function(format!("{label}/baseline_sum"), |b| {
            b.iter(|| black_box(baseline_sum(black_box(data))))
        });
    }
    group.finish();
}

fn events(c: &mut Criterion) {
    bench_group(c, "decode_events", |_| Throughput::Elements(EVENTS as u64));
}

fn bytes(c: &mut Criterion) {
    bench_group(c, "decode_bytes", |data| {
        Throughput::Bytes(data.len() as u64)
    });
}

criterion_group!(benches, events, bytes);
criterion_main!(benches);
