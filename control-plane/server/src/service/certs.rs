//! Device identity: certificates from the fleet CA (issued here, signed for a device's CSR, or
//! recorded from an image tool's certs.csv), single-use claim tokens for first boot, renewal over
//! the device's session, and revocation.

use sha2::{Digest, Sha256};

use super::{Error, Fleet, Kind, Result};
use crate::pki::{Pki, issuable};
use crate::store::{ClaimTokenRow, DeviceCertRow, Store};
use crate::util::{new_id, now_s, rfc3339};

const MAX_CLAIM_TTL: u64 = 30 * 86_400;

fn pki(f: &Fleet) -> Result<&Pki> {
    f.pki.as_ref().ok_or_else(|| {
        Error::conflict(
            "no_tls",
            "this server runs with --insecure-plaintext: it has no fleet CA and issues no certificates",
        )
    })
}

fn check(id: &str) -> Result<()> {
    issuable(id).map_err(|e| {
        Error::invalid("bad_device_id", format!("{e:#}")).hint(if flotilla_proto::reserved_id(id) {
            "device ids may not begin with `flotilla-server`"
        } else {
            "1-64 letters, digits, `.`, `_` or `-`"
        })
    })
}

fn bad_csr(e: anyhow::Error) -> Error {
    Error::invalid("bad_csr", format!("{e:#}"))
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Put a device certificate in the registry (what revocation by serial works on).
pub async fn record(store: &dyn Store, cert_pem: &str, how: &str) -> anyhow::Result<DeviceCertRow> {
    use anyhow::Context;
    let info = flotilla_pki::parse_cert(cert_pem)?;
    let device = info.common_name.clone().context("the certificate names no device")?;
    let row = DeviceCertRow {
        serial: info.serial.clone(),
        device_id: device,
        sha256: info.sha256.clone(),
        not_after: info.not_after,
        issued: now_s(),
        how: how.into(),
        revoked: None,
    };
    store.add_device_cert(&row).await?;
    Ok(row)
}

/// Issue a device certificate with a key made here, and record it.
pub async fn issue_recorded(f: &Fleet, device: &str, how: &str) -> Result<(flotilla_pki::Identity, DeviceCertRow)> {
    let p = pki(f)?;
    check(device)?;
    let id = p.issue(device, now_s())?;
    let row = record(f.store.as_ref(), &id.cert_pem, how).await?;
    Ok((id, row))
}

/// Sign a device's CSR (the key stays on the device) and record the certificate.
pub async fn sign_recorded(f: &Fleet, csr_pem: &str, device: &str, how: &str) -> Result<(String, DeviceCertRow)> {
    let p = pki(f)?;
    check(device)?;
    let cert = p.sign(csr_pem, device, now_s()).map_err(bad_csr)?;
    let row = record(f.store.as_ref(), &cert, how).await?;
    Ok((cert, row))
}

/// A single-use claim token (optionally bound to one device), valid for `ttl_secs` (default an
/// hour, at most 30 days). The secret is returned here only.
pub async fn create_claim_token(
    f: &Fleet,
    device: Option<String>,
    ttl_secs: Option<u64>,
) -> Result<(ClaimTokenRow, String)> {
    pki(f)?;
    if let Some(d) = &device {
        check(d)?;
    }
    let ttl = ttl_secs.unwrap_or(3600).clamp(1, MAX_CLAIM_TTL) as i64;
    let now = now_s();
    let id = format!("c-{}", new_id());
    let token = format!("clm_{}{}", new_id(), new_id());
    f.store.add_claim_token(&id, &token_hash(&token), device.as_deref(), now + ttl, now).await?;
    Ok((ClaimTokenRow { id, device_id: device, expires: now + ttl, created: now, used: None, used_by: None }, token))
}

pub async fn claim_tokens(f: &Fleet) -> Result<Vec<ClaimTokenRow>> {
    Ok(f.store.claim_tokens().await?)
}

/// A device trades a claim token and its CSR for its certificate.
pub async fn claim(f: &Fleet, device: &str, token: &str, csr: &str) -> Result<(String, DeviceCertRow)> {
    let p = pki(f)?;
    check(device)?;
    let refused = |msg: String| Error::new(Kind::Forbidden, "claim_refused", msg);
    let hash = token_hash(token);
    let now = now_s();
    let Some(known) = f.store.claim_token(&hash).await? else {
        return Err(refused("unknown claim token".into()));
    };
    // An unbound token cannot take over a device that already has a certificate, nor one that
    // was revoked: those need a token the operator bound to the device.
    if known.device_id.is_none() {
        let holds = f.store.device_certs(device).await?.iter().any(|c| c.revoked.is_none() && c.not_after > now);
        if holds || f.store.device_revoked(device).await?.is_some() {
            return Err(refused(format!(
                "device {device} is already enrolled (or revoked): claiming it needs a token made for it (flotilla devices claim-token create --device {device})"
            )));
        }
    }
    // Check the CSR before spending the token.
    p.sign(csr, device, now).map_err(bad_csr)?;
    if f.store.use_claim_token(&hash, device, now).await?.is_none() {
        let why = match known {
            k if k.used.is_some() => "this claim token was used already".to_string(),
            k if k.expires <= now => format!("this claim token expired at {}", rfc3339(k.expires)),
            k => format!("this claim token is for device {}", k.device_id.unwrap_or_default()),
        };
        return Err(refused(why));
    }
    readmit(f, device).await?;
    let out = sign_recorded(f, csr, device, "claim").await?;
    tracing::info!(device, "device claimed its certificate");
    Ok(out)
}

/// A revoked device is admitted again once it is given a new certificate.
async fn readmit(f: &Fleet, device: &str) -> anyhow::Result<()> {
    f.store.unrevoke_device(device).await?;
    if let Some(g) = f.bus.gate() {
        g.unrevoke_device(device);
    }
    Ok(())
}

/// Issue a certificate for `device`: for its CSR, or with a key made here (returned too).
pub async fn issue(f: &Fleet, device: &str, csr: Option<&str>) -> Result<(String, Option<String>, DeviceCertRow)> {
    pki(f)?;
    check(device)?;
    let (cert, key, row) = match csr {
        Some(csr) => {
            let (cert, row) = sign_recorded(f, csr, device, "issued").await?;
            (cert, None, row)
        }
        None => {
            let (ident, row) = issue_recorded(f, device, "issued").await?;
            (ident.cert_pem, Some(ident.key_pem), row)
        }
    };
    readmit(f, device).await?;
    Ok((cert, key, row))
}

pub async fn list(f: &Fleet, device: &str) -> Result<Vec<DeviceCertRow>> {
    Ok(f.store.device_certs(device).await?)
}

/// Put on record a certificate issued elsewhere (a row of `flotilla-image personalise`'s
/// certs.csv).
pub async fn record_enrolled(
    f: &Fleet,
    device: &str,
    sha256: &str,
    serial: &str,
    not_after: i64,
) -> Result<DeviceCertRow> {
    check(device)?;
    let hex = |v: &str, n: Option<usize>| {
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit()) && n.is_none_or(|n| v.len() == n)
    };
    if !hex(sha256, Some(64)) || !hex(serial, None) {
        return Err(Error::invalid("bad_certificate", "sha256 must be 64 hex digits and serial hex"));
    }
    let row = DeviceCertRow {
        serial: serial.to_ascii_lowercase(),
        device_id: device.into(),
        sha256: sha256.to_ascii_lowercase(),
        not_after,
        issued: now_s(),
        how: "enrolled".into(),
        revoked: None,
    };
    f.store.add_device_cert(&row).await?;
    Ok(row)
}

/// What revoking a device did.
pub struct Revoked {
    pub at: i64,
    pub certificates: u64,
    pub disconnected: u64,
}

/// Refuse a device's certificates from now on (across restarts) and cut its live connections.
pub async fn revoke(f: &Fleet, device: &str) -> Result<Revoked> {
    check(device)?;
    let now = now_s();
    let n = f.store.revoke_device(device, now).await?;
    let at = f.store.device_revoked(device).await?.unwrap_or(now);
    let mut disconnected = 0;
    if let Some(g) = f.bus.gate() {
        for c in f.store.device_certs(device).await? {
            g.revoke_serial(&c.serial);
        }
        disconnected = g.revoke_device(device) as u64;
    }
    tracing::warn!(device, certificates = n, disconnected, "device revoked");
    Ok(Revoked { at, certificates: n as u64, disconnected })
}

/// A renewal request over the device's own session (the broker let it through on this device's
/// topic only; on the embedded broker, the connection's certificate names the device): the new
/// certificate, unless the device is revoked. Through an external broker, only a device that
/// holds a certificate the registry knows may renew (a password alone never becomes one).
pub async fn renew(f: &Fleet, device: &str, csr: &str) -> anyhow::Result<()> {
    if f.pki.is_none() {
        anyhow::bail!("renewal request, but this server runs without TLS");
    }
    if f.store.device_revoked(device).await?.is_some() {
        anyhow::bail!("renewal request from a revoked device");
    }
    if f.bus.gate().is_none() && !f.store.device_certs(device).await?.iter().any(|c| c.revoked.is_none()) {
        anyhow::bail!("renewal request from a device with no certificate on record");
    }
    let (cert, _) = sign_recorded(f, csr, device, "renewal").await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(device, "renewed a device certificate");
    let cmd = flotilla_proto::Command::Certificate(flotilla_proto::CertificateIssued { certificate: cert });
    f.bus.send(device, cmd).await
}
