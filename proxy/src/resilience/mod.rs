//! Sending a request again when an attempt failed: which failures allow it ([`again`], a pure
//! decision) and what a second attempt needs ([`Resend`]: the request's head as the client
//! sent it, and a [`replay::ReplayBody`]).
//!
//! A failed attempt may go to another endpoint when the request certainly did not reach the
//! application, whatever its method:
//! - no connection could be made (the client hands the request back unsent);
//! - HTTP/2 refused it: `REFUSED_STREAM`, or a `GOAWAY` whose last stream id is below the
//!   request's (RFC 9113 §8.7: such streams were not processed), as a draining peer does;
//!
//! and, for idempotent methods only (RFC 9110 §9.2.2), when the connection was lost before
//! any response byte arrived (reset, closed): the application may have seen the request, but
//! repeating an idempotent request is safe, as nginx's `proxy_next_upstream error` does.
//! Anything after the response head started is never retried here.
//!
//! Either way the request goes out exactly as it would have gone to the first endpoint: the
//! head is the client's (the endpoint's client puts it in its own form, see
//! [`crate::http::client`]), and the body is replayed from the record, which holds up to
//! [`replay::DEFAULT_CAP`] bytes.

pub mod breaker;
pub mod replay;
pub mod retry;

use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::http::client::ClientError;
use crate::http::BoxBody;
use replay::Replay;

/// Why a failed attempt may be sent to another endpoint (the `reason` label of
/// `weft_outbound_retries_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Again {
    /// No connection could be made: the request never left.
    Unsent,
    /// HTTP/2 refused the stream (`REFUSED_STREAM`, or beyond a `GOAWAY`).
    Refused,
    /// The connection was lost before the response head; the method is idempotent.
    Lost,
}

impl Again {
    pub fn as_str(self) -> &'static str {
        match self {
            Again::Unsent => "unsent",
            Again::Refused => "refused",
            Again::Lost => "connection-lost",
        }
    }
}

/// Idempotent methods (RFC 9110 §9.2.2).
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How a sent request failed, from its error chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer said it did not process the request.
    Refused,
    /// The connection went away before a response head.
    Lost,
    /// Anything else (a malformed response, a protocol error): not retried.
    Other,
}

/// Classifies the failure of a request that was handed to a connection.
pub fn failure_of(err: &ClientError) -> Failure {
    match err {
        ClientError::Request { source, .. } => failure_of_hyper(source),
        _ => Failure::Other,
    }
}

/// Whether the peer refused the request (see [`Failure::Refused`]).
pub fn refused(err: &hyper::Error) -> bool {
    failure_of_hyper(err) == Failure::Refused
}

fn failure_of_hyper(err: &hyper::Error) -> Failure {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
            {
                return Failure::Refused;
            }
            if h2.is_io() {
                return Failure::Lost;
            }
            return Failure::Other;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted | K::UnexpectedEof => {
                    Failure::Lost
                }
                _ => Failure::Other,
            };
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return Failure::Lost;
            }
        }
        cur = e.source();
    }
    Failure::Other
}

/// Whether a request with `method` that failed with `failure` may go to another endpoint.
pub fn again(failure: Failure, method: &Method) -> Option<Again> {
    match failure {
        Failure::Refused => Some(Again::Refused),
        Failure::Lost if is_idempotent(method) => Some(Again::Lost),
        _ => None,
    }
}

/// What a second attempt needs once the first took the request: the client's head and a
/// replayable body.
#[derive(Debug)]
pub struct Resend {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// `None`: the body was empty.
    body: Option<Replay>,
}

impl Resend {
    /// Snapshots `req`'s head and makes its body replayable (up to `cap` bytes).
    pub fn prepare(req: &mut Request<BoxBody>, cap: usize) -> Self {
        let body = if req.body().is_end_stream() {
            None
        } else {
            let client = std::mem::replace(req.body_mut(), empty());
            let (first, replay) = Replay::new(client, cap);
            *req.body_mut() = first.boxed();
            Some(replay)
        };
        Resend {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
            body,
        }
    }

    /// The request again, after the first attempt failed with `err`: `None` when that failure
    /// does not allow it, or the body cannot be replayed.
    pub fn after(&self, err: &ClientError) -> Option<(Request<BoxBody>, Again)> {
        let why = again(failure_of(err), &self.method)?;
        Some((self.request()?, why))
    }

    /// Whether the last attempt wrote the whole request, body included (always, for a request
    /// without a body); `false` while that attempt still holds the body.
    pub fn sent_whole(&self) -> bool {
        self.body.as_ref().is_none_or(Replay::sent_whole)
    }

    /// The request again, as the client sent it: `None` while the last attempt still holds
    /// the body, or when the body cannot be replayed (larger than the cap, or it failed).
    pub fn request(&self) -> Option<Request<BoxBody>> {
        let body = match &self.body {
            None => empty(),
            Some(r) => r.body()?.boxed(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }
}

fn empty() -> BoxBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_streams_retry_every_method() {
        for m in [Method::GET, Method::POST, Method::PATCH, Method::DELETE] {
            assert_eq!(again(Failure::Refused, &m), Some(Again::Refused), "{m}");
            assert_eq!(again(Failure::Other, &m), None, "{m}");
        }
        assert_eq!(again(Failure::Lost, &Method::GET), Some(Again::Lost));
        assert_eq!(again(Failure::Lost, &Method::PUT), Some(Again::Lost));
        assert_eq!(again(Failure::Lost, &Method::POST), None);
        assert_eq!(again(Failure::Lost, &Method::PATCH), None);
    }
}
