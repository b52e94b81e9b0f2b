//! Devices as they report themselves (hello, retained state), server-side tags, health reports and the device event log.

use async_trait::async_trait;
use flotilla_proto::tags::Tags;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub id: String,
    pub online: bool,
    pub last_seen: Option<i64>,
    /// What the device said about itself on its latest connect.
    pub hello: Option<HelloRecord>,
    /// The models it runs, from its latest retained state.
    pub models: Vec<ModelRecord>,
    /// Its own tags with the server's on top (a server value of "" removes a tag).
    pub tags: Tags,
}

impl DeviceRow {
    /// A device row from its stored columns (JSON text, as both stores keep them): the
    /// device's own tags with the server's on top (a server value of null removes a tag).
    pub fn from_stored(
        id: String,
        online: bool,
        last_seen: Option<i64>,
        hello: Option<&str>,
        models: &str,
        own_tags: &str,
        server_tags: &str,
    ) -> DeviceRow {
        let mut tags: Tags = serde_json::from_str(own_tags).unwrap_or_default();
        let over: std::collections::BTreeMap<String, Option<String>> =
            serde_json::from_str(server_tags).unwrap_or_default();
        for (k, v) in over {
            match v {
                Some(v) => tags.insert(k, v),
                None => tags.remove(&k),
            };
        }
        DeviceRow {
            id,
            online,
            last_seen,
            hello: hello.and_then(|h| serde_json::from_str(h).ok()),
            models: serde_json::from_str(models).unwrap_or_default(),
            tags,
        }
    }
}

/// A device's hello, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HelloRecord {
    #[serde(default)]
    pub agent_version: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub cores: Option<u32>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub delegates: Vec<String>,
}

/// A model a device runs, as stored (from its retained state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: u64,
    pub backend: String,
    /// `baking` while the device's watchdog judges it, then `active`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated_nodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_nodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test_median_us: Option<u64>,
}

/// One entry of the device event log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Grows with every event stored (the pagination key).
    pub seq: i64,
    pub device: String,
    /// Seconds since the epoch, by the device's clock.
    pub at: i64,
    pub kind: String,
    /// JSON.
    pub body: String,
}

/// A state message to record ([`DeviceStore::device_states`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    pub device: String,
    pub online: bool,
    /// None (a last will) keeps the models as they were.
    pub models: Option<Vec<ModelRecord>>,
    pub at: i64,
}

/// A health report to record ([`DeviceStore::set_health_many`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthUpdate {
    pub device: String,
    pub model: String,
    pub version: u64,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<u64>,
    pub accelerator_fallback: bool,
    pub backend: String,
    pub at: i64,
}

/// Fold state messages, in the order they arrived, into one per device with the same outcome
/// as applying them one by one: the latest `online` and time, the latest models any carried.
pub fn fold_states(updates: Vec<StateUpdate>) -> Vec<StateUpdate> {
    let mut out: Vec<StateUpdate> = Vec::with_capacity(updates.len());
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for u in updates {
        match at.get(&u.device) {
            Some(&i) => {
                let prev = &mut out[i];
                prev.online = u.online;
                prev.at = u.at;
                if u.models.is_some() {
                    prev.models = u.models;
                }
            }
            None => {
                at.insert(u.device.clone(), out.len());
                out.push(u);
            }
        }
    }
    out
}

/// Keep the latest health report per (device, model, version), in arrival order.
pub fn fold_health(updates: Vec<HealthUpdate>) -> Vec<HealthUpdate> {
    let mut out: Vec<HealthUpdate> = Vec::with_capacity(updates.len());
    let mut at: std::collections::HashMap<(String, String, u64), usize> = std::collections::HashMap::new();
    for u in updates {
        let key = (u.device.clone(), u.model.clone(), u.version);
        match at.get(&key) {
            Some(&i) => out[i] = u,
            None => {
                at.insert(key, out.len());
                out.push(u);
            }
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthRow {
    pub device: String,
    pub version: u64,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<u64>,
    pub accelerator_fallback: bool,
}

#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Register a device (or refresh it) from its hello, with its own tags. A new device is
    /// online; a known one's `online` is left to its state messages (one ordered stream, where
    /// hellos are not: a hello must not undo a later last will).
    async fn device_hello(&self, id: &str, hello: &HelloRecord, tags: &Tags, now: i64) -> anyhow::Result<()>;

    /// Record a state message. `models` None keeps the models as they were (last will).
    async fn device_state(
        &self,
        id: &str,
        online: bool,
        models: Option<&[ModelRecord]>,
        now: i64,
    ) -> anyhow::Result<()> {
        let u = StateUpdate { device: id.into(), online, models: models.map(|m| m.to_vec()), at: now };
        self.device_states(&[u]).await
    }

    /// Record state messages in one transaction, at most one per device (see [`fold_states`]).
    async fn device_states(&self, updates: &[StateUpdate]) -> anyhow::Result<()>;

    /// How many devices are registered, and how many of them are online.
    async fn device_counts(&self) -> anyhow::Result<(u64, u64)>;

    /// Every device, by id.
    async fn devices(&self) -> anyhow::Result<Vec<DeviceRow>>;

    /// Up to `limit` devices with ids after `after`, by id (keyset pagination).
    async fn devices_page(&self, after: Option<&str>, limit: u32) -> anyhow::Result<Vec<DeviceRow>>;

    async fn device(&self, id: &str) -> anyhow::Result<Option<DeviceRow>>;

    /// Set (`Some`) or remove (`None`) server-side tags of a device; false if it is unknown.
    async fn set_server_tags(&self, id: &str, changes: &[(String, Option<String>)]) -> anyhow::Result<bool>;

    #[allow(clippy::too_many_arguments)]
    async fn set_health(
        &self,
        device: &str,
        model: &str,
        version: u64,
        inferences: u64,
        errors: u64,
        latency_p95_us: Option<u64>,
        accelerator_fallback: bool,
        backend: &str,
        at: i64,
    ) -> anyhow::Result<()> {
        let u = HealthUpdate {
            device: device.into(),
            model: model.into(),
            version,
            inferences,
            errors,
            latency_p95_us,
            accelerator_fallback,
            backend: backend.into(),
            at,
        };
        self.set_health_many(&[u]).await
    }

    /// Record health reports in one transaction, at most one per (device, model, version) (see
    /// [`fold_health`]).
    async fn set_health_many(&self, updates: &[HealthUpdate]) -> anyhow::Result<()>;

    /// Every device's latest health for each version of a model, newest version first per device.
    async fn health(&self, model: &str) -> anyhow::Result<Vec<HealthRow>>;

    /// Append an event; a repeated (device, message id) is ignored. Returns whether it was new.
    async fn add_event(&self, device: &str, msg_id: &str, at: i64, kind: &str, body_json: &str)
    -> anyhow::Result<bool>;

    /// The newest `limit` events (of one device, or all) older than event `before`, newest first.
    async fn events(&self, device: Option<&str>, before: Option<i64>, limit: u32) -> anyhow::Result<Vec<EventRow>>;

    /// Forget events from before `at` (seconds); how many.
    async fn prune_events(&self, at: i64) -> anyhow::Result<u64>;

    async fn set_device_root_version(&self, id: &str, version: u64) -> anyhow::Result<()>;

    async fn device_root_version(&self, id: &str) -> anyhow::Result<Option<u64>>;
}
