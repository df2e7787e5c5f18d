//! `weft-proxy`: parse the environment, start logging, build the runtime, run the library.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use weft_proxy::config::Config;

fn main() -> ExitCode {
    // The proxy takes no arguments; these two answer and exit before anything is bound.
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--help" | "-h" | "help") => {
            print!("{}", weft_proxy::config::help());
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("weft-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("weft-proxy: unexpected argument {other:?}: the proxy is configured by WEFT_PROXY_* variables (weft-proxy --help lists them)");
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let logs = match weft_proxy::telemetry::init(&config.log_filter, config.log_format) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("weft-proxy: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // One core's worth of work by default: a sidecar shares the node with its app.
    let runtime = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-proxy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let bound = match weft_proxy::Bound::bind(config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("weft-proxy: {e}");
                return ExitCode::from(1);
            }
        };
        let shutdown = CancellationToken::new();
        if let Err(e) = weft_proxy::cancel_on_signals(shutdown.clone()) {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(1);
        }
        match bound.serve(shutdown, logs).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-proxy: {e}");
                ExitCode::from(1)
            }
        }
    })
}
