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
use flotilla_runtime::selftest::{SelfTestKind, scaled_diff};
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
    /// The TensorFlow Lite C library to run TFLite models with here (golden outputs, baseline,
    /// the smoke trial); None: `$FLOTILLA_TFLITE_LIB` when it loads, else tract-tflite alone.
    pub tflite_lib: Option<std::path::PathBuf>,
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
            tflite_lib: None,
        }
    }
}

/// The runtimes a build runs a model on: the built-in ones, and the TensorFlow Lite library
/// (`lib`, else `$FLOTILLA_TFLITE_LIB`), which comes first for TFLite models. A library named
/// explicitly must load; the environment's is used when it does.
pub fn reference_runtimes(lib: Option<&std::path::Path>) -> Result<Runtimes, BuildError> {
    match lib {
        Some(path) => Runtimes::with_tflite(Some(path))
            .map_err(|e| BuildError::Input(format!("the TensorFlow Lite library {}: {e}", path.display()))),
        None => Ok(Runtimes::with_tflite(None).unwrap_or_default()),
    }
}

/// Detect the model format from its bytes (never from a file name).
pub fn detect_format(model: &[u8]) -> Result<ModelFormat, BuildError> {
    // TFLite flatbuffers carry the file identifier "TFL3" at offset 4.
    if model.len() >= 8 && &model[4..8] == b"TFL3" {
        return Ok(ModelFormat::Tflite);
    }
    // ONNX is a protobuf ModelProto: try to read it.
    if flotilla_runtime::tract_onnx::is_onnx(model) {
        return Ok(ModelFormat::Onnx);
    }
    Err(BuildError::Input("the model is neither a TFLite flatbuffer nor a readable ONNX model".into()))
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
        ModelFormat::Onnx => flotilla_runtime::tract_onnx::inspect_onnx(&opts.model).map_err(|e| match e {
            flotilla_runtime::RuntimeError::Unsupported(why) => {
                BuildError::Input(format!("this ONNX model cannot be served: {why}"))
            }
            e => e.into(),
        })?,
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
    /// The self-test devices will run before the model serves, as tried here.
    pub self_test: SelfTestTrial,
}

/// The self-test a bundle gets on every device, and how it went on this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfTestTrial {
    pub kind: SelfTestKind,
    /// `3 golden cases`, or the smoke inputs' shapes (`x=[1,3,64,64]`).
    pub inputs: String,
    /// The backend that ran it here and its median latency (µs), when it ran here.
    pub here: Option<(String, u64)>,
}

/// Exporters leave stale output shapes behind (ddddocr's OCR model declares `[1, 19]` and gives
/// `[1, 4]` for a short image; its successor declares `[1, seqlen]` and gives `[4, 1, 8210]`):
/// where what the model gave for `inputs` contradicts a dimension its outputs declare, that
/// dimension becomes anonymous in the signature, so that the bundle tells devices and apps the
/// truth; a different rank or datatype replaces the declaration with what came back, every
/// dimension free. Returns a warning per change.
pub fn reconcile_outputs(
    sig: &mut ModelSignature,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<Vec<String>, BuildError> {
    let mut bound: BTreeMap<String, usize> = BTreeMap::new();
    for (spec, t) in sig.inputs.iter().zip(inputs) {
        for (d, &size) in spec.shape.iter().zip(&t.shape) {
            if let Some(name) = d.symbol() {
                bound.entry(name.to_string()).or_insert(size);
            }
        }
    }
    let taken: std::collections::BTreeSet<String> = sig
        .inputs
        .iter()
        .chain(&sig.outputs)
        .flat_map(|s| s.shape.iter().filter_map(|d| d.symbol().map(String::from)))
        .collect();
    let mut warnings = Vec::new();
    for spec in &mut sig.outputs {
        // (Golden reference cases may list only some outputs; a smoke run's are checked after.)
        let Some(t) = outputs.iter().find(|t| t.name == spec.name) else { continue };
        let fresh = |axis: usize| {
            let mut name = format!("{}_{axis}", spec.name);
            while taken.contains(&name) {
                name.push('_');
            }
            Dim::Symbolic(name)
        };
        let declared = format!("{} [{}]", spec.dtype.as_str(), dims_text(&spec.shape));
        let mut changed = false;
        if t.data.dtype() != spec.dtype || t.shape.len() != spec.shape.len() {
            // Nothing of the declaration holds: what the model gave, every dimension free.
            spec.dtype = t.data.dtype();
            spec.shape = (0..t.shape.len()).map(fresh).collect();
            changed = true;
        }
        for (axis, (d, &size)) in spec.shape.iter_mut().zip(&t.shape).enumerate() {
            let want = match d {
                Dim::Fixed(n) => Some(*n as usize),
                _ => d.symbol().and_then(|name| bound.get(name).copied()),
            };
            if want.is_some_and(|w| w != size) {
                *d = fresh(axis);
                changed = true;
            }
        }
        if changed {
            warnings.push(format!(
                "output {:?} is declared {declared} but came back {} {:?}: recorded as {} [{}] (what the model contradicts is left free)",
                spec.name,
                t.data.dtype().as_str(),
                t.shape,
                spec.dtype.as_str(),
                dims_text(&spec.shape)
            ));
        }
    }
    Ok(warnings)
}

fn dims_text(shape: &[Dim]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
}

/// What to tell an operator whose model fails its smoke self-test with `error` (`free`: its
/// inputs have dimensions `--input-shape` could pin).
fn self_test_advice(free: bool, error: &str) -> &'static str {
    if error.contains("Unimplemented") {
        "The runtime lacks an operator the model uses, so devices running it cannot serve the model whatever its inputs."
    } else if free {
        "Give --golden with real inputs (a v2 infer request), or pin the free dimensions with --input-shape NAME=D1,D2,.."
    } else {
        "Give --golden with real inputs (a v2 infer request)."
    }
}

/// Devices test a bundle without golden inputs on smoke inputs made from its signature
/// ([`flotilla_runtime::smoke`]); try exactly that here, so that a bundle every device would
/// refuse is refused now, with the reason. The latency budget is judged on the devices (this
/// machine is rarely one of them): here an over-budget median is a warning.
fn smoke_trial(
    runtimes: &Runtimes,
    model: &[u8],
    sig: &mut ModelSignature,
    settings: &RuntimeSettings,
    health: &HealthChecks,
    warnings: &mut Vec<String>,
) -> Result<SelfTestTrial, BuildError> {
    let inputs = flotilla_runtime::smoke::describe(sig);
    let free = sig.inputs.iter().any(|s| s.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))));
    let budget = match health.latency_budget_us {
        Some(b) => format!(" and judge --latency-budget {b} µs on its median"),
        None => String::new(),
    };
    let smoke = flotilla_runtime::smoke::inputs(sig).map_err(|e| {
        BuildError::Input(format!(
            "without --golden, devices run the model on inputs made from its signature{budget}, and none can be made for this model ({e}). {}",
            self_test_advice(free, &e)
        ))
    })?;
    let settings = RuntimeSettings { delegate: None, accelerator_required: false, ..settings.clone() };
    let loaded = match runtimes.load(model, sig, &settings) {
        Ok(m) => m,
        Err(e) if sig.format == ModelFormat::Tflite && !runtimes.names().contains(&"tflite") => {
            warnings.push(format!(
                "the smoke self-test ({inputs}) could not be tried here ({e}); set FLOTILLA_TFLITE_LIB to try it with the TensorFlow Lite library devices use"
            ));
            return Ok(SelfTestTrial { kind: SelfTestKind::Smoke, inputs, here: None });
        }
        Err(e) => return Err(e.into()),
    };
    let fails_here = |e: String| {
        BuildError::Input(format!(
            "without --golden, devices run the model on inputs made from its signature{budget} before it may serve, and it fails that here: {e}. {}",
            self_test_advice(free, &e)
        ))
    };
    let outputs = flotilla_runtime::run(loaded.as_ref(), check_inputs(&sig.inputs, smoke.clone())?)
        .map_err(|e| fails_here(format!("smoke input ({inputs}): {e}")))?;
    warnings.extend(reconcile_outputs(sig, &smoke, &outputs)?);
    warnings.extend(cross_check(runtimes, model, sig, &settings, loaded.backend(), &smoke, &outputs, health));
    let here = HealthChecks { latency_budget_us: None, ..health.clone() };
    let t = flotilla_runtime::selftest::run(loaded.as_ref(), sig, &here, None).map_err(fails_here)?;
    if let Some(b) = health.latency_budget_us
        && t.median_us > b
    {
        warnings.push(format!(
            "the smoke self-test's median here is {} µs ({}), over the latency budget of {b} µs: devices no faster than this machine will refuse the bundle",
            t.median_us,
            loaded.backend()
        ));
    }
    Ok(SelfTestTrial { kind: SelfTestKind::Smoke, inputs, here: Some((loaded.backend().to_string(), t.median_us)) })
}

/// A smoke test sees whether a model runs, not whether its values are right. Where this machine
/// has more than one runtime for the model's format (TFLite with the library: `tflite` and
/// `tract-tflite`), each other runtime runs the same smoke input: devices with only that one
/// would compute what it computes. Returns a warning for each that disagrees or cannot run it.
#[allow(clippy::too_many_arguments)]
fn cross_check(
    runtimes: &Runtimes,
    model: &[u8],
    sig: &ModelSignature,
    settings: &RuntimeSettings,
    first: &str,
    inputs: &[Tensor],
    outputs: &[Tensor],
    health: &HealthChecks,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for other in runtimes.names().into_iter().filter(|&n| n != first) {
        let only = RuntimeSettings { backends: vec![other.to_string()], ..settings.clone() };
        let theirs = match runtimes.load(model, sig, &only) {
            Ok(m) => flotilla_runtime::run(m.as_ref(), inputs.to_vec()),
            Err(flotilla_runtime::RuntimeError::NoBackend(_)) => continue, // not for this format
            Err(e) => Err(e),
        };
        match theirs {
            Err(e) => warnings.push(format!(
                "devices without {first} run this model on {other}, which fails on it ({e}): they will refuse the bundle"
            )),
            Ok(theirs) => {
                for want in outputs {
                    let diff = theirs
                        .iter()
                        .find(|t| t.name == want.name)
                        .filter(|t| t.shape == want.shape)
                        .map_or(f64::INFINITY, |t| scaled_diff(&t.data.to_f64(), &want.data.to_f64()));
                    if diff > health.golden_tolerance {
                        warnings.push(format!(
                            "{first} and {other} disagree on the smoke input: output {:?} differs by {diff:.3e}. Devices without {first} run it on {other}; give --golden with reference outputs (e.g. from your training framework) so that a device computing it wrongly refuses it, or ask for --backend {first}",
                            want.name
                        ));
                        break;
                    }
                }
            }
        }
    }
    warnings
}

pub fn build(opts: &BuildOptions) -> Result<Built, BuildError> {
    flotilla_bundle::manifest::check_label("bundle name", &opts.name)?;
    let mut model_signature = signature(opts)?;
    let runtimes = reference_runtimes(opts.tflite_lib.as_deref())?;
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
    let health = HealthChecks {
        golden_tolerance: opts.golden_tolerance,
        latency_budget_us: opts.latency_budget_us,
        bake_secs: opts.bake_secs,
        max_error_rate: opts.max_error_rate,
        max_latency_p95_us: opts.max_latency_p95_us,
        ..HealthChecks::default()
    };
    let mut warnings = Vec::new();
    let self_test;
    if opts.golden.is_empty() && opts.golden_reference.is_empty() {
        self_test = smoke_trial(&runtimes, &opts.model, &mut model_signature, &runtime, &health, &mut warnings)?;
    } else {
        let (set, w) = golden::compute(
            &runtimes,
            &opts.model,
            &model_signature,
            &runtime,
            &opts.golden,
            &opts.golden_reference,
            opts.golden_tolerance,
        )?;
        warnings.extend(w);
        for case in &set.cases {
            let decode = |ts: &[flotilla_bundle::golden::TensorData]| {
                ts.iter().map(Tensor::from_golden).collect::<Result<Vec<_>, _>>()
            };
            warnings.extend(reconcile_outputs(&mut model_signature, &decode(&case.inputs)?, &decode(&case.outputs)?)?);
        }
        self_test = SelfTestTrial {
            kind: SelfTestKind::Golden,
            inputs: format!("{} golden case{}", set.cases.len(), if set.cases.len() == 1 { "" } else { "s" }),
            here: None,
        };
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
        Some((reference, drift)) => {
            Some(baseline::profile(&runtimes, &opts.model, &model_signature, &runtime, reference, drift)?)
        }
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
        health,
    };
    let mut bytes = Vec::new();
    let manifest = write_bundle(manifest, &artifacts, opts.zstd_level, &mut bytes)?;
    Ok(Built { manifest, bytes, warnings, profile, self_test })
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_bundle::manifest::{DType, TensorSpec};
    use flotilla_runtime::TensorData;

    fn spec(name: &str, dtype: DType, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape }
    }

    #[test]
    fn outputs_record_what_the_model_gives_where_it_contradicts_its_declaration() {
        let sym = |s: &str| Dim::Symbolic(s.into());
        let mut sig = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("x", DType::F32, vec![sym("N"), Dim::Fixed(3)])],
            outputs: vec![
                spec("ok", DType::F32, vec![sym("N"), Dim::Fixed(2)]),
                spec("stale", DType::F32, vec![sym("N"), Dim::Fixed(19)]),
                spec("rank", DType::F32, vec![Dim::Fixed(1), sym("seqlen")]),
                spec("missing", DType::F32, vec![sym("N")]),
            ],
        };
        let x = Tensor::new("x", vec![2, 3], TensorData::F32(vec![0.0; 6])).unwrap();
        let out = |name: &str, shape: Vec<usize>| {
            let n = shape.iter().product();
            Tensor::new(name, shape, TensorData::F32(vec![0.0; n])).unwrap()
        };
        let warnings = reconcile_outputs(
            &mut sig,
            &[x],
            &[out("ok", vec![2, 2]), out("stale", vec![2, 4]), out("rank", vec![4, 1, 8210])],
        )
        .unwrap();
        assert_eq!(sig.outputs[0].shape, [sym("N"), Dim::Fixed(2)], "what holds stays");
        assert_eq!(sig.outputs[1].shape, [sym("N"), sym("stale_1")]);
        assert_eq!(sig.outputs[2].shape, [sym("rank_0"), sym("rank_1"), sym("rank_2")]);
        assert_eq!(sig.outputs[3].shape, [sym("N")], "an output a golden case leaves out is left alone");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[1].contains("declared FP32 [1,seqlen] but came back FP32 [4, 1, 8210]"), "{warnings:?}");
    }
}
