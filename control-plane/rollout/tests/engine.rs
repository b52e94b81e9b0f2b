//! The rollout engine's transitions, driven through a small simulated fleet: waves, bake, gates,
//! failure policies, operator commands, devices going offline, late reports, restarts.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_rollout::*;
use proptest::prelude::*;

struct Sim {
    id: String,
    plan: Plan,
    st: RolloutState,
    devices: Vec<DeviceView>,
    obs: Observations,
    now: u64,
    offers: Vec<String>,
    rollbacks: Vec<String>,
}

fn device(id: &str) -> DeviceView {
    DeviceView { id: id.into(), tags: BTreeMap::new(), online: true, outcome: Outcome::None }
}

impl Sim {
    fn new(n: usize, plan: Plan) -> Sim {
        plan.validate().unwrap();
        let devices = (0..n).map(|i| device(&format!("dev-{i:03}"))).collect();
        Sim {
            id: "r-test".into(),
            st: RolloutState::new(&plan),
            plan,
            devices,
            obs: Observations::default(),
            now: 1_000,
            offers: vec![],
            rollbacks: vec![],
        }
    }

    fn step(&mut self) -> Vec<Action> {
        let (st, actions) = step(&self.id, &self.plan, &self.st, &self.devices, &self.obs, self.now);
        for a in &actions {
            match a {
                Action::Offer { device } => {
                    assert!(!self.offers.contains(device), "{device} offered twice");
                    self.offers.push(device.clone());
                }
                Action::Rollback { device } => {
                    assert!(!self.rollbacks.contains(device), "{device} rolled back twice");
                    self.rollbacks.push(device.clone());
                }
            }
        }
        self.st = st;
        actions
    }

    fn dev(&mut self, id: &str) -> &mut DeviceView {
        self.devices.iter_mut().find(|d| d.id == id).unwrap()
    }

    /// Every offered device that has not finished succeeds and reports healthy inferences; the
    /// server steps when the events arrive, as it does.
    fn succeed_offered(&mut self, p95: f64, errors: u64) {
        self.succeed_quietly(p95, errors);
        self.step();
    }

    fn succeed_quietly(&mut self, p95: f64, errors: u64) {
        for id in self.offers.clone() {
            if self.dev(&id).outcome == Outcome::None {
                self.dev(&id).outcome = Outcome::Succeeded;
                self.obs.health.push(Health {
                    device: id.clone(),
                    inferences: 100,
                    errors,
                    latency_p95_us: Some(p95),
                    prev_latency_p95_us: Some(1000.0),
                    accelerator_fallback: false,
                });
            }
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += secs;
    }

    fn wave_members(&self, k: usize) -> Vec<String> {
        self.st.assigned.iter().filter(|(_, w)| **w == k).map(|(d, _)| d.clone()).collect()
    }
}

fn plan(waves: &str, gates: &[&str]) -> Plan {
    Plan {
        waves: Wave::parse_list(waves).unwrap(),
        bake_secs: 60,
        gates: gates.iter().map(|g| Gate::parse(g).unwrap()).collect(),
        ..Plan::all_at_once()
    }
}

#[test]
fn waves_have_the_planned_sizes_and_membership_is_deterministic() {
    let mut a = Sim::new(100, plan("10%,50%,100%", &[]));
    a.step();
    let sizes: Vec<usize> = (0..3).map(|k| a.wave_members(k).len()).collect();
    assert_eq!(sizes, [10, 40, 50]);
    let mut b = Sim::new(100, plan("10%,50%,100%", &[]));
    b.step();
    assert_eq!(a.st.assigned, b.st.assigned, "same rollout id, same waves");
    // Another rollout id shuffles the fleet differently.
    let mut c = Sim::new(100, plan("10%,50%,100%", &[]));
    c.id = "r-other".into();
    c.step();
    assert_ne!(a.wave_members(0), c.wave_members(0));
    // Counts are cumulative too, and small fleets still get a canary.
    let mut d = Sim::new(20, plan("2,5,100%", &[]));
    d.step();
    assert_eq!((0..3).map(|k| d.wave_members(k).len()).collect::<Vec<_>>(), [2, 3, 15]);
    let mut e = Sim::new(3, plan("5%,25%,100%", &[]));
    e.step();
    assert_eq!((0..3).map(|k| e.wave_members(k).len()).collect::<Vec<_>>(), [1, 1, 1]);
}

#[test]
fn a_good_bundle_passes_every_wave_and_nobody_is_offered_early() {
    let mut s = Sim::new(20, plan("10%,50%,100%", &["install_success>=1", "error_rate<=0.01", "latency_p95<=1.2x"]));
    let first = s.step();
    assert_eq!(first.len(), 2, "only the first wave is offered");
    assert_eq!(s.st.phase, Phase::Running);
    for k in 0..3 {
        assert_eq!(s.st.current_wave, k);
        s.succeed_offered(1100.0, 0);
        s.step();
        assert_eq!(s.st.current_wave, k, "installed, but the bake is not over");
        s.advance(59);
        s.step();
        assert_eq!(s.st.current_wave, k);
        s.advance(1);
        let offered = s.step();
        if k < 2 {
            assert_eq!(s.st.current_wave, k + 1);
            assert_eq!(offered.len(), s.wave_members(k + 1).len());
            assert!(s.st.waves[k].gates.iter().all(|g| g.passed), "{:?}", s.st.waves[k].gates);
        }
    }
    assert_eq!(s.st.phase, Phase::Completed);
    assert_eq!(s.offers.len(), 20);
    let stats = wave_stats(&s.st, &s.devices);
    assert_eq!(stats.iter().map(|w| w.succeeded).sum::<u64>(), 20);
    assert_eq!(stats[0], WaveStats { size: 2, offered: 2, succeeded: 2, failed: 0 });
}

#[test]
fn a_failed_self_test_stops_the_first_wave_and_rolls_it_back() {
    let mut p = plan("25%,100%", &["self_test_pass>=1"]);
    p.on_failure = OnFailure::Rollback;
    let mut s = Sim::new(8, p);
    s.step();
    let wave0 = s.wave_members(0);
    assert_eq!(wave0.len(), 2);
    s.dev(&wave0[0]).outcome = Outcome::Succeeded;
    s.step();
    assert_eq!(s.st.phase, Phase::Running, "one install still out");
    s.dev(&wave0[1]).outcome = Outcome::Failed { self_test: true, reason: "golden case 0".into() };
    let actions = s.step();
    // Install gates do not wait for the bake.
    assert_eq!(s.st.phase, Phase::RolledBack);
    assert!(s.st.reason.as_deref().unwrap().contains("self_test_pass"), "{:?}", s.st.reason);
    assert_eq!(actions, vec![Action::Rollback { device: wave0[0].clone() }]);
    s.advance(10_000);
    assert!(s.step().is_empty(), "nothing more, ever");
    assert_eq!(s.offers.len(), 2, "the other devices never received the bundle");
}

#[test]
fn a_high_error_rate_pauses_only_after_the_bake() {
    let mut s = Sim::new(10, plan("20%,100%", &["error_rate<=0.05"]));
    s.step();
    s.succeed_offered(1000.0, 30);
    s.step();
    assert_eq!(s.st.phase, Phase::Running, "health gates wait for the bake");
    s.advance(60);
    s.step();
    assert_eq!(s.st.phase, Phase::Paused);
    let g = &s.st.waves[0].gates[0];
    assert_eq!((g.value, g.passed), (Some(0.3), false));
    assert_eq!(s.offers.len(), 2);
    // An operator who knows better resumes; the gate is judged again after another bake.
    s.obs.health.iter_mut().for_each(|h| h.errors = 0);
    s.st = apply(&s.plan, &s.st, Command::Resume, s.now).unwrap();
    s.step();
    assert_eq!(s.st.current_wave, 0);
    s.advance(60);
    s.step();
    assert_eq!(s.st.current_wave, 1);
}

#[test]
fn latency_is_judged_against_the_previous_version_on_the_same_devices() {
    for (p95, passes) in [(1100.0, true), (1500.0, false)] {
        let mut s = Sim::new(10, plan("20%,100%", &["latency_p95<=1.2x"]));
        s.step();
        s.succeed_offered(p95, 0);
        s.advance(60);
        s.step();
        assert_eq!(s.st.phase == Phase::Running && s.st.current_wave == 1, passes, "p95 {p95}");
        assert_eq!(s.st.waves[0].gates[0].value, Some(p95 / 1000.0));
    }
    // Absolute thresholds in time units.
    let mut s = Sim::new(10, plan("20%,100%", &["latency_p95<=1ms"]));
    s.step();
    s.succeed_offered(1500.0, 0);
    s.advance(60);
    s.step();
    assert_eq!(s.st.phase, Phase::Paused);
}

#[test]
fn too_few_reporting_devices_wait_then_fail_for_lack_of_evidence() {
    let mut p = plan("50%,100%", &["error_rate<=0.01"]);
    p.min_reporting = 3;
    p.gate_timeout_secs = 120;
    let mut s = Sim::new(4, p);
    s.step();
    s.succeed_offered(1000.0, 0);
    assert_eq!(s.obs.health.len(), 2);
    s.advance(60);
    s.step();
    assert_eq!(s.st.phase, Phase::Running, "waiting for evidence");
    assert_eq!(s.st.waves[0].gates[0].value, None);
    s.advance(119);
    s.step();
    assert_eq!(s.st.phase, Phase::Running);
    s.advance(1);
    s.step();
    assert_eq!(s.st.phase, Phase::Paused);
    assert!(s.st.reason.as_deref().unwrap().contains("not enough evidence"));
}

#[test]
fn devices_offline_mid_wave_do_not_hold_it_forever_and_get_the_bundle_later() {
    let mut p = plan("50%,100%", &[]);
    p.offer_timeout_secs = 300;
    p.bake_secs = 0;
    let mut s = Sim::new(4, p);
    // Start with every device offline but one.
    let ids: Vec<String> = s.devices.iter().map(|d| d.id.clone()).collect();
    for id in &ids[1..] {
        s.dev(id).online = false;
    }
    s.step();
    let wave0 = s.wave_members(0);
    let offline0: Vec<&String> = wave0.iter().filter(|d| **d != ids[0]).collect();
    s.succeed_offered(1000.0, 0);
    s.step();
    assert_eq!(s.st.current_wave, 0, "an offline member holds the wave until the offer timeout");
    s.advance(300);
    s.step();
    assert_eq!(s.st.current_wave, 1, "then the wave goes on without it");
    // Back online: offered once, though its wave has passed.
    for id in &offline0 {
        s.dev(id).online = true;
    }
    let offered = s.step();
    assert_eq!(offered.len(), offline0.len());
    assert!(s.step().is_empty());
}

#[test]
fn late_joiners_land_in_the_wave_their_hash_falls_into() {
    let mut s = Sim::new(50, plan("10%,100%", &[]));
    s.step();
    let cuts = s.st.cuts.clone();
    let before = s.st.assigned.clone();
    s.devices.push(device("late-1"));
    s.devices.push(device("late-2"));
    s.step();
    assert_eq!(s.st.cuts, cuts, "cut points are fixed at the start");
    for (d, w) in &before {
        assert_eq!(s.st.assigned.get(d), Some(w), "{d} moved");
    }
    for late in ["late-1", "late-2"] {
        let want = wave_of(&s.id, &s.plan, &cuts, &device(late)).unwrap();
        assert_eq!(s.st.assigned[late], want);
    }
}

#[test]
fn selector_waves_and_targets() {
    let mut p = plan("group=canary,100%", &[]);
    p.target = "arch=aarch64".into();
    let mut s = Sim::new(6, p);
    for (i, d) in s.devices.iter_mut().enumerate() {
        d.tags.insert("arch".into(), if i < 5 { "aarch64" } else { "armv7" }.into());
        if i < 2 {
            d.tags.insert("group".into(), "canary".into());
        }
    }
    s.step();
    assert_eq!(s.wave_members(0), ["dev-000", "dev-001"]);
    assert_eq!(s.wave_members(1).len(), 3);
    assert!(!s.st.assigned.contains_key("dev-005"), "outside the target");
    assert_eq!(s.offers, ["dev-000", "dev-001"]);
}

#[test]
fn operator_commands() {
    let mut s = Sim::new(10, plan("20%,60%,100%", &["error_rate<=0.01"]));
    s.step();
    let p = s.plan.clone();
    let paused = apply(&p, &s.st, Command::Pause, s.now).unwrap();
    assert_eq!(paused.phase, Phase::Paused);
    assert!(apply(&p, &paused, Command::Pause, s.now).is_err());
    let (same, actions) = step(&s.id, &p, &paused, &s.devices, &s.obs, s.now + 1000);
    assert!(actions.is_empty() && same == paused, "a paused rollout does nothing");
    // Promote skips the gates.
    s.st = apply(&p, &paused, Command::Promote, s.now).unwrap();
    assert_eq!((s.st.phase, s.st.current_wave), (Phase::Running, 1));
    let offered = s.step();
    assert_eq!(offered.len(), s.wave_members(1).len());
    // Roll back: every updated device gets the previous version, once.
    s.succeed_offered(1000.0, 0);
    s.st = apply(&p, &s.st, Command::Rollback, s.now).unwrap();
    let back = s.step();
    assert_eq!(back.len(), s.offers.len());
    assert!(back.iter().all(|a| matches!(a, Action::Rollback { .. })));
    assert!(s.step().is_empty());
    assert!(apply(&p, &s.st, Command::Resume, s.now).is_err());
    assert!(apply(&p, &s.st, Command::Abort, s.now).is_err());
    let fresh = RolloutState::new(&p);
    assert_eq!(apply(&p, &fresh, Command::Abort, 0).unwrap().phase, Phase::Aborted);
    // The last wave promoted completes the rollout.
    let mut t = Sim::new(2, plan("100%", &[]));
    t.step();
    assert_eq!(apply(&t.plan, &t.st, Command::Promote, 0).unwrap().phase, Phase::Completed);
}

#[test]
fn a_restart_resumes_from_the_persisted_state() {
    let mut s = Sim::new(12, plan("25%,100%", &["install_success>=1"]));
    s.step();
    s.succeed_offered(1000.0, 0);
    // The server dies here: the state survives as JSON, the actions already sent are in it.
    let saved = serde_json::to_string(&s.st).unwrap();
    s.st = serde_json::from_str(&saved).unwrap();
    s.step();
    s.advance(60);
    s.step();
    assert_eq!(s.st.current_wave, 1);
    s.succeed_offered(1000.0, 0);
    s.advance(60);
    s.step();
    assert_eq!(s.st.phase, Phase::Completed);
    assert_eq!(s.offers.len(), 12);
}

#[test]
fn late_reports_do_not_reopen_a_passed_wave() {
    let mut s = Sim::new(10, plan("20%,100%", &["error_rate<=0.05"]));
    s.step();
    s.succeed_offered(1000.0, 0);
    s.advance(60);
    s.step();
    assert_eq!(s.st.current_wave, 1);
    // Bad news about wave 1's devices arrives late; wave 2's own judgement will see it.
    s.obs.health.iter_mut().for_each(|h| h.errors = 50);
    s.step();
    assert!(s.st.waves[0].passed.is_some());
    assert_eq!(s.st.phase, Phase::Running);
    s.succeed_offered(1000.0, 0);
    s.advance(60);
    s.step();
    assert_eq!(s.st.phase, Phase::Paused, "the gate is over the rollout so far");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever happens, nobody is offered twice, nobody ahead of their wave, and membership
    /// never changes.
    #[test]
    fn invariants_hold_under_random_events(
        n in 1usize..40,
        events in prop::collection::vec((0u8..6, 0usize..40, 1u64..200), 1..80),
    ) {
        let mut s = Sim::new(n, plan("10%,30%,100%", &["install_success>=0.5", "error_rate<=0.2"]));
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (kind, who, dt) in events {
            let id = format!("dev-{:03}", who % n);
            match kind {
                0 => s.dev(&id).online = !s.dev(&id).online,
                1 if s.offers.contains(&id) => s.dev(&id).outcome = Outcome::Succeeded,
                2 if s.offers.contains(&id) => s.dev(&id).outcome = Outcome::Failed { self_test: false, reason: "x".into() },
                3 => s.obs.health.push(Health { device: id.clone(), inferences: 10, errors: who as u64 % 3, ..Health::default() }),
                _ => s.advance(dt),
            }
            let current = s.st.current_wave;
            let offered = s.step();
            for a in &offered {
                if let Action::Offer { device } = a {
                    prop_assert!(s.st.assigned[device] <= s.st.current_wave.max(current));
                }
            }
            for (d, w) in &s.st.assigned {
                prop_assert_eq!(*seen.entry(d.clone()).or_insert(*w), *w);
            }
        }
        let offers: BTreeSet<&String> = s.offers.iter().collect();
        prop_assert_eq!(offers.len(), s.offers.len());
    }
}
