//! cargo-fuzz target: arbitrary bytes into `forward::FrameDecoder`, split into reads chosen by
//! the first byte. The checks live in `ackgate_fuzz::check_frame_stream`, which the stable test
//! `tests/fuzz_smoke.rs` also runs over a fixed pseudo-random corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ackgate_fuzz::check_frame_stream(data);
});
