//! How a workload proves its ServiceAccount (and, when its token is bound
//! to one, its pod): the [`TokenVerifier`] seam and its two implementations.
//!
//! - **kube mode**, [`TokenReviewVerifier`]: the token is a Kubernetes
//!   ServiceAccount token (a projected token with audience
//!   [`TOKEN_AUDIENCE`]); the controller asks the API server with a
//!   TokenReview (`spec.audiences: [identity.weft.dev]`) and accepts it
//!   only when `status.authenticated`, `status.audiences` contains the
//!   audience and `status.user.username` is `system:serviceaccount:<ns>:<sa>`
//!   ([`review_decision`], pure). A projected token names the pod the
//!   kubelet minted it for: `status.user.extra` carries
//!   [`EXTRA_POD_NAME`] and [`EXTRA_POD_UID`], which become the
//!   [`PodBinding`]. Needs RBAC `create` on
//!   `authentication.k8s.io/tokenreviews`.
//! - **local mode**, [`LocalTokens`]: the controller signs its own tokens
//!   with HMAC-SHA256 under a key file. Format (ASCII, one line):
//!   `weft1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "weft1." + claims part))>`
//!   with claims `{"ns", "sa", "aud": "identity.weft.dev", "iat", "exp"}`
//!   (Unix seconds) and, for a token bound to a pod, `"pod"` (its name)
//!   and optionally `"uid"` (its UID). Tokens without `pod` (minted before
//!   the binding existed) stay valid and are unbound. Mint one with
//!   `weft-controller token [--pod NAME [--pod-uid UID]]`.
//!
//! The pod binding is what the issuance rate limit is keyed by
//! ([`super::rate::RateKey`]): every replica of a Deployment shares one
//! ServiceAccount, but each pod has its own token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use ring::hmac;
use serde::{Deserialize, Serialize};

use super::{ServiceAccount, TOKEN_AUDIENCE};

/// RBAC the TokenReview verifier needs: (API group, resource, verb),
/// granted by `charts/weft/templates/controller-rbac.yaml` (checked by
/// `tests/rbac.rs`).
pub const TOKEN_REVIEW_RBAC: (&str, &str, &str) =
    ("authentication.k8s.io", "tokenreviews", "create");

/// How long a TokenReview may take before the call answers UNAVAILABLE.
pub const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Local tokens must not claim to be issued further than this in the future.
const CLOCK_SKEW: u64 = 60;

/// A token that does not prove a ServiceAccount, or could not be checked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the request carries no token; the proxy sends the file named by WEFT_PROXY_IDENTITY_TOKEN_FILE")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token signature does not verify: it was not minted with this controller's token key")]
    BadSignature,
    #[error("token expired at {expired_at} (Unix seconds; now {now}); mint a new one")]
    Expired { expired_at: u64, now: u64 },
    #[error("token is issued in the future ({iat}, now {now}); check the clocks")]
    NotYetValid { iat: u64, now: u64 },
    #[error("token audience is {got:?}; expected {TOKEN_AUDIENCE:?} (a projected ServiceAccount token with that audience)")]
    Audience { got: Vec<String> },
    #[error("the Kubernetes API did not authenticate the token: {0}")]
    NotAuthenticated(String),
    #[error("the token belongs to {0:?}, which is not a ServiceAccount (system:serviceaccount:<ns>:<sa>)")]
    NotServiceAccount(String),
    #[error("cannot check the token: TokenReview failed: {0}; is the API server reachable and may the controller create tokenreviews?")]
    Review(String),
    #[error("the token's pod binding is invalid: {0}")]
    PodBinding(String),
}

impl TokenError {
    /// The token may be fine; checking it failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Review(_))
    }
}

/// TokenReview `status.user.extra` key naming the pod a projected token
/// was minted for.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview `status.user.extra` key holding that pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// The pod a token is bound to (in the ServiceAccount's namespace).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodBinding {
    pub name: String,
    /// The pod's UID, when the token carries it (always, for a projected
    /// token in kube mode). A recreated pod of the same name has a new UID.
    pub uid: Option<String>,
}

impl PodBinding {
    /// Checks what a token claims: the name must be a DNS subdomain (as
    /// Kubernetes requires of pod names), the UID short printable ASCII.
    pub fn new(name: impl Into<String>, uid: Option<String>) -> Result<Self, TokenError> {
        let name = name.into();
        if !super::is_dns_subdomain(&name) {
            return Err(TokenError::PodBinding(format!(
                "pod name {name:?} is not a DNS subdomain name"
            )));
        }
        if let Some(uid) = &uid {
            if uid.is_empty()
                || uid.len() > MAX_UID_LEN
                || !uid.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(TokenError::PodBinding(format!(
                    "pod UID {uid:?} is not 1 to {MAX_UID_LEN} printable ASCII characters"
                )));
            }
        }
        Ok(PodBinding { name, uid })
    }
}

impl std::fmt::Display for PodBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.uid {
            Some(uid) => write!(f, "{} (uid {uid})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Longer than any Kubernetes UID (a 36-character UUID), short enough to
/// keep a rate-limit key small.
const MAX_UID_LEN: usize = 128;

/// What a valid token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub service_account: ServiceAccount,
    /// The pod the token is bound to; `None` for an unbound token.
    pub pod: Option<PodBinding>,
}

impl Authenticated {
    /// A token that names no pod.
    pub fn unbound(service_account: ServiceAccount) -> Self {
        Authenticated {
            service_account,
            pod: None,
        }
    }
}

/// The seam between the identity service and whatever vouches for tokens.
#[tonic::async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// The ServiceAccount the token proves, and the pod it is bound to.
    async fn verify(&self, token: &[u8]) -> Result<Authenticated, TokenError>;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------- local ---

const LOCAL_PREFIX: &str = "weft1.";

/// Minimum key length: HMAC-SHA256 wants a key of at least 32 bytes.
pub const MIN_KEY_LEN: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    ns: String,
    sa: String,
    aud: String,
    iat: u64,
    exp: u64,
    /// The pod the token is bound to (absent: unbound, as every token was
    /// before the binding existed; such a token serializes as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    /// That pod's UID (only with `pod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
}

/// Why a token key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("token key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token key {path} holds {len} bytes; expected at least {MIN_KEY_LEN} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")]
    Short { path: PathBuf, len: usize },
}

/// Controller-signed tokens (local mode).
#[derive(Clone)]
pub struct LocalTokens {
    key: hmac::Key,
}

impl std::fmt::Debug for LocalTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalTokens(..)")
    }
}

impl LocalTokens {
    /// A verifier and minter keyed by `key` (at least 32 bytes).
    pub fn new(key: &[u8]) -> Self {
        LocalTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// Reads the key file: its bytes, without a trailing newline, are the key.
    pub fn load(path: &Path) -> Result<Self, TokenKeyError> {
        let bytes = std::fs::read(path).map_err(|source| TokenKeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key = bytes.trim_ascii_end();
        if key.len() < MIN_KEY_LEN {
            return Err(TokenKeyError::Short {
                path: path.to_path_buf(),
                len: key.len(),
            });
        }
        Ok(Self::new(key))
    }

    /// Mints an unbound token for `sa`, valid `lifetime` from `now` (Unix
    /// seconds).
    pub fn mint_at(&self, sa: &ServiceAccount, lifetime: Duration, now: u64) -> String {
        self.mint_for_pod_at(sa, None, lifetime, now)
    }

    /// Mints an unbound token for `sa`, valid `lifetime` from now.
    pub fn mint(&self, sa: &ServiceAccount, lifetime: Duration) -> String {
        self.mint_at(sa, lifetime, unix_now())
    }

    /// Mints a token for `sa` bound to `pod` (when given), valid
    /// `lifetime` from `now` (Unix seconds): what the kubelet's projected
    /// token is to a pod in a cluster.
    pub fn mint_for_pod_at(
        &self,
        sa: &ServiceAccount,
        pod: Option<&PodBinding>,
        lifetime: Duration,
        now: u64,
    ) -> String {
        self.mint_claims(&Claims {
            ns: sa.namespace.clone(),
            sa: sa.name.clone(),
            aud: TOKEN_AUDIENCE.into(),
            iat: now,
            exp: now.saturating_add(lifetime.as_secs()),
            pod: pod.map(|p| p.name.clone()),
            uid: pod.and_then(|p| p.uid.clone()),
        })
    }

    /// Mints a token for `sa` bound to `pod`, valid `lifetime` from now.
    pub fn mint_for_pod(
        &self,
        sa: &ServiceAccount,
        pod: &PodBinding,
        lifetime: Duration,
    ) -> String {
        self.mint_for_pod_at(sa, Some(pod), lifetime, unix_now())
    }

    fn mint_claims(&self, claims: &Claims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("{LOCAL_PREFIX}{body}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", B64.encode(tag.as_ref()))
    }

    /// Checks a token at `now` (Unix seconds). Pure.
    pub fn verify_at(&self, token: &[u8], now: u64) -> Result<Authenticated, TokenError> {
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let token = std::str::from_utf8(token)
            .map_err(|_| TokenError::Malformed("not UTF-8 text".into()))?;
        let Some(rest) = token.strip_prefix(LOCAL_PREFIX) else {
            return Err(TokenError::Malformed(format!(
                "does not start with {LOCAL_PREFIX:?}; local mode expects a token from `weft-controller token`"
            )));
        };
        let (body, tag) = rest
            .split_once('.')
            .ok_or_else(|| TokenError::Malformed("expected weft1.<claims>.<signature>".into()))?;
        let tag = B64
            .decode(tag)
            .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;
        let signed_len = LOCAL_PREFIX.len() + body.len();
        hmac::verify(&self.key, &token.as_bytes()[..signed_len], &tag)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| TokenError::Malformed("claims are not base64url JSON".into()))?;
        if claims.aud != TOKEN_AUDIENCE {
            return Err(TokenError::Audience {
                got: vec![claims.aud],
            });
        }
        if now >= claims.exp {
            return Err(TokenError::Expired {
                expired_at: claims.exp,
                now,
            });
        }
        if claims.iat > now.saturating_add(CLOCK_SKEW) {
            return Err(TokenError::NotYetValid {
                iat: claims.iat,
                now,
            });
        }
        let pod = match (claims.pod, claims.uid) {
            (Some(name), uid) => Some(PodBinding::new(name, uid)?),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(TokenError::PodBinding(
                    "the token has a pod UID but no pod name".into(),
                ))
            }
        };
        Ok(Authenticated {
            service_account: ServiceAccount::new(claims.ns, claims.sa),
            pod,
        })
    }
}

#[tonic::async_trait]
impl TokenVerifier for LocalTokens {
    async fn verify(&self, token: &[u8]) -> Result<Authenticated, TokenError> {
        self.verify_at(token, unix_now())
    }
}

// ----------------------------------------------------------------- kube ---

/// Parses `system:serviceaccount:<ns>:<sa>`.
pub fn service_account_of(username: &str) -> Option<ServiceAccount> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return None;
    }
    Some(ServiceAccount::new(ns, sa))
}

/// The single value of `extra[key]`; several values are an error (the API
/// server sends one for each pod key).
fn single_extra<'a>(
    extra: Option<&'a std::collections::BTreeMap<String, Vec<String>>>,
    key: &str,
) -> Result<Option<&'a str>, TokenError> {
    match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([one]) => Ok(Some(one.as_str())),
        Some(many) => Err(TokenError::PodBinding(format!(
            "TokenReview extra {key} has {} values ({many:?}); expected one",
            many.len()
        ))),
    }
}

/// What a TokenReview status proves: the ServiceAccount, and the pod from
/// `user.extra` ([`EXTRA_POD_NAME`], [`EXTRA_POD_UID`]) when the token is
/// bound to one. Pure.
pub fn review_decision(status: Option<&TokenReviewStatus>) -> Result<Authenticated, TokenError> {
    let Some(status) = status else {
        return Err(TokenError::Review("the response has no status".into()));
    };
    if status.authenticated != Some(true) {
        return Err(TokenError::NotAuthenticated(
            status
                .error
                .clone()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "authenticated is false".into()),
        ));
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(TokenError::Audience { got: audiences });
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    let service_account =
        service_account_of(&username).ok_or(TokenError::NotServiceAccount(username))?;
    let extra = user.and_then(|u| u.extra.as_ref());
    let name = single_extra(extra, EXTRA_POD_NAME)?;
    let uid = single_extra(extra, EXTRA_POD_UID)?;
    let pod = match (name, uid) {
        (Some(name), uid) => Some(PodBinding::new(name, uid.map(String::from))?),
        // A UID without a name is not something the API server sends; the
        // token is still a valid ServiceAccount token, just not pod-bound.
        (None, _) => None,
    };
    Ok(Authenticated {
        service_account,
        pod,
    })
}

/// Kubernetes TokenReview (kube mode).
#[derive(Clone)]
pub struct TokenReviewVerifier {
    client: kube::Client,
}

impl std::fmt::Debug for TokenReviewVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenReviewVerifier(..)")
    }
}

impl TokenReviewVerifier {
    pub fn new(client: kube::Client) -> Self {
        TokenReviewVerifier { client }
    }
}

#[tonic::async_trait]
impl TokenVerifier for TokenReviewVerifier {
    async fn verify(&self, token: &[u8]) -> Result<Authenticated, TokenError> {
        let token = token.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let token = std::str::from_utf8(token)
            .map_err(|_| TokenError::Malformed("not UTF-8 text".into()))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = tokio::time::timeout(
            TOKEN_REVIEW_TIMEOUT,
            api.create(&kube::api::PostParams::default(), &review),
        )
        .await
        .map_err(|_| TokenError::Review(format!("no answer within {TOKEN_REVIEW_TIMEOUT:?}")))?
        .map_err(|e| TokenError::Review(e.to_string()))?;
        review_decision(answer.status.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn local_tokens_table() {
        let tokens = LocalTokens::new(&[7u8; 32]);
        let other = LocalTokens::new(&[8u8; 32]);
        let sa = ServiceAccount::new("books", "web");
        let good = tokens.mint_at(&sa, Duration::from_secs(3600), NOW);
        let expired = tokens.mint_at(&sa, Duration::from_secs(10), NOW - 100);
        let future = tokens.mint_at(&sa, Duration::from_secs(3600), NOW + 3600);
        let wrong_aud = tokens.mint_claims(&Claims {
            ns: "books".into(),
            sa: "web".into(),
            aud: "kubernetes".into(),
            iat: NOW,
            exp: NOW + 10,
            pod: None,
            uid: None,
        });
        let foreign = other.mint_at(&sa, Duration::from_secs(3600), NOW);
        // Same signature, edited claims.
        let (_, tag) = good.rsplit_once('.').expect("tag");
        let forged_body = B64.encode(br#"{"ns":"kube-system","sa":"admin","aud":"identity.weft.dev","iat":1,"exp":99999999999}"#);
        let forged = format!("weft1.{forged_body}.{tag}");
        let unbound = Authenticated::unbound(sa.clone());
        let cases: Vec<(&str, Vec<u8>, Result<Authenticated, &str>)> = vec![
            ("valid", good.clone().into_bytes(), Ok(unbound.clone())),
            (
                "valid with newline",
                format!("{good}\n").into_bytes(),
                Ok(unbound.clone()),
            ),
            ("empty", vec![], Err("no token")),
            ("not utf8", vec![0xff, 0xfe], Err("not UTF-8")),
            (
                "jwt",
                b"eyJhbGciOi.x.y".to_vec(),
                Err("does not start with \"weft1.\""),
            ),
            (
                "no tag",
                b"weft1.abc".to_vec(),
                Err("expected weft1.<claims>.<signature>"),
            ),
            ("bad tag", b"weft1.abc.!!".to_vec(), Err("not base64url")),
            (
                "other key",
                foreign.into_bytes(),
                Err("signature does not verify"),
            ),
            (
                "forged claims",
                forged.into_bytes(),
                Err("signature does not verify"),
            ),
            ("expired", expired.into_bytes(), Err("token expired at")),
            ("future", future.into_bytes(), Err("issued in the future")),
            (
                "wrong audience",
                wrong_aud.into_bytes(),
                Err("audience is [\"kubernetes\"]"),
            ),
        ];
        for (name, token, want) in cases {
            let got = tokens.verify_at(&token, NOW);
            match (got, want) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}"),
                (Err(e), Err(says)) => assert!(e.to_string().contains(says), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn key_file_must_be_long_enough() {
        let dir = std::env::temp_dir().join(format!("weft-token-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").expect("write");
        let err = LocalTokens::load(&short).expect_err("short").to_string();
        assert!(err.contains("holds 8 bytes"), "{err}");
        let err = LocalTokens::load(&dir.join("missing"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn review_decision_table() {
        let status =
            |auth: Option<bool>, aud: Option<Vec<&str>>, user: Option<&str>, err: Option<&str>| {
                TokenReviewStatus {
                    authenticated: auth,
                    audiences: aud.map(|v| v.into_iter().map(String::from).collect()),
                    user: user.map(|u| UserInfo {
                        username: Some(u.into()),
                        ..UserInfo::default()
                    }),
                    error: err.map(String::from),
                }
            };
        let sa = "system:serviceaccount:books:web";
        let web = Authenticated::unbound(ServiceAccount::new("books", "web"));
        let cases: Vec<(&str, Option<TokenReviewStatus>, Result<Authenticated, &str>)> = vec![
            (
                "ok",
                Some(status(
                    Some(true),
                    Some(vec![TOKEN_AUDIENCE]),
                    Some(sa),
                    None,
                )),
                Ok(web.clone()),
            ),
            (
                "ok among audiences",
                Some(status(
                    Some(true),
                    Some(vec!["x", TOKEN_AUDIENCE]),
                    Some(sa),
                    None,
                )),
                Ok(web.clone()),
            ),
            ("no status", None, Err("has no status")),
            (
                "rejected",
                Some(status(
                    Some(false),
                    None,
                    None,
                    Some("invalid bearer token"),
                )),
                Err("did not authenticate the token: invalid bearer token"),
            ),
            (
                "authenticated missing",
                Some(status(None, None, None, None)),
                Err("authenticated is false"),
            ),
            (
                "wrong audience",
                Some(status(
                    Some(true),
                    Some(vec!["https://kubernetes.default.svc"]),
                    Some(sa),
                    None,
                )),
                Err("audience is [\"https://kubernetes.default.svc\"]"),
            ),
            (
                "no audiences",
                Some(status(Some(true), None, Some(sa), None)),
                Err("audience is []"),
            ),
            (
                "a user",
                Some(status(
                    Some(true),
                    Some(vec![TOKEN_AUDIENCE]),
                    Some("alice"),
                    None,
                )),
                Err("\"alice\", which is not a ServiceAccount"),
            ),
            (
                "malformed sa",
                Some(status(
                    Some(true),
                    Some(vec![TOKEN_AUDIENCE]),
                    Some("system:serviceaccount:books"),
                    None,
                )),
                Err("not a ServiceAccount"),
            ),
        ];
        for (name, status, want) in cases {
            let got = review_decision(status.as_ref());
            match (got, want) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{name}"),
                (Err(e), Err(says)) => assert!(e.to_string().contains(says), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn pod(name: &str, uid: Option<&str>) -> PodBinding {
        PodBinding::new(name, uid.map(String::from)).expect("valid binding")
    }

    #[test]
    fn local_tokens_with_and_without_pod_claims() {
        let tokens = LocalTokens::new(&[7u8; 32]);
        let sa = ServiceAccount::new("books", "web");
        let hour = Duration::from_secs(3600);
        let bound = |p: Option<PodBinding>| Authenticated {
            service_account: sa.clone(),
            pod: p,
        };
        // Named pod, with and without a UID.
        let with_uid = pod(
            "web-7d9f-x2k4q",
            Some("0b1c6a52-8f0e-4f7e-9d8e-3c1f2a4b5c6d"),
        );
        let t = tokens.mint_for_pod_at(&sa, Some(&with_uid), hour, NOW);
        assert_eq!(
            tokens.verify_at(t.as_bytes(), NOW),
            Ok(bound(Some(with_uid)))
        );
        let name_only = pod("web-0", None);
        let t = tokens.mint_for_pod_at(&sa, Some(&name_only), hour, NOW);
        assert_eq!(
            tokens.verify_at(t.as_bytes(), NOW),
            Ok(bound(Some(name_only)))
        );
        // An unbound token serializes exactly as tokens did before the
        // binding existed: no pod or uid key at all.
        let t = tokens.mint_at(&sa, hour, NOW);
        let (_, rest) = t.split_once('.').expect("prefix");
        let (body, _) = rest.split_once('.').expect("tag");
        let json = String::from_utf8(B64.decode(body).expect("b64")).expect("utf8");
        assert!(!json.contains("pod") && !json.contains("uid"), "{json}");
        // A token minted by the old code (hand-made: the old claim set,
        // signed with the key) is still valid, and unbound.
        let old_body = B64.encode(format!(
            r#"{{"ns":"books","sa":"web","aud":"identity.weft.dev","iat":{NOW},"exp":{}}}"#,
            NOW + 3600
        ));
        let signed = format!("weft1.{old_body}");
        let tag = B64.encode(hmac::sign(&tokens.key, signed.as_bytes()).as_ref());
        let old = format!("{signed}.{tag}");
        assert_eq!(tokens.verify_at(old.as_bytes(), NOW), Ok(bound(None)));
    }

    #[test]
    fn a_tampered_pod_claim_fails_the_mac() {
        let tokens = LocalTokens::new(&[7u8; 32]);
        let sa = ServiceAccount::new("books", "web");
        let t = tokens.mint_for_pod_at(
            &sa,
            Some(&pod("web-0", Some("uid-0"))),
            Duration::from_secs(3600),
            NOW,
        );
        let (signed, tag) = t.rsplit_once('.').expect("tag");
        let body = signed.strip_prefix("weft1.").expect("prefix");
        let json = String::from_utf8(B64.decode(body).expect("b64")).expect("utf8");
        // A crash-looping pod that renames itself to get a fresh bucket,
        // or drops its binding to fall back to another key: both break
        // the signature.
        for edited in [
            json.replace("web-0", "web-1"),
            json.replace("uid-0", "uid-1"),
            json.replace(r#","pod":"web-0","uid":"uid-0""#, ""),
        ] {
            assert_ne!(edited, json);
            let forged = format!("weft1.{}.{tag}", B64.encode(&edited));
            assert_eq!(
                tokens.verify_at(forged.as_bytes(), NOW),
                Err(TokenError::BadSignature),
                "{edited}"
            );
        }
    }

    #[test]
    fn signed_but_invalid_pod_claims_are_refused() {
        let tokens = LocalTokens::new(&[7u8; 32]);
        let claims = |pod: Option<&str>, uid: Option<&str>| Claims {
            ns: "books".into(),
            sa: "web".into(),
            aud: TOKEN_AUDIENCE.into(),
            iat: NOW,
            exp: NOW + 10,
            pod: pod.map(String::from),
            uid: uid.map(String::from),
        };
        for (name, c, says) in [
            (
                "uid without pod",
                claims(None, Some("u")),
                "pod UID but no pod name",
            ),
            (
                "bad pod name",
                claims(Some("Web_0"), None),
                "not a DNS subdomain",
            ),
            ("empty uid", claims(Some("web-0"), Some("")), "pod UID \"\""),
            (
                "uid with space",
                claims(Some("web-0"), Some("a b")),
                "printable ASCII",
            ),
        ] {
            let t = tokens.mint_claims(&c);
            let err = tokens.verify_at(t.as_bytes(), NOW).expect_err(name);
            assert!(matches!(err, TokenError::PodBinding(_)), "{name}: {err:?}");
            assert!(err.to_string().contains(says), "{name}: {err}");
        }
    }

    #[test]
    fn review_decision_reads_the_pod_from_user_extra() {
        use std::collections::BTreeMap;
        let status = |extra: &[(&str, &[&str])]| TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec![TOKEN_AUDIENCE.into()]),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:books:web".into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        };
        let sa = ServiceAccount::new("books", "web");
        let uid = "0b1c6a52-8f0e-4f7e-9d8e-3c1f2a4b5c6d";
        let node = ("authentication.kubernetes.io/node-name", &["node-1"][..]);
        /// (name, status, the pod binding or what the error says)
        type Case = (
            &'static str,
            TokenReviewStatus,
            Result<Option<PodBinding>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "projected token: name and uid",
                status(&[
                    (EXTRA_POD_NAME, &["web-7d9f-x2k4q"]),
                    (EXTRA_POD_UID, &[uid]),
                    node,
                ]),
                Ok(Some(pod("web-7d9f-x2k4q", Some(uid)))),
            ),
            (
                "name only",
                status(&[(EXTRA_POD_NAME, &["web-0"])]),
                Ok(Some(pod("web-0", None))),
            ),
            ("no extras: unbound", status(&[]), Ok(None)),
            ("other extras only: unbound", status(&[node]), Ok(None)),
            (
                "empty value list: unbound",
                status(&[(EXTRA_POD_NAME, &[])]),
                Ok(None),
            ),
            (
                "uid without name: unbound",
                status(&[(EXTRA_POD_UID, &[uid])]),
                Ok(None),
            ),
            (
                "two pod names",
                status(&[(EXTRA_POD_NAME, &["a", "b"])]),
                Err("has 2 values"),
            ),
            (
                "invalid pod name",
                status(&[(EXTRA_POD_NAME, &["../etc"])]),
                Err("not a DNS subdomain"),
            ),
        ];
        for (name, st, want) in cases {
            let got = review_decision(Some(&st));
            match (got, want) {
                (Ok(a), Ok(p)) => {
                    assert_eq!(a.service_account, sa, "{name}");
                    assert_eq!(a.pod, p, "{name}");
                }
                (Err(e), Err(says)) => assert!(e.to_string().contains(says), "{name}: {e}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        // No user extra at all (an older API server): unbound.
        let mut bare = status(&[]);
        if let Some(u) = bare.user.as_mut() {
            u.extra = None;
        }
        assert_eq!(review_decision(Some(&bare)), Ok(Authenticated::unbound(sa)));
    }
}
