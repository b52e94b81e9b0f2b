//! Drift on the device: every inference through the agent feeds the sketches of its model
//! version (see `flotilla-drift`); each window (time or count, from the bundle's profile) the
//! sketches go to the control plane through the outbox and start again empty.
//!
//! Time windows end on multiples of their length since the epoch, so the windows of every device
//! line up and the control plane merges them as they are. A window with no inference sends
//! nothing. The open window lives in memory: a crash loses at most that one window.
//!
//! Feedback (`POST /v2/models/{name}/feedback`) names earlier requests by id: the agent keeps the
//! predicted classes of the last [`RECENT`] requests and feeds the verdict into the accuracy
//! signal of the window the label arrives in.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use flotilla_drift::{Live, Pending, Profile, Tensors, Window};
use flotilla_proto::{DriftReport, Sample, SampleBatch, SampleTensor, SignalSketch};
use flotilla_runtime::Tensor;

/// Requests whose predictions are kept for feedback.
pub const RECENT: usize = 4096;
/// The reservoir sample holds at most this many bytes of inputs, whatever the policy's size.
pub const MAX_RESERVOIR_BYTES: usize = 2 << 20;
/// Requests with more input bytes than this are never kept in the reservoir.
pub const MAX_SAMPLE_BYTES: usize = 256 << 10;
/// Input bytes per uploaded part (well under the MQTT payload limit).
const PART_BYTES: usize = 512 << 10;

/// What is read from a request before the runtime consumes its inputs.
pub struct Observation {
    pending: Pending,
    /// Reservoir slot and the inputs to keep there, when this request was drawn.
    keep: Option<(usize, Vec<SampleTensor>)>,
}

/// Algorithm R over requests: each of the `seen` requests so far is in the sample with equal
/// probability `size / seen`.
struct Reservoir {
    size: usize,
    seen: u64,
    items: Vec<Sample>,
    rng: u64,
}

impl Reservoir {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The slot for the next request, if it is drawn (`bytes`: its input size).
    fn draw(&mut self, bytes: usize) -> Option<usize> {
        if self.size == 0 || bytes > MAX_SAMPLE_BYTES {
            return None;
        }
        let size = self.size.min(MAX_RESERVOIR_BYTES / bytes.max(1)).max(1);
        self.seen += 1;
        if self.items.len() < size {
            return Some(self.items.len());
        }
        let j = (self.next() % self.seen) as usize;
        (j < size).then_some(j)
    }
}

/// The runtime's tensors, looked up by name without building views of all of them.
struct RuntimeTensors<'a>(&'a [Tensor]);

impl Tensors for RuntimeTensors<'_> {
    fn tensor(&self, name: &str) -> Option<flotilla_drift::TensorView<'_>> {
        self.0.iter().find(|t| t.name == name).map(Tensor::drift_view)
    }
}

fn sample_tensor(t: &Tensor) -> SampleTensor {
    SampleTensor {
        name: t.name.clone(),
        datatype: t.data.dtype().as_str().into(),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        data: t.data.to_le_bytes(),
    }
}

pub struct ModelDrift {
    pub profile: Profile,
    model: String,
    version: u64,
    state: Mutex<WindowState>,
}

struct WindowState {
    live: Live,
    start_ms: u64,
    recent: HashMap<String, Vec<u32>>,
    order: VecDeque<String>,
    /// Closed windows waiting to be queued in the outbox.
    ready: Vec<DriftReport>,
    reservoir: Reservoir,
}

/// What feedback matched.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FeedbackOutcome {
    pub matched: u64,
    pub correct: u64,
}

impl ModelDrift {
    /// From the bundle's `baseline` artifact (checked: it is bundle content, but a bad profile
    /// must not take the agent down).
    pub fn from_profile_json(model: &str, version: u64, bytes: &[u8], now_ms: u64) -> anyhow::Result<ModelDrift> {
        let mut profile: Profile = serde_json::from_slice(bytes)?;
        profile.validate()?;
        let live = Live::new(&profile);
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for the reservoir: {e}"))?;
        let reservoir = Reservoir {
            size: profile.config.sample.as_ref().map_or(0, |p| p.size as usize),
            seen: 0,
            items: Vec::new(),
            rng: u64::from_le_bytes(seed) | 1,
        };
        Ok(ModelDrift {
            profile,
            model: model.into(),
            version,
            state: Mutex::new(WindowState {
                live,
                start_ms: now_ms,
                recent: HashMap::new(),
                order: VecDeque::new(),
                ready: Vec::new(),
                reservoir,
            }),
        })
    }

    /// Input signal values (and the inputs themselves, when the reservoir draws this request),
    /// read before the inputs go to the runtime.
    pub fn read_inputs(&self, inputs: &[Tensor]) -> Observation {
        let pending = self.profile.read_inputs(&RuntimeTensors(inputs));
        let keep = if self.profile.config.sample.is_some() {
            let bytes: usize = inputs.iter().map(|t| t.data.len() * t.data.dtype().size()).sum();
            let slot = self.state.lock().expect("drift lock").reservoir.draw(bytes);
            slot.map(|i| (i, inputs.iter().map(sample_tensor).collect()))
        } else {
            None
        };
        Observation { pending, keep }
    }

    /// Records one successful inference.
    pub fn record(&self, obs: Observation, outputs: &[Tensor], request_id: Option<&str>, now_ms: u64) {
        let mut st = self.state.lock().expect("drift lock");
        self.roll_if_due(&mut st, now_ms);
        // Predictions are kept for feedback (by request id) and for the reservoir.
        let want = request_id.is_some() || obs.keep.is_some();
        let predicted = st.live.record(&self.profile, &obs.pending, &RuntimeTensors(outputs), want);
        if let Some((slot, inputs)) = obs.keep {
            let sample = Sample {
                id: request_id.unwrap_or_default().to_string(),
                ts: now_ms,
                inputs,
                predicted: predicted.clone(),
                labels: None,
            };
            let items = &mut st.reservoir.items;
            if slot < items.len() {
                items[slot] = sample;
            } else {
                items.push(sample);
            }
        }
        if let Some(id) = request_id
            && !predicted.is_empty()
        {
            if st.order.len() == RECENT
                && let Some(old) = st.order.pop_front()
            {
                st.recent.remove(&old);
            }
            if st.recent.insert(id.to_string(), predicted).is_none() {
                st.order.push_back(id.to_string());
            }
        }
        if let Window::Count(n) = self.profile.config.window
            && st.live.inferences >= n
        {
            self.close(&mut st, now_ms);
        }
    }

    /// Ground truth for an earlier request: one label per sample of that request.
    pub fn feedback(&self, request_id: &str, labels: &[u32]) -> Option<FeedbackOutcome> {
        let mut st = self.state.lock().expect("drift lock");
        let predicted = st.recent.get(request_id)?.clone();
        let mut out = FeedbackOutcome::default();
        for (p, l) in predicted.iter().zip(labels) {
            st.live.feedback(&self.profile, p == l);
            out.matched += 1;
            out.correct += u64::from(p == l);
        }
        if let Some(s) = st.reservoir.items.iter_mut().find(|s| s.id == request_id) {
            s.labels = Some(labels.to_vec());
        }
        Some(out)
    }

    /// The reservoir sample, in parts of about [`PART_BYTES`] of inputs (one empty part when
    /// there is none).
    pub fn sample_batches(&self, upload_id: &str) -> Vec<SampleBatch> {
        let st = self.state.lock().expect("drift lock");
        let mut parts: Vec<Vec<Sample>> = vec![Vec::new()];
        let mut bytes = 0;
        for s in &st.reservoir.items {
            let n: usize = s.inputs.iter().map(|t| t.data.len()).sum();
            if bytes + n > PART_BYTES && !parts.last().is_some_and(Vec::is_empty) {
                parts.push(Vec::new());
                bytes = 0;
            }
            bytes += n;
            parts.last_mut().expect("a part").push(s.clone());
        }
        let count = parts.len();
        parts
            .into_iter()
            .enumerate()
            .map(|(i, samples)| SampleBatch {
                upload_id: upload_id.into(),
                model: self.model.clone(),
                version: self.version,
                part: i as u32,
                last: i + 1 == count,
                samples,
            })
            .collect()
    }

    /// Closes a time window that has ended; returns the windows ready to send.
    pub fn take_ready(&self, now_ms: u64) -> Vec<DriftReport> {
        let mut st = self.state.lock().expect("drift lock");
        self.roll_if_due(&mut st, now_ms);
        std::mem::take(&mut st.ready)
    }

    /// Closes the open window now whatever its kind (at shutdown), returning everything ready.
    pub fn flush(&self, now_ms: u64) -> Vec<DriftReport> {
        let mut st = self.state.lock().expect("drift lock");
        self.close(&mut st, now_ms);
        std::mem::take(&mut st.ready)
    }

    fn window_end(&self, start_ms: u64) -> Option<u64> {
        match self.profile.config.window {
            Window::Seconds(s) => {
                let w = s.saturating_mul(1000).max(1);
                Some((start_ms / w + 1) * w)
            }
            Window::Count(_) => None,
        }
    }

    fn roll_if_due(&self, st: &mut WindowState, now_ms: u64) {
        if let Some(end) = self.window_end(st.start_ms)
            && now_ms >= end
        {
            self.close_at(st, end, now_ms);
        }
    }

    fn close(&self, st: &mut WindowState, now_ms: u64) {
        let end = self.window_end(st.start_ms).map_or(now_ms, |e| e.min(now_ms.max(st.start_ms)));
        self.close_at(st, end, now_ms);
    }

    /// Ends the window at `end`; the next one starts at `next_start`.
    fn close_at(&self, st: &mut WindowState, end: u64, next_start: u64) {
        let live = std::mem::replace(&mut st.live, Live::new(&self.profile));
        if !live.is_empty() {
            st.ready.push(DriftReport {
                model: self.model.clone(),
                version: self.version,
                window_start: st.start_ms,
                window_end: end,
                inferences: live.inferences,
                signals: self
                    .profile
                    .signals
                    .iter()
                    .zip(live.sketches)
                    .map(|(sp, sketch)| SignalSketch { name: sp.signal.name.clone(), sketch })
                    .collect(),
            });
        }
        st.start_ms = next_start.max(end);
    }
}

/// Queues every closed window in the outbox, once a second, and each model's health every
/// `health_interval_secs` while it serves inferences.
pub async fn run(ctx: std::sync::Arc<crate::Ctx>, cancel: tokio_util::sync::CancellationToken) {
    let send = |ctx: &crate::Ctx, reports: Vec<DriftReport>| {
        for r in reports {
            tracing::debug!(model = %r.model, version = r.version, inferences = r.inferences, "drift window closed");
            crate::outbox::push_telemetry(ctx, flotilla_proto::Telemetry::Drift(r));
        }
    };
    let mut since_health = 0u64;
    // Runs reported last, per (model, version): a model with no new inference sends nothing.
    let mut reported: std::collections::HashMap<(String, u64), u64> = Default::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        for m in ctx.registry.all() {
            if let Some(d) = &m.drift {
                send(&ctx, d.take_ready(crate::unix_now_ms()));
            }
        }
        since_health += 1;
        if since_health >= ctx.cfg.health_interval_secs.max(1) {
            since_health = 0;
            for m in ctx.registry.all() {
                let report = {
                    let w = m.watch.lock().expect("watch lock");
                    let key = (m.name.clone(), m.version);
                    if w.runs == 0 || reported.get(&key) == Some(&w.runs) {
                        continue;
                    }
                    reported.insert(key, w.runs);
                    flotilla_proto::HealthReport {
                        model: m.name.clone(),
                        version: m.version,
                        inferences: w.runs,
                        errors: w.errors,
                        latency_p95_us: w.p95_us(),
                        backend: m.backend().to_string(),
                        accelerator_fallback: m.manifest.runtime.delegate.is_some() && !m.backend().contains('+'),
                    }
                };
                crate::outbox::push_telemetry(&ctx, flotilla_proto::Telemetry::Health(report));
            }
        }
    }
}

/// Answers the control plane's request for a model's reservoir sample, through the outbox.
pub fn upload_samples(ctx: &crate::Ctx, req: &flotilla_proto::SampleRequest) {
    let Some(m) = ctx.registry.get(&req.model) else {
        tracing::warn!(model = %req.model, "sample upload requested for a model not installed here");
        return;
    };
    if req.version.is_some_and(|v| v != m.version) {
        tracing::warn!(model = %req.model, active = m.version, "sample upload requested for a version not active here");
        return;
    }
    let batches = match &m.drift {
        Some(d) => d.sample_batches(&req.upload_id),
        None => vec![SampleBatch {
            upload_id: req.upload_id.clone(),
            model: m.name.clone(),
            version: m.version,
            part: 0,
            last: true,
            samples: vec![],
        }],
    };
    for b in batches {
        crate::outbox::push_telemetry(ctx, flotilla_proto::Telemetry::Samples(b));
    }
}

/// Closes and queues every open window now (a clean stop).
pub fn flush_all(ctx: &crate::Ctx) {
    for m in ctx.registry.all() {
        if let Some(d) = &m.drift {
            for r in d.flush(crate::unix_now_ms()) {
                crate::outbox::push_telemetry(ctx, flotilla_proto::Telemetry::Drift(r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_drift::{Collector, DriftConfig, Kind, Signal, Source};
    use flotilla_runtime::TensorData;

    fn drift(window: Window) -> ModelDrift {
        let signals = vec![
            (
                Signal {
                    name: "x.mean".into(),
                    source: Source::InputMean { tensor: "x".into() },
                    kind: Kind::Continuous,
                },
                0,
            ),
            (Signal { name: "class".into(), source: Source::Class { output: "y".into() }, kind: Kind::Categorical }, 2),
            (Signal { name: "accuracy".into(), source: Source::Accuracy, kind: Kind::Categorical }, 2),
        ];
        let mut c = Collector::new(signals);
        let x = [0.0f32, 1.0, 2.0, 3.0];
        let y = [0.1f32, 0.9, 0.8, 0.2];
        let xt = Tensor::new("x", vec![2, 2], TensorData::F32(x.to_vec())).unwrap();
        let yt = Tensor::new("y", vec![2, 2], TensorData::F32(y.to_vec())).unwrap();
        c.observe(&[xt.drift_view()], &[yt.drift_view()]);
        let profile = c.finish(DriftConfig { window, ..DriftConfig::default() }, 4).unwrap();
        ModelDrift::from_profile_json("m", 3, &serde_json::to_vec(&profile).unwrap(), 10_500).unwrap()
    }

    fn infer(d: &ModelDrift, id: &str, now_ms: u64) {
        let x = Tensor::new("x", vec![1, 2], TensorData::F32(vec![1.0, 2.0])).unwrap();
        let y = Tensor::new("y", vec![1, 2], TensorData::F32(vec![0.3, 0.7])).unwrap();
        let p = d.read_inputs(&[x]);
        d.record(p, &[y], Some(id), now_ms);
    }

    #[test]
    fn time_windows_align_and_skip_empty_ones() {
        let d = drift(Window::Seconds(10));
        infer(&d, "a", 11_000);
        infer(&d, "b", 19_999);
        assert!(d.take_ready(19_999).is_empty());
        let r = d.take_ready(20_000);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].window_start, r[0].window_end, r[0].inferences), (10_500, 20_000, 2));
        assert_eq!(r[0].signals[0].sketch.count(), 2);
        // Nothing happened for three windows: nothing is sent; the next starts where time is.
        assert!(d.take_ready(55_000).is_empty());
        infer(&d, "c", 55_001);
        let r = d.take_ready(60_000);
        assert_eq!((r[0].window_start, r[0].window_end), (55_000, 60_000));
    }

    #[test]
    fn count_windows_close_on_the_nth_inference_and_feedback_feeds_accuracy() {
        let d = drift(Window::Count(3));
        infer(&d, "a", 1);
        infer(&d, "b", 2);
        assert_eq!(d.feedback("a", &[1]), Some(FeedbackOutcome { matched: 1, correct: 1 }));
        assert_eq!(d.feedback("b", &[0]), Some(FeedbackOutcome { matched: 1, correct: 0 }));
        assert_eq!(d.feedback("nope", &[0]), None);
        infer(&d, "c", 3);
        let r = d.take_ready(4);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].inferences, 3);
        let acc = &r[0].signals[2].sketch;
        assert_eq!((acc.count(), acc.moments.sum), (2, 1.0));
        infer(&d, "d", 5);
        let r = d.flush(6);
        assert_eq!((r.len(), r[0].inferences, r[0].window_end), (1, 1, 6));
    }
}
