//! `/api/v1/drift` and `/api/v1/alerts`: drift per cohort, signal and window, and the alerts
//! judged from it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use flotilla_api::v1::{DriftAlert, DriftHistogram, DriftRow};

use super::{ApiErrors, Result};
use crate::service::{Fleet, devices, drift};
use crate::store::AlertRow;
use crate::util::rfc3339_ms;

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DriftQuery {
    model: Option<String>,
    version: Option<u64>,
    selector: Option<String>,
    /// Tag whose values are the cohorts (default: the server's cohort key); `none` merges all.
    by: Option<String>,
    /// Only the latest this many windows.
    last: Option<u32>,
    /// Include each row's baseline and live histograms.
    #[serde(default)]
    histograms: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/drift",
    tag = "drift",
    summary = "Drift per cohort, signal and window",
    params(DriftQuery),
    responses((status = 200, description = "ok", body = Vec<DriftRow>), ApiErrors)
)]

pub(super) async fn drift_rows(
    State(f): State<Arc<Fleet>>,
    Query(q): Query<DriftQuery>,
) -> Result<Json<Vec<DriftRow>>> {
    let selector = devices::selector(q.selector.as_deref())?;
    let rows = drift::query(&f, q.model, q.version, selector, q.by, q.last, q.histograms).await?;
    Ok(Json(rows.into_iter().map(row).collect()))
}

fn row(r: drift::Row) -> DriftRow {
    DriftRow {
        model: r.model,
        version: r.version,
        cohort: r.cohort,
        signal: r.signal,
        window_start: rfc3339_ms(r.window_start),
        window_end: rfc3339_ms(r.window_end),
        count: r.count,
        inferences: r.inferences,
        devices: r.devices,
        psi: r.psi,
        js: r.js,
        ks: r.ks,
        wasserstein: r.wasserstein,
        mean: r.mean,
        exceeded: r.exceeded,
        alert: r.alert,
        histogram: r.histogram.map(|h| DriftHistogram { edges: h.edges, baseline: h.baseline, live: h.live }),
    }
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AlertsQuery {
    /// Include resolved alerts.
    #[serde(default)]
    all: bool,
}

#[utoipa::path(
    get,
    path = "/api/v1/alerts",
    tag = "drift",
    summary = "Drift alerts",
    params(AlertsQuery),
    responses((status = 200, description = "ok", body = Vec<DriftAlert>), ApiErrors)
)]

pub(super) async fn list_alerts(
    State(f): State<Arc<Fleet>>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<Vec<DriftAlert>>> {
    Ok(Json(drift::alerts(&f, q.all).await?.into_iter().map(alert).collect()))
}

fn alert(a: AlertRow) -> DriftAlert {
    DriftAlert {
        id: a.id,
        model: a.model,
        version: a.version,
        cohort: a.cohort,
        signal: a.signal,
        metrics: a.metrics.split(',').filter(|m| !m.is_empty()).map(String::from).collect(),
        value: a.value,
        threshold: a.threshold,
        windows: a.windows,
        first_window: rfc3339_ms(a.first_window),
        last_window: rfc3339_ms(a.last_window),
        state: a.state,
        raised: rfc3339_ms(a.raised * 1000),
        resolved: a.resolved.map(|r| rfc3339_ms(r * 1000)),
    }
}
