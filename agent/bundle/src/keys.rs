//! Ed25519 keys and key ids.
//!
//! A key id is the lowercase hex SHA-256 of the 32 raw public-key bytes, so it can be computed by
//! anyone holding the public key and never has to be trusted from a document.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Lowercase hex SHA-256 of a public key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ed25519 public key as it appears in trust roots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// Always `ed25519` in this version.
    pub alg: String,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

impl PublicKey {
    pub fn from_verifying_key(k: &VerifyingKey) -> Self {
        PublicKey { alg: "ed25519".into(), key: k.to_bytes().to_vec() }
    }

    pub fn key_id(&self) -> KeyId {
        KeyId(hex::encode(Sha256::digest(&self.key)))
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        if self.alg != "ed25519" {
            return Err(Error::Key(format!("unsupported key algorithm {:?}", self.alg)));
        }
        let bytes: [u8; 32] = self
            .key
            .as_slice()
            .try_into()
            .map_err(|_| Error::Key(format!("ed25519 public key must be 32 bytes, got {}", self.key.len())))?;
        VerifyingKey::from_bytes(&bytes).map_err(|e| Error::Key(e.to_string()))
    }

    /// Verify `sig` over `msg`. Malformed signatures are simply invalid.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(vk) = self.verifying_key() else { return false };
        let Ok(sig) = Signature::from_slice(sig) else { return false };
        vk.verify_strict(msg, &sig).is_ok()
    }

    /// Parse an SPKI PEM (`-----BEGIN PUBLIC KEY-----`), as written by `flotilla keygen` or openssl.
    pub fn from_pem(pem: &str) -> Result<Self> {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        let vk = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|e| Error::Key(format!("not an ed25519 public key PEM: {e}")))?;
        Ok(Self::from_verifying_key(&vk))
    }

    pub fn to_pem(&self) -> Result<String> {
        use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
        self.verifying_key()?.to_public_key_pem(LineEnding::LF).map_err(|e| Error::Key(e.to_string()))
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_pem(&text)
    }
}

#[cfg(feature = "sign")]
pub use secret::SecretKey;

#[cfg(feature = "sign")]
mod secret {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    /// An ed25519 signing key. Stored as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), mode 0600.
    pub struct SecretKey(SigningKey);

    impl std::fmt::Debug for SecretKey {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SecretKey({})", self.public().key_id())
        }
    }

    impl SecretKey {
        pub fn generate() -> Result<Self> {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| Error::Key(format!("no randomness: {e}")))?;
            Ok(SecretKey(SigningKey::from_bytes(&seed)))
        }

        pub fn from_seed(seed: [u8; 32]) -> Self {
            SecretKey(SigningKey::from_bytes(&seed))
        }

        pub fn public(&self) -> PublicKey {
            PublicKey::from_verifying_key(&self.0.verifying_key())
        }

        pub fn key_id(&self) -> KeyId {
            self.public().key_id()
        }

        pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
            self.0.sign(msg).to_bytes().to_vec()
        }

        pub fn from_pem(pem: &str) -> Result<Self> {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            SigningKey::from_pkcs8_pem(pem.trim())
                .map(SecretKey)
                .map_err(|e| Error::Key(format!("not an ed25519 private key PEM: {e}")))
        }

        pub fn to_pem(&self) -> Result<String> {
            use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
            self.0.to_pkcs8_pem(LineEnding::LF).map(|z| z.to_string()).map_err(|e| Error::Key(e.to_string()))
        }

        pub fn load(path: &std::path::Path) -> Result<Self> {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            Self::from_pem(&text)
        }

        /// Write `PREFIX.key` (0600) and `PREFIX.pub`. Refuses to overwrite an existing key.
        pub fn save(&self, prefix: &std::path::Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
            use std::io::Write;
            let key_path = prefix.with_extension("key");
            let pub_path = prefix.with_extension("pub");
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&key_path).map_err(|e| Error::io(&key_path, e))?;
            f.write_all(self.to_pem()?.as_bytes()).map_err(|e| Error::io(&key_path, e))?;
            f.sync_all().map_err(|e| Error::io(&key_path, e))?;
            std::fs::write(&pub_path, self.public().to_pem()?).map_err(|e| Error::io(&pub_path, e))?;
            Ok((key_path, pub_path))
        }
    }
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_key_id() {
        let sk = SecretKey::from_seed([7; 32]);
        let back = SecretKey::from_pem(&sk.to_pem().unwrap()).unwrap();
        assert_eq!(back.key_id(), sk.key_id());
        let pk = PublicKey::from_pem(&sk.public().to_pem().unwrap()).unwrap();
        assert_eq!(pk, sk.public());
        assert_eq!(pk.key_id().0.len(), 64);
        let sig = sk.sign(b"hello");
        assert!(pk.verify(b"hello", &sig));
        assert!(!pk.verify(b"hellO", &sig));
        assert!(!pk.verify(b"hello", &sig[..63]));
    }
}
