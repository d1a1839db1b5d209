//! Accepted connections: TCP streams (no delay) that tell h2 they do not
//! write vectored, closed when idle, and no more of them at once than
//! [`ConnLimits::max_connections`].
//!
//! Why not vectored: h2 copies a DATA frame's payload into its connection
//! write buffer only when the payload is smaller than a threshold: 256 bytes
//! when the transport writes vectored (a `TcpStream` does), 1024 bytes when
//! it does not. A larger payload is held aside and the buffer must be
//! written out before the next frame can be queued: one `writev` per
//! response. A plan's answer with OpenAI-style headers (6 headers, ~330
//! bytes) crosses 256 bytes, and under load sluice made 1.3 `writev` calls
//! per such response against 0.3 for a small one (BENCHMARKS.md, profile).
//! With the 1024-byte threshold, answers up to 1 KiB are copied (a few
//! hundred bytes of memcpy) and many go out in one write. Larger frames
//! still go out as before, from their own buffer.
//!
//! Why idle connections close: a client that connects and sends nothing
//! (not even HTTP/2's preface) would otherwise hold its socket forever, and
//! enough of them exhaust the process's file descriptors, locking every
//! client out. A connection from which nothing was read for
//! [`ConnLimits::idle_timeout`] reads as closed; gRPC clients (Envoy
//! included) reconnect on their next call. The connection cap bounds what
//! open connections can hold meanwhile: past it, new ones are closed at
//! once (and a warning logged, at most once a minute).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Bounds on connections (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once (default 4096); past it, new ones are
    /// closed at once.
    pub max_connections: usize,
    /// A connection nothing was read from for this long is closed (default
    /// 300 s).
    pub idle_timeout: Duration,
    /// Most HTTP/2 streams (calls) in flight on one connection (default
    /// 1024; HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS, which clients
    /// honour by queueing or opening another connection).
    pub max_streams: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 4096,
            idle_timeout: Duration::from_secs(300),
            max_streams: 1024,
        }
    }
}

/// An accepted TCP connection whose writes are not vectored and that
/// closes when idle (see the module docs). It holds one of the listener's
/// connection permits until it is dropped.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    idle_timeout: Duration,
    /// When something was last read.
    last_read: Instant,
    /// Wakes the connection when it may have been idle for `idle_timeout`.
    idle: Pin<Box<Sleep>>,
    /// Whether `idle` holds this connection's waker since it was last set.
    armed: bool,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // Only the clock on the hot path; the timer is moved
                    // when it fires (below).
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // The timer is polled once per setting, which leaves this
                // task's waker with it; polling it on every read cost ~5%
                // of throughput (tokio's cooperative budget), while
                // `is_elapsed` is one load.
                if this.idle.is_elapsed() {
                    let deadline = this.last_read + this.idle_timeout;
                    if Instant::now() >= deadline {
                        // Idle: read as closed, nothing filled.
                        tracing::debug!(
                            idle_secs = this.idle_timeout.as_secs(),
                            "closing an idle connection"
                        );
                        return Poll::Ready(Ok(()));
                    }
                    this.idle.as_mut().reset(deadline);
                    this.armed = false;
                }
                if !this.armed {
                    // Registers the waker; the deadline is in the future.
                    let _ = this.idle.as_mut().poll(cx);
                    this.armed = true;
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    // `poll_write_vectored` keeps its default: it writes the first non-empty
    // buffer, which is what a caller told "not vectored" expects.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections accepted on `listener`, with TCP_NODELAY set, as
/// [`Conn`]s within `limits`: what sluice's servers (and the do-nothing
/// bench server, so the comparison stays fair) serve on.
pub fn incoming(listener: TcpListener, limits: ConnLimits) -> impl Stream<Item = io::Result<Conn>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Unix seconds of the last "too many connections" warning.
    let warned = Arc::new(AtomicU64::new(0));
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .filter_map(move |conn| {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                // One warning a minute: the first to move the mark warns.
                let now = crate::storage::unix_now();
                let last = warned.load(Ordering::Relaxed);
                if now >= last + 60
                    && warned
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        max = limits.max_connections,
                        peer = ?stream.peer_addr().ok(),
                        "too many connections: closing new ones until some close (--max-connections)"
                    );
                }
                return None;
            };
            let now = Instant::now();
            Some(Ok(Conn {
                stream,
                idle_timeout: limits.idle_timeout,
                last_read: now,
                idle: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
                armed: false,
                _permit: permit,
            }))
        })
}
