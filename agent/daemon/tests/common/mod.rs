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
    /// `http://127.0.0.1:PORT`.
    pub api: String,
    /// `mqtt://127.0.0.1:PORT`, for the agent's --broker.
    pub broker: String,
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
    let http = reqwest::Client::builder()
        .default_headers(reqwest::header::HeaderMap::from_iter([(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", server.admin_token().unwrap()).parse().unwrap(),
        )]))
        .build()
        .unwrap();
    ControlPlane {
        api: format!("http://{}", server.http_addr),
        broker: format!("mqtt://127.0.0.1:{}", server.mqtt_addr.port()),
        server,
        key,
        http,
    }
}
