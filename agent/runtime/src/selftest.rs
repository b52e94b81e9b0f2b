//! The self-test a model passes before it serves, on a device (at install, at start-up and on a
//! rollback) and at build time: load, warm up, then timed runs on the bundle's golden cases
//! (outputs within its tolerance) or, when it has none, on [`crate::smoke`] inputs made from the
//! signature (declared output shapes and dtypes, finite values). The median of the timed runs is
//! judged against the latency budget.

use std::time::Instant;

use flotilla_bundle::golden::GoldenSet;
use flotilla_bundle::manifest::{HealthChecks, Manifest, ModelSignature};

use crate::{LoadedModel, Runtimes, Tensor, check_inputs};

/// Which inputs a self-test ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTestKind {
    /// The bundle's golden cases, outputs checked within its tolerance.
    Golden,
    /// Inputs made from the signature ([`crate::smoke`]): outputs checked for
    /// declared shapes, dtypes and finite values.
    Smoke,
}

impl SelfTestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SelfTestKind::Golden => "golden",
            SelfTestKind::Smoke => "smoke",
        }
    }
}

/// The outcome of a passed self-test.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTest {
    pub kind: SelfTestKind,
    /// Golden cases checked (0 for a smoke test).
    pub cases: usize,
    /// Timed runs the median is taken over.
    pub runs: usize,
    pub median_us: u64,
    pub elapsed_ms: u64,
}

/// Timed runs at least, after the warm-up: golden cases are run again in turn to reach it.
pub const TIMED_RUNS: usize = 5;

/// Load (the same code path at start-up and on install), warm up, and run the model before it
/// may serve: on the bundle's golden cases (outputs within the manifest's tolerance) or, without
/// any, on smoke inputs made from the signature (declared output shapes and dtypes, finite
/// values). The median of the timed runs is judged against the latency budget; the test stops
/// as soon as more than half of them are over it.
pub fn load_and_test(
    runtimes: &Runtimes,
    manifest: &Manifest,
    model_bytes: &[u8],
    golden: Option<&GoldenSet>,
) -> Result<(Box<dyn LoadedModel>, SelfTest), String> {
    let started = Instant::now();
    let model = runtimes.load(model_bytes, &manifest.model, &manifest.runtime).map_err(|e| e.to_string())?;
    let mut report = run(model.as_ref(), &manifest.model, &manifest.health, golden)?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok((model, report))
}

/// The self-test on a loaded model (see [`load_and_test`]); `elapsed_ms` counts the runs only.
pub fn run(
    model: &dyn LoadedModel,
    sig: &ModelSignature,
    health: &HealthChecks,
    golden: Option<&GoldenSet>,
) -> Result<SelfTest, String> {
    let started = Instant::now();
    let golden_cases = golden.map(|g| g.cases.as_slice()).unwrap_or_default();
    let decode = |ts: &[flotilla_bundle::golden::TensorData]| -> Result<Vec<Tensor>, String> {
        ts.iter().map(|t| Tensor::from_golden(t).map_err(|e| format!("golden data: {e}"))).collect()
    };
    // (inputs, expected outputs) per case; a smoke case expects what the signature declares.
    let (kind, cases) = if golden_cases.is_empty() {
        let inputs = crate::smoke::inputs(sig).map_err(|e| format!("no smoke input: {e}"))?;
        let inputs = check_inputs(&sig.inputs, inputs).map_err(|e| format!("smoke input: {e}"))?;
        (SelfTestKind::Smoke, vec![(inputs, None)])
    } else {
        let cases = golden_cases
            .iter()
            .map(|c| {
                let inputs = check_inputs(&sig.inputs, decode(&c.inputs)?).map_err(|e| format!("golden input: {e}"))?;
                Ok((inputs, Some(decode(&c.outputs)?)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        (SelfTestKind::Golden, cases)
    };
    let what = |i: usize| match kind {
        SelfTestKind::Golden => format!("golden case {i}"),
        SelfTestKind::Smoke => format!("smoke input ({})", crate::smoke::describe(sig)),
    };
    for _ in 0..health.warmup_runs {
        crate::run(model, cases[0].0.clone()).map_err(|e| format!("warm-up on {} failed: {e}", what(0)))?;
    }
    let tol = health.golden_tolerance;
    let budget = health.latency_budget_us;
    let planned = cases.len().max(TIMED_RUNS);
    let mut times = Vec::with_capacity(planned);
    for run in 0..planned {
        let i = run % cases.len();
        let (inputs, expected) = &cases[i];
        let t0 = Instant::now();
        let outputs = crate::run(model, inputs.clone()).map_err(|e| format!("{}: {e}", what(i)))?;
        times.push(t0.elapsed().as_micros() as u64);
        match expected {
            Some(want) => check_golden(want, &outputs, tol).map_err(|e| format!("{}: {e}", what(i)))?,
            None => crate::smoke::check_outputs(sig, inputs, &outputs).map_err(|e| format!("{}: {e}", what(i)))?,
        }
        if let Some(budget) = budget {
            let over = times.iter().filter(|&&t| t > budget).count();
            if over * 2 > planned {
                times.sort_unstable();
                return Err(format!(
                    "the {} self-test is over the budget of {budget} µs: {over} of the first {} of its {planned} timed runs took longer (the fastest {} µs)",
                    kind.as_str(),
                    times.len(),
                    times[0]
                ));
            }
        }
    }
    times.sort_unstable();
    let median_us = times[times.len() / 2];
    if let Some(budget) = budget
        && median_us > budget
    {
        return Err(format!(
            "median latency {median_us} µs on the {} self-test is over the budget of {budget} µs",
            kind.as_str()
        ));
    }
    let cases = if kind == SelfTestKind::Golden { cases.len() } else { 0 };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(SelfTest { kind, cases, runs: times.len(), median_us, elapsed_ms })
}

/// Every expected output present, of the same shape, each value [`within`] `tol`.
fn check_golden(want: &[Tensor], have: &[Tensor], tol: f64) -> Result<(), String> {
    for want in want {
        let have =
            have.iter().find(|o| o.name == want.name).ok_or_else(|| format!("output {:?} missing", want.name))?;
        if have.shape != want.shape {
            return Err(format!("output {:?} has shape {:?}, expected {:?}", want.name, have.shape, want.shape));
        }
        let (h, w) = (have.data.to_f64(), want.data.to_f64());
        if let Some((j, (a, b))) = h.iter().zip(&w).enumerate().find(|(_, (a, b))| !within(**a, **b, tol)) {
            return Err(format!("output {:?}[{j}] is {a}, expected {b} (tolerance {tol})", want.name));
        }
    }
    Ok(())
}

/// Whether `got` matches `want` within `tol`: an absolute difference for values up to 1 in
/// magnitude, relative above. Probabilities and normalised values are held to `tol` itself; a
/// box corner at pixel 319 may differ by 3e-5 between two correct runtimes (float32 keeps 7
/// digits), which an absolute 1e-4 on large values would refuse.
pub fn within(got: f64, want: f64, tol: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    got == want || (got - want).abs() <= tol * want.abs().max(1.0)
}

/// How far `got` is from `want` in the measure [`within`] uses (`max |a - b| / max(1, |b|)`);
/// infinite for different lengths or a NaN on one side only.
pub fn scaled_diff(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&a, &b)| match (a.is_nan(), b.is_nan()) {
            (true, true) => 0.0,
            (false, false) if a == b => 0.0,
            (false, false) => (a - b).abs() / b.abs().max(1.0),
            _ => f64::INFINITY,
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_absolute_up_to_one_and_relative_above() {
        assert!(within(0.50009, 0.5, 1e-4));
        assert!(!within(0.5002, 0.5, 1e-4));
        assert!(within(33.909088, 33.909210, 1e-4), "a YOLO box coordinate, 3.6e-6 relative");
        assert!(!within(34.0, 33.9, 1e-4));
        assert!(within(f64::NAN, f64::NAN, 1e-4) && !within(f64::NAN, 1.0, 1e-4) && !within(1.0, f64::NAN, 1e-4));
        assert!(within(f64::INFINITY, f64::INFINITY, 1e-4) && !within(f64::INFINITY, 1.0, 1e-4));
        assert!((scaled_diff(&[1.0, 300.03], &[1.0, 300.0]) - 1e-4).abs() < 1e-9);
        assert_eq!(scaled_diff(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(scaled_diff(&[f64::NAN], &[1.0]), f64::INFINITY);
    }
}
