//! Tensors as the agent's API sees them: a name, a shape and typed row-major data.

use flotilla_bundle::manifest::{DType, Dim, TensorSpec};

use crate::error::RuntimeError;

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I16(_) => DType::I16,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// Values widened to f64 (for comparisons and JSON).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F64(v) => v.clone(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I16(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// Build from numbers (JSON requests arrive as f64), checking each value fits `dtype`.
    pub fn from_f64(dtype: DType, v: &[f64]) -> Result<TensorData, RuntimeError> {
        fn ints<T: TryFrom<i64>>(v: &[f64], what: &str) -> Result<Vec<T>, RuntimeError> {
            v.iter()
                .map(|&x| {
                    if x.fract() != 0.0 || !x.is_finite() {
                        return Err(RuntimeError::BadInput(format!("{x} is not a valid {what}")));
                    }
                    T::try_from(x as i64).map_err(|_| RuntimeError::BadInput(format!("{x} is out of range for {what}")))
                })
                .collect()
        }
        Ok(match dtype {
            DType::F32 => TensorData::F32(v.iter().map(|&x| x as f32).collect()),
            DType::F64 => TensorData::F64(v.to_vec()),
            DType::I64 => TensorData::I64(ints(v, "INT64")?),
            DType::I32 => TensorData::I32(ints(v, "INT32")?),
            DType::I16 => TensorData::I16(ints(v, "INT16")?),
            DType::I8 => TensorData::I8(ints(v, "INT8")?),
            DType::U8 => TensorData::U8(ints(v, "UINT8")?),
            DType::Bool => TensorData::Bool(ints::<u8>(v, "BOOL")?.into_iter().map(|b| b != 0).collect()),
            DType::F16 => return Err(RuntimeError::Unsupported("FP16 tensors".into())),
        })
    }

    /// Little-endian element bytes (the golden-set encoding).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as u8).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&x| x as u8).collect(),
        }
    }

    pub fn from_le_bytes(dtype: DType, b: &[u8]) -> Result<TensorData, RuntimeError> {
        fn chunks<const N: usize, T>(b: &[u8], f: fn([u8; N]) -> T) -> Result<Vec<T>, RuntimeError> {
            if !b.len().is_multiple_of(N) {
                return Err(RuntimeError::BadInput(format!(
                    "{} bytes is not a whole number of {N}-byte elements",
                    b.len()
                )));
            }
            Ok(b.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"))).collect())
        }
        Ok(match dtype {
            DType::F32 => TensorData::F32(chunks(b, f32::from_le_bytes)?),
            DType::F64 => TensorData::F64(chunks(b, f64::from_le_bytes)?),
            DType::I64 => TensorData::I64(chunks(b, i64::from_le_bytes)?),
            DType::I32 => TensorData::I32(chunks(b, i32::from_le_bytes)?),
            DType::I16 => TensorData::I16(chunks(b, i16::from_le_bytes)?),
            DType::I8 => TensorData::I8(b.iter().map(|&x| x as i8).collect()),
            DType::U8 => TensorData::U8(b.to_vec()),
            DType::Bool => TensorData::Bool(b.iter().map(|&x| x != 0).collect()),
            DType::F16 => return Err(RuntimeError::Unsupported("FP16 tensors".into())),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// A borrowed view for the drift sketches.
    pub fn drift_view(&self) -> flotilla_drift::TensorView<'_> {
        use flotilla_drift::Values;
        let values = match &self.data {
            TensorData::F32(v) => Values::F32(v),
            TensorData::F64(v) => Values::F64(v),
            TensorData::I64(v) => Values::I64(v),
            TensorData::I32(v) => Values::I32(v),
            TensorData::I16(v) => Values::I16(v),
            TensorData::I8(v) => Values::I8(v),
            TensorData::U8(v) => Values::U8(v),
            TensorData::Bool(v) => Values::Bool(v),
        };
        flotilla_drift::TensorView { name: &self.name, shape: &self.shape, values }
    }

    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: TensorData) -> Result<Tensor, RuntimeError> {
        let name = name.into();
        let want = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if want != Some(data.len()) {
            return Err(RuntimeError::BadInput(format!(
                "tensor {name:?}: shape {shape:?} needs {} elements, got {}",
                want.map(|n| n.to_string()).unwrap_or_else(|| "too many".into()),
                data.len()
            )));
        }
        Ok(Tensor { name, shape, data })
    }

    pub fn from_golden(t: &flotilla_bundle::golden::TensorData) -> Result<Tensor, RuntimeError> {
        let shape = t.shape.iter().map(|&d| d as usize).collect();
        Tensor::new(t.name.clone(), shape, TensorData::from_le_bytes(t.dtype, &t.data)?)
    }

    pub fn to_golden(&self) -> flotilla_bundle::golden::TensorData {
        flotilla_bundle::golden::TensorData {
            name: self.name.clone(),
            dtype: self.data.dtype(),
            shape: self.shape.iter().map(|&d| d as u64).collect(),
            data: self.data.to_le_bytes(),
        }
    }
}

/// Order `inputs` as the signature lists them and check names, dtypes and shapes. Symbolic dims
/// may take any size but must agree wherever the same symbol appears; anonymous ones (`?`, `-1`:
/// [`Dim::is_anonymous`]) are each free on their own.
pub fn check_inputs(spec: &[TensorSpec], mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
    // A misspelt input is named as such, not reported as the missing one it stood for.
    if let Some(extra) = inputs.iter().find(|t| !spec.iter().any(|s| s.name == t.name)) {
        return Err(RuntimeError::BadInput(format!(
            "unknown input {:?} (the model takes {})",
            extra.name,
            names(spec)
        )));
    }
    let mut ordered = Vec::with_capacity(spec.len());
    // Named dimensions seen so far: (name, size, the input that gave it).
    let mut bound: Vec<(&str, usize, &str)> = Vec::new();
    for s in spec {
        let pos = inputs.iter().position(|t| t.name == s.name).ok_or_else(|| {
            RuntimeError::BadInput(format!("missing input {:?} (the model takes {})", s.name, names(spec)))
        })?;
        let t = inputs.swap_remove(pos);
        if t.data.dtype() != s.dtype {
            return Err(RuntimeError::BadInput(format!(
                "input {:?} has datatype {}, the model takes {}",
                s.name,
                t.data.dtype().as_str(),
                s.dtype.as_str()
            )));
        }
        let shape_err = || {
            RuntimeError::BadInput(format!(
                "input {:?} has shape {:?}, the model takes [{}]",
                s.name,
                t.shape,
                s.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
            ))
        };
        if t.shape.len() != s.shape.len() {
            return Err(shape_err());
        }
        for (have, want) in t.shape.iter().zip(&s.shape) {
            if let Dim::Fixed(n) = want
                && *n as usize != *have
            {
                return Err(shape_err());
            }
            let Some(sym) = want.symbol() else { continue };
            match bound.iter().find(|(n, _, _)| *n == sym) {
                Some((_, v, first)) if v != have => {
                    return Err(RuntimeError::BadInput(format!(
                        "dimension {sym} is {v} in input {first:?} and {have} in input {:?}",
                        s.name
                    )));
                }
                Some(_) => {}
                None => bound.push((sym, *have, s.name.as_str())),
            }
        }
        ordered.push(t);
    }
    if let Some(twice) = inputs.first() {
        return Err(RuntimeError::BadInput(format!("input {:?} is given twice", twice.name)));
    }
    Ok(ordered)
}

fn names(spec: &[TensorSpec]) -> String {
    spec.iter().map(|s| format!("{:?}", s.name)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[Dim]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: DType::F32, shape: shape.to_vec() }
    }

    fn t(name: &str, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(name, shape.to_vec(), TensorData::F32(vec![0.0; n])).unwrap()
    }

    fn err(spec: &[TensorSpec], inputs: Vec<Tensor>) -> String {
        check_inputs(spec, inputs).unwrap_err().to_string()
    }

    #[test]
    fn names_bind_anonymous_dims_do_not() {
        let sym = |s: &str| Dim::Symbolic(s.into());
        let sig = [spec("a", &[sym("N"), sym("?"), sym("?")]), spec("b", &[sym("N"), sym("-1")])];
        check_inputs(&sig, vec![t("b", &[2, 7]), t("a", &[2, 48, 192])]).unwrap();
        assert_eq!(
            err(&sig, vec![t("a", &[1, 48, 192]), t("b", &[2, 7])]),
            "dimension N is 1 in input \"a\" and 2 in input \"b\""
        );
    }

    #[test]
    fn a_misspelt_input_is_named() {
        let sig = [spec("input_1", &[Dim::Fixed(2)])];
        assert_eq!(err(&sig, vec![t("x", &[2])]), "unknown input \"x\" (the model takes \"input_1\")");
        assert_eq!(err(&sig, vec![]), "missing input \"input_1\" (the model takes \"input_1\")");
        assert_eq!(err(&sig, vec![t("input_1", &[2]), t("input_1", &[2])]), "input \"input_1\" is given twice");
    }
}
