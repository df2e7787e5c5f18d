//! Inbound authorization (`policy.weft.dev/v1alpha1`): the `Server` and
//! `AuthorizationPolicy` CRDs, the checked model the index holds, and the
//! default inbound policy of a cluster, namespace or pod.
//!
//! - A **Server** selects pods (`spec.podSelector`, this module's own
//!   selector shape checked by [`crate::labels`]) and one port of each
//!   (`spec.port`: a number, or the name of a container port resolved per
//!   pod as a Service's `targetPort` is), declares the port's protocol
//!   (`spec.proxyProtocol`: `unknown` (detect, the default), `HTTP/1`,
//!   `HTTP/2`, `gRPC`, `opaque`) and what applies to a request no
//!   AuthorizationPolicy allows (`spec.accessPolicy`, default `deny`; any
//!   [`DefaultPolicy`]: `audit` decides as `deny` and allows anyway).
//! - An **AuthorizationPolicy** allows clients to what `spec.targetRef`
//!   names in the policy's namespace: a `Server` (group `policy.weft.dev`),
//!   an `HTTPRoute` or `GRPCRoute` (group `gateway.networking.k8s.io`)
//!   whose parentRef is a Server (only requests matching that route), or
//!   the `Namespace` itself (group `""`, its name; every Server in it).
//!   Who: mesh clients by `identities` (exact SPIFFE IDs),
//!   `serviceAccounts` (`{name, namespace}`, namespace default the
//!   policy's), `namespaces` (every identity of those namespaces) and
//!   `authenticated: true` (any mesh identity), any of which allows; or
//!   `unauthenticated: true` (anyone, meshed or not). `networks`
//!   (`[{cidr, except}]`) narrows either to client addresses. One policy
//!   becomes one `weft.policy.Authorization` named
//!   `authorizationpolicy/<ns>/<name>`.
//!
//! The CRDs are generated from these types ([`crate::crd_files`]) and
//! committed under `charts/weft/crds/`. [`crate::convert::server`] and
//! [`crate::convert::authorization_policy`] check every field: an object
//! that cannot be used is an error naming the field and the value, and the
//! sources leave it out (the API server's schema refuses most such objects
//! already; the directory source has no API server).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube_derive::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::labels::Selector;
use crate::netpol::Cidr;
use crate::{Kind, Meta, ObjectKey, Pod, TargetPort};

/// Pod or namespace annotation naming the default inbound policy of the
/// pod's ports that no Server selects (the pod's wins over its namespace's,
/// which wins over the controller's `--default-inbound-policy`).
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "config.weft.dev/default-inbound-policy";

/// The controller's `--cluster-networks` default: the RFC 1918 ranges and
/// the IPv6 unique local range fd00::/8 (Linkerd's clusterNetworks without
/// 100.64.0.0/10).
pub const DEFAULT_CLUSTER_NETWORKS: &str = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fd00::/8";

/// What applies to a request nothing else allows: the default inbound
/// policy of ports no Server selects, and a Server's `accessPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefaultPolicy {
    /// Anyone, meshed or not.
    #[default]
    AllUnauthenticated,
    /// Any client with a verified mesh identity.
    AllAuthenticated,
    /// Anyone from the cluster networks.
    ClusterUnauthenticated,
    /// Mesh clients from the cluster networks.
    ClusterAuthenticated,
    /// No one.
    Deny,
    /// Decide as `deny`, allow anyway (counted and logged as denied).
    Audit,
}

impl DefaultPolicy {
    pub const ALL: [DefaultPolicy; 6] = [
        DefaultPolicy::AllUnauthenticated,
        DefaultPolicy::AllAuthenticated,
        DefaultPolicy::ClusterUnauthenticated,
        DefaultPolicy::ClusterAuthenticated,
        DefaultPolicy::Deny,
        DefaultPolicy::Audit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterUnauthenticated => "cluster-unauthenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::Audit => "audit",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A default inbound policy that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an inbound policy; expected all-unauthenticated, all-authenticated, cluster-unauthenticated, cluster-authenticated, deny or audit")]
pub struct DefaultPolicyError(pub String);

impl FromStr for DefaultPolicy {
    type Err = DefaultPolicyError;
    fn from_str(s: &str) -> Result<Self, DefaultPolicyError> {
        DefaultPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s.trim())
            .ok_or_else(|| DefaultPolicyError(s.to_string()))
    }
}

/// A Server's `spec.proxyProtocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// `unknown`: the proxy detects HTTP, else opaque TCP.
    #[default]
    Detect,
    Http1,
    Http2,
    Grpc,
    Opaque,
}

impl ProxyProtocol {
    pub const ALL: [ProxyProtocol; 5] = [
        ProxyProtocol::Detect,
        ProxyProtocol::Http1,
        ProxyProtocol::Http2,
        ProxyProtocol::Grpc,
        ProxyProtocol::Opaque,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Detect => "unknown",
            ProxyProtocol::Http1 => "HTTP/1",
            ProxyProtocol::Http2 => "HTTP/2",
            ProxyProtocol::Grpc => "gRPC",
            ProxyProtocol::Opaque => "opaque",
        }
    }
}

impl FromStr for ProxyProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ProxyProtocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| "expected unknown, HTTP/1, HTTP/2, gRPC or opaque".to_string())
    }
}

/// Parses a comma-separated list of CIDRs (`--cluster-networks`).
pub fn parse_networks(list: &str) -> Result<Vec<Cidr>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Cidr>()
                .map_err(|e| format!("{s:?} in {list:?} is not a network: {e}"))
        })
        .collect()
}

/// The default cluster networks ([`DEFAULT_CLUSTER_NETWORKS`]).
pub fn default_cluster_networks() -> Vec<Cidr> {
    parse_networks(DEFAULT_CLUSTER_NETWORKS).unwrap_or_default()
}

fn int_or_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A port number, or the name of a container port of the selected pods (resolved per pod).",
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}]
    })
}

/// `Server.spec`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(kube_core = ::kube_core),
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "Server",
    plural = "servers",
    shortname = "srv",
    doc = "A port of the selected pods: its protocol, and what applies to requests no AuthorizationPolicy allows.",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Port","type":"string","jsonPath":".spec.port"}"#,
    printcolumn = r#"{"name":"Protocol","type":"string","jsonPath":".spec.proxyProtocol"}"#,
    printcolumn = r#"{"name":"Access","type":"string","jsonPath":".spec.accessPolicy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// The pods of this namespace the Server applies to (`{}`: every pod).
    pub pod_selector: PodSelector,
    /// A port number, or the name of a container port of the selected pods.
    #[schemars(schema_with = "int_or_string")]
    pub port: IntOrString,
    /// `unknown` (detect HTTP, else opaque; the default), `HTTP/1`, `HTTP/2`, `gRPC` or `opaque`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque"]))]
    pub proxy_protocol: Option<String>,
    /// What applies to requests no AuthorizationPolicy allows: `deny` (the default), `audit`
    /// (decide as deny, allow anyway), `all-unauthenticated`, `all-authenticated`,
    /// `cluster-unauthenticated` or `cluster-authenticated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["deny", "audit", "all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated"]))]
    pub access_policy: Option<String>,
}

/// A label selector (`metav1.LabelSelector`'s shape).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorRequirement {
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl PodSelector {
    /// The selector, checked by the one implementation in [`crate::labels`].
    pub fn selector(&self) -> Result<Selector, crate::labels::SelectorError> {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            LabelSelector, LabelSelectorRequirement,
        };
        Selector::from_api(&LabelSelector {
            match_labels: Some(self.match_labels.clone()),
            match_expressions: Some(
                self.match_expressions
                    .iter()
                    .map(|e| LabelSelectorRequirement {
                        key: e.key.clone(),
                        operator: e.operator.clone(),
                        values: Some(e.values.clone()),
                    })
                    .collect(),
            ),
        })
    }
}

/// `AuthorizationPolicy.spec`: who may reach the target. At least one of
/// `identities`, `serviceAccounts`, `namespaces`, `authenticated` (mesh
/// clients, any of which allows) or `unauthenticated` (anyone; not
/// together with the mesh fields); `networks` narrows to client addresses.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    crates(kube_core = ::kube_core),
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "authz",
    doc = "Allows clients (mesh identities, ServiceAccounts, namespaces, any authenticated client, or anyone from some networks) to a Server, a route of a Server, or every Server of the namespace.",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.kind"}"#,
    printcolumn = r#"{"name":"Name","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// What the policy allows access to, in the policy's namespace.
    pub target_ref: AuthorizationTargetRef,
    /// Exact client identities (SPIFFE IDs, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Client ServiceAccounts (namespace default: the policy's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Namespaces whose every mesh identity is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Any client with a verified mesh identity.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub authenticated: bool,
    /// Any client, meshed or not (usually with `networks`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
    /// Client networks allowed (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationTargetRef {
    /// `policy.weft.dev` (Server), `gateway.networking.k8s.io` (HTTPRoute, GRPCRoute) or `""`
    /// (Namespace).
    #[serde(default)]
    pub group: String,
    /// `Server`, `HTTPRoute`, `GRPCRoute` or `Namespace` (the policy's own).
    #[schemars(regex(pattern = r"^(Server|HTTPRoute|GRPCRoute|Namespace)$"))]
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    pub name: String,
    /// Default: the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// A network in CIDR form, like 10.0.0.0/8 or fd00::/8.
    pub cidr: String,
    /// Networks inside `cidr` that are not allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// A Server as the index holds it: checked and parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedServer {
    pub meta: Meta,
    pub selector: Selector,
    pub port: TargetPort,
    pub protocol: ProxyProtocol,
    pub access_policy: DefaultPolicy,
}

impl IndexedServer {
    /// Whether this Server selects `port` of `pod` (same namespace, labels
    /// match, the port number or the pod's container port of that name).
    pub fn selects(&self, pod: &Pod, port: u16) -> bool {
        pod.key.namespace == self.meta.key.namespace
            && self.selector.matches(&pod.labels)
            && crate::ports::resolve_target_port(&self.port, Some(pod)) == Some(port)
    }
}

/// What an AuthorizationPolicy applies to (always in its own namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthorizationTarget {
    Server(String),
    /// An HTTPRoute or GRPCRoute (kind) by name.
    Route(Kind, String),
    /// Every Server of the policy's namespace.
    Namespace,
}

/// Who an AuthorizationPolicy allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clients {
    Unauthenticated,
    Mesh {
        identities: Vec<String>,
        service_accounts: Vec<ObjectKey>,
        namespaces: Vec<String>,
        any: bool,
    },
}

/// A client network with its exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNetwork {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

/// An AuthorizationPolicy as the index holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedAuthorization {
    pub meta: Meta,
    pub target: AuthorizationTarget,
    pub clients: Clients,
    pub networks: Vec<ClientNetwork>,
}

/// Whether `name` can be a container port name (IANA_SVC_NAME: 1-15 of
/// `a-z0-9-`, at least one letter, no leading, trailing or double `-`).
pub fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn crd_yaml_of<K: kube_core::CustomResourceExt>() -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(&K::crd())?;
    Ok(format!(
        "# Generated from model/src/authz.rs; do not edit.\n\
         # Regenerate: WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds\n\
         {body}"
    ))
}

/// The Server CRD as YAML, exactly as committed under `charts/weft/crds/`.
pub fn server_crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    crd_yaml_of::<Server>()
}

/// The AuthorizationPolicy CRD as YAML, exactly as committed under
/// `charts/weft/crds/`.
pub fn authorization_policy_crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    crd_yaml_of::<AuthorizationPolicy>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policies_round_trip() {
        for p in DefaultPolicy::ALL {
            assert_eq!(p.as_str().parse::<DefaultPolicy>(), Ok(p));
        }
        let e = "denied".parse::<DefaultPolicy>().expect_err("bad");
        assert!(e.to_string().contains("\"denied\""), "{e}");
        assert_eq!(DefaultPolicy::default(), DefaultPolicy::AllUnauthenticated);
    }

    #[test]
    fn protocols_parse() {
        assert_eq!("HTTP/1".parse(), Ok(ProxyProtocol::Http1));
        assert_eq!("grpc".parse(), Ok(ProxyProtocol::Grpc));
        assert_eq!("unknown".parse(), Ok(ProxyProtocol::Detect));
        assert!("http".parse::<ProxyProtocol>().is_err());
    }

    #[test]
    fn cluster_networks_parse() {
        let nets = default_cluster_networks();
        assert_eq!(nets.len(), 4);
        assert_eq!(nets[3].to_string(), "fd00::/8");
        let e = parse_networks("10.0.0.0/8,nope").expect_err("bad");
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn port_names() {
        for ok in ["http", "http-alt", "h2c", "a1"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-http",
            "http-",
            "a--b",
            "HTTP",
            "1234",
            "averyveryverylongname",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }

    #[test]
    fn crds_are_structural_and_name_the_group() {
        for (yaml, name) in [
            (server_crd_yaml().expect("yaml"), "servers.policy.weft.dev"),
            (
                authorization_policy_crd_yaml().expect("yaml"),
                "authorizationpolicies.policy.weft.dev",
            ),
        ] {
            assert!(yaml.contains(&format!("name: {name}")), "{yaml}");
            assert!(!yaml.contains("$ref"), "schemas must be inlined: {yaml}");
        }
        let server = server_crd_yaml().expect("yaml");
        assert!(
            server.contains("x-kubernetes-int-or-string: true"),
            "{server}"
        );
    }
}
