//! The fleet's PKI: who is who on the wire.
//!
//! - The **fleet CA** (feature `ca`: the control plane, the CLI, the image tool) issues the
//!   server's certificate (its names and addresses as SANs) and each device's (subject CN = the
//!   device id), directly or by signing a device's CSR. Only the public key of a CSR is used: the
//!   CA decides the name, the usages and the lifetime.
//! - A **device** makes its own key and a CSR for it ([`new_key`], [`csr`]); the private key
//!   never has to leave it.
//! - [`tls`] builds rustls configurations on the `ring` provider, always given explicitly (no
//!   process-wide default provider is needed or installed), that trust the fleet CA alone.
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM. Times are passed in (Unix seconds), never read here.

mod cert;
pub mod tls;

#[cfg(feature = "ca")]
pub use cert::Ca;
pub use cert::{CertInfo, Identity, csr, new_key, parse_cert, parse_certs};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PkiError(pub String);

impl PkiError {
    pub(crate) fn new(what: impl std::fmt::Display) -> Self {
        PkiError(what.to_string())
    }
}

pub type Result<T> = std::result::Result<T, PkiError>;
