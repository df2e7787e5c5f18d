//! `weft-init`: installs Weft's redirect rules in the current network namespace (the pod's,
//! as an init container) and exits. See the `weft_redirect` docs for the rules; the weft-cni
//! plugin installs the same ones, from the same code, when the injector runs in CNI mode.

use std::process::ExitCode;

use clap::Parser;
use weft_redirect::config::env;
use weft_redirect::ports::{CidrList, PortList};
use weft_redirect::{Backend, RedirectConfig, SystemRunner};

#[derive(Debug, Parser)]
#[command(
    name = "weft-init",
    version,
    about = "Install Weft's iptables redirect in this network namespace"
)]
struct Args {
    /// iptables backend: nft, legacy, or auto (legacy only if the namespace already has legacy
    /// rules and no nft ones).
    #[arg(long, value_enum, env = env::BACKEND, default_value = "auto")]
    backend: Backend,
    /// The proxy's UID: its traffic is never redirected.
    #[arg(long, env = env::PROXY_UID, default_value_t = 2102)]
    proxy_uid: u32,
    /// Where inbound TCP is redirected (the proxy's inbound port).
    #[arg(long, env = env::INBOUND_PORT, default_value_t = 4143)]
    inbound_port: u16,
    /// Where outbound TCP is redirected (the proxy's outbound port).
    #[arg(long, env = env::OUTBOUND_PORT, default_value_t = 4140)]
    outbound_port: u16,
    /// Incoming TCP to these ports bypasses the proxy ("25,3306,8000-8100").
    #[arg(long, env = env::SKIP_INBOUND_PORTS, default_value = "")]
    skip_inbound_ports: PortList,
    /// Outgoing TCP to these ports bypasses the proxy.
    #[arg(long, env = env::SKIP_OUTBOUND_PORTS, default_value = "")]
    skip_outbound_ports: PortList,
    /// Incoming TCP from these networks bypasses the proxy ("10.0.0.0/8,fd00::/8").
    #[arg(long, env = env::SKIP_INBOUND_CIDRS, default_value = "")]
    skip_inbound_cidrs: CidrList,
    /// Outgoing TCP to these networks bypasses the proxy.
    #[arg(long, env = env::SKIP_OUTBOUND_CIDRS, default_value = "")]
    skip_outbound_cidrs: CidrList,
    /// Install IPv6 rules too.
    #[arg(long, env = env::IPV6, default_value_t = true, action = clap::ArgAction::Set)]
    ipv6: bool,
    /// Print the rules (iptables-restore format) and change nothing.
    #[arg(long, env = env::DRY_RUN)]
    dry_run: bool,
    /// Log filter.
    #[arg(long, env = env::LOG, default_value = "warn,weft=info,weft_injector=info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // An init container: plain lines, coloured only on a terminal.
    if let Err(e) = weft_injector::telemetry::init(&args.log, false) {
        eprintln!("{}: {e}", env!("CARGO_BIN_NAME"));
        return ExitCode::from(2);
    }
    let cfg = RedirectConfig {
        proxy_uid: args.proxy_uid,
        inbound_port: args.inbound_port,
        outbound_port: args.outbound_port,
        skip_inbound_ports: args.skip_inbound_ports,
        skip_outbound_ports: args.skip_outbound_ports,
        skip_inbound_cidrs: args.skip_inbound_cidrs,
        skip_outbound_cidrs: args.skip_outbound_cidrs,
        ipv6: args.ipv6,
        backend: args.backend,
    };
    if args.dry_run {
        print!("{}", weft_redirect::dry_run(&cfg));
        return ExitCode::SUCCESS;
    }
    match weft_redirect::install(&mut SystemRunner, &cfg) {
        Ok(tables) => {
            for (family, table) in tables {
                eprintln!("weft-init: {family:?} nat table:\n{table}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-init: {e}");
            ExitCode::FAILURE
        }
    }
}
