//! Gateway API durations (GEP-2257): one to four `<number><unit>` pairs,
//! numbers of at most five digits, units `h`, `m`, `s`, `ms`, e.g. `10s`,
//! `500ms`, `1m30s`. The same syntax the Gateway API's CRDs validate with
//! `^([0-9]{1,5}(h|m|s|ms)){1,4}$`, so a value that passes the API server
//! parses here, and the directory source rejects what the API server would.

use std::time::Duration;

/// The pattern of a Gateway API duration (for CRD schemas).
pub const PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a Gateway API duration: {reason}; expected e.g. \"10s\", \"500ms\", \"1m30s\" (units h, m, s, ms; at most 4 parts of at most 5 digits)")]
pub struct DurationError {
    pub value: String,
    pub reason: &'static str,
}

/// Parses a GEP-2257 duration.
pub fn parse(value: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    let mut parts = 0;
    let mut total = Duration::ZERO;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &value[start..i];
        if digits.is_empty() {
            return Err(err("a unit must follow a number"));
        }
        if digits.len() > 5 {
            return Err(err("a number has more than 5 digits"));
        }
        let n: u64 = digits.parse().map_err(|_| err("a number does not parse"))?;
        let rest = &value[i..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.is_empty() {
            return Err(err("the last number has no unit"));
        } else {
            return Err(err("unknown unit"));
        };
        i += len;
        parts += 1;
        if parts > 4 {
            return Err(err("more than 4 parts"));
        }
        // At most 4 × 99999 h: cannot overflow.
        total += unit * u32::try_from(n).map_err(|_| err("a number is too large"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gep_2257() {
        let ok = [
            ("0s", Duration::ZERO),
            ("10s", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("1m", Duration::from_secs(60)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
            ("99999ms", Duration::from_millis(99_999)),
        ];
        for (s, want) in ok {
            assert_eq!(parse(s), Ok(want), "{s}");
        }
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "100000s",
            "1h1m1s1ms1s",
            "10 s",
            " 1s",
            "1S",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_crd_pattern(s in "[0-9hms]{0,12}") {
            let re = regex::Regex::new(PATTERN).expect("pattern");
            proptest::prop_assert_eq!(parse(&s).is_ok(), re.is_match(&s), "{}", s);
        }
    }
}
