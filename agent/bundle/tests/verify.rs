//! The verify path: bundles written, signed and checked the way the CLI and the agent do it.

use flotilla_bundle::format::{extract_artifact_to_vec, parse_envelope};
use flotilla_bundle::manifest::{
    HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature, Role,
};
use flotilla_bundle::root::{Root, sign_root};
use flotilla_bundle::signed::RoleKeys;
use flotilla_bundle::writer::{ArtifactInput, sign_bundle, write_bundle};
use flotilla_bundle::{Error, SecretKey, TrustedRoot};

const NOW: u64 = 1_800_000_000;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn manifest(version: u64, expires: Option<u64>) -> Manifest {
    Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: "m".into(),
        version,
        created: NOW - 10,
        expires,
        model: ModelSignature { format: ModelFormat::Onnx, inputs: vec![], outputs: vec![] },
        artifacts: vec![],
        target: Default::default(),
        runtime: Default::default(),
        health: HealthChecks::default(),
    }
}

fn unsigned(version: u64, expires: Option<u64>, model: &[u8]) -> Vec<u8> {
    let inputs = [ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: "application/onnx".into(),
        content: model.to_vec(),
        delta_base: None,
        with_full: false,
    }];
    let mut out = Vec::new();
    write_bundle(manifest(version, expires), &inputs, 3, &mut out).unwrap();
    out
}

fn signed(bundle: &[u8], keys: &[&SecretKey]) -> Vec<u8> {
    let mut cur = bundle.to_vec();
    for k in keys {
        let mut out = Vec::new();
        sign_bundle(&mut std::io::Cursor::new(&cur), k, &mut out).unwrap();
        cur = out;
    }
    cur
}

fn root_with_targets(targets: &[&SecretKey], threshold: u32) -> TrustedRoot {
    let owner = key(100);
    let mut root = Root::single_key(&owner.public(), NOW - 100, None);
    for k in targets {
        root.keys.insert(k.key_id(), k.public());
    }
    root.roles.insert("targets".into(), RoleKeys { keyids: targets.iter().map(|k| k.key_id()).collect(), threshold });
    TrustedRoot::anchor(&sign_root(&root, &[&owner]).unwrap(), NOW).unwrap()
}

fn verify(root: &TrustedRoot, bundle: &[u8]) -> Result<Vec<u8>, Error> {
    let (doc, data_offset) = parse_envelope(bundle)?;
    let v = root.verify_manifest(&doc, NOW)?;
    let a = v.manifest.artifact(Role::Model).unwrap();
    extract_artifact_to_vec(&mut std::io::Cursor::new(bundle), data_offset, a, None, 1 << 20)
}

#[test]
fn signed_bundle_verifies_and_yields_its_model() {
    let k = key(1);
    let model = b"pretend this is an onnx model".repeat(50);
    let b = signed(&unsigned(1, None, &model), &[&k]);
    assert_eq!(verify(&root_with_targets(&[&k], 1), &b).unwrap(), model);
}

#[test]
fn signing_does_not_change_the_manifest_or_data() {
    let b = unsigned(1, None, b"abc");
    let s = signed(&b, &[&key(1), &key(2)]);
    let (d1, o1) = parse_envelope(&b).unwrap();
    let (d2, o2) = parse_envelope(&s).unwrap();
    assert_eq!(d1.signed, d2.signed);
    assert_eq!(b[o1 as usize..], s[o2 as usize..]);
    assert_eq!(d2.signatures.len(), 2);
    // Signing twice with one key replaces its signature instead of adding another.
    assert_eq!(parse_envelope(&signed(&s, &[&key(1)])).unwrap().0.signatures.len(), 2);
}

#[test]
fn threshold_counts_distinct_trusted_keys() {
    let (a, b, c) = (key(1), key(2), key(3));
    let root = root_with_targets(&[&a, &b, &c], 2);
    let base = unsigned(1, None, b"model");
    let one = signed(&base, &[&a]);
    assert!(matches!(verify(&root, &one), Err(Error::ThresholdNotMet { valid: 1, threshold: 2, .. })));
    // A duplicated signature by the same key counts once.
    let (mut doc, off) = parse_envelope(&one).unwrap();
    doc.signatures.push(doc.signatures[0].clone());
    let mut dup = flotilla_bundle::format::encode_head(&doc).unwrap();
    dup.extend_from_slice(&one[off as usize..]);
    assert!(matches!(verify(&root, &dup), Err(Error::ThresholdNotMet { valid: 1, .. })));
    // An unknown key is ignored, not fatal.
    let with_outsider = signed(&base, &[&a, &key(9), &b]);
    assert!(verify(&root, &with_outsider).is_ok());
}

#[test]
fn wrong_key_is_refused_with_a_clear_error() {
    let b = signed(&unsigned(1, None, b"model"), &[&key(9)]);
    let err = verify(&root_with_targets(&[&key(1)], 1), &b).unwrap_err();
    assert!(err.to_string().contains("threshold not met for role targets"), "{err}");
    assert!(err.to_string().contains("untrusted key"), "{err}");
}

#[test]
fn flipped_bits_are_caught() {
    let k = key(1);
    let root = root_with_targets(&[&k], 1);
    let good = signed(&unsigned(1, None, &b"model bytes ".repeat(100)), &[&k]);
    let (doc, off) = parse_envelope(&good).unwrap();
    // In the data section: the stored digest fails before decompression.
    let mut bad = good.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x40;
    assert!(matches!(verify(&root, &bad), Err(Error::DigestMismatch { .. })));
    // In the signed manifest: the signature fails.
    let mut bad = good.clone();
    let at = good.windows(doc.signed.len()).position(|w| w == doc.signed.as_slice()).unwrap();
    assert!(at < off as usize);
    bad[at + doc.signed.len() / 2] ^= 0x01;
    assert!(verify(&root, &bad).is_err());
}

#[test]
fn expired_bundles_are_refused() {
    let k = key(1);
    let b = signed(&unsigned(1, Some(NOW - 1), b"m"), &[&k]);
    assert!(matches!(verify(&root_with_targets(&[&k], 1), &b), Err(Error::Expired { .. })));
    let b = signed(&unsigned(1, Some(NOW + 60), b"m"), &[&k]);
    assert!(verify(&root_with_targets(&[&k], 1), &b).is_ok());
}

#[test]
fn truncated_and_foreign_files_are_refused() {
    let b = signed(&unsigned(1, None, b"model"), &[&key(1)]);
    assert!(matches!(parse_envelope(&b[..20]), Err(Error::Truncated { .. })));
    assert!(matches!(parse_envelope(b"PK\x03\x04 not a bundle"), Err(Error::BadMagic)));
    let root = root_with_targets(&[&key(1)], 1);
    let cut = &b[..b.len() - 2];
    assert!(verify(&root, cut).is_err());
}

#[test]
fn full_forms_of_deltas_are_checked_like_any_stored_range() {
    let base = b"base model bytes ".repeat(64);
    let new = [&base[..512], b"retrained last layer", &base[512..]].concat();
    let inputs = [ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: "application/onnx".into(),
        content: new.clone(),
        delta_base: Some(base.clone()),
        with_full: true,
    }];
    let mut out = Vec::new();
    let m = write_bundle(manifest(1, None), &inputs, 3, &mut out).unwrap();
    let a = &m.artifacts[0];
    let full = a.full.clone().unwrap();
    assert_eq!(full.offset, a.stored_size, "the full form follows every patch");
    m.check().unwrap();

    // Overlapping stored ranges are refused: each stored byte belongs to one form.
    let mut overlapping = m.clone();
    overlapping.artifacts[0].full.as_mut().unwrap().offset = a.stored_size - 1;
    let err = overlapping.check().unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    // A full form on a plain artifact makes no sense.
    let mut plain = m.clone();
    plain.artifacts[0].encoding = flotilla_bundle::manifest::Encoding::Zstd;
    assert!(plain.check().unwrap_err().to_string().contains("full form"));
    // A corrupted full form is caught by its own stored digest.
    let (_, off) = parse_envelope(&out).unwrap();
    let mut bad = out.clone();
    bad[(off + full.offset + 3) as usize] ^= 1;
    let err = extract_artifact_to_vec(&mut std::io::Cursor::new(&bad), off, &a.full_form().unwrap(), None, 1 << 20)
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_eq!(
        extract_artifact_to_vec(&mut std::io::Cursor::new(&out), off, &a.full_form().unwrap(), None, 1 << 20).unwrap(),
        new
    );
}
