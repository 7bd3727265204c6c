//! Driving ackgate's `FrameDecoder` the way a connection does: the input arrives in pieces, and
//! the decoder runs after each one until it wants more. What comes out ([`Outcome`]) must not
//! depend on where the pieces end; the captures and the property tests check that. Also the
//! deterministic generator ([`Rng`]) the tests use for piece sizes and fuzz inputs.

use ackgate::forward::{Decoded, FrameDecoder, FrameError, Limits};
use bytes::BytesMut;

/// Everything one connection's bytes decode to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub decoded: Vec<Decoded>,
    pub error: Option<FrameError>,
    /// Bytes the decoder took off the buffer: all of the input unless it ends inside a request
    /// (or an error stopped the connection).
    pub consumed: usize,
}

/// Feed `data` to a fresh decoder piece by piece and decode after every piece. `next_end`
/// gets the bytes fed so far and says where the next piece ends (clamped to the input; a piece
/// may be empty). Stops at the first error.
pub fn decode_in_pieces(data: &[u8], mut next_end: impl FnMut(usize) -> usize) -> Outcome {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    let mut pos = 0;
    loop {
        let end = next_end(pos).clamp(pos, data.len());
        buf.extend_from_slice(&data[pos..end]);
        pos = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(d)) => decoded.push(d),
                Ok(None) => break,
                Err(error) => {
                    return Outcome {
                        decoded,
                        error: Some(error),
                        consumed: pos - buf.len(),
                    }
                }
            }
        }
        if pos == data.len() {
            return Outcome {
                decoded,
                error: None,
                consumed: pos - buf.len(),
            };
        }
    }
}

/// Feed `data` in pieces whose sizes `piece` picks (at least one byte each).
pub fn feed(data: &[u8], mut piece: impl FnMut() -> usize) -> Outcome {
    decode_in_pieces(data, |pos| pos.saturating_add(piece().max(1)))
}

/// Feed `data` in pieces that end at `cuts` (in any order; duplicates and cuts past the end
/// do not matter).
pub fn feed_at(data: &[u8], cuts: &[usize]) -> Outcome {
    let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
    points.push(data.len());
    points.sort_unstable();
    points.dedup();
    let mut points = points.into_iter();
    decode_in_pieces(data, |_| points.next().unwrap_or(data.len()))
}

/// The whole input at once.
pub fn whole(data: &[u8]) -> Outcome {
    feed(data, || usize::MAX)
}

/// xorshift64*: a deterministic generator, no dependency needed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 for n = 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}
