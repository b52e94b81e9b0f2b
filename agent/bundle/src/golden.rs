//! Golden self-test data: inputs and the outputs the model gave for them at build time.

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::error::Result;
use crate::manifest::DType;

pub const GOLDEN_MEDIA_TYPE: &str = "application/vnd.flotilla.golden+cbor";
pub const MAX_GOLDEN_BYTES: usize = 64 << 20;

/// A dense tensor; `data` is the little-endian element bytes in row-major order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl TensorData {
    pub fn from_f32(name: &str, shape: Vec<u64>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData { name: name.into(), dtype: DType::F32, shape, data }
    }

    /// The elements as f32 when the dtype is FP32.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32 && self.data.len().is_multiple_of(4))
            .then(|| self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoldenCase {
    pub inputs: Vec<TensorData>,
    pub outputs: Vec<TensorData>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GoldenSet {
    pub cases: Vec<GoldenCase>,
}

impl GoldenSet {
    pub fn encode(&self) -> Result<Vec<u8>> {
        canonical::to_vec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<GoldenSet> {
        canonical::from_slice("golden set", bytes, MAX_GOLDEN_BYTES)
    }
}
