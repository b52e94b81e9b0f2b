//! `flotilla-sim`: many simulated devices against a real control plane. See `--help`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flotilla_sim::{Download, Sim, SimConfig, parse_model_ref};

/// Simulate a fleet of Flotilla devices: each one its own MQTT connection speaking the real
/// device contract (hello, retained state and last will, install offers, rollbacks, health and
/// drift reports), without running a model. For capacity tests and for sizing a deployment.
///
/// Against a local control plane (its fleet CA in DATA_DIR/pki mints each device's certificate
/// in-process, CN = the device id, and pins the server):
///
///   flotilla-sim --broker mqtts://127.0.0.1:8883 --fleet-ca /var/lib/flotilla/pki -n 2000
///
/// Then push a bundle and start a rollout with the `flotilla` CLI: every simulated device
/// accepts the offer and reports success at once (or downloads the bundle first with
/// `--download http|mqtt`). Progress goes to stderr every few seconds; a summary (with resident
/// memory per 1000 devices) at the end, as JSON with `--json`.
///
/// Open files: each device holds one socket. The soft limit is raised to the hard limit at
/// start; the simulator says so when the devices asked for will not fit. The control plane's
/// embedded broker holds about three sockets per device over TLS (front, relay, broker).
#[derive(Parser, Debug)]
#[command(name = "flotilla-sim", version, verbatim_doc_comment)]
struct Args {
    /// Broker URL: mqtts://HOST:PORT (TLS) or mqtt://HOST:PORT (plain TCP). The control plane
    /// writes its own to DATA_DIR/endpoints.json (`mqtt`, `mqtt_scheme`).
    #[arg(long, env = "FLOTILLA_SIM_BROKER", default_value = "mqtts://127.0.0.1:8883")]
    broker: String,

    /// Number of simulated devices.
    #[arg(short = 'n', long, default_value_t = 100)]
    devices: usize,

    /// Device ids are PREFIX-NNNNN.
    #[arg(long, default_value = "sim")]
    prefix: String,

    /// Number of the first device (to run several simulators on one fleet: 0, 5000, ...).
    #[arg(long, default_value_t = 0)]
    first: usize,

    /// A tag every device reports, KEY=VALUE (repeat). Default: group=sim.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,

    /// Spread devices over K cohorts with the tag COHORT_KEY=cNN (device n in cohort n mod K;
    /// 0: no cohort tag).
    #[arg(long, default_value_t = 4)]
    cohorts: usize,

    /// Tag key of the cohorts (the server groups drift by `group` unless told otherwise).
    #[arg(long, default_value = "cohort")]
    cohort_key: String,

    /// The fleet CA's directory (ca.pem and ca.key: the server's DATA_DIR/pki). Device
    /// certificates are minted from it in-process; ca.pem also pins the server.
    #[arg(long, value_name = "DIR")]
    fleet_ca: Option<PathBuf>,

    /// CA certificate (PEM) to verify the broker and HTTP server by instead (an external broker).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,

    /// MQTT password (plain brokers that require one); the username is the device id.
    #[arg(long, env = "FLOTILLA_SIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,

    /// Lifetime of the minted device certificates, in days.
    #[arg(long, default_value_t = 30)]
    cert_days: u32,

    /// First connections started per second (0: as fast as the handshake limit allows).
    #[arg(long, default_value_t = 200.0)]
    connect_rate: f64,

    /// Connections (TCP, TLS handshake, MQTT CONNECT) in progress at once, reconnects included.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,

    /// The model every device starts with, NAME@VERSION ("none": no model).
    #[arg(long, default_value = "digits@1")]
    model: String,

    /// On an install offer: acknowledge at once (none), or really download the bundle first
    /// over HTTP Range requests (http) or MQTT chunks (mqtt), checking its size and SHA-256.
    #[arg(long, default_value = "none", value_parser = clap::value_parser!(Download))]
    download: Download,

    /// Downloads in progress at once across all devices.
    #[arg(long, default_value_t = 32)]
    download_concurrency: usize,

    /// Simulated install time without download (e.g. 2s; each device ±50 %).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    install_time: Duration,

    /// Health report period per device (0: none). Reports start at a random phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    health_every: Duration,

    /// Drift report period per device (0: none); windows are aligned to it, reports are sent at
    /// a random phase. Needs the model version's baseline profile: --drift-profile for the
    /// initial model, --drift-fetch for installed bundles; without one nothing is sent.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drift_every: Duration,

    /// Fetch each installed bundle's drift baseline (one HTTP Range request per bundle, on the
    /// offer's URL), so drift reports fit what the server scores them against.
    #[arg(long)]
    drift_fetch: bool,

    /// The initial model's drift profile (JSON, a bundle's `baseline` artifact).
    #[arg(long, value_name = "FILE")]
    drift_profile: Option<PathBuf>,

    /// Fraction of drift values drawn from the baseline's top bin (0: in distribution; 0.5
    /// makes the fleet drift and raise alerts).
    #[arg(long, default_value_t = 0.0)]
    drift_shift: f64,

    /// Simulated inferences per device per second (health counts, drift window sizes).
    #[arg(long, default_value_t = 1.0)]
    inference_rate: f64,

    /// Topic prefix (the server's --topic-prefix).
    #[arg(long, default_value = flotilla_proto::topics::DEFAULT_PREFIX)]
    topic_prefix: String,

    /// MQTT keep-alive.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    keep_alive: Duration,

    /// Clean MQTT sessions (the agent keeps persistent ones; clean ones cost the broker less).
    #[arg(long)]
    clean_session: bool,

    /// agent_version in the hello.
    #[arg(long, default_value = "sim")]
    agent_version: String,

    /// Architecture in the hello (default: this machine's).
    #[arg(long, default_value = std::env::consts::ARCH)]
    arch: String,

    /// Runtime backend in the hello, states and reports.
    #[arg(long, default_value = "tract-onnx")]
    backend: String,

    /// Run this long, then disconnect every device and exit (e.g. 90s, 10m; default: until
    /// Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Progress line period (0: none).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    progress: Duration,

    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `500ms`, `10s`, `5m`, `1h`, or bare seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 5m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: units are ms, s, m, h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn config(a: &Args) -> anyhow::Result<SimConfig> {
    let mut c = SimConfig::new(&a.broker, a.devices);
    c.first = a.first;
    c.prefix = a.prefix.clone();
    if !a.tags.is_empty() {
        c.tags = BTreeMap::new();
        for t in &a.tags {
            let (k, v) = t.split_once('=').ok_or_else(|| anyhow::anyhow!("--tag {t:?}: expected KEY=VALUE"))?;
            c.tags.insert(k.to_string(), v.to_string());
        }
    }
    c.cohorts = a.cohorts;
    c.cohort_key = a.cohort_key.clone();
    c.fleet_ca = a.fleet_ca.clone();
    c.ca = a.ca.clone();
    c.password = a.password.clone();
    c.cert_days = a.cert_days;
    c.connect_rate = a.connect_rate;
    c.connect_concurrency = a.connect_concurrency;
    c.model = match a.model.as_str() {
        "none" | "" => None,
        m => Some(parse_model_ref(m).map_err(|e| anyhow::anyhow!("--model {e}"))?),
    };
    c.download = a.download;
    c.download_concurrency = a.download_concurrency;
    c.install_time = a.install_time;
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    c.health_every = nonzero(a.health_every);
    c.drift_every = nonzero(a.drift_every);
    c.drift_fetch = a.drift_fetch;
    c.drift_profile = a.drift_profile.clone();
    c.drift_shift = a.drift_shift.clamp(0.0, 1.0);
    c.inference_rate = a.inference_rate.max(0.0);
    c.topic_prefix = a.topic_prefix.clone();
    c.keep_alive = a.keep_alive;
    c.clean_session = a.clean_session;
    c.agent_version = a.agent_version.clone();
    c.arch = a.arch.clone();
    c.backend = a.backend.clone();
    c.runtimes = vec![a.backend.clone()];
    Ok(c)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = config(&args)?;

    let limit = flotilla_sim::sys::raise_nofile();
    let need = flotilla_sim::sys::files_needed(cfg.devices, cfg.download_concurrency);
    match limit.now {
        Some(now) => {
            if limit.before != limit.now {
                eprintln!("open files: raised the soft limit from {} to {now}", limit.before.unwrap_or(0));
            }
            if need > now {
                eprintln!(
                    "warning: {} devices need about {need} open files but this process may open {now}: about {} will connect (raise the hard limit, e.g. `ulimit -Hn`, or run several simulators with --first)",
                    cfg.devices,
                    now.saturating_sub(need - cfg.devices as u64)
                );
            }
        }
        None => eprintln!("open files: unlimited"),
    }

    let n = cfg.devices;
    let sim = Sim::start(cfg).await?;
    eprintln!("simulating {n} devices against {}", args.broker);
    let stop_at = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut prev = sim.snapshot();
    let period = if args.progress.is_zero() { Duration::from_secs(3600) } else { args.progress };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: disconnecting");
                break;
            }
            _ = async {
                match stop_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                eprintln!("duration reached: disconnecting");
                break;
            }
            _ = tick.tick() => {
                let (line, now) = sim.progress_line(&prev);
                if !args.progress.is_zero() {
                    eprintln!("{line}");
                }
                prev = now;
            }
        }
    }
    let s = sim.stop().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        let secs = |v: Option<f64>| v.map(|x| format!("{x:.1}s")).unwrap_or_else(|| "never".into());
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!("devices            {}", s.last.devices);
        println!("ever connected     {} (all after {})", s.last.ever_connected, secs(s.all_connected_after_s));
        println!("registered         {} (all after {})", s.registered, secs(s.all_registered_after_s));
        println!("connect attempts   {}", s.last.connect_attempts);
        println!(
            "offers             {} (repeats {}), installs succeeded {}, failed {}, rollbacks {}, other commands {}",
            s.last.offers,
            s.last.repeated_offers,
            s.last.installs_succeeded,
            s.last.installs_failed,
            s.last.rollbacks,
            s.last.other_commands
        );
        if let (Some(a), Some(b)) = (s.first_install_after_s, s.last_install_after_s) {
            println!("installs between   {a:.1}s and {b:.1}s after start");
        }
        println!(
            "messages sent      {} ({:.0}/s): {}",
            s.last.sent_total,
            s.messages_per_s,
            s.last.sent.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
        println!(
            "downloaded         {:.1} MiB http, {:.1} MiB mqtt ({} chunks)",
            mib(s.last.bytes_http),
            mib(s.last.bytes_mqtt),
            s.last.chunks_received
        );
        if s.last.drift_without_profile > 0 {
            println!("drift not sent     {} (no baseline profile known)", s.last.drift_without_profile);
        }
        println!("errors             {}, disconnects {}", s.last.errors, s.last.disconnects);
        for (k, v) in &s.error_kinds {
            println!("  {v:>8} × {k}");
        }
        println!(
            "memory             rss {:.1} MiB now, {:.1} MiB peak, {:.1} MiB before devices; {} per 1000 devices",
            mib(s.last.rss_bytes),
            mib(s.peak_rss_bytes),
            mib(s.last.rss_base_bytes),
            s.rss_per_1000_devices_bytes.map(|b| format!("{:.1} MiB", mib(b))).unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let a = Args::parse_from(["flotilla-sim", "-n", "3", "--tag", "group=a", "--download", "mqtt"]);
        let c = config(&a).unwrap();
        assert_eq!((c.devices, c.download, c.tags["group"].as_str()), (3, Download::Mqtt, "a"));
    }
}
