//! Retention: every hour, delete events, drift reports and samples older than the server keeps
//! them ([`crate::config::Retention`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::service::Fleet;
use crate::util::now_s;

pub async fn run(f: Arc<Fleet>, keep: Retention, cancel: CancellationToken) {
    loop {
        if let Err(e) = prune(&f, keep, now_s()).await {
            tracing::warn!(error = %format!("{e:#}"), "retention: pruning failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Delete what is older than `keep` allows at `now`; (events, reports, samples) deleted.
pub async fn prune(f: &Fleet, keep: Retention, now: i64) -> anyhow::Result<(u64, u64, u64)> {
    let before = |secs: u64| (secs > 0).then(|| now - secs as i64);
    let mut n = (0, 0, 0);
    if let Some(t) = before(keep.events_secs) {
        n.0 = f.store.prune_events(t).await?;
    }
    if let Some(t) = before(keep.drift_secs) {
        n.1 = f.store.prune_drift_reports(t).await?;
    }
    if let Some(t) = before(keep.samples_secs) {
        n.2 = f.store.prune_samples(t).await?;
    }
    if n != (0, 0, 0) {
        tracing::info!(events = n.0, drift_reports = n.1, samples = n.2, "retention: deleted old rows");
    }
    Ok(n)
}
