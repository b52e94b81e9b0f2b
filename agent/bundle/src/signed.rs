//! Signed documents: canonical bytes plus ed25519 signatures counted against a role's threshold.
//!
//! Signatures cover `context || signed`, where the context names the document type, so a
//! signature made for a trust root can never be replayed as a bundle signature or the reverse.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::keys::{KeyId, PublicKey};

/// Domain-separation prefix for bundle manifests.
pub const CONTEXT_MANIFEST: &[u8] = b"flotilla/v1 bundle-manifest\0";
/// Domain-separation prefix for trust roots.
pub const CONTEXT_ROOT: &[u8] = b"flotilla/v1 root\0";

/// Most signatures one document may carry; more is refused before any verification work.
pub const MAX_SIGNATURES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub keyid: KeyId,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// The signed bytes and the signatures over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDoc {
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

/// Keys allowed to sign for a role and how many distinct ones must.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keyids: Vec<KeyId>,
    pub threshold: u32,
}

/// The outcome of counting signatures for one role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Distinct trusted key ids whose signature verified.
    pub valid: BTreeSet<KeyId>,
    /// Signatures by a key the role trusts that did not verify.
    pub invalid: Vec<KeyId>,
    /// Signatures by keys the role does not list (ignored, not fatal).
    pub unknown: Vec<KeyId>,
}

impl Tally {
    pub fn meets(&self, threshold: u32) -> bool {
        threshold > 0 && self.valid.len() >= threshold as usize
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.invalid.is_empty() {
            parts.push(format!("bad signature by {}", join(&self.invalid)));
        }
        if !self.unknown.is_empty() {
            parts.push(format!("ignored signature by untrusted key {}", join(&self.unknown)));
        }
        if parts.is_empty() { String::new() } else { format!(" ({})", parts.join("; ")) }
    }
}

fn join(ids: &[KeyId]) -> String {
    ids.iter().map(|k| k.0.get(..16).unwrap_or(&k.0)).collect::<Vec<_>>().join(", ")
}

/// Count the signatures over `context || signed` by keys of `role`. Duplicates count once.
pub fn tally(context: &[u8], doc: &SignedDoc, role: &RoleKeys, keys: &BTreeMap<KeyId, PublicKey>) -> Tally {
    let mut msg = Vec::with_capacity(context.len() + doc.signed.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(&doc.signed);
    let mut t = Tally::default();
    for s in doc.signatures.iter().take(MAX_SIGNATURES) {
        if t.valid.contains(&s.keyid) {
            continue;
        }
        let key = role.keyids.contains(&s.keyid).then(|| keys.get(&s.keyid)).flatten();
        match key {
            // A key listed under an id it does not hash to is not that key.
            Some(k) if k.key_id() == s.keyid => {
                if k.verify(&msg, &s.sig) {
                    t.valid.insert(s.keyid.clone());
                } else {
                    t.invalid.push(s.keyid.clone());
                }
            }
            _ => t.unknown.push(s.keyid.clone()),
        }
    }
    t
}

#[cfg(feature = "sign")]
impl SignedDoc {
    /// Add (or replace) `key`'s signature over `context || signed`.
    pub fn sign(&mut self, context: &[u8], key: &crate::keys::SecretKey) {
        let mut msg = context.to_vec();
        msg.extend_from_slice(&self.signed);
        let keyid = key.key_id();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(SignatureEntry { keyid, sig: key.sign(&msg) });
    }
}
