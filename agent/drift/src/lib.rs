//! Drift statistics for Flotilla, computed on the device and merged across the fleet.
//!
//! A bundle carries a [`Profile`]: the drift configuration (window, thresholds, sampling policy)
//! and, per [`Signal`], the baseline [`Sketch`] computed from the training or validation data.
//! The agent keeps a [`Live`] set of sketches per model version, fed by every inference, and sends
//! them each window; the control plane merges the sketches of many devices and windows by
//! addition and scores them against the baseline with [`compare`] (PSI, Jensen–Shannon,
//! Kolmogorov–Smirnov, Wasserstein-1; see [`metrics`] for definitions and smoothing).
//!
//! Pure: no I/O, no clock, no randomness. Everything that arrives from elsewhere is checked with
//! `validate` before use.

pub mod histogram;
pub mod metrics;
pub mod moments;
pub mod quantile;
mod signal;

pub use histogram::Histogram;
pub use moments::Moments;
pub use quantile::QuantileSketch;
pub use signal::{
    Collector, DriftConfig, Kind, Live, Metric, Pending, Profile, SamplePolicy, Scores, Signal, SignalProfile, Sketch,
    Source, TensorView, Tensors, Values, Window, compare,
};

/// Most bins in one histogram.
pub const MAX_BINS: usize = 1024;
/// Most signals in one profile.
pub const MAX_SIGNALS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DriftError {
    #[error("invalid drift data: {0}")]
    Invalid(String),
    #[error("cannot merge {0}")]
    Mismatch(String),
}
