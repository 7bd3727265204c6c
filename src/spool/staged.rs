//! The value of a staged part (invariant 10): where the part ends in its connection's stream
//! (8 bytes, little-endian), then the part's bytes. A mark (no bytes) says where a request
//! that was stored whole ends.
//!
//! The position is what lets a worker going on with a connection tell which of the bytes
//! still in its socket were kept already: a worker that dies after a part is committed and
//! before it is released from the socket leaves those bytes in both places, and reading them
//! again would join the stream wrongly.

use super::SpoolError;

/// Bytes of the position before the part's bytes.
const HEADER: usize = 8;

/// Where an unfinished request (or the mark of one stored whole) stands.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The request's bytes kept so far (empty for a mark).
    pub prefix: Vec<u8>,
    /// Where the last of them ends in the connection's stream (bytes the kernel had let go of
    /// once they were released); `None` if nothing is staged.
    pub stream_end: Option<u64>,
}

/// What [`Spool::append_unstaging`](super::Spool::append_unstaging) does to a connection's
/// staged parts once its request is stored whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unstage {
    pub conn: u128,
    /// Where the request ends in the connection's stream, if known (else no mark is left).
    pub stream_end: Option<u64>,
}

pub(super) fn encode(stream_end: u64, bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER + bytes.len());
    value.extend_from_slice(&stream_end.to_le_bytes());
    value.extend_from_slice(bytes);
    value
}

pub(super) fn decode(value: &[u8]) -> Result<(u64, &[u8]), SpoolError> {
    let (header, bytes) = value
        .split_first_chunk::<HEADER>()
        .ok_or(SpoolError::DamagedStaged { len: value.len() })?;
    Ok((u64::from_le_bytes(*header), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_and_a_mark_read_back_with_their_position() {
        let part = encode(1 << 40, b"abc");
        assert_eq!(decode(&part).unwrap(), (1 << 40, &b"abc"[..]));
        let mark = encode(7, &[]);
        assert_eq!(decode(&mark).unwrap(), (7, &b""[..]));
    }

    #[test]
    fn a_value_shorter_than_its_header_is_an_error_not_a_panic() {
        for len in 0..HEADER {
            let value = vec![0u8; len];
            assert!(matches!(
                decode(&value),
                Err(SpoolError::DamagedStaged { len: l }) if l == len
            ));
        }
    }
}
