//! Running `weft-proxy` for a scenario. The contract: listen addresses and
//! fixed forward targets come from the environment (no iptables on
//! loopback, so no SO_ORIGINAL_DST), readiness is `GET /ready` on the admin
//! port, SIGTERM stops it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

pub const OUTBOUND_ADDR: &str = "WEFT_PROXY_OUTBOUND_ADDR";
pub const INBOUND_ADDR: &str = "WEFT_PROXY_INBOUND_ADDR";
pub const ADMIN_ADDR: &str = "WEFT_PROXY_ADMIN_ADDR";
pub const OUTBOUND_FIXED_TARGET: &str = "WEFT_PROXY_OUTBOUND_FIXED_TARGET";
pub const INBOUND_FIXED_TARGET: &str = "WEFT_PROXY_INBOUND_FIXED_TARGET";
pub const LOG: &str = "WEFT_PROXY_LOG";

/// The three listeners of one proxy, each on its own loopback port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Where a proxy forwards what its listeners accept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FixedTargets {
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
}

/// The environment of one proxy.
pub fn proxy_env(addrs: &ProxyAddrs, targets: &FixedTargets) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (OUTBOUND_ADDR, addrs.outbound.to_string()),
        (INBOUND_ADDR, addrs.inbound.to_string()),
        (ADMIN_ADDR, addrs.admin.to_string()),
        (LOG, "warn".to_owned()),
    ];
    if let Some(t) = targets.outbound {
        env.push((OUTBOUND_FIXED_TARGET, t.to_string()));
    }
    if let Some(t) = targets.inbound {
        env.push((INBOUND_FIXED_TARGET, t.to_string()));
    }
    env
}

/// The command that runs the proxy with `env`, and nothing else of ours:
/// every `WEFT_PROXY_*` variable of the bench's own environment is removed
/// so a developer's shell cannot change the measured configuration.
pub fn command(bin: &Path, env: &[(&'static str, String)]) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WEFT_PROXY_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// The proxies of weft1 and weft2.
///
/// weft1: load → A.outbound → server.
/// weft2: load → A.outbound → B.inbound → server.
pub fn chain(hops: usize, server: SocketAddr, addrs: &[ProxyAddrs]) -> Vec<FixedTargets> {
    match hops {
        1 => vec![FixedTargets {
            outbound: Some(server),
            inbound: None,
        }],
        _ => vec![
            FixedTargets {
                outbound: addrs.get(1).map(|b| b.inbound),
                inbound: None,
            },
            FixedTargets {
                outbound: None,
                inbound: Some(server),
            },
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn proxies() -> Vec<ProxyAddrs> {
        vec![
            ProxyAddrs {
                outbound: a(1),
                inbound: a(2),
                admin: a(3),
            },
            ProxyAddrs {
                outbound: a(4),
                inbound: a(5),
                admin: a(6),
            },
        ]
    }

    #[test]
    fn one_hop_forwards_outbound_to_the_server() {
        let targets = chain(1, a(9), &proxies()[..1]);
        assert_eq!(
            targets,
            vec![FixedTargets {
                outbound: Some(a(9)),
                inbound: None
            }]
        );
        let env = proxy_env(&proxies()[0], &targets[0]);
        assert!(env.contains(&(OUTBOUND_ADDR, "127.0.0.1:1".into())));
        assert!(env.contains(&(INBOUND_ADDR, "127.0.0.1:2".into())));
        assert!(env.contains(&(ADMIN_ADDR, "127.0.0.1:3".into())));
        assert!(env.contains(&(OUTBOUND_FIXED_TARGET, "127.0.0.1:9".into())));
        assert!(env.contains(&(LOG, "warn".into())));
        assert!(!env.iter().any(|(k, _)| *k == INBOUND_FIXED_TARGET));
    }

    #[test]
    fn two_hops_go_client_outbound_then_server_inbound() {
        let p = proxies();
        let targets = chain(2, a(9), &p);
        assert_eq!(
            targets[0],
            FixedTargets {
                outbound: Some(p[1].inbound),
                inbound: None
            }
        );
        assert_eq!(
            targets[1],
            FixedTargets {
                outbound: None,
                inbound: Some(a(9))
            }
        );
    }
}
