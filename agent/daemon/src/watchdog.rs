//! The bake watchdog. After activation a model is watched for its bundle's bake period
//! (`health.bake_secs`, default [`DEFAULT_BAKE_SECS`]): when its inference error rate or p95
//! latency crosses the bundle's thresholds over enough runs, the agent rolls back to the previous
//! version by itself (verified and self-tested again), durably, and reports it. A model that
//! bakes without trouble is marked baked, and blobs no longer needed (anything but the active
//! and previous versions) are pruned.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::Event;
use tokio_util::sync::CancellationToken;

use crate::models::ActiveModel;
use crate::{Ctx, outbox, unix_now};

/// Bake period when the bundle does not say.
pub const DEFAULT_BAKE_SECS: u64 = 600;

pub async fn run(ctx: Arc<Ctx>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for m in ctx.registry.all() {
            if ctx.with_state(|s| s.is_baked(&m.name)).unwrap_or(true) {
                continue;
            }
            let verdict = m.watch.lock().expect("watch lock").verdict(&m.manifest.health);
            if let Some(reason) = verdict {
                roll_back(&ctx, &m, reason).await;
                continue;
            }
            let bake = Duration::from_secs(m.manifest.health.bake_secs.unwrap_or(DEFAULT_BAKE_SECS));
            if m.since.elapsed() >= bake {
                // Pruning must not race an install, which imports blobs before it refers to them.
                let Ok(_one) = ctx.install_lock.try_lock() else { continue };
                match finish_bake(&ctx, &m) {
                    // The control plane sees `baking` turn `active`.
                    Ok(()) => ctx.publish_state().await,
                    Err(e) => tracing::warn!(name = %m.name, error = %format!("{e:#}"), "finishing the bake failed"),
                }
            }
        }
    }
}

fn finish_bake(ctx: &Ctx, m: &ActiveModel) -> anyhow::Result<()> {
    ctx.with_state(|s| s.mark_baked(&m.name, m.version, unix_now()))?;
    let keep = ctx.with_state(|s| s.referenced_blobs())?;
    let removed = ctx.blobs.prune(&keep)?;
    tracing::info!(name = %m.name, version = m.version, pruned_blobs = removed, "model baked");
    Ok(())
}

/// Go back to the previous version of `m` (durably), and report it.
pub(crate) async fn roll_back(ctx: &Arc<Ctx>, m: &ActiveModel, reason: String) {
    let _one = ctx.install_lock.lock().await;
    // An install may have replaced the model while we waited.
    if ctx.registry.get(&m.name).is_none_or(|cur| cur.version != m.version) {
        return;
    }
    let result = async {
        let prev = ctx
            .with_state(|s| s.previous(&m.name))?
            .ok_or_else(|| anyhow::anyhow!("there is no previous version to go back to"))?;
        let ctx2 = ctx.clone();
        let prev_version = prev.version;
        let model = tokio::task::spawn_blocking(move || crate::restore(&ctx2, &prev)).await??;
        ctx.with_state(|s| s.roll_back(&m.name, unix_now()))?;
        ctx.registry.insert(model);
        anyhow::Ok(prev_version)
    }
    .await;
    match result {
        Ok(to_version) => {
            tracing::warn!(name = %m.name, from = m.version, to = to_version, %reason, "watchdog rolled back");
            outbox::push_event(
                ctx,
                Event::ModelRolledBack { name: m.name.clone(), from_version: m.version, to_version, reason },
            );
            ctx.publish_state().await;
        }
        Err(e) => {
            // Keep serving what there is; stop judging it (the reason is in the log).
            tracing::error!(name = %m.name, version = m.version, %reason, error = %format!("{e:#}"), "watchdog cannot roll back");
            let _ = ctx.with_state(|s| s.mark_baked(&m.name, m.version, unix_now()));
        }
    }
}
