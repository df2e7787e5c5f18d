//! The metrics exposition every Weft component serves: OpenMetrics to scrapers that ask for it
//! (`Accept: application/openmetrics-text`), Prometheus text format 0.0.4 to everyone else.
//!
//! prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
//! Prometheus' classic text format (what `promtool check metrics`, `curl` and older scrapers
//! read) names the family `x_total` and has no `# UNIT` or `# EOF` lines. This rewrites one
//! into the other. Shared by the proxy, the controller and the CNI agent (it is a wire format,
//! hence this crate), so the conversion is written once.

/// `Content-Type` of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of a Prometheus text format 0.0.4 answer.
pub const PROM_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and `Content-Type` to answer a scrape whose `Accept` header is `accept`, from the
/// OpenMetrics text `openmetrics`.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (String, &'static str) {
    if accept.is_some_and(|v| v.contains("application/openmetrics-text")) {
        (openmetrics, OPENMETRICS)
    } else {
        (openmetrics_to_prometheus(&openmetrics), PROM_TEXT)
    }
}

/// Converts OpenMetrics text to Prometheus text format 0.0.4.
pub fn openmetrics_to_prometheus(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut pending_help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(h) = pending_help.take() {
                out.push_str(h);
                out.push('\n');
            }
            pending_help = Some(line);
            let _ = rest;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.splitn(2, ' ');
            let name = parts.next().unwrap_or_default();
            let ty = parts.next().unwrap_or_default();
            let (name, ty) = match ty {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                "gaugehistogram" | "stateset" | "info" => (name.to_string(), "untyped"),
                _ => (name.to_string(), ty),
            };
            if let Some(h) = pending_help.take() {
                let help = h
                    .strip_prefix("# HELP ")
                    .and_then(|r| r.split_once(' ').map(|(_, text)| text))
                    .unwrap_or("");
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {ty}\n"));
            continue;
        }
        if let Some(h) = pending_help.take() {
            out.push_str(h);
            out.push('\n');
        }
        // Exemplars (`value # {..} v`) are OpenMetrics-only.
        match line.find(" # {") {
            Some(i) if !line.starts_with('#') => out.push_str(&line[..i]),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_for_those_who_ask() {
        let om = "# TYPE c counter\nc_total 1\n# EOF\n".to_string();
        assert_eq!(
            negotiate(
                Some("application/openmetrics-text;version=1.0.0"),
                om.clone()
            )
            .1,
            OPENMETRICS
        );
        let (body, ct) = negotiate(Some("text/plain"), om.clone());
        assert_eq!(
            (body.as_str(), ct),
            ("# TYPE c_total counter\nc_total 1\n", PROM_TEXT)
        );
        assert_eq!(negotiate(None, om).1, PROM_TEXT);
    }

    #[test]
    fn renames_counters_and_drops_openmetrics_lines() {
        let om = "# HELP reqs Requests.\n# TYPE reqs counter\n# UNIT reqs bytes\nreqs_total{a=\"b\"} 3 # {trace=\"1\"} 1.0\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let p = openmetrics_to_prometheus(om);
        assert_eq!(
            p,
            "# HELP reqs_total Requests.\n# TYPE reqs_total counter\nreqs_total{a=\"b\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
