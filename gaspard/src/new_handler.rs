//! `gaspard new-handler NAME`: writes a handler that builds and passes
//! `gaspard --check` as written, a Rust crate or a C file with its Makefile,
//! for an author starting outside the gaspard tree.
//!
//! Selected in `main` by its first argument, before the daemon's own flags
//! are parsed (they require `--handler`). The templates are in
//! `gaspard/templates/`.

use clap::{Parser, ValueEnum};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The first argument that selects this mode.
pub const ARG: &str = "new-handler";

const RUST_CARGO_TOML: &str = include_str!("../templates/rust-Cargo.toml");
const RUST_LIB_RS: &str = include_str!("../templates/rust-lib.rs");
const C_SOURCE: &str = include_str!("../templates/c-handler.c");
const C_MAKEFILE: &str = include_str!("../templates/c-Makefile");

/// Where the ABI crate was when this gaspard was built: used when it is
/// still there (gaspard run from its checkout).
const BUILT_ABI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../handler-abi");

/// The dependency path written when no checkout is known; the user edits it.
const ABI_PLACEHOLDER: &str = "/path/to/your/checkout/of/gaspard/handler-abi";

/// Writes a new handler: a Rust crate built as a cdylib, or a C file and its
/// Makefile.
#[derive(Parser, Debug)]
#[command(name = "gaspard new-handler")]
struct Args {
    /// The handler's name: letters, digits, `-` and `_`, starting with a
    /// letter. The library is lib<NAME>.so (with `-` as `_`).
    name: String,

    /// The language of the handler.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,

    /// The directory to create, which must not exist [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The gaspard-handler-abi crate (handler-abi/ in a checkout of gaspard):
    /// the Rust crate's dependency path; for C, its include/ holds gaspar.h.
    /// [default: the checkout this gaspard was built from, if it is still
    /// there; else a placeholder to edit (Rust) or pkg-config (C)]
    #[arg(long, value_name = "PATH")]
    abi: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Lang {
    Rust,
    C,
}

/// Why no handler was written.
#[derive(Debug, thiserror::Error)]
pub enum NewHandlerError {
    #[error(
        "{0:?} is not a handler name: use letters, digits, '-' and '_', starting with a letter"
    )]
    Name(String),
    #[error("{0} already exists: new-handler does not overwrite anything; pick another --dir")]
    Exists(PathBuf),
    #[error("--abi {path}: not the gaspard-handler-abi crate (no {missing} there)")]
    NotAbi {
        path: PathBuf,
        missing: &'static str,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs the mode on the arguments after [`ARG`]; returns the exit code.
pub fn run(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args = Args::parse_from(std::iter::once(OsString::from("gaspard new-handler")).chain(args));
    match create(&args) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gaspard: new-handler: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The ABI crate to point at: `--abi` (checked), else the build-time
/// checkout if it still exists. Absolute, so the files work from anywhere.
fn abi_dir(given: Option<&Path>) -> Result<Option<PathBuf>, NewHandlerError> {
    let Some(given) = given else {
        return Ok(Path::new(BUILT_ABI)
            .join("Cargo.toml")
            .is_file()
            .then(|| std::fs::canonicalize(BUILT_ABI).ok())
            .flatten());
    };
    for missing in ["Cargo.toml", "include/gaspar.h"] {
        if !given.join(missing).is_file() {
            return Err(NewHandlerError::NotAbi {
                path: given.to_path_buf(),
                missing,
            });
        }
    }
    Ok(Some(
        std::path::absolute(given).unwrap_or_else(|_| given.to_path_buf()),
    ))
}

/// Writes the handler's files; returns what to tell the user.
fn create(args: &Args) -> Result<String, NewHandlerError> {
    let name = &args.name;
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(NewHandlerError::Name(name.clone()));
    }
    let lib = name.replace('-', "_");
    let abi = abi_dir(args.abi.as_deref())?;
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    let fill = |template: &str, extra: &[(&str, &str)]| {
        extra.iter().fold(
            template.replace("@NAME@", name).replace("@LIB@", &lib),
            |text, (key, value)| text.replace(key, value),
        )
    };
    let mut report = String::new();
    let files = match args.lang {
        Lang::Rust => {
            let abi_path = abi.as_ref().map(|abi| abi.display().to_string());
            let dependency = format!(
                "{}gaspard-handler-abi = {{ path = {:?} }}",
                if abi_path.is_some() {
                    "# Not on crates.io: the crate in your checkout of gaspard.\n"
                } else {
                    "# EDIT: the handler-abi directory of your checkout of gaspard\n\
                     # (the crate is not on crates.io).\n"
                },
                abi_path.as_deref().unwrap_or(ABI_PLACEHOLDER),
            );
            if abi_path.is_none() {
                report.push_str(&format!(
                    "NOTE: no checkout of gaspard is known: edit the gaspard-handler-abi path in \
                     {} (now {ABI_PLACEHOLDER}) before building, or run again with --abi PATH\n",
                    dir.join("Cargo.toml").display()
                ));
            }
            vec![
                (
                    PathBuf::from("Cargo.toml"),
                    fill(RUST_CARGO_TOML, &[("@ABI_DEPENDENCY@", &dependency)]),
                ),
                (PathBuf::from("src/lib.rs"), fill(RUST_LIB_RS, &[])),
            ]
        }
        Lang::C => {
            let (cflags, make_cflags, from) = match &abi {
                Some(abi) => {
                    let flag = format!("-I {}", abi.join("include").display());
                    (flag.clone(), flag, "your checkout of gaspard".to_string())
                }
                None => (
                    "$(pkg-config --cflags gaspar)".to_string(),
                    "$(shell pkg-config --cflags gaspar)".to_string(),
                    "pkg-config (gaspar.pc, installed with gaspar.h)".to_string(),
                ),
            };
            let source = format!("{name}.c");
            vec![
                (
                    PathBuf::from(&source),
                    fill(C_SOURCE, &[("@CFLAGS@", &cflags)]),
                ),
                (
                    PathBuf::from("Makefile"),
                    fill(
                        C_MAKEFILE,
                        &[("@MAKE_CFLAGS@", &make_cflags), ("@WHERE@", &from)],
                    ),
                ),
            ]
        }
    };
    write_new(&dir, &files)?;
    for (file, _) in &files {
        report.push_str(&format!("wrote {}\n", dir.join(file).display()));
    }
    let (build, library) = match args.lang {
        Lang::Rust => (
            "cargo build --release",
            format!("target/release/lib{lib}.so"),
        ),
        Lang::C => ("make", format!("./lib{lib}.so")),
    };
    report.push_str(&format!(
        "next:\n  cd {}\n  {build}\n  gaspard --check --handler {library}\n",
        dir.display()
    ));
    Ok(report)
}

/// Creates `dir` (which must not exist) and the files in it, none of which
/// may exist either.
fn write_new(dir: &Path, files: &[(PathBuf, String)]) -> Result<(), NewHandlerError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                NewHandlerError::Exists(path)
            } else {
                NewHandlerError::Write { path, source }
            }
        }
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(failed(parent))?;
    }
    // create_dir fails on anything already there, a file or a directory.
    std::fs::create_dir(dir).map_err(failed(dir))?;
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed(parent))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut out| out.write_all(text.as_bytes()))
            .map_err(failed(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(name: &str, lang: Lang, dir: &Path) -> Args {
        Args {
            name: name.into(),
            lang,
            dir: Some(dir.to_path_buf()),
            abi: Some(PathBuf::from(BUILT_ABI)),
        }
    }

    #[test]
    fn a_rust_handler_is_a_cdylib_depending_on_the_abi_crate_by_path() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("my-handler");
        create(&args("my-handler", Lang::Rust, &dir)).unwrap();
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-handler\""), "{manifest}");
        assert!(manifest.contains("crate-type = [\"cdylib\"]"), "{manifest}");
        assert!(
            manifest.contains("gaspard-handler-abi = { path = \"/"),
            "{manifest}"
        );
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("target/release/libmy_handler.so"), "{lib}");
        assert!(!lib.contains('@') && !manifest.contains('@'), "unfilled");
    }

    #[test]
    fn a_c_handler_has_its_source_and_a_makefile() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("cmine");
        create(&args("cmine", Lang::C, &dir)).unwrap();
        let source = std::fs::read_to_string(dir.join("cmine.c")).unwrap();
        assert!(source.contains(".name = \"cmine\""), "{source}");
        assert!(source.contains("-o libcmine.so cmine.c"), "{source}");
        let makefile = std::fs::read_to_string(dir.join("Makefile")).unwrap();
        assert!(makefile.contains("handler-abi/include"), "{makefile}");
        assert!(makefile.contains("\t$(CC) "), "a tab before the recipe");
    }

    #[test]
    fn nothing_is_overwritten_and_bad_names_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let taken = temp.path().join("taken");
        std::fs::create_dir(&taken).unwrap();
        let error = create(&args("taken", Lang::Rust, &taken)).unwrap_err();
        assert!(matches!(error, NewHandlerError::Exists(_)), "{error}");
        assert!(std::fs::read_dir(&taken).unwrap().next().is_none());
        let file = temp.path().join("file");
        std::fs::write(&file, "mine").unwrap();
        assert!(create(&args("file", Lang::C, &file)).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
        for bad in ["", "9lives", "a b", "../x", "a/b"] {
            let error = create(&args(bad, Lang::Rust, &temp.path().join("x"))).unwrap_err();
            assert!(matches!(error, NewHandlerError::Name(_)), "{bad}: {error}");
        }
    }
}
