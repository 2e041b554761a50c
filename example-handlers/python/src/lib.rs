//! `libgaspar_python.so`: a gaspard handler that runs a Python function.
//!
//! ```text
//! gaspard --handler libgaspar_python.so --handler-config 'myapp.handlers:resize'
//! ```
//!
//! Each worker starts its own CPython interpreter (in `init`, after gaspard
//! has exec'd the worker: never in the daemon), imports `myapp.handlers`,
//! and calls `resize(request: bytes)` once per request; the function returns
//! the reply as bytes (or bytearray, memoryview, or str sent as UTF-8). The
//! whole contract — hooks, exceptions, virtual environments, the GIL — is in
//! `docs/python.md`.
//!
//! This crate speaks the handler ABI directly rather than through
//! `export_handler!`, so that a reply is copied once, from the Python object
//! straight into gaspard's reply buffer.

mod bridge;
mod interpreter;
mod target;

use bridge::Bridge;
use gaspard_handler_abi::{HandlerV1, Host, ABI_VERSION, STATUS_ERROR, STATUS_OK};
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};

/// The handler's entry point.
#[no_mangle]
pub extern "C" fn gaspar_handler_entry() -> *const HandlerV1 {
    static ENTRY: HandlerV1 = HandlerV1 {
        abi_version: ABI_VERSION,
        name: c"gaspar-python".as_ptr(),
        init: Some(init),
        handle: Some(handle),
        shutdown: Some(shutdown),
    };
    &ENTRY
}

unsafe extern "C" fn init(
    config: *const u8,
    config_len: usize,
    state: *mut *mut c_void,
    host: *const Host,
) -> i32 {
    // SAFETY: gaspard passes `config_len` readable bytes at `config`.
    let config = unsafe { bytes(config, config_len) };
    let started = panic::catch_unwind(|| {
        init_logging();
        let config =
            std::str::from_utf8(config).map_err(|e| format!("handler config is not UTF-8: {e}"))?;
        Bridge::start(config).map_err(|e| e.to_string())
    });
    match started {
        Ok(Ok(bridge)) => {
            // SAFETY: gaspard passes a valid state slot for this call.
            unsafe { *state = Box::into_raw(Box::new(bridge)).cast() };
            STATUS_OK
        }
        Ok(Err(error)) => fail(host, &error),
        Err(payload) => fail(host, &panic_message(payload.as_ref())),
    }
}

unsafe extern "C" fn handle(
    state: *mut c_void,
    request: *const u8,
    request_len: usize,
    host: *const Host,
) -> i32 {
    // SAFETY: `state` is the Bridge `init` stored; gaspard calls one handler
    // function at a time per worker.
    let bridge = unsafe { &mut *state.cast::<Bridge>() };
    // SAFETY: gaspard passes a request valid for this call.
    let request = unsafe { bytes(request, request_len) };
    let called = panic::catch_unwind(AssertUnwindSafe(|| {
        bridge.call(request, |len| {
            // SAFETY: the host is valid for this call.
            let host = unsafe { &*host };
            // SAFETY: the host returns `len` writable bytes or NULL.
            let buffer = unsafe { (host.reply_buffer)(host.ctx, len) };
            // SAFETY: a non-NULL buffer holds `len` bytes, all ours until the
            // call returns; nothing asks for another one meanwhile.
            (!buffer.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(buffer, len) })
        })
    }));
    match called {
        Ok(Ok(())) => STATUS_OK,
        Ok(Err(error)) => fail(host, &error.to_string()),
        Err(payload) => fail(host, &panic_message(payload.as_ref())),
    }
}

unsafe extern "C" fn shutdown(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    // SAFETY: `state` came from Box::into_raw in `init`, released once.
    let bridge = unsafe { Box::from_raw(state.cast::<Bridge>()) };
    let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(bridge)));
}

/// # Safety
/// `ptr` must point to `len` readable bytes valid for the call (or `len` be 0).
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Reports `message` through the host and returns the failure status.
fn fail(host: *const Host, message: &str) -> i32 {
    // SAFETY: gaspard passes a host valid for the current call.
    let host = unsafe { &*host };
    // SAFETY: the host copies the message before returning.
    unsafe { (host.set_error)(host.ctx, message.as_ptr(), message.len()) };
    STATUS_ERROR
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("the Python bridge panicked: {text}")
}

/// Logs as the worker does: gaspard's filter (handed to workers in
/// `GASPARD_WORKER_LOG`), its format, and syslog priorities for journald.
/// The plugin has its own copy of the `log` crate, hence its own logger.
fn init_logging() {
    use std::io::IsTerminal;
    let filter = std::env::var("GASPARD_WORKER_LOG").unwrap_or_else(|_| "info".to_string());
    let style = if std::io::stderr().is_terminal() {
        env_logger::WriteStyle::Auto
    } else {
        env_logger::WriteStyle::Never
    };
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(&filter)
        .write_style(style)
        .format_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| {
            use std::io::Write;
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        });
    }
    // A second init in one process keeps the first logger.
    let _ = builder.try_init();
}
