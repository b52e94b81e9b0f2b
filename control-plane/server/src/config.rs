//! How a server is configured: [`ServerConfig`], what `flotilla-server`'s flags fill in.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::pki;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Where fleet state lives: None for SQLite at `DATA_DIR/fleet.db`, or `postgres://…`
    /// (several replicas can share it).
    pub store: Option<String>,
    /// This replica's name among several sharing one store and one external broker (the holder
    /// of its leases, its MQTT client id). Default: made up at each start.
    pub replica_id: Option<String>,
    /// Run the workers here (the rollout driver, the retraining runner, retention). Off: a
    /// replica that serves the API and takes device messages only.
    pub workers: bool,
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
    /// How long the store keeps what grows with the fleet and with time.
    pub retention: Retention,
}

/// How long the store keeps events, drift reports and samples (seconds; 0 keeps them forever).
/// Older rows are deleted hourly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Retention {
    pub events_secs: u64,
    pub drift_secs: u64,
    pub samples_secs: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { events_secs: 30 * 86_400, drift_secs: 30 * 86_400, samples_secs: 90 * 86_400 }
    }
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            store: None,
            replica_id: None,
            workers: true,
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
            retention: Retention::default(),
        }
    }
}

/// A public URL whose port is 0 (`http://10.0.2.2:0`, as devices behind a NAT see the host)
/// takes the port the HTTP listener was given, like `--http 127.0.0.1:0` itself.
pub(crate) fn with_bound_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.strip_suffix(":0") {
        Some(host) if !scheme.is_empty() => format!("{scheme}://{host}:{port}{path}"),
        _ => url.to_string(),
    }
}

/// The host of a URL (`https://fleet.example:8443/x` → `fleet.example`), brackets removed.
pub(crate) fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_string())
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
