//! Device certificates over the API: claim tokens and claims (first-boot provisioning, the key
//! never leaves the device), certificates issued by an operator, and revocation.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use flotilla_api::v1::{
    CertificateCreate, CertificateRecord, Claim, ClaimToken, ClaimTokenCreate, DeviceCertificate, DeviceRevoked,
};
use sha2::{Digest, Sha256};

use crate::api_error::{ApiErrors, Error, Result, json_body, rfc3339};
use crate::store::{ClaimTokenRow, DeviceCertRow};
use crate::{Shared, now_s};

const MAX_CLAIM_TTL: u64 = 30 * 86_400;

fn no_pki() -> Error {
    Error::new(
        StatusCode::CONFLICT,
        "no_tls",
        "this server runs with --insecure-plaintext: it has no fleet CA and issues no certificates",
        None,
    )
}

fn bad_device(id: &str, e: anyhow::Error) -> Error {
    Error::new(
        StatusCode::BAD_REQUEST,
        "bad_device_id",
        format!("{e:#}"),
        Some(if flotilla_proto::reserved_id(id) {
            "device ids may not begin with `flotilla-server`"
        } else {
            "1-64 letters, digits, `.`, `_` or `-`"
        }),
    )
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

fn claim_view(r: ClaimTokenRow, token: Option<String>) -> ClaimToken {
    ClaimToken {
        id: r.id,
        token,
        device_id: r.device_id,
        expires: rfc3339(r.expires),
        created: rfc3339(r.created),
        used: r.used.map(rfc3339),
        used_by: r.used_by,
    }
}

fn cert_view(r: DeviceCertRow, certificate: Option<String>, key: Option<String>) -> DeviceCertificate {
    DeviceCertificate {
        device_id: r.device_id,
        certificate,
        key,
        serial: r.serial,
        sha256: r.sha256,
        not_after: rfc3339(r.not_after),
        how: r.how,
        revoked: r.revoked.map(rfc3339),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/claim-tokens",
    tag = "devices",
    summary = "Make a single-use, expiring claim token for first-boot provisioning (shown once)",
    request_body = ClaimTokenCreate,
    responses((status = 200, description = "made", body = ClaimToken), ApiErrors)
)]
pub async fn create_claim_token(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<ClaimTokenCreate>, JsonRejection>,
) -> Result<Json<ClaimToken>> {
    let req = json_body(body, Some("send {\"device_id\": \"rpi-7\", \"ttl_secs\": 3600} (both optional)"))?;
    if s.pki.is_none() {
        return Err(no_pki());
    }
    if let Some(d) = &req.device_id {
        crate::pki::issuable(d).map_err(|e| bad_device(d, e))?;
    }
    let ttl = req.ttl_secs.unwrap_or(3600).clamp(1, MAX_CLAIM_TTL) as i64;
    let now = now_s();
    let id = format!("c-{}", crate::new_id());
    let token = format!("clm_{}{}", crate::new_id(), crate::new_id());
    s.store.add_claim_token(&id, &token_hash(&token), req.device_id.as_deref(), now + ttl, now)?;
    let row =
        ClaimTokenRow { id, device_id: req.device_id, expires: now + ttl, created: now, used: None, used_by: None };
    Ok(Json(claim_view(row, Some(token))))
}

#[utoipa::path(
    get,
    path = "/api/v1/claim-tokens",
    tag = "devices",
    summary = "Claim tokens, newest first (never the secrets)",
    responses((status = 200, description = "ok", body = [ClaimToken]), ApiErrors)
)]
pub async fn list_claim_tokens(State(s): State<Arc<Shared>>) -> Result<Json<Vec<ClaimToken>>> {
    Ok(Json(s.store.claim_tokens()?.into_iter().map(|r| claim_view(r, None)).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/claim",
    tag = "devices",
    summary = "A device trades a claim token and its CSR for its certificate (no bearer token)",
    request_body = Claim,
    responses((status = 200, description = "signed", body = DeviceCertificate), ApiErrors)
)]
pub async fn claim(
    State(s): State<Arc<Shared>>,
    body: std::result::Result<Json<Claim>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let req = json_body(body, Some("send {\"device_id\", \"token\", \"csr\"} (the agent does)"))?;
    if s.pki.is_none() {
        return Err(no_pki());
    }
    crate::pki::issuable(&req.device_id).map_err(|e| bad_device(&req.device_id, e))?;
    let refused = |msg: String| Error::new(StatusCode::FORBIDDEN, "claim_refused", msg, None);
    let hash = token_hash(&req.token);
    let now = now_s();
    let Some(known) = s.store.claim_token(&hash)? else {
        return Err(refused("unknown claim token".into()));
    };
    // An unbound token cannot take over a device that already has a certificate, nor one that
    // was revoked: those need a token the operator bound to the device.
    if known.device_id.is_none() {
        let holds = s.store.device_certs(&req.device_id)?.iter().any(|c| c.revoked.is_none() && c.not_after > now);
        if holds || s.store.device_revoked(&req.device_id)?.is_some() {
            return Err(refused(format!(
                "device {} is already enrolled (or revoked): claiming it needs a token made for it (flotilla devices claim-token create --device {})",
                req.device_id, req.device_id
            )));
        }
    }
    // Check the CSR before spending the token.
    let csr_ok = s.pki.as_ref().expect("checked").sign(&req.csr, &req.device_id, now);
    if let Err(e) = csr_ok {
        return Err(Error::new(StatusCode::BAD_REQUEST, "bad_csr", format!("{e:#}"), None));
    }
    let Some(_) = s.store.use_claim_token(&hash, &req.device_id, now)? else {
        let why = match known {
            k if k.used.is_some() => "this claim token was used already".to_string(),
            k if k.expires <= now => format!("this claim token expired at {}", rfc3339(k.expires)),
            k => format!("this claim token is for device {}", k.device_id.unwrap_or_default()),
        };
        return Err(refused(why));
    };
    s.store.unrevoke_device(&req.device_id)?;
    if let Some(auth) = &s.broker_auth {
        auth.unrevoke_device(&req.device_id);
    }
    let cert = crate::pki::sign_recorded(&s, &req.csr, &req.device_id, "claim")
        .map_err(|e| Error::new(StatusCode::BAD_REQUEST, "bad_csr", format!("{e:#}"), None))?;
    tracing::info!(device = %req.device_id, "device claimed its certificate");
    let row = s.store.device_certs(&req.device_id)?.into_iter().next().expect("just recorded");
    Ok(Json(cert_view(row, Some(cert), None)))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/certificate",
    tag = "devices",
    summary = "Issue a device certificate (for its CSR, or with a key made here); admits a revoked device again",
    params(("id" = String, Path, description = "device id")),
    request_body = CertificateCreate,
    responses((status = 200, description = "issued", body = DeviceCertificate), ApiErrors)
)]
pub async fn issue_certificate(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CertificateCreate>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let req = json_body(
        body,
        Some("send {} (the server makes the key) or {\"csr\": \"-----BEGIN CERTIFICATE REQUEST-----…\"}"),
    )?;
    if s.pki.is_none() {
        return Err(no_pki());
    }
    crate::pki::issuable(&id).map_err(|e| bad_device(&id, e))?;
    let (cert, key) = match req.csr {
        Some(csr) => (
            crate::pki::sign_recorded(&s, &csr, &id, "issued")
                .map_err(|e| Error::new(StatusCode::BAD_REQUEST, "bad_csr", format!("{e:#}"), None))?,
            None,
        ),
        None => {
            let ident = crate::pki::issue_recorded(&s, &id, "issued")?;
            (ident.cert_pem, Some(ident.key_pem))
        }
    };
    s.store.unrevoke_device(&id)?;
    if let Some(auth) = &s.broker_auth {
        auth.unrevoke_device(&id);
    }
    let row = s.store.device_certs(&id)?.into_iter().next().expect("just recorded");
    Ok(Json(cert_view(row, Some(cert), key)))
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/certificates",
    tag = "devices",
    summary = "A device's certificates on record, newest first",
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "ok", body = [DeviceCertificate]), ApiErrors)
)]
pub async fn list_certificates(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeviceCertificate>>> {
    Ok(Json(s.store.device_certs(&id)?.into_iter().map(|r| cert_view(r, None, None)).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/certificates",
    tag = "devices",
    summary = "Put a certificate issued elsewhere on record (the certs.csv of flotilla-image personalise)",
    params(("id" = String, Path, description = "device id")),
    request_body = CertificateRecord,
    responses((status = 200, description = "recorded", body = DeviceCertificate), ApiErrors)
)]
pub async fn record_certificate(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CertificateRecord>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let r = json_body(body, Some("send {\"sha256\", \"serial\", \"not_after\"}, a row of certs.csv"))?;
    crate::pki::issuable(&id).map_err(|e| bad_device(&id, e))?;
    let hex = |v: &str, n: Option<usize>| {
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit()) && n.is_none_or(|n| v.len() == n)
    };
    if !hex(&r.sha256, Some(64)) || !hex(&r.serial, None) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "bad_certificate",
            "sha256 must be 64 hex digits and serial hex",
            None,
        ));
    }
    let row = DeviceCertRow {
        serial: r.serial.to_ascii_lowercase(),
        device_id: id,
        sha256: r.sha256.to_ascii_lowercase(),
        not_after: r.not_after,
        issued: now_s(),
        how: "enrolled".into(),
        revoked: None,
    };
    s.store.add_device_cert(&row)?;
    Ok(Json(cert_view(row, None, None)))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/revoke",
    tag = "devices",
    summary = "Revoke a device: refuse its certificates from now on (across restarts) and cut its live connection",
    params(("id" = String, Path, description = "device id")),
    responses((status = 200, description = "revoked", body = DeviceRevoked), ApiErrors)
)]
pub async fn revoke_device(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<DeviceRevoked>> {
    crate::pki::issuable(&id).map_err(|e| bad_device(&id, e))?;
    let now = now_s();
    let n = s.store.revoke_device(&id, now)?;
    let revoked = s.store.device_revoked(&id)?.unwrap_or(now);
    let mut disconnected = 0;
    if let Some(auth) = &s.broker_auth {
        for c in s.store.device_certs(&id)? {
            auth.revoke_serial(&c.serial);
        }
        disconnected = auth.revoke_device(&id) as u64;
    }
    tracing::warn!(device = %id, certificates = n, disconnected, "device revoked");
    Ok(Json(DeviceRevoked { device_id: id, revoked: rfc3339(revoked), certificates: n as u64, disconnected }))
}
