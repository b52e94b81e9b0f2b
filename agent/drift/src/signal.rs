//! Signals (what is measured on each inference), sketches (how), profiles (the baseline and the
//! configuration a bundle carries) and live windows (what a device accumulates).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::metrics;
use crate::moments::Moments;
use crate::quantile::{DEFAULT_ALPHA, QuantileSketch};
use crate::{DriftError, MAX_SIGNALS};

/// When a device closes a window and reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// Wall-clock windows aligned to multiples of this many seconds since the epoch, so the
    /// windows of all devices line up.
    Seconds(u64),
    /// Every this many inferences.
    Count(u64),
}

impl Window {
    /// `30s`, `5m`, `1h` (time) or a bare number of inferences (`200`).
    pub fn parse(s: &str) -> Result<Window, String> {
        let s = s.trim();
        let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a window: use e.g. `30s`, `5m` or `200`"))?;
        if n == 0 {
            return Err("a window must be longer than zero".into());
        }
        match unit {
            "" => Ok(Window::Count(n)),
            "s" => Ok(Window::Seconds(n)),
            "m" => Ok(Window::Seconds(n * 60)),
            "h" => Ok(Window::Seconds(n * 3600)),
            _ => Err(format!("`{s}`: window units are s, m, h, or none for a count of inferences")),
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::Seconds(s) => write!(f, "{s}s"),
            Window::Count(n) => write!(f, "{n} inferences"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Psi,
    Js,
    Ks,
    Wasserstein,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Psi, Metric::Js, Metric::Ks, Metric::Wasserstein];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Psi => "psi",
            Metric::Js => "js",
            Metric::Ks => "ks",
            Metric::Wasserstein => "wasserstein",
        }
    }

    pub fn parse(s: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.as_str() == s.trim().to_ascii_lowercase())
    }
}

/// Optional reservoir sample of inputs kept on the device for retraining.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplePolicy {
    /// Most samples kept per model version.
    pub size: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftConfig {
    pub window: Window,
    /// A signal is drifting in a window when any of its metrics exceeds its threshold here.
    pub thresholds: BTreeMap<Metric, f64>,
    /// Windows in a row over a threshold before an alert is raised.
    pub consecutive: u32,
    /// Fewer live values than this in a window (merged over a cohort) and no metric is computed.
    /// With 10 bins an unshifted sample of `n` values has an expected PSI of about `9 / n`, so
    /// the default (100) keeps noise well under the usual 0.2 threshold.
    pub min_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SamplePolicy>,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            window: Window::Seconds(60),
            thresholds: BTreeMap::from([(Metric::Psi, 0.2)]),
            consecutive: 2,
            min_count: 100,
            sample: None,
        }
    }
}

/// Where a signal's value comes from, for each sample of an inference. Tensors of rank ≥ 2 hold
/// one sample per index of their first (batch) axis; smaller tensors are one sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case")]
pub enum Source {
    /// Mean of all of the sample's values of an input.
    InputMean { tensor: String },
    /// Mean over one channel (`index` along `axis` of the sample, e.g. axis 0 for CHW images).
    InputChannelMean { tensor: String, axis: u32, index: u32 },
    /// One value of the sample (tabular features).
    InputFeature { tensor: String, index: u32 },
    /// The predicted class: argmax over the output's sample.
    Class { output: String },
    /// The top class's score, after softmax when the model outputs logits.
    Confidence { output: String, softmax: bool },
    /// One dimension of an output (e.g. an embedding).
    OutputDim { output: String, index: u32 },
    /// 1 for a prediction that its feedback label confirmed, 0 for one it contradicted.
    Accuracy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Continuous,
    Categorical,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub name: String,
    pub source: Source,
    pub kind: Kind,
}

/// Mergeable statistics of one signal: a histogram on the baseline's bins, a quantile sketch
/// (continuous signals), moments, and a count of values that were NaN or infinite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sketch {
    pub hist: Histogram,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantiles: Option<QuantileSketch>,
    pub moments: Moments,
    #[serde(default)]
    pub invalid: u64,
}

impl Sketch {
    #[inline]
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            self.invalid += 1;
            return;
        }
        self.hist.add(x);
        if let Some(q) = &mut self.quantiles {
            q.add(x);
        }
        self.moments.add(x);
    }

    pub fn merge(&mut self, other: &Sketch) -> Result<(), DriftError> {
        self.hist.merge(&other.hist)?;
        match (&mut self.quantiles, &other.quantiles) {
            (Some(a), Some(b)) => a.merge(b)?,
            (None, None) => {}
            _ => return Err(DriftError::Mismatch("a continuous with a categorical sketch".into())),
        }
        self.moments.merge(&other.moments);
        self.invalid = self.invalid.saturating_add(other.invalid);
        Ok(())
    }

    pub fn empty_like(&self) -> Sketch {
        Sketch {
            hist: self.hist.empty_like(),
            quantiles: self.quantiles.as_ref().map(|q| QuantileSketch::new(q.alpha).expect("valid alpha")),
            moments: Moments::default(),
            invalid: 0,
        }
    }

    /// Values counted (finite ones).
    pub fn count(&self) -> u64 {
        self.moments.count
    }

    pub fn validate(&mut self) -> Result<(), DriftError> {
        self.hist.validate()?;
        if let Some(q) = &mut self.quantiles {
            q.validate()?;
        }
        Ok(())
    }

    /// A baseline sketch from all of a signal's reference values: `bins` equal-mass bins for a
    /// continuous signal, one bin per class (`classes`) for a categorical one.
    pub fn baseline(kind: Kind, values: &[f64], bins: usize, classes: u32) -> Result<Sketch, DriftError> {
        let mut sketch = match kind {
            Kind::Continuous => {
                let mut sorted: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
                sorted.sort_by(f64::total_cmp);
                if sorted.is_empty() {
                    sorted.push(0.0);
                }
                Sketch {
                    hist: Histogram::new(Histogram::quantile_edges(&sorted, bins))?,
                    quantiles: Some(QuantileSketch::new(DEFAULT_ALPHA)?),
                    moments: Moments::default(),
                    invalid: 0,
                }
            }
            Kind::Categorical => Sketch {
                hist: Histogram::categorical(classes.max(1))?,
                quantiles: None,
                moments: Moments::default(),
                invalid: 0,
            },
        };
        values.iter().for_each(|&x| sketch.add(x));
        Ok(sketch)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalProfile {
    pub signal: Signal,
    pub baseline: Sketch,
}

/// What a bundle's `baseline` artifact holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub config: DriftConfig,
    pub signals: Vec<SignalProfile>,
}

impl Profile {
    pub fn validate(&mut self) -> Result<(), DriftError> {
        if self.signals.len() > MAX_SIGNALS {
            return Err(DriftError::Invalid(format!("{} signals (at most {MAX_SIGNALS})", self.signals.len())));
        }
        if self.config.consecutive == 0 {
            return Err(DriftError::Invalid("`consecutive` must be at least 1".into()));
        }
        for s in &mut self.signals {
            s.baseline.validate()?;
        }
        Ok(())
    }

    /// The input signals' values for one inference (see [`Live::record`]).
    pub fn read_inputs<T: Tensors + ?Sized>(&self, inputs: &T) -> Pending {
        let mut out = Vec::new();
        for (i, sp) in self.signals.iter().enumerate() {
            if sp.signal.source.reads_inputs() {
                sp.signal.source.extract(inputs, &NoTensors, |x| out.push((i as u32, x)));
            }
        }
        Pending(out)
    }

    pub fn signal(&self, name: &str) -> Option<&SignalProfile> {
        self.signals.iter().find(|s| s.signal.name == name)
    }
}

/// A read-only view of a tensor's values, whatever their type.
#[derive(Clone, Copy, Debug)]
pub enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    I64(&'a [i64]),
    I32(&'a [i32]),
    I16(&'a [i16]),
    I8(&'a [i8]),
    U8(&'a [u8]),
    Bool(&'a [bool]),
}

impl Values<'_> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::I64(v) => v.len(),
            Values::I32(v) => v.len(),
            Values::I16(v) => v.len(),
            Values::I8(v) => v.len(),
            Values::U8(v) => v.len(),
            Values::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    fn get(&self, i: usize) -> f64 {
        match self {
            Values::F32(v) => v[i] as f64,
            Values::F64(v) => v[i],
            Values::I64(v) => v[i] as f64,
            Values::I32(v) => v[i] as f64,
            Values::I16(v) => v[i] as f64,
            Values::I8(v) => v[i] as f64,
            Values::U8(v) => v[i] as f64,
            Values::Bool(v) => v[i] as u8 as f64,
        }
    }

    #[inline]
    fn sum(&self, r: std::ops::Range<usize>) -> f64 {
        match self {
            Values::F32(v) => v[r].iter().map(|&x| x as f64).sum(),
            _ => r.map(|i| self.get(i)).sum(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub values: Values<'a>,
}

impl TensorView<'_> {
    /// (samples, values per sample, the sample's shape).
    fn rows(&self) -> Option<(usize, usize, &[usize])> {
        let len = self.values.len();
        if self.shape.len() >= 2 {
            let n = self.shape[0];
            (n > 0 && len.is_multiple_of(n)).then(|| (n, len / n, &self.shape[1..]))
        } else {
            (len > 0).then_some((1, len, self.shape))
        }
    }
}

/// Tensors by name: slices of views, or a caller's own tensors (no views built per call).
pub trait Tensors {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>>;
}

impl Tensors for [TensorView<'_>] {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.iter().find(|v| v.name == name).copied()
    }
}

impl<const N: usize> Tensors for [TensorView<'_>; N] {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self[..].tensor(name)
    }
}

impl Tensors for Vec<TensorView<'_>> {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self[..].tensor(name)
    }
}

struct NoTensors;

impl Tensors for NoTensors {
    fn tensor(&self, _: &str) -> Option<TensorView<'_>> {
        None
    }
}

/// Argmax and top score of a row (after softmax when asked).
#[inline]
fn top(values: &Values, r: std::ops::Range<usize>, softmax: bool) -> (usize, f64) {
    let start = r.start;
    let (mut best, mut max) = (0, f64::NEG_INFINITY);
    for i in r.clone() {
        let x = values.get(i);
        if x > max {
            (best, max) = (i - start, x);
        }
    }
    if !softmax {
        return (best, max);
    }
    let denom: f64 = r.map(|i| (values.get(i) - max).exp()).sum();
    (best, 1.0 / denom)
}

/// Input signal values read before a run, by signal index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pending(pub Vec<(u32, f64)>);

impl Source {
    pub fn reads_inputs(&self) -> bool {
        matches!(self, Source::InputMean { .. } | Source::InputChannelMean { .. } | Source::InputFeature { .. })
    }

    /// Calls `f` with the signal's value for each sample. Accuracy values come from feedback,
    /// not from tensors.
    fn extract<I: Tensors + ?Sized, O: Tensors + ?Sized>(&self, inputs: &I, outputs: &O, mut f: impl FnMut(f64)) {
        let found = match self {
            Source::InputMean { tensor }
            | Source::InputChannelMean { tensor, .. }
            | Source::InputFeature { tensor, .. } => inputs.tensor(tensor),
            Source::Class { output } | Source::Confidence { output, .. } | Source::OutputDim { output, .. } => {
                outputs.tensor(output)
            }
            Source::Accuracy => return,
        };
        let Some(t) = found else { return };
        let Some((n, row, shape)) = t.rows() else { return };
        let v = &t.values;
        for s in 0..n {
            let base = s * row;
            match self {
                Source::InputMean { .. } => f(v.sum(base..base + row) / row as f64),
                Source::InputChannelMean { axis, index, .. } => {
                    let axis = *axis as usize;
                    let Some(&dim) = shape.get(axis) else { return };
                    let index = *index as usize;
                    if index >= dim {
                        return;
                    }
                    let inner: usize = shape[axis + 1..].iter().product();
                    let outer = row / (dim * inner).max(1);
                    let sum: f64 = (0..outer)
                        .map(|o| {
                            let at = base + (o * dim + index) * inner;
                            v.sum(at..at + inner)
                        })
                        .sum();
                    f(sum / (outer * inner).max(1) as f64);
                }
                Source::InputFeature { index, .. } | Source::OutputDim { index, .. } => {
                    if (*index as usize) < row {
                        f(v.get(base + *index as usize));
                    }
                }
                Source::Class { .. } => f(top(v, base..base + row, false).0 as f64),
                Source::Confidence { softmax, .. } => f(top(v, base..base + row, *softmax).1),
                Source::Accuracy => {}
            }
        }
    }
}

/// A device's sketches for one model version over the current window.
#[derive(Clone, Debug, PartialEq)]
pub struct Live {
    /// Parallel to the profile's signals.
    pub sketches: Vec<Sketch>,
    /// Inference calls (not samples) seen.
    pub inferences: u64,
}

impl Live {
    pub fn new(profile: &Profile) -> Live {
        Live { sketches: profile.signals.iter().map(|s| s.baseline.empty_like()).collect(), inferences: 0 }
    }

    /// Feeds one inference (any batch size) into every signal. Returns the predicted class of
    /// each sample when the profile has a class signal (what feedback is later checked against).
    pub fn observe<I: Tensors + ?Sized, O: Tensors + ?Sized>(
        &mut self,
        profile: &Profile,
        inputs: &I,
        outputs: &O,
    ) -> Vec<u32> {
        let pending = profile.read_inputs(inputs);
        self.record(profile, &pending, outputs, true)
    }

    /// [`Live::observe`] in two steps, for callers whose runtime consumes the inputs: the input
    /// signals' values read before the run, recorded with the outputs after it. The predicted
    /// classes are collected only when `predictions` is set.
    pub fn record<O: Tensors + ?Sized>(
        &mut self,
        profile: &Profile,
        pending: &Pending,
        outputs: &O,
        predictions: bool,
    ) -> Vec<u32> {
        self.inferences += 1;
        for &(i, x) in &pending.0 {
            if let Some(s) = self.sketches.get_mut(i as usize) {
                s.add(x);
            }
        }
        let mut predicted = Vec::new();
        let mut first_class = true;
        for (sp, sketch) in profile.signals.iter().zip(&mut self.sketches) {
            if sp.signal.source.reads_inputs() {
                continue;
            }
            let record = predictions && first_class && matches!(sp.signal.source, Source::Class { .. });
            sp.signal.source.extract(&NoTensors, outputs, |x| {
                sketch.add(x);
                if record {
                    predicted.push(x as u32);
                }
            });
            first_class &= !matches!(sp.signal.source, Source::Class { .. });
        }
        predicted
    }

    /// Feeds a feedback label's verdict on an earlier prediction into the accuracy signals.
    pub fn feedback(&mut self, profile: &Profile, correct: bool) {
        for (sp, sketch) in profile.signals.iter().zip(&mut self.sketches) {
            if sp.signal.source == Source::Accuracy {
                sketch.add(if correct { 1.0 } else { 0.0 });
            }
        }
    }

    pub fn merge(&mut self, other: &Live) -> Result<(), DriftError> {
        if self.sketches.len() != other.sketches.len() {
            return Err(DriftError::Mismatch("windows of different profiles".into()));
        }
        for (a, b) in self.sketches.iter_mut().zip(&other.sketches) {
            a.merge(b)?;
        }
        self.inferences += other.inferences;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.inferences == 0 && self.sketches.iter().all(|s| s.count() == 0 && s.invalid == 0)
    }
}

/// Collects raw signal values from reference data, to build a baseline [`Profile`].
#[derive(Clone, Debug)]
pub struct Collector {
    signals: Vec<(Signal, u32)>,
    values: Vec<Vec<f64>>,
}

impl Collector {
    /// `signals` with, for categorical ones, their number of classes.
    pub fn new(signals: Vec<(Signal, u32)>) -> Collector {
        let values = vec![Vec::new(); signals.len()];
        Collector { signals, values }
    }

    pub fn observe<I: Tensors + ?Sized, O: Tensors + ?Sized>(&mut self, inputs: &I, outputs: &O) {
        for ((signal, _), values) in self.signals.iter().zip(&mut self.values) {
            signal.source.extract(inputs, outputs, |x| values.push(x));
        }
    }

    /// The verdict of a reference label on the model's prediction, for accuracy signals.
    pub fn feedback(&mut self, correct: bool) {
        for ((signal, _), values) in self.signals.iter().zip(&mut self.values) {
            if signal.source == Source::Accuracy {
                values.push(if correct { 1.0 } else { 0.0 });
            }
        }
    }

    pub fn finish(self, config: DriftConfig, bins: usize) -> Result<Profile, DriftError> {
        let signals = self
            .signals
            .into_iter()
            .zip(self.values)
            .map(|((signal, classes), values)| {
                let baseline = Sketch::baseline(signal.kind, &values, bins, classes)?;
                Ok(SignalProfile { signal, baseline })
            })
            .collect::<Result<_, DriftError>>()?;
        Ok(Profile { config, signals })
    }
}

/// A live sketch scored against its baseline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub count: u64,
    pub psi: Option<f64>,
    pub js: Option<f64>,
    pub ks: Option<f64>,
    pub wasserstein: Option<f64>,
}

impl Scores {
    pub fn get(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::Psi => self.psi,
            Metric::Js => self.js,
            Metric::Ks => self.ks,
            Metric::Wasserstein => self.wasserstein,
        }
    }

    /// The metrics over their thresholds (empty when none or when not computed).
    pub fn exceeded(&self, thresholds: &BTreeMap<Metric, f64>) -> Vec<Metric> {
        thresholds.iter().filter(|&(&m, &t)| self.get(m).is_some_and(|v| v > t)).map(|(&m, _)| m).collect()
    }
}

/// Scores `live` against `baseline`. No metric below `min_count` live values or on an empty
/// baseline; KS and Wasserstein only for continuous signals.
pub fn compare(baseline: &Sketch, live: &Sketch, min_count: u64) -> Scores {
    let count = live.count();
    if count < min_count.max(1) || baseline.count() == 0 || baseline.hist.edges != live.hist.edges {
        return Scores { count, ..Scores::default() };
    }
    let quant = baseline.quantiles.as_ref().zip(live.quantiles.as_ref());
    Scores {
        count,
        psi: metrics::psi(&baseline.hist.counts, &live.hist.counts),
        js: metrics::js_distance(&baseline.hist.counts, &live.hist.counts),
        ks: quant.and_then(|(b, l)| metrics::ks(b, l)),
        wasserstein: quant.and_then(|(b, l)| metrics::wasserstein(b, l)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(Window::parse("30s"), Ok(Window::Seconds(30)));
        assert_eq!(Window::parse("5m"), Ok(Window::Seconds(300)));
        assert_eq!(Window::parse("200"), Ok(Window::Count(200)));
        assert!(Window::parse("0").is_err());
        assert!(Window::parse("3d").is_err());
        assert!(Window::parse("s").is_err());
    }

    #[test]
    fn channel_means_follow_the_axis() {
        // Two samples of shape [2, 2] (channels, values): channel means 1.5/3.5 and 10/20.
        let data = [1.0f32, 2.0, 3.0, 4.0, 10.0, 10.0, 20.0, 20.0];
        let view = TensorView { name: "x", shape: &[2, 2, 2], values: Values::F32(&data) };
        let mut got = Vec::new();
        Source::InputChannelMean { tensor: "x".into(), axis: 0, index: 1 }
            .extract(&[view], &NoTensors, |x| got.push(x));
        assert_eq!(got, vec![3.5, 20.0]);
        got.clear();
        Source::InputChannelMean { tensor: "x".into(), axis: 1, index: 0 }
            .extract(&[view], &NoTensors, |x| got.push(x));
        assert_eq!(got, vec![2.0, 15.0]);
        got.clear();
        Source::InputMean { tensor: "x".into() }.extract(&[view], &NoTensors, |x| got.push(x));
        assert_eq!(got, vec![2.5, 15.0]);
    }

    #[test]
    fn class_and_confidence_come_from_the_output_rows() {
        let logits = [0.0f32, 2.0, 1.0, 5.0, 0.0, 0.0];
        let out = TensorView { name: "y", shape: &[2, 3], values: Values::F32(&logits) };
        let mut got = Vec::new();
        Source::Class { output: "y".into() }.extract(&NoTensors, &[out], |x| got.push(x));
        assert_eq!(got, vec![1.0, 0.0]);
        got.clear();
        Source::Confidence { output: "y".into(), softmax: true }.extract(&NoTensors, &[out], |x| got.push(x));
        let want = 2f64.exp() / (1.0 + 2f64.exp() + 1f64.exp());
        assert!((got[0] - want).abs() < 1e-12);
    }
}
