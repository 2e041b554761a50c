//! Records the interpreter the plugin is built against (`PYO3_PYTHON`,
//! pinned in `.cargo/config.toml`): a worker hands its path to CPython as
//! `sys.executable` unless a virtual environment names another, so that the
//! standard library is found next to the libpython it links, never next to
//! whichever `python3` comes first on PATH.

fn main() {
    let config = pyo3_build_config::get();
    let executable = config.executable().unwrap_or_default();
    println!("cargo:rustc-env=GASPAR_PYTHON_EXECUTABLE={executable}");
    println!(
        "cargo:rustc-env=GASPAR_PYTHON_VERSION={}.{}",
        config.version().major,
        config.version().minor
    );
}
