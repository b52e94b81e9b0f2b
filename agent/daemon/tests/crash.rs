//! Crash safety of installs: the real agent binary is killed with SIGKILL at a random moment of
//! each of many installs (downloading, verifying, writing blobs, self-testing, activating, or
//! just after), restarted, and must then serve a verified model that answers exactly as that
//! model should, and finish the install when the control plane offers it again.
//!
//! 50 rounds by default; `FLOTILLA_CRASH_ROUNDS=1000` for a soak, `FLOTILLA_CRASH_SEED=N` to
//! replay the kill times of a failing run (the seed is printed).

// They need a control plane, which cross builds do not build for ARM (see Cargo.toml).
#![cfg(not(flotilla_cross))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::now;
use flotilla_bundle::manifest::{ModelFormat, ModelSignature, RuntimeSettings};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

mod common;

const MODELS: [&[u8]; 3] = [
    include_bytes!("../../../examples/models/digits_cnn.onnx"),
    include_bytes!("../../../examples/models/digits_cnn_wide.onnx"),
    include_bytes!("../../../examples/models/digits_cnn_int8_qdq.onnx"),
];
const TEST_SET: &str = include_str!("../../../examples/models/digits_test.json");
const T: Duration = Duration::from_secs(60);

/// xorshift64*: enough randomness for kill times, and replayable from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The held-out inputs as one batch [N,1,8,8].
fn batch() -> Vec<f32> {
    let v: serde_json::Value = serde_json::from_str(TEST_SET).unwrap();
    v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["input"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect()
}

/// What each model must answer: argmax per sample, computed in-process with the same runtime.
fn expected_classes(model: &[u8], input: &[f32]) -> Vec<usize> {
    let sig = flotilla_runtime::tract_onnx::inspect_onnx(model).unwrap();
    let sig = ModelSignature { format: ModelFormat::Onnx, ..sig };
    let m = Runtimes::default().load(model, &sig, &RuntimeSettings::default()).unwrap();
    let n = input.len() / 64;
    let t = Tensor::new("input", vec![n, 1, 8, 8], TensorData::F32(input.to_vec())).unwrap();
    let out = flotilla_runtime::run(m.as_ref(), vec![t]).unwrap();
    let TensorData::F32(p) = &out[0].data else { panic!("f32 output") };
    argmax_rows(p)
}

fn argmax_rows(p: &[f32]) -> Vec<usize> {
    p.chunks(10).map(|r| (0..10).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap()).collect()
}

fn spawn_agent(dir: &Path, broker: &common::Broker) -> Child {
    let _ = std::fs::remove_file(dir.join("agent/endpoints.json"));
    Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
        .args(["--data-dir", dir.join("agent").to_str().unwrap(), "--device-id", "crash-1"])
        .args(broker.args("crash-1"))
        .args(["--trust-root", dir.join("root.cbor").to_str().unwrap(), "--api", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn agent_api(dir: &Path) -> String {
    let p: PathBuf = dir.join("agent/endpoints.json");
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(&p)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
        {
            return format!("http://{}", v["api"].as_str().unwrap());
        }
        assert!(start.elapsed() < T, "the agent never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ask the agent; None when it has no model of that name (yet).
async fn classify(http: &reqwest::Client, api: &str, input: &[f32]) -> Option<(u64, Vec<usize>)> {
    let n = input.len() / 64;
    let body =
        serde_json::json!({"inputs": [{"name": "input", "shape": [n, 1, 8, 8], "datatype": "FP32", "data": input}]});
    let r = http.post(format!("{api}/v2/models/digits/infer")).json(&body).send().await.unwrap();
    if r.status().as_u16() == 404 {
        return None;
    }
    assert!(r.status().is_success(), "inference failed: {}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    let version: u64 = v["model_version"].as_str().unwrap().parse().unwrap();
    let p: Vec<f32> = v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    Some((version, argmax_rows(&p)))
}

async fn wait_completed(http: &reqwest::Client, api: &str, rollout: &str, version: u64) {
    let start = Instant::now();
    loop {
        let s: serde_json::Value =
            http.get(format!("{api}/api/v1/rollouts/{rollout}")).send().await.unwrap().json().await.unwrap();
        if s["state"] != "running" && s["state"] != "pending" {
            assert_eq!(s["state"], "completed", "round {version}: {s}");
            return;
        }
        assert!(start.elapsed() < T, "round {version}: the install never completed: {s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_survive_sigkill_at_random_points() {
    let rounds: u64 = std::env::var("FLOTILLA_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("FLOTILLA_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("crash test: {rounds} rounds, FLOTILLA_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common::ControlPlane { server, key, api, broker, http } = common::control_plane(d).await;

    let input = batch();
    let expected: Vec<Vec<usize>> = MODELS.iter().map(|m| expected_classes(m, &input)).collect();
    let model_of = |version: u64| ((version - 1) % MODELS.len() as u64) as usize;
    let golden = vec![vec![Tensor::new("input", vec![1, 1, 8, 8], TensorData::F32(input[..64].to_vec())).unwrap()]];

    let mut agent = spawn_agent(d, &broker);
    let start = Instant::now();
    loop {
        let devices: serde_json::Value =
            http.get(format!("{api}/api/v1/devices")).send().await.unwrap().json().await.unwrap();
        if devices[0]["online"] == true {
            break;
        }
        assert!(start.elapsed() < T, "the agent never came online");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut active: Option<u64> = None;
    let mut kills_before_done = 0;
    // Rounds 1 and 2 install without a kill and time an install (the second, warm one counts:
    // the first also pays for loading everything once), so that the kills of the other rounds
    // spread over the whole of one (from the offer to the device reporting success).
    let mut install_ms = 0;
    for version in 1..=rounds + 2 {
        let mut opts =
            flotilla_builder::BuildOptions::new("digits", version, MODELS[model_of(version)].to_vec(), now());
        opts.golden = golden.clone();
        let mut signed = Vec::new();
        let unsigned = flotilla_builder::build(&opts).unwrap().bytes;
        flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(unsigned), &key, &mut signed).unwrap();
        let r = http.post(format!("{api}/api/v1/bundles")).body(signed).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
        let r = http
            .post(format!("{api}/api/v1/rollouts"))
            .json(&serde_json::json!({"bundle": format!("digits@{version}")}))
            .send()
            .await
            .unwrap();
        let created: serde_json::Value = r.json().await.unwrap();
        let rollout = created["id"].as_str().unwrap_or_else(|| panic!("round {version}: {created}")).to_string();

        if version <= 2 {
            // Timed until the device serves the new version (not until the control plane has
            // heard of it and closed the rollout, which comes later).
            let t0 = Instant::now();
            let agent_api = agent_api(d).await;
            while classify(&http, &agent_api, &input).await.map(|(v, _)| v) != Some(version) {
                assert!(t0.elapsed() < T, "round {version}: the install never completed");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            install_ms = (t0.elapsed().as_millis() as u64).max(1);
            wait_completed(&http, &api, &rollout, version).await;
            active = Some(version);
            eprintln!("crash test: an uninterrupted install (round {version}) takes {install_ms} ms");
            continue;
        }
        // Kill somewhere in the install, or just after it, then start again.
        tokio::time::sleep(Duration::from_millis(rng.below(install_ms * 5 / 4))).await;
        agent.kill().unwrap();
        agent.wait().unwrap();
        agent = spawn_agent(d, &broker);
        let agent_api = agent_api(d).await;

        // Right after the restart: whatever is active is a verified model answering as it must.
        match classify(&http, &agent_api, &input).await {
            Some((v, classes)) => {
                assert!(
                    v == version || Some(v) == active,
                    "round {version}: v{v} active, expected v{version} or {active:?}"
                );
                kills_before_done += u64::from(v != version);
                assert_eq!(classes, expected[model_of(v)], "round {version}: v{v} answers wrongly after the crash");
            }
            None => {
                assert_eq!(active, None, "round {version}: the model is gone after the crash");
                kills_before_done += 1;
            }
        }

        // The control plane offers again on hello; the install completes from where it was.
        wait_completed(&http, &api, &rollout, version).await;
        let (v, classes) = classify(&http, &agent_api, &input).await.expect("a model after the install");
        assert_eq!(v, version);
        assert_eq!(classes, expected[model_of(v)]);
        active = Some(version);
    }
    agent.kill().unwrap();
    eprintln!("crash test: {kills_before_done} of {rounds} kills landed before the install had completed");
    assert!(kills_before_done * 3 >= rounds, "at least a third of the kills must land mid-install to test anything");
    server.shutdown().await;
}
