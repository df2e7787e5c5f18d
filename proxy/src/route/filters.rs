//! A route's filters applied to a request or response: pure functions over the head, so
//! every Gateway API case is a table row.
//!
//! Request filters run in the order the rule lists them, then the picked backend's own
//! (header modifiers only). A redirect ends the list: the request is answered, not sent, and
//! the answer is a configured one, so it carries no `weft-proxy-error`. Header modifiers apply
//! `set`, then `add`, then `remove`, names compared case-insensitively.

use std::borrow::Cow;

use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode, Uri};

use super::policy::{Filter, HeaderModifier, PathModifier, Redirect, RedirectScheme, Rewrite};

/// What the request filters decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the request (possibly modified).
    Forward,
    /// Answer with this redirect instead.
    Redirect(Redirected),
}

/// A redirect answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirected {
    pub status: StatusCode,
    pub location: HeaderValue,
}

impl Redirected {
    /// The response: status and `Location`, no `weft-proxy-error` (it is not an error).
    pub fn response<B>(self, body: B) -> Response<B> {
        let mut rsp = Response::new(body);
        *rsp.status_mut() = self.status;
        rsp.headers_mut().insert(header::LOCATION, self.location);
        rsp
    }
}

/// Applies request filters to the head, in order; `prefix` is the matched path prefix
/// ([`super::matching::Outcome::Matched`]). Stops at a redirect.
pub fn apply_request(
    filters: &[Filter],
    prefix: Option<&str>,
    uri: &mut Uri,
    headers: &mut HeaderMap,
) -> Action {
    for f in filters {
        match f {
            Filter::RequestHeaders(m) => modify_headers(m, headers),
            Filter::ResponseHeaders(_) | Filter::Mirror(_) => {}
            Filter::Rewrite(r) => rewrite(r, prefix, uri, headers),
            Filter::Redirect(r) => {
                return Action::Redirect(Redirected {
                    status: r.status,
                    location: location(r, prefix, uri, headers),
                })
            }
        }
    }
    Action::Forward
}

/// Applies the response header modifiers among `filters` (a route's, then its backend's).
pub fn apply_response(filters: &[Filter], headers: &mut HeaderMap) {
    for f in filters {
        if let Filter::ResponseHeaders(m) = f {
            modify_headers(m, headers);
        }
    }
}

/// Whether any filter edits responses (so the caller can skip a response hook).
pub fn edits_response(filters: &[Filter]) -> bool {
    filters
        .iter()
        .any(|f| matches!(f, Filter::ResponseHeaders(_)))
}

pub fn modify_headers(m: &HeaderModifier, headers: &mut HeaderMap) {
    for (n, v) in &m.set {
        headers.insert(n.clone(), v.clone());
    }
    for (n, v) in &m.add {
        headers.append(n.clone(), v.clone());
    }
    for n in &m.remove {
        headers.remove(n);
    }
}

/// The path after a ReplaceFullPath or ReplacePrefixMatch, as the Gateway API's table for
/// `replacePrefixMatch` says (`/foo/bar` with prefix `/foo` and `/xyz` → `/xyz/bar`; `/foo`
/// with `""` or `/` → `/`). `prefix` is the matched prefix, without a trailing slash unless it
/// is `/`. A prefix that does not match leaves the path alone.
pub fn replace_path<'a>(path: &'a str, m: &'a PathModifier, prefix: Option<&str>) -> Cow<'a, str> {
    match m {
        PathModifier::Full(p) => Cow::Borrowed(p),
        PathModifier::Prefix(replacement) => {
            let Some(prefix) = prefix else {
                return Cow::Borrowed(path);
            };
            // What follows the matched segments: "" or "/...".
            let rest = if prefix == "/" {
                if path == "/" {
                    ""
                } else {
                    path
                }
            } else {
                match path.strip_prefix(prefix) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                    _ => return Cow::Borrowed(path),
                }
            };
            let head = replacement.trim_end_matches('/');
            let joined = format!("{head}{rest}");
            Cow::Owned(if joined.is_empty() {
                "/".to_owned()
            } else {
                joined
            })
        }
    }
}

/// `uri` with a new path, keeping its query; unchanged if the result would not be a URI.
fn set_path(uri: &mut Uri, path: &str) {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let Ok(pq) = PathAndQuery::try_from(pq) else {
        return;
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(u) = Uri::from_parts(parts) {
        *uri = u;
    }
}

fn rewrite(r: &Rewrite, prefix: Option<&str>, uri: &mut Uri, headers: &mut HeaderMap) {
    if let Some(m) = &r.path {
        let path = replace_path(uri.path(), m, prefix).into_owned();
        if path != uri.path() {
            set_path(uri, &path);
        }
    }
    if let Some(host) = &r.hostname {
        // The URI's authority when it has one (HTTP/2, absolute form), and `Host` when the
        // request has one or nothing else names the authority.
        let mut had_authority = false;
        if uri.authority().is_some() {
            if let Ok(a) = Authority::try_from(host.as_bytes()) {
                let mut parts = uri.clone().into_parts();
                parts.authority = Some(a);
                if let Ok(u) = Uri::from_parts(parts) {
                    *uri = u;
                    had_authority = true;
                }
            }
        }
        if headers.contains_key(header::HOST) || !had_authority {
            headers.insert(header::HOST, host.clone());
        }
    }
}

/// The request's scheme, host and port as the client addressed them.
fn request_authority(uri: &Uri, headers: &HeaderMap) -> Option<Authority> {
    if let Some(a) = uri.authority() {
        return Some(a.clone());
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    host.parse::<Authority>()
        .ok()
        .filter(|a| !a.host().is_empty())
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `Location` of a redirect: scheme, host, port and path from the filter where it sets
/// them, else from the request; the port is left out when it is the scheme's default, and
/// when the filter changes the scheme without naming a port (the new scheme's default).
/// The query is kept. Without a usable request host the location is relative (path only).
pub fn location(r: &Redirect, prefix: Option<&str>, uri: &Uri, headers: &HeaderMap) -> HeaderValue {
    let req = request_authority(uri, headers);
    let scheme = match r.scheme {
        Some(s) => s.as_str(),
        None => uri.scheme_str().unwrap_or(RedirectScheme::Http.as_str()),
    };
    let host = r
        .hostname
        .as_deref()
        .or_else(|| req.as_ref().map(Authority::host));
    let port = match (r.port, r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => req.as_ref().and_then(Authority::port_u16),
    }
    .filter(|&p| Some(p) != default_port(scheme));
    let path = match &r.path {
        Some(m) => replace_path(uri.path(), m, prefix),
        None => Cow::Borrowed(uri.path()),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let relative = format!("{path}{query}");
    let absolute = host.map(|h| match port {
        Some(p) => format!("{scheme}://{h}:{p}{relative}"),
        None => format!("{scheme}://{h}{relative}"),
    });
    absolute
        .and_then(|a| HeaderValue::try_from(a).ok())
        .or_else(|| HeaderValue::try_from(relative).ok())
        .unwrap_or_else(|| HeaderValue::from_static("/"))
}

#[cfg(test)]
mod tests {
    use http::{HeaderName, Method};
    use weft_proto::destination as pb;

    use super::*;
    use crate::route::matching::{route, Outcome};
    use crate::route::policy::{compile, Policy};
    use crate::route::test_util::{on, policy, prefix};

    fn modifier(m: pb::path_modifier::Kind) -> Option<pb::PathModifier> {
        Some(pb::PathModifier { kind: Some(m) })
    }
    fn full(p: &str) -> Option<pb::PathModifier> {
        modifier(pb::path_modifier::Kind::Full(p.into()))
    }
    fn replace_prefix(p: &str) -> Option<pb::PathModifier> {
        modifier(pb::path_modifier::Kind::Prefix(p.into()))
    }

    #[test]
    fn replace_prefix_match_follows_the_gateway_api_table() {
        // (request path, prefix match, replacement, modified path): the table in the
        // Gateway API's HTTPPathModifier.ReplacePrefixMatch doc, then the root prefix.
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/", "/", "/xyz", "/xyz"),
            ("/a/b", "/", "/xyz", "/xyz/a/b"),
            ("/a/b", "/", "/", "/a/b"),
            ("/a/b", "/", "", "/a/b"),
        ];
        for (path, pfx, repl, want) in cases {
            // The prefix as compiled: no trailing slash unless root.
            let pfx = match pfx.trim_end_matches('/') {
                "" => "/",
                p => p,
            };
            let m = PathModifier::Prefix(repl.into());
            assert_eq!(
                replace_path(path, &m, Some(pfx)),
                want,
                "{path} {pfx} {repl:?}"
            );
        }
        let full = PathModifier::Full("/one".into());
        assert_eq!(
            replace_path("/full/one/two", &full, Some("/full/one")),
            "/one"
        );
        assert_eq!(replace_path("/x", &full, None), "/one");
        // Without a matched prefix (or one that does not match) the path stays.
        let m = PathModifier::Prefix("/xyz".into());
        assert_eq!(replace_path("/foo", &m, None), "/foo");
        assert_eq!(replace_path("/foobar", &m, Some("/foo")), "/foobar");
    }

    /// Routes `uri` through `p` and applies the route's request filters.
    fn run(p: &Policy, uri: &str, headers: &[(&str, &str)]) -> (Action, Uri, HeaderMap) {
        let mut uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let Outcome::Matched { route, prefix } = route(p, &Method::GET, &uri, &map) else {
            panic!("{uri} did not match");
        };
        let action = apply_request(&route.filters, prefix, &mut uri, &mut map);
        (action, uri, map)
    }

    fn compiled(p: pb::OutboundPolicy) -> Policy {
        let c = compile(&p);
        assert_eq!(c.problems, vec![]);
        c.policy
    }

    fn filter(k: pb::filter::Kind) -> pb::Filter {
        pb::Filter { kind: Some(k) }
    }

    fn header_modifier() -> pb::HeaderModifier {
        let h = |n: &str, v: &str| pb::Header {
            name: n.into(),
            value: v.into(),
        };
        pb::HeaderModifier {
            set: vec![h("X-Header-Set", "set-overwrites-values")],
            add: vec![
                h("X-Header-Add", "header-val-1"),
                h("X-Header-Add-Append", "header-val-2"),
            ],
            remove: vec!["X-Header-Remove".into()],
        }
    }

    #[test]
    fn mesh_conformance_rewrite_path() {
        // conformance/tests/mesh/httproute-rewrite-path.yaml
        use pb::filter::Kind as F;
        let rewrite = |path| {
            F::UrlRewrite(pb::UrlRewrite {
                hostname: String::new(),
                path,
            })
        };
        let mut p = policy(&["r0", "r1", "r2", "r3", "r4"], vec![]);
        p.routes[0].filters = vec![filter(rewrite(replace_prefix("/one")))];
        p.routes[1].filters = vec![filter(rewrite(replace_prefix("/")))];
        p.routes[2].filters = vec![filter(rewrite(full("/one")))];
        p.routes[3].filters = vec![
            filter(rewrite(full("/test"))),
            filter(F::RequestHeaderModifier(header_modifier())),
        ];
        p.routes[4].filters = vec![
            filter(rewrite(replace_prefix("/prefix"))),
            filter(F::RequestHeaderModifier(header_modifier())),
        ];
        // Precedence order: longest prefix first.
        p.matches = vec![
            on(4, prefix("/prefix/rewrite-path-and-modify-headers")),
            on(3, prefix("/full/rewrite-path-and-modify-headers")),
            on(1, prefix("/strip-prefix")),
            on(0, prefix("/prefix/one")),
            on(2, prefix("/full/one")),
        ];
        let p = compiled(p);
        for (from, to) in [
            ("/prefix/one/two", "/one/two"),
            ("/strip-prefix/three", "/three"),
            ("/strip-prefix", "/"),
            ("/full/one/two", "/one"),
            ("/prefix/one/two?x=1&y", "/one/two?x=1&y"),
            ("/strip-prefix?q", "/?q"),
            ("http://echo/prefix/one/two?q=1", "http://echo/one/two?q=1"),
        ] {
            let (action, uri, _) = run(&p, from, &[]);
            assert_eq!(action, Action::Forward);
            assert_eq!(uri.to_string(), to, "{from}");
        }
        let sent = [
            ("X-Header-Remove", "remove-val"),
            ("X-Header-Add-Append", "append-val-1"),
            ("X-Header-Set", "set-val"),
        ];
        for (from, to) in [
            ("/full/rewrite-path-and-modify-headers/test", "/test"),
            ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
        ] {
            let (action, uri, h) = run(&p, from, &sent);
            assert_eq!(action, Action::Forward);
            assert_eq!(uri.path(), to);
            let all = |n: &str| -> Vec<&str> {
                h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect()
            };
            assert_eq!(all("x-header-add"), ["header-val-1"]);
            assert_eq!(all("x-header-add-append"), ["append-val-1", "header-val-2"]);
            assert_eq!(all("x-header-set"), ["set-overwrites-values"]);
            assert!(!h.contains_key("x-header-remove"));
        }
    }

    #[test]
    fn header_modifiers_set_add_remove_case_insensitively() {
        let m = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-set"),
                HeaderValue::from_static("new"),
            )],
            add: vec![(
                HeaderName::from_static("x-add"),
                HeaderValue::from_static("2"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        let mut h = HeaderMap::new();
        // http's HeaderMap already stores names in lower case, whatever the client sent.
        h.append(
            HeaderName::from_bytes(b"X-Set").unwrap(),
            HeaderValue::from_static("old1"),
        );
        h.append("x-set", HeaderValue::from_static("old2"));
        h.append(
            HeaderName::from_bytes(b"X-ADD").unwrap(),
            HeaderValue::from_static("1"),
        );
        h.append(
            HeaderName::from_bytes(b"X-Gone").unwrap(),
            HeaderValue::from_static("a"),
        );
        h.append("x-gone", HeaderValue::from_static("b"));
        h.append("x-other", HeaderValue::from_static("kept"));
        modify_headers(&m, &mut h);
        let all =
            |n: &str| -> Vec<&str> { h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect() };
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-add"), ["1", "2"]);
        assert!(all("x-gone").is_empty());
        assert_eq!(all("x-other"), ["kept"]);
        // Absent headers: set and add create them, remove is a no-op.
        let mut empty = HeaderMap::new();
        modify_headers(&m, &mut empty);
        assert_eq!(empty.len(), 2);
    }

    #[test]
    fn response_header_modifiers_apply_to_responses_only() {
        use pb::filter::Kind as F;
        let mut p = policy(&["r"], vec![on(0, None)]);
        p.routes[0].filters = vec![filter(F::ResponseHeaderModifier(header_modifier()))];
        let p = compiled(p);
        let (action, _, h) = run(&p, "/", &[("x-header-remove", "stays on the request")]);
        assert_eq!(action, Action::Forward);
        assert!(h.contains_key("x-header-remove"));
        let filters = &p.routes[0].filters;
        assert!(edits_response(filters));
        let mut rsp = HeaderMap::new();
        rsp.insert("x-header-remove", HeaderValue::from_static("v"));
        apply_response(filters, &mut rsp);
        assert!(!rsp.contains_key("x-header-remove"));
        assert_eq!(rsp["x-header-set"], "set-overwrites-values");
        assert!(!edits_response(&[]));
    }

    #[test]
    fn url_rewrite_hostname_replaces_host_and_authority() {
        use pb::filter::Kind as F;
        let mut p = policy(&["r"], vec![on(0, None)]);
        p.routes[0].filters = vec![filter(F::UrlRewrite(pb::UrlRewrite {
            hostname: "Other.Example".into(),
            path: None,
        }))];
        let p = compiled(p);
        // HTTP/1 origin form: Host.
        let (_, uri, h) = run(&p, "/a?b", &[("host", "echo:8080")]);
        assert_eq!(uri, "/a?b");
        assert_eq!(h["host"], "other.example");
        // HTTP/2 (or absolute form): the URI's authority, and Host if the client sent one.
        let (_, uri, h) = run(&p, "http://echo:8080/a?b", &[]);
        assert_eq!(uri, "http://other.example/a?b");
        assert!(!h.contains_key("host"));
        let (_, uri, h) = run(&p, "http://echo/a", &[("host", "echo")]);
        assert_eq!(uri, "http://other.example/a");
        assert_eq!(h["host"], "other.example");
        // No authority anywhere: Host is added.
        let (_, _, h) = run(&p, "/a", &[]);
        assert_eq!(h["host"], "other.example");
    }

    /// (filter, request URI, request Host, expected status, expected Location)
    type RedirectCase = (
        pb::RequestRedirect,
        &'static str,
        &'static str,
        u16,
        &'static str,
    );

    #[test]
    fn mesh_conformance_redirects() {
        // conformance/tests/mesh/httproute-redirect-{path,port,scheme,host-and-status} and
        // httproute-30{3,7,8}-redirect, plus the port rules of HTTPRequestRedirectFilter.
        let r = |scheme: &str, hostname: &str, port: u32, path, status| pb::RequestRedirect {
            scheme: scheme.into(),
            hostname: hostname.into(),
            port,
            path,
            status,
        };
        let cases: Vec<RedirectCase> = vec![
            // Path.
            (
                r("", "", 0, replace_prefix("/replacement-prefix"), 0),
                "/original-prefix/lemon",
                "echo",
                302,
                "http://echo/replacement-prefix/lemon",
            ),
            (
                r("", "", 0, full("/full-path-replacement"), 0),
                "/full/path/original",
                "echo",
                302,
                "http://echo/full-path-replacement",
            ),
            (
                r(
                    "",
                    "example.org",
                    0,
                    replace_prefix("/replacement-prefix"),
                    0,
                ),
                "/path-and-host",
                "echo",
                302,
                "http://example.org/replacement-prefix",
            ),
            (
                r("", "", 0, replace_prefix("/replacement-prefix"), 301),
                "/path-and-status",
                "echo",
                301,
                "http://echo/replacement-prefix",
            ),
            (
                r("", "example.org", 0, full("/replacement-full"), 0),
                "/full-path-and-host",
                "echo",
                302,
                "http://example.org/replacement-full",
            ),
            (
                r("", "", 0, full("/replacement-full"), 301),
                "/full-path-and-status",
                "echo",
                301,
                "http://echo/replacement-full",
            ),
            // Port.
            (
                r("", "", 8083, None, 0),
                "/port",
                "echo",
                302,
                "http://echo:8083/port",
            ),
            (
                r("", "example.org", 8083, None, 0),
                "/port-and-host",
                "echo",
                302,
                "http://example.org:8083/port-and-host",
            ),
            (
                r("", "", 8083, None, 301),
                "/port-and-status",
                "echo",
                301,
                "http://echo:8083/port-and-status",
            ),
            (
                r("", "example.org", 8083, None, 302),
                "/port-and-host-and-status",
                "echo",
                302,
                "http://example.org:8083/port-and-host-and-status",
            ),
            // Scheme: the new scheme's default port, left out.
            (
                r("https", "", 0, None, 0),
                "/scheme",
                "echo",
                302,
                "https://echo/scheme",
            ),
            (
                r("https", "example.org", 0, None, 0),
                "/scheme-and-host",
                "echo",
                302,
                "https://example.org/scheme-and-host",
            ),
            (
                r("https", "", 0, None, 301),
                "/scheme-and-status",
                "echo",
                301,
                "https://echo/scheme-and-status",
            ),
            (
                r("https", "", 0, None, 0),
                "/s",
                "echo:8080",
                302,
                "https://echo/s",
            ),
            (
                r("https", "", 8443, None, 0),
                "/s",
                "echo",
                302,
                "https://echo:8443/s",
            ),
            (
                r("https", "", 443, None, 0),
                "/s",
                "echo",
                302,
                "https://echo/s",
            ),
            (
                r("http", "", 80, None, 0),
                "/s",
                "echo:8080",
                302,
                "http://echo/s",
            ),
            // Host and status.
            (
                r("", "example.org", 0, None, 0),
                "/hostname-redirect",
                "echo",
                302,
                "http://example.org/hostname-redirect",
            ),
            (
                r("", "example.org", 0, None, 301),
                "/host-and-status",
                "echo",
                301,
                "http://example.org/host-and-status",
            ),
            (r("", "", 0, None, 303), "/x", "echo", 303, "http://echo/x"),
            (r("", "", 0, None, 307), "/x", "echo", 307, "http://echo/x"),
            (r("", "", 0, None, 308), "/x", "echo", 308, "http://echo/x"),
            // No scheme or port in the filter: the request's port stays (the "listener" port).
            (
                r("", "example.org", 0, None, 0),
                "/x",
                "echo:8080",
                302,
                "http://example.org:8080/x",
            ),
            (r("", "", 0, None, 0), "/x", "echo:80", 302, "http://echo/x"),
            // The query is kept.
            (
                r("", "", 0, replace_prefix("/new"), 0),
                "/original-prefix/a?b=c&d",
                "echo",
                302,
                "http://echo/new/a?b=c&d",
            ),
            // IPv6 hosts keep their brackets.
            (
                r("", "", 8083, None, 0),
                "/x",
                "[fd00::1]:80",
                302,
                "http://[fd00::1]:8083/x",
            ),
            // No request host at all: a relative Location.
            (r("", "", 0, full("/y"), 0), "/x?q", "", 302, "/y?q"),
        ];
        for (i, (filter_pb, uri, host, status, location)) in cases.into_iter().enumerate() {
            // As in the conformance manifests: a PathPrefix match on the first segment.
            let path = uri.split('?').next().unwrap_or(uri);
            let first = path.split('/').nth(1).map(|s| format!("/{s}"));
            let mut p = policy(&["r"], vec![on(0, prefix(first.as_deref().unwrap_or("/")))]);
            p.routes[0].filters = vec![filter(pb::filter::Kind::RequestRedirect(filter_pb))];
            let p = compiled(p);
            let headers: &[(&str, &str)] = if host.is_empty() {
                &[]
            } else {
                &[("host", host)]
            };
            let (action, _, _) = run(&p, uri, headers);
            let Action::Redirect(r) = action else {
                panic!("case {i}: not a redirect")
            };
            assert_eq!(
                (r.status.as_u16(), r.location.to_str().unwrap()),
                (status, location),
                "case {i}: {uri}"
            );
            let rsp = r.response(());
            assert_eq!(rsp.status().as_u16(), status);
            assert_eq!(rsp.headers()["location"], location);
            // A configured answer, not a proxy error.
            assert!(!rsp.headers().contains_key("weft-proxy-error"));
        }
    }

    #[test]
    fn a_redirect_ends_the_filter_list() {
        use pb::filter::Kind as F;
        let mut p = policy(&["r"], vec![on(0, None)]);
        p.routes[0].filters = vec![
            filter(F::RequestHeaderModifier(header_modifier())),
            filter(F::RequestRedirect(pb::RequestRedirect::default())),
            filter(F::RequestHeaderModifier(pb::HeaderModifier {
                add: vec![pb::Header {
                    name: "x-after".into(),
                    value: "1".into(),
                }],
                ..Default::default()
            })),
        ];
        let p = compiled(p);
        let (action, _, h) = run(&p, "/a", &[("host", "echo")]);
        assert!(matches!(action, Action::Redirect(_)));
        assert!(h.contains_key("x-header-set"));
        assert!(!h.contains_key("x-after"));
    }
}
