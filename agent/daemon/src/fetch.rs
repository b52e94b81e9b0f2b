//! Fetching the bytes of a bundle that an install needs, over HTTP `Range` or MQTT chunks, into
//! one staging file that either transport resumes from.
//!
//! A device rarely needs the whole file: artifacts whose content it already holds are skipped,
//! and of a delta artifact it fetches either the patch (it holds the base) or the full form.
//! The [`Plan`] lists the byte ranges of the bundle file to fetch; they are appended one after
//! another to the staging file, so "how much is done" is always the staging file's length.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_proto::{Channel, Chunk, Event, FetchRequest, InstallOffer};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::Ctx;

/// Chunk requests kept in flight.
const WINDOW: u64 = 4;
/// With no chunk arriving for this long, the missing ones are asked for again.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

/// The ranges of a bundle file to fetch, sorted and coalesced, and the file's size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// (offset in the bundle file, length), ascending, neither touching nor overlapping.
    segments: Vec<(u64, u64)>,
    file_size: u64,
}

impl Plan {
    /// Ranges may arrive in any order and touch each other; empty ranges are dropped.
    /// Every range must lie within the file.
    pub fn new(mut ranges: Vec<(u64, u64)>, file_size: u64) -> anyhow::Result<Plan> {
        ranges.retain(|&(_, len)| len > 0);
        ranges.sort_unstable();
        let mut segments: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            let end = start.checked_add(len).filter(|&e| e <= file_size);
            anyhow::ensure!(end.is_some(), "range {start}+{len} lies outside the {file_size}-byte bundle");
            match segments.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
                _ => segments.push((start, len)),
            }
        }
        Ok(Plan { segments, file_size })
    }

    /// Bytes to fetch in all.
    pub fn total(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// The plan is the whole file (then the file's digest, the bundle id, can be checked too).
    pub fn is_whole(&self) -> bool {
        self.segments == [(0, self.file_size)]
    }

    /// For staging position `pos` (< total): the bundle-file offset and the bytes left in its segment.
    pub fn at(&self, mut pos: u64) -> (u64, u64) {
        for &(start, len) in &self.segments {
            if pos < len {
                return (start + pos, len - pos);
            }
            pos -= len;
        }
        (self.file_size, 0)
    }

    /// The staging position of bundle-file offset `offset`, if the plan fetches it.
    pub fn staged_pos(&self, offset: u64) -> Option<u64> {
        let mut pos = 0;
        for &(start, len) in &self.segments {
            if offset >= start && offset < start + len {
                return Some(pos + offset - start);
            }
            pos += len;
        }
        None
    }

    /// Name of the staging file: a different plan for the same bundle must not resume this one.
    pub fn staging_name(&self, bundle_id: &str) -> String {
        if self.is_whole() {
            return format!("{bundle_id}.part");
        }
        let mut h = Sha256::new();
        for (s, l) in &self.segments {
            h.update(s.to_le_bytes());
            h.update(l.to_le_bytes());
        }
        format!("{bundle_id}.{}.part", &hex::encode(h.finalize())[..16])
    }
}

/// Report download progress each time another tenth of the plan arrived, and at the end.
/// Both transports report through here, so the control plane sees one cadence.
async fn report_progress(ctx: &Ctx, offer: &InstallOffer, have: u64, total: u64, last: &mut u64) {
    let tenth = |n: u64| n * 10 / total.max(1);
    if tenth(have) > tenth(*last) || (have == total && *last != have) {
        *last = have;
        ctx.publish_event(Event::InstallProgress { offer_id: offer.offer_id.clone(), received: have, total }).await;
    }
}

/// Open the staging file for appending; a file longer than the plan is garbage and starts over.
pub fn open_part(part: &Path, total: u64) -> anyhow::Result<(std::fs::File, u64)> {
    std::fs::create_dir_all(part.parent().expect("staging dir"))?;
    let file = std::fs::OpenOptions::new().create(true).append(true).open(part)?;
    let mut have = file.metadata()?.len();
    if have > total {
        file.set_len(0)?;
        have = 0;
    }
    Ok((file, have))
}

/// Fetch the plan over HTTP in chunk-sized `Range` requests on one keep-alive connection,
/// resuming from the bytes already in `part`. Requests are chunk-sized so that a cut (or a
/// crash) loses at most one chunk in flight. A failed request is retried while requests keep
/// making progress; after a few failures in a row the caller falls back to MQTT.
pub async fn over_http(
    ctx: &Arc<Ctx>,
    offer: &InstallOffer,
    plan: &Plan,
    url: &str,
    part: &Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(url.starts_with("http://") || url.starts_with("https://"), "unsupported URL scheme in {url:?}");
    let total = plan.total();
    let (mut file, mut have) = open_part(part, total)?;
    let client = ctx.tls.http_client(CHUNK_TIMEOUT)?;
    let mut last_progress = have;
    let mut failures = 0u32;
    while have < total {
        let before = have;
        match http_range(ctx, offer, &client, url, plan, &mut file, &mut have, &mut last_progress).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = if have > before { 1 } else { failures + 1 };
                if failures >= HTTP_ATTEMPTS {
                    return Err(e);
                }
                tracing::debug!(error = %format!("{e:#}"), have, "HTTP range failed; retrying");
                tokio::time::sleep(Duration::from_millis(200) * failures).await;
            }
        }
    }
    file.sync_all()?;
    Ok(())
}

/// Consecutive HTTP requests that may fail without progress before giving up on HTTP.
const HTTP_ATTEMPTS: u32 = 3;

/// One request: the next chunk of the plan, appended to `file`.
#[allow(clippy::too_many_arguments)]
async fn http_range(
    ctx: &Ctx,
    offer: &InstallOffer,
    client: &reqwest::Client,
    url: &str,
    plan: &Plan,
    file: &mut std::fs::File,
    have: &mut u64,
    last_progress: &mut u64,
) -> anyhow::Result<()> {
    let total = plan.total();
    let (start, left) = plan.at(*have);
    let len = left.min(offer.chunk_size as u64);
    let mut resp =
        client.get(url).header(reqwest::header::RANGE, format!("bytes={start}-{}", start + len - 1)).send().await?;
    let end = match resp.status().as_u16() {
        206 => {
            let first = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            anyhow::ensure!(first == Some(start), "server answered a range starting at {first:?}, asked for {start}");
            *have + len
        }
        // The server ignores ranges and sends the whole file: usable for a whole-file plan only,
        // from byte 0.
        200 if plan.is_whole() => {
            file.set_len(0)?;
            *have = 0;
            total
        }
        200 => anyhow::bail!("{url} ignores Range requests; this install needs byte ranges"),
        s => anyhow::bail!("HTTP {s} from {url}"),
    };
    while let Some(bytes) = resp.chunk().await? {
        anyhow::ensure!(*have + bytes.len() as u64 <= end, "server sent more than the bytes asked for");
        file.write_all(&bytes)?;
        *have += bytes.len() as u64;
        ctx.received_http.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        report_progress(ctx, offer, *have, total, last_progress).await;
    }
    anyhow::ensure!(*have == end, "response ended at {} of {total} bytes", *have);
    Ok(())
}

/// Fetch the plan in chunks over MQTT into `part`, resuming from its length.
pub async fn over_mqtt(ctx: &Arc<Ctx>, offer: &InstallOffer, plan: &Plan, part: &Path) -> anyhow::Result<()> {
    let total = plan.total();
    let (file, have) = open_part(part, total)?;
    let (tx, mut rx) = mpsc::channel::<(Chunk, rumqttc::Publish)>(64);
    ctx.chunk_routes.lock().expect("routes lock").insert(offer.bundle_id.clone(), tx);
    let _route = RouteGuard { ctx: ctx.clone(), bundle_id: offer.bundle_id.clone() };
    let mut asm = Assembler { plan, size: offer.size, file, have, early: BTreeMap::new() };
    // Chunks the broker redelivered before this install resumed (e.g. after a restart).
    for c in ctx.take_stashed_chunks(&offer.bundle_id) {
        if let Err(e) = asm.accept(c, None) {
            tracing::debug!(error = %format!("{e:#}"), "dropping a stashed chunk");
        }
    }
    let chunk = offer.chunk_size as u64;
    let mut requested_to = asm.have;
    let mut last_progress = 0u64;
    let mut stalls = 0u32;
    while asm.have < total {
        // Keep the window full, skipping what already arrived; a request never crosses a
        // segment's end.
        while requested_to < total && requested_to < asm.have + WINDOW * chunk {
            if let Some((d, _)) = asm.early.get(&requested_to) {
                requested_to += d.len() as u64;
                continue;
            }
            let (offset, left) = plan.at(requested_to);
            let len = chunk.min(left) as u32;
            ctx.publish(Channel::Fetch, FetchRequest { bundle_id: offer.bundle_id.clone(), offset, len }, false).await;
            requested_to += len as u64;
        }
        match tokio::time::timeout(CHUNK_TIMEOUT, rx.recv()).await {
            Ok(Some((c, msg))) => {
                let len = c.data.len() as u64;
                // Acknowledged once staged (or refused): a chunk held out of order stays
                // unacknowledged until it is written, so a crash cannot lose it.
                let acks = match asm.accept(c, Some(msg.clone())) {
                    Ok(acks) => acks,
                    Err(e) => {
                        let _ = ctx.mqtt().ack(&msg).await;
                        return Err(e);
                    }
                };
                for m in acks {
                    let _ = ctx.mqtt().ack(&m).await;
                }
                stalls = 0;
                ctx.received_mqtt.fetch_add(len, Ordering::Relaxed);
                report_progress(ctx, offer, asm.have, total, &mut last_progress).await;
            }
            Ok(None) => anyhow::bail!("agent shutting down"),
            Err(_) => {
                stalls += 1;
                if stalls > 30 {
                    anyhow::bail!(
                        "no chunk for {} s; giving up (a new offer resumes from byte {})",
                        stalls * 10,
                        asm.have
                    );
                }
                tracing::debug!(have = asm.have, "chunk timeout; asking again");
                requested_to = asm.have;
                for (_, (_, m)) in std::mem::take(&mut asm.early) {
                    if let Some(m) = m {
                        let _ = ctx.mqtt().ack(&m).await;
                    }
                }
            }
        }
    }
    asm.file.sync_all()?;
    Ok(())
}

/// Puts chunks, which may arrive out of order, into the staging file in order.
struct Assembler<'p> {
    plan: &'p Plan,
    /// The bundle file's size, as offered.
    size: u64,
    file: std::fs::File,
    /// Bytes in the staging file.
    have: u64,
    /// Chunks that arrived ahead of `have`, by staging position, with their unacknowledged message.
    early: BTreeMap<u64, (Vec<u8>, Option<rumqttc::Publish>)>,
}

impl Assembler<'_> {
    /// Take a chunk; returns the messages that may now be acknowledged (their chunks are staged
    /// or were duplicates).
    fn accept(&mut self, c: Chunk, msg: Option<rumqttc::Publish>) -> anyhow::Result<Vec<rumqttc::Publish>> {
        if let Some(err) = c.error {
            anyhow::bail!("server refused the chunk at {}: {err}", c.offset);
        }
        anyhow::ensure!(c.total == self.size, "chunk for a {}-byte bundle, offered {}", c.total, self.size);
        let Some(pos) = self.plan.staged_pos(c.offset) else {
            anyhow::bail!("chunk at {} is outside what was asked for", c.offset);
        };
        anyhow::ensure!(
            c.data.len() as u64 <= self.plan.at(pos).1,
            "chunk at {} runs past the range asked for",
            c.offset
        );
        let mut acks = Vec::new();
        if pos > self.have {
            if let Some((_, Some(old))) = self.early.insert(pos, (c.data, msg)) {
                acks.push(old);
            }
        } else {
            if pos == self.have {
                self.file.write_all(&c.data)?;
                self.have += c.data.len() as u64;
            }
            acks.extend(msg);
        }
        while let Some((data, m)) = self.early.remove(&self.have) {
            self.file.write_all(&data)?;
            self.have += data.len() as u64;
            acks.extend(m);
        }
        let have = self.have;
        let stale: Vec<u64> = self.early.range(..=have).map(|(&p, _)| p).collect();
        for p in stale {
            acks.extend(self.early.remove(&p).and_then(|(_, m)| m));
        }
        Ok(acks)
    }
}

struct RouteGuard {
    ctx: Arc<Ctx>,
    bundle_id: String,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.ctx.chunk_routes.lock().expect("routes lock").remove(&self.bundle_id);
    }
}

/// Bytes free for an unprivileged writer on the file system holding `path`.
pub fn available_bytes(path: &Path) -> anyhow::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_coalesce_and_map_both_ways() {
        let p = Plan::new(vec![(100, 50), (0, 10), (10, 5), (120, 40), (300, 0)], 1000).unwrap();
        assert_eq!(p.segments, [(0, 15), (100, 60)]);
        assert_eq!(p.total(), 75);
        assert!(!p.is_whole());
        assert_eq!(p.at(0), (0, 15));
        assert_eq!(p.at(14), (14, 1));
        assert_eq!(p.at(15), (100, 60));
        assert_eq!(p.at(74), (159, 1));
        assert_eq!(p.staged_pos(100), Some(15));
        assert_eq!(p.staged_pos(159), Some(74));
        assert_eq!(p.staged_pos(15), None);
        assert_eq!(p.staged_pos(160), None);
        for pos in 0..p.total() {
            assert_eq!(p.staged_pos(p.at(pos).0), Some(pos));
        }
        let whole = Plan::new(vec![(0, 600), (600, 400)], 1000).unwrap();
        assert!(whole.is_whole());
        assert_eq!(whole.staging_name("ab"), "ab.part");
        assert_ne!(p.staging_name("ab"), "ab.part");
        assert!(Plan::new(vec![(900, 101)], 1000).is_err());
        assert!(Plan::new(vec![(u64::MAX, 2)], 1000).is_err());
    }
}
