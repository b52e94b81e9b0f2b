//! Drift end to end: real agents compute sketches of what the digits model sees, send them per
//! window through their outboxes, and the control plane merges them per cohort and scores them
//! against the baseline in the bundle.
//!
//! Two devices in `group=lab` see held-out images (the baseline's own distribution); two in
//! `group=field` see the same images inverted, as a changed camera would show them. Only the
//! field group raises an alert. A fifth device (`group=offline`) is cut from the broker for
//! several windows: its reports arrive after it reconnects, and the merged counts equal the
//! images it was sent.
//!
//! Count windows (`--drift-window 100`) on a burst: two devices per group answer 500 requests
//! each within a second or two. The field group alerts within seconds of its last report, however
//! little wall-clock time the windows spanned; the lab group, with the same traffic, does not.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use flotilla_builder::BuildOptions;
use flotilla_builder::baseline::DriftOptions;
use flotilla_demo::{Fleet, FleetOptions, digits, unix_now};
use flotilla_drift::{DriftConfig, Metric, Window};
use flotilla_tests::Proxy;

const T: Duration = Duration::from_secs(60);
const WINDOW_SECS: u64 = 2;

fn drift_bundle(fleet: &Fleet) -> Vec<u8> {
    drift_bundle_with(fleet, Window::Seconds(WINDOW_SECS))
}

fn drift_bundle_with(fleet: &Fleet, window: Window) -> Vec<u8> {
    let mut opts = BuildOptions::new("digits", 1, digits::MODEL.to_vec(), unix_now());
    let config =
        DriftConfig { window, thresholds: [(Metric::Psi, 0.2)].into(), consecutive: 2, min_count: 100, sample: None };
    opts.drift = Some((digits::baseline_reference(), DriftOptions { config, ..DriftOptions::default() }));
    fleet.build_signed(&opts).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shifted_group_alerts_alone_and_offline_windows_arrive_late() {
    let dir = tempfile::tempdir().unwrap();
    shifted_group(dir.path(), FleetOptions::default()).await;
}

/// The same rollout, windows and alerts with the fleet's state in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let pg = flotilla_tests::start_postgres(&dir.path().join("pg"));
    let opts = FleetOptions { store: Some(pg.create_database("fleet")), ..FleetOptions::default() };
    shifted_group(&dir.path().join("fleet"), opts).await;
}

async fn shifted_group(dir: &std::path::Path, opts: FleetOptions) {
    let mut fleet = Fleet::start_with(dir, 0, opts).await.unwrap();
    let proxy = Proxy::start(fleet.server.mqtt_addr).await.unwrap();
    for (id, group) in
        [("lab-0", "lab"), ("lab-1", "lab"), ("field-0", "field"), ("field-1", "field"), ("off-0", "offline")]
    {
        let mut cfg = fleet.agent_config(id).await;
        cfg.tags.insert("group".into(), group.into());
        if id == "off-0" {
            cfg.broker.port = proxy.addr.port();
        }
        fleet.start_agent_with(cfg).await.unwrap();
    }
    fleet.wait_devices_online(5).await.unwrap();
    fleet.push(drift_bundle(&fleet)).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    // The offline device loses the broker before any inference.
    proxy.retarget(SocketAddr::from(([127, 0, 0, 1], 1)));
    proxy.cut_now();
    let images = digits::baseline_images();
    let inverted: Vec<Vec<f32>> = images.iter().map(|i| digits::inverted(i)).collect();

    // About four windows of traffic: a batch of 8 images per device every 100 ms.
    let mut sent_offline = 0u64;
    let start = Instant::now();
    let mut k = 0usize;
    while start.elapsed() < Duration::from_secs(4 * WINDOW_SECS) {
        let at = |set: &[Vec<f32>], shift: usize| -> Vec<Vec<f32>> {
            (0..8).map(|j| set[(k * 8 + j + shift) % set.len()].clone()).collect()
        };
        for (id, set, shift) in [
            ("lab-0", &images, 0),
            ("lab-1", &images, 225),
            ("field-0", &inverted, 0),
            ("field-1", &inverted, 225),
            ("off-0", &images, 100),
        ] {
            let resp = fleet.infer(id, "digits", &digits::images_request(&at(set, shift))).await.unwrap();
            assert!(resp.id.is_some(), "every response carries an id for feedback");
            if id == "off-0" {
                sent_offline += 8;
            }
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The field group alerts; the lab group does not.
    fleet
        .wait_for(T, || async {
            Ok(fleet.alerts().await?.iter().any(|a| a.cohort == "group=field" && a.state == "firing"))
        })
        .await
        .unwrap();
    // Let the last windows land, then judge every window each group produced.
    tokio::time::sleep(Duration::from_secs(WINDOW_SECS + 2)).await;
    let alerts = fleet.alerts().await.unwrap();
    assert!(alerts.iter().all(|a| a.cohort != "group=lab"), "{alerts:#?}");
    let field_alert = alerts.iter().find(|a| a.cohort == "group=field").unwrap();
    assert_eq!(field_alert.metrics, vec!["psi".to_string()]);
    assert!(field_alert.value.unwrap() > 0.2 && field_alert.windows >= 2, "{field_alert:?}");

    let rows = fleet.drift("digits", "&version=1").await.unwrap();
    let pixel = |cohort: &str| -> Vec<&flotilla_api::v1::DriftRow> {
        rows.iter().filter(|r| r.cohort == cohort && r.signal == "input.c0" && r.count >= 100).collect()
    };
    assert!(pixel("group=lab").len() >= 2, "{rows:#?}");
    for r in pixel("group=lab") {
        assert!(r.psi.unwrap() < 0.2 && !r.alert, "lab window drifted: {r:?}");
        assert_eq!(r.devices, 2);
    }
    assert!(pixel("group=field").iter().all(|r| r.psi.unwrap() > 1.0), "{rows:#?}");
    assert!(pixel("group=field").iter().any(|r| r.alert));
    // The mean brightness of inverted images is 1 minus the baseline's: Wasserstein says so.
    let lab_mean = pixel("group=lab")[0].mean.unwrap();
    let field = pixel("group=field")[0];
    assert!((field.mean.unwrap() - (1.0 - lab_mean)).abs() < 0.05, "{field:?} vs {lab_mean}");
    assert!(field.wasserstein.unwrap() > 0.3, "{field:?}");

    // Nothing from the offline device yet; once it reconnects, every window it made arrives.
    assert!(rows.iter().all(|r| r.cohort != "group=offline"));
    proxy.retarget(fleet.server.mqtt_addr);
    let counted = || async {
        let rows = fleet.drift("digits", "&version=1&selector=group%3Doffline").await?;
        let n: u64 = rows.iter().filter(|r| r.signal == "input.c0").map(|r| r.count).sum();
        let windows = rows.iter().filter(|r| r.signal == "input.c0").count();
        anyhow::Ok((n, windows))
    };
    fleet.wait_for(T, || async { Ok(counted().await?.0 == sent_offline) }).await.unwrap();
    let (n, windows) = counted().await.unwrap();
    assert_eq!(n, sent_offline);
    assert!(windows >= 3, "offline windows merged into {windows}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn count_windows_alert_on_a_burst_and_a_steady_group_does_not() {
    const PER_DEVICE: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start_with(dir.path(), 0, FleetOptions::default()).await.unwrap();
    for (id, group) in [("lab-0", "lab"), ("lab-1", "lab"), ("field-0", "field"), ("field-1", "field")] {
        let mut cfg = fleet.agent_config(id).await;
        cfg.tags.insert("group".into(), group.into());
        fleet.start_agent_with(cfg).await.unwrap();
    }
    fleet.wait_devices_online(4).await.unwrap();
    fleet.push(drift_bundle_with(&fleet, Window::Count(100))).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    // 500 single-image requests per device, the four devices at once: a burst of 2,000.
    let images = digits::baseline_images();
    let fleet = std::sync::Arc::new(fleet);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (id, shift, invert) in
        [("lab-0", 0, false), ("lab-1", 225, false), ("field-0", 0, true), ("field-1", 225, true)]
    {
        let (fleet, images) = (fleet.clone(), images.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_DEVICE {
                let image = &images[(k + shift) % images.len()];
                let image = if invert { digits::inverted(image) } else { image.clone() };
                fleet.infer(id, "digits", &digits::images_request(&[image])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let burst = started.elapsed();
    let last_request = Instant::now();

    // The field group alerts within seconds of its last request.
    fleet
        .wait_for(T, || async {
            Ok(fleet.alerts().await?.iter().any(|a| a.cohort == "group=field" && a.state == "firing"))
        })
        .await
        .unwrap();
    let alerted = last_request.elapsed();
    assert!(alerted < Duration::from_secs(10), "the alert took {alerted:?}");

    // Every device window (5 per device) reaches the control plane, and the counts add up.
    let windows = |cohort: &'static str| {
        let fleet = fleet.clone();
        async move {
            let rows = fleet.drift("digits", "&version=1").await?;
            let mine: Vec<flotilla_api::v1::DriftRow> =
                rows.into_iter().filter(|r| r.cohort == cohort && r.signal == "input.c0").collect();
            anyhow::Ok(mine)
        }
    };
    fleet
        .wait_for(T, || async {
            let lab: u64 = windows("group=lab").await?.iter().map(|r| r.inferences).sum();
            let field: u64 = windows("group=field").await?.iter().map(|r| r.inferences).sum();
            Ok(lab == 2 * PER_DEVICE as u64 && field == 2 * PER_DEVICE as u64)
        })
        .await
        .unwrap();
    let landed = last_request.elapsed();
    let alerts = fleet.alerts().await.unwrap();
    let field = alerts.iter().find(|a| a.cohort == "group=field" && a.state == "firing").unwrap();
    assert!(field.windows >= 2 && field.value.unwrap() > 0.2, "{field:?}");
    assert!(alerts.iter().all(|a| a.cohort != "group=lab"), "{alerts:#?}");

    let lab = windows("group=lab").await.unwrap();
    let field_rows = windows("group=field").await.unwrap();
    eprintln!(
        "burst of {} requests in {burst:?}; field alert {alerted:?} and all reports {landed:?} after it; lab windows {:?}; field windows {:?}",
        4 * PER_DEVICE,
        lab.iter().map(|r| (r.inferences, r.devices, r.psi.map(|p| (p * 1000.0).round() / 1000.0))).collect::<Vec<_>>(),
        field_rows.iter().map(|r| (r.inferences, r.devices, r.psi.map(|p| p.round()))).collect::<Vec<_>>(),
    );
    // Ten device windows per group form several cohort windows, each of at least 100
    // inferences; every one is scored.
    for rows in [&lab, &field_rows] {
        assert!(rows.len() >= 3, "{rows:#?}");
        assert!(rows.iter().all(|r| r.inferences >= 100 && r.count == r.inferences && r.psi.is_some()), "{rows:#?}");
    }
    assert!(lab.iter().all(|r| r.psi.unwrap() < 0.2 && !r.alert), "{lab:#?}");
    assert!(field_rows.iter().all(|r| r.psi.unwrap() > 1.0), "{field_rows:#?}");
    assert!(field_rows.iter().skip(1).any(|r| r.alert), "{field_rows:#?}");
    std::sync::Arc::into_inner(fleet).expect("no task holds the fleet").shutdown().await;
}
