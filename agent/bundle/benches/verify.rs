//! Verify throughput: signature check + SHA-256 of the stored bytes + zstd decode + SHA-256 of
//! the content, on one core, for a large bundle. Prints figures; asserts nothing.
//!   cargo bench -p flotilla-bundle --bench verify            (200 MB by default)
//!   FLOTILLA_BENCH_MB=50 cargo bench -p flotilla-bundle --bench verify

use std::time::Instant;

use flotilla_bundle::format::{extract_artifact, parse_envelope};
use flotilla_bundle::manifest::{
    HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature, Role,
};
use flotilla_bundle::root::{Root, sign_root};
use flotilla_bundle::writer::{ArtifactInput, sign_bundle, write_bundle};
use flotilla_bundle::{SecretKey, TrustedRoot};

/// Model-like content: float32 weights with a little structure (compresses like real weights,
/// i.e. barely), generated deterministically.
fn weights(bytes: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(bytes);
    out
}

fn main() {
    let mb: usize = std::env::var("FLOTILLA_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let key = SecretKey::from_seed([1; 32]);
    let root = TrustedRoot::anchor(&sign_root(&Root::single_key(&key.public(), 1, None), &[&key]).unwrap(), 2).unwrap();
    let content = weights(mb << 20);
    let m = Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: "big".into(),
        version: 1,
        created: 1,
        expires: None,
        model: ModelSignature { format: ModelFormat::Onnx, inputs: vec![], outputs: vec![] },
        artifacts: vec![],
        target: Default::default(),
        runtime: Default::default(),
        health: HealthChecks::default(),
    };
    let t = Instant::now();
    let mut unsigned = Vec::new();
    let input = ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: "application/onnx".into(),
        content,
        delta_base: None,
        with_full: false,
    };
    write_bundle(m, std::slice::from_ref(&input), 3, &mut unsigned).unwrap();
    let mut bundle = Vec::new();
    sign_bundle(&mut std::io::Cursor::new(unsigned), &key, &mut bundle).unwrap();
    let build_s = t.elapsed().as_secs_f64();
    let content_mb = input.content.len() as f64 / 1e6;
    let bundle_mb = bundle.len() as f64 / 1e6;
    println!(
        "bundle: {content_mb:.0} MB of float32 weights → {bundle_mb:.0} MB bundle (zstd level 3), built in {build_s:.1} s"
    );

    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let (doc, off) = parse_envelope(&bundle).unwrap();
        let v = root.verify_manifest(&doc, 3).unwrap();
        let mut f = std::io::Cursor::new(&bundle);
        for a in &v.manifest.artifacts {
            extract_artifact(&mut f, off, a, None, std::io::sink()).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "verify (signatures + sha256 stored + zstd decode + sha256 content), best of 3, one core: {:.3} s = {:.0} MB/s of bundle, {:.0} MB/s of content",
        best,
        bundle_mb / best,
        content_mb / best
    );
    let t = Instant::now();
    let d = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bundle));
    let sha_s = t.elapsed().as_secs_f64();
    std::hint::black_box(d);
    println!("for scale: one sha256 pass over the bundle: {:.0} MB/s", bundle_mb / sha_s);
    let (_, off) = parse_envelope(&bundle).unwrap();
    let t = Instant::now();
    zstd::stream::copy_decode(&bundle[off as usize..], std::io::sink()).unwrap();
    let zstd_s = t.elapsed().as_secs_f64();
    println!("for scale: zstd decode alone: {:.0} MB/s of bundle", bundle_mb / zstd_s);
}
