//! Loading a handler plugin: `dlopen`, the entry symbol, the ABI version
//! check, and calls to init, handle and shutdown that never let a failure
//! escape as anything but an error value.
//!
//! The library is loaded once per worker process and never unloaded
//! (unloading a Rust cdylib is unsound); reloading means new workers.

use gaspard_handler_abi::{
    EntryFn, HandleFn, HandlerV1, Host, ABI_VERSION, ENTRY_SYMBOL, STATUS_OK,
};
use std::ffi::{c_void, CStr};
use std::path::{Path, PathBuf};

/// Why a file cannot serve as a handler. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("handler {path}: cannot load: {reason}")]
    Load { path: PathBuf, reason: String },
    /// Most often a Rust crate built without `crate-type = ["cdylib"]`, its
    /// `.rlib` given as the handler.
    #[error(
        "handler {path}: cannot load: {reason}: not a shared library (build it as a cdylib: crate-type = [\"cdylib\"] in Cargo.toml)"
    )]
    NotSharedLibrary { path: PathBuf, reason: String },
    #[error(
        "handler {path}: not a gaspard handler: it does not export gaspar_handler_entry: a Rust crate needs export_handler!(f) or export_handler!(state = Type); a C library must not hide it (-fvisibility=hidden: mark it GASPAR_EXPORT or visibility(\"default\"))"
    )]
    NotAHandler { path: PathBuf },
    #[error("handler {path}: gaspar_handler_entry returned NULL")]
    NullEntry { path: PathBuf },
    #[error(
        "handler {path}: built for handler ABI version {found}, this gaspard speaks version {ABI_VERSION}"
    )]
    AbiMismatch { path: PathBuf, found: u32 },
    #[error("handler {path}: its table has no handle function")]
    NoHandle { path: PathBuf },
    #[error("handler {path}: init failed: {reason}")]
    Init { path: PathBuf, reason: String },
}

/// A loaded, initialised handler.
pub struct Plugin {
    // Keeps the code mapped; deliberately leaked on drop (see the module docs).
    _library: std::mem::ManuallyDrop<libloading::Library>,
    table: &'static HandlerV1,
    handle: HandleFn,
    state: *mut c_void,
    name: String,
}

/// What a handler call produced: a reply, or the handler's error message.
/// That message is the handler's own text, passed on to the log as data,
/// not a failure of gaspard's, hence a plain String rather than an error type.
pub type Outcome<R> = Result<Option<R>, String>;

/// Where the host side of one call keeps the reply buffer and error text.
/// `R` is the reply buffer type: the worker's has room in front for the
/// link's frame header, so header and reply leave in one write.
struct CallContext<R, F> {
    make_buffer: F,
    reply: Option<R>,
    error: Option<String>,
}

unsafe extern "C" fn reply_buffer<R, F>(ctx: *mut c_void, len: usize) -> *mut u8
where
    R: AsMut<[u8]>,
    F: FnMut(usize) -> Option<R>,
{
    // SAFETY: `ctx` is the CallContext<R, F> that `call` put in the Host.
    let ctx = unsafe { &mut *ctx.cast::<CallContext<R, F>>() };
    ctx.reply = (ctx.make_buffer)(len);
    match ctx.reply.as_mut() {
        Some(buffer) => buffer.as_mut().as_mut_ptr(),
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn set_error<R, F>(ctx: *mut c_void, msg: *const u8, len: usize) {
    // SAFETY: `ctx` is the CallContext<R, F> that `call` put in the Host.
    let ctx = unsafe { &mut *ctx.cast::<CallContext<R, F>>() };
    let text = if msg.is_null() || len == 0 {
        String::new()
    } else {
        // SAFETY: the handler promises `len` readable bytes at `msg`.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(msg, len) }).into_owned()
    };
    ctx.error = Some(text);
}

impl Plugin {
    /// Loads the library at `path`, checks its ABI version and calls its init.
    pub fn load(path: &Path, config: &str) -> Result<Plugin, PluginError> {
        Plugin::load_as(path, path, config)
    }

    /// Like [`Plugin::load`], loading `path` but naming `shown` in errors (a
    /// worker loads a snapshot of the operator's file).
    pub fn load_as(path: &Path, shown: &Path, config: &str) -> Result<Plugin, PluginError> {
        let path_buf = || shown.to_path_buf();
        // RTLD_NOW: every symbol the handler needs is bound here, so one
        // missing from its dependencies refuses it at --check or reload
        // instead of failing each request that reaches the call.
        // RTLD_LOCAL: its symbols never satisfy another library's.
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        // SAFETY: loading a library runs its initialisers; choosing to trust
        // the handler's code is the operator's decision made with --handler.
        let library = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
            .map(libloading::Library::from)
            .map_err(|e| {
                let reason = load_reason(e);
                if is_not_shared_library(&reason) {
                    PluginError::NotSharedLibrary {
                        path: path_buf(),
                        reason,
                    }
                } else {
                    PluginError::Load {
                        path: path_buf(),
                        reason,
                    }
                }
            })?;
        // Never unloaded, not even when refused: dlclose of a Rust cdylib is unsound.
        let library = std::mem::ManuallyDrop::new(library);
        // SAFETY: the ABI defines gaspar_handler_entry with this signature.
        let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
            .map(|symbol| *symbol)
            .map_err(|_| PluginError::NotAHandler { path: path_buf() })?;
        // SAFETY: calling the handler's entry function, as the ABI specifies.
        let table = unsafe { entry() };
        if table.is_null() {
            return Err(PluginError::NullEntry { path: path_buf() });
        }
        // Read only the version before trusting the rest of the layout.
        // SAFETY: every ABI version starts with a u32 version field.
        let found = unsafe { table.cast::<u32>().read() };
        if found != ABI_VERSION {
            return Err(PluginError::AbiMismatch {
                path: path_buf(),
                found,
            });
        }
        // SAFETY: the version matches, so the table has the V1 layout; it is
        // static data of a library we never unload.
        let table: &'static HandlerV1 = unsafe { &*table };
        let name = if table.name.is_null() {
            shown
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
        } else {
            // SAFETY: the ABI requires a NUL-terminated string.
            unsafe { CStr::from_ptr(table.name) }
                .to_string_lossy()
                .into_owned()
        };
        let handle = table
            .handle
            .ok_or_else(|| PluginError::NoHandle { path: path_buf() })?;
        let mut state = std::ptr::null_mut();
        if let Some(init) = table.init {
            let (status, _, error) = with_host(
                |_| None::<Vec<u8>>,
                |host| {
                    // SAFETY: a valid config buffer, state slot and host for this call.
                    unsafe { init(config.as_ptr(), config.len(), &mut state, host) }
                },
            );
            if status != STATUS_OK {
                return Err(PluginError::Init {
                    path: path_buf(),
                    reason: error
                        .filter(|e| !e.is_empty())
                        .unwrap_or_else(|| format!("init returned {status}")),
                });
            }
        }
        // Only now: a handler whose init failed is not shut down.
        Ok(Plugin {
            _library: library,
            table,
            handle,
            state,
            name,
        })
    }

    /// The handler's name, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls the handler on one request; the reply goes into a buffer from
    /// `make_buffer`. `Ok(None)` is an empty reply.
    pub fn handle<R, F>(&mut self, request: &[u8], make_buffer: F) -> Outcome<R>
    where
        R: AsMut<[u8]>,
        F: FnMut(usize) -> Option<R>,
    {
        let state = self.state;
        let handle = self.handle;
        let (status, reply, error) = with_host(make_buffer, |host| {
            // SAFETY: the state init made, a request valid for the call, a valid host.
            unsafe { handle(state, request.as_ptr(), request.len(), host) }
        });
        if status == STATUS_OK {
            Ok(reply)
        } else {
            Err(error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| format!("handler returned status {status}")))
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(shutdown) = self.table.shutdown {
            // SAFETY: the state init made, released exactly once.
            unsafe { shutdown(self.state) };
        }
    }
}

/// Runs `call` with a Host whose callbacks fill a CallContext.
fn with_host<R, F>(
    make_buffer: F,
    call: impl FnOnce(&Host) -> i32,
) -> (i32, Option<R>, Option<String>)
where
    R: AsMut<[u8]>,
    F: FnMut(usize) -> Option<R>,
{
    let mut ctx = CallContext {
        make_buffer,
        reply: None,
        error: None,
    };
    let host = Host {
        ctx: (&mut ctx as *mut CallContext<R, F>).cast(),
        reply_buffer: reply_buffer::<R, F>,
        set_error: set_error::<R, F>,
    };
    let status = call(&host);
    (status, ctx.reply, ctx.error)
}

/// dlopen's message repeats the path; keep just the reason.
fn load_reason(error: libloading::Error) -> String {
    let text = match &error {
        libloading::Error::DlOpen { desc } => format!("{desc:?}"),
        other => other.to_string(),
    };
    let text = text.trim_matches('"').to_string();
    match text.split_once(": ") {
        Some((_, reason)) if text.starts_with('/') || text.starts_with('.') => reason.to_string(),
        _ => text,
    }
}

/// Whether dlopen's reason says the file is no shared library at all (an
/// `.rlib` is an `ar` archive: "invalid ELF header"), rather than a library
/// that cannot be loaded (a missing dependency, an undefined symbol).
fn is_not_shared_library(reason: &str) -> bool {
    [
        "invalid ELF header",
        "file too short",
        "only ET_DYN and ET_EXEC can be loaded",
        "cannot dynamically load",
    ]
    .iter()
    .any(|known| reason.contains(known))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_or_a_text_file_is_not_a_shared_library_but_a_missing_symbol_is_not_that() {
        assert!(is_not_shared_library("invalid ELF header"));
        assert!(is_not_shared_library("file too short"));
        assert!(!is_not_shared_library("undefined symbol: compress2"));
        assert!(!is_not_shared_library(
            "libz.so.9: cannot open shared object file: No such file or directory"
        ));
    }
}
