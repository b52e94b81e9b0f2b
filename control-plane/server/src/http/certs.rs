//! Device certificates over the API: claim tokens and claims (first-boot provisioning, the key
//! never leaves the device), certificates issued by an operator, and revocation.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use flotilla_api::v1::{
    CertificateCreate, CertificateRecord, Claim, ClaimToken, ClaimTokenCreate, DeviceCertificate, DeviceRevoked,
};

use super::{ApiErrors, Result, json_body};
use crate::service::{Fleet, certs};
use crate::store::{ClaimTokenRow, DeviceCertRow};
use crate::util::rfc3339;

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
pub(super) async fn create_claim_token(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<ClaimTokenCreate>, JsonRejection>,
) -> Result<Json<ClaimToken>> {
    let req = json_body(body, Some("send {\"device_id\": \"rpi-7\", \"ttl_secs\": 3600} (both optional)"))?;
    let (row, token) = certs::create_claim_token(&f, req.device_id, req.ttl_secs).await?;
    Ok(Json(claim_view(row, Some(token))))
}

#[utoipa::path(
    get,
    path = "/api/v1/claim-tokens",
    tag = "devices",
    summary = "Claim tokens, newest first (never the secrets)",
    responses((status = 200, description = "ok", body = [ClaimToken]), ApiErrors)
)]
pub(super) async fn list_claim_tokens(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<ClaimToken>>> {
    Ok(Json(certs::claim_tokens(&f).await?.into_iter().map(|r| claim_view(r, None)).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/claim",
    tag = "devices",
    summary = "A device trades a claim token and its CSR for its certificate (no bearer token)",
    request_body = Claim,
    responses((status = 200, description = "signed", body = DeviceCertificate), ApiErrors)
)]
pub(super) async fn claim(
    State(f): State<Arc<Fleet>>,
    body: std::result::Result<Json<Claim>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let req = json_body(body, Some("send {\"device_id\", \"token\", \"csr\"} (the agent does)"))?;
    let (cert, row) = certs::claim(&f, &req.device_id, &req.token, &req.csr).await?;
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
pub(super) async fn issue_certificate(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CertificateCreate>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let req = json_body(
        body,
        Some("send {} (the server makes the key) or {\"csr\": \"-----BEGIN CERTIFICATE REQUEST-----…\"}"),
    )?;
    let (cert, key, row) = certs::issue(&f, &id, req.csr.as_deref()).await?;
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
pub(super) async fn list_certificates(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
) -> Result<Json<Vec<DeviceCertificate>>> {
    Ok(Json(certs::list(&f, &id).await?.into_iter().map(|r| cert_view(r, None, None)).collect()))
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
pub(super) async fn record_certificate(
    State(f): State<Arc<Fleet>>,
    Path(id): Path<String>,
    body: std::result::Result<Json<CertificateRecord>, JsonRejection>,
) -> Result<Json<DeviceCertificate>> {
    let r = json_body(body, Some("send {\"sha256\", \"serial\", \"not_after\"}, a row of certs.csv"))?;
    let row = certs::record_enrolled(&f, &id, &r.sha256, &r.serial, r.not_after).await?;
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
pub(super) async fn revoke_device(State(f): State<Arc<Fleet>>, Path(id): Path<String>) -> Result<Json<DeviceRevoked>> {
    let r = certs::revoke(&f, &id).await?;
    Ok(Json(DeviceRevoked {
        device_id: id,
        revoked: rfc3339(r.at),
        certificates: r.certificates,
        disconnected: r.disconnected,
    }))
}
