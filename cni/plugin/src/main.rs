//! The `weft-cni` binary: what a container runtime runs. Reads the network
//! configuration from stdin and the `CNI_*` environment, prints the result or
//! the spec's error object on stdout, and exits non-zero on error.

use std::io::{Read, Write};

use weft_cni::env::EnvMap;
use weft_cni::error::Error;

fn main() {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => {
            let env: EnvMap = std::env::vars_os()
                .filter_map(|(k, v)| {
                    Some((k.into_string().ok()?, v.to_string_lossy().into_owned()))
                })
                .filter(|(k, _)| k.starts_with("CNI_"))
                .collect();
            weft_cni::run(&env, &stdin)
        }
        Err(source) => {
            let e = Error::Io {
                what: "reading the network configuration from stdin".into(),
                source,
            };
            let obj = e.to_object(weft_cni::version::LATEST);
            weft_cni::Outcome {
                stdout: serde_json::to_string(&obj).unwrap_or_default(),
                exit_code: 1,
            }
        }
    };
    let mut out = std::io::stdout().lock();
    // Nothing to do if stdout is gone: the runtime stopped listening.
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.exit_code);
}
