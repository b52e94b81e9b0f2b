//! What `/metrics` shows: counters the transports bump, and a snapshot of the fleet's gauges.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Fleet;
use crate::store::Latency;

#[derive(Debug, Default)]
pub struct Counters {
    /// MQTT publishes received from devices and sent to them.
    pub mqtt_in: AtomicU64,
    pub mqtt_out: AtomicU64,
    /// Bundle bytes served, per transport.
    pub served_http: AtomicU64,
    pub served_mqtt: AtomicU64,
}

/// The fleet's gauges and counters at one moment.
pub struct Snapshot {
    pub devices_online: u64,
    pub devices_offline: u64,
    pub rollouts: BTreeMap<String, u64>,
    pub alerts_firing: u64,
    pub jobs: BTreeMap<String, u64>,
    pub mqtt_in: u64,
    pub mqtt_out: u64,
    pub served_http: u64,
    pub served_mqtt: u64,
    pub store_backend: &'static str,
    pub store_latency: Latency,
}

pub async fn snapshot(f: &Fleet) -> anyhow::Result<Snapshot> {
    let devices = f.store.devices().await?;
    let online = devices.iter().filter(|d| d.online).count() as u64;
    let mut rollouts: BTreeMap<String, u64> = ["pending", "running", "paused", "completed", "aborted", "rolled_back"]
        .iter()
        .map(|k| (k.to_string(), 0))
        .collect();
    for r in f.store.rollouts().await? {
        *rollouts.entry(r.state).or_default() += 1;
    }
    let mut jobs: BTreeMap<String, u64> = Default::default();
    for j in super::retrain::jobs(f).await? {
        *jobs.entry(j.job.state).or_default() += 1;
    }
    let c = &f.metrics;
    Ok(Snapshot {
        devices_online: online,
        devices_offline: devices.len() as u64 - online,
        rollouts,
        alerts_firing: f.store.alerts(false).await?.len() as u64,
        jobs,
        mqtt_in: c.mqtt_in.load(Ordering::Relaxed),
        mqtt_out: c.mqtt_out.load(Ordering::Relaxed),
        served_http: c.served_http.load(Ordering::Relaxed),
        served_mqtt: c.served_mqtt.load(Ordering::Relaxed),
        store_backend: f.store.backend(),
        store_latency: f.store.latency(),
    })
}
