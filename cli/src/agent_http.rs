//! One plain HTTP/1.0 GET to a node agent's metrics port, shared by `weft cni flows`,
//! `weft cni status` and `weft policy audit`: connect with a timeout, send the request head in
//! one write, read the status line and the headers, and hand back the reader positioned at the
//! body (a stream for `/flows`, a document otherwise).
//!
//! Written on std rather than hyper: these commands read one response from one local agent,
//! and a blocking socket keeps them free of a runtime.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A response whose head has been read.
#[derive(Debug)]
pub struct Response {
    /// The status line, trimmed (`HTTP/1.1 200 OK`).
    pub status: String,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Positioned at the first byte of the body.
    pub body: BufReader<TcpStream>,
}

impl Response {
    pub fn ok(&self) -> bool {
        self.status.split_whitespace().nth(1) == Some("200")
    }
}

/// GETs `path` from `addr`; `read_timeout` bounds every read (None: none). Errors are
/// sentences without the address (callers name it with their flag).
pub fn get(
    addr: &str,
    path: &str,
    accept: &str,
    read_timeout: Option<Duration>,
) -> Result<Response, String> {
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("not an address ({e})"))?
        .next()
        .ok_or("resolves to no address")?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(3))
        .map_err(|e| format!("cannot connect ({e})"))?;
    stream
        .set_read_timeout(read_timeout)
        .map_err(|e| e.to_string())?;
    // One write: `write!` on a socket sends each formatted piece as its own segment, and a
    // server reading the head once would see only "GET ".
    let head = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    (&stream)
        .write_all(head.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut body = BufReader::new(stream);
    let mut status = String::new();
    body.read_line(&mut status).map_err(|e| e.to_string())?;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if body.read_line(&mut h).map_err(|e| e.to_string())? == 0 || h.trim().is_empty() {
            break;
        }
        let h = h.to_ascii_lowercase();
        chunked |= h.starts_with("transfer-encoding:") && h.contains("chunked");
    }
    Ok(Response {
        status: status.trim().to_string(),
        chunked,
        body,
    })
}
