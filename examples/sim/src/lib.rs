//! A fleet simulator: thousands of lightweight simulated devices in one process, each with its
//! own MQTT connection, speaking the real device contract ([`flotilla_proto`]) without running a
//! model. For capacity tests of the control plane and its broker, and for operators sizing a
//! deployment.
//!
//! Each device says hello, keeps a retained `State` (with a retained "offline" last will), answers
//! install offers (`InstallAccepted` then `InstallSucceeded` and a new retained state; with
//! [`Download::Http`] or [`Download::Mqtt`] it really fetches the bundle first), answers
//! rollbacks, and sends health reports and (when it knows the bundle's baseline profile) drift
//! reports with plausible sketches. One task per device; the task owns its rumqttc event loop.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let mut cfg = flotilla_sim::SimConfig::new("mqtts://127.0.0.1:8883", 1000);
//! cfg.fleet_ca = Some("/var/lib/flotilla/pki".into());
//! let sim = flotilla_sim::Sim::start(cfg).await?;
//! while !sim.all_registered() {
//!     tokio::time::sleep(std::time::Duration::from_millis(200)).await;
//! }
//! let summary = sim.stop().await;
//! println!("{}", summary.registered);
//! # Ok(()) }
//! ```

mod device;
pub mod download;
pub mod drift;
pub mod sys;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::Topics;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// How a simulated device treats an install offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Download {
    /// Acknowledge without downloading anything (control-plane load only).
    #[default]
    None,
    /// Download the bundle with HTTP `Range` requests from the offer's URL, chunk by chunk.
    Http,
    /// Download the bundle in MQTT chunks (fetch requests on the device's `fetch` topic).
    Mqtt,
}

impl std::str::FromStr for Download {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "off" => Ok(Download::None),
            "http" => Ok(Download::Http),
            "mqtt" => Ok(Download::Mqtt),
            _ => Err(format!("{s:?}: expected none, http or mqtt")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    /// `mqtts://HOST:PORT` (TLS) or `mqtt://HOST:PORT` (plain TCP).
    pub broker: String,
    pub devices: usize,
    /// Number of the first device (ids `{prefix}-{n:05}` from here), so several simulator
    /// processes can share one fleet.
    pub first: usize,
    pub prefix: String,
    /// Tags every device reports in its hello.
    pub tags: BTreeMap<String, String>,
    /// With `cohorts > 0`, device n also gets `{cohort_key}=c{n % cohorts:02}`.
    pub cohort_key: String,
    pub cohorts: usize,
    /// A directory holding the fleet CA (`ca.pem`, `ca.key`: the server's `DATA_DIR/pki`):
    /// device certificates are minted from it in-process, and `ca.pem` pins the server.
    pub fleet_ca: Option<PathBuf>,
    /// The CA of an external broker (and of the HTTP server, without `fleet_ca`).
    pub ca: Option<PathBuf>,
    /// MQTT password (plain brokers that want one); the username is always the device id.
    pub password: Option<String>,
    /// Lifetime of minted device certificates.
    pub cert_days: u32,
    /// New connections started per second (first connections; reconnects only wait on
    /// `connect_concurrency`).
    pub connect_rate: f64,
    /// Connections (TCP + TLS + CONNECT) in progress at once.
    pub connect_concurrency: usize,
    /// The model every device starts with (`digits@1`), if any.
    pub model: Option<(String, u64)>,
    pub download: Download,
    /// Downloads in progress at once across all devices.
    pub download_concurrency: usize,
    /// Simulated install time between acceptance and success (no-download mode), ±50 % jitter.
    pub install_time: Duration,
    /// Health report period per device (None: off).
    pub health_every: Option<Duration>,
    /// Drift report period per device (None: off). Reports are sent only for model versions
    /// whose baseline profile the simulator knows (see [`drift`]).
    pub drift_every: Option<Duration>,
    /// Fetch the baseline profile of installed bundles (HTTP Range on the offer's URL) so that
    /// drift reports can be built for them.
    pub drift_fetch: bool,
    /// The baseline profile (JSON, as in a bundle's `baseline` artifact) of the initial model.
    pub drift_profile: Option<PathBuf>,
    /// Fraction of drift values drawn from the baseline's top bin instead of its distribution
    /// (0: no drift; 0.5 makes PSI alerts).
    pub drift_shift: f64,
    /// Simulated inferences per device per second (health counts, drift window sizes).
    pub inference_rate: f64,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub agent_version: String,
    pub arch: String,
    pub runtimes: Vec<String>,
    /// Backend named in states, install results and health reports.
    pub backend: String,
    /// Persistent sessions like the agent (false) or clean ones (true: lighter on the broker).
    pub clean_session: bool,
}

impl SimConfig {
    pub fn new(broker: &str, devices: usize) -> SimConfig {
        SimConfig {
            broker: broker.into(),
            devices,
            first: 0,
            prefix: "sim".into(),
            tags: BTreeMap::from([("group".to_string(), "sim".to_string())]),
            cohort_key: "cohort".into(),
            cohorts: 4,
            fleet_ca: None,
            ca: None,
            password: None,
            cert_days: 30,
            connect_rate: 200.0,
            connect_concurrency: 64,
            model: Some(("digits".into(), 1)),
            download: Download::None,
            download_concurrency: 32,
            install_time: Duration::ZERO,
            health_every: Some(Duration::from_secs(10)),
            drift_every: Some(Duration::from_secs(60)),
            drift_fetch: false,
            drift_profile: None,
            drift_shift: 0.0,
            inference_rate: 1.0,
            topic_prefix: flotilla_proto::topics::DEFAULT_PREFIX.into(),
            keep_alive: Duration::from_secs(30),
            agent_version: "sim".into(),
            arch: std::env::consts::ARCH.into(),
            runtimes: vec!["tract-onnx".into()],
            backend: "tract-onnx".into(),
            clean_session: false,
        }
    }

    /// `{prefix}-{n:05}`.
    pub fn device_id(&self, n: usize) -> String {
        format!("{}-{n:05}", self.prefix)
    }

    /// The tags device `n` reports.
    pub fn device_tags(&self, n: usize) -> BTreeMap<String, String> {
        let mut t = self.tags.clone();
        if self.cohorts > 0 {
            t.insert(self.cohort_key.clone(), format!("c{:02}", n % self.cohorts));
        }
        t
    }
}

/// `NAME@VERSION`.
pub fn parse_model_ref(s: &str) -> Result<(String, u64), String> {
    let (n, v) = s.split_once('@').ok_or_else(|| format!("{s:?} is not NAME@VERSION"))?;
    let v = v.parse().map_err(|_| format!("{s:?}: the version must be a number"))?;
    if n.is_empty() {
        return Err(format!("{s:?}: empty model name"));
    }
    Ok((n.to_string(), v))
}

/// Live counters, shared by every device task; read them any time.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connection attempts (TCP + TLS + MQTT CONNECT), first ones and reconnects.
    pub connect_attempts: AtomicU64,
    /// Devices connected now.
    pub connected: AtomicU64,
    /// Devices that connected at least once.
    pub ever_connected: AtomicU64,
    /// Devices whose first hello the broker acknowledged (PubAck).
    pub registered: AtomicU64,
    pub offers: AtomicU64,
    /// Offers repeated for an install already done or under way (answered from memory).
    pub repeated_offers: AtomicU64,
    pub installs_succeeded: AtomicU64,
    pub installs_failed: AtomicU64,
    pub rollbacks: AtomicU64,
    /// Commands other than install and rollback (trust roots, certificates, samples), and
    /// rollbacks for a version not active.
    pub other_commands: AtomicU64,
    pub sent_hello: AtomicU64,
    pub sent_state: AtomicU64,
    pub sent_events: AtomicU64,
    pub sent_health: AtomicU64,
    pub sent_drift: AtomicU64,
    pub sent_fetch: AtomicU64,
    pub chunks_received: AtomicU64,
    pub bytes_http: AtomicU64,
    pub bytes_mqtt: AtomicU64,
    /// Connection errors, refused/malformed messages, failed downloads, publishes dropped.
    pub errors: AtomicU64,
    /// Connections lost after they were up.
    pub disconnects: AtomicU64,
    /// Drift reports not sent: no baseline profile known for the model version.
    pub drift_without_profile: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The counters at one moment.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Snapshot {
    pub elapsed_s: f64,
    pub devices: usize,
    /// Device tasks started so far (the launcher paces them at `connect_rate`).
    pub launched: u64,
    pub connect_attempts: u64,
    pub connected: u64,
    pub ever_connected: u64,
    pub registered: u64,
    pub offers: u64,
    pub repeated_offers: u64,
    pub installs_succeeded: u64,
    pub installs_failed: u64,
    pub rollbacks: u64,
    pub other_commands: u64,
    pub sent: BTreeMap<&'static str, u64>,
    pub sent_total: u64,
    pub chunks_received: u64,
    pub bytes_http: u64,
    pub bytes_mqtt: u64,
    pub errors: u64,
    pub disconnects: u64,
    pub drift_without_profile: u64,
    /// Resident memory of this process now, and before the first device.
    pub rss_bytes: u64,
    pub rss_base_bytes: u64,
}

impl Snapshot {
    /// Resident memory per 1000 connected devices, above what the process held before them.
    pub fn rss_per_1000_devices(&self) -> Option<u64> {
        let n = self.ever_connected.max(self.connected);
        (n > 0).then(|| self.rss_bytes.saturating_sub(self.rss_base_bytes) * 1000 / n)
    }
}

/// What a run did, printed at the end (`--json`: as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub last: Snapshot,
    pub registered: u64,
    /// Seconds from start until every device was connected / registered (None: never).
    pub all_connected_after_s: Option<f64>,
    pub all_registered_after_s: Option<f64>,
    /// Seconds until the first install succeeded and until the latest one did.
    pub first_install_after_s: Option<f64>,
    pub last_install_after_s: Option<f64>,
    pub rss_per_1000_devices_bytes: Option<u64>,
    /// The largest RSS seen by the progress sampler.
    pub peak_rss_bytes: u64,
    pub messages_per_s: f64,
    /// Distinct error messages (up to 20) and how often each happened.
    pub error_kinds: BTreeMap<String, u64>,
}

/// Per-bundle facts read from an offer's head, cached by bundle id.
#[derive(Debug)]
pub struct BundleInfo {
    pub manifest_sha256: String,
    pub model_sha256: Option<String>,
    /// The `baseline` artifact and the offset of the bundle's data section.
    pub baseline: Option<(u64, flotilla_bundle::manifest::Artifact)>,
}

impl BundleInfo {
    pub fn from_head(head: &[u8]) -> anyhow::Result<BundleInfo> {
        let (doc, data_offset) = flotilla_bundle::format::parse_envelope(head).context("the offer's bundle head")?;
        let m = flotilla_bundle::verify::decode_manifest(&doc.signed).context("the offer's manifest")?;
        use flotilla_bundle::manifest::Role;
        Ok(BundleInfo {
            manifest_sha256: flotilla_bundle::format::sha256_hex(&doc.signed),
            model_sha256: m.artifact(Role::Model).map(|a| a.sha256.clone()),
            baseline: m.artifact(Role::Baseline).cloned().map(|a| (data_offset, a)),
        })
    }
}

/// What the device tasks share.
pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub host: String,
    pub port: u16,
    pub tls: Option<tls::TlsSetup>,
    pub http: Option<reqwest::Client>,
    pub topics: Topics,
    pub stats: Stats,
    pub started: Instant,
    pub connect_gate: Arc<Semaphore>,
    pub download_gate: Arc<Semaphore>,
    pub profiles: drift::Profiles,
    bundles: Mutex<HashMap<String, Arc<BundleInfo>>>,
    error_kinds: Mutex<BTreeMap<String, u64>>,
    pub launched: AtomicU64,
    rss_base: u64,
    /// Milliseconds after start of milestones (0: not yet).
    all_connected_ms: AtomicU64,
    all_registered_ms: AtomicU64,
    first_install_ms: AtomicU64,
    last_install_ms: AtomicU64,
    peak_rss: AtomicU64,
    /// Bursts of health reports ([`Sim::burst`]): how many each connected device sends.
    pub burst: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    pub fn error(&self, what: &str) {
        add(&self.stats.errors, 1);
        tracing::debug!(error = what, "device error");
        let mut kinds = self.error_kinds.lock().expect("errors lock");
        // Digits vary (ports, ids, offsets): fold them so like errors count together.
        let key: String = what.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).take(160).collect();
        if let Some(n) = kinds.get_mut(&key) {
            *n += 1;
        } else if kinds.len() < 20 {
            kinds.insert(key, 1);
        }
    }

    pub fn bundle_info(&self, bundle_id: &str, head: &[u8]) -> anyhow::Result<Arc<BundleInfo>> {
        if let Some(b) = self.bundles.lock().expect("bundles lock").get(bundle_id) {
            return Ok(b.clone());
        }
        let b = Arc::new(BundleInfo::from_head(head)?);
        self.bundles.lock().expect("bundles lock").insert(bundle_id.to_string(), b.clone());
        Ok(b)
    }

    fn since_start_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    pub fn on_connected_first(&self) {
        let n = self.stats.ever_connected.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.cfg.devices as u64 {
            self.all_connected_ms.store(self.since_start_ms(), Ordering::Relaxed);
        }
    }

    pub fn on_registered(&self) {
        let n = self.stats.registered.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.cfg.devices as u64 {
            self.all_registered_ms.store(self.since_start_ms(), Ordering::Relaxed);
        }
    }

    pub fn on_install_succeeded(&self) {
        add(&self.stats.installs_succeeded, 1);
        let t = self.since_start_ms();
        let _ = self.first_install_ms.compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed);
        self.last_install_ms.fetch_max(t, Ordering::Relaxed);
    }
}

/// A running simulation.
pub struct Sim {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    launcher: tokio::task::JoinHandle<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("devices", &self.shared.cfg.devices).finish_non_exhaustive()
    }
}

/// Host and port of `mqtts://HOST:PORT` / `mqtt://HOST:PORT`, and whether it is TLS.
pub fn parse_broker(url: &str) -> anyhow::Result<(bool, String, u16)> {
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtts" | "ssl" | "tls", r)) => (true, r),
        Some(("mqtt" | "tcp", r)) => (false, r),
        Some((s, _)) => anyhow::bail!("broker {url:?}: unknown scheme {s:?} (mqtts:// or mqtt://)"),
        None => anyhow::bail!("broker {url:?}: expected mqtts://HOST:PORT or mqtt://HOST:PORT"),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().with_context(|| format!("broker {url:?}: bad port"))?)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    anyhow::ensure!(!host.is_empty(), "broker {url:?}: no host");
    Ok((tls, host.to_string(), port))
}

impl Sim {
    /// Start the devices (paced at `connect_rate`); returns at once. Needs a tokio runtime.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<Sim> {
        flotilla_pki::tls::install_default_provider();
        let (use_tls, host, port) = parse_broker(&cfg.broker)?;
        anyhow::ensure!(cfg.devices > 0, "no devices to simulate");
        for n in [cfg.first, cfg.first + cfg.devices - 1] {
            let id = cfg.device_id(n);
            anyhow::ensure!(flotilla_proto::valid_device_id(&id), "{id:?} is not a valid device id (check --prefix)");
        }
        let tls = tls::TlsSetup::load(cfg.fleet_ca.as_deref(), cfg.ca.as_deref(), cfg.cert_days)?;
        anyhow::ensure!(
            !use_tls || tls.is_some(),
            "{} is TLS: give the fleet CA (--fleet-ca DIR) or the broker's CA (--ca FILE)",
            cfg.broker
        );
        let needs_http = cfg.download == Download::Http || cfg.drift_fetch;
        let http = if needs_http { Some(tls::http_client(tls.as_ref())?) } else { None };
        let profiles = drift::Profiles::default();
        if let Some(p) = &cfg.drift_profile {
            let (name, version) =
                cfg.model.clone().context("--drift-profile is the initial model's profile: give --model too")?;
            profiles.insert(&name, version, drift::load_profile(p)?);
        }
        let shared = Arc::new(Shared {
            topics: Topics::new(&cfg.topic_prefix),
            host,
            port,
            tls: if use_tls { tls } else { None },
            http,
            stats: Stats::default(),
            started: Instant::now(),
            connect_gate: Arc::new(Semaphore::new(cfg.connect_concurrency.max(1))),
            download_gate: Arc::new(Semaphore::new(cfg.download_concurrency.max(1))),
            profiles,
            bundles: Default::default(),
            error_kinds: Default::default(),
            launched: AtomicU64::new(0),
            rss_base: sys::rss_bytes().unwrap_or(0),
            all_connected_ms: AtomicU64::new(0),
            all_registered_ms: AtomicU64::new(0),
            first_install_ms: AtomicU64::new(0),
            last_install_ms: AtomicU64::new(0),
            peak_rss: AtomicU64::new(0),
            burst: tokio::sync::watch::Sender::new(0),
            cfg,
        });
        let cancel = CancellationToken::new();
        let launcher = tokio::spawn(launch(shared.clone(), cancel.clone()));
        Ok(Sim { shared, cancel, launcher })
    }

    /// Every connected device sends `per_device` health reports at once (up to 32 each: the
    /// client's request queue holds 64), to measure how fast the control plane takes them in.
    pub fn burst(&self, per_device: u64) {
        self.shared.burst.send_replace(per_device.min(32));
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.cfg
    }

    pub fn all_registered(&self) -> bool {
        get(&self.shared.stats.registered) >= self.shared.cfg.devices as u64
    }

    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.shared)
    }

    /// One line for a progress display: totals and rates since `prev` (taken `dt` earlier).
    pub fn progress_line(&self, prev: &Snapshot) -> (String, Snapshot) {
        let now = self.snapshot();
        let dt = (now.elapsed_s - prev.elapsed_s).max(1e-3);
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt;
        let per_k = now.rss_per_1000_devices().map(|b| format!(" ({:.1} MiB/1000 dev)", mib(b))).unwrap_or_default();
        let line = format!(
            "[{:>6.1}s] connected {}/{} (+{:.0}/s) registered {} offers {} installed {} failed {} | msgs {} ({:.0}/s) | dl {:.1} MiB | errors {} disconnects {} | rss {:.1} MiB{}",
            now.elapsed_s,
            now.connected,
            now.devices,
            rate(now.ever_connected, prev.ever_connected),
            now.registered,
            now.offers,
            now.installs_succeeded,
            now.installs_failed,
            now.sent_total,
            rate(now.sent_total, prev.sent_total),
            mib(now.bytes_http + now.bytes_mqtt),
            now.errors,
            now.disconnects,
            mib(now.rss_bytes),
            per_k,
        );
        (line, now)
    }

    /// Disconnect every device cleanly (each first publishes its retained state offline, as an
    /// agent that stops does) and return the summary.
    pub async fn stop(self) -> Summary {
        self.cancel.cancel();
        let tasks = self.launcher.await.unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
        summary(&self.shared)
    }

    /// The summary so far (without stopping).
    pub fn summary(&self) -> Summary {
        summary(&self.shared)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn snapshot(sh: &Shared) -> Snapshot {
    let s = &sh.stats;
    let sent = BTreeMap::from([
        ("hello", get(&s.sent_hello)),
        ("state", get(&s.sent_state)),
        ("events", get(&s.sent_events)),
        ("health", get(&s.sent_health)),
        ("drift", get(&s.sent_drift)),
        ("fetch", get(&s.sent_fetch)),
    ]);
    let rss = sys::rss_bytes().unwrap_or(0);
    sh.peak_rss.fetch_max(rss, Ordering::Relaxed);
    Snapshot {
        elapsed_s: sh.started.elapsed().as_secs_f64(),
        devices: sh.cfg.devices,
        launched: get(&sh.launched),
        connect_attempts: get(&s.connect_attempts),
        connected: get(&s.connected),
        ever_connected: get(&s.ever_connected),
        registered: get(&s.registered),
        offers: get(&s.offers),
        repeated_offers: get(&s.repeated_offers),
        installs_succeeded: get(&s.installs_succeeded),
        installs_failed: get(&s.installs_failed),
        rollbacks: get(&s.rollbacks),
        other_commands: get(&s.other_commands),
        sent_total: sent.values().sum(),
        sent,
        chunks_received: get(&s.chunks_received),
        bytes_http: get(&s.bytes_http),
        bytes_mqtt: get(&s.bytes_mqtt),
        errors: get(&s.errors),
        disconnects: get(&s.disconnects),
        drift_without_profile: get(&s.drift_without_profile),
        rss_bytes: rss,
        rss_base_bytes: sh.rss_base,
    }
}

fn summary(sh: &Shared) -> Summary {
    let last = snapshot(sh);
    let at = |c: &AtomicU64| match c.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(ms as f64 / 1000.0),
    };
    Summary {
        registered: last.registered,
        all_connected_after_s: at(&sh.all_connected_ms),
        all_registered_after_s: at(&sh.all_registered_ms),
        first_install_after_s: at(&sh.first_install_ms),
        last_install_after_s: at(&sh.last_install_ms),
        rss_per_1000_devices_bytes: last.rss_per_1000_devices(),
        peak_rss_bytes: sh.peak_rss.load(Ordering::Relaxed),
        messages_per_s: last.sent_total as f64 / last.elapsed_s.max(1e-3),
        error_kinds: sh.error_kinds.lock().expect("errors lock").clone(),
        last,
    }
}

/// Start device tasks at `connect_rate` per second.
async fn launch(sh: Arc<Shared>, cancel: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(sh.cfg.devices);
    let rate = if sh.cfg.connect_rate > 0.0 { sh.cfg.connect_rate } else { f64::INFINITY };
    let start = tokio::time::Instant::now();
    for i in 0..sh.cfg.devices {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        let n = sh.cfg.first + i;
        tasks.push(tokio::spawn(device::run(sh.clone(), n, cancel.clone())));
        add(&sh.launched, 1);
    }
    tasks
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A message id as the agent makes them: 16 random hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// A small, fast PRNG (splitmix64): jitter and synthetic values; not for secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn seeded() -> Rng {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Rng(u64::from_le_bytes(b))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A duration uniform in [0, d).
    pub fn below(&mut self, d: Duration) -> Duration {
        d.mul_f64(self.f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(parse_broker("mqtts://127.0.0.1:8883").unwrap(), (true, "127.0.0.1".into(), 8883));
        assert_eq!(parse_broker("mqtt://fleet.example").unwrap(), (false, "fleet.example".into(), 1883));
        assert_eq!(parse_broker("mqtts://[::1]:9").unwrap(), (true, "::1".into(), 9));
        assert!(parse_broker("http://x:1").is_err());
        assert!(parse_broker("x:1").is_err());
    }

    #[test]
    fn ids_tags_and_refs() {
        let mut c = SimConfig::new("mqtt://h:1", 10);
        c.cohorts = 3;
        assert_eq!(c.device_id(7), "sim-00007");
        let t = c.device_tags(7);
        assert_eq!(t["group"], "sim");
        assert_eq!(t["cohort"], "c01");
        assert_eq!(parse_model_ref("digits@3").unwrap(), ("digits".into(), 3));
        assert!(parse_model_ref("digits").is_err());
        assert!(parse_model_ref("@3").is_err());
    }

    #[test]
    fn rng_is_uniformish() {
        let mut r = Rng::new(1);
        let mean = (0..10_000).map(|_| r.f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
