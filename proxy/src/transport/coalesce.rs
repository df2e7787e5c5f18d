//! Gathers an HTTP/2 connection's frames into one TLS record and one `writev` per turn.
//!
//! `tokio-rustls` encrypts and sends every write at once, and the `h2` crate flushes as soon as
//! its connection task has nothing more queued. On an mTLS connection between proxies that
//! splits what belongs together: when an HTTP/1.1 request goes out over HTTP/2, the stream is
//! opened (HEADERS) by the connection task, and only then may the body's task send its DATA, so
//! HEADERS leave in one TLS record and write, DATA in a second, and the peer proxy wakes twice.
//!
//! [`Coalesce`] sits between `h2` and the TLS stream of every mTLS HTTP/2 connection, outbound
//! and inbound. Writes go into a buffer of at most [`MAX_BUFFER`] bytes. The first flush that
//! finds data waiting does not write it: it wakes its own task and returns `Pending` once, so the
//! tasks already woken on this runtime (the body that was just granted capacity) run first and
//! add their frames. The next flush writes everything as one TLS record and one system call. The delay is one pass of the scheduler's run queue, not a
//! timer: on the default single-threaded runtime, the tasks already queued. Shutdown writes what
//! is buffered without waiting.
//!
//! Plaintext HTTP/2 does not use it. There the split costs only a system call, not a record,
//! and with it, one proxy between an HTTP/2 client and server lost throughput at saturation
//! (17.9k against 21.4k req/s, three interleaved runs each; benches/RESULTS.md): the extra
//! connection-task poll per flush costs more than the write it saves.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held back: one TLS record's worth of plaintext. A larger write (a big DATA
/// frame) goes through without a copy once the buffer is empty.
pub const MAX_BUFFER: usize = 16 * 1024;

/// An I/O stream whose writes are buffered until a flush, and whose flush yields once first.
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` is already written.
    sent: usize,
    /// A flush already yielded for the data now in `buf`.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes; `Ready(false)` when they should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buffered() + len > MAX_BUFFER {
            std::task::ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len < MAX_BUFFER))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !std::task::ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !std::task::ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            if !this.yielded {
                // Let the tasks woken alongside this one add their frames first.
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            std::task::ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records each write it is given.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Writes {
        fn take(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_leave_as_one() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        c.write_all(b"HEADERS").await.unwrap();
        let n = c
            .write_vectored(&[io::IoSlice::new(b"-DATA"), io::IoSlice::new(b"-END")])
            .await
            .unwrap();
        assert_eq!(n, 9, "vectored writes are taken whole");
        assert!(w.take().is_empty(), "nothing is written before the flush");
        c.flush().await.unwrap();
        assert_eq!(w.take(), vec![b"HEADERS-DATA-END".to_vec()]);
    }

    /// Counts how often its task is woken.
    struct CountWakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The first flush yields (wakes itself, writes nothing), so a write made by a task that
    /// runs in between joins the same system call.
    #[test]
    fn a_flush_yields_once_so_frames_written_meanwhile_join() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        let wakes = Arc::new(CountWakes(Default::default()));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = Pin::new(&mut c);

        assert!(c.as_mut().poll_write(&mut cx, b"HEADERS").is_ready());
        assert!(c.as_mut().poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(w.take().is_empty());
        // The body's task runs now and adds its frame.
        assert!(c.as_mut().poll_write(&mut cx, b"+DATA").is_ready());
        assert!(matches!(
            c.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(w.take(), vec![b"HEADERS+DATA".to_vec()]);
        // Nothing buffered: a flush does not yield.
        assert!(matches!(
            c.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn large_writes_bypass_the_buffer_after_draining_it() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        c.write_all(b"small").await.unwrap();
        let big = vec![7u8; MAX_BUFFER + 1];
        c.write_all(&big).await.unwrap();
        let writes = w.take();
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0], b"small");
        assert_eq!(writes[1].len(), MAX_BUFFER + 1);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_buffered() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        c.write_all(b"GOAWAY").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(w.take(), vec![b"GOAWAY".to_vec()]);
    }
}
