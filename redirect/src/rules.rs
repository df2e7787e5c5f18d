//! The rules, and installing them idempotently through [`Runner`].
//!
//! The rules live in four chains of the nat table, per address family (iptables and
//! ip6tables), and two jumps into them:
//!
//! ```text
//! PREROUTING -p tcp → WEFT_INBOUND
//!   RETURN  for each skipped inbound port (always the proxy's admin port) and source CIDR
//!   → WEFT_INBOUND_REDIRECT: REDIRECT --to-ports <inbound port>
//! OUTPUT -p tcp → WEFT_OUTBOUND
//!   RETURN  traffic of the proxy's UID          (the proxy's own connections never loop)
//!   RETURN  -o lo                               (loopback, and the pod's own IPs: see below)
//!   RETURN  for each skipped outbound port and destination CIDR
//!   → WEFT_OUTBOUND_REDIRECT: REDIRECT --to-ports <outbound port>
//! ```
//!
//! Loopback: like linkerd-init, everything leaving through `lo` is left alone. That covers
//! 127.0.0.0/8 and ::1, and also an app dialling its own pod IP, which the kernel routes through
//! `lo`: it reaches the app directly. It must not be sent to the inbound side by a rule here:
//! the inbound proxy forwards to the original destination (the pod IP) as the proxy UID, and
//! NAT is decided once per connection in OUTPUT for locally generated traffic (PREROUTING never
//! sees it), so such a rule would either loop or do nothing. Istio instead sends the proxy's
//! own-IP traffic to its inbound port and forwards inbound to 127.0.0.6; Weft's proxy has no such
//! source address, so it follows linkerd.
//!
//! Idempotence: the chains are declared in an `iptables-restore --noflush` script, which creates
//! them or, if they exist, flushes them (both backends), and the jumps are added only when the
//! current table (read with `iptables-save`) lacks them. Running twice leaves the same table,
//! which is what a retried CNI ADD needs as much as a restarted init container.
//!
//! The iptables programs sit behind [`Runner`], so the planning is tested without root
//! ([`FakeRunner`] applies scripts to an in-memory table) and the real thing in the
//! network-namespace tests (weft-e2e's `netns_init`, weft-cni's `mesh_redirect`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::{Backend, Family, RedirectConfig};

pub const INBOUND_CHAIN: &str = "WEFT_INBOUND";
pub const INBOUND_REDIRECT_CHAIN: &str = "WEFT_INBOUND_REDIRECT";
pub const OUTBOUND_CHAIN: &str = "WEFT_OUTBOUND";
pub const OUTBOUND_REDIRECT_CHAIN: &str = "WEFT_OUTBOUND_REDIRECT";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "cannot run {program}: {source} (is iptables installed: in the init image for weft-init, on the node for weft-cni?)"
    )]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{program} failed ({status}): {stderr} (does the process have NET_ADMIN and NET_RAW in the pod's network namespace?)"
    )]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("after installing the rules, {program} does not show the {chain} jump: another program may be rewriting the nat table")]
    NotInstalled { program: String, chain: String },
    #[error("the {family:?} nat table differs from the redirect this pod should have: {what}")]
    Mismatch { family: Family, what: String },
}

fn port_match(r: &crate::ports::PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}:{}", r.lo, r.hi)
    }
}

/// The rules of Weft's four chains for `family`, in iptables-restore syntax.
pub fn chain_rules(cfg: &RedirectConfig, family: Family) -> Vec<String> {
    let in_family = |c: &&crate::ports::Cidr| c.is_ipv4() == (family == Family::V4);
    let mut r = Vec::new();
    r.push(format!(
        "-A {INBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.inbound_port
    ));
    for p in &cfg.skip_inbound_ports.0 {
        r.push(format!(
            "-A {INBOUND_CHAIN} -p tcp --dport {} -j RETURN",
            port_match(p)
        ));
    }
    for c in cfg.skip_inbound_cidrs.0.iter().filter(in_family) {
        r.push(format!("-A {INBOUND_CHAIN} -s {c} -p tcp -j RETURN"));
    }
    r.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j {INBOUND_REDIRECT_CHAIN}"
    ));

    r.push(format!(
        "-A {OUTBOUND_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    r.push(format!(
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        cfg.proxy_uid
    ));
    r.push(format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN"));
    for p in &cfg.skip_outbound_ports.0 {
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp --dport {} -j RETURN",
            port_match(p)
        ));
    }
    for c in cfg.skip_outbound_cidrs.0.iter().filter(in_family) {
        r.push(format!("-A {OUTBOUND_CHAIN} -d {c} -p tcp -j RETURN"));
    }
    r.push(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j {OUTBOUND_REDIRECT_CHAIN}"
    ));
    r
}

/// The two jumps from the built-in chains: (built-in chain, rule).
fn jumps() -> [(&'static str, String); 2] {
    [
        (
            "PREROUTING",
            format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
        ),
        ("OUTPUT", format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}")),
    ]
}

/// Whether an `iptables-save` dump has a jump from `builtin` to `chain`.
fn has_jump(save: &str, builtin: &str, chain: &str) -> bool {
    save.lines().any(|l| {
        let mut t = l.split_whitespace();
        t.next() == Some("-A")
            && t.next() == Some(builtin)
            && l.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == "-j" && w[1] == chain)
    })
}

/// The `iptables-restore --noflush` script for `family`, given the current nat table
/// (`iptables-save -t nat` output; `None` means "assume empty", as `--dry-run` does).
pub fn restore_script(cfg: &RedirectConfig, family: Family, current: Option<&str>) -> String {
    let mut s = String::from("*nat\n");
    for chain in [
        INBOUND_CHAIN,
        INBOUND_REDIRECT_CHAIN,
        OUTBOUND_CHAIN,
        OUTBOUND_REDIRECT_CHAIN,
    ] {
        // With --noflush this creates the chain, or flushes it if it exists.
        s.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in chain_rules(cfg, family) {
        s.push_str(&rule);
        s.push('\n');
    }
    let chains = [INBOUND_CHAIN, OUTBOUND_CHAIN];
    for ((builtin, rule), chain) in jumps().into_iter().zip(chains) {
        if !current.is_some_and(|save| has_jump(save, builtin, chain)) {
            s.push_str(&rule);
            s.push('\n');
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// The families `cfg` installs rules for.
pub fn families(cfg: &RedirectConfig) -> Vec<Family> {
    if cfg.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// What `--dry-run` prints: each family's script as if the table were empty.
pub fn dry_run(cfg: &RedirectConfig) -> String {
    let mut out = String::new();
    for family in families(cfg) {
        let restore = family.program(
            if cfg.backend == Backend::Legacy {
                Backend::Legacy
            } else {
                Backend::Nft
            },
            "restore",
        );
        out.push_str(&format!("# {restore} --noflush\n"));
        out.push_str(&restore_script(cfg, family, None));
    }
    out
}

/// The seam in front of the iptables programs.
pub trait Runner {
    /// `<family>-<backend>-save -t nat`.
    fn save(&mut self, backend: Backend, family: Family) -> Result<String, RedirectError>;
    /// `<family>-<backend>-restore --noflush` with `script` on stdin.
    fn restore(
        &mut self,
        backend: Backend,
        family: Family,
        script: &str,
    ) -> Result<(), RedirectError>;
}

/// Runs the real iptables programs (found on `PATH`).
#[derive(Debug, Default)]
pub struct SystemRunner;

impl SystemRunner {
    fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RedirectError> {
        let spawn_err = |source| RedirectError::Spawn {
            program: program.to_string(),
            source,
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(RedirectError::Failed {
                program: format!("{program} {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Runner for SystemRunner {
    fn save(&mut self, backend: Backend, family: Family) -> Result<String, RedirectError> {
        Self::run(&family.program(backend, "save"), &["-t", "nat"], None)
    }

    fn restore(
        &mut self,
        backend: Backend,
        family: Family,
        script: &str,
    ) -> Result<(), RedirectError> {
        Self::run(
            &family.program(backend, "restore"),
            &["--noflush"],
            Some(script),
        )
        .map(|_| ())
    }
}

fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Resolves `auto`: legacy when the legacy tables hold rules and the nft ones do not (a node
/// whose CNI or runtime set up legacy rules in the pod), nft otherwise.
pub fn detect_backend(runner: &mut dyn Runner, family: Family) -> Backend {
    let nft = runner.save(Backend::Nft, family);
    let legacy = runner.save(Backend::Legacy, family);
    match (nft, legacy) {
        (Err(_), Ok(_)) => Backend::Legacy,
        (Ok(n), Ok(l)) if count_rules(&l) > 0 && count_rules(&n) == 0 => Backend::Legacy,
        _ => Backend::Nft,
    }
}

/// Installs the rules for every family; returns the nat tables as they are afterwards.
pub fn install(
    runner: &mut dyn Runner,
    cfg: &RedirectConfig,
) -> Result<Vec<(Family, String)>, RedirectError> {
    let mut after = Vec::new();
    for family in families(cfg) {
        let backend = match cfg.backend {
            Backend::Auto => detect_backend(runner, family),
            b => b,
        };
        let current = runner.save(backend, family)?;
        let script = restore_script(cfg, family, Some(&current));
        tracing::debug!(?family, ?backend, %script, "restoring");
        runner.restore(backend, family, &script)?;
        let now = runner.save(backend, family)?;
        for (builtin, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
            if !has_jump(&now, builtin, chain) {
                return Err(RedirectError::NotInstalled {
                    program: family.program(backend, "save"),
                    chain: chain.to_string(),
                });
            }
        }
        tracing::info!(
            ?family,
            ?backend,
            rules = count_rules(&now),
            "redirect rules installed"
        );
        after.push((family, now));
    }
    Ok(after)
}

/// A rule as `iptables-save` prints it, reduced to what the rule means: the implicit `-m tcp`
/// that iptables adds for `--dport` is dropped, so planned and saved rules compare equal.
fn normalise(rule: &str) -> String {
    let tokens: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "-m" && tokens.get(i + 1) == Some(&"tcp") {
            i += 2;
            continue;
        }
        out.push(tokens[i]);
        i += 1;
    }
    out.join(" ")
}

/// The rules of Weft's chains in an `iptables-save` dump, normalised, in order.
fn weft_rules(save: &str) -> Vec<String> {
    let ours = [
        INBOUND_CHAIN,
        INBOUND_REDIRECT_CHAIN,
        OUTBOUND_CHAIN,
        OUTBOUND_REDIRECT_CHAIN,
    ];
    save.lines()
        .filter(|l| {
            let mut t = l.split_whitespace();
            t.next() == Some("-A") && t.next().is_some_and(|c| ours.contains(&c))
        })
        .map(normalise)
        .collect()
}

/// Checks that every family's nat table holds exactly the rules [`install`] would leave for
/// `cfg` in Weft's chains, and both jumps into them (CNI CHECK). Rules of other programs are
/// not looked at.
pub fn verify(runner: &mut dyn Runner, cfg: &RedirectConfig) -> Result<(), RedirectError> {
    for family in families(cfg) {
        let backend = match cfg.backend {
            Backend::Auto => detect_backend(runner, family),
            b => b,
        };
        let now = runner.save(backend, family)?;
        for (builtin, chain) in [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)] {
            if !has_jump(&now, builtin, chain) {
                return Err(RedirectError::Mismatch {
                    family,
                    what: format!("no jump from {builtin} to {chain}"),
                });
            }
        }
        // iptables keeps networks with their host bits cleared.
        let mut canonical = cfg.clone();
        for list in [
            &mut canonical.skip_inbound_cidrs,
            &mut canonical.skip_outbound_cidrs,
        ] {
            list.0 = list.0.iter().map(|c| c.network()).collect();
        }
        let mut want: Vec<String> = chain_rules(&canonical, family)
            .iter()
            .map(|r| normalise(r))
            .collect();
        let mut got = weft_rules(&now);
        // iptables-save groups rules by chain; the plan interleaves them. Order within a chain
        // matters and is kept by a stable sort on the chain name.
        let chain_of = |r: &String| r.split_whitespace().nth(1).unwrap_or_default().to_string();
        want.sort_by_key(chain_of);
        got.sort_by_key(chain_of);
        if want != got {
            return Err(RedirectError::Mismatch {
                family,
                what: format!(
                    "want rules [{}], found [{}]",
                    want.join("; "),
                    got.join("; ")
                ),
            });
        }
    }
    Ok(())
}

/// An in-memory nat table per (backend, family) that applies restore scripts with `--noflush`
/// semantics: `:CHAIN` creates or flushes a user chain, `-A` appends. For tests.
/// Chains in order, each with its rules.
type FakeTable = Vec<(String, Vec<String>)>;

#[derive(Debug, Default, Clone)]
pub struct FakeRunner {
    tables: BTreeMap<(u8, Family), FakeTable>,
    /// Every script restored, in order.
    pub restored: Vec<(Family, String)>,
}

impl FakeRunner {
    fn key(backend: Backend) -> u8 {
        match backend {
            Backend::Legacy => 1,
            _ => 0,
        }
    }

    fn table(&mut self, backend: Backend, family: Family) -> &mut FakeTable {
        self.tables
            .entry((Self::key(backend), family))
            .or_insert_with(|| {
                ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
                    .iter()
                    .map(|c| (c.to_string(), Vec::new()))
                    .collect()
            })
    }
}

impl Runner for FakeRunner {
    fn save(&mut self, backend: Backend, family: Family) -> Result<String, RedirectError> {
        let t = self.table(backend, family);
        let mut s = String::from("*nat\n");
        for (i, (chain, _)) in t.iter().enumerate() {
            let policy = if i < 4 { "ACCEPT" } else { "-" };
            s.push_str(&format!(":{chain} {policy} [0:0]\n"));
        }
        for (_, rules) in t.iter() {
            for r in rules {
                s.push_str(r);
                s.push('\n');
            }
        }
        s.push_str("COMMIT\n");
        Ok(s)
    }

    fn restore(
        &mut self,
        backend: Backend,
        family: Family,
        script: &str,
    ) -> Result<(), RedirectError> {
        self.restored.push((family, script.to_string()));
        let t = self.table(backend, family);
        for line in script.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let chain = decl
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                match t.iter_mut().find(|(c, _)| *c == chain) {
                    Some((_, rules)) => rules.clear(),
                    None => t.push((chain, Vec::new())),
                }
            } else if line.starts_with("-A ") {
                let chain = line.split_whitespace().nth(1).unwrap_or_default();
                match t.iter_mut().find(|(c, _)| c == chain) {
                    Some((_, rules)) => rules.push(line.to_string()),
                    None => {
                        return Err(RedirectError::Failed {
                            program: "fake-restore".into(),
                            status: "exit status: 2".into(),
                            stderr: format!("chain {chain} does not exist"),
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_detection_tolerates_iptables_save_formatting() {
        let save = "-A PREROUTING -p tcp -m tcp -j WEFT_INBOUND\n-A OUTPUT -j OTHER\n";
        assert!(has_jump(save, "PREROUTING", INBOUND_CHAIN));
        assert!(!has_jump(save, "OUTPUT", OUTBOUND_CHAIN));
        assert!(!has_jump(
            "-A OUTPUT -j WEFT_OUTBOUND_REDIRECT",
            "OUTPUT",
            OUTBOUND_CHAIN
        ));
    }

    #[test]
    fn cidrs_go_to_their_family() {
        let cfg = RedirectConfig {
            skip_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse().unwrap_or_default(),
            ..Default::default()
        };
        let v4 = chain_rules(&cfg, Family::V4).join("\n");
        let v6 = chain_rules(&cfg, Family::V6).join("\n");
        assert!(v4.contains("-d 10.0.0.0/8") && !v4.contains("fd00::/8"));
        assert!(v6.contains("-d fd00::/8") && !v6.contains("10.0.0.0/8"));
    }
}
