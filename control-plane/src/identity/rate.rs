//! Issuance rate limits: a token bucket **per pod** and one **controller-wide
//! ceiling**, both applied by [`IssuanceLimits::admit`]. The clock is passed
//! in, so everything here is tested without sleeps.
//!
//! **Per pod** ([`RateConfig`], `--certify-burst` 10, then one per
//! `--certify-refill` 10 s). What this limit is for is a crash-looping or
//! misbehaving pod hammering the CA; what it must never do is slow a
//! rollout. Keying it by SPIFFE ID did: every replica of a Deployment
//! shares one ServiceAccount, so scaling 0 → 100 gave 10 pods a certificate
//! at once and the other 90 one every 10 s between them (15 minutes for the
//! last). The key ([`rate_key`]) is therefore the
//! pod the token names:
//!
//! 1. the pod's **UID** when the token carries it (every projected token in
//!    kube mode: TokenReview's `authentication.kubernetes.io/pod-uid`);
//!    a pod deleted and recreated under the same name is a new pod;
//! 2. else the pod's **namespace and name** (a local-mode token minted with
//!    `--pod` but no `--pod-uid`);
//! 3. else, for a token bound to no pod, a **SHA-256 of the token bytes**
//!    (surrounding whitespace trimmed, as the verifiers do). The kubelet
//!    gives each pod its own projected token, so a Deployment of distinct
//!    unbound tokens still gets a bucket per pod and is not starved, while
//!    a crash loop replays the same token file and so still lands in one
//!    bucket and is throttled. (Replicas that share one token, e.g. a
//!    legacy Secret-based token or one local token file, share one bucket:
//!    bind the token to the pod.)
//!
//! A proxy renews at 70 % of a 24 h lifetime, so a healthy pod asks about
//! once a day; 10 back to back covers restarts of the proxy container.
//!
//! **Controller ceiling** ([`CeilingConfig`], `--certify-max-rate` per
//! second, `--certify-max-burst`): one more bucket over all issuance, so
//! that many pods misbehaving at once (or a flood of distinct valid
//! tokens) cannot take the controller's CPU from the destination service.
//! Sized from the measured cost of one issuance
//! (`cargo bench -p weft-controller --bench certify`; benches/RESULTS.md,
//! "Certificate issuance (issue 11)"): on one core the whole Certify
//! handler (CSR parse and self-signature check, local token verify, rate
//! key and limits, ECDSA P-256 leaf signing) runs 9,000 to 11,000 times a
//! second (90 to 110 µs; signing alone is 25 µs); over loopback gRPC a
//! one-thread server used about 100 µs of CPU per certificate (6,300 to
//! 7,500 a second with the thread 55 to 80 % busy, on a loaded 2-vCPU
//! machine). The defaults:
//!
//! - [`CeilingConfig::DEFAULT_BURST`] = 1,000: a rollout of 1,000 pods at
//!   once (five times the 200-pod case) sees no refusal; the whole burst
//!   costs about 0.1 s of one core.
//! - [`CeilingConfig::DEFAULT_RATE`] = 500 per second: about 5 % of one
//!   core at the measured cost (10 % on a core half as fast), so a flood
//!   can never take more than that; and still 30,000 new pods a minute,
//!   well above the pace at which Kubernetes starts pods, so it only binds
//!   when something is wrong. A pod it refuses is told when the next
//!   token is due (within 2 ms at this rate); proxies retry with backoff.
//!
//! Order: the per-pod bucket first, then the ceiling. A pod refused by its
//! own bucket spends nothing of the ceiling; a pod refused by the ceiling
//! gets its per-pod token back ([`RateLimiter::refund`]). Both are applied
//! only after the token is verified and matched to the identity, so an
//! unauthenticated caller can spend neither another pod's budget nor the
//! ceiling. Per-pod buckets that have refilled are dropped on the next
//! sweep, so memory is bounded by the pods active within `burst × refill`.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::token::Authenticated;

/// `--certify-burst`, `--certify-refill`: the per-pod bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateConfig {
    /// Certificates one pod may get back to back.
    pub burst: u32,
    /// One more certificate per this interval, up to `burst`.
    pub refill: Duration,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            burst: 10,
            refill: Duration::from_secs(10),
        }
    }
}

impl RateConfig {
    fn shape(&self) -> Shape {
        Shape {
            burst: f64::from(self.burst),
            per_sec: if self.refill.is_zero() {
                f64::INFINITY
            } else {
                1.0 / self.refill.as_secs_f64()
            },
        }
    }
}

/// `--certify-max-rate`, `--certify-max-burst`: the controller-wide bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CeilingConfig {
    /// Certificates per second over all pods, sustained.
    pub rate: f64,
    /// Certificates the controller issues back to back over all pods.
    pub burst: u32,
}

impl CeilingConfig {
    /// See the module docs for how these were chosen.
    pub const DEFAULT_RATE: f64 = 500.0;
    pub const DEFAULT_BURST: u32 = 1000;
}

impl Default for CeilingConfig {
    fn default() -> Self {
        CeilingConfig {
            rate: Self::DEFAULT_RATE,
            burst: Self::DEFAULT_BURST,
        }
    }
}

/// What the per-pod bucket is keyed by (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The UID of the pod the token is bound to.
    PodUid(String),
    /// Namespace and name of the pod the token is bound to (no UID).
    Pod { namespace: String, name: String },
    /// SHA-256 of an unbound token's bytes.
    Token([u8; 32]),
}

impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::PodUid(uid) => write!(f, "pod uid {uid}"),
            RateKey::Pod { namespace, name } => write!(f, "pod {namespace}/{name}"),
            RateKey::Token(hash) => {
                f.write_str("token sha256:")?;
                for b in &hash[..8] {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The per-pod bucket a verified token spends from. Pure.
pub fn rate_key(who: &Authenticated, token: &[u8]) -> RateKey {
    match &who.pod {
        Some(pod) => match &pod.uid {
            Some(uid) => RateKey::PodUid(uid.clone()),
            None => RateKey::Pod {
                namespace: who.service_account.namespace.clone(),
                name: pod.name.clone(),
            },
        },
        None => {
            let digest = ring::digest::digest(&ring::digest::SHA256, token.trim_ascii());
            let mut hash = [0u8; 32];
            hash.copy_from_slice(digest.as_ref());
            RateKey::Token(hash)
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A bucket's size and refill rate.
#[derive(Clone, Copy, Debug)]
struct Shape {
    burst: f64,
    per_sec: f64,
}

impl Shape {
    fn full(&self, now: Instant) -> Bucket {
        Bucket {
            tokens: self.burst,
            at: now,
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed * self.per_sec).min(self.burst)
    }

    /// Takes one token at `now`; `Err(wait)` until the next one.
    fn take(&self, b: &mut Bucket, now: Instant) -> Result<(), Duration> {
        let tokens = self.refilled(*b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *b = Bucket { tokens, at: now };
            let wait = (1.0 - tokens) / self.per_sec;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }

    fn give_back(&self, b: &mut Bucket, now: Instant) {
        let tokens = self.refilled(*b, now);
        *b = Bucket {
            tokens: (tokens + 1.0).min(self.burst),
            at: now,
        };
    }
}

/// A token bucket per key (the per-pod limit).
#[derive(Debug)]
pub struct RateLimiter<K = RateKey> {
    config: RateConfig,
    buckets: Mutex<HashMap<K, Bucket>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl<K: Clone + Eq + Hash> RateLimiter<K> {
    pub fn new(config: RateConfig) -> Self {
        RateLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(None),
        }
    }

    /// Takes one token for `key` at `now`; `Err(wait)` says how long until
    /// the next one.
    pub fn try_acquire(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.sweep(now);
        let shape = self.config.shape();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets
            .entry(key.clone())
            .or_insert_with(|| shape.full(now));
        shape.take(b, now)
    }

    /// Returns the token [`Self::try_acquire`] took for `key` (the request
    /// was refused by a later check).
    pub fn refund(&self, key: &K, now: Instant) {
        let shape = self.config.shape();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            shape.give_back(b, now);
        }
    }

    /// Drops full buckets at most once per refill interval.
    fn sweep(&self, now: Instant) {
        let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.config.refill) {
            return;
        }
        *last = Some(now);
        drop(last);
        let shape = self.config.shape();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, b| shape.refilled(*b, now) < shape.burst);
    }

    /// Keys with a bucket (for tests).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One token bucket over all issuance (the controller ceiling).
#[derive(Debug)]
pub struct Ceiling {
    shape: Shape,
    bucket: Mutex<Option<Bucket>>,
}

impl Ceiling {
    pub fn new(config: CeilingConfig) -> Self {
        Ceiling {
            shape: Shape {
                burst: f64::from(config.burst),
                per_sec: config.rate,
            },
            bucket: Mutex::new(None),
        }
    }

    /// Takes one token at `now`; `Err(wait)` says how long until the next.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let b = bucket.get_or_insert_with(|| self.shape.full(now));
        self.shape.take(b, now)
    }
}

/// Which limit refused a certificate, and how long until it would allow one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// The pod's own bucket (`--certify-burst`, `--certify-refill`).
    Pod(Duration),
    /// The controller-wide ceiling (`--certify-max-rate`, `--certify-max-burst`).
    Controller(Duration),
}

impl Limited {
    /// The bounded `limit` label of
    /// `weft_controller_identity_certify_rate_limited_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Limited::Pod(_) => "pod",
            Limited::Controller(_) => "controller",
        }
    }

    pub fn wait(&self) -> Duration {
        match self {
            Limited::Pod(w) | Limited::Controller(w) => *w,
        }
    }
}

/// Both limits, in the order they apply.
#[derive(Debug)]
pub struct IssuanceLimits {
    pub per_pod: RateLimiter<RateKey>,
    pub ceiling: Ceiling,
}

impl IssuanceLimits {
    pub fn new(per_pod: RateConfig, ceiling: CeilingConfig) -> Self {
        IssuanceLimits {
            per_pod: RateLimiter::new(per_pod),
            ceiling: Ceiling::new(ceiling),
        }
    }

    /// May `key` have a certificate at `now`? The pod's bucket first (a
    /// refusal there spends none of the ceiling), then the ceiling (a
    /// refusal there gives the pod its token back).
    pub fn admit(&self, key: &RateKey, now: Instant) -> Result<(), Limited> {
        self.per_pod.try_acquire(key, now).map_err(Limited::Pod)?;
        if let Err(wait) = self.ceiling.try_acquire(now) {
            self.per_pod.refund(key, now);
            return Err(Limited::Controller(wait));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::token::PodBinding;
    use crate::identity::ServiceAccount;

    fn secs(n: f64) -> Duration {
        Duration::from_secs_f64(n)
    }

    fn close(a: Duration, b: Duration) -> bool {
        (a.as_secs_f64() - b.as_secs_f64()).abs() < 0.001
    }

    #[test]
    fn burst_then_refill_per_key() {
        let limiter = RateLimiter::new(RateConfig {
            burst: 3,
            refill: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire(&"a", t0), Ok(()));
        }
        let wait = limiter.try_acquire(&"a", t0).expect_err("burst spent");
        assert!(close(wait, secs(10.0)), "{wait:?}");
        // Another key has its own bucket.
        assert_eq!(limiter.try_acquire(&"b", t0), Ok(()));
        // Half a refill later: still refused, 5 s to go.
        let wait = limiter
            .try_acquire(&"a", t0 + Duration::from_secs(5))
            .expect_err("half");
        assert!(close(wait, secs(5.0)), "{wait:?}");
        assert_eq!(
            limiter.try_acquire(&"a", t0 + Duration::from_secs(10)),
            Ok(())
        );
        assert!(limiter
            .try_acquire(&"a", t0 + Duration::from_secs(10))
            .is_err());
        // Long idle: back to a full burst, never more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.try_acquire(&"a", later), Ok(()));
        }
        assert!(limiter.try_acquire(&"a", later).is_err());
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let limiter = RateLimiter::new(RateConfig {
            burst: 2,
            refill: Duration::from_secs(1),
        });
        let t0 = Instant::now();
        for i in 0..100 {
            let _ = limiter.try_acquire(&format!("id-{i}"), t0);
        }
        assert_eq!(limiter.tracked(), 100);
        let _ = limiter.try_acquire(&"x".to_string(), t0 + Duration::from_secs(5));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn refund_gives_one_token_back_never_above_the_burst() {
        let limiter = RateLimiter::new(RateConfig {
            burst: 2,
            refill: Duration::from_secs(3600),
        });
        let t0 = Instant::now();
        limiter.try_acquire(&"a", t0).expect("1");
        limiter.try_acquire(&"a", t0).expect("2");
        assert!(limiter.try_acquire(&"a", t0).is_err());
        limiter.refund(&"a", t0);
        limiter.try_acquire(&"a", t0).expect("refunded");
        assert!(limiter.try_acquire(&"a", t0).is_err());
        // Refunds cap at the burst; an unknown key is left alone.
        for _ in 0..5 {
            limiter.refund(&"a", t0);
        }
        limiter.refund(&"nobody", t0);
        assert_eq!(limiter.tracked(), 1);
        limiter.try_acquire(&"a", t0).expect("1");
        limiter.try_acquire(&"a", t0).expect("2");
        assert!(limiter.try_acquire(&"a", t0).is_err());
    }

    #[test]
    fn ceiling_is_one_bucket_over_everything() {
        let ceiling = Ceiling::new(CeilingConfig {
            rate: 4.0,
            burst: 200,
        });
        let t0 = Instant::now();
        // 200 at once: a rollout's worth.
        for i in 0..200 {
            assert_eq!(ceiling.try_acquire(t0), Ok(()), "#{i}");
        }
        let wait = ceiling.try_acquire(t0).expect_err("burst spent");
        assert!(close(wait, secs(0.25)), "{wait:?}");
        // 4 per second after that.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..4 {
            assert_eq!(ceiling.try_acquire(t1), Ok(()));
        }
        assert!(ceiling.try_acquire(t1).is_err());
        // Idle refills to the burst, never more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..200 {
            ceiling.try_acquire(later).expect("refilled");
        }
        assert!(ceiling.try_acquire(later).is_err());
    }

    #[test]
    fn default_ceiling_lets_a_200_pod_rollout_through_at_once() {
        let limits = IssuanceLimits::new(RateConfig::default(), CeilingConfig::default());
        let t0 = Instant::now();
        for i in 0..200 {
            let key = RateKey::PodUid(format!("uid-{i}"));
            assert_eq!(limits.admit(&key, t0), Ok(()), "pod {i}");
        }
        // And the burst leaves room for several such rollouts.
        assert!(CeilingConfig::default().burst >= 5 * 200);
    }

    #[test]
    fn admit_checks_the_pod_then_the_ceiling() {
        let limits = IssuanceLimits::new(
            RateConfig {
                burst: 2,
                refill: Duration::from_secs(10),
            },
            CeilingConfig {
                rate: 1.0,
                burst: 3,
            },
        );
        let t0 = Instant::now();
        let a = RateKey::PodUid("a".into());
        let b = RateKey::PodUid("b".into());
        assert_eq!(limits.admit(&a, t0), Ok(()));
        assert_eq!(limits.admit(&a, t0), Ok(()));
        // Pod a's bucket is spent: refused by its own limit, and that
        // refusal costs the ceiling nothing (one of 3 is left).
        let refused = limits.admit(&a, t0).expect_err("pod limit");
        assert!(
            matches!(refused, Limited::Pod(w) if close(w, secs(10.0))),
            "{refused:?}"
        );
        assert_eq!(refused.label(), "pod");
        assert_eq!(limits.admit(&b, t0), Ok(()));
        // The ceiling is spent: b is refused by the controller limit with
        // the ceiling's wait (1 s at 1 per second)...
        let refused = limits.admit(&b, t0).expect_err("ceiling");
        assert!(
            matches!(refused, Limited::Controller(w) if close(w, secs(1.0))),
            "{refused:?}"
        );
        assert_eq!(refused.label(), "controller");
        // ...and keeps its own token: one second later (the ceiling has
        // one again) b gets its second certificate, which it would not
        // without the refund (0.1 of a token refilled by then)...
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limits.admit(&b, t1), Ok(()));
        // ...and then its own bucket is what stops it.
        assert!(matches!(limits.admit(&b, t1), Err(Limited::Pod(_))));
    }

    #[test]
    fn the_key_is_the_pod_uid_else_the_pod_name_else_the_token() {
        let sa = ServiceAccount::new("books", "web");
        let who = |pod: Option<(&str, Option<&str>)>| Authenticated {
            service_account: sa.clone(),
            pod: pod.map(|(n, u)| PodBinding::new(n, u.map(String::from)).expect("binding")),
        };
        let token = b"weft1.claims.tag";
        assert_eq!(
            rate_key(&who(Some(("web-0", Some("uid-0")))), token),
            RateKey::PodUid("uid-0".into())
        );
        assert_eq!(
            rate_key(&who(Some(("web-0", None))), token),
            RateKey::Pod {
                namespace: "books".into(),
                name: "web-0".into()
            }
        );
        let unbound = rate_key(&who(None), token);
        assert!(matches!(unbound, RateKey::Token(_)), "{unbound:?}");
        // The same token, with the whitespace the verifiers ignore: the
        // same bucket (a crash loop replaying its token file is throttled).
        assert_eq!(rate_key(&who(None), b"  weft1.claims.tag\n"), unbound);
        // Another pod's token: another bucket (a Deployment of distinct
        // unbound tokens is not starved).
        assert_ne!(rate_key(&who(None), b"weft1.claims.other"), unbound);
        // Same pod name in two namespaces: two pods.
        let other_ns = Authenticated {
            service_account: ServiceAccount::new("shop", "web"),
            pod: Some(PodBinding::new("web-0", None).expect("binding")),
        };
        assert_ne!(
            rate_key(&other_ns, token),
            rate_key(&who(Some(("web-0", None))), token)
        );
        // What the refusal message says about each.
        assert_eq!(RateKey::PodUid("u".into()).to_string(), "pod uid u");
        assert_eq!(
            rate_key(&who(Some(("web-0", None))), token).to_string(),
            "pod books/web-0"
        );
        assert!(unbound.to_string().starts_with("token sha256:"));
        assert_eq!(unbound.to_string().len(), "token sha256:".len() + 16);
    }

    #[test]
    fn a_deployment_sharing_one_service_account_is_not_throttled() {
        // The defect of issue 11: 100 replicas, one ServiceAccount, the
        // default per-pod limit. Every pod gets its certificate at once.
        let limits = IssuanceLimits::new(RateConfig::default(), CeilingConfig::default());
        let sa = ServiceAccount::new("books", "web");
        let t0 = Instant::now();
        for i in 0..100 {
            let who = Authenticated {
                service_account: sa.clone(),
                pod: Some(
                    PodBinding::new(format!("web-{i}"), Some(format!("uid-{i}"))).expect("pod"),
                ),
            };
            assert_eq!(limits.admit(&rate_key(&who, b"t"), t0), Ok(()), "pod {i}");
        }
    }
}
