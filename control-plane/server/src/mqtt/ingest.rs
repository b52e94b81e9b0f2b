//! What devices send, in: the control plane's subscription to every device's channels. Each
//! message is decoded here and handed to the service that owns it (registry, events, drift,
//! samples, certificates); fetch requests are answered with chunks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Replicas: the shared-subscription group device topics are shared in. Each device's
    /// `state` stays one ordered stream: only the replica holding the `ingest/state` lease
    /// subscribes to it ([`lead_state`]), so a device's `baking` can never overwrite its later
    /// `active` (nor a will its next connection's state) by landing on a slower replica.
    pub shared: Option<String>,
    /// Whether this replica is subscribed to the state topics now.
    pub state_subscribed: Arc<AtomicBool>,
}

impl Ingest {
    fn filter(&self, ch: Channel) -> String {
        match &self.shared {
            Some(group) => format!("$share/{group}/{}", self.topics.all_devices(ch)),
            None => self.topics.all_devices(ch),
        }
    }

    /// The channels subscribed on every connect (state only when not shared: see [`lead_state`]).
    fn channels(&self) -> Vec<Channel> {
        SUBSCRIBED.into_iter().filter(|c| self.shared.is_none() || *c != Channel::State).collect()
    }
}

/// Replicas: hold the `ingest/state` lease and the state subscription together. The holder
/// subscribes (the broker then sends every device's retained state, so nothing is missed at a
/// hand-over); a replica that loses the lease unsubscribes.
pub async fn lead_state(i: Ingest, cancel: CancellationToken) {
    let state = i.topics.all_devices(Channel::State);
    loop {
        let held = match i.fleet.lease("ingest/state").await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "state lease: store unreachable; letting the state stream go");
                false
            }
        };
        let subscribed = i.state_subscribed.load(Ordering::Relaxed);
        if held && !subscribed {
            match i.client.subscribe(state.clone(), QoS::AtLeastOnce).await {
                Ok(()) => {
                    i.state_subscribed.store(true, Ordering::Relaxed);
                    tracing::info!(replica = %i.fleet.settings.replica, "this replica now applies device state");
                }
                Err(e) => tracing::warn!(error = %e, "subscribing to device state failed"),
            }
        } else if !held && subscribed {
            let _ = i.client.unsubscribe(state.clone()).await;
            i.state_subscribed.store(false, Ordering::Relaxed);
            tracing::info!(replica = %i.fleet.settings.replica, "another replica applies device state now");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(crate::service::LEASE_MS as u64 / 5)) => {}
        }
    }
}

/// States waiting to be applied, in the order they arrived (at most this many: beyond it, a
/// store outage drops the oldest news, which the retained states bring back at the next
/// subscription).
const STATE_QUEUE: usize = 100_000;

/// How long a device message waits for the store to come back before it is dropped.
const STORE_PATIENCE: Duration = Duration::from_secs(180);

pub async fn run(i: Ingest, mut eventloop: EventLoop, cancel: CancellationToken) {
    // State messages are applied in the order the broker delivers them (a device's `baking`
    // then `active` must not swap), by one task, so that waiting for the store (an outage)
    // never stops the event loop.
    let (states, queue) = tokio::sync::mpsc::channel::<rumqttc::Publish>(STATE_QUEUE);
    tokio::spawn(apply_states(i.clone(), queue));
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
                // A clean session lost its subscriptions: the state leader subscribes again.
                i.state_subscribed.store(false, Ordering::Relaxed);
                let (client, filters) = (i.client.clone(), i.channels().into_iter().map(|c| i.filter(c)));
                let filters: Vec<String> = filters.collect();
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                            tracing::warn!(error = %e, "subscribe failed");
                        }
                    }
                });
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                subacks += 1;
                // Only once the broker has acknowledged every subscription is nothing missed.
                if subacks == i.channels().len() {
                    i.connected.notify_waiters();
                }
            }
            Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                counters.mqtt_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                counters.mqtt_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some((device, Channel::State)) = i.topics.parse(&p.topic) {
                    if states.try_send(p.clone()).is_err() {
                        tracing::warn!(device, "state queue full (the store is slow or away): state dropped");
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

/// Apply device states in arrival order, each waiting for the store while it is away.
async fn apply_states(i: Ingest, mut queue: tokio::sync::mpsc::Receiver<rumqttc::Publish>) {
    while let Some(p) = queue.recv().await {
        let Some((device, _)) = i.topics.parse(&p.topic) else { continue };
        let msg: Msg<State> = match flotilla_proto::decode(&p.payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(device, error = %e, "undecodable state");
                continue;
            }
        };
        if let Err(e) = patiently(device, "state", || devices::state(&i.fleet, device, &msg.body)).await {
            tracing::warn!(device, error = %format!("{e:#}"), "state not handled");
        }
    }
}

/// Run `op` until it succeeds or [`STORE_PATIENCE`] has passed: a device message that arrives
/// while the store is away waits for it, rather than being lost (the broker has already handed
/// it over).
async fn patiently<F, Fut>(device: &str, what: &str, mut op: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(250);
    loop {
        match op().await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() + wait < STORE_PATIENCE => {
                if wait == Duration::from_millis(250) {
                    tracing::warn!(device, what, error = %format!("{e:#}"), "device message waits for the store");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
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
                patiently(device, "hello", || devices::hello(f, device, &msg.body)).await
            }
            Channel::Events => {
                let msg: Msg<Event> = flotilla_proto::decode(payload)?;
                patiently(device, "event", || events::record(f, device, &msg)).await
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
                    Telemetry::Health(h) => patiently(device, "health", || devices::health(f, device, &h)).await,
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
