//! The MQTT session: persistent (`clean_session=false`), resubscribes on every ConnAck, says
//! hello and publishes retained state on every connect, backs off with jitter on errors, and
//! leaves a retained "offline" last will.
//!
//! The event loop is polled without pause in its own task (rumqttc stops sending when it is
//! not polled); handlers run in their own tasks and never block it.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Chunk, Command, Topics};
use std::sync::atomic::Ordering;

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};

use tokio_util::sync::CancellationToken;

use crate::{AgentConfig, Ctx, installer};

pub fn client(cfg: &AgentConfig, topics: &Topics) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(cfg.device_id.clone(), cfg.broker.host.clone(), cfg.broker.port);
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(30));
    // Chunks are about 256 KiB; the default 10 KiB limit would drop them.
    let max = flotilla_proto::MAX_PAYLOAD + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(32);
    // A chunk is acknowledged only once it is in the staging file (or held for an install about
    // to resume): a crash before that leaves it unacknowledged, and the broker redelivers it
    // from the persistent session instead of the server sending it again.
    opts.set_manual_acks(true);
    // The username is always the device id: the broker's ACL keys on it.
    opts.set_credentials(cfg.device_id.clone(), cfg.password.clone().unwrap_or_default());
    let will = flotilla_proto::encode(&flotilla_proto::Msg::new(
        "will",
        0,
        flotilla_proto::State { online: false, models: None },
    ));
    opts.set_last_will(LastWill::new(topics.device(&cfg.device_id, Channel::State), will, QoS::AtLeastOnce, true));
    AsyncClient::new(opts, 256)
}

/// Backoff before reconnect attempt `n`: 200 ms doubling to 30 s, times a jitter in [0.5, 1.5).
pub fn backoff(attempt: u32, jitter_seed: u64) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(8)).min(30_000);
    let jitter = 0.5 + (jitter_seed % 1000) as f64 / 1000.0;
    Duration::from_millis((base as f64 * jitter) as u64)
}

/// The TLS transport with the device's current certificate.
fn tls_transport(ctx: &Ctx) -> anyhow::Result<Transport> {
    let config = ctx.tls.client_config(true)?;
    Ok(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))))
}

/// Before the first connection over TLS: a certificate, claimed with the token if there is none
/// (retried with backoff while the control plane cannot be reached). False when cancelled.
async fn ensure_identity(ctx: &Ctx, cancel: &CancellationToken) -> bool {
    let mut attempt = 0u32;
    while ctx.tls.identity().is_none() {
        let Some((url, token)) = &ctx.cfg.claim else { return true };
        match crate::tls::claim(&ctx.tls, &ctx.cfg.device_id, url, token).await {
            Ok(info) => {
                tracing::info!(serial = %info.serial, not_after = info.not_after, "claimed a device certificate");
                crate::outbox::push_event(
                    ctx,
                    flotilla_proto::Event::CertificateRenewed {
                        serial: info.serial,
                        not_after: info.not_after,
                        how: "claim".into(),
                    },
                );
            }
            Err(e) => {
                let wait = backoff(attempt + 3, rand_u64());
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "cannot claim a device certificate");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    true
}

pub async fn run(ctx: Arc<Ctx>, mut eventloop: EventLoop, cancel: CancellationToken) {
    let mut attempt = 0u32;
    let mut acks = crate::outbox::Acks::default();
    if ctx.cfg.broker.tls {
        if !ensure_identity(&ctx, &cancel).await {
            return;
        }
        match tls_transport(&ctx) {
            Ok(t) => {
                eventloop.mqtt_options.set_transport(t);
            }
            Err(e) => return tracing::error!(error = %format!("{e:#}"), "cannot set up TLS to the broker"),
        }
    }
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            // Nothing else races `poll`: a poll dropped while it connects drops the connection.
            // This one means to (the old certificate's connection goes).
            _ = ctx.reconnect.notified() => {
                // A renewed certificate: reconnect with it (the session stays with the broker).
                match tls_transport(&ctx) {
                    Ok(t) => {
                        eventloop.mqtt_options.set_transport(t);
                        eventloop.network = None;
                        tracing::info!("reconnecting with the renewed certificate");
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "the renewed certificate is unusable"),
                }
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(session_present = ack.session_present, "connected to broker");
                attempt = 0;
                ctx.connected.store(true, Ordering::Relaxed);
                tokio::spawn(on_connect(ctx.clone()));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => dispatch(&ctx, p),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => acks.sent(&ctx, pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => acks.acked(&ctx, ack.pkid),
            Ok(_) => {}
            Err(e) => {
                ctx.connected.store(false, Ordering::Relaxed);
                crate::renewal::check_expired(&ctx);
                let wait = backoff(attempt, rand_u64());
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection error");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn on_connect(ctx: Arc<Ctx>) {
    let id = &ctx.cfg.device_id;
    for ch in [Channel::Cmd, Channel::Chunk] {
        if let Err(e) = ctx.mqtt.subscribe(ctx.topics.device(id, ch), QoS::AtLeastOnce).await {
            tracing::warn!(error = %e, "subscribe failed");
        }
    }
    ctx.publish(Channel::Hello, ctx.hello(), false).await;
    ctx.publish_state().await;
    crate::outbox::report_drops(&ctx);
    ctx.outbox_wake.notify_one();
    crate::renewal::maybe_renew(&ctx).await;
}

fn dispatch(ctx: &Arc<Ctx>, p: rumqttc::Publish) {
    let ack = |ctx: &Ctx, p: &rumqttc::Publish| {
        if let Err(e) = ctx.mqtt.try_ack(p) {
            tracing::warn!(error = %e, "could not acknowledge a message");
        }
    };
    let payload = &p.payload[..];
    let Some((device, ch)) = ctx.topics.parse(&p.topic) else { return ack(ctx, &p) };
    if device != ctx.cfg.device_id {
        return ack(ctx, &p);
    }
    match ch {
        Channel::Cmd => match flotilla_proto::decode::<Command>(payload) {
            Ok(msg) => match msg.body {
                Command::Install(offer) => {
                    // Ends with the agent; a half-fetched bundle stays staged for the next start.
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = ctx.cancel.cancelled() => {}
                            _ = installer::handle_offer(ctx.clone(), offer) => {}
                        }
                    });
                }
                Command::UploadSamples(req) => crate::drift::upload_samples(ctx, &req),
                Command::Rollback(cmd) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        match ctx.registry.get(&cmd.model) {
                            Some(m) if m.version == cmd.from_version => {
                                crate::watchdog::roll_back(&ctx, &m, format!("control plane: {}", cmd.reason)).await
                            }
                            _ => {
                                tracing::info!(model = %cmd.model, version = cmd.from_version, "rollback for a version not active here: nothing to do")
                            }
                        }
                    });
                }
                Command::Certificate(c) => crate::renewal::accept(ctx, c),
                Command::TrustRoots(t) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        crate::accept_roots(&ctx, t.roots.into_iter().map(|b| b.into_vec()).collect()).await;
                        // Say hello again so the control plane learns the new root version.
                        ctx.publish(Channel::Hello, ctx.hello(), false).await;
                    });
                }
            },
            Err(e) => tracing::warn!(error = %e, "ignoring malformed command"),
        },
        Channel::Chunk => match flotilla_proto::decode::<Chunk>(payload) {
            Ok(msg) => {
                let route = ctx.chunk_routes.lock().expect("routes lock").get(&msg.body.bundle_id).cloned();
                match route {
                    // The installer acknowledges it once it is staged.
                    Some(tx) => {
                        if let Err(e) = tx.try_send((msg.body, p)) {
                            // A full route drops the chunk; the installer asks again on timeout.
                            ack(ctx, &e.into_inner().1);
                        }
                    }
                    // No install is fetching it (yet): after a restart the broker redelivers the
                    // session's chunks before the install resumes. Keep a few for it.
                    None => {
                        ctx.stash_chunk(msg.body);
                        ack(ctx, &p);
                    }
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "ignoring malformed chunk"),
        },
        _ => {}
    }
    ack(ctx, &p);
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0, 500), Duration::from_millis(200));
        assert_eq!(backoff(3, 500), Duration::from_millis(1600));
        assert_eq!(backoff(30, 500), Duration::from_millis(30_000));
        assert!(backoff(30, 999) < Duration::from_millis(45_000));
        assert!(backoff(30, 0) >= Duration::from_millis(15_000));
    }
}
