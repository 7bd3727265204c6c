//! The streaming msgpack skipper: where does the value that starts here end?
//!
//! Forward has no length prefix and no delimiter (PROTOCOL.md §2.1), so the only way to find a
//! frame boundary is to walk msgpack markers. The skipper never builds values and never
//! allocates per value; it keeps an explicit stack of "elements still to skip" instead of
//! recursing, so depth is a checked limit rather than a stack overflow, and it can resume where
//! it stopped when more bytes arrive (a legacy sender writes header, tag, length and an 8 MiB
//! body in separate writes: re-walking from byte 0 on every read would be quadratic).
//!
//! Invariants it protects: 4 (invalid input is detected before it can be spooled) and, through
//! [`Skipper::max_len`], the memory bound on a peer that declares a huge length.

/// Why a value could not be skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipError {
    /// The marker byte 0xC1 is reserved by the msgpack spec and never valid.
    #[error("reserved msgpack marker 0xc1 at offset {offset}")]
    ReservedMarker { offset: usize },
    /// Arrays and maps nest deeper than the limit.
    #[error("msgpack nesting deeper than {limit} at offset {offset}")]
    TooDeep { offset: usize, limit: usize },
    /// The value would end past the byte limit (declared lengths count before the bytes arrive).
    #[error("msgpack value longer than the limit of {limit} bytes (needs at least {needed})")]
    TooLong { needed: u64, limit: usize },
}

/// Result of feeding bytes to a [`Skipper`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The value ends at this offset (exclusive) of the slice given to [`Skipper::advance`].
    Complete(usize),
    /// More bytes are needed; at least this many in total are needed before the value can end.
    Incomplete { needed_at_least: usize },
}

/// Resumable extent finder for one msgpack value starting at offset 0 of a growing buffer.
///
/// Feed it the whole buffer each time (the same prefix plus new bytes); it continues from the
/// last header it finished. Call [`Skipper::reset`] before reusing it for the next value.
#[derive(Debug, Clone)]
pub struct Skipper {
    /// Offset of the next marker to read.
    pos: usize,
    /// For each open array or map: how many values are still to be skipped inside it.
    pending: Vec<u64>,
    /// Whether the top-level value has been started (its marker consumed).
    started: bool,
    max_depth: usize,
    max_len: usize,
}

/// What one marker means for the walk.
enum Marker {
    /// A scalar whose whole encoding is `len` bytes from the marker.
    Scalar(u64),
    /// A container with `count` child values after a `header` byte header.
    Container { header: usize, count: u64 },
}

impl Skipper {
    /// A skipper that rejects values nested deeper than `max_depth` or longer than `max_len`.
    pub fn new(max_depth: usize, max_len: usize) -> Self {
        Skipper {
            pos: 0,
            pending: Vec::new(),
            started: false,
            max_depth,
            max_len,
        }
    }

    /// The byte limit this skipper enforces.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forget progress and take new limits, keeping the stack's capacity.
    pub fn restart(&mut self, max_depth: usize, max_len: usize) {
        self.reset();
        self.max_depth = max_depth;
        self.max_len = max_len;
    }

    /// Forget progress, to skip a new value from offset 0.
    pub fn reset(&mut self) {
        self.pos = 0;
        self.pending.clear();
        self.started = false;
    }

    /// Continue walking `buf` (which must start with the same bytes as the previous call).
    pub fn advance(&mut self, buf: &[u8]) -> Result<Progress, SkipError> {
        loop {
            if self.started && self.pending.is_empty() {
                return Ok(Progress::Complete(self.pos));
            }
            let Some(&marker) = buf.get(self.pos) else {
                return Ok(Progress::Incomplete {
                    needed_at_least: self.pos + 1,
                });
            };
            let parsed = match classify(marker, &buf[self.pos..], self.pos)? {
                Some(parsed) => parsed,
                None => {
                    // The header itself is cut; its longest form is 5 bytes (+1 for ext types).
                    return Ok(Progress::Incomplete {
                        needed_at_least: self.pos + header_len(marker),
                    });
                }
            };
            // One value (this one) is being consumed from the innermost open container.
            if let Some(top) = self.pending.last_mut() {
                *top -= 1;
            }
            self.started = true;
            match parsed {
                Marker::Scalar(len) => {
                    let end = self.pos as u64 + len;
                    if end > self.max_len as u64 {
                        return Err(SkipError::TooLong {
                            needed: end,
                            limit: self.max_len,
                        });
                    }
                    let end = end as usize;
                    if end > buf.len() {
                        // Undo the bookkeeping so the same marker is read again on resume.
                        if let Some(top) = self.pending.last_mut() {
                            *top += 1;
                        }
                        if self.pending.is_empty() {
                            self.started = false;
                        }
                        return Ok(Progress::Incomplete {
                            needed_at_least: end,
                        });
                    }
                    self.pos = end;
                }
                Marker::Container { header, count } => {
                    self.pos += header;
                    if self.pos > self.max_len {
                        return Err(SkipError::TooLong {
                            needed: self.pos as u64,
                            limit: self.max_len,
                        });
                    }
                    if count > 0 {
                        if self.pending.len() >= self.max_depth {
                            return Err(SkipError::TooDeep {
                                offset: self.pos - header,
                                limit: self.max_depth,
                            });
                        }
                        // Every child needs at least one byte: reject impossible counts early.
                        if self.pos as u64 + count > self.max_len as u64 {
                            return Err(SkipError::TooLong {
                                needed: self.pos as u64 + count,
                                limit: self.max_len,
                            });
                        }
                        self.pending.push(count);
                    }
                }
            }
            while let Some(&0) = self.pending.last() {
                self.pending.pop();
            }
        }
    }
}

/// Open containers [`value_len`] tracks in a small array on the call stack (records rarely
/// nest deeper); a value that nests deeper is walked again by the resumable [`Skipper`].
const FAST_MAX_DEPTH: usize = 8;

/// Skip one complete value at the start of `buf`; `None` if `buf` ends inside it.
///
/// The hot path of entry validation (every event of every request passes here): one pass over
/// the markers with the open containers' counts in a fixed array, none of the resumable
/// [`Skipper`]'s bookkeeping. It gives the answers [`Skipper::advance`] gives on the same
/// complete bytes (a unit test and a property test hold the two together).
pub fn value_len(buf: &[u8], max_depth: usize) -> Result<Option<usize>, SkipError> {
    // remaining[d]: values still to skip inside the container open at depth d + 1.
    let mut remaining = [0u64; FAST_MAX_DEPTH];
    let mut depth = 0usize;
    let mut pos = 0usize;
    loop {
        let Some(&marker) = buf.get(pos) else {
            return Ok(None);
        };
        // Most markers of a log record: small integers and short strings.
        let short = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Some(1),
            0xa0..=0xbf => Some(1 + usize::from(marker & 0x1f)),
            _ => None,
        };
        let marker = match short {
            Some(len) => Some(Marker::Scalar(len as u64)),
            None => classify(marker, &buf[pos..], pos)?,
        };
        match marker {
            None => return Ok(None),
            Some(Marker::Scalar(len)) => {
                let end = pos as u64 + len;
                if end > buf.len() as u64 {
                    return Ok(None);
                }
                pos = end as usize;
            }
            Some(Marker::Container { header, count }) => {
                pos += header;
                if count > 0 {
                    if depth >= max_depth {
                        return Err(SkipError::TooDeep {
                            offset: pos - header,
                            limit: max_depth,
                        });
                    }
                    if depth == FAST_MAX_DEPTH {
                        return resumable_value_len(buf, max_depth);
                    }
                    // Every child needs at least one byte.
                    if pos as u64 + count > buf.len() as u64 {
                        return Ok(None);
                    }
                    remaining[depth] = count;
                    depth += 1;
                    continue;
                }
            }
        }
        // A value ended: close every container it completed.
        loop {
            let Some(open) = depth.checked_sub(1) else {
                return Ok(Some(pos));
            };
            remaining[open] -= 1;
            if remaining[open] > 0 {
                break;
            }
            depth = open;
        }
    }
}

thread_local! {
    /// One reusable [`Skipper`] per thread for limits deeper than [`FAST_MAX_DEPTH`]: its stack
    /// keeps its capacity, so repeated calls allocate nothing.
    static SKIPPER: std::cell::RefCell<Skipper> = std::cell::RefCell::new(Skipper::new(0, 0));
}

/// [`value_len`] through the resumable [`Skipper`].
fn resumable_value_len(buf: &[u8], max_depth: usize) -> Result<Option<usize>, SkipError> {
    let run = |skipper: &mut Skipper| match skipper.advance(buf) {
        Ok(Progress::Complete(end)) => Ok(Some(end)),
        Ok(Progress::Incomplete { .. }) | Err(SkipError::TooLong { .. }) => Ok(None),
        Err(other) => Err(other),
    };
    SKIPPER
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut skipper) => {
                skipper.restart(max_depth, buf.len());
                run(&mut skipper)
            }
            // Re-entered on this thread (never expected): a fresh one.
            Err(_) => run(&mut Skipper::new(max_depth, buf.len())),
        })
        // Thread-local storage already torn down (thread exit): a fresh one.
        .unwrap_or_else(|_| run(&mut Skipper::new(max_depth, buf.len())))
}

/// Length of the header of the value that starts with `marker` (bytes before its payload).
#[inline]
pub fn header_len(marker: u8) -> usize {
    match marker {
        0xc4 | 0xd9 | 0xcc | 0xd0 | 0xd4..=0xd8 => 2,
        0xc5 | 0xda | 0xdc | 0xde | 0xcd | 0xd1 => 3,
        0xc7 => 3,
        0xc8 => 4,
        0xc6 | 0xdb | 0xdd | 0xdf | 0xce | 0xd2 | 0xca => 5,
        0xc9 => 6,
        0xcf | 0xd3 | 0xcb => 9,
        _ => 1,
    }
}

fn be_u16(b: &[u8]) -> u64 {
    u16::from_be_bytes([b[0], b[1]]) as u64
}

fn be_u32(b: &[u8]) -> u64 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64
}

/// Decode the marker at the start of `rest`; `Ok(None)` when its header is cut short.
#[inline]
fn classify(marker: u8, rest: &[u8], offset: usize) -> Result<Option<Marker>, SkipError> {
    let need = header_len(marker).max(match marker {
        0xd4..=0xd8 => 2,
        _ => 1,
    });
    if rest.len() < need {
        return Ok(None);
    }
    let m = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => Marker::Scalar(1),
        0x80..=0x8f => Marker::Container {
            header: 1,
            count: 2 * (marker & 0x0f) as u64,
        },
        0x90..=0x9f => Marker::Container {
            header: 1,
            count: (marker & 0x0f) as u64,
        },
        0xa0..=0xbf => Marker::Scalar(1 + (marker & 0x1f) as u64),
        0xc1 => return Err(SkipError::ReservedMarker { offset }),
        0xc4 | 0xd9 => Marker::Scalar(2 + rest[1] as u64),
        0xc5 | 0xda => Marker::Scalar(3 + be_u16(&rest[1..])),
        0xc6 | 0xdb => Marker::Scalar(5 + be_u32(&rest[1..])),
        0xc7 => Marker::Scalar(3 + rest[1] as u64),
        0xc8 => Marker::Scalar(4 + be_u16(&rest[1..])),
        0xc9 => Marker::Scalar(6 + be_u32(&rest[1..])),
        0xca | 0xce | 0xd2 => Marker::Scalar(5),
        0xcb | 0xcf | 0xd3 => Marker::Scalar(9),
        0xcc | 0xd0 => Marker::Scalar(2),
        0xcd | 0xd1 => Marker::Scalar(3),
        0xd4 => Marker::Scalar(3),
        0xd5 => Marker::Scalar(4),
        0xd6 => Marker::Scalar(6),
        0xd7 => Marker::Scalar(10),
        0xd8 => Marker::Scalar(18),
        0xdc => Marker::Container {
            header: 3,
            count: be_u16(&rest[1..]),
        },
        0xdd => Marker::Container {
            header: 5,
            count: be_u32(&rest[1..]),
        },
        0xde => Marker::Container {
            header: 3,
            count: 2 * be_u16(&rest[1..]),
        },
        0xdf => Marker::Container {
            header: 5,
            count: 2 * be_u32(&rest[1..]),
        },
    };
    Ok(Some(m))
}

/// A msgpack value's kind and, for containers and byte strings, where its content is.
/// Produced by [`read_header`] over complete bytes; used by the frame and entry walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Nil,
    Bool,
    Int,
    Float,
    /// str (fixstr, str8/16/32): content starts at `offset`, `len` bytes.
    Str {
        offset: usize,
        len: usize,
    },
    /// bin8/16/32.
    Bin {
        offset: usize,
        len: usize,
    },
    /// Array of `count` values starting at `offset`.
    Array {
        offset: usize,
        count: usize,
    },
    /// Map of `count` pairs starting at `offset`.
    Map {
        offset: usize,
        count: usize,
    },
    /// Ext of type `kind` with `len` data bytes at `offset`.
    Ext {
        kind: i8,
        offset: usize,
        len: usize,
    },
}

/// Read the header of the value at `buf[0]`, which must be complete (already skipped).
/// Returns `None` if the header is cut short or reserved; callers treat that as malformed.
pub fn read_header(buf: &[u8]) -> Option<Header> {
    let marker = *buf.first()?;
    if buf.len() < header_len(marker) {
        return None;
    }
    let len8 = || buf[1] as usize;
    let len16 = || be_u16(&buf[1..]) as usize;
    let len32 = || be_u32(&buf[1..]) as usize;
    Some(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xcf | 0xd0..=0xd3 => Header::Int,
        0xc0 => Header::Nil,
        0xc2 | 0xc3 => Header::Bool,
        0xca | 0xcb => Header::Float,
        0x80..=0x8f => Header::Map {
            offset: 1,
            count: (marker & 0x0f) as usize,
        },
        0x90..=0x9f => Header::Array {
            offset: 1,
            count: (marker & 0x0f) as usize,
        },
        0xa0..=0xbf => Header::Str {
            offset: 1,
            len: (marker & 0x1f) as usize,
        },
        0xd9 => Header::Str {
            offset: 2,
            len: len8(),
        },
        0xda => Header::Str {
            offset: 3,
            len: len16(),
        },
        0xdb => Header::Str {
            offset: 5,
            len: len32(),
        },
        0xc4 => Header::Bin {
            offset: 2,
            len: len8(),
        },
        0xc5 => Header::Bin {
            offset: 3,
            len: len16(),
        },
        0xc6 => Header::Bin {
            offset: 5,
            len: len32(),
        },
        0xdc => Header::Array {
            offset: 3,
            count: len16(),
        },
        0xdd => Header::Array {
            offset: 5,
            count: len32(),
        },
        0xde => Header::Map {
            offset: 3,
            count: len16(),
        },
        0xdf => Header::Map {
            offset: 5,
            count: len32(),
        },
        0xd4..=0xd8 => {
            let len = 1usize << (marker - 0xd4);
            if buf.len() < 2 {
                return None;
            }
            Header::Ext {
                kind: buf[1] as i8,
                offset: 2,
                len,
            }
        }
        0xc7..=0xc9 => {
            let (len, offset) = match marker {
                0xc7 => (len8(), 3),
                0xc8 => (len16(), 4),
                _ => (len32(), 6),
            };
            if buf.len() < offset {
                return None;
            }
            Header::Ext {
                kind: buf[offset - 1] as i8,
                offset,
                len,
            }
        }
        0xc1 => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass walk and the resumable skipper agree on `buf` at every depth limit.
    fn assert_walks_agree(buf: &[u8]) {
        for depth in [0, 1, 2, 3, 8, 9, 10, 64] {
            let fast = value_len(buf, depth);
            let resumable = resumable_value_len(buf, depth);
            assert_eq!(fast, resumable, "depth {depth}, bytes {buf:02x?}");
        }
    }

    #[test]
    fn the_one_pass_walk_agrees_with_the_resumable_skipper() {
        let samples: [&[u8]; 14] = [
            &[],
            &[0xc1],
            &[0x92, 0x01, 0x81, 0xa1, b'k', 0xa1, b'v', 0xff],
            &[0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x80],
            &[0x92, 0xd7, 0x00, 1, 2],
            &[0x91, 0x91, 0x91, 0x91, 0x90],
            &[0x91, 0x91, 0x91, 0x91, 0x01],
            &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0xdf, 0x00, 0x00, 0x00, 0x01, 0xc0, 0xc1],
            &[0xdb, 0x00, 0x00, 0x00, 0x02, b'a'],
            &[0xc7, 0x02, 0x05, 0xaa, 0xbb, 0x93],
            &[0x82, 0xa1, b'a', 0x90, 0xa1, b'b', 0x80, 0x00],
            &[0x93, 0xc0, 0xc2, 0xc3],
            &[0x81, 0x91],
        ];
        for sample in samples {
            assert_walks_agree(sample);
        }
        // Deeper than the walk's own array: the resumable skipper takes over.
        for levels in [7, 8, 9, 12] {
            let mut nested = vec![0x91; levels];
            nested.push(0x01);
            assert_walks_agree(&nested);
            assert_eq!(value_len(&nested, 64), Ok(Some(levels + 1)));
            nested.pop();
            assert_walks_agree(&nested);
        }
    }

    proptest::proptest! {
        #[test]
        fn the_walks_agree_on_any_bytes(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            assert_walks_agree(&buf);
        }

        #[test]
        fn the_walks_agree_on_container_heavy_bytes(
            buf in proptest::collection::vec(proptest::sample::select(vec![0x90u8, 0x91, 0x92, 0x80, 0x81, 0x01, 0xa1, 0xc0, 0xd7, 0x00, 0xdc, 0xc1]), 0..48)
        ) {
            assert_walks_agree(&buf);
        }
    }

    fn whole(buf: &[u8]) -> Result<Progress, SkipError> {
        Skipper::new(64, 1 << 20).advance(buf)
    }

    /// A fresh Skipper each time, as `value_len` did before it reused one per thread.
    fn skipper_value_len(buf: &[u8], max_depth: usize) -> Result<Option<usize>, SkipError> {
        match Skipper::new(max_depth, buf.len()).advance(buf) {
            Ok(Progress::Complete(end)) => Ok(Some(end)),
            Ok(Progress::Incomplete { .. }) | Err(SkipError::TooLong { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    #[test]
    fn value_len_with_a_reused_skipper_agrees_with_a_fresh_one_on_any_bytes() {
        // Random bytes biased towards containers and short values, every depth limit around
        // the nesting they reach; xorshift so the test is the same on every run.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let markers = [
            0x91, 0x92, 0x81, 0x82, 0xdc, 0xde, 0xc1, 0xa1, 0x01, 0xc4, 0xd7, 0xc0,
        ];
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        markers[(r >> 8) as usize % markers.len()]
                    } else {
                        (r >> 16) as u8
                    }
                })
                .collect();
            for depth in [0, 1, 2, 3, 8, 64] {
                assert_eq!(
                    value_len(&buf, depth),
                    skipper_value_len(&buf, depth),
                    "{buf:02x?} at depth {depth}"
                );
            }
        }
        // Deeper than the inline stack: the Skipper path, same answers.
        let deep = [vec![0x91; 100], vec![0x01]].concat();
        assert_eq!(value_len(&deep, 200), Ok(Some(101)));
        assert_eq!(
            value_len(&deep, 64),
            Err(SkipError::TooDeep {
                offset: 64,
                limit: 64
            })
        );
        assert_eq!(value_len(&deep, 64), skipper_value_len(&deep, 64));
        assert_eq!(value_len(&deep[..100], 200), Ok(None));
    }

    #[test]
    fn scalars_have_exact_extents() {
        assert_eq!(whole(&[0x01, 0xff]), Ok(Progress::Complete(1)));
        assert_eq!(whole(&[0xc0]), Ok(Progress::Complete(1)));
        assert_eq!(whole(&[0xce, 0, 0, 0, 1, 9]), Ok(Progress::Complete(5)));
        assert_eq!(whole(&[0xa2, b'h', b'i']), Ok(Progress::Complete(3)));
        assert_eq!(
            whole(&[0xd7, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            Ok(Progress::Complete(10))
        );
        assert_eq!(
            whole(&[0xc7, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
            Ok(Progress::Complete(11))
        );
    }

    #[test]
    fn str32_declared_length_is_trusted_before_the_bytes_arrive() {
        let buf = [0xdb, 0, 0, 0, 10, 1, 2];
        assert_eq!(
            whole(&buf),
            Ok(Progress::Incomplete {
                needed_at_least: 15
            })
        );
    }

    #[test]
    fn nested_containers_resume_across_reads() {
        // [1, {"a": [2, 3]}, "xy"]
        let value = [
            0x93, 0x01, 0x81, 0xa1, b'a', 0x92, 0x02, 0x03, 0xa2, b'x', b'y',
        ];
        let mut skipper = Skipper::new(8, 1024);
        for cut in 0..value.len() {
            let progress = skipper.advance(&value[..cut]).unwrap();
            assert!(matches!(progress, Progress::Incomplete { .. }), "cut {cut}");
        }
        assert_eq!(skipper.advance(&value), Ok(Progress::Complete(value.len())));
    }

    #[test]
    fn limits_are_errors_not_panics() {
        assert_eq!(
            Skipper::new(2, 100).advance(&[0x91, 0x91, 0x91, 0x01]),
            Err(SkipError::TooDeep {
                offset: 2,
                limit: 2
            })
        );
        assert!(matches!(
            Skipper::new(8, 100).advance(&[0xdb, 0xff, 0xff, 0xff, 0xff]),
            Err(SkipError::TooLong { .. })
        ));
        assert!(matches!(
            Skipper::new(8, 100).advance(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(SkipError::TooLong { .. })
        ));
        assert_eq!(
            whole(&[0x91, 0xc1]),
            Err(SkipError::ReservedMarker { offset: 1 })
        );
    }

    #[test]
    fn empty_containers_complete() {
        assert_eq!(whole(&[0x90, 0x05]), Ok(Progress::Complete(1)));
        assert_eq!(whole(&[0x92, 0x80, 0x90]), Ok(Progress::Complete(3)));
        assert_eq!(whole(&[0xdf, 0, 0, 0, 0]), Ok(Progress::Complete(5)));
    }
}
