//! TFLite delegates: XNNPACK from the library itself, external delegates from their own shared
//! library, and a probe that counts how a delegate split the graph.
//!
//! External delegates are loaded the way TFLite's own external-delegate adaptor loads them (and
//! the way vendor NPU delegates ship): `dlopen` the delegate library and call its
//! `tflite_plugin_create_delegate` / `tflite_plugin_destroy_delegate` entry points with
//! key/value options. That needs nothing from the TFLite library, so it works whether or not the
//! library exports `TfLiteExternalDelegate*` (the 2.17 wheel library does not).
//!
//! Delegated-node counts: the C API has no call that says which nodes a delegate took. When the
//! library has the opaque-delegate API, a do-nothing probe delegate is applied before and after
//! the real one; each looks at the execution plan (summed over subgraphs). Before, every node is a
//! TFLite kernel; after, the delegate's partitions are single `DELEGATE` nodes, so
//! `taken = nodes before - CPU nodes after`. Without that API the count is unknown (`None`).

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use libloading::Library;

use crate::Delegation;

use super::ffi::{
    BUILTIN_DELEGATE, DELEGATE_FLAG_ALLOW_DYNAMIC_TENSORS, LibraryError, OK, OpaqueApi, OpaqueDelegateBuilder, Status,
    TfLiteDelegate, TfLiteIntArray, TfLiteOpaqueContext, XnnpackApi,
};

/// A delegate instance that one interpreter uses; destroyed after that interpreter.
pub struct OwnedDelegate {
    ptr: *mut TfLiteDelegate,
    destroy: unsafe extern "C" fn(*mut TfLiteDelegate),
    /// Keeps the external delegate's library loaded while the delegate exists.
    _plugin: Option<Arc<ExternalDelegate>>,
    /// Keeps a probe's counters alive while the delegate can still write them.
    _probe: Option<Arc<PlanProbe>>,
}

impl OwnedDelegate {
    pub fn as_ptr(&self) -> *mut TfLiteDelegate {
        self.ptr
    }
}

impl Drop for OwnedDelegate {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the matching create call and the interpreter using it is gone.
        unsafe { (self.destroy)(self.ptr) }
    }
}

/// Create an XNNPACK delegate with `threads` threads (TFLite's default when `None`).
pub fn xnnpack(api: &XnnpackApi, threads: Option<u32>) -> Result<OwnedDelegate, String> {
    // SAFETY: OptionsDefault returns the struct by value into our larger buffer (see XnnpackOptions).
    let mut options = unsafe { (api.options_default)() };
    if let Some(n) = threads {
        options.num_threads = n.min(i32::MAX as u32) as i32;
    }
    // SAFETY: `options` is a valid, fully initialised options struct.
    let ptr = unsafe { (api.create)(&options) };
    if ptr.is_null() {
        return Err("TfLiteXNNPackDelegateCreate returned no delegate".into());
    }
    Ok(OwnedDelegate { ptr, destroy: api.delete, _plugin: None, _probe: None })
}

type PluginCreate = unsafe extern "C" fn(
    keys: *const *const c_char,
    values: *const *const c_char,
    count: usize,
    report_error: Option<unsafe extern "C" fn(*const c_char)>,
) -> *mut TfLiteDelegate;
type PluginDestroy = unsafe extern "C" fn(*mut TfLiteDelegate);

/// A delegate library (for example a vendor NPU delegate) the agent's config names. Bundles ask
/// for it by `name` in `runtime.delegate`; a name from a bundle is never used as a path.
pub struct ExternalDelegate {
    name: String,
    path: PathBuf,
    keys: Vec<CString>,
    values: Vec<CString>,
    create: PluginCreate,
    destroy: PluginDestroy,
    // Declared last: `create` and `destroy` are only valid while this lives.
    _library: Library,
}

impl std::fmt::Debug for ExternalDelegate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalDelegate").field("name", &self.name).field("path", &self.path).finish()
    }
}

impl ExternalDelegate {
    /// Load the delegate library at `path` and check it has both plugin entry points. `options`
    /// are passed to every `tflite_plugin_create_delegate` call (e.g. `("cache_dir", "/var/...")`).
    pub fn load(name: &str, path: &Path, options: &[(String, String)]) -> Result<ExternalDelegate, LibraryError> {
        let fail = |detail: String| LibraryError::Delegate { name: name.to_string(), path: path.to_path_buf(), detail };
        let c_string = |s: &str| CString::new(s).map_err(|_| fail(format!("option {s:?} contains a NUL byte")));
        let keys = options.iter().map(|(k, _)| c_string(k)).collect::<Result<Vec<_>, _>>()?;
        let values = options.iter().map(|(_, v)| c_string(v)).collect::<Result<Vec<_>, _>>()?;
        // SAFETY: loading runs the delegate library's initialisers, as TFLite itself would.
        let library = unsafe { Library::new(path) }.map_err(|e| fail(e.to_string()))?;
        // SAFETY: the signatures are those of TFLite's external delegate plugin interface.
        let (create, destroy) = unsafe {
            let create = *library
                .get::<PluginCreate>(b"tflite_plugin_create_delegate")
                .map_err(|_| fail("it has no tflite_plugin_create_delegate entry point".into()))?;
            let destroy = *library
                .get::<PluginDestroy>(b"tflite_plugin_destroy_delegate")
                .map_err(|_| fail("it has no tflite_plugin_destroy_delegate entry point".into()))?;
            (create, destroy)
        };
        Ok(ExternalDelegate {
            name: name.to_string(),
            path: path.to_path_buf(),
            keys,
            values,
            create,
            destroy,
            _library: library,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Create one delegate instance.
    pub fn create(self: &Arc<Self>) -> Result<OwnedDelegate, String> {
        let keys: Vec<*const c_char> = self.keys.iter().map(|k| k.as_ptr()).collect();
        let values: Vec<*const c_char> = self.values.iter().map(|v| v.as_ptr()).collect();
        PLUGIN_ERROR.with(|e| e.borrow_mut().clear());
        // SAFETY: `keys` and `values` hold `len` valid C strings that outlive the call.
        let ptr = unsafe { (self.create)(keys.as_ptr(), values.as_ptr(), keys.len(), Some(plugin_error)) };
        if ptr.is_null() {
            let reported = PLUGIN_ERROR.with(|e| e.take());
            return Err(format!(
                "{} (from {}) created no delegate{}",
                self.name,
                self.path.display(),
                if reported.is_empty() { String::new() } else { format!(": {reported}") }
            ));
        }
        Ok(OwnedDelegate { ptr, destroy: self.destroy, _plugin: Some(Arc::clone(self)), _probe: None })
    }
}

thread_local! {
    /// What the plugin reported during the `create` call on this thread.
    static PLUGIN_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

unsafe extern "C" fn plugin_error(message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: the plugin passes a NUL-terminated message.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    PLUGIN_ERROR.with(|e| {
        let mut e = e.borrow_mut();
        if !e.is_empty() {
            e.push_str("; ");
        }
        e.push_str(&text);
    });
}

/// The counters one probe fills in while the interpreter applies it.
#[derive(Debug)]
pub struct PlanProbe {
    api: OpaqueApi,
    kernel_nodes: AtomicUsize,
    delegate_nodes: AtomicUsize,
    prepared: AtomicBool,
    failed: AtomicBool,
}

impl PlanProbe {
    /// A probe and the delegate that runs it.
    pub fn create(api: &OpaqueApi) -> Result<(Arc<PlanProbe>, OwnedDelegate), String> {
        let probe = Arc::new(PlanProbe {
            api: *api,
            kernel_nodes: AtomicUsize::new(0),
            delegate_nodes: AtomicUsize::new(0),
            prepared: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let builder = OpaqueDelegateBuilder {
            data: Arc::as_ptr(&probe) as *mut c_void,
            prepare: Some(count_plan),
            copy_from_buffer_handle: None,
            copy_to_buffer_handle: None,
            free_buffer_handle: None,
            flags: DELEGATE_FLAG_ALLOW_DYNAMIC_TENSORS,
        };
        // SAFETY: the builder is valid for the call; TFLite copies it.
        let ptr = unsafe { (api.delegate_create)(&builder) };
        if ptr.is_null() {
            return Err("TfLiteOpaqueDelegateCreate returned no delegate".into());
        }
        let delegate =
            OwnedDelegate { ptr, destroy: api.delegate_delete, _plugin: None, _probe: Some(Arc::clone(&probe)) };
        Ok((probe, delegate))
    }

    /// The split between a probe applied before the delegate and one applied after it.
    pub fn delegation(before: &PlanProbe, after: &PlanProbe) -> Option<Delegation> {
        for p in [before, after] {
            if !p.prepared.load(Ordering::Relaxed) || p.failed.load(Ordering::Relaxed) {
                return None;
            }
        }
        let total = before.kernel_nodes.load(Ordering::Relaxed) + before.delegate_nodes.load(Ordering::Relaxed);
        let cpu_nodes = after.kernel_nodes.load(Ordering::Relaxed);
        Some(Delegation {
            delegated_nodes: total.saturating_sub(cpu_nodes),
            cpu_nodes,
            partitions: after.delegate_nodes.load(Ordering::Relaxed),
        })
    }
}

/// The probe's `Prepare`: count the plan's nodes, replace none. Called once per subgraph.
unsafe extern "C" fn count_plan(
    context: *mut TfLiteOpaqueContext,
    _: *mut TfLiteDelegate,
    data: *mut c_void,
) -> Status {
    // SAFETY: `data` is the probe set in `PlanProbe::create`, kept alive by the OwnedDelegate.
    let probe = unsafe { &*(data as *const PlanProbe) };
    probe.prepared.store(true, Ordering::Relaxed);
    let mut plan: *mut TfLiteIntArray = ptr::null_mut();
    // SAFETY: `context` is the live context TFLite passed to Prepare.
    if unsafe { (probe.api.get_execution_plan)(context, &mut plan) } != OK || plan.is_null() {
        probe.failed.store(true, Ordering::Relaxed);
        return OK;
    }
    // SAFETY: TFLite owns `plan`, a TfLiteIntArray of `size` node indices, valid during Prepare.
    let nodes = unsafe {
        let len = usize::try_from((*plan).size).unwrap_or(0);
        std::slice::from_raw_parts(ptr::addr_of!((*plan).data) as *const c_int, len)
    };
    for &node_index in nodes {
        let mut node = ptr::null_mut();
        let mut operator = ptr::null_mut();
        // SAFETY: `node_index` comes from the context's own execution plan.
        let status = unsafe { (probe.api.get_node_and_registration)(context, node_index, &mut node, &mut operator) };
        if status != OK || operator.is_null() {
            probe.failed.store(true, Ordering::Relaxed);
            continue;
        }
        // SAFETY: `operator` was just returned by the context.
        if unsafe { (probe.api.operator_builtin_code)(operator) } == BUILTIN_DELEGATE {
            probe.delegate_nodes.fetch_add(1, Ordering::Relaxed);
        } else {
            probe.kernel_nodes.fetch_add(1, Ordering::Relaxed);
        }
    }
    OK
}
