//! `weft-cni-agent`: parse the configuration, set up logging, run the agent.

use std::process::ExitCode;

use clap::Parser;
use weft_cni_agent::Config;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = weft_cni_agent::run::init_tracing(&config.log, &config.log_format) {
        eprintln!("weft-cni-agent: {e}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-cni-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = weft_cni_agent::run::run(config) => r.map_err(anyhow::Error::from),
            _ = shutdown() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-cni-agent: {}", weft_proto::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
