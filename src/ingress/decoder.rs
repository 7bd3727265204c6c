//! A connection's wire format, fixed by its first byte: msgpack Forward or JSON
//! (PROTOCOL.md §2.1). No I/O: bytes in, requests out.

use bytes::{Bytes, BytesMut};

use crate::forward::json::{is_json_start, JsonDecoder, JsonFrameError};
use crate::forward::{Decoded, FrameDecoder, FrameError, Limits};

/// The connection's decoder: unknown until the first byte arrives.
pub(super) enum Decoder {
    Unknown,
    Msgpack(FrameDecoder),
    Json(JsonDecoder),
}

/// Why the first byte could not pick a decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PickError {
    /// JSON cannot be authenticated: a port that requires the handshake refuses it.
    JsonOnSecuredPort,
}

impl Decoder {
    /// A JSON connection's decoder (a connection an earlier worker found to speak JSON).
    pub(super) fn json(limits: Limits) -> Decoder {
        Decoder::Json(JsonDecoder::new(limits))
    }

    /// Fix the wire format from the first buffered byte, once (fluentd's rule).
    pub(super) fn pick(
        &mut self,
        buf: &[u8],
        limits: Limits,
        secured: bool,
    ) -> Result<(), PickError> {
        let (Decoder::Unknown, Some(&first)) = (&*self, buf.first()) else {
            return Ok(());
        };
        *self = if is_json_start(first) {
            if secured {
                return Err(PickError::JsonOnSecuredPort);
            }
            Decoder::Json(JsonDecoder::new(limits))
        } else {
            Decoder::Msgpack(FrameDecoder::new(limits))
        };
        Ok(())
    }

    /// Read the next requests against new limits (a reload), keeping the wire format. Only
    /// between requests: with nothing buffered a fresh decoder is the same as this one.
    pub(super) fn renew(&mut self, limits: Limits) {
        match self {
            Decoder::Unknown => {}
            Decoder::Msgpack(_) => *self = Decoder::Msgpack(FrameDecoder::new(limits)),
            Decoder::Json(_) => *self = Decoder::Json(JsonDecoder::new(limits)),
        }
    }

    pub(super) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        match self {
            Decoder::Unknown => Ok(None),
            Decoder::Msgpack(d) => d.decode(buf).map_err(DecodeError::Msgpack),
            Decoder::Json(d) => d.decode(buf).map_err(DecodeError::Json),
        }
    }

    /// The bytes of the request that was just rejected, when the decoder kept them.
    pub(super) fn take_rejected(&mut self) -> Option<Bytes> {
        match self {
            Decoder::Msgpack(d) => d.take_rejected(),
            _ => None,
        }
    }

    pub(super) fn is_json(&self) -> bool {
        matches!(self, Decoder::Json(_))
    }

    /// Bytes the request being read needs at least, when its header declares it.
    pub(super) fn wanted(&self) -> usize {
        match self {
            Decoder::Msgpack(d) => d.wanted(),
            _ => 0,
        }
    }
}

/// A rejected request, in either wire format.
#[derive(Debug, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("{0}")]
    Msgpack(FrameError),
    #[error("{0}")]
    Json(JsonFrameError),
}

impl DecodeError {
    /// The `reason` label of the rejection metric.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            DecodeError::Msgpack(e) => e.kind(),
            DecodeError::Json(_) => "bad_json",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_fixes_the_format_for_the_connections_life() {
        let mut decoder = Decoder::Unknown;
        decoder.pick(b"", Limits::default(), false).unwrap();
        assert!(matches!(decoder, Decoder::Unknown), "nothing buffered yet");
        decoder.pick(b"[\"tag\"", Limits::default(), false).unwrap();
        assert!(decoder.is_json());
        decoder.pick(&[0x93], Limits::default(), false).unwrap();
        assert!(
            decoder.is_json(),
            "a later msgpack byte does not switch it back"
        );

        let mut decoder = Decoder::Unknown;
        decoder.pick(&[0x93], Limits::default(), false).unwrap();
        assert!(matches!(decoder, Decoder::Msgpack(_)));
    }

    #[test]
    fn json_is_refused_on_a_port_that_requires_the_handshake() {
        let mut decoder = Decoder::Unknown;
        assert_eq!(
            decoder.pick(b"{", Limits::default(), true),
            Err(PickError::JsonOnSecuredPort)
        );
        assert!(matches!(decoder, Decoder::Unknown));
    }
}
