//! The `tflite` backend: Google's TensorFlow Lite runtime through its C API, loaded at run time.
//!
//! The library (`libtensorflowlite_c.so`) comes from the agent's config or `$FLOTILLA_TFLITE_LIB`
//! ([`TfliteLib::locate`]); nothing links against it, so agents without it run the tract
//! backends only. A bundle's `runtime` settings choose the delegate and threads:
//!
//! - `delegate = "xnnpack"`: TFLite's XNNPACK CPU delegate, when the library exports it;
//! - `delegate = <name>`: an external delegate (e.g. a vendor NPU) that the agent's config
//!   registered under that name with [`TfliteBackend::with_external_delegate`];
//! - no delegate: TFLite's built-in CPU kernels. The C API applies no default delegate, so
//!   `tflite` really means the built-in kernels.
//!
//! When the delegate cannot be applied (missing, or the interpreter refuses it), the model loads
//! on the built-in kernels and [`LoadedModel::backend`] says `tflite`; with
//! `accelerator_required` the load fails instead, and also when the delegate took no node at all.
//! [`LoadedModel::delegation`] reports how many nodes the delegate took, when the library has the
//! API to tell (see `delegate.rs`).
//!
//! Limits: inputs and outputs are matched to the manifest by TFLite tensor name (what
//! `inspect_tflite` writes); quantized tensors cross as their raw integers (the caller applies
//! scale and zero point); string, FP16 and complex tensors are not supported. One interpreter
//! per loaded model, behind a mutex: requests to one model run one at a time. Dynamic dims are
//! resized per request; a model that cannot be allocated at its placeholder shape (e.g. an audio
//! model stored as `[1, 1]`) is allocated on its first request instead of at load.

// The TFLite C API is FFI: each unsafe block says why the call is sound.
#![allow(unsafe_code)]

mod delegate;
mod ffi;

use std::ffi::{CStr, c_int, c_void};
use std::sync::{Arc, Mutex};

use flotilla_bundle::manifest::{DType, Dim, ModelFormat, ModelSignature, RuntimeSettings};

pub use delegate::ExternalDelegate;
pub use ffi::{LIBRARY_ENV, LibraryError, TfliteLib};

use crate::error::RuntimeError;
use crate::tensor::{Tensor, TensorData};
use crate::{Backend, Delegation, LoadedModel};
use delegate::{OwnedDelegate, PlanProbe};
use ffi::{ErrorLog, OK, TfLiteInterpreter, TfLiteModel, TfLiteTensor, types};

pub const NAME: &str = "tflite";
/// The `runtime.delegate` value for TFLite's XNNPACK delegate.
pub const XNNPACK: &str = "xnnpack";

/// The `tflite` backend: one loaded library plus the external delegates the agent registered.
#[derive(Debug)]
pub struct TfliteBackend {
    lib: Arc<TfliteLib>,
    external: Vec<Arc<ExternalDelegate>>,
}

impl TfliteBackend {
    pub fn new(lib: TfliteLib) -> TfliteBackend {
        TfliteBackend { lib: Arc::new(lib), external: Vec::new() }
    }

    /// Let bundles ask for `delegate` by its name.
    pub fn with_external_delegate(mut self, delegate: ExternalDelegate) -> TfliteBackend {
        self.external.push(Arc::new(delegate));
        self
    }

    pub fn library(&self) -> &TfliteLib {
        &self.lib
    }

    /// The delegate names a bundle may ask for on this agent.
    pub fn delegates(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        if self.lib.xnnpack.is_some() {
            names.push(XNNPACK);
        }
        names.extend(self.external.iter().map(|d| d.name()));
        names
    }

    fn create_delegate(&self, name: &str, threads: Option<u32>) -> Result<OwnedDelegate, String> {
        if name == XNNPACK
            && let Some(api) = &self.lib.xnnpack
        {
            return delegate::xnnpack(api, threads);
        }
        match self.external.iter().find(|d| d.name() == name) {
            Some(d) => d.create(),
            None => Err(format!(
                "this agent has no TFLite delegate {name:?} (it has {:?}; {} {})",
                self.delegates(),
                self.lib.path().display(),
                if self.lib.xnnpack.is_some() { "exports XNNPACK" } else { "exports no XNNPACK delegate" }
            )),
        }
    }
}

impl Backend for TfliteBackend {
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
        let Some(name) = settings.delegate.as_deref() else {
            return Ok(Box::new(TfliteModel::load(&self.lib, model, sig, settings.threads, None)?));
        };
        let delegated = self
            .create_delegate(name, settings.threads)
            .map_err(|detail| RuntimeError::Load { backend: NAME, detail })
            .and_then(|d| TfliteModel::load(&self.lib, model, sig, settings.threads, Some((name, d))));
        match delegated {
            Ok(m) if settings.accelerator_required && m.delegation.is_some_and(|d| d.delegated_nodes == 0) => {
                Err(RuntimeError::Load {
                    backend: NAME,
                    detail: format!(
                        "the bundle requires delegate {name:?}, which took none of the model's {} nodes",
                        m.delegation.map_or(0, |d| d.cpu_nodes)
                    ),
                })
            }
            Ok(m) => Ok(Box::new(m)),
            Err(e) if settings.accelerator_required => {
                let why = match e {
                    RuntimeError::Load { detail, .. } => detail,
                    other => other.to_string(),
                };
                Err(RuntimeError::Load {
                    backend: NAME,
                    detail: format!("the bundle requires delegate {name:?}, which cannot be applied: {why}"),
                })
            }
            // Not required: run on the built-in kernels; backend() says so.
            Err(_) => Ok(Box::new(TfliteModel::load(&self.lib, model, sig, settings.threads, None)?)),
        }
    }
}

/// A model on one TFLite interpreter.
struct TfliteModel {
    /// `tflite`, or `tflite+<delegate>` when a delegate was applied.
    label: String,
    delegation: Option<Delegation>,
    /// Interpreter input index of each manifest input, in manifest order.
    inputs: Vec<usize>,
    /// Manifest name and interpreter output index of each output, in manifest order.
    outputs: Vec<(String, usize)>,
    state: Mutex<Interpreter>,
}

impl LoadedModel for TfliteModel {
    fn backend(&self) -> &str {
        &self.label
    }

    fn delegation(&self) -> Option<Delegation> {
        self.delegation
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        let mut interpreter = self.state.lock().map_err(|_| RuntimeError::Run {
            backend: NAME,
            detail: "the interpreter is unusable after a panic in an earlier request; reload the model".into(),
        })?;
        interpreter.set_inputs(&self.inputs, inputs)?;
        interpreter.invoke()?;
        self.outputs.iter().map(|(name, ix)| interpreter.output(name, *ix)).collect()
    }
}

impl TfliteModel {
    fn load(
        lib: &Arc<TfliteLib>,
        bytes: &[u8],
        sig: &ModelSignature,
        threads: Option<u32>,
        delegate: Option<(&str, OwnedDelegate)>,
    ) -> Result<TfliteModel, RuntimeError> {
        let load_err = |detail: String| RuntimeError::Load { backend: NAME, detail };
        let label = match &delegate {
            Some((name, _)) => format!("{NAME}+{name}"),
            None => NAME.to_string(),
        };
        let (mut interpreter, delegation) = Interpreter::create(lib, bytes, threads, delegate.map(|(_, d)| d))?;
        // A delegate that took nothing leaves every node on the built-in kernels.
        let label = if delegation.is_some_and(|d| d.delegated_nodes == 0) { NAME.to_string() } else { label };

        let input_names = interpreter.tensor_names(true);
        let output_names = interpreter.tensor_names(false);
        let mut inputs = Vec::new();
        for spec in &sig.inputs {
            let ix = input_names.iter().position(|n| *n == spec.name).ok_or_else(|| {
                load_err(format!("manifest input {:?} is not an input of the model ({input_names:?})", spec.name))
            })?;
            let have = interpreter.tensor_type(interpreter.input_tensor(ix));
            if type_code(spec.dtype) != Some(have) {
                return Err(load_err(format!(
                    "input {:?} is {} in the model, the manifest says {}",
                    spec.name,
                    types::name(have),
                    spec.dtype.as_str()
                )));
            }
            inputs.push(ix);
        }
        let mut outputs = Vec::new();
        for spec in &sig.outputs {
            let ix = output_names.iter().position(|n| *n == spec.name).ok_or_else(|| {
                load_err(format!("manifest output {:?} is not an output of the model ({output_names:?})", spec.name))
            })?;
            outputs.push((spec.name.clone(), ix));
        }

        // Inputs the manifest pins get their pinned shape now; symbolic ones keep the model's
        // placeholder until a request says otherwise.
        for (spec, &ix) in sig.inputs.iter().zip(&inputs) {
            let pinned: Option<Vec<usize>> =
                spec.shape.iter().map(|d| if let Dim::Fixed(n) = d { Some(*n as usize) } else { None }).collect();
            if let Some(shape) = pinned
                && shape != interpreter.dims(interpreter.input_tensor(ix))
            {
                interpreter.resize(ix, &shape).map_err(load_err)?;
            }
        }
        if let Err(e) = interpreter.allocate() {
            let dynamic = sig.inputs.iter().any(|s| s.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))));
            if !dynamic {
                return Err(load_err(e));
            }
        }
        Ok(TfliteModel { label, delegation, inputs, outputs, state: Mutex::new(interpreter) })
    }
}

/// One interpreter and everything it points into. Fields drop in declaration order: the
/// interpreter before its delegates, model, model bytes and error log, the library last.
struct Interpreter {
    raw: *mut TfLiteInterpreter,
    delegates: Vec<OwnedDelegate>,
    model: *mut TfLiteModel,
    /// The flatbuffer, 8-byte aligned; TFLite reads it in place for the model's lifetime.
    _bytes: Vec<u64>,
    errors: Box<ErrorLog>,
    /// False until `AllocateTensors` succeeded for the current input shapes.
    allocated: bool,
    lib: Arc<TfliteLib>,
}

// SAFETY: a TFLite interpreter is not thread-safe but is not tied to a thread either; the
// model wraps it in a Mutex, so one thread at a time uses it.
unsafe impl Send for Interpreter {}

impl Drop for Interpreter {
    fn drop(&mut self) {
        // SAFETY: both pointers came from their create calls and are deleted once, the
        // interpreter first; delegates, bytes and error log are dropped after this.
        unsafe {
            if !self.raw.is_null() {
                (self.lib.api.interpreter_delete)(self.raw);
            }
            (self.lib.api.model_delete)(self.model);
        }
    }
}

impl Interpreter {
    /// Build the interpreter, with `delegate` (bracketed by probes that count its nodes when the
    /// library allows).
    fn create(
        lib: &Arc<TfliteLib>,
        bytes: &[u8],
        threads: Option<u32>,
        delegate: Option<OwnedDelegate>,
    ) -> Result<(Interpreter, Option<Delegation>), RuntimeError> {
        let api = &lib.api;
        let load_err = |detail: String| RuntimeError::Load { backend: NAME, detail };
        let mut delegates = Vec::new();
        let mut probes = None;
        if let Some(d) = delegate {
            match &lib.opaque {
                Some(opaque) => {
                    let (before, before_delegate) = PlanProbe::create(opaque).map_err(load_err)?;
                    let (after, after_delegate) = PlanProbe::create(opaque).map_err(load_err)?;
                    delegates = vec![before_delegate, d, after_delegate];
                    probes = Some((before, after));
                }
                None => delegates = vec![d],
            }
        }
        let aligned: Vec<u64> = bytes
            .chunks(8)
            .map(|c| {
                let mut word = [0u8; 8];
                word[..c.len()].copy_from_slice(c);
                u64::from_ne_bytes(word)
            })
            .collect();
        let errors = Box::new(ErrorLog::default());
        let log = &*errors as *const ErrorLog as *mut c_void;
        let data = aligned.as_ptr() as *const c_void;
        // SAFETY: `aligned` holds `bytes.len()` model bytes; it and the error log outlive the model.
        let model = unsafe {
            match api.model_create_with_reporter {
                Some(create) => create(data, bytes.len(), ffi::report_to_log, log),
                None => (api.model_create)(data, bytes.len()),
            }
        };
        if model.is_null() {
            return Err(load_err(format!("not a valid TFLite model: {}", errors.take())));
        }
        let mut interpreter = Interpreter {
            raw: std::ptr::null_mut(),
            delegates,
            model,
            _bytes: aligned,
            errors,
            allocated: false,
            lib: Arc::clone(lib),
        };
        // SAFETY: plain calls on objects created here; the error log outlives the interpreter.
        unsafe {
            let options = (api.options_create)();
            (api.options_set_error_reporter)(options, ffi::report_to_log, log);
            if let Some(n) = threads {
                (api.options_set_num_threads)(options, n.min(i32::MAX as u32) as i32);
            }
            for d in &interpreter.delegates {
                (api.options_add_delegate)(options, d.as_ptr());
            }
            interpreter.raw = (api.interpreter_create)(model, options);
            (api.options_delete)(options);
        }
        if interpreter.raw.is_null() {
            return Err(load_err(format!("TfLiteInterpreterCreate failed: {}", interpreter.reported())));
        }
        let delegation = probes.and_then(|(before, after)| PlanProbe::delegation(&before, &after));
        interpreter.errors.take(); // warnings of a successful build are not the next error's cause
        Ok((interpreter, delegation))
    }

    /// What TFLite reported since the last call, or a placeholder.
    fn reported(&self) -> String {
        let msg = self.errors.take();
        if msg.is_empty() { "no details reported".into() } else { msg }
    }

    fn tensor_names(&self, inputs: bool) -> Vec<String> {
        let api = &self.lib.api;
        // SAFETY: indices are below the interpreter's own counts; names are NUL-terminated.
        unsafe {
            let count = if inputs { (api.input_count)(self.raw) } else { (api.output_count)(self.raw) };
            (0..count.max(0) as usize)
                .map(|ix| {
                    let t = if inputs { self.input_tensor(ix) as *const _ } else { self.output_tensor(ix) };
                    let name = (api.tensor_name)(t);
                    if name.is_null() { String::new() } else { CStr::from_ptr(name).to_string_lossy().into_owned() }
                })
                .collect()
        }
    }

    fn input_tensor(&self, ix: usize) -> *mut TfLiteTensor {
        // SAFETY: callers pass indices validated against the input count at load.
        unsafe { (self.lib.api.input_tensor)(self.raw, ix as i32) }
    }

    fn output_tensor(&self, ix: usize) -> *const TfLiteTensor {
        // SAFETY: callers pass indices validated against the output count at load.
        unsafe { (self.lib.api.output_tensor)(self.raw, ix as i32) }
    }

    fn tensor_type(&self, t: *const TfLiteTensor) -> i32 {
        // SAFETY: `t` is a live tensor of this interpreter.
        unsafe { (self.lib.api.tensor_type)(t) }
    }

    fn dims(&self, t: *const TfLiteTensor) -> Vec<usize> {
        let api = &self.lib.api;
        // SAFETY: `t` is a live tensor of this interpreter; dim indices are below its rank.
        unsafe { (0..(api.tensor_num_dims)(t).max(0)).map(|i| (api.tensor_dim)(t, i).max(0) as usize).collect() }
    }

    fn resize(&mut self, ix: usize, shape: &[usize]) -> Result<(), String> {
        let dims: Vec<c_int> = shape
            .iter()
            .map(|&d| c_int::try_from(d).map_err(|_| format!("dimension {d} is too large for TFLite")))
            .collect::<Result<_, _>>()?;
        self.allocated = false;
        // SAFETY: `dims` holds `dims.len()` ints for the call's duration.
        let status = unsafe { (self.lib.api.resize_input)(self.raw, ix as i32, dims.as_ptr(), dims.len() as i32) };
        if status != OK {
            return Err(format!("cannot resize input {ix} to {shape:?}: {}", self.reported()));
        }
        Ok(())
    }

    fn allocate(&mut self) -> Result<(), String> {
        // SAFETY: plain call on the live interpreter.
        if unsafe { (self.lib.api.allocate_tensors)(self.raw) } != OK {
            self.allocated = false;
            return Err(format!("AllocateTensors failed: {}", self.reported()));
        }
        self.allocated = true;
        Ok(())
    }

    /// Resize where a request's shape differs from the current one, then copy the data in.
    fn set_inputs(&mut self, order: &[usize], inputs: Vec<Tensor>) -> Result<(), RuntimeError> {
        let run_err = |detail: String| RuntimeError::Run { backend: NAME, detail };
        self.errors.take(); // start each request with an empty log
        for (t, &ix) in inputs.iter().zip(order) {
            if self.dims(self.input_tensor(ix)) != t.shape {
                self.resize(ix, &t.shape).map_err(RuntimeError::BadInput)?;
            }
        }
        if !self.allocated {
            let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
            self.allocate()
                .map_err(|e| RuntimeError::BadInput(format!("the model cannot run on shapes {shapes:?}: {e}")))?;
        }
        for (t, &ix) in inputs.iter().zip(order) {
            let tensor = self.input_tensor(ix);
            let bytes = t.data.to_le_bytes();
            // SAFETY: `tensor` is a live input tensor of this interpreter.
            let size = unsafe { (self.lib.api.tensor_byte_size)(tensor) };
            if size != bytes.len() {
                return Err(run_err(format!(
                    "input {:?} has {} bytes, the interpreter expects {size}",
                    t.name,
                    bytes.len()
                )));
            }
            // SAFETY: `bytes` holds exactly the tensor's byte size.
            let status =
                unsafe { (self.lib.api.tensor_copy_from_buffer)(tensor, bytes.as_ptr() as *const c_void, bytes.len()) };
            if status != OK {
                return Err(run_err(format!("copying input {:?}: {}", t.name, self.reported())));
            }
        }
        Ok(())
    }

    fn invoke(&mut self) -> Result<(), RuntimeError> {
        // SAFETY: plain call on the live, allocated interpreter.
        if unsafe { (self.lib.api.invoke)(self.raw) } != OK {
            return Err(RuntimeError::Run { backend: NAME, detail: format!("Invoke failed: {}", self.reported()) });
        }
        Ok(())
    }

    fn output(&self, name: &str, ix: usize) -> Result<Tensor, RuntimeError> {
        let run_err = |detail: String| RuntimeError::Run { backend: NAME, detail };
        let tensor = self.output_tensor(ix);
        let code = self.tensor_type(tensor);
        let dtype = dtype(code).ok_or_else(|| {
            RuntimeError::Unsupported(format!("output {name:?} has TFLite type {}", types::name(code)))
        })?;
        let shape = self.dims(tensor);
        // SAFETY: `tensor` is a live output tensor of this interpreter.
        let size = unsafe { (self.lib.api.tensor_byte_size)(tensor) };
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` has room for exactly the tensor's byte size.
        let status = unsafe { (self.lib.api.tensor_copy_to_buffer)(tensor, bytes.as_mut_ptr() as *mut c_void, size) };
        if status != OK {
            return Err(run_err(format!("copying output {name:?}: {}", self.reported())));
        }
        let data = TensorData::from_le_bytes(dtype, &bytes).map_err(|e| run_err(format!("output {name:?}: {e}")))?;
        Tensor::new(name, shape, data).map_err(|e| run_err(format!("output {name:?}: {e}")))
    }
}

fn type_code(d: DType) -> Option<i32> {
    Some(match d {
        DType::F32 => types::FLOAT32,
        DType::F64 => types::FLOAT64,
        DType::I64 => types::INT64,
        DType::I32 => types::INT32,
        DType::I16 => types::INT16,
        DType::I8 => types::INT8,
        DType::U8 => types::UINT8,
        DType::Bool => types::BOOL,
        DType::F16 => return None,
    })
}

fn dtype(code: i32) -> Option<DType> {
    Some(match code {
        types::FLOAT32 => DType::F32,
        types::FLOAT64 => DType::F64,
        types::INT64 => DType::I64,
        types::INT32 => DType::I32,
        types::INT16 => DType::I16,
        types::INT8 => DType::I8,
        types::UINT8 => DType::U8,
        types::BOOL => DType::Bool,
        _ => return None,
    })
}
