//! The retraining loop end to end on a real fleet: agents running digits@1 see brightened
//! images and send feedback labels; a retraining job collects their reservoir samples, runs a
//! real trainer (this crate's binary, a shell command, or an external pipeline behind a webhook),
//! scores the candidate against v1, and only a better model is built, signed and rolled out.

use std::time::Duration;

use flotilla_api::v1::{RetrainJob, RetrainPolicy};
use flotilla_builder::BuildOptions;
use flotilla_builder::baseline::DriftOptions;
use flotilla_demo::{Fleet, FleetOptions, digits, unix_now};
use flotilla_drift::{DriftConfig, SamplePolicy, Window};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const TRAINER: &str = env!("CARGO_BIN_EXE_flotilla-trainer");

/// A fleet of `n` field devices running digits@1 (with a reservoir sample), after each sent
/// `requests` batches of 8 brightened images with their labels.
async fn field_fleet(dir: &std::path::Path, n: usize, requests: u64, opts: FleetOptions) -> Fleet {
    let fleet = Fleet::start_with(dir, n, opts).await.unwrap();
    let ids: Vec<String> = fleet.agents.iter().map(|(id, _)| id.clone()).collect();
    for id in &ids {
        fleet.tag(id, "group", "field").await.unwrap();
    }
    let mut b = BuildOptions::new("digits", 1, digits::MODEL.to_vec(), unix_now());
    b.golden = digits::golden(&digits::samples()[..2]);
    let config = DriftConfig {
        window: Window::Seconds(3600),
        sample: Some(SamplePolicy { size: 512 }),
        ..DriftConfig::default()
    };
    b.drift = Some((digits::baseline_reference(), DriftOptions { config, ..DriftOptions::default() }));
    // Signed by both targets keys, whatever the threshold.
    let signed = flotilla_demo::sign(&fleet.build_signed(&b).unwrap(), &fleet.automation_key).unwrap();
    fleet.push(signed).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    let (images, labels) = (digits::baseline_images(), digits::baseline_labels());
    for k in 0..requests {
        for (i, id) in ids.iter().enumerate() {
            let picks: Vec<usize> = (0..8).map(|j| ((k * 8 + j + i as u64 * 131) % 300) as usize).collect();
            let batch: Vec<Vec<f32>> = picks
                .iter()
                .map(|&p| digits::brightened(&images[p], k * 7919 + i as u64 * 104729 + p as u64))
                .collect();
            let resp = fleet.infer(id, "digits", &digits::images_request(&batch)).await.unwrap();
            let truth: Vec<u32> = picks.iter().map(|&p| labels[p]).collect();
            fleet.feedback(id, "digits", resp.id.as_deref().unwrap(), &truth).await.unwrap();
        }
    }
    fleet
}

fn policy(trainer: serde_json::Value, extra: serde_json::Value) -> RetrainPolicy {
    let mut p = json!({
        "model": "digits",
        "trigger": { "on_alert": false },
        "data": { "min_labelled": 100, "collect_secs": 30 },
        "trainer": trainer,
        "evaluation": { "min_improvement": 0.05 },
        "rollout": { "plan": { "waves": ["1", "100%"], "gates": ["install_success>=1"], "on_failure": "rollback" } },
    });
    merge(&mut p, extra);
    serde_json::from_value(p).unwrap()
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

async fn start_job(fleet: &Fleet) -> RetrainJob {
    let r = fleet
        .http
        .post(format!("{}/api/v1/retrain/jobs", fleet.api()))
        .json(&json!({ "model": "digits", "selector": "group=field" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

async fn versions(fleet: &Fleet) -> Vec<u64> {
    let mut v: Vec<u64> = fleet
        .devices()
        .await
        .unwrap()
        .iter()
        .flat_map(|d| d.models.iter().filter(|m| m.name == "digits").map(|m| m.version))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_better_model_needs_a_second_signature_then_rolls_out() {
    let dir = tempfile::tempdir().unwrap();
    // The trust root wants two targets signatures: the server's automation key is one.
    let mut fleet =
        field_fleet(dir.path(), 3, 40, FleetOptions { targets_threshold: 2, ..FleetOptions::default() }).await;
    let trainer = json!({ "command": [TRAINER, "train"] });
    fleet.set_retrain_policy(&policy(trainer, json!({}))).await.unwrap();
    let job = start_job(&fleet).await;
    assert_eq!((job.state.as_str(), job.base_version, job.selector.as_str()), ("collecting", 1, "group=field"));

    let j = fleet.wait_job(&job.id, &["awaiting_approval"], T).await.unwrap();
    let e = &j.evaluation[0];
    assert!(e.passed && e.candidate >= e.current + 0.05, "the retrained model beats v1 on held-out samples: {e:?}");
    assert!(e.samples >= 60 && j.samples_train >= 200, "{j:?}");
    assert_eq!(j.candidate_version, Some(2));
    assert!(j.reason.as_deref().unwrap().contains("approve"), "{:?}", j.reason);
    // Not pushed: the automation signature alone does not satisfy the root.
    assert!(fleet.retrain_job(&job.id).await.unwrap().rollout_id.is_none());

    // The job is in the store: a restarted control plane still has it, waiting.
    fleet.restart_server().await.unwrap();
    fleet.wait_devices_online(3).await.unwrap();
    assert_eq!(fleet.retrain_job(&job.id).await.unwrap().state, "awaiting_approval");

    // Approving without a signature is refused and says what is missing.
    let url = format!("{}/api/v1/retrain/jobs/{}/approve", fleet.api(), job.id);
    let r = fleet.http.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("signature"));
    // A bundle that is not the candidate is refused.
    let mut other = BuildOptions::new("digits", 2, digits::MODEL_WIDE.to_vec(), unix_now());
    other.golden = digits::golden(&digits::samples()[..1]);
    let other = fleet.build_signed(&other).unwrap();
    assert_eq!(fleet.http.post(&url).body(other).send().await.unwrap().status(), 409);

    // The operator signs the candidate (what `flotilla retrain approve ID --key ops.key` does).
    let cand = fleet.http.get(format!("{}/api/v1/retrain/jobs/{}/files/candidate.flb", fleet.api(), job.id));
    let cand = cand.send().await.unwrap().bytes().await.unwrap();
    let signed = flotilla_demo::sign(&cand, &fleet.key).unwrap();
    let r = fleet.http.post(&url).body(signed).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let j = fleet.wait_job(&job.id, &["completed"], T).await.unwrap();
    assert_eq!(j.signers.len(), 2, "{j:?}");
    assert_eq!(versions(&fleet).await, vec![2, 2, 2]);
    let r = fleet.rollout(j.rollout_id.as_deref().unwrap()).await.unwrap();
    assert_eq!((r.state.as_str(), r.waves.len(), r.succeeded), ("completed", 2, 3), "{r:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_candidate_that_does_not_beat_the_current_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = field_fleet(dir.path(), 2, 20, FleetOptions::default()).await;
    // A "trainer" that hands back the model it was given: no better than v1.
    let copy = json!({ "command": ["sh", "-c", "echo copying; cp \"$FLOTILLA_BASE_MODEL\" \"$FLOTILLA_OUTPUT\""] });
    fleet.set_retrain_policy(&policy(copy, json!({}))).await.unwrap();
    let job = start_job(&fleet).await;
    let err = fleet.wait_job(&job.id, &["completed"], T).await.unwrap_err().to_string();
    assert!(err.contains("rejected") && err.contains("does not beat"), "{err}");
    let j = fleet.retrain_job(&job.id).await.unwrap();
    assert_eq!(j.evaluation[0].current, j.evaluation[0].candidate);
    assert!(j.bundle.is_none() && j.rollout_id.is_none(), "{j:?}");
    let log = fleet.http.get(format!("{}/api/v1/retrain/jobs/{}/files/trainer.log", fleet.api(), job.id));
    assert!(log.send().await.unwrap().text().await.unwrap().contains("copying"));
    assert_eq!(versions(&fleet).await, vec![1, 1]);

    // Too few labels: the job fails and says where labels come from.
    let p = policy(json!({ "command": [TRAINER, "train"] }), json!({ "data": { "min_labelled": 100000 } }));
    fleet.set_retrain_policy(&p).await.unwrap();
    let job = start_job(&fleet).await;
    let err = fleet.wait_job(&job.id, &["training"], T).await.unwrap_err().to_string();
    assert!(err.contains("failed") && err.contains("feedback"), "{err}");
    // A trainer that fails: its log tail is the reason.
    let p = policy(json!({ "command": ["sh", "-c", "echo no GPU here >&2; exit 3"] }), json!({}));
    fleet.set_retrain_policy(&p).await.unwrap();
    let job = start_job(&fleet).await;
    let err = fleet.wait_job(&job.id, &["evaluating"], T).await.unwrap_err().to_string();
    assert!(err.contains("no GPU here"), "{err}");
    fleet.shutdown().await;
}

/// An external pipeline: receives the job, fetches the base model and samples over HTTP,
/// trains, and uploads the candidate.
/// It trusts the fleet CA (`ca`), as a pipeline given the fleet's CA file would.
async fn pipeline(ca: Option<std::path::PathBuf>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/train",
        post(move |axum::Json(call): axum::Json<serde_json::Value>| async move {
            tokio::spawn(async move {
                let http = flotilla_demo::client_builder(ca.as_deref()).unwrap().build().unwrap();
                let get = |u: &str| http.get(u.to_string()).send();
                let base = get(call["base_model_url"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
                let samples = get(call["samples_url"].as_str().unwrap()).await.unwrap().bytes().await.unwrap();
                let model = tokio::task::spawn_blocking(move || {
                    let data = flotilla_trainer::read_samples(&samples).unwrap();
                    flotilla_trainer::retrain(&base, &data, &Default::default()).unwrap()
                })
                .await
                .unwrap();
                let r = http.post(call["upload_url"].as_str().unwrap()).body(model).send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.text().await.unwrap());
            });
            "accepted"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_pipeline_trains_and_the_model_rolls_out_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = field_fleet(dir.path(), 2, 40, FleetOptions::default()).await;
    let (addr, server) = pipeline(fleet.server.ca_path()).await;
    let hook = json!({ "webhook": format!("http://{addr}/train") });
    fleet.set_retrain_policy(&policy(hook, json!({ "rollout": { "baseline": "previous" } }))).await.unwrap();
    let job = start_job(&fleet).await;
    let j = fleet.wait_job(&job.id, &["completed"], T).await.unwrap();
    assert!(j.history.iter().any(|h| h.contains("webhook")), "{:?}", j.history);
    assert!(j.evaluation[0].passed, "{j:?}");
    assert_eq!(versions(&fleet).await, vec![2, 2]);
    // The automation key alone signed it (threshold 1), and the server says so.
    assert_eq!(j.signers, vec![fleet.automation_key.key_id().0.clone()]);
    server.abort();
    fleet.shutdown().await;
}
