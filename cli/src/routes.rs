//! Traffic policy as a client proxy's route metrics show it: per route rule
//! (`route="httproute/<ns>/<name>/<rule>"`), the requests sent to each backend
//! (the split), the success rate of the answers the app got (after retries),
//! the retries made and the retries the service's budget refused.
//!
//! Like [`crate::stats`], pure functions of parsed samples; the metric names
//! are the proxy's contract, kept as constants so a rename shows up here.

use std::collections::BTreeMap;

use crate::promtext::Sample;
use crate::security::counts_since;
use crate::stats::counter_delta;

/// `weft_route_requests_total{route, backend}`: requests that matched a rule, by the backend
/// drawn (a service port such as `books.demo.svc.cluster.local:8080`, or `invalid`).
pub const ROUTE_REQUESTS_TOTAL: &str = "weft_route_requests_total";
/// `weft_route_responses_total{route, classification}`: one per request, after its retries.
pub const ROUTE_RESPONSES_TOTAL: &str = "weft_route_responses_total";
/// `weft_route_retries_total{route, reason}`.
pub const ROUTE_RETRIES_TOTAL: &str = "weft_route_retries_total";
/// `weft_route_retry_budget_exhausted_total{route}`.
pub const ROUTE_BUDGET_EXHAUSTED_TOTAL: &str = "weft_route_retry_budget_exhausted_total";

/// Cumulative counters of one route rule at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSnapshot {
    /// Requests by backend.
    pub requests: BTreeMap<String, f64>,
    pub responses: f64,
    pub successes: f64,
    /// Retries by reason (`status`, `grpc-status`, `timeout`, `failed`).
    pub retries: BTreeMap<String, f64>,
    pub budget_exhausted: f64,
}

/// Every route rule the samples mention, by its label.
pub fn routes_from_samples(samples: &[Sample]) -> BTreeMap<String, RouteSnapshot> {
    let mut routes: BTreeMap<String, RouteSnapshot> = BTreeMap::new();
    for s in samples {
        let Some(route) = s.label("route") else {
            continue;
        };
        if !matches!(
            s.name.as_str(),
            ROUTE_REQUESTS_TOTAL
                | ROUTE_RESPONSES_TOTAL
                | ROUTE_RETRIES_TOTAL
                | ROUTE_BUDGET_EXHAUSTED_TOTAL
        ) {
            continue;
        }
        let snap = routes.entry(route.to_string()).or_default();
        match s.name.as_str() {
            ROUTE_REQUESTS_TOTAL => {
                let backend = s.label("backend").unwrap_or_default();
                *snap.requests.entry(backend.to_string()).or_default() += s.value;
            }
            ROUTE_RESPONSES_TOTAL => {
                snap.responses += s.value;
                if s.label("classification") == Some("success") {
                    snap.successes += s.value;
                }
            }
            ROUTE_RETRIES_TOTAL => {
                let reason = s.label("reason").unwrap_or_default();
                *snap.retries.entry(reason.to_string()).or_default() += s.value;
            }
            _ => snap.budget_exhausted += s.value,
        }
    }
    routes
}

/// One route rule over the window between two scrapes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteWindow {
    /// Requests by backend in the window; every backend the rule has used so far is listed,
    /// those that got nothing with 0, so a split moved away from a backend shows as 0 %.
    pub requests: BTreeMap<String, f64>,
    pub requests_per_sec: f64,
    /// Successes over responses, after retries; `None` without responses.
    pub success_rate: Option<f64>,
    /// Retries by reason in the window (reasons that did not move are left out).
    pub retries: BTreeMap<String, f64>,
    pub retries_per_sec: f64,
    /// Retries the budget refused in the window.
    pub budget_exhausted: f64,
}

impl RouteWindow {
    /// Compare two snapshots of the same rule taken `seconds` apart (a rule missing from the
    /// first scrape counts from zero).
    pub fn between(prev: &RouteSnapshot, cur: &RouteSnapshot, seconds: f64) -> Self {
        let per_sec = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        let requests: BTreeMap<String, f64> = cur
            .requests
            .iter()
            .map(|(backend, &n)| {
                let before = prev.requests.get(backend).copied().unwrap_or(0.0);
                (backend.clone(), counter_delta(before, n))
            })
            .collect();
        let responses = counter_delta(prev.responses, cur.responses);
        let successes = counter_delta(prev.successes, cur.successes);
        let retries = counts_since(&prev.retries, &cur.retries);
        let retried = sum(retries.values());
        RouteWindow {
            requests_per_sec: per_sec(sum(requests.values())),
            requests,
            success_rate: (responses > 0.0).then(|| (successes / responses).clamp(0.0, 1.0)),
            retries_per_sec: per_sec(retried),
            retries,
            budget_exhausted: counter_delta(prev.budget_exhausted, cur.budget_exhausted),
        }
    }

    /// Requests in the window, over all backends.
    pub fn total_requests(&self) -> f64 {
        sum(self.requests.values())
    }

    pub fn total_retries(&self) -> f64 {
        sum(self.retries.values())
    }

    /// Each backend's fraction of the window's requests, in the order of
    /// [`short_backend`] names (`books` before `books-v2`); empty when the rule got no
    /// requests.
    pub fn shares(&self) -> Vec<(&str, f64)> {
        let total = self.total_requests();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut shares: Vec<(&str, f64)> = self
            .requests
            .iter()
            .map(|(backend, &n)| (backend.as_str(), n / total))
            .collect();
        shares.sort_by(|a, b| {
            short_backend(a.0)
                .cmp(short_backend(b.0))
                .then(a.0.cmp(b.0))
        });
        shares
    }
}

/// Every rule of `cur` over the window from `prev`, by label.
pub fn windows_between(
    prev: &BTreeMap<String, RouteSnapshot>,
    cur: &BTreeMap<String, RouteSnapshot>,
    seconds: f64,
) -> BTreeMap<String, RouteWindow> {
    let empty = RouteSnapshot::default();
    cur.iter()
        .map(|(route, snap)| {
            let before = prev.get(route).unwrap_or(&empty);
            (route.clone(), RouteWindow::between(before, snap, seconds))
        })
        .collect()
}

/// A backend label as a person reads it in a table: the Service's name for a service port of
/// the cluster domain (`books-v2.demo.svc.cluster.local:8080` → `books-v2`), anything else
/// unchanged (`invalid`).
pub fn short_backend(backend: &str) -> &str {
    match backend.split_once(".svc.cluster.local:") {
        Some((name_ns, _)) => name_ns.split_once('.').map_or(name_ns, |(name, _)| name),
        None => backend,
    }
}

/// Not `Iterator::sum`: an empty f64 sum is -0.0, which prints as "-0".
fn sum<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promtext::parse;

    const ROUTE: &str = "httproute/demo/books/0";
    const BOOKS: &str = "books.demo.svc.cluster.local:8080";
    const BOOKS_V2: &str = "books-v2.demo.svc.cluster.local:8080";

    fn exposition(v1: u32, v2: u32, ok: u32, failed: u32, retries: u32, refused: u32) -> String {
        let r = format!("route=\"{ROUTE}\"");
        let mut text = format!(
            "# TYPE weft_route_requests counter\n\
             weft_route_requests_total{{{r},backend=\"{BOOKS}\"}} {v1}\n"
        );
        if v2 > 0 {
            text.push_str(&format!(
                "weft_route_requests_total{{{r},backend=\"{BOOKS_V2}\"}} {v2}\n"
            ));
        }
        text.push_str(&format!(
            "weft_route_responses_total{{{r},classification=\"success\"}} {ok}\n\
             weft_route_responses_total{{{r},classification=\"failure\"}} {failed}\n\
             weft_route_retries_total{{{r},reason=\"status\"}} {retries}\n\
             weft_route_retry_budget_exhausted_total{{{r}}} {refused}\n\
             weft_route_requests_total{{route=\"grpcroute/demo/ratings/0\",backend=\"invalid\"}} 3\n\
             weft_http_requests_total{{direction=\"outbound\"}} 999\n\
             weft_outbound_routes_total{{protocol=\"http\",route=\"balanced\"}} 999\n\
             # EOF\n"
        ));
        text
    }

    fn routes(text: &str) -> BTreeMap<String, RouteSnapshot> {
        routes_from_samples(&parse(text).expect("parses"))
    }

    #[test]
    fn snapshot_collects_each_rule() {
        let r = routes(&exposition(100, 0, 99, 1, 4, 2));
        assert_eq!(
            r.keys().collect::<Vec<_>>(),
            ["grpcroute/demo/ratings/0", ROUTE]
        );
        assert_eq!(
            r[ROUTE],
            RouteSnapshot {
                requests: [(BOOKS.to_string(), 100.0)].into(),
                responses: 100.0,
                successes: 99.0,
                retries: [("status".to_string(), 4.0)].into(),
                budget_exhausted: 2.0,
            }
        );
        assert_eq!(
            r["grpcroute/demo/ratings/0"].requests,
            [("invalid".to_string(), 3.0)].into()
        );
    }

    #[test]
    fn window_shows_the_split_moving() {
        // 100 to books, then a 10/90 edit: 10 more to books and 90 to books-v2.
        let prev = routes(&exposition(100, 0, 100, 0, 1, 0));
        let cur = routes(&exposition(110, 90, 200, 0, 3, 1));
        let w = &windows_between(&prev, &cur, 2.0)[ROUTE];
        assert_eq!(w.requests_per_sec, 50.0);
        assert_eq!(w.total_requests(), 100.0);
        assert_eq!(w.shares(), [(BOOKS, 0.1), (BOOKS_V2, 0.9)]);
        assert_eq!(w.success_rate, Some(1.0));
        assert_eq!(w.retries, [("status".to_string(), 2.0)].into());
        assert_eq!(w.retries_per_sec, 1.0);
        assert_eq!(w.budget_exhausted, 1.0);

        // All to books-v2 now: books stays listed at 0 %.
        let later = routes(&exposition(110, 190, 300, 0, 3, 1));
        let w = &windows_between(&cur, &later, 2.0)[ROUTE];
        assert_eq!(w.shares(), [(BOOKS, 0.0), (BOOKS_V2, 1.0)]);
        assert_eq!(w.retries_per_sec, 0.0);
        assert!(w.retries.is_empty());
    }

    #[test]
    fn an_idle_or_new_rule() {
        let cur = routes(&exposition(100, 0, 98, 2, 0, 0));
        let idle = &windows_between(&cur, &cur, 2.0)[ROUTE];
        assert_eq!(idle.requests_per_sec, 0.0);
        assert_eq!(idle.success_rate, None);
        assert!(idle.shares().is_empty());
        // Not in the first scrape: counted from zero.
        let new = &windows_between(&BTreeMap::new(), &cur, 4.0)[ROUTE];
        assert_eq!(new.requests_per_sec, 25.0);
        assert_eq!(new.success_rate, Some(0.98));
        // A proxy without routes.
        assert!(routes("weft_http_requests_total{direction=\"outbound\"} 1\n").is_empty());
    }

    #[test]
    fn backends_read_as_service_names() {
        assert_eq!(short_backend(BOOKS), "books");
        assert_eq!(short_backend(BOOKS_V2), "books-v2");
        assert_eq!(short_backend("invalid"), "invalid");
        assert_eq!(short_backend("10.0.0.1:80"), "10.0.0.1:80");
    }
}
