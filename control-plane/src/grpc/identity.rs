//! `Identity.Certify`: checks the request ([`decide::check_request`]),
//! verifies the token (the [`TokenVerifier`] seam), matches the token's
//! ServiceAccount to the identity ([`decide::authorize`]), applies the
//! issuance limits (the pod's own bucket, then the controller-wide ceiling:
//! [`IssuanceLimits`]), and has the [`CertificateAuthority`] sign a leaf.
//! Every outcome is counted in `weft_controller_identity_certify_total` by
//! a bounded `result` label (a rate-limit refusal also in
//! `weft_controller_identity_certify_rate_limited_total{limit="pod|controller"}`)
//! and logged with the identity and pod.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tonic::{Request, Response, Status};
use weft_proto::identity::identity_server::Identity;
use weft_proto::identity::{CertifyRequest, CertifyResponse};

use crate::identity::ca::{CertificateAuthority, LeafRequest};
use crate::identity::decide::{self, Refusal, RefusalKind};
use crate::identity::rate::{self, CeilingConfig, IssuanceLimits, Limited, RateConfig};
use crate::identity::token::{Authenticated, TokenVerifier};
use crate::metrics::{LimitLabels, Metrics, ResultLabels};

/// What the service signs with and how it checks callers.
pub struct IdentityParts {
    pub trust_domain: String,
    pub ca: Arc<dyn CertificateAuthority>,
    pub tokens: Arc<dyn TokenVerifier>,
    pub cert_lifetime: Duration,
    /// The per-pod bucket.
    pub rate: RateConfig,
    /// The controller-wide ceiling.
    pub ceiling: CeilingConfig,
    /// Identities the controller's own TLS certificates hold
    /// ([`crate::grpc::tls::server_identity`]): never issued to a workload, so no pod
    /// (say one running as ServiceAccount `destination` in the controller's namespace)
    /// can pose as the control plane.
    pub reserved: Vec<String>,
}

struct Inner {
    trust_domain: String,
    ca: Arc<dyn CertificateAuthority>,
    tokens: Arc<dyn TokenVerifier>,
    cert_lifetime: Duration,
    rate: RateConfig,
    ceiling: CeilingConfig,
    limits: IssuanceLimits,
    reserved: Vec<String>,
}

/// The `Identity` gRPC service.
#[derive(Clone)]
pub struct IdentityService {
    inner: Option<Arc<Inner>>,
    metrics: Metrics,
}

impl std::fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityService")
            .field("configured", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl IdentityService {
    pub fn new(parts: IdentityParts, metrics: Metrics) -> Self {
        IdentityService {
            inner: Some(Arc::new(Inner {
                trust_domain: parts.trust_domain,
                ca: parts.ca,
                tokens: parts.tokens,
                cert_lifetime: parts.cert_lifetime,
                rate: parts.rate,
                ceiling: parts.ceiling,
                limits: IssuanceLimits::new(parts.rate, parts.ceiling),
                reserved: parts.reserved,
            })),
            metrics,
        }
    }

    /// No issuer configured: every call answers UNIMPLEMENTED, saying how
    /// to configure one.
    pub fn disabled(metrics: Metrics) -> Self {
        IdentityService {
            inner: None,
            metrics,
        }
    }

    async fn decide(
        &self,
        req: &CertifyRequest,
        pod: &mut Option<String>,
    ) -> Result<CertifyResponse, Refusal> {
        let Some(inner) = &self.inner else {
            return Err(Refusal::new(
                RefusalKind::NotConfigured,
                "this weft-controller issues no certificates: start it with --issuer-cert, --issuer-key and --trust-anchors (or --dev-ca DIR in local mode)",
            ));
        };
        let checked = decide::check_request(
            &inner.trust_domain,
            &req.identity,
            &req.certificate_signing_request,
        )?;
        // Before the token: a refusal that costs no TokenReview.
        let id = checked.identity.to_string();
        if inner.reserved.contains(&id) {
            return Err(Refusal::new(
                RefusalKind::PermissionDenied,
                format!(
                    "{id} is the controller's own TLS identity and is never issued to a workload"
                ),
            ));
        }
        let who = inner.tokens.verify(&req.token).await?;
        *pod = who.pod.as_ref().map(|p| p.to_string());
        decide::authorize(&checked.identity, &who.service_account)?;
        let key = rate::rate_key(&who, &req.token);
        if let Err(limited) = inner.limits.admit(&key, Instant::now()) {
            self.metrics
                .identity_certify_rate_limited
                .get_or_create(&LimitLabels {
                    limit: limited.label(),
                })
                .inc();
            return Err(inner.rate_limited(&checked.identity, &who, limited));
        }
        let issued = inner
            .ca
            .issue(&LeafRequest {
                identity: &checked.identity,
                spki_der: &checked.spki_der,
                lifetime: inner.cert_lifetime,
                now: SystemTime::now(),
            })
            .map_err(|e| Refusal::new(RefusalKind::Internal, e.to_string()))?;
        Ok(CertifyResponse {
            leaf_certificate: issued.leaf_der,
            intermediate_certificates: issued.intermediates_der,
            valid_until: Some(weft_proto::prost_types::Timestamp::from(issued.not_after)),
        })
    }
}

impl Inner {
    /// The refusal of a rate-limited call: which limit, for whom, how long
    /// to wait, and the flags that set it.
    fn rate_limited(
        &self,
        identity: &crate::identity::SpiffeId,
        who: &Authenticated,
        limited: Limited,
    ) -> Refusal {
        let wait = retry_in(limited.wait());
        let message = match limited {
            Limited::Pod(_) => {
                let whom = match &who.pod {
                    Some(pod) => format!("pod {}/{pod}", who.service_account.namespace),
                    None => "this token (bound to no pod)".to_string(),
                };
                format!(
                    "per-pod rate limit: too many certificates for {whom} of {identity}; retry in {wait} (--certify-burst {} then one per --certify-refill {:?}; a pod asking this often is likely crash-looping)",
                    self.rate.burst, self.rate.refill
                )
            }
            Limited::Controller(_) => format!(
                "controller rate limit: this controller is issuing at its ceiling (--certify-max-burst {} then --certify-max-rate {}/s over all pods); retry in {wait}",
                self.ceiling.burst, self.ceiling.rate
            ),
        };
        Refusal::new(RefusalKind::RateLimited, message)
    }
}

/// `9.8 s`, or `2 ms` below a second (rounded up, so never "0").
fn retry_in(wait: Duration) -> String {
    if wait >= Duration::from_secs(1) {
        format!("{:.1} s", wait.as_secs_f64())
    } else {
        format!("{} ms", (wait.as_secs_f64() * 1000.0).ceil().max(1.0))
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let mut pod = None;
        let result = self.decide(&req, &mut pod).await;
        let pod = pod.as_deref().unwrap_or("-");
        let label = match &result {
            Ok(_) => "ok",
            Err(r) => r.kind.label(),
        };
        self.metrics
            .identity_certify
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(rsp) => {
                tracing::info!(identity = %req.identity, pod, ?peer, "issued certificate");
                Ok(Response::new(rsp))
            }
            Err(refusal) => {
                match refusal.kind {
                    RefusalKind::Internal | RefusalKind::Unavailable => {
                        tracing::warn!(identity = %req.identity, pod, ?peer, result = label, "{refusal}")
                    }
                    _ => {
                        tracing::info!(identity = %req.identity, pod, ?peer, result = label, "refused: {refusal}")
                    }
                }
                Err(refusal.to_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_in_never_says_zero() {
        assert_eq!(retry_in(Duration::from_secs_f64(9.84)), "9.8 s");
        assert_eq!(retry_in(Duration::from_secs(100)), "100.0 s");
        assert_eq!(retry_in(Duration::from_micros(1500)), "2 ms");
        assert_eq!(retry_in(Duration::ZERO), "1 ms");
    }
}
