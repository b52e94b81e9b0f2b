//! Trust-root rotation across a fleet: the control plane accepts root N+1 only as a rotation of
//! root N, sends it to every device (and to late joiners on hello), devices persist it, and
//! from then on bundles are judged by the new root.

use std::time::Duration;

use flotilla_bundle::SecretKey;
use flotilla_bundle::root::{Root, sign_root};
use flotilla_bundle::signed::RoleKeys;
use flotilla_demo::{Fleet, digits, unix_now};

const T: Duration = Duration::from_secs(60);

/// Root v2: the fleet key keeps the root role, `targets` moves to `new_targets`.
fn rotated(fleet: &Fleet, new_targets: &SecretKey, signers: &[&SecretKey]) -> Vec<u8> {
    let mut r = Root::single_key(&fleet.key.public(), unix_now(), None);
    r.version = 2;
    r.keys.insert(new_targets.key_id(), new_targets.public());
    r.roles.insert("targets".into(), RoleKeys { keyids: vec![new_targets.key_id()], threshold: 1 });
    sign_root(&r, signers).unwrap()
}

async fn wait_root_accepted(fleet: &Fleet, device: &str, version: u64) {
    fleet
        .wait_for(T, || async {
            Ok(fleet
                .events(device)
                .await?
                .iter()
                .any(|e| e.kind == "trust_root_accepted" && e.detail["version"] == version))
        })
        .await
        .unwrap_or_else(|e| panic!("{device} never accepted root v{version}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_root_reaches_every_device_and_changes_who_may_sign() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 2).await.unwrap();
    let samples = digits::samples();
    let golden = || digits::golden(&samples[..1]);
    let k2 = SecretKey::generate().unwrap();

    // A root that skips the old root key's signature is refused by the control plane.
    let unsigned_by_old = rotated(&fleet, &k2, &[&k2]);
    let err = fleet.push_root(unsigned_by_old).await.unwrap_err().to_string();
    assert!(err.contains("422") && err.contains("threshold not met"), "{err}");

    let v2 = rotated(&fleet, &k2, &[&fleet.key]);
    let pushed = fleet.push_root(v2.clone()).await.unwrap();
    assert_eq!((pushed.version, pushed.devices), (2, 2));
    for d in ["dev-0", "dev-1"] {
        wait_root_accepted(&fleet, d, 2).await;
    }
    // Pushing a root the server already has is harmless; a different root claiming an old
    // version is refused.
    fleet.push_root(v2).await.unwrap();
    fleet.push_root(std::fs::read(&fleet.root_path).unwrap()).await.unwrap();
    let other_v1 = sign_root(&Root::single_key(&k2.public(), unix_now(), None), &[&k2]).unwrap();
    let err = fleet.push_root(other_v1).await.unwrap_err().to_string();
    assert!(err.contains("409") && err.contains("not newer"), "{err}");

    // The old key no longer signs bundles: the control plane refuses the push outright.
    let by_old = fleet.bundle_signed_by("digits", 1, digits::MODEL, golden(), &[&fleet.key]).unwrap();
    let err = fleet.push(by_old).await.unwrap_err().to_string();
    assert!(err.contains("422"), "{err}");
    // The new targets key does.
    let by_new = fleet.bundle_signed_by("digits", 1, digits::MODEL, golden(), &[&k2]).unwrap();
    fleet.push(by_new).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded), ("completed", 2), "{r:?}");

    // A device that joins later, flashed with root v1, catches up on hello and then installs.
    fleet.start_agent("dev-late").await.unwrap();
    wait_root_accepted(&fleet, "dev-late", 2).await;
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    let late = r.devices.iter().find(|d| d.device == "dev-late").unwrap();
    assert_eq!(late.state, "succeeded", "{r:?}");

    // The newest root survives a restart (the agent was flashed with v1).
    let (id, agent) = fleet.agents.remove(0);
    agent.kill().await;
    fleet.start_agent(&id).await.unwrap();
    let ctx_version = fleet.agent(&id).ctx().trust.read().unwrap().root().version;
    assert_eq!(ctx_version, 2);
    fleet.shutdown().await;
}

/// A board without a real-time clock boots at 1970. It still installs a current bundle (the
/// trusted clock is the max of the wall clock and the signed times it has seen), and after it
/// has seen one, a replayed bundle that expired since is refused, also across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_booting_in_1970_installs_current_bundles_and_refuses_expired_replays() {
    let dir = tempfile::tempdir().unwrap();
    // The server would refuse the expired bundle itself; here only the device judges.
    let opts = flotilla_demo::FleetOptions { server_checks_signatures: false, ..Default::default() };
    let mut fleet = Fleet::start_with(dir.path(), 0, opts).await.unwrap();
    let mut cfg = fleet.agent_config("rtc-less").await;
    cfg.clock = flotilla_agent::Clock::fixed(0);
    fleet.start_agent_with(cfg.clone()).await.unwrap();
    fleet.wait_devices_online(1).await.unwrap();
    let samples = digits::samples();
    let now = unix_now();
    let build = |version, created, expires| {
        let mut opts = flotilla_builder::BuildOptions::new("digits", version, digits::MODEL.to_vec(), created);
        opts.golden = digits::golden(&samples[..2]);
        opts.expires = Some(expires);
        flotilla_demo::sign(&flotilla_builder::build(&opts).unwrap().bytes, &fleet.key).unwrap()
    };
    let current = build(1, now, now + 3600);
    // Signed two hours ago, valid for one: expired an hour ago, though not by a 1970 clock.
    let stale = build(2, now - 7200, now - 3600);

    fleet.push(current).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    fleet.kill_agent("rtc-less").await;
    fleet.start_agent_with(cfg).await.unwrap();
    fleet.push(stale).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@2").await.unwrap(), T).await.unwrap();
    assert_eq!(r.state, "paused", "{r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("install_success"), "{r:?}");
    let reason = r.devices[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("offered:") && reason.contains("expired"), "{reason}");
    let resp = fleet.infer("rtc-less", "digits", &digits::request(&samples)).await.unwrap();
    assert_eq!(resp.model_version, "1");
    fleet.shutdown().await;
}
