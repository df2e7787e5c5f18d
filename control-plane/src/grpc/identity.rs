//! `Identity.Certify`: checks the request ([`decide::check_request`]),
//! verifies the token (the [`TokenVerifier`] seam), matches the token's
//! ServiceAccount to the identity ([`decide::authorize`]), applies the
//! per-identity rate limit, and has the [`CertificateAuthority`] sign a
//! leaf. Every outcome is counted in `weft_controller_identity_certify_total`
//! by a bounded `result` label and logged with the identity.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tonic::{Request, Response, Status};
use weft_proto::identity::identity_server::Identity;
use weft_proto::identity::{CertifyRequest, CertifyResponse};

use crate::identity::ca::{CertificateAuthority, LeafRequest};
use crate::identity::decide::{self, Refusal, RefusalKind};
use crate::identity::rate::{RateConfig, RateLimiter};
use crate::identity::token::TokenVerifier;
use crate::metrics::{Metrics, ResultLabels};

/// What the service signs with and how it checks callers.
pub struct IdentityParts {
    pub trust_domain: String,
    pub ca: Arc<dyn CertificateAuthority>,
    pub tokens: Arc<dyn TokenVerifier>,
    pub cert_lifetime: Duration,
    pub rate: RateConfig,
}

struct Inner {
    trust_domain: String,
    ca: Arc<dyn CertificateAuthority>,
    tokens: Arc<dyn TokenVerifier>,
    cert_lifetime: Duration,
    limiter: RateLimiter,
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
                limiter: RateLimiter::new(parts.rate),
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

    async fn decide(&self, req: &CertifyRequest) -> Result<CertifyResponse, Refusal> {
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
        let who = inner.tokens.verify(&req.token).await?;
        decide::authorize(&checked.identity, &who)?;
        let key = checked.identity.to_string();
        if let Err(wait) = inner.limiter.try_acquire(&key, Instant::now()) {
            return Err(Refusal::new(
                RefusalKind::RateLimited,
                format!(
                    "too many certificates for {key}; retry in {:.1} s",
                    wait.as_secs_f64()
                ),
            ));
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

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        req: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let result = self.decide(&req).await;
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
                tracing::info!(identity = %req.identity, ?peer, "issued certificate");
                Ok(Response::new(rsp))
            }
            Err(refusal) => {
                match refusal.kind {
                    RefusalKind::Internal | RefusalKind::Unavailable => {
                        tracing::warn!(identity = %req.identity, ?peer, result = label, "{refusal}")
                    }
                    _ => {
                        tracing::info!(identity = %req.identity, ?peer, result = label, "refused: {refusal}")
                    }
                }
                Err(refusal.to_status())
            }
        }
    }
}
