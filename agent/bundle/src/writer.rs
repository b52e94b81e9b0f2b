//! Writing and signing bundle files (feature `sign`).

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::format::{encode_head, read_envelope, sha256_hex};
use crate::keys::SecretKey;
use crate::manifest::{Artifact, Encoding, Manifest, Role, StoredRange, validate_artifact_name};
use crate::signed::{CONTEXT_MANIFEST, SignedDoc};
use crate::{canonical, verify::decode_manifest};

/// One artifact to put in a bundle.
#[derive(Debug)]
pub struct ArtifactInput {
    pub name: String,
    pub role: Role,
    pub media_type: String,
    pub content: Vec<u8>,
    /// Store as a zstd patch against this base content (delta update).
    pub delta_base: Option<Vec<u8>>,
    /// With `delta_base`: also store the plain zstd form (after all other artifacts), so devices
    /// without the base fetch that instead of failing.
    pub with_full: bool,
}

/// Compress the artifacts, fill in `manifest.artifacts`, and write an unsigned bundle.
/// Returns the manifest as written.
pub fn write_bundle<W: Write>(
    mut manifest: Manifest,
    inputs: &[ArtifactInput],
    level: i32,
    out: &mut W,
) -> Result<Manifest> {
    let mut data = Vec::new();
    manifest.artifacts.clear();
    for input in inputs {
        validate_artifact_name(&input.name)?;
        let stored = match &input.delta_base {
            None => zstd::bulk::compress(&input.content, level),
            Some(base) => {
                let mut c = zstd::bulk::Compressor::new(level).map_err(|e| Error::io("zstd", e))?;
                c.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(true))
                    .map_err(|e| Error::io("zstd", e))?;
                c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window_log(base.len() + input.content.len())))
                    .map_err(|e| Error::io("zstd", e))?;
                c.context_mut()
                    .ref_prefix(base)
                    .map_err(|code| Error::io("zstd", std::io::Error::other(zstd::zstd_safe::get_error_name(code))))?;
                c.compress(&input.content)
            }
        }
        .map_err(|e| Error::io("zstd", e))?;
        let encoding = match &input.delta_base {
            None => Encoding::Zstd,
            Some(base) => Encoding::ZstdPatch { base_sha256: sha256_hex(base) },
        };
        manifest.artifacts.push(Artifact {
            name: input.name.clone(),
            role: input.role,
            media_type: input.media_type.clone(),
            encoding,
            offset: data.len() as u64,
            stored_size: stored.len() as u64,
            stored_sha256: sha256_hex(&stored),
            size: input.content.len() as u64,
            sha256: sha256_hex(&input.content),
            full: None,
        });
        data.extend_from_slice(&stored);
    }
    // Full forms of deltas go last: a device holding the bases then fetches one contiguous prefix.
    for (input, artifact) in inputs.iter().zip(manifest.artifacts.iter_mut()) {
        if input.delta_base.is_some() && input.with_full {
            let stored = zstd::bulk::compress(&input.content, level).map_err(|e| Error::io("zstd", e))?;
            artifact.full = Some(StoredRange {
                offset: data.len() as u64,
                stored_size: stored.len() as u64,
                stored_sha256: sha256_hex(&stored),
            });
            data.extend_from_slice(&stored);
        }
    }
    manifest.check()?;
    let doc = SignedDoc { signed: canonical::to_vec(&manifest)?, signatures: vec![] };
    out.write_all(&encode_head(&doc)?).map_err(|e| Error::io("bundle output", e))?;
    out.write_all(&data).map_err(|e| Error::io("bundle output", e))?;
    Ok(manifest)
}

fn window_log(len: usize) -> u32 {
    // Smallest window covering base + content, within zstd's limits.
    (usize::BITS - len.max(1).leading_zeros()).clamp(10, 30)
}

/// Copy a bundle from `input` to `out` with `key`'s signature added (replacing an older one by
/// the same key). The manifest and artifacts are copied byte for byte.
pub fn sign_bundle<R: Read, W: Write>(input: &mut R, key: &SecretKey, out: &mut W) -> Result<Manifest> {
    let (mut doc, _) = read_envelope(input)?;
    let manifest = decode_manifest(&doc.signed)?;
    doc.sign(CONTEXT_MANIFEST, key);
    out.write_all(&encode_head(&doc)?).map_err(|e| Error::io("bundle output", e))?;
    std::io::copy(input, out).map_err(|e| Error::io("bundle output", e))?;
    Ok(manifest)
}
