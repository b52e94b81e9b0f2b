//! What the agent's process tests share: a real control plane on ephemeral ports, started with a
//! one-key trust root, and an HTTP client holding its admin token.

use std::path::Path;

use flotilla_bundle::SecretKey;
use flotilla_bundle::root::{Root, sign_root};
use flotilla_server::{Server, ServerConfig};

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

pub struct ControlPlane {
    pub server: Server,
    /// Holds every role of `DIR/root.cbor`: it signs the bundles.
    pub key: SecretKey,
    /// `https://127.0.0.1:PORT`.
    pub api: String,
    /// The broker and the fleet CA, for the agent's flags.
    pub broker: Broker,
    /// Sends the admin token (the control plane's API wants it; the agent's local API ignores it).
    pub http: reqwest::Client,
}

/// Write `dir/root.cbor` and start a control plane with its store in `dir/server`.
pub async fn control_plane(dir: &Path) -> ControlPlane {
    let key = SecretKey::generate().unwrap();
    std::fs::write(dir.join("root.cbor"), sign_root(&Root::single_key(&key.public(), now(), None), &[&key]).unwrap())
        .unwrap();
    let mut cfg = ServerConfig::new(dir.join("server"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.mqtt = "127.0.0.1:0".parse().unwrap();
    let server = Server::start(cfg).await.unwrap();
    let ca = server.ca_path().unwrap();
    let pem = std::fs::read_to_string(&ca).unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(flotilla_pki::tls::client_config(&pem, None).unwrap())
        .default_headers(reqwest::header::HeaderMap::from_iter([(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", server.admin_token().unwrap()).parse().unwrap(),
        )]))
        .build()
        .unwrap();
    ControlPlane {
        api: server.api_url(),
        broker: Broker { url: server.mqtt_url(), ca, dir: dir.to_path_buf() },
        server,
        key,
        http,
    }
}

/// What an agent process needs to join: the broker's URL, the fleet CA, and a certificate.
pub struct Broker {
    pub url: String,
    pub ca: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Broker {
    /// `--broker URL --ca CA --cert C --key K` with a certificate the fleet CA issues for `id`
    /// (made once, as `flotilla-image personalise` would flash it).
    pub fn args(&self, id: &str) -> Vec<String> {
        let cert = self.dir.join(format!("{id}.pem"));
        let key = self.dir.join(format!("{id}.key"));
        if !cert.exists() {
            let pki = self.ca.parent().unwrap();
            let ca = flotilla_pki::Ca::load(
                &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
                &std::fs::read_to_string(pki.join("ca.key")).unwrap(),
            )
            .unwrap();
            let ident = ca.device(id, now() as i64, 86_400).unwrap();
            std::fs::write(&cert, ident.cert_pem).unwrap();
            std::fs::write(&key, ident.key_pem).unwrap();
        }
        [("--broker", self.url.clone()), ("--ca", path(&self.ca)), ("--cert", path(&cert)), ("--key", path(&key))]
            .into_iter()
            .flat_map(|(k, v)| [k.to_string(), v])
            .collect()
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
