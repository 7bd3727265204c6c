//! The v1 shared-key handshake (PROTOCOL.md §7): HELO, PING, PONG and their SHA-512 digests,
//! for both roles, as pure functions over byte slices.
//!
//! Server (ingress): [`encode_helo`] right after accept, [`parse_ping`] + [`check_ping`] on the
//! first value the client sends (or [`answer_ping`], which does both and builds the PONG), then
//! [`encode_pong`]. Client (upstream node): [`parse_helo`], [`encode_ping`], [`parse_pong`] +
//! [`check_pong`]. Framing is the caller's: [`message_len`] finds where one handshake value ends
//! in a read buffer, so bytes after it stay for the frame decoder.
//!
//! Peer quirks honoured here (PROTOCOL.md §7, captures/README.md "Handshake"):
//! - every byte field may be msgpack str **or** bin, and is never required to be UTF-8:
//!   fluentd packs its nonce and auth salt as bin8, fluent-bit packs 16 raw random bytes as str;
//! - a HELO may lack `keepalive` (fluent-bit), and its nonce may have any length;
//! - digests are lowercase hex, 128 chars, over the byte concatenation of their inputs;
//! - rejections carry fluentd's own reason strings, which clients log verbatim.
//!
//! Invariant 4 (invalid input never enters the spool) starts here: a connection whose first
//! value is not a valid PING never reaches the frame decoder.

use sha2::{Digest, Sha512};

use super::msgpack::{read_header, value_len, Header, Progress, SkipError, Skipper};
use super::packed::put_str;

/// Largest handshake message accepted. A PING holds two 128-char digests, a hostname, a salt
/// and a username: a few hundred bytes. A legacy sender that skips the handshake writes a data
/// request instead, which this bound rejects as soon as its declared length is read.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Deepest nesting in a handshake message (HELO is an array holding a map).
const MAX_DEPTH: usize = 4;

/// fluentd's PONG reason for a PING that is not `["PING", 5 more fields]`.
pub const REASON_INVALID_PING: &str = "invalid ping message";
/// fluentd's PONG reason for a wrong shared-key digest.
pub const REASON_SHARED_KEY: &str = "shared_key mismatch";
/// fluentd's PONG reason for a failed user check.
pub const REASON_USER: &str = "username/password mismatch";

/// Why a handshake message could not be read, or why the server's PONG is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("malformed msgpack in handshake: {0}")]
    Msgpack(SkipError),
    #[error("handshake message longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("handshake message cut short")]
    Truncated,
    #[error("{extra} bytes after the handshake message")]
    Trailing { extra: usize },
    #[error("{expected} message is not an array (first byte 0x{marker:02x})")]
    NotArray { expected: &'static str, marker: u8 },
    #[error("expected a {expected} message")]
    WrongMessage { expected: &'static str },
    #[error("{message} has {found} elements, expected {expected}")]
    Arity {
        message: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{message} field {field} has the wrong type")]
    BadField {
        message: &'static str,
        field: &'static str,
    },
    /// PONG with auth result false; `reason` is the server's text (lossy UTF-8).
    #[error("authentication failed: {reason}")]
    AuthFailed { reason: String },
    /// The server's hostname is our own: the relay would be talking to itself (fluentd's text).
    #[error("same hostname between input and output: invalid configuration")]
    SameHostname,
    /// The PONG digest does not prove the server knows the shared key (fluentd's text).
    #[error("shared key mismatch")]
    SharedKeyMismatch,
}

/// Why a server refuses a PING; [`PingRejection::reason`] is the text sent in the PONG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingRejection {
    /// Not a 6-element `PING` array; the parse error is kept for the log.
    InvalidPing(HandshakeError),
    /// The client's digest was not made with our shared key and nonce.
    SharedKeyMismatch,
    /// User auth is on and no configured user matches the username and password digest.
    UserMismatch,
}

impl PingRejection {
    /// fluentd's reason string for this rejection, as written in the failure PONG.
    pub fn reason(&self) -> &'static str {
        match self {
            PingRejection::InvalidPing(_) => REASON_INVALID_PING,
            PingRejection::SharedKeyMismatch => REASON_SHARED_KEY,
            PingRejection::UserMismatch => REASON_USER,
        }
    }
}

impl std::fmt::Display for PingRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PingRejection::InvalidPing(detail) => write!(f, "{}: {detail}", self.reason()),
            _ => f.write_str(self.reason()),
        }
    }
}

/// `["HELO", {"nonce", "auth", "keepalive"}]`: the server's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helo {
    /// Random bytes mixed into both shared-key digests; 16 from fluentd and fluent-bit, any
    /// length accepted from a server.
    pub nonce: Vec<u8>,
    /// Salt for the user-password digest. Empty means user auth is not required (§7.1).
    pub auth: Vec<u8>,
    /// false: the server closes after one request. Absent in a HELO means true.
    pub keepalive: bool,
}

impl Helo {
    /// A fresh HELO with a random 16-byte nonce, and a random 16-byte auth salt when
    /// `user_auth` is on (empty otherwise: the spec's "no user auth"; fluentd sends a salt
    /// anyway and ignores the answer, which clients handle the same way).
    pub fn random(user_auth: bool, keepalive: bool) -> Helo {
        Helo {
            nonce: rand::random::<[u8; 16]>().to_vec(),
            auth: if user_auth {
                rand::random::<[u8; 16]>().to_vec()
            } else {
                Vec::new()
            },
            keepalive,
        }
    }
}

/// `["PING", hostname, shared_key_salt, digest, username, password_digest]` from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// The client's self_hostname.
    pub hostname: Vec<u8>,
    /// Client salt: 32 hex chars from fluentd, 16 raw bytes from fluent-bit.
    pub shared_key_salt: Vec<u8>,
    /// `sha512_hex(salt + hostname + nonce + shared_key)`, as sent.
    pub digest: Vec<u8>,
    /// Empty when the HELO carried no auth salt.
    pub username: Vec<u8>,
    /// `sha512_hex(auth + username + password)`, or empty.
    pub password_digest: Vec<u8>,
}

/// `["PONG", auth_result, reason, server_hostname, digest]` from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    pub auth_result: bool,
    /// Why auth failed; empty on success.
    pub reason: Vec<u8>,
    /// The server's self_hostname (empty in a failure PONG).
    pub server_hostname: Vec<u8>,
    /// `sha512_hex(client salt + server_hostname + nonce + shared_key)` (empty on failure).
    pub digest: Vec<u8>,
}

/// What the server checks a PING against (fluentd's `<security>` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAuth {
    /// Our hostname, sent in the PONG and mixed into its digest.
    pub self_hostname: String,
    /// The key both sides must know.
    pub shared_key: String,
    /// `(username, password)` pairs accepted when `user_auth` is on.
    pub users: Vec<(String, String)>,
    /// Check the PING's username and password digest against `users`.
    pub user_auth: bool,
}

// ---------------------------------------------------------------------------------------------
// Digests

/// Lowercase hex SHA-512 of the byte concatenation of `parts`.
fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// `sha512_hex(salt + hostname + nonce + key)`: the PING digest (client hostname) and the PONG
/// digest (server hostname) alike (PROTOCOL.md §7.2, §7.3).
pub fn shared_key_digest(salt: &[u8], hostname: &[u8], nonce: &[u8], key: &[u8]) -> String {
    sha512_hex(&[salt, hostname, nonce, key])
}

/// `sha512_hex(auth_salt + username + password)`: the PING's password digest.
pub fn password_digest(auth_salt: &[u8], username: &[u8], password: &[u8]) -> String {
    sha512_hex(&[auth_salt, username, password])
}

/// Equality whose time does not depend on where two digests first differ.
fn digest_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------------
// Framing and field access

/// Length of the handshake message at the front of `buf`: `Ok(None)` until it is all there.
/// Anything longer than [`MAX_MESSAGE_BYTES`] is an error: no handshake message is that big.
pub fn message_len(buf: &[u8]) -> Result<Option<usize>, HandshakeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match Skipper::new(MAX_DEPTH, MAX_MESSAGE_BYTES).advance(buf) {
        Ok(Progress::Complete(len)) => Ok(Some(len)),
        Ok(Progress::Incomplete { .. }) => Ok(None),
        Err(SkipError::TooLong { .. }) => Err(HandshakeError::TooLong {
            limit: MAX_MESSAGE_BYTES,
        }),
        Err(other) => Err(HandshakeError::Msgpack(other)),
    }
}

/// The elements of the one array that `buf` must hold entirely, with its first element checked
/// to be the string `kind`.
fn message<'a>(buf: &'a [u8], kind: &'static str) -> Result<Vec<&'a [u8]>, HandshakeError> {
    let len = match message_len(buf)? {
        Some(len) => len,
        None => return Err(HandshakeError::Truncated),
    };
    if len != buf.len() {
        return Err(HandshakeError::Trailing {
            extra: buf.len() - len,
        });
    }
    let (mut pos, count) = match read_header(buf) {
        Some(Header::Array { offset, count }) => (offset, count),
        _ => {
            return Err(HandshakeError::NotArray {
                expected: kind,
                marker: buf.first().copied().unwrap_or(0),
            })
        }
    };
    // The whole value was skipped above, so every element is complete; `count` is bounded by
    // the byte length and the vector grows only as elements are found.
    let mut elements = Vec::new();
    for _ in 0..count {
        let rest = buf.get(pos..).ok_or(HandshakeError::Truncated)?;
        let n = value_len(rest, MAX_DEPTH)
            .map_err(HandshakeError::Msgpack)?
            .ok_or(HandshakeError::Truncated)?;
        elements.push(&rest[..n]);
        pos += n;
    }
    match elements.first().and_then(|first| byte_string(first)) {
        Some(name) if name == kind.as_bytes() => Ok(elements),
        _ => Err(HandshakeError::WrongMessage { expected: kind }),
    }
}

/// The content of a complete msgpack str or bin value.
fn byte_string(value: &[u8]) -> Option<&[u8]> {
    match read_header(value)? {
        Header::Str { offset, len } | Header::Bin { offset, len } => {
            value.get(offset..offset.checked_add(len)?)
        }
        _ => None,
    }
}

fn bytes_field(
    value: &[u8],
    message: &'static str,
    field: &'static str,
) -> Result<Vec<u8>, HandshakeError> {
    byte_string(value)
        .map(<[u8]>::to_vec)
        .ok_or(HandshakeError::BadField { message, field })
}

fn check_arity(
    elements: &[&[u8]],
    message: &'static str,
    expected: usize,
) -> Result<(), HandshakeError> {
    if elements.len() == expected {
        Ok(())
    } else {
        Err(HandshakeError::Arity {
            message,
            expected,
            found: elements.len(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// msgpack bin, as msgpack-ruby packs fluentd's binary nonce and salt.
fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if len <= u8::MAX as usize {
        out.extend_from_slice(&[0xc4, len as u8]);
    } else if len <= u16::MAX as usize {
        out.push(0xc5);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

fn put_bool(out: &mut Vec<u8>, value: bool) {
    out.push(if value { 0xc3 } else { 0xc2 });
}

// ---------------------------------------------------------------------------------------------
// Server side

/// `["HELO", {"nonce": bin, "auth": bin, "keepalive": bool}]`, byte for byte fluentd's layout.
pub fn encode_helo(helo: &Helo) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + helo.nonce.len() + helo.auth.len());
    out.push(0x92);
    put_str(&mut out, b"HELO");
    out.push(0x83);
    put_str(&mut out, b"nonce");
    put_bin(&mut out, &helo.nonce);
    put_str(&mut out, b"auth");
    put_bin(&mut out, &helo.auth);
    put_str(&mut out, b"keepalive");
    put_bool(&mut out, helo.keepalive);
    out
}

/// Read a PING: exactly one complete msgpack value, every field str or bin.
pub fn parse_ping(bytes: &[u8]) -> Result<Ping, HandshakeError> {
    const M: &str = "PING";
    let e = message(bytes, M)?;
    check_arity(&e, M, 6)?;
    Ok(Ping {
        hostname: bytes_field(e[1], M, "hostname")?,
        shared_key_salt: bytes_field(e[2], M, "shared_key_salt")?,
        digest: bytes_field(e[3], M, "shared_key_hexdigest")?,
        username: bytes_field(e[4], M, "username")?,
        password_digest: bytes_field(e[5], M, "password_digest")?,
    })
}

/// fluentd's `check_ping`: the shared-key digest over the HELO nonce, then (with user auth) a
/// configured user whose `sha512_hex(auth + username + password)` equals the PING's.
pub fn check_ping(auth: &ServerAuth, helo: &Helo, ping: &Ping) -> Result<(), PingRejection> {
    let expected = shared_key_digest(
        &ping.shared_key_salt,
        &ping.hostname,
        &helo.nonce,
        auth.shared_key.as_bytes(),
    );
    if !digest_eq(expected.as_bytes(), &ping.digest) {
        return Err(PingRejection::SharedKeyMismatch);
    }
    if auth.user_auth {
        // Every user is hashed, so the time taken does not tell which name exists.
        let mut matched = false;
        for (username, password) in &auth.users {
            let hash = password_digest(&helo.auth, username.as_bytes(), password.as_bytes());
            let ok = digest_eq(hash.as_bytes(), &ping.password_digest)
                && username.as_bytes() == ping.username.as_slice();
            matched |= ok;
        }
        if !matched {
            return Err(PingRejection::UserMismatch);
        }
    }
    Ok(())
}

/// `["PONG", ok, reason, server_hostname, digest_hex]`. When `ok` is false the hostname and
/// digest are written as `""` whatever is passed, like fluentd's failure PONG.
pub fn encode_pong(ok: bool, reason: &str, server_hostname: &[u8], digest_hex: &str) -> Vec<u8> {
    let (hostname, digest) = if ok {
        (server_hostname, digest_hex.as_bytes())
    } else {
        (&b""[..], &b""[..])
    };
    let mut out = Vec::with_capacity(16 + reason.len() + hostname.len() + digest.len());
    out.push(0x95);
    put_str(&mut out, b"PONG");
    put_bool(&mut out, ok);
    put_str(&mut out, reason.as_bytes());
    put_str(&mut out, hostname);
    put_str(&mut out, digest);
    out
}

/// The server's whole answer to the first value a client sent after HELO: the PONG bytes to
/// write, and the PING if it was accepted. On `Err` the caller writes the PONG and closes.
pub fn answer_ping(
    auth: &ServerAuth,
    helo: &Helo,
    bytes: &[u8],
) -> (Vec<u8>, Result<Ping, PingRejection>) {
    let verdict = parse_ping(bytes)
        .map_err(PingRejection::InvalidPing)
        .and_then(|ping| check_ping(auth, helo, &ping).map(|()| ping));
    let pong = match &verdict {
        Ok(ping) => {
            let digest = shared_key_digest(
                &ping.shared_key_salt,
                auth.self_hostname.as_bytes(),
                &helo.nonce,
                auth.shared_key.as_bytes(),
            );
            encode_pong(true, "", auth.self_hostname.as_bytes(), &digest)
        }
        Err(rejection) => encode_pong(false, rejection.reason(), b"", ""),
    };
    (pong, verdict)
}

// ---------------------------------------------------------------------------------------------
// Client side

/// Read a HELO: nonce and auth as str or bin (nil or absent read as empty, as fluentd's
/// `opts['nonce'] || ''` does), `keepalive` optional (default true), unknown keys ignored.
pub fn parse_helo(bytes: &[u8]) -> Result<Helo, HandshakeError> {
    const M: &str = "HELO";
    let e = message(bytes, M)?;
    check_arity(&e, M, 2)?;
    let mut helo = Helo {
        nonce: Vec::new(),
        auth: Vec::new(),
        keepalive: true,
    };
    let options = e[1];
    let (mut pos, pairs) = match read_header(options) {
        Some(Header::Nil) => return Ok(helo),
        Some(Header::Map { offset, count }) => (offset, count),
        _ => {
            return Err(HandshakeError::BadField {
                message: M,
                field: "options",
            })
        }
    };
    for _ in 0..pairs {
        let key_len = value_len(options.get(pos..).unwrap_or_default(), MAX_DEPTH)
            .map_err(HandshakeError::Msgpack)?
            .ok_or(HandshakeError::Truncated)?;
        let key = byte_string(&options[pos..pos + key_len]);
        let start = pos + key_len;
        let value_len = value_len(options.get(start..).unwrap_or_default(), MAX_DEPTH)
            .map_err(HandshakeError::Msgpack)?
            .ok_or(HandshakeError::Truncated)?;
        let value = &options[start..start + value_len];
        let nil = matches!(read_header(value), Some(Header::Nil));
        match key {
            Some(b"nonce") if !nil => helo.nonce = bytes_field(value, M, "nonce")?,
            Some(b"auth") if !nil => helo.auth = bytes_field(value, M, "auth")?,
            Some(b"keepalive") => match value.first() {
                Some(0xc3) | Some(0xc0) => helo.keepalive = true,
                Some(0xc2) => helo.keepalive = false,
                _ => {
                    return Err(HandshakeError::BadField {
                        message: M,
                        field: "keepalive",
                    })
                }
            },
            _ => {}
        }
        pos = start + value_len;
    }
    Ok(helo)
}

/// The client's PING for this HELO. With an empty HELO `auth` the username and password
/// digest are sent as `""` (PROTOCOL.md §7.2); otherwise the username and
/// `sha512_hex(auth + username + password)`.
pub fn encode_ping(
    client_hostname: &[u8],
    shared_key_salt: &[u8],
    shared_key: &[u8],
    helo: &Helo,
    username: &[u8],
    password: &[u8],
) -> Vec<u8> {
    let digest = shared_key_digest(shared_key_salt, client_hostname, &helo.nonce, shared_key);
    let (user, pass_digest) = if helo.auth.is_empty() {
        (&b""[..], String::new())
    } else {
        (username, password_digest(&helo.auth, username, password))
    };
    let mut out = Vec::with_capacity(300 + client_hostname.len() + shared_key_salt.len());
    out.push(0x96);
    put_str(&mut out, b"PING");
    put_str(&mut out, client_hostname);
    put_str(&mut out, shared_key_salt);
    put_str(&mut out, digest.as_bytes());
    put_str(&mut out, user);
    put_str(&mut out, pass_digest.as_bytes());
    out
}

/// Read a PONG: a bool auth result and three str-or-bin fields.
pub fn parse_pong(bytes: &[u8]) -> Result<Pong, HandshakeError> {
    const M: &str = "PONG";
    let e = message(bytes, M)?;
    check_arity(&e, M, 5)?;
    let auth_result = match e[1].first() {
        Some(0xc3) => true,
        Some(0xc2) => false,
        _ => {
            return Err(HandshakeError::BadField {
                message: M,
                field: "auth_result",
            })
        }
    };
    Ok(Pong {
        auth_result,
        reason: bytes_field(e[2], M, "reason")?,
        server_hostname: bytes_field(e[3], M, "server_hostname")?,
        digest: bytes_field(e[4], M, "shared_key_hexdigest")?,
    })
}

/// fluentd's client-side `check_pong`, in its order: auth result, hostname distinct from ours,
/// then the server's digest over our salt, its hostname and the HELO nonce.
pub fn check_pong(
    pong: &Pong,
    self_hostname: &[u8],
    shared_key_salt: &[u8],
    nonce: &[u8],
    shared_key: &[u8],
) -> Result<(), HandshakeError> {
    if !pong.auth_result {
        return Err(HandshakeError::AuthFailed {
            reason: String::from_utf8_lossy(&pong.reason).into_owned(),
        });
    }
    if pong.server_hostname == self_hostname {
        return Err(HandshakeError::SameHostname);
    }
    let expected = shared_key_digest(shared_key_salt, &pong.server_hostname, nonce, shared_key);
    if !digest_eq(expected.as_bytes(), &pong.digest) {
        return Err(HandshakeError::SharedKeyMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const KEY: &[u8] = b"s3cr3t-key";

    fn captures() -> PathBuf {
        match std::env::var_os("ACKGATE_CAPTURES") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/captures")).into(),
        }
    }

    fn capture(name: &str) -> Vec<u8> {
        let path = captures().join(name);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set ACKGATE_CAPTURES)", path.display()))
    }

    /// Split a capture into its first `n` handshake values and the rest.
    fn values(bytes: &[u8], n: usize) -> (Vec<&[u8]>, &[u8]) {
        let mut rest = bytes;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = message_len(rest).unwrap().expect("complete value");
            out.push(&rest[..len]);
            rest = &rest[len..];
        }
        (out, rest)
    }

    /// A reply capture's HELO and PONG.
    fn helo_pong(reply: &str) -> (Helo, Pong, Vec<u8>) {
        let bytes = capture(reply);
        let (v, _) = values(&bytes, 2);
        (
            parse_helo(v[0]).unwrap(),
            parse_pong(v[1]).unwrap(),
            v[1].to_vec(),
        )
    }

    /// The sender capture's PING and its bytes.
    fn ping(sender: &str) -> (Ping, Vec<u8>) {
        let bytes = capture(sender);
        let (v, _) = values(&bytes, 1);
        (parse_ping(v[0]).unwrap(), v[0].to_vec())
    }

    fn server(hostname: &str, key: &str) -> ServerAuth {
        ServerAuth {
            self_hostname: hostname.into(),
            shared_key: key.into(),
            users: Vec::new(),
            user_auth: false,
        }
    }

    /// (sender capture, reply capture, client hostname, server hostname)
    const PAIRS: [(&str, &str, &str, &str); 5] = [
        (
            "fluentd-1.18-out_forward-secure.sender.bin",
            "fluentd-1.18-in_forward-secure.reply.bin",
            "sender.example",
            "receiver.example",
        ),
        (
            "fluent-bit-5.1.1-out_forward-secure.sender.bin",
            "fluent-bit-5.1.1-in_forward-secure.reply.bin",
            "fb-sender.example",
            "fb-receiver.example",
        ),
        (
            "fluentd-1.18-out_forward-secure-heartbeat.sender.bin",
            "fluentd-1.18-in_forward-secure-heartbeat.reply.bin",
            "sender.example",
            "receiver.example",
        ),
        (
            "fluent-bit-5.1.1-out_forward-secure-to-fluentd.sender.bin",
            "fluentd-1.18-in_forward-secure-from-fluent-bit.reply.bin",
            "fb-sender.example",
            "receiver.example",
        ),
        (
            "fluent-bit-5.1.1-out_forward-secure-no_metadata-to-fluentd.sender.bin",
            "fluentd-1.18-in_forward-secure-from-fluent-bit-no_metadata.reply.bin",
            "fb-sender.example",
            "receiver.example",
        ),
    ];

    #[test]
    fn fluentd_helo_capture_parses_and_reencodes_byte_for_byte() {
        let bytes = capture("fluentd-1.18-in_forward-helo.bin");
        let helo = parse_helo(&bytes).unwrap();
        assert_eq!(hex::encode(&helo.nonce), "22161046d1ca96f5313599691e8a8bc3");
        assert_eq!(hex::encode(&helo.auth), "0b8eada0ae26a4c47bf2e5777e515c1e");
        assert!(helo.keepalive);
        assert_eq!(encode_helo(&helo), bytes);
        // The same HELO opens the secure reply capture.
        let reply = capture("fluentd-1.18-in_forward-secure.reply.bin");
        let (v, _) = values(&reply, 1);
        assert_eq!(parse_helo(v[0]).unwrap(), helo);
    }

    #[test]
    fn fluent_bit_helo_has_str_nonce_and_no_keepalive() {
        let bytes = capture("fluent-bit-5.1.1-in_forward-secure.reply.bin");
        let (v, _) = values(&bytes, 1);
        assert_eq!(v[0].len(), 52);
        let helo = parse_helo(v[0]).unwrap();
        assert_eq!(helo.nonce.len(), 16);
        assert_eq!(helo.auth.len(), 16);
        assert!(
            std::str::from_utf8(&helo.nonce).is_err(),
            "raw bytes as str"
        );
        assert!(helo.keepalive, "absent keepalive means true");
    }

    #[test]
    fn every_capture_pair_digests_check_out() {
        for (sender, reply, client_host, server_host) in PAIRS {
            let (helo, pong, _) = helo_pong(reply);
            let (ping, _) = ping(sender);
            assert_eq!(ping.hostname, client_host.as_bytes(), "{sender}");
            assert_eq!(ping.username, b"", "{sender}");
            // Client digest, recomputed from the HELO nonce and the PING salt.
            let digest = shared_key_digest(&ping.shared_key_salt, &ping.hostname, &helo.nonce, KEY);
            assert_eq!(digest.as_bytes(), &ping.digest[..], "{sender}");
            // No user auth configured, yet both clients hash the HELO's auth salt.
            let pass = password_digest(&helo.auth, b"", b"");
            assert_eq!(pass.as_bytes(), &ping.password_digest[..], "{sender}");
            // Server digest.
            assert!(pong.auth_result, "{reply}");
            assert_eq!(pong.reason, b"");
            assert_eq!(pong.server_hostname, server_host.as_bytes(), "{reply}");
            let digest = shared_key_digest(
                &ping.shared_key_salt,
                server_host.as_bytes(),
                &helo.nonce,
                KEY,
            );
            assert_eq!(digest.as_bytes(), &pong.digest[..], "{reply}");
            // The client check passes with our own hostname and key...
            check_pong(
                &pong,
                client_host.as_bytes(),
                &ping.shared_key_salt,
                &helo.nonce,
                KEY,
            )
            .unwrap_or_else(|e| panic!("{reply}: {e}"));
            // ... and the server check too, and fails with another key.
            check_ping(&server(server_host, "s3cr3t-key"), &helo, &ping)
                .unwrap_or_else(|e| panic!("{sender}: {e}"));
            let wrong = check_ping(&server(server_host, "other-key"), &helo, &ping).unwrap_err();
            assert_eq!(wrong, PingRejection::SharedKeyMismatch);
            assert_eq!(wrong.reason(), "shared_key mismatch");
        }
    }

    #[test]
    fn our_pong_and_ping_equal_the_captured_bytes() {
        for (sender, reply, client_host, server_host) in PAIRS {
            let (helo, _, pong_bytes) = helo_pong(reply);
            let (ping, ping_bytes) = ping(sender);
            // Server: what we would answer to this PING is what the real receiver wrote.
            let auth = server(server_host, "s3cr3t-key");
            let (pong, verdict) = answer_ping(&auth, &helo, &ping_bytes);
            assert_eq!(verdict.unwrap(), ping, "{sender}");
            assert_eq!(pong, pong_bytes, "{reply}");
            // Client: our PING for this HELO is what the real sender wrote.
            let ours = encode_ping(
                client_host.as_bytes(),
                &ping.shared_key_salt,
                KEY,
                &helo,
                b"",
                b"",
            );
            assert_eq!(ours, ping_bytes, "{sender}");
        }
        assert_eq!(
            helo_pong("fluentd-1.18-in_forward-secure.reply.bin").2,
            capture("fluentd-1.18-in_forward-pong.bin")
        );
    }

    #[test]
    fn data_follows_the_handshake_in_sender_captures() {
        let bytes = capture("fluentd-1.18-out_forward-secure.sender.bin");
        let (_, rest) = values(&bytes, 1);
        assert_eq!(rest.first(), Some(&0x93), "request array after the PING");
        let bytes = capture("fluentd-1.18-out_forward-secure-heartbeat.sender.bin");
        let (_, rest) = values(&bytes, 1);
        assert!(rest.is_empty(), "a transport heartbeat is a PING alone");
    }

    #[test]
    fn pong_checks_in_fluentd_order() {
        let (helo, pong, _) = helo_pong("fluentd-1.18-in_forward-secure.reply.bin");
        let (ping, _) = ping("fluentd-1.18-out_forward-secure.sender.bin");
        let salt = &ping.shared_key_salt;
        assert_eq!(
            check_pong(&pong, b"receiver.example", salt, &helo.nonce, KEY),
            Err(HandshakeError::SameHostname)
        );
        assert_eq!(
            HandshakeError::SameHostname.to_string(),
            "same hostname between input and output: invalid configuration"
        );
        assert_eq!(
            check_pong(&pong, b"sender.example", salt, &helo.nonce, b"other"),
            Err(HandshakeError::SharedKeyMismatch)
        );
        let failed = parse_pong(&encode_pong(false, REASON_SHARED_KEY, b"x", "y")).unwrap();
        assert_eq!(failed.server_hostname, b"");
        assert_eq!(failed.digest, b"");
        assert_eq!(
            check_pong(&failed, b"sender.example", salt, &helo.nonce, KEY),
            Err(HandshakeError::AuthFailed {
                reason: "shared_key mismatch".into()
            })
        );
    }

    #[test]
    fn failure_pong_bytes_are_fluentds() {
        let mut expected = vec![0x95, 0xa4, b'P', b'O', b'N', b'G', 0xc2, 0xb4];
        expected.extend_from_slice(b"invalid ping message");
        expected.extend_from_slice(&[0xa0, 0xa0]);
        assert_eq!(
            encode_pong(false, REASON_INVALID_PING, b"host", "digest"),
            expected
        );
    }

    #[test]
    fn answer_ping_rejects_a_data_request_as_invalid_ping() {
        // A legacy sender skips the handshake: its first value is a request.
        let helo = Helo::random(false, true);
        let request = capture("fluentd-0.12.43-out_forward-ack.sender.bin");
        let auth = server("receiver.example", "s3cr3t-key");
        let (pong, verdict) = answer_ping(&auth, &helo, &request);
        assert!(matches!(verdict, Err(PingRejection::InvalidPing(_))));
        assert_eq!(verdict.unwrap_err().reason(), "invalid ping message");
        let pong = parse_pong(&pong).unwrap();
        assert!(!pong.auth_result);
        assert_eq!(pong.reason, b"invalid ping message");
    }

    #[test]
    fn user_auth_round_trip() {
        let helo = Helo::random(true, false);
        assert_eq!(helo.auth.len(), 16);
        let mut auth = server("receiver.example", "k");
        auth.user_auth = true;
        auth.users = vec![("alice".into(), "pw1".into()), ("bob".into(), "pw2".into())];
        let good = encode_ping(b"client", b"salt", b"k", &helo, b"bob", b"pw2");
        let (pong, verdict) = answer_ping(&auth, &helo, &good);
        assert!(verdict.is_ok());
        let pong = parse_pong(&pong).unwrap();
        check_pong(&pong, b"client", b"salt", &helo.nonce, b"k").unwrap();

        let bad = parse_ping(&encode_ping(
            b"client", b"salt", b"k", &helo, b"bob", b"pw1",
        ))
        .unwrap();
        let rejection = check_ping(&auth, &helo, &bad).unwrap_err();
        assert_eq!(rejection.reason(), "username/password mismatch");
        // Another user's password under the wrong name is no match either.
        let swapped = parse_ping(&encode_ping(
            b"client", b"salt", b"k", &helo, b"alice", b"pw2",
        ))
        .unwrap();
        assert_eq!(
            check_ping(&auth, &helo, &swapped),
            Err(PingRejection::UserMismatch)
        );
    }

    #[test]
    fn ping_without_helo_auth_sends_empty_user_fields() {
        let helo = Helo {
            nonce: vec![1; 16],
            auth: Vec::new(),
            keepalive: true,
        };
        let ping = parse_ping(&encode_ping(b"h", b"s", b"k", &helo, b"user", b"pw")).unwrap();
        assert_eq!(ping.username, b"");
        assert_eq!(ping.password_digest, b"");
        let helo_bytes = encode_helo(&helo);
        assert_eq!(parse_helo(&helo_bytes).unwrap(), helo);
    }

    #[test]
    fn helo_variants_and_bad_fields() {
        // ["HELO", {"nonce": "abc"}] : str nonce of any length, no auth, no keepalive.
        let mut b = vec![0x92, 0xa4, b'H', b'E', b'L', b'O', 0x81, 0xa5];
        b.extend_from_slice(b"nonce");
        b.extend_from_slice(&[0xa3, b'a', b'b', b'c']);
        let helo = parse_helo(&b).unwrap();
        assert_eq!(helo.nonce, b"abc");
        assert_eq!(helo.auth, b"");
        assert!(helo.keepalive);
        // ["HELO", nil]
        let nil = [0x92, 0xa4, b'H', b'E', b'L', b'O', 0xc0];
        assert_eq!(parse_helo(&nil).unwrap().nonce, b"");
        // keepalive false
        let mut ka = vec![0x92, 0xa4, b'H', b'E', b'L', b'O', 0x81, 0xa9];
        ka.extend_from_slice(b"keepalive");
        ka.push(0xc2);
        assert!(!parse_helo(&ka).unwrap().keepalive);
        // nonce as an integer
        let mut bad = vec![0x92, 0xa4, b'H', b'E', b'L', b'O', 0x81, 0xa5];
        bad.extend_from_slice(b"nonce");
        bad.push(0x01);
        assert_eq!(
            parse_helo(&bad),
            Err(HandshakeError::BadField {
                message: "HELO",
                field: "nonce"
            })
        );
        // options as an array
        let arr = [0x92, 0xa4, b'H', b'E', b'L', b'O', 0x90];
        assert!(matches!(
            parse_helo(&arr),
            Err(HandshakeError::BadField { .. })
        ));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let ping = encode_ping(b"h", b"s", b"k", &Helo::random(false, true), b"", b"");
        assert_eq!(
            parse_ping(&ping[..ping.len() - 1]),
            Err(HandshakeError::Truncated)
        );
        let mut extra = ping.clone();
        extra.push(0xc0);
        assert_eq!(
            parse_ping(&extra),
            Err(HandshakeError::Trailing { extra: 1 })
        );
        assert_eq!(
            parse_ping(&[0x01]),
            Err(HandshakeError::NotArray {
                expected: "PING",
                marker: 0x01
            })
        );
        assert_eq!(
            parse_ping(&encode_pong(true, "", b"h", "d")),
            Err(HandshakeError::WrongMessage { expected: "PING" })
        );
        assert_eq!(
            parse_ping(&[0x92, 0xa4, b'P', b'I', b'N', b'G', 0xa0]),
            Err(HandshakeError::Arity {
                message: "PING",
                expected: 6,
                found: 2
            })
        );
        let mut int_host = vec![0x96, 0xa4, b'P', b'I', b'N', b'G', 0x01];
        int_host.extend_from_slice(&[0xa0; 4]);
        assert_eq!(
            parse_ping(&int_host),
            Err(HandshakeError::BadField {
                message: "PING",
                field: "hostname"
            })
        );
        assert_eq!(parse_ping(&[]), Err(HandshakeError::Truncated));
        assert_eq!(
            parse_pong(&[0x90]),
            Err(HandshakeError::WrongMessage { expected: "PONG" })
        );
        let pong_nil_result = [0x95, 0xa4, b'P', b'O', b'N', b'G', 0xc0, 0xa0, 0xa0, 0xa0];
        assert!(matches!(
            parse_pong(&pong_nil_result),
            Err(HandshakeError::BadField {
                field: "auth_result",
                ..
            })
        ));
        assert_eq!(
            message_len(&[0xdb, 0xff, 0xff, 0xff, 0xff]),
            Err(HandshakeError::TooLong {
                limit: MAX_MESSAGE_BYTES
            })
        );
        assert_eq!(message_len(&[0x96, 0xa4, b'P']), Ok(None));
        assert!(matches!(
            message_len(&[0x91, 0xc1]),
            Err(HandshakeError::Msgpack(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Every prefix and every single-byte corruption of real handshake bytes.
        let mut inputs = vec![capture("fluentd-1.18-in_forward-secure.reply.bin")];
        inputs.push(capture("fluent-bit-5.1.1-out_forward-secure.sender.bin"));
        for input in &inputs {
            for cut in 0..input.len().min(400) {
                let slice = &input[..cut];
                let _ = (
                    parse_helo(slice),
                    parse_ping(slice),
                    parse_pong(slice),
                    message_len(slice),
                );
                let mut flipped = input[..input.len().min(400)].to_vec();
                flipped[cut] ^= 0xff;
                let _ = (
                    parse_helo(&flipped),
                    parse_ping(&flipped),
                    parse_pong(&flipped),
                );
                if let Ok(Some(n)) = message_len(&flipped) {
                    let _ = (
                        parse_helo(&flipped[..n]),
                        parse_ping(&flipped[..n]),
                        parse_pong(&flipped[..n]),
                    );
                }
            }
        }
    }

    #[test]
    fn sha512_hex_matches_python_hashlib() {
        let salt = b"50cffeb2cbd5988be86489e3d4232a05";
        let nonce = [
            0x22u8, 0x16, 0x10, 0x46, 0xd1, 0xca, 0x96, 0xf5, 0xff, 0x00, 0x80,
        ];
        let ours = shared_key_digest(salt, b"sender.example", &nonce, KEY);
        let script = format!(
            "import hashlib; print(hashlib.sha512(b'{}' + b'sender.example' + bytes.fromhex('{}') + b's3cr3t-key').hexdigest())",
            std::str::from_utf8(salt).unwrap(),
            hex::encode(nonce)
        );
        let output = match std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
        {
            Ok(output) => output,
            Err(e) => {
                println!("skipped: python3 not runnable ({e})");
                return;
            }
        };
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), ours);
        assert_eq!(ours.len(), 128);
        assert!(ours
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}
