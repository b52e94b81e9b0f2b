//! The bake period on the device: a model that crosses its bundle's thresholds while baking is
//! rolled back by the agent itself; one that bakes cleanly lets the agent prune every blob but
//! the active and previous versions'.

use std::time::Duration;

use flotilla_demo::{Fleet, digits};

const T: Duration = Duration::from_secs(60);

fn build(fleet: &Fleet, version: u64, model: &[u8], tune: impl FnOnce(&mut flotilla_builder::BuildOptions)) -> Vec<u8> {
    let samples = digits::samples();
    let mut opts = flotilla_builder::BuildOptions::new("digits", version, model.to_vec(), flotilla_demo::unix_now());
    opts.golden = digits::golden(&samples[..2]);
    tune(&mut opts);
    flotilla_demo::sign(&flotilla_builder::build(&opts).unwrap().bytes, &fleet.key).unwrap()
}

async fn install(fleet: &Fleet, bundle: Vec<u8>, version: u64) {
    fleet.push(bundle).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout(&format!("digits@{version}")).await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_over_its_latency_threshold_while_baking_is_rolled_back_by_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    install(&fleet, build(&fleet, 1, digits::MODEL, |o| o.bake_secs = Some(0)), 1).await;
    // v2 passes its self-test but promises a p95 of 1 µs, which no real inference meets.
    install(
        &fleet,
        build(&fleet, 2, digits::MODEL_INT8, |o| {
            o.bake_secs = Some(3600);
            o.max_latency_p95_us = Some(1);
        }),
        2,
    )
    .await;
    let samples = digits::samples();
    let request = digits::request(&samples[..1]);
    let mut versions = Vec::new();
    for _ in 0..40 {
        versions.push(fleet.infer("dev-0", "digits", &request).await.unwrap().model_version);
    }
    assert_eq!(versions[0], "2");
    fleet
        .wait_for(T, || async { Ok(fleet.events("dev-0").await?.iter().any(|e| e.kind == "model_rolled_back")) })
        .await
        .unwrap();
    let events = fleet.events("dev-0").await.unwrap();
    let e = events.iter().find(|e| e.kind == "model_rolled_back").unwrap();
    assert_eq!((e.detail["from_version"].as_u64(), e.detail["to_version"].as_u64()), (Some(2), Some(1)));
    assert!(e.detail["reason"].as_str().unwrap().contains("p95 latency"), "{e:?}");
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1");
    assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    fleet
        .wait_for(T, || async {
            Ok(fleet.devices().await?[0].models.iter().any(|m| m.version == 1 && m.status == "active"))
        })
        .await
        .unwrap();
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_clean_bake_only_the_active_and_previous_versions_stay_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let blobs = dir.path().join("agents/dev-0/blobs/sha256");
    let holds = |content: &[u8]| {
        std::fs::read_dir(&blobs).unwrap().flatten().any(|e| std::fs::read(e.path()).unwrap() == content)
    };
    let models = [digits::MODEL, digits::MODEL_INT8, digits::MODEL_WIDE];
    for (i, model) in models.iter().enumerate() {
        let version = i as u64 + 1;
        install(&fleet, build(&fleet, version, model, |o| o.bake_secs = Some(0)), version).await;
    }
    // v3 bakes at once (bake 0): v1 is neither active nor previous any more.
    fleet
        .wait_for(T, || async {
            Ok(fleet.devices().await?[0].models.iter().any(|m| m.version == 3 && m.status == "active"))
        })
        .await
        .unwrap();
    fleet.wait_for(T, || async { Ok(!holds(digits::MODEL)) }).await.unwrap();
    assert!(holds(digits::MODEL_INT8), "the previous version stays");
    assert!(holds(digits::MODEL_WIDE), "the active version stays");
    let samples = digits::samples();
    assert_eq!(fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap().model_version, "3");
    fleet.shutdown().await;
}
