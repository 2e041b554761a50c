//! Compiles `echo.c` into a shared library with the system C compiler, then
//! copies it next to the Rust handlers (`target/<profile>/libecho_c.so`).
//! cargo's cdylib would hide the C symbols behind its version script, so the
//! library is linked by the C compiler itself.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    let source = manifest.join("echo.c");
    let include = manifest.join("../../handler-abi/include");
    let library = out_dir.join("libecho_c.so");

    let compiler = cc::Build::new().get_compiler();
    let status = Command::new(compiler.path())
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11",
        ])
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(&library)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", compiler.path()));
    assert!(status.success(), "compiling {} failed", source.display());

    // OUT_DIR is target/<profile>/build/<crate>-<hash>/out.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = std::fs::copy(&library, profile_dir.join("libecho_c.so"));
    }
    println!("cargo:rustc-env=GASPARD_C_ECHO_SO={}", library.display());
    println!("cargo:rerun-if-changed=echo.c");
    println!("cargo:rerun-if-changed=../../handler-abi/include/gaspar.h");
}
