//! The Flotilla demo: a control plane with its embedded broker and SQLite store, N real agents
//! in-process with their own data directories, a signed bundle built from the committed digits
//! CNN, rolled out over MQTT, then real inputs sent through each agent's inference API.

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_demo::{Fleet, digits};

/// Run a whole rollout on this machine and print what the devices answer.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Number of simulated devices (real agents, in-process).
    #[arg(long, default_value_t = 5)]
    devices: usize,
    /// Keep the working directory (server and agent data) instead of deleting it.
    #[arg(long)]
    keep_dir: bool,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttc=error,rmqtt=error,rmqtt_net=error".into()),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let t0 = Instant::now();
    let step = |msg: String| println!("[{:>6.2}s] {msg}", t0.elapsed().as_secs_f64());
    let tmp = tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?;
    let dir = if args.keep_dir { tmp.keep() } else { tmp.path().to_path_buf() };

    let fleet = Fleet::start(&dir, args.devices).await?;
    step(format!(
        "control plane up: HTTP {} , embedded MQTT broker {} , store {}",
        fleet.server.http_addr,
        fleet.server.mqtt_addr,
        dir.join("server/fleet.db").display()
    ));
    step(format!(
        "{} agents connected: {}",
        fleet.agents.len(),
        fleet.agents.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>().join(", ")
    ));

    let samples = digits::samples();
    let bundle = fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..4]))?;
    step(format!(
        "built and signed digits@1 ({} bytes, 4 golden self-test cases, key {})",
        bundle.len(),
        &fleet.key.key_id().0[..16]
    ));
    let pushed = fleet.push(bundle).await?;
    step(format!("pushed bundle {}", &pushed.id[..16]));

    let id = fleet.start_rollout("digits@1").await?;
    step(format!("rollout {id} started"));
    let r = fleet.wait_rollout(&id, Duration::from_secs(120)).await?;
    step(format!("rollout {}: {} of {} devices succeeded, {} failed", r.state, r.succeeded, r.total, r.failed));
    for d in &r.devices {
        println!(
            "          {:<8} {}{}",
            d.device,
            d.state,
            d.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }

    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    println!("          labels      {}", fmt(&labels));
    let mut all_ok = r.failed == 0;
    for (device, _) in &fleet.agents {
        let meta = fleet.model_metadata(device, "digits").await?;
        let resp = fleet.infer(device, "digits", &digits::request(&samples)).await?;
        let got = digits::classes(&resp.outputs[0].data);
        let correct = got.iter().zip(&labels).filter(|(a, b)| a == b).count();
        all_ok &= correct == labels.len();
        println!(
            "          {device:<8}    {}  {correct}/{} correct (digits@{} on {})",
            fmt(&got),
            labels.len(),
            resp.model_version,
            meta.platform
        );
    }
    step(format!("asked every device {} held-out digits through POST /v2/models/digits/infer", labels.len()));
    fleet.shutdown().await;
    if args.keep_dir {
        println!("kept {}", dir.display());
    }
    step(if all_ok {
        "demo finished: every device installed the bundle and answered correctly".into()
    } else {
        "demo finished with errors".into()
    });
    Ok(all_ok)
}

fn fmt(v: &[usize]) -> String {
    v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
}
