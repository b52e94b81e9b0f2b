//! The committed seed corpus of the `mqtt_payloads` fuzz target (`fuzz/corpus/mqtt_payloads`):
//! one encoded message of every type. Checked here to decode; regenerated with
//! `FLOTILLA_BLESS=1 cargo test -p flotilla-proto --test fuzz_seeds`.

use std::collections::BTreeMap;

use flotilla_proto::*;

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let offer = InstallOffer {
        offer_id: "r-1/dev-0".into(),
        rollout_id: Some("r-1".into()),
        bundle_id: "ab".repeat(32),
        name: "digits".into(),
        version: 3,
        size: 7526,
        head: vec![0x46, 0x4c, 0x4f, 0x54],
        chunk_size: DEFAULT_CHUNK_SIZE,
        url: Some("http://127.0.0.1:8080/api/v1/bundles/ab".into()),
        delta: true,
    };
    vec![
        ("cmd-install", encode(&Msg::new("1", 1, Command::Install(offer)))),
        ("cmd-roots", encode(&Msg::new("2", 2, Command::TrustRoots(TrustRoots { roots: vec![vec![1, 2, 3].into()] })))),
        (
            "chunk",
            encode(&Msg::new(
                "3",
                3,
                Chunk { bundle_id: "ab".into(), offset: 0, total: 4, data: vec![1, 2, 3, 4], error: None },
            )),
        ),
        ("fetch", encode(&Msg::new("4", 4, FetchRequest { bundle_id: "ab".into(), offset: 262144, len: 262144 }))),
        (
            "hello",
            encode(&Msg::new(
                "5",
                5,
                Hello {
                    agent_version: "0.1.0".into(),
                    arch: "aarch64".into(),
                    os: "linux".into(),
                    cores: 4,
                    memory_bytes: 1 << 30,
                    runtimes: vec!["tflite".into(), "tract-onnx".into(), "tract-tflite".into()],
                    tags: BTreeMap::from([("group".into(), "lab".into())]),
                    root_version: Some(2),
                    delegates: vec!["xnnpack".into()],
                },
            )),
        ),
        (
            "state",
            encode(&Msg::new(
                "6",
                6,
                State {
                    online: true,
                    models: Some(vec![ModelState {
                        name: "digits".into(),
                        version: 3,
                        manifest_sha256: "cd".repeat(32),
                        backend: "tflite+xnnpack".into(),
                        model_sha256: Some("ef".repeat(32)),
                        delegated_nodes: Some(18),
                        cpu_nodes: Some(8),
                        self_test: None,
                        self_test_median_us: None,
                        status: "active".into(),
                    }]),
                },
            )),
        ),
        (
            "event-failed",
            encode(&Msg::new(
                "7",
                7,
                Event::InstallFailed {
                    offer_id: "r-1/dev-0".into(),
                    name: "digits".into(),
                    version: 3,
                    stage: InstallStage::Verifying,
                    reason: "digest mismatch".into(),
                },
            )),
        ),
        ("event-root", encode(&Msg::new("8", 8, Event::TrustRootAccepted { version: 2 }))),
        (
            "cmd-samples",
            encode(&Msg::new(
                "9",
                9,
                Command::UploadSamples(SampleRequest {
                    upload_id: "u-1".into(),
                    model: "digits".into(),
                    version: Some(3),
                }),
            )),
        ),
        ("telemetry-drift", encode(&Msg::new("10", 10, Telemetry::Drift(drift_report())))),
        (
            "cmd-rollback",
            encode(&Msg::new(
                "12",
                12,
                Command::Rollback(RollbackCommand {
                    model: "digits".into(),
                    from_version: 3,
                    reason: "wave 1 gate latency_p95<=1.5x failed".into(),
                }),
            )),
        ),
        (
            "telemetry-health",
            encode(&Msg::new(
                "13",
                13,
                Telemetry::Health(HealthReport {
                    model: "digits".into(),
                    version: 3,
                    inferences: 1200,
                    errors: 2,
                    latency_p95_us: Some(180),
                    backend: "tract-onnx".into(),
                    accelerator_fallback: false,
                }),
            )),
        ),
        (
            "telemetry-samples",
            encode(&Msg::new(
                "11",
                11,
                Telemetry::Samples(SampleBatch {
                    upload_id: "u-1".into(),
                    model: "digits".into(),
                    version: 3,
                    part: 0,
                    last: true,
                    samples: vec![Sample {
                        id: "r".into(),
                        ts: 11,
                        inputs: vec![SampleTensor {
                            name: "input".into(),
                            datatype: "FP32".into(),
                            shape: vec![1, 2],
                            data: vec![0; 8],
                        }],
                        predicted: vec![7],
                        labels: Some(vec![1]),
                    }],
                }),
            )),
        ),
    ]
}

fn drift_report() -> DriftReport {
    let values = [0.0, 0.1, 0.2, 0.5, 0.9, 1.0];
    let mut pixel = flotilla_drift::Sketch::baseline(flotilla_drift::Kind::Continuous, &values, 4, 0).unwrap();
    pixel.add(2.0);
    let class = flotilla_drift::Sketch::baseline(flotilla_drift::Kind::Categorical, &[1.0, 3.0], 0, 10).unwrap();
    DriftReport {
        model: "digits".into(),
        version: 3,
        window_start: 1_700_000_000_000,
        window_end: 1_700_000_060_000,
        inferences: 6,
        signals: vec![
            SignalSketch { name: "input.c0".into(), sketch: pixel },
            SignalSketch { name: "class".into(), sketch: class },
        ],
    }
}

#[test]
fn seeds_are_committed_and_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/mqtt_payloads");
    let bless = std::env::var_os("FLOTILLA_BLESS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        let p = dir.join(name);
        if bless {
            std::fs::write(&p, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&p).unwrap_or_default(),
            bytes,
            "{name} differs from its generator (FLOTILLA_BLESS=1)"
        );
        let ok = decode::<Command>(&bytes).is_ok()
            || decode::<Chunk>(&bytes).is_ok()
            || decode::<FetchRequest>(&bytes).is_ok()
            || decode::<Hello>(&bytes).is_ok()
            || decode::<State>(&bytes).is_ok()
            || decode::<Event>(&bytes).is_ok()
            || decode::<Telemetry>(&bytes).is_ok();
        assert!(ok, "{name} decodes as one of the message types");
    }
}
