//! Deciding whether a bundle may run: signatures by the trust root's `targets` role, manifest
//! shape, expiry against the caller's trusted time.

use crate::canonical;
use crate::error::{Error, Result};
use crate::format::sha256_hex;
use crate::keys::KeyId;
use crate::manifest::Manifest;
use crate::root::{ROLE_TARGETS, TrustedRoot};
use crate::signed::{CONTEXT_MANIFEST, SignedDoc, tally};

/// A manifest whose signatures met the threshold.
#[derive(Clone, Debug)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    /// The distinct trusted keys that signed it.
    pub signers: Vec<KeyId>,
    /// Hex SHA-256 of the signed manifest bytes: the bundle's identity, whatever its signatures.
    pub manifest_sha256: String,
}

impl TrustedRoot {
    /// Verify a bundle envelope. `now` is the caller's trusted time (seconds since the epoch).
    pub fn verify_manifest(&self, doc: &SignedDoc, now: u64) -> Result<VerifiedManifest> {
        let role = self.root().role(ROLE_TARGETS)?;
        let t = tally(CONTEXT_MANIFEST, doc, role, &self.root().keys);
        if !t.meets(role.threshold) {
            return Err(Error::ThresholdNotMet {
                role: ROLE_TARGETS,
                valid: t.valid.len(),
                threshold: role.threshold,
                detail: t.describe(),
            });
        }
        // Only signed bytes are parsed beyond this point.
        let manifest = decode_manifest(&doc.signed)?;
        if let Some(exp) = manifest.expires
            && exp <= now
        {
            return Err(Error::Expired { what: "bundle", expires: exp, now });
        }
        Ok(VerifiedManifest {
            manifest,
            signers: t.valid.into_iter().collect(),
            manifest_sha256: sha256_hex(&doc.signed),
        })
    }
}

/// Decode and shape-check manifest bytes without checking signatures (inspect, server-side
/// bookkeeping). Never use the result to decide what runs.
pub fn decode_manifest(bytes: &[u8]) -> Result<Manifest> {
    let m: Manifest = canonical::from_slice("manifest", bytes, crate::format::MAX_ENVELOPE as usize)?;
    m.check()?;
    Ok(m)
}

/// Anti-rollback: a bundle may not go below the highest version accepted for its name.
/// The same version is allowed (re-installing what is there is idempotent).
pub fn check_not_rollback(m: &Manifest, highest: Option<u64>) -> Result<()> {
    match highest {
        Some(h) if m.version < h => Err(Error::Rollback { name: m.name.clone(), version: m.version, highest: h }),
        _ => Ok(()),
    }
}
