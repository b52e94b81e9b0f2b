//! `GET /metrics` (viewer token): the control plane in Prometheus text format: devices online,
//! rollouts by state, drift alerts firing, retraining jobs by state, MQTT messages in and out,
//! bundle bytes served per transport, and the store's latency.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::Shared;

#[derive(Debug, Default)]
pub struct Counters {
    pub mqtt_in: AtomicU64,
    pub mqtt_out: AtomicU64,
}

pub async fn render(State(s): State<Arc<Shared>>) -> Response {
    match text(&s) {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(e) => crate::api_error::Error::from(e).into_response(),
    }
}

fn text(s: &Shared) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let devices = s.store.devices()?;
    let online = devices.iter().filter(|d| d.online).count();
    gauge(
        "flotilla_devices",
        "Registered devices by connection state.",
        "gauge",
        vec![
            ("{state=\"online\"}".into(), online as f64),
            ("{state=\"offline\"}".into(), (devices.len() - online) as f64),
        ],
    );
    let mut by_state: std::collections::BTreeMap<String, u64> =
        ["pending", "running", "paused", "completed", "aborted", "rolled_back"]
            .iter()
            .map(|k| (k.to_string(), 0))
            .collect();
    for r in s.store.rollouts()? {
        *by_state.entry(r.state).or_default() += 1;
    }
    gauge(
        "flotilla_rollouts",
        "Rollouts by state.",
        "gauge",
        by_state.into_iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), v as f64)).collect(),
    );
    gauge(
        "flotilla_drift_alerts_firing",
        "Drift alerts firing.",
        "gauge",
        vec![(String::new(), s.store.alerts(false)?.len() as f64)],
    );
    let mut jobs: std::collections::BTreeMap<String, u64> = Default::default();
    for j in crate::retrain::jobs(s)? {
        *jobs.entry(j.job.state).or_default() += 1;
    }
    gauge(
        "flotilla_retrain_jobs",
        "Retraining jobs by state.",
        "gauge",
        jobs.into_iter().map(|(k, v)| (format!("{{state=\"{k}\"}}"), v as f64)).collect(),
    );
    gauge(
        "flotilla_mqtt_messages_total",
        "MQTT publishes the control plane received from and sent to devices.",
        "counter",
        vec![
            ("{direction=\"in\"}".into(), s.metrics.mqtt_in.load(Ordering::Relaxed) as f64),
            ("{direction=\"out\"}".into(), s.metrics.mqtt_out.load(Ordering::Relaxed) as f64),
        ],
    );
    gauge(
        "flotilla_bundle_bytes_served_total",
        "Bundle bytes served to devices, per transport.",
        "counter",
        vec![
            ("{transport=\"http\"}".into(), s.served_http.load(Ordering::Relaxed) as f64),
            ("{transport=\"mqtt\"}".into(), s.served_mqtt.load(Ordering::Relaxed) as f64),
        ],
    );
    let (buckets, count, sum) = s.store.latency();
    let _ = writeln!(
        out,
        "# HELP flotilla_store_latency_seconds Time of each store operation (SQLite), lock wait included.\n# TYPE flotilla_store_latency_seconds histogram"
    );
    let mut cumulative = 0;
    for (le, n) in buckets {
        cumulative += n;
        let _ = writeln!(out, "flotilla_store_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "flotilla_store_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "flotilla_store_latency_seconds_sum {sum}");
    let _ = writeln!(out, "flotilla_store_latency_seconds_count {count}");
    Ok(out)
}
