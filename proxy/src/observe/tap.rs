//! Live taps (`GET /tap` on the admin port, `weft tap`): the requests this proxy handles, as
//! they finish, streamed to whoever asked, filtered by authority, path prefix, method, status
//! and direction.
//!
//! A tap must never slow the proxy. [`Taps`] is a [`Sink`] that is active only while a tap is
//! open (an atomic counter), so an untapped proxy pays one load per request. Each open tap has
//! a bounded queue of [`QUEUE`] events; the request path offers a matching event with
//! `try_send` and, when the reader is slower than the traffic, drops it and counts it twice:
//! in `weft_tap_events_total{result="dropped"}` and in the tap itself, which tells its reader
//! with a `{"dropped":N}` line before the next event. At most [`MAX_TAPS`] taps are open at
//! once. A tap closes when its reader goes away (the [`Subscription`] is dropped with the
//! response body), after `max` events, or after `duration`.
//!
//! Filters, all optional and all of which must match:
//! - `authority`: case-insensitive; the event's authority equals it, or its host (the
//!   authority without `:port`) equals it, or, when the filter starts with `.`, the host ends
//!   with it (`.default.svc.cluster.local` matches every service of `default`).
//! - `path_prefix`: the path (with query) starts with it, byte for byte.
//! - `method`: the method, case-sensitive as HTTP methods are (`GET`).
//! - `status`: a status (`503`) or a class (`5xx`).
//! - `direction`: `inbound` or `outbound`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::{ObserveMetrics, RequestEvent, Sink};
use crate::metrics::Direction;

/// Events queued per tap before new ones are dropped.
pub const QUEUE: usize = 1000;
/// Taps open at once on one proxy.
pub const MAX_TAPS: usize = 16;

/// A status filter: one status or a class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMatch {
    Exact(u16),
    /// `5xx`: the hundreds digit.
    Class(u16),
}

impl StatusMatch {
    fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(s) => s == status,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }
}

/// What a tap wants to see; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Lowercased.
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    pub method: Option<http::Method>,
    pub status: Option<StatusMatch>,
    pub direction: Option<Direction>,
}

impl Filter {
    pub fn matches(&self, ev: &RequestEvent) -> bool {
        if let Some(d) = self.direction {
            if d != ev.direction {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if *m != ev.method {
                return false;
            }
        }
        if let Some(s) = self.status {
            if !s.matches(ev.status) {
                return false;
            }
        }
        if let Some(p) = &self.path_prefix {
            if !ev.path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(a) = &self.authority {
            if !authority_matches(a, &ev.authority) {
                return false;
            }
        }
        true
    }
}

/// `filter` is lowercase already.
fn authority_matches(filter: &str, authority: &str) -> bool {
    let authority = authority.to_ascii_lowercase();
    let host = host_of(&authority);
    if filter.starts_with('.') {
        return host.ends_with(filter);
    }
    authority == filter || host == filter
}

/// The host of `host[:port]` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// A tap request: its filter and when it ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapRequest {
    pub filter: Filter,
    /// Ends after this many events.
    pub max: Option<u64>,
    /// Ends after this long.
    pub duration: Option<Duration>,
}

/// A query parameter of `/tap` that cannot be used; the message names it and its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("tap: {param}={value:?} is not valid: {reason}")]
    Invalid {
        param: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("tap: unknown query parameter {0:?}; known: authority, path_prefix, method, status, direction, max, duration")]
    Unknown(String),
}

impl TapRequest {
    /// Parses the query string of `/tap` (`authority=..&path_prefix=..&method=..&status=..&
    /// direction=..&max=..&duration=..`, percent-encoded).
    pub fn parse_query(query: Option<&str>) -> Result<Self, QueryError> {
        let mut t = TapRequest::default();
        for pair in query.unwrap_or_default().split('&') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(k);
            let value = percent_decode(v);
            let invalid = |param: &'static str, reason: &'static str| QueryError::Invalid {
                param,
                value: value.clone(),
                reason,
            };
            match key.as_str() {
                "authority" => {
                    if value.is_empty() {
                        return Err(invalid("authority", "empty"));
                    }
                    t.filter.authority = Some(value.to_ascii_lowercase());
                }
                "path_prefix" => {
                    if !value.starts_with('/') {
                        return Err(invalid("path_prefix", "must start with /"));
                    }
                    t.filter.path_prefix = Some(value.clone());
                }
                "method" => {
                    let m = http::Method::from_bytes(value.as_bytes())
                        .ok()
                        .filter(|_| !value.is_empty())
                        .ok_or_else(|| invalid("method", "not an HTTP method token"))?;
                    t.filter.method = Some(m);
                }
                "status" => {
                    t.filter.status = Some(parse_status(&value).ok_or_else(|| {
                        invalid("status", "expected a status 100-599 or a class 1xx-5xx")
                    })?)
                }
                "direction" => {
                    t.filter.direction = Some(match value.as_str() {
                        "inbound" => Direction::Inbound,
                        "outbound" => Direction::Outbound,
                        _ => return Err(invalid("direction", "expected inbound or outbound")),
                    })
                }
                "max" => {
                    let n: u64 =
                        value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            invalid("max", "expected a positive number of events")
                        })?;
                    t.max = Some(n);
                }
                "duration" => {
                    let d = crate::config::parse_duration(&value)
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            invalid("duration", "expected a duration such as 500ms, 30s or 5m")
                        })?;
                    t.duration = Some(d);
                }
                _ => return Err(QueryError::Unknown(key)),
            }
        }
        Ok(t)
    }
}

fn parse_status(s: &str) -> Option<StatusMatch> {
    let b = s.as_bytes();
    if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && b[1..].eq_ignore_ascii_case(b"xx") {
        return Some(StatusMatch::Class(u16::from(b[0] - b'0')));
    }
    s.parse::<u16>()
        .ok()
        .filter(|n| (100..=599).contains(n))
        .map(StatusMatch::Exact)
}

/// `%XX` and `+` decoding of one query component; invalid escapes are kept as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One open tap, as the request path sees it.
#[derive(Debug)]
struct Slot {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Arc<RequestEvent>>,
    /// Dropped since the reader was last told.
    dropped: AtomicU64,
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("too many taps: {0} are open on this proxy (the most it allows); close one and retry")]
    TooMany(usize),
}

/// The open taps of one proxy: a [`Sink`].
#[derive(Debug)]
pub struct Taps {
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Copied on open and close (rare), read on every tapped request.
    slots: RwLock<Arc<Vec<Arc<Slot>>>>,
    max_taps: usize,
    queue: usize,
    sent: Counter,
    dropped: Counter,
    gauge: Gauge,
}

impl Taps {
    pub fn new(metrics: &ObserveMetrics) -> Arc<Self> {
        Self::with_limits(metrics, MAX_TAPS, QUEUE)
    }

    pub fn with_limits(metrics: &ObserveMetrics, max_taps: usize, queue: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            slots: RwLock::new(Arc::new(Vec::new())),
            max_taps,
            queue,
            sent: ObserveMetrics::counter(&metrics.tap_events, "sent"),
            dropped: ObserveMetrics::counter(&metrics.tap_events, "dropped"),
            gauge: metrics.taps_open.clone(),
        })
    }

    /// Taps open now.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Opens a tap; it closes when the returned subscription is dropped.
    pub fn open(self: &Arc<Self>, filter: Filter) -> Result<Subscription, OpenError> {
        let (tx, rx) = mpsc::channel(self.queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            id,
            filter,
            tx,
            dropped: AtomicU64::new(0),
        });
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            if slots.len() >= self.max_taps {
                return Err(OpenError::TooMany(slots.len()));
            }
            let mut next = Vec::clone(&slots);
            next.push(slot.clone());
            *slots = Arc::new(next);
            self.open.store(slots.len(), Ordering::Release);
            self.gauge.set(slots.len() as i64);
        }
        Ok(Subscription {
            taps: self.clone(),
            slot,
            rx,
        })
    }

    fn close(&self, id: u64) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let next: Vec<_> = slots.iter().filter(|s| s.id != id).cloned().collect();
        *slots = Arc::new(next);
        self.open.store(slots.len(), Ordering::Release);
        self.gauge.set(slots.len() as i64);
    }
}

impl Sink for Taps {
    fn active(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    fn record(&self, event: &Arc<RequestEvent>) {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner()).clone();
        for s in slots.iter() {
            if !s.filter.matches(event) {
                continue;
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => {
                    self.sent.inc();
                }
                // Closed: the reader is gone and its subscription is being dropped.
                Err(_) => {
                    s.dropped.fetch_add(1, Ordering::Relaxed);
                    self.dropped.inc();
                }
            };
        }
    }
}

/// An open tap, held by its reader (the response body of `/tap`).
#[derive(Debug)]
pub struct Subscription {
    taps: Arc<Taps>,
    slot: Arc<Slot>,
    rx: mpsc::Receiver<Arc<RequestEvent>>,
}

impl Subscription {
    /// Waits for the next event (the subscription holds its own sender, so this never
    /// answers `None` while it lives).
    pub async fn recv(&mut self) -> Option<Arc<RequestEvent>> {
        self.rx.recv().await
    }

    /// An event already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Arc<RequestEvent>> {
        self.rx.try_recv().ok()
    }

    /// Events dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.slot.dropped.swap(0, Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.taps.close(self.slot.id);
    }
}

/// `{"timestamp":"…","direction":"outbound","method":"GET",…}`: one tap line, without the
/// newline.
pub fn json_line(ev: &RequestEvent, out: &mut String) {
    let t = OffsetDateTime::from(ev.started);
    let v = serde_json::json!({
        "timestamp": format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond()
        ),
        "direction": ev.direction.as_str(),
        "peer": ev.peer.to_string(),
        "method": ev.method.as_str(),
        "authority": ev.authority,
        "path": ev.path,
        "status": ev.status,
        "grpc_status": ev.grpc_status,
        "latency_ms": ev.latency.as_secs_f64() * 1e3,
        "duration_ms": ev.duration.as_secs_f64() * 1e3,
        "route": ev.route.as_deref(),
        "endpoint": ev.endpoint.map(|e| e.to_string()),
        "client_id": ev.client_id.as_deref(),
        "server_id": ev.server_id.as_deref(),
        "proxy_error": ev.error.map(|c| c.as_str()),
        "retries": ev.retries,
        "response_bytes": ev.response_bytes,
        "body_failed": ev.body_failed,
    });
    out.push_str(&v.to_string());
}

/// `{"dropped":N}`: events this tap lost because its reader was slow.
pub fn dropped_line(n: u64, out: &mut String) {
    out.push_str(&serde_json::json!({ "dropped": n }).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn event(
        direction: Direction,
        method: &str,
        authority: &str,
        path: &str,
        status: u16,
    ) -> RequestEvent {
        RequestEvent {
            direction,
            started: UNIX_EPOCH + Duration::from_millis(1_796_500_245_123),
            latency: Duration::from_millis(3),
            duration: Duration::from_millis(5),
            peer: "10.0.0.7:51000".parse().unwrap(),
            method: http::Method::from_bytes(method.as_bytes()).unwrap(),
            version: http::Version::HTTP_11,
            authority: authority.into(),
            path: path.into(),
            user_agent: None,
            referer: None,
            status,
            grpc_status: None,
            response_bytes: 512,
            route: Some(Arc::from("httproute/default/books/0")),
            endpoint: Some("10.0.1.2:8080".parse().unwrap()),
            client_id: None,
            server_id: Some(Arc::from("spiffe://cluster.local/ns/default/sa/books")),
            error: None,
            retries: 0,
            body_failed: false,
        }
    }

    fn filter(q: &str) -> Filter {
        TapRequest::parse_query(Some(q)).unwrap().filter
    }

    #[test]
    fn filters_match_table() {
        let ev = event(
            Direction::Outbound,
            "GET",
            "Books.default.svc.cluster.local:8080",
            "/books/1?x=y",
            503,
        );
        for (q, expected) in [
            ("", true),
            ("authority=books.default.svc.cluster.local:8080", true),
            ("authority=BOOKS.default.svc.cluster.local", true),
            ("authority=books.default.svc.cluster.local:9090", false),
            ("authority=.default.svc.cluster.local", true),
            ("authority=.other.svc.cluster.local", false),
            ("authority=books", false),
            ("path_prefix=/books", true),
            ("path_prefix=/books/1%3Fx", true),
            ("path_prefix=/authors", false),
            ("method=GET", true),
            ("method=POST", false),
            ("status=503", true),
            ("status=5xx", true),
            ("status=5XX", true),
            ("status=2xx", false),
            ("status=200", false),
            ("direction=outbound", true),
            ("direction=inbound", false),
            (
                "method=GET&status=5xx&direction=outbound&path_prefix=/b",
                true,
            ),
            ("method=GET&status=5xx&direction=inbound", false),
        ] {
            assert_eq!(filter(q).matches(&ev), expected, "{q}");
        }
    }

    #[test]
    fn ipv6_authorities_keep_their_brackets() {
        let ev = event(Direction::Inbound, "GET", "[::1]:8080", "/", 200);
        assert!(filter("authority=[::1]").matches(&ev));
        assert!(filter("authority=%5B::1%5D:8080").matches(&ev));
        assert!(!filter("authority=::1").matches(&ev));
    }

    #[test]
    fn query_errors_name_the_parameter_and_value() {
        for (q, msg) in [
            ("status=600", "tap: status=\"600\" is not valid"),
            ("status=6xx", "tap: status=\"6xx\" is not valid"),
            ("method=G%20T", "tap: method=\"G T\" is not valid"),
            (
                "direction=sideways",
                "tap: direction=\"sideways\" is not valid",
            ),
            ("max=0", "tap: max=\"0\" is not valid"),
            ("max=many", "tap: max=\"many\" is not valid"),
            ("duration=forever", "tap: duration=\"forever\" is not valid"),
            (
                "path_prefix=books",
                "tap: path_prefix=\"books\" is not valid",
            ),
            ("authority=", "tap: authority=\"\" is not valid"),
            ("colour=red", "tap: unknown query parameter \"colour\""),
        ] {
            let e = TapRequest::parse_query(Some(q)).unwrap_err().to_string();
            assert!(e.starts_with(msg), "{q}: {e}");
        }
        let t = TapRequest::parse_query(Some("max=3&duration=2s&path_prefix=/a+b%2Fc")).unwrap();
        assert_eq!(t.max, Some(3));
        assert_eq!(t.duration, Some(Duration::from_secs(2)));
        assert_eq!(t.filter.path_prefix.as_deref(), Some("/a b/c"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn the_hub_is_active_only_while_a_tap_is_open_and_refuses_past_its_limit() {
        let metrics = ObserveMetrics::default();
        let taps = Taps::with_limits(&metrics, 2, 8);
        assert!(!taps.active());
        let a = taps.open(Filter::default()).unwrap();
        assert!(taps.active());
        let b = taps.open(Filter::default()).unwrap();
        let e = taps.open(Filter::default()).unwrap_err().to_string();
        assert!(e.starts_with("too many taps: 2 are open"), "{e}");
        assert_eq!(metrics.taps_open.get(), 2);
        drop(a);
        assert_eq!(taps.open_count(), 1);
        let c = taps.open(Filter::default()).unwrap();
        drop(b);
        drop(c);
        assert_eq!(taps.open_count(), 0);
        assert!(!taps.active());
        assert_eq!(metrics.taps_open.get(), 0);
    }

    #[test]
    fn a_slow_reader_loses_events_counted_never_blocking() {
        let metrics = ObserveMetrics::default();
        let taps = Taps::with_limits(&metrics, 4, 8);
        let mut all = taps.open(Filter::default()).unwrap();
        let mut gets = taps.open(filter("method=GET")).unwrap();
        let get = Arc::new(event(Direction::Outbound, "GET", "a", "/", 200));
        let post = Arc::new(event(Direction::Outbound, "POST", "a", "/", 200));
        for _ in 0..50 {
            taps.record(&get);
            taps.record(&post);
        }
        // `all` took 8 of 100, `gets` 8 of 50.
        assert_eq!(all.take_dropped(), 92);
        assert_eq!(all.take_dropped(), 0);
        assert_eq!(gets.take_dropped(), 42);
        assert_eq!(
            ObserveMetrics::counter(&metrics.tap_events, "sent").get(),
            16
        );
        assert_eq!(
            ObserveMetrics::counter(&metrics.tap_events, "dropped").get(),
            134
        );
        let mut n = 0;
        while let Some(ev) = gets.try_recv() {
            assert_eq!(ev.method, http::Method::GET);
            n += 1;
        }
        assert_eq!(n, 8);
        assert!(all.try_recv().is_some());
    }

    proptest::proptest! {
        /// Any query string parses or is refused with the parameter named; never a panic.
        #[test]
        fn any_query_parses_or_names_what_is_wrong(q in "[a-z_=&%0-9A-Fx/. +-]{0,64}") {
            match TapRequest::parse_query(Some(&q)) {
                Ok(_) => {}
                Err(e) => proptest::prop_assert!(e.to_string().starts_with("tap: ")),
            }
        }

        /// Every status in range and every class filters as written.
        #[test]
        fn statuses_and_classes_round_trip(status in 100u16..600) {
            let exact = TapRequest::parse_query(Some(&format!("status={status}"))).unwrap();
            proptest::prop_assert_eq!(exact.filter.status, Some(StatusMatch::Exact(status)));
            let class = format!("status={}xx", status / 100);
            let class = TapRequest::parse_query(Some(&class)).unwrap().filter.status.unwrap();
            proptest::prop_assert!(class.matches(status));
        }
    }

    #[test]
    fn tap_lines_carry_the_fields() {
        let mut ev = event(Direction::Outbound, "GET", "books:8080", "/b", 503);
        ev.error = Some(crate::http::Cause::NoEndpoints);
        let mut s = String::new();
        json_line(&ev, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["timestamp"], "2026-12-05T19:50:45.123Z");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["authority"], "books:8080");
        assert_eq!(v["status"], 503);
        assert_eq!(v["proxy_error"], "no-endpoints");
        assert_eq!(v["route"], "httproute/default/books/0");
        assert_eq!(v["endpoint"], "10.0.1.2:8080");
        assert_eq!(v["server_id"], "spiffe://cluster.local/ns/default/sa/books");
        assert_eq!(v["latency_ms"], 3.0);
        let mut d = String::new();
        dropped_line(7, &mut d);
        assert_eq!(d, r#"{"dropped":7}"#);
    }
}
