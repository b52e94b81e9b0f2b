//! Who may call the control plane's API: nothing but the health check answers without a token;
//! viewers read, operators change the fleet, admins manage tokens and the trust root; devices
//! and training pipelines get capabilities that open exactly what they were given.

use std::os::unix::fs::PermissionsExt;

use flotilla_demo::{Fleet, authorized_client, digits};
use serde_json::{Value, json};

async fn status(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let api = fleet.api();
    let anon = flotilla_demo::client_builder(fleet.server.ca_path().as_deref()).unwrap().build().unwrap();

    // The first start wrote an admin token, readable by its owner only.
    let file = dir.path().join("server/admin.token");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), fleet.token);

    assert_eq!(status(anon.get(format!("{api}/api/v1/health"))).await.0, 200);
    let (code, body) = status(anon.get(format!("{api}/api/v1/devices"))).await;
    assert_eq!((code, body["code"].as_str()), (401, Some("unauthorized")), "{body}");
    assert!(body["hint"].as_str().unwrap().contains("admin.token"));
    let bogus = authorized_client("flt_not-a-token", fleet.server.ca_path().as_deref()).unwrap();
    assert_eq!(status(bogus.get(format!("{api}/api/v1/devices"))).await.0, 401);

    // Tokens for each role, made by the admin; the secret is in the answer only.
    let mut tokens = std::collections::BTreeMap::new();
    for role in ["viewer", "operator"] {
        let (code, t) =
            status(fleet.http.post(format!("{api}/api/v1/tokens")).json(&json!({"role": role, "name": role}))).await;
        assert_eq!(code, 201, "{t}");
        tokens.insert(
            role,
            (
                t["id"].as_str().unwrap().to_string(),
                authorized_client(t["token"].as_str().unwrap(), fleet.server.ca_path().as_deref()).unwrap(),
            ),
        );
    }
    let (code, listed) = status(fleet.http.get(format!("{api}/api/v1/tokens"))).await;
    assert_eq!(code, 200);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    assert!(listed.as_array().unwrap().iter().all(|t| t.get("token").is_none()), "{listed}");
    let bad_role = status(fleet.http.post(format!("{api}/api/v1/tokens")).json(&json!({"role": "root"}))).await;
    assert_eq!((bad_role.0, bad_role.1["code"].as_str()), (400, Some("bad_role")));

    let (viewer, operator) = (&tokens["viewer"].1, &tokens["operator"].1);
    assert_eq!(status(viewer.get(format!("{api}/api/v1/devices"))).await.0, 200);
    let tag = json!({"set": {"group": "lab"}});
    let (code, body) = status(viewer.post(format!("{api}/api/v1/devices/dev-0/tags")).json(&tag)).await;
    assert_eq!((code, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("operator"));
    assert_eq!(status(operator.post(format!("{api}/api/v1/devices/dev-0/tags")).json(&tag)).await.0, 200);
    assert_eq!(status(operator.get(format!("{api}/api/v1/tokens"))).await.0, 403);
    assert_eq!(status(operator.post(format!("{api}/api/v1/trust/root")).body(vec![1u8, 2])).await.0, 403);

    // Who am I, and the server's Prometheus metrics (a token is needed for those too).
    let (_, who) = status(operator.get(format!("{api}/api/v1/whoami"))).await;
    assert_eq!((who["role"].as_str(), who["name"].as_str()), (Some("operator"), Some("operator")), "{who}");
    assert_eq!(status(anon.get(format!("{api}/metrics"))).await.0, 401);
    let metrics = viewer.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "flotilla_devices{state=\"online\"} 1",
        "flotilla_rollouts{state=\"running\"} 0",
        "flotilla_drift_alerts_firing 0",
        "flotilla_mqtt_messages_total{direction=\"in\"}",
        "flotilla_store_latency_seconds_bucket{le=\"+Inf\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let ops: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("flotilla_store_latency_seconds_count ")).unwrap().parse().unwrap();
    assert!(ops > 10, "the store was used: {ops}");
    // The console's files need no token; the OpenAPI document does.
    assert_eq!(status(anon.get(format!("{api}/console/app.js"))).await.0, 200);
    assert_eq!(status(anon.get(format!("{api}/api/v1/openapi.json"))).await.0, 401);
    let (code, doc) = status(viewer.get(format!("{api}/api/v1/openapi.json"))).await;
    assert_eq!((code, doc["openapi"].as_str().map(|v| v.starts_with("3."))), (200, Some(true)));

    // A revoked token stops working.
    let viewer_id = &tokens["viewer"].0;
    assert_eq!(fleet.http.delete(format!("{api}/api/v1/tokens/{viewer_id}")).send().await.unwrap().status(), 204);
    assert_eq!(status(viewer.get(format!("{api}/api/v1/devices"))).await.0, 401);

    // Bundles: devices download with the capability their offer carries, nothing else does.
    let pushed = fleet.push(fleet.bundle("digits", 1, digits::MODEL, vec![]).unwrap()).await.unwrap();
    let url = format!("{api}/api/v1/bundles/{}", pushed.id);
    assert_eq!(status(anon.get(&url)).await.0, 401);
    assert_eq!(status(anon.get(format!("{url}?token=0123456789abcdef0123456789abcdef"))).await.0, 401);
    let cap = flotilla_server::service::tokens::capability(
        &fleet.server.shared().settings.capability_key,
        "bundle",
        &pushed.id,
    );
    let r = anon.get(format!("{url}?token={cap}")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.bytes().await.unwrap().len() as u64), (200, pushed.size));
    // The same capability opens no other path.
    assert_eq!(status(anon.get(format!("{api}/api/v1/devices?token={cap}"))).await.0, 401);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_4xx_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 0).await.unwrap();
    let api = fleet.api();
    let h = &fleet.http;
    for (req, want, code) in [
        (h.get(format!("{api}/api/v1/drift?model=digits&version=abc")), 400, "bad_request"),
        (h.get(format!("{api}/api/v1/nothing-here")), 404, "not_found"),
        (h.delete(format!("{api}/api/v1/devices")), 405, "method_not_allowed"),
        (h.post(format!("{api}/api/v1/rollouts")).body("{not json"), 400, "bad_request"),
        (h.post(format!("{api}/api/v1/rollouts")).json(&json!({"bundle": "digits"})), 400, "bad_bundle_ref"),
        (h.post(format!("{api}/api/v1/bundles")).body(vec![0u8; 100]), 422, "invalid_bundle"),
        (h.put(format!("{api}/api/v1/retrain/policies/digits")).json(&json!({"model": "digits"})), 400, "bad_policy"),
        (h.get(format!("{api}/api/v1/retrain/jobs/j-none")), 404, "job_not_found"),
    ] {
        let (status, body) = status(req).await;
        assert_eq!((status, body["code"].as_str()), (want, Some(code)), "{body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    }
    fleet.shutdown().await;
}
