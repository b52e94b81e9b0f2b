//! Device credentials on a plain-TCP control plane (`--insecure-plaintext`, where devices have
//! no certificates): started with --require-device-password it admits only devices enrolled
//! with the SHA-256 of their password, and keeps the enrollments across a restart. And no
//! client, with or without TLS, can take the control plane's own MQTT session.

use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions, authorized_client};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

async fn status(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

async fn online(fleet: &Fleet, id: &str) -> bool {
    fleet.devices().await.unwrap().iter().any(|d| d.id == id && d.online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_enrolled_devices_join() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FleetOptions { require_device_password: true, insecure_plaintext: true, ..FleetOptions::default() };
    let mut fleet = Fleet::start_with(dir.path(), 0, opts).await.unwrap();
    let api = fleet.api();

    // Enrolling takes the hash, never a password, and an operator.
    let put = |id: &str| format!("{api}/api/v1/devices/{id}/credential");
    let (code, body) = status(fleet.http.put(put("pi-1")).json(&json!({"password_sha256": "hunter2"}))).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("bad_credential")), "{body}");
    let (code, body) = status(fleet.http.put(put("no spaces")).json(&json!({"password_sha256": sha256("x")}))).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("bad_device_id")), "{body}");
    let viewer = authorized_client(&fleet.create_token("viewer", "").await.unwrap(), None).unwrap();
    assert_eq!(status(viewer.put(put("pi-1")).json(&json!({"password_sha256": sha256("p1")}))).await.0, 403);
    for id in ["pi-1", "pi-2"] {
        let (code, body) =
            status(fleet.http.put(put(id)).json(&json!({"password_sha256": sha256(&format!("{id}-secret"))}))).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!((body["device_id"].as_str(), body["enforced"].as_bool()), (Some(id), Some(true)));
    }

    // pi-1 with its password joins; pi-2 with a wrong one and an unenrolled device do not.
    for (id, password) in [("pi-1", Some("pi-1-secret")), ("pi-2", Some("wrong")), ("stranger", None)] {
        let mut cfg = fleet.agent_config(id).await;
        cfg.password = password.map(String::from);
        fleet.start_agent_with(cfg).await.unwrap();
    }
    fleet.wait_for(Duration::from_secs(20), || async { Ok(online(&fleet, "pi-1").await) }).await.unwrap();
    // They tried at the same time and were refused at once; give them a few more attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids: Vec<String> = fleet.devices().await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["pi-1"], "only the enrolled device with its password is registered");

    // Enrollments survive a restart: pi-1 comes back.
    fleet.restart_server().await.unwrap();
    fleet.wait_for(Duration::from_secs(30), || async { Ok(online(&fleet, "pi-1").await) }).await.unwrap();

    // Forgetting a credential: 204, then 404; with the password required, pi-2 stays out.
    assert_eq!(status(fleet.http.delete(put("pi-2"))).await.0, 204);
    let (code, body) = status(fleet.http.delete(put("pi-2"))).await;
    assert_eq!((code, body["code"].as_str()), (404, Some("credential_not_found")));
    assert!(!online(&fleet, "pi-2").await);
}

/// The impostor of issue 16: a client that is not enrolled connects, under open enrollment, with
/// the control plane's own client id (`flotilla-server-` and 16 hex digits of its data
/// directory) as id and username. Before, the broker admitted it as a device and it kicked the
/// server off the broker again and again. Now the control plane's names are no device's: the
/// impostor is refused, the server keeps its session, and the fleet goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_can_take_the_control_planes_session() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let data_dir = fleet.server_cfg.data_dir.canonicalize().unwrap();
    let digest = hex::encode(Sha256::digest(data_dir.to_string_lossy().as_bytes()));
    let server_id = format!("flotilla-server-{}", &digest[..16]);

    for (client_id, username) in [(server_id.as_str(), server_id.as_str()), (server_id.as_str(), "flotilla-server")] {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", fleet.server.mqtt_addr.port());
        opts.set_credentials(username, "");
        let (_client, mut events) = rumqttc::AsyncClient::new(opts, 10);
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => break Ok(ack.code),
                    Ok(_) => continue,
                    Err(e) => break Err(e.to_string()),
                }
            }
        })
        .await
        .expect("the broker answers");
        assert!(
            !matches!(refused, Ok(rumqttc::ConnectReturnCode::Success)),
            "{client_id}/{username} was admitted: {refused:?}"
        );
    }
    // The server kept its session: the device it knows is online and takes a bundle.
    assert!(online(&fleet, "dev-0").await);
    fleet.push(fleet.bundle("digits", 1, flotilla_demo::digits::MODEL, vec![]).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");

    // Nor can an operator enroll a device under those names.
    let put = format!("{}/api/v1/devices/{server_id}/credential", fleet.api());
    let (code, body) = status(fleet.http.put(put).json(&json!({"password_sha256": sha256("x")}))).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("bad_device_id")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("reserved"), "{body}");
    fleet.shutdown().await;
}
