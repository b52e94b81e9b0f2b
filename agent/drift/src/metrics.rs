//! Drift metrics between a baseline and a live distribution.
//!
//! - **PSI** (population stability index) over histogram bins: `Σ (l − b) · ln(l / b)` on bin
//!   proportions, each proportion floored at [`PSI_EPSILON`] so an empty bin on one side gives a
//!   large but finite term. Rule of thumb: < 0.1 stable, 0.1–0.2 moderate, > 0.2 shifted.
//! - **JS**: the Jensen–Shannon *distance* (square root of the divergence, log base 2) over the
//!   same bins, unsmoothed: 0 for identical, 1 for disjoint distributions.
//! - **KS**: the Kolmogorov–Smirnov statistic, the largest gap between the two cumulative
//!   distributions, evaluated on the quantile sketches' buckets (values closer than the sketch's
//!   relative accuracy are not told apart).
//! - **Wasserstein-1**: the area between the two cumulative distributions on the same buckets, in
//!   the signal's own units (a pure shift by `c` gives `c`, within the relative accuracy).
//!
//! All return None when either side is empty; callers also withhold metrics below a minimum
//! live count (see [`crate::DriftConfig::min_count`]).

use crate::quantile::QuantileSketch;

/// Floor for bin proportions in PSI.
pub const PSI_EPSILON: f64 = 1e-4;

fn proportions(counts: &[u64]) -> Option<Vec<f64>> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts.iter().map(|&c| c as f64 / total as f64).collect())
}

pub fn psi(baseline: &[u64], live: &[u64]) -> Option<f64> {
    if baseline.len() != live.len() {
        return None;
    }
    let (b, l) = (proportions(baseline)?, proportions(live)?);
    Some(
        b.iter()
            .zip(&l)
            .map(|(&b, &l)| {
                let (b, l) = (b.max(PSI_EPSILON), l.max(PSI_EPSILON));
                (l - b) * (l / b).ln()
            })
            .sum(),
    )
}

pub fn js_distance(baseline: &[u64], live: &[u64]) -> Option<f64> {
    if baseline.len() != live.len() {
        return None;
    }
    let (b, l) = (proportions(baseline)?, proportions(live)?);
    let kl = |p: f64, m: f64| if p > 0.0 { p * (p / m).log2() } else { 0.0 };
    let div: f64 = b
        .iter()
        .zip(&l)
        .map(|(&b, &l)| {
            let m = (b + l) / 2.0;
            0.5 * kl(b, m) + 0.5 * kl(l, m)
        })
        .sum();
    Some(div.clamp(0.0, 1.0).sqrt())
}

/// Walks both sketches' buckets in value order, calling `step(x, next_x, F_a(x), F_b(x))` after
/// each distinct value.
fn walk_cdfs(a: &QuantileSketch, b: &QuantileSketch, mut step: impl FnMut(f64, Option<f64>, f64, f64)) -> Option<()> {
    let (na, nb) = (a.count(), b.count());
    if na == 0 || nb == 0 {
        return None;
    }
    let (ba, bb) = (a.buckets(), b.buckets());
    let (mut i, mut j) = (0, 0);
    let (mut ca, mut cb) = (0u64, 0u64);
    while i < ba.len() || j < bb.len() {
        let x = match (ba.get(i), bb.get(j)) {
            (Some(p), Some(q)) => p.0.min(q.0),
            (Some(p), None) => p.0,
            (None, Some(q)) => q.0,
            (None, None) => unreachable!(),
        };
        while i < ba.len() && ba[i].0 == x {
            ca += ba[i].1;
            i += 1;
        }
        while j < bb.len() && bb[j].0 == x {
            cb += bb[j].1;
            j += 1;
        }
        let next = match (ba.get(i), bb.get(j)) {
            (Some(p), Some(q)) => Some(p.0.min(q.0)),
            (Some(p), None) => Some(p.0),
            (None, Some(q)) => Some(q.0),
            (None, None) => None,
        };
        step(x, next, ca as f64 / na as f64, cb as f64 / nb as f64);
    }
    Some(())
}

pub fn ks(baseline: &QuantileSketch, live: &QuantileSketch) -> Option<f64> {
    let mut d: f64 = 0.0;
    walk_cdfs(baseline, live, |_, _, fa, fb| d = d.max((fa - fb).abs()))?;
    Some(d)
}

pub fn wasserstein(baseline: &QuantileSketch, live: &QuantileSketch) -> Option<f64> {
    let mut w = 0.0;
    walk_cdfs(baseline, live, |x, next, fa, fb| {
        if let Some(n) = next {
            w += (fa - fb).abs() * (n - x);
        }
    })?;
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(v: impl IntoIterator<Item = f64>) -> QuantileSketch {
        let mut s = QuantileSketch::new(0.01).unwrap();
        v.into_iter().for_each(|x| s.add(x));
        s
    }

    #[test]
    fn identical_distributions_give_zero() {
        let c = [5, 10, 0, 85];
        assert_eq!(psi(&c, &c), Some(0.0));
        // Same proportions, different totals.
        assert!(psi(&c, &[10, 20, 0, 170]).unwrap().abs() < 1e-12);
        assert_eq!(js_distance(&c, &c), Some(0.0));
        let s = sketch((0..500).map(|i| i as f64 / 7.0));
        assert_eq!(ks(&s, &s), Some(0.0));
        assert_eq!(wasserstein(&s, &s), Some(0.0));
    }

    #[test]
    fn known_cases_match_direct_computation() {
        // PSI for (0.5, 0.5) against (0.25, 0.75), by hand.
        let want = (0.25 - 0.5) * (0.25f64 / 0.5).ln() + (0.75 - 0.5) * (0.75f64 / 0.5).ln();
        assert!((psi(&[2, 2], &[1, 3]).unwrap() - want).abs() < 1e-12);
        // An empty live bin is floored at PSI_EPSILON.
        let want = (PSI_EPSILON - 0.5) * (PSI_EPSILON / 0.5).ln() + (1.0 - 0.5) * (1.0f64 / 0.5).ln();
        assert!((psi(&[1, 1], &[0, 4]).unwrap() - want).abs() < 1e-12);
        // Disjoint distributions are at JS distance 1.
        assert!((js_distance(&[3, 0], &[0, 7]).unwrap() - 1.0).abs() < 1e-12);
        // JS for (0.5, 0.5) against (1, 0): divergence = 1 - 0.75·log2(1/0.75)·... computed directly.
        let (m0, m1) = (0.75, 0.25);
        let d = 0.5 * (0.5 * (0.5f64 / m0).log2() + 0.5 * (0.5f64 / m1).log2()) + 0.5 * (1.0f64 / m0).log2();
        assert!((js_distance(&[1, 1], &[2, 0]).unwrap() - d.sqrt()).abs() < 1e-12);
        // KS of two uniform samples shifted by a quarter of their range: 0.25.
        let a = sketch((0..1000).map(|i| 100.0 + i as f64));
        let b = sketch((0..1000).map(|i| 350.0 + i as f64));
        assert!((ks(&a, &b).unwrap() - 0.25).abs() < 0.02, "{:?}", ks(&a, &b));
        // Wasserstein-1 of a pure shift is the shift.
        let w = wasserstein(&a, &b).unwrap();
        assert!((w - 250.0).abs() <= 0.02 * 600.0, "{w}");
        assert_eq!(psi(&[], &[]), None);
        assert_eq!(psi(&[1, 2], &[0, 0]), None);
        assert_eq!(ks(&a, &QuantileSketch::new(0.01).unwrap()), None);
    }
}
