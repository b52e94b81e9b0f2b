//! The tract-onnx backend on real ONNX models nobody here wrote (Silero VAD from silero-vad 5.1.2,
//! the openWakeWord 0.4.0 feature models and classifiers, all from PyPI) against onnxruntime's
//! outputs for the same inputs.
//!
//! The models and `reference.json` are fetched on first use by `assets/fetch-onnx.sh` into
//! `target/test-assets/onnx` (git-ignored); `assets/make_onnx_reference.py` says what the inputs
//! are. Stateful models are checked as streams: each step's state input is this backend's own
//! state output from the step before, so errors accumulate as they would on a device. The Silero
//! VADs only run on tract's inference-mode runner (see below).

mod common;
use common::RefTensor;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use flotilla_bundle::manifest::{DType, Dim, ModelSignature, TensorSpec};
use flotilla_runtime::tract_onnx::inspect_onnx;
use flotilla_runtime::{LoadedModel, RuntimeError, Runtimes, Tensor, check_inputs};

const TOLERANCE: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    reference: String,
    models: Vec<RefModel>,
}

#[derive(serde::Deserialize)]
struct RefModel {
    file: String,
    ort_signature: OrtSignature,
    /// (input, output) pairs: a continuing case takes the input from the previous step's output.
    feedback: Vec<(String, String)>,
    cases: Vec<Case>,
}

/// The graph's inputs and outputs as onnxruntime reports them.
#[derive(serde::Deserialize)]
struct OrtSignature {
    inputs: Vec<OrtSpec>,
    outputs: Vec<OrtSpec>,
}

#[derive(serde::Deserialize)]
struct OrtSpec {
    name: String,
    dtype: DType,
    /// A number, a dim_param name, or null for an unnamed unknown dim.
    shape: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Case {
    continues: bool,
    inputs: Vec<RefTensor>,
    outputs: Vec<RefTensor>,
}

/// The assets directory, fetched once per test binary when missing.
fn assets() -> &'static Path {
    static ASSETS: OnceLock<PathBuf> = OnceLock::new();
    ASSETS.get_or_init(|| common::fetch_assets("onnx", "fetch-onnx.sh"))
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(assets().join("models/reference.json")).unwrap()).unwrap()
    })
}

fn model(file: &str) -> &'static RefModel {
    reference().models.iter().find(|m| m.file == file).unwrap_or_else(|| panic!("{file} is not in reference.json"))
}

fn model_bytes(m: &RefModel) -> Vec<u8> {
    std::fs::read(assets().join("models").join(&m.file)).unwrap()
}

fn signature(m: &RefModel) -> ModelSignature {
    inspect_onnx(&model_bytes(m)).unwrap()
}

/// `sig` with `input`'s dimension `axis` declared as `dim` (as a bundle manifest may declare it).
fn declare(mut sig: ModelSignature, input: &str, axis: usize, dim: Dim) -> ModelSignature {
    sig.inputs.iter_mut().find(|s| s.name == input).unwrap().shape[axis] = dim;
    sig
}

fn load(m: &RefModel, sig: &ModelSignature) -> Result<Box<dyn LoadedModel>, RuntimeError> {
    let model = Runtimes::default().load(&model_bytes(m), sig, &Default::default())?;
    assert_eq!(model.backend(), "tract-onnx");
    Ok(model)
}

/// Run `cases` in order on `model` (feeding state back) and return the largest difference from
/// onnxruntime.
fn max_diff(m: &RefModel, sig: &ModelSignature, model: &dyn LoadedModel, cases: &[Case]) -> f64 {
    let file = &m.file;
    let mut worst = 0f64;
    let mut previous: Vec<Tensor> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut inputs: Vec<Tensor> = case.inputs.iter().map(RefTensor::tensor).collect();
        if case.continues {
            for (input, output) in &m.feedback {
                let state = previous.iter().find(|t| t.name == *output).unwrap().clone();
                let slot = inputs.iter_mut().find(|t| t.name == *input).unwrap();
                *slot = Tensor { name: input.clone(), ..state };
            }
        }
        let inputs = check_inputs(&sig.inputs, inputs).unwrap();
        let outputs = flotilla_runtime::run(model, inputs).unwrap_or_else(|e| panic!("{file} case {i}: {e}"));
        assert_eq!(outputs.len(), case.outputs.len(), "{file} case {i}");
        for (got, want) in outputs.iter().zip(&case.outputs) {
            assert_eq!(got.name, want.name, "{file} case {i}");
            assert_eq!(got.data.dtype(), want.dtype, "{file} case {i} {}", want.name);
            assert_eq!(got.shape, want.shape, "{file} case {i} {}", want.name);
            for (a, b) in got.data.to_f64().iter().zip(&want.data) {
                worst = worst.max((a - b).abs());
            }
        }
        previous = outputs;
    }
    worst
}

/// `file` loads with the signature `inspect_onnx` reads and every case matches onnxruntime.
fn assert_matches(file: &str) {
    let m = model(file);
    let sig = signature(m);
    let start = Instant::now();
    let model = load(m, &sig).unwrap_or_else(|e| panic!("{file}: {e}"));
    let loaded = start.elapsed();
    let diff = max_diff(m, &sig, model.as_ref(), &m.cases);
    let ran = start.elapsed() - loaded;
    eprintln!(
        "tract-onnx {file:36} {:2} cases  max |diff| {diff:.2e}  load {loaded:.0?}  run {ran:.0?}",
        m.cases.len()
    );
    assert!(diff <= TOLERANCE, "{file}: max |diff| {diff:e} > {TOLERANCE:e}");
}

/// Every model of the reference is one of these and checked below.
const MODELS: &[&str] = &[
    "silero_vad/silero_vad.onnx",
    "silero_vad/silero_vad_half.onnx",
    "openwakeword/silero_vad.onnx",
    "openwakeword/melspectrogram.onnx",
    "openwakeword/embedding_model.onnx",
    "openwakeword/alexa_v0.1.onnx",
    "openwakeword/hey_jarvis_v0.1.onnx",
    "openwakeword/hey_marvin_v0.1.onnx",
    "openwakeword/hey_mycroft_v0.1.onnx",
    "openwakeword/timer_v0.1.onnx",
    "openwakeword/weather_v0.1.onnx",
];

#[test]
fn every_reference_model_is_checked() {
    eprintln!("reference: {}", reference().reference);
    let files: Vec<&str> = reference().models.iter().map(|m| m.file.as_str()).collect();
    assert_eq!(files, MODELS);
}

#[test]
fn inspect_agrees_with_onnxruntime() {
    fn same(file: &str, ours: &[TensorSpec], ort: &[OrtSpec]) {
        assert_eq!(ours.len(), ort.len(), "{file}");
        for (a, b) in ours.iter().zip(ort) {
            assert_eq!((a.name.as_str(), a.dtype), (b.name.as_str(), b.dtype), "{file}");
            assert_eq!(a.shape.len(), b.shape.len(), "{file} {}", a.name);
            for (d, o) in a.shape.iter().zip(&b.shape) {
                let ok = match (d, o) {
                    (Dim::Fixed(n), serde_json::Value::Number(m)) => m.as_u64() == Some(*n),
                    (Dim::Symbolic(s), serde_json::Value::String(p)) => s == p,
                    (Dim::Symbolic(_), serde_json::Value::Null) => true,
                    _ => false,
                };
                assert!(ok, "{file} {}: {:?} vs onnxruntime's {:?}", a.name, a.shape, b.shape);
            }
        }
    }
    for m in &reference().models {
        let sig = signature(m);
        same(&m.file, &sig.inputs, &m.ort_signature.inputs);
        same(&m.file, &sig.outputs, &m.ort_signature.outputs);
    }
    // Unnamed dims get names of their own, so nothing ties silero's two batch dims together: a
    // manifest must name them alike (tract cannot unify two different symbols).
    let sig = signature(model("silero_vad/silero_vad.onnx"));
    assert_eq!(format!("{:?}", sig.inputs[0].shape), r#"[Symbolic("input_0"), Symbolic("input_1")]"#);
    assert_eq!(format!("{:?}", sig.inputs[1].shape), r#"[Fixed(2), Symbolic("state_1"), Fixed(128)]"#);
}

/// The reference streams are what `max_diff` assumes: a stream starts with a case that does not
/// continue, and a continuing case's state inputs are the previous step's state outputs.
#[test]
fn reference_streams_feed_state_back() {
    let mut streams = Vec::new();
    for m in reference().models.iter().filter(|m| !m.feedback.is_empty()) {
        assert!(!m.cases[0].continues, "{}", m.file);
        let starts = m.cases.iter().filter(|c| !c.continues).count();
        streams.push((m.file.as_str(), starts, m.cases.len()));
        for pair in m.cases.windows(2) {
            let [before, case] = pair else { unreachable!("windows of two") };
            for (input, output) in m.feedback.iter().filter(|_| case.continues) {
                let fed = case.inputs.iter().find(|t| t.name == *input).unwrap();
                let out = before.outputs.iter().find(|t| t.name == *output).unwrap();
                assert_eq!((&fed.shape, &fed.data), (&out.shape, &out.data), "{} {input}", m.file);
            }
        }
    }
    assert_eq!(
        streams,
        [
            ("silero_vad/silero_vad.onnx", 3, 42),
            ("silero_vad/silero_vad_half.onnx", 2, 28),
            ("openwakeword/silero_vad.onnx", 1, 14)
        ]
    );
}

/// Dynamic batch and length: [1, 1280], [2, 1760], then [1, 1280] again on the same model.
#[test]
fn openwakeword_melspectrogram_matches_onnxruntime() {
    assert_matches("openwakeword/melspectrogram.onnx");
}

/// Dynamic batch: 1 then 3 windows of the melspectrogram of the synthetic utterance.
#[test]
fn openwakeword_embedding_matches_onnxruntime() {
    assert_matches("openwakeword/embedding_model.onnx");
}

/// The MLP classifiers on the utterance's embeddings and on noise at two levels. hey_jarvis has an
/// IF that picks at run time between its score and a verifier network's (both branches give a
/// [1, 1] score, so tract can type it); its loud-noise case takes the verifier branch.
#[test]
fn openwakeword_classifiers_match_onnxruntime() {
    for file in ["alexa", "hey_jarvis", "hey_marvin", "timer", "weather"] {
        assert_matches(&format!("openwakeword/{file}_v0.1.onnx"));
    }
}

/// hey_mycroft (a Keras bidirectional LSTM via tf2onnx) builds its zero initial state with
/// Expand(0, Shape -> Cast(INT32) -> Slice -> Concat -> Cast(INT64) of the input). tract's
/// optimiser cannot follow that shape with a symbolic batch, so as inspected it runs on tract's
/// inference-mode runner; with the batch declared fixed it gets the optimised plan. Both match.
#[test]
fn openwakeword_hey_mycroft_matches_onnxruntime() {
    let file = "openwakeword/hey_mycroft_v0.1.onnx";
    assert_matches(file);
    let m = model(file);
    for case in &m.cases {
        let batch = case.inputs[0].shape[0];
        let sig = declare(signature(m), "input_1", 0, Dim::Fixed(batch as u64));
        let model = load(m, &sig).unwrap_or_else(|e| panic!("{file} with batch {batch}: {e}"));
        let diff = max_diff(m, &sig, model.as_ref(), std::slice::from_ref(case));
        eprintln!("tract-onnx {file:36} batch {batch}  max |diff| {diff:.2e}");
        assert!(diff <= TOLERANCE, "{file} batch {batch}: max |diff| {diff:e}");
    }
}

// The Silero VADs are TorchScript exports full of IF ops: `squeeze` becomes
// `If(dim == 1, Squeeze, Identity)`, and silero-vad 5 dispatches on `sr` (16 kHz or 8 kHz) with
// an IF over the whole network. tract 0.23's optimiser types both branches of every IF and wants
// them to agree, which these cannot; the backend then runs them on tract's inference-mode
// runner, which picks the branch at run time. Checked as streams (16 kHz and 8 kHz, and a batch
// of two streams), the state fed back at every step.

/// silero-vad 5.1.2 (inputs `input`, `state`, `sr`).
#[test]
fn silero_vad_5_matches_onnxruntime() {
    assert_matches("silero_vad/silero_vad.onnx");
}

/// The 16 kHz-only silero-vad 5.1.2 variant.
#[test]
fn silero_vad_5_half_matches_onnxruntime() {
    assert_matches("silero_vad/silero_vad_half.onnx");
}

/// The older Silero VAD that openWakeWord 0.4.0 ships (`h` and `c` instead of `state`).
#[test]
fn openwakeword_silero_vad_matches_onnxruntime() {
    assert_matches("openwakeword/silero_vad.onnx");
}
