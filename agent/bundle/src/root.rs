//! Trust roots: the self-signed document that says which keys may sign what.
//!
//! A device is flashed with its first root. A later root N+1 is accepted only when signed by a
//! threshold of root N's `root` keys *and* of its own, so a stolen minority of keys cannot rotate
//! the device away from its owner.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::error::{Error, Result};
use crate::keys::{KeyId, PublicKey};
use crate::signed::{CONTEXT_ROOT, RoleKeys, SignedDoc, Tally, tally};

pub const ROOT_TYPE: &str = "flotilla/root";
pub const ROOT_SCHEMA: u32 = 1;
/// Roots are small; anything larger is refused before parsing.
pub const MAX_ROOT_BYTES: usize = 256 * 1024;

pub const ROLE_ROOT: &str = "root";
pub const ROLE_TARGETS: &str = "targets";

/// The signed content of a trust root.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Root {
    #[serde(rename = "type")]
    pub kind: String,
    pub schema: u32,
    pub version: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// At least `root` and `targets`; later versions may add roles (e.g. an automation signer).
    pub roles: BTreeMap<String, RoleKeys>,
}

impl Root {
    /// A root in which one key holds every role with threshold 1.
    pub fn single_key(key: &PublicKey, created: u64, expires: Option<u64>) -> Root {
        let id = key.key_id();
        let role = RoleKeys { keyids: vec![id.clone()], threshold: 1 };
        Root {
            kind: ROOT_TYPE.into(),
            schema: ROOT_SCHEMA,
            version: 1,
            created,
            expires,
            keys: BTreeMap::from([(id, key.clone())]),
            roles: BTreeMap::from([(ROLE_ROOT.into(), role.clone()), (ROLE_TARGETS.into(), role)]),
        }
    }

    pub fn role(&self, name: &'static str) -> Result<&RoleKeys> {
        self.roles.get(name).ok_or_else(|| Error::malformed("trust root", format!("no {name:?} role")))
    }

    fn check_shape(&self) -> Result<()> {
        if self.kind != ROOT_TYPE {
            return Err(Error::malformed("trust root", format!("type is {:?}, expected {ROOT_TYPE:?}", self.kind)));
        }
        if self.schema != ROOT_SCHEMA {
            return Err(Error::UnsupportedSchema { what: "trust root", found: self.schema, supported: ROOT_SCHEMA });
        }
        for (id, key) in &self.keys {
            if key.key_id() != *id {
                return Err(Error::malformed("trust root", format!("key listed as {id} hashes to {}", key.key_id())));
            }
            key.verifying_key()?;
        }
        for name in [ROLE_ROOT, ROLE_TARGETS] {
            let role = self.role(name)?;
            if role.threshold == 0 || role.threshold as usize > role.keyids.len() {
                return Err(Error::malformed(
                    "trust root",
                    format!("role {name} has threshold {} with {} key(s)", role.threshold, role.keyids.len()),
                ));
            }
            if let Some(missing) = role.keyids.iter().find(|k| !self.keys.contains_key(k)) {
                return Err(Error::malformed("trust root", format!("role {name} names unknown key {missing}")));
            }
        }
        Ok(())
    }
}

/// A root whose signatures and shape have been checked.
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    root: Root,
    doc: SignedDoc,
}

impl TrustedRoot {
    /// Accept a root as the trust anchor (a device's flashed root, an operator's file): its own
    /// `root` role must have signed it. Expiry is checked against `now` (trusted seconds).
    pub fn anchor(bytes: &[u8], now: u64) -> Result<TrustedRoot> {
        let (root, doc) = parse(bytes)?;
        let t = tally(CONTEXT_ROOT, &doc, root.role(ROLE_ROOT)?, &root.keys);
        require(&t, root.role(ROLE_ROOT)?.threshold, "root")?;
        check_expiry(&root, now)?;
        Ok(TrustedRoot { root, doc })
    }

    /// Accept `next` as the successor of this root (version + 1, signed by a threshold of both).
    pub fn rotate(&self, next: &[u8], now: u64) -> Result<TrustedRoot> {
        let (root, doc) = parse(next)?;
        if root.version != self.root.version + 1 {
            return Err(Error::Rotation(format!(
                "root version {} does not follow trusted version {}",
                root.version, self.root.version
            )));
        }
        let old = tally(CONTEXT_ROOT, &doc, self.root.role(ROLE_ROOT)?, &self.root.keys);
        require(&old, self.root.role(ROLE_ROOT)?.threshold, "root (previous version)")?;
        let new = tally(CONTEXT_ROOT, &doc, root.role(ROLE_ROOT)?, &root.keys);
        require(&new, root.role(ROLE_ROOT)?.threshold, "root (new version)")?;
        check_expiry(&root, now)?;
        Ok(TrustedRoot { root, doc })
    }

    /// Follow a chain of rotations (e.g. N → N+1 → N+2), in any order; roots at or below this
    /// version are skipped. Every step must verify; the first that does not stops the chain.
    pub fn rotate_chain(&self, roots: &[Vec<u8>], now: u64) -> Result<TrustedRoot> {
        let mut parsed = Vec::with_capacity(roots.len());
        for bytes in roots {
            let (root, _) = parse(bytes)?;
            parsed.push((root.version, bytes));
        }
        parsed.sort_by_key(|(v, _)| *v);
        let mut current = self.clone();
        for (version, bytes) in parsed {
            if version <= current.root.version {
                continue;
            }
            current = current.rotate(bytes, now)?;
        }
        Ok(current)
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The exact bytes this root was read from (to persist or forward).
    pub fn to_bytes(&self) -> Vec<u8> {
        canonical_envelope(&self.doc)
    }
}

fn require(t: &Tally, threshold: u32, role: &'static str) -> Result<()> {
    if t.meets(threshold) {
        Ok(())
    } else {
        Err(Error::ThresholdNotMet { role, valid: t.valid.len(), threshold, detail: t.describe() })
    }
}

fn check_expiry(root: &Root, now: u64) -> Result<()> {
    match root.expires {
        Some(exp) if exp <= now => Err(Error::Expired { what: "trust root", expires: exp, now }),
        _ => Ok(()),
    }
}

fn parse(bytes: &[u8]) -> Result<(Root, SignedDoc)> {
    let doc: SignedDoc = canonical::from_slice_lenient("trust root envelope", bytes, MAX_ROOT_BYTES)?;
    let root: Root = canonical::from_slice("trust root", &doc.signed, MAX_ROOT_BYTES)?;
    root.check_shape()?;
    Ok((root, doc))
}

fn canonical_envelope(doc: &SignedDoc) -> Vec<u8> {
    // Encoding our own well-formed struct cannot fail.
    canonical::to_vec(doc).unwrap_or_default()
}

/// Encode and sign a root document (the CLI's `trust init` / `trust rotate`).
#[cfg(feature = "sign")]
pub fn sign_root(root: &Root, keys: &[&crate::keys::SecretKey]) -> Result<Vec<u8>> {
    root.check_shape()?;
    let mut doc = SignedDoc { signed: canonical::to_vec(root)?, signatures: vec![] };
    for k in keys {
        doc.sign(CONTEXT_ROOT, k);
    }
    canonical::to_vec(&doc)
}

/// Add `key`'s signature to an encoded root (offline signing by several holders in turn).
#[cfg(feature = "sign")]
pub fn add_root_signature(bytes: &[u8], key: &crate::keys::SecretKey) -> Result<Vec<u8>> {
    let (_, mut doc) = parse(bytes)?;
    doc.sign(CONTEXT_ROOT, key);
    canonical::to_vec(&doc)
}

/// Decode a root without trusting it (for `inspect`-style display).
pub fn decode_untrusted(bytes: &[u8]) -> Result<(Root, SignedDoc)> {
    parse(bytes)
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn single_key_root_anchors() {
        let k = key(1);
        let bytes = sign_root(&Root::single_key(&k.public(), 100, None), &[&k]).unwrap();
        let t = TrustedRoot::anchor(&bytes, 200).unwrap();
        assert_eq!(t.root().version, 1);
        assert_eq!(t.to_bytes(), bytes);
    }

    #[test]
    fn root_signed_by_outsider_is_refused() {
        let k = key(1);
        let bytes = sign_root(&Root::single_key(&k.public(), 100, None), &[&key(2)]).unwrap();
        let err = TrustedRoot::anchor(&bytes, 200).unwrap_err();
        assert!(matches!(err, Error::ThresholdNotMet { valid: 0, threshold: 1, .. }), "{err}");
    }

    #[test]
    fn expired_root_is_refused() {
        let k = key(1);
        let bytes = sign_root(&Root::single_key(&k.public(), 100, Some(150)), &[&k]).unwrap();
        assert!(matches!(TrustedRoot::anchor(&bytes, 150).unwrap_err(), Error::Expired { .. }));
    }

    #[test]
    fn rotation_needs_old_and_new_keys() {
        let (a, b) = (key(1), key(2));
        let v1 = sign_root(&Root::single_key(&a.public(), 100, None), &[&a]).unwrap();
        let trusted = TrustedRoot::anchor(&v1, 200).unwrap();
        let mut next = Root::single_key(&b.public(), 300, None);
        next.version = 2;
        let only_new = sign_root(&next, &[&b]).unwrap();
        assert!(matches!(trusted.rotate(&only_new, 400).unwrap_err(), Error::ThresholdNotMet { .. }));
        let both = sign_root(&next, &[&a, &b]).unwrap();
        assert_eq!(trusted.rotate(&both, 400).unwrap().root().version, 2);
        next.version = 3;
        let skip = sign_root(&next, &[&a, &b]).unwrap();
        assert!(matches!(trusted.rotate(&skip, 400).unwrap_err(), Error::Rotation(_)));
    }

    #[test]
    fn chains_rotate_step_by_step_and_refuse_gaps() {
        let (a, b, c) = (key(1), key(2), key(3));
        let v1 = sign_root(&Root::single_key(&a.public(), 100, None), &[&a]).unwrap();
        let mut r2 = Root::single_key(&b.public(), 200, None);
        r2.version = 2;
        let v2 = sign_root(&r2, &[&a, &b]).unwrap();
        let mut r3 = Root::single_key(&c.public(), 300, None);
        r3.version = 3;
        let v3 = sign_root(&r3, &[&b, &c]).unwrap();
        let t1 = TrustedRoot::anchor(&v1, 400).unwrap();
        // Out of order and with an old root mixed in: still 1 → 2 → 3.
        let t3 = t1.rotate_chain(&[v3.clone(), v1.clone(), v2.clone()], 400).unwrap();
        assert_eq!(t3.root().version, 3);
        // Without the middle link the chain does not hold.
        assert!(matches!(t1.rotate_chain(std::slice::from_ref(&v3), 400).unwrap_err(), Error::Rotation(_)));
        // Going backwards is a no-op, never a downgrade.
        assert_eq!(t3.rotate_chain(&[v1, v2], 400).unwrap().root().version, 3);
    }
}
