//! The `tract-tflite` backend: tract's TFLite front end, pure Rust, always available; and
//! [`inspect_tflite`], which reads a TFLite model's signature without any runtime.
//!
//! Limits: tract-tflite covers a subset of TFLite's operators (no control flow such as `IF`, no
//! resource variables, no `CALL_ONCE`) and its loader panics on some models; both become
//! [`RuntimeError::Unsupported`] here, never a crash (the caller's [`crate::contain`] catches the
//! panics). It runs on the CPU only, so a bundle that requires an accelerator is refused.
//! Dynamic dims (`-1` in the model's `shape_signature`) need the graph to be re-typed with a
//! symbol; models whose ops bake the placeholder shape in are refused at load.

use std::io::Cursor;
use std::sync::Arc;

use flotilla_bundle::manifest::{DType, Dim, ModelFormat, ModelSignature, RuntimeSettings, TensorSpec};
use tract_tflite::internal::tract_core::ops::source::TypedSource;
use tract_tflite::internal::*;
use tract_tflite::tflite::{TensorType, root_as_model};

use crate::error::RuntimeError;
use crate::tensor::Tensor as FTensor;
use crate::tract_tensors::{brief, tract_dim};
use crate::{Backend, LoadedModel};

pub const NAME: &str = "tract-tflite";

#[derive(Debug, Default)]
pub struct TractTflite;

impl Backend for TractTflite {
    fn name(&self) -> &'static str {
        NAME
    }

    fn supports(&self, format: ModelFormat) -> bool {
        format == ModelFormat::Tflite
    }

    fn load(
        &self,
        model: &[u8],
        sig: &ModelSignature,
        settings: &RuntimeSettings,
    ) -> Result<Box<dyn LoadedModel>, RuntimeError> {
        crate::refuse_required_accelerator(NAME, settings)?;
        let unsupported =
            |what: &str, e: TractError| RuntimeError::Unsupported(format!("{NAME}: {what}: {}", brief(&e)));
        let mut m = tract_tflite::tflite()
            .model_for_read(&mut Cursor::new(model))
            .map_err(|e| unsupported("cannot translate the model", e))?;
        let input_names: Vec<String> = m
            .input_outlets()
            .map_err(|e| unsupported("no inputs", e))?
            .iter()
            .map(|o| m.node(o.node).name.clone())
            .collect();
        if input_names.len() != sig.inputs.len() || m.output_outlets().map_or(0, |o| o.len()) != sig.outputs.len() {
            return Err(RuntimeError::Load {
                backend: NAME,
                detail: format!(
                    "the manifest lists {} inputs and {} outputs, the model has inputs {input_names:?} and {} outputs",
                    sig.inputs.len(),
                    sig.outputs.len(),
                    m.output_outlets().map_or(0, |o| o.len())
                ),
            });
        }
        let mut input_order = Vec::new();
        let mut input_types = Vec::new();
        for spec in &sig.inputs {
            let ix = input_names.iter().position(|n| *n == spec.name).ok_or_else(|| RuntimeError::Load {
                backend: NAME,
                detail: format!("manifest input {:?} is not an input of the model ({input_names:?})", spec.name),
            })?;
            let fact = m.input_fact(ix).map_err(|e| unsupported("reading an input", e))?.clone();
            if fact.datum_type.unquantized() != crate::tract_tensors::datum_type(spec.dtype)? {
                return Err(RuntimeError::Load {
                    backend: NAME,
                    detail: format!(
                        "input {:?} is {:?} in the model, the manifest says {}",
                        spec.name,
                        fact.datum_type,
                        spec.dtype.as_str()
                    ),
                });
            }
            // Symbolic dims become tract symbols; the graph's facts are then re-derived.
            if spec.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))) {
                let dims: TVec<TDim> = spec.shape.iter().map(|d| tract_dim(&m.symbols, d)).collect();
                // The source op keeps its own copy of the fact, which re-deriving would restore.
                let dynamic = fact.datum_type.fact(dims);
                let source = m.input_outlets().map_err(|e| unsupported("no inputs", e))?[ix].node;
                m.node_mut(source).op = Box::new(TypedSource::new(dynamic.clone()));
                m.set_input_fact(ix, dynamic).map_err(|e| unsupported("setting an input shape", e))?;
                m.refresh_output_facts().map_err(|e| {
                    unsupported(&format!("the model cannot take input {:?} with dynamic dims", spec.name), e)
                })?;
            }
            input_order.push(ix);
            input_types.push(fact.datum_type);
        }
        let plan = m
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| unsupported("cannot optimise the model", e))?;
        let output_names = sig.outputs.iter().map(|o| o.name.clone()).collect();
        Ok(Box::new(TractTfliteModel { plan, input_order, input_types, output_names }))
    }
}

struct TractTfliteModel {
    plan: Arc<TypedRunnableModel>,
    /// Position in the model's input list of each manifest input.
    input_order: Vec<usize>,
    /// The model's datum type of each manifest input (quantized types carry scale and zero point).
    input_types: Vec<DatumType>,
    output_names: Vec<String>,
}

impl LoadedModel for TractTfliteModel {
    fn backend(&self) -> &str {
        NAME
    }

    fn run(&self, inputs: Vec<FTensor>) -> Result<Vec<FTensor>, RuntimeError> {
        let mut slots: Vec<Option<TValue>> = vec![None; inputs.len()];
        for ((t, &ix), &dt) in inputs.into_iter().zip(&self.input_order).zip(&self.input_types) {
            slots[ix] = Some(to_tract(t, dt)?.into());
        }
        let inputs: TVec<TValue> = slots.into_iter().map(|s| s.expect("every input slot filled")).collect();
        let outputs = self.plan.run(inputs).map_err(|e| RuntimeError::Run { backend: NAME, detail: brief(&e) })?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(t, name)| {
                crate::tract_tensors::from_tract(name, t, |e| RuntimeError::Run {
                    backend: NAME,
                    detail: format!("reading output {name:?}: {}", brief(&e)),
                })
            })
            .collect()
    }
}

/// Build the tract tensor; quantized model inputs get the model's scale and zero point.
fn to_tract(t: FTensor, model_dt: DatumType) -> Result<Tensor, RuntimeError> {
    let mut tensor = crate::tract_tensors::to_tract(&t)?;
    if model_dt.is_quantized() && model_dt.unquantized() == tensor.datum_type() {
        // Relabelling only: the raw integers are already in the model's quantized encoding.
        #[allow(unsafe_code)] // same element width and bytes; tract has no safe relabel
        unsafe {
            tensor.set_datum_type(model_dt)
        };
    }
    Ok(tensor)
}

/// Read a TFLite model's inputs and outputs from its main subgraph: tensor names, element types,
/// and shapes from `shape_signature` (falling back to `shape`), where `-1` dims become symbols
/// named `<in|out><index>_<axis>` (e.g. `in0_0` for a dynamic batch).
pub fn inspect_tflite(model: &[u8]) -> Result<ModelSignature, RuntimeError> {
    let bad = |detail: String| RuntimeError::Unsupported(format!("not a readable TFLite model: {detail}"));
    let root = root_as_model(model).map_err(|e| bad(e.to_string()))?;
    let graph = root.subgraphs().filter(|g| !g.is_empty()).ok_or_else(|| bad("no subgraph".into()))?.get(0);
    let tensors = graph.tensors().ok_or_else(|| bad("no tensors".into()))?;
    let specs = |indices: Option<Vec<i32>>, prefix: &str| -> Result<Vec<TensorSpec>, RuntimeError> {
        let indices = indices.ok_or_else(|| bad(format!("no {prefix}put list")))?;
        indices
            .into_iter()
            .enumerate()
            .map(|(pos, ix)| {
                let t = usize::try_from(ix)
                    .ok()
                    .filter(|&i| i < tensors.len())
                    .map(|i| tensors.get(i))
                    .ok_or_else(|| bad(format!("tensor index {ix} out of range")))?;
                let name = t.name().unwrap_or_default().to_string();
                let dtype = tflite_dtype(t.type_()).ok_or_else(|| {
                    RuntimeError::Unsupported(format!("{name:?} has TFLite tensor type {:?}", t.type_()))
                })?;
                let dims =
                    t.shape_signature().filter(|s| !s.is_empty()).or(t.shape()).map(|s| s.iter().collect::<Vec<i32>>());
                let shape = dims
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(
                        |(axis, d)| {
                            if d >= 0 { Dim::Fixed(d as u64) } else { Dim::Symbolic(format!("{prefix}{pos}_{axis}")) }
                        },
                    )
                    .collect();
                Ok(TensorSpec { name, dtype, shape })
            })
            .collect()
    };
    let inputs = specs(graph.inputs().map(|v| v.iter().collect()), "in")?;
    let outputs = specs(graph.outputs().map(|v| v.iter().collect()), "out")?;
    Ok(ModelSignature { format: ModelFormat::Tflite, inputs, outputs })
}

fn tflite_dtype(t: TensorType) -> Option<DType> {
    Some(match t {
        TensorType::FLOAT32 => DType::F32,
        TensorType::FLOAT16 => DType::F16,
        TensorType::FLOAT64 => DType::F64,
        TensorType::INT8 => DType::I8,
        TensorType::UINT8 => DType::U8,
        TensorType::INT16 => DType::I16,
        TensorType::INT32 => DType::I32,
        TensorType::INT64 => DType::I64,
        TensorType::BOOL => DType::Bool,
        _ => return None,
    })
}
