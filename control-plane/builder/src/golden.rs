//! Golden cases: read operator-supplied inputs, record the outputs the real runtime gives.

use std::path::Path;

use flotilla_api::v2::{InferRequest, InferTensor};
use flotilla_bundle::golden::{GoldenCase, GoldenSet};
use flotilla_bundle::manifest::{DType, ModelSignature, RuntimeSettings};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

use crate::{BuildError, checked};

/// Golden cases for a bundle: the inputs of `cases` with the outputs the reference CPU kernels
/// compute now, plus `reference` cases whose expected outputs came from elsewhere (e.g.
/// onnxruntime in the training pipeline), stored as given. Every device must reproduce them; a
/// runtime that computes a model wrongly without an error (it happens, e.g. tract on some int8
/// QDQ graphs) then fails its self-test. Where this machine's runtime already disagrees with a
/// reference case, the returned warnings say so.
pub fn compute(
    runtimes: &Runtimes,
    model: &[u8],
    sig: &ModelSignature,
    settings: &RuntimeSettings,
    cases: &[Vec<Tensor>],
    reference: &[(Vec<Tensor>, Vec<Tensor>)],
    tolerance: f64,
) -> Result<(GoldenSet, Vec<String>), BuildError> {
    // The reference is the runtime's own CPU kernels, never a delegate: the real TFLite library
    // when the build has one ([`crate::reference_runtimes`]), else tract.
    let settings = RuntimeSettings { delegate: None, accelerator_required: false, ..settings.clone() };
    let mut warnings = Vec::new();
    // Cases with reference outputs need no runtime here: when none can load the model, they are
    // stored as given (the devices' runtimes are what they test).
    let loaded = match runtimes.load(model, sig, &settings) {
        Ok(m) => Some(m),
        Err(e) if cases.is_empty() => {
            warnings.push(format!(
                "the golden reference outputs are stored as given, unchecked: no runtime here can load the model ({e})"
            ));
            None
        }
        Err(e) => return Err(e.into()),
    };
    if sig.format == flotilla_bundle::manifest::ModelFormat::Tflite
        && !cases.is_empty()
        && !runtimes.names().contains(&"tflite")
    {
        warnings.push(
            "the golden outputs of this TFLite model come from tract-tflite (FLOTILLA_TFLITE_LIB is not set): devices running TensorFlow Lite refuse the bundle where the two disagree; give reference outputs with the inputs, or set FLOTILLA_TFLITE_LIB".into(),
        );
    }
    let mut out = GoldenSet::default();
    for case in cases {
        let loaded = loaded.as_ref().expect("loaded when there are cases to compute");
        let inputs = checked(sig, case)?;
        let outputs = flotilla_runtime::run(loaded.as_ref(), inputs.clone())?;
        out.cases.push(GoldenCase {
            inputs: inputs.iter().map(Tensor::to_golden).collect(),
            outputs: outputs.iter().map(Tensor::to_golden).collect(),
        });
    }
    for (i, (case, expected)) in reference.iter().enumerate() {
        let inputs = checked(sig, case)?;
        for want in expected {
            if !sig.outputs.iter().any(|o| o.name == want.name) {
                return Err(BuildError::Input(format!(
                    "golden reference case {i}: {:?} is not an output of the model",
                    want.name
                )));
            }
        }
        let checked_here = loaded.as_ref().map(|l| (l.backend(), flotilla_runtime::run(l.as_ref(), inputs.clone())));
        match checked_here {
            None => {}
            Some((backend, Ok(outputs))) => {
                for want in expected {
                    let have = outputs.iter().find(|o| o.name == want.name);
                    let diff =
                        have.map(|h| flotilla_runtime::selftest::scaled_diff(&h.data.to_f64(), &want.data.to_f64()));
                    if diff.is_none_or(|d| d > tolerance) {
                        warnings.push(format!(
                            "golden reference case {i}: {} on this machine gives output {:?} {} from the reference; devices running it will refuse the bundle",
                            backend,
                            want.name,
                            diff.map_or("unlike".to_string(), |d| format!("{d:.3e} away"))
                        ));
                    }
                }
            }
            Some((backend, Err(e))) => {
                warnings.push(format!("golden reference case {i}: {backend} cannot run it here: {e}"))
            }
        }
        out.cases.push(GoldenCase {
            inputs: inputs.iter().map(Tensor::to_golden).collect(),
            outputs: expected.iter().map(Tensor::to_golden).collect(),
        });
    }
    Ok((out, warnings))
}

/// One golden case read from a file: inputs, and expected outputs when the file has them.
pub type FileCase = (Vec<Tensor>, Option<Vec<Tensor>>);

/// A case in a JSON golden file: a v2 infer request's `inputs`, optionally with the `outputs` a
/// reference runtime produced for them (as in a v2 response).
#[derive(serde::Deserialize)]
struct JsonCase {
    inputs: Vec<InferTensor>,
    #[serde(default)]
    outputs: Option<Vec<InferTensor>>,
}

/// Read golden cases from a file: a v2 infer request as JSON (`{"inputs":[...]}`, optionally with
/// reference `"outputs"` in the v2 response form), a JSON array of such objects, or a `.npy`
/// array for a single-input model (each file is one case; its leading dimension is the batch).
pub fn read(path: &Path, sig: &ModelSignature) -> Result<Vec<FileCase>, BuildError> {
    let bytes = std::fs::read(path).map_err(|e| BuildError::Input(format!("cannot read {}: {e}", path.display())))?;
    if bytes.starts_with(crate::npy::MAGIC) {
        let [input] = sig.inputs.as_slice() else {
            return Err(BuildError::Input(format!(
                "{}: a .npy golden file fits single-input models; this model has {} inputs (use JSON)",
                path.display(),
                sig.inputs.len()
            )));
        };
        let arr = crate::npy::parse(&bytes).map_err(|e| BuildError::Input(format!("{}: {e}", path.display())))?;
        let data = TensorData::from_f64(input.dtype, &arr.data)?;
        return Ok(vec![(vec![Tensor::new(input.name.clone(), arr.shape, data)?], None)]);
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| BuildError::Input(format!("{}: neither .npy nor JSON: {e}", path.display())))?;
    let cases: Vec<JsonCase> =
        if json.is_array() { serde_json::from_value(json) } else { serde_json::from_value(json).map(|r| vec![r]) }
            .map_err(|e| {
                BuildError::Input(format!("{}: expected a v2 infer request {{\"inputs\": [...]}}: {e}", path.display()))
            })?;
    cases
        .iter()
        .map(|c| Ok((tensors(&c.inputs, "input")?, c.outputs.as_deref().map(|o| tensors(o, "output")).transpose()?)))
        .collect()
}

/// Convert a v2 request's tensors.
pub fn request_tensors(r: &InferRequest) -> Result<Vec<Tensor>, BuildError> {
    tensors(&r.inputs, "input")
}

fn tensors(ts: &[InferTensor], what: &str) -> Result<Vec<Tensor>, BuildError> {
    ts.iter()
        .map(|t| {
            let dtype = DType::parse(&t.datatype)
                .ok_or_else(|| BuildError::Input(format!("{what} {:?}: unknown datatype {:?}", t.name, t.datatype)))?;
            let values = t.flat_numbers().map_err(|e| BuildError::Input(format!("{what} {:?}: {e}", t.name)))?;
            let data = TensorData::from_f64(dtype, &values)?;
            Ok(Tensor::new(t.name.clone(), t.shape.iter().map(|&d| d as usize).collect(), data)?)
        })
        .collect()
}
