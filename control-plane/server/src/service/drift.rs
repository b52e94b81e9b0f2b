//! Fleet-wide drift: devices send one report per window and model version (sketches per
//! signal); the server stores them, merges them per (model, version, cohort, window) by adding
//! the sketches, scores the merged sketches against the bundle's baseline, and raises an alert
//! when a signal of a cohort is over a threshold for the profile's `consecutive` windows in a row.
//!
//! Cohorts are the values of one tag (by default `group`); devices are placed by their tags at
//! the time of the query.
//!
//! Windows. A time window's report ends on a multiple of its length, so the reports of every
//! device land in the same window as they are. Count windows (`--drift-window 200`: a report
//! every 200 inferences of a device) end whenever traffic says, so the control plane forms the
//! cohort's windows from the reports themselves ([`count_window`]), in arrival order: a report
//! joins the cohort's newest window unless that window already holds at least
//! `max(window, min_count)` inferences and either the reporting device is in it already (its
//! next window has begun) or it opened more than `--drift-period` ago. Concurrent reports of
//! different devices therefore merge; successive ones of the same devices do not. A shift that
//! lasts k windows' worth of inferences makes k windows, however fast or slow it arrives, and is
//! judged as the k-th report lands. A window is keyed by the time it opened (ms), taken after
//! the newest key of the model version, so keys grow in arrival order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use flotilla_bundle::manifest::Role;
use flotilla_drift::{Profile, Sketch, Window, compare};
use flotilla_proto::tags::{Selector, Tags};
use flotilla_proto::{DriftReport, SignalSketch};

use super::Fleet;
use crate::store::{AlertRow, DriftReportRow, OpenDriftWindow};
use crate::util::now_ms;

/// Largest baseline artifact read.
const MAX_PROFILE_BYTES: u64 = 64 << 20;

type ModelVersion = (String, u64);

/// Baseline profiles by (model, version), read from the stored bundles once.
#[derive(Default)]
pub struct Profiles {
    cache: Mutex<HashMap<ModelVersion, Option<Arc<Profile>>>>,
    /// One report placed in its count window at a time (the window a report joins depends on
    /// the ones before).
    judging: tokio::sync::Mutex<()>,
    /// Cohorts with reports not judged yet, and the judge's wake-up ([`judge_loop`]).
    dirty: Mutex<BTreeSet<(String, u64, String)>>,
    judge: tokio::sync::Notify,
}

impl Profiles {
    pub async fn get(&self, f: &Fleet, model: &str, version: u64) -> anyhow::Result<Option<Arc<Profile>>> {
        let key = (model.to_string(), version);
        if let Some(p) = self.cache.lock().expect("profiles lock").get(&key) {
            return Ok(p.clone());
        }
        let path = match f.store.bundle_by_name(model, version).await? {
            Some(b) => f.files.path(&b.id),
            None => None,
        };
        let p = match path {
            Some(path) => tokio::task::spawn_blocking(move || read_profile(&path)).await??.map(Arc::new),
            None => None,
        };
        self.cache.lock().expect("profiles lock").insert(key, p.clone());
        Ok(p)
    }
}

fn read_profile(path: &std::path::Path) -> anyhow::Result<Option<Profile>> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path)?);
    let (doc, off) = flotilla_bundle::format::read_envelope(&mut f)?;
    let m = flotilla_bundle::verify::decode_manifest(&doc.signed)?;
    let Some(a) = m.artifact(Role::Baseline) else { return Ok(None) };
    let bytes = flotilla_bundle::format::extract_artifact_to_vec(&mut f, off, a, None, MAX_PROFILE_BYTES)?;
    let mut p: Profile = serde_json::from_slice(&bytes)?;
    p.validate()?;
    Ok(Some(p))
}

/// The time window a report of a `seconds`-long window counts in: its aligned end (ms).
pub fn time_bucket(seconds: u64, window_end_ms: u64) -> i64 {
    let w = seconds.saturating_mul(1000).max(1);
    (window_end_ms.div_ceil(w).saturating_mul(w)) as i64
}

/// The count window of its cohort a report joins (see the module documentation): the cohort's
/// newest window `open`, or a new one keyed `now_ms` (after `newest`, the newest key of the model
/// version). `target` is `max(window, min_count)` inferences; `period_ms` the most a window stays
/// open to new devices once it holds `target`.
pub fn count_window(
    open: Option<&OpenDriftWindow>,
    device: &str,
    target: u64,
    period_ms: u64,
    now_ms: i64,
    newest: Option<i64>,
) -> i64 {
    if let Some(w) = open {
        let full = w.inferences >= target;
        let again = w.devices.iter().any(|d| d == device);
        let old = now_ms.saturating_sub(w.bucket) >= period_ms as i64;
        if !(full && (again || old)) {
            return w.bucket;
        }
    }
    newest.map_or(now_ms, |n| now_ms.max(n + 1))
}

/// Store a device's report (once per message id) and re-judge its cohort's alerts.
pub async fn ingest(s: &Fleet, device: &str, msg_id: &str, r: DriftReport, now: i64) -> anyhow::Result<()> {
    let Some(profile) = s.profiles.get(s, &r.model, r.version).await? else {
        tracing::warn!(device, model = %r.model, version = r.version, "drift report for a bundle without a baseline here: ignored");
        return Ok(());
    };
    anyhow::ensure!(r.window_end >= r.window_start, "window ends before it starts");
    let mut kept = Vec::new();
    for mut sig in r.signals {
        let Some(sp) = profile.signal(&sig.name) else {
            tracing::warn!(device, signal = %sig.name, "drift report names a signal the baseline lacks: dropped");
            continue;
        };
        let fits = sig.sketch.validate().is_ok()
            && sig.sketch.hist.edges == sp.baseline.hist.edges
            && sig.sketch.quantiles.is_some() == sp.baseline.quantiles.is_some();
        if !fits {
            tracing::warn!(device, signal = %sig.name, "drift sketch does not fit the baseline: dropped");
            continue;
        }
        kept.push(sig);
    }
    let mut signals = Vec::new();
    ciborium::into_writer(&kept, &mut signals)?;
    let tags: Tags = s.store.device(device).await?.map(|d| d.tags).unwrap_or_default();
    let cohort = cohort_of(&tags, Some(&s.settings.drift_cohort_key));
    // One report at a time from here: the count window a report joins depends on the ones before.
    let _one = s.profiles.judging.lock().await;
    let bucket = match profile.config.window {
        Window::Seconds(secs) => time_bucket(secs, r.window_end),
        Window::Count(n) => count_window(
            s.store.drift_open_window(&r.model, r.version, &cohort).await?.as_ref(),
            device,
            n.max(profile.config.min_count),
            s.settings.drift_period_ms,
            now_ms() as i64,
            s.store.drift_bucket_back(&r.model, r.version, 0).await?,
        ),
    };
    let row = DriftReportRow {
        device_id: device.to_string(),
        version: r.version,
        window_start: r.window_start as i64,
        window_end: r.window_end as i64,
        bucket,
        inferences: r.inferences,
        signals,
        cohort: cohort.clone(),
    };
    if !s.store.add_drift_report(device, msg_id, &r.model, &row, now).await? {
        return Ok(()); // seen before
    }
    s.profiles.dirty.lock().expect("dirty lock").insert((r.model, r.version, cohort));
    s.profiles.judge.notify_one();
    Ok(())
}

/// Judge the alerts of every cohort with new reports, again and again: each pass merges a model
/// version's recent windows once for all its cohorts that changed, however many reports came in
/// (judging on each report would merge the cohort's windows once per report: quadratic in the
/// fleet's size). Passes are at least a second apart, and at least four times as long as the
/// last one took, so judging never takes more than a fifth of the time.
pub async fn judge_loop(s: Arc<Fleet>, cancel: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = s.profiles.judge.notified() => {}
        }
        let started = std::time::Instant::now();
        if let Err(e) = judge_pass(&s).await {
            tracing::warn!(error = %format!("{e:#}"), "judging drift alerts failed; will retry");
            s.profiles.judge.notify_one();
        }
        let rest = (started.elapsed() * 4).max(std::time::Duration::from_secs(1));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(rest) => {}
        }
    }
}

/// One judging pass over the cohorts marked since the last (see [`judge_loop`]); returns the
/// cohorts judged. A failed pass puts its cohorts back.
pub async fn judge_pass(s: &Fleet) -> anyhow::Result<usize> {
    let dirty = std::mem::take(&mut *s.profiles.dirty.lock().expect("dirty lock"));
    let mut by_version: BTreeMap<(String, u64), Vec<String>> = BTreeMap::new();
    for (model, version, cohort) in dirty.iter().cloned() {
        by_version.entry((model, version)).or_default().push(cohort);
    }
    let judged = async {
        for ((model, version), cohorts) in &by_version {
            let Some(profile) = s.profiles.get(s, model, *version).await? else { continue };
            judge_alerts(s, model, *version, &profile, cohorts, crate::util::now_s()).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = judged {
        s.profiles.dirty.lock().expect("dirty lock").extend(dirty);
        return Err(e);
    }
    Ok(dirty.len())
}

async fn device_tags(s: &Fleet) -> anyhow::Result<HashMap<String, Tags>> {
    Ok(s.store.devices().await?.into_iter().map(|d| (d.id, d.tags)).collect())
}

/// The cohort a device falls in when grouping by the tag `by` (all devices: no key).
pub fn cohort_of(tags: &Tags, by: Option<&str>) -> String {
    match by {
        None => String::new(),
        Some(k) => match tags.get(k) {
            Some(v) => format!("{k}={v}"),
            None => format!("!{k}"),
        },
    }
}

#[derive(Clone)]
pub struct Query {
    pub model: String,
    pub version: Option<u64>,
    pub selector: Selector,
    /// Tag to group by; None merges all selected devices into one cohort.
    pub by: Option<String>,
    /// Only windows from this bucket (ms) on.
    pub since: i64,
    /// Include each row's histograms (baseline and live).
    pub histograms: bool,
}

struct Merged {
    start: i64,
    /// The latest end of its reports.
    end: i64,
    inferences: u64,
    devices: BTreeSet<String>,
    sketches: BTreeMap<String, Sketch>,
}

/// One merged, scored window of a cohort and signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub model: String,
    pub version: u64,
    pub cohort: String,
    pub signal: String,
    /// The window's aggregation key (ms).
    pub bucket: i64,
    /// Milliseconds since the epoch.
    pub window_start: i64,
    pub window_end: i64,
    /// Values the live sketch holds.
    pub count: u64,
    pub inferences: u64,
    pub devices: u64,
    pub psi: Option<f64>,
    pub js: Option<f64>,
    pub ks: Option<f64>,
    pub wasserstein: Option<f64>,
    pub mean: Option<f64>,
    /// Metrics over their thresholds.
    pub exceeded: Vec<String>,
    /// Over a threshold for the profile's `consecutive` windows in a row.
    pub alert: bool,
    pub histogram: Option<Histogram>,
}

/// The baseline's and the live window's histogram of a signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub baseline: Vec<u64>,
    pub live: Vec<u64>,
}

/// Merged, scored rows ordered by version, cohort, signal (in profile order), window.
pub async fn rows(s: &Fleet, q: &Query) -> anyhow::Result<Vec<Row>> {
    let tags = device_tags(s).await?;
    let reports = s.store.drift_reports(&q.model, q.version, q.since).await?;
    let mut profiles = BTreeMap::new();
    for v in reports.iter().map(|r| r.version).collect::<BTreeSet<_>>() {
        if let Some(p) = s.profiles.get(s, &q.model, v).await? {
            profiles.insert(v, p);
        }
    }
    let q = q.clone();
    Ok(tokio::task::spawn_blocking(move || score(&q, &tags, reports, &profiles)).await?)
}

/// Merge the reports per (version, cohort, window) and score each signal against its baseline.
fn score(
    q: &Query,
    tags: &HashMap<String, Tags>,
    reports: Vec<DriftReportRow>,
    profiles: &BTreeMap<u64, Arc<Profile>>,
) -> Vec<Row> {
    let none = Tags::new();
    let mut groups: BTreeMap<(u64, String), BTreeMap<i64, Merged>> = BTreeMap::new();
    for r in reports {
        let t = tags.get(&r.device_id).unwrap_or(&none);
        if !q.selector.matches(t) {
            continue;
        }
        let signals: Vec<SignalSketch> = match ciborium::from_reader(r.signals.as_slice()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(device = %r.device_id, error = %e, "unreadable stored drift report");
                continue;
            }
        };
        let m =
            groups.entry((r.version, cohort_of(t, q.by.as_deref()))).or_default().entry(r.bucket).or_insert(Merged {
                start: r.window_start,
                end: r.window_end,
                inferences: 0,
                devices: BTreeSet::new(),
                sketches: BTreeMap::new(),
            });
        m.start = m.start.min(r.window_start);
        m.end = m.end.max(r.window_end);
        m.inferences += r.inferences;
        m.devices.insert(r.device_id.clone());
        for sig in signals {
            match m.sketches.get_mut(&sig.name) {
                Some(have) => {
                    if let Err(e) = have.merge(&sig.sketch) {
                        tracing::warn!(signal = %sig.name, error = %e, "drift sketches do not merge");
                    }
                }
                None => {
                    m.sketches.insert(sig.name, sig.sketch);
                }
            }
        }
    }
    let mut out = Vec::new();
    for ((version, cohort), windows) in groups {
        let Some(profile) = profiles.get(&version) else { continue };
        let cfg = &profile.config;
        // A time window ends at its bucket; a count window when its latest report does.
        let counted = matches!(cfg.window, Window::Count(_));
        for sp in &profile.signals {
            let mut run = 0u32;
            for (&bucket, m) in &windows {
                let Some(live) = m.sketches.get(&sp.signal.name) else { continue };
                let scores = compare(&sp.baseline, live, cfg.min_count);
                let exceeded = scores.exceeded(&cfg.thresholds);
                // Windows without enough data neither extend nor break a run.
                let scored = scores.psi.is_some() || scores.js.is_some();
                if scored {
                    run = if exceeded.is_empty() { 0 } else { run + 1 };
                }
                out.push(Row {
                    model: q.model.clone(),
                    version,
                    cohort: cohort.clone(),
                    signal: sp.signal.name.clone(),
                    bucket,
                    window_start: m.start,
                    window_end: if counted { m.end } else { bucket },
                    count: live.count(),
                    inferences: m.inferences,
                    devices: m.devices.len() as u64,
                    psi: scores.psi,
                    js: scores.js,
                    ks: scores.ks,
                    wasserstein: scores.wasserstein,
                    mean: live.moments.mean(),
                    exceeded: exceeded.iter().map(|m| m.as_str().to_string()).collect(),
                    alert: scored && !exceeded.is_empty() && run >= cfg.consecutive,
                    histogram: q.histograms.then(|| Histogram {
                        edges: sp.baseline.hist.edges.clone(),
                        baseline: sp.baseline.hist.counts.clone(),
                        live: live.hist.counts.clone(),
                    }),
                });
            }
        }
    }
    out
}

/// `GET /api/v1/drift`: a model's rows (one version or all) for the devices `selector` picks,
/// grouped by the tag `by` (default: the server's cohort key; `none` merges all), the latest
/// `last` windows only when given.
pub async fn query(
    f: &Fleet,
    model: Option<String>,
    version: Option<u64>,
    selector: Selector,
    by: Option<String>,
    last: Option<u32>,
    histograms: bool,
) -> super::Result<Vec<Row>> {
    let Some(model) = model else {
        let known: Vec<String> = f.store.drift_models().await?.into_iter().map(|(m, v)| format!("{m}@{v}")).collect();
        let known = if known.is_empty() { "none yet".into() } else { known.join(", ") };
        return Err(super::Error::invalid(
            "model_required",
            format!("say which model (models with drift reports: {known})"),
        )
        .hint("flotilla drift show --model NAME"));
    };
    let by = match by.as_deref() {
        Some("none") | Some("") => None,
        Some(k) => Some(k.to_string()),
        None => Some(f.settings.drift_cohort_key.clone()),
    };
    let since = match (last, version) {
        (Some(n), Some(v)) if n > 0 => f.store.drift_bucket_back(&model, v, n - 1).await?.unwrap_or(0),
        _ => 0,
    };
    let mut rows = rows(f, &Query { model, version, selector, by, since, histograms }).await?;
    if let (Some(n), None) = (last, version) {
        // Per version: keep its latest n windows.
        let mut ends: BTreeMap<u64, BTreeSet<i64>> = Default::default();
        for r in &rows {
            ends.entry(r.version).or_default().insert(r.window_end);
        }
        rows.retain(|r| ends[&r.version].iter().rev().take(n as usize).any(|e| *e == r.window_end));
    }
    Ok(rows)
}

/// Firing alerts (and resolved ones with `all`).
pub async fn alerts(f: &Fleet, all: bool) -> anyhow::Result<Vec<AlertRow>> {
    f.store.alerts(all).await
}

/// Re-judge the alerts of one cohort from its latest windows: raise, extend or resolve.
async fn judge_alerts(
    s: &Fleet,
    model: &str,
    version: u64,
    profile: &Profile,
    cohorts: &[String],
    now: i64,
) -> anyhow::Result<()> {
    let k = profile.config.consecutive.max(1);
    // Enough of each cohort's windows back to see a run of k (and the window before it).
    let mut since = i64::MAX;
    for cohort in cohorts {
        let back = s.store.drift_cohort_bucket_back(model, version, cohort, k.saturating_mul(4)).await?;
        since = since.min(back.unwrap_or(0));
    }
    let by = Some(s.settings.drift_cohort_key.clone());
    let q = Query {
        model: model.into(),
        version: Some(version),
        selector: Selector::default(),
        by,
        since,
        histograms: false,
    };
    let rows = rows(s, &q).await?;
    for cohort in cohorts {
        judge_cohort(s, model, version, profile, cohort, &rows, now).await?;
    }
    Ok(())
}

async fn judge_cohort(
    s: &Fleet,
    model: &str,
    version: u64,
    profile: &Profile,
    cohort: &str,
    rows: &[Row],
    now: i64,
) -> anyhow::Result<()> {
    for sp in &profile.signals {
        let name = &sp.signal.name;
        let mine: Vec<&Row> = rows.iter().filter(|r| &r.signal == name && r.cohort == cohort).collect();
        let Some(latest) = mine.iter().rev().find(|r| r.psi.is_some() || r.js.is_some()) else {
            continue;
        };
        let latest_end = latest.bucket;
        let firing = s.store.firing_alert(model, version, cohort, name).await?;
        let metric = latest.exceeded.first().and_then(|m| flotilla_drift::Metric::parse(m));
        let value = metric.and_then(|m| match m {
            flotilla_drift::Metric::Psi => latest.psi,
            flotilla_drift::Metric::Js => latest.js,
            flotilla_drift::Metric::Ks => latest.ks,
            flotilla_drift::Metric::Wasserstein => latest.wasserstein,
        });
        match (firing, latest.alert, latest.exceeded.is_empty()) {
            (None, true, _) => {
                let run: Vec<_> = mine.iter().rev().take_while(|r| !r.exceeded.is_empty()).collect();
                let first = run.last().map_or(latest_end, |r| r.bucket);
                let raised = s
                    .store
                    .raise_alert(&AlertRow {
                        id: 0,
                        model: model.into(),
                        version,
                        cohort: cohort.into(),
                        signal: name.clone(),
                        metrics: latest.exceeded.join(","),
                        value,
                        threshold: metric.and_then(|m| profile.config.thresholds.get(&m).copied()),
                        windows: run.len() as u32,
                        first_window: first,
                        last_window: latest_end,
                        state: "firing".into(),
                        raised: now,
                        resolved: None,
                    })
                    .await?;
                // None: another replica raised it first.
                if let Some(id) = raised {
                    tracing::warn!(id, model, version, cohort, signal = %name, metrics = %latest.exceeded.join(","), "drift alert raised");
                }
            }
            (Some(a), _, false) if latest_end > a.last_window => {
                // Every window over the threshold since the alert's last (a pass may judge
                // several new windows at once).
                let newer = mine.iter().filter(|r| r.bucket > a.last_window && !r.exceeded.is_empty()).count();
                s.store.extend_alert(a.id, a.windows + newer.max(1) as u32, latest_end, value).await?;
            }
            (Some(a), _, true) if latest_end > a.last_window => {
                s.store.resolve_alert(a.id, now).await?;
                tracing::info!(id = a.id, model, version, cohort, signal = %name, "drift alert resolved");
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_reports_land_in_aligned_buckets() {
        // The device already ends them on multiples; a stray end rounds up.
        assert_eq!(time_bucket(30, 60_000), 60_000);
        assert_eq!(time_bucket(30, 60_001), 90_000);
    }

    /// Feed reports (device, inferences) arriving at `at` ms through `count_window` as ingest
    /// does, and return each one's window key.
    fn windows(reports: &[(&str, u64, i64)], target: u64, period_ms: u64) -> Vec<i64> {
        let mut open: Option<OpenDriftWindow> = None;
        let mut keys = Vec::new();
        for &(device, n, at) in reports {
            let key = count_window(open.as_ref(), device, target, period_ms, at, keys.last().copied());
            match &mut open {
                Some(w) if w.bucket == key => {
                    w.inferences += n;
                    if !w.devices.iter().any(|d| d == device) {
                        w.devices.push(device.into());
                    }
                }
                _ => open = Some(OpenDriftWindow { bucket: key, devices: vec![device.into()], inferences: n }),
            }
            keys.push(key);
        }
        keys
    }

    #[test]
    fn count_windows_merge_concurrent_reports_and_split_successive_ones() {
        // A burst: two devices, five windows of 100 each, all in the same second, interleaved.
        let burst: Vec<(&str, u64, i64)> =
            (0..10).map(|i| (if i % 2 == 0 { "a" } else { "b" }, 100, 1_000 + i)).collect();
        let keys = windows(&burst, 100, 60_000);
        assert_eq!(keys, [1_000, 1_000, 1_002, 1_002, 1_004, 1_004, 1_006, 1_006, 1_008, 1_008]);
        // The same reports one device after the other: each of a device's reports is a window of
        // its own, and b's first joins a's last (they are concurrent as far as arrival tells).
        let sequential: Vec<(&str, u64, i64)> =
            (0..10).map(|i| (if i < 5 { "a" } else { "b" }, 100, 1_000 + i)).collect();
        let keys = windows(&sequential, 100, 60_000);
        assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 9, "{keys:?}");
        // Windows smaller than min_count merge until they hold it, even from one device.
        let small: Vec<(&str, u64, i64)> = (0..10).map(|i| ("a", 20, 1_000 + i)).collect();
        let keys = windows(&small, 100, 60_000);
        assert_eq!(keys, [1_000, 1_000, 1_000, 1_000, 1_000, 1_005, 1_005, 1_005, 1_005, 1_005]);
        // A full window stays open to new devices for one period only.
        let keys = windows(&[("a", 100, 0), ("b", 100, 59_999), ("c", 100, 60_000)], 100, 60_000);
        assert_eq!(keys, [0, 0, 60_000]);
        // Keys grow even when the clock does not.
        let keys = windows(&[("a", 100, 5), ("a", 100, 5), ("a", 100, 4)], 100, 60_000);
        assert_eq!(keys, [5, 6, 7]);
    }

    #[test]
    fn cohorts_are_selectors() {
        let tags: Tags = [("group".to_string(), "lab".to_string())].into();
        assert_eq!(cohort_of(&tags, Some("group")), "group=lab");
        assert_eq!(cohort_of(&tags, Some("site")), "!site");
        assert_eq!(cohort_of(&tags, None), "");
        // A device's cohort, read as a selector, selects it.
        for c in ["group=lab", "!site", ""] {
            assert!(Selector::parse(c).unwrap().matches(&tags), "{c}");
        }
    }
}
