//! Prometheus metrics of the agent (`GET /metrics` on the local API), in the text exposition
//! format written by hand: a handful of counters and one histogram do not need a library.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use crate::Ctx;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 13] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

/// Inference counts and latencies per (model, version, backend), as served through the API.
#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, u64, String), Series>>,
}

#[derive(Default)]
struct Series {
    ok: u64,
    errors: u64,
    /// Count per bucket (not cumulative; summed when rendered); the last is +Inf.
    buckets: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
}

impl Metrics {
    pub fn record(&self, model: &str, version: u64, backend: &str, ok: bool, latency_us: u64) {
        let mut series = self.series.lock().expect("metrics lock");
        let s = series.entry((model.to_string(), version, backend.to_string())).or_default();
        if ok {
            s.ok += 1;
        } else {
            s.errors += 1;
        }
        let i = BUCKETS_US.iter().position(|&b| latency_us <= b).unwrap_or(BUCKETS_US.len());
        s.buckets[i] += 1;
        s.sum_us += latency_us;
    }

    pub fn render(&self, ctx: &Ctx) -> String {
        let mut out = String::new();
        let series = self.series.lock().expect("metrics lock");
        let labels = |(m, v, b): &(String, u64, String)| format!("model=\"{m}\",version=\"{v}\",backend=\"{b}\"");
        out.push_str("# HELP flotilla_inferences_total Inferences served through the local API.\n");
        out.push_str("# TYPE flotilla_inferences_total counter\n");
        for (k, s) in series.iter() {
            let _ = writeln!(out, "flotilla_inferences_total{{{},outcome=\"ok\"}} {}", labels(k), s.ok);
            let _ = writeln!(out, "flotilla_inferences_total{{{},outcome=\"error\"}} {}", labels(k), s.errors);
        }
        out.push_str("# HELP flotilla_inference_seconds Time spent in the runtime per inference.\n");
        out.push_str("# TYPE flotilla_inference_seconds histogram\n");
        for (k, s) in series.iter() {
            let mut cumulative = 0;
            for (i, n) in s.buckets.iter().enumerate() {
                cumulative += n;
                let le = BUCKETS_US.get(i).map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(out, "flotilla_inference_seconds_bucket{{{},le=\"{le}\"}} {cumulative}", labels(k));
            }
            let _ = writeln!(out, "flotilla_inference_seconds_sum{{{}}} {}", labels(k), s.sum_us as f64 / 1e6);
            let _ = writeln!(out, "flotilla_inference_seconds_count{{{}}} {cumulative}", labels(k));
        }
        drop(series);

        out.push_str("# HELP flotilla_model_active Models this agent serves (1 per active version).\n");
        out.push_str("# TYPE flotilla_model_active gauge\n");
        for m in ctx.registry.all() {
            let _ = writeln!(
                out,
                "flotilla_model_active{{model=\"{}\",version=\"{}\",backend=\"{}\"}} 1",
                m.name,
                m.version,
                m.backend()
            );
        }
        let (depth, bytes, dropped) = ctx.with_state(|s| s.outbox_stats()).unwrap_or_default();
        let gauges: [(&str, &str, &str, u64); 6] = [
            ("flotilla_outbox_messages", "gauge", "Telemetry messages waiting for the broker.", depth),
            ("flotilla_outbox_bytes", "gauge", "Payload bytes waiting for the broker.", bytes),
            (
                "flotilla_outbox_dropped_total",
                "counter",
                "Telemetry messages dropped because the outbox was full.",
                dropped,
            ),
            (
                "flotilla_broker_connected",
                "gauge",
                "1 while the MQTT session is up.",
                u64::from(ctx.connected.load(Ordering::Relaxed)),
            ),
            (
                "flotilla_bundle_bytes_received_http_total",
                "counter",
                "Bundle bytes downloaded over HTTP.",
                ctx.received_http.load(Ordering::Relaxed),
            ),
            (
                "flotilla_bundle_bytes_received_mqtt_total",
                "counter",
                "Bundle bytes received in MQTT chunks.",
                ctx.received_mqtt.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let m = Metrics::default();
        for us in [50, 100, 101, 7_000, 10_000_000] {
            m.record("digits", 1, "tract-onnx", us != 7_000, us);
        }
        let series = m.series.lock().unwrap();
        let s = &series[&("digits".to_string(), 1, "tract-onnx".to_string())];
        assert_eq!((s.ok, s.errors), (4, 1));
        assert_eq!(s.buckets[0], 2, "50 and 100 µs are ≤ 100 µs");
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[6], 1, "7 ms is in the 10 ms bucket");
        assert_eq!(s.buckets[BUCKETS_US.len()], 1, "10 s goes to +Inf");
        assert_eq!(s.buckets.iter().sum::<u64>(), 5);
    }
}
