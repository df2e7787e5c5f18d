//! Which route a request takes: pure, and cheap on the hot path.
//!
//! The controller sends every match of every rule already in Gateway API precedence order,
//! so the first match whose conditions all hold wins; nothing here ranks matches. The path
//! is compared as the client sent it (percent-encoding untouched, no query); header names
//! case-insensitively and values byte for byte; query parameter names and values after
//! percent-decoding. Exact and prefix matches allocate nothing; only a header repeated in
//! the request, or a query parameter with `%` escapes, builds a string.

use std::borrow::Cow;

use http::{HeaderMap, Method, Uri};

use super::policy::{HeaderMatch, Match, PathMatch, Policy, QueryParamMatch, Route, ValueMatch};

/// Where a request goes.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'p> {
    /// The policy has no routes: send the request to the service itself.
    Default,
    /// The policy has routes but none matches: answer 404 `no-route`.
    NoRoute,
    Matched {
        route: &'p Route,
        /// The [`PathMatch::Prefix`] that matched, for ReplacePrefixMatch; `None` for exact and
        /// regex matches.
        prefix: Option<&'p str>,
    },
}

impl PartialEq for Outcome<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Outcome::Default, Outcome::Default) | (Outcome::NoRoute, Outcome::NoRoute) => true,
            (
                Outcome::Matched {
                    route: a,
                    prefix: p,
                },
                Outcome::Matched {
                    route: b,
                    prefix: q,
                },
            ) => std::ptr::eq(*a, *b) && p == q,
            _ => false,
        }
    }
}

/// The route `policy` gives this request (see [`Outcome`]).
pub fn route<'p>(
    policy: &'p Policy,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Outcome<'p> {
    if !policy.routed {
        return Outcome::Default;
    }
    let path = uri.path();
    let query = uri.query();
    for m in &policy.matches {
        if let Some(prefix) = is_match(m, method, path, query, headers) {
            // `compile` only keeps matches whose route exists; stay total all the same.
            if let Some(route) = policy.routes.get(m.route) {
                return Outcome::Matched { route, prefix };
            }
        }
    }
    Outcome::NoRoute
}

/// Whether every condition of one match holds (inbound routes reuse the matcher).
pub(crate) fn matches(m: &Match, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
    is_match(m, method, uri.path(), uri.query(), headers).is_some()
}

/// `Some(prefix)` when every condition of `m` holds; the prefix when the path match is one.
fn is_match<'p>(
    m: &'p Match,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<Option<&'p str>> {
    // Cheapest first: method, path, then headers and query.
    if m.method.as_ref().is_some_and(|want| want != method) {
        return None;
    }
    let prefix = match &m.path {
        PathMatch::Exact(p) => (path == &**p).then_some(None)?,
        PathMatch::Prefix(p) => prefix_matches(p, path).then_some(Some(&**p))?,
        PathMatch::Regex(re) => re.is_match(path.as_bytes()).then_some(None)?,
    };
    if !m.headers.iter().all(|h| header_matches(h, headers)) {
        return None;
    }
    if !m.query_params.iter().all(|q| query_matches(q, query)) {
        return None;
    }
    Some(prefix)
}

/// Segment-wise prefix: `prefix` has no trailing slash unless it is `/`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn value_matches(v: &ValueMatch, value: &[u8]) -> bool {
    match v {
        ValueMatch::Exact(want) => **want == *value,
        ValueMatch::Regex(re) => re.is_match(value),
    }
}

/// A header sent several times is matched as one value, its values joined with `,` in the
/// order received (RFC 9110 §5.3: the same meaning as one comma-separated field). An absent
/// header never matches, not even an empty value or a regex matching "".
fn header_matches(h: &HeaderMatch, headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&h.name).iter();
    let Some(first) = values.next() else {
        return false;
    };
    match values.next() {
        None => value_matches(&h.value, first.as_bytes()),
        Some(second) => {
            let mut joined = Vec::with_capacity(first.len() + second.len() + 16);
            joined.extend_from_slice(first.as_bytes());
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            value_matches(&h.value, &joined)
        }
    }
}

/// The first parameter with the name decides (the Gateway API's recommendation); an absent
/// parameter never matches. `a` and `a=` both have the value "".
fn query_matches(q: &QueryParamMatch, query: Option<&str>) -> bool {
    let Some(query) = query else {
        return false;
    };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if *percent_decode(name) == *q.name.as_bytes() {
            return value_matches(&q.value, &percent_decode(value));
        }
    }
    false
}

/// `%XX` escapes decoded; borrowed when there are none. `+` stays `+` (RFC 3986 queries,
/// not HTML forms). Invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    let b = s.as_bytes();
    if !b.contains(&b'%') {
        return Cow::Borrowed(b);
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use proptest::prelude::*;
    use weft_proto::destination as pb;

    use super::*;
    use crate::route::policy::compile;
    use crate::route::test_util::*;

    fn compiled(p: &pb::OutboundPolicy) -> Policy {
        let c = compile(p);
        assert_eq!(c.problems, vec![], "test policy must compile");
        c.policy
    }

    /// "default", "404", or the matched rule's name (and `@prefix` when a prefix matched).
    fn outcome(policy: &Policy, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        match route(policy, &method, &uri.parse().unwrap(), &map) {
            Outcome::Default => "default".into(),
            Outcome::NoRoute => "404".into(),
            Outcome::Matched { route, prefix } => {
                let name = route.label.split('/').nth(2).unwrap().to_owned();
                match prefix {
                    Some(p) => format!("{name}@{p}"),
                    None => name,
                }
            }
        }
    }

    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

    fn check(policy: &Policy, cases: &[Case]) {
        for (method, uri, headers, want) in cases {
            assert_eq!(
                outcome(policy, method, uri, headers),
                *want,
                "{method} {uri} {headers:?}"
            );
        }
    }

    #[test]
    fn mesh_conformance_httproute_matching() {
        // conformance/tests/mesh/httproute-matching.yaml, matches in precedence order.
        let mut p = policy(&["v1", "v2"], vec![]);
        p.matches = vec![
            on(1, prefix("/v2")),
            pb::RouteMatch {
                headers: vec![header("version", "one")],
                ..on(0, prefix("/"))
            },
            pb::RouteMatch {
                headers: vec![header("version", "two")],
                ..on(1, prefix("/"))
            },
            on(0, prefix("/")),
        ];
        let p = compiled(&p);
        check(
            &p,
            &[
                ("GET", "/", &[], "v1@/"),
                ("GET", "/example", &[], "v1@/"),
                ("GET", "/", &[("Version", "one")], "v1@/"),
                ("GET", "/v2", &[], "v2@/v2"),
                ("GET", "/v2/example", &[], "v2@/v2"),
                ("GET", "/", &[("Version", "two")], "v2@/"),
                ("GET", "/v2/", &[], "v2@/v2"),
                ("GET", "/v2example", &[], "v1@/"),
                ("GET", "/foo/v2/example", &[], "v1@/"),
            ],
        );
    }

    #[test]
    fn mesh_conformance_query_param_matching() {
        // conformance/tests/mesh/httproute-query-param-matching.yaml, in precedence order:
        // longest prefix first, then most headers, then most query parameters.
        let q = |route, path, headers: Vec<pb::HeaderMatch>, qs: Vec<pb::QueryParamMatch>| {
            pb::RouteMatch {
                headers,
                query_params: qs,
                ..on(route, path)
            }
        };
        let mut p = policy(
            &[
                "v1-path1",
                "v2-hdr",
                "v1-path34",
                "v1-path5",
                "v1",
                "v2",
                "v2-hydra",
            ],
            vec![],
        );
        p.matches = vec![
            q(
                2,
                prefix("/path4"),
                vec![header("version", "three")],
                vec![query("animal", "kraken")],
            ),
            q(2, prefix("/path3"), vec![], vec![query("animal", "shark")]),
            q(0, prefix("/path1"), vec![], vec![query("animal", "whale")]),
            q(3, prefix("/path5"), vec![], vec![]),
            q(
                1,
                None,
                vec![header("version", "one")],
                vec![query("animal", "whale")],
            ),
            q(4, None, vec![], vec![query("animal", "whale")]),
            q(5, None, vec![], vec![query("animal", "dolphin")]),
            q(6, None, vec![], vec![query("animal", "hydra")]),
        ];
        let p = compiled(&p);
        check(
            &p,
            &[
                ("GET", "/?animal=whale", &[], "v1@/"),
                ("GET", "/?animal=dolphin", &[], "v2@/"),
                ("GET", "/?animal=whale&otherparam=irrelevant", &[], "v1@/"),
                ("GET", "/?animal=dolphin&color=yellow", &[], "v2@/"),
                ("GET", "/?color=blue", &[], "404"),
                ("GET", "/?animal=dog", &[], "404"),
                ("GET", "/?animal=whaledolphin", &[], "404"),
                ("GET", "/", &[], "404"),
                ("GET", "/path1?animal=whale", &[], "v1-path1@/path1"),
                ("GET", "/?animal=whale", &[("version", "one")], "v2-hdr@/"),
                ("GET", "/path3?animal=shark", &[], "v1-path34@/path3"),
                (
                    "GET",
                    "/path4?animal=kraken",
                    &[("version", "three")],
                    "v1-path34@/path4",
                ),
                ("GET", "/?animal=shark", &[], "404"),
                ("GET", "/path4?animal=kraken", &[], "404"),
                ("GET", "/path5?animal=hydra", &[], "v1-path5@/path5"),
                // The first value of a repeated parameter decides; names and values are
                // percent-decoded.
                ("GET", "/?animal=whale&animal=dolphin", &[], "v1@/"),
                ("GET", "/?animal=dolphin&animal=whale", &[], "v2@/"),
                ("GET", "/?ani%6dal=wh%61le", &[], "v1@/"),
                ("GET", "/?animal", &[], "404"),
            ],
        );
    }

    #[test]
    fn the_given_order_is_the_precedence() {
        // The controller orders matches; an exact match listed after a prefix that covers it
        // never wins, and swapping the order swaps the winner.
        let a = compiled(&policy(
            &["prefix", "exact"],
            vec![on(0, prefix("/a")), on(1, exact("/a/b"))],
        ));
        let b = compiled(&policy(
            &["prefix", "exact"],
            vec![on(1, exact("/a/b")), on(0, prefix("/a"))],
        ));
        assert_eq!(outcome(&a, "GET", "/a/b", &[]), "prefix@/a");
        assert_eq!(outcome(&b, "GET", "/a/b", &[]), "exact");
        assert_eq!(outcome(&b, "GET", "/a/c", &[]), "prefix@/a");
        // Several matches of one rule (OR), interleaved with another rule's.
        let c = compiled(&policy(
            &["r0", "r1"],
            vec![on(0, exact("/x")), on(1, prefix("/x")), on(0, prefix("/y"))],
        ));
        check(
            &c,
            &[
                ("GET", "/x", &[], "r0"),
                ("GET", "/x/1", &[], "r1@/x"),
                ("GET", "/y/1", &[], "r0@/y"),
                ("GET", "/z", &[], "404"),
            ],
        );
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        // (prefix as sent, path, matches)
        let cases = [
            ("/foo", "/foo", true),
            ("/foo", "/foo/", true),
            ("/foo", "/foo/bar", true),
            ("/foo", "/foo?x=1", true),
            ("/foo", "/foobar", false),
            ("/foo", "/fo", false),
            ("/foo", "/", false),
            ("/foo", "/FOO", false),
            ("/foo/", "/foo", true),
            ("/foo/", "/foo/bar", true),
            ("/foo/", "/foobar", false),
            ("/foo/bar", "/foo/bar/baz", true),
            ("/foo/bar", "/foo/barbaz", false),
            ("/foo/bar", "/foo", false),
            ("/", "/", true),
            ("/", "/anything/at/all", true),
            ("/", "*", true),
        ];
        for (pfx, uri, want) in cases {
            let p = compiled(&policy(&["r"], vec![on(0, prefix(pfx))]));
            let got = outcome(&p, "GET", uri, &[]) != "404";
            assert_eq!(got, want, "prefix {pfx:?} path {uri:?}");
        }
    }

    #[test]
    fn exact_paths_and_regexes_match_the_whole_path() {
        let cases = [
            (exact("/a"), "/a", true),
            (exact("/a"), "/a/", false),
            (exact("/a"), "/a?q=1", true),
            (exact("/a"), "/ab", false),
            (regex("/a.*"), "/abc", true),
            (regex("/a.*"), "/x/abc", false),
            (regex("/b"), "/b", true),
            (regex("/b"), "/ab", false),
            (regex("/b"), "/b/c", false),
            // Alternation stays inside the anchors.
            (regex("/x|/b"), "/bx", false),
            (regex("/x|/b"), "/b", true),
            (regex("/v[0-9]+/items"), "/v12/items", true),
            (regex("/v[0-9]+/items"), "/v12/items?x", true),
            (regex("/v[0-9]+/items"), "/v/items", false),
        ];
        for (i, (path, uri, want)) in cases.into_iter().enumerate() {
            let p = compiled(&policy(&["r"], vec![on(0, path)]));
            assert_eq!(
                outcome(&p, "GET", uri, &[]) != "404",
                want,
                "case {i}: {uri}"
            );
        }
    }

    #[test]
    fn headers_query_and_method_are_anded() {
        let mut p = policy(&["r", "fallback"], vec![]);
        p.matches = vec![
            pb::RouteMatch {
                headers: vec![header("X-A", "1"), header_re("x-b", "v[0-9]")],
                query_params: vec![query("p", "1"), query_re("q", "[a-z]+")],
                method: "POST".into(),
                ..on(0, prefix("/api"))
            },
            on(1, prefix("/")),
        ];
        let p = compiled(&p);
        let all: &[(&str, &str)] = &[("x-a", "1"), ("x-b", "v7")];
        check(
            &p,
            &[
                ("POST", "/api?p=1&q=abc", all, "r@/api"),
                ("POST", "/api/x?q=abc&p=1", all, "r@/api"),
                ("GET", "/api?p=1&q=abc", all, "fallback@/"),
                ("POST", "/other?p=1&q=abc", all, "fallback@/"),
                ("POST", "/api?p=1", all, "fallback@/"),
                ("POST", "/api?p=2&q=abc", all, "fallback@/"),
                ("POST", "/api?p=1&q=ABC", all, "fallback@/"),
                ("POST", "/api?p=1&q=abc", &[("x-a", "1")], "fallback@/"),
                (
                    "POST",
                    "/api?p=1&q=abc",
                    &[("x-a", "1"), ("x-b", "v77")],
                    "fallback@/",
                ),
                (
                    "POST",
                    "/api?p=1&q=abc",
                    &[("x-a", "1"), ("x-b", "xv7")],
                    "fallback@/",
                ),
                // Names are case-insensitive, values are not.
                (
                    "POST",
                    "/api?p=1&q=abc",
                    &[("X-A", "1"), ("X-B", "v7")],
                    "r@/api",
                ),
                (
                    "POST",
                    "/api?p=1&q=abc",
                    &[("x-a", "1"), ("x-b", "V7")],
                    "fallback@/",
                ),
            ],
        );
    }

    #[test]
    fn repeated_headers_match_as_one_comma_joined_value() {
        let mk = |h: pb::HeaderMatch| {
            let mut p = policy(&["r"], vec![]);
            p.matches = vec![pb::RouteMatch {
                headers: vec![h],
                ..on(0, None)
            }];
            compiled(&p)
        };
        let two: &[(&str, &str)] = &[("x", "a"), ("x", "b")];
        assert_eq!(outcome(&mk(header("x", "a,b")), "GET", "/", two), "r@/");
        assert_eq!(outcome(&mk(header("x", "a")), "GET", "/", two), "404");
        assert_eq!(outcome(&mk(header_re("x", "a,.*")), "GET", "/", two), "r@/");
        assert_eq!(
            outcome(&mk(header("x", "a")), "GET", "/", &[("x", "a")]),
            "r@/"
        );
        // An absent header matches nothing, not even an empty value or ".*".
        assert_eq!(outcome(&mk(header("x", "")), "GET", "/", &[]), "404");
        assert_eq!(outcome(&mk(header_re("x", ".*")), "GET", "/", &[]), "404");
        assert_eq!(
            outcome(&mk(header("x", "")), "GET", "/", &[("x", "")]),
            "r@/"
        );
    }

    #[test]
    fn only_the_first_match_of_a_header_or_parameter_name_counts() {
        let mut p = policy(&["r"], vec![]);
        p.matches = vec![pb::RouteMatch {
            headers: vec![header("x", "1"), header("X", "2")],
            query_params: vec![query("q", "1"), query("q", "2")],
            ..on(0, None)
        }];
        let p = compiled(&p);
        assert_eq!(outcome(&p, "GET", "/?q=1", &[("x", "1")]), "r@/");
        assert_eq!(outcome(&p, "GET", "/?q=2", &[("x", "2")]), "404");
    }

    #[test]
    fn no_routes_is_the_default_route_and_routes_without_a_match_are_404() {
        let none = compiled(&pb::OutboundPolicy::default());
        assert_eq!(outcome(&none, "GET", "/", &[]), "default");
        assert_eq!(outcome(&Policy::default(), "GET", "/x", &[]), "default");
        let unmatched = compiled(&policy(&["r"], vec![]));
        assert_eq!(outcome(&unmatched, "GET", "/", &[]), "404");
        // Every route dropped for a bad regex: still routed, so 404, not the default route.
        let c = compile(&policy(&["r"], vec![on(0, regex("("))]));
        assert_eq!(c.problems.len(), 1);
        assert_eq!(outcome(&c.policy, "GET", "/", &[]), "404");
    }

    #[test]
    fn percent_decoding() {
        let cases: &[(&str, &[u8])] = &[
            ("", b""),
            ("abc", b"abc"),
            ("a%20b", b"a b"),
            ("%41%42", b"AB"),
            ("%4", b"%4"),
            ("%", b"%"),
            ("%zz", b"%zz"),
            ("a+b", b"a+b"),
            ("%e2%82%ac", "€".as_bytes()),
        ];
        for (s, want) in cases {
            assert_eq!(&*percent_decode(s), *want, "{s:?}");
        }
    }

    proptest! {
        #[test]
        fn matching_never_panics_and_a_root_prefix_matches_every_path(
            path in "(/[a-zA-Z0-9%._~!$&'()*+,;=:@-]{0,12}){0,6}/?",
            qs in proptest::option::of("[a-zA-Z0-9%=&+._-]{0,40}"),
            headers in proptest::collection::vec(("[a-z][a-z0-9-]{0,8}", "[ -~]{0,16}"), 0..6),
        ) {
            let uri = match &qs {
                Some(q) => format!("{}?{q}", if path.is_empty() { "/" } else { &path }),
                None => if path.is_empty() { "/".to_owned() } else { path.clone() },
            };
            let Ok(uri) = uri.parse::<Uri>() else { return Ok(()) };
            let mut map = HeaderMap::new();
            for (n, v) in &headers {
                if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
                    map.append(n, v);
                }
            }
            let mut p = policy(&["specific", "root"], vec![]);
            p.matches = vec![
                pb::RouteMatch {
                    headers: vec![header_re("a", ".*x.*"), header("b", "1")],
                    query_params: vec![query("a", "b"), query_re("%", ".*")],
                    ..on(0, regex("/[a-z]+(/.*)?"))
                },
                on(0, exact(&path)),
                on(0, prefix("/a/b")),
                on(1, prefix("/")),
            ];
            let c = compile(&p);
            let policy = c.policy;
            match route(&policy, &Method::GET, &uri, &map) {
                Outcome::Matched { route, .. } => prop_assert!(!route.label.is_empty()),
                other => prop_assert!(false, "{uri}: {other:?}"),
            }
            // A policy whose only match is the root prefix takes every path.
            let root = compiled(&policy_root());
            prop_assert_eq!(outcome_of(&root, &uri, &map), Some("/"));
        }
    }

    fn policy_root() -> pb::OutboundPolicy {
        policy(&["root"], vec![on(0, prefix("/"))])
    }

    fn outcome_of<'p>(p: &'p Policy, uri: &Uri, headers: &HeaderMap) -> Option<&'p str> {
        match route(p, &Method::GET, uri, headers) {
            Outcome::Matched { prefix, .. } => prefix,
            _ => None,
        }
    }
}
