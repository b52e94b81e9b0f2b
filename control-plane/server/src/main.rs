//! `flotilla-server`: the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use flotilla_server::{Server, ServerConfig};

const EXAMPLE: &str = "\
Example:
  flotilla-server --data-dir ./fleet --http 0.0.0.0:8443 --mqtt 0.0.0.0:8883 \
      --tls-name fleet.example --trust-root root.cbor
  # the first start writes an admin token to ./fleet/admin.token and makes the fleet CA
  # (./fleet/pki/ca.pem: devices and the CLI pin it) and a server certificate; more tokens:
  flotilla-server token create --data-dir ./fleet --role operator --name ci
  # an operator's own PKI: --tls-cert/--tls-key for the server, --client-ca for device
  # certificates it issued; put an intermediate CA at ./fleet/pki/ca.{pem,key} to issue from it";

/// The Flotilla control plane: device registry, bundle store, rollouts, with an embedded MQTT
/// broker and SQLite store by default.
///
/// Once listening it writes DATA_DIR/endpoints.json with the bound `http` and `mqtt`
/// addresses (use port 0 to let the system pick), the `scheme` (https) and the fleet CA's path
/// (`ca`). Every API call but the health check needs a bearer token: the first start writes an
/// admin token to DATA_DIR/admin.token (mode 0600).
///
/// Everything runs over TLS: HTTPS for the API and console, MQTT over mutual TLS where each
/// device's certificate (CN = device id) is its identity. The first start makes a fleet CA in
/// DATA_DIR/pki; `--insecure-plaintext` turns TLS off for a trusted network.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLE)]
struct Args {
    /// Where the store, bundles and endpoints.json live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Where fleet state lives: SQLite in DATA_DIR/fleet.db by default (one server), or
    /// postgres://USER@HOST:PORT/DB, which several replicas share (each with --broker on one
    /// external broker, and DATA_DIR on storage they all reach).
    #[arg(long, env = "FLOTILLA_STORE", value_name = "URL", hide_env_values = true)]
    store: Option<String>,
    /// This replica's name (its MQTT client id and the holder of its leases); default: made up
    /// at each start.
    #[arg(long, value_name = "NAME")]
    replica_id: Option<String>,
    /// Drive no rollouts or retraining jobs here: serve the API and take device messages only
    /// (a replica of the API tier, while others do the work).
    #[arg(long)]
    no_workers: bool,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Embedded MQTT broker address (devices connect here).
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// Use an external broker instead of the embedded one: mqtts://HOST:PORT (the control
    /// plane presents a flotilla-server certificate from the fleet CA; `flotilla-server
    /// mosquitto` writes Mosquitto's side) or mqtt://HOST:PORT in plain TCP.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// The CA the external broker's certificate is from (default: the fleet CA).
    #[arg(long, value_name = "PEM", requires = "broker")]
    broker_ca: Option<PathBuf>,
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
    /// Plain TCP for the API and the broker (no TLS, no device certificates; device passwords
    /// and open enrollment as before). For a trusted network only: warns at every start.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    insecure_plaintext: bool,
    /// The server's certificate chain (PEM) instead of one the fleet CA issues.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Also accept device certificates issued by these CAs (PEM), besides the fleet CA.
    #[arg(long, value_name = "PEM")]
    client_ca: Option<PathBuf>,
    /// A name or address the server certificate must carry (repeatable), besides localhost,
    /// the loopback addresses, the host name, the addresses bound and --public-url's host.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// How long device certificates are valid (e.g. 365d); agents renew a third before the end.
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
    device_cert_lifetime: u64,
    /// Keep device events this long (0: forever); older ones are deleted hourly.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    retain_events: u64,
    /// Keep drift reports this long (0: forever). Alerts stay; windows older than this can no
    /// longer be shown or judged.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    retain_drift: u64,
    /// Keep uploaded reservoir samples this long (0: forever).
    #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
    retain_samples: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// API tokens, made and revoked on the store directly (the server may be running).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Set Debian's Mosquitto up for the fleet's certificates: writes OUT/mosquitto.conf (a
    /// listener with require_certificate and use_identity_as_username), the fleet CA, a broker
    /// certificate for --name, and flotilla.acl (each device its own topics). Makes the fleet CA
    /// if the data directory has none. Then: chown mosquitto: OUT/broker.key (Mosquitto drops to
    /// its own user), mosquitto -c OUT/mosquitto.conf, and flotilla-server --broker
    /// mqtts://HOST:PORT.
    Mosquitto {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Where Mosquitto listens, HOST:PORT.
        #[arg(long, default_value = "0.0.0.0:8883")]
        listen: String,
        /// A name or address the broker certificate carries (repeatable), besides localhost and
        /// the loopback addresses.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
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

async fn token(cmd: TokenCmd, data_dir: &std::path::Path) -> anyhow::Result<()> {
    use flotilla_server::service::tokens;
    use flotilla_server::store::{AuthStore, sqlite::Sqlite};
    let store = Sqlite::open(&data_dir.join("fleet.db"))?;
    match cmd {
        TokenCmd::Create { role, name } => {
            let role = tokens::Role::parse(&role).expect("clap checked the role");
            let (id, token) = tokens::create_token(&store, role, &name).await?;
            eprintln!("created {id} ({}); the token is shown once:", role.as_str());
            println!("{token}");
        }
        TokenCmd::Ls => {
            for t in store.tokens().await? {
                let at = |t: i64| flotilla_server::rfc3339_ms(t * 1000);
                let used = t.last_used.map_or("never".into(), at);
                println!("{}  {:<8}  created {}  last used {used}  {}", t.id, t.role, at(t.created), t.name);
            }
        }
        TokenCmd::Revoke { id } => {
            anyhow::ensure!(store.delete_token(&id).await?, "no token {id:?} (see `flotilla-server token ls`)");
            eprintln!("revoked {id}");
        }
    }
    Ok(())
}

/// `365d`, `12h`, `30m`, `45s`.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit (365d, 12h, 30m, 45s)"))?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (d, h, m or s)")),
    };
    Ok(n * unit)
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
    match a.cmd {
        Some(Cmd::Token(t)) => {
            if let Err(e) = token(t, &data_dir).await {
                eprintln!("flotilla-server: {e:#}");
                std::process::exit(1);
            }
            return;
        }
        Some(Cmd::Mosquitto { out, listen, names }) => {
            match flotilla_server::pki::mosquitto_files(&data_dir, &out, &names, &a.topic_prefix, &listen) {
                Ok(conf) => {
                    println!("{}", conf.display());
                    eprintln!(
                        "next: chown mosquitto: {} && mosquitto -c {}",
                        out.join("broker.key").display(),
                        conf.display()
                    );
                }
                Err(e) => {
                    eprintln!("flotilla-server: {e:#}");
                    std::process::exit(1);
                }
            }
            return;
        }
        None => {}
    }
    let mut cfg = ServerConfig::new(data_dir);
    cfg.store = a.store;
    cfg.replica_id = a.replica_id;
    cfg.workers = !a.no_workers;
    cfg.http = a.http;
    cfg.mqtt = a.mqtt;
    cfg.external_broker = a.broker;
    cfg.broker_ca = a.broker_ca;
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
    cfg.insecure_plaintext = a.insecure_plaintext;
    cfg.tls = flotilla_server::pki::TlsOptions {
        cert: a.tls_cert,
        key: a.tls_key,
        client_ca: a.client_ca,
        names: a.tls_names,
    };
    cfg.device_cert_lifetime_secs = a.device_cert_lifetime as i64;
    cfg.retention = flotilla_server::config::Retention {
        events_secs: a.retain_events,
        drift_secs: a.retain_drift,
        samples_secs: a.retain_samples,
    };
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
