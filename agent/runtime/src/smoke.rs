//! Smoke inputs: what a model runs on before it goes active when its bundle carries no golden
//! inputs. They are made from the signed signature alone, so `flotilla bundle build` (which
//! tries them) and every device make exactly the same tensors.
//!
//! - Shapes: fixed dimensions as declared (pins from `--input-shape` are fixed); a free
//!   dimension is [`BATCH`] at axis 0 and [`FREE_DIM`] elsewhere. A named dimension takes the
//!   size of its first appearance wherever it recurs; an anonymous one (`?`, `-1`) is free on
//!   its own.
//! - Values, from a fixed seed: floats uniform in [0, 1), `INT8` and `UINT8` uniform over their
//!   range (quantized images), other integers 1 (a valid token id, mask or index for nearly any
//!   model), booleans true.
//!
//! A smoke run passes when every declared output comes back with its declared dtype, rank and
//! fixed dimensions (and the size its named dimensions took in the inputs) and every float is
//! finite. It says the model runs on this runtime, and how fast; it says nothing about whether
//! the answers are right: that is what golden inputs with reference outputs are for.

use flotilla_bundle::manifest::{DType, Dim, ModelSignature, TensorSpec};

use crate::tensor::{Tensor, TensorData};

/// Size of a free dimension at axis 0 (the batch, for almost every model).
pub const BATCH: usize = 1;
/// Size of any other free dimension (an image side, a sequence or a number of samples). 32: an
/// image network that downsamples by 32 still has a pixel left, OCR recognisers that take only
/// 32 or 48 rows run, and a text model sees a short sentence. Every ONNX model of 13 PyPI wheels
/// tried (OCR, YOLO, text, audio) runs at 32; at 64 two OCR recognisers do not.
pub const FREE_DIM: usize = 32;
/// Seed of the value generator.
pub const SEED: u64 = 0x464c_4f54_494c_4c41; // "FLOTILLA"

/// The shapes of the smoke inputs, in signature order.
pub fn shapes(sig: &ModelSignature) -> Vec<(String, Vec<usize>)> {
    let mut bound: Vec<(&str, usize)> = Vec::new();
    sig.inputs
        .iter()
        .map(|spec| {
            let shape = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| {
                    let free = if axis == 0 { BATCH } else { FREE_DIM };
                    match (d, d.symbol()) {
                        (Dim::Fixed(n), _) => *n as usize,
                        (_, Some(name)) => match bound.iter().find(|(b, _)| *b == name) {
                            Some(&(_, size)) => size,
                            None => {
                                bound.push((name, free));
                                free
                            }
                        },
                        (_, None) => free,
                    }
                })
                .collect();
            (spec.name.clone(), shape)
        })
        .collect()
}

/// `x=[1,3,32,32] y=[1,32]`: the smoke inputs' shapes, for messages.
pub fn describe(sig: &ModelSignature) -> String {
    shapes(sig)
        .iter()
        .map(|(name, shape)| format!("{name}=[{}]", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The smoke inputs, or why none can be made (a datatype the runtimes take no values of, or a
/// tensor too large to be a sensible test).
pub fn inputs(sig: &ModelSignature) -> Result<Vec<Tensor>, String> {
    /// Largest smoke input, in elements (a [1, 3, 1024, 1024] image is 3 M).
    const MAX_ELEMENTS: usize = 1 << 24;
    let mut rng = SplitMix(SEED);
    shapes(sig)
        .into_iter()
        .zip(&sig.inputs)
        .map(|((name, shape), spec)| {
            let n = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= MAX_ELEMENTS)
                .ok_or_else(|| format!("input {name:?} of shape {shape:?} is too large for a smoke test"))?;
            let data = match spec.dtype {
                DType::F32 => TensorData::F32((0..n).map(|_| rng.unit() as f32).collect()),
                DType::F64 => TensorData::F64((0..n).map(|_| rng.unit()).collect()),
                DType::I8 => TensorData::I8((0..n).map(|_| rng.next() as i8).collect()),
                DType::U8 => TensorData::U8((0..n).map(|_| rng.next() as u8).collect()),
                DType::I16 => TensorData::I16(vec![1; n]),
                DType::I32 => TensorData::I32(vec![1; n]),
                DType::I64 => TensorData::I64(vec![1; n]),
                DType::Bool => TensorData::Bool(vec![true; n]),
                DType::F16 => return Err(format!("input {name:?} is FP16, which the agent's API cannot take")),
            };
            Tensor::new(name, shape, data).map_err(|e| e.to_string())
        })
        .collect()
}

/// Check what a smoke run gave against the declared outputs.
pub fn check_outputs(sig: &ModelSignature, inputs: &[Tensor], outputs: &[Tensor]) -> Result<(), String> {
    // Sizes the inputs gave the named dimensions.
    let mut bound: Vec<(&str, usize)> = Vec::new();
    for (spec, t) in sig.inputs.iter().zip(inputs) {
        for (d, &size) in spec.shape.iter().zip(&t.shape) {
            if let Some(name) = d.symbol()
                && !bound.iter().any(|(b, _)| *b == name)
            {
                bound.push((name, size));
            }
        }
    }
    for spec in &sig.outputs {
        let t =
            outputs.iter().find(|t| t.name == spec.name).ok_or_else(|| format!("output {:?} missing", spec.name))?;
        check_output(spec, t, &bound)?;
    }
    Ok(())
}

fn check_output(spec: &TensorSpec, t: &Tensor, bound: &[(&str, usize)]) -> Result<(), String> {
    let name = &spec.name;
    if t.data.dtype() != spec.dtype {
        return Err(format!(
            "output {name:?} is {}, the signature declares {}",
            t.data.dtype().as_str(),
            spec.dtype.as_str()
        ));
    }
    let declared = || spec.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
    if t.shape.len() != spec.shape.len() {
        return Err(format!("output {name:?} has shape {:?}, the signature declares [{}]", t.shape, declared()));
    }
    for (d, &size) in spec.shape.iter().zip(&t.shape) {
        let want = match (d, d.symbol()) {
            (Dim::Fixed(n), _) => Some(*n as usize),
            (_, Some(sym)) => bound.iter().find(|(b, _)| *b == sym).map(|&(_, s)| s),
            (_, None) => None,
        };
        if want.is_some_and(|w| w != size) {
            return Err(format!("output {name:?} has shape {:?}, the signature declares [{}]", t.shape, declared()));
        }
    }
    let finite = match &t.data {
        TensorData::F32(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i] as f64)),
        TensorData::F64(v) => v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])),
        _ => None,
    };
    if let Some((i, x)) = finite {
        return Err(format!("output {name:?}[{i}] is {x}"));
    }
    Ok(())
}

/// SplitMix64 (Steele, Lea and Flood): small, fast, and the same everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_bundle::manifest::ModelFormat;

    fn spec(name: &str, dtype: DType, shape: &[Dim]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    fn sym(s: &str) -> Dim {
        Dim::Symbolic(s.into())
    }

    #[test]
    fn free_dims_take_the_documented_sizes_and_names_bind() {
        let sig = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![
                spec("x", DType::F32, &[sym("?"), Dim::Fixed(3), sym("?"), sym("x_3")]),
                spec("ids", DType::I64, &[sym("N"), sym("seq")]),
                spec("mask", DType::I64, &[sym("N"), sym("seq")]),
                spec("q", DType::U8, &[Dim::Fixed(2), sym("N")]),
            ],
            outputs: vec![],
        };
        assert_eq!(describe(&sig), "x=[1,3,32,32] ids=[1,32] mask=[1,32] q=[2,1]");
        let a = inputs(&sig).unwrap();
        assert_eq!(a, inputs(&sig).unwrap(), "the same signature gives the same inputs");
        let TensorData::F32(x) = &a[0].data else { panic!("x is FP32") };
        assert!(x.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(x.iter().any(|&v| v != x[0]), "not a constant");
        assert_eq!(a[1].data, TensorData::I64(vec![1; 32]));
    }

    #[test]
    fn outputs_are_checked_against_the_declaration() {
        let sig = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("x", DType::F32, &[sym("N"), Dim::Fixed(4)])],
            outputs: vec![spec("y", DType::F32, &[sym("N"), Dim::Fixed(2)]), spec("z", DType::I64, &[sym("?")])],
        };
        let x = inputs(&sig).unwrap();
        let y = |shape: Vec<usize>, v: Vec<f32>| Tensor::new("y", shape, TensorData::F32(v)).unwrap();
        let z = Tensor::new("z", vec![3], TensorData::I64(vec![0, 1, 2])).unwrap();
        check_outputs(&sig, &x, &[y(vec![1, 2], vec![0.5, 1.0]), z.clone()]).unwrap();
        let err = |outs: &[Tensor]| check_outputs(&sig, &x, outs).unwrap_err();
        assert!(err(&[y(vec![1, 2], vec![0.5, f32::NAN]), z.clone()]).contains("\"y\"[1] is NaN"));
        assert!(err(&[y(vec![2, 2], vec![0.0; 4]), z.clone()]).contains("has shape [2, 2]"), "N is 1 here");
        assert!(err(&[y(vec![1, 2, 1], vec![0.0; 2]), z.clone()]).contains("declares [N,2]"));
        assert!(err(&[y(vec![1, 2], vec![0.0; 2])]).contains("\"z\" missing"));
        let z32 = Tensor::new("z", vec![1], TensorData::I32(vec![0])).unwrap();
        assert!(err(&[y(vec![1, 2], vec![0.0; 2]), z32]).contains("is INT32, the signature declares INT64"));
    }

    #[test]
    fn fp16_inputs_cannot_be_made() {
        let sig = ModelSignature {
            format: ModelFormat::Onnx,
            inputs: vec![spec("h", DType::F16, &[Dim::Fixed(1)])],
            outputs: vec![],
        };
        assert!(inputs(&sig).unwrap_err().contains("FP16"));
    }
}
