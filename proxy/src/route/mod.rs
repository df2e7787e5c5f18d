//! Outbound routing by policy: which Gateway API route (HTTPRoute, GRPCRoute) a request
//! takes, which of its backends it goes to, and how the route's filters change it.
//!
//! This is the first step of an outbound request's policy, written once in DESIGN.md:
//! **route** → filters → timeout → retry → balance → breaker → endpoint. The controller's
//! `Destination.ClientPolicy` stream ([`client`]) gives each target a [`policy::Policy`],
//! compiled once per update ([`policy::compile`]); per request, [`matching::route`] picks the
//! route (or says there is none: 404 `no-route`), [`backend::pick`] draws a backend by weight
//! (none: 500), and [`filters`] rewrite the head or answer with a redirect. The route's
//! timeouts, retry policy and the backends' breaker settings ride along in the policy for the
//! layers after this one ([`crate::resilience`], [`crate::balance`]).
//!
//! Matching is written by hand: no crate implements the Gateway API's matching (segment-wise
//! prefixes, anchored RE2 regexes, first-value query parameters, ReplacePrefixMatch's
//! trailing-slash table), and the part that is hard elsewhere, precedence between rules and
//! routes, is done by the controller, which sends matches already in order. What is left is a
//! loop over matches that allocates nothing for exact and prefix paths, which a generic
//! router (a trie, `matchit`) would not make cheaper for the handful of rules a service has.
//! Everything but [`client`] is pure and table-tested against the Gateway API's mesh
//! conformance cases.

pub mod backend;
pub mod client;
pub mod filters;
pub mod matching;
pub mod policy;

pub use client::Policies;
pub use matching::{route, Outcome};
pub use policy::{compile, Compiled, Policy, PolicyError};

/// Builders of wire policies for the tests of every module here.
#[cfg(test)]
pub(crate) mod test_util {
    use weft_proto::destination as pb;

    /// A rule named `httproute/ns/<name>/<rule>` with one backend `<name>:80`.
    pub fn rule(name: &str) -> pb::Route {
        pb::Route {
            r#ref: Some(pb::RouteRef {
                kind: "httproute".into(),
                namespace: "ns".into(),
                name: name.into(),
                rule: "0".into(),
            }),
            backends: vec![pb::Backend {
                kind: Some(pb::backend::Kind::Target(format!("{name}:80"))),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    pub fn path(kind: pb::path_match::Kind) -> Option<pb::PathMatch> {
        Some(pb::PathMatch { kind: Some(kind) })
    }
    pub fn prefix(p: &str) -> Option<pb::PathMatch> {
        path(pb::path_match::Kind::Prefix(p.into()))
    }
    pub fn exact(p: &str) -> Option<pb::PathMatch> {
        path(pb::path_match::Kind::Exact(p.into()))
    }
    pub fn regex(p: &str) -> Option<pb::PathMatch> {
        path(pb::path_match::Kind::Regex(p.into()))
    }

    pub fn on(route: u32, path: Option<pb::PathMatch>) -> pb::RouteMatch {
        pb::RouteMatch {
            route,
            path,
            ..Default::default()
        }
    }

    pub fn header(name: &str, exact: &str) -> pb::HeaderMatch {
        pb::HeaderMatch {
            name: name.into(),
            value: Some(pb::header_match::Value::Exact(exact.into())),
        }
    }
    pub fn header_re(name: &str, re: &str) -> pb::HeaderMatch {
        pb::HeaderMatch {
            name: name.into(),
            value: Some(pb::header_match::Value::Regex(re.into())),
        }
    }
    pub fn query(name: &str, exact: &str) -> pb::QueryParamMatch {
        pb::QueryParamMatch {
            name: name.into(),
            value: Some(pb::query_param_match::Value::Exact(exact.into())),
        }
    }
    pub fn query_re(name: &str, re: &str) -> pb::QueryParamMatch {
        pb::QueryParamMatch {
            name: name.into(),
            value: Some(pb::query_param_match::Value::Regex(re.into())),
        }
    }

    /// A policy of rules named by `names` (route i is `names[i]`) and `matches`.
    pub fn policy(names: &[&str], matches: Vec<pb::RouteMatch>) -> pb::OutboundPolicy {
        pb::OutboundPolicy {
            service: Some(pb::ServiceRef {
                namespace: "ns".into(),
                name: "svc".into(),
                port: 80,
            }),
            routes: names.iter().map(|n| rule(n)).collect(),
            matches,
            source: "httproute/ns/test".into(),
            ..Default::default()
        }
    }
}
