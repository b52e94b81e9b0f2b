//! The Flotilla bundle: one file holding a signed manifest and the artifacts it describes.
//!
//! Layers, outermost first: [`format`] (the byte layout, no keys), [`signed`] and [`root`] (who
//! may sign what), [`verify`] (deciding a bundle may run), [`manifest`] (what it says). Nothing
//! here touches a clock, the network or randomness except key generation under feature `sign`:
//! callers pass the trusted time in.

pub mod canonical;
pub mod error;
pub mod format;
pub mod golden;
pub mod keys;
pub mod manifest;
pub mod root;
pub mod signed;
pub mod verify;
#[cfg(feature = "sign")]
pub mod writer;

pub use error::{Error, Result};
#[cfg(feature = "sign")]
pub use keys::SecretKey;
pub use keys::{KeyId, PublicKey};
pub use manifest::{Artifact, DType, Dim, Manifest, ModelFormat, Role, TensorSpec};
pub use root::{Root, TrustedRoot};
pub use signed::SignedDoc;
pub use verify::VerifiedManifest;
