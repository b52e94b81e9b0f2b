//! Active models in memory, loading, and the golden self-test.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use flotilla_bundle::golden::GoldenSet;
use flotilla_bundle::manifest::Manifest;
use flotilla_runtime::{LoadedModel, Runtimes, Tensor, check_inputs};

/// A verified, self-tested model that serves requests.
pub struct ActiveModel {
    pub name: String,
    pub version: u64,
    pub manifest: Manifest,
    pub manifest_sha256: String,
    pub model: Box<dyn LoadedModel>,
}

impl ActiveModel {
    pub fn backend(&self) -> &str {
        self.model.backend()
    }

    /// Check the request against the manifest and run it (blocking: call off the async runtime).
    pub fn infer(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, flotilla_runtime::RuntimeError> {
        let inputs = check_inputs(&self.manifest.model.inputs, inputs)?;
        flotilla_runtime::run(self.model.as_ref(), inputs)
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

    pub fn insert(&self, m: ActiveModel) {
        self.models.write().expect("registry lock").insert(m.name.clone(), Arc::new(m));
    }
}

/// The outcome of a passed self-test.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTest {
    pub cases: usize,
    pub median_us: u64,
    pub elapsed_ms: u64,
}

/// Load (the same code path at start-up and on install), warm up, check every golden case
/// within the manifest's tolerance and the median latency against the budget.
pub fn load_and_test(
    runtimes: &Runtimes,
    manifest: &Manifest,
    model_bytes: &[u8],
    golden: Option<&GoldenSet>,
) -> Result<(Box<dyn LoadedModel>, SelfTest), String> {
    let started = Instant::now();
    let model = runtimes.load(model_bytes, &manifest.model, &manifest.runtime).map_err(|e| e.to_string())?;
    let cases = golden.map(|g| g.cases.as_slice()).unwrap_or_default();
    let decode = |ts: &[flotilla_bundle::golden::TensorData]| -> Result<Vec<Tensor>, String> {
        ts.iter().map(|t| Tensor::from_golden(t).map_err(|e| format!("golden data: {e}"))).collect()
    };
    if let Some(first) = cases.first() {
        let inputs =
            check_inputs(&manifest.model.inputs, decode(&first.inputs)?).map_err(|e| format!("golden input: {e}"))?;
        for _ in 0..manifest.health.warmup_runs {
            flotilla_runtime::run(model.as_ref(), inputs.clone()).map_err(|e| format!("warm-up failed: {e}"))?;
        }
    }
    let tol = manifest.health.golden_tolerance;
    let mut times = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let inputs =
            check_inputs(&manifest.model.inputs, decode(&case.inputs)?).map_err(|e| format!("golden input: {e}"))?;
        let t0 = Instant::now();
        let outputs = flotilla_runtime::run(model.as_ref(), inputs).map_err(|e| format!("golden case {i}: {e}"))?;
        times.push(t0.elapsed().as_micros() as u64);
        for want in decode(&case.outputs)? {
            let have = outputs
                .iter()
                .find(|o| o.name == want.name)
                .ok_or_else(|| format!("golden case {i}: output {:?} missing", want.name))?;
            if have.shape != want.shape {
                return Err(format!(
                    "golden case {i}: output {:?} has shape {:?}, expected {:?}",
                    want.name, have.shape, want.shape
                ));
            }
            let (h, w) = (have.data.to_f64(), want.data.to_f64());
            if let Some((j, (a, b))) =
                h.iter().zip(&w).enumerate().find(|(_, (a, b))| (*a - *b).abs() > tol || a.is_nan() != b.is_nan())
            {
                return Err(format!(
                    "golden case {i}: output {:?}[{j}] is {a}, expected {b} (tolerance {tol})",
                    want.name
                ));
            }
        }
    }
    times.sort_unstable();
    let median_us = times.get(times.len() / 2).copied().unwrap_or(0);
    if let Some(budget) = manifest.health.latency_budget_us
        && !times.is_empty()
        && median_us > budget
    {
        return Err(format!("median latency {median_us} µs is over the budget of {budget} µs"));
    }
    Ok((model, SelfTest { cases: cases.len(), median_us, elapsed_ms: started.elapsed().as_millis() as u64 }))
}
