//! Count, sum, sum of squares, min and max: mergeable summary statistics.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub sum: f64,
    pub sum_sq: f64,
    /// `+inf` / `-inf` while empty (written as null: JSON has no infinity).
    #[serde(with = "empty_min")]
    pub min: f64,
    #[serde(with = "empty_max")]
    pub max: f64,
}

macro_rules! infinite_as_null {
    ($name:ident, $empty:expr) => {
        mod $name {
            use serde::{Deserialize, Deserializer, Serializer};

            pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
                if x.is_finite() { s.serialize_some(x) } else { s.serialize_none() }
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
                Ok(Option::<f64>::deserialize(d)?.unwrap_or($empty))
            }
        }
    };
}
infinite_as_null!(empty_min, f64::INFINITY);
infinite_as_null!(empty_max, f64::NEG_INFINITY);

impl Default for Moments {
    fn default() -> Self {
        Moments { count: 0, sum: 0.0, sum_sq: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY }
    }
}

impl Moments {
    #[inline]
    pub fn add(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.sum_sq += x * x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Count, min and max merge exactly; the sums up to floating-point rounding.
    pub fn merge(&mut self, other: &Moments) {
        self.count = self.count.saturating_add(other.count);
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Population standard deviation.
    pub fn std_dev(&self) -> Option<f64> {
        let m = self.mean()?;
        Some((self.sum_sq / self.count as f64 - m * m).max(0.0).sqrt())
    }
}
