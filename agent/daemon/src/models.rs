//! Active models in memory and the bake watchdog's counts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use flotilla_bundle::manifest::{HealthChecks, Manifest};
pub use flotilla_runtime::selftest::{SelfTest, SelfTestKind, load_and_test};
use flotilla_runtime::{LoadedModel, Tensor, check_inputs};

use crate::drift::ModelDrift;

/// A verified, self-tested model that serves requests.
pub struct ActiveModel {
    pub name: String,
    pub version: u64,
    pub manifest: Manifest,
    pub manifest_sha256: String,
    pub model: Box<dyn LoadedModel>,
    /// How inferences went since this model became active (what the bake watchdog judges).
    pub watch: Mutex<Watch>,
    /// When this process started serving it.
    pub since: Instant,
    /// Drift sketches, when the bundle carries a baseline profile.
    pub drift: Option<ModelDrift>,
    /// The self-test this process ran before serving it.
    pub self_test: Option<SelfTest>,
}

impl ActiveModel {
    pub fn new(
        name: String,
        version: u64,
        manifest: Manifest,
        manifest_sha256: String,
        model: Box<dyn LoadedModel>,
    ) -> Self {
        ActiveModel {
            name,
            version,
            manifest,
            manifest_sha256,
            model,
            watch: Mutex::default(),
            since: Instant::now(),
            drift: None,
            self_test: None,
        }
    }

    pub fn with_self_test(mut self, t: SelfTest) -> Self {
        self.self_test = Some(t);
        self
    }

    pub fn with_drift(mut self, drift: Option<ModelDrift>) -> Self {
        self.drift = drift;
        self
    }

    pub fn backend(&self) -> &str {
        self.model.backend()
    }

    /// Check the request against the manifest and run it (blocking: call off the async runtime).
    /// A caller's bad input is its own error; every run is counted for the watchdog.
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, flotilla_runtime::RuntimeError> {
        self.infer_request(inputs, None)
    }

    /// [`ActiveModel::infer`] for a request with an id: its predictions are kept for feedback.
    /// A successful run also feeds the drift sketches.
    pub fn infer_request(
        &self,
        inputs: Vec<Tensor>,
        request_id: Option<&str>,
    ) -> Result<Vec<Tensor>, flotilla_runtime::RuntimeError> {
        let inputs = check_inputs(&self.manifest.model.inputs, inputs)?;
        let pending = self.drift.as_ref().map(|d| d.read_inputs(&inputs));
        let t0 = Instant::now();
        let out = flotilla_runtime::run(self.model.as_ref(), inputs);
        self.watch.lock().expect("watch lock").record(out.is_ok(), t0.elapsed().as_micros() as u64);
        if let (Some(d), Some(p), Ok(outputs)) = (&self.drift, pending, &out) {
            d.record(p, outputs, request_id, crate::unix_now_ms());
        }
        out
    }
}

/// Inference outcomes and latencies (the last [`Watch::WINDOW`]).
#[derive(Debug, Default)]
pub struct Watch {
    pub runs: u64,
    pub errors: u64,
    latencies_us: Vec<u64>,
    next: usize,
}

impl Watch {
    /// Latencies kept for the p95.
    pub const WINDOW: usize = 1024;
    /// Fewer runs than this say nothing either way.
    pub const MIN_RUNS: u64 = 20;

    pub fn record(&mut self, ok: bool, latency_us: u64) {
        self.runs += 1;
        self.errors += u64::from(!ok);
        if self.latencies_us.len() < Self::WINDOW {
            self.latencies_us.push(latency_us);
        } else {
            self.latencies_us[self.next] = latency_us;
            self.next = (self.next + 1) % Self::WINDOW;
        }
    }

    pub fn p95_us(&self) -> Option<u64> {
        let mut v = self.latencies_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[(v.len() * 95).div_ceil(100) - 1])
    }

    /// Why the model must be rolled back, if it must: a threshold of the bundle's crossed, over
    /// at least [`Watch::MIN_RUNS`] inferences.
    pub fn verdict(&self, h: &HealthChecks) -> Option<String> {
        if self.runs < Self::MIN_RUNS {
            return None;
        }
        let rate = self.errors as f64 / self.runs as f64;
        if let Some(max) = h.max_error_rate
            && rate > max
        {
            return Some(format!("error rate {rate:.3} over {} inferences is above {max}", self.runs));
        }
        if let (Some(max), Some(p95)) = (h.max_latency_p95_us, self.p95_us())
            && p95 > max
        {
            return Some(format!("p95 latency {p95} µs over {} inferences is above {max} µs", self.runs));
        }
        None
    }
}

/// Name → active model. Swapping an entry is the activation; requests in flight finish on the
/// model they started with (they hold an `Arc`).
#[derive(Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<ActiveModel>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<ActiveModel>> {
        self.models.read().expect("registry lock").get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<ActiveModel>> {
        self.models.read().expect("registry lock").values().cloned().collect()
    }

    pub fn remove(&self, name: &str) {
        self.models.write().expect("registry lock").remove(name);
    }

    pub fn insert(&self, m: ActiveModel) {
        self.models.write().expect("registry lock").insert(m.name.clone(), Arc::new(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_needs_enough_runs_and_judges_errors_and_p95() {
        let h = HealthChecks { max_error_rate: Some(0.1), max_latency_p95_us: Some(1000), ..HealthChecks::default() };
        let mut w = Watch::default();
        for _ in 0..19 {
            w.record(false, 5);
        }
        assert_eq!(w.verdict(&h), None, "19 failures are not enough runs to judge");
        w.record(false, 5);
        assert!(w.verdict(&h).unwrap().contains("error rate 1.000"));

        let mut w = Watch::default();
        for i in 0..100 {
            w.record(i >= 10, if i < 95 { 900 } else { 5000 });
        }
        assert_eq!(w.p95_us(), Some(900), "the 95th of 100 sorted latencies");
        assert_eq!(w.verdict(&h), None, "10% errors is not above 0.1, p95 900 µs is within 1000");
        w.record(false, 5000);
        w.record(true, 5000);
        assert!(w.verdict(&h).unwrap().contains("error rate"), "{:?}", w.verdict(&h));
        let mut w = Watch::default();
        for _ in 0..20 {
            w.record(true, 2000);
        }
        assert!(w.verdict(&h).unwrap().contains("p95 latency 2000"));
        assert_eq!(w.verdict(&HealthChecks::default()), None, "no thresholds, no verdict");
    }
}
