//! What the agent adds to an inference: the same model and input run (a) directly on the
//! backend in-process, (b) through the agent's model path (input checks against the manifest,
//! watchdog bookkeeping), and (c) through the local v2 HTTP API on loopback (JSON both ways).
//! Then (d): what drift costs per inference, the sketches of the digits baseline profile fed
//! from one inference's input and output, against the backend's own inference time (the goal
//! is at most 2 %).
//! Prints medians over many runs, single-threaded backend; asserts nothing.
//!   cargo bench -p flotilla-agent --bench overhead

use std::time::{Duration, Instant};

use flotilla_agent::models::ActiveModel;
use flotilla_bundle::manifest::{HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

const MODELS: [(&str, &[u8]); 2] = [
    ("digits_cnn", include_bytes!("../../../examples/models/digits_cnn.onnx")),
    ("digits_cnn_wide", include_bytes!("../../../examples/models/digits_cnn_wide.onnx")),
];
const RUNS: usize = 2000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..runs / 10 {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let input: Vec<f32> = (0..64).map(|i| (i % 16) as f32 / 16.0).collect();
    let tensor = || Tensor::new("input", vec![1, 1, 8, 8], TensorData::F32(input.clone())).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!(
        "{:<16} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "model", "backend", "agent path", "overhead", "HTTP API", "HTTP extra"
    );
    let mut backend_times = Vec::new();
    for (label, bytes) in MODELS {
        let sig = flotilla_runtime::tract_onnx::inspect_onnx(bytes).unwrap();
        let sig = ModelSignature { format: ModelFormat::Onnx, ..sig };
        let runtimes = Runtimes::default();
        let direct = runtimes.load(bytes, &sig, &Default::default()).unwrap();
        let manifest = Manifest {
            kind: MANIFEST_TYPE.into(),
            schema: MANIFEST_SCHEMA,
            name: "m".into(),
            version: 1,
            created: 0,
            expires: None,
            model: sig.clone(),
            artifacts: vec![],
            target: Default::default(),
            runtime: Default::default(),
            health: HealthChecks::default(),
        };
        let agent_model = ActiveModel::new(
            "m".into(),
            1,
            manifest,
            String::new(),
            runtimes.load(bytes, &sig, &Default::default()).unwrap(),
        );

        let a = time(RUNS, || {
            std::hint::black_box(direct.run(vec![tensor()]).unwrap());
        });
        let b = time(RUNS, || {
            std::hint::black_box(agent_model.infer(vec![tensor()]).unwrap());
        });
        // (c): a real agent's API over loopback, serving the same model (its broker is
        // unreachable, which does not matter here).
        let c = rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let key = flotilla_bundle::SecretKey::generate().unwrap();
            let root = flotilla_bundle::root::Root::single_key(&key.public(), 1, None);
            std::fs::write(dir.path().join("root.cbor"), flotilla_bundle::root::sign_root(&root, &[&key]).unwrap())
                .unwrap();
            let broker = flotilla_agent::BrokerUrl::plain("127.0.0.1", 1);
            let mut cfg =
                flotilla_agent::AgentConfig::new(dir.path().join("agent"), "bench", broker, dir.path().join("root.cbor"));
            cfg.api = "127.0.0.1:0".parse().unwrap();
            let agent = flotilla_agent::Agent::start(cfg).await.unwrap();
            agent.ctx().registry.insert(agent_model);
            let addr = agent.api_addr();
            let http = reqwest::Client::new();
            let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": input}]});
            let url = format!("http://{addr}/v2/models/m/infer");
            let mut times = Vec::with_capacity(RUNS);
            for i in 0..RUNS + RUNS / 10 {
                let t = Instant::now();
                let r = http.post(&url).json(&body).send().await.unwrap();
                assert!(r.status().is_success());
                std::hint::black_box(r.bytes().await.unwrap());
                if i >= RUNS / 10 {
                    times.push(t.elapsed());
                }
            }
            agent.kill().await;
            median(times)
        });
        let pct = (b.as_secs_f64() / a.as_secs_f64() - 1.0) * 100.0;
        println!(
            "{label:<16} {:>10.1}µs {:>10.1}µs {pct:>9.1}% {:>10.1}µs {:>10.1}µs",
            a.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            c.as_secs_f64() * 1e6,
            (c.as_secs_f64() - b.as_secs_f64()) * 1e6
        );
        backend_times.push((label, a, sig));
    }

    // (d) Drift: one inference's worth of sketch updates, timed 100 at a time.
    println!();
    println!("{:<16} {:>10} {:>14} {:>12}", "model", "signals", "drift update", "of backend");
    for (label, backend, sig) in backend_times {
        let bytes = MODELS.iter().find(|(l, _)| *l == label).unwrap().1;
        let reference = flotilla_builder::baseline::Reference {
            batches: vec![vec![
                Tensor::new(
                    "input",
                    vec![16, 1, 8, 8],
                    TensorData::F32((0..1024).map(|i| (i % 17) as f32 / 16.0).collect()),
                )
                .unwrap(),
            ]],
            labels: None,
        };
        let opts = flotilla_builder::baseline::DriftOptions {
            config: flotilla_drift::DriftConfig { window: flotilla_drift::Window::Seconds(3600), ..Default::default() },
            ..Default::default()
        };
        let profile = flotilla_builder::baseline::profile(
            &Default::default(),
            bytes,
            &sig,
            &Default::default(),
            &reference,
            &opts,
        )
        .unwrap();
        let signals = profile.signals.len();
        let drift =
            flotilla_agent::drift::ModelDrift::from_profile_json("m", 1, &serde_json::to_vec(&profile).unwrap(), 0)
                .unwrap();
        let runtimes = Runtimes::default();
        let loaded = runtimes.load(bytes, &sig, &Default::default()).unwrap();
        let inputs = vec![tensor()];
        let outputs = loaded.run(inputs.clone()).unwrap();
        let per100 = time(RUNS / 10, || {
            for _ in 0..100 {
                let p = drift.read_inputs(std::hint::black_box(&inputs));
                drift.record(p, std::hint::black_box(&outputs), None, 1);
            }
        });
        let each = per100.as_secs_f64() / 100.0;
        println!("{label:<16} {signals:>10} {:>12.0}ns {:>11.2}%", each * 1e9, each / backend.as_secs_f64() * 100.0);
    }
}
