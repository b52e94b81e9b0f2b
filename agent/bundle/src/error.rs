use thiserror::Error;

/// Everything that can be wrong with a bundle or a trust root.
///
/// Variants carry the context an operator needs to act (which key, which artifact, what limit).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error("not a Flotilla bundle (bad magic bytes)")]
    BadMagic,
    #[error("bundle format version {found} is not supported (this build reads version {supported})")]
    UnsupportedFormat { found: u16, supported: u16 },
    #[error(
        "{what} schema {found} is not supported (this build reads schema {supported}); upgrade the agent or rebuild the bundle"
    )]
    UnsupportedSchema { what: &'static str, found: u32, supported: u32 },
    #[error("truncated input: need {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: u64 },
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge { what: &'static str, size: u64, limit: u64 },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} is not canonical CBOR; it was not produced by a Flotilla signer")]
    NotCanonical { what: &'static str },
    #[error("invalid artifact name {name:?}: names are 1-64 chars of [a-z0-9._-] starting with a letter or digit")]
    BadArtifactName { name: String },
    #[error("artifact {name:?}: {detail}")]
    Artifact { name: String, detail: String },
    #[error("artifact {name:?} digest mismatch: manifest says {expected}, content is {actual}")]
    DigestMismatch { name: String, expected: String, actual: String },
    #[error(
        "signature threshold not met for role {role}: {valid} valid signature(s) from distinct trusted keys, {threshold} required{detail}"
    )]
    ThresholdNotMet { role: &'static str, valid: usize, threshold: u32, detail: String },
    #[error("{what} expired at {expires} (trusted time is {now})")]
    Expired { what: &'static str, expires: u64, now: u64 },
    #[error(
        "{name} version {version} is lower than version {highest} already accepted (anti-rollback); a deliberate rollback is a new, higher version"
    )]
    Rollback { name: String, version: u64, highest: u64 },
    #[error("key error: {0}")]
    Key(String),
    #[error("root rotation refused: {0}")]
    Rotation(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A stable short name for the kind of error (what the negative corpus expects).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadMagic => "BadMagic",
            Error::UnsupportedFormat { .. } => "UnsupportedFormat",
            Error::UnsupportedSchema { .. } => "UnsupportedSchema",
            Error::Truncated { .. } => "Truncated",
            Error::TooLarge { .. } => "TooLarge",
            Error::Malformed { .. } => "Malformed",
            Error::NotCanonical { .. } => "NotCanonical",
            Error::BadArtifactName { .. } => "BadArtifactName",
            Error::Artifact { .. } => "Artifact",
            Error::DigestMismatch { .. } => "DigestMismatch",
            Error::ThresholdNotMet { .. } => "ThresholdNotMet",
            Error::Expired { .. } => "Expired",
            Error::Rollback { .. } => "Rollback",
            Error::Key(_) => "Key",
            Error::Rotation(_) => "Rotation",
            Error::Io { .. } => "Io",
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Error::Malformed { what, detail: detail.to_string() }
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
