//! The Python side of a worker: the user's module imported, its hooks, and
//! one call of its function per request.

use crate::interpreter::{self, StartError};
use crate::target::{Target, TargetError};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyModuleNotFoundError, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use std::ffi::CString;
use std::time::{Duration, Instant};

/// The module-level function called once per worker before it serves, with
/// the rest of the handler config.
pub const INIT_HOOK: &str = "gaspard_init";
/// The module-level function called once when a worker stops gracefully.
pub const SHUTDOWN_HOOK: &str = "gaspard_shutdown";

/// An exception's message is cut to this many characters in its one line.
const MESSAGE_LIMIT: usize = 500;
/// A traceback in the log shows at most this many frames per exception...
const TRACEBACK_FRAMES: usize = 16;
/// ... and at most this many characters.
const TRACEBACK_LIMIT: usize = 8 * 1024;
/// A worker logs at most one request's traceback in this time; the others
/// still fail with their one line in the daemon's log.
const TRACEBACK_INTERVAL: Duration = Duration::from_secs(1);

const HELPERS: &str = include_str!("helpers.py");

/// The target of this plugin's log records: under gaspard's, so that a
/// filter such as `RUST_LOG=gaspard=debug`, which workers inherit, covers
/// them too.
const LOG_TARGET: &str = "gaspard::python";

/// Why a worker's Python handler could not be made ready. Each message is
/// one line: the daemon and `gaspard --check` print it as the init failure.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Target(#[from] TargetError),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("the bridge's own Python code failed: {0}")]
    Helpers(String),
    #[error("cannot import {module}: {description}{hint}")]
    Import {
        module: String,
        description: String,
        hint: &'static str,
    },
    #[error("module {module} ({file}) defines no {name}")]
    NoFunction {
        module: String,
        file: String,
        name: String,
    },
    #[error("{target} is {kind}, not a function")]
    NotCallable { target: String, kind: String },
    #[error("{module}.{INIT_HOOK} raised {description}")]
    InitHook { module: String, description: String },
    #[error(
        "the handler config has {rest:?} after {target}, but {module} defines no {INIT_HOOK}(config) to take it"
    )]
    UnusedConfig {
        target: String,
        module: String,
        rest: String,
    },
}

/// Why one request failed: the handler's message to gaspard's log.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{target} raised {description}")]
    Raised { target: String, description: String },
    #[error("{target} returned None: return bytes (or bytearray, memoryview, str)")]
    ReturnedNone { target: String },
    #[error("{target} returned {kind}: return bytes (or bytearray, memoryview, str)")]
    NotBytes { target: String, kind: String },
    #[error("{target} returned a str that is not valid UTF-8: {description}")]
    NotUtf8 { target: String, description: String },
    #[error("no reply buffer of {0} bytes")]
    NoBuffer(usize),
}

/// One worker's handler: the function, its shutdown hook, the helpers that
/// describe exceptions.
pub struct Bridge {
    target: String,
    module: String,
    function: Py<PyAny>,
    shutdown: Option<Py<PyAny>>,
    helpers: Py<PyModule>,
    tracebacks: Tracebacks,
}

impl Bridge {
    /// Starts the interpreter and makes the function of `config` ready.
    pub fn start(config: &str) -> Result<Bridge, InitError> {
        let target = Target::parse(config)?;
        interpreter::make_libpython_global()?;
        interpreter::start(interpreter::virtual_env().as_deref())?;
        Python::attach(|py| Bridge::ready(py, &target))
    }

    fn ready(py: Python<'_>, target: &Target) -> Result<Bridge, InitError> {
        let helpers = load_helpers(py).map_err(|e| InitError::Helpers(e.to_string()))?;
        let describe = |error: &PyErr| describe(py, &helpers, error);
        let module = py.import(target.module.as_str()).map_err(|error| {
            log_traceback(py, &helpers, &error, log::Level::Debug);
            let missing_itself = error.is_instance_of::<PyModuleNotFoundError>(py)
                && error
                    .value(py)
                    .getattr("name")
                    .and_then(|name| name.extract::<String>())
                    .is_ok_and(|name| {
                        target.module == name || target.module.starts_with(&format!("{name}."))
                    });
            InitError::Import {
                module: target.module.clone(),
                description: describe(&error),
                hint: if missing_itself {
                    " (is its directory on PYTHONPATH, or is it installed in the virtual environment VIRTUAL_ENV names?)"
                } else {
                    ""
                },
            }
        })?;
        let file = module
            .getattr("__file__")
            .and_then(|file| file.extract::<String>())
            .unwrap_or_else(|_| "built in".to_string());
        let mut function = module.clone().into_any();
        for name in &target.function {
            function = function
                .getattr(name.as_str())
                .map_err(|_| InitError::NoFunction {
                    module: target.module.clone(),
                    file: file.clone(),
                    name: target.function.join("."),
                })?;
        }
        if !function.is_callable() {
            return Err(InitError::NotCallable {
                target: target.name(),
                kind: type_name(&function),
            });
        }
        let hook = |name: &str| module.getattr(name).ok().filter(|hook| hook.is_callable());
        match hook(INIT_HOOK) {
            Some(init) => {
                init.call1((target.rest.as_str(),)).map_err(|error| {
                    log_traceback(py, &helpers, &error, log::Level::Debug);
                    InitError::InitHook {
                        module: target.module.clone(),
                        description: describe(&error),
                    }
                })?;
            }
            None if !target.rest.is_empty() => {
                return Err(InitError::UnusedConfig {
                    target: target.name(),
                    module: target.module.clone(),
                    rest: target.rest.clone(),
                })
            }
            None => {}
        }
        let shutdown = hook(SHUTDOWN_HOOK).map(Bound::unbind);
        flush(&helpers);
        Ok(Bridge {
            target: target.name(),
            module: target.module.clone(),
            function: function.unbind(),
            shutdown,
            helpers: helpers.unbind(),
            tracebacks: Tracebacks::default(),
        })
    }

    /// Calls the function on `request`; its reply goes into the buffer that
    /// `buffer` gives for its length. A `SystemExit` ends the process.
    pub fn call<'a>(
        &mut self,
        request: &[u8],
        buffer: impl FnOnce(usize) -> Option<&'a mut [u8]>,
    ) -> Result<(), CallError> {
        Python::attach(|py| {
            let argument = PyBytes::new(py, request);
            match self.function.bind(py).call1((argument,)) {
                Ok(reply) => self.write_reply(py, &reply, buffer),
                Err(error) => Err(self.raised(py, error)),
            }
        })
    }

    fn write_reply<'a>(
        &self,
        py: Python<'_>,
        reply: &Bound<'_, PyAny>,
        buffer: impl FnOnce(usize) -> Option<&'a mut [u8]>,
    ) -> Result<(), CallError> {
        let view;
        let bytes = if let Ok(bytes) = reply.cast::<PyBytes>() {
            Reply::Bytes(bytes.as_bytes())
        } else if let Ok(text) = reply.cast::<PyString>() {
            let text = text.to_str().map_err(|error| CallError::NotUtf8 {
                target: self.target.clone(),
                description: describe(py, self.helpers.bind(py), &error),
            })?;
            Reply::Bytes(text.as_bytes())
        } else if reply.is_none() {
            return Err(CallError::ReturnedNone {
                target: self.target.clone(),
            });
        } else {
            // bytearray, memoryview, array.array('B'), a NumPy uint8 array:
            // anything that exposes unsigned bytes through the buffer protocol.
            view = PyBuffer::<u8>::get(reply).map_err(|_| CallError::NotBytes {
                target: self.target.clone(),
                kind: type_name(reply),
            })?;
            Reply::View(&view)
        };
        let len = match bytes {
            Reply::Bytes(bytes) => bytes.len(),
            Reply::View(view) => view.item_count(),
        };
        if len == 0 {
            return Ok(());
        }
        let target = buffer(len).ok_or(CallError::NoBuffer(len))?;
        match bytes {
            Reply::Bytes(bytes) => {
                target.copy_from_slice(bytes);
                Ok(())
            }
            Reply::View(view) => {
                view.copy_to_slice(py, target)
                    .map_err(|error| CallError::Raised {
                        target: self.target.clone(),
                        description: describe(py, self.helpers.bind(py), &error),
                    })
            }
        }
    }

    /// The failure an exception makes, its traceback logged; a
    /// `SystemExit` instead ends the worker with its status.
    fn raised(&mut self, py: Python<'_>, error: PyErr) -> CallError {
        let helpers = self.helpers.bind(py);
        let description = describe(py, helpers, &error);
        if error.is_instance_of::<PySystemExit>(py) {
            let status = helpers
                .call_method1("exit_status", (error.value(py),))
                .and_then(|status| status.extract::<i32>())
                .unwrap_or(1);
            log::warn!(
                target: LOG_TARGET,
                "worker pid {}: {} raised {description}: the worker exits with status {status}",
                std::process::id(),
                self.target
            );
            flush(helpers);
            std::process::exit(status);
        }
        if let Some(held) = self.tracebacks.allow(Instant::now()) {
            let also = if held > 0 {
                format!(" ({held} tracebacks held back before it)")
            } else {
                String::new()
            };
            log::warn!(
                target: LOG_TARGET,
                "worker pid {}: {} raised {description}{also}",
                std::process::id(),
                self.target
            );
            log_traceback(py, helpers, &error, log::Level::Warn);
        }
        CallError::Raised {
            target: self.target.clone(),
            description,
        }
    }
}

impl Drop for Bridge {
    /// Calls the shutdown hook; its exceptions are logged.
    fn drop(&mut self) {
        Python::attach(|py| {
            let helpers = self.helpers.bind(py);
            if let Some(shutdown) = &self.shutdown {
                if let Err(error) = shutdown.bind(py).call0() {
                    log::warn!(
                        target: LOG_TARGET,
                        "worker pid {}: {}.{SHUTDOWN_HOOK} raised {}",
                        std::process::id(),
                        self.module,
                        describe(py, helpers, &error)
                    );
                    log_traceback(py, helpers, &error, log::Level::Warn);
                }
            }
            flush(helpers);
        });
    }
}

fn load_helpers(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let code = CString::new(HELPERS).expect("helpers.py has no NUL byte");
    PyModule::from_code(py, &code, c"<gaspard bridge>", c"_gaspard_bridge")
}

/// The exception object of `error`, with its traceback attached as
/// `__traceback__` (a PyErr keeps it apart).
fn exception<'py>(py: Python<'py>, error: &PyErr) -> Bound<'py, PyAny> {
    error.clone_ref(py).into_value(py).into_bound(py).into_any()
}

/// One line for `error` (see `describe` in helpers.py).
fn describe(py: Python<'_>, helpers: &Bound<'_, PyModule>, error: &PyErr) -> String {
    helpers
        .call_method1("describe", (exception(py, error), MESSAGE_LIMIT))
        .and_then(|line| line.extract::<String>())
        .unwrap_or_else(|_| error.to_string())
}

/// Logs `error`'s traceback, bounded, one log record per line.
fn log_traceback(py: Python<'_>, helpers: &Bound<'_, PyModule>, error: &PyErr, level: log::Level) {
    if !log::log_enabled!(target: LOG_TARGET, level) {
        return;
    }
    let lines = helpers
        .call_method1(
            "traceback_lines",
            (exception(py, error), TRACEBACK_FRAMES, TRACEBACK_LIMIT),
        )
        .and_then(|lines| lines.extract::<Vec<String>>())
        .unwrap_or_else(|_| vec![error.to_string()]);
    for line in lines {
        log::log!(target: LOG_TARGET, level, "  | {line}");
    }
}

/// Writes out what `print` buffered (see `flush` in helpers.py).
fn flush(helpers: &Bound<'_, PyModule>) {
    let _ = helpers.call_method0("flush");
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    let name = value
        .get_type()
        .qualname()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "an object".to_string());
    match name.chars().next() {
        Some(c) if "aeiouAEIOU".contains(c) => format!("an {name}"),
        _ => format!("a {name}"),
    }
}

/// Where a reply's bytes are: in a bytes or str object, or behind the
/// buffer protocol.
enum Reply<'r> {
    Bytes(&'r [u8]),
    View(&'r PyBuffer<u8>),
}

/// At most one request's traceback per [`TRACEBACK_INTERVAL`], counting the
/// ones held back.
#[derive(Default)]
struct Tracebacks {
    last: Option<Instant>,
    held: u64,
}

impl Tracebacks {
    /// `Some(count held back since the last one)` if this one is logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < TRACEBACK_INTERVAL)
        {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_traceback_a_second_and_the_count_of_the_rest() {
        let mut tracebacks = Tracebacks::default();
        let start = Instant::now();
        assert_eq!(tracebacks.allow(start), Some(0));
        assert_eq!(tracebacks.allow(start + Duration::from_millis(10)), None);
        assert_eq!(tracebacks.allow(start + Duration::from_millis(900)), None);
        assert_eq!(tracebacks.allow(start + Duration::from_secs(1)), Some(2));
        assert_eq!(tracebacks.allow(start + Duration::from_millis(1500)), None);
    }
}
