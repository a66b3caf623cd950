//! Bounds on the HTTP listener's connections, which a request limit alone does not give: at
//! most [`MAX_CONNECTIONS`] open at once (the next ones wait in the kernel's backlog until one
//! closes), and each lives at most [`CONNECTION_LIFETIME`], after which its reads and writes
//! fail and hyper drops it, so an idle or trickling client cannot hold a slot for long. A
//! browser or Prometheus simply reconnects.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one connection may stay open.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// A TCP listener that hands out at most `permits` connections at a time.
#[derive(Debug)]
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    lifetime: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max: usize, lifetime: Duration) -> Self {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            lifetime,
        }
    }
}

/// One accepted connection: it holds its slot until dropped and expires at its deadline.
#[derive(Debug)]
pub struct BoundedConn {
    io: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl BoundedConn {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn expired_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the connection reached its lifetime",
    )
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // The semaphore is never closed, so this only waits for a free slot.
            let Ok(slot) = self.permits.clone().acquire_owned().await else {
                return std::future::pending().await;
            };
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let conn = BoundedConn {
                        io,
                        deadline: Box::pin(tokio::time::sleep(self.lifetime)),
                        _slot: slot,
                    };
                    return (conn, addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    drop(slot);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener(max: usize, lifetime: Duration) -> (BoundedListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (BoundedListener::new(l, max, lifetime), addr)
    }

    #[tokio::test]
    async fn a_full_listener_accepts_again_when_a_connection_closes() {
        let (mut l, addr) = listener(1, Duration::from_secs(60)).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        let _c2 = TcpStream::connect(addr).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), l.accept())
                .await
                .is_err(),
            "a second connection was accepted while the only slot was taken"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("the freed slot was not reused");
    }

    #[tokio::test]
    async fn a_connection_expires_even_when_idle() {
        let (mut l, addr) = listener(4, Duration::from_millis(100)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = l.accept().await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).await.unwrap();
        // Nothing more arrives: the read ends with the lifetime, not never.
        let e = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut b))
            .await
            .expect("an idle connection outlived its lifetime")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(conn.write_all(b"late").await.is_err());
    }
}
