//! Certificate renewal over the mutual-TLS session: before the certificate's end the agent
//! makes a new key, publishes a CSR on its `csr` channel (the broker knows it is this device by
//! the certificate it connected with), and the control plane answers with a `Certificate`
//! command. The new pair replaces the old on disk in one rename, then the session reconnects
//! with it. A device offline past its certificate's end reports `certificate_expired` and, if it
//! was given a (new) claim token, claims a certificate again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flotilla_pki::Identity;
use flotilla_proto::{CertificateIssued, CertificateRequest, Channel, Event};

use crate::Ctx;

/// How often the agent looks at its certificate's end (besides once at each connection).
const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// The periodic check, in a task of its own (never raced against the MQTT event loop's poll).
pub async fn run(ctx: Arc<Ctx>, cancel: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        if ctx.connected.load(Ordering::Relaxed) {
            maybe_renew(&ctx).await;
        }
    }
}

/// Ask for a new certificate if the current one is due (at most one request outstanding per
/// key; a request lost with the connection is made again at the next check with the same key).
pub async fn maybe_renew(ctx: &Ctx) {
    if !ctx.cfg.broker.tls {
        return;
    }
    let Some(info) = ctx.tls.certificate() else { return };
    let now = ctx.trusted_now().unwrap_or_else(|_| crate::unix_now());
    if !crate::tls::due(&info, now, ctx.cfg.cert_renew_before_secs) {
        return;
    }
    let key = {
        let mut k = ctx.renewal_key.lock().expect("renewal lock");
        if k.is_none() {
            match flotilla_pki::new_key() {
                Ok(key) => *k = Some(key),
                Err(e) => return tracing::error!(error = %e, "cannot make a key for the renewal"),
            }
        }
        k.clone().expect("set above")
    };
    match flotilla_pki::csr(&ctx.cfg.device_id, &key) {
        Ok(csr) => {
            tracing::info!(not_after = info.not_after, "asking the control plane to renew the device certificate");
            ctx.publish(Channel::Csr, CertificateRequest { csr }, false).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot make the renewal request"),
    }
}

/// The control plane's answer: keep it if it is this device's and goes with the pending key.
pub fn accept(ctx: &Arc<Ctx>, c: CertificateIssued) {
    let key = ctx.renewal_key.lock().expect("renewal lock").clone();
    let Some(key_pem) = key else {
        return tracing::warn!("ignoring a certificate this device did not ask for");
    };
    match ctx.tls.replace(Identity { cert_pem: c.certificate, key_pem }, &ctx.cfg.device_id) {
        Ok(info) => {
            ctx.renewal_key.lock().expect("renewal lock").take();
            tracing::info!(serial = %info.serial, not_after = info.not_after, "device certificate renewed");
            crate::outbox::push_event(
                ctx,
                Event::CertificateRenewed { serial: info.serial, not_after: info.not_after, how: "renewal".into() },
            );
            ctx.reconnect.notify_one();
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "refused the renewed certificate");
            crate::outbox::push_event(ctx, Event::CertificateRefused { reason: format!("{e:#}") });
        }
    }
}

static EXPIRY_REPORTED: AtomicBool = AtomicBool::new(false);

/// After a connection error: if the certificate has ended, say so (once per run; the event
/// reaches the control plane once the device is back) and, with a claim token, claim anew.
pub fn check_expired(ctx: &Arc<Ctx>) {
    if !ctx.cfg.broker.tls {
        return;
    }
    let Some(info) = ctx.tls.certificate() else { return };
    let now = ctx.trusted_now().unwrap_or_else(|_| crate::unix_now());
    if info.not_after > now as i64 {
        return;
    }
    if !EXPIRY_REPORTED.swap(true, Ordering::Relaxed) {
        tracing::error!(
            serial = %info.serial,
            not_after = info.not_after,
            "the device certificate has ended and the broker refuses it: give this device a claim token (claim_token, claim_url) or flash a new certificate"
        );
        crate::outbox::push_event(ctx, Event::CertificateExpired { serial: info.serial, not_after: info.not_after });
        if let Some((url, token)) = ctx.cfg.claim.clone() {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                match crate::tls::claim(&ctx.tls, &ctx.cfg.device_id, &url, &token).await {
                    Ok(info) => {
                        tracing::info!(serial = %info.serial, "claimed a new device certificate");
                        crate::outbox::push_event(
                            &ctx,
                            Event::CertificateRenewed {
                                serial: info.serial,
                                not_after: info.not_after,
                                how: "claim".into(),
                            },
                        );
                        EXPIRY_REPORTED.store(false, Ordering::Relaxed);
                        ctx.reconnect.notify_one();
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "claiming a new certificate failed"),
                }
            });
        }
    }
}
