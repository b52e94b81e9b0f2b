//! Tensors between Flotilla and tract, shared by the tract backends.

use tract_onnx::prelude::*;

use flotilla_bundle::manifest::{DType, Dim};

use crate::error::RuntimeError;
use crate::tensor::{Tensor as FTensor, TensorData};

/// tract's element type for a manifest dtype.
pub fn datum_type(d: DType) -> Result<DatumType, RuntimeError> {
    Ok(match d {
        DType::F32 => f32::datum_type(),
        DType::F64 => f64::datum_type(),
        DType::F16 => return Err(RuntimeError::Unsupported("FP16 inputs".into())),
        DType::I8 => i8::datum_type(),
        DType::U8 => u8::datum_type(),
        DType::I16 => i16::datum_type(),
        DType::I32 => i32::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::Bool => bool::datum_type(),
    })
}

/// A manifest dimension as a tract dimension: fixed stays fixed, a named one becomes the symbol of
/// that name (so it binds wherever the name recurs), an anonymous one a fresh symbol of its own.
pub fn tract_dim(symbols: &SymbolScope, d: &Dim) -> TDim {
    match (d, d.symbol()) {
        (Dim::Fixed(n), _) => TDim::from(*n as i64),
        (_, Some(name)) => symbols.sym(name).into(),
        (_, None) => symbols.new_with_prefix("anonymous").into(),
    }
}

/// A request tensor as a tract tensor (a shape that does not fit the data is the caller's error).
pub fn to_tract(t: &FTensor) -> Result<Tensor, RuntimeError> {
    let s = &t.shape;
    let r = match &t.data {
        TensorData::F32(v) => Tensor::from_shape(s, v),
        TensorData::F64(v) => Tensor::from_shape(s, v),
        TensorData::I64(v) => Tensor::from_shape(s, v),
        TensorData::I32(v) => Tensor::from_shape(s, v),
        TensorData::I16(v) => Tensor::from_shape(s, v),
        TensorData::I8(v) => Tensor::from_shape(s, v),
        TensorData::U8(v) => Tensor::from_shape(s, v),
        TensorData::Bool(v) => Tensor::from_shape(s, v),
    };
    r.map_err(|e| RuntimeError::BadInput(format!("input {:?}: {e}", t.name)))
}

/// A tract output as a named tensor. Quantized outputs come back as their raw integers.
pub fn from_tract(name: &str, t: &Tensor, fail: impl Fn(TractError) -> RuntimeError) -> Result<FTensor, RuntimeError> {
    let view = t.try_as_plain_ram().map_err(&fail)?;
    let dt = t.datum_type().unquantized();
    let data = if dt == f32::datum_type() {
        TensorData::F32(view.as_slice::<f32>().map_err(&fail)?.to_vec())
    } else if dt == f64::datum_type() {
        TensorData::F64(view.as_slice::<f64>().map_err(&fail)?.to_vec())
    } else if dt == i64::datum_type() {
        TensorData::I64(view.as_slice::<i64>().map_err(&fail)?.to_vec())
    } else if dt == i32::datum_type() {
        TensorData::I32(view.as_slice::<i32>().map_err(&fail)?.to_vec())
    } else if dt == i16::datum_type() {
        TensorData::I16(view.as_slice::<i16>().map_err(&fail)?.to_vec())
    } else if dt == i8::datum_type() {
        TensorData::I8(view.as_slice::<i8>().map_err(&fail)?.to_vec())
    } else if dt == u8::datum_type() {
        TensorData::U8(view.as_slice::<u8>().map_err(&fail)?.to_vec())
    } else if dt == bool::datum_type() {
        TensorData::Bool(view.as_slice::<bool>().map_err(&fail)?.to_vec())
    } else {
        return Err(RuntimeError::Unsupported(format!("output {name:?} has datum type {dt:?}")));
    };
    FTensor::new(name, t.shape().to_vec(), data)
}

/// A one-line account of a tract error, at most about 600 characters: tract-tflite's contexts
/// embed whole flatbuffer dumps (of which only the operator's name is worth keeping), and
/// tract's evaluation errors whole tensors (each cause keeps its first 240 characters).
pub fn brief(e: &TractError) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if let Some(op) = text.lines().find_map(|l| l.trim().strip_prefix("builtin_code:")) {
            parts.push(format!("operator {}", op.trim().trim_end_matches(',')));
            continue;
        }
        let first = text.lines().next().unwrap_or_default().trim();
        // "Translating ...: Operator {" loses its dump opener.
        let first = match first.strip_suffix('{') {
            Some(rest) => rest.trim_end().rsplit_once(' ').map_or("", |(head, _)| head).trim_end_matches(':'),
            None => first,
        };
        if !first.is_empty() {
            parts.push(cut(first.to_string(), 240));
        }
    }
    cut(parts.join(": "), 600)
}

fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let at = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(at);
        text.push_str("...");
    }
    text
}
