//! Starting CPython inside a worker: libpython's symbols made global first,
//! then the interpreter configured for a process that is not `python`.

use pyo3::ffi;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};

/// The interpreter the plugin was built against (`PYO3_PYTHON`).
const BUILT_WITH: &str = env!("GASPAR_PYTHON_EXECUTABLE");
/// Its version, `MAJOR.MINOR`.
pub const PYTHON_VERSION: &str = env!("GASPAR_PYTHON_VERSION");

/// Why the interpreter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot find the libpython this plugin links to")]
    NoLibpython,
    #[error("cannot make {library}'s symbols global: {reason}")]
    Global { library: String, reason: String },
    #[error(
        "VIRTUAL_ENV={venv}: not a virtual environment ({python} is missing; make one with python{PYTHON_VERSION} -m venv)"
    )]
    NotAVenv { venv: PathBuf, python: PathBuf },
    #[error(
        "VIRTUAL_ENV={venv}: it was made with Python {found}, this plugin embeds {PYTHON_VERSION}"
    )]
    VenvVersion { venv: PathBuf, found: String },
    #[error("path {0:?} contains a NUL byte")]
    Nul(PathBuf),
    #[error("Python did not start: {0}")]
    Python(String),
}

/// Re-opens the libpython this plugin was loaded with, `RTLD_GLOBAL`.
///
/// gaspard opens handlers `RTLD_LOCAL`, and so the libpython they pull in:
/// its symbols then satisfy nothing loaded later, and the standard library's
/// C extension modules (`_decimal`, `_json`, `_ctypes`, `_ssl`), which expect
/// them from the process, fail with "undefined symbol: PyFloat_Type".
/// `RTLD_NOLOAD` promotes the copy already mapped; the library is found by
/// asking which file defines a libpython function, so no soname is assumed.
/// The handle is never closed.
pub fn make_libpython_global() -> Result<(), StartError> {
    let in_libpython = ffi::Py_IsInitialized as *const c_void;
    // SAFETY: Dl_info is plain data for which all zeroes is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address and fills `info`.
    let found = unsafe { libc::dladdr(in_libpython, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return Err(StartError::NoLibpython);
    }
    // SAFETY: dladdr's file name is a NUL-terminated string that stays valid
    // while the library is loaded, which it is for the life of the process.
    let library = unsafe { CStr::from_ptr(info.dli_fname) };
    let flags = libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD;
    // SAFETY: RTLD_NOLOAD only changes the flags of a library already
    // loaded (its initialisers have run); the handle is deliberately leaked.
    let handle = unsafe { libc::dlopen(library.as_ptr(), flags) };
    if handle.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated message valid
        // until the next dl* call on this thread.
        let reason = unsafe { libc::dlerror() };
        let reason = if reason.is_null() {
            "dlopen failed".to_string()
        } else {
            // SAFETY: as above.
            unsafe { CStr::from_ptr(reason) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(StartError::Global {
            library: library.to_string_lossy().into_owned(),
            reason,
        });
    }
    Ok(())
}

/// The `sys.executable` to give CPython: `$VIRTUAL_ENV/bin/python` when a
/// virtual environment is named, from which CPython finds the venv's
/// `pyvenv.cfg` and site-packages as `python` in the venv would; else the
/// interpreter the plugin was built against, if it is there.
fn executable(venv: Option<&Path>) -> Result<Option<PathBuf>, StartError> {
    let Some(venv) = venv else {
        let built = Path::new(BUILT_WITH);
        return Ok((!BUILT_WITH.is_empty() && built.is_file()).then(|| built.to_path_buf()));
    };
    let python = venv.join("bin/python");
    if !python.exists() {
        return Err(StartError::NotAVenv {
            venv: venv.to_path_buf(),
            python,
        });
    }
    let config = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    match made_by(&config) {
        Some(found) if !same_minor(found, PYTHON_VERSION) => Err(StartError::VenvVersion {
            venv: venv.to_path_buf(),
            found: found.to_string(),
        }),
        _ => Ok(Some(python)),
    }
}

/// The version of the Python that made a venv, from its pyvenv.cfg:
/// `version` (3.11), `version_info` (3.12 on). Another version's
/// site-packages would not load.
fn made_by(pyvenv_cfg: &str) -> Option<&str> {
    pyvenv_cfg.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        matches!(key.trim(), "version" | "version_info").then(|| value.trim())
    })
}

/// Whether `version` (3.11.2, 3.11.2.final.0) is a release of `minor` (3.11).
fn same_minor(version: &str, minor: &str) -> bool {
    version == minor
        || version
            .strip_prefix(minor)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The virtual environment named by `VIRTUAL_ENV` (what `activate` sets).
pub fn virtual_env() -> Option<PathBuf> {
    std::env::var_os("VIRTUAL_ENV")
        .filter(|venv| !venv.is_empty())
        .map(PathBuf::from)
}

/// Starts the interpreter, unless it runs already, and releases the GIL:
/// calls take it with `Python::attach`, and threads the handler starts run
/// while the worker waits for requests.
///
/// As `python` would be configured (`PYTHONPATH` and the other `PYTHON*`
/// variables are honoured, site-packages are on `sys.path`), except that
/// CPython installs no signal handlers (the worker's SIGTERM is gaspard's),
/// reads no command line, and writes no bytecode caches: a module edited
/// within a second of being imported, at the same size, would otherwise be
/// run from its stale `.pyc` by the workers a reload starts.
pub fn start(venv: Option<&Path>) -> Result<(), StartError> {
    // SAFETY: a query that is valid at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        return Ok(());
    }
    let executable = executable(venv)?
        .map(|path| {
            CString::new(path.as_os_str().as_encoded_bytes())
                .map_err(|_| StartError::Nul(path.clone()))
        })
        .transpose()?;
    let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
    // SAFETY: PyConfig_InitPythonConfig fills every field of the struct.
    unsafe { ffi::PyConfig_InitPythonConfig(config.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut config = unsafe { config.assume_init() };
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    config.write_bytecode = 0;
    let config_ptr: *mut ffi::PyConfig = &mut config;
    let mut status = None;
    if let Some(executable) = &executable {
        // SAFETY: the config is initialised; CPython copies the string into
        // its own memory, freed by PyConfig_Clear.
        let set = unsafe {
            ffi::PyConfig_SetBytesString(
                config_ptr,
                std::ptr::addr_of_mut!((*config_ptr).executable),
                executable.as_ptr(),
            )
        };
        // SAFETY: a PyStatus returned by CPython.
        if unsafe { ffi::PyStatus_Exception(set) } != 0 {
            status = Some(set);
        }
    }
    let status = status.unwrap_or_else(|| {
        // SAFETY: a fully initialised config; this is the process's only
        // interpreter start (checked above), on the thread that calls it.
        unsafe { ffi::Py_InitializeFromConfig(config_ptr) }
    });
    // SAFETY: releases the strings CPython allocated for the config.
    unsafe { ffi::PyConfig_Clear(config_ptr) };
    // SAFETY: a PyStatus returned by CPython.
    if unsafe { ffi::PyStatus_Exception(status) } == 0 {
        // SAFETY: the interpreter has just started, with this thread holding
        // the GIL; its thread state stays this thread's, for PyGILState_Ensure.
        unsafe { ffi::PyEval_SaveThread() };
        return Ok(());
    }
    let message = if status.err_msg.is_null() {
        format!("exit status {}", status.exitcode)
    } else {
        // SAFETY: err_msg is a static NUL-terminated string in CPython.
        unsafe { CStr::from_ptr(status.err_msg) }
            .to_string_lossy()
            .into_owned()
    };
    Err(StartError::Python(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_made_by_another_python_version_is_told_apart() {
        let debian = "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\n";
        assert_eq!(made_by(debian), Some("3.11.2"));
        let newer = "home = /usr/bin\nversion_info = 3.12.1.final.0\n";
        assert_eq!(made_by(newer), Some("3.12.1.final.0"));
        assert_eq!(made_by("home = /usr/bin\n"), None);
        assert!(same_minor("3.11.2", "3.11"));
        assert!(same_minor("3.11", "3.11"));
        assert!(!same_minor("3.1.2", "3.11"));
        assert!(!same_minor("3.12.1.final.0", "3.11"));
        assert!(!same_minor("3.110", "3.11"));
    }
}
