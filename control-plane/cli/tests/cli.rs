//! The `flotilla` binary, driven as an operator would, against a real control plane and agents.
//! The spellings and JSON shapes used here are the CLI's contract.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use flotilla_demo::{Fleet, digits};

/// The admin token and fleet CA of each server a test started, by URL.
#[allow(clippy::type_complexity)]
static TOKENS: std::sync::Mutex<std::collections::BTreeMap<String, (String, Option<std::path::PathBuf>)>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn register(url: &str, token: &str, ca: Option<std::path::PathBuf>) {
    TOKENS.lock().unwrap().insert(url.to_string(), (token.to_string(), ca));
}

/// Runs the CLI against `server` (with its admin token) or none.
fn flotilla(args: &[&str], server: Option<&str>) -> Output {
    let mut c = assert_cmd::Command::cargo_bin("flotilla").expect("the flotilla binary");
    c.args(args)
        .env_remove("FLOTILLA_SERVER")
        .env_remove("FLOTILLA_TOKEN")
        .env_remove("FLOTILLA_CA")
        .env("HOME", "/nonexistent");
    if let Some(s) = server {
        c.env("FLOTILLA_SERVER", s);
        if let Some((t, ca)) = TOKENS.lock().unwrap().get(s) {
            c.env("FLOTILLA_TOKEN", t);
            if let Some(ca) = ca {
                c.env("FLOTILLA_CA", ca);
            }
        }
    }
    c.output().expect("run flotilla")
}

fn ok(args: &[&str], server: Option<&str>) -> String {
    let out = flotilla(args, server);
    assert!(
        out.status.success(),
        "flotilla {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_workflow_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = Fleet::start(&d.join("fleet"), 2).await.unwrap();
    let server = fleet.api();
    register(&server, &fleet.token, fleet.server.ca_path());

    // Keys and a trust root of our own (the fleet's agents trust the harness root, so this key
    // also has to be one the harness trusts: we sign with both below).
    ok(&["keygen", "--out", s(&d.join("ops"))], None);
    assert!(d.join("ops.key").exists() && d.join("ops.pub").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(d.join("ops.key")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // keygen never overwrites a key.
    assert!(!flotilla(&["keygen", "--out", s(&d.join("ops"))], None).status.success());
    ok(&["trust", "init", "--key", s(&d.join("ops.key")), "--out", s(&d.join("root.cbor"))], None);

    // Golden inputs as a v2 request file.
    let samples = digits::samples();
    std::fs::write(d.join("golden.json"), serde_json::to_vec(&digits::request(&samples[..2])).unwrap()).unwrap();
    std::fs::write(d.join("model.onnx"), digits::MODEL).unwrap();
    let b = d.join("digits.flb");
    ok(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "7",
            "--model",
            s(&d.join("model.onnx")),
            "--golden",
            s(&d.join("golden.json")),
            "--out",
            s(&b),
        ],
        None,
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", s(&b), "--output", "json"], None)).unwrap();
    assert_eq!(inspect["name"], "digits");
    assert_eq!(inspect["inputs"][0]["shape"], "N,1,8,8");
    assert_eq!(inspect["health"]["golden"], true);
    assert_eq!(inspect["self_test"], serde_json::json!({"kind": "golden", "cases": 1}));
    assert_eq!(inspect["signatures"].as_array().unwrap().len(), 0);

    // Unsigned: verify fails with a non-zero exit and says why.
    let out = flotilla(&["bundle", "verify", s(&b), "--trust-root", s(&d.join("root.cbor"))], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("threshold not met"));

    ok(&["bundle", "sign", s(&b), "--key", s(&d.join("ops.key"))], None);
    let v = ok(&["bundle", "verify", s(&b), "--trust-root", s(&d.join("root.cbor"))], None);
    assert!(v.starts_with("OK"), "{v}");

    // Pinned shape.
    let pinned = d.join("pinned.flb");
    ok(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "8",
            "--model",
            s(&d.join("model.onnx")),
            "--input-shape",
            "input=4,1,8,8",
            "--out",
            s(&pinned),
        ],
        None,
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", s(&pinned), "-o", "json"], None)).unwrap();
    assert_eq!(inspect["inputs"][0]["shape"], "4,1,8,8");
    assert_eq!(inspect["self_test"]["kind"], "smoke", "no golden inputs: devices make their own");
    assert_eq!(inspect["self_test"]["inputs"], "input=[4,1,8,8]");
    let out = flotilla(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "9",
            "--model",
            s(&d.join("model.onnx")),
            "--input-shape",
            "input=4,3,8,8",
            "--out",
            s(&d.join("x.flb")),
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixes a dimension at 1"));

    // The devices trust the harness root: add the harness key's signature too, then push.
    let harness_key = d.join("harness");
    fleet.key.save(&harness_key).unwrap();
    ok(&["bundle", "sign", s(&b), "--key", s(&harness_key.with_extension("key"))], None);
    let pushed: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "push", s(&b), "-o", "json"], Some(&server))).unwrap();
    assert_eq!(pushed["version"], 7);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "ls", "--output", "json"], Some(&server))).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let devices: serde_json::Value =
        serde_json::from_str(&ok(&["devices", "ls", "--output", "json"], Some(&server))).unwrap();
    let ids: Vec<&str> = devices.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["dev-0", "dev-1"]);
    assert!(ok(&["devices", "ls"], Some(&server)).starts_with("ID"));

    let created: serde_json::Value =
        serde_json::from_str(&ok(&["rollout", "start", "--bundle", "digits@7", "--output", "json"], Some(&server)))
            .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let plain = ok(&["rollout", "start", "--bundle", "digits@7"], Some(&server));
    assert!(plain.trim().starts_with("r-"), "plain output is the id: {plain}");
    fleet.wait_rollout(&id, Duration::from_secs(60)).await.unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&ok(&["rollout", "status", &id, "-o", "json"], Some(&server))).unwrap();
    assert_eq!(status["state"], "completed");
    assert_eq!(status["succeeded"], 2);

    // Errors say what to do next.
    let out = flotilla(&["devices", "ls"], None);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("pass --server URL, set FLOTILLA_SERVER, or run `flotilla context add")
    );
    let out = flotilla(&["rollout", "start", "--bundle", "digits@99"], Some(&server));
    assert!(String::from_utf8_lossy(&out.stderr).contains("push it first"));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_trust_root_refuses_bundles_it_would_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["keygen", "--out", s(&d.join("ops"))], None);
    ok(&["keygen", "--out", s(&d.join("rogue"))], None);
    ok(&["trust", "init", "--key", s(&d.join("ops.key")), "--out", s(&d.join("root.cbor"))], None);
    let mut cfg = flotilla_server::ServerConfig::new(d.join("server"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.mqtt = "127.0.0.1:0".parse().unwrap();
    cfg.trust_root = Some(d.join("root.cbor"));
    let server = flotilla_server::Server::start(cfg).await.unwrap();
    let url = server.api_url();
    register(&url, &server.admin_token().unwrap(), server.ca_path());
    let endpoints: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("server/endpoints.json")).unwrap()).unwrap();
    assert_eq!(endpoints["http"], server.http_addr.to_string());
    assert_eq!(endpoints["mqtt"], server.mqtt_addr.to_string());
    // How to speak to them: https and mqtts, and the fleet CA to trust.
    assert_eq!((endpoints["scheme"].as_str(), endpoints["mqtt_scheme"].as_str()), (Some("https"), Some("mqtts")));
    let ca = std::path::PathBuf::from(endpoints["ca"].as_str().unwrap());
    assert!(ca.is_absolute() && std::fs::read_to_string(&ca).unwrap().contains("BEGIN CERTIFICATE"));

    std::fs::write(d.join("model.onnx"), digits::MODEL).unwrap();
    let b = d.join("b.flb");
    ok(
        &["bundle", "build", "--name", "digits", "--version", "1", "--model", s(&d.join("model.onnx")), "--out", s(&b)],
        None,
    );
    ok(&["bundle", "sign", s(&b), "--key", s(&d.join("rogue.key"))], None);
    let out = flotilla(&["bundle", "push", s(&b)], Some(&url));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("422") && err.contains("invalid_bundle") && err.contains("threshold not met"), "{err}");
    ok(&["bundle", "sign", s(&b), "--key", s(&d.join("ops.key"))], None);
    ok(&["bundle", "push", s(&b)], Some(&url));
    server.shutdown().await;
}

#[test]
fn trust_roots_with_thresholds_offline_signing_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in ["r1", "r2", "t1", "t2"] {
        ok(&["keygen", "--out", s(&d.join(k))], None);
    }
    let root1 = d.join("root1.cbor");
    // Two root keys, threshold 2; signed by only one holder so far.
    let out = ok(
        &[
            "trust",
            "init",
            "--root-key",
            s(&d.join("r1.pub")),
            "--root-key",
            s(&d.join("r2.pub")),
            "--root-threshold",
            "2",
            "--targets-key",
            s(&d.join("t1.pub")),
            "--targets-threshold",
            "1",
            "--sign-with",
            s(&d.join("r1.key")),
            "--expires",
            "365d",
            "--out",
            s(&root1),
            "-o",
            "json",
        ],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["version"].as_u64(), v["complete"].as_bool()), (Some(1), Some(false)), "{v}");
    let bad = flotilla(&["trust", "verify", s(&root1)], None);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("1 valid signature(s) from distinct trusted keys, 2 required")
    );
    // The second holder signs offline; now it verifies.
    ok(&["trust", "sign", s(&root1), "--key", s(&d.join("r2.key"))], None);
    assert!(ok(&["trust", "verify", s(&root1)], None).starts_with("OK"));

    // Rotate: targets moves to t2; roles not named keep their keys and thresholds.
    let root2 = d.join("root2.cbor");
    ok(
        &[
            "trust",
            "rotate",
            "--from",
            s(&root1),
            "--targets-key",
            s(&d.join("t2.pub")),
            "--sign-with",
            s(&d.join("r1.key")),
            "--sign-with",
            s(&d.join("r2.key")),
            "--out",
            s(&root2),
        ],
        None,
    );
    assert!(ok(&["trust", "verify", s(&root2), "--from", s(&root1)], None).contains("valid rotation"));
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["trust", "inspect", s(&root2), "-o", "json"], None)).unwrap();
    assert_eq!(inspect["version"], 2);
    assert_eq!(inspect["roles"]["root"]["threshold"], 2);
    assert_eq!(inspect["roles"]["targets"]["keyids"].as_array().unwrap().len(), 1);

    // A rotation signed by only one of the two old root keys is refused.
    let weak = d.join("weak.cbor");
    ok(&["trust", "rotate", "--from", s(&root2), "--sign-with", s(&d.join("r1.key")), "--out", s(&weak)], None);
    assert!(!flotilla(&["trust", "verify", s(&weak), "--from", s(&root2)], None).status.success());
    // Skipping a version or going backwards is refused.
    let out = flotilla(&["trust", "verify", s(&root1), "--from", s(&root2)], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not follow"));
    let root3 = d.join("root3.cbor");
    ok(
        &[
            "trust",
            "rotate",
            "--from",
            s(&root2),
            "--sign-with",
            s(&d.join("r1.key")),
            "--sign-with",
            s(&d.join("r2.key")),
            "--out",
            s(&root3),
        ],
        None,
    );
    let out = flotilla(&["trust", "verify", s(&root3), "--from", s(&root1)], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not follow"));

    // Bundles follow the root in force: t1 signed for root1, only t2 for root2.
    std::fs::write(d.join("model.onnx"), digits::MODEL).unwrap();
    let b = d.join("b.flb");
    ok(
        &["bundle", "build", "--name", "digits", "--version", "1", "--model", s(&d.join("model.onnx")), "--out", s(&b)],
        None,
    );
    ok(&["bundle", "sign", s(&b), "--key", s(&d.join("t1.key"))], None);
    ok(&["bundle", "verify", s(&b), "--trust-root", s(&root1)], None);
    assert!(!flotilla(&["bundle", "verify", s(&b), "--trust-root", s(&root2)], None).status.success());
}

#[test]
fn delta_bundles_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("f32.onnx"), digits::MODEL).unwrap();
    std::fs::write(d.join("int8.onnx"), digits::MODEL_INT8).unwrap();
    let (v1, v2) = (d.join("v1.flb"), d.join("v2.flb"));
    ok(
        &["bundle", "build", "--name", "digits", "--version", "1", "--model", s(&d.join("f32.onnx")), "--out", s(&v1)],
        None,
    );
    let out = ok(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "2",
            "--model",
            s(&d.join("int8.onnx")),
            "--delta-from",
            s(&v1),
            "--out",
            s(&v2),
            "-o",
            "json",
        ],
        None,
    );
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["delta"], true);
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", s(&v2), "-o", "json"], None)).unwrap();
    assert!(inspect["artifacts"][0]["encoding"].as_str().unwrap().starts_with("zstd-patch from "), "{inspect}");
    // A delta cannot be the base of another delta.
    let out = flotilla(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "3",
            "--model",
            s(&d.join("f32.onnx")),
            "--delta-from",
            s(&v2),
            "--out",
            s(&d.join("v3.flb")),
        ],
        None,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is itself a delta"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_tags_feedback_and_samples_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = Fleet::start(&d.join("fleet"), 2).await.unwrap();
    let server = fleet.api();
    register(&server, &fleet.token, fleet.server.ca_path());
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(args, Some(&server))).unwrap() };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
    };

    // Tags and selectors.
    ok(&["devices", "tag", "dev-0", "group=lab"], Some(&server));
    ok(&["devices", "tag", "dev-1", "group=field", "site=berlin"], Some(&server));
    ok(&["devices", "tag", "dev-1", "site-"], Some(&server));
    assert_eq!(ids(&json(&["devices", "ls", "-l", "group=lab", "-o", "json"])), ["dev-0"]);
    assert_eq!(ids(&json(&["devices", "ls", "-l", "group in (lab,field),!site", "-o", "json"])), ["dev-0", "dev-1"]);
    assert!(ids(&json(&["devices", "ls", "-l", "site", "-o", "json"])).is_empty());
    // Pages: --limit, and the next page's --after on stderr until the last.
    let first = flotilla(&["devices", "ls", "--limit", "1", "-o", "json"], Some(&server));
    let more = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(more.contains("--limit 1 --after dev-0"), "{more}");
    assert_eq!(ids(&serde_json::from_slice(&first.stdout).unwrap()), ["dev-0"]);
    let last = flotilla(&["devices", "ls", "--limit", "1", "--after", "dev-0", "-o", "json"], Some(&server));
    assert_eq!(ids(&serde_json::from_slice(&last.stdout).unwrap()), ["dev-1"]);
    let more = String::from_utf8_lossy(&last.stderr).to_string();
    assert!(!more.contains("--after"), "the last page names no next one: {more}");
    let bad = flotilla(&["devices", "ls", "-l", "group in lab"], Some(&server));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad_selector"), "{bad:?}");
    assert!(!flotilla(&["devices", "tag", "dev-0", "no spaces=x"], Some(&server)).status.success());

    // Enrolling devices' password hashes from an enroll.csv (as flotilla-image writes it).
    let hash = |c: char| c.to_string().repeat(64);
    std::fs::write(
        d.join("enroll.csv"),
        format!("device_id,password_sha256\npi-1,{}\npi-2,{}\n", hash('a'), hash('b')),
    )
    .unwrap();
    let enrolled = json(&["devices", "enroll", "--file", s(&d.join("enroll.csv")), "-o", "json"]);
    assert_eq!(enrolled.as_array().unwrap().len(), 2, "{enrolled}");
    assert_eq!((enrolled[1]["device_id"].as_str(), enrolled[1]["enforced"].as_bool()), (Some("pi-2"), Some(true)));
    ok(&["devices", "enroll", "pi-3", "--password-sha256", &hash('c')], Some(&server));
    ok(&["devices", "unenroll", "pi-3"], Some(&server));
    let again = flotilla(&["devices", "unenroll", "pi-3"], Some(&server));
    assert!(String::from_utf8_lossy(&again.stderr).contains("credential_not_found"), "{again:?}");
    std::fs::write(d.join("bad.csv"), "id,hash\npi-1,x\n").unwrap();
    let bad = flotilla(&["devices", "enroll", "--file", s(&d.join("bad.csv"))], Some(&server));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no device_id column"), "{bad:?}");

    // A bundle with a drift baseline, a reservoir big enough to keep every request.
    std::fs::write(d.join("model.onnx"), digits::MODEL).unwrap();
    std::fs::write(d.join("baseline.npy"), digits::BASELINE_NPY).unwrap();
    let b = d.join("d.flb");
    let built: serde_json::Value = serde_json::from_str(&ok(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "3",
            "--model",
            s(&d.join("model.onnx")),
            "--baseline",
            s(&d.join("baseline.npy")),
            "--drift-window",
            "1s",
            "--drift-threshold",
            "psi=0.5",
            "--drift-consecutive",
            "1",
            "--drift-min-count",
            "100",
            "--drift-sample",
            "1000",
            "--out",
            s(&b),
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(built["drift_signals"], serde_json::json!(["input.c0", "class", "confidence", "accuracy"]));
    let key = d.join("harness");
    fleet.key.save(&key).unwrap();
    ok(&["bundle", "sign", s(&b), "--key", s(&key.with_extension("key"))], None);
    ok(&["bundle", "push", s(&b)], Some(&server));
    let id = ok(&["rollout", "start", "--bundle", "digits@3"], Some(&server));
    assert_eq!(fleet.wait_rollout(id.trim(), Duration::from_secs(60)).await.unwrap().state, "completed");

    // Feedback on a labelled request.
    let samples = digits::samples();
    let resp = fleet.infer("dev-0", "digits", &digits::request(&samples)).await.unwrap();
    let rid = resp.id.clone().unwrap();
    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    let addr = fleet.agent("dev-0").api_addr();
    let http = reqwest::Client::new();
    let fb: serde_json::Value = http
        .post(format!("http://{addr}/v2/models/digits/feedback"))
        .json(&serde_json::json!({"id": rid, "labels": labels}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fb["matched"], 20);
    assert_eq!(fb["correct"], 20);
    let unknown = http
        .post(format!("http://{addr}/v2/models/digits/feedback"))
        .json(&serde_json::json!({"id": "no-such-request", "label": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // Lab sees held-out images, the field inverted ones, for a few 1 s windows.
    let images = digits::baseline_images();
    let mut sent = [1u64, 0];
    let start = std::time::Instant::now();
    let mut k = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        for (i, dev) in ["dev-0", "dev-1"].iter().enumerate() {
            let batch: Vec<Vec<f32>> = (0..16)
                .map(|j| {
                    let img = &images[(k * 16 + j) % images.len()];
                    if i == 1 { digits::inverted(img) } else { img.clone() }
                })
                .collect();
            fleet.infer(dev, "digits", &digits::images_request(&batch)).await.unwrap();
            sent[i] += 1;
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet
        .wait_for(Duration::from_secs(30), || async {
            let out = flotilla(&["alerts", "ls", "-o", "json"], Some(&server));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            Ok(v.as_array().is_some_and(|a| a.iter().any(|a| a["cohort"] == "group=field")))
        })
        .await
        .unwrap();
    let alerts = json(&["alerts", "ls", "-o", "json"]);
    assert!(alerts.as_array().unwrap().iter().all(|a| a["cohort"] != "group=lab"), "{alerts:#}");

    let rows = json(&["drift", "show", "--model", "digits", "-o", "json"]);
    let rows = rows.as_array().unwrap();
    for field in
        ["model", "version", "cohort", "signal", "window_end", "count", "psi", "js", "ks", "wasserstein", "alert"]
    {
        assert!(rows.iter().all(|r| r.get(field).is_some()), "rows lack {field}: {rows:#?}");
    }
    assert!(rows.iter().any(|r| r["cohort"] == "group=field" && r["alert"] == true));
    let lab = json(&["drift", "show", "--model", "digits", "--version", "3", "-l", "group=lab", "-o", "json"]);
    // Held-out images score a PSI of about 9/n from sampling noise alone: far under 0.5.
    assert!(lab.as_array().unwrap().iter().all(|r| r["cohort"] == "group=lab" && r["alert"] == false), "{lab:#}");
    // The accuracy signal carries the feedback: 20 of 20 right.
    let acc: f64 = lab
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["signal"] == "accuracy")
        .map(|r| r["count"].as_f64().unwrap())
        .sum();
    assert_eq!(acc, 20.0);
    assert!(ok(&["drift", "show", "--model", "digits", "--last", "1"], Some(&server)).contains("COHORT"));

    // The reservoir: every request each device served, the labelled one with its labels.
    let pulled = json(&["drift", "samples", "pull", "--model", "digits", "-o", "json"]);
    assert!(pulled["devices"].as_array().unwrap().iter().all(|d| d["done"] == true), "{pulled:#}");
    let export = d.join("samples.json");
    ok(&["drift", "samples", "export", "--model", "digits", "--out", s(&export)], Some(&server));
    let records: serde_json::Value = serde_json::from_slice(&std::fs::read(&export).unwrap()).unwrap();
    let records = records.as_array().unwrap();
    for (i, dev) in ["dev-0", "dev-1"].iter().enumerate() {
        assert_eq!(records.iter().filter(|r| r["device"] == *dev).count() as u64, sent[i], "{dev}");
    }
    let labelled = records.iter().find(|r| r["id"] == rid.as_str()).unwrap();
    assert_eq!(labelled["labels"], serde_json::json!(labels));
    assert_eq!(labelled["inputs"][0]["shape"], serde_json::json!([20, 1, 8, 8]));
    // Exported samples are baseline data for the next build.
    ok(
        &[
            "bundle",
            "build",
            "--name",
            "digits",
            "--version",
            "4",
            "--model",
            s(&d.join("model.onnx")),
            "--baseline",
            s(&export),
            "--out",
            s(&d.join("d4.flb")),
        ],
        None,
    );
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staged_rollouts_and_their_commands_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(&dir.path().join("fleet"), 4).await.unwrap();
    let server = fleet.api();
    register(&server, &fleet.token, fleet.server.ca_path());
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(args, Some(&server))).unwrap() };
    let samples = digits::samples();
    for v in [1, 2] {
        fleet.push(fleet.bundle("digits", v, digits::MODEL, digits::golden(&samples[..1])).unwrap()).await.unwrap();
    }

    // Bad plans are refused before anything starts, saying how to write them.
    let bad = flotilla(&["rollout", "start", "--bundle", "digits@1", "--gate", "latency<=2"], Some(&server));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("latency_p95"), "{bad:?}");
    assert!(
        !flotilla(&["rollout", "start", "--bundle", "digits@1", "--waves", "50%,10%"], Some(&server)).status.success()
    );

    // One device first, then the rest; a long bake holds the first wave until promoted.
    let created = json(&[
        "rollout",
        "start",
        "--bundle",
        "digits@1",
        "--waves",
        "1,100%",
        "--bake",
        "1h",
        "--gate",
        "install_success>=1",
        "-o",
        "json",
    ]);
    let id = created["id"].as_str().unwrap().to_string();
    let status = |id: &str| json(&["rollout", "status", id, "-o", "json"]);
    fleet
        .wait_for(Duration::from_secs(60), || async { Ok(status(&id)["waves"][0]["status"] == "baking") })
        .await
        .unwrap();
    let s = status(&id);
    assert_eq!(
        (s["state"].as_str(), s["current_wave"].as_u64(), s["reason"].is_null()),
        (Some("running"), Some(1), true)
    );
    let w = &s["waves"][0];
    assert_eq!(
        (w["size"].as_u64(), w["offered"].as_u64(), w["succeeded"].as_u64(), w["failed"].as_u64()),
        (Some(1), Some(1), Some(1), Some(0)),
        "{s:#}"
    );
    let g = &w["gates"][0];
    assert_eq!(
        (g["name"].as_str(), g["value"].as_f64(), g["threshold"].as_f64(), g["passed"].as_bool()),
        (Some("install_success>=1"), Some(1.0), Some(1.0), Some(true)),
        "{s:#}"
    );
    assert_eq!(s["waves"][1]["offered"], 0, "the second wave waits: {s:#}");
    assert!(ok(&["rollout", "status", &id], Some(&server)).contains("WAVE"));

    let promoted = json(&["rollout", "promote", &id, "-o", "json"]);
    assert_eq!(promoted["current_wave"], 2);
    fleet
        .wait_for(Duration::from_secs(60), || async { Ok(status(&id)["waves"][1]["status"] == "baking") })
        .await
        .unwrap();
    assert_eq!(status(&id)["waves"][1]["succeeded"], 3);
    ok(&["rollout", "promote", &id], Some(&server));
    assert_eq!(status(&id)["state"], "completed");
    let refused = flotilla(&["rollout", "pause", &id], Some(&server));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot pause a rollout that is completed"),
        "{refused:?}"
    );
    assert!(ok(&["rollout", "watch", &id], Some(&server)).contains("completed"));

    // Pause, resume, abort.
    let id2 = ok(&["rollout", "start", "--bundle", "digits@2", "--waves", "50%,100%", "--bake", "1h"], Some(&server));
    let id2 = id2.trim();
    assert_eq!(json(&["rollout", "pause", id2, "-o", "json"])["state"], "paused");
    assert_eq!(status(id2)["reason"], "paused by an operator");
    assert_eq!(json(&["rollout", "resume", id2, "-o", "json"])["state"], "running");
    assert_eq!(json(&["rollout", "abort", id2, "-o", "json"])["state"], "aborted");
    let listed = json(&["rollout", "ls", "-o", "json"]);
    let states: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["completed", "aborted"]);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retraining_policies_and_jobs_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = Fleet::start(&d.join("fleet"), 2).await.unwrap();
    let server = fleet.api();
    register(&server, &fleet.token, fleet.server.ca_path());
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(args, Some(&server))).unwrap() };
    for id in ["dev-0", "dev-1"] {
        ok(&["devices", "tag", id, "group=field"], Some(&server));
    }
    let mut b = flotilla_builder::BuildOptions::new("digits", 1, digits::MODEL.to_vec(), flotilla_demo::unix_now());
    b.golden = digits::golden(&digits::samples()[..1]);
    let config =
        flotilla_drift::DriftConfig { sample: Some(flotilla_drift::SamplePolicy { size: 100 }), ..Default::default() };
    b.drift =
        Some((digits::baseline_reference(), flotilla_builder::baseline::DriftOptions { config, ..Default::default() }));
    fleet.push(fleet.build_signed(&b).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await;
    assert_eq!(r.unwrap().state, "completed");
    let (images, labels) = (digits::baseline_images(), digits::baseline_labels());
    for k in 0..10usize {
        for id in ["dev-0", "dev-1"] {
            let picks: Vec<usize> = (k * 8..k * 8 + 8).collect();
            let batch: Vec<Vec<f32>> = picks.iter().map(|&p| digits::brightened(&images[p], p as u64)).collect();
            let resp = fleet.infer(id, "digits", &digits::images_request(&batch)).await.unwrap();
            let truth: Vec<u32> = picks.iter().map(|&p| labels[p]).collect();
            fleet.feedback(id, "digits", resp.id.as_deref().unwrap(), &truth).await.unwrap();
        }
    }

    // A policy without a trainer is refused with what to add.
    let bad = flotilla(&["retrain", "policy", "set", "--model", "digits"], Some(&server));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trainer needs a `command` or a `webhook`"), "{bad:?}");
    // A policy file (a trainer that hands the model back: matching v1 is enough here), flags on top.
    let file = d.join("policy.toml");
    std::fs::write(
        &file,
        r#"
[trainer]
command = ["sh", "-c", "echo retraining $FLOTILLA_MODEL_NAME; cp \"$FLOTILLA_BASE_MODEL\" \"$FLOTILLA_OUTPUT\""]

[data]
min_labelled = 50
"#,
    )
    .unwrap();
    let set = json(&[
        "retrain",
        "policy",
        "set",
        "--model",
        "digits",
        "--file",
        s(&file),
        "--manual-only",
        "--approval",
        "manual",
        "--waves",
        "1,100%",
        "--gate",
        "install_success>=1",
        "-o",
        "json",
    ]);
    let p = &set[0];
    assert_eq!((p["model"].as_str(), p["trigger"]["on_alert"].as_bool()), (Some("digits"), Some(false)));
    assert_eq!(p["evaluation"]["heldout"], "samples");
    assert_eq!(p["rollout"]["plan"]["waves"].as_array().unwrap().len(), 2);
    assert!(ok(&["retrain", "policy", "show", "--model", "digits"], Some(&server)).contains("approval = \"manual\""));
    assert_eq!(json(&["retrain", "policy", "ls", "-o", "json"]).as_array().unwrap().len(), 1);

    let id = ok(&["retrain", "start", "--model", "digits", "-l", "group=field"], Some(&server)).trim().to_string();
    let again = flotilla(&["retrain", "start", "--model", "digits"], Some(&server));
    assert!(String::from_utf8_lossy(&again.stderr).contains("job_running"), "one job per model at a time: {again:?}");
    let j = json(&["retrain", "status", &id, "--wait", "--timeout", "120", "-o", "json"]);
    assert_eq!(j["state"], "awaiting_approval", "{j}");
    assert_eq!(j["evaluation"][0]["passed"], true);
    assert_eq!(j["evaluation"][0]["current"], j["evaluation"][0]["candidate"]);
    assert_eq!(j["bundle"], "digits@2");
    assert!(ok(&["retrain", "log", &id], Some(&server)).contains("retraining digits"));
    let table = ok(&["retrain", "ls"], Some(&server));
    assert!(table.contains("awaiting_approval") && table.contains("v1→v2"), "{table}");

    let j = json(&["retrain", "approve", &id, "-o", "json"]);
    assert_eq!(j["state"], "rolling_out", "{j}");
    let rollout = j["rollout_id"].as_str().unwrap().to_string();
    assert_eq!(fleet.wait_rollout(&rollout, Duration::from_secs(60)).await.unwrap().state, "completed");
    fleet.wait_job(&id, &["completed"], Duration::from_secs(30)).await.unwrap();
    let refused = flotilla(&["retrain", "cancel", &id], Some(&server));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already completed"), "{refused:?}");
    ok(&["retrain", "policy", "rm", "--model", "digits"], Some(&server));
    assert!(json(&["retrain", "policy", "ls", "-o", "json"]).as_array().unwrap().is_empty());
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_tokens_yaml_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = Fleet::start(&d.join("fleet"), 1).await.unwrap();
    let config = d.join("config.toml");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .env_remove("FLOTILLA_SERVER")
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_CA")
            .env("FLOTILLA_CONFIG", &config)
            .output()
            .unwrap()
    };
    let out = run(&["devices", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("flotilla context add"), "{out:?}");
    // Over HTTPS the CLI trusts the fleet CA it is given, never the system's by default.
    let ca = fleet.server.ca_path().unwrap();
    let out = run(&["--server", &fleet.api(), "devices", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca FILE"), "{out:?}");
    let out = run(&["--server", &fleet.api(), "--ca", "system", "devices", "ls"]);
    assert!(!out.status.success(), "the fleet's certificate is no public CA's: {out:?}");
    let plain = fleet.api().replace("https://", "http://");
    let out = run(&["--server", &plain, "devices", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("speaks HTTPS"), "{out:?}");
    // Without a token the server says how to get one.
    let out = run(&["--server", &fleet.api(), "--ca", s(&ca), "devices", "ls"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("401 (unauthorized)"), "{out:?}");

    let token_file = d.join("fleet/server/admin.token");
    let out =
        run(&["context", "add", "demo", "--server", &fleet.api(), "--token-file", s(&token_file), "--ca", s(&ca)]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    let out = run(&["devices", "ls", "-o", "yaml"]);
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && yaml.starts_with("- agent_version:") && yaml.contains("  id: dev-0\n  last_seen:"),
        "{yaml}"
    );
    let json: serde_json::Value = serde_json::from_slice(&run(&["devices", "ls", "-o", "json"]).stdout).unwrap();
    assert_eq!(json[0]["id"], "dev-0");
    // Selectors also see the facts rollouts target by (arch, id).
    let arch = format!("arch={}", std::env::consts::ARCH);
    let by_arch: serde_json::Value =
        serde_json::from_slice(&run(&["devices", "ls", "-l", &arch, "-o", "json"]).stdout).unwrap();
    assert_eq!(by_arch.as_array().unwrap().len(), 1, "{by_arch}");
    let none: serde_json::Value =
        serde_json::from_slice(&run(&["devices", "ls", "-l", "arch=riscv64", "-o", "json"]).stdout).unwrap();
    assert!(none.as_array().unwrap().is_empty());

    // A viewer token from the admin: reads, but may not change the fleet.
    let viewer = &fleet.create_token("viewer", "").await.unwrap();
    let out = run(&["context", "add", "ro", "--server", &fleet.api(), "--token", viewer, "--ca", s(&ca), "--use"]);
    assert!(out.status.success());
    assert!(run(&["devices", "ls"]).status.success());
    let out = run(&["devices", "tag", "dev-0", "group=lab"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("403 (forbidden)"), "{out:?}");
    // --context picks another for one command; --token wins over the context's.
    assert!(run(&["--context", "demo", "devices", "tag", "dev-0", "group=lab"]).status.success());
    assert!(!run(&["--token", "flt_wrong", "devices", "ls"]).status.success());
    let ls = String::from_utf8_lossy(&run(&["context", "ls"]).stdout).into_owned();
    assert!(ls.contains("*  ro") && ls.contains("demo"), "{ls}");

    let completions = run(&["completions", "bash"]);
    assert!(String::from_utf8_lossy(&completions.stdout).contains("_flotilla()"));
    fleet.shutdown().await;
}

/// A real model that runs on no made-up input: openWakeWord's melspectrogram (silero's project,
/// from PyPI) needs at least a frame of audio, and 32 samples are not one. Without golden inputs
/// the build refuses it, naming what to give instead, with or without a latency budget; with a
/// real input as golden it builds, and that is what devices will run.
#[test]
fn a_model_that_runs_on_no_made_up_input_needs_golden_inputs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let assets = repo.join("target/test-assets/onnx");
    let fetched =
        Command::new("bash").arg(repo.join("agent/runtime/assets/fetch-onnx.sh")).arg(&assets).output().unwrap();
    assert!(fetched.status.success(), "{}", String::from_utf8_lossy(&fetched.stderr));
    let model = assets.join("models/openwakeword/melspectrogram.onnx");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mel.flb");
    let build = |extra: &[&str]| {
        let mut args =
            vec!["bundle", "build", "--name", "mel", "--version", "1", "--model", s(&model), "--out", s(&out)];
        args.extend_from_slice(extra);
        flotilla(&args, None)
    };
    for extra in [&["--latency-budget", "1ms"][..], &[]] {
        let refused = build(extra);
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{extra:?}");
        assert!(
            err.contains("smoke input (input=[1,32])") && err.contains("--golden") && err.contains("--input-shape"),
            "{err}"
        );
        assert_eq!(err.contains("--latency-budget 1000"), !extra.is_empty(), "{err}");
        assert!(!out.exists());
    }
    let samples: Vec<f32> = (0..1280).map(|i| (i as f32 * 0.05).sin() * 3000.0).collect();
    let golden = dir.path().join("golden.json");
    let request =
        serde_json::json!({"inputs": [{"name": "input", "shape": [1, 1280], "datatype": "FP32", "data": samples}]});
    std::fs::write(&golden, request.to_string()).unwrap();
    let built = build(&["--latency-budget", "1s", "--golden", s(&golden)]);
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let inspect: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", s(&out), "-o", "json"], None)).unwrap();
    assert_eq!(inspect["self_test"], serde_json::json!({"kind": "golden", "cases": 1}));
}
