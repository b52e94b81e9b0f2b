//! The committed digits fixtures (examples/models): a small CNN on scikit-learn's 8x8 digits
//! and labelled held-out inputs, compiled in so the demo runs from any directory.

use flotilla_api::v2::{InferRequest, InferTensor};
use flotilla_runtime::{Tensor, TensorData};

pub const MODEL: &[u8] = include_bytes!("../../models/digits_cnn.onnx");
pub const MODEL_INT8: &[u8] = include_bytes!("../../models/digits_cnn_int8_qdq.onnx");
/// A wide backbone (98.6% of the weights) with a small last layer `fc`, and the same model with
/// only `fc` retrained on drifted images: the pair for delta updates.
pub const MODEL_WIDE: &[u8] = include_bytes!("../../models/digits_cnn_wide.onnx");
pub const MODEL_WIDE_FC_RETRAINED: &[u8] = include_bytes!("../../models/digits_cnn_wide_fc_retrained.onnx");
const TEST_SET: &str = include_str!("../../models/digits_test.json");
/// The whole held-out set, `[450, 1, 8, 8]` float32: the drift baseline.
pub const BASELINE_NPY: &[u8] = include_bytes!("../../models/digits_baseline.npy");

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub label: usize,
    pub input: Vec<f32>,
    pub reference_probabilities: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct TestSet {
    samples: Vec<Sample>,
}

pub fn samples() -> Vec<Sample> {
    serde_json::from_str::<TestSet>(TEST_SET).expect("committed digits_test.json parses").samples
}

/// A v2 infer request holding `samples` as one batch.
pub fn request(samples: &[Sample]) -> InferRequest {
    let data: Vec<f32> = samples.iter().flat_map(|s| s.input.iter().copied()).collect();
    InferRequest {
        id: None,
        inputs: vec![InferTensor {
            name: "input".into(),
            shape: vec![samples.len() as u64, 1, 8, 8],
            datatype: "FP32".into(),
            data: serde_json::json!(data),
        }],
    }
}

/// Golden self-test cases: each sample as its own single-image batch.
pub fn golden(samples: &[Sample]) -> Vec<Vec<Tensor>> {
    samples
        .iter()
        .map(|s| vec![Tensor::new("input", vec![1, 1, 8, 8], TensorData::F32(s.input.clone())).expect("64 values")])
        .collect()
}

/// Argmax per row of a `[N, 10]` probabilities output.
pub fn classes(probabilities: &serde_json::Value) -> Vec<usize> {
    let flat: Vec<f64> =
        probabilities.as_array().map(|a| a.iter().filter_map(|v| v.as_f64()).collect()).unwrap_or_default();
    flat.chunks(10)
        .map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0))
        .collect()
}

/// The held-out images of the drift baseline, 64 pixels each in [0, 1].
pub fn baseline_images() -> Vec<Vec<f32>> {
    let arr = flotilla_builder::npy::parse(BASELINE_NPY).expect("committed digits_baseline.npy parses");
    arr.data.chunks(64).map(|c| c.iter().map(|&x| x as f32).collect()).collect()
}

/// The drift reference for the digits model: every baseline image, in batches.
pub fn baseline_reference() -> flotilla_builder::baseline::Reference {
    let images = baseline_images();
    let batches = images
        .chunks(32)
        .map(|b| {
            let data: Vec<f32> = b.concat();
            vec![Tensor::new("input", vec![b.len(), 1, 8, 8], TensorData::F32(data)).expect("64 values each")]
        })
        .collect();
    flotilla_builder::baseline::Reference { batches, labels: None }
}

/// What a changed camera does: the image inverted (dark digits on a light background).
pub fn inverted(image: &[f32]) -> Vec<f32> {
    image.iter().map(|x| 1.0 - x).collect()
}

/// A v2 infer request holding raw images as one batch.
pub fn images_request(images: &[Vec<f32>]) -> InferRequest {
    let data: Vec<f32> = images.concat();
    InferRequest {
        id: None,
        inputs: vec![InferTensor {
            name: "input".into(),
            shape: vec![images.len() as u64, 1, 8, 8],
            datatype: "FP32".into(),
            data: serde_json::json!(data),
        }],
    }
}

/// The true classes of the held-out images ([`baseline_images`]), in order.
pub const BASELINE_LABELS_NPY: &[u8] = include_bytes!("../../models/digits_baseline_labels.npy");

pub fn baseline_labels() -> Vec<u32> {
    let arr = flotilla_builder::npy::parse(BASELINE_LABELS_NPY).expect("committed digits_baseline_labels.npy parses");
    arr.data.iter().map(|&l| l as u32).collect()
}

/// What a camera whose exposure changed does: brighter, lower contrast, a little noise
/// (x' = clip(0.6x + 0.35 + n, 0, 1), |n| ≤ 0.03, the drift make_digits.py describes). `seed`
/// makes the noise differ between shots of the same scene.
pub fn brightened(image: &[f32], seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    image
        .iter()
        .map(|&x| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.06;
            (0.6 * x + 0.35 + n).clamp(0.0, 1.0)
        })
        .collect()
}

/// Labelled v2 requests (the format `flotilla drift samples export` writes and the trainer
/// reads): `images` in batches of `batch`, with their `labels`.
pub fn labelled_requests(images: &[Vec<f32>], labels: &[u32], batch: usize) -> serde_json::Value {
    let reqs: Vec<serde_json::Value> = images
        .chunks(batch)
        .zip(labels.chunks(batch))
        .map(|(imgs, ls)| {
            let mut r = serde_json::to_value(images_request(imgs)).expect("a request serializes");
            r["labels"] = serde_json::json!(ls);
            r
        })
        .collect();
    serde_json::Value::Array(reqs)
}
