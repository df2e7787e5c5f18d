//! A response body wrapper that records golden metrics when the response ends.
//!
//! Recording at the end (or when the body is dropped) lets gRPC responses be classified by the
//! `grpc-status` in their trailers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::metrics::{AuthorityMetrics, Class};

use super::BoxError;

/// What is known about a response when its headers go out.
#[derive(Debug)]
pub struct Recorder {
    pub metrics: Arc<AuthorityMetrics>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub latency: Duration,
    pub failed: bool,
    /// Counts the request against its endpoint until the response ends (balanced requests).
    pub in_flight: Option<crate::balance::InFlight>,
}

impl Recorder {
    pub fn record(self) {
        // Dropping `self` at the end also ends the request's in-flight count.
        let class = if self.failed {
            Class::Failure
        } else {
            Class::of(self.status, self.grpc_status)
        };
        self.metrics
            .response(self.status, self.grpc_status, class, self.latency);
    }
}

/// Reads `grpc-status` from a header map.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

pin_project_lite::pin_project! {
    /// Wraps a body; records metrics once, at its end or drop.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }

    impl<B> PinnedDrop for Observed<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(r) = this.project().recorder.take() {
                r.record();
            }
        }
    }
}

impl<B> Observed<B> {
    pub fn new(inner: B, recorder: Recorder) -> Self {
        Self {
            inner,
            recorder: Some(recorder),
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let res = futures_util::ready!(this.inner.poll_frame(cx));
        match &res {
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(r)) = (frame.trailers_ref(), this.recorder.as_mut()) {
                    if let Some(s) = grpc_status(trailers) {
                        r.grpc_status = Some(s);
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(mut r) = this.recorder.take() {
                    r.failed = true;
                    r.record();
                }
            }
            None => {
                if let Some(r) = this.recorder.take() {
                    r.record();
                }
            }
        }
        Poll::Ready(res.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A body whose first frame (or its end) was already taken from `inner`, ready, when the
    /// response head arrived. Handed to hyper's HTTP/2 server together with the head, it lets
    /// HEADERS and the first DATA frame leave in one write (and one wakeup of the peer)
    /// instead of two: measured, a third fewer syscalls per request on both proxies of an
    /// mTLS hop (benches/RESULTS.md).
    pub struct Prefetched<B> {
        first: Option<Option<Result<Frame<Bytes>, BoxError>>>,
        #[pin]
        inner: B,
    }
}

impl<B> Prefetched<B> {
    pub fn new(first: Option<Result<Frame<Bytes>, BoxError>>, inner: B) -> Self {
        Self {
            first: Some(first),
            inner,
        }
    }
}

impl<B> Body for Prefetched<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.first.take() {
            Some(first) => Poll::Ready(first),
            None => this.inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.first {
            Some(None) => true,
            Some(Some(_)) => false,
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let first = match &self.first {
            Some(None) => return SizeHint::with_exact(0),
            Some(Some(Ok(f))) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + first);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_prefetched_frame_comes_first_and_the_hints_add_up() {
        let inner = Full::new(Bytes::from_static(b"rest")).map_err(|e| match e {});
        let first = Some(Ok(Frame::data(Bytes::from_static(b"head-"))));
        let body = Prefetched::new(first, inner);
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(9));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"head-rest");

        let done = Prefetched::new(None, Full::new(Bytes::new()).map_err(|e| match e {}));
        assert!(done.is_end_stream());
        assert_eq!(done.size_hint().exact(), Some(0));
    }
}
