//! Model runtimes behind one [`Backend`] trait.
//!
//! A backend turns model bytes plus the manifest's signature into a [`LoadedModel`]; the agent
//! never sees a runtime's own types. Panics inside a runtime are contained here, at the boundary,
//! and become errors: a bad model must not take the agent down.
//!
//! Backends: `tract-onnx` and `tract-tflite` (pure Rust, always built in) and `tflite` (Google's
//! TFLite C library, loaded at run time when the agent is given one: [`Runtimes::with_tflite`]).

pub mod error;
pub mod selftest;
pub mod smoke;
pub mod tensor;
pub mod tflite;
pub mod tract_onnx;
mod tract_tensors;
pub mod tract_tflite;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use flotilla_bundle::manifest::{ModelFormat, ModelSignature, RuntimeSettings};

pub use error::RuntimeError;
pub use tensor::{Tensor, TensorData, check_inputs};

pub trait Backend: Send + Sync {
    /// Stable name reported to the control plane and in `/v2/models/{name}` (`platform`).
    fn name(&self) -> &'static str;
    fn supports(&self, format: ModelFormat) -> bool;
    fn load(
        &self,
        model: &[u8],
        sig: &ModelSignature,
        settings: &RuntimeSettings,
    ) -> Result<Box<dyn LoadedModel>, RuntimeError>;
}

pub trait LoadedModel: Send + Sync {
    /// What actually runs the model (e.g. `tract-onnx`, `tflite`, `tflite+xnnpack`).
    fn backend(&self) -> &str;
    /// How a delegate split the graph, when one was applied and the runtime can tell.
    fn delegation(&self) -> Option<Delegation> {
        None
    }
    /// Run on inputs already checked and ordered by [`check_inputs`].
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError>;
}

/// How a delegate (e.g. XNNPACK, an NPU) split a model's graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delegation {
    /// Nodes the delegate runs.
    pub delegated_nodes: usize,
    /// Nodes left on the runtime's own CPU kernels.
    pub cpu_nodes: usize,
    /// Contiguous pieces of the graph the delegate took.
    pub partitions: usize,
}

/// The backends this build has, in default preference order.
pub struct Runtimes {
    backends: Vec<Box<dyn Backend>>,
}

impl std::fmt::Debug for Runtimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Default for Runtimes {
    /// The built-in backends: `tract-onnx`, `tract-tflite`.
    fn default() -> Self {
        Runtimes { backends: vec![Box::new(tract_onnx::TractOnnx), Box::new(tract_tflite::TractTflite)] }
    }
}

impl Runtimes {
    /// The built-in backends plus `tflite` (the C library at `library`, else at
    /// `$FLOTILLA_TFLITE_LIB`), preferred for TFLite models. The error says why the library is
    /// unusable; the caller reports it and may go on with [`Runtimes::default`].
    pub fn with_tflite(library: Option<&Path>) -> Result<Runtimes, tflite::LibraryError> {
        let lib = tflite::TfliteLib::load(&tflite::TfliteLib::locate(library)?)?;
        Ok(Runtimes::default().prefer(Box::new(tflite::TfliteBackend::new(lib))))
    }

    /// Put `backend` first in the default order (e.g. a [`tflite::TfliteBackend`] configured
    /// with external delegates).
    pub fn prefer(mut self, backend: Box<dyn Backend>) -> Runtimes {
        self.backends.insert(0, backend);
        self
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    /// Load with the first backend that is in the bundle's preference list (or any, when the list
    /// is empty) and supports the format. Backend errors and panics are reported, not hidden.
    pub fn load(
        &self,
        model: &[u8],
        sig: &ModelSignature,
        settings: &RuntimeSettings,
    ) -> Result<Box<dyn LoadedModel>, RuntimeError> {
        let mut candidates: Vec<&dyn Backend> = Vec::new();
        if settings.backends.is_empty() {
            candidates.extend(self.backends.iter().map(|b| b.as_ref()));
        } else {
            for pref in &settings.backends {
                candidates.extend(self.backends.iter().filter(|b| b.name() == pref).map(|b| b.as_ref()));
            }
        }
        candidates.retain(|b| b.supports(sig.format));
        let mut errors = Vec::new();
        for b in candidates {
            match contain(b.name(), || b.load(model, sig, settings)) {
                Ok(m) => return Ok(m),
                Err(RuntimeError::Unsupported(why)) => errors.push(why),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            Err(RuntimeError::NoBackend(format!(
                "{} models with preference {:?} (this agent has {:?})",
                sig.format.as_str(),
                settings.backends,
                self.names()
            )))
        } else {
            Err(RuntimeError::Unsupported(errors.join("; ")))
        }
    }
}

/// For CPU-only backends: refuse a bundle that requires an accelerator, so that `Runtimes::load`
/// never falls back from an accelerated backend to the CPU behind the bundle's back.
pub fn refuse_required_accelerator(backend: &'static str, settings: &RuntimeSettings) -> Result<(), RuntimeError> {
    match &settings.delegate {
        Some(d) if settings.accelerator_required => Err(RuntimeError::Unsupported(format!(
            "{backend} runs on the CPU only and the bundle requires delegate {d:?}"
        ))),
        _ => Ok(()),
    }
}

/// Run `f`, turning a panic into an error naming the backend.
pub fn contain<T>(backend: &'static str, f: impl FnOnce() -> Result<T, RuntimeError>) -> Result<T, RuntimeError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(RuntimeError::Unsupported(format!("{backend} panicked: {}", panic_message(&*p)))))
}

/// Run a loaded model with panics contained.
pub fn run(model: &dyn LoadedModel, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
    catch_unwind(AssertUnwindSafe(|| model.run(inputs))).unwrap_or_else(|p| {
        Err(RuntimeError::Run {
            backend: "runtime",
            detail: format!("{} panicked: {}", model.backend(), panic_message(&*p)),
        })
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
