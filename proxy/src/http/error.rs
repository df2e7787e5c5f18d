//! Why the proxy answered a request itself, and how that looks on the wire.
//!
//! Every response the proxy makes carries `weft-proxy-error: <cause>`; the same cause is
//! counted in `weft_proxy_errors_total` and logged.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::BoxBody;

/// Header naming the cause of a proxy-generated response.
pub const ERROR_HEADER: &str = "weft-proxy-error";

/// A cause for a response the proxy makes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    ConnectRefused,
    ConnectTimeout,
    ConnectUnreachable,
    ConnectError,
    UpstreamReset,
    UpstreamError,
    HeaderTooLarge,
    HeaderTimeout,
    BadRequest,
    BadAuthority,
    /// The destination is a known service with no ready endpoints.
    NoEndpoints,
    /// The mTLS handshake with a meshed endpoint failed (wrong identity, untrusted, refused).
    TlsHandshake,
    /// The endpoint is meshed but this proxy holds no valid certificate (fail closed).
    IdentityUnavailable,
    /// The service has routes, and none matches the request.
    NoRoute,
    /// The route's backend cannot be used (no such service, a reference not allowed), or the
    /// route has no backend with a weight.
    InvalidBackend,
    /// The route's (or the service's) request timeout expired.
    RequestTimeout,
    /// The endpoints' concurrency or pending-request limits are reached: failing fast.
    Overloaded,
    /// Inbound: no authorization of the port's server (or of the matched route) allows the
    /// client.
    Unauthorized,
}

impl Cause {
    /// The machine-readable cause string.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ConnectRefused => "connect-refused",
            Cause::ConnectTimeout => "connect-timeout",
            Cause::ConnectUnreachable => "connect-unreachable",
            Cause::ConnectError => "connect-error",
            Cause::UpstreamReset => "upstream-reset",
            Cause::UpstreamError => "upstream-error",
            Cause::HeaderTooLarge => "header-too-large",
            Cause::HeaderTimeout => "header-timeout",
            Cause::BadRequest => "bad-request",
            Cause::BadAuthority => "bad-authority",
            Cause::NoEndpoints => "no-endpoints",
            Cause::TlsHandshake => "tls-handshake-failed",
            Cause::IdentityUnavailable => "identity-unavailable",
            Cause::NoRoute => "no-route",
            Cause::InvalidBackend => "invalid-backend",
            Cause::RequestTimeout => "request-timeout",
            Cause::Overloaded => "overloaded",
            Cause::Unauthorized => "unauthorized",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Cause::ConnectTimeout | Cause::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            Cause::NoRoute => StatusCode::NOT_FOUND,
            Cause::Unauthorized => StatusCode::FORBIDDEN,
            Cause::InvalidBackend => StatusCode::INTERNAL_SERVER_ERROR,
            Cause::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Cause::ConnectRefused
            | Cause::ConnectUnreachable
            | Cause::ConnectError
            | Cause::UpstreamReset
            | Cause::UpstreamError
            | Cause::TlsHandshake => StatusCode::BAD_GATEWAY,
            Cause::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Cause::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Cause::BadRequest | Cause::BadAuthority => StatusCode::BAD_REQUEST,
            Cause::NoEndpoints | Cause::IdentityUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether a request that failed this way never reached the application, so a retry is safe.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Cause::ConnectRefused
                | Cause::ConnectTimeout
                | Cause::ConnectUnreachable
                | Cause::ConnectError
                | Cause::TlsHandshake
                | Cause::IdentityUnavailable
        )
    }

    /// The cause of a connect failure.
    pub fn of_connect(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Cause::ConnectRefused,
            K::TimedOut => Cause::ConnectTimeout,
            K::HostUnreachable | K::NetworkUnreachable | K::AddrNotAvailable => {
                Cause::ConnectUnreachable
            }
            _ => Cause::ConnectError,
        }
    }

    /// The gRPC status a gRPC client gets for this cause.
    pub fn grpc_status(self) -> u32 {
        match self {
            Cause::RequestTimeout | Cause::ConnectTimeout => 4, // DEADLINE_EXCEEDED
            Cause::NoRoute => 12,                               // UNIMPLEMENTED
            Cause::HeaderTooLarge
            | Cause::HeaderTimeout
            | Cause::BadRequest
            | Cause::BadAuthority => 3, // INVALID_ARGUMENT
            Cause::InvalidBackend => 13,                        // INTERNAL
            Cause::Overloaded => 8,                             // RESOURCE_EXHAUSTED
            Cause::Unauthorized => 7,                           // PERMISSION_DENIED
            _ => 14,                                            // UNAVAILABLE
        }
    }

    /// A proxy-made response for this cause; a gRPC request (`grpc`) gets a gRPC answer: HTTP
    /// 200 with the status in `grpc-status` (a trailers-only response), as gRPC clients read it.
    pub fn response_for(self, grpc: bool, detail: &str) -> Response<BoxBody> {
        if !grpc {
            return self.response(detail);
        }
        let mut rsp = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
        let h = rsp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
        let message = format!("weft-proxy: {}: {}", self.as_str(), detail);
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
            h.insert("grpc-message", v);
        }
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.as_str()));
        rsp
    }

    /// A proxy-made response for this cause.
    pub fn response(self, detail: &str) -> Response<BoxBody> {
        let body = format!("weft-proxy: {}: {}\n", self.as_str(), detail);
        let mut rsp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
        *rsp.status_mut() = self.status();
        rsp.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(self.as_str()));
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    }

    /// The same response as raw HTTP/1.1 bytes, for errors found before hyper owns the connection.
    pub fn raw_http1(self, detail: &str) -> Vec<u8> {
        let body = format!("weft-proxy: {}: {}\n", self.as_str(), detail);
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\n{}: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            ERROR_HEADER,
            self.as_str(),
            body.len(),
            body
        )
        .into_bytes()
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2: everything outside printable ASCII,
/// and `%` itself).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is gRPC (its errors are answered the gRPC way).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_the_cause() {
        let r = Cause::ConnectRefused.response("127.0.0.1:1");
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[ERROR_HEADER], "connect-refused");
        assert_eq!(Cause::ConnectTimeout.status(), 504);
        let r = Cause::NoEndpoints.response("web:80");
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "no-endpoints");
        let raw = String::from_utf8(Cause::HeaderTooLarge.raw_http1("70000 bytes")).unwrap();
        assert!(raw.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(raw.contains("weft-proxy-error: header-too-large\r\n"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }

    #[test]
    fn grpc_requests_get_a_grpc_status() {
        let r = Cause::RequestTimeout.response_for(true, "10.0.0.1:80 after 1s\u{e9}");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()[ERROR_HEADER], "request-timeout");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let msg = r.headers()["grpc-message"].to_str().unwrap();
        assert!(msg.ends_with("after 1s%C3%A9"), "{msg}");
        let r = Cause::RequestTimeout.response_for(false, "x");
        assert_eq!(r.status(), 504);
        assert_eq!(Cause::NoRoute.status(), 404);
        assert_eq!(Cause::Overloaded.status(), 503);
        assert_eq!(Cause::InvalidBackend.status(), 500);
        let r = Cause::Unauthorized.response_for(true, "server/ns/web: no authorization allows");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()[ERROR_HEADER], "unauthorized");
        let r = Cause::Unauthorized.response("server/ns/web: no authorization allows");
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[ERROR_HEADER], "unauthorized");
        assert!(!Cause::Unauthorized.is_retryable());
    }

    #[test]
    fn connect_errors_map_to_causes() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            Cause::of_connect(&Error::from(ErrorKind::ConnectionRefused)),
            Cause::ConnectRefused
        );
        assert_eq!(
            Cause::of_connect(&Error::from(ErrorKind::TimedOut)),
            Cause::ConnectTimeout
        );
        assert!(Cause::ConnectRefused.is_retryable());
        assert!(!Cause::UpstreamReset.is_retryable());
    }
}
