//! Trace context propagation: reading W3C `traceparent` (and B3, single or multi-header) from
//! a request, deciding whether this hop records a span, and rewriting the headers so the
//! next hop's span is this hop's child.
//!
//! Pure functions over a header map: no clock, no I/O, the random source passed in, so
//! the decisions are unit- and property-tested here.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// A trace context received from the previous hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's sampling decision; `None` when B3 left it to us (deferred).
    pub sampled: Option<bool>,
}

/// The span this hop records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller's span, when the trace was continued.
    pub parent: Option<SpanId>,
}

/// The W3C `traceparent` value: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
/// Versions above 00 are read by their first four fields, as the spec asks; `ff`, all-zero
/// ids, wrong lengths and anything but lowercase hex are rejected (`None`: no parent).
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 bytes; a later version may append `-<more>`.
    if (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let trace_id: TraceId = hex_array(&v[3..35])?;
    let span_id: SpanId = hex_array(&v[36..52])?;
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

/// Formats a version-00 `traceparent`, sampled.
pub fn format_traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    push_hex(&mut s, trace_id);
    s.push('-');
    push_hex(&mut s, span_id);
    s.push_str(if sampled { "-01" } else { "-00" });
    s
}

/// The B3 single header: `{trace}-{span}[-{sampling}[-{parent}]]` or a bare sampling state
/// (`0`, `1`, `d`), which carries no parent.
pub fn parse_b3_single(v: &[u8]) -> Option<Parent> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = match parts.next() {
        None => None,
        Some(f) => Some(b3_sampling(f.as_bytes())?),
    };
    Some(Parent {
        trace_id: b3_trace_id(trace.as_bytes())?,
        span_id: nonzero(hex_array(span.as_bytes())?)?,
        sampled,
    })
}

/// The B3 multi-header form (`X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`).
pub fn parse_b3_multi(h: &HeaderMap) -> Option<Parent> {
    let trace = h.get(&B3_TRACE_ID)?;
    let span = h.get(&B3_SPAN_ID)?;
    let debug = h.get(&B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    let sampled = match h.get(&B3_SAMPLED) {
        _ if debug => Some(true),
        None => None,
        Some(v) => match v.as_bytes() {
            b"1" | b"true" => Some(true),
            b"0" | b"false" => Some(false),
            _ => return None,
        },
    };
    Some(Parent {
        trace_id: b3_trace_id(trace.as_bytes())?,
        span_id: nonzero(hex_array(span.as_bytes())?)?,
        sampled,
    })
}

fn b3_sampling(f: &[u8]) -> Option<bool> {
    match f {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is left-padded with zeros.
fn b3_trace_id(v: &[u8]) -> Option<TraceId> {
    let id = match v.len() {
        32 => hex_array(v)?,
        16 => {
            let low: [u8; 8] = hex_array(v)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    nonzero(id)
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    (id != [0; N]).then_some(id)
}

/// Where a request's trace context came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    W3c,
    B3Single,
    B3Multi,
}

/// The incoming context: `traceparent` first, then B3 (single, then multi-header).
pub fn extract(h: &HeaderMap) -> Option<(Parent, Source)> {
    if let Some(v) = h.get(&TRACEPARENT) {
        if let Some(p) = parse_traceparent(v.as_bytes()) {
            return Some((p, Source::W3c));
        }
    }
    if let Some(p) = h.get(&B3).and_then(|v| parse_b3_single(v.as_bytes())) {
        return Some((p, Source::B3Single));
    }
    parse_b3_multi(h).map(|p| (p, Source::B3Multi))
}

/// Whether this hop records a span, and its ids.
///
/// A sampled parent is continued; an unsampled one is not recorded (its headers pass
/// untouched); with no parent (or a B3 caller that deferred the decision), `head` decides
/// (the head-sampling draw, true with the configured probability). Ids come from `random`,
/// retried until non-zero.
pub fn decide(
    parent: Option<Parent>,
    head: impl FnOnce() -> bool,
    mut random: impl FnMut() -> u64,
) -> Option<SpanIds> {
    let sampled = match parent.and_then(|p| p.sampled) {
        Some(s) => s,
        None => head(),
    };
    if !sampled {
        return None;
    }
    let span_id = loop {
        let id = random().to_be_bytes();
        if id != [0; 8] {
            break id;
        }
    };
    Some(match parent {
        Some(p) => SpanIds {
            trace_id: p.trace_id,
            span_id,
            parent: Some(p.span_id),
        },
        None => {
            let trace_id = loop {
                let mut id = [0; 16];
                id[..8].copy_from_slice(&random().to_be_bytes());
                id[8..].copy_from_slice(&random().to_be_bytes());
                if id != [0; 16] {
                    break id;
                }
            };
            SpanIds {
                trace_id,
                span_id,
                parent: None,
            }
        }
    })
}

/// Rewrites the forwarded request's context so the next hop is this span's child:
/// `traceparent` always (W3C is what the mesh speaks), `tracestate` kept as it came, and
/// B3 headers, when the caller sent them, refreshed to the same ids.
pub fn inject(h: &mut HeaderMap, ids: &SpanIds) {
    let tp = format_traceparent(&ids.trace_id, &ids.span_id, true);
    if let Ok(v) = HeaderValue::from_str(&tp) {
        h.insert(TRACEPARENT, v);
    }
    if h.contains_key(&B3) {
        let mut s = String::with_capacity(51);
        push_hex(&mut s, &ids.trace_id);
        s.push('-');
        push_hex(&mut s, &ids.span_id);
        s.push_str("-1");
        if let Ok(v) = HeaderValue::from_str(&s) {
            h.insert(B3, v);
        }
    }
    if h.contains_key(&B3_TRACE_ID) {
        let hex = |b: &[u8]| {
            let mut s = String::with_capacity(b.len() * 2);
            push_hex(&mut s, b);
            HeaderValue::from_str(&s)
        };
        if let (Ok(t), Ok(s)) = (hex(&ids.trace_id), hex(&ids.span_id)) {
            h.insert(B3_TRACE_ID, t);
            h.insert(B3_SPAN_ID, s);
        }
        match ids.parent.map(|p| hex(&p)) {
            Some(Ok(p)) => {
                h.insert(B3_PARENT_SPAN_ID, p);
            }
            _ => {
                h.remove(&B3_PARENT_SPAN_ID);
            }
        }
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        h.remove(&B3_FLAGS);
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_val(two[0])? << 4 | hex_val(two[1])?)
}

fn hex_array<const N: usize>(v: &[u8]) -> Option<[u8; N]> {
    if v.len() != N * 2 {
        return None;
    }
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_byte(&v[2 * i..2 * i + 2])?;
    }
    Some(out)
}

pub fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// Lowercase hex of an id (tests and logs).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_versions_and_rejections() {
        let p = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(p.sampled, Some(true));
        let unsampled = TP.replace("-01", "-00");
        assert_eq!(
            parse_traceparent(unsampled.as_bytes()).unwrap().sampled,
            Some(false)
        );
        // A later version: the first four fields, more may follow.
        let v1 = format!("{}-extra", TP.replacen("00", "01", 1));
        assert!(parse_traceparent(v1.as_bytes()).is_some());
        for bad in [
            TP.replacen("00", "ff", 1),
            format!("{TP}-x"),
            TP.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)),
            TP.replace("00f067aa0ba902b7", &"0".repeat(16)),
            TP.to_uppercase(),
            TP[..54].to_string(),
            TP.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01".to_string(),
            String::new(),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_forms() {
        let p = parse_b3_single(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )
        .unwrap();
        assert_eq!(hex(&p.span_id), "e457b5a2e4d86bd1");
        assert_eq!(p.sampled, Some(true));
        let p = parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-d").unwrap();
        assert_eq!(hex(&p.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert_eq!(p.sampled, Some(true));
        assert_eq!(
            parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1")
                .unwrap()
                .sampled,
            None
        );
        assert_eq!(parse_b3_single(b"0"), None);
        assert_eq!(
            parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-x"),
            None
        );

        let mut h = HeaderMap::new();
        h.insert(
            B3_TRACE_ID,
            HeaderValue::from_static("463ac35c9f6413ad48485a3953bb6124"),
        );
        h.insert(B3_SPAN_ID, HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("0"));
        assert_eq!(parse_b3_multi(&h).unwrap().sampled, Some(false));
        h.insert(B3_FLAGS, HeaderValue::from_static("1"));
        assert_eq!(parse_b3_multi(&h).unwrap().sampled, Some(true));
        assert_eq!(extract(&h).unwrap().1, Source::B3Multi);
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        assert_eq!(extract(&h).unwrap().1, Source::W3c);
    }

    #[test]
    fn decisions() {
        let parent = parse_traceparent(TP.as_bytes());
        let mut n = 0u64;
        let mut counter = || {
            n += 1;
            n
        };
        // Sampled parent: continued whatever the head rate says.
        let ids = decide(parent, || false, &mut counter).unwrap();
        assert_eq!(ids.trace_id, parent.unwrap().trace_id);
        assert_eq!(ids.parent, Some(parent.unwrap().span_id));
        assert_ne!(ids.span_id, [0; 8]);
        // Unsampled parent: never recorded, even at 100 % head sampling.
        let unsampled = Some(Parent {
            sampled: Some(false),
            ..parent.unwrap()
        });
        assert_eq!(decide(unsampled, || true, &mut counter), None);
        // No parent: the head draw decides; zero ids are redrawn.
        assert_eq!(decide(None, || false, &mut counter), None);
        let mut zeros = [0u64, 0, 0, 7, 9].into_iter();
        let ids = decide(None, || true, || zeros.next().unwrap_or(1)).unwrap();
        assert_ne!(ids.trace_id, [0; 16]);
        assert_ne!(ids.span_id, [0; 8]);
        assert_eq!(ids.parent, None);
    }

    #[test]
    fn inject_rewrites_parent_keeps_state_and_refreshes_b3() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(TP));
        h.insert(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.insert(B3, HeaderValue::from_static("0"));
        let (parent, _) = extract(&h).unwrap();
        let ids = decide(Some(parent), || false, || 0x1122334455667788).unwrap();
        inject(&mut h, &ids);
        assert_eq!(
            h[&TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-01"
        );
        assert_eq!(h[&TRACESTATE], "congo=t61rcWkgMzE");
        assert_eq!(
            h[&B3],
            "4bf92f3577b34da6a3ce929d0e0e4736-1122334455667788-1"
        );

        let mut h = HeaderMap::new();
        h.insert(B3_TRACE_ID, HeaderValue::from_static("48485a3953bb6124"));
        h.insert(B3_SPAN_ID, HeaderValue::from_static("a2fb4a1d1a96d312"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        let (parent, _) = extract(&h).unwrap();
        let ids = decide(Some(parent), || false, || 5).unwrap();
        inject(&mut h, &ids);
        assert_eq!(
            h[&TRACEPARENT],
            "00-000000000000000048485a3953bb6124-0000000000000005-01"
        );
        assert_eq!(h[&B3_TRACE_ID], "000000000000000048485a3953bb6124");
        assert_eq!(h[&B3_SPAN_ID], "0000000000000005");
        assert_eq!(h[&B3_PARENT_SPAN_ID], "a2fb4a1d1a96d312");
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(
            t in any::<[u8; 16]>().prop_filter("non-zero", |t| *t != [0; 16]),
            s in any::<[u8; 8]>().prop_filter("non-zero", |s| *s != [0; 8]),
            sampled in any::<bool>(),
        ) {
            let v = format_traceparent(&t, &s, sampled);
            let p = parse_traceparent(v.as_bytes()).unwrap();
            prop_assert_eq!(p, Parent { trace_id: t, span_id: s, sampled: Some(sampled) });
        }

        #[test]
        fn arbitrary_header_bytes_never_panic(
            v in proptest::collection::vec(any::<u8>(), 0..80),
            w in "[0-9a-f-]{0,70}",
        ) {
            let _ = parse_traceparent(&v);
            let _ = parse_b3_single(&v);
            let _ = parse_traceparent(w.as_bytes());
            let _ = parse_b3_single(w.as_bytes());
            let mut h = HeaderMap::new();
            for name in [TRACEPARENT, B3, B3_TRACE_ID, B3_SPAN_ID, B3_SAMPLED] {
                if let Ok(val) = HeaderValue::from_bytes(w.as_bytes()) {
                    h.insert(name, val);
                }
            }
            let _ = extract(&h);
        }
    }
}
