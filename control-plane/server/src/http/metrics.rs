//! `GET /metrics` (viewer token): the control plane in Prometheus text format: devices online,
//! rollouts by state, drift alerts firing, retraining jobs by state, MQTT messages in and out,
//! bundle bytes served per transport, and the store's latency.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::service::Fleet;
use crate::service::metrics::{Snapshot, snapshot};

pub async fn render(State(f): State<Arc<Fleet>>) -> Response {
    match snapshot(&f).await {
        Ok(s) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text(&s)).into_response(),
        Err(e) => super::Error::from(e).into_response(),
    }
}

fn text(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let by_state = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v as f64)).collect::<Vec<_>>()
    };
    gauge(
        "flotilla_devices",
        "Registered devices by connection state.",
        "gauge",
        vec![
            ("{state=\"online\"}".into(), s.devices_online as f64),
            ("{state=\"offline\"}".into(), s.devices_offline as f64),
        ],
    );
    gauge("flotilla_rollouts", "Rollouts by state.", "gauge", by_state(&s.rollouts));
    gauge(
        "flotilla_drift_alerts_firing",
        "Drift alerts firing.",
        "gauge",
        vec![(String::new(), s.alerts_firing as f64)],
    );
    gauge("flotilla_retrain_jobs", "Retraining jobs by state.", "gauge", by_state(&s.jobs));
    gauge(
        "flotilla_mqtt_messages_total",
        "MQTT publishes the control plane received from and sent to devices.",
        "counter",
        vec![("{direction=\"in\"}".into(), s.mqtt_in as f64), ("{direction=\"out\"}".into(), s.mqtt_out as f64)],
    );
    gauge(
        "flotilla_device_messages_total",
        "Device messages handled to the end, and given up (undecodable, queue full, store away too long).",
        "counter",
        vec![("{outcome=\"handled\"}".into(), s.ingested as f64), ("{outcome=\"dropped\"}".into(), s.dropped as f64)],
    );
    gauge(
        "flotilla_device_messages_handled_total",
        "Device messages handled to the end, per channel.",
        "counter",
        s.handled.iter().map(|(ch, n)| (format!("{{channel=\"{ch}\"}}"), *n as f64)).collect(),
    );
    gauge(
        "flotilla_device_messages_pending",
        "Device messages received and not yet handled (the ingest backlog).",
        "gauge",
        vec![(String::new(), s.mqtt_in.saturating_sub(s.ingested + s.dropped) as f64)],
    );
    gauge(
        "flotilla_bundle_bytes_served_total",
        "Bundle bytes served to devices, per transport.",
        "counter",
        vec![
            ("{transport=\"http\"}".into(), s.served_http as f64),
            ("{transport=\"mqtt\"}".into(), s.served_mqtt as f64),
        ],
    );
    let l = &s.store_latency;
    let _ = writeln!(
        out,
        "# HELP flotilla_store_latency_seconds Time of each store operation ({}), lock wait included.\n# TYPE flotilla_store_latency_seconds histogram",
        s.store_backend
    );
    let mut cumulative = 0;
    for (le, n) in &l.buckets {
        cumulative += n;
        let _ = writeln!(out, "flotilla_store_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "flotilla_store_latency_seconds_bucket{{le=\"+Inf\"}} {}", l.count);
    let _ = writeln!(out, "flotilla_store_latency_seconds_sum {}", l.seconds);
    let _ = writeln!(out, "flotilla_store_latency_seconds_count {}", l.count);
    out
}
