//! Payload bodies. Adding an optional field is compatible; anything else bumps [`crate::SCHEMA`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sent on every connect: who the device is and what it can run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_version: String,
    pub arch: String,
    pub os: String,
    pub cores: u32,
    pub memory_bytes: u64,
    /// Backends this agent can run (`tract-onnx`, `tflite`, ...).
    pub runtimes: Vec<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Version of the trust root the device holds (the control plane sends newer ones).
    #[serde(default)]
    pub root_version: Option<u64>,
    /// TFLite delegates bundles may ask for here (`xnnpack`, configured external ones).
    #[serde(default)]
    pub delegates: Vec<String>,
}

/// Retained per device. The last will is `State { online: false, models: None }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub online: bool,
    /// None means "unchanged" (the last will cannot know the models).
    #[serde(default)]
    pub models: Option<Vec<ModelState>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub name: String,
    pub version: u64,
    /// Hex SHA-256 of the signed manifest bytes.
    pub manifest_sha256: String,
    /// The backend that actually runs it, e.g. `tract-onnx`.
    pub backend: String,
    /// Hex SHA-256 of the model content: what a delta bundle's base must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
    /// With a delegate: graph nodes it runs and nodes left on the CPU kernels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated_nodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_nodes: Option<u64>,
    /// The self-test the model passed before it served (`golden` or `smoke`) and its median
    /// latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test_median_us: Option<u64>,
    /// `baking` while the watchdog still judges it, then `active`.
    pub status: String,
}

/// Install progress and results; the acknowledgement of every command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The offer's manifest verified and the download started (or resumed).
    InstallAccepted {
        offer_id: String,
        name: String,
        version: u64,
    },
    InstallProgress {
        offer_id: String,
        received: u64,
        total: u64,
    },
    /// Verified, self-tested and active.
    InstallSucceeded {
        offer_id: String,
        name: String,
        version: u64,
        backend: String,
        self_test_ms: u64,
    },
    /// Nothing changed on the device: the previous model (if any) is still active.
    InstallFailed {
        offer_id: String,
        name: String,
        version: u64,
        stage: InstallStage,
        reason: String,
    },
    /// The device now trusts this root version (persisted).
    TrustRootAccepted {
        version: u64,
    },
    /// A root (chain) was refused; the device keeps the root it had.
    TrustRootRefused {
        version: u64,
        reason: String,
    },
    /// The device holds a new certificate (`how`: claim, renewal).
    CertificateRenewed {
        serial: String,
        not_after: i64,
        how: String,
    },
    /// The device's certificate ended before it could renew it (offline too long): it cannot
    /// connect until it is given a new one (a claim token, or a personalised certificate).
    CertificateExpired {
        serial: String,
        not_after: i64,
    },
    /// A certificate the control plane sent was not usable (wrong device, wrong key, not the
    /// fleet CA's).
    CertificateRefused {
        reason: String,
    },
    /// The device went back to the previous version of a model on its own (the active one
    /// failed to verify, load or self-test at start, or its watchdog tripped).
    ModelRolledBack {
        name: String,
        from_version: u64,
        to_version: u64,
        reason: String,
    },
    /// The outbox overflowed: `total` messages dropped since the device was set up.
    TelemetryDropped {
        total: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallStage {
    Offered,
    Downloading,
    Verifying,
    Staged,
    SelfTesting,
    Activating,
}

impl InstallStage {
    pub fn as_str(self) -> &'static str {
        match self {
            InstallStage::Offered => "offered",
            InstallStage::Downloading => "downloading",
            InstallStage::Verifying => "verifying",
            InstallStage::Staged => "staged",
            InstallStage::SelfTesting => "self_testing",
            InstallStage::Activating => "activating",
        }
    }
}

/// Control plane → device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Install(InstallOffer),
    /// Newer trust roots: each must follow the one before it (N → N+1 → ...). Devices skip
    /// versions they already hold.
    TrustRoots(TrustRoots),
    /// Send the reservoir sample of a model (only kept when its bundle's drift policy allows).
    UploadSamples(SampleRequest),
    /// Go back to the previous version of a model if `from_version` is the active one (a
    /// rollout's gate failed). Answered with `ModelRolledBack`.
    Rollback(RollbackCommand),
    /// The certificate signed for the device's renewal request (PEM, leaf first).
    Certificate(CertificateIssued),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateIssued {
    pub certificate: String,
}

/// Device → control plane on the `csr` channel: renew my certificate (the key stays here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertificateRequest {
    pub csr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackCommand {
    pub model: String,
    pub from_version: u64,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRequest {
    pub upload_id: String,
    pub model: String,
    /// Only if this version is the active one (None: whichever is).
    #[serde(default)]
    pub version: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrustRoots {
    pub roots: Vec<serde_bytes::ByteBuf>,
}

/// An offer to install a bundle. It carries the signed envelope so the device can refuse an
/// untrusted bundle before downloading a byte of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstallOffer {
    /// Idempotency key: the same offer id twice is one install.
    pub offer_id: String,
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// Hex SHA-256 of the whole bundle file as served (what chunks address).
    pub bundle_id: String,
    pub name: String,
    pub version: u64,
    pub size: u64,
    /// The bundle's header and envelope bytes (signed manifest + signatures).
    #[serde(with = "serde_bytes")]
    pub head: Vec<u8>,
    pub chunk_size: u32,
    /// HTTP(S) URL serving the same bytes with Range support, when there is one.
    #[serde(default)]
    pub url: Option<String>,
    /// The server saw this device report the base of the bundle's delta artifacts: fetch the
    /// patches. Otherwise the device fetches the full forms (it may still use a patch whose base
    /// it holds when the bundle carries no full form).
    #[serde(default)]
    pub delta: bool,
}

/// Device asks for `len` bytes of a bundle at `offset`; answered on the device's chunk topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub bundle_id: String,
    pub offset: u64,
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub bundle_id: String,
    pub offset: u64,
    pub total: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Set when the request could not be served (unknown bundle, bad range).
    #[serde(default)]
    pub error: Option<String>,
}

/// Device → control plane on the metrics channel, through the device's outbox (so a report
/// made offline arrives later with its own window times).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Telemetry {
    Drift(DriftReport),
    /// Part of a reservoir sample, sent on request.
    Samples(SampleBatch),
    /// How a model version has been doing since it became active (what rollout gates judge).
    Health(HealthReport),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub model: String,
    pub version: u64,
    /// Since the version became active in this process.
    pub inferences: u64,
    pub errors: u64,
    /// Over the latest inferences (up to 1024).
    pub latency_p95_us: Option<u64>,
    pub backend: String,
    /// The bundle asked for a delegate and the model runs without it.
    #[serde(default)]
    pub accelerator_fallback: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleBatch {
    pub upload_id: String,
    pub model: String,
    pub version: u64,
    /// Parts count from 0; `last` marks the final one (an empty reservoir sends one empty part).
    pub part: u32,
    pub last: bool,
    pub samples: Vec<Sample>,
}

/// One inference kept for retraining: its inputs, what the model answered, and the true label
/// if feedback gave one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The request id (feedback names it).
    pub id: String,
    /// Milliseconds since the epoch, by the device's clock.
    pub ts: u64,
    pub inputs: Vec<SampleTensor>,
    /// Predicted class per sample of the request.
    #[serde(default)]
    pub predicted: Vec<u32>,
    /// True class per sample, when feedback arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<u32>>,
}

/// A tensor as raw little-endian bytes of its Open Inference Protocol datatype.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleTensor {
    pub name: String,
    /// `FP32`, `INT64`, ...
    pub datatype: String,
    pub shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// One window of drift sketches for one model version on one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub model: String,
    pub version: u64,
    /// Milliseconds since the epoch, by the device's clock. Time windows end on multiples of
    /// their length.
    pub window_start: u64,
    pub window_end: u64,
    /// Inference calls in the window.
    pub inferences: u64,
    pub signals: Vec<SignalSketch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalSketch {
    /// The signal's name in the bundle's drift profile.
    pub name: String,
    pub sketch: flotilla_drift::Sketch,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Msg, ProtoError, decode, encode};

    #[test]
    fn codec_round_trips() {
        let offer = Msg::new(
            "m1",
            1_700_000_000_000,
            Command::Install(InstallOffer {
                offer_id: "r1/dev".into(),
                rollout_id: Some("r1".into()),
                bundle_id: "ab".repeat(32),
                name: "digits".into(),
                version: 3,
                size: 12345,
                head: vec![1, 2, 3],
                chunk_size: 262144,
                url: None,
                delta: false,
            }),
        );
        let bytes = encode(&offer);
        assert_eq!(decode::<Command>(&bytes).unwrap(), offer);

        let ev = Msg::new(
            "m2",
            5,
            Event::InstallFailed {
                offer_id: "o".into(),
                name: "n".into(),
                version: 1,
                stage: InstallStage::Verifying,
                reason: "bad signature".into(),
            },
        );
        assert_eq!(decode::<Event>(&encode(&ev)).unwrap(), ev);

        let chunk =
            Msg::new("m3", 6, Chunk { bundle_id: "x".into(), offset: 7, total: 9, data: vec![0; 300], error: None });
        let bytes = encode(&chunk);
        // Data travels as a CBOR byte string, not an array of integers.
        assert!(bytes.len() < 400, "{}", bytes.len());
        assert_eq!(decode::<Chunk>(&bytes).unwrap(), chunk);
    }

    #[test]
    fn drift_reports_and_samples_round_trip() {
        let mut sketch = flotilla_drift::Sketch::baseline(flotilla_drift::Kind::Continuous, &[0.0, 0.5, 1.0], 4, 0)
            .unwrap()
            .empty_like();
        sketch.add(0.25);
        let empty = sketch.empty_like(); // infinities in min/max survive CBOR
        let report = Msg::new(
            "d1",
            7,
            Telemetry::Drift(DriftReport {
                model: "digits".into(),
                version: 2,
                window_start: 1000,
                window_end: 2000,
                inferences: 1,
                signals: vec![
                    SignalSketch { name: "input.c0".into(), sketch },
                    SignalSketch { name: "x".into(), sketch: empty },
                ],
            }),
        );
        assert_eq!(decode::<Telemetry>(&encode(&report)).unwrap(), report);
        let batch = Msg::new(
            "s1",
            8,
            Telemetry::Samples(SampleBatch {
                upload_id: "u".into(),
                model: "digits".into(),
                version: 2,
                part: 0,
                last: true,
                samples: vec![Sample {
                    id: "r".into(),
                    ts: 9,
                    inputs: vec![SampleTensor {
                        name: "input".into(),
                        datatype: "FP32".into(),
                        shape: vec![1, 2],
                        data: vec![0; 8],
                    }],
                    predicted: vec![3],
                    labels: Some(vec![3]),
                }],
            }),
        );
        assert_eq!(decode::<Telemetry>(&encode(&batch)).unwrap(), batch);
    }

    #[test]
    fn newer_schema_and_garbage_are_refused() {
        let mut m = Msg::new("m", 1, FetchRequest { bundle_id: "b".into(), offset: 0, len: 1 });
        m.v = 99;
        assert!(matches!(decode::<FetchRequest>(&encode(&m)), Err(ProtoError::Schema { found: 99, .. })));
        assert!(matches!(decode::<FetchRequest>(&[0xff, 0x00, 0x13]), Err(ProtoError::Malformed(_))));
        let ok = Msg::new("m", 1, FetchRequest { bundle_id: "b".into(), offset: 0, len: 1 });
        // A message of the wrong type is malformed, not misread.
        assert!(matches!(decode::<Chunk>(&encode(&ok)), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn oversized_payload_is_refused_before_parsing() {
        let big = vec![0u8; crate::MAX_PAYLOAD + 1];
        assert!(matches!(decode::<Hello>(&big), Err(ProtoError::TooLarge { .. })));
    }
}
