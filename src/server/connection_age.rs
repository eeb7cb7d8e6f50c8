//! Connections age out, so the calls of long-lived clients spread over the
//! replicas added since they connected (gRPC's MaxConnectionAge).
//!
//! At `--max-connection-age` (jittered, see [`jittered`]) tonic ends the
//! connection gracefully: an HTTP/2 GOAWAY, after which the client opens a
//! new connection (to any replica) for its next calls, while the calls
//! already open go on. `--max-connection-age-grace` later, whatever is
//! still open (a long watch) is cut: [`Aged`] wraps each accepted socket and
//! reads end of file from then on. tonic's own `max_connection_age_grace`
//! is not used: in tonic 0.14 setting it replaces the GOAWAY with that
//! forced close.

use std::{
    future::Future as _,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

/// Share of the age by which one replica's age differs from the setting,
/// either way, as in grpc-go: replicas started together (a rollout) do not
/// send all their clients away at the same moment.
pub(super) const JITTER: f64 = 0.1;

/// `age` moved by up to [`JITTER`] of itself, either way, by `draw` (a
/// number in `[0, 1)`).
pub(super) fn jittered(age: Duration, draw: f64) -> Duration {
    age.mul_f64(1.0 + JITTER * (2.0 * draw - 1.0))
}

/// An accepted connection that reads end of file (and fails writes) once
/// `close_at` has passed, so hyper ends it.
///
/// Polling the timer costs a timer update and the task's cooperative budget,
/// and reads and writes happen several times per call: the timer is polled
/// only to arm it and when a read is about to wait (so that an idle
/// connection wakes at its end); other reads and writes load its state.
#[derive(Debug)]
pub(super) struct Aged<IO> {
    io: IO,
    close_at: Pin<Box<Sleep>>,
    /// Whether `close_at` has been polled, so the timer runs.
    armed: bool,
    closed: bool,
}

impl<IO> Aged<IO> {
    /// `io`, closed `lifetime` from now.
    pub(super) fn new(io: IO, lifetime: Duration) -> Self {
        Self {
            io,
            close_at: Box::pin(tokio::time::sleep_until(Instant::now() + lifetime)),
            armed: false,
            closed: false,
        }
    }

    /// Whether the connection's end has passed, from the timer's state.
    fn is_closed(&mut self) -> bool {
        if !self.closed && self.close_at.is_elapsed() {
            self.close();
        }
        self.closed
    }

    /// Polls the timer, so it wakes this task at the end; whether the end
    /// has passed.
    fn arm(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed = true;
        if !self.closed && self.close_at.as_mut().poll(cx).is_ready() {
            self.close();
        }
        self.closed
    }

    fn close(&mut self) {
        tracing::debug!("connection closed: its age and grace ran out");
        self.closed = true;
    }
}

fn aged_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the connection's maximum age and grace ran out",
    )
}

impl<IO: Connected> Connected for Aged<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Aged<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_closed() || (!this.armed && this.arm(cx)) {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if this.arm(cx) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Aged<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_closed() {
            return Poll::Ready(Err(aged_out()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_closed() {
            return Poll::Ready(Err(aged_out()));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth_either_way() {
        let age = Duration::from_secs(300);
        assert_eq!(jittered(age, 0.0), Duration::from_secs(270));
        assert_eq!(jittered(age, 0.5), age);
        assert!(jittered(age, 0.999_999) < Duration::from_secs(330));
        assert!(jittered(age, 0.999_999) > Duration::from_secs(329));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_reads_end_of_file_at_its_end() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut aged = Aged::new(ours, Duration::from_secs(10));
        theirs.write_all(b"hi").await.expect("write");
        let mut buf = [0u8; 2];
        aged.read_exact(&mut buf)
            .await
            .expect("read before the end");
        let start = Instant::now();
        // Nothing more arrives: the read ends with end of file at the end.
        let n = aged.read(&mut buf).await.expect("eof");
        assert_eq!(n, 0);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert!(aged.write_all(b"late").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_reads_end_of_file_after_its_end() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut aged = Aged::new(ours, Duration::from_secs(10));
        let mut buf = [0u8; 1];
        theirs.write_all(b"a").await.expect("write");
        aged.read_exact(&mut buf)
            .await
            .expect("read before the end");
        tokio::time::advance(Duration::from_secs(11)).await;
        // Data waits, yet the end has passed: end of file, not the data.
        theirs.write_all(b"b").await.expect("write");
        assert_eq!(aged.read(&mut buf).await.expect("eof"), 0);
        assert!(aged.write_all(b"late").await.is_err());
    }
}
