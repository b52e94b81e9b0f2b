//! The README's first command: the demo binary runs its whole story and exits 0.

use std::process::Command;

#[test]
fn the_demo_runs_its_story_and_exits_zero() {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-demo")).args(["--devices", "4"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "wave 1 (1): 1 of 1 succeeded",
        "rollout completed: 4 of 4 devices succeeded",
        "drift: the field group raised an alert, the lab group stayed quiet",
        "demo finished: every device installed the bundle and answered correctly",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}
