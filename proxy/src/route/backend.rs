//! Which backend of a route a request goes to: a weighted draw, pure given the random number.
//!
//! Weight 0 is never picked; a route whose weights are all 0 (or that has no backends) picks
//! nothing and the caller answers 500, as the Gateway API says. An `invalid` backend is
//! picked for its share like any other: the caller answers that share 500.

use super::policy::Backend;

/// Picks a backend with probability weight ÷ total. `draw(n)` returns a number uniform in
/// `[0, n)` (`n` ≥ 1); it is not called when at most one backend can be picked.
pub fn pick(backends: &[Backend], draw: impl FnOnce(u64) -> u64) -> Option<&Backend> {
    let mut eligible = backends.iter().filter(|b| b.weight > 0);
    let first = eligible.next()?;
    if eligible.next().is_none() {
        return Some(first);
    }
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut n = draw(total).min(total - 1);
    for b in backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    // Unreachable: n < total = Σ weights.
    None
}

/// [`pick`] with the thread's fast random numbers.
pub fn pick_random(backends: &[Backend]) -> Option<&Backend> {
    pick(backends, |n| fastrand::u64(..n))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::route::policy::BackendKind;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Backend {
                kind: BackendKind::Service(Arc::from(format!("b{i}"))),
                weight,
                filters: Vec::new(),
                settings: Arc::default(),
                cache: Default::default(),
            })
            .collect()
    }

    fn name(b: Option<&Backend>) -> Option<&str> {
        match &b?.kind {
            BackendKind::Service(s) | BackendKind::Invalid(s) => Some(s),
        }
    }

    #[test]
    fn table() {
        // (weights, draw result, expected backend)
        let cases: &[(&[u32], u64, Option<&str>)] = &[
            (&[], 0, None),
            (&[0], 0, None),
            (&[0, 0, 0], 0, None),
            (&[1], 0, Some("b0")),
            (&[0, 5], 0, Some("b1")),
            (&[5, 0], 0, Some("b0")),
            (&[90, 10], 0, Some("b0")),
            (&[90, 10], 89, Some("b0")),
            (&[90, 10], 90, Some("b1")),
            (&[90, 10], 99, Some("b1")),
            (&[1, 0, 1], 0, Some("b0")),
            (&[1, 0, 1], 1, Some("b2")),
            // A random source that misbehaves cannot push the pick off the end.
            (&[1, 1], 1_000, Some("b1")),
            (&[u32::MAX, u32::MAX], u64::from(u32::MAX), Some("b1")),
        ];
        for (i, (weights, draw, want)) in cases.iter().enumerate() {
            let bs = backends(weights);
            assert_eq!(name(pick(&bs, |_| *draw)), *want, "case {i}: {weights:?}");
        }
    }

    #[test]
    fn one_eligible_backend_needs_no_draw() {
        let bs = backends(&[0, 3, 0]);
        let got = pick(&bs, |_| panic!("no draw needed"));
        assert_eq!(name(got), Some("b1"));
    }

    #[test]
    fn ten_thousand_draws_split_ninety_ten_within_two_percent() {
        let bs = backends(&[90, 10]);
        let mut rng = fastrand::Rng::with_seed(12);
        let mut first = 0u32;
        for _ in 0..10_000 {
            if name(pick(&bs, |n| rng.u64(..n))) == Some("b0") {
                first += 1;
            }
        }
        let share = f64::from(first) / 10_000.0;
        assert!((share - 0.9).abs() <= 0.02, "b0 got {share}");
        // And with the thread's generator, as the request path uses it.
        let first = (0..10_000)
            .filter(|_| name(pick_random(&bs)) == Some("b0"))
            .count();
        assert!((8_800..=9_200).contains(&first), "b0 got {first}");
    }
}
