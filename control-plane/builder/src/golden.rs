//! Golden cases: read operator-supplied inputs, record the outputs the real runtime gives.

use std::path::Path;

use flotilla_api::v2::InferRequest;
use flotilla_bundle::golden::{GoldenCase, GoldenSet};
use flotilla_bundle::manifest::{DType, ModelSignature, RuntimeSettings};
use flotilla_runtime::{Runtimes, Tensor, TensorData};

use crate::{BuildError, checked};

/// Run every case through the runtime the device would use and record the outputs.
pub fn compute(
    model: &[u8],
    sig: &ModelSignature,
    settings: &RuntimeSettings,
    cases: &[Vec<Tensor>],
) -> Result<GoldenSet, BuildError> {
    // The reference is the runtime's own CPU kernels, never a delegate: the real TFLite library
    // when one is configured (`FLOTILLA_TFLITE_LIB`), else tract.
    let reference = RuntimeSettings { delegate: None, accelerator_required: false, ..settings.clone() };
    let runtimes = Runtimes::with_tflite(None).unwrap_or_default();
    let loaded = runtimes.load(model, sig, &reference)?;
    let mut out = GoldenSet::default();
    for case in cases {
        let inputs = checked(sig, case)?;
        let outputs = flotilla_runtime::run(loaded.as_ref(), inputs.clone())?;
        out.cases.push(GoldenCase {
            inputs: inputs.iter().map(Tensor::to_golden).collect(),
            outputs: outputs.iter().map(Tensor::to_golden).collect(),
        });
    }
    Ok(out)
}

/// Read golden inputs from a file: a v2 infer request as JSON (`{"inputs":[...]}`), a JSON array
/// of such requests, or a `.npy` array for a single-input model (each file is one case; its
/// leading dimension is the batch).
pub fn read(path: &Path, sig: &ModelSignature) -> Result<Vec<Vec<Tensor>>, BuildError> {
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
        return Ok(vec![vec![Tensor::new(input.name.clone(), arr.shape, data)?]]);
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| BuildError::Input(format!("{}: neither .npy nor JSON: {e}", path.display())))?;
    let requests: Vec<InferRequest> =
        if json.is_array() { serde_json::from_value(json) } else { serde_json::from_value(json).map(|r| vec![r]) }
            .map_err(|e| {
                BuildError::Input(format!("{}: expected a v2 infer request {{\"inputs\": [...]}}: {e}", path.display()))
            })?;
    requests.iter().map(request_tensors).collect()
}

/// Convert a v2 request's tensors.
pub fn request_tensors(r: &InferRequest) -> Result<Vec<Tensor>, BuildError> {
    r.inputs
        .iter()
        .map(|t| {
            let dtype = DType::parse(&t.datatype)
                .ok_or_else(|| BuildError::Input(format!("input {:?}: unknown datatype {:?}", t.name, t.datatype)))?;
            let values = t.flat_numbers().map_err(|e| BuildError::Input(format!("input {:?}: {e}", t.name)))?;
            let data = TensorData::from_f64(dtype, &values)?;
            Ok(Tensor::new(t.name.clone(), t.shape.iter().map(|&d| d as usize).collect(), data)?)
        })
        .collect()
}
