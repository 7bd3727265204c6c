//! The embedded acking aggregator: a Forward receiver built on [`crate::forward`] that counts
//! what arrives, reads each event's send stamp for the end-to-end latency, tracks event ids to
//! count duplicates (ackgate is at-least-once) and losses, and acks every frame that carries a
//! `chunk` once it is counted. Acks of the frames found in one read go out in one write.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::histogram::Histogram;
use super::load::{now_ns, read_stamps, ID_SEQ_BITS};
use crate::forward::ack::encode_ack;
use crate::forward::entries::entry_len;
use crate::forward::{Decoded, Frame, FrameDecoder, Limits};

/// Bytes read per call.
const READ_CHUNK: usize = 256 * 1024;
/// Deadline for one ack write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Event sequences tracked per connection id for duplicates (2^32 events = 512 MiB of bits,
/// never reached by a bounded run; beyond it events are counted but not tracked).
const MAX_TRACKED_SEQ: u64 = 1 << 32;

/// What arrived so far.
#[derive(Default)]
pub struct Delivered {
    pub events: AtomicU64,
    pub frames: AtomicU64,
    /// Events whose id had been seen before.
    pub duplicates: AtomicU64,
    /// Events without readable stamps (not written by the bench senders).
    pub foreign: AtomicU64,
    /// `now_ns` of the last frame.
    pub last_ns: AtomicU64,
    latency: Mutex<Histogram>,
    /// One bitmap of seen sequences per sender connection index.
    seen: Mutex<Vec<Vec<u64>>>,
}

impl Delivered {
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Acquire)
    }

    /// End-to-end latency of every event so far.
    pub fn latency(&self) -> Histogram {
        self.latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record_frame(&self, frame: &Frame, event_bytes: usize) {
        let now = now_ns();
        let mut stamps = Vec::with_capacity(frame.events as usize);
        let fixed = event_bytes > 0
            && frame.entries.len() == frame.events as usize * event_bytes
            && frame.entries.first() == Some(&0x92);
        let mut foreign = 0u64;
        if fixed {
            for entry in frame.entries.chunks_exact(event_bytes) {
                match read_stamps(entry) {
                    Some(s) => stamps.push(s),
                    None => foreign += 1,
                }
            }
        } else {
            let mut pos = 0;
            let mut index = 0u32;
            while pos < frame.entries.len() {
                let Ok(len) = entry_len(&frame.entries[pos..], index, 64) else {
                    break;
                };
                match read_stamps(&frame.entries[pos..pos + len]) {
                    Some(s) => stamps.push(s),
                    None => foreign += 1,
                }
                pos += len;
                index += 1;
            }
        }
        let mut duplicates = 0u64;
        {
            let mut latency = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            for &(ts, _) in &stamps {
                latency.record(now.saturating_sub(ts));
            }
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for &(_, id) in &stamps {
                let conn = (id >> ID_SEQ_BITS) as usize;
                let seq = id & ((1 << ID_SEQ_BITS) - 1);
                if conn > 1 << 16 || seq >= MAX_TRACKED_SEQ {
                    continue;
                }
                if seen.len() <= conn {
                    seen.resize_with(conn + 1, Vec::new);
                }
                let bits = &mut seen[conn];
                let word = (seq / 64) as usize;
                if bits.len() <= word {
                    bits.resize(word + 1 + word / 2, 0);
                }
                let mask = 1u64 << (seq % 64);
                if bits[word] & mask != 0 {
                    duplicates += 1;
                }
                bits[word] |= mask;
            }
        }
        self.events
            .fetch_add(u64::from(frame.events), Ordering::AcqRel);
        self.frames.fetch_add(1, Ordering::AcqRel);
        self.duplicates.fetch_add(duplicates, Ordering::AcqRel);
        self.foreign.fetch_add(foreign, Ordering::AcqRel);
        self.last_ns.store(now, Ordering::Release);
    }
}

/// How the aggregator behaves.
#[derive(Debug, Clone, Copy)]
pub struct AggregatorOptions {
    /// Ack frames that carry a `chunk`.
    pub ack: bool,
    /// Size of every bench event (0: walk entries instead of striding).
    pub event_bytes: usize,
}

/// A running aggregator.
pub struct Aggregator {
    pub addr: SocketAddr,
    pub delivered: Arc<Delivered>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Aggregator {
    pub async fn start(
        listen: SocketAddr,
        options: AggregatorOptions,
    ) -> std::io::Result<Aggregator> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let delivered = Arc::new(Delivered::default());
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accept = accept_loop(
            listener,
            options,
            delivered.clone(),
            stop.clone(),
            tracker.clone(),
        );
        tracker.spawn(accept);
        Ok(Aggregator {
            addr,
            delivered,
            stop,
            tracker,
        })
    }

    /// Close the listener and every connection.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        let _ = timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    options: AggregatorOptions,
    delivered: Arc<Delivered>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let delivered = delivered.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            if let Err(reason) = serve(stream, options, &delivered, &stop).await {
                tracing::debug!(%reason, "bench aggregator closed a connection");
            }
        });
    }
}

async fn serve(
    mut stream: TcpStream,
    options: AggregatorOptions,
    delivered: &Delivered,
    stop: &CancellationToken,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut decoder = FrameDecoder::new(Limits {
        max_frame_bytes: 64 << 20,
        ..Limits::default()
    });
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut acks = Vec::new();
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Decoded::Frame(frame))) => {
                    delivered.record_frame(&frame, options.event_bytes);
                    if let (true, Some(chunk)) = (options.ack, &frame.chunk) {
                        encode_ack(chunk, &mut acks);
                    }
                }
                Ok(Some(Decoded::Nil)) => {}
                Ok(None) => break,
                Err(e) => return Err(format!("bad frame: {e}")),
            }
        }
        if !acks.is_empty() {
            match timeout(WRITE_TIMEOUT, stream.write_all(&acks)).await {
                Ok(Ok(())) => acks.clear(),
                Ok(Err(e)) => return Err(format!("ack write: {e}")),
                Err(_) => return Err("ack write timed out".into()),
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            read = stream.read_buf(&mut buf) => read,
            () = stop.cancelled() => return Ok(()),
        };
        match read {
            Ok(0) if buf.is_empty() => return Ok(()),
            Ok(0) => return Err(format!("closed inside a frame ({} bytes)", buf.len())),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
