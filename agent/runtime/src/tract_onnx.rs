//! The tract-onnx backend: pure Rust, always available.

use std::io::Cursor;
use std::sync::Arc;

use flotilla_bundle::manifest::{
    DType, Dim, ModelFormat, ModelSignature, RuntimeSettings, TensorSpec, is_anonymous_symbol,
};
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::InferenceSimplePlan;

use crate::error::RuntimeError;
use crate::tensor::Tensor as FTensor;
use crate::tract_tensors::{brief, datum_type, from_tract, to_tract, tract_dim};
use crate::{Backend, LoadedModel};

pub const NAME: &str = "tract-onnx";

#[derive(Debug, Default)]
pub struct TractOnnx;

impl Backend for TractOnnx {
    fn name(&self) -> &'static str {
        NAME
    }

    fn supports(&self, format: ModelFormat) -> bool {
        format == ModelFormat::Onnx
    }

    fn load(
        &self,
        model: &[u8],
        sig: &ModelSignature,
        settings: &RuntimeSettings,
    ) -> Result<Box<dyn LoadedModel>, RuntimeError> {
        crate::refuse_required_accelerator(NAME, settings)?;
        let err = |e: TractError| RuntimeError::Load { backend: NAME, detail: brief(&e) };
        // `value_info`: the exporter's shapes for intermediate values. They help tract type some
        // graphs and break others: PyTorch 2's exporter writes them as expressions of the input
        // dims (`(height+1)/2`), which contradict the pins of `--input-shape` (tract cannot
        // unify the symbol `batch` with 1) and the concrete sizes the inference-mode runner
        // computes. YOLOv8 from ultralytics fails at every size with them.
        let read = |value_info: bool| {
            tract_onnx::onnx().with_ignore_value_info(!value_info).model_for_read(&mut Cursor::new(model)).map_err(err)
        };
        // Parsed once with them for the common case; the fallbacks below parse again without.
        let first = read(true)?;
        let input_names: Vec<String> =
            first.input_outlets().map_err(err)?.iter().map(|o| first.node(o.node).name.clone()).collect();
        let index = |spec: &TensorSpec| {
            input_names.iter().position(|n| *n == spec.name).ok_or_else(|| RuntimeError::Load {
                backend: NAME,
                detail: format!("manifest input {:?} is not an input of the model ({input_names:?})", spec.name),
            })
        };
        // Pin each input's fact to the manifest's signature (dims pinned at build time stay pinned;
        // symbolic dims become tract symbols resolved per request, anonymous ones each its own),
        // and optimise.
        let optimized = |mut m: InferenceModel| -> Result<_, RuntimeError> {
            for spec in &sig.inputs {
                let dims: TVec<TDim> = spec.shape.iter().map(|d| tract_dim(&m.symbols, d)).collect();
                m.set_input_fact(index(spec)?, InferenceFact::dt_shape(datum_type(spec.dtype)?, dims)).map_err(err)?;
            }
            m.into_optimized().and_then(|t| t.into_runnable()).map_err(err)
        };
        // The optimised plan first, with the exporter's shapes and then without. Some exporters
        // write graphs tract cannot type as a whole: TorchScript turns `squeeze` into
        // `If(dim == 1, Squeeze, Identity)` and Silero VAD switches on its sample rate with an
        // `If` around the network, and tract types both branches of every `If`; YOLOv8 with a
        // free height and width upsamples a map of (h+31)/32 rows to concatenate it with one of
        // (h+15)/16, equal only for the sizes it takes. tract's inference-mode runner works out
        // shapes and picks the branch while it runs (so inputs declare their type only), and runs
        // such models, unoptimised. If that cannot load either, the optimiser's error is the one
        // reported.
        let plan = match optimized(first).or_else(|first| optimized(read(false)?).map_err(|_| first)) {
            Ok(plan) => Plan::Optimized(plan),
            Err(first) => {
                let unoptimized = || -> Result<_, RuntimeError> {
                    let mut m = read(false)?;
                    for spec in &sig.inputs {
                        m.set_input_fact(index(spec)?, InferenceFact::dt(datum_type(spec.dtype)?)).map_err(err)?;
                    }
                    m.into_runnable().map_err(err)
                };
                match unoptimized() {
                    Ok(plan) => Plan::Unoptimized(plan),
                    Err(_) => return Err(first),
                }
            }
        };
        let output_names = sig.outputs.iter().map(|o| o.name.clone()).collect();
        let input_order =
            sig.inputs.iter().map(|s| input_names.iter().position(|n| *n == s.name).unwrap_or(0)).collect();
        Ok(Box::new(TractModel { plan, output_names, input_order }))
    }
}

enum Plan {
    Optimized(Arc<TypedRunnableModel>),
    /// tract's inference-mode runner: slower, resolves shapes and `If` branches while running.
    Unoptimized(Arc<InferenceSimplePlan>),
}

struct TractModel {
    plan: Plan,
    output_names: Vec<String>,
    /// Position in the model's input list of each manifest input.
    input_order: Vec<usize>,
}

impl LoadedModel for TractModel {
    fn backend(&self) -> &str {
        NAME
    }

    fn run(&self, inputs: Vec<FTensor>) -> Result<Vec<FTensor>, RuntimeError> {
        let mut slots: Vec<Option<TValue>> = vec![None; inputs.len()];
        for (t, &ix) in inputs.into_iter().zip(&self.input_order) {
            slots[ix] = Some(to_tract(&t)?.into());
        }
        let inputs: TVec<TValue> = slots.into_iter().map(|s| s.expect("every input slot filled")).collect();
        let outputs = match &self.plan {
            Plan::Optimized(p) => p.run(inputs),
            Plan::Unoptimized(p) => p.run(inputs),
        }
        .map_err(|e| RuntimeError::Run { backend: NAME, detail: brief(&e) })?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(t, name)| {
                from_tract(name, t, |e| RuntimeError::Run {
                    backend: NAME,
                    detail: format!("reading output {name:?}: {e:#}"),
                })
            })
            .collect()
    }
}

/// Whether `model` is an ONNX model (a protobuf `ModelProto` with a graph), whether or not it can
/// be served.
pub fn is_onnx(model: &[u8]) -> bool {
    tract_onnx::onnx().proto_model_for_read(&mut Cursor::new(model)).is_ok_and(|p| p.graph.is_some())
}

/// Read an ONNX model's declared inputs and outputs (names, dtypes, shapes with `dim_param`s
/// kept symbolic). Initializers listed as graph inputs (old exporters) are skipped.
///
/// A dynamic dimension without a name (no `dim_param`, a negative `dim_value`, or a `dim_param`
/// that names nothing such as paddle2onnx's `?`) gets a name of its own, `{tensor}_{axis}`, so
/// that it binds to nothing else: `x: [-1, 3, ?, ?]` takes any batch, height and width.
pub fn inspect_onnx(model: &[u8]) -> Result<ModelSignature, RuntimeError> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut Cursor::new(model))
        .map_err(|e| RuntimeError::Unsupported(format!("not a readable ONNX model: {}", brief(&e))))?;
    let graph = proto.graph.as_ref().ok_or_else(|| RuntimeError::Unsupported("ONNX model has no graph".into()))?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let dim_param = |d: &pb::tensor_shape_proto::Dimension| match &d.value {
        Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !is_anonymous_symbol(p) => Some(p.clone()),
        _ => None,
    };
    // Names the model gives, which a made-up name must not take.
    let declared: std::collections::HashSet<String> = graph
        .input
        .iter()
        .chain(&graph.output)
        .filter_map(|v| match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(pb::type_proto::Value::TensorType(tt)) => tt.shape.as_ref(),
            _ => None,
        })
        .flat_map(|s| s.dim.iter().filter_map(dim_param))
        .collect();
    let unnamed = |tensor: &str, axis: usize| {
        let mut name = format!("{tensor}_{axis}");
        while declared.contains(&name) {
            name.push('_');
        }
        Dim::Symbolic(name)
    };
    let spec = |v: &pb::ValueInfoProto| -> Result<TensorSpec, RuntimeError> {
        let Some(pb::type_proto::Value::TensorType(tt)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
            return Err(RuntimeError::Unsupported(format!(
                "{:?} is not a tensor (a sequence or a map, as scikit-learn's ZipMap writes); Flotilla serves models whose inputs and outputs are tensors",
                v.name
            )));
        };
        let dtype = onnx_dtype(tt.elem_type)
            .ok_or_else(|| RuntimeError::Unsupported(format!("{:?} has ONNX element type {}", v.name, tt.elem_type)))?;
        let shape = tt
            .shape
            .as_ref()
            .ok_or_else(|| {
                RuntimeError::Unsupported(format!(
                    "{:?} declares no shape (onnx.shape_inference.infer_shapes can add the shapes it works out)",
                    v.name
                ))
            })?
            .dim
            .iter()
            .enumerate()
            .map(|(i, d)| match (&d.value, dim_param(d)) {
                (Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)), _) if *n >= 0 => Dim::Fixed(*n as u64),
                (_, Some(p)) => Dim::Symbolic(p),
                // Unnamed unknown dims get a stable name of their own.
                _ => unnamed(&v.name, i),
            })
            .collect();
        Ok(TensorSpec { name: v.name.clone(), dtype, shape })
    };
    let inputs =
        graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).map(spec).collect::<Result<_, _>>()?;
    let outputs = graph.output.iter().map(spec).collect::<Result<_, _>>()?;
    Ok(ModelSignature { format: ModelFormat::Onnx, inputs, outputs })
}

fn onnx_dtype(t: i32) -> Option<DType> {
    Some(match t {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        5 => DType::I16,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        _ => return None,
    })
}
