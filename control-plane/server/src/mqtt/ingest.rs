//! What devices send, in: the control plane's subscription to every device's channels. Each
//! message is decoded here and handed to the service that owns it (registry, events, drift,
//! samples, certificates); fetch requests are answered with chunks.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Event, FetchRequest, Hello, Msg, State, Telemetry, Topics};
use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::service::{Fleet, certs, devices, drift, events, samples};
use crate::util::now_s;

/// The device channels the control plane subscribes to.
const SUBSCRIBED: [Channel; 6] =
    [Channel::Hello, Channel::State, Channel::Events, Channel::Fetch, Channel::Metrics, Channel::Csr];

/// The ingest loop's parts.
#[derive(Clone)]
pub struct Ingest {
    pub fleet: Arc<Fleet>,
    pub client: AsyncClient,
    pub topics: Topics,
    /// Notified after each (re)subscription to the device topics.
    pub connected: Arc<Notify>,
}

pub async fn run(i: Ingest, mut eventloop: EventLoop, cancel: CancellationToken) {
    let mut attempt = 0u32;
    let mut subacks = 0usize;
    let counters = &i.fleet.metrics;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                attempt = 0;
                subacks = 0;
                let (client, topics) = (i.client.clone(), i.topics.clone());
                tokio::spawn(async move {
                    for ch in SUBSCRIBED {
                        if let Err(e) = client.subscribe(topics.all_devices(ch), QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "subscribe failed");
                        }
                    }
                });
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                subacks += 1;
                // Only once the broker has acknowledged every subscription is nothing missed.
                if subacks == SUBSCRIBED.len() {
                    i.connected.notify_waiters();
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                counters.mqtt_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                counters.mqtt_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // State messages are applied in the order the broker delivers them (a device's
                // `baking` then `active` must not swap); they are one store write each.
                if let Some((device, Channel::State)) = i.topics.parse(&p.topic) {
                    if let Err(e) = on_state(&i.fleet, device, &p.payload).await {
                        tracing::warn!(device, error = %format!("{e:#}"), "state not handled");
                    }
                    continue;
                }
                let i = i.clone();
                tokio::spawn(async move { handle(&i, &p.topic, &p.payload).await });
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

async fn handle(i: &Ingest, topic: &str, payload: &[u8]) {
    let Some((device, ch)) = i.topics.parse(topic) else { return };
    let f = &i.fleet;
    let result = async {
        match ch {
            Channel::Hello => {
                let msg: Msg<Hello> = flotilla_proto::decode(payload)?;
                devices::hello(f, device, &msg.body).await
            }
            Channel::State => on_state(f, device, payload).await,
            Channel::Events => {
                let msg: Msg<Event> = flotilla_proto::decode(payload)?;
                events::record(f, device, &msg).await
            }
            Channel::Fetch => {
                let msg: Msg<FetchRequest> = flotilla_proto::decode(payload)?;
                super::chunks::serve(f, &i.client, &i.topics, device, msg.body).await
            }
            Channel::Metrics => {
                let msg: Msg<Telemetry> = flotilla_proto::decode(payload)?;
                match msg.body {
                    Telemetry::Drift(r) => drift::ingest(f, device, &msg.id, r, now_s()).await,
                    Telemetry::Samples(b) => samples::ingest(f, device, b, now_s()).await,
                    Telemetry::Health(h) => devices::health(f, device, &h).await,
                }
            }
            Channel::Csr => {
                let msg: Msg<flotilla_proto::CertificateRequest> = flotilla_proto::decode(payload)?;
                certs::renew(f, device, &msg.body.csr).await
            }
            _ => Ok(()),
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(device, channel = ch.as_str(), error = %format!("{e:#}"), "message not handled");
    }
}

async fn on_state(f: &Fleet, device: &str, payload: &[u8]) -> anyhow::Result<()> {
    let msg: Msg<State> = flotilla_proto::decode(payload)?;
    devices::state(f, device, &msg.body).await
}
