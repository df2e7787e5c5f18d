//! Reading a proxy's `/metrics` (Prometheus text format 0.0.4) after a run, to check what the
//! traffic really did: that `weft2-mtls` went over mutual TLS with the expected peers and
//! reused its connections, that `weft2-disc` was routed by discovery. Only what those checks
//! need: samples with their labels; comments, timestamps and malformed lines are skipped.

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(label, value)` of `want` is among this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Parses the label set between `{` and `}` (escapes `\\`, `\"`, `\n`).
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.trim_start().strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        let after_value = &after.trim_start()[1 + end + 1..];
        rest = after_value.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(labels)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            // The closing brace is the last one: label values cannot hold an unescaped `}`
            // that matters here, and values come before it.
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

/// Every sample of a scrape.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The sum over the series of `name` that carry every label of `want`; 0 when none does.
pub fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.has_labels(want))
        // Not `.sum()`: a float sum of nothing is −0.
        .fold(0.0, |total, s| total + s.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP weft_tls_connections_total TLS connections.
# TYPE weft_tls_connections_total counter
weft_tls_connections_total{direction="inbound",tls="true",peer_id="spiffe://cluster.local/ns/bench/sa/client"} 3
weft_tls_connections_total{direction="inbound",tls="false",peer_id=""} 7
weft_tls_connections_total{tls="true",direction="inbound",peer_id="spiffe://cluster.local/ns/bench/sa/other"} 2
weft_outbound_routes_total{protocol="http",route="balanced"} 1.5e3
weft_odd{msg="a \"quoted\", comma\\ and } brace"} 4 1700000000000
process_start_time_seconds 1.7e9
not a sample
broken{x="1"} nan-ish
"#;

    #[test]
    fn parses_samples_and_labels() {
        let samples = parse(SCRAPE);
        assert_eq!(samples.len(), 6, "{samples:?}");
        assert_eq!(samples[0].name, "weft_tls_connections_total");
        assert_eq!(
            samples[0].labels,
            vec![
                ("direction".to_owned(), "inbound".to_owned()),
                ("tls".to_owned(), "true".to_owned()),
                (
                    "peer_id".to_owned(),
                    "spiffe://cluster.local/ns/bench/sa/client".to_owned()
                ),
            ]
        );
        assert_eq!(samples[4].labels[0].1, "a \"quoted\", comma\\ and } brace");
        assert_eq!(samples[4].value, 4.0);
        assert_eq!(samples[5].name, "process_start_time_seconds");
        assert!(samples[5].labels.is_empty());
    }

    #[test]
    fn sums_matching_series_in_any_label_order() {
        let samples = parse(SCRAPE);
        let name = "weft_tls_connections_total";
        assert_eq!(
            sum(
                &samples,
                name,
                &[
                    ("direction", "inbound"),
                    ("tls", "true"),
                    ("peer_id", "spiffe://cluster.local/ns/bench/sa/client")
                ]
            ),
            3.0
        );
        assert_eq!(
            sum(&samples, name, &[("direction", "inbound"), ("tls", "true")]),
            5.0
        );
        assert_eq!(sum(&samples, name, &[]), 12.0);
        assert_eq!(sum(&samples, name, &[("direction", "outbound")]), 0.0);
        assert_eq!(sum(&samples, "missing_total", &[]).to_string(), "0");
        assert_eq!(
            sum(
                &samples,
                "weft_outbound_routes_total",
                &[("route", "balanced")]
            ),
            1500.0
        );
    }

    #[test]
    fn malformed_label_sets_are_skipped() {
        assert!(parse("x{a=\"1} 2\n").is_empty());
        assert!(parse("x{a=1} 2\n").is_empty());
        assert_eq!(parse("x{} 2\n")[0].value, 2.0);
    }
}
