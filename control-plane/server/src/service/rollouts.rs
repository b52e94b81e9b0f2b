//! Rollouts: starting one, operators' commands, and what a rollout looks like now. The engine
//! (`flotilla-rollout`) is pure; the driver ([`crate::worker::driver`]) steps it. Every save
//! compares the rollout's revision, so an operator's command and a driver step that read older
//! state cannot overwrite each other.

use flotilla_rollout::{Command, DeviceView, Outcome, Plan, RolloutState, WaveStats};

use super::{Error, Fleet, Result, devices};
use crate::store::{BundleRow, DeviceRow, RolloutDeviceRow, RolloutRow, RolloutStep};
use crate::util::{new_id, now_s};

/// A rollout's plan and engine state (rows from before the engine get a one-wave plan over the
/// devices they listed).
pub fn engine_of(r: &RolloutRow, rds: &[RolloutDeviceRow]) -> anyhow::Result<(Plan, RolloutState)> {
    let plan = match &r.plan {
        Some(p) => serde_json::from_str(p)?,
        None => {
            let ids: Vec<&str> = rds.iter().map(|d| d.device_id.as_str()).collect();
            Plan { target: format!("id in ({})", ids.join(",")), ..Plan::all_at_once() }
        }
    };
    let state = match &r.engine {
        Some(e) => serde_json::from_str(e)?,
        None => RolloutState::new(&plan),
    };
    Ok((plan, state))
}

/// The engine's view of a device: what selectors see of it and this rollout's outcome there.
pub fn device_view(d: &DeviceRow, rd: Option<&RolloutDeviceRow>) -> DeviceView {
    let outcome = match rd.map(|r| r.state.as_str()) {
        Some("succeeded") => Outcome::Succeeded,
        Some("failed") => {
            let reason = rd.and_then(|r| r.reason.clone()).unwrap_or_default();
            Outcome::Failed { self_test: reason.starts_with("self_testing"), reason }
        }
        Some("downloading") => Outcome::Installing,
        _ => Outcome::None,
    };
    DeviceView { id: d.id.clone(), tags: devices::facts(d), online: d.online, outcome }
}

/// Validate a plan (default: one wave gated on every install succeeding), narrow its target to
/// `devices` when given, and store the new rollout for the driver.
pub async fn start(f: &Fleet, b: &BundleRow, plan: Option<serde_json::Value>, devices: &[String]) -> Result<String> {
    let bad_plan = |e: String| {
        Error::invalid("bad_plan", e)
            .hint("e.g. --waves 5%,25%,100% --bake 10m --gate 'latency_p95<=1.2x' --gate 'psi<=0.2'")
    };
    for d in devices {
        if f.store.device(d).await?.is_none() {
            return Err(Error::not_found("device_not_found", format!("no device {d:?}")));
        }
    }
    let mut plan: Plan = match plan {
        Some(v) => serde_json::from_value(v).map_err(|e| bad_plan(e.to_string()))?,
        None => Plan {
            gates: vec![flotilla_rollout::Gate::parse("install_success>=1").expect("a valid gate")],
            ..Plan::all_at_once()
        },
    };
    if !devices.is_empty() {
        let ids = format!("id in ({})", devices.join(","));
        plan.target = if plan.target.trim().is_empty() { ids } else { format!("{},{ids}", plan.target) };
    }
    plan.validate().map_err(|e| bad_plan(e.to_string()))?;
    let target = flotilla_proto::tags::Selector::parse(&plan.target).map_err(bad_plan)?;
    let matching = f.store.devices().await?.iter().filter(|d| target.matches(&devices::facts(d))).count();
    if matching == 0 {
        return Err(Error::conflict(
            "no_devices",
            "no registered device matches the rollout's target, so it would target nothing",
        )
        .hint("start an agent against this server's broker first, or check the target with `flotilla devices ls -l`"));
    }
    let id = format!("r-{}", new_id());
    let engine = RolloutState::new(&plan);
    let (plan_json, engine_json) = (
        serde_json::to_string(&plan).map_err(anyhow::Error::from)?,
        serde_json::to_string(&engine).map_err(anyhow::Error::from)?,
    );
    f.store.create_rollout(&id, &b.id, &plan_json, &engine_json, now_s()).await?;
    f.wake.notify_one();
    tracing::info!(rollout = %id, bundle = %format!("{}@{}", b.name, b.version), devices = matching, waves = plan.waves.len(), "rollout started");
    Ok(id)
}

fn no_rollout(id: &str) -> Error {
    Error::not_found("rollout_not_found", format!("no rollout {id:?}"))
}

/// `pause`, `resume`, `abort`, `promote`, `rollback`: applied to the state as stored, and saved
/// only if nobody saved it meanwhile (then applied again to the newer state).
pub async fn command(f: &Fleet, id: &str, command: &str) -> Result<Status> {
    let cmd = match command {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "abort" => Command::Abort,
        "promote" => Command::Promote,
        "rollback" => Command::Rollback,
        other => {
            return Err(Error::not_found("unknown_command", format!("{other:?} is not a rollout command"))
                .hint("pause, resume, abort, promote or rollback"));
        }
    };
    loop {
        let r = f.store.rollout(id).await?.ok_or_else(|| no_rollout(id))?;
        let rds = f.store.rollout_devices(id).await?;
        let (plan, engine) = engine_of(&r, &rds)?;
        let next = flotilla_rollout::apply(&plan, &engine, cmd, now_s() as u64)
            .map_err(|e| Error::conflict("bad_state", e.to_string()).hint("see `flotilla rollout status ID`"))?;
        let engine_json = serde_json::to_string(&next).map_err(anyhow::Error::from)?;
        let step = RolloutStep {
            state: next.phase.as_str(),
            reason: next.reason.as_deref(),
            engine_json: &engine_json,
            offers: &[],
            now: now_s(),
        };
        if f.store.save_rollout(id, r.rev, &step).await? {
            tracing::info!(rollout = %id, command, state = next.phase.as_str(), "rollout command");
            break;
        }
    }
    f.wake.notify_one();
    status(f, id).await
}

/// A rollout as it stands: its row, bundle, plan, engine state, per-wave counts and devices.
pub struct Status {
    pub row: RolloutRow,
    pub bundle: Option<BundleRow>,
    pub plan: Plan,
    pub engine: RolloutState,
    pub waves: Vec<WaveStats>,
    pub devices: Vec<RolloutDeviceRow>,
}

pub async fn status(f: &Fleet, id: &str) -> Result<Status> {
    let r = f.store.rollout(id).await?.ok_or_else(|| no_rollout(id))?;
    status_of(f, r, &f.store.devices().await?).await
}

async fn status_of(f: &Fleet, r: RolloutRow, all: &[DeviceRow]) -> Result<Status> {
    let bundle = f.store.bundle(&r.bundle_id).await?;
    let devices = f.store.rollout_devices(&r.id).await?;
    let (plan, engine) = engine_of(&r, &devices)?;
    let by_device: std::collections::HashMap<&str, &RolloutDeviceRow> =
        devices.iter().map(|x| (x.device_id.as_str(), x)).collect();
    let views: Vec<DeviceView> = all.iter().map(|d| device_view(d, by_device.get(d.id.as_str()).copied())).collect();
    let waves = flotilla_rollout::wave_stats(&engine, &views);
    Ok(Status { row: r, bundle, plan, engine, waves, devices })
}

pub async fn list(f: &Fleet) -> Result<Vec<Status>> {
    let all = f.store.devices().await?;
    let mut out = Vec::new();
    for r in f.store.rollouts().await? {
        out.push(status_of(f, r, &all).await?);
    }
    Ok(out)
}
