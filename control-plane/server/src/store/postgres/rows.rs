//! The rows the areas share, parsed from PostgreSQL's.

use tokio_postgres::Row;

use super::{unsigned, unsigned32};
use crate::store::{AlertRow, ClaimTokenRow, DeviceRow, TokenRow};

pub(super) const TOKEN_COLUMNS: &str = "id, role, name, created, last_used";

pub(super) fn token_row(r: &Row) -> anyhow::Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get(0)?,
        role: r.try_get(1)?,
        name: r.try_get(2)?,
        created: r.try_get(3)?,
        last_used: r.try_get(4)?,
    })
}

pub(super) const DEVICE_COLUMNS: &str = "id, online, last_seen, hello, models, tags, server_tags";

/// The device's own tags with the server's on top (a server value of null removes a tag).
pub(super) fn device_row(r: &Row) -> anyhow::Result<DeviceRow> {
    let own: String = r.try_get(5)?;
    let server: String = r.try_get(6)?;
    let mut tags: std::collections::BTreeMap<String, String> = serde_json::from_str(&own).unwrap_or_default();
    let over: std::collections::BTreeMap<String, Option<String>> = serde_json::from_str(&server).unwrap_or_default();
    for (k, v) in over {
        match v {
            Some(v) => tags.insert(k, v),
            None => tags.remove(&k),
        };
    }
    let hello: Option<String> = r.try_get(3)?;
    let models: String = r.try_get(4)?;
    Ok(DeviceRow {
        id: r.try_get(0)?,
        online: r.try_get::<_, i64>(1)? != 0,
        last_seen: r.try_get(2)?,
        hello: hello.and_then(|h| serde_json::from_str(&h).ok()),
        models: serde_json::from_str(&models).unwrap_or_default(),
        tags,
    })
}

pub(super) const ALERT_COLUMNS: &str = "id, model, version, cohort, signal, metrics, value, threshold, windows, \
     first_window, last_window, state, raised, resolved";

pub(super) fn alert_row(r: &Row) -> anyhow::Result<AlertRow> {
    Ok(AlertRow {
        id: r.try_get(0)?,
        model: r.try_get(1)?,
        version: unsigned(r.try_get(2)?)?,
        cohort: r.try_get(3)?,
        signal: r.try_get(4)?,
        metrics: r.try_get(5)?,
        value: r.try_get(6)?,
        threshold: r.try_get(7)?,
        windows: unsigned32(r.try_get(8)?)?,
        first_window: r.try_get(9)?,
        last_window: r.try_get(10)?,
        state: r.try_get(11)?,
        raised: r.try_get(12)?,
        resolved: r.try_get(13)?,
    })
}

pub(super) const CLAIM_COLUMNS: &str = "id, device_id, expires, created, used, used_by";

pub(super) fn claim_row(r: &Row) -> anyhow::Result<ClaimTokenRow> {
    Ok(ClaimTokenRow {
        id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        expires: r.try_get(2)?,
        created: r.try_get(3)?,
        used: r.try_get(4)?,
        used_by: r.try_get(5)?,
    })
}
