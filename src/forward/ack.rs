//! `{"ack": <chunk>}`: written to senders, read from aggregators.
//!
//! Senders compare the echoed value byte for byte and some check its msgpack type (fluent-bit
//! wants a str, fluentd ids end in "\n"), so the value is copied as the raw msgpack bytes that
//! arrived, header included (PROTOCOL.md §13.1). The whole map goes out in one write with
//! nothing around it, because fluentd v0.12 unpacks exactly one `recv(1024)` (§13.2).
//! Invariant 1 is the caller's: this is only called once the frame is committed.

use super::msgpack::{read_header, value_len, Header, SkipError};

/// fixmap(1), fixstr(3) "ack": the bytes fluentd and fluent-bit both write before the value.
pub const ACK_PREFIX: [u8; 5] = [0x81, 0xa3, b'a', b'c', b'k'];

/// Append the ack for a request whose `chunk` option had these raw msgpack bytes.
pub fn encode_ack(chunk_value: &[u8], out: &mut Vec<u8>) {
    out.reserve(ACK_PREFIX.len() + chunk_value.len());
    out.extend_from_slice(&ACK_PREFIX);
    out.extend_from_slice(chunk_value);
}

/// Why bytes from an aggregator are not an ack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("malformed msgpack in ack: {0}")]
    Msgpack(#[from] SkipError),
    #[error("response is not a msgpack map (first byte 0x{0:02x})")]
    NotMap(u8),
    #[error("response map has no string \"ack\" value")]
    NoAck,
}

/// Read one response from the front of `buf`: `Ok(Some((ack value content, bytes used)))`,
/// or `Ok(None)` while it is incomplete. Anything but a map with an `ack` str/bin is an error
/// (a JSON ack, garbage): the caller drops that connection.
pub fn decode_ack(buf: &[u8], max_len: usize) -> Result<Option<(&[u8], usize)>, AckError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut skipper = super::msgpack::Skipper::new(8, max_len);
    let len = match skipper.advance(buf)? {
        super::msgpack::Progress::Complete(len) => len,
        super::msgpack::Progress::Incomplete { .. } => {
            // Refuse early what can never become a map, rather than waiting for more bytes.
            return match read_header(buf) {
                Some(Header::Map { .. }) | None => Ok(None),
                Some(_) => Err(AckError::NotMap(first)),
            };
        }
    };
    let map = &buf[..len];
    let Some(Header::Map { offset, count }) = read_header(map) else {
        return Err(AckError::NotMap(first));
    };
    let mut pos = offset;
    for _ in 0..count {
        let key_end = pos + value_len(&map[pos..], 8)?.ok_or(AckError::NoAck)?;
        let value_end = key_end + value_len(&map[key_end..], 8)?.ok_or(AckError::NoAck)?;
        if str_content(&map[pos..key_end]) == Some(b"ack") {
            return match read_header(&map[key_end..value_end]) {
                Some(Header::Str { offset, len: n }) | Some(Header::Bin { offset, len: n }) => {
                    let start = key_end + offset;
                    Ok(Some((&map[start..start + n], len)))
                }
                _ => Err(AckError::NoAck),
            };
        }
        pos = value_end;
    }
    Err(AckError::NoAck)
}

/// The content of a complete msgpack str value, if it is one.
fn str_content(value: &[u8]) -> Option<&[u8]> {
    match read_header(value)? {
        Header::Str { offset, len } => value.get(offset..offset + len),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_echoes_the_raw_chunk_value() {
        // fluentd v0.12 chunk: fixstr(25), 24 base64 chars + "\n" (PROTOCOL.md §9.2).
        let mut chunk = vec![0xb9];
        chunk.extend_from_slice(b"ZhKAyItCQhNAiWuQNNH2ZQ==\n");
        let mut out = Vec::new();
        encode_ack(&chunk, &mut out);
        assert_eq!(&out[..5], &[0x81, 0xa3, b'a', b'c', b'k']);
        assert_eq!(&out[5..], &chunk[..]);
        let (value, used) = decode_ack(&out, 1024).unwrap().unwrap();
        assert_eq!(value, b"ZhKAyItCQhNAiWuQNNH2ZQ==\n");
        assert_eq!(used, out.len());
    }

    #[test]
    fn partial_and_foreign_responses() {
        let mut out = Vec::new();
        encode_ack(&[0xa2, b'i', b'd'], &mut out);
        assert_eq!(decode_ack(&out[..4], 1024), Ok(None));
        assert_eq!(
            decode_ack(b"{\"ack\":\"id\"}", 1024),
            Err(AckError::NotMap(b'{'))
        );
        assert_eq!(decode_ack(&[0x80], 1024), Err(AckError::NoAck));
        assert_eq!(
            decode_ack(&[0x81, 0xa3, b'a', b'c', b'k', 0x01], 1024),
            Err(AckError::NoAck)
        );
        // Extra keys are tolerated; the ack is found after them.
        let two = [
            0x82, 0xa1, b'x', 0x01, 0xa3, b'a', b'c', b'k', 0xa1, b'z', 0xff,
        ];
        assert_eq!(decode_ack(&two, 1024), Ok(Some((&b"z"[..], 10))));
    }
}
