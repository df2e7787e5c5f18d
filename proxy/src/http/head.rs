//! Reading and checking the first HTTP/1 request head before hyper takes the connection.
//!
//! This lets the proxy answer oversized (431), malformed (400) and too-slow (408) heads with a
//! `weft-proxy-error` header. Later requests on a keep-alive connection are bounded by hyper's
//! own limits, configured to the same values.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// Most headers accepted in one request: hyper's default, which it parses without allocating.
pub const MAX_HEADERS: usize = 100;

/// Why a request head was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("request head not complete before the header read timeout")]
    Timeout,
    #[error("client closed before sending a complete request head")]
    Closed,
    #[error("reading request head: {0}")]
    Io(String),
}

/// Checks whether `buf` holds a complete, valid request head.
pub fn check(buf: &[u8], max: usize) -> Result<bool, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > max => Err(HeadError::TooLarge { max }),
        Ok(httparse::Status::Complete(_)) => Ok(true),
        Ok(httparse::Status::Partial) if buf.len() > max => Err(HeadError::TooLarge { max }),
        Ok(httparse::Status::Partial) => Ok(false),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Reads into `buf` until it holds a complete head, or fails.
pub async fn read_first_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    max: usize,
    deadline: Instant,
) -> Result<(), HeadError> {
    loop {
        if check(buf, max)? {
            return Ok(());
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(HeadError::Io(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        assert_eq!(check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1024), Ok(true));
        assert_eq!(check(b"GET / HTTP/1.1\r\nHost: a\r\n", 1024), Ok(false));
        assert!(matches!(
            check(b"GET / HTTP/1.1\r\nBad Header: a\r\n\r\n", 1024),
            Err(HeadError::Malformed(_))
        ));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(2000, b'a');
        assert_eq!(check(&big, 1024), Err(HeadError::TooLarge { max: 1024 }));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(check(&many, 1 << 20), Err(HeadError::TooManyHeaders));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut v = b"GET / HTTP/1.1\r\n".to_vec();
            v.extend_from_slice(&bytes);
            let _ = check(&v, 256);
        }
    }
}
