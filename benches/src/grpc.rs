//! The gRPC length-prefixed message framing, hand-rolled so the bench needs
//! no tonic: one byte "compressed" flag, four bytes big-endian length, then
//! the message.

use bytes::{BufMut, Bytes, BytesMut};

/// The path the bench server answers gRPC on.
pub const UNARY_PATH: &str = "/weft.bench.Echo/Unary";
/// `content-type` of gRPC requests and responses.
pub const CONTENT_TYPE: &str = "application/grpc";
/// Length of the frame header.
pub const HEADER_LEN: usize = 5;

/// Wraps `message` in one uncompressed gRPC frame.
pub fn encode(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + message.len());
    buf.put_u8(0);
    // Messages here are at most a few MiB; saturate rather than wrap.
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.put_slice(message);
    buf.freeze()
}

/// Why a body is not exactly one well-formed gRPC frame.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than five bytes.
    ShortHeader(usize),
    /// The compressed flag is set; the bench never compresses.
    Compressed,
    /// The header's length does not match the bytes that follow it.
    Length { declared: usize, actual: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::ShortHeader(n) => {
                write!(f, "gRPC body of {n} bytes is shorter than a frame header")
            }
            FrameError::Compressed => {
                write!(f, "gRPC frame is compressed, the bench never compresses")
            }
            FrameError::Length { declared, actual } => {
                write!(
                    f,
                    "gRPC frame declares {declared} bytes but {actual} follow"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Parses a body holding exactly one frame and returns its message.
pub fn decode_single(body: &[u8]) -> Result<&[u8], FrameError> {
    let Some((header, rest)) = body.split_first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::ShortHeader(body.len()));
    };
    if header[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let declared = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if declared != rest.len() {
        return Err(FrameError::Length {
            declared,
            actual: rest.len(),
        });
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let framed = encode(b"hello");
        assert_eq!(&framed[..], b"\0\0\0\0\x05hello");
        assert_eq!(decode_single(&framed), Ok(&b"hello"[..]));
        assert_eq!(decode_single(&encode(b"")), Ok(&b""[..]));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(decode_single(b"\0\0\0"), Err(FrameError::ShortHeader(3)));
        assert_eq!(decode_single(b"\x01\0\0\0\0"), Err(FrameError::Compressed));
        assert_eq!(
            decode_single(b"\0\0\0\0\x05hell"),
            Err(FrameError::Length {
                declared: 5,
                actual: 4
            })
        );
        assert_eq!(
            decode_single(b"\0\0\0\0\x01ab"),
            Err(FrameError::Length {
                declared: 1,
                actual: 2
            })
        );
    }
}
