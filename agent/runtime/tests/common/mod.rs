//! Shared by the real-model tests: reference tensors as the set-up scripts write them, and the
//! assets directory, fetched on first use.

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_bundle::manifest::DType;
use flotilla_runtime::{Tensor, TensorData};

/// A tensor in a `reference.json` written by `assets/fetch*.sh`.
#[derive(serde::Deserialize)]
pub struct RefTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl RefTensor {
    pub fn tensor(&self) -> Tensor {
        Tensor::new(&self.name, self.shape.clone(), TensorData::from_f64(self.dtype, &self.data).unwrap()).unwrap()
    }
}

/// `target/test-assets/{kind}`, made by `assets/{script}` unless it already made it (the script
/// checks its own recipe, so a changed script refetches).
pub fn fetch_assets(kind: &str, script: &str) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = crate_dir.join("../../target/test-assets").join(kind);
    let out = Command::new("bash").arg(crate_dir.join("assets").join(script)).arg(&dir).output().unwrap();
    assert!(out.status.success(), "assets/{script} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    dir
}
