//! The TensorFlow Lite C API (`libtensorflowlite_c.so`), loaded at run time with `libloading`.
//!
//! Nothing links against TFLite: an agent without the library still starts, and
//! [`TfliteLib::load`] says what is missing. The required symbols are the stable C API of TFLite
//! 2.x; the XNNPACK delegate and the opaque-delegate API (used to count delegated nodes) are
//! optional and looked up separately, so a library built without them still loads.
//!
//! Limits: the declarations follow TFLite 2.17's `c_api.h`; only functions whose signatures have
//! not changed across 2.x are used. Tensor bytes are copied as native-endian, which is little
//! endian on every target Flotilla builds for.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libloading::Library;

/// The environment variable naming the library when the config does not.
pub const LIBRARY_ENV: &str = "FLOTILLA_TFLITE_LIB";

/// Opaque C types.
#[repr(C)]
pub struct TfLiteModel {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteInterpreterOptions {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteInterpreter {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteTensor {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteDelegate {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteOpaqueContext {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteOpaqueNode {
    _private: [u8; 0],
}
#[repr(C)]
pub struct TfLiteOperator {
    _private: [u8; 0],
}

/// `TfLiteStatus`: 0 is `kTfLiteOk`.
pub type Status = c_int;
pub const OK: Status = 0;

/// `TfLiteIntArray`: a length followed by that many ints.
#[repr(C)]
pub struct TfLiteIntArray {
    pub size: c_int,
    pub data: [c_int; 0],
}

/// The error reporter callback; `args` is a C `va_list`, which every ABI we target passes as one
/// pointer-sized value (x86-64 and AArch64 by reference, 32-bit ARM as a one-pointer struct).
pub type Reporter = unsafe extern "C" fn(user_data: *mut c_void, format: *const c_char, args: *mut c_void);

/// `TfLiteXNNPackDelegateOptions`, returned by value. Only `num_threads` (the first field in
/// every TFLite version) is touched; the padding is larger than the real struct of any 2.x
/// release, so the library can write its whole struct whatever its version.
#[repr(C)]
pub struct XnnpackOptions {
    pub num_threads: i32,
    pub flags: u32,
    _rest: [u64; 31],
}

/// `TfLiteOpaqueDelegateBuilder` (`tensorflow/lite/core/c/common.h`).
#[repr(C)]
pub struct OpaqueDelegateBuilder {
    pub data: *mut c_void,
    pub prepare: Option<
        unsafe extern "C" fn(
            context: *mut TfLiteOpaqueContext,
            delegate: *mut TfLiteDelegate,
            data: *mut c_void,
        ) -> Status,
    >,
    pub copy_from_buffer_handle: Option<unsafe extern "C" fn()>,
    pub copy_to_buffer_handle: Option<unsafe extern "C" fn()>,
    pub free_buffer_handle: Option<unsafe extern "C" fn()>,
    pub flags: i64,
}

/// `kTfLiteDelegateFlagsAllowDynamicTensors`.
pub const DELEGATE_FLAG_ALLOW_DYNAMIC_TENSORS: i64 = 1;
/// `kTfLiteBuiltinDelegate`: the builtin code of a node that stands for a delegated partition.
pub const BUILTIN_DELEGATE: c_int = 51;

/// The C API functions every supported library has.
#[derive(Clone, Copy, Debug)]
pub struct Api {
    pub version: unsafe extern "C" fn() -> *const c_char,
    pub model_create: unsafe extern "C" fn(data: *const c_void, size: usize) -> *mut TfLiteModel,
    /// Optional (TFLite 2.8+): lets parse errors reach our log instead of stderr.
    pub model_create_with_reporter:
        Option<unsafe extern "C" fn(*const c_void, usize, Reporter, *mut c_void) -> *mut TfLiteModel>,
    pub model_delete: unsafe extern "C" fn(*mut TfLiteModel),
    pub options_create: unsafe extern "C" fn() -> *mut TfLiteInterpreterOptions,
    pub options_delete: unsafe extern "C" fn(*mut TfLiteInterpreterOptions),
    pub options_set_num_threads: unsafe extern "C" fn(*mut TfLiteInterpreterOptions, i32),
    pub options_add_delegate: unsafe extern "C" fn(*mut TfLiteInterpreterOptions, *mut TfLiteDelegate),
    pub options_set_error_reporter: unsafe extern "C" fn(*mut TfLiteInterpreterOptions, Reporter, *mut c_void),
    pub interpreter_create:
        unsafe extern "C" fn(*const TfLiteModel, *const TfLiteInterpreterOptions) -> *mut TfLiteInterpreter,
    pub interpreter_delete: unsafe extern "C" fn(*mut TfLiteInterpreter),
    pub allocate_tensors: unsafe extern "C" fn(*mut TfLiteInterpreter) -> Status,
    pub input_count: unsafe extern "C" fn(*const TfLiteInterpreter) -> i32,
    pub input_tensor: unsafe extern "C" fn(*const TfLiteInterpreter, i32) -> *mut TfLiteTensor,
    pub resize_input: unsafe extern "C" fn(*mut TfLiteInterpreter, i32, *const c_int, i32) -> Status,
    pub invoke: unsafe extern "C" fn(*mut TfLiteInterpreter) -> Status,
    pub output_count: unsafe extern "C" fn(*const TfLiteInterpreter) -> i32,
    pub output_tensor: unsafe extern "C" fn(*const TfLiteInterpreter, i32) -> *const TfLiteTensor,
    pub tensor_type: unsafe extern "C" fn(*const TfLiteTensor) -> c_int,
    pub tensor_num_dims: unsafe extern "C" fn(*const TfLiteTensor) -> i32,
    pub tensor_dim: unsafe extern "C" fn(*const TfLiteTensor, i32) -> i32,
    pub tensor_byte_size: unsafe extern "C" fn(*const TfLiteTensor) -> usize,
    pub tensor_name: unsafe extern "C" fn(*const TfLiteTensor) -> *const c_char,
    pub tensor_copy_from_buffer: unsafe extern "C" fn(*mut TfLiteTensor, *const c_void, usize) -> Status,
    pub tensor_copy_to_buffer: unsafe extern "C" fn(*const TfLiteTensor, *mut c_void, usize) -> Status,
}

/// The XNNPACK delegate, when the library was built with it.
#[derive(Clone, Copy, Debug)]
pub struct XnnpackApi {
    pub options_default: unsafe extern "C" fn() -> XnnpackOptions,
    pub create: unsafe extern "C" fn(*const XnnpackOptions) -> *mut TfLiteDelegate,
    pub delete: unsafe extern "C" fn(*mut TfLiteDelegate),
}

/// The opaque-delegate API (TFLite 2.13+), used to look at the execution plan and count which
/// nodes a delegate took.
#[derive(Clone, Copy, Debug)]
pub struct OpaqueApi {
    pub delegate_create: unsafe extern "C" fn(*const OpaqueDelegateBuilder) -> *mut TfLiteDelegate,
    pub delegate_delete: unsafe extern "C" fn(*mut TfLiteDelegate),
    pub get_execution_plan: unsafe extern "C" fn(*mut TfLiteOpaqueContext, *mut *mut TfLiteIntArray) -> Status,
    pub get_node_and_registration: unsafe extern "C" fn(
        *mut TfLiteOpaqueContext,
        c_int,
        *mut *mut TfLiteOpaqueNode,
        *mut *mut TfLiteOperator,
    ) -> Status,
    pub operator_builtin_code: unsafe extern "C" fn(*const TfLiteOperator) -> c_int,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibraryError {
    #[error(
        "no TensorFlow Lite library configured: set {LIBRARY_ENV} (or the agent's tflite library setting) to the path of libtensorflowlite_c.so"
    )]
    NotConfigured,
    #[error("cannot load the TensorFlow Lite library {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("{path} is not a usable TensorFlow Lite C library: it has no symbol {symbol}")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("cannot load delegate {name:?} from {path}: {detail}")]
    Delegate { name: String, path: PathBuf, detail: String },
}

/// A loaded `libtensorflowlite_c`. Models keep it alive through an `Arc`.
pub struct TfliteLib {
    pub(crate) api: Api,
    pub(crate) xnnpack: Option<XnnpackApi>,
    pub(crate) opaque: Option<OpaqueApi>,
    path: PathBuf,
    version: String,
    // Declared last: the function pointers above are only valid while this lives.
    _library: Library,
}

impl std::fmt::Debug for TfliteLib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TfliteLib")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("xnnpack", &self.xnnpack.is_some())
            .field("opaque_delegates", &self.opaque.is_some())
            .finish()
    }
}

impl TfliteLib {
    /// The library path: the explicit setting, else `$FLOTILLA_TFLITE_LIB`.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, LibraryError> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        match std::env::var_os(LIBRARY_ENV) {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err(LibraryError::NotConfigured),
        }
    }

    /// Load the library at `path` and resolve its symbols.
    pub fn load(path: &Path) -> Result<TfliteLib, LibraryError> {
        // SAFETY: loading runs the library's initialisers; TFLite's only register kernels.
        let library = unsafe { Library::new(path) }
            .map_err(|e| LibraryError::Open { path: path.to_path_buf(), detail: e.to_string() })?;
        let api = {
            let s = Symbols { library: &library, path };
            Api {
                version: s.get("TfLiteVersion")?,
                model_create: s.get("TfLiteModelCreate")?,
                model_create_with_reporter: s.get("TfLiteModelCreateWithErrorReporter").ok(),
                model_delete: s.get("TfLiteModelDelete")?,
                options_create: s.get("TfLiteInterpreterOptionsCreate")?,
                options_delete: s.get("TfLiteInterpreterOptionsDelete")?,
                options_set_num_threads: s.get("TfLiteInterpreterOptionsSetNumThreads")?,
                options_add_delegate: s.get("TfLiteInterpreterOptionsAddDelegate")?,
                options_set_error_reporter: s.get("TfLiteInterpreterOptionsSetErrorReporter")?,
                interpreter_create: s.get("TfLiteInterpreterCreate")?,
                interpreter_delete: s.get("TfLiteInterpreterDelete")?,
                allocate_tensors: s.get("TfLiteInterpreterAllocateTensors")?,
                input_count: s.get("TfLiteInterpreterGetInputTensorCount")?,
                input_tensor: s.get("TfLiteInterpreterGetInputTensor")?,
                resize_input: s.get("TfLiteInterpreterResizeInputTensor")?,
                invoke: s.get("TfLiteInterpreterInvoke")?,
                output_count: s.get("TfLiteInterpreterGetOutputTensorCount")?,
                output_tensor: s.get("TfLiteInterpreterGetOutputTensor")?,
                tensor_type: s.get("TfLiteTensorType")?,
                tensor_num_dims: s.get("TfLiteTensorNumDims")?,
                tensor_dim: s.get("TfLiteTensorDim")?,
                tensor_byte_size: s.get("TfLiteTensorByteSize")?,
                tensor_name: s.get("TfLiteTensorName")?,
                tensor_copy_from_buffer: s.get("TfLiteTensorCopyFromBuffer")?,
                tensor_copy_to_buffer: s.get("TfLiteTensorCopyToBuffer")?,
            }
        };
        let s = Symbols { library: &library, path };
        let xnnpack = (|| {
            Ok::<_, LibraryError>(XnnpackApi {
                options_default: s.get("TfLiteXNNPackDelegateOptionsDefault")?,
                create: s.get("TfLiteXNNPackDelegateCreate")?,
                delete: s.get("TfLiteXNNPackDelegateDelete")?,
            })
        })()
        .ok();
        let opaque = (|| {
            Ok::<_, LibraryError>(OpaqueApi {
                delegate_create: s.get("TfLiteOpaqueDelegateCreate")?,
                delegate_delete: s.get("TfLiteOpaqueDelegateDelete")?,
                get_execution_plan: s.get("TfLiteOpaqueContextGetExecutionPlan")?,
                get_node_and_registration: s.get("TfLiteOpaqueContextGetNodeAndRegistration")?,
                operator_builtin_code: s.get("TfLiteOperatorGetBuiltInCode")?,
            })
        })()
        .ok();
        // SAFETY: TfLiteVersion returns a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr((api.version)()) }.to_string_lossy().into_owned();
        Ok(TfliteLib { api, xnnpack, opaque, path: path.to_path_buf(), version, _library: library })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The library's `TfLiteVersion()`, e.g. `2.17.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What this library can do beyond the CPU kernels, for reports: e.g. `["xnnpack"]`.
    pub fn capabilities(&self) -> Vec<&'static str> {
        let mut caps = Vec::new();
        if self.xnnpack.is_some() {
            caps.push("xnnpack");
        }
        if self.opaque.is_some() {
            caps.push("delegated-node-count");
        }
        caps
    }
}

struct Symbols<'a> {
    library: &'a Library,
    path: &'a Path,
}

impl Symbols<'_> {
    /// Copy a function pointer out of the library. `T` must be the symbol's C signature.
    pub fn get<T: Copy>(&self, name: &'static str) -> Result<T, LibraryError> {
        // SAFETY: every call site spells `T` as the symbol's C signature from TFLite's headers.
        unsafe { self.library.get::<T>(name.as_bytes()) }
            .map(|sym| *sym)
            .map_err(|_| LibraryError::MissingSymbol { path: self.path.to_path_buf(), symbol: name })
    }
}

/// Messages TFLite reports through an error reporter, collected for the next error we return.
#[derive(Debug, Default)]
pub struct ErrorLog(Mutex<Vec<String>>);

impl ErrorLog {
    /// Everything reported since the last call, joined; empty when nothing was.
    pub fn take(&self) -> String {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *log).join("; ")
    }
}

unsafe extern "C" {
    fn vsnprintf(s: *mut c_char, n: usize, format: *const c_char, args: *mut c_void) -> c_int;
}

/// The [`Reporter`] that appends to the [`ErrorLog`] passed as `user_data`.
pub unsafe extern "C" fn report_to_log(user_data: *mut c_void, format: *const c_char, args: *mut c_void) {
    let mut buf = [0 as c_char; 1024];
    // SAFETY: `format` and `args` come from TFLite's reporter call; vsnprintf writes at most
    // `buf.len()` bytes including the NUL; `user_data` is the `ErrorLog` the model owns.
    let message = unsafe {
        vsnprintf(buf.as_mut_ptr(), buf.len(), format, args);
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().trim().to_string()
    };
    let log = unsafe { &*(user_data as *const ErrorLog) };
    if !message.is_empty() {
        log.0.lock().unwrap_or_else(|p| p.into_inner()).push(message);
    }
}

/// `TfLiteType` codes that map onto the API's tensor types.
pub mod types {
    pub const FLOAT32: i32 = 1;
    pub const INT32: i32 = 2;
    pub const UINT8: i32 = 3;
    pub const INT64: i32 = 4;
    pub const BOOL: i32 = 6;
    pub const INT16: i32 = 7;
    pub const INT8: i32 = 9;
    pub const FLOAT64: i32 = 11;

    /// TFLite's own name for a type code, for error messages.
    pub fn name(code: i32) -> &'static str {
        match code {
            0 => "NOTYPE",
            1 => "FLOAT32",
            2 => "INT32",
            3 => "UINT8",
            4 => "INT64",
            5 => "STRING",
            6 => "BOOL",
            7 => "INT16",
            8 => "COMPLEX64",
            9 => "INT8",
            10 => "FLOAT16",
            11 => "FLOAT64",
            12 => "COMPLEX128",
            13 => "UINT64",
            14 => "RESOURCE",
            15 => "VARIANT",
            16 => "UINT32",
            17 => "UINT16",
            18 => "INT4",
            19 => "BFLOAT16",
            _ => "unknown",
        }
    }
}
