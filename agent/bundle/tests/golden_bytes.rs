//! The canonical encoding of a fixed manifest and trust root is pinned by committed files: any
//! change to the signed bytes (field names, order, integer or float widths) fails here, because
//! it would invalidate every signature in the field. Refresh deliberately with
//! `FLOTILLA_BLESS=1 cargo test -p flotilla-bundle --test golden_bytes` (and bump the schema).

use std::path::PathBuf;

use flotilla_bundle::canonical;
use flotilla_bundle::manifest::{
    Artifact, DType, Dim, Encoding, HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat,
    ModelSignature, Role, RuntimeSettings, Target, TensorSpec,
};
use flotilla_bundle::root::{Root, sign_root};
use flotilla_bundle::verify::decode_manifest;
use flotilla_bundle::{SecretKey, TrustedRoot};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn check(name: &str, bytes: &[u8]) {
    let path = data(name);
    if std::env::var_os("FLOTILLA_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|_| panic!("{} missing: run with FLOTILLA_BLESS=1", path.display()));
    assert_eq!(bytes, want.as_slice(), "canonical bytes of {name} changed");
}

fn manifest() -> Manifest {
    Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: "digits".into(),
        version: 3,
        created: 1_800_000_000,
        expires: Some(1_900_000_000),
        model: ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![TensorSpec {
                name: "input".into(),
                dtype: DType::F32,
                shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(1), Dim::Fixed(8), Dim::Fixed(8)],
            }],
            outputs: vec![TensorSpec {
                name: "probabilities".into(),
                dtype: DType::F32,
                shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(10)],
            }],
        },
        artifacts: vec![Artifact {
            name: "model".into(),
            role: Role::Model,
            media_type: "application/onnx".into(),
            encoding: Encoding::Zstd,
            offset: 0,
            stored_size: 1234,
            stored_sha256: "ab".repeat(32),
            size: 6626,
            sha256: "cd".repeat(32),
            full: None,
        }],
        target: Target { arch: vec!["aarch64".into()], min_agent_version: None, accelerator: None },
        runtime: RuntimeSettings {
            backends: vec!["tract-onnx".into()],
            threads: Some(1),
            delegate: None,
            accelerator_required: false,
        },
        health: HealthChecks {
            golden_tolerance: 1e-4,
            latency_budget_us: Some(50_000),
            warmup_runs: 2,
            ..HealthChecks::default()
        },
    }
}

#[test]
fn manifest_bytes_are_pinned() {
    let bytes = canonical::to_vec(&manifest()).unwrap();
    check("manifest-v1.cbor", &bytes);
    assert_eq!(decode_manifest(&bytes).unwrap(), manifest());
}

#[test]
fn root_bytes_are_pinned_and_verify() {
    // ed25519 signatures are deterministic, so a fixed key gives fixed bytes.
    let k = SecretKey::from_seed([42; 32]);
    let bytes = sign_root(&Root::single_key(&k.public(), 1_800_000_000, None), &[&k]).unwrap();
    check("root-v1.cbor", &bytes);
    let t = TrustedRoot::anchor(&bytes, 1_800_000_001).unwrap();
    assert_eq!(t.to_bytes(), bytes);
}
