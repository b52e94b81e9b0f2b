//! Store-and-forward telemetry: events and metrics (drift reports) go to an outbox table in SQLite
//! first, and leave it only when the broker acknowledged them (QoS 1 PubAck). They survive
//! restarts and offline periods, drain in order, and keep their original timestamps (the
//! message is encoded when it is queued). The outbox is bounded by payload bytes: beyond it the
//! oldest messages are dropped and counted, and the count is itself reported
//! (`Event::TelemetryDropped`) on the next connection.
//!
//! rumqttc does not say which publish a PubAck belongs to, only its packet id, and it assigns
//! packet ids itself. Every publish of the agent therefore goes through [`Ctx::publish_raw`],
//! which records a tag (the outbox sequence number, or none) in the same order as the requests
//! enter rumqttc's queue; the session loop pairs each `Outgoing::Publish(pkid)` with the next
//! tag, and on `PubAck(pkid)` deletes the tagged row. A publish rumqttc sends again after a
//! reconnect reuses its packet id and is recognised as a repeat. If a row is sent twice (a crash
//! between the acknowledgement and the delete), the server ignores the repeated message id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::{Channel, Event, Telemetry};
use tokio_util::sync::CancellationToken;

use crate::Ctx;

/// Outbox messages sent and not yet acknowledged, at most.
const WINDOW: usize = 16;

/// Pairs packet ids with outbox rows; owned by the session loop.
#[derive(Default)]
pub struct Acks {
    /// Packet ids rumqttc has sent and not yet seen acknowledged, with their outbox row.
    inflight: HashMap<u16, Option<i64>>,
}

impl Acks {
    /// rumqttc sent a publish with this packet id.
    pub fn sent(&mut self, ctx: &Ctx, pkid: u16) {
        if pkid == 0 || self.inflight.contains_key(&pkid) {
            return; // QoS 0, or a retransmission after a reconnect
        }
        let tag = ctx.tags.lock().expect("tags lock").pop_front().flatten();
        self.inflight.insert(pkid, tag);
    }

    /// The broker acknowledged this packet id.
    pub fn acked(&mut self, ctx: &Ctx, pkid: u16) {
        if let Some(Some(seq)) = self.inflight.remove(&pkid) {
            if let Err(e) = ctx.with_state(|s| s.outbox_remove(seq)) {
                tracing::warn!(error = %format!("{e:#}"), seq, "cannot remove an acknowledged outbox row");
            }
            ctx.outbox_inflight.lock().expect("inflight lock").remove(&seq);
            ctx.outbox_wake.notify_one();
        }
    }
}

/// Queue an event for the control plane.
pub fn push_event(ctx: &Ctx, ev: Event) {
    push(ctx, Channel::Events, ev)
}

/// Queue telemetry (drift reports) for the control plane.
pub fn push_telemetry(ctx: &Ctx, t: Telemetry) {
    push(ctx, Channel::Metrics, t)
}

fn push<T: serde::Serialize>(ctx: &Ctx, ch: Channel, body: T) {
    let payload = flotilla_proto::encode(&flotilla_proto::Msg::new(crate::new_id(), crate::unix_now_ms(), body));
    let max = ctx.cfg.outbox_max_bytes;
    match ctx.with_state(|s| s.outbox_push(ch.as_str(), &payload, max)) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(dropped = n, "outbox full: dropped the oldest messages"),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), channel = ch.as_str(), "cannot queue a message; it is lost")
        }
    }
    ctx.outbox_wake.notify_one();
}

/// On every connection: report drops not reported yet.
pub fn report_drops(ctx: &Ctx) {
    let counts = ctx.with_state(|s| {
        let (_, _, dropped) = s.outbox_stats()?;
        let reported: u64 = s.get("outbox_dropped_reported")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        if dropped > reported {
            s.set("outbox_dropped_reported", &dropped.to_string())?;
        }
        Ok((dropped, reported))
    });
    if let Ok((dropped, reported)) = counts
        && dropped > reported
    {
        push_event(ctx, Event::TelemetryDropped { total: dropped });
    }
}

/// Send queued messages while connected, oldest first, keeping [`WINDOW`] in flight.
pub async fn drain(ctx: Arc<Ctx>, cancel: CancellationToken) {
    // Rows up to here were handed to rumqttc by this process (which resends them itself after a
    // reconnect). A restart starts from 0: whatever is still queued goes again.
    let mut cursor = 0i64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.outbox_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        while ctx.connected.load(std::sync::atomic::Ordering::Relaxed) {
            let room = WINDOW.saturating_sub(ctx.outbox_inflight.lock().expect("inflight lock").len());
            if room == 0 {
                break;
            }
            let rows = match ctx.with_state(|s| s.outbox_after(cursor, room as u32)) {
                Ok(r) if !r.is_empty() => r,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the outbox");
                    break;
                }
            };
            for row in rows {
                let Some(ch) = Channel::parse(&row.channel) else {
                    let _ = ctx.with_state(|s| s.outbox_remove(row.seq));
                    continue;
                };
                ctx.outbox_inflight.lock().expect("inflight lock").insert(row.seq);
                cursor = row.seq;
                ctx.publish_raw(ch, row.payload, false, Some(row.seq)).await;
            }
        }
    }
}
