//! Fixed-bin histograms whose bin edges come from the baseline, so a device's live histogram and
//! the baseline's count the same bins and merge by adding counts.

use serde::{Deserialize, Serialize};

use crate::{DriftError, MAX_BINS};

/// `edges` e0 ≤ e1 ≤ … ≤ en (strictly increasing, except the single-value case `[v, v]`) make
/// `n` bins: bin i covers `[e(i-1), e(i))`, the last one `[e(n-1), e(n)]`. `counts` has `n + 2`
/// entries: underflow (`x < e0`), the bins, overflow (`x > en`). NaN is not counted here (the
/// sketch counts it as invalid).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram over `edges`.
    pub fn new(edges: Vec<f64>) -> Result<Histogram, DriftError> {
        let h = Histogram { counts: vec![0; edges.len() + 1], edges };
        h.validate()?;
        Ok(h)
    }

    /// One bin per class `0..classes` (edges at half-integers), for categorical signals.
    pub fn categorical(classes: u32) -> Result<Histogram, DriftError> {
        Histogram::new((0..=classes).map(|i| i as f64 - 0.5).collect())
    }

    /// Edges at the `bins`-quantiles of `sorted` (ascending, finite), duplicates removed: equal-mass
    /// bins, the usual choice for PSI. Discrete data gets fewer, wider bins.
    pub fn quantile_edges(sorted: &[f64], bins: usize) -> Vec<f64> {
        let Some((&first, &last)) = sorted.first().zip(sorted.last()) else {
            return Vec::new();
        };
        let bins = bins.clamp(1, MAX_BINS);
        let mut edges = vec![first];
        for i in 1..bins {
            let e = sorted[i * (sorted.len() - 1) / bins];
            if e > *edges.last().unwrap_or(&f64::NEG_INFINITY) {
                edges.push(e);
            }
        }
        if last > *edges.last().unwrap_or(&f64::NEG_INFINITY) || edges.len() == 1 {
            edges.push(last);
        }
        edges
    }

    /// Checks shape and ordering: histograms arrive from devices.
    pub fn validate(&self) -> Result<(), DriftError> {
        let n = self.edges.len();
        if !(2..=MAX_BINS + 1).contains(&n) {
            return Err(DriftError::Invalid(format!("a histogram needs 2 to {} edges, not {n}", MAX_BINS + 1)));
        }
        if self.counts.len() != n + 1 {
            return Err(DriftError::Invalid(format!("{n} edges need {} counts, not {}", n + 1, self.counts.len())));
        }
        if self.edges.iter().any(|e| !e.is_finite()) {
            return Err(DriftError::Invalid("histogram edges must be finite".into()));
        }
        let single = n == 2 && self.edges[0] == self.edges[1];
        if !single && self.edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err(DriftError::Invalid("histogram edges must increase".into()));
        }
        Ok(())
    }

    /// Index into `counts` for `x` (not NaN).
    #[inline]
    pub fn slot(&self, x: f64) -> usize {
        let n = self.edges.len() - 1;
        let i = self.edges.partition_point(|&e| e <= x);
        if i == self.edges.len() { if x == self.edges[n] { n } else { n + 1 } } else { i }
    }

    #[inline]
    pub fn add(&mut self, x: f64) {
        let s = self.slot(x);
        self.counts[s] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s counts; the edges must be the same.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), DriftError> {
        if self.edges != other.edges {
            return Err(DriftError::Mismatch("histograms with different bin edges".into()));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        Ok(())
    }

    /// An empty histogram with the same edges.
    pub fn empty_like(&self) -> Histogram {
        Histogram { edges: self.edges.clone(), counts: vec![0; self.counts.len()] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_documented_bins() {
        let mut h = Histogram::new(vec![0.0, 1.0, 2.0]).unwrap();
        for x in [-1.0, 0.0, 0.5, 1.0, 1.99, 2.0, 2.01] {
            h.add(x);
        }
        assert_eq!(h.counts, vec![1, 2, 3, 1]);
        let mut one = Histogram::new(vec![3.0, 3.0]).unwrap();
        for x in [2.0, 3.0, 3.0, 4.0] {
            one.add(x);
        }
        assert_eq!(one.counts, vec![1, 2, 1]);
        let mut c = Histogram::categorical(3).unwrap();
        for x in [0.0, 1.0, 2.0, 2.0, 3.0] {
            c.add(x);
        }
        assert_eq!(c.counts, vec![0, 1, 1, 2, 1]);
    }

    #[test]
    fn quantile_edges_are_strictly_increasing_and_cover_the_data() {
        let v: Vec<f64> = (0..1000).map(|i| (i % 17) as f64).collect::<Vec<_>>();
        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        let e = Histogram::quantile_edges(&s, 10);
        assert_eq!(e.first(), Some(&0.0));
        assert_eq!(e.last(), Some(&16.0));
        assert!(e.windows(2).all(|w| w[0] < w[1]));
        let mut h = Histogram::new(e).unwrap();
        v.iter().for_each(|&x| h.add(x));
        assert_eq!(h.counts[0] + h.counts[h.counts.len() - 1], 0);
        assert_eq!(Histogram::quantile_edges(&[5.0; 4], 10), vec![5.0, 5.0]);
    }

    #[test]
    fn bad_histograms_are_refused() {
        assert!(Histogram::new(vec![1.0]).is_err());
        assert!(Histogram::new(vec![1.0, 0.0]).is_err());
        assert!(Histogram::new(vec![0.0, f64::NAN]).is_err());
        let h = Histogram { edges: vec![0.0, 1.0], counts: vec![1] };
        assert!(h.validate().is_err());
        let mut a = Histogram::new(vec![0.0, 1.0]).unwrap();
        assert!(a.merge(&Histogram::new(vec![0.0, 2.0]).unwrap()).is_err());
    }
}
