//! The reference evaluator: a [`World`] and a [`Connection`] → a
//! [`Verdict`], with the policy and rule that decided each direction.
//! `weft policy explain` prints it; the compiled datapath entries are held to
//! it by property tests. The semantics are written down in the module above.

use std::fmt;
use std::net::IpAddr;

use super::{named_port, Direction, NetworkPolicy, PolicyPeer, PortSpec, Protocol, Rule, World};
use crate::{ObjectKey, Pod};

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A pod by key; its address is one of the pod's own (the family the
    /// other end uses when that is known, else its first).
    Pod(ObjectKey),
    /// An address; when a pod of the world owns it, that pod is the peer.
    Ip(IpAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod(k) => write!(f, "{k}"),
            Peer::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A new connection (or the first packet of a flow) from `src` to `dst`
/// on destination port `port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub src: Peer,
    pub dst: Peer,
    /// The destination port (ignored for protocols without ports).
    pub port: u16,
    pub protocol: Protocol,
}

/// What one end of a connection turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The pod at this end, if it is one.
    pub pod: Option<ObjectKey>,
    /// The address used; `None` for a pod that has no address yet (then no
    /// `ipBlock` can match it).
    pub ip: Option<IpAddr>,
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, &self.ip) {
            (Some(k), Some(ip)) => write!(f, "{k} ({ip})"),
            (Some(k), None) => write!(f, "{k} (no address)"),
            (None, Some(ip)) => write!(f, "{ip}"),
            (None, None) => f.write_str("an unknown peer"),
        }
    }
}

/// The decision in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// No policy isolates the pod in this direction (or this end is not a
    /// pod): nothing to enforce.
    NotIsolated,
    /// The first rule (policies by key, rules in order) that allows it.
    Allowed {
        policy: ObjectKey,
        /// Index in the policy's `spec.ingress` / `spec.egress`.
        rule: usize,
        /// Set when the port is the destination's proxy inbound port, allowed
        /// because the rule allows this application port of the pod.
        proxy_for: Option<u16>,
    },
    /// Isolated by these policies (by key) and none allows it.
    Denied { isolated_by: Vec<ObjectKey> },
}

impl DirectionVerdict {
    /// This direction lets the connection through.
    pub fn allows(&self) -> bool {
        !matches!(self, DirectionVerdict::Denied { .. })
    }
}

/// The decision on a connection, with what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// At the source pod.
    pub egress: DirectionVerdict,
    /// At the destination pod.
    pub ingress: DirectionVerdict,
    pub src: Resolved,
    pub dst: Resolved,
    pub port: u16,
    pub protocol: Protocol,
    /// Source and destination are the same pod: always allowed, whatever
    /// the directions say.
    pub loopback: bool,
}

/// A connection the evaluator cannot place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("no pod {0} in the cluster state (is it running, and in the namespace you meant?)")]
    UnknownPod(ObjectKey),
    #[error("{0} has no IP address yet, so the datapath cannot see its traffic")]
    NoAddress(String),
}

impl World {
    /// What each end of `conn` is: pod and address.
    pub fn resolve(&self, conn: &Connection) -> Result<(Resolved, Resolved), EvalError> {
        let pod_of = |p: &Peer| -> Result<Option<&Pod>, EvalError> {
            match p {
                Peer::Pod(k) => self
                    .pod(k)
                    .map(Some)
                    .ok_or_else(|| EvalError::UnknownPod(k.clone())),
                Peer::Ip(_) => Ok(None),
            }
        };
        let ip_of = |p: &Peer| match p {
            Peer::Ip(ip) => Some(*ip),
            Peer::Pod(_) => None,
        };
        let (src_pod, dst_pod) = (pod_of(&conn.src)?, pod_of(&conn.dst)?);
        let pick = |pod: Option<&Pod>, v4: Option<bool>| -> Option<IpAddr> {
            let pod = pod?;
            let mut owned = self.owned_ips(pod);
            match v4 {
                Some(v4) => owned.find(|ip| ip.is_ipv4() == v4),
                None => owned.next(),
            }
        };
        let (src_ip, dst_ip) = match (ip_of(&conn.src), ip_of(&conn.dst)) {
            (Some(s), Some(d)) => (Some(s), Some(d)),
            (Some(s), None) => (Some(s), pick(dst_pod, Some(s.is_ipv4()))),
            (None, Some(d)) => (pick(src_pod, Some(d.is_ipv4())), Some(d)),
            (None, None) => {
                // Two pods: the first family both have, else each its first.
                let both = src_pod.and_then(|s| {
                    self.owned_ips(s)
                        .find_map(|sip| pick(dst_pod, Some(sip.is_ipv4())).map(|dip| (sip, dip)))
                });
                match both {
                    Some((s, d)) => (Some(s), Some(d)),
                    None => (pick(src_pod, None), pick(dst_pod, None)),
                }
            }
        };
        let key = |pod: Option<&Pod>, ip: Option<IpAddr>| {
            pod.map(|p| p.key.clone())
                .or_else(|| ip.and_then(|ip| self.pod_by_ip(ip)).map(|p| p.key.clone()))
        };
        Ok((
            Resolved {
                pod: key(src_pod, src_ip),
                ip: src_ip,
            },
            Resolved {
                pod: key(dst_pod, dst_ip),
                ip: dst_ip,
            },
        ))
    }
}

/// Decides `conn` against `world` (the semantics are in [`super`]).
pub fn evaluate(world: &World, conn: &Connection) -> Result<Verdict, EvalError> {
    let (src, dst) = world.resolve(conn)?;
    let protocol = Protocol::from_number(conn.protocol.number());
    let src_pod = src.pod.as_ref().and_then(|k| world.pod(k));
    let dst_pod = dst.pod.as_ref().and_then(|k| world.pod(k));
    let at = |pod: Option<&Pod>, direction, peer: &Resolved, peer_pod: Option<&Pod>| match pod {
        None => DirectionVerdict::NotIsolated,
        Some(pod) => decide(
            world,
            pod,
            direction,
            &Subject {
                peer,
                peer_pod,
                port: conn.port,
                protocol,
                // Named ports resolve against the destination, whichever
                // direction is checked.
                named_pod: dst_pod,
            },
        ),
    };
    let egress = at(src_pod, Direction::Egress, &dst, dst_pod);
    let ingress = at(dst_pod, Direction::Ingress, &src, src_pod);
    let loopback = src.pod.is_some() && src.pod == dst.pod;
    Ok(Verdict {
        allowed: loopback || (egress.allows() && ingress.allows()),
        egress,
        ingress,
        src,
        dst,
        port: conn.port,
        protocol,
        loopback,
    })
}

/// What a rule is asked about.
struct Subject<'a> {
    /// The other end: the source for ingress, the destination for egress.
    peer: &'a Resolved,
    peer_pod: Option<&'a Pod>,
    port: u16,
    protocol: Protocol,
    /// The destination pod, against which named ports resolve.
    named_pod: Option<&'a Pod>,
}

fn decide(world: &World, pod: &Pod, direction: Direction, s: &Subject<'_>) -> DirectionVerdict {
    let isolating: Vec<&NetworkPolicy> = world.isolating(pod, direction).collect();
    if isolating.is_empty() {
        return DirectionVerdict::NotIsolated;
    }
    // The proxy's inbound port stands for the pod's application ports.
    let proxy_port = direction == Direction::Ingress
        && pod.meshed
        && s.protocol == Protocol::Tcp
        && s.port == pod.proxy_inbound_port;
    for policy in &isolating {
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            if !peer_matches(world, policy, rule, s.peer, s.peer_pod) {
                continue;
            }
            let allowed = |port| ports_allow(rule, port, s.protocol, s.named_pod);
            let proxy_for = if allowed(s.port) {
                None
            } else if let Some(app) = pod.app_ports().find(|p| proxy_port && allowed(*p)) {
                Some(app)
            } else {
                continue;
            };
            return DirectionVerdict::Allowed {
                policy: policy.key.clone(),
                rule: index,
                proxy_for,
            };
        }
    }
    DirectionVerdict::Denied {
        isolated_by: isolating.iter().map(|p| p.key.clone()).collect(),
    }
}

fn peer_matches(
    world: &World,
    policy: &NetworkPolicy,
    rule: &Rule,
    peer: &Resolved,
    peer_pod: Option<&Pod>,
) -> bool {
    rule.peers.is_empty()
        || rule.peers.iter().any(|p| match p {
            PolicyPeer::Pods { pods, namespaces } => {
                peer_pod.is_some_and(|q| world.pod_peer_matches(policy, pods, namespaces, q))
            }
            PolicyPeer::IpBlock(block) => peer.ip.is_some_and(|ip| block.contains(ip)),
        })
}

/// `rule` allows `port`/`protocol`, named ports resolved on `named_pod`.
fn ports_allow(rule: &Rule, port: u16, protocol: Protocol, named_pod: Option<&Pod>) -> bool {
    rule.ports.is_empty()
        || rule.ports.iter().any(|m| {
            m.protocol == protocol
                && match &m.port {
                    PortSpec::Any => true,
                    PortSpec::Range(lo, hi) => (*lo..=*hi).contains(&port),
                    PortSpec::Named(name) => {
                        named_pod.and_then(|p| named_port(p, name, m.protocol)) == Some(port)
                    }
                }
        })
}

impl fmt::Display for Verdict {
    /// One line: `allowed: ingress allowed by x/allow-web rule 0; egress:
    /// no policy isolates x/client`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = |r: &Resolved| match &r.pod {
            Some(k) => k.to_string(),
            None => r.to_string(),
        };
        if self.loopback {
            return write!(
                f,
                "allowed: {} connects to itself (a pod cannot block its own traffic)",
                what(&self.src)
            );
        }
        let port = match self.protocol {
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp => {
                format!("port {}/{}", self.port, self.protocol)
            }
            other => other.to_string(),
        };
        f.write_str(if self.allowed {
            "allowed: "
        } else {
            "denied: "
        })?;
        match &self.ingress {
            DirectionVerdict::NotIsolated if self.dst.pod.is_none() => write!(
                f,
                "ingress: {} is not a pod, no ingress policy applies",
                self.dst
            )?,
            DirectionVerdict::NotIsolated => {
                write!(f, "ingress: no policy isolates {}", what(&self.dst))?
            }
            DirectionVerdict::Allowed {
                policy,
                rule,
                proxy_for,
            } => {
                write!(f, "ingress allowed by {policy} rule {rule}")?;
                if let Some(app) = proxy_for {
                    write!(
                        f,
                        " (port {} is the proxy's inbound port, allowed with app port {app})",
                        self.port
                    )?;
                }
            }
            DirectionVerdict::Denied { isolated_by } => write!(
                f,
                "ingress denied: {} is isolated by {} and no ingress rule allows {} on {port}",
                what(&self.dst),
                list(isolated_by),
                self.src,
            )?,
        }
        f.write_str("; ")?;
        match &self.egress {
            DirectionVerdict::NotIsolated if self.src.pod.is_none() => write!(
                f,
                "egress: {} is not a pod, no egress policy applies",
                self.src
            ),
            DirectionVerdict::NotIsolated => {
                write!(f, "egress: no policy isolates {}", what(&self.src))
            }
            DirectionVerdict::Allowed { policy, rule, .. } => {
                write!(f, "egress allowed by {policy} rule {rule}")
            }
            DirectionVerdict::Denied { isolated_by } => write!(
                f,
                "egress denied: {} is isolated by {} and no egress rule allows {} on {port}",
                what(&self.src),
                list(isolated_by),
                self.dst,
            ),
        }
    }
}

fn list(keys: &[ObjectKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
