//! `Policy.ServerPolicy`: the inbound policy of one port of the calling
//! workload, compiled by [`crate::index::inbound`]. Each stream has one
//! task ([`super::stream::watch_answers`], as ClientPolicy streams do): it
//! sends the whole `InboundServer` first, then waits for a change of the
//! pod or of its namespace's inbound objects (Servers,
//! AuthorizationPolicies, routes of Servers, the Namespace's annotation),
//! recompiles, and sends the whole policy again only when it differs.
//!
//! An unknown pod or port is answered with the namespace's default policy
//! (the pod may not be indexed yet); the stream follows the pod when it
//! appears.
//!
//! **Caller check.** A proxy may read only its own pod's policy. The seam is
//! [`check_caller`]: given the caller's verified identity (the SPIFFE ID of
//! its mTLS client certificate) and the request, it refuses with
//! `PERMISSION_DENIED` a caller whose identity is not in the requested
//! namespace, or (when the pod is indexed) not the pod's ServiceAccount.
//! The TLS layer passes the identity as a [`CallerIdentity`] request
//! extension; without one (a plaintext connection) no check is possible
//! and none is made.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_proto::policy::policy_server::Policy;
use weft_proto::policy::{InboundServer, ServerPolicyRequest};

use super::stream::{watch_answers, StreamMetrics};
use crate::index::inbound::InboundConfig;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::{names::is_dns_label, ObjectKey};

/// The verified identity of the caller: the SPIFFE ID of its mTLS client
/// certificate, put into the request's extensions by the TLS layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerIdentity(pub String);

/// The caller's verified identity, when the connection carried one.
pub fn caller_identity<T>(request: &Request<T>) -> Option<&str> {
    request
        .extensions()
        .get::<CallerIdentity>()
        .map(|c| c.0.as_str())
}

/// Whether `caller` (its verified SPIFFE ID, `None` on a plaintext
/// connection) may read the policy `req` asks for: its identity must be
/// `spiffe://<trust_domain>/ns/<req.namespace>/sa/<sa>`, and `sa` the pod's
/// ServiceAccount when the pod is indexed (`pod_service_account`).
#[allow(clippy::result_large_err)] // tonic's Status, as every handler returns
pub fn check_caller(
    caller: Option<&str>,
    req: &ServerPolicyRequest,
    pod_service_account: Option<&str>,
    trust_domain: &str,
) -> Result<(), Status> {
    let Some(caller) = caller else {
        return Ok(());
    };
    let deny = |why: &str| {
        Status::permission_denied(format!(
            "{caller} may not read the inbound policy of pod {}/{}: {why}; a proxy reads only its own pod's policy",
            req.namespace, req.pod_name
        ))
    };
    let prefix = format!("spiffe://{trust_domain}/ns/{}/sa/", req.namespace);
    let Some(sa) = caller.strip_prefix(&prefix) else {
        return Err(deny("the identity is not in that namespace"));
    };
    if sa.is_empty() || sa.contains('/') {
        return Err(deny("the identity names no ServiceAccount"));
    }
    match pod_service_account {
        Some(want) if want != sa => Err(deny(&format!("the pod runs as ServiceAccount {want}"))),
        _ => Ok(()),
    }
}

/// The `Policy` gRPC service.
#[derive(Clone, Debug)]
pub struct PolicyService {
    index: Index,
    config: InboundConfig,
    metrics: Metrics,
}

impl PolicyService {
    pub fn new(index: Index, config: InboundConfig, metrics: Metrics) -> Self {
        PolicyService {
            index,
            config,
            metrics,
        }
    }
}

#[tonic::async_trait]
impl Policy for PolicyService {
    type ServerPolicyStream = Pin<Box<dyn Stream<Item = Result<InboundServer, Status>> + Send>>;

    async fn server_policy(
        &self,
        request: Request<ServerPolicyRequest>,
    ) -> Result<Response<Self::ServerPolicyStream>, Status> {
        let caller = caller_identity(&request).map(str::to_string);
        let req = request.into_inner();
        let port = u16::try_from(req.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not a port number 1-65535", req.port))
            })?;
        if !is_dns_label(&req.namespace) || req.pod_name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "namespace {:?} and pod_name {:?} must name the proxy's pod (WEFT_PROXY_NAMESPACE, WEFT_PROXY_POD_NAME)",
                req.namespace, req.pod_name
            )));
        }
        let pod_sa = self
            .index
            .read()
            .pods
            .get(&ObjectKey::new(req.namespace.clone(), req.pod_name.clone()))
            .map(|p| p.service_account.clone());
        check_caller(
            caller.as_deref(),
            &req,
            pod_sa.as_deref(),
            &self.config.trust_domain,
        )?;
        tracing::debug!(namespace = %req.namespace, pod = %req.pod_name, port, caller = ?caller, "server policy");
        let metrics = StreamMetrics {
            open: self.metrics.server_policy_streams.clone(),
            sent: self.metrics.server_policy_updates.clone(),
        };
        let config = self.config.clone();
        let stream = watch_answers(self.index.clone(), metrics, move |index| {
            index.inbound_server(&req.namespace, &req.pod_name, port, &config)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ns: &str, pod: &str) -> ServerPolicyRequest {
        ServerPolicyRequest {
            port: 8080,
            namespace: ns.into(),
            pod_name: pod.into(),
        }
    }

    #[test]
    fn caller_check() {
        let td = "cluster.local";
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let cases: Vec<(Option<&str>, ServerPolicyRequest, Option<&str>, bool)> = vec![
            (None, req("shop", "web-0"), Some("web"), true),
            (Some(web), req("shop", "web-0"), Some("web"), true),
            // Not indexed yet: the namespace must match.
            (Some(web), req("shop", "web-0"), None, true),
            (Some(web), req("other", "web-0"), None, false),
            (Some(web), req("shop", "db-0"), Some("db"), false),
            (
                Some("spiffe://evil.org/ns/shop/sa/web"),
                req("shop", "web-0"),
                Some("web"),
                false,
            ),
            (
                Some("spiffe://cluster.local/ns/shop/sa/"),
                req("shop", "web-0"),
                None,
                false,
            ),
            (
                Some("spiffe://cluster.local/ns/shop/sa/web/x"),
                req("shop", "web-0"),
                None,
                false,
            ),
            (
                Some("spiffe://cluster.local/ns/shopping/sa/web"),
                req("shop", "web-0"),
                None,
                false,
            ),
        ];
        for (caller, r, sa, ok) in cases {
            let got = check_caller(caller, &r, sa, td);
            assert_eq!(got.is_ok(), ok, "{caller:?} {r:?} {sa:?}: {got:?}");
            if let Err(s) = got {
                assert_eq!(s.code(), tonic::Code::PermissionDenied);
                assert!(s.message().contains(&r.pod_name), "{}", s.message());
            }
        }
    }

    #[test]
    fn identity_comes_from_the_extension() {
        let mut r = Request::new(req("shop", "web-0"));
        assert_eq!(caller_identity(&r), None);
        r.extensions_mut().insert(CallerIdentity(
            "spiffe://cluster.local/ns/shop/sa/web".into(),
        ));
        assert_eq!(
            caller_identity(&r),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
    }
}
