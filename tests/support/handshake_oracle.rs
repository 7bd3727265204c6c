//! The client half of the shared-key handshake (PROTOCOL.md §7), written from the protocol
//! text and deliberately independent of ackgate's own handshake code
//! (`ackgate::forward::handshake`): the HELO fields, the PING layout and the digests (with
//! `sha2`, or with Python's hashlib) are all this file's own. It is the oracle the handshake
//! tests check ackgate against, and an oracle that reused the product's code would agree with
//! the product's bugs: keep it that way, and do not import from `ackgate::forward::handshake`
//! here. All it shares with ackgate is the generic walk over msgpack values (`value_len`,
//! `read_header`, through [`array_elements`] and [`map_entries`]), which the codec property
//! tests check against an encoder of their own.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::msgpack::{array_elements, byte_content, hex, map_entries, mp_str};
use super::wire::read_msgpack_values;

/// The fields of a HELO, and the msgpack markers they came with.
#[derive(Debug, Clone)]
pub struct HeloSeen {
    pub nonce: Vec<u8>,
    pub nonce_marker: u8,
    pub auth: Vec<u8>,
    pub auth_marker: u8,
    pub keepalive: Option<bool>,
    /// Option keys in the order sent.
    pub keys: Vec<String>,
}

/// Parse `["HELO", {options}]`, panicking with the bytes if it is anything else.
pub fn parse_helo(bytes: &[u8]) -> HeloSeen {
    let elements = array_elements(bytes);
    assert_eq!(
        elements.len(),
        2,
        "HELO is a 2-element array: {}",
        hex(bytes)
    );
    assert_eq!(
        byte_content(elements[0]),
        Some(&b"HELO"[..]),
        "first element: {}",
        hex(bytes)
    );
    let mut seen = HeloSeen {
        nonce: Vec::new(),
        nonce_marker: 0,
        auth: Vec::new(),
        auth_marker: 0,
        keepalive: None,
        keys: Vec::new(),
    };
    for (key, value) in map_entries(elements[1]) {
        let key = String::from_utf8_lossy(&key).into_owned();
        match key.as_str() {
            "nonce" => {
                seen.nonce = byte_content(value).expect("nonce str/bin").to_vec();
                seen.nonce_marker = value[0];
            }
            "auth" => {
                seen.auth = byte_content(value).expect("auth str/bin").to_vec();
                seen.auth_marker = value[0];
            }
            "keepalive" => {
                seen.keepalive = match value {
                    [0xc3] => Some(true),
                    [0xc2] => Some(false),
                    other => panic!("keepalive is not a bool: {}", hex(other)),
                }
            }
            _ => {}
        }
        seen.keys.push(key);
    }
    seen
}

/// `["PING", hostname, salt, digest, username, password_digest]`.
pub fn encode_ping(
    hostname: &str,
    salt: &[u8],
    digest: &str,
    username: &str,
    password_digest: &str,
) -> Vec<u8> {
    let mut out = vec![0x96];
    mp_str(&mut out, b"PING");
    mp_str(&mut out, hostname.as_bytes());
    mp_str(&mut out, salt);
    mp_str(&mut out, digest.as_bytes());
    mp_str(&mut out, username.as_bytes());
    mp_str(&mut out, password_digest.as_bytes());
    out
}

/// Lowercase hex SHA-512 of the concatenation of `parts` (sha2, for tests that do not need an
/// independent implementation).
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// SHA-512 of `data` computed by Python's hashlib, as the brief for the handshake test asks
/// (an implementation independent of the crate's). `None` when python3 cannot be run.
pub fn python_sha512_hex(data: &[u8]) -> Option<String> {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg("import hashlib,sys; print(hashlib.sha512(bytes.fromhex(sys.argv[1])).hexdigest())")
        .arg(hex::encode(data))
        .output();
    match output {
        Ok(out) if out.status.success() => Some(
            String::from_utf8(out.stdout)
                .expect("utf-8")
                .trim()
                .to_string(),
        ),
        Ok(out) => panic!("python3 failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run python3: {e}"),
    }
}

/// The PING a fluentd sender answers `helo` with (sha2 digests, no user).
pub fn ping_for(helo: &HeloSeen, hostname: &str, shared_key: &str) -> Vec<u8> {
    let salt = b"0123456789abcdef0123456789abcdef";
    let digest = sha512_hex(&[
        salt,
        hostname.as_bytes(),
        &helo.nonce,
        shared_key.as_bytes(),
    ]);
    let pass = sha512_hex(&[&helo.auth, b"", b""]);
    encode_ping(hostname, salt, &digest, "", &pass)
}

/// Complete a shared-key handshake as a fluentd sender would (sha2 digests): read the HELO,
/// send a PING, read the PONG. Returns the PONG's raw bytes.
pub fn client_handshake(
    stream: &mut TcpStream,
    hostname: &str,
    shared_key: &str,
    timeout: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let helo = read_msgpack_values(stream, 1, deadline)
        .unwrap_or_else(|got| panic!("no HELO: {}", hex(&got)))
        .remove(0);
    let helo = parse_helo(&helo);
    stream
        .write_all(&ping_for(&helo, hostname, shared_key))
        .expect("write PING");
    let pong = read_msgpack_values(stream, 1, deadline)
        .unwrap_or_else(|got| panic!("no PONG: {}", hex(&got)))
        .remove(0);
    let fields = array_elements(&pong);
    assert_eq!(
        fields.get(1).copied(),
        Some(&[0xc3][..]),
        "PONG refused: {}",
        hex(&pong)
    );
    pong
}
