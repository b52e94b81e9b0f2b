//! The domain: what the control plane knows and decides, shared by both transports (the HTTP
//! API in [`crate::http`], devices over MQTT in [`crate::mqtt`]) and the workers
//! ([`crate::worker`]). Services take typed inputs and return typed results and [`Error`]s; they
//! reach devices only through the [`DeviceBus`] and state only through the [`Store`] traits, and
//! know neither HTTP nor MQTT.

pub mod bundles;
pub mod bus;
pub mod certs;
pub mod devices;
pub mod drift;
mod error;
pub mod events;
pub mod metrics;
pub mod retrain;
pub mod rollouts;
pub mod samples;
pub mod tokens;
pub mod trust;

use std::sync::{Arc, RwLock};

use flotilla_bundle::TrustedRoot;
use tokio::sync::Notify;

pub use bus::{BrokerGate, DeviceBus};
pub use error::{Error, Kind, Result};

use crate::pki::Pki;
use crate::store::Store;

/// Settings the services read, fixed at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where offers tell devices to download bundles (`{public_url}/api/v1/bundles/{id}`).
    pub public_url: Option<String>,
    /// Bytes per MQTT chunk and per HTTP Range request that offers ask devices to use.
    pub chunk_size: u32,
    /// Drift: the tag whose values are the cohorts alerts are judged per.
    pub drift_cohort_key: String,
    /// Drift, count windows: how long a window that holds enough inferences stays open.
    pub drift_period_ms: u64,
    /// Keys the capabilities in offer and webhook URLs ([`tokens::capability`]).
    pub capability_key: String,
    /// This replica's name: the holder of the leases it takes.
    pub replica: String,
}

/// How often [`Fleet::trust`] looks for a root newer than the one it holds.
const TRUST_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a lease on shared work (a rollout, a retraining job, the ordered state stream)
/// lasts unless renewed; holders renew it every step, well within this.
pub const LEASE_MS: i64 = 15_000;

impl Fleet {
    /// Take or renew the lease `name` for this replica; false when another replica holds it.
    pub async fn lease(&self, name: &str) -> anyhow::Result<bool> {
        let now = crate::util::now_ms() as i64;
        Ok(self.store.acquire_lease(name, &self.settings.replica, LEASE_MS, now).await?.is_some())
    }
}

/// The control plane's state and the ports to the outside, as every service sees them.
pub struct Fleet {
    pub store: Arc<dyn Store>,
    /// Commands to devices.
    pub bus: Arc<dyn DeviceBus>,
    pub files: bundles::BundleFiles,
    pub trust: RwLock<Option<TrustedRoot>>,
    /// When [`Fleet::trust`] last asked the store for a newer root.
    pub trust_checked: std::sync::Mutex<Option<std::time::Instant>>,
    /// Wakes the workers early (an event arrived, a rollout or a job started).
    pub wake: Notify,
    pub settings: Settings,
    pub profiles: drift::Profiles,
    pub retrain: retrain::Retrain,
    pub metrics: metrics::Counters,
    /// The fleet CA and the server's certificate (None with `--insecure-plaintext`).
    pub pki: Option<Pki>,
}

impl Fleet {
    /// The current trust root (None until one is configured or pushed): the newest the store
    /// holds, so a root another replica accepted counts here too (within [`TRUST_RECHECK`]). The verified chain is
    /// cached and rebuilt only when the store has a newer root.
    pub async fn trust(&self) -> anyhow::Result<Option<TrustedRoot>> {
        {
            // A root another replica accepted counts here within a second: every hello asks,
            // and a fleet's reconnecting devices must not each cost a read of every root.
            let mut checked = self.trust_checked.lock().expect("trust lock");
            if checked.is_some_and(|t| t.elapsed() < TRUST_RECHECK) {
                return Ok(self.trust.read().expect("trust lock").clone());
            }
            *checked = Some(std::time::Instant::now());
        }
        let newest = self.store.roots().await?.last().map(|(v, _)| *v);
        let cached = self.trust.read().expect("trust lock").clone();
        if newest == cached.as_ref().map(|t| t.root().version) {
            return Ok(cached);
        }
        let fresh = trust::load(self.store.as_ref(), None).await?;
        *self.trust.write().expect("trust lock") = fresh.clone();
        Ok(fresh)
    }
}
