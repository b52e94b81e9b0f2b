//! The tract-onnx backend on real ONNX models nobody here wrote (Silero VAD from silero-vad 5.1.2,
//! the openWakeWord 0.4.0 feature models and classifiers, all from PyPI) against onnxruntime's
//! outputs for the same inputs.
//!
//! The models and `reference.json` are fetched on first use by `assets/fetch-onnx.sh` into
//! `target/test-assets/onnx` (git-ignored); `assets/make_onnx_reference.py` says what the inputs
//! are. Stateful models run as streams: each step's state input is this backend's own state
//! output from the step before, so errors would accumulate as they would on a device.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use flotilla_bundle::manifest::{DType, Dim, ModelSignature, TensorSpec};
use flotilla_runtime::tract_onnx::inspect_onnx;
use flotilla_runtime::{LoadedModel, RuntimeError, Runtimes, Tensor, TensorData, check_inputs};

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

#[derive(serde::Deserialize)]
struct RefTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl RefTensor {
    fn tensor(&self) -> Tensor {
        Tensor::new(&self.name, self.shape.clone(), TensorData::from_f64(self.dtype, &self.data).unwrap()).unwrap()
    }
}

/// The assets directory, fetched once per test binary when missing.
fn assets() -> &'static Path {
    static ASSETS: OnceLock<PathBuf> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = crate_dir.join("../../target/test-assets/onnx");
        if !dir.join("models/reference.json").exists() {
            let status = Command::new("bash").arg(crate_dir.join("assets/fetch-onnx.sh")).arg(&dir).status().unwrap();
            assert!(status.success(), "assets/fetch-onnx.sh failed ({status})");
        }
        dir
    })
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

/// tract-onnx refuses `file` declared as `sig`, with an error that says where and why. Should a
/// newer tract load it, this fails with the comparison to run instead.
fn assert_refused(file: &str, sig: &ModelSignature, why: &[&str]) {
    let m = model(file);
    match load(m, sig) {
        Ok(model) => panic!(
            "{file} now loads on tract-onnx (max |diff| {:e} over the reference): compare it instead",
            max_diff(m, sig, model.as_ref(), &m.cases)
        ),
        Err(RuntimeError::Unsupported(e)) => {
            eprintln!("tract-onnx {file:36} refused: {e}");
            assert!(e.contains("model failed to load on tract-onnx"), "{file}: {e}");
            for w in why {
                assert!(e.contains(w), "{file}: expected {w:?} in: {e}");
            }
        }
        Err(e) => panic!("{file}: expected Unsupported, got {e}"),
    }
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
/// Expand from Shape -> Cast(INT32) -> Slice -> Concat -> Cast(INT64) of the input; with a
/// symbolic batch tract loses that shape, so the model only loads with the batch declared fixed.
#[test]
fn openwakeword_hey_mycroft_matches_onnxruntime_with_a_fixed_batch() {
    let file = "openwakeword/hey_mycroft_v0.1.onnx";
    let m = model(file);
    assert_refused(
        file,
        &signature(m),
        &["model/bidirectional/backward_lstm/zeros", "shape input is variable, of variable length"],
    );
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
// an IF over the whole network. tract 0.23 types both branches of every IF, even when the
// condition is known, and wants both to have the same output fact; it cannot, so these models
// do not load on tract-onnx whatever the manifest declares. The references (16 kHz and 8 kHz
// streams, a batch of two streams; state fed back at every step) are there for when they do.

/// silero-vad 5.1.2. Declared as inspected, the 16 kHz branch's squeeze of a symbolic dim fails;
/// declared as concrete as a 16 kHz stream can be ([1, 576], state [2, 1, 128]), the 8 kHz
/// branch, analysed with the same input, squeezes a dim of 2.
#[test]
fn silero_vad_5_is_refused_by_tract() {
    let file = "silero_vad/silero_vad.onnx";
    let squeeze = "Attempt to squeeze an axis which dimension is not one";
    let sig = signature(model(file));
    assert_refused(file, &sig, &["If_0_then_branch__Inline_0__/decoder/Squeeze", squeeze]);
    let sig = declare(sig, "input", 0, Dim::Fixed(1));
    let sig = declare(sig, "input", 1, Dim::Fixed(576));
    let sig = declare(sig, "state", 1, Dim::Fixed(1));
    assert_refused(
        file,
        &sig,
        &["If_0_else_branch__Inline_0__/decoder/Squeeze", squeeze, "[Val(1), Val(128), Val(2)]"],
    );
}

/// The 16 kHz-only silero-vad 5.1.2 variant: even at fixed shapes the typed IF refuses a
/// squeeze in one branch and an identity in the other.
#[test]
fn silero_vad_5_half_is_refused_by_tract() {
    let file = "silero_vad/silero_vad_half.onnx";
    let sig = signature(model(file));
    assert_refused(file, &sig, &["/decoder/Squeeze", "Attempt to squeeze an axis which dimension is not one"]);
    let sig = declare(sig, "input", 0, Dim::Fixed(1));
    let sig = declare(sig, "input", 1, Dim::Fixed(576));
    let sig = declare(sig, "state", 1, Dim::Fixed(1));
    assert_refused(file, &sig, &["\"/decoder/If\" If ToTypedTranslator", "IfThenElse", "(1,128,F32 vs 1,128,1,F32)"]);
}

/// The older Silero VAD openWakeWord 0.4.0 ships (h and c instead of state): the same typed-IF
/// refusal, with symbolic or fixed shapes.
#[test]
fn openwakeword_silero_vad_is_refused_by_tract() {
    let file = "openwakeword/silero_vad.onnx";
    let sig = signature(model(file));
    assert_refused(
        file,
        &sig,
        &["\"If_69\" If ToTypedTranslator", "IfThenElse", "(batch,1,sequence+192,F32 vs batch,1,1,sequence+192,F32)"],
    );
    let mut sig = declare(sig, "input", 0, Dim::Fixed(1));
    sig = declare(sig, "input", 1, Dim::Fixed(480));
    sig = declare(sig, "h", 1, Dim::Fixed(1));
    sig = declare(sig, "c", 1, Dim::Fixed(1));
    assert_refused(file, &sig, &["\"If_69\" If ToTypedTranslator", "(1,1,672,F32 vs 1,1,1,672,F32)"]);
}
