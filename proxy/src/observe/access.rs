//! Access logs (`WEFT_PROXY_ACCESS_LOG=json|apache`): one line per proxied request, per
//! direction, on stdout (the proxy's own logs go to stderr, so the two never interleave).
//!
//! Written off the request path: the request hands its finished event to a bounded queue
//! ([`QUEUE`] events) and returns; one writer thread formats and writes the lines through a
//! buffer, flushing whenever the queue runs empty. When the writer falls behind (a slow
//! or blocked stdout), new lines are dropped and counted in
//! `weft_access_log_lines_total{result="dropped"}`; memory never grows past the queue.

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use time::OffsetDateTime;

use super::{ObserveMetrics, RequestEvent, Sink};

/// Events waiting for the writer before new ones are dropped.
pub const QUEUE: usize = 4096;

/// The line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line, every field of the event.
    Json,
    /// The Apache Combined Log Format, which standard log tools parse.
    Apache,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Self::Json),
            "apache" => Some(Self::Apache),
            _ => None,
        }
    }
}

/// The access log: a [`Sink`] feeding the writer thread.
#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Arc<RequestEvent>>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread on `out` (stdout in the proxy).
    pub fn start(
        format: Format,
        out: Box<dyn Write + Send>,
        metrics: &ObserveMetrics,
    ) -> std::io::Result<Arc<Self>> {
        Self::with_queue(format, out, metrics, QUEUE)
    }

    fn with_queue(
        format: Format,
        out: Box<dyn Write + Send>,
        metrics: &ObserveMetrics,
        queue: usize,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(queue);
        let written = ObserveMetrics::counter(&metrics.access_log, "written");
        std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || write_lines(format, rx, out, written))?;
        Ok(Arc::new(Self {
            tx,
            dropped: ObserveMetrics::counter(&metrics.access_log, "dropped"),
        }))
    }
}

impl Sink for AccessLog {
    fn active(&self) -> bool {
        true
    }

    fn record(&self, event: &Arc<RequestEvent>) {
        match self.tx.try_send(event.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

fn write_lines(
    format: Format,
    rx: Receiver<Arc<RequestEvent>>,
    out: Box<dyn Write + Send>,
    written: Counter,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = String::with_capacity(512);
    // Blocks for the next event; drains what is queued before flushing.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(ev) = next {
            line.clear();
            match format {
                Format::Json => json_line(&ev, &mut line),
                Format::Apache => apache_line(&ev, &mut line),
            }
            line.push('\n');
            if let Err(e) = out.write_all(line.as_bytes()) {
                tracing::warn!(error = %e, "access log: writing failed; lines are lost until it works again");
            } else {
                written.inc();
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            tracing::warn!(error = %e, "access log: flushing failed");
        }
    }
}

fn utc(t: std::time::SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// `{"timestamp":"2026-12-05T19:30:45.123Z","direction":"outbound",...}`.
pub fn json_line(ev: &RequestEvent, out: &mut String) {
    let t = utc(ev.started);
    let v = serde_json::json!({
        "timestamp": format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(), t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.millisecond()
        ),
        "direction": ev.direction.as_str(),
        "client_addr": ev.peer.to_string(),
        "client_id": ev.client_id.as_deref(),
        "method": ev.method.as_str(),
        "authority": ev.authority,
        "path": ev.path,
        "protocol": format!("{:?}", ev.version),
        "status": ev.status,
        "grpc_status": ev.grpc_status,
        "response_bytes": ev.response_bytes,
        "latency_ms": ev.latency.as_secs_f64() * 1e3,
        "duration_ms": ev.duration.as_secs_f64() * 1e3,
        "route": ev.route.as_deref(),
        "endpoint": ev.endpoint.map(|e| e.to_string()),
        "server_id": ev.server_id.as_deref(),
        "proxy_error": ev.error.map(|c| c.as_str()),
        "retries": ev.retries,
        "body_failed": ev.body_failed,
        "user_agent": ev.user_agent,
        "referer": ev.referer,
    });
    out.push_str(&v.to_string());
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `127.0.0.1 - - [05/Dec/2026:19:30:45 +0000] "GET /path HTTP/1.1" 200 512 "-" "curl/8"`:
/// the Combined Log Format; a `weft-proxy-error` answer is logged like any other response.
pub fn apache_line(ev: &RequestEvent, out: &mut String) {
    use std::fmt::Write as _;
    let t = utc(ev.started);
    let quoted = |s: Option<&str>| match s {
        Some(s) => format!("\"{}\"", escape(s)),
        None => "\"-\"".to_string(),
    };
    let _ = write!(
        out,
        "{} - - [{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000] \"{} {} {:?}\" {} {} {} {}",
        ev.peer.ip(),
        t.day(),
        MONTHS[usize::from(t.month() as u8 - 1)],
        t.year(),
        t.hour(),
        t.minute(),
        t.second(),
        escape(ev.method.as_str()),
        escape(&ev.path),
        ev.version,
        ev.status,
        match ev.response_bytes {
            0 => "-".to_string(),
            n => n.to_string(),
        },
        quoted(ev.referer.as_deref()),
        quoted(ev.user_agent.as_deref()),
    );
}

/// Escapes `"`, `\` and control bytes as Apache does, so a header cannot forge a line.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if c.is_control() => o.push_str(&format!("\\x{:02x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Direction;
    use std::sync::Mutex;
    use std::time::{Duration, UNIX_EPOCH};

    fn event() -> RequestEvent {
        RequestEvent {
            direction: Direction::Outbound,
            started: UNIX_EPOCH + Duration::from_millis(1_796_500_245_123),
            latency: Duration::from_millis(3),
            duration: Duration::from_millis(5),
            peer: "10.0.0.7:51000".parse().unwrap(),
            method: http::Method::GET,
            version: http::Version::HTTP_11,
            authority: "books.default.svc.cluster.local:8080".into(),
            path: "/books?id=1".into(),
            user_agent: Some("curl/8.0 \"x\"\n".into()),
            referer: None,
            status: 200,
            grpc_status: None,
            response_bytes: 512,
            route: Some(Arc::from("httproute/default/books/0")),
            endpoint: Some("10.0.1.2:8080".parse().unwrap()),
            client_id: None,
            server_id: Some(Arc::from("spiffe://cluster.local/ns/default/sa/books")),
            error: None,
            retries: 1,
            body_failed: false,
        }
    }

    #[test]
    fn apache_lines_are_combined_log_format_and_cannot_be_forged() {
        let mut s = String::new();
        apache_line(&event(), &mut s);
        assert_eq!(
            s,
            "10.0.0.7 - - [05/Dec/2026:19:50:45 +0000] \"GET /books?id=1 HTTP/1.1\" 200 512 \"-\" \"curl/8.0 \\\"x\\\"\\x0a\""
        );
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut s = String::new();
        let mut ev = event();
        ev.error = Some(crate::http::Cause::NoEndpoints);
        json_line(&ev, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["timestamp"], "2026-12-05T19:50:45.123Z");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["authority"], "books.default.svc.cluster.local:8080");
        assert_eq!(v["path"], "/books?id=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["route"], "httproute/default/books/0");
        assert_eq!(v["endpoint"], "10.0.1.2:8080");
        assert_eq!(v["server_id"], "spiffe://cluster.local/ns/default/sa/books");
        assert_eq!(v["proxy_error"], "no-endpoints");
        assert_eq!(v["retries"], 1);
        assert_eq!(v["client_id"], serde_json::Value::Null);
        assert_eq!(v["latency_ms"], 3.0);
        assert!(!s.contains('\n'));
    }

    /// A writer that blocks until released: the queue fills, and later events are dropped
    /// and counted instead of waiting or growing memory.
    #[derive(Clone)]
    struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_writer_drops_and_counts_instead_of_queueing() {
        let metrics = ObserveMetrics::default();
        let gate = Gate(Default::default(), Default::default());
        let log = AccessLog::with_queue(Format::Json, Box::new(gate.clone()), &metrics, 8).unwrap();
        let ev = Arc::new(event());
        for _ in 0..100 {
            log.record(&ev);
        }
        let dropped = ObserveMetrics::counter(&metrics.access_log, "dropped").get();
        // 8 queued, at most one more taken by the (blocked) writer.
        assert!((91..=92).contains(&dropped), "dropped {dropped}");
        {
            let (lock, cv) = &*gate.0;
            *lock.lock().unwrap() = true;
            cv.notify_all();
        }
        let written = ObserveMetrics::counter(&metrics.access_log, "written");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while written.get() + dropped < 100 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(written.get() + dropped, 100);
        let text = String::from_utf8(gate.1.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count() as u64, written.get());
    }
}
