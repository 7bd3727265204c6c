//! A userspace TCP proxy that delays every byte by a fixed one-way time in each direction,
//! standing in for `tc netem` (not available here) between ackgate and its aggregator.
//!
//! Each direction is a reader that stamps every chunk it reads with `now + one_way` into a
//! bounded queue, and a writer that sleeps until a chunk's time and writes it. Chunks keep
//! flowing while earlier ones wait, so the link has latency but not a throughput of one chunk
//! per delay; the queue bound (`QUEUE_CHUNKS` × `READ_CHUNK`) plays the bandwidth-delay
//! product, and a full queue stops the reader, which is TCP backpressure. A reset on one side
//! is passed on as a reset (SO_LINGER 0), so ackgate's aborts look the same through the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes read per call in each direction.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks queued per direction (at most 64 MiB in flight through the proxy each way).
const QUEUE_CHUNKS: usize = 1024;
/// Deadline for the connect to the target and for each delayed write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A running proxy; [`DelayProxy::stop`] closes the listener and every connection.
pub struct DelayProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl DelayProxy {
    /// Listen on 127.0.0.1:0 and forward each connection to `target`, each direction delayed
    /// by `one_way` (half the round trip to add).
    pub async fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            target,
            one_way,
            stop.clone(),
            tracker.clone(),
        ));
        Ok(DelayProxy {
            addr,
            stop,
            tracker,
        })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        let _ = timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    one_way: Duration,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let stop = stop.clone();
        let inner = tracker.clone();
        tracker.spawn(async move {
            let server = match timeout(IO_TIMEOUT, TcpStream::connect(target)).await {
                Ok(Ok(server)) => server,
                // Target down: the client sees a reset, as it would without the proxy.
                _ => {
                    reset(&client);
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let broken = stop.child_token();
            inner.spawn(pipe(client_read, server_write, one_way, broken.clone()));
            inner.spawn(pipe(server_read, client_write, one_way, broken));
        });
    }
}

fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// One direction: read, stamp, queue; a second task writes each chunk when it is due. A clean
/// EOF becomes a FIN after the queue drains; an error or a stop becomes a reset of both sides.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    one_way: Duration,
    broken: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE_CHUNKS);
    let writer_broken = broken.clone();
    let writer = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                () = writer_broken.cancelled() => break,
            };
            let Some((due, chunk)) = next else {
                // Clean EOF from the reader, everything before it written: pass the FIN on.
                let _ = timeout(IO_TIMEOUT, to.shutdown()).await;
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = writer_broken.cancelled() => break,
            }
            match timeout(IO_TIMEOUT, to.write_all(&chunk)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        writer_broken.cancel();
        reset(to.as_ref());
    });
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        let read = tokio::select! {
            read = from.read_buf(&mut buf) => read,
            () = broken.cancelled() => break,
        };
        match read {
            Ok(0) => {
                drop(tx);
                let _ = writer.await;
                return;
            }
            Ok(_) => {
                let chunk = buf.split().freeze();
                if tx.send((Instant::now() + one_way, chunk)).await.is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    broken.cancel();
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_delayed_both_ways_and_fin_passes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = vec![0u8; 16];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let proxy = DelayProxy::start(target, Duration::from_millis(40))
            .await
            .unwrap();
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let t = Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"ping");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
        proxy.stop().await;
    }
}
