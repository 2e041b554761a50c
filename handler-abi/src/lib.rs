//! The versioned C ABI between gaspard and its handler plugins.
//!
//! A handler is a shared library that exports one function,
//! [`ENTRY_SYMBOL`] (`gaspar_handler_entry`), returning a pointer to a static
//! [`HandlerV1`] table. gaspard reads `abi_version` first and refuses any
//! table whose version it does not speak, so the rest of the layout may change
//! in later versions without old hosts misreading new handlers.
//!
//! Memory never crosses the boundary to be freed by the other side's
//! allocator: the reply is written into a buffer the host hands out through
//! [`Host::reply_buffer`], and error text is copied by [`Host::set_error`].
//!
//! The same ABI is described for C in `include/gaspar.h`; `docs/handler-abi.md`
//! is the full contract.
//!
//! # Writing a handler in Rust
//!
//! A stateless handler is a function from the request bytes to a reply:
//!
//! ```
//! fn echo(request: &[u8]) -> Result<&[u8], std::convert::Infallible> {
//!     Ok(request)
//! }
//! gaspard_handler_abi::export_handler!(echo);
//! ```
//!
//! A handler with per-worker state implements [`Handler`]; `init` runs once in
//! each worker with the `--handler-config` string:
//!
//! ```
//! use gaspard_handler_abi::Handler;
//!
//! struct Prefix(Vec<u8>);
//!
//! impl Handler for Prefix {
//!     type Error = String;
//!     fn init(config: &str) -> Result<Self, String> {
//!         Ok(Prefix(config.as_bytes().to_vec()))
//!     }
//!     fn handle(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok([self.0.as_slice(), request].concat())
//!     }
//! }
//! gaspard_handler_abi::export_handler!(state = Prefix);
//! ```
//!
//! Build the crate as a `cdylib`. Errors and panics never unwind into gaspard:
//! both become an error result, which the client sees as a connection reset
//! and the log records with its message.

use std::ffi::{c_char, c_void};
use std::fmt::Display;
use std::panic::{self, AssertUnwindSafe};

/// The ABI version this crate speaks. Bumped on any incompatible change.
pub const ABI_VERSION: u32 = 1;

/// The symbol every handler exports, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"gaspar_handler_entry\0";

/// Return codes of [`HandlerV1::init`] and [`HandlerV1::handle`].
pub const STATUS_OK: i32 = 0;
/// The handler reports a failure (its message, if any, was given to `set_error`).
pub const STATUS_ERROR: i32 = 1;

/// Services the host offers a handler during one call. Valid only for the
/// duration of that call.
#[repr(C)]
pub struct Host {
    /// Opaque host state, passed back to the functions below.
    pub ctx: *mut c_void,
    /// Returns a buffer of exactly `len` bytes that becomes the reply, replacing
    /// any buffer handed out earlier in this call; NULL if it cannot be had
    /// (too large, or outside `handle`). Owned by the host.
    pub reply_buffer: unsafe extern "C" fn(ctx: *mut c_void, len: usize) -> *mut u8,
    /// Records a human-readable error message (UTF-8, not NUL-terminated);
    /// the host copies it. Meaningful when the call returns non-zero.
    pub set_error: unsafe extern "C" fn(ctx: *mut c_void, msg: *const u8, len: usize),
}

/// Initialises per-worker state from the configuration string.
pub type InitFn = unsafe extern "C" fn(
    config: *const u8,
    config_len: usize,
    state: *mut *mut c_void,
    host: *const Host,
) -> i32;

/// Handles one request; the reply goes into a buffer from `host.reply_buffer`.
/// No buffer requested means an empty reply.
pub type HandleFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const u8,
    request_len: usize,
    host: *const Host,
) -> i32;

/// Releases per-worker state when the worker stops gracefully.
pub type ShutdownFn = unsafe extern "C" fn(state: *mut c_void);

/// The table a handler's entry function returns (ABI version 1).
#[repr(C)]
pub struct HandlerV1 {
    /// Must be the first field in every version: [`ABI_VERSION`] when built.
    pub abi_version: u32,
    /// NUL-terminated handler name, for logs. May be NULL.
    pub name: *const c_char,
    /// May be absent: the state pointer is then NULL.
    pub init: Option<InitFn>,
    /// Required; a table without it is refused.
    pub handle: Option<HandleFn>,
    /// May be absent.
    pub shutdown: Option<ShutdownFn>,
}

// SAFETY: the table is immutable static data (function pointers and a pointer
// to a static string), so sharing it between threads is sound.
unsafe impl Sync for HandlerV1 {}

/// The signature of the exported entry function.
pub type EntryFn = unsafe extern "C" fn() -> *const HandlerV1;

/// A handler with per-worker state, exported with `export_handler!(state = T)`.
pub trait Handler: Sized + 'static {
    type Error: Display;
    /// Builds the state once per worker from `--handler-config`.
    fn init(config: &str) -> Result<Self, Self::Error>;
    /// Handles one request.
    fn handle(&mut self, request: &[u8]) -> Result<Vec<u8>, Self::Error>;
}

/// Exports a Rust handler through the C ABI. See the crate documentation.
///
/// `export_handler!(f)` exports a stateless `fn(&[u8]) -> Result<R, E>` where
/// `R: AsRef<[u8]>` and `E: Display`; `export_handler!(state = T)` exports a
/// type implementing [`Handler`].
///
/// Giving the type without `state =` is refused, with a message that says so:
///
/// ```compile_fail,E0277
/// # use gaspard_handler_abi::Handler;
/// struct Counter { seen: u64 }
/// impl Handler for Counter {
///     type Error = String;
///     fn init(_config: &str) -> Result<Self, String> { Ok(Counter { seen: 0 }) }
///     fn handle(&mut self, _request: &[u8]) -> Result<Vec<u8>, String> {
///         self.seen += 1;
///         Ok(self.seen.to_string().into_bytes())
///     }
/// }
/// gaspard_handler_abi::export_handler!(Counter); // needs `state = Counter`
/// ```
#[macro_export]
macro_rules! export_handler {
    (state = $state:ty) => {
        #[no_mangle]
        pub extern "C" fn gaspar_handler_entry() -> *const $crate::HandlerV1 {
            unsafe extern "C" fn init(
                config: *const u8,
                config_len: usize,
                state: *mut *mut ::std::ffi::c_void,
                host: *const $crate::Host,
            ) -> i32 {
                // SAFETY: gaspard passes a valid config buffer, state slot and host.
                unsafe { $crate::__private::init::<$state>(config, config_len, state, host) }
            }
            unsafe extern "C" fn handle(
                state: *mut ::std::ffi::c_void,
                request: *const u8,
                request_len: usize,
                host: *const $crate::Host,
            ) -> i32 {
                // SAFETY: gaspard passes the state `init` made, a valid request and host.
                unsafe { $crate::__private::handle::<$state>(state, request, request_len, host) }
            }
            unsafe extern "C" fn shutdown(state: *mut ::std::ffi::c_void) {
                // SAFETY: gaspard passes the state `init` made, exactly once.
                unsafe { $crate::__private::shutdown::<$state>(state) }
            }
            static ENTRY: $crate::HandlerV1 = $crate::HandlerV1 {
                abi_version: $crate::ABI_VERSION,
                name: concat!(env!("CARGO_PKG_NAME"), "\0").as_ptr().cast(),
                init: Some(init),
                handle: Some(handle),
                shutdown: Some(shutdown),
            };
            &ENTRY
        }
    };
    ($handle:path) => {
        // `export_handler!(Type)` instead of `state = Type` must say so:
        // when the path names a type, the explicit import shadows the glob's
        // stand-in in the type namespace and the bound fails with a message
        // naming `state =`. (A braced struct has no value: the glob's
        // stand-in function fills the value namespace below, so that the
        // message comes alone.)
        const _: () = {
            #[allow(unused_imports)]
            use $crate::__private::not_a_type::*;
            #[allow(unused_imports)]
            use $handle as __gaspar_handler;
            $crate::__private::assert_not_a_type::<__gaspar_handler>()
        };
        #[no_mangle]
        pub extern "C" fn gaspar_handler_entry() -> *const $crate::HandlerV1 {
            unsafe extern "C" fn handle(
                _state: *mut ::std::ffi::c_void,
                request: *const u8,
                request_len: usize,
                host: *const $crate::Host,
            ) -> i32 {
                #[allow(unused_imports)]
                use $crate::__private::not_a_type::*;
                #[allow(unused_imports)]
                use $handle as __gaspar_handler;
                // SAFETY: gaspard passes a request buffer valid for this call.
                let request = unsafe { $crate::__private::request(request, request_len) };
                let outcome = ::std::panic::catch_unwind(|| __gaspar_handler(request));
                // SAFETY: gaspard passes a host valid for this call.
                unsafe { $crate::__private::finish(outcome, host) }
            }
            static ENTRY: $crate::HandlerV1 = $crate::HandlerV1 {
                abi_version: $crate::ABI_VERSION,
                name: concat!(env!("CARGO_PKG_NAME"), "\0").as_ptr().cast(),
                init: None,
                handle: Some(handle),
                shutdown: None,
            };
            &ENTRY
        }
    };
}

/// Support code for [`export_handler!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Stand-ins that `export_handler!(path)` glob-imports under the name it
    /// also imports `path` as: whichever namespace `path` leaves empty is
    /// filled by these.
    pub mod not_a_type {
        /// In the type namespace: what a function path leaves there.
        #[allow(non_camel_case_types)]
        pub struct __gaspar_handler {}

        /// In the value namespace: what a braced struct leaves there. Never
        /// called (such a crate does not compile).
        pub fn __gaspar_handler(_request: &[u8]) -> Result<&[u8], std::convert::Infallible> {
            unreachable!("export_handler! was given a type")
        }
    }

    /// Implemented only by the stand-in: `export_handler!(f)` was given a
    /// function, not a type.
    #[diagnostic::on_unimplemented(
        message = "export_handler!({Self}) is given a type: a type implementing Handler is exported with `export_handler!(state = {Self})`",
        label = "a type, where export_handler!(f) takes a function",
        note = "`export_handler!(f)` exports a function `fn(&[u8]) -> Result<R, E>`; `export_handler!(state = {Self})` exports a type implementing `gaspard_handler_abi::Handler`"
    )]
    pub trait NotAType {}

    impl NotAType for not_a_type::__gaspar_handler {}

    /// Compiles only when `T` is the stand-in, i.e. the macro's path is not a type.
    pub const fn assert_not_a_type<T: NotAType + ?Sized>() {}

    /// # Safety
    /// `ptr` must point to `len` readable bytes that outlive the returned slice
    /// (or `len` must be 0).
    pub unsafe fn request<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
        if len == 0 || ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    }

    /// Reports `msg` through the host.
    ///
    /// # Safety
    /// `host` must be valid for the current call.
    pub unsafe fn set_error(host: *const Host, msg: &str) {
        // SAFETY: guaranteed by the caller.
        let host = unsafe { &*host };
        // SAFETY: the host's function copies `msg` before returning.
        unsafe { (host.set_error)(host.ctx, msg.as_ptr(), msg.len()) }
    }

    fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        let text = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        format!("handler panicked: {text}")
    }

    /// Turns a handler's outcome into a status code and a reply or error.
    ///
    /// # Safety
    /// `host` must be valid for the current call.
    pub unsafe fn finish<R: AsRef<[u8]>, E: Display>(
        outcome: std::thread::Result<Result<R, E>>,
        host: *const Host,
    ) -> i32 {
        // Formatting a hostile error or dropping a reply may panic too.
        let written = panic::catch_unwind(AssertUnwindSafe(|| match outcome {
            Ok(Ok(reply)) => {
                let reply = reply.as_ref();
                if reply.is_empty() {
                    return Ok(());
                }
                // SAFETY: guaranteed by the caller.
                let host = unsafe { &*host };
                // SAFETY: the host returns a buffer of `reply.len()` bytes or NULL.
                let buffer = unsafe { (host.reply_buffer)(host.ctx, reply.len()) };
                if buffer.is_null() {
                    return Err(format!("no reply buffer of {} bytes", reply.len()));
                }
                // SAFETY: `buffer` holds `reply.len()` writable bytes that do
                // not overlap the handler's own reply.
                unsafe { std::ptr::copy_nonoverlapping(reply.as_ptr(), buffer, reply.len()) };
                Ok(())
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(payload) => Err(panic_message(payload.as_ref())),
        }));
        let error = match written {
            Ok(Ok(())) => return STATUS_OK,
            Ok(Err(error)) => error,
            Err(payload) => panic_message(payload.as_ref()),
        };
        // SAFETY: guaranteed by the caller.
        unsafe { set_error(host, &error) };
        STATUS_ERROR
    }

    /// # Safety
    /// Arguments as in [`InitFn`].
    pub unsafe fn init<T: Handler>(
        config: *const u8,
        config_len: usize,
        state: *mut *mut c_void,
        host: *const Host,
    ) -> i32 {
        // SAFETY: the config buffer is valid for this call.
        let config = unsafe { request(config, config_len) };
        let built = panic::catch_unwind(|| {
            let config = std::str::from_utf8(config)
                .map_err(|e| format!("handler config is not UTF-8: {e}"))?;
            T::init(config).map_err(|e| e.to_string())
        });
        let error = match built {
            Ok(Ok(value)) => {
                // SAFETY: `state` is a valid slot for this call.
                unsafe { *state = Box::into_raw(Box::new(value)).cast() };
                return STATUS_OK;
            }
            Ok(Err(error)) => error,
            Err(payload) => panic_message(payload.as_ref()),
        };
        // SAFETY: guaranteed by the caller.
        unsafe { set_error(host, &error) };
        STATUS_ERROR
    }

    /// # Safety
    /// Arguments as in [`HandleFn`], with `state` made by [`init`] for `T`.
    pub unsafe fn handle<T: Handler>(
        state: *mut c_void,
        req: *const u8,
        req_len: usize,
        host: *const Host,
    ) -> i32 {
        // SAFETY: `state` came from `Box::into_raw` in `init::<T>` and each
        // worker calls the handler from one thread at a time.
        let value = unsafe { &mut *state.cast::<T>() };
        // SAFETY: the request buffer is valid for this call.
        let req = unsafe { request(req, req_len) };
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| value.handle(req)));
        // SAFETY: guaranteed by the caller.
        unsafe { finish(outcome, host) }
    }

    /// # Safety
    /// `state` must have been made by [`init`] for `T` and not used again.
    pub unsafe fn shutdown<T: Handler>(state: *mut c_void) {
        if state.is_null() {
            return;
        }
        // SAFETY: guaranteed by the caller.
        let value = unsafe { Box::from_raw(state.cast::<T>()) };
        // A panicking Drop must not unwind into the host.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(value)));
    }
}
