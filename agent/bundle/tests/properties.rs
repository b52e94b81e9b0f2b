//! Property tests: canonical encoding is a fixed point, and delta artifacts round-trip.

use flotilla_bundle::canonical;
use flotilla_bundle::format::{extract_artifact_to_vec, parse_envelope};
use flotilla_bundle::manifest::{
    DType, Dim, HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature, Role,
    RuntimeSettings, Target, TensorSpec,
};
use flotilla_bundle::verify::decode_manifest;
use flotilla_bundle::writer::{ArtifactInput, write_bundle};
use proptest::prelude::*;

fn dim() -> impl Strategy<Value = Dim> {
    prop_oneof![any::<u64>().prop_map(Dim::Fixed), "[A-Za-z_][A-Za-z0-9_]{0,8}".prop_map(Dim::Symbolic)]
}

fn tensor() -> impl Strategy<Value = TensorSpec> {
    (
        "[a-z][a-z0-9_:./]{0,20}",
        prop::sample::select(vec![DType::F32, DType::I64, DType::U8, DType::Bool]),
        prop::collection::vec(dim(), 0..5),
    )
        .prop_map(|(name, dtype, shape)| TensorSpec { name, dtype, shape })
}

prop_compose! {
    fn manifest()(
        name in "[a-z0-9][a-z0-9._-]{0,30}",
        version in any::<u64>(),
        created in any::<u64>(),
        expires in proptest::option::of(any::<u64>()),
        inputs in prop::collection::vec(tensor(), 0..4),
        outputs in prop::collection::vec(tensor(), 0..4),
        arch in prop::collection::vec("[a-z0-9_]{1,10}", 0..3),
        backends in prop::collection::vec("[a-z-]{1,12}", 0..3),
        threads in proptest::option::of(any::<u32>()),
        tolerance in any::<f64>().prop_filter("finite", |f| f.is_finite()),
        budget in proptest::option::of(any::<u64>()),
        warmup in any::<u32>(),
    ) -> Manifest {
        Manifest {
            kind: MANIFEST_TYPE.into(),
            schema: MANIFEST_SCHEMA,
            name, version, created, expires,
            model: ModelSignature { format: ModelFormat::Onnx, inputs, outputs },
            artifacts: vec![],
            target: Target { arch, min_agent_version: None, accelerator: None },
            runtime: RuntimeSettings { backends, threads, delegate: None, accelerator_required: false },
            health: HealthChecks { golden_tolerance: tolerance, latency_budget_us: budget, warmup_runs: warmup, ..HealthChecks::default() },
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn canonical_encoding_is_a_fixed_point(m in manifest()) {
        let a = canonical::to_vec(&m).unwrap();
        let back: Manifest = canonical::from_slice("manifest", &a, 1 << 20).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(canonical::to_vec(&back).unwrap(), a);
    }

    #[test]
    fn delta_artifacts_round_trip(
        base in prop::collection::vec(any::<u8>(), 1..4096),
        at in any::<prop::sample::Index>(),
        cut in 0usize..64,
        insert in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // The new content: the base with one region replaced (as retraining a layer would).
        let i = at.index(base.len());
        let mut content = base[..i].to_vec();
        content.extend_from_slice(&insert);
        content.extend_from_slice(&base[(i + cut).min(base.len())..]);
        let inputs = [ArtifactInput {
            name: "model".into(), role: Role::Model, media_type: "application/onnx".into(),
            content: content.clone(), delta_base: Some(base.clone()), with_full: true,
        }];
        let mut m = Manifest {
            kind: MANIFEST_TYPE.into(), schema: MANIFEST_SCHEMA, name: "m".into(), version: 1, created: 1, expires: None,
            model: ModelSignature { format: ModelFormat::Onnx, inputs: vec![], outputs: vec![] },
            artifacts: vec![], target: Default::default(), runtime: Default::default(), health: HealthChecks::default(),
        };
        let mut bundle = Vec::new();
        m = write_bundle(m, &inputs, 3, &mut bundle).unwrap();
        let (doc, off) = parse_envelope(&bundle).unwrap();
        prop_assert_eq!(decode_manifest(&doc.signed).unwrap(), m.clone());
        let a = &m.artifacts[0];
        let mut f = std::io::Cursor::new(&bundle);
        prop_assert_eq!(extract_artifact_to_vec(&mut f, off, a, Some(&base), 1 << 20).unwrap(), content.clone());
        // Without the base, or with another one, the artifact is refused, never mis-decoded.
        prop_assert!(extract_artifact_to_vec(&mut f, off, a, None, 1 << 20).is_err());
        let mut other = base.clone();
        other[0] ^= 1;
        prop_assert!(extract_artifact_to_vec(&mut f, off, a, Some(&other), 1 << 20).is_err());
        // The full form in the same bundle decodes to the same content with no base at all.
        let full = a.full_form().expect("written with the full form");
        prop_assert_eq!(extract_artifact_to_vec(&mut f, off, &full, None, 1 << 20).unwrap(), content);
    }
}
