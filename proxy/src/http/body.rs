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
use crate::observe::Draft;

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
    /// The request's event when something observes it ([`crate::observe`]).
    pub draft: Option<Box<Draft>>,
}

impl Recorder {
    pub fn record(mut self) {
        // Dropping `self` at the end also ends the request's in-flight count.
        let class = if self.failed {
            Class::Failure
        } else {
            Class::of(self.status, self.grpc_status)
        };
        self.metrics
            .response(self.status, self.grpc_status, class, self.latency);
        if let Some(mut d) = self.draft.take() {
            d.event.status = self.status;
            d.event.grpc_status = self.grpc_status;
            d.event.latency = self.latency;
            d.finish();
        }
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
                if let Some(r) = this.recorder.as_mut() {
                    if let Some(trailers) = frame.trailers_ref() {
                        if let Some(s) = grpc_status(trailers) {
                            r.grpc_status = Some(s);
                        }
                    } else if let (Some(data), Some(d)) = (frame.data_ref(), r.draft.as_mut()) {
                        d.event.response_bytes += data.len() as u64;
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(mut r) = this.recorder.take() {
                    r.failed = true;
                    if let Some(d) = r.draft.as_mut() {
                        d.event.body_failed = true;
                    }
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
