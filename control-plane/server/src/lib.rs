//! The Flotilla control plane as a library: the `flotilla-server` binary, the demo and the
//! end-to-end tests start it through [`Server::start`].
//!
//! Layers, each depending only on those below it:
//! - [`http`] and [`mqtt`]: the transport adapters (the API and console; the broker, device
//!   messages in, commands out through the [`service::DeviceBus`]);
//! - [`worker`]: the rollout driver and the retraining runner;
//! - [`service`]: the domain, shared by all of the above;
//! - [`store`]: every piece of fleet state, behind one trait per area;
//! - [`pki`], [`tls`], [`util`]: the fleet CA, TLS plumbing, clocks and ids.
//!
//! [`Server::start`] is where they are put together.

pub mod config;
pub mod http;
pub mod mqtt;
pub mod pki;
pub mod service;
pub mod store;
pub mod tls;
pub mod util;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use flotilla_proto::Topics;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::ServerConfig;
use config::{url_host, with_bound_port};
use mqtt::broker::{BrokerAuth, EmbeddedBroker};
use mqtt::ingest::Ingest;
use mqtt::{BrokerLogin, MqttBus};
use service::bundles::BundleFiles;
use service::{Fleet, Settings, tokens};
use store::Store;
use store::sqlite::Sqlite;
pub use util::{new_id, now_ms, now_s, rfc3339_ms};

/// The shared-subscription group replicas share device topics in.
const SHARE_GROUP: &str = "flotilla";

fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", new_id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The store `cfg.store` names: SQLite in the data directory by default.
async fn open_store(cfg: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.store.as_deref() {
        None => Ok(Arc::new(Sqlite::open(&cfg.data_dir.join("fleet.db"))?)),
        Some(u) if u.starts_with("sqlite:") => Ok(Arc::new(Sqlite::open(std::path::Path::new(&u["sqlite:".len()..]))?)),
        Some(u) if is_postgres(u) => Ok(Arc::new(store::postgres::Postgres::connect(u).await.context("--store")?)),
        Some(u) => {
            anyhow::bail!("--store {u:?}: expected sqlite:PATH (the default is DATA_DIR/fleet.db) or postgres://…")
        }
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

pub struct Server {
    shared: Arc<Fleet>,
    broker: Option<EmbeddedBroker>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    data_dir: PathBuf,
    /// The external broker is spoken to in plain TCP.
    mqtt_login_plain: bool,
    /// The control plane's MQTT client (disconnected on stop).
    client: rumqttc::AsyncClient,
}

impl Server {
    pub async fn start(cfg: ServerConfig) -> anyhow::Result<Server> {
        flotilla_pki::tls::install_default_provider();
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let store = open_store(&cfg).await?;
        let replica = cfg.replica_id.clone().unwrap_or_else(|| format!("r-{}", new_id()));
        let files = BundleFiles::open(&cfg.data_dir)?;
        let trust = service::trust::load(store.as_ref(), cfg.trust_root.as_deref()).await?;
        tokens::ensure_admin(store.as_ref(), &cfg.data_dir).await?;
        let capability_key = tokens::capability_key(store.as_ref()).await?;
        let retrain_key = match &cfg.retrain_key {
            Some(p) => Some(
                flotilla_bundle::keys::SecretKey::load(p).with_context(|| format!("--retrain-key {}", p.display()))?,
            ),
            None => None,
        };
        if let (Some(k), Some(t)) = (&retrain_key, &trust) {
            let listed = t.root().role("targets").map(|r| r.keyids.contains(&k.key_id())).unwrap_or(false);
            if !listed {
                tracing::warn!(key = %k.key_id().0, "the retrain key is not among the trust root's targets signers: retrained bundles will wait for approval");
            }
        }
        let pki = if cfg.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: the API and the broker speak plain TCP; tokens, passwords, models and samples cross the network readable by anyone on it"
            );
            None
        } else {
            let mut extra = cfg.tls.names.clone();
            if let Some(host) = cfg.public_url.as_deref().and_then(url_host) {
                extra.push(host);
            }
            let names = pki::server_names(&[cfg.http.ip(), cfg.mqtt.ip()], &extra);
            let mut p = pki::Pki::open(&cfg.data_dir, &cfg.tls, &names, now_s())?;
            p.device_lifetime = cfg.device_cert_lifetime_secs.max(3600);
            Some(p)
        };
        let tls_config = |auth: flotilla_pki::tls::ClientAuth| -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
            let Some(p) = &pki else { return Ok(None) };
            let mut c = flotilla_pki::tls::server_config(&p.server, Some(&p.client_ca_pem), auth)?;
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Some(Arc::new(c)))
        };
        let mut broker_auth = None;
        let (broker, login) = match &cfg.external_broker {
            None => {
                let mut auth = BrokerAuth::new(&cfg.topic_prefix, new_id() + &new_id());
                auth.require_device_password = cfg.require_device_password;
                auth.certificates = pki.is_some();
                for (device, hash, _) in store.device_credentials().await? {
                    auth.set_device_password(&device, hash);
                }
                let (devices, serials) = store.revocations().await?;
                devices.iter().for_each(|d| {
                    auth.revoke_device(d);
                });
                serials.iter().for_each(|s| auth.revoke_serial(s));
                let auth = Arc::new(auth);
                broker_auth = Some(auth.clone());
                let mut mqtt_tls = tls_config(flotilla_pki::tls::ClientAuth::Required)?;
                if let Some(c) = mqtt_tls.as_mut() {
                    Arc::get_mut(c).expect("fresh").alpn_protocols.clear();
                }
                let b = EmbeddedBroker::start(cfg.mqtt, auth.clone(), mqtt_tls).await?;
                let login = BrokerLogin {
                    host: b.internal.ip().to_string(),
                    port: b.internal.port(),
                    username: Some(auth.server_username.clone()),
                    password: Some(auth.server_password().to_string()),
                    tls: None,
                };
                (Some(b), login)
            }
            Some(url) => {
                if cfg.require_device_password {
                    anyhow::bail!(
                        "--require-device-password applies to the embedded broker; an external broker checks devices with its own password file"
                    );
                }
                let (tls, rest) = match url.split_once("://") {
                    Some(("mqtts" | "ssl" | "tls", rest)) => (true, rest),
                    Some(("mqtt" | "tcp", rest)) => (false, rest),
                    None => (true, url.as_str()),
                    Some((scheme, _)) => {
                        anyhow::bail!("--broker {url:?}: unknown scheme {scheme:?} (mqtts:// or mqtt://)")
                    }
                };
                let (host, port) =
                    rest.rsplit_once(':').with_context(|| format!("--broker {url:?}: expected mqtts://HOST:PORT"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let tls = match (tls, &pki) {
                    (false, _) => {
                        tracing::warn!(broker = %url, "the external broker is plain mqtt://: commands and telemetry cross the network readable by anyone on it");
                        None
                    }
                    (true, None) => anyhow::bail!(
                        "--broker {url}: TLS to the broker needs the fleet CA, which --insecure-plaintext turns off"
                    ),
                    (true, Some(p)) => {
                        let ca = match &cfg.broker_ca {
                            Some(f) => {
                                std::fs::read_to_string(f).with_context(|| format!("--broker-ca {}", f.display()))?
                            }
                            None => p.ca.cert_pem().to_string(),
                        };
                        let me = p.ca.device(flotilla_proto::SERVER_IDENTITY, now_s(), 30 * 86_400)?;
                        Some(Arc::new(flotilla_pki::tls::client_config(&ca, Some(&me))?))
                    }
                };
                let login = BrokerLogin {
                    host: host.into(),
                    port: port.trim_end_matches('/').parse().with_context(|| format!("--broker {url:?}: bad port"))?,
                    username: cfg.broker_username.clone(),
                    password: cfg.broker_password.clone(),
                    tls,
                };
                (None, login)
            }
        };
        let mqtt_addr = match &broker {
            Some(b) => b.addr,
            None => tokio::net::lookup_host((login.host.as_str(), login.port))
                .await?
                .next()
                .with_context(|| format!("cannot resolve broker {}", login.host))?,
        };
        let listener =
            tokio::net::TcpListener::bind(cfg.http).await.with_context(|| format!("binding HTTP on {}", cfg.http))?;
        let http_addr = listener.local_addr()?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let public_url = cfg
            .public_url
            .as_deref()
            .map(|u| with_bound_port(u, http_addr.port()))
            .or_else(|| (!http_addr.ip().is_unspecified()).then(|| format!("{scheme}://{http_addr}")))
            .map(|u| u.trim_end_matches('/').to_string());
        let https = tls_config(flotilla_pki::tls::ClientAuth::None)?;
        // Replicas sharing an external broker share the device topics (shared subscriptions,
        // one clean session each); a single server keeps one persistent session per data
        // directory (a second server on the same directory would take it over).
        let shared_subscriptions = cfg.external_broker.is_some() && cfg.store.as_deref().is_some_and(is_postgres);
        let client_id = if shared_subscriptions {
            format!("{}-{replica}", flotilla_proto::SERVER_IDENTITY)
        } else {
            let dir_id = cfg.data_dir.canonicalize().unwrap_or_else(|_| cfg.data_dir.clone());
            let digest = flotilla_bundle::format::sha256_hex(dir_id.to_string_lossy().as_bytes());
            format!("{}-{}", flotilla_proto::SERVER_IDENTITY, &digest[..16])
        };
        let mqtt_login_plain = login.tls.is_none();
        let (client, eventloop) = mqtt::client::client(&login, &client_id, shared_subscriptions);
        let topics = Topics::new(&cfg.topic_prefix);
        let bus = MqttBus { client: client.clone(), topics: topics.clone(), gate: broker_auth };
        let shared = Arc::new(Fleet {
            store,
            bus: Arc::new(bus),
            files,
            trust: RwLock::new(trust),
            trust_checked: Default::default(),
            wake: Notify::new(),
            settings: Settings {
                public_url,
                chunk_size: cfg.chunk_size.clamp(1024, flotilla_proto::DEFAULT_CHUNK_SIZE * 2),
                drift_cohort_key: cfg.drift_cohort_key.clone(),
                drift_period_ms: cfg.drift_period_secs.max(1) * 1000,
                capability_key,
                replica: replica.clone(),
            },
            profiles: Default::default(),
            retrain: service::retrain::Retrain::new(&cfg.data_dir, retrain_key),
            metrics: Default::default(),
            pki,
        });
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let connected_notify = Arc::new(Notify::new());
        let connected = connected_notify.notified();
        let ingest = Ingest {
            fleet: shared.clone(),
            client: client.clone(),
            topics,
            connected: connected_notify.clone(),
            shared: shared_subscriptions.then(|| SHARE_GROUP.to_string()),
            state_subscribed: Default::default(),
        };
        if shared_subscriptions {
            tasks.push(tokio::spawn(mqtt::ingest::lead_state(ingest.clone(), cancel.clone())));
        }
        tasks.push(tokio::spawn(mqtt::ingest::run(ingest, eventloop, cancel.clone())));
        // Every replica judges the drift alerts of the reports it takes in.
        tasks.push(tokio::spawn(service::drift::judge_loop(shared.clone(), cancel.clone())));
        // Wait (briefly) for the subscriptions, so no device message is missed from the start.
        if tokio::time::timeout(std::time::Duration::from_secs(10), connected).await.is_err() {
            tracing::warn!(broker = %mqtt_addr, "not subscribed to the broker yet; continuing and retrying in the background");
        }
        if cfg.workers {
            tasks.push(tokio::spawn(worker::driver::run(shared.clone(), cancel.clone())));
            tasks.push(tokio::spawn(worker::retrain::run(shared.clone(), cancel.clone())));
            tasks.push(tokio::spawn(worker::retention::run(shared.clone(), cfg.retention, cancel.clone())));
        }
        let (app, stop) = (http::router(shared.clone()), cancel.clone());
        match https {
            Some(config) => {
                let listener = tls::HttpsListener::new(listener, config)?;
                tasks.push(tokio::spawn(async move {
                    let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
                }));
            }
            None => tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            })),
        }
        // `http`/`mqtt` stay bare host:port (scripts read them); the rest says how to speak to them.
        let mut endpoints = serde_json::json!({
            "http": http_addr.to_string(),
            "mqtt": mqtt_addr.to_string(),
            "scheme": scheme,
            "mqtt_scheme": match (&cfg.external_broker, &shared.pki) {
                (None, Some(_)) => "mqtts",
                (None, None) => "mqtt",
                (Some(u), _) if u.starts_with("mqtt://") || u.starts_with("tcp://") => "mqtt",
                (Some(_), _) => "mqtts",
            },
        });
        if let Some(p) = &shared.pki {
            let ca = p.ca_path.canonicalize().unwrap_or_else(|_| p.ca_path.clone());
            endpoints["ca"] = ca.to_string_lossy().into();
        }
        if let Some(u) = &shared.settings.public_url {
            endpoints["public_url"] = u.as_str().into();
        }
        // Replicas sharing a data directory: each also writes its own, and endpoints.json names
        // the one that started last (any replica serves every request).
        if let Some(r) = &cfg.replica_id {
            endpoints["replica"] = r.as_str().into();
            write_atomically(&cfg.data_dir.join(format!("endpoints-{r}.json")), &endpoints.to_string())?;
        }
        write_atomically(&cfg.data_dir.join("endpoints.json"), &endpoints.to_string())?;
        tracing::info!(http = %http_addr, mqtt = %mqtt_addr, data_dir = %cfg.data_dir.display(), "flotilla-server started");
        Ok(Server {
            shared,
            broker,
            cancel,
            tasks,
            http_addr,
            mqtt_addr,
            data_dir: cfg.data_dir.clone(),
            mqtt_login_plain,
            client,
        })
    }

    pub fn shared(&self) -> &Arc<Fleet> {
        &self.shared
    }

    /// The fleet CA's certificate file (None with `--insecure-plaintext`).
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.shared.pki.as_ref().map(|p| p.ca_path.clone())
    }

    /// `https://HOST:PORT` (or `http://` without TLS) of the API as bound.
    pub fn api_url(&self) -> String {
        let scheme = if self.shared.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr)
    }

    /// `mqtts://HOST:PORT` (or `mqtt://` without TLS) of the embedded broker as bound.
    pub fn mqtt_url(&self) -> String {
        let plain_external = self.broker.is_none() && self.mqtt_login_plain;
        let scheme = if self.shared.pki.is_some() && !plain_external { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}", self.mqtt_addr)
    }

    /// Issue a device certificate with a key made here (recorded for revocation).
    pub async fn issue_device_cert(&self, device: &str) -> anyhow::Result<flotilla_pki::Identity> {
        Ok(service::certs::issue_recorded(&self.shared, device, "issued").await.map(|(id, _)| id)?)
    }

    /// The admin token written on the first start (`DATA_DIR/admin.token`), if it is still there.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join(tokens::ADMIN_TOKEN_FILE)).ok().map(|t| t.trim().to_string())
    }

    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// Stop every task and the embedded broker (what `shutdown` does, without consuming).
    pub async fn stop(&mut self) {
        let _ = self.client.disconnect().await;
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(b) = self.broker.take() {
            b.stop();
        }
    }
}
