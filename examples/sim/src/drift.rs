//! Drift reports that the control plane accepts.
//!
//! The server keeps a device's sketch only when it fits the bundle's baseline profile: the same
//! signal names, the same histogram edges, and a quantile sketch exactly when the baseline has
//! one (`control-plane/server`, drift ingest). So a valid report needs the profile of the model
//! version it reports on. The simulator learns it from `--drift-profile FILE` (the initial
//! model) or, with `--drift-fetch`, from each installed bundle's `baseline` artifact, fetched once
//! per bundle with an HTTP Range request on the offer's URL and verified against the signed
//! manifest's digests. Without a profile a device sends no drift report (counted in
//! `drift_without_profile`).
//!
//! Values are drawn from the baseline histogram itself (a bin with probability proportional to
//! its baseline count, then uniformly inside it; categorical bins give their class), so an
//! unshifted fleet scores near zero; `--drift-shift F` draws a fraction F from the top bin to
//! make the fleet drift.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use flotilla_drift::{Profile, Sketch};
use flotilla_proto::{DriftReport, SignalSketch};

use crate::{BundleInfo, Rng, Shared};

/// Largest baseline artifact fetched.
const MAX_PROFILE_BYTES: u64 = 64 << 20;
/// Most values drawn per signal and report (the inference count stays as simulated).
const MAX_VALUES: u64 = 2000;

#[derive(Clone)]
enum Slot {
    Ready(Arc<Profile>),
    Fetching,
    Missing,
}

/// Baseline profiles by (model, version).
#[derive(Default)]
pub struct Profiles {
    map: Mutex<HashMap<(String, u64), Slot>>,
}

impl Profiles {
    pub fn insert(&self, name: &str, version: u64, p: Profile) {
        self.map.lock().expect("profiles lock").insert((name.to_string(), version), Slot::Ready(Arc::new(p)));
    }

    pub fn get(&self, name: &str, version: u64) -> Option<Arc<Profile>> {
        match self.map.lock().expect("profiles lock").get(&(name.to_string(), version)) {
            Some(Slot::Ready(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Fetch the profile of a bundle just installed, once for all devices.
    pub(crate) fn ensure(&self, sh: &Arc<Shared>, name: &str, version: u64, url: Option<&str>, info: &BundleInfo) {
        let key = (name.to_string(), version);
        {
            let mut map = self.map.lock().expect("profiles lock");
            if map.contains_key(&key) {
                return;
            }
            let Some(((data_offset, artifact), url)) = info.baseline.clone().zip(url) else {
                map.insert(key, Slot::Missing);
                return;
            };
            map.insert(key.clone(), Slot::Fetching);
            let (sh, url) = (sh.clone(), url.to_string());
            tokio::spawn(async move {
                let slot = match fetch_profile(&sh, &url, data_offset, &artifact).await {
                    Ok(p) => {
                        tracing::info!(model = %key.0, version = key.1, signals = p.signals.len(), "fetched the baseline profile");
                        Slot::Ready(Arc::new(p))
                    }
                    Err(e) => {
                        sh.error(&format!("fetching the baseline profile: {e:#}"));
                        Slot::Missing
                    }
                };
                sh.profiles.map.lock().expect("profiles lock").insert(key, slot);
            });
        }
    }
}

/// A profile as JSON (what a bundle's `baseline` artifact holds).
pub fn load_profile(path: &Path) -> anyhow::Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut p: Profile =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a drift profile", path.display()))?;
    p.validate()?;
    Ok(p)
}

async fn fetch_profile(
    sh: &Shared,
    url: &str,
    data_offset: u64,
    a: &flotilla_bundle::manifest::Artifact,
) -> anyhow::Result<Profile> {
    let http = sh.http.as_ref().context("no HTTP client")?;
    anyhow::ensure!(a.size <= MAX_PROFILE_BYTES, "baseline of {} bytes", a.size);
    let start = data_offset + a.offset;
    let end = start + a.stored_size.max(1) - 1;
    let r = http.get(url).header(reqwest::header::RANGE, format!("bytes={start}-{end}")).send().await?;
    let status = r.status().as_u16();
    let body = r.bytes().await?;
    let stored = match status {
        206 => body.to_vec(),
        200 => body.get(start as usize..=end as usize).context("short bundle")?.to_vec(),
        s => anyhow::bail!("HTTP {s} fetching the baseline"),
    };
    let local = flotilla_bundle::manifest::Artifact { offset: 0, ..a.clone() };
    let content = flotilla_bundle::format::extract_artifact_to_vec(
        &mut std::io::Cursor::new(stored),
        0,
        &local,
        None,
        MAX_PROFILE_BYTES,
    )?;
    let mut p: Profile = serde_json::from_slice(&content)?;
    p.validate()?;
    Ok(p)
}

/// A live sketch of `n` values drawn from `baseline`'s own histogram; `shift` of them from its
/// top bin instead.
pub fn synth_sketch(baseline: &Sketch, n: u64, shift: f64, rng: &mut Rng) -> Sketch {
    let mut s = baseline.empty_like();
    let edges = &baseline.hist.edges;
    let counts = &baseline.hist.counts;
    let bins = edges.len().saturating_sub(1);
    if bins == 0 {
        return s;
    }
    let categorical = baseline.quantiles.is_none();
    // Cumulative weights of the inner bins (slots 1..=bins); flat when the baseline is empty.
    let mut cum = Vec::with_capacity(bins);
    let mut total = 0u64;
    for i in 1..=bins {
        total += counts.get(i).copied().unwrap_or(0);
        cum.push(total);
    }
    for _ in 0..n {
        let bin = if rng.f64() < shift {
            bins
        } else if total == 0 {
            1 + (rng.next_u64() % bins as u64) as usize
        } else {
            let r = rng.next_u64() % total;
            1 + cum.partition_point(|&c| c <= r)
        };
        let (lo, hi) = (edges[bin - 1], edges[bin]);
        let x = if categorical { (lo + hi) / 2.0 } else { lo + (hi - lo) * rng.f64() };
        s.add(x);
    }
    s
}

/// The time window of `every_ms` a report sent at `now_ms` covers: the latest one ended, aligned
/// to multiples of its length as the agent's time windows are (so every device's line up).
pub fn window(every_ms: u64, now_ms: u64) -> (u64, u64) {
    let every = every_ms.max(1);
    let end = now_ms / every * every;
    (end.saturating_sub(every), end)
}

/// One window's report for `model@version` over `window` (start, end in ms).
pub fn report(
    profile: &Profile,
    model: &str,
    version: u64,
    window: (u64, u64),
    inferences: u64,
    shift: f64,
    rng: &mut Rng,
) -> DriftReport {
    let n = inferences.clamp(1, MAX_VALUES);
    DriftReport {
        model: model.to_string(),
        version,
        window_start: window.0,
        window_end: window.1,
        inferences: inferences.max(1),
        signals: profile
            .signals
            .iter()
            .map(|sp| SignalSketch { name: sp.signal.name.clone(), sketch: synth_sketch(&sp.baseline, n, shift, rng) })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_drift::{DriftConfig, Kind, Signal, SignalProfile, Source, compare};

    fn profile() -> Profile {
        let values: Vec<f64> = (0..1000).map(|i| (i as f64 / 10.0).sin()).collect();
        let classes: Vec<f64> = (0..1000).map(|i| (i % 7) as f64).collect();
        Profile {
            config: DriftConfig::default(),
            signals: vec![
                SignalProfile {
                    signal: Signal {
                        name: "x.mean".into(),
                        source: Source::InputMean { tensor: "x".into() },
                        kind: Kind::Continuous,
                    },
                    baseline: Sketch::baseline(Kind::Continuous, &values, 10, 0).unwrap(),
                },
                SignalProfile {
                    signal: Signal {
                        name: "class".into(),
                        source: Source::Class { output: "y".into() },
                        kind: Kind::Categorical,
                    },
                    baseline: Sketch::baseline(Kind::Categorical, &classes, 0, 10).unwrap(),
                },
            ],
        }
    }

    #[test]
    fn synthetic_sketches_fit_the_baseline_and_score_low_unless_shifted() {
        let p = profile();
        let mut rng = Rng::new(7);
        let r = report(&p, "m", 1, window(60_000, 1_700_000_012_345), 1000, 0.0, &mut rng);
        assert_eq!(r.window_end % 60_000, 0);
        assert_eq!(r.window_end - r.window_start, 60_000);
        for (sig, sp) in r.signals.iter().zip(&p.signals) {
            let mut s = sig.sketch.clone();
            // What the server checks before it keeps a sketch.
            assert!(s.validate().is_ok());
            assert_eq!(s.hist.edges, sp.baseline.hist.edges);
            assert_eq!(s.quantiles.is_some(), sp.baseline.quantiles.is_some());
            assert_eq!(s.count(), 1000);
            let psi = compare(&sp.baseline, &s, 100).psi.unwrap();
            assert!(psi < 0.1, "{} psi {psi}", sig.name);
        }
        let shifted = report(&p, "m", 1, window(60_000, 1_700_000_012_345), 1000, 0.5, &mut rng);
        let psi = compare(&p.signals[0].baseline, &shifted.signals[0].sketch, 100).psi.unwrap();
        assert!(psi > 0.2, "shifted psi {psi}");
        // Survives the wire.
        let msg = flotilla_proto::Msg::new("d", 1, flotilla_proto::Telemetry::Drift(r));
        let back: flotilla_proto::Msg<flotilla_proto::Telemetry> =
            flotilla_proto::decode(&flotilla_proto::encode(&msg)).unwrap();
        assert_eq!(back, msg);
    }
}
