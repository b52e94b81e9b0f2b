//! The golden self-test catches a runtime that computes a model wrongly without any error.
//!
//! tract 0.23 returns wrong values for int8 QDQ graphs with Q/DQ around Softmax. The fixture is
//! such a model, with golden outputs from onnxruntime (the reference) as the training pipeline
//! would supply them: the build warns that tract disagrees, and the device refuses the bundle
//! at its self-test and keeps serving the model it had.

use std::path::Path;
use std::time::Duration;

use flotilla_demo::{Fleet, digits};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_the_runtime_computes_wrongly_is_refused_by_the_golden_check() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let bad = std::fs::read(models.join("digits_cnn_int8_qdq_softmax.onnx")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    let mut opts = flotilla_builder::BuildOptions::new("digits", 2, bad, flotilla_demo::unix_now());
    let sig = flotilla_builder::signature(&opts).unwrap();
    for (inputs, expected) in
        flotilla_builder::golden::read(&models.join("digits_cnn_int8_qdq_softmax_golden.json"), &sig).unwrap()
    {
        opts.golden_reference.push((inputs, expected.expect("the fixture carries onnxruntime's outputs")));
    }
    let built = flotilla_builder::build(&opts).unwrap();
    assert!(
        built.warnings.iter().any(|w| w.contains("tract-onnx") && w.contains("will refuse")),
        "the build says tract disagrees with the reference: {:?}",
        built.warnings
    );
    fleet.push(flotilla_demo::sign(&built.bytes, &fleet.key).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@2").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("self_testing:") && reason.contains("golden case 0"), "{reason}");
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1", "the old model keeps serving");
    fleet.shutdown().await;
}
