//! Agent configuration: a TOML file (optional) overridden by command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The config file's shape. Every key is optional; flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub device_id: Option<String>,
    pub broker: Option<String>,
    pub trust_root: Option<PathBuf>,
    pub api: Option<String>,
    pub api_socket: Option<PathBuf>,
    pub password: Option<String>,
    /// A per-device identity file (device id, broker password, tags) written at flashing time
    /// by `flotilla-image personalise`; its values win over this file's.
    pub identity: Option<PathBuf>,
    pub topic_prefix: Option<String>,
    /// Disk space an install must leave free, in bytes (default 64 MiB).
    pub disk_reserve_bytes: Option<u64>,
    /// Most payload bytes the telemetry outbox holds while offline (default 4 MiB).
    pub outbox_max_bytes: Option<u64>,
    /// Seconds between health reports of each model that served inferences (default 10).
    pub health_interval_secs: Option<u64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The TensorFlow Lite C library (`libtensorflowlite_c.so`); else `$FLOTILLA_TFLITE_LIB`;
    /// without either the agent runs the tract backends only.
    pub tflite_lib: Option<PathBuf>,
    /// The fleet CA (PEM) this device trusts for the broker and bundle downloads; never the
    /// system store.
    pub ca: Option<PathBuf>,
    /// This device's certificate and key (PEM) as flashed; renewals replace the copy in the
    /// data directory.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A single-use claim token: without a certificate, the agent makes its key, sends a CSR with
    /// this token to `claim_url` (the control plane's https://HOST:PORT) and keeps what it signs.
    pub claim_token: Option<String>,
    pub claim_url: Option<String>,
    /// Renew the device certificate when less than this is left of it (e.g. "120d"; default a
    /// third of its lifetime).
    pub cert_renew_before: Option<String>,
    /// External TFLite delegates bundles may name: `[delegates.npu] path = "/usr/lib/libvx_delegate.so"`
    /// with optional `options = { key = "value" }` passed to the delegate.
    #[serde(default)]
    pub delegates: BTreeMap<String, DelegateConfig>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DelegateConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }
}

/// What makes one device itself, kept apart from the shared config so that one image serves
/// many devices: `flotilla-image personalise` writes it into each device's copy (mode 0600).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub device_id: Option<String>,
    pub password: Option<String>,
    /// The device's certificate and key (relative paths are next to the identity file).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// A single-use claim token (first-boot provisioning).
    pub claim_token: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("claim_token", &self.claim_token.as_ref().map(|_| "<set>"))
            .field("tags", &self.tags)
            .finish()
    }
}

impl Identity {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Identity> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "identity file {} is missing: this device was not personalised \
                 (flotilla-image personalise writes it)",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading identity {}", path.display())),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "identity file is readable by others; it holds the broker password (chmod 600)");
            }
        }
        // The error names the key, never the text: the file holds a secret.
        let mut id: Identity = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("parsing identity {}: {}", path.display(), e.message()))?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        for p in [&mut id.cert, &mut id.key].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(id)
    }
}

/// A broker address: `mqtts://HOST:PORT` (TLS; also a bare `HOST:PORT`) or `mqtt://HOST:PORT`
/// (plain TCP, for trusted networks only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn tls(host: &str, port: u16) -> BrokerUrl {
        BrokerUrl { host: host.into(), port, tls: true }
    }

    pub fn plain(host: &str, port: u16) -> BrokerUrl {
        BrokerUrl { host: host.into(), port, tls: false }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (tls, rest) = match s.split_once("://") {
            Some(("mqtts" | "ssl" | "tls" | "mqtt+tls", rest)) => (true, rest),
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some((scheme, _)) => {
                bail!("broker {s:?}: unknown scheme {scheme:?} (mqtts:// or, on a trusted network, mqtt://)")
            }
            None => (true, s),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').with_context(|| format!("broker {s:?}: expected mqtt://HOST:PORT"))?;
        let port = port.parse().with_context(|| format!("broker {s:?}: bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("broker {s:?}: empty host");
        }
        Ok(BrokerUrl { host: host.into(), port, tls })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Everything the agent needs to run, resolved.
#[derive(Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub device_id: String,
    pub broker: BrokerUrl,
    pub trust_root: PathBuf,
    /// Where the local inference API listens (port 0 picks one; see `endpoints.json`).
    pub api: SocketAddr,
    /// The same API on a Unix socket too, when set.
    pub api_socket: Option<PathBuf>,
    /// Broker password for this device (username is the device id).
    pub password: Option<String>,
    pub topic_prefix: String,
    pub tags: BTreeMap<String, String>,
    /// An install is refused before downloading unless, after it, this much disk stays free.
    pub disk_reserve_bytes: u64,
    /// Telemetry kept while offline, in payload bytes; beyond it the oldest is dropped (and counted).
    pub outbox_max_bytes: u64,
    /// Seconds between health reports (what rollout gates judge).
    pub health_interval_secs: u64,
    /// See [`FileConfig::tflite_lib`] and [`FileConfig::delegates`].
    pub tflite_lib: Option<PathBuf>,
    pub delegates: BTreeMap<String, DelegateConfig>,
    /// The fleet CA this device pins (needed for an mqtts:// broker and https downloads).
    pub ca: Option<PathBuf>,
    /// The certificate and key flashed into the device (copied into the data directory on the
    /// first start; renewals replace that copy).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// First-boot provisioning: (the control plane's https URL, a single-use claim token).
    pub claim: Option<(String, String)>,
    /// Renew when less than this many seconds are left of the certificate (None: a third of
    /// its lifetime).
    pub cert_renew_before_secs: Option<u64>,
    /// The system clock (tests replace it to boot a device "in 1970"). Expiry is checked against
    /// the trusted clock, which never goes behind this or any signed time seen.
    pub clock: Clock,
}

/// Seconds since the epoch, as the device's wall clock says.
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    pub fn system() -> Clock {
        Clock(std::sync::Arc::new(crate::unix_now))
    }

    /// A clock stuck at `t`, like a board without a real-time clock that boots at `t = 0`.
    pub fn fixed(t: u64) -> Clock {
        Clock(std::sync::Arc::new(move || t))
    }

    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

/// Everything but the password, which is never printed.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("data_dir", &self.data_dir)
            .field("device_id", &self.device_id)
            .field("broker", &self.broker)
            .field("trust_root", &self.trust_root)
            .field("api", &self.api)
            .field("api_socket", &self.api_socket)
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("tags", &self.tags)
            .field("tflite_lib", &self.tflite_lib)
            .field("delegates", &self.delegates)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("claim", &self.claim.as_ref().map(|(url, _)| (url, "<token>")))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now={})", self.now())
    }
}

/// Default for [`AgentConfig::disk_reserve_bytes`]: room for the SQLite journal and logs.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;

impl AgentConfig {
    pub fn new(data_dir: PathBuf, device_id: &str, broker: BrokerUrl, trust_root: PathBuf) -> Self {
        AgentConfig {
            data_dir,
            device_id: device_id.into(),
            broker,
            trust_root,
            api: SocketAddr::from(([127, 0, 0, 1], 8181)),
            api_socket: None,
            password: None,
            topic_prefix: flotilla_proto::topics::DEFAULT_PREFIX.into(),
            tags: BTreeMap::new(),
            disk_reserve_bytes: DEFAULT_DISK_RESERVE,
            outbox_max_bytes: 4 << 20,
            health_interval_secs: 10,
            tflite_lib: None,
            delegates: BTreeMap::new(),
            ca: None,
            cert: None,
            key: None,
            claim: None,
            cert_renew_before_secs: None,
            clock: Clock::system(),
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if flotilla_proto::reserved_id(&self.device_id) {
            bail!(
                "device id {:?} is reserved for the control plane (ids may not begin with flotilla-server)",
                self.device_id
            );
        }
        if !flotilla_proto::valid_device_id(&self.device_id) {
            bail!("device id {:?} is invalid: use 1-64 chars of [A-Za-z0-9._-]", self.device_id);
        }
        if self.broker.tls && self.ca.is_none() {
            bail!(
                "the broker {} speaks TLS but no fleet CA is configured (ca = \"/etc/flotilla/fleet-ca.pem\", the control plane's DATA_DIR/pki/ca.pem)",
                self.broker
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            bail!("cert and key go together");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b: BrokerUrl = "mqtt://127.0.0.1:1883".parse().unwrap();
        assert_eq!(b, BrokerUrl::plain("127.0.0.1", 1883));
        assert_eq!("mqtts://fleet.example:8883".parse::<BrokerUrl>().unwrap(), BrokerUrl::tls("fleet.example", 8883));
        // Without a scheme: TLS.
        assert_eq!("localhost:9".parse::<BrokerUrl>().unwrap(), BrokerUrl::tls("localhost", 9));
        assert_eq!("mqtt://[::1]:5".parse::<BrokerUrl>().unwrap().host, "::1");
        assert_eq!(BrokerUrl::tls("::1", 5).to_string(), "mqtts://[::1]:5");
        assert!("mqtt://nohost".parse::<BrokerUrl>().is_err());
        assert!("http://h:1".parse::<BrokerUrl>().unwrap_err().to_string().contains("scheme"));
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let ok: FileConfig = toml::from_str("device_id = \"a\"\n[tags]\ngroup = \"lab\"\n").unwrap();
        assert_eq!(ok.tags["group"], "lab");
        assert!(toml::from_str::<FileConfig>("devce_id = \"a\"").is_err());
    }

    #[test]
    fn identity_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("identity.toml");
        let err = Identity::load(&p).unwrap_err().to_string();
        assert!(err.contains("not personalised"), "{err}");
        std::fs::write(&p, "device_id = \"rpi-7\"\npassword = \"s3cret\"\n[tags]\nsite = \"north\"\n").unwrap();
        let id = Identity::load(&p).unwrap();
        assert_eq!((id.device_id.as_deref(), id.password.as_deref()), (Some("rpi-7"), Some("s3cret")));
        assert_eq!(id.tags["site"], "north");
        std::fs::write(&p, "password = \"s3cret\"\npasword = \"s3cret\"\n").unwrap();
        let err = Identity::load(&p).unwrap_err().to_string();
        assert!(err.contains("pasword") && !err.contains("s3cret"), "{err}");
        std::fs::write(&p, "device_id = \"rpi-7\"\ncert = \"device.pem\"\nkey = \"/abs/device.key\"\n").unwrap();
        let id = Identity::load(&p).unwrap();
        assert_eq!(id.cert, Some(dir.path().join("device.pem")));
        assert_eq!(id.key, Some(PathBuf::from("/abs/device.key")));
        let mut cfg = AgentConfig::new(dir.path().into(), "rpi-7", "mqtt://h:1".parse().unwrap(), p.clone());
        cfg.password = Some("s3cret".into());
        let shown = format!("{cfg:?}");
        assert!(shown.contains("rpi-7") && shown.contains("<set>") && !shown.contains("s3cret"), "{shown}");
    }
}
