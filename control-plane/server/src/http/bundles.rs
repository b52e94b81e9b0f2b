//! `/api/v1/bundles`: the bundle registry, and downloads (Range, resumable) that devices make
//! with the capability in their offer.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_api::v1::{ApiError, Bundle};

use super::{ApiErrors, Error, Result};
use crate::service::{Fleet, bundles};
use crate::store::BundleRow;
use crate::util::rfc3339;

fn bundle(b: BundleRow) -> Bundle {
    Bundle {
        id: b.id,
        name: b.name,
        version: b.version,
        size: b.size,
        manifest_sha256: b.manifest_sha256,
        signers: b.signers,
        created: rfc3339(b.created),
        pushed: rfc3339(b.pushed),
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/bundles",
    tag = "bundles",
    summary = "List pushed bundles",
    responses((status = 200, description = "ok", body = Vec<Bundle>), ApiErrors)
)]

pub(super) async fn list_bundles(State(f): State<Arc<Fleet>>) -> Result<Json<Vec<Bundle>>> {
    Ok(Json(bundles::list(&f).await?.into_iter().map(bundle).collect()))
}

#[utoipa::path(
    post,
    path = "/api/v1/bundles",
    tag = "bundles",
    summary = "Push a signed bundle file",
    request_body(content = Vec<u8>, content_type = "application/vnd.flotilla.bundle"),
    responses((status = 201, description = "ok", body = Bundle), (status = 400, description = "error", body = ApiError), (status = 401, description = "error", body = ApiError), (status = 403, description = "error", body = ApiError), (status = 409, description = "error", body = ApiError), (status = 422, description = "error", body = ApiError))
)]

pub(super) async fn push_bundle(State(f): State<Arc<Fleet>>, body: Bytes) -> Result<(StatusCode, Json<Bundle>)> {
    Ok((StatusCode::CREATED, Json(bundle(bundles::push(&f, body).await?))))
}

/// Serve a bundle file, honouring `Range: bytes=START-[END]` so downloads resume.
#[utoipa::path(
    get,
    path = "/api/v1/bundles/{id}",
    tag = "bundles",
    summary = "Download a bundle file (Range supported; devices use the capability in their offer)",
    params(("id" = String, Path, description = "bundle id (sha256 of the file)")),
    responses((status = 200, description = "ok", body = Vec<u8>, content_type = "application/vnd.flotilla.bundle"), ApiErrors)
)]
pub(super) async fn download_bundle(
    State(s): State<Arc<Fleet>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    bundles::get(&s, &id).await?;
    let not_found = || Error::new(StatusCode::NOT_FOUND, "bundle_not_found", format!("no bundle {id:?}"), None);
    let path = s.files.path(&id).ok_or_else(not_found)?;
    let mut file =
        tokio::fs::File::open(&path).await.map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    let total = file.metadata().await.map_err(|e| anyhow::anyhow!(e))?.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| parse_range(r, total));
    let (start, end, status) = match range {
        None => (0, total, StatusCode::OK),
        Some(Some((a, b))) => (a, b, StatusCode::PARTIAL_CONTENT),
        Some(None) => {
            return Ok((StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{total}"))])
                .into_response());
        }
    };
    file.seek(std::io::SeekFrom::Start(start)).await.map_err(|e| anyhow::anyhow!(e))?;
    let len = end - start;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    let stream = Counted { inner: Box::pin(stream), shared: s.clone() };
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, "application/vnd.flotilla.bundle".parse().expect("static header"));
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("static header"));
    h.insert(header::CONTENT_LENGTH, len.into());
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", end.saturating_sub(1)).parse().expect("ascii"),
        );
    }
    Ok(resp)
}

/// A body stream that counts the bundle bytes it serves.
struct Counted<S> {
    inner: std::pin::Pin<Box<S>>,
    shared: Arc<Fleet>,
}

impl<S: futures_core::Stream<Item = std::io::Result<Bytes>>> futures_core::Stream for Counted<S> {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let r = this.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(b))) = &r {
            this.shared.metrics.served_http.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

/// `bytes=START-` or `bytes=START-END` (inclusive) → the half-open range, or None if unsatisfiable.
fn parse_range(h: &str, total: u64) -> Option<(u64, u64)> {
    let spec = h.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => total,
        e => e.parse::<u64>().ok()?.saturating_add(1).min(total),
    };
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 10)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=4-5", 10), Some((4, 6)));
        assert_eq!(parse_range("bytes=4-100", 10), Some((4, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
