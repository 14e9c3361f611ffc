//! Clients that shut down their sending side (a TCP half-close, as `nc -N` and some
//! HTTP/1.0 clients do) after a complete request still get the full response (SPEC §5).
//!
//! hyper reads end-of-file in the middle of a request as an aborted connection and drops
//! the response. Its `half_close` switch fixes that only by never reading while a
//! response is in flight, which would also hide a browser closing its `EventSource`
//! until the next heartbeat. So instead the connection's reader hides end-of-file from
//! hyper and reports it: [`PeerShutdown::closed`] fires, the connection stops keeping
//! alive (the request in flight is answered, then the connection closes), and a stream
//! in flight writes two probes: a client that has gone answers the first with a reset,
//! so the second write fails and the stream ends at once; a half-closed client that is
//! still reading just sees two more heartbeats. Once the connection is upgraded (a
//! WebSocket), end-of-file passes through, since the WebSocket reads it itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// What one connection's reader saw of the peer's sending side; handed to every
/// request on the connection as an extension.
#[derive(Clone, Debug, Default)]
pub struct PeerShutdown(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    closed: CancellationToken,
    /// End-of-file is returned to the reader instead of hidden.
    pass_through: AtomicBool,
    /// The reader parked on a hidden end-of-file.
    parked: AtomicWaker,
}

impl PeerShutdown {
    /// Fires when the peer has shut down its sending side (or closed the connection).
    pub fn closed(&self) -> &CancellationToken {
        &self.0.closed
    }

    /// From now on, end-of-file reaches the reader (the connection was upgraded or is
    /// done with HTTP); a reader parked on it is woken to see it.
    pub fn pass_through(&self) {
        self.0.pass_through.store(true, Ordering::Release);
        self.0.parked.wake();
    }
}

/// A connection's byte stream with end-of-file held back from hyper (see the module
/// documentation).
pub struct HalfCloseAware<S> {
    inner: S,
    peer: PeerShutdown,
}

impl<S> HalfCloseAware<S> {
    pub fn new(inner: S, peer: PeerShutdown) -> Self {
        HalfCloseAware { inner, peer }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HalfCloseAware<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let had_room = buf.remaining() > 0;
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let end_of_file = had_room && buf.filled().len() == before;
        if end_of_file && !self.peer.0.pass_through.load(Ordering::Acquire) {
            self.peer.0.closed.cancel();
            self.peer.0.parked.register(cx.waker());
            // Checked again after registering, so a pass_through in between is not missed.
            if !self.peer.0.pass_through.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HalfCloseAware<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that ends in an error, instead of waiting for ever, when the peer shut
/// down its sending side before the body was complete (the reader hid that end-of-file).
pub struct BodyUntilPeerShutdown<B> {
    inner: B,
    peer: PeerShutdown,
    /// Created on the first wait, so a body that is already buffered costs nothing.
    waiting: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

impl<B> BodyUntilPeerShutdown<B> {
    pub fn new(inner: B, peer: PeerShutdown) -> Self {
        BodyUntilPeerShutdown {
            inner,
            peer,
            waiting: None,
        }
    }
}

impl<B> http_body::Body for BodyUntilPeerShutdown<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let BodyUntilPeerShutdown { peer, waiting, .. } = &mut *self;
                let waiting = waiting
                    .get_or_insert_with(|| Box::pin(peer.closed().clone().cancelled_owned()));
                ready!(waiting.as_mut().poll(cx));
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client shut down its sending side before the request body ended",
                )
                .into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
