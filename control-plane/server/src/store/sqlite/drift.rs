use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::{ALERT_COLUMNS, Sqlite, alert_row};
use crate::store::{AlertRow, DriftReportRow, DriftStore, OpenDriftWindow};

#[async_trait]
impl DriftStore for Sqlite {
    async fn add_drift_report(
        &self,
        device: &str,
        msg_id: &str,
        model: &str,
        r: &DriftReportRow,
        now: i64,
    ) -> anyhow::Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO drift_reports (device_id, msg_id, model, version, window_start, window_end,
                 bucket, inferences, signals, received, cohort) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    device,
                    msg_id,
                    model,
                    r.version as i64,
                    r.window_start,
                    r.window_end,
                    r.bucket,
                    r.inferences as i64,
                    r.signals,
                    now,
                    r.cohort
                ],
            )
        })?;
        Ok(n == 1)
    }

    async fn drift_reports(
        &self,
        model: &str,
        version: Option<u64>,
        since_bucket: i64,
    ) -> anyhow::Result<Vec<DriftReportRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device_id, version, window_start, window_end, bucket, inferences, signals, cohort
                 FROM drift_reports WHERE model = ?1 AND (?2 IS NULL OR version = ?2) AND bucket >= ?3
                 ORDER BY bucket, seq",
            )?;
            st.query_map(params![model, version.map(|v| v as i64), since_bucket], |r| {
                Ok(DriftReportRow {
                    device_id: r.get(0)?,
                    version: r.get::<_, i64>(1)? as u64,
                    window_start: r.get(2)?,
                    window_end: r.get(3)?,
                    bucket: r.get(4)?,
                    inferences: r.get::<_, i64>(5)? as u64,
                    signals: r.get(6)?,
                    cohort: r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                })
            })?
            .collect()
        })
    }

    async fn drift_open_window(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
    ) -> anyhow::Result<Option<OpenDriftWindow>> {
        self.with(|c| {
            let Some(bucket) = c.query_row(
                "SELECT MAX(bucket) FROM drift_reports WHERE model = ?1 AND version = ?2 AND cohort = ?3",
                params![model, version as i64, cohort],
                |r| r.get::<_, Option<i64>>(0),
            )?
            else {
                return Ok(None);
            };
            let mut st = c.prepare(
                "SELECT device_id, SUM(inferences) FROM drift_reports
                 WHERE model = ?1 AND version = ?2 AND cohort = ?3 AND bucket = ?4 GROUP BY device_id",
            )?;
            let mut w = OpenDriftWindow { bucket, devices: Vec::new(), inferences: 0 };
            for row in st.query_map(params![model, version as i64, cohort, bucket], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })? {
                let (device, n) = row?;
                w.devices.push(device);
                w.inferences += n as u64;
            }
            Ok(Some(w))
        })
    }

    async fn drift_cohort_bucket_back(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        n: u32,
    ) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = ?1 AND version = ?2 AND cohort = ?3
                 ORDER BY bucket DESC LIMIT 1 OFFSET ?4",
                params![model, version as i64, cohort, n],
                |r| r.get(0),
            )
            .optional()
        })
    }

    async fn drift_bucket_back(&self, model: &str, version: u64, n: u32) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            c.query_row(
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = ?1 AND version = ?2
                 ORDER BY bucket DESC LIMIT 1 OFFSET ?3",
                params![model, version as i64, n],
                |r| r.get(0),
            )
            .optional()
        })
    }

    async fn drift_models(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT DISTINCT model, version FROM drift_reports ORDER BY model, version")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?.collect()
        })
    }

    async fn firing_alert(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        signal: &str,
    ) -> anyhow::Result<Option<AlertRow>> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE model = ?1 AND version = ?2 AND cohort = ?3
                     AND signal = ?4 AND state = 'firing'"
                ),
                params![model, version as i64, cohort, signal],
                alert_row,
            )
            .optional()
        })
    }

    async fn raise_alert(&self, a: &AlertRow) -> anyhow::Result<Option<i64>> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO drift_alerts (model, version, cohort, signal, metrics, value, threshold, windows,
                 first_window, last_window, state, raised) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'firing', ?11)",
                params![
                    a.model,
                    a.version as i64,
                    a.cohort,
                    a.signal,
                    a.metrics,
                    a.value,
                    a.threshold,
                    a.windows,
                    a.first_window,
                    a.last_window,
                    a.raised
                ],
            )?;
            Ok((n == 1).then(|| c.last_insert_rowid()))
        })
    }

    async fn extend_alert(&self, id: i64, windows: u32, last_window: i64, value: Option<f64>) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE drift_alerts SET windows = ?2, last_window = ?3, value = ?4 WHERE id = ?1",
                params![id, windows, last_window, value],
            )
        })?;
        Ok(())
    }

    async fn resolve_alert(&self, id: i64, now: i64) -> anyhow::Result<()> {
        self.with(|c| {
            c.execute("UPDATE drift_alerts SET state = 'resolved', resolved = ?2 WHERE id = ?1", params![id, now])
        })?;
        Ok(())
    }

    async fn alerts(&self, all: bool) -> anyhow::Result<Vec<AlertRow>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE ?1 OR state = 'firing' ORDER BY id DESC"
            ))?;
            st.query_map([all], alert_row)?.collect()
        })
    }

    async fn prune_drift_reports(&self, at: i64) -> anyhow::Result<u64> {
        Ok(self.with(|c| c.execute("DELETE FROM drift_reports WHERE received < ?1", [at]))? as u64)
    }
}
