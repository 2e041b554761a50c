//! Builds libzmq with CURVE when `.cargo/config.toml` has taken zmq-sys's
//! link over (its `built-by` entry names this crate); otherwise zmq-sys has
//! linked its own libzmq, without CURVE, and this does nothing.

use std::env;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(curve_built_here)");
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("DEP_ZMQ_BUILT_BY").as_deref() != Ok("libzmq-curve") {
        println!(
            "cargo:warning=zmq-sys links its own libzmq: gaspard's zmq links will have no CURVE"
        );
        return;
    }
    let (Ok(lib), Ok(include)) = (env::var("DEP_SODIUM_LIB"), env::var("DEP_SODIUM_INCLUDE"))
    else {
        panic!("libsodium-sys-stable did not say where it built libsodium");
    };
    // libzmq's own sources warn under gcc 12; those warnings are not ours to
    // fix and would be repeated on every build.
    std::env::set_var("CXXFLAGS", "-w");
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, include)))
        .build();
    println!("cargo:rustc-cfg=curve_built_here");
}
