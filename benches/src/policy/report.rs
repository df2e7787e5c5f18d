//! What the traffic-policy benchmarks share in their reports: medians over rounds with their
//! spread, ratios, and the block heading with the command. Pure.

use std::fmt::Write as _;

use serde::Serialize;

use super::Settings;
use crate::report::{provenance, Machine};

/// When, where and how a benchmark ran.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub command: String,
    pub date_utc: String,
    pub machine: Machine,
    pub settings: Settings,
}

impl Meta {
    /// The current invocation, started at `started`.
    pub fn now(settings: &Settings, started: std::time::SystemTime) -> Self {
        let unix = crate::report::unix_secs(started);
        let argv: Vec<String> = std::env::args().collect();
        Meta {
            command: crate::report::shell_command(&argv),
            date_utc: crate::report::utc_date(unix),
            machine: Machine::probe(&settings.proxy_bin, Some(&settings.controller_bin), None),
            settings: settings.clone(),
        }
    }
}

/// `a / b`, 0 when `b` is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The median of the rounds and their range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// [`Spread`] of `values` (the mean of the middle two for an even count); `None` if empty
/// or any value is not a number.
pub fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

impl Spread {
    /// "median (min–max)" with `f` formatting each; just the median for one round.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        if self.min == self.max {
            f(self.median)
        } else {
            format!("{} ({}–{})", f(self.median), f(self.min), f(self.max))
        }
    }
}

/// `Some(spread).show(f)` or "–".
pub fn show(s: Option<Spread>, f: impl Fn(f64) -> String) -> String {
    s.map_or_else(|| "–".to_owned(), |s| s.show(f))
}

/// A share as a percentage with two decimals.
pub fn pct(v: f64) -> String {
    format!("{:.2} %", 100.0 * v)
}

/// Microseconds as milliseconds.
pub fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

pub fn mark(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The heading of a benchmark's block, its provenance and the load it ran.
pub fn heading(md: &mut String, title: &str, meta: &Meta) {
    let _ = writeln!(md, "### {title}\n");
    provenance(md, &meta.date_utc, &meta.machine, &meta.command);
    let s = &meta.settings;
    let _ = writeln!(
        md,
        "Load: HTTP/1.1, open loop at {} req/s, {} connections, {}-byte request bodies, \
         {}-byte responses; {} round(s), each run a {} s warm-up then a {} s measured window; \
         baseline and subject alternate their order from round to round. {}. Figures: median \
         of the rounds (min–max).\n",
        s.rate,
        s.connections,
        s.request_size,
        s.response_size,
        s.rounds,
        s.warmup_s,
        s.duration_s,
        match s.mesh_cpu {
            Some(cpu) =>
                format!("Generator on its own CPU; servers, controller and proxies on CPU {cpu}"),
            None => "Unpinned".to_owned(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spread() {
        let s = spread(&[3.0, 1.0, 2.0]).expect("spread");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0]).expect("spread").median, 2.5);
        assert_eq!(spread(&[]), None);
        assert_eq!(spread(&[f64::NAN]), None);
        assert_eq!(s.show(|v| format!("{v:.1}")), "2.0 (1.0–3.0)");
        let one = spread(&[0.5]).expect("spread");
        assert_eq!(one.show(pct), "50.00 %");
        assert_eq!(show(None, pct), "–");
    }

    #[test]
    fn ratios_and_formats() {
        assert_eq!(ratio(1, 4), 0.25);
        assert_eq!(ratio(1, 0), 0.0);
        assert_eq!(ms(1234.0), "1.234 ms");
        assert_eq!(mark(true), "PASS");
    }
}
