//! The wire captures in `../shared/captures/` (`$ACKGATE_CAPTURES` if set): where they are, and
//! what its README says each file holds (the request files' tag, mode, events, chunk bytes
//! and entry shape; which receiver replies acknowledge which request). `tests/captures.rs`
//! checks the decoder against this catalogue; the relay tests send the files through ackgate.

use std::path::{Path, PathBuf};

use ackgate::forward::entries::Compression;
use ackgate::forward::Mode;

/// The wire captures: `$ACKGATE_CAPTURES`, else `<crate>/../shared/captures` (its README lists
/// every file).
pub fn captures_dir() -> PathBuf {
    match std::env::var_os("ACKGATE_CAPTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures"),
    }
}

/// The bytes of capture file `name`.
pub fn read_capture(name: &str) -> Vec<u8> {
    let path = captures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The first bytes of every entry, which tell the time encoding apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryShape {
    /// `92 ce <u32>`: integer seconds (v0.10, v0.12, fluentd `time_as_integer`).
    Int,
    /// `92 d7 00`: fixext8 EventTime.
    Event,
    /// `92 92 d7 00 <8> df 00 00 00 00`: fluent-bit's `[[EventTime, {}], record]` (v1.5).
    MetaEvent,
    /// `dd 00 00 00 02 d7 00`: fluent-bit with metadata off, array32 entry headers.
    Array32Event,
}

/// A request (or sender) file and what the README says it holds.
pub struct CapturedRequest {
    pub file: &'static str,
    /// A handshake PING precedes the request.
    pub ping: bool,
    pub tag: &'static str,
    pub mode: Mode,
    pub events: u32,
    /// Raw msgpack bytes of the `chunk` value, header included.
    pub chunk: Option<&'static [u8]>,
    pub shape: EntryShape,
}

/// CompressedPackedForward with gzip.
pub const GZIP_MODE: Mode = Mode::CompressedPackedForward(Compression::Gzip);

/// Every request and sender file of the captures.
pub const CAPTURED_REQUESTS: &[CapturedRequest] = &[
    CapturedRequest {
        file: "fluentd-0.10.62-out_forward.sender.bin",
        ping: false,
        tag: "test.v010",
        mode: Mode::PackedForward,
        events: 4,
        chunk: None,
        shape: EntryShape::Int,
    },
    CapturedRequest {
        file: "fluentd-0.12.43-out_forward-noack.sender.bin",
        ping: false,
        tag: "test.v012",
        mode: Mode::PackedForward,
        events: 4,
        chunk: None,
        shape: EntryShape::Int,
    },
    CapturedRequest {
        file: "fluentd-0.12.43-out_forward-ack.sender.bin",
        ping: false,
        tag: "test.v012",
        mode: Mode::PackedForward,
        events: 4,
        chunk: Some(b"\xb9ZhKAyItCQhNAiWuQNNH2ZQ==\n"),
        shape: EntryShape::Int,
    },
    CapturedRequest {
        file: "fluentd-1.18-out_forward-plain.sender.bin",
        ping: false,
        tag: "test.v1.plain",
        mode: Mode::PackedForward,
        events: 4,
        chunk: None,
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "fluentd-1.18-out_forward-ack.sender.bin",
        ping: false,
        tag: "test.v1.ack",
        mode: Mode::PackedForward,
        events: 4,
        chunk: Some(b"\xb9ZhKA0+cHNgTqSDZigxDHng==\n"),
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "fluentd-1.18-out_forward-gzip.sender.bin",
        ping: false,
        tag: "test.v1.gzip",
        mode: GZIP_MODE,
        events: 4,
        chunk: None,
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "fluentd-1.18-out_forward-time_as_integer.sender.bin",
        ping: false,
        tag: "test.v1.timeint",
        mode: Mode::PackedForward,
        events: 4,
        chunk: None,
        shape: EntryShape::Int,
    },
    CapturedRequest {
        file: "fluentd-1.18-out_forward-secure.sender.bin",
        ping: true,
        tag: "test.v1.secure",
        mode: Mode::PackedForward,
        events: 4,
        chunk: Some(b"\xb9ZhKA1GWsD9rXEKcHA9QN1g==\n"),
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-plain.sender.bin",
        ping: false,
        tag: "fb.plain",
        mode: Mode::Forward,
        events: 4,
        chunk: None,
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-ack.sender.bin",
        ping: false,
        tag: "fb.ack",
        mode: Mode::Forward,
        events: 4,
        chunk: Some(b"\xb8TZTow28OC3ayZyVmI0O7bg=="),
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-gzip.sender.bin",
        ping: false,
        tag: "fb.gzip",
        mode: GZIP_MODE,
        events: 4,
        chunk: None,
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-send_options.sender.bin",
        ping: false,
        tag: "fb.options",
        mode: Mode::Forward,
        events: 4,
        chunk: None,
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-no_metadata.sender.bin",
        ping: false,
        tag: "fb.compat",
        mode: Mode::Forward,
        events: 4,
        chunk: None,
        shape: EntryShape::Array32Event,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-secure.sender.bin",
        ping: true,
        tag: "fb.secure.fluentbit",
        mode: Mode::Forward,
        events: 4,
        chunk: Some(b"\xb8AmuBT8c0+ERPo1CSti7R/w=="),
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-secure-to-fluentd.sender.bin",
        ping: true,
        tag: "fb.secure.fluentd",
        mode: Mode::Forward,
        events: 4,
        chunk: Some(b"\xb8UAYrFlrKap7q6QkpnDFLgw=="),
        shape: EntryShape::MetaEvent,
    },
    CapturedRequest {
        file: "fluent-bit-5.1.1-out_forward-secure-no_metadata-to-fluentd.sender.bin",
        ping: true,
        tag: "fb.secure.fluentd.compat",
        mode: Mode::Forward,
        events: 4,
        chunk: Some(b"\xb8G1FrSyWbmEwl4epraZov2A=="),
        shape: EntryShape::Array32Event,
    },
    CapturedRequest {
        file: "client-packed-str-chunk.request.bin",
        ping: false,
        tag: "probe.packed",
        mode: Mode::PackedForward,
        events: 2,
        chunk: Some(b"\xb8QUNLR0FURS1QUk9CRS0wMQ=="),
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "client-packed-bin-chunk.request.bin",
        ping: false,
        tag: "probe.packed",
        mode: Mode::PackedForward,
        events: 2,
        chunk: Some(b"\xc4\x18QUNLR0FURS1QUk9CRS0wMQ=="),
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "client-message-str-chunk.request.bin",
        ping: false,
        tag: "probe.message",
        mode: Mode::Message,
        events: 1,
        chunk: Some(b"\xb4bWVzc2FnZS1tb2RlLTAx"),
        shape: EntryShape::Event,
    },
    CapturedRequest {
        file: "client-forward-str-chunk.request.bin",
        ping: false,
        tag: "probe.forward",
        mode: Mode::Forward,
        events: 2,
        chunk: Some(b"\xb4Zm9yd2FyZC1tb2RlLTAx"),
        shape: EntryShape::Event,
    },
];

pub fn captured_request(file: &str) -> &'static CapturedRequest {
    CAPTURED_REQUESTS
        .iter()
        .find(|e| e.file == file)
        .unwrap_or_else(|| panic!("{file} is not in CAPTURED_REQUESTS"))
}

/// Receiver replies carrying an ack, and the request file whose chunk they acknowledge.
pub const ACK_REPLIES: &[(&str, &str)] = &[
    (
        "fluentd-1.18-in_forward-ack.reply.bin",
        "client-packed-str-chunk.request.bin",
    ),
    (
        "fluent-bit-5.1.1-in_forward-ack.reply.bin",
        "client-packed-str-chunk.request.bin",
    ),
    (
        "fluentd-1.18-in_forward-ack-bin-chunk.reply.bin",
        "client-packed-bin-chunk.request.bin",
    ),
    (
        "fluentd-1.18-in_forward-ack-message.reply.bin",
        "client-message-str-chunk.request.bin",
    ),
    (
        "fluent-bit-5.1.1-in_forward-ack-message.reply.bin",
        "client-message-str-chunk.request.bin",
    ),
    (
        "fluentd-1.18-in_forward-ack-forward.reply.bin",
        "client-forward-str-chunk.request.bin",
    ),
    (
        "fluent-bit-5.1.1-in_forward-ack-forward.reply.bin",
        "client-forward-str-chunk.request.bin",
    ),
];

/// Handshake replies ending in an ack (HELO, PONG, ack) and the sender file of that connection.
pub const SECURE_ACK_REPLIES: &[(&str, &str)] = &[
    (
        "fluentd-1.18-in_forward-secure.reply.bin",
        "fluentd-1.18-out_forward-secure.sender.bin",
    ),
    (
        "fluent-bit-5.1.1-in_forward-secure.reply.bin",
        "fluent-bit-5.1.1-out_forward-secure.sender.bin",
    ),
    (
        "fluentd-1.18-in_forward-secure-from-fluent-bit-no_metadata.reply.bin",
        "fluent-bit-5.1.1-out_forward-secure-no_metadata-to-fluentd.sender.bin",
    ),
];

/// Handshake replies with no ack: HELO and PONG only.
pub const SECURE_NO_ACK_REPLIES: &[&str] = &[
    "fluentd-1.18-in_forward-secure-from-fluent-bit.reply.bin",
    "fluentd-1.18-in_forward-secure-heartbeat.reply.bin",
];

/// Sender files that hold a PING and nothing else (a transport heartbeat).
pub const PING_ONLY: &[&str] = &["fluentd-1.18-out_forward-secure-heartbeat.sender.bin"];

pub const HELO_FILE: &str = "fluentd-1.18-in_forward-helo.bin";
pub const PONG_FILE: &str = "fluentd-1.18-in_forward-pong.bin";
pub const JSON_REQUEST: &str = "client-json.request.bin";
pub const JSON_REPLY: &str = "fluentd-1.18-in_forward-json.reply.bin";
