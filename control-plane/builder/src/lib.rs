//! Building bundles from model files: read the model's signature, pin shapes the operator asks
//! to pin, run golden inputs through the real runtime to record the self-test, and write the
//! unsigned bundle. Used by `flotilla bundle build` (and later by the retraining pipeline).

pub mod baseline;
pub mod golden;
pub mod npy;

use std::collections::BTreeMap;

use flotilla_bundle::manifest::{
    Dim, HealthChecks, MANIFEST_SCHEMA, MANIFEST_TYPE, Manifest, ModelFormat, ModelSignature, Role, RuntimeSettings,
    Target,
};
use flotilla_bundle::writer::{ArtifactInput, write_bundle};
use flotilla_runtime::{Runtimes, Tensor, check_inputs};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Runtime(#[from] flotilla_runtime::RuntimeError),
    #[error(transparent)]
    Bundle(#[from] flotilla_bundle::Error),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub name: String,
    pub version: u64,
    pub model: Vec<u8>,
    /// `NAME → dims` pins, from `--input-shape NAME=1,24,24,3`.
    pub input_shapes: BTreeMap<String, Vec<u64>>,
    /// Golden cases: each a full set of model inputs.
    pub golden: Vec<Vec<Tensor>>,
    /// Golden cases with expected outputs from a reference runtime, stored as given.
    pub golden_reference: Vec<(Vec<Tensor>, Vec<Tensor>)>,
    pub golden_tolerance: f64,
    pub latency_budget_us: Option<u64>,
    /// Bake period and the watchdog's thresholds during it (see [`HealthChecks`]).
    pub bake_secs: Option<u64>,
    pub max_error_rate: Option<f64>,
    pub max_latency_p95_us: Option<u64>,
    /// TFLite delegate the devices should use (`xnnpack`, or a name their config maps to a
    /// library), and whether running without it is a failed install.
    pub delegate: Option<String>,
    pub accelerator_required: bool,
    pub threads: Option<u32>,
    pub backends: Vec<String>,
    /// Seconds since the epoch (the caller's clock).
    pub created: u64,
    pub expires: Option<u64>,
    pub zstd_level: i32,
    /// Store the model as a zstd patch against this base model content (`--delta-from`).
    pub delta_base: Option<Vec<u8>>,
    /// With `delta_base`: leave out the full form, so only devices holding the base can install.
    pub delta_only: bool,
    /// Drift baseline: reference data and what to watch (`--baseline`, `--drift-*`).
    pub drift: Option<(baseline::Reference, baseline::DriftOptions)>,
    /// Without `drift`: store this drift profile as it is (a successor keeping its
    /// predecessor's baseline).
    pub profile: Option<flotilla_drift::Profile>,
}

impl BuildOptions {
    pub fn new(name: &str, version: u64, model: Vec<u8>, created: u64) -> Self {
        BuildOptions {
            name: name.into(),
            version,
            model,
            input_shapes: BTreeMap::new(),
            golden: Vec::new(),
            golden_reference: Vec::new(),
            golden_tolerance: HealthChecks::default().golden_tolerance,
            latency_budget_us: None,
            bake_secs: None,
            max_error_rate: None,
            max_latency_p95_us: None,
            delegate: None,
            accelerator_required: false,
            threads: None,
            backends: Vec::new(),
            created,
            expires: None,
            zstd_level: 19,
            delta_base: None,
            delta_only: false,
            drift: None,
            profile: None,
        }
    }
}

/// Detect the model format from its bytes (never from a file name).
pub fn detect_format(model: &[u8]) -> Result<ModelFormat, BuildError> {
    // TFLite flatbuffers carry the file identifier "TFL3" at offset 4.
    if model.len() >= 8 && &model[4..8] == b"TFL3" {
        return Ok(ModelFormat::Tflite);
    }
    // ONNX is a protobuf ModelProto: try to read it.
    flotilla_runtime::tract_onnx::inspect_onnx(model).map(|_| ModelFormat::Onnx).map_err(|e| {
        BuildError::Input(format!("the model is neither a TFLite flatbuffer nor a readable ONNX model ({e})"))
    })
}

/// Parse `NAME=1,24,24,3`.
pub fn parse_input_shape(s: &str) -> Result<(String, Vec<u64>), BuildError> {
    let (name, dims) = s.split_once('=').ok_or_else(|| {
        BuildError::Input(format!("--input-shape {s:?}: expected NAME=D1,D2,... e.g. input=1,24,24,3"))
    })?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| BuildError::Input(format!("--input-shape {s:?}: dimensions must be whole numbers")))?;
    Ok((name.trim().to_string(), dims))
}

/// Read the signature and apply pins.
pub fn signature(opts: &BuildOptions) -> Result<ModelSignature, BuildError> {
    let mut sig = match detect_format(&opts.model)? {
        ModelFormat::Onnx => flotilla_runtime::tract_onnx::inspect_onnx(&opts.model)?,
        ModelFormat::Tflite => flotilla_runtime::tract_tflite::inspect_tflite(&opts.model)?,
    };
    for (name, dims) in &opts.input_shapes {
        let spec = sig.inputs.iter_mut().find(|i| &i.name == name).ok_or_else(|| {
            let names: Vec<_> = opts.input_shapes.keys().collect();
            BuildError::Input(format!(
                "--input-shape names {name:?}, which is not a model input (inputs pinned: {names:?})"
            ))
        })?;
        if dims.len() != spec.shape.len() {
            return Err(BuildError::Input(format!(
                "--input-shape {name}: model input has rank {}, got {} dims",
                spec.shape.len(),
                dims.len()
            )));
        }
        for (have, want) in spec.shape.iter_mut().zip(dims) {
            match have {
                Dim::Fixed(n) if n != want => {
                    return Err(BuildError::Input(format!(
                        "--input-shape {name}: the model fixes a dimension at {n}, not {want}"
                    )));
                }
                _ => *have = Dim::Fixed(*want),
            }
        }
    }
    Ok(sig)
}

/// The result of a build: the manifest as written and the unsigned bundle bytes.
#[derive(Debug)]
pub struct Built {
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    /// Things the operator should know (e.g. this machine's runtime disagrees with a reference).
    pub warnings: Vec<String>,
    /// The drift profile stored as the `baseline` artifact, when there is one.
    pub profile: Option<flotilla_drift::Profile>,
}

pub fn build(opts: &BuildOptions) -> Result<Built, BuildError> {
    flotilla_bundle::manifest::check_label("bundle name", &opts.name)?;
    let model_signature = signature(opts)?;
    let runtime = RuntimeSettings {
        backends: opts.backends.clone(),
        threads: opts.threads,
        delegate: opts.delegate.clone(),
        accelerator_required: opts.accelerator_required,
    };
    let mut artifacts = vec![ArtifactInput {
        name: "model".into(),
        role: Role::Model,
        media_type: model_signature.format.media_type().into(),
        content: opts.model.clone(),
        delta_base: opts.delta_base.clone(),
        with_full: !opts.delta_only,
    }];
    let mut warnings = Vec::new();
    if !opts.golden.is_empty() || !opts.golden_reference.is_empty() {
        let (set, w) = golden::compute(
            &opts.model,
            &model_signature,
            &runtime,
            &opts.golden,
            &opts.golden_reference,
            opts.golden_tolerance,
        )?;
        warnings = w;
        artifacts.push(ArtifactInput {
            name: "golden".into(),
            role: Role::Golden,
            media_type: flotilla_bundle::golden::GOLDEN_MEDIA_TYPE.into(),
            content: set.encode()?,
            delta_base: None,
            with_full: false,
        });
    }
    let mut profile = None;
    let computed = match &opts.drift {
        Some((reference, drift)) => Some(baseline::profile(&opts.model, &model_signature, &runtime, reference, drift)?),
        None => opts.profile.clone(),
    };
    if let Some(p) = computed {
        artifacts.push(ArtifactInput {
            name: "baseline".into(),
            role: Role::Baseline,
            media_type: baseline::PROFILE_MEDIA_TYPE.into(),
            content: serde_json::to_vec(&p).map_err(|e| BuildError::Input(e.to_string()))?,
            delta_base: None,
            with_full: false,
        });
        profile = Some(p);
    }
    let manifest = Manifest {
        kind: MANIFEST_TYPE.into(),
        schema: MANIFEST_SCHEMA,
        name: opts.name.clone(),
        version: opts.version,
        created: opts.created,
        expires: opts.expires,
        model: model_signature,
        artifacts: vec![],
        target: Target::default(),
        runtime,
        health: HealthChecks {
            golden_tolerance: opts.golden_tolerance,
            latency_budget_us: opts.latency_budget_us,
            bake_secs: opts.bake_secs,
            max_error_rate: opts.max_error_rate,
            max_latency_p95_us: opts.max_latency_p95_us,
            ..HealthChecks::default()
        },
    };
    let mut bytes = Vec::new();
    let manifest = write_bundle(manifest, &artifacts, opts.zstd_level, &mut bytes)?;
    Ok(Built { manifest, bytes, warnings, profile })
}

/// The model content of an existing bundle (the base for `--delta-from`), checked against the
/// digests in its manifest. No trust decision: the base only shrinks the new bundle, and devices
/// check it by digest before using it.
pub fn model_of(bundle: &[u8]) -> Result<Vec<u8>, BuildError> {
    let (doc, off) = flotilla_bundle::format::parse_envelope(bundle)?;
    let m = flotilla_bundle::verify::decode_manifest(&doc.signed)?;
    let a = m.artifact(Role::Model).expect("checked manifests have a model");
    if !matches!(a.encoding, flotilla_bundle::manifest::Encoding::Zstd) {
        return Err(BuildError::Input(format!(
            "{}@{} is itself a delta; use a bundle holding the full model as the base",
            m.name, m.version
        )));
    }
    Ok(flotilla_bundle::format::extract_artifact_to_vec(&mut std::io::Cursor::new(bundle), off, a, None, 8 << 30)?)
}

/// Options that build `model` as the successor of `previous` (a bundle file): the same runtime
/// settings, health checks and golden inputs (their outputs are computed again on the new
/// model), and the previous drift profile, whose signals and configuration a new baseline keeps.
/// The retraining loop builds its candidates with this.
pub fn successor_of(
    previous: &[u8],
    model: Vec<u8>,
    version: u64,
    created: u64,
) -> Result<(BuildOptions, Option<flotilla_drift::Profile>), BuildError> {
    let (doc, off) = flotilla_bundle::format::parse_envelope(previous)?;
    let m = flotilla_bundle::verify::decode_manifest(&doc.signed)?;
    let artifact = |role: Role| -> Result<Option<Vec<u8>>, BuildError> {
        let Some(a) = m.artifact(role) else { return Ok(None) };
        Ok(Some(flotilla_bundle::format::extract_artifact_to_vec(
            &mut std::io::Cursor::new(previous),
            off,
            a,
            None,
            1 << 30,
        )?))
    };
    let mut opts = BuildOptions::new(&m.name, version, model, created);
    opts.golden_tolerance = m.health.golden_tolerance;
    opts.latency_budget_us = m.health.latency_budget_us;
    opts.bake_secs = m.health.bake_secs;
    opts.max_error_rate = m.health.max_error_rate;
    opts.max_latency_p95_us = m.health.max_latency_p95_us;
    opts.delegate = m.runtime.delegate.clone();
    opts.accelerator_required = m.runtime.accelerator_required;
    opts.threads = m.runtime.threads;
    opts.backends = m.runtime.backends.clone();
    if let Some(bytes) = artifact(Role::Golden)? {
        let set = flotilla_bundle::golden::GoldenSet::decode(&bytes)?;
        for case in set.cases {
            let inputs = case.inputs.iter().map(Tensor::from_golden).collect::<Result<Vec<_>, _>>()?;
            opts.golden.push(inputs);
        }
    }
    let profile = match artifact(Role::Baseline)? {
        Some(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| BuildError::Input(format!("the previous bundle's drift profile: {e}")))?,
        ),
        None => None,
    };
    Ok((opts, profile))
}

/// Check golden inputs against the signature (used before running them).
pub(crate) fn checked(sig: &ModelSignature, case: &[Tensor]) -> Result<Vec<Tensor>, BuildError> {
    check_inputs(&sig.inputs, case.to_vec()).map_err(|e| BuildError::Input(format!("golden input: {e}")))
}

/// Convenience for callers that hold the runtime registry.
pub fn default_runtimes() -> Runtimes {
    Runtimes::default()
}
