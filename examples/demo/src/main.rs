//! The Flotilla demo: a control plane with its embedded broker and SQLite store, N real agents
//! in-process with their own data directories, a signed bundle built from the committed digits
//! CNN, rolled out over MQTT, then real inputs sent through each agent's inference API.

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_builder::BuildOptions;
use flotilla_builder::baseline::DriftOptions;
use flotilla_demo::{Fleet, digits};
use flotilla_drift::{DriftConfig, Window};

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
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "warn,rumqttc=error,rmqtt=error,rmqtt_net=error,flotilla_server::drift=error".into()
            }),
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

    // Half the fleet is in the lab, half in the field (server-side tags, `flotilla devices tag`).
    let ids: Vec<String> = fleet.agents.iter().map(|(id, _)| id.clone()).collect();
    let groups: Vec<(&str, &str)> =
        ids.iter().enumerate().map(|(i, id)| (id.as_str(), if i % 2 == 0 { "lab" } else { "field" })).collect();
    for (id, g) in &groups {
        fleet.tag(id, "group", g).await?;
    }
    step(format!("tagged {}", groups.iter().map(|(id, g)| format!("{id} group={g}")).collect::<Vec<_>>().join(", ")));

    let samples = digits::samples();
    let mut opts = BuildOptions::new("digits", 1, digits::MODEL.to_vec(), flotilla_demo::unix_now());
    opts.golden = digits::golden(&samples[..4]);
    let drift = DriftConfig { window: Window::Seconds(DRIFT_WINDOW_SECS), ..DriftConfig::default() };
    opts.drift = Some((digits::baseline_reference(), DriftOptions { config: drift, ..DriftOptions::default() }));
    let bundle = fleet.build_signed(&opts)?;
    step(format!(
        "built and signed digits@1 ({} bytes, 4 golden self-test cases, drift baseline of 450 held-out images, key {})",
        bundle.len(),
        &fleet.key.key_id().0[..16]
    ));
    let pushed = fleet.push(bundle).await?;
    step(format!("pushed bundle {}", &pushed.id[..16]));

    // Staged: one canary device, then the rest, each wave gated on every install succeeding.
    let plan = serde_json::json!({
        "waves": [{"count": 1}, {"percent": 100.0}],
        "bake_secs": 1,
        "gates": [flotilla_rollout::Gate::parse("install_success>=1")?],
        "on_failure": "rollback",
    });
    let id = fleet.start_rollout_with("digits@1", plan).await?;
    step(format!("rollout {id} started: waves 1 device, then 100%; gate install_success>=1; bake 1 s"));
    let r = fleet.wait_rollout(&id, Duration::from_secs(120)).await?;
    for (i, w) in r.waves.iter().enumerate() {
        println!(
            "          wave {} ({}): {} of {} succeeded, gates {}",
            i + 1,
            w.spec,
            w.succeeded,
            w.size,
            w.gates
                .iter()
                .map(|g| format!("{} {}", g.name, if g.passed { "passed" } else { "failed" }))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
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

    all_ok &= drift_phase(&fleet, &groups, &step).await?;
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

const DRIFT_WINDOW_SECS: u64 = 2;

/// The lab keeps seeing images like the training data; the field's camera changed and its
/// images come inverted. Every device computes drift sketches on its own; the control plane
/// merges them per group and alerts for the field only.
async fn drift_phase(fleet: &Fleet, groups: &[(&str, &str)], step: &impl Fn(String)) -> anyhow::Result<bool> {
    let images = digits::baseline_images();
    step(format!(
        "drift phase: lab devices see held-out images, field devices see them inverted ({} s windows)",
        DRIFT_WINDOW_SECS
    ));
    let start = Instant::now();
    let mut k = 0usize;
    while start.elapsed() < Duration::from_secs(3 * DRIFT_WINDOW_SECS) {
        for (i, (id, g)) in groups.iter().enumerate() {
            let batch: Vec<Vec<f32>> = (0..8)
                .map(|j| {
                    let img = &images[(k * 8 + j + i * 97) % images.len()];
                    if *g == "field" { digits::inverted(img) } else { img.clone() }
                })
                .collect();
            fleet.infer(id, "digits", &digits::images_request(&batch)).await?;
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let field = groups.iter().any(|(_, g)| *g == "field");
    let alerted = fleet
        .wait_for(Duration::from_secs(30), || async {
            Ok(!field || fleet.alerts().await?.iter().any(|a| a.cohort == "group=field"))
        })
        .await
        .is_ok();
    tokio::time::sleep(Duration::from_secs(DRIFT_WINDOW_SECS)).await;
    let rows = fleet.drift("digits", "&version=1").await?;
    step("per-group drift of digits@1 (GET /api/v1/drift, `flotilla drift show --model digits`):".into());
    println!(
        "          {:<12} {:<11} {:<20} {:>6} {:>7} {:>6} {:>6}  alert",
        "cohort", "signal", "window end", "count", "psi", "js", "ks"
    );
    for r in rows.iter().filter(|r| (r.signal == "input.c0" || r.signal == "class") && r.count >= 100) {
        let n = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.3}"));
        println!(
            "          {:<12} {:<11} {:<20} {:>6} {:>7} {:>6} {:>6}  {}",
            r.cohort,
            r.signal,
            r.window_end,
            r.count,
            n(r.psi),
            n(r.js),
            n(r.ks),
            if r.alert { "ALERT" } else { "" }
        );
    }
    let alerts = fleet.alerts().await?;
    for a in &alerts {
        println!(
            "          alert {}: {} {} {}={:.2} > {} for {} windows",
            a.id,
            a.cohort,
            a.signal,
            a.metrics.join(","),
            a.value.unwrap_or(f64::NAN),
            a.threshold.unwrap_or(f64::NAN),
            a.windows
        );
    }
    let lab_quiet = alerts.iter().all(|a| a.cohort != "group=lab");
    step(if alerted && lab_quiet {
        "drift: the field group raised an alert, the lab group stayed quiet".into()
    } else {
        format!("drift: unexpected alerts (field alerted: {alerted}, lab quiet: {lab_quiet})")
    });
    Ok(alerted && lab_quiet)
}

fn fmt(v: &[usize]) -> String {
    v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
}
