//! Applying a Resolve stream's updates to the endpoint set: pure, no I/O.
//!
//! The controller sends the full state first (one `Add` with every endpoint, or
//! `NoEndpoints`), then changes. The first message of every stream *replaces* what the proxy
//! knew (a reconnect may have missed removals); later messages edit it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use weft_proto::destination::{update, ProtocolHint, Update};

use super::{EndpointMeta, Resolution};

/// What one stream has told the proxy so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StreamState {
    /// Nothing yet on this stream.
    #[default]
    Empty,
    /// The controller does not know the target.
    NotFound,
    /// The target exists; these are its endpoints (possibly none).
    Endpoints(BTreeMap<SocketAddr, EndpointMeta>),
}

/// How an update was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Endpoints in the update that had no valid address (skipped).
    pub invalid: usize,
}

impl StreamState {
    /// Applies `update`; `first` marks the first message of a stream (replaces the state).
    pub fn apply(&mut self, update: Update, first: bool) -> Applied {
        let mut applied = Applied::default();
        if first {
            *self = StreamState::Endpoints(BTreeMap::new());
        }
        match update.update {
            Some(update::Update::Add(add)) => {
                let set = self.endpoints_mut();
                for ep in add.endpoints {
                    match ep.socket_addr() {
                        Ok(addr) => {
                            set.insert(addr, meta(addr, &ep));
                        }
                        Err(_) => applied.invalid += 1,
                    }
                }
            }
            Some(update::Update::Remove(remove)) => {
                if let StreamState::Endpoints(set) = self {
                    for a in &remove.addrs {
                        match a.to_socket_addr() {
                            Ok(addr) => {
                                set.remove(&addr);
                            }
                            Err(_) => applied.invalid += 1,
                        }
                    }
                }
            }
            Some(update::Update::NoEndpoints(n)) => {
                *self = if n.exists {
                    StreamState::Endpoints(BTreeMap::new())
                } else {
                    StreamState::NotFound
                };
            }
            None => {}
        }
        applied
    }

    fn endpoints_mut(&mut self) -> &mut BTreeMap<SocketAddr, EndpointMeta> {
        if !matches!(self, StreamState::Endpoints(_)) {
            *self = StreamState::Endpoints(BTreeMap::new());
        }
        match self {
            StreamState::Endpoints(set) => set,
            // Just set above.
            _ => unreachable!("state was set to Endpoints"),
        }
    }

    /// What routing sees; `None` before the stream said anything.
    pub fn resolution(&self) -> Option<Resolution> {
        match self {
            StreamState::Empty => None,
            StreamState::NotFound => Some(Resolution::DoesNotExist),
            StreamState::Endpoints(set) => Some(Resolution::Endpoints(
                set.values().cloned().collect::<Vec<_>>().into(),
            )),
        }
    }
}

fn meta(addr: SocketAddr, ep: &weft_proto::destination::Endpoint) -> EndpointMeta {
    EndpointMeta {
        addr,
        weight: ep.weight.max(1),
        identity: ep
            .tls_identity
            .as_ref()
            .map(|t| Arc::<str>::from(t.spiffe_id.as_str())),
        h2_hint: ep.protocol_hint == ProtocolHint::H2 as i32,
        opaque_hint: ep.protocol_hint == ProtocolHint::Opaque as i32,
        zone: Arc::from(ep.zone.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::destination::{AddEndpoints, Endpoint, NoEndpoints, RemoveEndpoints};
    use weft_proto::net::TcpAddress;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn add(addrs: &[&str]) -> Update {
        Update {
            update: Some(update::Update::Add(AddEndpoints {
                endpoints: addrs
                    .iter()
                    .map(|a| Endpoint {
                        addr: Some(addr(a).into()),
                        weight: 0,
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }
    fn remove(addrs: &[&str]) -> Update {
        Update {
            update: Some(update::Update::Remove(RemoveEndpoints {
                addrs: addrs.iter().map(|a| addr(a).into()).collect(),
            })),
        }
    }
    fn none(exists: bool) -> Update {
        Update {
            update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
        }
    }
    fn addrs(s: &StreamState) -> Option<Vec<String>> {
        match s.resolution()? {
            Resolution::Endpoints(eps) => Some(eps.iter().map(|e| e.addr.to_string()).collect()),
            Resolution::DoesNotExist => Some(vec!["<none>".into()]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn table() {
        // (steps of (update, first), expected addresses after the last step)
        let a = "10.0.0.1:80";
        let b = "10.0.0.2:80";
        let c = "10.0.0.3:80";
        type Case<'a> = (Vec<(Update, bool)>, Option<Vec<&'a str>>);
        let cases: Vec<Case> = vec![
            (vec![], None),
            (vec![(add(&[a, b]), true)], Some(vec![a, b])),
            (
                vec![(add(&[a, b]), true), (add(&[c]), false)],
                Some(vec![a, b, c]),
            ),
            (
                vec![(add(&[a, b]), true), (remove(&[a]), false)],
                Some(vec![b]),
            ),
            (
                vec![(add(&[a, b]), true), (remove(&[a, b]), false)],
                Some(vec![]),
            ),
            (vec![(none(true), true)], Some(vec![])),
            (vec![(none(false), true)], Some(vec!["<none>"])),
            (vec![(none(false), true), (add(&[a]), false)], Some(vec![a])),
            (
                vec![(add(&[a]), true), (none(false), false)],
                Some(vec!["<none>"]),
            ),
            (vec![(add(&[a]), true), (none(true), false)], Some(vec![])),
            // A reconnect's first message replaces what an earlier stream said.
            (vec![(add(&[a, b]), true), (add(&[c]), true)], Some(vec![c])),
            (vec![(none(false), true), (add(&[b]), true)], Some(vec![b])),
            // Add replaces an endpoint with the same address.
            (vec![(add(&[a]), true), (add(&[a]), false)], Some(vec![a])),
            // Removing what is not there changes nothing.
            (
                vec![(add(&[a]), true), (remove(&[c]), false)],
                Some(vec![a]),
            ),
        ];
        for (i, (steps, want)) in cases.into_iter().enumerate() {
            let mut s = StreamState::default();
            for (u, first) in steps {
                s.apply(u, first);
            }
            let want = want.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(addrs(&s), want, "case {i}");
        }
    }

    #[test]
    fn invalid_addresses_are_skipped_and_counted() {
        let mut s = StreamState::default();
        let bad = Update {
            update: Some(update::Update::Add(AddEndpoints {
                endpoints: vec![
                    Endpoint {
                        addr: Some(TcpAddress {
                            ip: vec![1, 2, 3],
                            port: 80,
                        }),
                        ..Default::default()
                    },
                    Endpoint::default(),
                    Endpoint {
                        addr: Some(addr("10.0.0.1:80").into()),
                        weight: 3,
                        protocol_hint: ProtocolHint::H2 as i32,
                        ..Default::default()
                    },
                ],
            })),
        };
        assert_eq!(s.apply(bad, true).invalid, 2);
        match s.resolution() {
            Some(Resolution::Endpoints(eps)) => {
                assert_eq!(eps.len(), 1);
                assert_eq!(eps[0].weight, 3);
                assert!(eps[0].h2_hint);
            }
            other => panic!("{other:?}"),
        }
    }
}
