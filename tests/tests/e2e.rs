//! End to end: a control plane with its embedded broker and SQLite store, real agents, real
//! signed bundles built from the committed digits CNN, all on 127.0.0.1 ephemeral ports.

use std::time::Duration;

use flotilla_bundle::SecretKey;
use flotilla_bundle::format::parse_envelope;
use flotilla_bundle::manifest::Role;
use flotilla_bundle::verify::decode_manifest;
use flotilla_demo::{Fleet, FleetOptions, digits, sign};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_bundle_reaches_three_agents_and_they_classify_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 3).await.unwrap();
    let samples = digits::samples();
    let bundle = fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..3])).unwrap();
    let pushed = fleet.push(bundle).await.unwrap();
    assert_eq!((pushed.name.as_str(), pushed.version), ("digits", 1));
    assert_eq!(pushed.signers, vec![fleet.key.key_id().0]);

    let id = fleet.start_rollout("digits@1").await.unwrap();
    let r = fleet.wait_rollout(&id, ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    assert_eq!((r.succeeded, r.failed, r.total), (3, 0, 3));

    // Every device reports the version it runs (through its retained state message): baking, as
    // the bundle's bake period (the default 10 minutes) has just begun.
    fleet
        .wait_for(Duration::from_secs(10), || async {
            let devices = fleet.devices().await?;
            Ok(devices.len() == 3
                && devices
                    .iter()
                    .all(|d| d.models.iter().any(|m| m.name == "digits" && m.version == 1 && m.status == "baking")))
        })
        .await
        .unwrap();

    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    for (device, agent) in &fleet.agents {
        // Each agent says where its API listens (it was started on port 0).
        let endpoints: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("agents").join(device).join("endpoints.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(endpoints["api"], agent.api_addr().to_string());
        let meta = fleet.model_metadata(device, "digits").await.unwrap();
        assert_eq!(meta.platform, "tract-onnx");
        assert_eq!(meta.inputs[0].shape, vec![-1, 1, 8, 8], "batch stays symbolic");
        let resp = fleet.infer(device, "digits", &digits::request(&samples)).await.unwrap();
        assert_eq!(resp.model_name, "digits");
        assert_eq!(resp.model_version, "1");
        assert_eq!(resp.outputs[0].shape, vec![samples.len() as u64, 10]);
        assert_eq!(digits::classes(&resp.outputs[0].data), labels, "device {device}");
        // A different batch size through the same loaded model.
        let one = fleet.infer(device, "digits", &digits::request(&samples[5..6])).await.unwrap();
        assert_eq!(digits::classes(&one.outputs[0].data), vec![samples[5].label]);
    }
    fleet.shutdown().await;
}

/// Flip one byte inside the model artifact's stored bytes.
fn flip_model_byte(bundle: &mut [u8]) {
    let (doc, data_offset) = parse_envelope(bundle).unwrap();
    let m = decode_manifest(&doc.signed).unwrap();
    let a = m.artifact(Role::Model).unwrap();
    let at = (data_offset + a.offset + a.stored_size / 2) as usize;
    bundle[at] ^= 0x01;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_bundles_are_refused_and_the_old_version_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // The server does not pre-check signatures here: the device must refuse on its own.
    let opts = FleetOptions { server_checks_signatures: false, ..FleetOptions::default() };
    let fleet = Fleet::start_with(dir.path(), 1, opts).await.unwrap();
    let samples = digits::samples();
    let golden = || digits::golden(&samples[..2]);

    let v1 = fleet.bundle("digits", 1, digits::MODEL, golden()).unwrap();
    fleet.push(v1).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    // v2: one byte of the model flipped after signing.
    let mut v2 = fleet.bundle("digits", 2, digits::MODEL_INT8, golden()).unwrap();
    flip_model_byte(&mut v2);
    fleet.push(v2).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@2").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap();
    assert!(reason.starts_with("verifying:") && reason.contains("digest mismatch"), "{reason}");

    // v3: correctly built, signed only by a key outside the trust root.
    let outsider = SecretKey::generate().unwrap();
    let mut opts = flotilla_builder_opts(3);
    opts.golden = golden();
    let v3 = sign(&flotilla_builder::build(&opts).unwrap().bytes, &outsider).unwrap();
    fleet.push(v3).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@3").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap();
    assert!(reason.starts_with("offered:") && reason.contains("threshold not met"), "{reason}");

    // The device still serves v1, correctly.
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1");
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    let devices = fleet.devices().await.unwrap();
    assert_eq!(devices[0].models.iter().map(|m| m.version).collect::<Vec<_>>(), vec![1]);
    fleet.shutdown().await;
}

fn flotilla_builder_opts(version: u64) -> flotilla_builder::BuildOptions {
    flotilla_builder::BuildOptions::new("digits", version, digits::MODEL.to_vec(), flotilla_demo::unix_now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_after_install_comes_back_serving_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    // No goodbye: as a power cut would.
    let (id, agent) = fleet.agents.pop().unwrap();
    agent.kill().await;
    fleet.start_agent(&id).await.unwrap();
    let resp = fleet.infer(&id, "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1");
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inference_requests_get_clear_400s() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..1])).unwrap()).await.unwrap();
    fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    let addr = fleet.agent("dev-0").api_addr();
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let http = http.clone();
        async move {
            let r = http.post(format!("http://{addr}/v2/models/digits/infer")).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = post(
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("[N,1,8,8]"), "{body}");
    let (status, body) = post(
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0]}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("needs 64 elements"), "{body}");
    let (status, _) = post(serde_json::json!({"nothing": true})).await;
    assert_eq!(status, 400);
    let r = http.get(format!("http://{addr}/v2/models/nope")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = http.get(format!("http://{addr}/v2/health/ready")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_bundles_send_the_patch_to_devices_holding_the_base_and_the_full_model_to_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let samples = digits::samples();
    let build = |version, model: &[u8], base: Option<&[u8]>, delta_only| {
        let mut opts =
            flotilla_builder::BuildOptions::new("digits", version, model.to_vec(), flotilla_demo::unix_now());
        opts.golden = digits::golden(&samples[..2]);
        opts.delta_base = base.map(<[u8]>::to_vec);
        opts.delta_only = delta_only;
        sign(&flotilla_builder::build(&opts).unwrap().bytes, &fleet.key).unwrap()
    };
    let v1 = build(1, digits::MODEL_WIDE, None, false);
    // v2: only the last layer retrained, stored as a patch against v1 plus the full form.
    let v2 = build(2, digits::MODEL_WIDE_FC_RETRAINED, Some(digits::MODEL_WIDE), false);
    // v3: a patch against v1 only (no full form).
    let v3 = build(3, digits::MODEL, Some(digits::MODEL_WIDE), true);

    // dev-0 runs v1 (the wide model); dev-1 joins later with nothing installed.
    fleet.push(v1).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    fleet.start_agent("dev-1").await.unwrap();
    fleet.wait_devices_online(2).await.unwrap();

    let (doc, data_offset) = parse_envelope(&v2).unwrap();
    let model = decode_manifest(&doc.signed).unwrap().artifact(Role::Model).unwrap().clone();
    let golden = decode_manifest(&doc.signed).unwrap().artifact(Role::Golden).unwrap().stored_size;
    assert!(matches!(model.encoding, flotilla_bundle::manifest::Encoding::ZstdPatch { .. }), "{model:?}");
    let full = model.full.clone().expect("a full form by default");
    let served_before = fleet.server.shared().metrics.served_http.load(std::sync::atomic::Ordering::Relaxed);
    fleet.push(v2).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@2").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    for dev in ["dev-0", "dev-1"] {
        let resp = fleet.infer(dev, "digits", &digits::request(&samples)).await.unwrap();
        assert_eq!(resp.model_version, "2");
    }
    // Each device fetched the head, the golden data and exactly one form of the model: the
    // patch where the base is held, the full model elsewhere.
    let served = fleet.server.shared().metrics.served_http.load(std::sync::atomic::Ordering::Relaxed) - served_before;
    let with_base = data_offset + model.stored_size + golden;
    let without_base = data_offset + full.stored_size + golden;
    assert_eq!(served, with_base + without_base);
    assert!(model.stored_size * 20 < full.stored_size, "patch {} vs full {}", model.stored_size, full.stored_size);

    // v3: dev-0 still holds v1 (its previous version) and installs it; dev-1 never had v1 and
    // refuses with the reason.
    fleet.push(v3).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@3").await.unwrap(), ROLLOUT_TIMEOUT).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let by = |d: &str| r.devices.iter().find(|x| x.device == d).unwrap().clone();
    assert_eq!(by("dev-0").state, "succeeded", "{r:?}");
    let reason = by("dev-1").reason.unwrap_or_default();
    assert!(reason.contains("does not hold") && reason.contains("no full form"), "{reason}");
    let resp = fleet.infer("dev-1", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "2", "dev-1 keeps serving v2");
    fleet.shutdown().await;
}
