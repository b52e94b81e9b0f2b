//! The simulator against a real control plane started in-process: devices over mutual TLS with
//! certificates minted from the server's fleet CA register, a signed bundle rolls out to all of
//! them in one wave, and drift reports built from the bundle's baseline are accepted and scored.
//!
//! Only `Server::start`, `ServerConfig` fields, the server's addresses, token and CA, and the
//! HTTP API are used (the server's internals are free to change).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_bundle::SecretKey;
use flotilla_bundle::root::{Root, sign_root};
use flotilla_drift::{DriftConfig, Kind, Profile, Signal, SignalProfile, Sketch, Source};
use flotilla_server::{Server, ServerConfig};
use flotilla_sim::{Download, Sim, SimConfig};
use serde_json::{Value, json};

const MODEL: &[u8] = include_bytes!("../../models/digits_cnn.onnx");

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

struct Plane {
    server: Server,
    data_dir: std::path::PathBuf,
    http: reqwest::Client,
    api: String,
    /// `mqtts://HOST:PORT` from endpoints.json.
    broker: String,
    key: SecretKey,
}

async fn start_plane(dir: &Path, chunk_size: Option<u32>) -> anyhow::Result<Plane> {
    let key = SecretKey::generate()?;
    let root_path = dir.join("root.cbor");
    std::fs::write(&root_path, sign_root(&Root::single_key(&key.public(), now_s(), None), &[&key])?)?;
    let data_dir = dir.join("server");
    let mut cfg = ServerConfig::new(data_dir.clone());
    cfg.http = "127.0.0.1:0".parse()?;
    cfg.mqtt = "127.0.0.1:0".parse()?;
    cfg.trust_root = Some(root_path);
    if let Some(c) = chunk_size {
        cfg.chunk_size = c;
    }
    let server = Server::start(cfg).await?;
    let token = server.admin_token().context("no admin token")?;
    let endpoints: Value = serde_json::from_slice(&std::fs::read(data_dir.join("endpoints.json"))?)?;
    let ca = endpoints["ca"].as_str().map(std::path::PathBuf::from).or_else(|| server.ca_path()).context("no CA")?;
    let broker = format!(
        "{}://{}",
        endpoints["mqtt_scheme"].as_str().unwrap_or("mqtts"),
        endpoints["mqtt"].as_str().context("no mqtt endpoint")?
    );
    // As the CLI does: the fleet CA pinned, the token on every request.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    let tls = flotilla_pki::tls::client_config(&std::fs::read_to_string(&ca)?, None)?;
    let http = reqwest::Client::builder().tls_backend_preconfigured(tls).default_headers(headers).build()?;
    let api = server.api_url();
    Ok(Plane { server, data_dir, http, api, broker, key })
}

impl Plane {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        json(self.http.get(format!("{}{path}", self.api)).send().await?).await
    }

    async fn post(&self, path: &str, body: reqwest::Body) -> anyhow::Result<Value> {
        json(self.http.post(format!("{}{path}", self.api)).body(body).send().await?).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        json(self.http.post(format!("{}{path}", self.api)).json(body).send().await?).await
    }

    /// Devices whose id starts with `prefix` that the registry shows online.
    async fn online(&self, prefix: &str) -> anyhow::Result<Vec<Value>> {
        let all = self.get("/api/v1/devices").await?;
        Ok(all
            .as_array()
            .context("devices")?
            .iter()
            .filter(|d| d["id"].as_str().is_some_and(|i| i.starts_with(prefix)) && d["online"] == json!(true))
            .cloned()
            .collect())
    }

    async fn wait_online(&self, prefix: &str, n: usize, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let t0 = Instant::now();
        loop {
            let d = self.online(prefix).await?;
            if d.len() >= n {
                return Ok(d);
            }
            if t0.elapsed() > timeout {
                bail!("{} of {n} {prefix}* devices online after {timeout:?}", d.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Build `digits@version` with `profile` as its drift baseline, sign it, push it.
    async fn push_bundle(&self, version: u64, profile: Option<Profile>) -> anyhow::Result<Value> {
        let mut opts = flotilla_builder::BuildOptions::new("digits", version, MODEL.to_vec(), now_s());
        opts.profile = profile;
        let unsigned = flotilla_builder::build(&opts)?.bytes;
        let mut signed = Vec::new();
        flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(unsigned), &self.key, &mut signed)?;
        self.post("/api/v1/bundles", signed.into()).await
    }

    /// Start a rollout of `bundle` to every device (default plan: one wave, gated on every
    /// install succeeding) and wait for it to end.
    async fn roll_out(&self, bundle: &str, timeout: Duration) -> anyhow::Result<Value> {
        let created = self.post_json("/api/v1/rollouts", &json!({ "bundle": bundle })).await?;
        let id = created["id"].as_str().context("rollout id")?.to_string();
        let t0 = Instant::now();
        loop {
            let r = self.get(&format!("/api/v1/rollouts/{id}")).await?;
            let state = r["state"].as_str().unwrap_or_default();
            if state != "running" && state != "pending" {
                return Ok(r);
            }
            if t0.elapsed() > timeout {
                bail!("rollout still {state} after {timeout:?}: {} of {} succeeded", r["succeeded"], r["total"]);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn json(r: reqwest::Response) -> anyhow::Result<Value> {
    let status = r.status();
    let body = r.bytes().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// A two-signal baseline (a continuous input mean, a categorical class).
fn profile() -> Profile {
    let means: Vec<f64> = (0..2000).map(|i| ((i as f64) * 0.37).sin() * 0.5 + 0.5).collect();
    let classes: Vec<f64> = (0..2000).map(|i| (i % 10) as f64).collect();
    Profile {
        config: DriftConfig::default(),
        signals: vec![
            SignalProfile {
                signal: Signal {
                    name: "input.mean".into(),
                    source: Source::InputMean { tensor: "input".into() },
                    kind: Kind::Continuous,
                },
                baseline: Sketch::baseline(Kind::Continuous, &means, 10, 0).unwrap(),
            },
            SignalProfile {
                signal: Signal {
                    name: "class".into(),
                    source: Source::Class { output: "output".into() },
                    kind: Kind::Categorical,
                },
                baseline: Sketch::baseline(Kind::Categorical, &classes, 0, 10).unwrap(),
            },
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_over_tls_take_a_one_wave_rollout_and_report_drift() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plane = start_plane(dir.path(), None).await?;

    let mut cfg = SimConfig::new(&plane.broker, 50);
    cfg.fleet_ca = Some(plane.data_dir.join("pki"));
    cfg.connect_rate = 0.0;
    cfg.health_every = Some(Duration::from_secs(1));
    cfg.drift_every = Some(Duration::from_secs(2));
    cfg.drift_fetch = true;
    cfg.inference_rate = 100.0;
    let sim = Sim::start(cfg).await?;

    let t0 = Instant::now();
    let devices = plane.wait_online("sim-", 50, Duration::from_secs(60)).await?;
    eprintln!("50 devices registered in {:.2}s", t0.elapsed().as_secs_f64());
    let d0 = devices.iter().find(|d| d["id"] == "sim-00001").context("sim-00001")?;
    assert_eq!(d0["tags"]["group"], "sim");
    assert_eq!(d0["tags"]["cohort"], "c01");
    assert_eq!(d0["agent_version"], "sim");
    assert_eq!(d0["models"][0]["name"], "digits");
    assert_eq!(d0["models"][0]["version"], 1);
    assert!(sim.all_registered() || sim.stats().registered.load(std::sync::atomic::Ordering::Relaxed) >= 49);

    let pushed = plane.push_bundle(2, Some(profile())).await?;
    assert_eq!(pushed["version"], 2, "{pushed}");
    let r = plane.roll_out("digits@2", Duration::from_secs(90)).await?;
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["total"], 50, "{r}");
    assert_eq!(r["succeeded"], 50, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    let snap = sim.snapshot();
    assert_eq!(snap.installs_succeeded, 50, "{snap:?}");

    // The retained states say version 2; the event log has the agent's sequence.
    let t1 = Instant::now();
    loop {
        let on2 = plane.online("sim-").await?.iter().filter(|d| d["models"][0]["version"] == 2).count();
        if on2 == 50 {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(20), "{on2} of 50 devices report digits@2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = plane.get("/api/v1/events?device=sim-00007").await?;
    let text = events.to_string();
    assert!(text.contains("install_accepted") && text.contains("install_succeeded"), "{text}");

    // Drift: sketches built on the fetched baseline are kept and scored (near zero: unshifted).
    let t2 = Instant::now();
    let rows = loop {
        let rows = plane.get("/api/v1/drift?model=digits&version=2").await?;
        let rows = rows.as_array().cloned().unwrap_or_default();
        let devices: u64 = rows
            .iter()
            .filter(|r| r["signal"] == "input.mean")
            .map(|r| r["devices"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0);
        if devices >= 25 {
            break rows;
        }
        assert!(t2.elapsed() < Duration::from_secs(30), "drift rows: {rows:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for r in &rows {
        if let Some(psi) = r["psi"].as_f64() {
            assert!(psi < 0.2, "unshifted simulated drift scores {psi}: {r}");
        }
    }
    assert!(rows.iter().any(|r| r["psi"].as_f64().is_some()), "no scored drift row: {rows:?}");

    let summary = sim.stop().await;
    eprintln!("{}", serde_json::to_string(&summary)?);
    assert_eq!(summary.registered, 50);
    assert!(summary.last.sent["health"] > 0 && summary.last.sent["drift"] > 0, "{summary:?}");
    assert_eq!(summary.last.errors, 0, "{:?}", summary.error_kinds);
    // A clean stop leaves every device offline.
    let t3 = Instant::now();
    while !plane.online("sim-").await?.is_empty() {
        assert!(t3.elapsed() < Duration::from_secs(20), "devices still online after the simulator stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    plane.server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_download_bundles_over_http_and_mqtt() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Small chunks: several Range requests / chunk messages and progress events per device.
    let plane = start_plane(dir.path(), Some(4096)).await?;
    let mut sims = Vec::new();
    for (prefix, mode) in [("http", Download::Http), ("mqtt", Download::Mqtt)] {
        let mut cfg = SimConfig::new(&plane.broker, 8);
        cfg.prefix = prefix.into();
        cfg.fleet_ca = Some(plane.data_dir.join("pki"));
        cfg.connect_rate = 0.0;
        cfg.download = mode;
        cfg.drift_every = None;
        sims.push(Sim::start(cfg).await?);
    }
    plane.wait_online("http-", 8, Duration::from_secs(60)).await?;
    plane.wait_online("mqtt-", 8, Duration::from_secs(60)).await?;
    let pushed = plane.push_bundle(2, None).await?;
    let size = pushed["size"].as_u64().context("bundle size")?;
    let r = plane.roll_out("digits@2", Duration::from_secs(90)).await?;
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["succeeded"], 16, "{r}");
    let (http, mqtt) = (sims.remove(0).stop().await, sims.remove(0).stop().await);
    assert_eq!(http.last.installs_succeeded, 8);
    assert_eq!(mqtt.last.installs_succeeded, 8);
    assert_eq!(http.last.bytes_http, 8 * size, "{http:?}");
    assert_eq!(mqtt.last.bytes_mqtt, 8 * size, "{mqtt:?}");
    assert!(mqtt.last.sent["fetch"] >= 8 * size.div_ceil(4096), "{mqtt:?}");
    assert_eq!(http.last.errors + mqtt.last.errors, 0, "{:?} {:?}", http.error_kinds, mqtt.error_kinds);
    let events = plane.get("/api/v1/events?device=mqtt-00003").await?.to_string();
    assert!(events.contains("install_progress"), "{events}");
    plane.server.shutdown().await;
    Ok(())
}
