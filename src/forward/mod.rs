//! The Forward protocol as bytes: frames in, frames out. Nothing here owns a socket or reads a
//! clock, so every fact of PROTOCOL.md becomes a unit test on a byte slice.
//!
//! - [`msgpack`]: the streaming *skipper*. It finds where one msgpack value ends without
//!   building it, resumably across reads, with depth and length limits.
//! - [`frame`]: one request (Message, Forward, PackedForward, CompressedPackedForward or `nil`)
//!   normalised into tag, options and the raw bytes of its `[time, record]` entries (or, for
//!   v1.5 metrics and traces, of its opaque payload).
//! - [`entries`]: the walk over concatenated entries (count, time kinds, record check) and the
//!   capped gzip / zstd inflation of compressed payloads.
//! - [`ack`]: `{"ack": <chunk>}` out (to senders) and in (from aggregators).
//! - [`packed`]: the PackedForward request ackgate sends upstream with its own chunk id.
//! - [`handshake`]: HELO / PING / PONG of the shared-key handshake and its digests, both sides.
//! - [`json`]: the JSON wire format fluentd's in_forward also accepts (a connection whose first
//!   byte is `[` or `{`), acked in JSON.
//! - [`value`]: msgpack values decoded to JSON, for reading only (`ackgate spool show`,
//!   `ackgate receive`): never on the relay path.
//!
//! Must not: open a socket or a file, read a clock, or hold state across connections.
//!
//! Invariant 6 (event bytes reach the aggregator exactly as the sender wrote them) lives here:
//! entries are sliced from the input, never decoded and re-encoded.

pub mod ack;
pub mod entries;
pub mod frame;
pub mod handshake;
pub mod json;
pub mod msgpack;
pub mod packed;
pub mod value;

pub use frame::{Decoded, Frame, FrameDecoder, FrameError, Limits, Mode, Signal};
/// Deepest msgpack nesting accepted anywhere (senders, the spool, upstream replies).
pub use value::MAX_DEPTH;
