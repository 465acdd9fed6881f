//! The agent's side of a host connection, made robust to the guest kernel's transient send
//! failures.
//!
//! Linux's virtio-vsock transport allocates each packet it sends (up to 64 KiB, an order-5
//! allocation) when `sendmsg` is called, and returns ENOMEM when that fails, which a fragmented
//! small guest can hit under a long stream; ENOBUFS is the same for a full queue. Neither means
//! the connection is broken, yet tokio-vsock passes them up as plain errors and a session
//! would end mid-stream. [`RetryStream`] turns them into a short wait and a retry.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The first wait after a transient failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Whether a write error is a transient shortage rather than a broken connection.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOMEM | libc::ENOBUFS))
}

/// A stream whose writes wait and retry on ENOMEM and ENOBUFS.
#[derive(Debug)]
pub struct RetryStream<S> {
    inner: S,
    backoff: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Transient failures retried so far (logged once, then every 1000).
    retries: u64,
}

impl<S> RetryStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            backoff: FIRST_BACKOFF,
            sleep: None,
            retries: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RetryStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RetryStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match ready!(Pin::new(&mut self.inner).poll_write(cx, buf)) {
                Err(e) if is_transient(&e) => {
                    if self.retries % 1000 == 0 {
                        log::warn!(
                            "vsock send: {e}; retrying (transient failure {})",
                            self.retries + 1
                        );
                    }
                    self.retries += 1;
                    let wait = self.backoff;
                    self.backoff = (wait * 2).min(MAX_BACKOFF);
                    self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                }
                other => {
                    if other.is_ok() {
                        self.backoff = FIRST_BACKOFF;
                    }
                    return Poll::Ready(other);
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A writer that fails with `errno` `failures` times, then takes everything.
    struct Flaky {
        errno: i32,
        failures: usize,
        written: Vec<u8>,
    }

    impl AsyncWrite for Flaky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.failures > 0 {
                self.failures -= 1;
                return Poll::Ready(Err(io::Error::from_raw_os_error(self.errno)));
            }
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Flaky {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn flaky(errno: i32, failures: usize) -> RetryStream<Flaky> {
        RetryStream::new(Flaky {
            errno,
            failures,
            written: Vec::new(),
        })
    }

    #[tokio::test]
    async fn test_retry_stream_enomem_and_enobufs_are_retried() {
        for errno in [libc::ENOMEM, libc::ENOBUFS] {
            let mut stream = flaky(errno, 5);

            stream.write_all(b"frame").await.expect("write");

            assert_eq!(stream.inner.written, b"frame");
            assert_eq!(stream.retries, 5);
        }
    }

    #[tokio::test]
    async fn test_retry_stream_other_errors_pass_through() {
        let mut stream = flaky(libc::EPIPE, 1);

        let err = stream.write_all(b"frame").await.expect_err("EPIPE");

        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
        assert!(stream.inner.written.is_empty());
    }
}
