//! The control plane's MQTT client: registry updates from hello/state, the event log and
//! rollout progress from events, and bundle chunks served on fetch requests.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Chunk, Command, Event, FetchRequest, Hello, Msg, State, Telemetry, TrustRoots};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::{Shared, now_s};

pub struct BrokerLogin {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to an external broker (mqtts://): the CA it trusts and the control plane's client
    /// certificate (CN flotilla-server, which no device certificate can carry).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// `client_id` is stable for a server's data directory: with a persistent session the broker
/// keeps what devices send while the server restarts (events, acknowledgements), and delivers
/// it when the server is back.
pub fn client(login: &BrokerLogin, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, login.host.clone(), login.port);
    // It also resubscribes on every connect and reads retained state.
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(30));
    let max = flotilla_proto::MAX_PAYLOAD + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(200);
    if let Some(u) = &login.username {
        opts.set_credentials(u.clone(), login.password.clone().unwrap_or_default());
    }
    if let Some(config) = &login.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config.clone())));
    }
    AsyncClient::new(opts, 4096)
}

/// The device channels the control plane subscribes to.
const SUBSCRIBED: [Channel; 6] =
    [Channel::Hello, Channel::State, Channel::Events, Channel::Fetch, Channel::Metrics, Channel::Csr];

pub async fn run(shared: Arc<Shared>, mut eventloop: EventLoop, cancel: CancellationToken) {
    let mut attempt = 0u32;
    let mut subacks = 0usize;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                subacks = 0;
                let s = shared.clone();
                tokio::spawn(async move {
                    for ch in SUBSCRIBED {
                        if let Err(e) = s.mqtt.subscribe(s.topics.all_devices(ch), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "subscribe failed");
                        }
                    }
                });
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                subacks += 1;
                // Only once the broker has acknowledged every subscription is nothing missed.
                if subacks == SUBSCRIBED.len() {
                    shared.connected.notify_waiters();
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                shared.metrics.mqtt_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                shared.metrics.mqtt_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // State messages are applied in the order the broker delivers them (a device's
                // `baking` then `active` must not swap); they are one store write each.
                if let Some((device, Channel::State)) = shared.topics.parse(&p.topic) {
                    if let Err(e) = on_state(&shared, device, &p.payload) {
                        tracing::warn!(device, error = %format!("{e:#}"), "state not handled");
                    }
                    continue;
                }
                let s = shared.clone();
                tokio::spawn(async move { handle(&s, &p.topic, &p.payload).await });
            }
            Ok(_) => {}
            Err(e) => {
                let wait = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(7)).min(10_000));
                tracing::warn!(error = %e, "broker connection error");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn handle(s: &Arc<Shared>, topic: &str, payload: &[u8]) {
    let Some((device, ch)) = s.topics.parse(topic) else { return };
    let result = match ch {
        Channel::Hello => on_hello(s, device, payload).await,
        Channel::State => on_state(s, device, payload),
        Channel::Events => on_event(s, device, payload),
        Channel::Fetch => on_fetch(s, device, payload).await,
        Channel::Metrics => on_metrics(s, device, payload).await,
        Channel::Csr => on_csr(s, device, payload).await,
        _ => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(device, channel = ch.as_str(), error = %format!("{e:#}"), "message not handled");
    }
}

async fn on_hello(s: &Shared, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<Hello> = flotilla_proto::decode(payload)?;
    let tags = serde_json::to_string(&msg.body.tags)?;
    let hello = serde_json::json!({
        "agent_version": msg.body.agent_version, "arch": msg.body.arch, "os": msg.body.os,
        "cores": msg.body.cores, "memory_bytes": msg.body.memory_bytes, "runtimes": msg.body.runtimes,
        "delegates": msg.body.delegates,
    });
    s.store.device_hello(device, &hello.to_string(), &tags, now_s())?;
    if let Some(v) = msg.body.root_version {
        s.store.set_device_root_version(device, v)?;
    }
    // A device behind on trust roots gets the chain it lacks.
    let latest = s.trust.read().expect("trust lock").as_ref().map(|t| t.root().version);
    if let Some(latest) = latest
        && msg.body.root_version.is_some_and(|v| v < latest)
    {
        send_roots(s, device, msg.body.root_version).await?;
    }
    // A reconnecting device may have missed an offer: send pending ones again.
    s.store.reoffer_device(device)?;
    s.wake.notify_one();
    tracing::debug!(device, "hello");
    Ok(())
}

fn on_state(s: &Shared, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<State> = flotilla_proto::decode(payload)?;
    let models = msg
        .body
        .models
        .map(|ms| {
            serde_json::to_string(
                &ms.iter()
                    .map(|m| flotilla_api::v1::DeviceModel {
                        name: m.name.clone(),
                        version: m.version,
                        backend: m.backend.clone(),
                        status: m.status.clone(),
                        model_sha256: m.model_sha256.clone(),
                        delegated_nodes: m.delegated_nodes,
                        cpu_nodes: m.cpu_nodes,
                        self_test: m.self_test.clone(),
                        self_test_median_us: m.self_test_median_us,
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .transpose()?;
    s.store.device_state(device, msg.body.online, models.as_deref(), now_s())?;
    Ok(())
}

fn on_event(s: &Shared, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<Event> = flotilla_proto::decode(payload)?;
    let body = serde_json::to_string(&event_json(&msg.body))?;
    let at = (msg.ts / 1000) as i64;
    if !s.store.add_event(device, &msg.id, at, event_kind(&msg.body), &body)? {
        return Ok(()); // a repeat of a message already handled
    }
    let (offer, state, reason) = match &msg.body {
        Event::InstallAccepted { offer_id, .. } | Event::InstallProgress { offer_id, .. } => {
            (offer_id, "downloading", None)
        }
        Event::InstallSucceeded { offer_id, .. } => (offer_id, "succeeded", None),
        Event::InstallFailed { offer_id, stage, reason, .. } => {
            (offer_id, "failed", Some(format!("{}: {reason}", stage.as_str())))
        }
        Event::TrustRootAccepted { version } => {
            s.store.set_device_root_version(device, *version)?;
            return Ok(());
        }
        Event::TrustRootRefused { version, reason } => {
            tracing::warn!(device, version, reason, "device refused a trust root");
            return Ok(());
        }
        Event::ModelRolledBack { name, from_version, to_version, reason } => {
            tracing::warn!(device, name, from_version, to_version, reason, "device rolled a model back");
            return Ok(());
        }
        Event::TelemetryDropped { total } => {
            tracing::warn!(device, total, "device dropped telemetry while offline");
            return Ok(());
        }
        Event::CertificateRenewed { serial, not_after, how } => {
            tracing::info!(device, serial, not_after, how, "device holds a new certificate");
            return Ok(());
        }
        Event::CertificateExpired { serial, not_after } => {
            tracing::warn!(device, serial, not_after, "device reports its certificate ended before it could renew it");
            return Ok(());
        }
        Event::CertificateRefused { reason } => {
            tracing::warn!(device, reason, "device refused the certificate it was sent");
            return Ok(());
        }
    };
    // The offer id names its device; a device cannot report on another's offer.
    if offer.ends_with(&format!("/{device}")) {
        s.store.offer_progress(offer, state, reason.as_deref(), now_s())?;
        s.wake.notify_one();
    }
    Ok(())
}

async fn on_metrics(s: &Arc<Shared>, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<Telemetry> = flotilla_proto::decode(payload)?;
    let (s, device) = (s.clone(), device.to_string());
    // Merging and scoring read the store: off the async runtime.
    tokio::task::spawn_blocking(move || match msg.body {
        Telemetry::Drift(r) => crate::drift::ingest(&s, &device, &msg.id, r, now_s()),
        Telemetry::Samples(b) => crate::drift::ingest_samples(&s, &device, b, now_s()),
        Telemetry::Health(h) => {
            s.store.set_health(
                &device,
                &h.model,
                h.version,
                h.inferences,
                h.errors,
                h.latency_p95_us,
                h.accelerator_fallback,
                &h.backend,
                now_s(),
            )?;
            s.wake.notify_one();
            Ok(())
        }
    })
    .await?
}

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::InstallAccepted { .. } => "install_accepted",
        Event::InstallProgress { .. } => "install_progress",
        Event::InstallSucceeded { .. } => "install_succeeded",
        Event::InstallFailed { .. } => "install_failed",
        Event::TrustRootAccepted { .. } => "trust_root_accepted",
        Event::TrustRootRefused { .. } => "trust_root_refused",
        Event::ModelRolledBack { .. } => "model_rolled_back",
        Event::TelemetryDropped { .. } => "telemetry_dropped",
        Event::CertificateRenewed { .. } => "certificate_renewed",
        Event::CertificateExpired { .. } => "certificate_expired",
        Event::CertificateRefused { .. } => "certificate_refused",
    }
}

fn event_json(e: &Event) -> serde_json::Value {
    match e {
        Event::InstallAccepted { offer_id, name, version } => {
            serde_json::json!({"offer_id": offer_id, "name": name, "version": version})
        }
        Event::InstallProgress { offer_id, received, total } => {
            serde_json::json!({"offer_id": offer_id, "received": received, "total": total})
        }
        Event::InstallSucceeded { offer_id, name, version, backend, self_test_ms } => serde_json::json!({
            "offer_id": offer_id, "name": name, "version": version, "backend": backend, "self_test_ms": self_test_ms
        }),
        Event::InstallFailed { offer_id, name, version, stage, reason } => serde_json::json!({
            "offer_id": offer_id, "name": name, "version": version, "stage": stage.as_str(), "reason": reason
        }),
        Event::TrustRootAccepted { version } => serde_json::json!({"version": version}),
        Event::TrustRootRefused { version, reason } => serde_json::json!({"version": version, "reason": reason}),
        Event::ModelRolledBack { name, from_version, to_version, reason } => serde_json::json!({
            "name": name, "from_version": from_version, "to_version": to_version, "reason": reason
        }),
        Event::TelemetryDropped { total } => serde_json::json!({"total": total}),
        Event::CertificateRenewed { serial, not_after, how } => {
            serde_json::json!({"serial": serial, "not_after": not_after, "how": how})
        }
        Event::CertificateExpired { serial, not_after } => {
            serde_json::json!({"serial": serial, "not_after": not_after})
        }
        Event::CertificateRefused { reason } => serde_json::json!({"reason": reason}),
    }
}

/// A renewal request: the broker let it through on this device's own topic only (on the
/// embedded broker, the connection's certificate names the device), so the certificate is
/// signed for that device, unless it is revoked. Through an external broker, only a device that
/// holds a certificate the registry knows may renew (a password alone never becomes one).
async fn on_csr(s: &Arc<Shared>, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<flotilla_proto::CertificateRequest> = flotilla_proto::decode(payload)?;
    if s.pki.is_none() {
        anyhow::bail!("renewal request, but this server runs without TLS");
    }
    if s.store.device_revoked(device)?.is_some() {
        anyhow::bail!("renewal request from a revoked device");
    }
    if s.broker_auth.is_none() && !s.store.device_certs(device)?.iter().any(|c| c.revoked.is_none()) {
        anyhow::bail!("renewal request from a device with no certificate on record");
    }
    let cert = crate::pki::sign_recorded(s, &msg.body.csr, device, "renewal")?;
    tracing::info!(device, "renewed a device certificate");
    let cmd = Command::Certificate(flotilla_proto::CertificateIssued { certificate: cert });
    let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), cmd));
    s.mqtt.publish(s.topics.device(device, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
    Ok(())
}

/// Send `device` every stored root newer than `have` (devices skip what they hold).
pub async fn send_roots(s: &Shared, device: &str, have: Option<u64>) -> anyhow::Result<bool> {
    let roots: Vec<_> = s.store.roots()?.into_iter().filter(|(v, _)| Some(*v) > have).collect();
    if roots.is_empty() {
        return Ok(false);
    }
    let cmd = Command::TrustRoots(TrustRoots {
        roots: roots.into_iter().map(|(_, b)| serde_bytes::ByteBuf::from(b)).collect(),
    });
    let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), cmd));
    s.mqtt.publish(s.topics.device(device, Channel::Cmd), QoS::AtLeastOnce, false, payload).await?;
    Ok(true)
}

async fn on_fetch(s: &Arc<Shared>, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<FetchRequest> = flotilla_proto::decode(payload)?;
    let req = msg.body;
    let files = s.files.clone();
    let (id, off, len) = (req.bundle_id.clone(), req.offset, req.len);
    let read = tokio::task::spawn_blocking(move || files.read_range(&id, off, len)).await?;
    let chunk = match read {
        Ok((data, total)) => {
            s.served_mqtt.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(device, bundle = %req.bundle_id, offset = req.offset, len = data.len(), "chunk served");
            Chunk { bundle_id: req.bundle_id, offset: req.offset, total, data, error: None }
        }
        Err(e) => {
            Chunk { bundle_id: req.bundle_id, offset: req.offset, total: 0, data: vec![], error: Some(e.to_string()) }
        }
    };
    let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::now_ms(), chunk));
    s.mqtt.publish(s.topics.device(device, Channel::Chunk), QoS::AtLeastOnce, false, payload).await?;
    Ok(())
}
