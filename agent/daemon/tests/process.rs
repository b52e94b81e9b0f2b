//! The real `flotilla-agent` binary as a separate process: flags, endpoints.json, an install
//! from a real control plane, inference over its API, and a clean SIGTERM shutdown that the
//! control plane sees.

// They need a control plane, which cross builds do not build for ARM (see Cargo.toml).
#![cfg(not(flotilla_cross))]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::now;

mod common;

const MODEL: &[u8] = include_bytes!("../../../examples/models/digits_cnn.onnx");

async fn wait_json(http: &reqwest::Client, url: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && pred(&v)
        {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting on {url}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_file(p: &Path) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_installs_serves_and_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common::ControlPlane { server, key, api, broker, http } = common::control_plane(d).await;

    let mut agent = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
        .args(["--data-dir", d.join("agent").to_str().unwrap(), "--device-id", "proc-1"])
        .args(broker.args("proc-1"))
        .args(["--trust-root", d.join("root.cbor").to_str().unwrap(), "--api", "127.0.0.1:0", "--tag", "group=lab"])
        .args(["--api-socket", d.join("agent.sock").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let endpoints: serde_json::Value = serde_json::from_slice(&wait_file(&d.join("agent/endpoints.json"))).unwrap();
    let agent_api = format!("http://{}", endpoints["api"].as_str().unwrap());
    let devices = wait_json(&http, &format!("{api}/api/v1/devices"), |v| v[0]["online"] == true).await;
    assert_eq!(devices[0]["id"], "proc-1");
    assert_eq!(devices[0]["tags"]["group"], "lab");
    assert_eq!(devices[0]["runtimes"][0], "tract-onnx");

    let input: Vec<f32> = (0..64).map(|i| (i % 16) as f32 / 16.0).collect();
    let mut opts = flotilla_builder::BuildOptions::new("digits", 1, MODEL.to_vec(), now());
    opts.golden = vec![vec![
        flotilla_runtime::Tensor::new("input", vec![1, 1, 8, 8], flotilla_runtime::TensorData::F32(input.clone()))
            .unwrap(),
    ]];
    let unsigned = flotilla_builder::build(&opts).unwrap().bytes;
    let mut signed = Vec::new();
    flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(unsigned), &key, &mut signed).unwrap();
    let r = http.post(format!("{api}/api/v1/bundles")).body(signed).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = http
        .post(format!("{api}/api/v1/rollouts"))
        .json(&serde_json::json!({"bundle": "digits@1"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let done = wait_json(&http, &format!("{api}/api/v1/rollouts/{id}"), |v| {
        v["state"] != "running" && v["state"] != "pending"
    })
    .await;
    assert_eq!(done["state"], "completed", "{done}");

    let meta = wait_json(&http, &format!("{agent_api}/v2/models/digits"), |v| v["name"] == "digits").await;
    assert_eq!(meta["platform"], "tract-onnx");
    let resp: serde_json::Value = http
        .post(format!("{agent_api}/v2/models/digits/infer"))
        .json(&serde_json::json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": input}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let probs: Vec<f64> = resp["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(probs.len(), 10);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "softmax output sums to 1: {probs:?}");

    // Prometheus metrics count that inference, per model, version and backend.
    let metrics = http.get(format!("{agent_api}/metrics")).send().await.unwrap().text().await.unwrap();
    let line = r#"flotilla_inferences_total{model="digits",version="1",backend="tract-onnx",outcome="ok"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "{metrics}");
    assert!(metrics.contains("flotilla_outbox_dropped_total 0"), "{metrics}");
    assert!(
        metrics.contains(r#"flotilla_inference_seconds_count{model="digits",version="1",backend="tract-onnx"} 1"#),
        "{metrics}"
    );

    // The same API answers on the Unix socket.
    let reply = unix_get(&d.join("agent.sock"), "/v2/models/digits").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(r#""platform":"tract-onnx""#), "{reply}");

    // SIGTERM: the agent exits cleanly and the control plane sees it go offline.
    assert!(Command::new("kill").args(["-TERM", &agent.id().to_string()]).status().unwrap().success());
    let status = agent.wait().unwrap();
    assert!(status.success(), "agent exit status {status}");
    let devices = wait_json(&http, &format!("{api}/api/v1/devices"), |v| v[0]["online"] == false).await;
    assert_eq!(devices[0]["models"][0]["version"], 1, "models are kept while offline: {devices}");
    server.shutdown().await;
}

/// One HTTP/1.1 GET over a Unix socket, the whole reply as text.
async fn unix_get(socket: &Path, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
