//! A real trainer for Flotilla's retraining loop: fine-tune the last layer (a Gemm such as the
//! digits CNN's `fc`) of an ONNX classifier on labelled samples, keep everything else, and write
//! the model back as ONNX. The rest of the network runs in tract to compute the layer's input
//! features; the layer is a softmax regression trained with Adam on cross-entropy, starting from
//! its current weights.
//!
//! Samples are JSON: an array of v2 infer requests, each with `labels` (one per sample of its
//! batch) or `label` — the format `flotilla drift samples export` writes. Samples without labels
//! are skipped.

pub mod cli;

use anyhow::{Context, bail};
use flotilla_api::v2::InferTensor;
use prost::Message;
use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};
use tract_onnx::prelude::*;

/// Labelled single-input samples: flat values, the shape of one sample, and the classes.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub input: String,
    /// Shape of one sample, without the batch axis.
    pub sample_shape: Vec<usize>,
    pub values: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn extend(&mut self, other: Dataset) -> anyhow::Result<()> {
        if self.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.is_empty() {
            return Ok(());
        }
        if other.sample_shape != self.sample_shape || other.input != self.input {
            bail!("datasets of different inputs or shapes ({:?} vs {:?})", other.sample_shape, self.sample_shape);
        }
        self.values.extend(other.values);
        self.labels.extend(other.labels);
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct LabelledRequest {
    inputs: Vec<InferTensor>,
    #[serde(default)]
    labels: Option<Vec<u32>>,
    #[serde(default)]
    label: Option<u32>,
}

/// Labelled samples from JSON requests (see the crate docs).
pub fn read_samples(json: &[u8]) -> anyhow::Result<Dataset> {
    let reqs: Vec<LabelledRequest> = serde_json::from_slice(json).context("expected a JSON array of requests")?;
    let mut out = Dataset::default();
    for r in reqs {
        let labels = match (r.labels, r.label) {
            (Some(l), _) => l,
            (None, Some(l)) => vec![l],
            (None, None) => continue,
        };
        let [t] = r.inputs.as_slice() else { bail!("the trainer handles single-input models") };
        let values: Vec<f32> = t.flat_numbers().map_err(anyhow::Error::msg)?.into_iter().map(|v| v as f32).collect();
        let n = t.shape.first().copied().unwrap_or(1) as usize;
        if n != labels.len() || n == 0 || !values.len().is_multiple_of(n) {
            bail!("a request of {n} samples carries {} labels", labels.len());
        }
        let d = Dataset {
            input: t.name.clone(),
            sample_shape: t.shape.iter().skip(1).map(|&d| d as usize).collect(),
            values,
            labels,
        };
        out.extend(d)?;
    }
    Ok(out)
}

/// The layer to retrain: a Gemm node, its input (the features) and its weight and bias names.
struct Layer {
    features: String,
    weight: String,
    bias: String,
    trans_b: bool,
}

fn find_layer(model: &ModelProto, name: &str) -> anyhow::Result<Layer> {
    let graph = model.graph.as_ref().context("the model has no graph")?;
    let gemms: Vec<&NodeProto> = graph.node.iter().filter(|n| n.op_type == "Gemm").collect();
    let node = gemms
        .iter()
        .find(|n| n.name == name)
        .or(gemms.last())
        .with_context(|| format!("no Gemm node {name:?} (nor any Gemm) to retrain"))?;
    if node.input.len() != 3 {
        bail!("Gemm {:?} has no bias input", node.name);
    }
    let trans_b = node.attribute.iter().any(|a| a.name == "transB" && a.i == 1);
    Ok(Layer { features: node.input[0].clone(), weight: node.input[1].clone(), bias: node.input[2].clone(), trans_b })
}

fn initializer<'a>(model: &'a mut ModelProto, name: &str) -> anyhow::Result<&'a mut TensorProto> {
    model
        .graph
        .as_mut()
        .and_then(|g| g.initializer.iter_mut().find(|t| t.name == name))
        .with_context(|| format!("{name:?} is not an initializer"))
}

fn floats(t: &TensorProto) -> Vec<f32> {
    if !t.raw_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        t.float_data.clone()
    }
}

fn set_floats(t: &mut TensorProto, v: &[f32]) {
    t.float_data.clear();
    t.raw_data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
}

/// Runs the model on the data and returns `output` (a tensor name) for every sample, flat.
fn run_to(model: &[u8], data: &Dataset, output: Option<&str>) -> anyhow::Result<(Vec<f32>, usize)> {
    let mut m = tract_onnx::onnx().model_for_read(&mut &model[..])?;
    let mut shape = vec![data.len()];
    shape.extend(&data.sample_shape);
    m.set_input_fact(0, f32::fact(&shape).into())?;
    if let Some(name) = output {
        let outlet = m.find_outlet_label(name).with_context(|| format!("no tensor {name:?} in the model"))?;
        m.select_output_outlets(&[outlet])?;
    }
    let plan = m.into_optimized()?.into_runnable()?;
    let input = tract_ndarray::ArrayD::from_shape_vec(shape, data.values.clone())?;
    let out = plan.run(tvec!(Tensor::from(input).into()))?;
    let view = out[0].to_plain_array_view::<f32>()?;
    let width = view.len() / data.len().max(1);
    Ok((view.iter().copied().collect(), width))
}

/// Share of samples the model classifies right.
pub fn accuracy(model: &[u8], data: &Dataset) -> anyhow::Result<f64> {
    if data.is_empty() {
        bail!("no labelled samples to evaluate on");
    }
    let (out, classes) = run_to(model, data, None)?;
    let right = out
        .chunks(classes)
        .zip(&data.labels)
        .filter(|(row, l)| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32) == Some(**l))
        .count();
    Ok(right as f64 / data.len() as f64)
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub layer: String,
    pub epochs: usize,
    pub learning_rate: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions { layer: "fc".into(), epochs: 300, learning_rate: 0.01 }
    }
}

/// Fine-tunes the layer on `data` and returns the new model (ONNX bytes).
pub fn retrain(base: &[u8], data: &Dataset, opts: &TrainOptions) -> anyhow::Result<Vec<u8>> {
    if data.is_empty() {
        bail!("no labelled samples to train on (samples need feedback labels)");
    }
    let mut model = ModelProto::decode(base).context("not an ONNX model")?;
    let layer = find_layer(&model, &opts.layer)?;
    let (features, dim) = run_to(base, data, Some(&layer.features))?;
    let mut w = floats(initializer(&mut model, &layer.weight)?);
    let mut b = floats(initializer(&mut model, &layer.bias)?);
    let classes = b.len();
    if w.len() != classes * dim {
        bail!("weight of {} values does not fit {classes} classes × {dim} features", w.len());
    }
    // Work on W as [classes][dim] whatever its stored layout.
    let at = |c: usize, j: usize| if layer.trans_b { c * dim + j } else { j * classes + c };
    let mut wc: Vec<f32> = (0..classes * dim).map(|i| w[at(i / dim, i % dim)]).collect();
    adam(&mut wc, &mut b, &features, dim, &data.labels, opts);
    for i in 0..classes * dim {
        w[at(i / dim, i % dim)] = wc[i];
    }
    set_floats(initializer(&mut model, &layer.weight)?, &w);
    set_floats(initializer(&mut model, &layer.bias)?, &b);
    Ok(model.encode_to_vec())
}

/// Full-batch Adam on the mean cross-entropy of softmax(x·Wᵀ + b).
fn adam(w: &mut [f32], b: &mut [f32], x: &[f32], dim: usize, y: &[u32], opts: &TrainOptions) {
    let (classes, n) = (b.len(), y.len());
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let (mut mw, mut vw) = (vec![0f32; w.len()], vec![0f32; w.len()]);
    let (mut mb, mut vb) = (vec![0f32; classes], vec![0f32; classes]);
    let mut gw = vec![0f32; w.len()];
    let mut gb = vec![0f32; classes];
    let mut logits = vec![0f32; classes];
    for t in 1..=opts.epochs {
        gw.iter_mut().for_each(|g| *g = 0.0);
        gb.iter_mut().for_each(|g| *g = 0.0);
        for (s, &label) in y.iter().enumerate() {
            let xs = &x[s * dim..(s + 1) * dim];
            for c in 0..classes {
                logits[c] = b[c] + w[c * dim..(c + 1) * dim].iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            for c in 0..classes {
                let p = (logits[c] - max).exp() / z;
                let d = (p - if c as u32 == label { 1.0 } else { 0.0 }) / n as f32;
                gb[c] += d;
                for (g, xv) in gw[c * dim..(c + 1) * dim].iter_mut().zip(xs) {
                    *g += d * xv;
                }
            }
        }
        let (c1, c2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
        for (p, (g, (m, v))) in w.iter_mut().zip(gw.iter().zip(mw.iter_mut().zip(vw.iter_mut()))) {
            *m = beta1 * *m + (1.0 - beta1) * g;
            *v = beta2 * *v + (1.0 - beta2) * g * g;
            *p -= opts.learning_rate * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
        for (p, (g, (m, v))) in b.iter_mut().zip(gb.iter().zip(mb.iter_mut().zip(vb.iter_mut()))) {
            *m = beta1 * *m + (1.0 - beta1) * g;
            *v = beta2 * *v + (1.0 - beta2) * g * g;
            *p -= opts.learning_rate * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}
