//! The negative (and positive) corpus in `tests/corpus/`: one directory per case, each with a
//! README line, the files involved, and `expect` (`ok` or the error kind). This test checks the
//! committed corpus, and that this generator still produces it byte for byte (keys are fixed
//! seeds, times are fixed, ed25519 and zstd are deterministic). Regenerate deliberately with
//! `FLOTILLA_BLESS=1 cargo test -p flotilla-bundle --test corpus`.
//!
//! How a case is judged, in order: `root.cbor` is anchored at the fixed time NOW; `next-root.cbor`
//! must be a valid rotation of it; `bundle.flb` must verify under the newest root, respect
//! `highest` (anti-rollback), and yield every artifact intact.

use std::path::{Path, PathBuf};

use flotilla_bundle::canonical;
use flotilla_bundle::format::{Header, encode_head, extract_artifact, parse_envelope, read_envelope};
use flotilla_bundle::manifest::{
    HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature, Role,
};
use flotilla_bundle::root::{Root, sign_root};
use flotilla_bundle::signed::{CONTEXT_MANIFEST, RoleKeys, SignatureEntry, SignedDoc};
use flotilla_bundle::verify::check_not_rollback;
use flotilla_bundle::writer::{ArtifactInput, sign_bundle, write_bundle};
use flotilla_bundle::{Error, KeyId, SecretKey, TrustedRoot};

const NOW: u64 = 1_800_000_000;
const MODEL: &[u8] = include_bytes!("../../../examples/models/digits_cnn.onnx");

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus")
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn root_single(k: &SecretKey, version: u64, expires: Option<u64>, signers: &[&SecretKey]) -> Vec<u8> {
    let mut r = Root::single_key(&k.public(), NOW - 1000, expires);
    r.version = version;
    sign_root(&r, signers).unwrap()
}

fn root_targets(targets: &[&SecretKey], threshold: u32) -> Vec<u8> {
    let owner = key(1);
    let mut r = Root::single_key(&owner.public(), NOW - 1000, None);
    for k in targets {
        r.keys.insert(k.key_id(), k.public());
    }
    r.roles.insert("targets".into(), RoleKeys { keyids: targets.iter().map(|k| k.key_id()).collect(), threshold });
    sign_root(&r, &[&owner]).unwrap()
}

fn manifest(version: u64, expires: Option<u64>) -> Manifest {
    Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: "digits".into(),
        version,
        created: NOW - 500,
        expires,
        model: ModelSignature { format: ModelFormat::Onnx, inputs: vec![], outputs: vec![] },
        artifacts: vec![],
        target: Default::default(),
        runtime: Default::default(),
        health: HealthChecks::default(),
    }
}

fn bundle(version: u64, expires: Option<u64>, keys: &[&SecretKey]) -> Vec<u8> {
    let inputs = [ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: "application/onnx".into(),
        content: MODEL.to_vec(),
        delta_base: None,
        with_full: false,
    }];
    let mut b = Vec::new();
    write_bundle(manifest(version, expires), &inputs, 3, &mut b).unwrap();
    for k in keys {
        let mut out = Vec::new();
        sign_bundle(&mut std::io::Cursor::new(&b), k, &mut out).unwrap();
        b = out;
    }
    b
}

/// Change the manifest of a valid bundle and sign it again: the signature is good, the lie is
/// in what it says.
fn resign(b: &[u8], keys: &[&SecretKey], change: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let (doc, off) = parse_envelope(b).unwrap();
    let mut m: Manifest = canonical::from_slice("manifest", &doc.signed, 1 << 20).unwrap();
    change(&mut m);
    let mut doc = SignedDoc { signed: canonical::to_vec(&m).unwrap(), signatures: vec![] };
    for k in keys {
        doc.sign(CONTEXT_MANIFEST, k);
    }
    let mut out = encode_head(&doc).unwrap();
    out.extend_from_slice(&b[off as usize..]);
    out
}

struct Case {
    name: &'static str,
    readme: &'static str,
    expect: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn cases() -> Vec<Case> {
    let (a, b, c, outsider) = (key(1), key(2), key(3), key(9));
    let root1 = root_single(&a, 1, None, &[&a]);
    let root_2of3 = root_targets(&[&a, &b, &c], 2);
    let good = bundle(1, None, &[&a]);
    let case = |name, readme, expect, files| Case { name, readme, expect, files };

    let (doc, off) = parse_envelope(&good).unwrap();
    let mut dup_doc = doc.clone();
    dup_doc.signatures.push(dup_doc.signatures[0].clone());
    let with_doc = |d: &SignedDoc| {
        let mut out = encode_head(d).unwrap();
        out.extend_from_slice(&good[off as usize..]);
        out
    };
    let mut unknown_doc = doc.clone();
    unknown_doc.signatures = vec![SignatureEntry { keyid: KeyId("ab".repeat(32)), sig: vec![7; 64] }];
    let mut flipped_manifest = good.clone();
    let at = good.windows(doc.signed.len()).position(|w| w == doc.signed.as_slice()).unwrap();
    flipped_manifest[at + doc.signed.len() / 2] ^= 0x04;
    let mut flipped_artifact = good.clone();
    let n = flipped_artifact.len();
    flipped_artifact[n - 100] ^= 0x10;
    let mut oversized = good.clone();
    oversized[10..14].copy_from_slice(&Header { envelope_len: u32::MAX }.encode()[10..14]);
    let b_v2 = {
        let mut r = Root::single_key(&b.public(), NOW - 900, None);
        r.version = 2;
        r
    };

    vec![
        case(
            "valid-single-key",
            "a bundle signed by the one key of a single-key root",
            "ok",
            vec![("root.cbor", root1.clone()), ("bundle.flb", good.clone())],
        ),
        case(
            "valid-threshold-2-of-3",
            "targets threshold 2 of 3, signed by two distinct targets keys",
            "ok",
            vec![("root.cbor", root_2of3.clone()), ("bundle.flb", bundle(1, None, &[&a, &c]))],
        ),
        case(
            "valid-rotation",
            "root v2 signed by v1's root key and its own new root key",
            "ok",
            vec![("root.cbor", root1.clone()), ("next-root.cbor", sign_root(&b_v2, &[&a, &b]).unwrap())],
        ),
        case(
            "valid-same-version-reinstall",
            "the version already accepted may be offered again (idempotent)",
            "ok",
            vec![("root.cbor", root1.clone()), ("bundle.flb", good.clone()), ("highest", b"1".to_vec())],
        ),
        case(
            "wrong-key",
            "signed only by a key the root does not list",
            "ThresholdNotMet",
            vec![("root.cbor", root1.clone()), ("bundle.flb", bundle(1, None, &[&outsider]))],
        ),
        case(
            "below-threshold",
            "targets threshold 2, one signature",
            "ThresholdNotMet",
            vec![("root.cbor", root_2of3.clone()), ("bundle.flb", bundle(1, None, &[&a]))],
        ),
        case(
            "duplicate-signatures",
            "threshold 2 met only by counting one key's signature twice",
            "ThresholdNotMet",
            vec![("root.cbor", root_2of3.clone()), ("bundle.flb", with_doc(&dup_doc))],
        ),
        case(
            "unknown-key-id-only",
            "the only signature names a key id the root does not know",
            "ThresholdNotMet",
            vec![("root.cbor", root1.clone()), ("bundle.flb", with_doc(&unknown_doc))],
        ),
        case(
            "expired",
            "the bundle's signed expiry is before the trusted time",
            "Expired",
            vec![("root.cbor", root1.clone()), ("bundle.flb", bundle(1, Some(NOW - 1), &[&a]))],
        ),
        case(
            "expired-root",
            "the trust root itself has expired",
            "Expired",
            vec![("root.cbor", root_single(&a, 1, Some(NOW - 1), &[&a])), ("bundle.flb", good.clone())],
        ),
        case(
            "version-rollback",
            "version 3 offered after version 5 was accepted",
            "Rollback",
            vec![("root.cbor", root1.clone()), ("bundle.flb", bundle(3, None, &[&a])), ("highest", b"5".to_vec())],
        ),
        case(
            "rotation-skipping-signature",
            "root v2 signed only by its new key, not by v1's root key",
            "ThresholdNotMet",
            vec![("root.cbor", root1.clone()), ("next-root.cbor", sign_root(&b_v2, &[&b]).unwrap())],
        ),
        case(
            "root-going-backwards",
            "root v1 offered as the successor of root v2",
            "Rotation",
            vec![("root.cbor", sign_root(&b_v2, &[&a, &b]).unwrap()), ("next-root.cbor", root1.clone())],
        ),
        case(
            "truncated",
            "the file ends in the middle of the model artifact",
            "Truncated",
            vec![("root.cbor", root1.clone()), ("bundle.flb", good[..good.len() / 2].to_vec())],
        ),
        case(
            "flipped-bit-manifest",
            "one bit flipped inside the signed manifest",
            "ThresholdNotMet",
            vec![("root.cbor", root1.clone()), ("bundle.flb", flipped_manifest)],
        ),
        case(
            "flipped-bit-artifact",
            "one bit flipped inside the model's stored bytes",
            "DigestMismatch",
            vec![("root.cbor", root1.clone()), ("bundle.flb", flipped_artifact)],
        ),
        case(
            "artifact-digest-mismatch",
            "validly signed manifest whose content digest does not match the model",
            "DigestMismatch",
            vec![
                ("root.cbor", root1.clone()),
                ("bundle.flb", resign(&good, &[&a], |m| m.artifacts[0].sha256 = "0".repeat(64))),
            ],
        ),
        case(
            "decompression-bomb",
            "declared content size smaller than what the zstd frame expands to",
            "Artifact",
            vec![("root.cbor", root1.clone()), ("bundle.flb", resign(&good, &[&a], |m| m.artifacts[0].size = 100))],
        ),
        case(
            "oversized-length-prefix",
            "header claims a 4 GiB envelope",
            "TooLarge",
            vec![("root.cbor", root1.clone()), ("bundle.flb", oversized)],
        ),
        case(
            "path-like-artifact-name",
            "validly signed manifest naming an artifact ../../etc/passwd",
            "BadArtifactName",
            vec![
                ("root.cbor", root1),
                ("bundle.flb", resign(&good, &[&a], |m| m.artifacts[0].name = "../../etc/passwd".into())),
            ],
        ),
    ]
}

/// Judge one case directory; `Ok(())` or the error kind.
fn judge(dir: &Path) -> Result<(), Error> {
    let read = |n: &str| std::fs::read(dir.join(n)).ok();
    let mut trust = TrustedRoot::anchor(&read("root.cbor").expect("root.cbor"), NOW)?;
    if let Some(next) = read("next-root.cbor") {
        trust = trust.rotate(&next, NOW)?;
    }
    if let Some(b) = read("bundle.flb") {
        let mut f = std::io::Cursor::new(b);
        let (doc, off) = read_envelope(&mut f)?;
        let v = trust.verify_manifest(&doc, NOW)?;
        let highest = read("highest").map(|h| String::from_utf8(h).unwrap().trim().parse().unwrap());
        check_not_rollback(&v.manifest, highest)?;
        for a in &v.manifest.artifacts {
            extract_artifact(&mut f, off, a, None, std::io::sink())?;
        }
    }
    Ok(())
}

#[test]
fn corpus_matches_its_generator_and_every_case_is_judged_as_expected() {
    let bless = std::env::var_os("FLOTILLA_BLESS").is_some();
    let cases = cases();
    for c in &cases {
        let dir = corpus().join(c.name);
        if bless {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("README.md"), format!("{}\n", c.readme)).unwrap();
            std::fs::write(dir.join("expect"), format!("{}\n", c.expect)).unwrap();
            for (n, bytes) in &c.files {
                std::fs::write(dir.join(n), bytes).unwrap();
            }
        }
        for (n, bytes) in &c.files {
            let committed =
                std::fs::read(dir.join(n)).unwrap_or_else(|_| panic!("{}/{n} missing: FLOTILLA_BLESS=1", c.name));
            assert!(committed == *bytes, "{}/{n} differs from its generator", c.name);
        }
        let expect = std::fs::read_to_string(dir.join("expect")).unwrap();
        let got = match judge(&dir) {
            Ok(()) => "ok".to_string(),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                e.kind().to_string()
            }
        };
        assert_eq!(got, expect.trim(), "case {}: {:?}", c.name, judge(&dir).err().map(|e| e.to_string()));
    }
    // No stray directories: every committed case is generated here.
    let mut on_disk: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = cases.iter().map(|c| c.name.to_string()).collect();
    names.sort();
    assert_eq!(on_disk, names);
}
