//! Logging for the injector's binaries: one init function, so `weft-injector` and `weft-init`
//! treat their log filter the same way.

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?} (expected tracing's EnvFilter syntax, e.g. warn,weft=info): {reason}")]
pub struct FilterError {
    pub filter: String,
    pub reason: String,
}

/// Installs the global subscriber: lines on stderr (JSON objects with `json`, else plain text,
/// coloured only on a terminal), filtered by `filter`. A filter that does not parse is an error
/// for the caller to report, not a silent fallback.
pub fn init(filter: &str, json: bool) -> Result<(), FilterError> {
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| FilterError {
        filter: filter.to_string(),
        reason: e.to_string(),
    })?;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_filters_are_errors_naming_the_filter() {
        let e = super::init("weft=notalevel", false).unwrap_err();
        assert!(e.to_string().contains("weft=notalevel"), "{e}");
    }
}
