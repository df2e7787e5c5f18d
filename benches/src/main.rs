//! `weft-bench`: see the library docs for the method, README.md for use.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;
use weft_bench::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("weft-bench: ignoring log filter {:?}: {e}", cli.log);
        EnvFilter::new("warn,weft_bench=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match weft_bench::cli::execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: {}", weft_proto::report::chain(e.chain()));
            ExitCode::FAILURE
        }
    }
}
