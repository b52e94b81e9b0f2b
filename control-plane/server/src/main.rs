//! `flotilla-server`: the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use flotilla_server::{Server, ServerConfig};

const EXAMPLE: &str = "\
Example:
  flotilla-server --data-dir ./fleet --http 127.0.0.1:8080 --mqtt 0.0.0.0:1883 --trust-root root.cbor
  # the first start writes an admin token to ./fleet/admin.token; more tokens:
  flotilla-server token create --data-dir ./fleet --role operator --name ci";

/// The Flotilla control plane: device registry, bundle store, rollouts, with an embedded MQTT
/// broker and SQLite store by default.
///
/// Once listening it writes DATA_DIR/endpoints.json with the bound `http` and `mqtt`
/// addresses (use port 0 to let the system pick). Every API call but the health check needs a
/// bearer token: the first start writes an admin token to DATA_DIR/admin.token (mode 0600).
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLE)]
struct Args {
    /// Where the store, bundles and endpoints.json live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Embedded MQTT broker address (devices connect here).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Use an external broker (mqtt://HOST:PORT) instead of the embedded one.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Username for the external broker.
    #[arg(long, requires = "broker")]
    broker_username: Option<String>,
    /// Password for the external broker.
    #[arg(long, env = "FLOTILLA_BROKER_PASSWORD", hide_env_values = true, requires = "broker")]
    broker_password: Option<String>,
    /// Refuse pushed bundles that do not verify under this trust root.
    #[arg(long)]
    trust_root: Option<PathBuf>,
    /// Base URL devices download bundles from over HTTP (default http://HTTP-ADDRESS unless it
    /// is 0.0.0.0; without one, bundles travel in MQTT chunks only). Port 0 takes the port
    /// --http was given (http://10.0.2.2:0 for devices in qemu's user network).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// The embedded broker admits only devices enrolled with a password (`flotilla devices
    /// enroll`, fed by `flotilla-image personalise`); without it, new devices may join.
    #[arg(long)]
    require_device_password: bool,
    /// Bytes per MQTT chunk and per HTTP Range request devices use for bundles (1024 to
    /// 524288): the most a cut connection or a crash makes a device fetch twice.
    #[arg(long, value_name = "BYTES", default_value_t = flotilla_proto::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Drift alerts are judged per value of this device tag (cohorts like group=lab).
    #[arg(long, value_name = "TAG", default_value = "group")]
    drift_cohort_key: String,
    /// Count-based drift windows (`--drift-window 200`): a cohort's window that already holds
    /// enough inferences takes reports of further devices for this long after it opened, e.g.
    /// 60s (a device's own next report always opens a new window). Time-based windows aggregate
    /// per window and ignore this.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_secs)]
    drift_period: u64,
    /// Sign retrained bundles with this key (an automation key the trust root lists among its
    /// `targets` signers; with a targets threshold above 1 they still wait for a person's
    /// `flotilla retrain approve --key`). Without it, retrained bundles wait unsigned.
    #[arg(long, value_name = "KEY", env = "FLOTILLA_RETRAIN_KEY")]
    retrain_key: Option<PathBuf>,
    /// MQTT topic prefix.
    #[arg(long, default_value = flotilla_proto::topics::DEFAULT_PREFIX)]
    topic_prefix: String,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// API tokens, made and revoked on the store directly (the server may be running).
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(clap::Subcommand, Debug)]
enum TokenCmd {
    /// Make a token and print it; it is shown this once (only its hash is kept).
    Create {
        /// viewer (read), operator (rollouts, retraining, devices) or admin (tokens, trust root).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// What it is for (shown by `token ls`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (ids, roles, names, last use; never the secrets).
    Ls,
    /// Revoke a token by id.
    Revoke { id: String },
}

fn token(cmd: TokenCmd, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let store = flotilla_server::store::Store::open(&data_dir.join("fleet.db"))?;
    match cmd {
        TokenCmd::Create { role, name } => {
            let role = flotilla_server::auth::Role::parse(&role).expect("clap checked the role");
            let (id, token) = flotilla_server::auth::create_token(&store, role, &name)?;
            eprintln!("created {id} ({}); the token is shown once:", role.as_str());
            println!("{token}");
        }
        TokenCmd::Ls => {
            for t in store.tokens()? {
                let at = |t: i64| flotilla_server::rfc3339_ms(t * 1000);
                let used = t.last_used.map_or("never".into(), at);
                println!("{}  {:<8}  created {}  last used {used}  {}", t.id, t.role, at(t.created), t.name);
            }
        }
        TokenCmd::Revoke { id } => {
            anyhow::ensure!(store.delete_token(&id)?, "no token {id:?} (see `flotilla-server token ls`)");
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

fn parse_secs(s: &str) -> Result<u64, String> {
    match flotilla_drift::Window::parse(s)? {
        flotilla_drift::Window::Seconds(n) => Ok(n),
        flotilla_drift::Window::Count(n) => Ok(n),
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn,rmqtt=warn,rmqtt_net=warn".into()),
        )
        .init();
    let a = Args::parse();
    let Some(data_dir) = a.data_dir else {
        eprintln!("flotilla-server: --data-dir DIR (or FLOTILLA_DATA_DIR) is required");
        std::process::exit(2);
    };
    if let Some(Cmd::Token(t)) = a.cmd {
        if let Err(e) = token(t, &data_dir) {
            eprintln!("flotilla-server: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let mut cfg = ServerConfig::new(data_dir);
    cfg.http = a.http;
    cfg.mqtt = a.mqtt;
    cfg.external_broker = a.broker;
    cfg.broker_username = a.broker_username;
    cfg.broker_password = a.broker_password;
    cfg.trust_root = a.trust_root;
    cfg.topic_prefix = a.topic_prefix;
    cfg.public_url = a.public_url;
    cfg.require_device_password = a.require_device_password;
    cfg.chunk_size = a.chunk_size;
    cfg.drift_cohort_key = a.drift_cohort_key;
    cfg.drift_period_secs = a.drift_period;
    cfg.retrain_key = a.retrain_key;
    let server = match Server::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flotilla-server: {e:#}");
            std::process::exit(1);
        }
    };
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
    server.shutdown().await;
}
