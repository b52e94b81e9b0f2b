//! Interoperability: the control plane and agents speak MQTT 3.1.1, so Debian's Mosquitto can
//! replace the embedded broker: in plain TCP (`flotilla-server --broker mqtt://HOST:PORT`), and
//! with the fleet's certificates (`flotilla-server mosquitto` writes its listener, certificate
//! and ACL; `--broker mqtts://HOST:PORT`). `.ci/run` installs mosquitto; without it these tests
//! fail and say so.

use std::sync::Arc;
use std::time::Duration;

use flotilla_demo::{Fleet, FleetOptions, digits};
use flotilla_tests::{start_mosquitto, start_mosquitto_tls};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_over_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_mosquitto(dir.path());
    let fleet =
        Fleet::start_with_broker(&dir.path().join("fleet"), 2, Some(format!("mqtt://127.0.0.1:{}", broker.port)))
            .await
            .unwrap();
    assert_eq!(fleet.server.mqtt_addr.port(), broker.port);
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let id = fleet.start_rollout("digits@1").await.unwrap();
    let r = fleet.wait_rollout(&id, Duration::from_secs(60)).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded), ("completed", 2), "{r:?}");
    for (device, _) in &fleet.agents {
        let resp = fleet.infer(device, "digits", &digits::request(&samples)).await.unwrap();
        assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    }
    fleet.shutdown().await;
}

/// Mosquitto with `require_certificate` and `use_identity_as_username`, set up by
/// `flotilla-server mosquitto`: agents with device certificates join and take a rollout; a
/// client with one device's certificate cannot write on another's topics; a client without a
/// certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_with_device_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, url) = start_mosquitto_tls(dir.path(), &dir.path().join("fleet/server"));
    let out = dir.path().join("mosquitto");
    let acl = std::fs::read_to_string(out.join("flotilla.acl")).unwrap();
    assert!(acl.contains("pattern readwrite flotilla/v1/d/%u/#"), "{acl}");
    let opts = FleetOptions { external_broker: Some(url), ..FleetOptions::default() };
    let fleet = Fleet::start_with(&dir.path().join("fleet"), 2, opts).await.unwrap();
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..1])).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded), ("completed", 2), "{r:?}");

    // dev-1's certificate, claiming dev-0 as client id and username, writes a hello with a tag
    // on dev-0's topic and on its own: only its own lands.
    let ca = std::fs::read_to_string(fleet.server.ca_path().unwrap()).unwrap();
    let (cert, key) = fleet.flashed_certificate("dev-1").await.unwrap();
    let ident = flotilla_pki::Identity {
        cert_pem: std::fs::read_to_string(cert).unwrap(),
        key_pem: std::fs::read_to_string(key).unwrap(),
    };
    let mut o = rumqttc::MqttOptions::new("dev-0", "127.0.0.1", broker.port);
    o.set_credentials("dev-0", "");
    let config = flotilla_pki::tls::client_config(&ca, Some(&ident)).unwrap();
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config))));
    let (client, mut events) = rumqttc::AsyncClient::new(o, 10);
    let hello = |tag: &str| {
        let h = flotilla_proto::Hello {
            agent_version: "x".into(),
            arch: "x".into(),
            os: "x".into(),
            cores: 1,
            memory_bytes: 1,
            runtimes: vec![],
            tags: [("planted".to_string(), tag.to_string())].into(),
            root_version: None,
            delegates: vec![],
        };
        flotilla_proto::encode(&flotilla_proto::Msg::new("m", 0, h))
    };
    client.publish("flotilla/v1/d/dev-0/hello", rumqttc::QoS::AtLeastOnce, false, hello("x")).await.unwrap();
    client.publish("flotilla/v1/d/dev-1/hello", rumqttc::QoS::AtLeastOnce, false, hello("mine")).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(3), async { while events.poll().await.is_ok() {} }).await;
    fleet
        .wait_for(Duration::from_secs(10), || async {
            Ok(fleet
                .devices()
                .await?
                .iter()
                .any(|d| d.id == "dev-1" && d.tags.get("planted").map(String::as_str) == Some("mine")))
        })
        .await
        .unwrap();
    let dev0 = fleet.devices().await.unwrap().into_iter().find(|d| d.id == "dev-0").unwrap();
    assert_eq!(dev0.tags.get("planted"), None, "dev-1's certificate wrote on dev-0's topic");

    // No certificate: refused.
    let mut o = rumqttc::MqttOptions::new("dev-9", "127.0.0.1", broker.port);
    let config = flotilla_pki::tls::client_config(&ca, None).unwrap();
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config))));
    let (_c, mut ev) = rumqttc::AsyncClient::new(o, 10);
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => break Ok(a.code),
                Ok(_) => continue,
                Err(e) => break Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
    assert!(!matches!(r, Ok(rumqttc::ConnectReturnCode::Success)), "{r:?}");
    fleet.shutdown().await;
}
