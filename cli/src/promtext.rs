//! A parser for the subset of the Prometheus text exposition format (and its
//! OpenMetrics sibling, which `prometheus-client` writes) that the CLI reads
//! from a proxy's admin `/metrics` endpoint.
//!
//! It understands sample lines (`name{label="value",...} value [timestamp]`),
//! label values with `\\`, `\"` and `\n` escapes, the special values `+Inf`,
//! `-Inf` and `NaN`, OpenMetrics exemplars (` # {..} value`, ignored), comment
//! lines (`# HELP`, `# TYPE`, `# UNIT`, anything else after `#`) and the
//! OpenMetrics `# EOF` terminator. Metric metadata is not kept: the CLI knows
//! the shape of the metrics it reads.
//!
//! The input comes over the network from another process, so every malformed
//! line is an error naming the line, never a panic.

use std::fmt;

/// One sample: a metric name, its labels in the order they were written, and
/// a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Prometheus writes integer milliseconds, OpenMetrics float seconds; the
    /// number is kept as written.
    pub timestamp: Option<f64>,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a line of an exposition could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("metrics line {line}: {kind}")]
pub struct ParseError {
    /// 1-based line number in the exposition.
    pub line: usize,
    pub kind: ParseErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error("expected a metric name")]
    MissingName,
    #[error("expected a label name")]
    MissingLabelName,
    #[error("label {0:?}: expected `=` after the label name")]
    MissingEquals(String),
    #[error("label {0:?}: expected a double-quoted value")]
    MissingQuote(String),
    #[error("label {0:?}: the value is not closed by a double quote")]
    UnterminatedLabelValue(String),
    #[error("label {label:?}: unknown escape sequence `\\{escape}`")]
    BadEscape { label: String, escape: char },
    #[error("label {0:?} appears twice")]
    DuplicateLabel(String),
    #[error("expected `,` or `}}` after a label, found {0:?}")]
    BadLabelSeparator(char),
    #[error("the label set is not closed by `}}`")]
    UnterminatedLabels,
    #[error("expected a value after the metric name")]
    MissingValue,
    #[error("{0:?} is not a number")]
    BadValue(String),
    #[error("{0:?} is not a timestamp")]
    BadTimestamp(String),
    #[error("unexpected text after the sample: {0:?}")]
    TrailingText(String),
    #[error("text after `# EOF`")]
    AfterEof,
}

/// Parse a whole exposition into its samples, in order.
///
/// Fails on the first malformed line; a scrape is all or nothing so that a
/// half-read snapshot is never mistaken for a counter reset.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    let mut eof = false;
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim_end_matches('\r').trim();
        if line.is_empty() {
            continue;
        }
        if eof {
            return Err(ParseError {
                line: line_no,
                kind: ParseErrorKind::AfterEof,
            });
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment.trim() == "EOF" {
                eof = true;
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|kind| ParseError {
            line: line_no,
            kind,
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

/// Parse one sample line (already trimmed, not a comment).
pub fn parse_sample(line: &str) -> Result<Sample, ParseErrorKind> {
    let mut cur = Cursor::new(line);
    let name = cur.take_while(is_name_char);
    if name.is_empty() || !name.starts_with(is_name_start) {
        return Err(ParseErrorKind::MissingName);
    }
    let name = name.to_string();
    cur.skip_blanks();
    let labels = if cur.peek() == Some('{') {
        cur.bump();
        parse_labels(&mut cur)?
    } else {
        Vec::new()
    };
    cur.skip_blanks();

    let value_text = cur.take_while(|c| !is_blank(c));
    if value_text.is_empty() {
        return Err(ParseErrorKind::MissingValue);
    }
    let value =
        parse_value(value_text).ok_or_else(|| ParseErrorKind::BadValue(value_text.into()))?;
    cur.skip_blanks();

    let mut timestamp = None;
    if !cur.is_empty() && cur.peek() != Some('#') {
        let ts_text = cur.take_while(|c| !is_blank(c));
        let ts = parse_value(ts_text)
            .filter(|t| t.is_finite())
            .ok_or_else(|| ParseErrorKind::BadTimestamp(ts_text.into()))?;
        timestamp = Some(ts);
        cur.skip_blanks();
    }
    // An OpenMetrics exemplar (` # {trace_id="..."} 0.5 [ts]`) may follow; the
    // CLI has no use for it. Outside the label set a `#` cannot be anything else.
    if !cur.is_empty() && cur.peek() != Some('#') {
        return Err(ParseErrorKind::TrailingText(cur.rest().into()));
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp,
    })
}

/// Labels after the opening `{`, up to and including the closing `}`.
fn parse_labels(cur: &mut Cursor<'_>) -> Result<Vec<(String, String)>, ParseErrorKind> {
    let mut labels: Vec<(String, String)> = Vec::new();
    loop {
        cur.skip_blanks();
        match cur.peek() {
            None => return Err(ParseErrorKind::UnterminatedLabels),
            Some('}') => {
                cur.bump();
                return Ok(labels);
            }
            Some(_) => {}
        }
        let key = cur.take_while(is_label_char);
        if key.is_empty() || !key.starts_with(is_label_start) {
            return Err(ParseErrorKind::MissingLabelName);
        }
        let key = key.to_string();
        cur.skip_blanks();
        if cur.bump() != Some('=') {
            return Err(ParseErrorKind::MissingEquals(key));
        }
        cur.skip_blanks();
        if cur.bump() != Some('"') {
            return Err(ParseErrorKind::MissingQuote(key));
        }
        let value = parse_label_value(cur, &key)?;
        if labels.iter().any(|(k, _)| *k == key) {
            return Err(ParseErrorKind::DuplicateLabel(key));
        }
        labels.push((key, value));
        cur.skip_blanks();
        match cur.bump() {
            Some(',') => {}
            Some('}') => return Ok(labels),
            Some(other) => return Err(ParseErrorKind::BadLabelSeparator(other)),
            None => return Err(ParseErrorKind::UnterminatedLabels),
        }
    }
}

/// A label value after its opening quote, up to and including the closing one.
fn parse_label_value(cur: &mut Cursor<'_>, key: &str) -> Result<String, ParseErrorKind> {
    let mut value = String::new();
    loop {
        match cur.bump() {
            None => return Err(ParseErrorKind::UnterminatedLabelValue(key.into())),
            Some('"') => return Ok(value),
            Some('\\') => match cur.bump() {
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('n') => value.push('\n'),
                Some(escape) => {
                    return Err(ParseErrorKind::BadEscape {
                        label: key.into(),
                        escape,
                    })
                }
                None => return Err(ParseErrorKind::UnterminatedLabelValue(key.into())),
            },
            Some(c) => value.push(c),
        }
    }
}

/// A sample value: a float in Go's syntax, or one of the spellings of
/// infinity and NaN that Prometheus and OpenMetrics write.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        // Rust's float parser also accepts "infinity" and friends; they are not
        // valid exposition values, so only plain numbers reach it.
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
        {
            text.parse().ok()
        }
        _ => None,
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn is_label_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A forward-only reader over one line.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Self { rest: text }
    }

    fn peek(&self) -> Option<char> {
        self.rest.chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.rest = &self.rest[c.len_utf8()..];
        Some(c)
    }

    fn take_while(&mut self, pred: impl Fn(char) -> bool) -> &'a str {
        let end = self
            .rest
            .char_indices()
            .find(|&(_, c)| !pred(c))
            .map_or(self.rest.len(), |(i, _)| i);
        let (taken, rest) = self.rest.split_at(end);
        self.rest = rest;
        taken
    }

    fn skip_blanks(&mut self) {
        self.take_while(is_blank);
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn rest(&self) -> &'a str {
        self.rest
    }
}

/// Writes a sample back in exposition syntax (used by tests and handy when
/// printing a sample in an error message).
impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}=\"")?;
                for c in v.chars() {
                    match c {
                        '\\' => f.write_str("\\\\")?,
                        '"' => f.write_str("\\\"")?,
                        '\n' => f.write_str("\\n")?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("\"")?;
            }
            f.write_str("}")?;
        }
        if self.value.is_nan() {
            f.write_str(" NaN")?;
        } else if self.value == f64::INFINITY {
            f.write_str(" +Inf")?;
        } else if self.value == f64::NEG_INFINITY {
            f.write_str(" -Inf")?;
        } else {
            write!(f, " {:?}", self.value)?;
        }
        if let Some(ts) = self.timestamp {
            write!(f, " {ts:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `prometheus-client` 0.26 writes for the proxy's metrics (shape
    /// taken from its encoder, values made up).
    const PROXY_EXPOSITION: &str = r#"# HELP weft_http_requests Requests received by the proxy.
# TYPE weft_http_requests counter
weft_http_requests_total{direction="outbound",authority="books.demo.svc.cluster.local:8080"} 120
weft_http_requests_total{direction="inbound",authority="books.demo.svc.cluster.local:8080"} 0
# HELP weft_http_responses Responses sent by the proxy.
# TYPE weft_http_responses counter
weft_http_responses_total{direction="outbound",authority="books.demo.svc.cluster.local:8080",status_code="200",classification="success"} 118
weft_http_responses_total{direction="outbound",authority="books.demo.svc.cluster.local:8080",status_code="500",classification="failure"} 2
# HELP weft_http_response_duration_seconds Time to response headers.
# TYPE weft_http_response_duration_seconds histogram
# UNIT weft_http_response_duration_seconds seconds
weft_http_response_duration_seconds_sum{direction="outbound",authority="books.demo.svc.cluster.local:8080",classification="success"} 0.4012
weft_http_response_duration_seconds_count{direction="outbound",authority="books.demo.svc.cluster.local:8080",classification="success"} 118
weft_http_response_duration_seconds_bucket{le="0.001",direction="outbound",authority="books.demo.svc.cluster.local:8080",classification="success"} 0
weft_http_response_duration_seconds_bucket{direction="outbound",authority="books.demo.svc.cluster.local:8080",classification="success",le="0.005"} 110
weft_http_response_duration_seconds_bucket{direction="outbound",authority="books.demo.svc.cluster.local:8080",classification="success",le="+Inf"} 118
# HELP weft_tcp_connections_open TCP connections currently open.
# TYPE weft_tcp_connections_open gauge
weft_tcp_connections_open{direction="outbound"} 2
weft_tcp_connections_open{direction="inbound"} 0
# EOF
"#;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            value,
            timestamp: None,
        }
    }

    #[test]
    fn parses_a_proxy_exposition() {
        let samples = parse(PROXY_EXPOSITION).expect("parses");
        assert_eq!(samples.len(), 11);
        assert_eq!(
            samples[0],
            sample(
                "weft_http_requests_total",
                &[
                    ("direction", "outbound"),
                    ("authority", "books.demo.svc.cluster.local:8080")
                ],
                120.0
            )
        );
        let inf_bucket = &samples[8];
        assert_eq!(
            inf_bucket.name,
            "weft_http_response_duration_seconds_bucket"
        );
        assert_eq!(inf_bucket.label("le"), Some("+Inf"));
        assert_eq!(inf_bucket.label("classification"), Some("success"));
        assert_eq!(inf_bucket.value, 118.0);
        assert_eq!(samples[10].label("direction"), Some("inbound"));
        assert_eq!(samples[10].label("missing"), None);
    }

    #[test]
    fn parses_label_escapes() {
        // The case prometheus-client's own encoder tests with.
        let line = r#"requests_total{client_version="a\"} evil{x=\"1\\line\nnext"} 1"#;
        let s = parse_sample(line).expect("parses");
        assert_eq!(
            s.label("client_version"),
            Some("a\"} evil{x=\"1\\line\nnext")
        );
        assert_eq!(s.value, 1.0);
    }

    #[test]
    fn parses_values_and_timestamps() {
        let cases: &[(&str, f64, Option<f64>)] = &[
            ("m 1", 1.0, None),
            ("m 1.5e-3", 0.0015, None),
            ("m -2", -2.0, None),
            ("m +Inf", f64::INFINITY, None),
            ("m -Inf", f64::NEG_INFINITY, None),
            ("m 3 1712345678901", 3.0, Some(1_712_345_678_901.0)),
            ("m 3 1712345678.901", 3.0, Some(1_712_345_678.901)),
            ("m{} 4", 4.0, None),
            ("m\t5", 5.0, None),
            ("m 6 # {trace_id=\"abc\"} 0.5", 6.0, None),
            ("m 7 1000 # {trace_id=\"abc\"} 0.5 1000", 7.0, Some(1000.0)),
            ("a:b_c 8", 8.0, None),
        ];
        for (line, value, ts) in cases {
            let s = parse_sample(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(s.value, *value, "{line}");
            assert_eq!(s.timestamp, *ts, "{line}");
        }
        assert!(parse_sample("m NaN").expect("NaN").value.is_nan());
    }

    #[test]
    fn tolerates_loose_spacing_and_trailing_comma() {
        let s = parse_sample(r#"m { a = "1" , b="2", } 9"#).expect("parses");
        assert_eq!(s.labels.len(), 2);
        assert_eq!(s.label("b"), Some("2"));
        let s = parse_sample(r#"m{a="}"} 9"#).expect("a brace in a value");
        assert_eq!(s.label("a"), Some("}"));
        let s = parse_sample(r##"m{a="# not a comment"} 9"##).expect("a hash in a value");
        assert_eq!(s.label("a"), Some("# not a comment"));
    }

    #[test]
    fn rejects_bad_lines_with_a_reason() {
        let cases: &[(&str, ParseErrorKind)] = &[
            ("{a=\"1\"} 1", ParseErrorKind::MissingName),
            ("9m 1", ParseErrorKind::MissingName),
            ("m", ParseErrorKind::MissingValue),
            ("m{a=\"1\"}", ParseErrorKind::MissingValue),
            ("m one", ParseErrorKind::BadValue("one".into())),
            ("m infinity", ParseErrorKind::BadValue("infinity".into())),
            ("m 1 soon", ParseErrorKind::BadTimestamp("soon".into())),
            ("m 1 2 3", ParseErrorKind::TrailingText("3".into())),
            ("m{a=\"1\"", ParseErrorKind::UnterminatedLabels),
            ("m{a=\"1\" 1", ParseErrorKind::BadLabelSeparator('1')),
            (
                "m{a=\"1} 1",
                ParseErrorKind::UnterminatedLabelValue("a".into()),
            ),
            ("m{a=1} 1", ParseErrorKind::MissingQuote("a".into())),
            ("m{a} 1", ParseErrorKind::MissingEquals("a".into())),
            ("m{=\"1\"} 1", ParseErrorKind::MissingLabelName),
            (
                "m{a=\"1\",a=\"2\"} 1",
                ParseErrorKind::DuplicateLabel("a".into()),
            ),
            (
                "m{a=\"\\t\"} 1",
                ParseErrorKind::BadEscape {
                    label: "a".into(),
                    escape: 't',
                },
            ),
            (
                "m{a=\"\\",
                ParseErrorKind::UnterminatedLabelValue("a".into()),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_sample(line).as_ref(), Err(want), "{line}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse("# TYPE m counter\nm_total 1\nm_total{x=\"y} 2\n").expect_err("bad");
        assert_eq!(err.line, 3);
        assert_eq!(
            err.to_string(),
            "metrics line 3: label \"x\": the value is not closed by a double quote"
        );
    }

    #[test]
    fn handles_eof_blank_lines_and_crlf() {
        let samples = parse("\r\nm 1\r\n\r\n# EOF\r\n").expect("parses");
        assert_eq!(samples, vec![sample("m", &[], 1.0)]);
        assert_eq!(parse("").expect("empty"), vec![]);
        assert_eq!(
            parse("# EOF\nm 1\n").expect_err("after EOF").kind,
            ParseErrorKind::AfterEof
        );
    }

    fn arb_sample() -> impl Strategy<Value = Sample> {
        let name = "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}";
        let label = ("[a-zA-Z_][a-zA-Z0-9_]{0,10}", any::<String>());
        let value = prop_oneof![
            any::<f64>(),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            (0u64..1_000_000).prop_map(|n| n as f64),
        ];
        let ts = proptest::option::of((0u64..10_000_000_000_000).prop_map(|n| n as f64));
        (
            name,
            proptest::collection::btree_map(label.0, label.1, 0..5),
            value,
            ts,
        )
            .prop_map(|(name, labels, value, timestamp)| Sample {
                name,
                labels: labels.into_iter().collect(),
                value,
                timestamp,
            })
    }

    proptest! {
        #[test]
        fn never_panics(text in any::<String>()) {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_near_misses(text in r#"[a-z_{}=",\\# .+\-0-9eInfa\n]{0,60}"#) {
            let _ = parse(&text);
        }

        #[test]
        fn round_trips(s in arb_sample()) {
            let line = s.to_string();
            let parsed = parse_sample(&line).map_err(|e| TestCaseError::fail(format!("{line}: {e}")))?;
            prop_assert_eq!(&parsed.name, &s.name);
            prop_assert_eq!(&parsed.labels, &s.labels);
            prop_assert_eq!(parsed.timestamp, s.timestamp);
            if s.value.is_nan() {
                prop_assert!(parsed.value.is_nan());
            } else {
                prop_assert_eq!(parsed.value, s.value);
            }
        }
    }
}
