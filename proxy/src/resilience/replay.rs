//! A request body that can be sent again: [`ReplayBody`] records the frames it reads from the
//! client, up to a cap, so that a second attempt on another endpoint gets the same bytes.
//!
//! One state (the recorded frames plus the rest of the client's body) is shared by every copy
//! of the body. The copy being read holds it; a dropped copy puts it back, and the next copy
//! first replays what was recorded, then reads on from the client. A copy can therefore only
//! be made while no other copy holds the state ([`Replay::body`] answers `None` then), and
//! never once the body outgrew the cap or failed: a request is retried only when every byte
//! of its body can be sent again.
//!
//! Written here rather than taken from a crate: neither tower nor hyper ship a replayable
//! body (tower's retry wants a `Clone` request), and linkerd's `ReplayBody` lives inside
//! linkerd2-proxy. The shape is the same: record while forwarding, never wait for the whole
//! body before sending, and stop recording past the cap.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::http::{BoxBody, BoxError};

/// Request bodies up to this size are kept for a retry (the default of issue 12's buffer cap).
pub const DEFAULT_CAP: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The body state every copy shares.
struct State {
    /// Data frames read from the client so far (empty once `spoiled`).
    chunks: Vec<Bytes>,
    /// Bytes read from the client so far.
    read: usize,
    /// The client's body; `None` once it ended.
    rest: Option<BoxBody>,
    trailers: Option<HeaderMap>,
    /// Recording stopped: the body outgrew the cap or failed, so it cannot be replayed.
    spoiled: bool,
    /// The copy that last held the state gave out the whole body, to its end: the connection
    /// it was written on carried the request whole (so it may carry another).
    finished: bool,
}

struct Shared {
    slot: Mutex<Option<State>>,
    cap: usize,
    /// The client body's size hint, which every copy reports (an exact one becomes the
    /// `content-length` of an HTTP/1.1 request).
    size_hint: SizeHint,
}

/// The caller's handle: makes copies of the body for further attempts.
#[derive(Clone)]
pub struct Replay(Arc<Shared>);

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").field("cap", &self.0.cap).finish()
    }
}

impl Replay {
    /// Wraps `body`, keeping up to `cap` bytes of it for further attempts.
    pub fn new(body: BoxBody, cap: usize) -> (ReplayBody, Replay) {
        let shared = Arc::new(Shared {
            size_hint: body.size_hint(),
            slot: Mutex::new(Some(State {
                chunks: Vec::new(),
                read: 0,
                rest: Some(body),
                trailers: None,
                spoiled: false,
                finished: false,
            })),
            cap,
        });
        (ReplayBody::new(shared.clone()), Replay(shared))
    }

    /// A copy of the body for another attempt: `None` while the previous attempt still holds
    /// the body, or when it cannot be replayed (larger than the cap, or it failed).
    pub fn body(&self) -> Option<ReplayBody> {
        match &*lock(&self.0.slot) {
            Some(s) if !s.spoiled => Some(ReplayBody::new(self.0.clone())),
            _ => None,
        }
    }

    /// Whether the last copy gave out the whole body before it was dropped; `false` while a
    /// copy still holds the body.
    pub fn sent_whole(&self) -> bool {
        lock(&self.0.slot).as_ref().is_some_and(|s| s.finished)
    }
}

/// One copy of a replayable request body.
pub struct ReplayBody {
    shared: Arc<Shared>,
    /// The state, taken from the slot on the first poll and given back on drop.
    state: Option<State>,
    /// Recorded chunks this copy has given out.
    pos: usize,
    /// Bytes this copy has given out.
    sent: usize,
    trailers_sent: bool,
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl ReplayBody {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            state: None,
            pos: 0,
            sent: 0,
            trailers_sent: false,
        }
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` is true, so "whole" is decided here.
        let whole = self.is_end_stream();
        if let Some(mut s) = self.state.take() {
            s.finished = whole;
            *lock(&self.shared.slot) = Some(s);
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.state.is_none() {
            this.state = lock(&this.shared.slot).take();
        }
        let Some(st) = this.state.as_mut() else {
            return Poll::Ready(Some(Err(
                "request body is being sent by another attempt".into()
            )));
        };
        // Replay what an earlier attempt read.
        if this.sent < st.read {
            if st.spoiled {
                return Poll::Ready(Some(Err(
                    "request body outgrew the retry buffer; it cannot be sent again".into(),
                )));
            }
            let Some(c) = st.chunks.get(this.pos).cloned() else {
                return Poll::Ready(Some(Err("request body replay out of step".into())));
            };
            this.pos += 1;
            this.sent += c.len();
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        // Then read on from the client, recording.
        if let Some(rest) = st.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => st.rest = None,
                Poll::Ready(Some(Err(e))) => {
                    st.rest = None;
                    st.spoiled = true;
                    st.chunks = Vec::new();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            st.read += data.len();
                            this.sent += data.len();
                            if !st.spoiled {
                                if st.read > this.shared.cap {
                                    st.spoiled = true;
                                    st.chunks = Vec::new();
                                } else {
                                    st.chunks.push(data.clone());
                                    this.pos = st.chunks.len();
                                }
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Err(frame) => frame,
                    };
                    if let Some(t) = frame.trailers_ref() {
                        st.trailers = Some(t.clone());
                        this.trailers_sent = true;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
        match &st.trailers {
            Some(t) if !this.trailers_sent => {
                this.trailers_sent = true;
                Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
            }
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Some(st) => {
                self.sent == st.read
                    && st.rest.as_ref().is_none_or(|r| r.is_end_stream())
                    && (st.trailers.is_none() || self.trailers_sent)
            }
            None => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.size_hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    fn chunks(parts: &[&'static [u8]], trailers: Option<HeaderMap>) -> BoxBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    async fn read_all(b: ReplayBody) -> (Vec<u8>, Option<HeaderMap>) {
        let c = b.collect().await.expect("body");
        let trailers = c.trailers().cloned();
        (c.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_copy_replays_the_whole_body_and_its_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().expect("value"));
        let (first, replay) = Replay::new(chunks(&[b"hello ", b"weft"], Some(t)), 1024);
        // While the first attempt holds the body, no copy can be made.
        let mut first = first;
        assert!(first.frame().await.is_some());
        assert!(replay.body().is_none());
        drop(first);
        // The first attempt read one chunk: the copy replays it, then reads on.
        let (bytes, trailers) = read_all(replay.body().expect("copy")).await;
        assert_eq!(bytes, b"hello weft");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        // And again, entirely from the record.
        let (bytes, trailers) = read_all(replay.body().expect("copy")).await;
        assert_eq!(bytes, b"hello weft");
        assert!(trailers.is_some());
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_not_replayed_but_still_sent_whole() {
        let (first, replay) = Replay::new(chunks(&[b"0123456789", b"abcdef"], None), 12);
        let (bytes, _) = read_all(first).await;
        assert_eq!(bytes, b"0123456789abcdef");
        assert!(replay.body().is_none());
    }

    #[tokio::test]
    async fn only_a_copy_that_gave_out_everything_counts_as_sent_whole() {
        let (first, replay) = Replay::new(chunks(&[b"ab", b"cd"], None), 1024);
        assert!(!replay.sent_whole(), "held by the first copy");
        let mut first = first;
        assert!(first.frame().await.is_some());
        drop(first);
        assert!(!replay.sent_whole(), "one chunk of two was given out");
        // A copy read until `is_end_stream` (hyper stops there, without polling for the end).
        let mut copy = replay.body().expect("copy");
        while !copy.is_end_stream() {
            if copy.frame().await.is_none() {
                break;
            }
        }
        drop(copy);
        assert!(replay.sent_whole());
        // A new copy that gives out only part of the body clears it again.
        let mut copy = replay.body().expect("copy");
        assert!(copy.frame().await.is_some());
        assert!(!replay.sent_whole(), "held by the new copy");
        drop(copy);
        assert!(!replay.sent_whole());
    }

    #[tokio::test]
    async fn an_unread_body_is_replayed_from_the_client() {
        let full = Full::new(Bytes::from_static(b"abc"))
            .map_err(|e| match e {})
            .boxed();
        let (first, replay) = Replay::new(full, 1024);
        assert_eq!(first.size_hint().exact(), Some(3));
        drop(first);
        let copy = replay.body().expect("copy");
        assert_eq!(copy.size_hint().exact(), Some(3));
        assert_eq!(read_all(copy).await.0, b"abc");
    }
}
