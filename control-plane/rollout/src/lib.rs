//! The rollout engine: a pure step function from (plan, state, devices, observations, now) to
//! (new state, actions). No clock, no I/O: the server persists the state after every step and
//! carries the actions out, so a restarted server resumes exactly where it was.
//!
//! Waves: a device belongs to the first wave that takes it, by a deterministic hash of (rollout
//! id, device id) for percentage and count waves, or by a tag selector. The hash cut points are
//! fixed when the rollout starts, so membership is stable across restarts and a device that
//! joins the target later lands in the wave its hash falls into. Once a wave's installs have
//! settled (every member succeeded, failed, or was offered `offer_timeout` ago) and the bake
//! time has passed, the gates are judged over every device of the rollout so far; install gates
//! are judged as soon as the installs settle. All pass: the next wave starts. One fails: the
//! rollout pauses, or rolls back (the previous version is offered to every updated device).

pub mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use flotilla_proto::tags::{Selector, Tags};
use serde::{Deserialize, Serialize};

pub use plan::{Cmp, Gate, GateMetric, OnFailure, Plan, Wave};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RolloutError {
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("cannot {action} a rollout that is {state}")]
    State { action: &'static str, state: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Pending,
    Running,
    Paused,
    Completed,
    Aborted,
    RolledBack,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
            Phase::RolledBack => "rolled_back",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted | Phase::RolledBack)
    }
}

/// What the server knows of a device for this rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceView {
    pub id: String,
    /// Tags and facts (`arch`, `accelerator`, ...) the target and selector waves match on.
    pub tags: Tags,
    pub online: bool,
    pub outcome: Outcome,
}

/// How this rollout's install went on a device (from its events).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Nothing heard yet.
    None,
    /// Accepted and downloading or testing.
    Installing,
    Succeeded,
    Failed {
        self_test: bool,
        reason: String,
    },
}

/// A device's health on the new version since it installed it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub device: String,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<f64>,
    /// The same device's p95 on the version before, when known.
    pub prev_latency_p95_us: Option<f64>,
    /// The bundle asked for a delegate and the device runs on the CPU.
    pub accelerator_fallback: bool,
}

/// What the server measured for the new version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observations {
    pub health: Vec<Health>,
    /// Drift of the new version's data over the updated devices (the worst signal's latest
    /// scored window), by metric.
    pub drift: BTreeMap<GateMetric, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub name: String,
    pub value: Option<f64>,
    pub threshold: f64,
    pub passed: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveRecord {
    pub started: Option<u64>,
    /// When every member's install settled.
    pub settled: Option<u64>,
    pub passed: Option<u64>,
    /// The latest judgement of each gate.
    pub gates: Vec<GateResult>,
}

/// Everything the engine remembers; persisted by the server after every step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub phase: Phase,
    pub reason: Option<String>,
    pub current_wave: usize,
    /// Per wave: the hash below which a device is in it (None for selector waves).
    pub cuts: Vec<Option<f64>>,
    /// Device → wave, fixed the first time the device is seen in the target.
    pub assigned: BTreeMap<String, usize>,
    /// Device → when it was offered the bundle (never offered twice).
    pub offered: BTreeMap<String, u64>,
    /// Devices already offered the previous version after a rollback.
    pub rolled_back: BTreeSet<String>,
    pub waves: Vec<WaveRecord>,
}

impl RolloutState {
    pub fn new(plan: &Plan) -> RolloutState {
        RolloutState {
            phase: Phase::Pending,
            reason: None,
            current_wave: 0,
            cuts: vec![],
            assigned: BTreeMap::new(),
            offered: BTreeMap::new(),
            rolled_back: BTreeSet::new(),
            waves: vec![WaveRecord::default(); plan.waves.len()],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Offer the rollout's bundle.
    Offer { device: String },
    /// Offer the version the device had before.
    Rollback { device: String },
}

/// Operator commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Abort,
    /// Start the next wave now, whatever the gates say.
    Promote,
    Rollback,
}

/// Position of a device in [0, 1) for this rollout (FNV-1a of the two ids).
pub fn device_hash(rollout_id: &str, device_id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rollout_id.bytes().chain([0u8]).chain(device_id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (splitmix64) so near-identical ids spread out.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn selector(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_default()
}

/// The cut points of the hash-ordered waves, from the devices in the target at the start.
fn cuts(rollout_id: &str, plan: &Plan, target: &[&DeviceView]) -> Vec<Option<f64>> {
    let selectors: Vec<Selector> = plan
        .waves
        .iter()
        .filter_map(|w| match w {
            Wave::Selector(s) => Some(selector(s)),
            _ => None,
        })
        .collect();
    let mut hashes: Vec<f64> = target
        .iter()
        .filter(|d| !selectors.iter().any(|s| s.matches(&d.tags)))
        .map(|d| device_hash(rollout_id, &d.id))
        .collect();
    hashes.sort_by(f64::total_cmp);
    let total = hashes.len();
    let mut taken = 0usize;
    plan.waves
        .iter()
        .map(|w| {
            let n = match w {
                Wave::Selector(_) => return None,
                Wave::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
                Wave::Count(c) => *c as usize,
            };
            // Cumulative; every hash wave takes at least one more device while any are left.
            taken = n.max(taken + 1).min(total).max(taken);
            Some(if taken >= total || *w == Wave::Percent(100.0) {
                1.0
            } else if taken == 0 {
                0.0
            } else {
                (hashes[taken - 1] + hashes[taken]) / 2.0
            })
        })
        .collect()
}

/// The wave a device belongs to, if any.
pub fn wave_of(rollout_id: &str, plan: &Plan, cuts: &[Option<f64>], device: &DeviceView) -> Option<usize> {
    let h = device_hash(rollout_id, &device.id);
    plan.waves.iter().enumerate().find_map(|(k, w)| {
        let takes = match w {
            Wave::Selector(s) => selector(s).matches(&device.tags),
            _ => cuts.get(k).copied().flatten().is_some_and(|c| h < c),
        };
        takes.then_some(k)
    })
}

/// Counts per wave, for status: members, offered, succeeded, failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveStats {
    pub size: u64,
    pub offered: u64,
    pub succeeded: u64,
    pub failed: u64,
}

pub fn wave_stats(state: &RolloutState, devices: &[DeviceView]) -> Vec<WaveStats> {
    let mut out = vec![WaveStats::default(); state.waves.len()];
    let by_id: BTreeMap<&str, &DeviceView> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    for (id, &k) in &state.assigned {
        let Some(w) = out.get_mut(k) else { continue };
        w.size += 1;
        w.offered += u64::from(state.offered.contains_key(id));
        match by_id.get(id.as_str()).map(|d| &d.outcome) {
            Some(Outcome::Succeeded) => w.succeeded += 1,
            Some(Outcome::Failed { .. }) => w.failed += 1,
            _ => {}
        }
    }
    out
}

/// Applies an operator command.
pub fn apply(plan: &Plan, state: &RolloutState, cmd: Command, now: u64) -> Result<RolloutState, RolloutError> {
    let mut st = state.clone();
    let refuse = |action| Err(RolloutError::State { action, state: state.phase.as_str() });
    match (cmd, state.phase) {
        (Command::Pause, Phase::Running | Phase::Pending) => {
            st.phase = Phase::Paused;
            st.reason = Some("paused by an operator".into());
        }
        (Command::Pause, _) => return refuse("pause"),
        (Command::Resume, Phase::Paused) => {
            st.phase = Phase::Running;
            st.reason = None;
            // Gates are judged afresh: a wave that failed one bakes again from now.
            if let Some(w) = st.waves.get_mut(st.current_wave)
                && w.settled.is_some()
            {
                w.settled = Some(now);
            }
        }
        (Command::Resume, _) => return refuse("resume"),
        (Command::Abort, p) if !p.is_final() => {
            st.phase = Phase::Aborted;
            st.reason = Some("aborted by an operator".into());
        }
        (Command::Abort, _) => return refuse("abort"),
        (Command::Promote, Phase::Running | Phase::Paused) => {
            st.phase = Phase::Running;
            st.reason = None;
            next_wave(plan, &mut st, now);
        }
        (Command::Promote, _) => return refuse("promote"),
        (Command::Rollback, p) if p != Phase::RolledBack && p != Phase::Aborted => {
            st.phase = Phase::RolledBack;
            st.reason = Some("rolled back by an operator".into());
        }
        (Command::Rollback, _) => return refuse("roll back"),
    }
    Ok(st)
}

fn next_wave(plan: &Plan, st: &mut RolloutState, now: u64) {
    if let Some(w) = st.waves.get_mut(st.current_wave) {
        w.passed = Some(now);
    }
    if st.current_wave + 1 >= plan.waves.len() {
        st.phase = Phase::Completed;
        st.reason = None;
    } else {
        st.current_wave += 1;
        st.waves[st.current_wave].started = Some(now);
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The value of one gate over the rollout's devices so far, or None without enough evidence.
fn gate_value(gate: &Gate, members: &[&DeviceView], obs: &Observations, min_reporting: u32) -> Option<f64> {
    let finished: Vec<&&DeviceView> =
        members.iter().filter(|d| matches!(d.outcome, Outcome::Succeeded | Outcome::Failed { .. })).collect();
    let updated: BTreeSet<&str> =
        members.iter().filter(|d| d.outcome == Outcome::Succeeded).map(|d| d.id.as_str()).collect();
    let reporting: Vec<&Health> =
        obs.health.iter().filter(|h| updated.contains(h.device.as_str()) && h.inferences > 0).collect();
    let enough = reporting.len() as u32 >= min_reporting.max(1);
    match gate.metric {
        GateMetric::InstallSuccess => (!finished.is_empty()).then(|| {
            finished.iter().filter(|d| d.outcome == Outcome::Succeeded).count() as f64 / finished.len() as f64
        }),
        GateMetric::SelfTestPass => (!finished.is_empty()).then(|| {
            let failed =
                finished.iter().filter(|d| matches!(d.outcome, Outcome::Failed { self_test: true, .. })).count();
            1.0 - failed as f64 / finished.len() as f64
        }),
        GateMetric::ErrorRate => {
            let (n, e) = reporting.iter().fold((0u64, 0u64), |(n, e), h| (n + h.inferences, e + h.errors));
            (enough && n > 0).then(|| e as f64 / n as f64)
        }
        GateMetric::LatencyP95 => {
            if !enough {
                return None;
            }
            if gate.relative {
                median(
                    reporting
                        .iter()
                        .filter_map(|h| Some(h.latency_p95_us? / h.prev_latency_p95_us.filter(|p| *p > 0.0)?))
                        .collect(),
                )
            } else {
                median(reporting.iter().filter_map(|h| h.latency_p95_us).collect())
            }
        }
        GateMetric::Psi | GateMetric::Js | GateMetric::Ks | GateMetric::Wasserstein => {
            obs.drift.get(&gate.metric).copied()
        }
        GateMetric::AcceleratorFallback => {
            Some(obs.health.iter().filter(|h| updated.contains(h.device.as_str()) && h.accelerator_fallback).count()
                as f64)
        }
    }
}

/// One step. Call it whenever anything changed (and now and then, for timeouts).
pub fn step(
    rollout_id: &str,
    plan: &Plan,
    state: &RolloutState,
    devices: &[DeviceView],
    obs: &Observations,
    now: u64,
) -> (RolloutState, Vec<Action>) {
    let mut st = state.clone();
    let mut actions = Vec::new();
    let target_sel = selector(&plan.target);
    let target: Vec<&DeviceView> = devices.iter().filter(|d| target_sel.matches(&d.tags)).collect();
    match st.phase {
        Phase::Pending => {
            st.phase = Phase::Running;
            st.cuts = cuts(rollout_id, plan, &target);
            st.waves = vec![WaveRecord::default(); plan.waves.len()];
            st.waves[0].started = Some(now);
        }
        Phase::Running => {}
        Phase::RolledBack => {
            roll_back(&mut st, devices, &mut actions);
            return (st, actions);
        }
        Phase::Paused | Phase::Completed | Phase::Aborted => return (st, actions),
    }
    for d in &target {
        if !st.assigned.contains_key(&d.id)
            && let Some(k) = wave_of(rollout_id, plan, &st.cuts, d)
        {
            st.assigned.insert(d.id.clone(), k);
        }
    }
    // By id: a fleet is tens of thousands of devices, and every lookup below is per member.
    let by_id: HashMap<&str, &DeviceView> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    // Waves may pass in one step (a promote, or empty waves): loop until one waits.
    loop {
        let k = st.current_wave;
        let member_ids: Vec<String> = st.assigned.iter().filter(|(_, w)| **w <= k).map(|(d, _)| d.clone()).collect();
        for id in &member_ids {
            if !st.offered.contains_key(id) && by_id.get(id.as_str()).is_some_and(|d| d.online) {
                st.offered.insert(id.clone(), now);
                actions.push(Action::Offer { device: id.clone() });
            }
        }
        let is_member: HashSet<&str> = member_ids.iter().map(String::as_str).collect();
        let members: Vec<&DeviceView> = devices.iter().filter(|d| is_member.contains(d.id.as_str())).collect();
        let started = st.waves[k].started.unwrap_or(now);
        let settled = member_ids.iter().all(|id| {
            let outcome = by_id.get(id.as_str()).map(|d| &d.outcome);
            matches!(outcome, Some(Outcome::Succeeded | Outcome::Failed { .. }))
                || match st.offered.get(id) {
                    Some(&at) => now.saturating_sub(at) >= plan.offer_timeout_secs,
                    None => now.saturating_sub(started) >= plan.offer_timeout_secs,
                }
        });
        if !settled {
            return (st, actions);
        }
        let settled_at = *st.waves[k].settled.get_or_insert(now);
        let baked = now.saturating_sub(settled_at) >= plan.bake_secs;
        let timed_out = now.saturating_sub(settled_at) >= plan.bake_secs.saturating_add(plan.gate_timeout_secs);
        let results: Vec<GateResult> = plan
            .gates
            .iter()
            .map(|g| {
                let value = gate_value(g, &members, obs, plan.min_reporting);
                GateResult {
                    name: g.name(),
                    value,
                    threshold: g.threshold,
                    passed: value.is_some_and(|v| g.cmp.holds(v, g.threshold)),
                }
            })
            .collect();
        st.waves[k].gates = results.clone();
        // A gate that has its evidence and fails it, fails the wave: install gates at once,
        // health gates once the bake is over.
        let failed = plan
            .gates
            .iter()
            .zip(&results)
            .find(|(g, r)| r.value.is_some() && !r.passed && (baked || g.metric.is_install()));
        if let Some((_, r)) = failed {
            let reason = format!(
                "wave {} gate {} failed: {} is {:.4}",
                k + 1,
                r.name,
                r.name.split(['<', '>']).next().unwrap_or(""),
                r.value.unwrap_or(f64::NAN)
            );
            fail(plan, &mut st, devices, &mut actions, reason);
            return (st, actions);
        }
        if !baked {
            return (st, actions);
        }
        if let Some(r) = results.iter().find(|r| r.value.is_none()) {
            if timed_out {
                let reason = format!(
                    "wave {} gate {}: not enough evidence after the bake and {} s more (need {} reporting devices)",
                    k + 1,
                    r.name,
                    plan.gate_timeout_secs,
                    plan.min_reporting
                );
                fail(plan, &mut st, devices, &mut actions, reason);
            }
            return (st, actions);
        }
        next_wave(plan, &mut st, now);
        if st.phase == Phase::Completed {
            return (st, actions);
        }
    }
}

fn fail(plan: &Plan, st: &mut RolloutState, devices: &[DeviceView], actions: &mut Vec<Action>, reason: String) {
    st.reason = Some(reason);
    match plan.on_failure {
        OnFailure::Pause => st.phase = Phase::Paused,
        OnFailure::Rollback => {
            st.phase = Phase::RolledBack;
            roll_back(st, devices, actions);
        }
    }
}

/// Offers the previous version to every device that installed this rollout's bundle (once each;
/// a device offline now gets it on a later step).
fn roll_back(st: &mut RolloutState, devices: &[DeviceView], actions: &mut Vec<Action>) {
    for d in devices {
        if d.outcome == Outcome::Succeeded
            && st.assigned.contains_key(&d.id)
            && d.online
            && st.rolled_back.insert(d.id.clone())
        {
            actions.push(Action::Rollback { device: d.id.clone() });
        }
    }
}
