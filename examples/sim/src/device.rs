//! One simulated device: a task owning its MQTT event loop, as the agent's session does
//! (`agent/daemon/src/session.rs`): a persistent session, a retained "offline" last will, and on
//! every ConnAck a subscription to its command topic, a hello, and its retained state.
//!
//! Everything a device does happens in this task (timers, commands), except downloads, which
//! run in a task of their own and report back through the device's inbox. Publishes from here
//! use `try_publish` so the loop never waits on its own request queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{
    Channel, Chunk, Command, Event, HealthReport, Hello, InstallOffer, ModelState, Msg, State, Telemetry,
};
use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{BundleInfo, Download, Rng, Shared, add};

/// A model as the simulated device holds it.
#[derive(Clone, Debug)]
struct Model {
    name: String,
    version: u64,
    manifest_sha256: String,
    model_sha256: Option<String>,
    /// When it became active (health counts inferences since).
    since: Instant,
    /// The version before it, for rollbacks.
    prev: Option<Box<Model>>,
}

enum Install {
    Busy,
    Succeeded,
}

/// What a download task reports back.
struct Downloaded {
    offer: InstallOffer,
    info: Arc<BundleInfo>,
    result: anyhow::Result<u64>,
}

struct Device {
    sh: Arc<Shared>,
    id: String,
    n: usize,
    client: AsyncClient,
    rng: Rng,
    models: Vec<Model>,
    connected: bool,
    ever_connected: bool,
    registered: bool,
    /// The first hello was queued; its packet id is the next outgoing publish's.
    hello_queued: bool,
    hello_pkid: Option<u16>,
    next_health: Option<Instant>,
    next_drift: Option<Instant>,
    installs: HashMap<String, Install>,
    /// No-download installs waiting for their simulated install time.
    finishing: Vec<(Instant, InstallOffer, Arc<BundleInfo>)>,
    /// The MQTT download in progress: its bundle id and where its chunks go.
    chunk_route: Option<(String, mpsc::Sender<Chunk>)>,
    inbox: mpsc::UnboundedSender<Downloaded>,
}

fn options(sh: &Shared, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, sh.host.clone(), sh.port);
    opts.set_clean_session(sh.cfg.clean_session);
    opts.set_keep_alive(sh.cfg.keep_alive);
    // Offers carry the bundle head; chunks are about 256 KiB.
    let max = flotilla_proto::MAX_PAYLOAD + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(16);
    opts.set_credentials(id, sh.cfg.password.clone().unwrap_or_default());
    let will = flotilla_proto::encode(&Msg::new("will", 0, State { online: false, models: None }));
    opts.set_last_will(LastWill::new(sh.topics.device(id, Channel::State), will, QoS::AtLeastOnce, true));
    opts
}

/// Backoff before reconnect attempt `n`: 200 ms doubling to 30 s, times a jitter in [0.5, 1.5).
fn backoff(attempt: u32, rng: &mut Rng) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(8)).min(30_000);
    Duration::from_millis((base as f64 * (0.5 + rng.f64())) as u64)
}

pub(crate) async fn run(sh: Arc<Shared>, n: usize, cancel: CancellationToken) {
    let id = sh.cfg.device_id(n);
    let rng = Rng::new(Rng::seeded().next_u64() ^ n as u64);
    // The first connection waits for its turn like any other.
    let mut permit = tokio::select! {
        _ = cancel.cancelled() => return,
        p = sh.connect_gate.clone().acquire_owned() => p.ok(),
    };
    let mut opts = options(&sh, &id);
    if let Some(tls) = &sh.tls {
        // Minting (key generation and signing) happens here, paced by the connect gate.
        match tls.device_config(&id) {
            Ok(c) => {
                opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c)));
            }
            Err(e) => return sh.error(&format!("device certificate: {e:#}")),
        }
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    eventloop.network_options.set_connection_timeout(20);
    let (inbox, mut inbox_rx) = mpsc::unbounded_channel();
    let models = sh
        .cfg
        .model
        .iter()
        .map(|(name, version)| Model {
            name: name.clone(),
            version: *version,
            manifest_sha256: flotilla_bundle::format::sha256_hex(format!("flotilla-sim {name}@{version}").as_bytes()),
            model_sha256: None,
            since: Instant::now(),
            prev: None,
        })
        .collect();
    let mut d = Device {
        sh: sh.clone(),
        id,
        n,
        client,
        rng,
        models,
        connected: false,
        ever_connected: false,
        registered: false,
        hello_queued: false,
        hello_pkid: None,
        next_health: None,
        next_drift: None,
        installs: HashMap::new(),
        finishing: Vec::new(),
        chunk_route: None,
        inbox,
    };
    let mut burst = sh.burst.subscribe();
    burst.mark_unchanged();
    let mut attempt = 0u32;
    if permit.is_some() {
        add(&sh.stats.connect_attempts, 1);
    }
    loop {
        if !d.connected && permit.is_none() {
            permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = sh.connect_gate.clone().acquire_owned() => p.ok(),
            };
            add(&sh.stats.connect_attempts, 1);
        }
        let deadline = d.next_deadline();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(done) = inbox_rx.recv() => d.on_downloaded(done),
            _ = sleep_until(deadline), if d.connected => d.on_timers(),
            Ok(()) = burst.changed(), if d.connected => {
                let k = *burst.borrow_and_update();
                for _ in 0..k {
                    d.send_health();
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    permit = None;
                    attempt = 0;
                    d.on_connect();
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => d.on_publish(p),
                Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                    if d.hello_queued {
                        d.hello_queued = false;
                        d.hello_pkid = Some(pkid);
                    }
                }
                Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                    if d.hello_pkid == Some(ack.pkid) {
                        d.hello_pkid = None;
                        if !d.registered {
                            d.registered = true;
                            sh.on_registered();
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    permit = None;
                    if d.connected {
                        d.connected = false;
                        sh.stats.connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        add(&sh.stats.disconnects, 1);
                    }
                    sh.error(&format!("connection: {e}"));
                    let wait = backoff(attempt, &mut d.rng);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            },
        }
    }
    d.goodbye(&mut eventloop).await;
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Device {
    fn publish<T: serde::Serialize>(&mut self, ch: Channel, body: T, retain: bool) -> bool {
        let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::unix_now_ms(), body));
        match self.client.try_publish(self.sh.topics.device(&self.id, ch), QoS::AtLeastOnce, retain, payload) {
            Ok(()) => true,
            Err(e) => {
                self.sh.error(&format!("publish on {}: {e}", ch.as_str()));
                false
            }
        }
    }

    fn event(&mut self, ev: Event) {
        if self.publish(Channel::Events, ev, false) {
            add(&self.sh.stats.sent_events, 1);
        }
    }

    fn hello(&self) -> Hello {
        let cfg = &self.sh.cfg;
        Hello {
            agent_version: cfg.agent_version.clone(),
            arch: cfg.arch.clone(),
            os: std::env::consts::OS.into(),
            cores: 4,
            memory_bytes: 4 << 30,
            runtimes: cfg.runtimes.clone(),
            tags: cfg.device_tags(self.n),
            root_version: None,
            delegates: vec![],
        }
    }

    fn publish_state(&mut self) {
        self.publish_state_online(true);
    }

    fn publish_state_online(&mut self, online: bool) {
        let models = self
            .models
            .iter()
            .map(|m| ModelState {
                name: m.name.clone(),
                version: m.version,
                manifest_sha256: m.manifest_sha256.clone(),
                backend: self.sh.cfg.backend.clone(),
                model_sha256: m.model_sha256.clone(),
                delegated_nodes: None,
                cpu_nodes: None,
                self_test: Some("smoke".into()),
                self_test_median_us: Some(1000),
                status: "active".into(),
            })
            .collect();
        if self.publish(Channel::State, State { online, models: Some(models) }, true) {
            add(&self.sh.stats.sent_state, 1);
        }
    }

    fn on_connect(&mut self) {
        let sh = self.sh.clone();
        self.connected = true;
        add(&sh.stats.connected, 1);
        if !self.ever_connected {
            self.ever_connected = true;
            sh.on_connected_first();
        }
        let mut subs = vec![Channel::Cmd];
        if sh.cfg.download == Download::Mqtt {
            subs.push(Channel::Chunk);
        }
        for ch in subs {
            if let Err(e) = self.client.try_subscribe(sh.topics.device(&self.id, ch), QoS::AtLeastOnce) {
                sh.error(&format!("subscribe: {e}"));
            }
        }
        let hello = self.hello();
        if self.publish(Channel::Hello, hello, false) {
            add(&sh.stats.sent_hello, 1);
            if !self.registered {
                self.hello_queued = true;
            }
        }
        self.publish_state();
        // Reports start at a random phase, so a fleet's reports spread over the period.
        let now = Instant::now();
        if self.next_health.is_none() {
            self.next_health = sh.cfg.health_every.map(|e| now + self.rng.below(e));
        }
        if self.next_drift.is_none() {
            self.next_drift = sh.cfg.drift_every.map(|e| now + self.rng.below(e));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [self.next_health, self.next_drift, self.finishing.iter().map(|f| f.0).min()].into_iter().flatten().min()
    }

    /// One health report per model, as the agent's periodic report.
    fn send_health(&mut self) {
        let sh = self.sh.clone();
        for i in 0..self.models.len() {
            let m = &self.models[i];
            let inferences = (m.since.elapsed().as_secs_f64() * sh.cfg.inference_rate) as u64;
            let report = HealthReport {
                model: m.name.clone(),
                version: m.version,
                inferences,
                errors: 0,
                latency_p95_us: (inferences > 0).then(|| 1500 + self.rng.next_u64() % 1000),
                backend: sh.cfg.backend.clone(),
                accelerator_fallback: false,
            };
            if self.publish(Channel::Metrics, Telemetry::Health(report), false) {
                add(&sh.stats.sent_health, 1);
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let sh = self.sh.clone();
        if let (Some(t), Some(every)) = (self.next_health, sh.cfg.health_every)
            && t <= now
        {
            self.next_health = Some(if now - t > every { now + every } else { t + every });
            self.send_health();
        }
        if let (Some(t), Some(every)) = (self.next_drift, sh.cfg.drift_every)
            && t <= now
        {
            self.next_drift = Some(if now - t > every { now + every } else { t + every });
            let every_ms = every.as_millis() as u64;
            let window = crate::drift::window(every_ms, crate::unix_now_ms());
            let inferences = (every.as_secs_f64() * sh.cfg.inference_rate).round() as u64;
            for i in 0..self.models.len() {
                let (name, version) = (self.models[i].name.clone(), self.models[i].version);
                let Some(profile) = sh.profiles.get(&name, version) else {
                    add(&sh.stats.drift_without_profile, 1);
                    continue;
                };
                let r = crate::drift::report(
                    &profile,
                    &name,
                    version,
                    window,
                    inferences,
                    sh.cfg.drift_shift,
                    &mut self.rng,
                );
                if self.publish(Channel::Metrics, Telemetry::Drift(r), false) {
                    add(&sh.stats.sent_drift, 1);
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.finishing).into_iter().partition(|f| f.0 <= now);
        self.finishing = later;
        for (_, offer, info) in due {
            self.succeed(&offer, &info);
        }
    }

    fn on_publish(&mut self, p: rumqttc::Publish) {
        let sh = self.sh.clone();
        let Some((device, ch)) = sh.topics.parse(&p.topic) else { return };
        if device != self.id {
            return;
        }
        match ch {
            Channel::Cmd => match flotilla_proto::decode::<Command>(&p.payload) {
                Ok(msg) => match msg.body {
                    Command::Install(offer) => self.on_offer(offer),
                    Command::Rollback(cmd) => self.on_rollback(cmd),
                    _ => add(&sh.stats.other_commands, 1),
                },
                Err(e) => sh.error(&format!("malformed command: {e}")),
            },
            Channel::Chunk => match flotilla_proto::decode::<Chunk>(&p.payload) {
                Ok(msg) => {
                    add(&sh.stats.chunks_received, 1);
                    if let Some((bundle, tx)) = &self.chunk_route
                        && *bundle == msg.body.bundle_id
                    {
                        // A full route drops the chunk; the download asks again on timeout.
                        let _ = tx.try_send(msg.body);
                    }
                }
                Err(e) => sh.error(&format!("malformed chunk: {e}")),
            },
            _ => {}
        }
    }

    fn on_offer(&mut self, offer: InstallOffer) {
        let sh = self.sh.clone();
        add(&sh.stats.offers, 1);
        match self.installs.get(&offer.offer_id) {
            // Offers are idempotent: a repeat of one done is answered again, one under way waits.
            Some(Install::Succeeded) => {
                add(&sh.stats.repeated_offers, 1);
                let backend = sh.cfg.backend.clone();
                self.event(Event::InstallSucceeded {
                    offer_id: offer.offer_id,
                    name: offer.name,
                    version: offer.version,
                    backend,
                    self_test_ms: 0,
                });
                return;
            }
            Some(Install::Busy) => {
                add(&sh.stats.repeated_offers, 1);
                return;
            }
            None => {}
        }
        let info = match sh.bundle_info(&offer.bundle_id, &offer.head) {
            Ok(i) => i,
            Err(e) => {
                sh.error(&format!("offer: {e:#}"));
                add(&sh.stats.installs_failed, 1);
                self.event(Event::InstallFailed {
                    offer_id: offer.offer_id,
                    name: offer.name,
                    version: offer.version,
                    stage: flotilla_proto::InstallStage::Offered,
                    reason: format!("{e:#}"),
                });
                return;
            }
        };
        self.installs.insert(offer.offer_id.clone(), Install::Busy);
        self.event(Event::InstallAccepted {
            offer_id: offer.offer_id.clone(),
            name: offer.name.clone(),
            version: offer.version,
        });
        match sh.cfg.download {
            Download::None => {
                let t = sh.cfg.install_time;
                if t.is_zero() {
                    self.succeed(&offer, &info);
                } else {
                    let at = Instant::now() + t / 2 + self.rng.below(t);
                    self.finishing.push((at, offer, info));
                }
            }
            mode => {
                let chunks = (mode == Download::Mqtt).then(|| {
                    let (tx, rx) = mpsc::channel(16);
                    self.chunk_route = Some((offer.bundle_id.clone(), tx));
                    rx
                });
                let (sh, client, device, inbox) =
                    (sh.clone(), self.client.clone(), self.id.clone(), self.inbox.clone());
                tokio::spawn(async move {
                    let result = crate::download::run(sh, client, device, offer.clone(), chunks).await;
                    let _ = inbox.send(Downloaded { offer, info, result });
                });
            }
        }
    }

    fn on_downloaded(&mut self, d: Downloaded) {
        if self.chunk_route.as_ref().is_some_and(|(b, _)| *b == d.offer.bundle_id) {
            self.chunk_route = None;
        }
        match d.result {
            Ok(_) => self.succeed(&d.offer, &d.info),
            Err(e) => {
                let sh = self.sh.clone();
                sh.error(&format!("download: {e:#}"));
                add(&sh.stats.installs_failed, 1);
                // A new offer (the server repeats unanswered ones) may try again.
                self.installs.remove(&d.offer.offer_id);
                self.event(Event::InstallFailed {
                    offer_id: d.offer.offer_id,
                    name: d.offer.name,
                    version: d.offer.version,
                    stage: flotilla_proto::InstallStage::Downloading,
                    reason: format!("{e:#}"),
                });
            }
        }
    }

    /// The install is done: the new version is active, reported, and in the retained state.
    fn succeed(&mut self, offer: &InstallOffer, info: &BundleInfo) {
        let sh = self.sh.clone();
        let new = Model {
            name: offer.name.clone(),
            version: offer.version,
            manifest_sha256: info.manifest_sha256.clone(),
            model_sha256: info.model_sha256.clone(),
            since: Instant::now(),
            prev: None,
        };
        match self.models.iter_mut().find(|m| m.name == offer.name) {
            Some(m) if m.version == offer.version => {}
            Some(m) => {
                let old = std::mem::replace(m, new);
                m.prev = Some(Box::new(Model { prev: None, ..old }));
            }
            None => self.models.push(new),
        }
        self.installs.insert(offer.offer_id.clone(), Install::Succeeded);
        sh.on_install_succeeded();
        let backend = sh.cfg.backend.clone();
        self.event(Event::InstallSucceeded {
            offer_id: offer.offer_id.clone(),
            name: offer.name.clone(),
            version: offer.version,
            backend,
            self_test_ms: 3,
        });
        self.publish_state();
        if sh.cfg.drift_fetch {
            sh.profiles.ensure(&sh, &offer.name, offer.version, offer.url.as_deref(), info);
        }
    }

    fn on_rollback(&mut self, cmd: flotilla_proto::RollbackCommand) {
        let sh = self.sh.clone();
        let Some(m) = self.models.iter_mut().find(|m| m.name == cmd.model && m.version == cmd.from_version) else {
            add(&sh.stats.other_commands, 1);
            return;
        };
        let Some(prev) = m.prev.take() else {
            add(&sh.stats.other_commands, 1);
            return;
        };
        let to_version = prev.version;
        *m = Model { since: Instant::now(), ..*prev };
        add(&sh.stats.rollbacks, 1);
        self.event(Event::ModelRolledBack {
            name: cmd.model,
            from_version: cmd.from_version,
            to_version,
            reason: format!("control plane: {}", cmd.reason),
        });
        self.publish_state();
    }

    /// A clean stop, as the agent's: the retained state says offline with the models it holds
    /// (the will is not sent on a clean disconnect), then DISCONNECT, flushed before the
    /// connection is dropped.
    async fn goodbye(&mut self, eventloop: &mut EventLoop) {
        if !self.connected {
            return;
        }
        self.publish_state_online(false);
        let _ = self.client.try_disconnect();
        let flush = async {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
        self.connected = false;
        self.sh.stats.connected.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
