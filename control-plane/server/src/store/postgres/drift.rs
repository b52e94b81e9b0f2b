use async_trait::async_trait;

use super::{ALERT_COLUMNS, Postgres, alert_row, big, execute, parse, query, query_opt, unsigned};
use crate::store::{AlertRow, DriftReportRow, DriftStore, OpenDriftWindow};

#[async_trait]
impl DriftStore for Postgres {
    async fn add_drift_report(
        &self,
        device: &str,
        msg_id: &str,
        model: &str,
        r: &DriftReportRow,
        now: i64,
    ) -> anyhow::Result<bool> {
        let (version, inferences) = (big(r.version)?, big(r.inferences)?);
        self.with(|c| async move {
            let n = execute(
                &c,
                "INSERT INTO drift_reports (device_id, msg_id, model, version, window_start, window_end,
                 bucket, inferences, signals, received, cohort) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (device_id, msg_id) DO NOTHING",
                &[
                    &device,
                    &msg_id,
                    &model,
                    &version,
                    &r.window_start,
                    &r.window_end,
                    &r.bucket,
                    &inferences,
                    &r.signals,
                    &now,
                    &r.cohort,
                ],
            )
            .await?;
            Ok(n == 1)
        })
        .await
    }

    async fn drift_reports(
        &self,
        model: &str,
        version: Option<u64>,
        since_bucket: i64,
    ) -> anyhow::Result<Vec<DriftReportRow>> {
        let version = version.map(big).transpose()?;
        self.with(|c| async move {
            let rows = query(
                &c,
                "SELECT device_id, version, window_start, window_end, bucket, inferences, signals, cohort
                 FROM drift_reports WHERE model = $1 AND ($2::BIGINT IS NULL OR version = $2) AND bucket >= $3
                 ORDER BY bucket, seq",
                &[&model, &version, &since_bucket],
            )
            .await?;
            parse(rows, |r| {
                Ok(DriftReportRow {
                    device_id: r.try_get(0)?,
                    version: unsigned(r.try_get(1)?)?,
                    window_start: r.try_get(2)?,
                    window_end: r.try_get(3)?,
                    bucket: r.try_get(4)?,
                    inferences: unsigned(r.try_get(5)?)?,
                    signals: r.try_get(6)?,
                    cohort: r.try_get::<_, Option<String>>(7)?.unwrap_or_default(),
                })
            })
        })
        .await
    }

    async fn drift_open_window(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
    ) -> anyhow::Result<Option<OpenDriftWindow>> {
        let version = big(version)?;
        self.with(|c| async move {
            // One statement (one snapshot): the newest bucket, and who reported how much into it.
            let rows = query(
                &c,
                "WITH newest AS (SELECT MAX(bucket) AS bucket FROM drift_reports
                                 WHERE model = $1 AND version = $2 AND cohort = $3)
                 SELECT newest.bucket, r.device_id, SUM(r.inferences)::BIGINT
                 FROM newest JOIN drift_reports r ON r.model = $1 AND r.version = $2 AND r.cohort = $3
                      AND r.bucket = newest.bucket
                 GROUP BY newest.bucket, r.device_id ORDER BY r.device_id",
                &[&model, &version, &cohort],
            )
            .await?;
            let Some(first) = rows.first() else { return Ok(None) };
            let mut w = OpenDriftWindow { bucket: first.try_get(0)?, devices: Vec::new(), inferences: 0 };
            for r in &rows {
                w.devices.push(r.try_get(1)?);
                w.inferences += unsigned(r.try_get(2)?)?;
            }
            Ok(Some(w))
        })
        .await
    }

    async fn drift_cohort_bucket_back(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        n: u32,
    ) -> anyhow::Result<Option<i64>> {
        let (version, n) = (big(version)?, i64::from(n));
        self.with(|c| async move {
            let row = query_opt(
                &c,
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = $1 AND version = $2 AND cohort = $3
                 ORDER BY bucket DESC LIMIT 1 OFFSET $4",
                &[&model, &version, &cohort, &n],
            )
            .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
        .await
    }

    async fn drift_bucket_back(&self, model: &str, version: u64, n: u32) -> anyhow::Result<Option<i64>> {
        let (version, n) = (big(version)?, i64::from(n));
        self.with(|c| async move {
            let row = query_opt(
                &c,
                "SELECT DISTINCT bucket FROM drift_reports WHERE model = $1 AND version = $2
                 ORDER BY bucket DESC LIMIT 1 OFFSET $3",
                &[&model, &version, &n],
            )
            .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
        .await
    }

    async fn drift_models(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.with(|c| async move {
            let rows =
                query(&c, "SELECT DISTINCT model, version FROM drift_reports ORDER BY model, version", &[]).await?;
            parse(rows, |r| Ok((r.try_get(0)?, unsigned(r.try_get(1)?)?)))
        })
        .await
    }

    async fn firing_alert(
        &self,
        model: &str,
        version: u64,
        cohort: &str,
        signal: &str,
    ) -> anyhow::Result<Option<AlertRow>> {
        let version = big(version)?;
        self.with(|c| async move {
            let row = query_opt(
                &c,
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE model = $1 AND version = $2 AND cohort = $3
                     AND signal = $4 AND state = 'firing' ORDER BY id LIMIT 1"
                ),
                &[&model, &version, &cohort, &signal],
            )
            .await?;
            row.as_ref().map(alert_row).transpose()
        })
        .await
    }

    async fn raise_alert(&self, a: &AlertRow) -> anyhow::Result<Option<i64>> {
        let (version, windows) = (big(a.version)?, i64::from(a.windows));
        self.with(|c| async move {
            let rows = query(
                &c,
                "INSERT INTO drift_alerts (model, version, cohort, signal, metrics, value, threshold, windows,
                 first_window, last_window, state, raised)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'firing', $11)
                 ON CONFLICT (model, version, cohort, signal) WHERE state = 'firing' DO NOTHING RETURNING id",
                &[
                    &a.model,
                    &version,
                    &a.cohort,
                    &a.signal,
                    &a.metrics,
                    &a.value,
                    &a.threshold,
                    &windows,
                    &a.first_window,
                    &a.last_window,
                    &a.raised,
                ],
            )
            .await?;
            Ok(rows.first().map(|row| row.try_get(0)).transpose()?)
        })
        .await
    }

    async fn extend_alert(&self, id: i64, windows: u32, last_window: i64, value: Option<f64>) -> anyhow::Result<()> {
        let windows = i64::from(windows);
        self.with(|c| async move {
            execute(
                &c,
                "UPDATE drift_alerts SET windows = $2, last_window = $3, value = $4 WHERE id = $1",
                &[&id, &windows, &last_window, &value],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn resolve_alert(&self, id: i64, now: i64) -> anyhow::Result<()> {
        self.with(|c| async move {
            execute(&c, "UPDATE drift_alerts SET state = 'resolved', resolved = $2 WHERE id = $1", &[&id, &now])
                .await?;
            Ok(())
        })
        .await
    }

    async fn alerts(&self, all: bool) -> anyhow::Result<Vec<AlertRow>> {
        self.with(|c| async move {
            let rows = query(
                &c,
                &format!("SELECT {ALERT_COLUMNS} FROM drift_alerts WHERE $1 OR state = 'firing' ORDER BY id DESC"),
                &[&all],
            )
            .await?;
            parse(rows, alert_row)
        })
        .await
    }

    async fn prune_drift_reports(&self, at: i64) -> anyhow::Result<u64> {
        self.with(|c| async move { execute(&c, "DELETE FROM drift_reports WHERE received < $1", &[&at]).await }).await
    }
}
