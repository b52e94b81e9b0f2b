//! A DDSketch-style quantile sketch (Masson, Rim, Lee, VLDB 2019): values fall in logarithmic
//! buckets `(γ^(k-1), γ^k]` with `γ = (1+α)/(1-α)`, so any quantile is returned within relative
//! error `α` of the true value at that rank. Merging adds bucket counts, so the sketch of a whole
//! equals the merge of the sketches of its parts exactly, in any order.
//!
//! Bounds: values with `|x| < MIN_VALUE` count as zero; each sign keeps at most `MAX_BUCKETS`
//! buckets, folding the smallest magnitudes into the lowest kept bucket when the span is wider
//! (the error bound then holds for values within `γ^MAX_BUCKETS` of the largest magnitude, which
//! at α = 1 % is a factor of 10^17). Folding is monotone, so merging stays exact.

use serde::{Deserialize, Serialize};

use crate::DriftError;

/// Default relative accuracy.
pub const DEFAULT_ALPHA: f64 = 0.01;
/// `1 / ln((1 + α) / (1 − α))` for α = [`DEFAULT_ALPHA`] (checked by a test).
const INV_LN_GAMMA_DEFAULT: f64 = 49.99833328888678;
/// Magnitudes below this count as zero.
pub const MIN_VALUE: f64 = 1e-9;
/// Buckets kept per sign.
pub const MAX_BUCKETS: usize = 2048;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantileSketch {
    /// Relative accuracy α.
    pub alpha: f64,
    pub zero: u64,
    pub positive: Store,
    /// Keyed by magnitude.
    pub negative: Store,
}

/// Dense bucket counts: `counts[i]` is bucket `offset + i`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Store {
    pub offset: i32,
    pub counts: Vec<u64>,
}

impl Store {
    fn add(&mut self, key: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = key;
            self.counts.push(n);
            return;
        }
        let top = self.offset + self.counts.len() as i32 - 1;
        if key > top {
            self.counts.resize(self.counts.len() + (key - top) as usize, 0);
        } else if key < self.offset {
            let floor = top - MAX_BUCKETS as i32 + 1;
            let key = key.max(floor);
            if key < self.offset {
                let grow = (self.offset - key) as usize;
                self.counts.splice(0..0, std::iter::repeat_n(0, grow));
                self.offset = key;
            }
            self.counts[(key - self.offset) as usize] += n;
            return;
        }
        self.counts[(key - self.offset) as usize] += n;
        self.fold();
    }

    /// Keeps at most MAX_BUCKETS: the lowest ones fold into the lowest kept.
    fn fold(&mut self) {
        if self.counts.len() > MAX_BUCKETS {
            let excess = self.counts.len() - MAX_BUCKETS;
            let folded: u64 = self.counts.drain(..excess).sum();
            self.counts[0] += folded;
            self.offset += excess as i32;
        }
    }

    fn merge(&mut self, other: &Store) {
        if other.counts.is_empty() {
            return;
        }
        // Highest key first, so the fold floor is final before the low keys arrive.
        for (i, &n) in other.counts.iter().enumerate().rev() {
            if n > 0 {
                self.add(other.offset + i as i32, n);
            }
        }
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn trim(&mut self) {
        let lead = self.counts.iter().take_while(|&&c| c == 0).count();
        if lead == self.counts.len() {
            *self = Store::default();
            return;
        }
        self.counts.drain(..lead);
        self.offset += lead as i32;
        while self.counts.last() == Some(&0) {
            self.counts.pop();
        }
    }
}

impl QuantileSketch {
    pub fn new(alpha: f64) -> Result<QuantileSketch, DriftError> {
        if !(alpha > 1e-4 && alpha < 0.5) {
            return Err(DriftError::Invalid(format!("relative accuracy {alpha} is outside (0.0001, 0.5)")));
        }
        Ok(QuantileSketch { alpha, zero: 0, positive: Store::default(), negative: Store::default() })
    }

    fn gamma(&self) -> f64 {
        (1.0 + self.alpha) / (1.0 - self.alpha)
    }

    /// `1 / ln γ`, precomputed for the default accuracy (this runs on every inference).
    #[inline]
    fn inv_ln_gamma(&self) -> f64 {
        if self.alpha == DEFAULT_ALPHA { INV_LN_GAMMA_DEFAULT } else { 1.0 / self.gamma().ln() }
    }

    #[inline]
    fn key(&self, magnitude: f64) -> i32 {
        (magnitude.ln() * self.inv_ln_gamma()).ceil() as i32
    }

    /// The bucket's representative: within α of every value in it.
    fn value(&self, key: i32) -> f64 {
        let g = self.gamma();
        2.0 * g.powi(key) / (g + 1.0)
    }

    /// Adds a finite value (callers skip NaN and infinities).
    #[inline]
    pub fn add(&mut self, x: f64) {
        if x.abs() < MIN_VALUE {
            self.zero += 1;
        } else if x > 0.0 {
            let k = self.key(x);
            self.positive.add(k, 1);
        } else {
            let k = self.key(-x);
            self.negative.add(k, 1);
        }
    }

    pub fn count(&self) -> u64 {
        self.zero + self.positive.total() + self.negative.total()
    }

    pub fn merge(&mut self, other: &QuantileSketch) -> Result<(), DriftError> {
        if self.alpha != other.alpha {
            return Err(DriftError::Mismatch(format!(
                "quantile sketches with accuracy {} and {}",
                self.alpha, other.alpha
            )));
        }
        self.zero += other.zero;
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        Ok(())
    }

    /// Buckets as (representative value, count), ascending by value, empty buckets skipped.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        for (i, &n) in self.negative.counts.iter().enumerate().rev() {
            if n > 0 {
                out.push((-self.value(self.negative.offset + i as i32), n));
            }
        }
        if self.zero > 0 {
            out.push((0.0, self.zero));
        }
        for (i, &n) in self.positive.counts.iter().enumerate() {
            if n > 0 {
                out.push((self.value(self.positive.offset + i as i32), n));
            }
        }
        out
    }

    /// The value at rank `floor(q · (count − 1))`, within relative error α; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (n - 1) as f64).floor() as u64;
        let mut seen = 0;
        for (v, c) in self.buckets() {
            seen += c;
            if seen > rank {
                return Some(v);
            }
        }
        None
    }

    /// Checks a sketch that arrived from elsewhere, and drops empty edge buckets.
    pub fn validate(&mut self) -> Result<(), DriftError> {
        QuantileSketch::new(self.alpha)?;
        for s in [&mut self.positive, &mut self.negative] {
            if s.counts.len() > MAX_BUCKETS {
                return Err(DriftError::Invalid(format!("a quantile store holds {} buckets", s.counts.len())));
            }
            if s.offset.checked_add(s.counts.len() as i32).is_none() {
                return Err(DriftError::Invalid("quantile store offset out of range".into()));
            }
            s.trim();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_relative_bound() {
        let mut s = QuantileSketch::new(0.01).unwrap();
        let mut v: Vec<f64> = (1..=10_000).map(|i| (i as f64 * 0.37).sin() * 1000.0 + 0.5).collect();
        v.iter().for_each(|&x| s.add(x));
        v.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let truth = v[(q * (v.len() - 1) as f64).floor() as usize];
            let got = s.quantile(q).unwrap();
            assert!((got - truth).abs() <= 0.01 * truth.abs() + 1e-12, "q{q}: {got} vs {truth}");
        }
        assert_eq!(s.count(), 10_000);
    }

    #[test]
    fn the_default_accuracy_constant_is_right() {
        let g: f64 = (1.0 + DEFAULT_ALPHA) / (1.0 - DEFAULT_ALPHA);
        assert!((INV_LN_GAMMA_DEFAULT - 1.0 / g.ln()).abs() < 1e-12);
    }

    #[test]
    fn wide_spans_fold_but_keep_counts() {
        let mut s = QuantileSketch::new(0.01).unwrap();
        for e in -300..300 {
            s.add(10f64.powi(e));
        }
        assert_eq!(s.count(), 600);
        assert!(s.positive.counts.len() <= MAX_BUCKETS);
        let top = s.quantile(1.0).unwrap();
        assert!((top / 1e299 - 1.0).abs() <= 0.01);
    }

    #[test]
    fn bad_sketches_are_refused() {
        assert!(QuantileSketch::new(0.0).is_err());
        assert!(QuantileSketch::new(f64::NAN).is_err());
        let mut s = QuantileSketch::new(0.01).unwrap();
        s.positive.counts = vec![1; MAX_BUCKETS + 1];
        assert!(s.validate().is_err());
        let mut t = QuantileSketch::new(0.01).unwrap();
        t.positive = Store { offset: i32::MAX, counts: vec![1, 1] };
        assert!(t.validate().is_err());
        let mut a = QuantileSketch::new(0.01).unwrap();
        assert!(a.merge(&QuantileSketch::new(0.02).unwrap()).is_err());
    }
}
