//! A ClientHello reader: enough of TLS to say "this is TLS" and read the SNI, without consuming.
//!
//! Pure function over a byte prefix, so it is fuzzed by property tests.

/// What a byte prefix says about TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to decide.
    NeedMore,
    /// Not a TLS ClientHello.
    NotTls,
    /// A ClientHello; `sni` is the server name when present and well formed.
    ClientHello { sni: Option<String> },
}

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
/// Largest TLS plaintext record (2^14) plus its 5-byte header.
pub const MAX_RECORD: usize = (1 << 14) + 5;

/// Parses the first TLS record in `buf`.
pub fn parse(buf: &[u8]) -> Hello {
    if buf.is_empty() {
        return Hello::NeedMore;
    }
    if buf[0] != HANDSHAKE {
        return Hello::NotTls;
    }
    if buf.len() < 5 {
        // Record layer version major must be 3 (SSL3 / TLS 1.x).
        if buf.len() >= 2 && buf[1] != 3 {
            return Hello::NotTls;
        }
        return Hello::NeedMore;
    }
    if buf[1] != 3 {
        return Hello::NotTls;
    }
    let rec_len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if rec_len == 0 || rec_len > (1 << 14) {
        return Hello::NotTls;
    }
    if buf.len() >= 6 && buf[5] != CLIENT_HELLO {
        return Hello::NotTls;
    }
    if buf.len() < 5 + rec_len {
        return Hello::NeedMore;
    }
    let rec = &buf[5..5 + rec_len];
    match client_hello_sni(rec) {
        Some(sni) => Hello::ClientHello { sni },
        // A ClientHello split over several records: TLS, but the SNI is out of reach.
        None if rec.len() >= 4 && hs_len(rec) > rec.len() - 4 => Hello::ClientHello { sni: None },
        None => Hello::NotTls,
    }
}

fn hs_len(rec: &[u8]) -> usize {
    u32::from_be_bytes([0, rec[1], rec[2], rec[3]]) as usize
}

/// A small cursor that returns None when input runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Some(sni) for a complete ClientHello in `rec`; None when it is not one or is incomplete.
fn client_hello_sni(rec: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor(rec);
    if c.u8()? != CLIENT_HELLO {
        return None;
    }
    let len = c.take(3)?;
    let len = u32::from_be_bytes([0, len[0], len[1], len[2]]) as usize;
    let mut c = Cursor(c.take(len)?);
    let _client_version = c.u16()?;
    c.take(32)?; // random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    if c.0.is_empty() {
        return Some(None); // no extensions
    }
    let mut exts = Cursor(c.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if ty == EXT_SERVER_NAME {
            let mut d = Cursor(data);
            let mut list = Cursor(d.vec16()?);
            while !list.0.is_empty() {
                let name_type = list.u8()?;
                let name = list.vec16()?;
                if name_type == 0 {
                    return Some(
                        std::str::from_utf8(name)
                            .ok()
                            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()))
                            .map(|s| s.to_ascii_lowercase()),
                    );
                }
            }
            return Some(None);
        }
    }
    Some(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a minimal but well-formed ClientHello record.
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        exts.extend_from_slice(&[0x00, 0x2b, 0, 3, 2, 3, 4]); // supported_versions
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_sni() {
        let rec = client_hello(Some("Web.NS.svc.cluster.local"));
        assert_eq!(
            parse(&rec),
            Hello::ClientHello {
                sni: Some("web.ns.svc.cluster.local".into())
            }
        );
        assert_eq!(parse(&client_hello(None)), Hello::ClientHello { sni: None });
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        let rec = client_hello(Some("a.b"));
        for n in 0..rec.len() {
            assert_eq!(parse(&rec[..n]), Hello::NeedMore, "prefix {n}");
        }
    }

    #[test]
    fn rejects_non_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(&[0x16, 0x02]), Hello::NotTls);
        assert_eq!(parse(&[0x16, 3, 1, 0, 0]), Hello::NotTls);
        assert_eq!(parse(&[0x16, 3, 1, 0, 4, 0x02]), Hello::NotTls);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
            let mut tls = vec![0x16, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = parse(&tls);
        }

        #[test]
        fn corrupted_hello_never_panics(idx in 0usize..80, val in any::<u8>()) {
            let mut rec = client_hello(Some("svc.ns"));
            let i = idx % rec.len();
            rec[i] = val;
            let _ = parse(&rec);
        }
    }
}
