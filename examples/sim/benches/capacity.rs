//! How big a fleet the control plane holds on this machine, measured from outside with
//! `flotilla-sim`, in the two configurations:
//!
//! - `embedded`: the default, one `flotilla-server` process (SQLite, embedded broker, mutual TLS);
//! - `replicas`: three `flotilla-server` replicas on one PostgreSQL and one Mosquitto (mutual
//!   TLS), started here from Debian's packages (`.ci/setup` installs them).
//!
//! The servers are the release `flotilla-server` binary in their own processes (built first if
//! needed), so their CPU and memory are theirs alone; the devices are simulated in this process.
//! For each configuration and fleet size it prints:
//!
//! - registration: seconds from the first connection until the server lists every device online;
//! - steady state (health every 10 s and drift every 60 s per device): messages sent and
//!   handled per second, server CPU (% of one core) and RSS, the backlog at the end;
//! - burst: every device sends `--burst` health reports at once; the rate the control plane
//!   stores them at (the ingest rate), and how many it gave up;
//! - the device list: latency of a 200-device page (first page and one from the middle);
//! - a one-wave rollout of a signed 1 MiB bundle: seconds from its start to the last device's
//!   install report, and from that report until the control plane recorded it complete;
//! - messages lost: sent by the devices and never handled by the server.
//!
//! Nothing here passes or fails: it prints figures (a table, and one JSON line per run).
//!
//!   cargo bench -p flotilla-sim --bench capacity                        # 1000 devices, both
//!   cargo bench -p flotilla-sim --bench capacity -- --devices 1000,5000,10000,19000
//!   cargo bench -p flotilla-sim --bench capacity -- --config embedded --download http
//!
//! Options: `--devices N[,N…]`, `--config embedded|replicas|both`, `--download none|http|mqtt`,
//! `--steady SECS` (default 30), `--burst K` (reports per device, default: 200,000 in all, at most
//! 32 each), `--keep DIR` (keep the data directories and server logs there).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_bundle::SecretKey;
use flotilla_drift::{DriftConfig, Kind, Profile, Signal, SignalProfile, Sketch, Source};
use flotilla_sim::{Download, Sim, SimConfig};
use serde_json::{Value, json};

const MODEL: &[u8] = include_bytes!("../../models/digits_cnn.onnx");
/// The rollout's bundle: about this many bytes (incompressible padding in the model).
const BUNDLE_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Config {
    Embedded,
    Replicas,
}

struct Opts {
    sizes: Vec<usize>,
    configs: Vec<Config>,
    download: Download,
    steady: Duration,
    burst: Option<u64>,
    keep: Option<PathBuf>,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        sizes: vec![1000],
        configs: vec![Config::Embedded, Config::Replicas],
        download: Download::None,
        steady: Duration::from_secs(30),
        burst: None,
        keep: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--devices" | "-n" => o.sizes = val()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
            "--config" => {
                o.configs = match val()?.as_str() {
                    "embedded" => vec![Config::Embedded],
                    "replicas" => vec![Config::Replicas],
                    "both" => vec![Config::Embedded, Config::Replicas],
                    c => bail!("--config {c:?}: embedded, replicas or both"),
                }
            }
            "--download" => o.download = val()?.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            "--steady" => o.steady = Duration::from_secs(val()?.parse()?),
            "--burst" => o.burst = Some(val()?.parse()?),
            "--keep" => o.keep = Some(val()?.into()),
            "--bench" => {} // cargo bench passes it
            other => bail!("unknown option {other:?} (see the top of benches/capacity.rs)"),
        }
    }
    Ok(o)
}

/// The release `flotilla-server` next to this bench, built (or brought up to date) first.
fn server_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).context("target dir")?;
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "flotilla-server", "--bin", "flotilla-server"]);
    if release {
        cmd.arg("--release");
    }
    let ok = cmd.status().is_ok_and(|s| s.success());
    let bin = dir.join("flotilla-server");
    anyhow::ensure!(ok && bin.exists(), "could not build {}", bin.display());
    Ok(bin)
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// CPU seconds (user + system) and RSS bytes of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3: utime is field 14, stime 15, rss (pages) 24.
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let rss = f.get(21)?.parse::<u64>().ok()? * 4096;
    Some((ticks / 100.0, rss))
}

/// A process and its children (PostgreSQL's backends).
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let ppid = std::fs::read_to_string(format!("/proc/{child}/stat")).ok().and_then(|s| {
                let rest = s[s.rfind(')')? + 2..].to_string();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

/// What is measured of a group of processes: CPU seconds and RSS summed.
fn usage(pids: &[u32]) -> (f64, u64) {
    pids.iter().filter_map(|&p| proc_usage(p)).fold((0.0, 0), |(c, r), (c2, r2)| (c + c2, r + r2))
}

/// The control plane under test.
struct Plane {
    _dir: tempfile::TempDir,
    data: PathBuf,
    servers: Vec<(String, Child)>,
    apis: Vec<String>,
    http: reqwest::Client,
    broker: String,
    _pg: Option<flotilla_tests::Postgres>,
    _mqtt: Option<flotilla_tests::Mosquitto>,
    /// Processes that are not the server but serve it (PostgreSQL, Mosquitto): name, pid.
    helpers: Vec<(&'static str, u32)>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        for (_, c) in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_server(bin: &Path, data: &Path, id: Option<&str>, extra: &[&str], log: &Path) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir").arg(data).args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]).args(extra);
    if let Some(id) = id {
        cmd.args(["--replica-id", id]);
    }
    let log = std::fs::File::create(log)?;
    cmd.stdout(log.try_clone()?).stderr(log).env("RUST_LOG", "warn");
    Ok(cmd.spawn()?)
}

async fn wait_file(path: &Path) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(b) = std::fs::read(path)
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
        {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "{} not written within 60 s", path.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_plane(config: Config, bin: &Path, keep: Option<&Path>) -> anyhow::Result<Plane> {
    let dir = match keep {
        Some(k) => {
            std::fs::create_dir_all(k)?;
            let d = tempfile::Builder::new().prefix("capacity-").disable_cleanup(true).tempdir_in(k)?;
            eprintln!("keeping data and logs in {}", d.path().display());
            d
        }
        None => tempfile::tempdir()?,
    };
    let data = dir.path().join("server");
    std::fs::create_dir_all(&data)?;
    let (mut servers, mut apis, mut helpers) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pg, mut mqtt, broker);
    match config {
        Config::Embedded => {
            (pg, mqtt) = (None, None);
            servers.push(("server".to_string(), spawn_server(bin, &data, None, &[], &dir.path().join("server.log"))?));
            let e = wait_file(&data.join("endpoints.json")).await?;
            apis.push(format!("{}://{}", e["scheme"].as_str().unwrap_or("https"), e["http"].as_str().context("http")?));
            broker =
                format!("{}://{}", e["mqtt_scheme"].as_str().unwrap_or("mqtts"), e["mqtt"].as_str().context("mqtt")?);
        }
        Config::Replicas => {
            let p = flotilla_tests::start_postgres(&dir.path().join("pg"));
            let store = p.create_database("fleet");
            let pid: u32 = std::fs::read_to_string(p.data.join("postmaster.pid"))?
                .lines()
                .next()
                .context("postmaster.pid")?
                .trim()
                .parse()?;
            helpers.push(("postgres", pid));
            let (m, url) = flotilla_tests::start_mosquitto_tls(dir.path(), &data);
            helpers.push(("mosquitto", m.pid()));
            for id in ["a", "b", "c"] {
                let extra = ["--store", store.as_str(), "--broker", url.as_str()];
                let log = dir.path().join(format!("replica-{id}.log"));
                servers.push((id.to_string(), spawn_server(bin, &data, Some(id), &extra, &log)?));
                let e = wait_file(&data.join(format!("endpoints-{id}.json"))).await?;
                apis.push(format!(
                    "{}://{}",
                    e["scheme"].as_str().unwrap_or("https"),
                    e["http"].as_str().context("http")?
                ));
            }
            (pg, mqtt, broker) = (Some(p), Some(m), url);
        }
    }
    let token = std::fs::read_to_string(data.join("admin.token"))?.trim().to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    let ca = std::fs::read_to_string(data.join("pki/ca.pem"))?;
    let tls = flotilla_pki::tls::client_config(&ca, None)?;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()?;
    let plane = Plane { _dir: dir, data, servers, apis, http, broker, _pg: pg.take(), _mqtt: mqtt.take(), helpers };
    Ok(plane)
}

impl Plane {
    fn server_pids(&self) -> Vec<u32> {
        self.servers.iter().map(|(_, c)| c.id()).collect()
    }

    fn helper_pids(&self) -> Vec<u32> {
        self.helpers.iter().flat_map(|(_, p)| family(*p)).collect()
    }

    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let r = self.http.get(format!("{}{path}", self.apis[0])).send().await?;
        if !r.status().is_success() {
            bail!("GET {path}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(r)
    }

    /// Sum of a Prometheus sample over every replica's `/metrics`.
    async fn metric(&self, name_and_labels: &str) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for api in &self.apis {
            let text = self.http.get(format!("{api}/metrics")).send().await?.text().await?;
            for line in text.lines() {
                if let Some(v) = line.strip_prefix(name_and_labels).and_then(|r| r.strip_prefix(' ')) {
                    total += v.trim().parse::<f64>().unwrap_or(0.0);
                }
            }
        }
        Ok(total)
    }

    /// Devices online (read once: every replica shares the store).
    async fn online(&self) -> anyhow::Result<u64> {
        let text = self.get("/metrics").await?.text().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("flotilla_devices{state=\"online\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64)
    }

    /// (received, handled, dropped) device messages over every replica.
    async fn messages(&self) -> anyhow::Result<(u64, u64, u64)> {
        Ok((
            self.metric("flotilla_mqtt_messages_total{direction=\"in\"}").await? as u64,
            self.metric("flotilla_device_messages_total{outcome=\"handled\"}").await? as u64,
            self.metric("flotilla_device_messages_total{outcome=\"dropped\"}").await? as u64,
        ))
    }
}

/// The digits model with an unused initializer of `pad` random bytes added to its graph (raw
/// protobuf: ModelProto.graph = 7, GraphProto.initializer = 5), so the bundle has the size asked
/// for and does not compress.
fn padded_model(pad: usize) -> anyhow::Result<Vec<u8>> {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn read_varint(b: &[u8], i: &mut usize) -> anyhow::Result<u64> {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = *b.get(*i).context("truncated varint")?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
            shift += 7;
        }
    }
    let floats = pad / 4;
    let mut raw = vec![0u8; floats * 4];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in raw.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    // Keep the values finite: clear each float's top exponent bit.
    for f in raw.chunks_mut(4) {
        f[3] &= 0x3f;
    }
    let mut tensor = Vec::new();
    varint(1 << 3, &mut tensor); // dims
    varint(floats as u64, &mut tensor);
    varint(2 << 3, &mut tensor); // data_type = FLOAT
    varint(1, &mut tensor);
    tensor.push((8 << 3) | 2); // name
    varint(7, &mut tensor);
    tensor.extend_from_slice(b"padding");
    tensor.push((9 << 3) | 2); // raw_data
    varint(raw.len() as u64, &mut tensor);
    tensor.extend_from_slice(&raw);

    let (m, mut out, mut i) = (MODEL, Vec::new(), 0usize);
    let mut found = false;
    while i < m.len() {
        let start = i;
        let key = read_varint(m, &mut i)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                read_varint(m, &mut i)?;
            }
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = read_varint(m, &mut i)? as usize;
                if field == 7 {
                    let mut graph = m[i..i + len].to_vec();
                    graph.push((5 << 3) | 2);
                    varint(tensor.len() as u64, &mut graph);
                    graph.extend_from_slice(&tensor);
                    out.push((7 << 3) | 2);
                    varint(graph.len() as u64, &mut out);
                    out.extend_from_slice(&graph);
                    i += len;
                    found = true;
                    continue;
                }
                i += len;
            }
            w => bail!("unexpected protobuf wire type {w}"),
        }
        out.extend_from_slice(&m[start..i]);
    }
    anyhow::ensure!(found, "the model has no graph");
    Ok(out)
}

/// A two-signal drift baseline (a continuous input mean, a categorical class).
fn profile() -> Profile {
    let means: Vec<f64> = (0..2000).map(|i| ((i as f64) * 0.37).sin() * 0.5 + 0.5).collect();
    let classes: Vec<f64> = (0..2000).map(|i| (i % 10) as f64).collect();
    let signal = |name: &str, source, kind| Signal { name: name.into(), source, kind };
    Profile {
        config: DriftConfig::default(),
        signals: vec![
            SignalProfile {
                signal: signal("input.mean", Source::InputMean { tensor: "input".into() }, Kind::Continuous),
                baseline: Sketch::baseline(Kind::Continuous, &means, 10, 0).expect("a baseline"),
            },
            SignalProfile {
                signal: signal("class", Source::Class { output: "output".into() }, Kind::Categorical),
                baseline: Sketch::baseline(Kind::Categorical, &classes, 0, 10).expect("a baseline"),
            },
        ],
    }
}

/// Build, sign and push `digits@version` (with the drift baseline), padded to `pad` bytes;
/// returns its size.
async fn push_bundle(p: &Plane, key: &SecretKey, version: u64, pad: usize) -> anyhow::Result<u64> {
    let model = if pad > 0 { padded_model(pad)? } else { MODEL.to_vec() };
    let mut o = flotilla_builder::BuildOptions::new("digits", version, model, now_s());
    o.profile = Some(profile());
    o.zstd_level = 1;
    let unsigned = flotilla_builder::build(&o)?.bytes;
    let mut signed = Vec::new();
    flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(unsigned), key, &mut signed)?;
    let size = signed.len() as u64;
    let r = p.http.post(format!("{}/api/v1/bundles", p.apis[0])).body(signed).send().await?;
    if !r.status().is_success() {
        bail!("pushing the bundle: {} {}", r.status(), r.text().await?);
    }
    Ok(size)
}

#[derive(Default, serde::Serialize)]
struct Figures {
    config: &'static str,
    devices: usize,
    download: String,
    connected_s: Option<f64>,
    registered_s: Option<f64>,
    steady_sent_per_s: f64,
    steady_handled_per_s: f64,
    steady_server_cpu_pct: f64,
    steady_helpers_cpu_pct: f64,
    server_rss_mib: f64,
    helpers_rss_mib: f64,
    backlog_after_steady: u64,
    burst1_messages: u64,
    burst1_ingest_per_s: f64,
    burst1_dropped: u64,
    burst_messages: u64,
    burst_ingest_per_s: f64,
    burst_dropped: u64,
    page_first_ms_p50: f64,
    page_middle_ms_p50: f64,
    page_ms_max: f64,
    bundle_bytes: u64,
    rollout_last_install_s: Option<f64>,
    rollout_completed_s: Option<f64>,
    rollout_recorded_after_last_install_s: Option<f64>,
    rollout_state: String,
    rollout_succeeded: u64,
    sent: u64,
    handled: u64,
    dropped: u64,
    lost: i64,
    sim_errors: u64,
    sim_disconnects: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run(config: Config, n: usize, o: &Opts, bin: &Path) -> anyhow::Result<Figures> {
    let mut f = Figures {
        config: match config {
            Config::Embedded => "embedded",
            Config::Replicas => "replicas",
        },
        devices: n,
        download: format!("{:?}", o.download).to_lowercase(),
        ..Figures::default()
    };
    let p = start_plane(config, bin, o.keep.as_deref()).await?;
    let key = SecretKey::generate()?;
    eprintln!("[{} {n}] control plane up ({} server process(es)); {}", f.config, p.servers.len(), p.broker);
    // The devices start on digits@1, whose baseline their drift reports fit.
    push_bundle(&p, &key, 1, 0).await?;
    let profile_path = p.data.join("bench-profile.json");
    std::fs::write(&profile_path, serde_json::to_vec(&profile())?)?;

    // Registration.
    let mut cfg = SimConfig::new(&p.broker, n);
    cfg.fleet_ca = Some(p.data.join("pki"));
    cfg.connect_rate = 0.0;
    cfg.connect_concurrency = 64;
    cfg.health_every = Some(Duration::from_secs(10));
    cfg.drift_every = Some(Duration::from_secs(60));
    cfg.drift_fetch = true;
    cfg.drift_profile = Some(profile_path);
    cfg.download = o.download;
    let t0 = Instant::now();
    let sim = Sim::start(cfg).await?;
    let deadline = t0 + Duration::from_secs(120 + n as u64 / 50);
    loop {
        let online = p.online().await.unwrap_or(0);
        if online >= n as u64 {
            f.registered_s = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() > deadline {
            eprintln!("[{} {n}] only {online} online after {:.0}s", f.config, t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.connected_s = sim.summary().all_connected_after_s;
    eprintln!("[{} {n}] registered: {:?} s (all connected after {:?} s)", f.config, f.registered_s, f.connected_s);

    // Steady state.
    let (s0, (_, h0, _)) = (sim.snapshot().sent_total, p.messages().await?);
    let (cpu0, helpers0) = (usage(&p.server_pids()).0, usage(&p.helper_pids()).0);
    let ts = Instant::now();
    let mut rss_peak = (0u64, 0u64);
    while ts.elapsed() < o.steady {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak.0 = rss_peak.0.max(usage(&p.server_pids()).1);
        rss_peak.1 = rss_peak.1.max(usage(&p.helper_pids()).1);
    }
    let dt = ts.elapsed().as_secs_f64();
    let (s1, (r1, h1, d1)) = (sim.snapshot().sent_total, p.messages().await?);
    f.steady_sent_per_s = (s1 - s0) as f64 / dt;
    f.steady_handled_per_s = (h1 - h0) as f64 / dt;
    f.steady_server_cpu_pct = (usage(&p.server_pids()).0 - cpu0) / dt * 100.0;
    f.steady_helpers_cpu_pct = (usage(&p.helper_pids()).0 - helpers0) / dt * 100.0;
    f.backlog_after_steady = r1.saturating_sub(h1 + d1);
    eprintln!(
        "[{} {n}] steady: sent {:.0}/s handled {:.0}/s, server CPU {:.0} %, backlog {}",
        f.config, f.steady_sent_per_s, f.steady_handled_per_s, f.steady_server_cpu_pct, f.backlog_after_steady
    );

    // Device list pages.
    let (mut first, mut middle) = (Vec::new(), Vec::new());
    let mid = sim.config().device_id(n / 2);
    for _ in 0..20 {
        let t = Instant::now();
        p.get("/api/v1/devices?limit=200").await?.bytes().await?;
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        p.get(&format!("/api/v1/devices?limit=200&after={mid}")).await?.bytes().await?;
        middle.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    f.page_ms_max = first.iter().chain(&middle).copied().fold(0.0, f64::max);
    (f.page_first_ms_p50, f.page_middle_ms_p50) = (median(&mut first), median(&mut middle));

    // Bursts: how fast the control plane takes messages in. One report from every device (each
    // a row of its own), then many from each (an outbox flushed after an outage: the latest
    // per device and model version is what is stored).
    let (messages, rate, dropped) = burst(&p, &sim, 1, &f).await?;
    (f.burst1_messages, f.burst1_ingest_per_s, f.burst1_dropped) = (messages, rate, dropped);
    let k = o.burst.unwrap_or((200_000 / n as u64).clamp(2, 32));
    let (messages, rate, dropped) = burst(&p, &sim, k, &f).await?;
    (f.burst_messages, f.burst_ingest_per_s, f.burst_dropped) = (messages, rate, dropped);

    // A one-wave rollout of a 1 MiB signed bundle.
    f.bundle_bytes = push_bundle(&p, &key, 2, BUNDLE_BYTES).await?;
    let r = p.http.post(format!("{}/api/v1/rollouts", p.apis[0])).json(&json!({"bundle": "digits@2"})).send().await?;
    let created: Value = r.json().await?;
    let id = created["id"].as_str().with_context(|| format!("no rollout id: {created}"))?.to_string();
    let tr = Instant::now();
    let sim_at_rollout = sim.snapshot().elapsed_s;
    let deadline = tr + Duration::from_secs(300 + n as u64 / 20);
    let done = loop {
        let r: Value = p.get(&format!("/api/v1/rollouts/{id}")).await?.json().await?;
        let state = r["state"].as_str().unwrap_or_default().to_string();
        if state != "running" && state != "pending" {
            f.rollout_completed_s = Some(tr.elapsed().as_secs_f64());
            break r;
        }
        if Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    f.rollout_state = done["state"].as_str().unwrap_or_default().into();
    f.rollout_succeeded = done["succeeded"].as_u64().unwrap_or(0);
    let summary = sim.summary();
    f.rollout_last_install_s = summary.last_install_after_s.map(|t| t - sim_at_rollout);
    f.rollout_recorded_after_last_install_s =
        f.rollout_completed_s.zip(f.rollout_last_install_s).map(|(done, last)| done - last);
    eprintln!(
        "[{} {n}] rollout {}: {} succeeded; last install reported {:?} s, recorded {:?} s after it",
        f.config,
        f.rollout_state,
        f.rollout_succeeded,
        f.rollout_last_install_s,
        f.rollout_recorded_after_last_install_s
    );

    // Drain (until the server has handled all the devices sent, or a minute passed), then count
    // what was lost: per channel, where a message sent is one to handle: hellos, events,
    // telemetry (health and drift). States are left out: the broker replays retained ones to
    // each new state subscriber and publishes wills, so their counts differ with nothing lost.
    let td = Instant::now();
    let missing = loop {
        let summary = sim.summary();
        let sent = |k: &str| summary.last.sent.get(k).copied().unwrap_or(0) as i64;
        let mut missing = Vec::new();
        for (channel, sent) in
            [("hello", sent("hello")), ("events", sent("events")), ("metrics", sent("health") + sent("drift"))]
        {
            let handled =
                p.metric(&format!("flotilla_device_messages_handled_total{{channel=\"{channel}\"}}")).await? as i64;
            if sent > handled {
                missing.push((channel, sent, handled));
            }
        }
        if missing.is_empty() || td.elapsed() > Duration::from_secs(60) {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (channel, sent, handled) in &missing {
        eprintln!("[{} {n}] {channel}: {sent} sent, {handled} handled", f.config);
        f.lost += sent - handled;
    }
    let summary = sim.summary();
    let (_, h, d) = p.messages().await?;
    (f.sent, f.handled, f.dropped) = (summary.last.sent_total, h, d);
    (f.sim_errors, f.sim_disconnects) = (summary.last.errors, summary.last.disconnects);
    f.server_rss_mib = rss_peak.0 as f64 / (1 << 20) as f64;
    f.helpers_rss_mib = rss_peak.1 as f64 / (1 << 20) as f64;
    if !summary.error_kinds.is_empty() {
        eprintln!("[{} {n}] simulator errors: {:?}", f.config, summary.error_kinds);
    }
    sim.stop().await;
    Ok(f)
}

/// Every device sends `k` health reports at once; returns the messages sent, the rate they were
/// handled at (from the burst until the server has handled all it received), and how many the
/// server gave up.
async fn burst(p: &Plane, sim: &Sim, k: u64, f: &Figures) -> anyhow::Result<(u64, f64, u64)> {
    let n = f.devices as u64;
    let (r0, h0, d0) = p.messages().await?;
    let sent0 = sim.snapshot().sent_total;
    let tb = Instant::now();
    sim.burst(k);
    let mut last_progress = (Instant::now(), h0);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (r, h, d) = p.messages().await?;
        if h != last_progress.1 {
            last_progress = (Instant::now(), h);
        }
        if r >= r0 + n * k && r <= h + d {
            break;
        }
        if last_progress.0.elapsed() > Duration::from_secs(30) {
            eprintln!("[{} {n}] burst: no progress for 30 s (received {r}, handled {h}, dropped {d})", f.config);
            break;
        }
    }
    let took = tb.elapsed().as_secs_f64();
    let (_, h, d) = p.messages().await?;
    let sent = sim.snapshot().sent_total - sent0;
    let rate = (h - h0) as f64 / took;
    eprintln!("[{} {n}] burst of {sent} ({k} per device): {rate:.0} messages/s handled, {} dropped", f.config, d - d0);
    Ok((sent, rate, d - d0))
}

fn print_table(rows: &[Figures]) {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    println!(
        "\n{:<9} {:>6} {:>5} | {:>7} | {:>8} {:>8} {:>6} {:>6} {:>7} | {:>9} {:>9} {:>5} | {:>6} {:>6} | {:>8} {:>8} {:>9} | {:>6} {:>5}",
        "config",
        "devices",
        "dl",
        "reg s",
        "sent/s",
        "stored/s",
        "cpu %",
        "rss MB",
        "backlog",
        "burst1/s",
        "burstK/s",
        "drop",
        "page ms",
        "mid ms",
        "install",
        "complete",
        "recorded",
        "lost",
        "errs"
    );
    for f in rows {
        println!(
            "{:<9} {:>6} {:>5} | {:>7} | {:>8.0} {:>8.0} {:>6.0} {:>6.0} {:>7} | {:>9.0} {:>9.0} {:>5} | {:>6.1} {:>6.1} | {:>8} {:>8} {:>9} | {:>6} {:>5}",
            f.config,
            f.devices,
            f.download,
            opt(f.registered_s),
            f.steady_sent_per_s,
            f.steady_handled_per_s,
            f.steady_server_cpu_pct,
            f.server_rss_mib,
            f.backlog_after_steady,
            f.burst1_ingest_per_s,
            f.burst_ingest_per_s,
            f.burst1_dropped + f.burst_dropped,
            f.page_first_ms_p50,
            f.page_middle_ms_p50,
            opt(f.rollout_last_install_s),
            opt(f.rollout_completed_s),
            opt(f.rollout_recorded_after_last_install_s),
            f.lost,
            f.sim_errors
        );
    }
    println!(
        "\nreg s: all devices online in the registry; sent/stored/s: steady state (health 10 s, drift 60 s); cpu %: server process(es), \
         of one core; burst1/s: messages handled per second when every device sends one report at once, burstK/s: when each sends K \
         (an outbox flushed); drop: given up by the server in the bursts; install: rollout start to last install report; \
         complete: to the rollout recorded complete; recorded: the difference; lost: hellos, events and telemetry sent by devices, never handled"
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let limit = flotilla_sim::sys::raise_nofile();
    eprintln!("open files: {:?}", limit.now);
    let bin = server_bin()?;
    let mut rows = Vec::new();
    for &config in &o.configs {
        for &n in &o.sizes {
            match run(config, n, &o, &bin).await {
                Ok(f) => {
                    println!("{}", serde_json::to_string(&f)?);
                    rows.push(f);
                }
                Err(e) => eprintln!("[{config:?} {n}] failed: {e:#}"),
            }
        }
    }
    print_table(&rows);
    Ok(())
}
