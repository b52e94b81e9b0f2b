//! Really downloading an offered bundle, as the agent does (`agent/daemon/src/fetch.rs`), without
//! keeping it: chunk-sized HTTP `Range` requests on the offer's URL, or MQTT fetch requests
//! answered on the device's chunk topic (a window of 4 in flight, asked again after 10 s of
//! silence). Bytes are counted and hashed in order; the total must be the offer's size and the
//! SHA-256 the bundle id. Progress events go out each tenth, like the agent's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use flotilla_proto::{Channel, Chunk, Event, FetchRequest, InstallOffer, Msg};
use rumqttc::{AsyncClient, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::Shared;

const WINDOW: u64 = 4;
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeouts in a row before an MQTT download gives up.
const MAX_STALLS: u32 = 6;
/// HTTP requests in a row that may fail without progress.
const HTTP_ATTEMPTS: u32 = 3;

/// Publishes for one device from a task other than its event loop.
pub(crate) struct Publisher<'a> {
    pub sh: &'a Shared,
    pub client: &'a AsyncClient,
    pub device: &'a str,
}

impl Publisher<'_> {
    async fn send<T: serde::Serialize>(&self, ch: Channel, body: T) {
        let payload = flotilla_proto::encode(&Msg::new(crate::new_id(), crate::unix_now_ms(), body));
        let topic = self.sh.topics.device(self.device, ch);
        match self.client.publish(topic, QoS::AtLeastOnce, false, payload).await {
            Ok(()) => crate::add(
                match ch {
                    Channel::Fetch => &self.sh.stats.sent_fetch,
                    _ => &self.sh.stats.sent_events,
                },
                1,
            ),
            Err(e) => self.sh.error(&format!("publish on {}: {e}", ch.as_str())),
        }
    }

    async fn progress(&self, offer: &InstallOffer, have: u64, last: &mut u64) {
        let total = offer.size.max(1);
        let tenth = |n: u64| n * 10 / total;
        if tenth(have) > tenth(*last) || (have == offer.size && *last != have) {
            *last = have;
            self.send(
                Channel::Events,
                Event::InstallProgress { offer_id: offer.offer_id.clone(), received: have, total: offer.size },
            )
            .await;
        }
    }
}

/// Checks what arrived against the offer.
struct Digest256 {
    hasher: Sha256,
    have: u64,
}

impl Digest256 {
    fn new() -> Self {
        Digest256 { hasher: Sha256::new(), have: 0 }
    }

    fn push(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.have += b.len() as u64;
    }

    fn finish(self, offer: &InstallOffer) -> anyhow::Result<u64> {
        anyhow::ensure!(self.have == offer.size, "received {} bytes of a {}-byte bundle", self.have, offer.size);
        let got = hex::encode(self.hasher.finalize());
        anyhow::ensure!(got == offer.bundle_id, "the bundle's SHA-256 is {got}, the offer names {}", offer.bundle_id);
        Ok(self.have)
    }
}

/// The whole bundle over HTTP, in `chunk_size` Range requests. Returns the bytes received.
pub(crate) async fn over_http(p: &Publisher<'_>, offer: &InstallOffer) -> anyhow::Result<u64> {
    let url = offer.url.as_deref().context("the offer has no URL (the server serves MQTT chunks only)")?;
    let http = p.sh.http.as_ref().context("no HTTP client")?;
    let chunk = (offer.chunk_size as u64).max(1024);
    let mut d = Digest256::new();
    let mut last = 0u64;
    let mut failures = 0u32;
    while d.have < offer.size {
        let before = d.have;
        let start = d.have;
        let end = (start + chunk).min(offer.size) - 1;
        let attempt = async {
            let mut r = http.get(url).header(reqwest::header::RANGE, format!("bytes={start}-{end}")).send().await?;
            match r.status().as_u16() {
                206 => {
                    let cr = r
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .map(str::to_string)
                        .context("206 without Content-Range")?;
                    let (range, total) = cr.split_once('/').context("Content-Range without a total")?;
                    anyhow::ensure!(
                        total.parse::<u64>().ok() == Some(offer.size),
                        "the server's bundle is {total} bytes, the offer says {}",
                        offer.size
                    );
                    let first = range.split('-').next().and_then(|v| v.parse::<u64>().ok());
                    anyhow::ensure!(first == Some(start), "answered a range at {first:?}, asked for {start}");
                }
                200 if start == 0 => {}
                s => anyhow::bail!("HTTP {s} from the bundle URL"),
            }
            while let Some(b) = r.chunk().await? {
                anyhow::ensure!(d.have + b.len() as u64 <= offer.size, "the server sent more than the bundle");
                d.push(&b);
                p.sh.stats.bytes_http.fetch_add(b.len() as u64, Ordering::Relaxed);
                p.progress(offer, d.have, &mut last).await;
            }
            anyhow::Ok(())
        }
        .await;
        match attempt {
            Ok(()) if d.have > end || d.have == offer.size => failures = 0,
            Ok(()) => anyhow::bail!("the response ended at byte {} (asked up to {end})", d.have),
            Err(e) => {
                // A cut response leaves bytes hashed; start over from them (a partial range is fine).
                failures = if d.have > before { 1 } else { failures + 1 };
                if failures >= HTTP_ATTEMPTS {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(200) * failures).await;
            }
        }
    }
    d.finish(offer)
}

/// The whole bundle in MQTT chunks; `rx` receives the device's chunks for this bundle.
pub(crate) async fn over_mqtt(
    p: &Publisher<'_>,
    offer: &InstallOffer,
    rx: &mut mpsc::Receiver<Chunk>,
) -> anyhow::Result<u64> {
    let chunk = (offer.chunk_size as u64).max(1024);
    let total = offer.size;
    let mut d = Digest256::new();
    let mut early: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut requested_to = 0u64;
    let mut last = 0u64;
    let mut stalls = 0u32;
    while d.have < total {
        while requested_to < total && requested_to < d.have + WINDOW * chunk {
            let len = chunk.min(total - requested_to) as u32;
            let req = FetchRequest { bundle_id: offer.bundle_id.clone(), offset: requested_to, len };
            p.send(Channel::Fetch, req).await;
            requested_to += len as u64;
        }
        match tokio::time::timeout(CHUNK_TIMEOUT, rx.recv()).await {
            Ok(Some(c)) => {
                if let Some(e) = c.error {
                    anyhow::bail!("the server refused the chunk at {}: {e}", c.offset);
                }
                anyhow::ensure!(c.total == total, "chunk of a {}-byte bundle, offered {total}", c.total);
                anyhow::ensure!(c.offset + c.data.len() as u64 <= total, "chunk past the end");
                p.sh.stats.bytes_mqtt.fetch_add(c.data.len() as u64, Ordering::Relaxed);
                stalls = 0;
                if c.offset > d.have {
                    early.insert(c.offset, c.data);
                } else if c.offset == d.have {
                    d.push(&c.data);
                }
                while let Some(data) = early.remove(&d.have) {
                    d.push(&data);
                }
                let have = d.have;
                early.retain(|&o, _| o > have);
                p.progress(offer, d.have, &mut last).await;
            }
            Ok(None) => anyhow::bail!("device stopped"),
            Err(_) => {
                stalls += 1;
                if stalls >= MAX_STALLS {
                    anyhow::bail!("no chunk for {} s", stalls as u64 * CHUNK_TIMEOUT.as_secs());
                }
                requested_to = d.have;
                early.clear();
            }
        }
    }
    d.finish(offer)
}

/// Run one download for a device and hand the result back to its loop.
pub(crate) async fn run(
    sh: Arc<Shared>,
    client: AsyncClient,
    device: String,
    offer: InstallOffer,
    chunks: Option<mpsc::Receiver<Chunk>>,
) -> anyhow::Result<u64> {
    let _slot = sh.download_gate.clone().acquire_owned().await?;
    let p = Publisher { sh: &sh, client: &client, device: &device };
    match chunks {
        Some(mut rx) => over_mqtt(&p, &offer, &mut rx).await,
        None => over_http(&p, &offer).await,
    }
}
