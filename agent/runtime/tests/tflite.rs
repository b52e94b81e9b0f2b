//! The TFLite backends on real models (openWakeWord and micro-wakeword, from PyPI) against
//! reference outputs from Google's TFLite Python interpreter (ai-edge-litert, built-in kernels).
//!
//! The models, the TFLite C library and `reference.json` are fetched on first use by
//! `assets/fetch.sh` into `target/test-assets/tflite` (git-ignored); see that script.

mod common;
use common::RefTensor;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use flotilla_bundle::manifest::{ModelSignature, RuntimeSettings};
use flotilla_runtime::tflite::{ExternalDelegate, TfliteBackend, TfliteLib};
use flotilla_runtime::tract_tflite::inspect_tflite;
use flotilla_runtime::{Backend, LoadedModel, RuntimeError, Runtimes, Tensor, TensorData, check_inputs};

const TOLERANCE: f64 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    reference: String,
    models: Vec<RefModel>,
}

#[derive(serde::Deserialize)]
struct RefModel {
    file: String,
    signature: ModelSignature,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    inputs: Vec<RefTensor>,
    outputs: Vec<RefTensor>,
}

/// The assets directory, fetched once per test binary when missing.
fn assets() -> &'static Path {
    static ASSETS: OnceLock<PathBuf> = OnceLock::new();
    ASSETS.get_or_init(|| common::fetch_assets("tflite", "fetch.sh"))
}

fn library_path() -> PathBuf {
    assets().join("lib/libtensorflowlite_c.so")
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

fn backend() -> TfliteBackend {
    TfliteBackend::new(TfliteLib::load(&library_path()).unwrap())
}

fn settings(delegate: Option<&str>, required: bool) -> RuntimeSettings {
    RuntimeSettings {
        backends: vec![],
        threads: Some(1),
        delegate: delegate.map(String::from),
        accelerator_required: required,
    }
}

/// Run every case of `m` in order on `model`; the largest difference from the reference.
fn max_diff(m: &RefModel, model: &dyn LoadedModel) -> f64 {
    let mut worst = 0f64;
    for (i, case) in m.cases.iter().enumerate() {
        let inputs = check_inputs(&m.signature.inputs, case.inputs.iter().map(RefTensor::tensor).collect()).unwrap();
        let outputs = flotilla_runtime::run(model, inputs).unwrap_or_else(|e| panic!("{} case {i}: {e}", m.file));
        assert_eq!(outputs.len(), case.outputs.len(), "{} case {i}", m.file);
        for (got, want) in outputs.iter().zip(&case.outputs) {
            assert_eq!(got.name, want.name, "{} case {i}", m.file);
            assert_eq!(got.data.dtype(), want.dtype, "{} case {i} {}", m.file, want.name);
            assert_eq!(got.shape, want.shape, "{} case {i} {}", m.file, want.name);
            for (a, b) in got.data.to_f64().iter().zip(&want.data) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    worst
}

#[test]
fn inspect_reads_each_models_signature() {
    for m in &reference().models {
        assert_eq!(inspect_tflite(&model_bytes(m)).unwrap(), m.signature, "{}", m.file);
    }
    assert!(matches!(inspect_tflite(b"not a model"), Err(RuntimeError::Unsupported(_))));
}

#[test]
fn tflite_builtin_kernels_match_reference() {
    let backend = backend();
    assert_eq!(backend.library().version(), "2.17.1");
    assert_eq!(backend.library().capabilities(), ["xnnpack", "delegated-node-count"]);
    eprintln!("reference: {}", reference().reference);
    for m in &reference().models {
        let model = backend.load(&model_bytes(m), &m.signature, &settings(None, false)).unwrap();
        assert_eq!(model.backend(), "tflite");
        assert_eq!(model.delegation(), None);
        let diff = max_diff(m, model.as_ref());
        eprintln!("tflite          {:40} max |diff| {diff:.3e}", m.file);
        assert!(diff <= TOLERANCE, "{}: {diff}", m.file);
    }
}

#[test]
fn tflite_with_xnnpack_matches_reference_and_counts_nodes() {
    let backend = backend();
    assert!(backend.delegates().contains(&"xnnpack"));
    for m in &reference().models {
        let model = backend.load(&model_bytes(m), &m.signature, &settings(Some("xnnpack"), false)).unwrap();
        assert_eq!(model.backend(), "tflite+xnnpack", "{}", m.file);
        let split = model.delegation().expect("the 2.17 library can count delegated nodes");
        let diff = max_diff(m, model.as_ref());
        eprintln!("tflite+xnnpack  {:40} max |diff| {diff:.3e}  {split:?}", m.file);
        assert!(diff <= TOLERANCE, "{}: {diff}", m.file);
    }
    // The conv stack goes to XNNPACK entirely; the IF op of hey_jarvis stays on the CPU kernels.
    let split = |file: &str| {
        let m = reference().models.iter().find(|m| m.file == file).unwrap();
        backend.load(&model_bytes(m), &m.signature, &settings(Some("xnnpack"), true)).unwrap().delegation().unwrap()
    };
    let embedding = split("openwakeword/embedding_model.tflite");
    assert_eq!((embedding.cpu_nodes, embedding.partitions), (0, 1));
    assert!(embedding.delegated_nodes > 50, "{embedding:?}");
    assert!(split("openwakeword/hey_jarvis.tflite").cpu_nodes >= 1);
}

#[test]
fn one_model_serves_concurrent_requests() {
    let m = reference().models.iter().find(|m| m.file == "openwakeword/embedding_model.tflite").unwrap();
    let model = backend().load(&model_bytes(m), &m.signature, &settings(Some("xnnpack"), true)).unwrap();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4).map(|_| s.spawn(|| max_diff(m, model.as_ref()))).collect();
        for r in runs {
            assert!(r.join().unwrap() <= TOLERANCE);
        }
    });
}

#[test]
fn required_accelerator_is_never_replaced_by_the_cpu() {
    let m = reference().models.iter().find(|m| m.file == "openwakeword/alexa.tflite").unwrap();
    let bytes = model_bytes(m);
    let runtimes = Runtimes::with_tflite(Some(&library_path())).unwrap();
    assert_eq!(runtimes.names(), ["tflite", "tract-onnx", "tract-tflite"]);

    // Not required: the model runs on the built-in kernels and says so.
    let model = runtimes.load(&bytes, &m.signature, &settings(Some("npu"), false)).unwrap();
    assert_eq!(model.backend(), "tflite");

    // Required: every backend refuses, with the reason.
    let err = runtimes.load(&bytes, &m.signature, &settings(Some("npu"), true)).err().unwrap().to_string();
    assert!(err.contains(r#"the bundle requires delegate "npu", which cannot be applied"#), "{err}");
    assert!(err.contains(r#"this agent has no TFLite delegate "npu""#), "{err}");
    assert!(err.contains("tract-tflite runs on the CPU only"), "{err}");
}

#[test]
fn external_delegate_plugin_is_loaded_by_name() {
    // A plugin with the vendor-delegate entry points, wrapping XNNPACK (assets/xnnpack_plugin.c).
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plugin = assets().join(format!("xnnpack_plugin.{}.so", std::process::id()));
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&plugin)
        .arg(crate_dir.join("assets/xnnpack_plugin.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success(), "cc failed ({status})");
    let lib = library_path().to_string_lossy().into_owned();
    let good = ExternalDelegate::load("test-npu", &plugin, &[("tflite_library".into(), lib)]).unwrap();
    let broken = ExternalDelegate::load("broken-npu", &plugin, &[]).unwrap();
    let backend = backend().with_external_delegate(good).with_external_delegate(broken);
    std::fs::remove_file(&plugin).unwrap(); // loaded; the file is no longer needed
    assert_eq!(backend.delegates(), ["xnnpack", "test-npu", "broken-npu"]);

    let m = reference().models.iter().find(|m| m.file == "openwakeword/embedding_model.tflite").unwrap();
    let model = backend.load(&model_bytes(m), &m.signature, &settings(Some("test-npu"), true)).unwrap();
    assert_eq!(model.backend(), "tflite+test-npu");
    assert_eq!(model.delegation().unwrap().cpu_nodes, 0);
    assert!(max_diff(m, model.as_ref()) <= TOLERANCE);

    // The plugin's own error message reaches the caller.
    let err = backend.load(&model_bytes(m), &m.signature, &settings(Some("broken-npu"), true)).err().unwrap();
    assert!(err.to_string().contains("option tflite_library is required"), "{err}");

    // A library without the plugin entry points is refused when the agent starts.
    let err = ExternalDelegate::load("not-a-plugin", &library_path(), &[]).unwrap_err().to_string();
    assert!(err.contains("no tflite_plugin_create_delegate entry point"), "{err}");
}

#[test]
fn unusable_libraries_are_reported() {
    let err = TfliteLib::load(Path::new("/nonexistent/libtensorflowlite_c.so")).unwrap_err().to_string();
    assert!(err.contains("cannot load the TensorFlow Lite library /nonexistent/libtensorflowlite_c.so"), "{err}");
    assert!(Runtimes::with_tflite(Some(Path::new("/nonexistent/lib.so"))).is_err());
    assert_eq!(
        TfliteLib::locate(Some(Path::new("/opt/tflite.so"))).unwrap(),
        PathBuf::from("/opt/tflite.so"),
        "an explicit path wins over the environment"
    );
}

#[test]
fn bad_models_and_inputs_are_errors() {
    let backend = backend();
    let m = reference().models.iter().find(|m| m.file == "openwakeword/melspectrogram.tflite").unwrap();
    let err = backend.load(b"definitely not a flatbuffer", &m.signature, &settings(None, false)).err().unwrap();
    assert!(err.to_string().contains("not a valid TFLite model: The model is not a valid Flatbuffer buffer"), "{err}");

    let mut renamed = m.signature.clone();
    renamed.inputs[0].name = "audio".into();
    let err = backend.load(&model_bytes(m), &renamed, &settings(None, false)).err().unwrap().to_string();
    assert!(
        err.contains(r#"manifest input "audio" is not an input of the model (["serving_default_input:0"])"#),
        "{err}"
    );

    // Too little audio for the model's first convolution: TFLite's own message comes back.
    let model = backend.load(&model_bytes(m), &m.signature, &settings(None, false)).unwrap();
    let short = Tensor::new("serving_default_input:0", vec![1, 10], TensorData::F32(vec![0.0; 10])).unwrap();
    let err = flotilla_runtime::run(model.as_ref(), vec![short]).unwrap_err();
    assert!(matches!(err, RuntimeError::BadInput(_)), "{err}");
    assert!(err.to_string().contains("failed to prepare"), "{err}");
    // The interpreter recovers for the next, valid request.
    assert!(max_diff(m, model.as_ref()) <= TOLERANCE);
}

/// tract-tflite runs the openWakeWord models it can translate and refuses the others cleanly.
#[test]
fn tract_tflite_matches_reference_or_refuses_clearly() {
    let runtimes = Runtimes::default();
    let tract_only = RuntimeSettings { backends: vec!["tract-tflite".into()], ..settings(None, false) };
    let mut supported = Vec::new();
    for m in &reference().models {
        match runtimes.load(&model_bytes(m), &m.signature, &tract_only) {
            Ok(model) => {
                assert_eq!(model.backend(), "tract-tflite");
                let diff = max_diff(m, model.as_ref());
                eprintln!("tract-tflite    {:40} max |diff| {diff:.3e}", m.file);
                assert!(diff <= TOLERANCE, "{}: {diff}", m.file);
                supported.push(m.file.as_str());
            }
            Err(RuntimeError::Unsupported(why)) => {
                eprintln!("tract-tflite    {:40} unsupported: {why}", m.file);
                assert!(why.contains("tract-tflite"), "{why}");
            }
            Err(e) => panic!("{}: expected Unsupported, got {e}", m.file),
        }
    }
    assert_eq!(supported, EXPECTED_ON_TRACT);
}

/// The rest fail: melspectrogram (BATCH_MATMUL of rank 4 by rank 2), the other openWakeWord
/// classifiers (a MEAN over a negative axis panics in the loader), micro-wakeword (resource
/// variables: the loader panics).
const EXPECTED_ON_TRACT: &[&str] = &["openwakeword/embedding_model.tflite", "openwakeword/alexa.tflite"];
