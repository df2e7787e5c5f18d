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
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Cause::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
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
