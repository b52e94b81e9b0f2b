//! The README's first command: the demo binary runs its whole story (staged rollout, drift,
//! retraining, the retrained model's staged rollout) and exits 0; `--summary` tells it as JSON.

use std::process::Command;

#[test]
fn the_demo_runs_its_story_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-demo"))
        .args(["--devices", "4", "--summary"])
        .arg(&summary)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "wave 1 (1): 1 of 1 succeeded",
        "rollout completed: 4 of 4 devices succeeded",
        "ALERT",
        ": training: ",
        ": completed: digits@2 rolled out",
        "demo finished: v1 rolled out, the field drifted, the retrained model beat v1",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["ok"], true);
    assert_eq!(s["alert"]["cohort"], "group=field", "only the field drifted: {}", s["alert"]);
    assert_eq!(s["retrain_job"]["state"], "completed");
    assert_eq!(s["retrain_job"]["selector"], "group=field");
    assert_eq!(s["v2"]["rollout"]["state"], "completed");
    // v2 went to the field only, in two waves.
    assert_eq!(s["v2"]["rollout"]["total"], 2);
    assert_eq!(s["v2"]["rollout"]["waves"].as_array().unwrap().len(), 2);
    let acc = &s["accuracy_on_drifted"];
    let (v1, v2) = (acc["v1"].as_f64().unwrap(), acc["v2"].as_f64().unwrap());
    assert!(v2 > v1 + 0.1, "the retrained model is better on drifted images no device saw: {acc}");
    let clean = &s["accuracy_on_clean"];
    assert!(clean["v2"].as_f64().unwrap() >= clean["v1"].as_f64().unwrap() - 0.03, "{clean}");
    let d = &s["drift"];
    let (before, after) = (d["before"].as_f64().unwrap(), d["after"].as_f64().unwrap());
    assert!(before > 0.2 && after <= 0.2, "drift back under the threshold: {d}");
    assert!(s["timeline"].as_array().unwrap().len() >= 10);
    // The field left digits@1: its alerts on it were resolved with the job.
    let firing = s["alerts_firing_at_end"].as_array().unwrap();
    assert!(firing.iter().all(|a| a["version"] != 1 || a["cohort"] != "group=field"), "{firing:?}");
}
