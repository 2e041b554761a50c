//! The echo handler written in C (`echo.c`), compiled by this crate's build
//! script into `libecho_c.so` the way a C user would build one: a plain
//! `cc -shared -fPIC` against `gaspar.h`, no Rust involved.

/// Where the build put `libecho_c.so`.
pub const LIBRARY_PATH: &str = env!("GASPARD_C_ECHO_SO");
