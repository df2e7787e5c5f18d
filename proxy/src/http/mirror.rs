//! RequestMirror: a copy of a routed request also goes to another service, and the copy's
//! answer is discarded.
//!
//! The copy must never slow, fail or fatten the request itself:
//! - its body is teed from the client's body as the request reads it ([`Tee`]); each copy
//!   gets the frames through a channel of [`MIRROR_FRAMES`] frames, and a copy that falls that
//!   far behind is cut off (it fails, counted `failed`) rather than buffered without bound or
//!   allowed to hold the request back;
//! - a copy whose body was not read to its end (the request failed, or the copy was cut off)
//!   ends in an error, so a truncated body is never sent as if whole;
//! - it is sent from its own task to a ready endpoint of the mirror's service (none ready:
//!   `skipped`), within [`MIRROR_TIMEOUT`], and its answer is read to the end so that its
//!   connection is kept; its latency feeds the mirror endpoint's estimate, but its failures do
//!   not eject anything (a copy cut off by this proxy is not the endpoint's fault).
//!
//! Counted in `weft_route_mirrors_total{route, backend, result}`. Written here because tower
//! has no mirror layer; Envoy's request mirroring is the model (copies after the route's
//! header edits, answers ignored, the original never waits).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{BoxBody, BoxError};
use crate::balance::{Balancer, Pick};

/// Frames a copy may lag behind the request before it is cut off.
pub const MIRROR_FRAMES: usize = 32;
/// A copy that has no answer (read to its end) by then is abandoned.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// One copy to make: where it goes and its counters (`answered`, `failed`, `skipped`).
pub(super) struct Mirrored {
    pub balancer: Arc<Balancer>,
    pub counters: [Counter; 3],
}

const STREAMING: u8 = 0;
const ENDED: u8 = 1;

/// Starts a copy of `req` for each of `mirrors` and gives back the request, whose body now
/// feeds the copies as it is read.
pub(super) fn start(mirrors: Vec<Mirrored>, req: Request<BoxBody>) -> Request<BoxBody> {
    let (parts, body) = req.into_parts();
    let bodyless = body.is_end_stream();
    let hint = body.size_hint();
    let mut outlets = Vec::with_capacity(if bodyless { 0 } else { mirrors.len() });
    for m in mirrors {
        let copy_body = if bodyless {
            http_body_util::Empty::new().map_err(|e| match e {}).boxed()
        } else {
            let (tx, rx) = mpsc::channel(MIRROR_FRAMES);
            let state = Arc::new(AtomicU8::new(STREAMING));
            outlets.push(Outlet {
                tx,
                state: state.clone(),
            });
            Copied { rx, state, hint }.boxed()
        };
        let mut copy = Request::new(copy_body);
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        tokio::spawn(send(m, copy));
    }
    let body = if outlets.is_empty() {
        body
    } else {
        Tee {
            inner: body,
            outlets,
        }
        .boxed()
    };
    Request::from_parts(parts, body)
}

async fn send(m: Mirrored, req: Request<BoxBody>) {
    let [answered, failed, skipped] = &m.counters;
    let work = async {
        let Pick::Endpoint(picked) = m.balancer.pick_ready_within(None, None).await else {
            return None;
        };
        let ep = picked.member().http_endpoint(false)?;
        let start = Instant::now();
        let Ok(rsp) = ep.try_request(req).await else {
            return Some(false);
        };
        super::observe(picked.member(), start, &rsp);
        let mut body = rsp.into_body();
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return Some(false);
            }
        }
        Some(true)
    };
    match tokio::time::timeout(MIRROR_TIMEOUT, work).await {
        Ok(Some(true)) => answered.inc(),
        Ok(Some(false)) | Err(_) => failed.inc(),
        Ok(None) => skipped.inc(),
    };
}

/// Where the tee sends one copy's frames.
struct Outlet {
    tx: mpsc::Sender<Frame<Bytes>>,
    /// Set to [`ENDED`] once the whole body went through.
    state: Arc<AtomicU8>,
}

/// The request's body, sending a copy of each frame to every outlet still keeping up.
struct Tee {
    inner: BoxBody,
    outlets: Vec<Outlet>,
}

impl Tee {
    /// The body ended: each copy that kept up ends cleanly.
    fn finish(&mut self) {
        for o in self.outlets.drain(..) {
            o.state.store(ENDED, Ordering::Release);
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let copy = || {
                    if let Some(d) = frame.data_ref() {
                        Some(Frame::data(d.clone()))
                    } else {
                        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
                    }
                };
                // A copy that cannot take the frame at once is dropped (its body then ends in
                // an error): the request never waits for a mirror.
                this.outlets
                    .retain(|o| copy().is_some_and(|f| o.tx.try_send(f).is_ok()));
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            // The body failed: the copies end in an error (their outlets drop unfinished).
            Poll::Ready(Some(Err(_))) => this.outlets.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A copy's body, fed by the [`Tee`].
struct Copied {
    rx: mpsc::Receiver<Frame<Bytes>>,
    state: Arc<AtomicU8>,
    hint: SizeHint,
}

impl Body for Copied {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(f)) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) if self.state.load(Ordering::Acquire) == ENDED => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(
                "mirrored request cut off: it fell behind the request's body, or the request was not read to its end".into(),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(parts: Vec<&'static [u8]>) -> BoxBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .into_iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    fn tee(body: BoxBody) -> (Tee, Copied) {
        let (tx, rx) = mpsc::channel(MIRROR_FRAMES);
        let state = Arc::new(AtomicU8::new(STREAMING));
        let tee = Tee {
            inner: body,
            outlets: vec![Outlet {
                tx,
                state: state.clone(),
            }],
        };
        let copied = Copied {
            rx,
            state,
            hint: SizeHint::default(),
        };
        (tee, copied)
    }

    #[tokio::test]
    async fn a_copy_gets_every_byte_the_request_read() {
        let (tee, copied) = tee(stream(vec![b"hello ", b"mirror"]));
        let sent = tee.collect().await.expect("request body").to_bytes();
        let copy = copied.collect().await.expect("copy").to_bytes();
        assert_eq!(
            (&sent[..], &copy[..]),
            (&b"hello mirror"[..], &b"hello mirror"[..])
        );
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_cut_off_without_holding_the_request() {
        let parts: Vec<&'static [u8]> = vec![b"x"; MIRROR_FRAMES + 5];
        let (tee, copied) = tee(stream(parts));
        // The copy is not read at all while the request's body is read to its end.
        let sent = tee.collect().await.expect("request body").to_bytes();
        assert_eq!(sent.len(), MIRROR_FRAMES + 5);
        let copy = copied.collect().await;
        assert!(
            copy.is_err(),
            "a cut-off copy ends in an error, never truncated"
        );
    }

    #[tokio::test]
    async fn a_copy_of_a_request_not_read_to_its_end_fails() {
        let (mut tee, copied) = tee(stream(vec![b"a", b"b", b"c"]));
        assert!(tee.frame().await.is_some());
        drop(tee);
        let err = copied.collect().await.expect_err("cut");
        assert!(err.to_string().contains("cut off"), "{err}");
    }
}
