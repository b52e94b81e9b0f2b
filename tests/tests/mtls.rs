//! Device identity over mutual TLS on the embedded broker: the certificate IS the identity.
//! Real certificates from the fleet CA (and from another CA), real rustls on both ends, real
//! agents: who may connect as whom, revocation, first-boot claims, and renewal in the field.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_demo::{Fleet, FleetOptions, digits, unix_now};
use flotilla_pki::Identity;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};

/// Connect to the fleet's broker over TLS with `identity` (None: no client certificate),
/// trusting `ca_pem`; the broker's answer: Ok(ConnAck code) or Err(why the connection failed).
async fn connect(
    fleet: &Fleet,
    ca_pem: &str,
    identity: Option<&Identity>,
    client_id: &str,
    username: &str,
) -> (Result<ConnectReturnCode, String>, AsyncClient, rumqttc::EventLoop) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", fleet.server.mqtt_addr.port());
    if !username.is_empty() {
        opts.set_credentials(username, "");
    }
    let config = flotilla_pki::tls::client_config(ca_pem, identity).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
    let (client, mut events) = AsyncClient::new(opts, 10);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => break Ok(ack.code),
                Ok(_) => continue,
                Err(e) => break Err(e.to_string()),
            }
        }
    })
    .await
    .expect("the broker answers");
    (answer, client, events)
}

fn admitted(r: &Result<ConnectReturnCode, String>) -> bool {
    matches!(r, Ok(ConnectReturnCode::Success))
}

fn ca_pem(fleet: &Fleet) -> String {
    std::fs::read_to_string(fleet.server.ca_path().unwrap()).unwrap()
}

fn pki(fleet: &Fleet) -> &flotilla_server::pki::Pki {
    fleet.server.shared().pki.as_ref().expect("the fleet runs with TLS")
}

async fn online(fleet: &Fleet, id: &str) -> bool {
    fleet.devices().await.unwrap().iter().any(|d| d.id == id && d.online)
}

async fn status(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Poll `events` for a while, answering nothing: what the broker sends back.
async fn drain(events: &mut rumqttc::EventLoop, secs: u64) -> Vec<Event> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(secs), async {
        while let Ok(ev) = events.poll().await {
            seen.push(ev);
        }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_certificate_is_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let ca = ca_pem(&fleet);
    let dev_a = fleet.server.issue_device_cert("dev-a").await.unwrap();

    // dev-a's certificate, claiming to be dev-b: refused, whatever the client id or username.
    for (id, user) in [("dev-b", "dev-b"), ("dev-b", ""), ("dev-a", "dev-b"), ("dev-b", "dev-a")] {
        let (r, ..) = connect(&fleet, &ca, Some(&dev_a), id, user).await;
        assert!(!admitted(&r), "dev-a's certificate was admitted as {id}/{user}: {r:?}");
    }
    // Nor as the control plane: its client id, or its username.
    let data_dir = fleet.server_cfg.data_dir.canonicalize().unwrap();
    let digest = flotilla_bundle::format::sha256_hex(data_dir.to_string_lossy().as_bytes());
    let server_id = format!("flotilla-server-{}", &digest[..16]);
    for (id, user) in [(server_id.as_str(), ""), (server_id.as_str(), "flotilla-server"), ("dev-a", "flotilla-server")]
    {
        let (r, ..) = connect(&fleet, &ca, Some(&dev_a), id, user).await;
        assert!(!admitted(&r), "dev-a's certificate was admitted as {id}/{user}: {r:?}");
    }
    // No certificate; an expired one; one from another CA; plain TCP: refused before MQTT.
    let (r, ..) = connect(&fleet, &ca, None, "dev-a", "").await;
    assert!(r.is_err(), "{r:?}");
    let expired = pki(&fleet).ca.device("dev-a", unix_now() as i64 - 3 * 86_400, 86_400).unwrap();
    let (r, ..) = connect(&fleet, &ca, Some(&expired), "dev-a", "").await;
    assert!(r.is_err(), "{r:?}");
    let other = flotilla_pki::Ca::generate("another fleet", unix_now() as i64, 86_400).unwrap();
    let stranger = other.device("dev-a", unix_now() as i64, 86_400).unwrap();
    let (r, ..) = connect(&fleet, &ca, Some(&stranger), "dev-a", "").await;
    assert!(r.is_err(), "{r:?}");
    let mut plain = MqttOptions::new("dev-a", "127.0.0.1", fleet.server.mqtt_addr.port());
    plain.set_credentials("dev-a", "");
    let (_c, mut ev) = AsyncClient::new(plain, 10);
    let r = tokio::time::timeout(Duration::from_secs(10), ev.poll()).await.unwrap();
    assert!(r.is_err(), "plain MQTT on the TLS port: {r:?}");

    // As itself (with or without a username): admitted, and confined to its own topics.
    let (r, client, mut events) = connect(&fleet, &ca, Some(&dev_a), "dev-a", "").await;
    assert!(admitted(&r), "{r:?}");
    client.subscribe("flotilla/v1/d/dev-0/cmd", QoS::AtLeastOnce).await.unwrap();
    let hello = |tag: &str| {
        let hello = flotilla_proto::Hello {
            agent_version: "test".into(),
            arch: "x".into(),
            os: "y".into(),
            cores: 1,
            memory_bytes: 1,
            runtimes: vec![],
            tags: [("planted".to_string(), tag.to_string())].into(),
            root_version: None,
            delegates: vec![],
        };
        flotilla_proto::encode(&flotilla_proto::Msg::new("m", 0, hello))
    };
    client.publish("flotilla/v1/d/dev-0/hello", QoS::AtLeastOnce, false, hello("by-dev-a")).await.unwrap();
    client.publish("flotilla/v1/d/dev-a/hello", QoS::AtLeastOnce, false, hello("mine")).await.unwrap();
    let seen = drain(&mut events, 2).await;
    let refused_sub = seen.iter().any(|e| {
        matches!(e, Event::Incoming(Packet::SubAck(s)) if s.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)))
    });
    assert!(refused_sub, "subscribing to another device's commands must fail: {seen:?}");
    fleet
        .wait_for(Duration::from_secs(10), || async {
            Ok(fleet
                .devices()
                .await?
                .iter()
                .any(|d| d.id == "dev-a" && d.tags.get("planted").map(String::as_str) == Some("mine")))
        })
        .await
        .unwrap();
    let dev0 = fleet.devices().await.unwrap().into_iter().find(|d| d.id == "dev-0").unwrap();
    assert_eq!(dev0.tags.get("planted"), None, "dev-a wrote into dev-0's registry entry");

    // The fleet goes on: the server kept its session (dev-a is no agent: the rollout is dev-0's).
    assert!(online(&fleet, "dev-0").await);
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, vec![]).unwrap()).await.unwrap();
    let req = json!({"bundle": "digits@1", "devices": ["dev-0"]});
    let (code, body) = status(fleet.http.post(format!("{}/api/v1/rollouts", fleet.api())).json(&req)).await;
    assert_eq!(code, 201, "{body}");
    let r = fleet.wait_rollout(body["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_device_is_cut_off_at_once_and_stays_out_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 2).await.unwrap();
    let api = fleet.api();
    let (code, body) = status(fleet.http.post(format!("{api}/api/v1/devices/dev-1/revoke"))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!((body["certificates"].as_u64(), body["disconnected"].as_u64()), (Some(1), Some(1)), "{body}");
    let t0 = Instant::now();
    fleet.wait_for(Duration::from_secs(10), || async { Ok(!online(&fleet, "dev-1").await) }).await.unwrap();
    eprintln!("dev-1 offline {:?} after the revocation", t0.elapsed());
    // It keeps trying and is refused; dev-0 is untouched.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!online(&fleet, "dev-1").await && online(&fleet, "dev-0").await);
    // A certificate the agent never had, for the same id, is refused too (revoked by id).
    let ca = ca_pem(&fleet);
    let fresh = pki(&fleet).ca.device("dev-1", unix_now() as i64, 86_400).unwrap();
    let (r, ..) = connect(&fleet, &ca, Some(&fresh), "dev-1", "").await;
    assert!(!admitted(&r), "{r:?}");
    let (_, certs) = status(fleet.http.get(format!("{api}/api/v1/devices/dev-1/certificates"))).await;
    assert!(certs[0]["revoked"].is_string(), "{certs}");

    // Across a restart of the control plane.
    fleet.restart_server().await.unwrap();
    fleet.wait_for(Duration::from_secs(30), || async { Ok(online(&fleet, "dev-0").await) }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!online(&fleet, "dev-1").await);
    let (r, ..) = connect(&fleet, &ca, Some(&fresh), "dev-1", "").await;
    assert!(!admitted(&r), "{r:?}");

    // An operator re-admits it with a new certificate; the old one stays refused.
    let (code, body) =
        status(fleet.http.post(format!("{api}/api/v1/devices/dev-1/certificate")).json(&json!({}))).await;
    assert_eq!(code, 200, "{body}");
    let renewed = Identity {
        cert_pem: body["certificate"].as_str().unwrap().into(),
        key_pem: body["key"].as_str().unwrap().into(),
    };
    let (r, ..) = connect(&fleet, &ca, Some(&renewed), "dev-1", "").await;
    assert!(admitted(&r), "{r:?}");
    let old = std::fs::read_to_string(dir.path().join("agents/dev-1/tls/identity.pem")).unwrap();
    let (key_at, _) = old.split_at(old.find("-----BEGIN PRIVATE KEY").unwrap());
    let old = Identity { cert_pem: key_at.into(), key_pem: old[key_at.len()..].into() };
    let (r, ..) = connect(&fleet, &ca, Some(&old), "dev-1", "").await;
    assert!(!admitted(&r), "the revoked certificate came back: {r:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_token_provisions_one_device_once_and_not_after_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 1).await.unwrap();
    let api = fleet.api();
    let http = fleet.http.clone();
    let token = |body: Value| {
        let http = http.clone();
        let url = format!("{api}/api/v1/claim-tokens");
        async move {
            let (code, t) = status(http.post(url).json(&body)).await;
            assert_eq!(code, 200, "{t}");
            t["token"].as_str().unwrap().to_string()
        }
    };
    // An agent with no certificate and a claim token: it makes its key, claims, and joins.
    let t1 = token(json!({"ttl_secs": 600})).await;
    let mut cfg = fleet.agent_config_without_certificate("claimer");
    cfg.claim = Some((api.clone(), t1.clone()));
    fleet.start_agent_with(cfg).await.unwrap();
    fleet.wait_for(Duration::from_secs(30), || async { Ok(online(&fleet, "claimer").await) }).await.unwrap();
    let pem = std::fs::read_to_string(dir.path().join("agents/claimer/tls/identity.pem")).unwrap();
    let cert = flotilla_pki::parse_cert(&pem).unwrap();
    assert_eq!(cert.common_name.as_deref(), Some("claimer"));
    assert!(!dir.path().join("flashed/claimer").exists(), "no key was made off the device");

    // The same token again: refused, however it is asked.
    let anon = flotilla_demo::client_builder(fleet.server.ca_path().as_deref()).unwrap().build().unwrap();
    let claim = |device: &str, token: &str| {
        let key = flotilla_pki::new_key().unwrap();
        let body = json!({"device_id": device, "token": token, "csr": flotilla_pki::csr(device, &key).unwrap()});
        anon.post(format!("{api}/api/v1/claim")).json(&body)
    };
    let (code, body) = status(claim("second", &t1)).await;
    assert_eq!((code, body["code"].as_str()), (403, Some("claim_refused")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("used already"), "{body}");
    // An expired one.
    let t2 = token(json!({"ttl_secs": 1})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, body) = status(claim("late", &t2)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("expired"), "{body}");
    // An unbound token cannot take over an enrolled device; nor the control plane's names.
    let t3 = token(json!({})).await;
    let (code, body) = status(claim("dev-0", &t3)).await;
    assert!(code == 403 && body["message"].as_str().unwrap().contains("already enrolled"), "{body}");
    let (code, body) = status(claim("flotilla-server-x", &t3)).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("bad_device_id")), "{body}");
    // A CSR for another name than the device's: refused, and the token is not spent.
    let key = flotilla_pki::new_key().unwrap();
    let wrong = json!({"device_id": "fresh", "token": t3, "csr": flotilla_pki::csr("other", &key).unwrap()});
    let (code, body) = status(anon.post(format!("{api}/api/v1/claim")).json(&wrong)).await;
    assert_eq!((code, body["code"].as_str()), (400, Some("bad_csr")), "{body}");
    let (code, body) = status(claim("fresh", &t3)).await;
    assert_eq!(code, 200, "{body}");
    // Tokens are listed without their secrets, with who used them.
    let (_, list) = status(fleet.http.get(format!("{api}/api/v1/claim-tokens"))).await;
    assert!(list.as_array().unwrap().iter().all(|t| t["token"].is_null()), "{list}");
    assert!(list.as_array().unwrap().iter().any(|t| t["used_by"] == "claimer"), "{list}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_near_its_end_is_renewed_over_the_session_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 0).await.unwrap();
    // Flashed with a certificate that has two hours left; renewal starts with a day left.
    let short = pki(&fleet).ca.device("renewer", unix_now() as i64, 7200).unwrap();
    let flashed = dir.path().join("flashed-renewer");
    std::fs::create_dir_all(&flashed).unwrap();
    std::fs::write(flashed.join("device.pem"), &short.cert_pem).unwrap();
    std::fs::write(flashed.join("device.key"), &short.key_pem).unwrap();
    let mut cfg = fleet.agent_config("renewer").await;
    cfg.cert = Some(flashed.join("device.pem"));
    cfg.key = Some(flashed.join("device.key"));
    cfg.cert_renew_before_secs = Some(86_400);
    let first = flotilla_pki::parse_cert(&short.cert_pem).unwrap();
    fleet.start_agent_with(cfg.clone()).await.unwrap();
    let identity = dir.path().join("agents/renewer/tls/identity.pem");
    let renewed = || flotilla_pki::parse_cert(&std::fs::read_to_string(&identity).unwrap()).unwrap();
    fleet.wait_for(Duration::from_secs(30), || async { Ok(renewed().serial != first.serial) }).await.unwrap();
    let second = renewed();
    assert!(second.not_after > unix_now() as i64 + 300 * 86_400, "{second:?}");
    // It reconnected with the new certificate and keeps working.
    fleet.wait_for(Duration::from_secs(30), || async { Ok(online(&fleet, "renewer").await) }).await.unwrap();
    fleet
        .wait_for(Duration::from_secs(20), || async {
            Ok(fleet.events("renewer").await?.iter().any(|e| e.kind == "certificate_renewed"))
        })
        .await
        .unwrap();
    // Across a restart of the agent, the renewed certificate is the one it uses.
    let i = fleet.agents.iter().position(|(a, _)| a == "renewer").unwrap();
    fleet.agents.remove(i).1.shutdown().await;
    fleet.start_agent_with(cfg).await.unwrap();
    fleet.wait_for(Duration::from_secs(30), || async { Ok(online(&fleet, "renewer").await) }).await.unwrap();
    assert_eq!(renewed().serial, second.serial);
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, vec![]).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "completed", "{r:?}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_offline_past_its_certificates_end_reports_it_and_recovers_with_a_claim_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path(), 0).await.unwrap();
    let api = fleet.api();
    // Its certificate ended yesterday (the device was offline for weeks).
    let ended = pki(&fleet).ca.device("sleeper", unix_now() as i64 - 3 * 86_400, 2 * 86_400).unwrap();
    let flashed = dir.path().join("flashed-sleeper");
    std::fs::create_dir_all(&flashed).unwrap();
    std::fs::write(flashed.join("device.pem"), &ended.cert_pem).unwrap();
    std::fs::write(flashed.join("device.key"), &ended.key_pem).unwrap();
    // The recovery path: the operator makes a claim token for this device and gives it to it.
    let (code, t) =
        status(fleet.http.post(format!("{api}/api/v1/claim-tokens")).json(&json!({"device_id": "sleeper"}))).await;
    assert_eq!(code, 200, "{t}");
    let mut cfg = fleet.agent_config("sleeper").await;
    cfg.cert = Some(flashed.join("device.pem"));
    cfg.key = Some(flashed.join("device.key"));
    cfg.claim = Some((api.clone(), t["token"].as_str().unwrap().into()));
    fleet.start_agent_with(cfg).await.unwrap();
    fleet.wait_for(Duration::from_secs(60), || async { Ok(online(&fleet, "sleeper").await) }).await.unwrap();
    // The control plane hears what happened once the device is back.
    fleet
        .wait_for(Duration::from_secs(20), || async {
            let kinds: Vec<String> = fleet.events("sleeper").await?.into_iter().map(|e| e.kind).collect();
            Ok(kinds.contains(&"certificate_expired".to_string()) && kinds.contains(&"certificate_renewed".to_string()))
        })
        .await
        .unwrap();
    fleet.shutdown().await;
}

/// An operator's own device PKI (`--client-ca`): its certificates are admitted as the device
/// they name, next to the fleet CA's; a CA nobody configured stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_of_an_operators_own_ca_are_admitted_with_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = flotilla_pki::Ca::generate("operator's device CA", unix_now() as i64, 86_400).unwrap();
    let pem = dir.path().join("operator-ca.pem");
    std::fs::write(&pem, theirs.cert_pem()).unwrap();
    let tls = flotilla_server::pki::TlsOptions { client_ca: Some(pem), ..Default::default() };
    let fleet =
        Fleet::start_with(&dir.path().join("fleet"), 1, FleetOptions { tls, ..FleetOptions::default() }).await.unwrap();
    let ca = ca_pem(&fleet);
    let own = theirs.device("their-7", unix_now() as i64, 86_400).unwrap();
    let (r, ..) = connect(&fleet, &ca, Some(&own), "their-7", "").await;
    assert!(admitted(&r), "{r:?}");
    let (r, ..) = connect(&fleet, &ca, Some(&own), "dev-0", "").await;
    assert!(!admitted(&r), "{r:?}");
    let nobody = flotilla_pki::Ca::generate("nobody's CA", unix_now() as i64, 86_400).unwrap();
    let stray = nobody.device("their-8", unix_now() as i64, 86_400).unwrap();
    let (r, ..) = connect(&fleet, &ca, Some(&stray), "their-8", "").await;
    assert!(r.is_err(), "{r:?}");
    assert!(online(&fleet, "dev-0").await);
    fleet.shutdown().await;
}
