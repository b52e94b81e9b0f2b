//! `flotilla-agent`: the device daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flotilla_agent::{Agent, AgentConfig, BrokerUrl, FileConfig, Identity};

const EXAMPLE: &str = "\
Example:
  flotilla-agent --data-dir /var/lib/flotilla --device-id rpi-7 \\
      --broker mqtts://fleet.example:8883 --ca /etc/flotilla/fleet-ca.pem \\
      --cert /etc/flotilla/device.pem --key /etc/flotilla/device.key \\
      --trust-root /etc/flotilla/root.cbor
  # first boot without a certificate: make a key here and claim one with a single-use token
  flotilla-agent ... --claim-url https://fleet.example:8443 --claim-token clm_…";

/// The Flotilla device agent: receives signed model bundles over MQTT, verifies and self-tests
/// them before activating, and serves them to local apps over the Open Inference Protocol.
///
/// Settings come from `--config FILE` (TOML, same key names with underscores) and are
/// overridden by flags.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLE)]
struct Args {
    /// TOML config file; flags override its values.
    #[arg(long, env = "FLOTILLA_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Where state, blobs and staged downloads live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// This device's id (also its MQTT client id and username).
    #[arg(long)]
    device_id: Option<String>,
    /// The control plane's broker: mqtts://HOST:PORT (TLS, the device's certificate as its
    /// identity), or mqtt://HOST:PORT in plain TCP for a trusted network only.
    #[arg(long)]
    broker: Option<String>,
    /// The fleet CA (PEM) to trust for the broker and bundle downloads: the control plane's
    /// DATA_DIR/pki/ca.pem, or an operator's own CA. The system store is never used.
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// This device's certificate (PEM; its subject CN is the device id).
    #[arg(long, value_name = "PATH", requires = "key")]
    cert: Option<PathBuf>,
    /// This device's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "cert")]
    key: Option<PathBuf>,
    /// A single-use claim token (`flotilla devices claim-token create`): with no certificate
    /// yet, the agent makes its key, sends a CSR and keeps the certificate it gets back.
    #[arg(long, env = "FLOTILLA_CLAIM_TOKEN", hide_env_values = true, requires = "claim_url")]
    claim_token: Option<String>,
    /// The control plane's https://HOST:PORT, for claims.
    #[arg(long, value_name = "URL")]
    claim_url: Option<String>,
    /// The trust root this device was flashed with (newer roots are persisted in the data dir).
    #[arg(long)]
    trust_root: Option<PathBuf>,
    /// Local inference API address (default 127.0.0.1:8181; port 0 picks a free one and
    /// writes it to DATA_DIR/endpoints.json).
    #[arg(long)]
    api: Option<SocketAddr>,
    /// The TensorFlow Lite C library (default: $FLOTILLA_TFLITE_LIB; without one, tract only).
    #[arg(long, value_name = "PATH")]
    tflite_lib: Option<PathBuf>,
    /// Also serve the local API on this Unix socket (for apps on the device without TCP).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Broker password for this device.
    #[arg(long, env = "FLOTILLA_DEVICE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Per-device identity file (TOML: device_id, password, [tags]) written by
    /// `flotilla-image personalise`; it wins over --config, flags win over it.
    #[arg(long, value_name = "PATH", env = "FLOTILLA_AGENT_IDENTITY")]
    identity: Option<PathBuf>,
    /// Device tag KEY=VALUE (repeatable), reported in hello.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .init();
    if let Err(e) = run(Args::parse()).await {
        eprintln!("flotilla-agent: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    if let Some(path) = args.identity.as_ref().or(file.identity.as_ref()) {
        let id = Identity::load(path)?;
        file.device_id = id.device_id.or(file.device_id);
        file.password = id.password.or(file.password);
        file.cert = id.cert.or(file.cert);
        file.key = id.key.or(file.key);
        file.claim_token = id.claim_token.or(file.claim_token);
        file.tags.extend(id.tags);
    }
    let broker: BrokerUrl = need(args.broker.or(file.broker), "--broker")?.parse()?;
    let mut cfg = AgentConfig::new(
        need(args.data_dir.or(file.data_dir), "--data-dir")?,
        &need(args.device_id.or(file.device_id), "--device-id")?,
        broker,
        need(args.trust_root.or(file.trust_root), "--trust-root")?,
    );
    if let Some(api) = args.api.map(Ok).or_else(|| file.api.map(|a| a.parse())) {
        cfg.api = api.context("bad api address")?;
    }
    cfg.password = args.password.or(file.password);
    cfg.ca = args.ca.or(file.ca);
    cfg.cert = args.cert.or(file.cert);
    cfg.key = args.key.or(file.key);
    let claim_url = args.claim_url.or(file.claim_url);
    if let Some(token) = args.claim_token.or(file.claim_token) {
        let url = claim_url.context("a claim token needs the control plane's URL (--claim-url / claim_url)")?;
        cfg.claim = Some((url, token));
    }
    if let Some(d) = file.cert_renew_before {
        cfg.cert_renew_before_secs = Some(parse_duration(&d).context("cert_renew_before")?);
    }
    cfg.api_socket = args.api_socket.or(file.api_socket);
    cfg.tflite_lib = args.tflite_lib.or(file.tflite_lib);
    cfg.delegates = file.delegates;
    if let Some(r) = file.disk_reserve_bytes {
        cfg.disk_reserve_bytes = r;
    }
    if let Some(h) = file.health_interval_secs {
        cfg.health_interval_secs = h.max(1);
    }
    if let Some(b) = file.outbox_max_bytes {
        cfg.outbox_max_bytes = b;
    }
    if let Some(p) = file.topic_prefix {
        cfg.topic_prefix = p;
    }
    let mut tags: BTreeMap<String, String> = file.tags;
    for t in args.tags {
        let (k, v) = flotilla_proto::tags::parse_tag(&t).map_err(|e| anyhow::anyhow!("--tag: {e}"))?;
        tags.insert(k, v);
    }
    cfg.tags = tags;
    let agent = Agent::start(cfg).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    agent.shutdown().await;
    Ok(())
}

/// `90d`, `12h`, `30m`, `45s` (or plain seconds).
fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("{s:?}: expected a number and a unit (90d, 12h, 30m, 45s)"))?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{s:?}: unknown unit {unit:?} (d, h, m or s)"),
    };
    Ok(n * unit)
}

fn need<T>(v: Option<T>, flag: &str) -> anyhow::Result<T> {
    v.with_context(|| format!("missing {flag} (give the flag or set it in --config)"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
