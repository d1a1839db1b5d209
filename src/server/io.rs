//! Accepted connections: TCP streams (no delay) that tell h2 they do not
//! write vectored.
//!
//! Why: h2 copies a DATA frame's payload into its connection write buffer
//! only when the payload is smaller than a threshold: 256 bytes when the
//! transport writes vectored (a `TcpStream` does), 1024 bytes when it does
//! not. A larger payload is held aside and the buffer must be written out
//! before the next frame can be queued: one `writev` per response. A
//! plan's answer with OpenAI-style headers (6 headers, ~330 bytes) crosses
//! 256 bytes, and under load sluice made 1.3 `writev` calls per such
//! response against 0.3 for a small one (BENCHMARKS.md, profile). With the
//! 1024-byte threshold, answers up to 1 KiB are copied (a few hundred bytes
//! of memcpy) and many go out in one write. Larger frames still go out
//! as before, from their own buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// An accepted TCP connection whose writes are not vectored (see the module
/// docs).
#[derive(Debug)]
pub struct Conn(TcpStream);

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        self.0.connect_info()
    }
}

/// The connections accepted on `listener`, with TCP_NODELAY set, as
/// [`Conn`]s: what sluice's servers (and the do-nothing bench server, so
/// the comparison stays fair) serve on.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Conn>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|conn| conn.map(Conn))
}
