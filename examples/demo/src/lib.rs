//! An in-process fleet: a control plane with its embedded broker and SQLite store, real agents
//! with their own data directories, keys and a trust root, all on 127.0.0.1 ephemeral ports.
//! The demo binary and the end-to-end tests both drive Flotilla through this harness.

pub mod digits;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::{Agent, AgentConfig, BrokerUrl};
use flotilla_api::v1::{Bundle, Device, Rollout, RolloutCreate, RolloutCreated, Token, TokenCreate};
use flotilla_api::v2::{InferRequest, InferResponse, ModelMetadata};
use flotilla_builder::BuildOptions;
use flotilla_bundle::SecretKey;
use flotilla_bundle::root::{Root, sign_root};
use flotilla_runtime::Tensor;
use flotilla_server::{Server, ServerConfig};

/// How to start a [`Fleet`].
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Use this broker (`mqtt://HOST:PORT`) instead of the embedded one.
    pub external_broker: Option<String>,
    /// Give the server the fleet's trust root, so it refuses pushes that would not verify.
    /// Off, only the devices judge bundles (to test that they do).
    pub server_checks_signatures: bool,
    /// Base URL put in offers for HTTP downloads (None: the server's own HTTP address).
    pub public_url: Option<String>,
    /// Chunk size the server asks for in offers (None: the default, 256 KiB).
    pub chunk_size: Option<u32>,
    /// Signatures the trust root's `targets` role needs, of the operator's key and the server's
    /// automation key (retraining). 1: either alone; 2: a retrained bundle also needs a person.
    pub targets_threshold: u32,
    /// The embedded broker admits only devices enrolled with a password (plain TCP only).
    pub require_device_password: bool,
    /// No TLS anywhere (`--insecure-plaintext`): device passwords and open enrollment.
    pub insecure_plaintext: bool,
    /// An operator's own server certificate, client CAs, names (`--tls-cert`, `--client-ca`, …).
    pub tls: flotilla_server::pki::TlsOptions,
    /// The store (`--store postgres://…`; None: SQLite in the data directory).
    pub store: Option<String>,
    /// The in-process server's replica id (`--replica-id`).
    pub replica_id: Option<String>,
    /// Whether the in-process server drives rollouts and jobs (`--no-workers` when false).
    pub workers: bool,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            external_broker: None,
            server_checks_signatures: true,
            public_url: None,
            chunk_size: None,
            targets_threshold: 1,
            require_device_password: false,
            insecure_plaintext: false,
            tls: Default::default(),
            store: None,
            replica_id: None,
            workers: true,
        }
    }
}

pub struct Fleet {
    pub dir: PathBuf,
    pub server: Server,
    /// How the server was started (ports filled in), for [`Fleet::restart_server`].
    pub server_cfg: ServerConfig,
    pub agents: Vec<(String, Agent)>,
    pub key: SecretKey,
    /// The key the server signs retrained bundles with (`--retrain-key`), a `targets` signer.
    pub automation_key: SecretKey,
    pub root_path: PathBuf,
    /// The server's admin token (`DATA_DIR/admin.token`); `http` sends it on every request.
    pub token: String,
    pub http: reqwest::Client,
}

/// With `FLOTILLA_TEST_LOG=debug` (an env filter), tests and the demo log what the fleet does.
fn init_test_logging() {
    if let Ok(filter) = std::env::var("FLOTILLA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Fleet {
    /// Start a server and `devices` agents named `dev-0`, `dev-1`, ... under `dir`.
    pub async fn start(dir: &Path, devices: usize) -> anyhow::Result<Fleet> {
        Fleet::start_with(dir, devices, FleetOptions::default()).await
    }

    /// As [`Fleet::start`], with the server and agents on an external broker (`mqtt://HOST:PORT`)
    /// instead of the embedded one.
    pub async fn start_with_broker(dir: &Path, devices: usize, broker: Option<String>) -> anyhow::Result<Fleet> {
        Fleet::start_with(dir, devices, FleetOptions { external_broker: broker, ..FleetOptions::default() }).await
    }

    pub async fn start_with(dir: &Path, devices: usize, opts: FleetOptions) -> anyhow::Result<Fleet> {
        init_test_logging();
        let key = SecretKey::generate()?;
        let automation_key = SecretKey::generate()?;
        let root_path = dir.join("root.cbor");
        std::fs::create_dir_all(dir)?;
        let (automation_path, _) = automation_key.save(&dir.join("automation"))?;
        // The operator's key holds every role; the automation key is a second `targets` signer.
        let mut root = Root::single_key(&key.public(), unix_now(), None);
        root.keys.insert(automation_key.key_id(), automation_key.public());
        let targets = root.roles.get_mut(flotilla_bundle::root::ROLE_TARGETS).expect("a targets role");
        targets.keyids.push(automation_key.key_id());
        targets.threshold = opts.targets_threshold.clamp(1, 2);
        std::fs::write(&root_path, sign_root(&root, &[&key])?)?;
        let mut cfg = ServerConfig::new(dir.join("server"));
        cfg.http = "127.0.0.1:0".parse()?;
        cfg.mqtt = "127.0.0.1:0".parse()?;
        cfg.external_broker = opts.external_broker;
        cfg.trust_root = opts.server_checks_signatures.then(|| root_path.clone());
        cfg.public_url = opts.public_url;
        cfg.retrain_key = Some(automation_path);
        cfg.require_device_password = opts.require_device_password;
        cfg.insecure_plaintext = opts.insecure_plaintext;
        cfg.tls = opts.tls;
        cfg.store = opts.store;
        cfg.replica_id = opts.replica_id;
        cfg.workers = opts.workers;
        if let Some(c) = opts.chunk_size {
            cfg.chunk_size = c;
        }
        let server = Server::start(cfg.clone()).await?;
        let token = server.admin_token().context("the server wrote no admin token")?;
        let http = authorized_client(&token, server.ca_path().as_deref())?;
        cfg.http = server.http_addr;
        if cfg.external_broker.is_none() {
            cfg.mqtt = server.mqtt_addr;
        }
        let mut fleet = Fleet {
            dir: dir.into(),
            server,
            server_cfg: cfg,
            agents: vec![],
            key,
            automation_key,
            root_path,
            http,
            token,
        };
        for i in 0..devices {
            fleet.start_agent(&format!("dev-{i}")).await?;
        }
        fleet.wait_devices_online(devices).await?;
        Ok(fleet)
    }

    /// An agent's configuration as it would be flashed: the broker, the fleet CA and a device
    /// certificate the fleet CA issued (made once per device, kept in its directory).
    pub async fn agent_config(&self, id: &str) -> AgentConfig {
        let mut cfg = self.agent_config_without_certificate(id);
        if cfg.broker.tls {
            let (cert, key) = self.flashed_certificate(id).await.expect("issuing a device certificate");
            cfg.cert = Some(cert);
            cfg.key = Some(key);
        }
        cfg
    }

    /// As [`Fleet::agent_config`] with no certificate (to claim one, say).
    pub fn agent_config_without_certificate(&self, id: &str) -> AgentConfig {
        // TLS unless the fleet runs without (--insecure-plaintext) or on a plain mqtt:// broker.
        let plain_broker = self.server_cfg.external_broker.as_deref().is_some_and(|u| u.starts_with("mqtt://"));
        let tls = self.server.ca_path().is_some() && !plain_broker;
        let port = self.server.mqtt_addr.port();
        let broker = if tls { BrokerUrl::tls("127.0.0.1", port) } else { BrokerUrl::plain("127.0.0.1", port) };
        let mut cfg = AgentConfig::new(self.dir.join("agents").join(id), id, broker, self.root_path.clone());
        cfg.api = "127.0.0.1:0".parse().expect("address");
        cfg.health_interval_secs = 1;
        cfg.ca = self.server.ca_path();
        cfg
    }

    /// `agents/ID/flashed/device.{pem,key}`: a certificate the fleet CA issued for `id`, as
    /// `flotilla-image personalise` writes into an image (issued on first use).
    pub async fn flashed_certificate(&self, id: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = self.dir.join("flashed").join(id);
        let (cert, key) = (dir.join("device.pem"), dir.join("device.key"));
        if !cert.exists() {
            std::fs::create_dir_all(&dir)?;
            let ident = self.server.issue_device_cert(id).await?;
            std::fs::write(&key, &ident.key_pem)?;
            std::fs::write(&cert, &ident.cert_pem)?;
        }
        Ok((cert, key))
    }

    /// Stop the control plane (and its embedded broker) and start it again on the same store
    /// and ports, as an operator's restart would. Agents reconnect by themselves.
    pub async fn restart_server(&mut self) -> anyhow::Result<()> {
        self.server.stop().await;
        // The ports were just released; binding them again may take a while: agents retrying
        // their connection to the stopped broker's port can briefly hold it themselves (on
        // loopback, a connect to a port nobody listens on may pick that same port as its source
        // and connect to itself until the client gives up).
        let mut last = None;
        for _ in 0..300 {
            match Server::start(self.server_cfg.clone()).await {
                Ok(s) => {
                    self.server = s;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.expect("tried").context("restarting the control plane"))
    }

    /// Another replica of this fleet's server, as its own `flotilla-server` process (`bin`) on the
    /// same data directory, store and broker: it can be killed as a crash would. Returns the
    /// child and the replica's API URL (from `DATA_DIR/endpoints-ID.json`).
    pub async fn spawn_replica(&self, bin: &Path, id: &str) -> anyhow::Result<(std::process::Child, String)> {
        let c = &self.server_cfg;
        let store = c.store.as_deref().context("replicas share a store: start the fleet with FleetOptions.store")?;
        let broker = c.external_broker.as_deref().context("replicas share an external broker")?;
        let endpoints = c.data_dir.join(format!("endpoints-{id}.json"));
        let _ = std::fs::remove_file(&endpoints);
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--data-dir").arg(&c.data_dir);
        cmd.args(["--store", store, "--broker", broker, "--replica-id", id]);
        cmd.args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]);
        if let Some(r) = &c.trust_root {
            cmd.arg("--trust-root").arg(r);
        }
        if let Some(k) = &c.retrain_key {
            cmd.arg("--retrain-key").arg(k);
        }
        let log = std::fs::File::create(self.dir.join(format!("replica-{id}.log")))?;
        cmd.stdout(log.try_clone()?).stderr(log).env("RUST_LOG", "info");
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !endpoints.exists() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "replica {id} wrote no endpoints within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&endpoints)?)?;
        let http = e["http"].as_str().context("endpoints without http")?;
        Ok((child, format!("{}://{http}", e["scheme"].as_str().unwrap_or("https"))))
    }

    pub async fn start_agent(&mut self, id: &str) -> anyhow::Result<()> {
        self.start_agent_with(self.agent_config(id).await).await
    }

    /// Start an agent with a config of the caller's (e.g. [`Fleet::agent_config`] with the
    /// broker behind a proxy).
    pub async fn start_agent_with(&mut self, cfg: AgentConfig) -> anyhow::Result<()> {
        let id = cfg.device_id.clone();
        let agent = Agent::start(cfg).await.with_context(|| format!("starting agent {id}"))?;
        self.agents.push((id.to_string(), agent));
        Ok(())
    }

    /// Kill an agent as a crash would (no goodbye, nothing flushed); its data stays on disk.
    pub async fn kill_agent(&mut self, id: &str) {
        let i = self.agents.iter().position(|(a, _)| a == id).expect("agent id");
        self.agents.remove(i).1.kill().await;
    }

    pub fn agent(&self, id: &str) -> &Agent {
        &self.agents.iter().find(|(i, _)| i == id).expect("agent id").1
    }

    /// `https://127.0.0.1:PORT` of the control plane's API (http:// without TLS).
    pub fn api(&self) -> String {
        self.server.api_url()
    }

    /// Build and sign a bundle with the fleet's key.
    pub fn bundle(&self, name: &str, version: u64, model: &[u8], golden: Vec<Vec<Tensor>>) -> anyhow::Result<Vec<u8>> {
        self.bundle_signed_by(name, version, model, golden, &[&self.key])
    }

    /// Build a bundle and sign it with `keys`, in order.
    pub fn bundle_signed_by(
        &self,
        name: &str,
        version: u64,
        model: &[u8],
        golden: Vec<Vec<Tensor>>,
        keys: &[&SecretKey],
    ) -> anyhow::Result<Vec<u8>> {
        let mut opts = BuildOptions::new(name, version, model.to_vec(), unix_now());
        opts.golden = golden;
        let mut bytes = flotilla_builder::build(&opts)?.bytes;
        for k in keys {
            bytes = sign(&bytes, k)?;
        }
        Ok(bytes)
    }

    /// Build a bundle from options of the caller's and sign it with the fleet's key.
    pub fn build_signed(&self, opts: &BuildOptions) -> anyhow::Result<Vec<u8>> {
        sign(&flotilla_builder::build(opts)?.bytes, &self.key)
    }

    /// Set a server-side tag on a device (`flotilla devices tag ID KEY=VALUE`).
    pub async fn tag(&self, device: &str, key: &str, value: &str) -> anyhow::Result<Device> {
        let body = flotilla_api::v1::TagsUpdate { set: [(key.into(), value.into())].into(), remove: vec![] };
        let r = self.http.post(format!("{}/api/v1/devices/{device}/tags", self.api())).json(&body).send().await?;
        json_or_error(r).await
    }

    /// `GET /api/v1/drift` (`flotilla drift show`).
    pub async fn drift(&self, model: &str, query: &str) -> anyhow::Result<Vec<flotilla_api::v1::DriftRow>> {
        let url = format!("{}/api/v1/drift?model={model}{query}", self.api());
        json_or_error(self.http.get(url).send().await?).await
    }

    /// `GET /api/v1/alerts?all=true` (`flotilla alerts ls --all`).
    pub async fn alerts(&self) -> anyhow::Result<Vec<flotilla_api::v1::DriftAlert>> {
        json_or_error(self.http.get(format!("{}/api/v1/alerts?all=true", self.api())).send().await?).await
    }

    /// Push a trust root to the control plane (`flotilla trust push`).
    pub async fn push_root(&self, root: Vec<u8>) -> anyhow::Result<flotilla_api::v1::TrustRootPushed> {
        json_or_error(self.http.post(format!("{}/api/v1/trust/root", self.api())).body(root).send().await?).await
    }

    pub async fn events(&self, device: &str) -> anyhow::Result<Vec<flotilla_api::v1::Event>> {
        json_or_error(self.http.get(format!("{}/api/v1/events?device={device}", self.api())).send().await?).await
    }

    pub async fn push(&self, bundle: Vec<u8>) -> anyhow::Result<Bundle> {
        let r = self.http.post(format!("{}/api/v1/bundles", self.api())).body(bundle).send().await?;
        json_or_error(r).await
    }

    pub async fn start_rollout(&self, bundle: &str) -> anyhow::Result<String> {
        let req = RolloutCreate { bundle: bundle.into(), devices: vec![], plan: None };
        let r = self.http.post(format!("{}/api/v1/rollouts", self.api())).json(&req).send().await?;
        Ok(json_or_error::<RolloutCreated>(r).await?.id)
    }

    /// Start a rollout with a plan (`flotilla_rollout::Plan` as JSON).
    pub async fn start_rollout_with(&self, bundle: &str, plan: serde_json::Value) -> anyhow::Result<String> {
        let req = RolloutCreate { bundle: bundle.into(), devices: vec![], plan: Some(plan) };
        let r = self.http.post(format!("{}/api/v1/rollouts", self.api())).json(&req).send().await?;
        Ok(json_or_error::<RolloutCreated>(r).await?.id)
    }

    pub async fn rollout(&self, id: &str) -> anyhow::Result<Rollout> {
        json_or_error(self.http.get(format!("{}/api/v1/rollouts/{id}", self.api())).send().await?).await
    }

    /// Wait until the rollout is neither `pending` nor `running`.
    pub async fn wait_rollout(&self, id: &str, timeout: Duration) -> anyhow::Result<Rollout> {
        let start = Instant::now();
        loop {
            let r = self.rollout(id).await?;
            if r.state != "running" && r.state != "pending" {
                return Ok(r);
            }
            if start.elapsed() > timeout {
                bail!("rollout {id} still running after {timeout:?}: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new API token of `role` (viewer, operator, admin), made with the admin's: the secret.
    pub async fn create_token(&self, role: &str, name: &str) -> anyhow::Result<String> {
        let req = TokenCreate { role: role.into(), name: name.into() };
        let t: Token =
            json_or_error(self.http.post(format!("{}/api/v1/tokens", self.api())).json(&req).send().await?).await?;
        t.token.context("the server's answer holds no token")
    }

    pub async fn devices(&self) -> anyhow::Result<Vec<Device>> {
        json_or_error(self.http.get(format!("{}/api/v1/devices", self.api())).send().await?).await
    }

    pub async fn wait_devices_online(&self, n: usize) -> anyhow::Result<()> {
        self.wait_for(Duration::from_secs(30), || async {
            Ok(self.devices().await?.iter().filter(|d| d.online).count() >= n)
        })
        .await
        .with_context(|| format!("waiting for {n} devices online"))
    }

    pub async fn wait_for<F, Fut>(&self, timeout: Duration, mut f: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let start = Instant::now();
        while !f().await? {
            if start.elapsed() > timeout {
                bail!("condition not met within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub async fn infer(&self, device: &str, model: &str, req: &InferRequest) -> anyhow::Result<InferResponse> {
        let addr = self.agent(device).api_addr();
        let r = self.http.post(format!("http://{addr}/v2/models/{model}/infer")).json(req).send().await?;
        let status = r.status();
        if !status.is_success() {
            bail!("infer on {device}: HTTP {status}: {}", r.text().await?);
        }
        Ok(r.json().await?)
    }

    pub async fn model_metadata(&self, device: &str, model: &str) -> anyhow::Result<ModelMetadata> {
        let addr = self.agent(device).api_addr();
        json_or_error(self.http.get(format!("http://{addr}/v2/models/{model}")).send().await?).await
    }

    /// `POST /v2/models/{model}/feedback` on a device: the true labels of a request's samples.
    pub async fn feedback(&self, device: &str, model: &str, id: &str, labels: &[u32]) -> anyhow::Result<()> {
        let addr = self.agent(device).api_addr();
        let body = flotilla_api::v2::Feedback { id: id.into(), label: None, labels: Some(labels.to_vec()) };
        let r = self.http.post(format!("http://{addr}/v2/models/{model}/feedback")).json(&body).send().await?;
        let _: flotilla_api::v2::FeedbackResponse = json_or_error(r).await?;
        Ok(())
    }

    /// `PUT /api/v1/retrain/policies/{model}` (`flotilla retrain policy set`).
    pub async fn set_retrain_policy(&self, p: &flotilla_api::v1::RetrainPolicy) -> anyhow::Result<()> {
        let url = format!("{}/api/v1/retrain/policies/{}", self.api(), p.model);
        let _: flotilla_api::v1::RetrainPolicy = json_or_error(self.http.put(url).json(p).send().await?).await?;
        Ok(())
    }

    /// `GET /api/v1/retrain/jobs` (`flotilla retrain ls`), newest first.
    pub async fn retrain_jobs(&self) -> anyhow::Result<Vec<flotilla_api::v1::RetrainJob>> {
        json_or_error(self.http.get(format!("{}/api/v1/retrain/jobs", self.api())).send().await?).await
    }

    pub async fn retrain_job(&self, id: &str) -> anyhow::Result<flotilla_api::v1::RetrainJob> {
        json_or_error(self.http.get(format!("{}/api/v1/retrain/jobs/{id}", self.api())).send().await?).await
    }

    /// Wait until a job reaches one of `states`; fails early when it ends in another.
    pub async fn wait_job(
        &self,
        id: &str,
        states: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<flotilla_api::v1::RetrainJob> {
        let start = Instant::now();
        loop {
            let j = self.retrain_job(id).await?;
            if states.contains(&j.state.as_str()) {
                return Ok(j);
            }
            if ["completed", "rejected", "failed", "cancelled"].contains(&j.state.as_str()) {
                bail!("job {id} ended {}: {}", j.state, j.reason.unwrap_or_default());
            }
            if start.elapsed() > timeout {
                bail!("job {id} still {} after {timeout:?}: {:?}", j.state, j.reason);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn shutdown(self) {
        for (_, a) in self.agents {
            a.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// An HTTP client that sends `Authorization: Bearer TOKEN` with every request and trusts the
/// fleet CA at `ca` alone (plain http:// works too, for agents' local APIs).
pub fn authorized_client(token: &str, ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(client_builder(ca)?.default_headers(headers).build()?)
}

/// A client builder trusting the fleet CA at `ca` alone (ring-based rustls).
pub fn client_builder(ca: Option<&Path>) -> anyhow::Result<reqwest::ClientBuilder> {
    flotilla_pki::tls::install_default_provider();
    let b = reqwest::Client::builder();
    Ok(match ca {
        Some(p) => {
            let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            b.tls_backend_preconfigured(flotilla_pki::tls::client_config(&pem, None)?)
        }
        None => b,
    })
}

/// Add `key`'s signature to a bundle held in memory.
pub fn sign(bundle: &[u8], key: &SecretKey) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    flotilla_bundle::writer::sign_bundle(&mut std::io::Cursor::new(bundle), key, &mut out)?;
    Ok(out)
}

async fn json_or_error<T: serde::de::DeserializeOwned>(r: reqwest::Response) -> anyhow::Result<T> {
    let status = r.status();
    let body = r.bytes().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("unexpected body: {}", String::from_utf8_lossy(&body)))
}
