//! What devices send, in: the control plane's subscription to every device's channels. Each
//! message is decoded here and handed to the service that owns it (registry, events, drift,
//! samples, certificates); fetch requests are answered with chunks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_proto::{Channel, Event, FetchRequest, HealthReport, Hello, Msg, State, Telemetry, Topics};
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

/// The queues between the MQTT loop and the store. Each is bounded: beyond it a message is
/// dropped (and counted), never queued without limit; the loop itself never waits, so the
/// broker connection (keep-alives, commands out) stays live whatever the store does.
///
/// States: applied in the order they arrived by one task (a device's `baking` then `active`
/// must not swap); a store outage that fills it drops the oldest news, which the retained
/// states bring back at the next subscription.
const STATE_QUEUE: usize = 100_000;
/// Health reports: stored in batches by one task (the latest per device and model version).
const HEALTH_QUEUE: usize = 100_000;
/// Everything else (hellos, events, fetches, drift, samples, certificate requests), handled by
/// a pool of [`WORKERS`] tasks.
const WORK_QUEUE: usize = 50_000;
const WORKERS: usize = 64;
/// Most messages one store transaction takes.
const BATCH: usize = 5_000;

/// How long a device message waits for the store to come back before it is dropped.
const STORE_PATIENCE: Duration = Duration::from_secs(180);

/// A device message on its way to the store.
struct Inbound {
    device: String,
    /// When it arrived (seconds).
    at: i64,
    publish: rumqttc::Publish,
}

pub async fn run(i: Ingest, mut eventloop: EventLoop, cancel: CancellationToken) {
    let (states, state_queue) = tokio::sync::mpsc::channel::<Inbound>(STATE_QUEUE);
    let (health, health_queue) = tokio::sync::mpsc::channel::<(String, i64, HealthReport)>(HEALTH_QUEUE);
    let (work, work_queue) = tokio::sync::mpsc::channel::<Inbound>(WORK_QUEUE);
    tokio::spawn(apply_states(i.clone(), state_queue));
    tokio::spawn(apply_health(i.clone(), health_queue));
    let work_queue = Arc::new(tokio::sync::Mutex::new(work_queue));
    for _ in 0..WORKERS {
        let (i, queue) = (i.clone(), work_queue.clone());
        tokio::spawn(async move {
            loop {
                let next = queue.lock().await.recv().await;
                let Some(m) = next else { break };
                let ok = handle(&i, &m.device, &m.publish.topic, &m.publish.payload).await;
                let ch = i.topics.parse(&m.publish.topic).map_or(Channel::Hello, |(_, ch)| ch);
                count(&i, ch, ok, 1);
            }
        });
    }
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
                counters.mqtt_out.fetch_add(1, Ordering::Relaxed);
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                counters.mqtt_in.fetch_add(1, Ordering::Relaxed);
                let Some((device, ch)) = i.topics.parse(&p.topic) else {
                    i.fleet.metrics.device_messages("", false, 1);
                    continue;
                };
                let (device, at) = (device.to_string(), now_s());
                let queued = match ch {
                    Channel::State => states.try_send(Inbound { device, at, publish: p }).is_ok(),
                    Channel::Metrics => match flotilla_proto::decode::<Telemetry>(&p.payload) {
                        Ok(Msg { body: Telemetry::Health(h), .. }) => health.try_send((device, at, h)).is_ok(),
                        Ok(_) => work.try_send(Inbound { device, at, publish: p }).is_ok(),
                        Err(e) => {
                            tracing::warn!(device, error = %e, "undecodable telemetry");
                            false
                        }
                    },
                    _ => work.try_send(Inbound { device, at, publish: p }).is_ok(),
                };
                if !queued {
                    count(&i, ch, false, 1);
                    tracing::warn!(
                        channel = ch.as_str(),
                        "device message dropped (its queue is full: the store is slow or away)"
                    );
                }
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

fn count(i: &Ingest, ch: Channel, ok: bool, n: u64) {
    i.fleet.metrics.device_messages(ch.as_str(), ok, n);
}

/// Up to [`BATCH`] messages: the first one waited for, the rest what is already queued (so a
/// quiet fleet's message is stored at once, and a busy one's in few transactions).
async fn next_batch<T>(queue: &mut tokio::sync::mpsc::Receiver<T>) -> Option<Vec<T>> {
    let first = queue.recv().await?;
    let mut batch = vec![first];
    while batch.len() < BATCH {
        match queue.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Apply device states in arrival order, a batch per transaction, waiting for the store while
/// it is away.
async fn apply_states(i: Ingest, mut queue: tokio::sync::mpsc::Receiver<Inbound>) {
    while let Some(batch) = next_batch(&mut queue).await {
        let mut updates = Vec::with_capacity(batch.len());
        for m in &batch {
            match flotilla_proto::decode::<State>(&m.publish.payload) {
                Ok(msg) => updates.push(devices::state_update(&m.device, &msg.body, m.at)),
                Err(e) => {
                    tracing::warn!(device = %m.device, error = %e, "undecodable state");
                    count(&i, Channel::State, false, 1);
                }
            }
        }
        let stored = updates.len() as u64;
        match patiently("-", "state", || devices::states(&i.fleet, &updates)).await {
            Ok(()) => count(&i, Channel::State, true, stored),
            Err(e) => {
                tracing::warn!(states = stored, error = %format!("{e:#}"), "states not stored");
                count(&i, Channel::State, false, stored);
            }
        }
    }
}

/// Store health reports a batch per transaction.
async fn apply_health(i: Ingest, mut queue: tokio::sync::mpsc::Receiver<(String, i64, HealthReport)>) {
    while let Some(batch) = next_batch(&mut queue).await {
        let n = batch.len() as u64;
        let updates: Vec<_> = batch.iter().map(|(d, at, h)| devices::health_update(d, h, *at)).collect();
        match patiently("-", "health", || devices::health_many(&i.fleet, &updates)).await {
            Ok(()) => count(&i, Channel::Metrics, true, n),
            Err(e) => {
                tracing::warn!(reports = n, error = %format!("{e:#}"), "health reports not stored");
                count(&i, Channel::Metrics, false, n);
            }
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

/// Handle one device message; false if it was given up.
async fn handle(i: &Ingest, device: &str, topic: &str, payload: &[u8]) -> bool {
    let Some((_, ch)) = i.topics.parse(topic) else { return false };
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
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(device, channel = ch.as_str(), error = %format!("{e:#}"), "message not handled");
            false
        }
    }
}
