//! The aggregator's side of its connections: accept, read (slowly, if the behaviour says so),
//! decode each request with ackgate's `FrameDecoder`, record it, and answer as the behaviour
//! in force says (an ack now or later, a wrong one, garbage, a close or a reset). On stop,
//! every connection is reset.

use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ackgate::forward::msgpack::value_len;
use ackgate::forward::{Decoded, Frame, FrameDecoder, Limits};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::aggregator::{Behaviour, Request, Shared};
use super::msgpack::{mp_str, DEPTH};
use super::requests::{ack_for_value, random_chunk_id};

pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let conn = shared.connections.fetch_add(1, Ordering::AcqRel) + 1;
        shared.notify();
        tracker.spawn(serve(stream, conn, shared.clone(), stop.clone()));
    }
}

/// What to do after reading a request.
enum Answer {
    Nothing,
    Now(Vec<u8>),
    /// Write this at that moment (an ack after a delay).
    At(tokio::time::Instant, Vec<u8>),
    Close,
    Reset,
}

fn answer(request: &Request) -> Answer {
    match request.behaviour {
        Behaviour::CloseAfterRead => return Answer::Close,
        Behaviour::ResetAfterRead => return Answer::Reset,
        _ => {}
    }
    let Some(chunk) = &request.chunk_raw else {
        return Answer::Nothing;
    };
    match request.behaviour {
        Behaviour::AckAfter(delay) => {
            Answer::At(tokio::time::Instant::now() + delay, ack_for_value(chunk))
        }
        _ if request.acked => Answer::Now(ack_for_value(chunk)),
        Behaviour::WrongId => {
            let mut other = Vec::new();
            mp_str(&mut other, random_chunk_id().as_bytes());
            Answer::Now(ack_for_value(&other))
        }
        Behaviour::Garbage => Answer::Now(b"\xc1garbage\xff\x00\r\n".to_vec()),
        Behaviour::JsonAck => {
            let id = request.chunk.clone().unwrap_or_default();
            Answer::Now(format!("{{\"ack\":\"{id}\"}}").into_bytes())
        }
        _ => Answer::Nothing,
    }
}

/// The next whole request in `buf` (nil no-ops skipped), with its raw bytes.
fn next_request(
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Option<(Vec<u8>, Frame)>, String> {
    loop {
        let Some(n) = value_len(buf, DEPTH).map_err(|e| format!("bad msgpack: {e}"))? else {
            return Ok(None);
        };
        let raw = buf[..n].to_vec();
        match decoder.decode(buf) {
            Ok(Some(Decoded::Frame(frame))) => return Ok(Some((raw, frame))),
            Ok(Some(Decoded::Nil)) => {}
            Ok(None) => return Err("decoder wanted more bytes".into()),
            Err(e) => return Err(format!("invalid request: {e}")),
        }
    }
}

/// Abort the connection: RST when the socket is closed.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// The aggregator's side of one connection from ackgate.
async fn serve(mut stream: TcpStream, conn: u64, shared: Arc<Shared>, stop: CancellationToken) {
    let mut decoder = FrameDecoder::new(Limits {
        max_frame_bytes: 256 << 20,
        ..Limits::default()
    });
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    // Late acks, written when due while reading goes on.
    let mut late: Vec<(tokio::time::Instant, Vec<u8>)> = Vec::new();
    loop {
        loop {
            let (raw, frame) = match next_request(&mut decoder, &mut buf) {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(e) => return shared.record_error(format!("conn {conn}: {e}")),
            };
            let request = shared.record(conn, raw, frame);
            match answer(&request) {
                Answer::Nothing => {}
                Answer::Now(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Answer::At(due, bytes) => late.push((due, bytes)),
                Answer::Close => {
                    let _ = socket2::SockRef::from(&stream).shutdown(Shutdown::Both);
                    return;
                }
                Answer::Reset => return reset(&stream),
            }
        }
        let behaviour = shared.behaviour();
        let want = match behaviour {
            Behaviour::SlowRead(rate) => rate.clamp(1, chunk.len()),
            _ => chunk.len(),
        };
        let started = tokio::time::Instant::now();
        let next_due = late.iter().map(|(due, _)| *due).min();
        let read = tokio::select! {
            r = stream.read(&mut chunk[..want]) => r,
            _ = tokio::time::sleep_until(next_due.unwrap_or(started)), if next_due.is_some() => {
                if !write_due(&mut stream, &mut late).await {
                    return;
                }
                continue;
            }
            _ = stop.cancelled() => return reset(&stream),
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Behaviour::SlowRead(_) = behaviour {
            // The pace of a slow reader: one read of at most `rate` bytes per second.
            tokio::select! {
                _ = tokio::time::sleep_until(started + Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return reset(&stream),
            }
        }
    }
}

/// Write the late acks that are due; false if the connection failed.
async fn write_due(
    stream: &mut TcpStream,
    late: &mut Vec<(tokio::time::Instant, Vec<u8>)>,
) -> bool {
    let now = tokio::time::Instant::now();
    let (due, later): (Vec<_>, Vec<_>) = late.drain(..).partition(|(at, _)| *at <= now);
    *late = later;
    for (_, bytes) in due {
        if stream.write_all(&bytes).await.is_err() {
            return false;
        }
    }
    true
}
