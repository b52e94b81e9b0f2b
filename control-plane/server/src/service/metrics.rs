//! What `/metrics` shows: counters the transports bump, and a snapshot of the fleet's gauges.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Fleet;
use crate::store::Latency;

/// The device channels handled messages are counted per.
pub const CHANNELS: [&str; 6] = ["hello", "state", "events", "fetch", "metrics", "csr"];

impl Counters {
    /// Count `n` messages of `channel` handled (true) or given up.
    pub fn device_messages(&self, channel: &str, ok: bool, n: u64) {
        if ok {
            self.ingested.fetch_add(n, Ordering::Relaxed);
            if let Some(i) = CHANNELS.iter().position(|c| *c == channel) {
                self.handled[i].fetch_add(n, Ordering::Relaxed);
            }
        } else {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    /// MQTT publishes received from devices and sent to them.
    pub mqtt_in: AtomicU64,
    pub mqtt_out: AtomicU64,
    /// Device messages handled to the end (stored, answered), and those given up (undecodable,
    /// a full queue, the store away past its patience).
    pub ingested: AtomicU64,
    pub dropped: AtomicU64,
    /// Handled messages per channel, in the order of [`CHANNELS`].
    pub handled: [AtomicU64; 6],
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
    pub ingested: u64,
    pub dropped: u64,
    pub handled: Vec<(&'static str, u64)>,
    pub served_http: u64,
    pub served_mqtt: u64,
    pub store_backend: &'static str,
    pub store_latency: Latency,
}

pub async fn snapshot(f: &Fleet) -> anyhow::Result<Snapshot> {
    let (total, online) = f.store.device_counts().await?;
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
        devices_offline: total.saturating_sub(online),
        rollouts,
        alerts_firing: f.store.alerts(false).await?.len() as u64,
        jobs,
        mqtt_in: c.mqtt_in.load(Ordering::Relaxed),
        mqtt_out: c.mqtt_out.load(Ordering::Relaxed),
        ingested: c.ingested.load(Ordering::Relaxed),
        dropped: c.dropped.load(Ordering::Relaxed),
        handled: CHANNELS.iter().zip(&c.handled).map(|(ch, n)| (*ch, n.load(Ordering::Relaxed))).collect(),
        served_http: c.served_http.load(Ordering::Relaxed),
        served_mqtt: c.served_mqtt.load(Ordering::Relaxed),
        store_backend: f.store.backend(),
        store_latency: f.store.latency(),
    })
}
