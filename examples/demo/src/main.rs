//! The Flotilla demo, the whole story on one machine: a control plane with its embedded broker
//! and SQLite store and N real agents in-process, each with its own data directory.
//!
//! v1 of a digits classifier rolls out in gated waves → the field half of the fleet starts
//! seeing brighter images → every device sketches its inputs and outputs, the control plane
//! merges them per group and raises an alert for the field → the retraining policy collects the
//! field devices' labelled samples → the trainer (this binary, `flotilla-demo trainer train`)
//! retrains the last layer → the candidate must beat v1 on held-out field samples and keep its
//! accuracy on clean images → the server builds v2, signs it with its automation key and rolls
//! it out to the field in gated waves → drift on the field is back under the threshold.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use flotilla_api::v1::{DriftRow, RetrainPolicy, Rollout};
use flotilla_builder::BuildOptions;
use flotilla_builder::baseline::DriftOptions;
use flotilla_demo::{Fleet, digits};
use flotilla_drift::{DriftConfig, SamplePolicy, Window};
use serde_json::json;

/// Run Flotilla's whole loop on this machine: staged rollout, drift, retraining, and the
/// retrained model's staged rollout. Prints a timeline and exits 0 when every step did what it
/// should.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Number of simulated devices (real agents, in-process); half are in the lab, half in the
    /// field.
    #[arg(long, default_value_t = 6)]
    devices: usize,
    /// Keep the working directory (server and agent data) instead of deleting it.
    #[arg(long)]
    keep_dir: bool,
    /// Leave the control plane and agents running at the end (for the console and the CLI)
    /// until Ctrl-C; implies --keep-dir.
    #[arg(long)]
    keep: bool,
    /// Write the story as JSON: rollouts, the alert, the retraining job, v1's and v2's accuracy
    /// on drifted data, and the drift metric before and after.
    #[arg(long, value_name = "FILE")]
    summary: Option<std::path::PathBuf>,
}

fn main() {
    // The control plane runs this binary as its trainer command.
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "trainer") {
        let _ = argv.next();
        if let Err(e) = flotilla_trainer::cli::run(argv) {
            eprintln!("flotilla-demo trainer: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            "warn,rumqttc=error,rmqtt=error,rmqtt_net=error,flotilla_server::service::drift=error".into()
        }))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match rt.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => std::process::exit(2),
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            std::process::exit(1);
        }
    }
}

const DRIFT_WINDOW_SECS: u64 = 2;
const PSI_THRESHOLD: f64 = 0.2;
/// The signal the story follows: the mean brightness of the input image.
const SIGNAL: &str = "input.c0";

/// Prints timestamped steps and keeps them for the summary.
struct Timeline {
    t0: Instant,
    events: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl Timeline {
    fn step(&self, msg: impl Into<String>) {
        let msg = msg.into();
        let t = self.t0.elapsed().as_secs_f64();
        println!("[{t:>6.1}s] {msg}");
        self.events.lock().expect("timeline").push(json!({ "t": (t * 10.0).round() / 10.0, "event": msg }));
    }

    fn detail(&self, msg: impl AsRef<str>) {
        println!("          {}", msg.as_ref());
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let tl = Arc::new(Timeline { t0: Instant::now(), events: Default::default() });
    let tmp = tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?;
    let keep_dir = args.keep_dir || args.keep;
    let dir = if keep_dir { tmp.keep() } else { tmp.path().to_path_buf() };

    let fleet = Arc::new(Fleet::start(&dir, args.devices.max(2)).await?);
    tl.step(format!(
        "control plane up: {} , embedded MQTT broker {} , store {}",
        fleet.server.api_url(),
        fleet.server.mqtt_url(),
        dir.join("server/fleet.db").display()
    ));
    if let Some(ca) = fleet.server.ca_path() {
        tl.detail(format!(
            "fleet CA {} (devices and the CLI pin it); every device holds a certificate for its id",
            ca.display()
        ));
    }
    let ids: Vec<String> = fleet.agents.iter().map(|(id, _)| id.clone()).collect();
    tl.step(format!("{} agents connected over mutual TLS: {}", ids.len(), ids.join(", ")));

    // Half the fleet is in the lab, half in the field (server-side tags, `flotilla devices tag`).
    let groups: Vec<(String, &str)> =
        ids.iter().enumerate().map(|(i, id)| (id.clone(), if i % 2 == 0 { "lab" } else { "field" })).collect();
    for (id, g) in &groups {
        fleet.tag(id, "group", g).await?;
    }
    let members = |g: &str| groups.iter().filter(|(_, x)| *x == g).map(|(id, _)| id.as_str()).collect::<Vec<_>>();
    tl.step(format!("tagged group=lab: {} ; group=field: {}", members("lab").join(", "), members("field").join(", ")));

    // The operator's retraining policy (`flotilla retrain policy set`).
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let (images, labels) = (digits::baseline_images(), digits::baseline_labels());
    let training_data = data_dir.join("digits-train.json");
    std::fs::write(&training_data, digits::labelled_requests(&images[..300], &labels[..300], 30).to_string())?;
    let clean_heldout = data_dir.join("digits-clean-heldout.json");
    std::fs::write(&clean_heldout, digits::labelled_requests(&images[300..], &labels[300..], 30).to_string())?;
    let exe = std::env::current_exe()?.to_string_lossy().into_owned();
    let policy: RetrainPolicy = serde_json::from_value(json!({
        "model": "digits",
        "trigger": { "on_alert": true },
        "data": { "training_data": training_data, "min_labelled": 200, "collect_secs": 30, "holdout": 0.3 },
        "trainer": { "command": [exe, "trainer", "train"], "timeout_secs": 600 },
        "evaluation": {
            "metric": "accuracy", "heldout": "samples", "min_improvement": 0.05,
            "guard": [clean_heldout], "max_regression": 0.03
        },
        "rollout": {
            "approval": "auto",
            "baseline": "samples",
            "plan": {
                "waves": ["1", "100%"], "bake_secs": 2, "on_failure": "rollback",
                // The drift gate takes the worst signal; PSI of the binary accuracy signal against
                // a near-perfect baseline reads 0.1-0.3 from a few percent of errors, hence 0.5
                // (v1's field drift was over 10).
                "gates": ["install_success>=1", "error_rate<=0.01", "psi<=0.5"],
                "gate_timeout_secs": 60
            }
        }
    }))?;
    fleet.set_retrain_policy(&policy).await?;
    tl.step(
        "retraining policy for digits: on a drift alert, take the alerting group's labelled samples, run \
         `flotilla-demo trainer train` (last layer, with the clean training data), require +0.05 accuracy on \
         held-out field samples and at most -0.03 on clean images, then roll out in 2 gated waves",
    );

    // v1: built with a drift baseline and a reservoir sample, signed by the operator.
    let samples = digits::samples();
    let mut opts = BuildOptions::new("digits", 1, digits::MODEL.to_vec(), flotilla_demo::unix_now());
    opts.golden = digits::golden(&samples[..4]);
    let drift = DriftConfig {
        window: Window::Seconds(DRIFT_WINDOW_SECS),
        sample: Some(SamplePolicy { size: 256 }),
        ..DriftConfig::default()
    };
    opts.drift = Some((digits::baseline_reference(), DriftOptions { config: drift, ..DriftOptions::default() }));
    let bundle = fleet.build_signed(&opts)?;
    tl.step(format!(
        "built and signed digits@1 ({} bytes, 4 golden self-test cases, drift baseline of {} held-out images, key {})",
        bundle.len(),
        images.len(),
        &fleet.key.key_id().0[..16]
    ));
    let pushed = fleet.push(bundle).await?;
    tl.step(format!("pushed bundle {}", &pushed.id[..16]));

    // Staged: one canary device, then the rest, each wave gated on every install succeeding.
    let plan = json!({
        "waves": [{"count": 1}, {"percent": 100.0}],
        "bake_secs": 1,
        "gates": ["install_success>=1"],
        "on_failure": "rollback",
    });
    let v1_rollout = fleet.start_rollout_with("digits@1", plan).await?;
    tl.step(format!("rollout {v1_rollout} of digits@1: waves 1 device, then 100%; gate install_success>=1"));
    let r1 = fleet.wait_rollout(&v1_rollout, Duration::from_secs(120)).await?;
    print_waves(&tl, &r1);
    tl.step(format!("rollout {}: {} of {} devices succeeded, {} failed", r1.state, r1.succeeded, r1.total, r1.failed));
    let mut ok = r1.state == "completed" && r1.failed == 0;

    let truth: Vec<usize> = samples.iter().map(|s| s.label).collect();
    tl.detail(format!("labels      {}", fmt(&truth)));
    for id in &ids {
        let resp = fleet.infer(id, "digits", &digits::request(&samples)).await?;
        let got = digits::classes(&resp.outputs[0].data);
        let correct = got.iter().zip(&truth).filter(|(a, b)| a == b).count();
        ok &= correct == truth.len();
        tl.detail(format!(
            "{id:<8}    {}  {correct}/{} correct (digits@{})",
            fmt(&got),
            truth.len(),
            resp.model_version
        ));
    }
    tl.step(format!("asked every device {} held-out digits through POST /v2/models/digits/infer", truth.len()));

    // Traffic: apps on every device send images and, later, the true labels (feedback).
    tl.step(format!(
        "traffic: lab devices see images like the training data; the field's cameras changed exposure \
         (x' = 0.6x + 0.35 + noise); apps send feedback labels ({DRIFT_WINDOW_SECS} s drift windows)"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn(traffic(fleet.clone(), groups.clone(), stop.clone(), sent.clone()));

    let alert = wait_alert(&fleet).await;
    let field_alert = alert.as_ref().map(|a| a.cohort == "group=field").unwrap_or(false);
    if let Some(a) = &alert {
        tl.step(format!(
            "ALERT {}: {} {} {}={:.2} > {} for {} windows on digits@{}",
            a.id,
            a.cohort,
            a.signal,
            a.metrics.join(","),
            a.value.unwrap_or(f64::NAN),
            a.threshold.unwrap_or(f64::NAN),
            a.windows,
            a.version
        ));
    } else {
        tl.step("no drift alert within 60 s");
    }
    let v1_rows = fleet.drift("digits", "&version=1").await?;
    print_drift(&tl, "per-group drift of digits@1 (`flotilla drift show --model digits --version 1`):", &v1_rows);
    let lab_quiet = fleet.alerts().await?.iter().all(|a| a.cohort != "group=lab");
    ok &= field_alert && lab_quiet;
    let before = worst(&v1_rows, "group=field", SIGNAL);

    // The policy reacts: a job collects, trains, evaluates, builds, signs and rolls out.
    let mut job = None;
    if field_alert {
        fleet
            .wait_for(Duration::from_secs(30), || async { Ok(!fleet.retrain_jobs().await?.is_empty()) })
            .await
            .context("waiting for the retraining job the alert should start")?;
        let id = fleet.retrain_jobs().await?[0].id.clone();
        let mut shown = 0;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let j = fleet.retrain_job(&id).await?;
            for h in j.history.iter().skip(shown) {
                let text = h.split_once("] ").map_or(h.as_str(), |(_, t)| t);
                tl.step(format!("retrain {id}: {text}"));
            }
            shown = j.history.len();
            if !flotilla_server::service::retrain::ACTIVE.contains(&j.state.as_str()) || Instant::now() > deadline {
                job = Some(j);
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let job_ok = job.as_ref().is_some_and(|j| j.state == "completed");
    ok &= job_ok;
    if let Some(j) = &job {
        for e in &j.evaluation {
            tl.detail(format!(
                "evaluation: {} on {} ({} images): digits@{} {:.3}, candidate {:.3} ({})",
                e.metric,
                if e.set == "samples" { "held-out field samples".into() } else { short(&e.set) },
                e.samples,
                j.base_version,
                e.current,
                e.candidate,
                if e.passed { "passed" } else { "failed" }
            ));
        }
        if let Some(r) = &j.rollout_id {
            print_waves(&tl, &fleet.rollout(r).await?);
        }
    }

    // Drift on the field after v2: its baseline is what the field sees now.
    let v2 = job.as_ref().and_then(|j| j.candidate_version);
    let mut after = None;
    if let (true, Some(v)) = (job_ok, v2) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_secs(DRIFT_WINDOW_SECS)).await;
            let rows = fleet.drift("digits", &format!("&version={v}&last=2")).await?;
            if let Some(x) = worst(&rows, "group=field", SIGNAL) {
                after = Some(x);
                if start.elapsed() > Duration::from_secs(2 * DRIFT_WINDOW_SECS) {
                    print_drift(&tl, &format!("per-group drift of digits@{v} (latest windows):"), &rows);
                    break;
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await??;
    let still_firing: Vec<flotilla_api::v1::DriftAlert> =
        fleet.alerts().await?.into_iter().filter(|a| a.state == "firing").collect();

    // Accuracy on brightened images no device ever saw (held-out images 300..449).
    let drifted: Vec<Vec<f32>> =
        images[300..].iter().enumerate().map(|(i, img)| digits::brightened(img, 1_000_000 + i as u64)).collect();
    let drifted_set = dataset(&drifted, &labels[300..]);
    let clean_set = dataset(&images[300..], &labels[300..]);
    let v1_acc = (
        flotilla_trainer::accuracy(digits::MODEL, &drifted_set)?,
        flotilla_trainer::accuracy(digits::MODEL, &clean_set)?,
    );
    let v2_model = match &job {
        Some(j) if job_ok => Some(candidate(&fleet, &j.id).await?),
        _ => None,
    };
    let v2_acc = match &v2_model {
        Some(m) => Some((flotilla_trainer::accuracy(m, &drifted_set)?, flotilla_trainer::accuracy(m, &clean_set)?)),
        None => None,
    };
    tl.step(format!(
        "accuracy on {} brightened images no device saw: digits@1 {:.3}{}",
        drifted.len(),
        v1_acc.0,
        v2_acc.map(|a| format!(", digits@{} {:.3}", v2.unwrap_or(2), a.0)).unwrap_or_default()
    ));
    tl.detail(format!(
        "on the same images unchanged: digits@1 {:.3}{}",
        v1_acc.1,
        v2_acc.map(|a| format!(", digits@{} {:.3}", v2.unwrap_or(2), a.1)).unwrap_or_default()
    ));
    let improved = v2_acc.is_some_and(|a| a.0 > v1_acc.0);
    let back_under = after.is_some_and(|x| x <= PSI_THRESHOLD);
    tl.step(format!(
        "drift of the field ({SIGNAL}, PSI): {} on digits@1 → {} on digits@{} (threshold {PSI_THRESHOLD})",
        before.map_or("-".into(), |x| format!("{x:.2}")),
        after.map_or("-".into(), |x| format!("{x:.3}")),
        v2.map_or("?".into(), |v| v.to_string())
    ));
    ok &= improved && back_under;

    if let Some(path) = &args.summary {
        let summary = json!({
            "ok": ok,
            "devices": ids.len(),
            "groups": { "lab": members("lab"), "field": members("field") },
            "requests_sent": sent.load(Ordering::Relaxed),
            "v1": { "bundle": "digits@1", "rollout": r1 },
            "alert": alert,
            "retrain_job": job,
            "v2": match (&job, v2) {
                (Some(j), Some(v)) => json!({
                    "bundle": format!("digits@{v}"),
                    "rollout": match &j.rollout_id { Some(r) => serde_json::to_value(fleet.rollout(r).await?)?, None => json!(null) },
                }),
                _ => json!(null),
            },
            "accuracy_on_drifted": {
                "images": drifted.len(),
                "what": "held-out digits 300..449, brightened as the field's cameras do; no device saw them",
                "v1": v1_acc.0,
                "v2": v2_acc.map(|a| a.0),
            },
            "accuracy_on_clean": { "images": clean_set.len(), "v1": v1_acc.1, "v2": v2_acc.map(|a| a.1) },
            "drift": {
                "cohort": "group=field",
                "signal": SIGNAL,
                "metric": "psi",
                "threshold": PSI_THRESHOLD,
                "before": before,
                "after": after,
                "before_version": 1,
                "after_version": v2,
            },
            "alerts_firing_at_end": still_firing,
            "timeline": *tl.events.lock().expect("timeline"),
            "elapsed_secs": tl.t0.elapsed().as_secs_f64(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        tl.detail(format!("summary written to {}", path.display()));
    }

    if args.keep {
        let token_file = dir.join("server").join("admin.token");
        println!(
            "\nThe fleet keeps running. Console: http://{addr}/ (sign in with the token in {tf}).\n\
             CLI: flotilla context add demo --server http://{addr} --token-file {tf}\n     \
             then `flotilla devices ls -l`, `rollout ls`, `retrain ls`, `drift show --model digits`.\n\
             Data in {dir}. Ctrl-C to stop.",
            addr = fleet.server.http_addr,
            tf = token_file.display(),
            dir = dir.display()
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    match Arc::try_unwrap(fleet) {
        Ok(f) => f.shutdown().await,
        Err(_) => anyhow::bail!("the fleet is still in use"),
    }
    if keep_dir {
        println!("kept {}", dir.display());
    }
    tl.step(if ok {
        "demo finished: v1 rolled out, the field drifted, the retrained model beat v1 and rolled out, drift is back under the threshold"
    } else {
        "demo finished with errors"
    });
    Ok(ok)
}

/// Send traffic until `stop`: each device gets batches of 8 images every 100 ms (lab: as in
/// training; field: brightened) and the apps report each request's true labels.
async fn traffic(
    fleet: Arc<Fleet>,
    groups: Vec<(String, &'static str)>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let (images, labels) = (digits::baseline_images(), digits::baseline_labels());
    // Traffic uses images 0..299 only; 300..449 stay unseen for the final evaluation.
    let pool = 300;
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, (id, g)) in groups.iter().enumerate() {
            let picks: Vec<usize> = (0..8).map(|j| ((k * 8 + j + i as u64 * 97) % pool) as usize).collect();
            let batch: Vec<Vec<f32>> = picks
                .iter()
                .map(|&p| {
                    if *g == "field" { digits::brightened(&images[p], k * 1000 + p as u64) } else { images[p].clone() }
                })
                .collect();
            // A device may be installing; a failed request is an app's retry, not the demo's end.
            let Ok(resp) = fleet.infer(id, "digits", &digits::images_request(&batch)).await else { continue };
            sent.fetch_add(1, Ordering::Relaxed);
            if let Some(rid) = &resp.id {
                let truth: Vec<u32> = picks.iter().map(|&p| labels[p]).collect();
                let _ = fleet.feedback(id, "digits", rid, &truth).await;
            }
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn wait_alert(fleet: &Fleet) -> Option<flotilla_api::v1::DriftAlert> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(alerts) = fleet.alerts().await
            && let Some(a) = alerts.into_iter().find(|a| a.state == "firing")
        {
            return Some(a);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// The candidate model of a job (`GET /api/v1/retrain/jobs/{id}/files/candidate-model`).
async fn candidate(fleet: &Fleet, job: &str) -> anyhow::Result<Vec<u8>> {
    let url = format!("{}/api/v1/retrain/jobs/{job}/files/candidate-model", fleet.api());
    let r = fleet.http.get(url).send().await?;
    anyhow::ensure!(r.status().is_success(), "fetching the candidate: HTTP {}", r.status());
    Ok(r.bytes().await?.to_vec())
}

fn dataset(images: &[Vec<f32>], labels: &[u32]) -> flotilla_trainer::Dataset {
    flotilla_trainer::Dataset {
        input: "input".into(),
        sample_shape: vec![1, 8, 8],
        values: images.concat(),
        labels: labels.to_vec(),
    }
}

/// The highest PSI of a signal in a cohort's scored windows.
fn worst(rows: &[DriftRow], cohort: &str, signal: &str) -> Option<f64> {
    rows.iter()
        .filter(|r| r.cohort == cohort && r.signal == signal)
        .filter_map(|r| r.psi)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
}

fn print_waves(tl: &Timeline, r: &Rollout) {
    for (i, w) in r.waves.iter().enumerate() {
        let gates: Vec<String> = w
            .gates
            .iter()
            .map(|g| {
                let v = g.value.map_or("-".into(), |v| format!("{v:.3}"));
                format!("{} {} ({v})", g.name, if g.passed { "passed" } else { "FAILED" })
            })
            .collect();
        tl.detail(format!(
            "wave {} ({}): {} of {} succeeded, gates {}",
            i + 1,
            w.spec,
            w.succeeded,
            w.size,
            gates.join(", ")
        ));
    }
}

fn print_drift(tl: &Timeline, title: &str, rows: &[DriftRow]) {
    tl.step(title.to_string());
    tl.detail(format!(
        "{:<12} {:<11} {:<20} {:>6} {:>7} {:>6} {:>6}  alert",
        "cohort", "signal", "window end", "count", "psi", "js", "ks"
    ));
    for r in rows.iter().filter(|r| (r.signal == SIGNAL || r.signal == "class") && r.count >= 100) {
        let n = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.3}"));
        tl.detail(format!(
            "{:<12} {:<11} {:<20} {:>6} {:>7} {:>6} {:>6}  {}",
            r.cohort,
            r.signal,
            r.window_end,
            r.count,
            n(r.psi),
            n(r.js),
            n(r.ks),
            if r.alert { "ALERT" } else { "" }
        ));
    }
}

fn short(path: &str) -> String {
    std::path::Path::new(path).file_name().map_or(path.into(), |f| f.to_string_lossy().into_owned())
}

fn fmt(v: &[usize]) -> String {
    v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ")
}
