//! The bundle manifest: what a bundle holds and how it must be run. Signed as canonical CBOR.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MANIFEST_TYPE: &str = "flotilla/bundle";
pub const MANIFEST_SCHEMA: u32 = 1;
/// Most artifacts one bundle may list.
pub const MAX_ARTIFACTS: usize = 64;
/// Most tensors in a model signature.
pub const MAX_TENSORS: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "type")]
    pub kind: String,
    pub schema: u32,
    pub name: String,
    /// Monotonic per name; agents refuse to go below the highest version they accepted.
    pub version: u64,
    /// Seconds since the Unix epoch; also feeds the agent's trusted clock.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    pub model: ModelSignature,
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub target: Target,
    #[serde(default)]
    pub runtime: RuntimeSettings,
    #[serde(default)]
    pub health: HealthChecks,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Onnx,
    Tflite,
}

impl ModelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Tflite => "tflite",
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "application/onnx",
            ModelFormat::Tflite => "application/vnd.tflite",
        }
    }
}

/// The model's inputs and outputs as the agent will enforce them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSignature {
    pub format: ModelFormat,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// Element types, spelled as in the Open Inference Protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "FP32")]
    F32,
    #[serde(rename = "FP16")]
    F16,
    #[serde(rename = "FP64")]
    F64,
    #[serde(rename = "INT8")]
    I8,
    #[serde(rename = "UINT8")]
    U8,
    #[serde(rename = "INT16")]
    I16,
    #[serde(rename = "INT32")]
    I32,
    #[serde(rename = "INT64")]
    I64,
    #[serde(rename = "BOOL")]
    Bool,
}

impl DType {
    /// The Open Inference Protocol spelling (`FP32`, `INT64`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F16 => "FP16",
            DType::F64 => "FP64",
            DType::I8 => "INT8",
            DType::U8 => "UINT8",
            DType::I16 => "INT16",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::Bool => "BOOL",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        [DType::F32, DType::F16, DType::F64, DType::I8, DType::U8, DType::I16, DType::I32, DType::I64, DType::Bool]
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
    }
}

/// A dimension: fixed, or symbolic (e.g. batch `N`) and resolved per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Symbolic(String),
}

impl Dim {
    /// The name that binds this dimension to every other with the same name (across inputs and
    /// outputs), or None for a fixed or an anonymous one.
    pub fn symbol(&self) -> Option<&str> {
        match self {
            Dim::Symbolic(s) if !is_anonymous_symbol(s) => Some(s),
            _ => None,
        }
    }

    /// A dynamic dimension with no name of its own (`?`, `-1`, or empty, as some exporters write
    /// them): free on its own, never tied to another dimension.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Dim::Symbolic(s) if is_anonymous_symbol(s))
    }
}

/// Exporters write an unknown dimension as `?` (paddle2onnx), `-1` or an empty name. A name
/// without a single letter or digit other than a minus sign and digits names nothing: a
/// dimension so named is anonymous. `N`, `batch`, `unk__3` and `p2o.DynamicDimension.0` are
/// names.
pub fn is_anonymous_symbol(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || t.parse::<i64>().is_ok() || !t.chars().any(char::is_alphanumeric)
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Model,
    Baseline,
    Golden,
    Labels,
}

/// How an artifact's stored bytes turn into its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Encoding {
    /// One zstd frame.
    Zstd,
    /// A zstd frame compressed with the base content as reference prefix (`zstd --patch-from`).
    ZstdPatch { base_sha256: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Label only: validated, never used as a path.
    pub name: String,
    pub role: Role,
    pub media_type: String,
    pub encoding: Encoding,
    /// Offset of the stored bytes from the start of the bundle's data section.
    pub offset: u64,
    pub stored_size: u64,
    /// Hex SHA-256 of the stored (compressed) bytes: checked before decompression.
    pub stored_sha256: String,
    /// Size of the content; decompression stops here.
    pub size: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// For a `zstd-patch` artifact: the same content as a plain zstd frame elsewhere in the
    /// data section, for devices that do not hold the base. A device fetches one or the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<StoredRange>,
}

/// Stored bytes of an alternative encoding of an artifact (always plain `zstd`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRange {
    pub offset: u64,
    pub stored_size: u64,
    pub stored_sha256: String,
}

impl Artifact {
    /// The plain-zstd form of a delta artifact, as an artifact of its own (same content digest),
    /// or None when the bundle carries only the patch.
    pub fn full_form(&self) -> Option<Artifact> {
        let full = self.full.as_ref()?;
        Some(Artifact {
            encoding: Encoding::Zstd,
            offset: full.offset,
            stored_size: full.stored_size,
            stored_sha256: full.stored_sha256.clone(),
            full: None,
            ..self.clone()
        })
    }

    /// The base content digest this artifact's stored bytes need, if any.
    pub fn base_sha256(&self) -> Option<&str> {
        match &self.encoding {
            Encoding::ZstdPatch { base_sha256 } => Some(base_sha256),
            Encoding::Zstd => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Allowed CPU architectures (`x86_64`, `aarch64`, `arm`); empty means any.
    #[serde(default)]
    pub arch: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    /// Backend preference, best first (`tract-onnx`, `tflite`, ...); empty means the agent's default.
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
    /// When true, running without the requested accelerator is a failed install.
    #[serde(default)]
    pub accelerator_required: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthChecks {
    /// Largest difference allowed between golden outputs and the device's outputs: absolute
    /// for expected values up to 1 in magnitude, relative to the expected value above.
    pub golden_tolerance: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_budget_us: Option<u64>,
    pub warmup_runs: u32,
    /// After activation the device watches the model this long before it counts as good (the
    /// previous version stays on disk until then). None: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_secs: Option<u64>,
    /// During the bake: roll back locally when more than this share of inferences fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// During the bake: roll back locally when the p95 inference latency exceeds this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_p95_us: Option<u64>,
}

impl Default for HealthChecks {
    fn default() -> Self {
        HealthChecks {
            golden_tolerance: 1e-4,
            latency_budget_us: None,
            warmup_runs: 2,
            bake_secs: None,
            max_error_rate: None,
            max_latency_p95_us: None,
        }
    }
}

impl Manifest {
    pub fn artifact(&self, role: Role) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.role == role)
    }

    /// Structural checks that need no keys: everything an agent must know before using a field.
    pub fn check(&self) -> Result<()> {
        if self.kind != MANIFEST_TYPE {
            return Err(Error::malformed("manifest", format!("type is {:?}, expected {MANIFEST_TYPE:?}", self.kind)));
        }
        if self.schema != MANIFEST_SCHEMA {
            return Err(Error::UnsupportedSchema { what: "manifest", found: self.schema, supported: MANIFEST_SCHEMA });
        }
        check_label("model name", &self.name)?;
        if self.artifacts.len() > MAX_ARTIFACTS {
            return Err(Error::TooLarge {
                what: "artifact list",
                size: self.artifacts.len() as u64,
                limit: MAX_ARTIFACTS as u64,
            });
        }
        if self.model.inputs.len() + self.model.outputs.len() > MAX_TENSORS {
            return Err(Error::TooLarge {
                what: "model signature",
                size: (self.model.inputs.len() + self.model.outputs.len()) as u64,
                limit: MAX_TENSORS as u64,
            });
        }
        let mut names = std::collections::BTreeSet::new();
        let mut ranges = Vec::new();
        for a in &self.artifacts {
            validate_artifact_name(&a.name)?;
            if !names.insert(a.name.as_str()) {
                return Err(Error::Artifact { name: a.name.clone(), detail: "listed twice".into() });
            }
            let full = a.full.as_ref();
            if full.is_some() && a.base_sha256().is_none() {
                return Err(Error::Artifact {
                    name: a.name.clone(),
                    detail: "a full form only makes sense for a delta".into(),
                });
            }
            let mut digests = vec![&a.sha256, &a.stored_sha256];
            digests.extend(full.map(|f| &f.stored_sha256));
            if let Encoding::ZstdPatch { base_sha256 } = &a.encoding {
                digests.push(base_sha256);
            }
            for d in digests {
                if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                    return Err(Error::Artifact { name: a.name.clone(), detail: format!("bad sha256 {d:?}") });
                }
            }
            for (offset, size) in
                std::iter::once((a.offset, a.stored_size)).chain(full.map(|f| (f.offset, f.stored_size)))
            {
                let end = offset.checked_add(size).ok_or_else(|| Error::Artifact {
                    name: a.name.clone(),
                    detail: "offset + size overflows".into(),
                })?;
                ranges.push((offset, end, a.name.as_str()));
            }
        }
        // Stored ranges may not overlap: each byte of the data section belongs to one artifact form.
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::Artifact {
                    name: w[1].2.to_string(),
                    detail: "stored bytes overlap another artifact".into(),
                });
            }
        }
        if self.artifact(Role::Model).is_none() {
            return Err(Error::malformed("manifest", "no artifact with role model"));
        }
        Ok(())
    }
}

/// Artifact names are labels. They are checked so that no consumer is tempted to trust them.
pub fn validate_artifact_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_')
        && !name.contains("..");
    if ok { Ok(()) } else { Err(Error::BadArtifactName { name: name.into() }) }
}

/// Model names follow the same rule (they appear in URLs and topics).
pub fn check_label(what: &'static str, name: &str) -> Result<()> {
    validate_artifact_name(name).map_err(|_| {
        Error::malformed(what, format!("{name:?} must be 1-64 chars of [a-z0-9._-] starting with a letter or digit"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifact_names() {
        for good in ["model", "model.onnx", "golden-1", "a_b"] {
            validate_artifact_name(good).unwrap();
        }
        for bad in ["", "../x", "a/b", "/etc/passwd", ".hidden", "A", "x..y", "a\\b", &"x".repeat(65)] {
            assert!(validate_artifact_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn anonymous_dims_name_nothing() {
        for anon in ["?", "-1", "", " ", "??", "*"] {
            assert!(Dim::Symbolic(anon.into()).is_anonymous(), "{anon:?}");
            assert_eq!(Dim::Symbolic(anon.into()).symbol(), None, "{anon:?}");
        }
        for named in ["N", "batch_size", "unk__3", "p2o.DynamicDimension.0", "x_2", "?N"] {
            assert!(!Dim::Symbolic(named.into()).is_anonymous(), "{named:?}");
            assert_eq!(Dim::Symbolic(named.into()).symbol(), Some(named));
        }
        assert!(!Dim::Fixed(3).is_anonymous());
        assert_eq!(Dim::Fixed(3).symbol(), None);
    }

    #[test]
    fn dims_encode_as_int_or_text() {
        let shape = vec![Dim::Symbolic("N".into()), Dim::Fixed(8)];
        let bytes = crate::canonical::to_vec(&shape).unwrap();
        assert_eq!(bytes, [0x82, 0x61, b'N', 0x08]);
        let back: Vec<Dim> = crate::canonical::from_slice("shape", &bytes, 64).unwrap();
        assert_eq!(back, shape);
    }
}
