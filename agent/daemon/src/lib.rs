//! The Flotilla device agent as a library: the binary in `main.rs`, the demo and the end-to-end
//! tests all start agents through [`Agent::start`].
//!
//! Tasks: the MQTT session loop ([`session`]), install pipelines ([`installer`], one at a time),
//! and the local inference API ([`api`]). They share one [`Ctx`].

pub mod api;
pub mod blobs;
pub mod config;
pub mod drift;
pub mod fetch;
pub mod installer;
pub mod metrics;
pub mod models;
pub mod outbox;
pub mod renewal;
pub mod session;
pub mod state;
pub mod tls;
pub mod watchdog;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use flotilla_bundle::TrustedRoot;
use flotilla_bundle::format::parse_envelope;
use flotilla_bundle::golden::GoldenSet;
use flotilla_proto::{Channel, Chunk, Event, Hello, ModelState, Msg, Topics};
use flotilla_runtime::Runtimes;
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, BrokerUrl, Clock, FileConfig, Identity};

use crate::blobs::{BlobStore, write_atomic};
use crate::models::{ActiveModel, Registry, load_and_test};
use crate::state::State;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by the agent's tasks.
pub struct Ctx {
    pub cfg: AgentConfig,
    pub topics: Topics,
    state: Mutex<State>,
    pub blobs: BlobStore,
    pub trust: RwLock<TrustedRoot>,
    pub registry: Registry,
    pub runtimes: Runtimes,
    /// TFLite delegates bundles may ask for on this device.
    pub delegates: Vec<String>,
    mqtt: AsyncClient,
    /// Bundle id → the install waiting for its chunks (each with its message, to acknowledge).
    pub chunk_routes: Mutex<HashMap<String, mpsc::Sender<(Chunk, rumqttc::Publish)>>>,
    /// Offer ids being handled now.
    pub busy: Mutex<HashSet<String>>,
    pub install_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the agent stops (or is killed): ends installs at their next await.
    pub cancel: CancellationToken,
    /// Chunks that arrived with no install fetching them, newest last (bounded).
    loose_chunks: Mutex<std::collections::VecDeque<Chunk>>,
    /// Bundle bytes received, per transport (including any received twice).
    pub received_http: std::sync::atomic::AtomicU64,
    pub received_mqtt: std::sync::atomic::AtomicU64,
    /// Set between ConnAck and a connection error.
    pub connected: std::sync::atomic::AtomicBool,
    /// One tag per publish handed to rumqttc, in order: the outbox row it carries, if any.
    tags: Mutex<std::collections::VecDeque<Option<i64>>>,
    /// Held while a tag is recorded and its publish enters rumqttc's queue, so both orders agree.
    publish_gate: tokio::sync::Mutex<()>,
    /// Outbox rows sent and not yet acknowledged.
    outbox_inflight: Mutex<HashSet<i64>>,
    outbox_wake: tokio::sync::Notify,
    pub metrics: metrics::Metrics,
    /// The fleet CA this device pins and its certificate.
    pub tls: tls::DeviceTls,
    /// The key of a certificate renewal asked for and not answered yet.
    pub renewal_key: Mutex<Option<String>>,
    /// Wakes the session to reconnect with a renewed certificate.
    pub reconnect: tokio::sync::Notify,
}

/// Chunks kept for an install that has not resumed yet.
const MAX_LOOSE_CHUNKS: usize = 8;

impl Ctx {
    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> anyhow::Result<T>) -> anyhow::Result<T> {
        f(&mut self.state.lock().expect("state lock"))
    }

    /// Publish now (QoS 1), not through the outbox: for state, hello and fetch requests, which
    /// are current or nothing.
    pub async fn publish<T: Serialize>(&self, ch: Channel, body: T, retain: bool) {
        let payload = flotilla_proto::encode(&Msg::new(new_id(), unix_now_ms(), body));
        self.publish_raw(ch, payload, retain, None).await
    }

    /// Every publish goes through here (see `outbox.rs` for why the tag).
    pub async fn publish_raw(&self, ch: Channel, payload: Vec<u8>, retain: bool, outbox_seq: Option<i64>) {
        let topic = self.topics.device(&self.cfg.device_id, ch);
        let _gate = self.publish_gate.lock().await;
        self.tags.lock().expect("tags lock").push_back(outbox_seq);
        if let Err(e) = self.mqtt.publish(topic, QoS::AtLeastOnce, retain, payload).await {
            self.tags.lock().expect("tags lock").pop_back();
            tracing::warn!(error = %e, channel = ch.as_str(), "publish failed");
        }
    }

    /// The trusted clock: never behind the system clock or any signed time seen.
    pub fn trusted_now(&self) -> anyhow::Result<u64> {
        let system = self.cfg.clock.now();
        let now = self.with_state(|s| s.trusted_now(system))?;
        self.tls.advance_clock(now);
        Ok(now)
    }

    pub fn mqtt(&self) -> &AsyncClient {
        &self.mqtt
    }

    pub fn stash_chunk(&self, chunk: Chunk) {
        let mut loose = self.loose_chunks.lock().expect("loose lock");
        if loose.len() == MAX_LOOSE_CHUNKS {
            loose.pop_front();
        }
        loose.push_back(chunk);
    }

    /// Take the stashed chunks of one bundle.
    pub fn take_stashed_chunks(&self, bundle_id: &str) -> Vec<Chunk> {
        let mut loose = self.loose_chunks.lock().expect("loose lock");
        let mut mine = Vec::new();
        for c in std::mem::take(&mut *loose) {
            if c.bundle_id == bundle_id { mine.push(c) } else { loose.push_back(c) }
        }
        mine
    }

    /// Queue an event in the outbox; it reaches the control plane when the broker can take it.
    pub async fn publish_event(&self, ev: Event) {
        outbox::push_event(self, ev)
    }

    pub fn model_states(&self) -> Vec<ModelState> {
        self.registry
            .all()
            .iter()
            .map(|m| ModelState {
                name: m.name.clone(),
                version: m.version,
                manifest_sha256: m.manifest_sha256.clone(),
                backend: m.backend().to_string(),
                model_sha256: m.manifest.artifact(flotilla_bundle::manifest::Role::Model).map(|a| a.sha256.clone()),
                delegated_nodes: m.model.delegation().map(|d| d.delegated_nodes as u64),
                cpu_nodes: m.model.delegation().map(|d| d.cpu_nodes as u64),
                self_test: m.self_test.as_ref().map(|t| t.kind.as_str().to_string()),
                self_test_median_us: m.self_test.as_ref().map(|t| t.median_us),
                status: if self.with_state(|s| s.is_baked(&m.name)).unwrap_or(false) { "active" } else { "baking" }
                    .into(),
            })
            .collect()
    }

    pub async fn publish_state(&self) {
        let state = flotilla_proto::State { online: true, models: Some(self.model_states()) };
        self.publish(Channel::State, state, true).await
    }

    pub fn hello(&self) -> Hello {
        Hello {
            agent_version: AGENT_VERSION.into(),
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: total_memory(),
            runtimes: self.runtimes.names().into_iter().map(String::from).collect(),
            tags: self.cfg.tags.clone(),
            root_version: Some(self.trust.read().expect("trust lock").root().version),
            delegates: self.delegates.clone(),
        }
    }
}

/// A running agent.
pub struct Agent {
    ctx: Arc<Ctx>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    api_addr: SocketAddr,
}

impl Agent {
    /// Open state, recover the active models, connect, and serve the local API.
    pub async fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let state = State::open(&cfg.data_dir.join("state.db"))?;
        let blobs = BlobStore::open(&cfg.data_dir)?;
        let trust = load_trust(&cfg, &state)?;
        let device_tls = tls::DeviceTls::load(&cfg, state.trusted_now(cfg.clock.now())?)?;
        if !cfg.broker.tls {
            tracing::warn!(broker = %cfg.broker, "the broker is plain mqtt://: commands and telemetry cross the network readable and forgeable by anyone on it (use mqtts://)");
        } else if device_tls.identity().is_none() && cfg.claim.is_none() {
            anyhow::bail!(
                "this device has no certificate: flash one (cert/key, written by `flotilla-image personalise`) or give a claim token (claim_token and claim_url) to get one on first start"
            );
        }
        let topics = Topics::new(&cfg.topic_prefix);
        let (mqtt, eventloop) = session::client(&cfg, &topics);
        let (runtimes, delegates) = load_runtimes(&cfg);
        let ctx = Arc::new(Ctx {
            topics,
            state: Mutex::new(state),
            blobs,
            trust: RwLock::new(trust),
            registry: Registry::default(),
            runtimes,
            delegates,
            mqtt,
            chunk_routes: Mutex::new(HashMap::new()),
            loose_chunks: Mutex::new(Default::default()),
            received_http: Default::default(),
            received_mqtt: Default::default(),
            connected: Default::default(),
            tags: Default::default(),
            publish_gate: Default::default(),
            outbox_inflight: Default::default(),
            outbox_wake: Default::default(),
            metrics: Default::default(),
            busy: Mutex::new(HashSet::new()),
            install_lock: tokio::sync::Mutex::new(()),
            cancel: CancellationToken::new(),
            tls: device_tls,
            renewal_key: Mutex::new(None),
            reconnect: Default::default(),
            cfg,
        });
        let c = ctx.clone();
        tokio::task::spawn_blocking(move || recover(&c)).await??;

        let cancel = ctx.cancel.clone();
        let listener = tokio::net::TcpListener::bind(ctx.cfg.api)
            .await
            .with_context(|| format!("binding the local API on {}", ctx.cfg.api))?;
        let api_addr = listener.local_addr()?;
        // The same API on a Unix socket, when configured (a stale socket file is replaced).
        let socket = match &ctx.cfg.api_socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("binding the local API on {}", path.display()))?;
                Some(l)
            }
            None => None,
        };
        let endpoints = serde_json::json!({ "api": api_addr.to_string(), "socket": ctx.cfg.api_socket });
        write_atomic(&ctx.cfg.data_dir.join("endpoints.json"), endpoints.to_string().as_bytes())?;
        tracing::info!(device = %ctx.cfg.device_id, api = %api_addr, broker = %ctx.cfg.broker, "agent started");

        let mut tasks = Vec::new();
        let (c, stop) = (ctx.clone(), cancel.clone());
        tasks.push(tokio::spawn(async move {
            let app = api::router(c);
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        }));
        if let Some(socket) = socket {
            let (c, stop) = (ctx.clone(), cancel.clone());
            tasks.push(tokio::spawn(async move {
                let app = api::router(c);
                let _ = axum::serve(socket, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            }));
        }
        tasks.push(tokio::spawn(session::run(ctx.clone(), eventloop, cancel.clone())));
        tasks.push(tokio::spawn(outbox::drain(ctx.clone(), cancel.clone())));
        tasks.push(tokio::spawn(watchdog::run(ctx.clone(), cancel.clone())));
        tasks.push(tokio::spawn(drift::run(ctx.clone(), cancel.clone())));
        tasks.push(tokio::spawn(renewal::run(ctx.clone(), cancel.clone())));
        Ok(Agent { ctx, cancel, tasks, api_addr })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// Say goodbye (retained offline state), disconnect, and stop every task.
    pub async fn shutdown(self) {
        // Open drift windows go to the outbox: sent on the next start if not before.
        drift::flush_all(&self.ctx);
        let offline = flotilla_proto::State { online: false, models: Some(self.ctx.model_states()) };
        self.ctx.publish(Channel::State, offline, true).await;
        let _ = self.ctx.mqtt.disconnect().await;
        // Give the session loop a moment to flush the goodbye.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Stop without a goodbye, as a crash or power loss would (the broker sends the last will).
    pub async fn kill(self) {
        self.cancel.cancel();
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The backends this device has: tract always, and the TensorFlow Lite library when one is
/// configured (with XNNPACK if it has it, and the configured external delegates). A library or
/// delegate that does not load is a loud warning, not a dead agent: tract still runs.
fn load_runtimes(cfg: &AgentConfig) -> (Runtimes, Vec<String>) {
    use flotilla_runtime::tflite::{ExternalDelegate, LibraryError, TfliteBackend, TfliteLib};
    let lib = TfliteLib::locate(cfg.tflite_lib.as_deref()).and_then(|p| TfliteLib::load(&p));
    match lib {
        Ok(lib) => {
            let mut backend = TfliteBackend::new(lib);
            for (name, d) in &cfg.delegates {
                let options: Vec<(String, String)> = d.options.clone().into_iter().collect();
                match ExternalDelegate::load(name, &d.path, &options) {
                    Ok(x) => backend = backend.with_external_delegate(x),
                    Err(e) => tracing::warn!(delegate = %name, error = %e, "external delegate unavailable"),
                }
            }
            let delegates: Vec<String> = backend.delegates().into_iter().map(String::from).collect();
            tracing::info!(version = backend.library().version(), ?delegates, "TensorFlow Lite runtime loaded");
            (Runtimes::default().prefer(Box::new(backend)), delegates)
        }
        Err(LibraryError::NotConfigured) => (Runtimes::default(), Vec::new()),
        Err(e) => {
            tracing::warn!(error = %e, "TensorFlow Lite unavailable; running the tract backends only");
            (Runtimes::default(), Vec::new())
        }
    }
}

/// Accept newer trust roots (a rotation chain), persist the newest, and report the outcome.
pub async fn accept_roots(ctx: &Ctx, roots: Vec<Vec<u8>>) {
    let result = (|| -> anyhow::Result<Option<u64>> {
        let now = ctx.trusted_now()?;
        let current = ctx.trust.read().expect("trust lock").clone();
        let next = current.rotate_chain(&roots, now)?;
        if next.root().version == current.root().version {
            return Ok(None);
        }
        write_atomic(&ctx.cfg.data_dir.join("trust-root.cbor"), &next.to_bytes())?;
        let version = next.root().version;
        *ctx.trust.write().expect("trust lock") = next;
        Ok(Some(version))
    })();
    match result {
        Ok(Some(version)) => {
            tracing::info!(version, "trust root rotated");
            ctx.publish_event(Event::TrustRootAccepted { version }).await;
        }
        Ok(None) => {}
        Err(e) => {
            let offered = roots
                .iter()
                .filter_map(|b| flotilla_bundle::root::decode_untrusted(b).ok())
                .map(|(r, _)| r.version)
                .max()
                .unwrap_or(0);
            tracing::warn!(error = %format!("{e:#}"), offered, "trust root refused");
            ctx.publish_event(Event::TrustRootRefused { version: offered, reason: format!("{e:#}") }).await;
        }
    }
}

/// The trust root: the newest one this device persisted, else the one it was given.
fn load_trust(cfg: &AgentConfig, state: &State) -> anyhow::Result<TrustedRoot> {
    let now = state.trusted_now(cfg.clock.now())?;
    let persisted = cfg.data_dir.join("trust-root.cbor");
    let path = if persisted.exists() { persisted.clone() } else { cfg.trust_root.clone() };
    let bytes = std::fs::read(&path).with_context(|| format!("reading trust root {}", path.display()))?;
    let root =
        TrustedRoot::anchor(&bytes, now).with_context(|| format!("trust root {} is not valid", path.display()))?;
    if !persisted.exists() {
        write_atomic(&persisted, &root.to_bytes())?;
    }
    Ok(root)
}

/// Bring back every installed model through the same verify/load/self-test path as an install.
/// A model that no longer passes falls back to its previous version.
fn recover(ctx: &Ctx) -> anyhow::Result<()> {
    let installed = ctx.with_state(|s| s.installed())?;
    for inst in installed {
        let previous = ctx.with_state(|s| s.previous(&inst.name))?;
        let mut last_err = None;
        for candidate in std::iter::once(inst.clone()).chain(previous) {
            match restore(ctx, &candidate) {
                Ok(m) => {
                    if candidate.version != inst.version {
                        // Make it durable, and say so: the control plane must not believe the
                        // broken version is running.
                        let reason = last_err.as_ref().map(|e| format!("{e:#}")).unwrap_or_default();
                        tracing::warn!(name = %inst.name, version = candidate.version, %reason, "rolled back to the previous version");
                        ctx.with_state(|s| s.roll_back(&inst.name, unix_now()))?;
                        outbox::push_event(
                            ctx,
                            Event::ModelRolledBack {
                                name: inst.name.clone(),
                                from_version: inst.version,
                                to_version: candidate.version,
                                reason,
                            },
                        );
                    }
                    ctx.registry.insert(m);
                    last_err = None;
                    break;
                }
                Err(e) => {
                    tracing::error!(name = %candidate.name, version = candidate.version, error = %format!("{e:#}"), "cannot restore model");
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            tracing::error!(name = %inst.name, error = %format!("{e:#}"), "no version of this model could be restored");
        }
    }
    Ok(())
}

pub(crate) fn restore(ctx: &Ctx, inst: &state::Installed) -> anyhow::Result<ActiveModel> {
    let (doc, _) = parse_envelope(&inst.head)?;
    // Signatures are checked again; expiry is not: it guards installing, not running.
    let verified = ctx.trust.read().expect("trust lock").verify_manifest(&doc, 0)?;
    let bytes = ctx.blobs.read(&inst.model_blob)?;
    let golden =
        inst.golden_blob.as_ref().map(|g| ctx.blobs.read(g).and_then(|b| Ok(GoldenSet::decode(&b)?))).transpose()?;
    let m = &verified.manifest;
    let (model, report) = match load_and_test(&ctx.runtimes, m, &bytes, golden.as_ref()) {
        Ok((model, report)) => (model, Some(report)),
        // Agents before the smoke self-test installed bundles without golden inputs untested: a
        // model that fails its smoke test now but loads served until the upgrade and keeps
        // serving (what an install accepts is decided at the install, not at every start).
        Err(e) if golden.is_none() => {
            let model = ctx.runtimes.load(&bytes, &m.model, &m.runtime)?;
            tracing::warn!(name = %inst.name, version = inst.version, error = %e, "the smoke self-test fails at start; the model loads and served before, so it serves");
            (model, None)
        }
        Err(e) => anyhow::bail!(e),
    };
    let drift = load_drift(ctx, &inst.name, inst.version, m);
    let active = ActiveModel::new(inst.name.clone(), inst.version, verified.manifest, verified.manifest_sha256, model);
    Ok(match report {
        Some(r) => active.with_self_test(r),
        None => active,
    }
    .with_drift(drift))
}

/// The drift profile of a bundle, when it has one. A profile this agent cannot use costs the
/// drift reports of that model, never the model itself.
pub(crate) fn load_drift(
    ctx: &Ctx,
    name: &str,
    version: u64,
    manifest: &flotilla_bundle::manifest::Manifest,
) -> Option<drift::ModelDrift> {
    let a = manifest.artifact(flotilla_bundle::manifest::Role::Baseline)?;
    let loaded = ctx
        .blobs
        .read(&a.sha256)
        .and_then(|bytes| drift::ModelDrift::from_profile_json(name, version, &bytes, unix_now_ms()));
    match loaded {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(name, version, error = %format!("{e:#}"), "drift baseline unusable: no drift reports for this model");
            None
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
