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
//!
//! Why HTTP/1 gets an answer: the ports speak gRPC, HTTP/2 only. A client
//! speaking HTTP/1.1 (curl or a browser pointed at the port) would get h2's
//! binary frames back (curl: "Received HTTP/0.9 when not allowed"). Before
//! anything is read or written, the first bytes a client sends are peeked
//! at once: an HTTP/1 request line gets a plain-text `505 HTTP Version Not
//! Supported` saying what the port speaks, and the connection is closed
//! before h2 writes anything; anything else goes to h2 untouched.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::telemetry::OncePerMinute;

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
    /// Whether the first bytes were looked at (see [`Conn::poll_first`]).
    looked: bool,
    /// An HTTP/1 request was answered: the connection reads as closed and
    /// takes no writes.
    refused: bool,
    _permit: OwnedSemaphorePermit,
}

/// The answer to an HTTP/1 request on a gRPC port.
const HTTP1_ANSWER: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\n\
content-type: text/plain; charset=utf-8\r\n\
connection: close\r\n\
content-length: 126\r\n\
\r\n\
This port speaks gRPC over HTTP/2 without TLS (h2c), not HTTP/1.1.\n\
Use a gRPC client, e.g.: grpcurl -plaintext HOST:PORT list\n";

/// Whether a connection's first bytes are an HTTP/1 request line (a
/// method, a space, a target, then ` HTTP/1.`), not HTTP/2's preface.
fn is_http1_request(first: &[u8]) -> bool {
    let line = first.split(|&b| b == b'\n').next().unwrap_or_default();
    !first.starts_with(b"PRI * HTTP/2.0")
        && line.first().is_some_and(u8::is_ascii_uppercase)
        && line.windows(7).any(|w| w == b" HTTP/1")
}

impl Conn {
    /// While nothing can be read: `Ready` once the connection has been idle
    /// for `idle_timeout` (it then reads as closed), else `Pending` with the
    /// idle timer holding the task's waker.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // The timer is polled once per setting, which leaves this task's
        // waker with it; polling it on every read cost ~5% of throughput
        // (tokio's cooperative budget), while `is_elapsed` is one load.
        if self.idle.is_elapsed() {
            let deadline = self.last_read + self.idle_timeout;
            if Instant::now() >= deadline {
                tracing::debug!(
                    idle_secs = self.idle_timeout.as_secs(),
                    "closing an idle connection"
                );
                return Poll::Ready(());
            }
            self.idle.as_mut().reset(deadline);
            self.armed = false;
        }
        if !self.armed {
            // Registers the waker; the deadline is in the future.
            let _ = self.idle.as_mut().poll(cx);
            self.armed = true;
        }
        Poll::Pending
    }

    /// Looks at the client's first bytes, once, before h2 reads or writes
    /// anything: an HTTP/1 request is answered and refused (see the module
    /// docs). `Pending` until the client sends something (or the idle
    /// timeout closes it).
    fn poll_first(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut bytes = [0u8; 256];
        let mut peeked = ReadBuf::new(&mut bytes);
        match self.stream.poll_peek(cx, &mut peeked) {
            Poll::Pending => {
                if self.poll_idle(cx).is_ready() {
                    self.looked = true;
                    self.refused = true;
                    return Poll::Ready(());
                }
                return Poll::Pending;
            }
            // EOF or an error: h2 finds out for itself.
            Poll::Ready(Ok(_)) | Poll::Ready(Err(_)) => {}
        }
        self.looked = true;
        if is_http1_request(peeked.filled()) {
            self.refused = true;
            // Take in what the client sent (so closing does not reset the
            // connection before it reads the answer), then answer; both
            // best effort: the answer fits any socket buffer.
            let mut sink = [0u8; 4096];
            while let Ok(n) = self.stream.try_read(&mut sink) {
                if n < sink.len() {
                    break;
                }
            }
            let _ = self.stream.try_write(HTTP1_ANSWER);
            tracing::debug!("an HTTP/1 request on the gRPC port: answered 505, closed");
        }
        Poll::Ready(())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.looked && this.poll_first(cx).is_pending() {
            return Poll::Pending;
        }
        if this.refused {
            // Read as closed, nothing filled.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // Only the clock on the hot path; the timer is moved
                    // when it fires (poll_idle).
                    this.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.poll_idle(cx) {
                // Idle: read as closed, nothing filled.
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            },
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
        let this = &mut *self;
        // h2 writes its SETTINGS first: not before the client's first
        // bytes were looked at, so an HTTP/1 client gets only the answer.
        if !this.looked && this.poll_first(cx).is_pending() {
            return Poll::Pending;
        }
        if this.refused {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
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
    accepted(listener, limits, true)
}

/// The connections of the HTTP port (`--http-listen`) within `limits`, as
/// an axum listener: the same bounds as the gRPC ports, without their
/// HTTP/1 check (this port speaks HTTP/1.1).
///
/// # Errors
/// If the listener's address cannot be read.
pub fn http_listener(listener: TcpListener, limits: ConnLimits) -> io::Result<HttpListener> {
    let local = listener.local_addr()?;
    Ok(HttpListener {
        conns: Box::pin(accepted(listener, limits, false)),
        local,
    })
}

/// See [`http_listener`].
pub struct HttpListener {
    conns: Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for HttpListener {
    type Io = Conn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Conn, std::net::SocketAddr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let peer = c.stream.peer_addr().unwrap_or(self.local);
                    return (c, peer);
                }
                // Accept errors are handled (logged, waited on) upstream.
                Some(Err(_)) => {}
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        Ok(self.local)
    }
}

/// [`incoming`], with the HTTP/1 check (`check_http1`) or without.
fn accepted(
    listener: TcpListener,
    limits: ConnLimits,
    check_http1: bool,
) -> impl Stream<Item = io::Result<Conn>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let too_many = Arc::new(OncePerMinute::new());
    let cannot_accept = Arc::new(OncePerMinute::new());
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .then(move |conn| {
            let cannot_accept = cannot_accept.clone();
            async move {
                let e = match conn {
                    Ok(s) => return Some(s),
                    Err(e) => e,
                };
                // Out of file descriptors (or memory): the listener stays
                // readable, so accepting again at once spins a core and
                // starves the connections already open. Wait a little, and
                // say so once a minute.
                // ENFILE, EMFILE, ENOBUFS, ENOMEM.
                if !matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) {
                    // A connection reset before it was accepted: routine.
                    tracing::debug!(error = %e, "accept failed");
                    return None;
                }
                if cannot_accept.due() {
                    tracing::error!(error = %e, "cannot accept connections (raise the open-file limit, `ulimit -n`, or lower --max-connections)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        })
        .filter_map(move |conn| {
            let stream = conn?;
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                if too_many.due() {
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
                looked: !check_http1,
                refused: false,
                _permit: permit,
            }))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines_are_told_from_the_http2_preface() {
        for yes in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit HTTP/1.1\r\n",
            b"HEAD /x HTTP/1.0\r\n",
        ] {
            assert!(is_http1_request(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"PRI",
            b"\x16\x03\x01\x02\x00",
            b"get / http/1.1\r\n",
            b"",
        ] {
            assert!(!is_http1_request(no), "{}", String::from_utf8_lossy(no));
        }
    }

    #[test]
    fn the_http1_answer_has_its_exact_length() {
        let text = std::str::from_utf8(HTTP1_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
}
