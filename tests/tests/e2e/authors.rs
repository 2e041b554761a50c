//! A handler author outside the tree: `gaspard new-handler` writes a Rust
//! crate or a C file that builds as written, passes `--check` and serves;
//! the usual mistakes (no cdylib, `export_handler!(Type)`, a hidden entry
//! symbol) are refused with messages that say what to do.

use gaspard_tests::{compile_c_library, launch, run_gaspard};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The checkout's `handler-abi/`, absolute.
fn abi_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../handler-abi")
        .canonicalize()
        .expect("handler-abi/ exists")
}

/// `gaspard new-handler ARGS...`; fails the test unless it succeeds.
fn new_handler(args: &[&std::ffi::OsStr]) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["new-handler".as_ref()];
    all.extend_from_slice(args);
    let (status, stdout, stderr) = run_gaspard(&all);
    assert!(
        status.is_some_and(|s| s.success()),
        "new-handler {args:?}: {status:?}\n{stdout}\n{stderr}"
    );
}

/// Copies the ABI crate's files out of the tree into `dir`, as an author
/// might vendor it; returns the copy.
fn copy_abi(dir: &Path) -> PathBuf {
    let copy = dir.join("vendored/handler-abi");
    for file in ["Cargo.toml", "gaspar.pc", "src/lib.rs", "include/gaspar.h"] {
        let to = copy.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(abi_dir().join(file), &to).unwrap();
    }
    copy
}

/// Writes a Rust handler crate NAME in `dir` depending on the ABI crate at `abi`.
fn new_rust_handler(dir: &Path, name: &str, abi: &Path) -> PathBuf {
    let crate_dir = dir.join(name);
    new_handler(&[
        name.as_ref(),
        "--lang".as_ref(),
        "rust".as_ref(),
        "--abi".as_ref(),
        abi.as_os_str(),
        "--dir".as_ref(),
        crate_dir.as_os_str(),
    ]);
    crate_dir
}

/// `cargo build --release --offline` in `crate_dir`, with a target
/// directory in `dir` that every crate of the test shares.
fn cargo_build(dir: &Path, crate_dir: &Path) -> Output {
    Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .args(["build", "--release", "--offline"])
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo")
}

/// `gaspard --check --handler PATH`: (success, stdout, stderr).
fn check(path: &Path) -> (bool, String, String) {
    let (status, stdout, stderr) =
        run_gaspard(&["--check".as_ref(), "--handler".as_ref(), path.as_os_str()]);
    (status.is_some_and(|s| s.success()), stdout, stderr)
}

/// Checks the handler, then serves one request with it.
fn check_and_serve(library: &Path, name: &str) {
    let (ok, stdout, stderr) = check(library);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("ok: {name:?}")), "{stdout}");
    let daemon = launch(
        library,
        &["--workers", "1", "--handler-config", "hello, "],
        &[],
    )
    .unwrap_or_else(|(status, log)| panic!("not served ({status:?}):\n{:?}", log.lines()));
    assert_eq!(daemon.request(b"world").unwrap(), b"hello, world");
}

#[test]
fn a_rust_handler_from_new_handler_builds_checks_and_serves_and_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let crate_dir = new_rust_handler(dir.path(), "myrust", &abi_dir());
    let built = cargo_build(dir.path(), &crate_dir);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let release = dir.path().join("target/release");
    check_and_serve(&release.join("libmyrust.so"), "myrust");

    // Written again into the same place: refused, nothing touched.
    let before = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
    let (status, _, stderr) = run_gaspard(&[
        "new-handler".as_ref(),
        "myrust".as_ref(),
        "--dir".as_ref(),
        crate_dir.as_os_str(),
    ]);
    assert_eq!(status.unwrap().code(), Some(1), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap(),
        before
    );

    // The crate-type line forgotten: cargo builds only an .rlib, and both
    // the missing .so and the .rlib itself are refused naming cdylib. (This
    // crate uses a copy of handler-abi/ taken out of the tree: it builds on
    // its own, without the workspace.)
    let rlib_dir = new_rust_handler(dir.path(), "norlib", &copy_abi(dir.path()));
    let manifest = rlib_dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("crate-type = [\"cdylib\"]", "crate-type = [\"rlib\"]"),
    )
    .unwrap();
    let built = cargo_build(dir.path(), &rlib_dir);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    for library in ["libnorlib.so", "libnorlib.rlib"] {
        let (ok, _, stderr) = check(&release.join(library));
        assert!(!ok, "{library}: {stderr}");
        assert!(
            stderr.contains("build it as a cdylib: crate-type = [\"cdylib\"] in Cargo.toml"),
            "{library}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        let message = stderr
            .split_once(": ")
            .and_then(|(_, rest)| rest.split_once(": "))
            .map(|(_, message)| message)
            .unwrap();
        assert!(
            crate::check::documented_refusals()
                .iter()
                .any(|pattern| crate::check::matches(pattern, message)),
            "{message:?} is not in handler-abi.md's table"
        );
    }

    // export_handler!(Type) instead of `state = Type`: a compile error that
    // says to write `state =`.
    let lib_rs = rlib_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib_rs).unwrap();
    assert!(
        source.contains("export_handler!(state = State);"),
        "{source}"
    );
    std::fs::write(
        &lib_rs,
        source.replace("export_handler!(state = State);", "export_handler!(State);"),
    )
    .unwrap();
    let built = cargo_build(dir.path(), &rlib_dir);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(!built.status.success(), "{stderr}");
    assert!(
        stderr.contains("export_handler!(State) is given a type")
            && stderr.contains("`export_handler!(state = State)`"),
        "{stderr}"
    );
}

#[test]
fn a_c_handler_from_new_handler_builds_with_the_include_path_or_pkg_config() {
    let dir = tempfile::tempdir().unwrap();
    let c_dir = dir.path().join("cmine");
    new_handler(&[
        "cmine".as_ref(),
        "--lang".as_ref(),
        "c".as_ref(),
        "--abi".as_ref(),
        abi_dir().as_os_str(),
        "--dir".as_ref(),
        c_dir.as_os_str(),
    ]);
    let source = c_dir.join("cmine.c");
    assert!(c_dir.join("Makefile").is_file());
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let compile = |library: &Path, flags: &[String]| {
        let status = Command::new(&cc)
            .args(flags)
            .args([
                "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
            ])
            .arg(library)
            .arg(&source)
            .status()
            .expect("run the C compiler");
        assert!(status.success(), "compiling {} failed", library.display());
    };

    // As the file's comment says, with the checkout's include directory;
    // -fvisibility=hidden too, which gaspar.h's GASPAR_EXPORT survives.
    let include = format!("-I{}", abi_dir().join("include").display());
    let library = c_dir.join("libcmine.so");
    compile(&library, &[include.clone(), "-fvisibility=hidden".into()]);
    check_and_serve(&library, "cmine");

    // Through pkg-config, with a gaspar.pc that points at the checkout.
    let pc = std::fs::read_to_string(abi_dir().join("gaspar.pc")).unwrap();
    let manifest = std::fs::read_to_string(abi_dir().join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|line| line.strip_prefix("version = "))
        .expect("handler-abi/Cargo.toml has its own version")
        .trim_matches('"');
    assert!(
        pc.lines().any(|line| line == format!("Version: {version}")),
        "gaspar.pc's Version is the ABI crate's {version}:\n{pc}"
    );
    let pkg_config = Command::new("pkg-config").arg("--version").output();
    if !pkg_config.is_ok_and(|out| out.status.success()) {
        eprintln!("pkg-config is not installed: skipping the pkg-config build");
        return;
    }
    let pc_dir = dir.path().join("pkgconfig");
    std::fs::create_dir(&pc_dir).unwrap();
    let checkout_pc: String = pc
        .lines()
        .map(|line| {
            if line.starts_with("includedir=") {
                format!("includedir={}\n", abi_dir().join("include").display())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    std::fs::write(pc_dir.join("gaspar.pc"), checkout_pc).unwrap();
    let out = Command::new("pkg-config")
        .args(["--cflags", "gaspar"])
        .env("PKG_CONFIG_PATH", &pc_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let cflags: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(cflags, [include]);
    let library = c_dir.join("libcmine_pc.so");
    compile(&library, &cflags);
    check_and_serve(&library, "cmine");
}

/// An entry function hidden on purpose, without gaspar.h.
const HIDDEN_ENTRY: &str = r#"
__attribute__((visibility("hidden"))) const void *gaspar_handler_entry(void) { return 0; }
"#;

#[test]
fn a_hidden_entry_symbol_is_refused_naming_export_handler_and_gaspar_export() {
    let dir = tempfile::tempdir().unwrap();
    let library = compile_c_library(dir.path(), "hidden", HIDDEN_ENTRY);
    let (ok, _, stderr) = check(&library);
    assert!(!ok);
    assert!(
        stderr.contains("does not export gaspar_handler_entry"),
        "{stderr}"
    );
    assert!(stderr.contains("export_handler!("), "{stderr}");
    assert!(stderr.contains("-fvisibility=hidden"), "{stderr}");
    assert!(stderr.contains("GASPAR_EXPORT"), "{stderr}");
}
