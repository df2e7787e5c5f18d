//! The workload identity client: obtains and renews this proxy's certificate from the
//! controller's `Identity.Certify`.
//!
//! The identity service is reached over TLS and must present the controller's identity-service
//! certificate (`identity.<controller-ns>.serviceaccount.identity.<trust-domain>`, chaining to
//! the trust anchors) before the token is sent ([`crate::transport::control`]); an `http://`
//! address is the development-only plaintext opt-out.
//!
//! The private key (ECDSA P-256) is generated in memory at start and never leaves the process;
//! only its CSR, naming exactly the SPIFFE ID, is sent. The token file is re-read on every
//! attempt because the kubelet rotates projected tokens. A returned chain is used only after it
//! verifies against `WEFT_PROXY_TRUST_ANCHORS` for the expected identity and key
//! ([`verify::check_chain`]).
//!
//! The current state is published in a [`watch`] channel ([`CertState`]): the TLS stacks read
//! the [`CertifiedKey`] from it, `/ready` reads why it is not ready. Renewal happens at 70 % of
//! the validity left when the certificate arrived; failures retry with jittered exponential
//! backoff (1 s to 60 s) while the held certificate keeps serving; once it expires the state
//! turns [`CertState::Expired`] and the proxy fails closed until a renewal succeeds.
//!
//! The trust-anchor file is re-read every [`ANCHORS_POLL`]; a changed bundle that parses
//! replaces the anchors in a second watch, which the TLS configs are rebuilt from (so a root
//! can be added before the issuer is rotated and removed after). A bundle that does not parse
//! is reported and counted, and the previous anchors stay in use.

pub mod timing;
pub mod verify;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_proto::identity::identity_client::IdentityClient;
use weft_proto::identity::CertifyRequest;

use crate::config::{env, IdentityConfig};
use crate::discovery::Backoff;
use crate::metrics::IdentityMetrics;
use crate::transport::control;
pub use verify::{AnchorsError, ChainError, TrustAnchors};

/// How long one `Certify` call may take before it counts as failed.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the trust-anchor file is checked for changes.
pub const ANCHORS_POLL: Duration = Duration::from_secs(1);

/// Errors of the identity client. Startup errors stop the proxy; the others are reported by
/// `/ready` and retried.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Anchors(#[from] AnchorsError),
    #[error("{var}={path}: cannot read the token: {source}", var = env::IDENTITY_TOKEN_FILE, path = .path.display())]
    Token {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the private key or CSR for {id}: {reason}")]
    Key { id: String, reason: String },
    #[error("{var}={addr:?} is not a usable gRPC address: {reason}", var = env::IDENTITY_ADDR)]
    Endpoint { addr: String, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{} ({code:?}): {message}", if *.code == tonic::Code::Unavailable { "unreachable or unavailable" } else { "refused" })]
    Refused { code: tonic::Code, message: String },
    #[error("returned a certificate the proxy does not accept: {0}")]
    Chain(#[from] ChainError),
}

/// A certificate this proxy holds: verified, with the in-memory key, ready for rustls.
#[derive(Clone, Debug)]
pub struct Certificate {
    /// Leaf first, then intermediates; and the signing key.
    pub key: Arc<CertifiedKey>,
    pub id: Arc<str>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What the identity client holds right now.
#[derive(Clone, Debug)]
pub enum CertState {
    /// No certificate yet; `reason` says what the last attempt ran into.
    Pending { reason: Arc<str> },
    /// A verified certificate (check [`CertState::valid_at`]: it may expire before the client
    /// notices).
    Ready(Arc<Certificate>),
    /// The certificate expired and renewal has not succeeded: fail closed.
    Expired { at: SystemTime, reason: Arc<str> },
}

impl CertState {
    /// The certificate, if one is held and valid at `now`.
    pub fn valid_at(&self, now: SystemTime) -> Option<&Arc<Certificate>> {
        match self {
            CertState::Ready(c) if now < c.not_after => Some(c),
            _ => None,
        }
    }

    /// `Ok` when a valid certificate is held; otherwise why not, for `/ready`.
    pub fn readiness(&self, now: SystemTime) -> Result<(), String> {
        match self {
            CertState::Ready(c) if now < c.not_after => Ok(()),
            CertState::Ready(c) => Err(format!("certificate expired at {}", rfc3339(c.not_after))),
            CertState::Pending { reason } => Err(format!("no certificate yet: {reason}")),
            CertState::Expired { at, reason } => Err(format!(
                "certificate expired at {}; renewal failing: {reason}",
                rfc3339(*at)
            )),
        }
    }
}

/// `2026-11-24T21:14:24Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// The identity client, built before any port is bound (it reads the trust anchors and
/// creates the key), run by [`Client::run`].
pub struct Client {
    config: IdentityConfig,
    anchors: watch::Sender<Arc<TrustAnchors>>,
    signing_key: Arc<dyn SigningKey>,
    spki: Vec<u8>,
    csr: Vec<u8>,
    grpc: IdentityClient<Channel>,
    metrics: IdentityMetrics,
    tx: watch::Sender<CertState>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("identity::Client")
            .field("id", &self.config.id)
            .field("addr", &self.config.addr)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Checks the trust anchors and token file, creates the key and CSR, and prepares a lazily
    /// connected channel. Must run inside a tokio runtime.
    pub fn new(config: IdentityConfig, metrics: IdentityMetrics) -> Result<Self, IdentityError> {
        let anchors = TrustAnchors::load(&config.trust_anchors)?;
        std::fs::File::open(&config.token_file).map_err(|source| IdentityError::Token {
            path: config.token_file.clone(),
            source,
        })?;
        let key_err = |reason: String| IdentityError::Key {
            id: config.id.clone(),
            reason,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| key_err(e.to_string()))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = config
            .id
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| key_err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| key_err(e.to_string()))?
            .der()
            .to_vec();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&pkcs8)
            .map_err(|e| key_err(e.to_string()))?;
        let endpoint_err = |reason: String| IdentityError::Endpoint {
            addr: config.addr.clone(),
            reason,
        };
        let anchors = watch::Sender::new(Arc::new(anchors));
        // TLS to the identity service, verified against the anchors before the token is
        // sent (see `transport::control`); plaintext only for an `http://` address.
        let tls = if config.plaintext {
            tracing::warn!(addr = %config.addr, "identity service over plaintext (http:// address): the token crosses the network in the clear; development only");
            None
        } else {
            let expected = control::controller_identity(
                control::trust_domain(&config.id),
                &config.controller_namespace,
                control::Service::Identity,
            );
            Some(
                control::ControllerTls::new(expected, anchors.subscribe(), None)
                    .map_err(|e| endpoint_err(e.to_string()))?,
            )
        };
        let channel = control::channel(&config.addr, tls, |e| {
            e.connect_timeout(Duration::from_secs(1))
        })
        .map_err(|e| endpoint_err(e.to_string()))?;
        let (tx, _) = watch::channel(CertState::Pending {
            reason: format!(
                "identity service at {}: first request not answered yet",
                config.addr
            )
            .into(),
        });
        metrics.ready.set(0);
        metrics.anchors.set(anchors.borrow().len() as i64);
        Ok(Self {
            anchors,
            signing_key,
            spki,
            csr,
            grpc: IdentityClient::new(channel),
            metrics,
            tx,
            config,
        })
    }

    /// The state channel (TLS configs and `/ready` read it).
    pub fn subscribe(&self) -> watch::Receiver<CertState> {
        self.tx.subscribe()
    }

    /// The trust anchors, updated when the file changes.
    pub fn trust_anchors(&self) -> watch::Receiver<Arc<TrustAnchors>> {
        self.anchors.subscribe()
    }

    /// Obtains and renews the certificate, and reloads the trust anchors, forever (abort the
    /// task to stop).
    pub async fn run(self) {
        let reload = reload_anchors(
            self.config.trust_anchors.clone(),
            self.anchors.clone(),
            self.metrics.clone(),
        );
        tokio::join!(reload, self.renew());
    }

    async fn renew(mut self) {
        let mut backoff = Backoff::new(timing::BACKOFF_MIN, timing::BACKOFF_MAX);
        let mut held: Option<Arc<Certificate>> = None;
        loop {
            match self.certify().await {
                Ok(cert) => {
                    let cert = Arc::new(cert);
                    self.metrics.ok();
                    self.metrics.expiry.set(unix_secs(cert.not_after));
                    self.metrics.ready.set(1);
                    tracing::info!(id = %cert.id, expires = %rfc3339(cert.not_after), "certificate obtained");
                    self.tx.send_replace(CertState::Ready(cert.clone()));
                    backoff.reset();
                    let delay = timing::renew_delay(SystemTime::now(), cert.not_after);
                    held = Some(cert);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    self.metrics.error();
                    let reason: Arc<str> =
                        format!("identity service at {}: {e}", self.config.addr).into();
                    let now = SystemTime::now();
                    match &held {
                        None => {
                            tracing::warn!(id = %self.config.id, "{reason}");
                            self.tx.send_replace(CertState::Pending { reason });
                        }
                        Some(c) if now >= c.not_after => {
                            tracing::error!(id = %self.config.id, "certificate expired and renewal failed: {reason}");
                            self.metrics.ready.set(0);
                            self.tx.send_replace(CertState::Expired {
                                at: c.not_after,
                                reason,
                            });
                        }
                        Some(c) => {
                            tracing::warn!(id = %self.config.id, expires = %rfc3339(c.not_after), "renewal failed, keeping the current certificate: {reason}");
                        }
                    }
                    let delay = timing::retry_delay(
                        now,
                        backoff.next_delay(fastrand::f64()),
                        held.as_ref().map(|c| c.not_after),
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One attempt: read the token, call Certify, verify the chain.
    async fn certify(&mut self) -> Result<Certificate, IdentityError> {
        // A few hundred bytes from a tmpfs volume, once per renewal: not worth a blocking pool.
        let token =
            std::fs::read(&self.config.token_file).map_err(|source| IdentityError::Token {
                path: self.config.token_file.clone(),
                source,
            })?;
        let req = CertifyRequest {
            identity: self.config.id.clone(),
            token,
            certificate_signing_request: self.csr.clone(),
        };
        let resp = tokio::time::timeout(CERTIFY_TIMEOUT, self.grpc.certify(req))
            .await
            .map_err(|_| IdentityError::Timeout(CERTIFY_TIMEOUT))?
            .map_err(|s| IdentityError::Refused {
                code: s.code(),
                message: control::status_reason(&s),
            })?
            .into_inner();
        let anchors = self.anchors.borrow().clone();
        let validity = verify::check_chain(
            &resp.leaf_certificate,
            &resp.intermediate_certificates,
            &anchors,
            &self.config.id,
            &self.spki,
            SystemTime::now(),
        )?;
        let chain: Vec<CertificateDer<'static>> = std::iter::once(resp.leaf_certificate)
            .chain(resp.intermediate_certificates)
            .map(CertificateDer::from)
            .collect();
        Ok(Certificate {
            key: Arc::new(CertifiedKey::new(chain, self.signing_key.clone())),
            id: self.config.id.as_str().into(),
            not_before: validity.not_before,
            not_after: validity.not_after,
        })
    }
}

/// Re-reads the trust-anchor bundle every [`ANCHORS_POLL`] and publishes it when its bytes
/// changed and it parses; a bad bundle is logged and counted, and the old anchors stay.
async fn reload_anchors(
    path: std::path::PathBuf,
    tx: watch::Sender<Arc<TrustAnchors>>,
    metrics: IdentityMetrics,
) {
    let mut last = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(ANCHORS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pem = match std::fs::read(&path) {
            Ok(pem) => pem,
            Err(e) => {
                // Mid-rename, or the volume is being updated: try again on the next tick.
                tracing::debug!(path = %path.display(), error = %e, "cannot read the trust anchors; keeping the current ones");
                continue;
            }
        };
        if last.as_deref() == Some(&pem[..]) {
            continue;
        }
        match TrustAnchors::from_pem(&path, &pem) {
            Ok(anchors) => {
                tracing::info!(path = %path.display(), anchors = anchors.len(), "trust anchors reloaded");
                metrics.anchors.set(anchors.len() as i64);
                metrics.anchors_reloaded("ok");
                tx.send_replace(Arc::new(anchors));
            }
            Err(e) => {
                tracing::error!("trust anchors not reloaded, keeping the previous ones: {e}");
                metrics.anchors_reloaded("error");
            }
        }
        last = Some(pem);
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_explains_itself() {
        let t = UNIX_EPOCH + Duration::from_secs(1_764_020_064);
        assert_eq!(rfc3339(t), "2025-11-24T21:34:24Z");
        let pending = CertState::Pending {
            reason: "identity service at ctl:8080: refused (PermissionDenied): nope".into(),
        };
        assert_eq!(
            pending.readiness(t).unwrap_err(),
            "no certificate yet: identity service at ctl:8080: refused (PermissionDenied): nope"
        );
        let expired = CertState::Expired {
            at: t,
            reason: "x".into(),
        };
        assert!(expired
            .readiness(t)
            .unwrap_err()
            .starts_with("certificate expired at 2025-11-24T21:34:24Z"));
        assert!(expired.valid_at(t).is_none());
    }
}
