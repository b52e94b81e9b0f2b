//! The drift baseline: run the model over reference data (the training or validation set) and
//! record, per signal, the sketch that devices will compare their live data against.

use std::path::Path;

use flotilla_bundle::manifest::{DType, Dim, ModelFormat, ModelSignature, RuntimeSettings, TensorSpec};
use flotilla_drift::{Collector, DriftConfig, Kind, Profile, Signal, Source};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

use crate::BuildError;

/// Media type of the `baseline` artifact: a [`Profile`] as JSON.
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.flotilla.drift-profile+json";
/// Most samples per model run while computing the baseline.
const BATCH: usize = 32;
/// Tabular inputs with up to this many features get one signal per feature, else their mean.
const MAX_FEATURE_SIGNALS: usize = 32;
/// Images with up to this many channels get one signal per channel, else their mean.
const MAX_CHANNEL_SIGNALS: usize = 16;
/// Most dimensions of an embedding output watched.
const MAX_EMBEDDING_SIGNALS: usize = 64;

/// How an input is reduced to signals (`--drift-input NAME=...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// One signal: the mean of the sample.
    Mean,
    /// One signal per channel along `axis` of the sample (None: 0 for ONNX, last for TFLite).
    ChannelMean(Option<u32>),
    /// One signal per value of the sample (tabular data).
    Features,
    /// No signal for this input.
    Off,
}

impl Reduction {
    /// `NAME=mean`, `NAME=channel-mean`, `NAME=channel-mean:2`, `NAME=features`, `NAME=off`.
    pub fn parse(s: &str) -> Result<(String, Reduction), BuildError> {
        let bad = || {
            BuildError::Input(format!(
                "--drift-input {s:?}: expected NAME=mean, NAME=channel-mean[:AXIS], NAME=features or NAME=off"
            ))
        };
        let (name, r) = s.split_once('=').ok_or_else(bad)?;
        let r = match r.trim() {
            "mean" => Reduction::Mean,
            "features" => Reduction::Features,
            "off" => Reduction::Off,
            "channel-mean" => Reduction::ChannelMean(None),
            other => {
                let axis = other.strip_prefix("channel-mean:").ok_or_else(bad)?;
                Reduction::ChannelMean(Some(axis.parse().map_err(|_| bad())?))
            }
        };
        Ok((name.trim().to_string(), r))
    }
}

/// What to watch and how (the `--drift-*` flags).
#[derive(Clone, Debug)]
pub struct DriftOptions {
    pub config: DriftConfig,
    /// Per input: how to reduce it (inputs not named get the default for their shape).
    pub inputs: Vec<(String, Reduction)>,
    /// Outputs whose dimensions to watch (embeddings).
    pub embeddings: Vec<String>,
    /// Bins per continuous signal's histogram.
    pub bins: usize,
    /// Watch exactly these signals (with their class counts) instead of choosing them from the
    /// signature: a retrained model keeps its predecessor's.
    pub signals: Option<Vec<(Signal, u32)>>,
}

impl Default for DriftOptions {
    fn default() -> Self {
        DriftOptions {
            config: DriftConfig::default(),
            inputs: Vec::new(),
            embeddings: Vec::new(),
            bins: 10,
            signals: None,
        }
    }
}

/// Reference data: model inputs, a sample per leading index, and optional true labels.
#[derive(Clone, Debug, Default)]
pub struct Reference {
    /// Each entry is one set of model inputs (any batch size).
    pub batches: Vec<Vec<Tensor>>,
    /// True class per sample, in order, when known (feeds the accuracy baseline).
    pub labels: Option<Vec<u32>>,
}

/// Read reference data: `.npy` (single-input models; the first axis indexes samples), CSV
/// (models with one `[N, F]` input; a header is optional, a column named `label` holds true
/// classes), or JSON v2 infer requests (any model).
pub fn read(path: &Path, sig: &ModelSignature) -> Result<Reference, BuildError> {
    let bytes = std::fs::read(path).map_err(|e| BuildError::Input(format!("cannot read {}: {e}", path.display())))?;
    let single = || match sig.inputs.as_slice() {
        [input] => Ok(input),
        _ => Err(BuildError::Input(format!(
            "{}: .npy and CSV baselines fit single-input models; this one has {} inputs (use JSON requests)",
            path.display(),
            sig.inputs.len()
        ))),
    };
    if bytes.starts_with(crate::npy::MAGIC) {
        let input = single()?;
        let arr = crate::npy::parse(&bytes).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
        let n = arr.shape.first().copied().unwrap_or(1);
        let batches = samples(input, n, arr.shape.get(1..).unwrap_or_default(), &arr.data, path)?;
        return Ok(Reference { batches, labels: None });
    }
    if bytes.first().is_some_and(|&b| b == b'{' || b == b'[') {
        let cases = crate::golden::read(path, sig)?;
        return Ok(Reference { batches: cases.into_iter().map(|(i, _)| i).collect(), labels: None });
    }
    let input = single()?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| BuildError::Input(format!("{}: not .npy, JSON or CSV text", path.display())))?;
    let (rows, labels) = parse_csv(text).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
    let width = rows.first().map_or(0, Vec::len);
    let data: Vec<f64> = rows.concat();
    let batches = samples(input, rows.len(), &[width], &data, path)?;
    Ok(Reference { batches, labels })
}

/// True labels from a file: `.npy` of integers, or one number per line.
pub fn read_labels(path: &Path) -> Result<Vec<u32>, BuildError> {
    let bytes = std::fs::read(path).map_err(|e| BuildError::Input(format!("cannot read {}: {e}", path.display())))?;
    let values: Vec<f64> = if bytes.starts_with(crate::npy::MAGIC) {
        crate::npy::parse(&bytes).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?.data
    } else {
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::Input(format!("{}: labels must be numbers: {e}", path.display())))?
    };
    values
        .iter()
        .map(|&v| {
            if v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64 {
                Ok(v as u32)
            } else {
                Err(BuildError::Input(format!("{}: label {v} is not a class index", path.display())))
            }
        })
        .collect()
}

/// CSV rows of features, and the label column when there is one.
type Table = (Vec<Vec<f64>>, Option<Vec<u32>>);

fn parse_csv(text: &str) -> Result<Table, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
    let first: Vec<&str> = lines.peek().map(|l| l.split(',').map(str::trim).collect()).unwrap_or_default();
    let header = first.iter().any(|c| c.parse::<f64>().is_err());
    let label_col = if header { first.iter().position(|c| c.eq_ignore_ascii_case("label")) } else { None };
    if header {
        lines.next();
    }
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        let mut row = Vec::new();
        for (j, cell) in line.split(',').map(str::trim).enumerate() {
            let v: f64 = cell.parse().map_err(|_| format!("row {}: {cell:?} is not a number", i + 1))?;
            if Some(j) == label_col {
                if v < 0.0 || v.fract() != 0.0 {
                    return Err(format!("row {}: label {v} is not a class index", i + 1));
                }
                labels.push(v as u32);
            } else {
                row.push(v);
            }
        }
        if rows.first().is_some_and(|r: &Vec<f64>| r.len() != row.len()) {
            return Err(format!("row {} has {} values, the first row {}", i + 1, row.len(), rows[0].len()));
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err("no data rows".into());
    }
    Ok((rows, label_col.map(|_| labels)))
}

/// Cut `n` samples of shape `sample` out of `data` into model-sized batches for `input`.
fn samples(
    input: &TensorSpec,
    n: usize,
    sample: &[usize],
    data: &[f64],
    path: &Path,
) -> Result<Vec<Vec<Tensor>>, BuildError> {
    let want: Vec<Option<u64>> = input
        .shape
        .iter()
        .skip(1)
        .map(|d| match d {
            Dim::Fixed(n) => Some(*n),
            Dim::Symbolic(_) => None,
        })
        .collect();
    let fits = want.len() == sample.len() && want.iter().zip(sample).all(|(w, &s)| w.is_none_or(|w| w as usize == s));
    if !fits || n == 0 {
        return Err(BuildError::Input(format!(
            "{}: holds {n} samples of shape {sample:?}; input {:?} takes samples of shape [{}]",
            path.display(),
            input.name,
            input.shape.iter().skip(1).map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    let per: usize = sample.iter().product();
    let batch = match input.shape.first() {
        Some(Dim::Fixed(b)) => *b as usize,
        _ => BATCH,
    }
    .max(1);
    let mut out = Vec::new();
    for start in (0..n).step_by(batch) {
        let count = batch.min(n - start);
        if matches!(input.shape.first(), Some(Dim::Fixed(_))) && count != batch {
            break; // a fixed batch size: a partial last batch cannot run
        }
        let mut shape = vec![count];
        shape.extend_from_slice(sample);
        let slice = &data[start * per..(start + count) * per];
        let data = TensorData::from_f64(input.dtype, slice)?;
        out.push(vec![Tensor::new(input.name.clone(), shape, data)?]);
    }
    Ok(out)
}

fn numeric(dtype: DType) -> bool {
    dtype != DType::Bool
}

fn fixed(d: &Dim) -> Option<usize> {
    match d {
        Dim::Fixed(n) => Some(*n as usize),
        Dim::Symbolic(_) => None,
    }
}

/// The signals to watch for a model, with the number of classes of categorical ones.
pub fn signals(sig: &ModelSignature, opts: &DriftOptions) -> Result<Vec<(Signal, u32)>, BuildError> {
    for (name, _) in &opts.inputs {
        if !sig.inputs.iter().any(|i| &i.name == name) {
            return Err(BuildError::Input(format!("--drift-input names {name:?}, which is not a model input")));
        }
    }
    let mut out = Vec::new();
    let prefix = |t: &str, s: &str| format!("{t}.{s}");
    for input in &sig.inputs {
        let sample = input.shape.get(1..).unwrap_or_default();
        let chosen = opts.inputs.iter().find(|(n, _)| n == &input.name).map(|(_, r)| r.clone());
        let reduction = match chosen {
            Some(r) => r,
            None if !numeric(input.dtype) || input.shape.len() < 2 => Reduction::Off,
            None if sample.len() == 1 && fixed(&sample[0]).is_some_and(|f| f <= MAX_FEATURE_SIGNALS) => {
                Reduction::Features
            }
            None if sample.len() >= 2 => Reduction::ChannelMean(None),
            None => Reduction::Mean,
        };
        let t = input.name.clone();
        match reduction {
            Reduction::Off => {}
            Reduction::Mean => out.push((
                Signal { name: prefix(&t, "mean"), source: Source::InputMean { tensor: t }, kind: Kind::Continuous },
                0,
            )),
            Reduction::Features => {
                let f = sample
                    .iter()
                    .map(fixed)
                    .product::<Option<usize>>()
                    .ok_or_else(|| BuildError::Input(format!("input {t:?}: features need a fixed sample shape")))?;
                for index in 0..f as u32 {
                    out.push((
                        Signal {
                            name: prefix(&t, &format!("f{index}")),
                            source: Source::InputFeature { tensor: t.clone(), index },
                            kind: Kind::Continuous,
                        },
                        0,
                    ));
                }
            }
            Reduction::ChannelMean(axis) => {
                let default_axis = match sig.format {
                    ModelFormat::Onnx => 0,
                    ModelFormat::Tflite => sample.len().saturating_sub(1) as u32,
                };
                let axis = axis.unwrap_or(default_axis);
                let by_default = opts.inputs.iter().all(|(n, _)| n != &t);
                let channels = match sample.get(axis as usize).and_then(fixed) {
                    Some(c) => c,
                    // A free axis (a sequence's length, say) has no channels to watch: the
                    // default falls back to the mean; a request for them is an error.
                    None if by_default => usize::MAX,
                    None => {
                        return Err(BuildError::Input(format!(
                            "input {t:?}: axis {axis} of its samples is not a fixed dimension"
                        )));
                    }
                };
                if channels > MAX_CHANNEL_SIGNALS && by_default {
                    out.push((
                        Signal {
                            name: prefix(&t, "mean"),
                            source: Source::InputMean { tensor: t },
                            kind: Kind::Continuous,
                        },
                        0,
                    ));
                    continue;
                }
                for index in 0..channels as u32 {
                    out.push((
                        Signal {
                            name: prefix(&t, &format!("c{index}")),
                            source: Source::InputChannelMean { tensor: t.clone(), axis, index },
                            kind: Kind::Continuous,
                        },
                        0,
                    ));
                }
            }
        }
    }
    // The first classifier-like output ([N, C], 2 ≤ C ≤ MAX_BINS): predicted class, confidence,
    // accuracy. A wider one is an embedding (a 2048-wide audio feature), not C classes.
    if let Some(o) = sig.outputs.iter().find(|o| {
        matches!(o.dtype, DType::F32 | DType::F64 | DType::F16)
            && o.shape.len() == 2
            && fixed(&o.shape[1]).is_some_and(|c| (2..=flotilla_drift::MAX_BINS).contains(&c))
    }) {
        let classes = fixed(&o.shape[1]).unwrap_or(2) as u32;
        out.push((
            Signal { name: "class".into(), source: Source::Class { output: o.name.clone() }, kind: Kind::Categorical },
            classes,
        ));
        // Whether to softmax is decided from the reference outputs (see `profile`).
        out.push((
            Signal {
                name: "confidence".into(),
                source: Source::Confidence { output: o.name.clone(), softmax: false },
                kind: Kind::Continuous,
            },
            0,
        ));
        out.push((Signal { name: "accuracy".into(), source: Source::Accuracy, kind: Kind::Categorical }, 2));
    }
    for e in &opts.embeddings {
        let o =
            sig.outputs.iter().find(|o| &o.name == e).ok_or_else(|| {
                BuildError::Input(format!("--drift-embedding names {e:?}, which is not a model output"))
            })?;
        let dims =
            o.shape.get(1..).unwrap_or_default().iter().map(fixed).product::<Option<usize>>().ok_or_else(|| {
                BuildError::Input(format!("output {e:?}: an embedding needs a fixed shape after the batch axis"))
            })?;
        for index in 0..dims.min(MAX_EMBEDDING_SIGNALS) as u32 {
            out.push((
                Signal {
                    name: format!("{e}.d{index}"),
                    source: Source::OutputDim { output: e.clone(), index },
                    kind: Kind::Continuous,
                },
                0,
            ));
        }
    }
    if out.is_empty() {
        return Err(BuildError::Input(
            "no drift signal fits this model: name inputs with --drift-input or outputs with --drift-embedding".into(),
        ));
    }
    Ok(out)
}

/// The options that rebuild `previous`'s profile on new reference data: the same signals,
/// configuration and number of bins.
pub fn options_of(previous: &Profile) -> DriftOptions {
    let bins = previous
        .signals
        .iter()
        .filter(|s| s.signal.kind == Kind::Continuous)
        .map(|s| s.baseline.hist.edges.len().saturating_sub(1))
        .max()
        .filter(|&b| b > 0)
        .unwrap_or(10);
    let signals = previous
        .signals
        .iter()
        .map(|s| (s.signal.clone(), s.baseline.hist.edges.len().saturating_sub(1) as u32))
        .collect();
    DriftOptions { config: previous.config.clone(), bins, signals: Some(signals), ..DriftOptions::default() }
}

/// Runs the model over the reference data and builds the profile.
pub fn profile(
    runtimes: &Runtimes,
    model: &[u8],
    sig: &ModelSignature,
    settings: &RuntimeSettings,
    reference: &Reference,
    opts: &DriftOptions,
) -> Result<Profile, BuildError> {
    let mut signals = match &opts.signals {
        Some(s) => s.clone(),
        None => signals(sig, opts)?,
    };
    let settings = RuntimeSettings { delegate: None, accelerator_required: false, ..settings.clone() };
    let loaded = runtimes.load(model, sig, &settings)?;
    let mut runs = Vec::with_capacity(reference.batches.len());
    for (i, batch) in reference.batches.iter().enumerate() {
        let inputs = flotilla_runtime::check_inputs(&sig.inputs, batch.clone())
            .map_err(|e| BuildError::Input(format!("baseline sample batch {i}: {e}")))?;
        let outputs = flotilla_runtime::run(loaded.as_ref(), inputs.clone())?;
        runs.push((inputs, outputs));
    }
    // Outputs that are not already probabilities get a softmax before their top score is taken.
    for (s, _) in &mut signals {
        if let Source::Confidence { output, softmax } = &mut s.source {
            let probabilities = runs.iter().all(|(_, outs)| {
                outs.iter().find(|o| &o.name == output).is_some_and(|o| {
                    let v = o.data.to_f64();
                    let c = o.shape.get(1).copied().unwrap_or(1).max(1);
                    v.chunks(c).all(|row| {
                        row.iter().all(|x| (0.0..=1.0).contains(x)) && (row.iter().sum::<f64>() - 1.0).abs() < 1e-3
                    })
                })
            });
            *softmax = !probabilities;
        }
    }
    let mut collector = Collector::new(signals.clone());
    let mut predicted = Vec::new();
    let class_output = signals.iter().find_map(|(s, _)| match &s.source {
        Source::Class { output } => Some(output.clone()),
        _ => None,
    });
    for (inputs, outputs) in &runs {
        let iv: Vec<_> = inputs.iter().map(Tensor::drift_view).collect();
        let ov: Vec<_> = outputs.iter().map(Tensor::drift_view).collect();
        collector.observe(&iv, &ov);
        if let Some(out) = class_output.as_ref().and_then(|n| outputs.iter().find(|o| &o.name == n)) {
            let c = out.shape.get(1).copied().unwrap_or(1).max(1);
            for row in out.data.to_f64().chunks(c) {
                let best =
                    row.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
                predicted.push(best.0 as u32);
            }
        }
    }
    if let Some(labels) = &reference.labels {
        if class_output.is_none() {
            return Err(BuildError::Input("labels were given but the model has no classifier output".into()));
        }
        if labels.len() != predicted.len() {
            return Err(BuildError::Input(format!("{} labels for {} baseline samples", labels.len(), predicted.len())));
        }
        for (l, p) in labels.iter().zip(&predicted) {
            collector.feedback(l == p);
        }
    }
    collector.finish(opts.config.clone(), opts.bins).map_err(|e| BuildError::Input(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[Dim]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    fn names(v: &[(Signal, u32)]) -> Vec<&str> {
        v.iter().map(|(s, _)| s.name.as_str()).collect()
    }

    #[test]
    fn default_signals_follow_the_model_shape() {
        let n = Dim::Symbolic("N".into());
        let f = Dim::Fixed;
        // An NHWC TFLite image model: channels on the last axis; a classifier output.
        let tflite = ModelSignature {
            format: ModelFormat::Tflite,
            inputs: vec![spec("image", DType::U8, &[f(1), f(4), f(4), f(3)])],
            outputs: vec![spec("scores", DType::F32, &[f(1), f(5)])],
        };
        let s = signals(&tflite, &DriftOptions::default()).unwrap();
        assert_eq!(names(&s), ["image.c0", "image.c1", "image.c2", "class", "confidence", "accuracy"]);
        assert!(matches!(s[2].0.source, Source::InputChannelMean { axis: 2, index: 2, .. }));
        assert_eq!(s[3].1, 5, "five classes");
        // Tabular: one signal per feature; a scalar input gets none; an embedding on request.
        let tab = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("x", DType::F32, &[n.clone(), f(3)]), spec("sr", DType::I64, &[f(1)])],
            outputs: vec![spec("emb", DType::F32, &[n.clone(), f(2)])],
        };
        let opts = DriftOptions { embeddings: vec!["emb".into()], ..DriftOptions::default() };
        let s = signals(&tab, &opts).unwrap();
        assert_eq!(names(&s), ["x.f0", "x.f1", "x.f2", "class", "confidence", "accuracy", "emb.d0", "emb.d1"]);
        let opts = DriftOptions { inputs: vec![("x".into(), Reduction::Mean)], ..DriftOptions::default() };
        assert_eq!(names(&signals(&tab, &opts).unwrap())[0], "x.mean");
        let opts = DriftOptions { inputs: vec![("nope".into(), Reduction::Mean)], ..DriftOptions::default() };
        assert!(signals(&tab, &opts).is_err());
        assert_eq!(Reduction::parse("x=channel-mean:1").unwrap(), ("x".into(), Reduction::ChannelMean(Some(1))));
        // A sequence of free length ([N, T, 28], an LSTM's): no channel axis, so the mean by
        // default; channel means on the free axis only when asked for, and then refused.
        let seq = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("x", DType::F32, &[n.clone(), Dim::Symbolic("T".into()), f(28)])],
            outputs: vec![spec("h", DType::F32, &[n.clone(), f(256)])],
        };
        assert_eq!(names(&signals(&seq, &DriftOptions::default()).unwrap())[0], "x.mean");
        let opts = DriftOptions { inputs: vec![("x".into(), Reduction::ChannelMean(None))], ..DriftOptions::default() };
        assert!(signals(&seq, &opts).unwrap_err().to_string().contains("not a fixed dimension"));
        // A 2048-wide output is no classifier (a histogram holds at most 1024 classes).
        let emb = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("x", DType::F32, &[f(1), f(1), f(149), f(64)])],
            outputs: vec![spec("feature_output", DType::F32, &[f(1), f(2048)])],
        };
        assert_eq!(names(&signals(&emb, &DriftOptions::default()).unwrap()), ["x.c0"]);
        assert!(Reduction::parse("x=median").is_err());
    }

    #[test]
    fn csv_with_a_header_and_labels() {
        let (rows, labels) = parse_csv("a,b,label\n1,2,0\n3,4.5,2\n\n").unwrap();
        assert_eq!(rows, vec![vec![1.0, 2.0], vec![3.0, 4.5]]);
        assert_eq!(labels, Some(vec![0, 2]));
        let (rows, labels) = parse_csv("1,2\n3,4\n").unwrap();
        assert_eq!((rows.len(), labels), (2, None));
        assert!(parse_csv("a,b\n1,x\n").unwrap_err().contains("not a number"));
        assert!(parse_csv("1,2\n3\n").unwrap_err().contains("row 2"));
        assert!(parse_csv("a,label\n1,0.5\n").unwrap_err().contains("class index"));
        // Batches cut to the model's fixed batch size; samples that do not fit say so.
        let input = spec("x", DType::F32, &[Dim::Fixed(2), Dim::Fixed(2)]);
        let b = samples(&input, 5, &[2], &[0.0; 10], Path::new("d.csv")).unwrap();
        assert_eq!(b.len(), 2, "a fixed batch of 2: the fifth sample cannot run");
        let e = samples(&input, 5, &[3], &[0.0; 15], Path::new("d.csv")).unwrap_err();
        assert!(e.to_string().contains("samples of shape [2]"), "{e}");
    }
}
