//! The Flotilla control plane as a library: the `flotilla-server` binary, the demo and the
//! end-to-end tests start it through [`Server::start`].
//!
//! Tasks: the embedded broker ([`broker`]), the MQTT client that feeds the registry and serves
//! chunks ([`fleet`]), the rollout driver ([`driver`]), and the HTTP API ([`http`]). All fleet
//! state is in the SQLite [`store`].

pub mod api_error;
pub mod auth;
pub mod broker;
pub mod bundles;
pub mod certs;
pub mod drift;
pub mod driver;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod retrain;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use flotilla_bundle::TrustedRoot;
use flotilla_proto::Topics;
use rumqttc::AsyncClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerAuth, EmbeddedBroker};
use crate::bundles::BundleFiles;
use crate::fleet::BrokerLogin;
use crate::store::Store;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub http: SocketAddr,
    /// Where the embedded broker listens (ignored with `external_broker`).
    pub mqtt: SocketAddr,
    /// `mqtts://HOST:PORT` (or `mqtt://` in plain TCP) of an external broker (Mosquitto, EMQX)
    /// instead of the embedded one. Over TLS the control plane presents a certificate for
    /// `flotilla-server` from the fleet CA ([`pki::mosquitto_files`] sets Mosquitto up for it).
    pub external_broker: Option<String>,
    /// The CA an external broker's certificate is from (default: the fleet CA).
    pub broker_ca: Option<PathBuf>,
    pub broker_username: Option<String>,
    pub broker_password: Option<String>,
    /// When set, pushed bundles must verify under it.
    pub trust_root: Option<PathBuf>,
    pub topic_prefix: String,
    /// Base URL devices use to download bundles over HTTP (Range, resumable). Defaults to
    /// `http://{http}` unless the server listens on an unspecified address; without one,
    /// bundles travel in MQTT chunks only.
    pub public_url: Option<String>,
    /// Bytes per MQTT chunk and per HTTP Range request that offers ask devices to use: the
    /// most a cut connection or a crash can make a device fetch twice.
    pub chunk_size: u32,
    /// Drift: the tag whose values are the cohorts alerts are judged per (default `group`).
    pub drift_cohort_key: String,
    /// Drift, count windows: how long a cohort window that holds enough inferences stays open to
    /// reports of further devices (`drift::count_window`).
    pub drift_period_secs: u64,
    /// Retraining: the key the server signs retrained bundles with (an automation key the trust
    /// root lists among its `targets` signers). Without it, retrained bundles wait for a key
    /// holder's `flotilla retrain approve --key`.
    pub retrain_key: Option<PathBuf>,
    /// The embedded broker admits only devices enrolled with a password
    /// (`PUT /api/v1/devices/{id}/credential`); without it, unknown devices may join (open
    /// enrollment) and enrolled ones must give their password.
    pub require_device_password: bool,
    /// Plain TCP for the API and the broker: no TLS, no device certificates. For a trusted
    /// network only; every start logs a warning.
    pub insecure_plaintext: bool,
    /// An operator's server certificate, more client CAs, more names ([`pki`]).
    pub tls: pki::TlsOptions,
    /// How long device certificates the fleet CA issues are valid.
    pub device_cert_lifetime_secs: i64,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            mqtt: SocketAddr::from(([127, 0, 0, 1], 1883)),
            external_broker: None,
            broker_ca: None,
            broker_username: None,
            broker_password: None,
            trust_root: None,
            topic_prefix: flotilla_proto::topics::DEFAULT_PREFIX.into(),
            public_url: None,
            chunk_size: flotilla_proto::DEFAULT_CHUNK_SIZE,
            drift_cohort_key: "group".into(),
            drift_period_secs: 60,
            retrain_key: None,
            require_device_password: false,
            insecure_plaintext: false,
            tls: pki::TlsOptions::default(),
            device_cert_lifetime_secs: pki::DEFAULT_DEVICE_LIFETIME,
        }
    }
}

/// What the server's tasks share.
pub struct Shared {
    pub store: Store,
    pub files: BundleFiles,
    pub topics: Topics,
    pub mqtt: AsyncClient,
    pub trust: RwLock<Option<TrustedRoot>>,
    /// Wakes the rollout driver early (an event arrived, a rollout started).
    pub wake: Notify,
    /// Notified after each (re)subscription to the device topics.
    pub connected: Notify,
    /// Where offers tell devices to download bundles (`{public_url}/api/v1/bundles/{id}`).
    pub public_url: Option<String>,
    pub chunk_size: u32,
    /// Bundle bytes served, per transport (for metrics and the transfer tests).
    pub served_mqtt: std::sync::atomic::AtomicU64,
    pub served_http: std::sync::atomic::AtomicU64,
    pub profiles: drift::Profiles,
    pub drift_cohort_key: String,
    pub drift_period_ms: u64,
    pub retrain: retrain::Retrain,
    /// Keys the capabilities in offer and webhook URLs ([`auth::capability`]).
    pub capability_key: String,
    pub metrics: metrics::Counters,
    /// The embedded broker's device passwords (None with an external broker).
    pub broker_auth: Option<Arc<BrokerAuth>>,
    /// The fleet CA and the server's certificate (None with `--insecure-plaintext`).
    pub pki: Option<pki::Pki>,
}

/// A public URL whose port is 0 (`http://10.0.2.2:0`, as devices behind a NAT see the host)
/// takes the port the HTTP listener was given, like `--http 127.0.0.1:0` itself.
fn with_bound_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.strip_suffix(":0") {
        Some(host) if !scheme.is_empty() => format!("{scheme}://{host}:{port}{path}"),
        _ => url.to_string(),
    }
}

pub struct Server {
    shared: Arc<Shared>,
    broker: Option<EmbeddedBroker>,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub http_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    data_dir: PathBuf,
    /// The external broker is spoken to in plain TCP.
    mqtt_login_plain: bool,
}

impl Server {
    pub async fn start(cfg: ServerConfig) -> anyhow::Result<Server> {
        flotilla_pki::tls::install_default_provider();
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
        let store = Store::open(&cfg.data_dir.join("fleet.db"))?;
        let files = BundleFiles::open(&cfg.data_dir)?;
        let trust = load_trust(&store, cfg.trust_root.as_deref())?;
        auth::ensure_admin(&store, &cfg.data_dir)?;
        let capability_key = auth::capability_key(&store)?;
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
                for (device, hash, _) in store.device_credentials()? {
                    auth.set_device_password(&device, hash);
                }
                let (devices, serials) = store.revocations()?;
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
        // One session per data directory (a second server on the same store would take it over).
        let dir_id = cfg.data_dir.canonicalize().unwrap_or_else(|_| cfg.data_dir.clone());
        let digest = flotilla_bundle::format::sha256_hex(dir_id.to_string_lossy().as_bytes());
        let mqtt_login_plain = login.tls.is_none();
        let (client, eventloop) =
            fleet::client(&login, &format!("{}-{}", flotilla_proto::SERVER_IDENTITY, &digest[..16]));
        let shared = Arc::new(Shared {
            store,
            files,
            topics: Topics::new(&cfg.topic_prefix),
            mqtt: client,
            trust: RwLock::new(trust),
            wake: Notify::new(),
            connected: Notify::new(),
            public_url,
            chunk_size: cfg.chunk_size.clamp(1024, flotilla_proto::DEFAULT_CHUNK_SIZE * 2),
            served_mqtt: Default::default(),
            served_http: Default::default(),
            profiles: Default::default(),
            drift_cohort_key: cfg.drift_cohort_key.clone(),
            drift_period_ms: cfg.drift_period_secs.max(1) * 1000,
            retrain: retrain::Retrain::new(&cfg.data_dir, retrain_key),
            capability_key,
            metrics: Default::default(),
            broker_auth,
            pki,
        });
        let cancel = CancellationToken::new();
        let mut tasks = Vec::new();
        let connected = shared.connected.notified();
        tasks.push(tokio::spawn(fleet::run(shared.clone(), eventloop, cancel.clone())));
        // Wait (briefly) for the subscriptions, so no device message is missed from the start.
        if tokio::time::timeout(std::time::Duration::from_secs(10), connected).await.is_err() {
            tracing::warn!(broker = %mqtt_addr, "not subscribed to the broker yet; continuing and retrying in the background");
        }
        tasks.push(tokio::spawn(driver::run(shared.clone(), cancel.clone())));
        tasks.push(tokio::spawn(retrain::run(shared.clone(), cancel.clone())));
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
        if let Some(u) = &shared.public_url {
            endpoints["public_url"] = u.as_str().into();
        }
        std::fs::write(cfg.data_dir.join("endpoints.json"), endpoints.to_string())?;
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
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
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
    pub fn issue_device_cert(&self, device: &str) -> anyhow::Result<flotilla_pki::Identity> {
        pki::issue_recorded(&self.shared, device, "issued")
    }

    /// The admin token written on the first start (`DATA_DIR/admin.token`), if it is still there.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join(auth::ADMIN_TOKEN_FILE)).ok().map(|t| t.trim().to_string())
    }

    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// Stop every task and the embedded broker (what `shutdown` does, without consuming).
    pub async fn stop(&mut self) {
        let _ = self.shared.mqtt.disconnect().await;
        self.cancel.cancel();
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        if let Some(b) = self.broker.take() {
            b.stop();
        }
    }
}

/// The server's current trust root: the configured one (stored as the start of the chain), then
/// every newer root pushed since, each verified as a rotation of the one before.
fn load_trust(store: &Store, configured: Option<&std::path::Path>) -> anyhow::Result<Option<TrustedRoot>> {
    let now = now_s() as u64;
    if let Some(p) = configured {
        let bytes = std::fs::read(p).with_context(|| format!("reading trust root {}", p.display()))?;
        let t = TrustedRoot::anchor(&bytes, now).with_context(|| format!("trust root {}", p.display()))?;
        let stored = store.roots()?;
        match stored.iter().find(|(v, _)| *v == t.root().version) {
            Some((_, b)) if *b != t.to_bytes() => anyhow::bail!(
                "trust root {} is version {} but the store holds a different root with that version",
                p.display(),
                t.root().version
            ),
            Some(_) => {}
            None => store.add_root(t.root().version, &t.to_bytes(), now_s())?,
        }
    }
    let stored = store.roots()?;
    let Some((_, first)) = stored.first() else { return Ok(None) };
    let anchor = TrustedRoot::anchor(first, 0).context("the store's oldest trust root")?;
    let chain: Vec<Vec<u8>> = stored.into_iter().map(|(_, b)| b).collect();
    Ok(Some(anchor.rotate_chain(&chain, now).context("the store's trust root chain")?))
}

/// The host of a URL (`https://fleet.example:8443/x` → `fleet.example`), brackets removed.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// RFC 3339 of milliseconds since the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn public_url_port_zero_takes_the_bound_port() {
        use super::with_bound_port as w;
        assert_eq!(w("http://10.0.2.2:0", 4711), "http://10.0.2.2:4711");
        assert_eq!(w("http://10.0.2.2:0/fleet/", 4711), "http://10.0.2.2:4711/fleet/");
        assert_eq!(w("https://fleet.example", 4711), "https://fleet.example");
        assert_eq!(w("http://fleet.example:8080", 4711), "http://fleet.example:8080");
        assert_eq!(w("http://[::1]:0", 9), "http://[::1]:9");
    }

    #[test]
    fn url_hosts() {
        use super::url_host as h;
        assert_eq!(h("https://fleet.example:8443/x").as_deref(), Some("fleet.example"));
        assert_eq!(h("http://10.0.2.2:0").as_deref(), Some("10.0.2.2"));
        assert_eq!(h("https://[fd00::1]:9/").as_deref(), Some("fd00::1"));
        assert_eq!(h("https://fleet.example").as_deref(), Some("fleet.example"));
    }
}
