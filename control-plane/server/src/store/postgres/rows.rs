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

pub(super) fn device_row(r: &Row) -> anyhow::Result<DeviceRow> {
    let (hello, models, own, server): (Option<String>, String, String, String) =
        (r.try_get(3)?, r.try_get(4)?, r.try_get(5)?, r.try_get(6)?);
    let online = r.try_get::<_, i64>(1)? != 0;
    Ok(DeviceRow::from_stored(r.try_get(0)?, online, r.try_get(2)?, hello.as_deref(), &models, &own, &server))
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
