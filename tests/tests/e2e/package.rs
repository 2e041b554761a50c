//! The Debian package (gaspard/debian/build-deb, cargo-deb): what it holds,
//! and that what it installs works: the installed gaspard passes --check with
//! the packaged /etc/default/gaspard, the man page renders, the packaged
//! units verify, and lintian finds no error.

use crate::operations::which;
use gaspard_tests::artifacts;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every path the package must install.
const CONTENTS: &[&str] = &[
    "./usr/bin/gaspard",
    "./usr/bin/gaspar",
    "./usr/lib/gaspard/handlers/libecho.so",
    "./usr/lib/gaspard/handlers/libupper.so",
    "./usr/lib/gaspard/handlers/libsha256.so",
    "./usr/lib/gaspard/handlers/libecho_c.so",
    "./usr/lib/systemd/system/gaspard.service",
    "./usr/lib/systemd/system/gaspard.socket",
    "./usr/lib/sysusers.d/gaspard.conf",
    "./etc/default/gaspard",
    "./usr/share/man/man1/gaspard.1.gz",
    "./usr/share/bash-completion/completions/gaspard",
    "./usr/share/zsh/vendor-completions/_gaspard",
    "./usr/share/fish/vendor_completions.d/gaspard.fish",
    "./usr/include/gaspar.h",
    "./usr/share/pkgconfig/gaspar.pc",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the package from the debug build the harness made (so nothing is
/// compiled again) into `out`, and returns the .deb's path.
fn build_deb(out: &Path) -> PathBuf {
    let target_dir = artifacts().parent().expect("profile dir has a parent");
    let output = Command::new(repo().join("gaspard/debian/build-deb"))
        .env("CARGO_TARGET_DIR", target_dir)
        .env("GASPARD_DEB_PROFILE", "dev")
        .arg("--output")
        .arg(out)
        .output()
        .expect("run gaspard/debian/build-deb");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "build-deb failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("build-deb prints the .deb")
            .trim(),
    );
    assert!(
        deb.extension().is_some_and(|ext| ext == "deb") && deb.is_file(),
        "no .deb at {deb:?}: {stdout}"
    );
    deb
}

fn run(command: &mut Command) -> (bool, String, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_debian_package_installs_a_gaspard_that_checks_and_is_documented() {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    if !Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|output| output.status.success())
    {
        eprintln!("skipped: cargo-deb not installed (.ci/run installs it)");
        return;
    }
    let (Ok(dpkg_deb), Ok(dpkg)) = (which("dpkg-deb"), which("dpkg")) else {
        eprintln!("skipped: dpkg is not installed");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let deb = build_deb(out.path());

    // What it holds.
    let (ok, listing, stderr) = run(Command::new(&dpkg_deb).arg("-c").arg(&deb));
    assert!(ok, "dpkg-deb -c: {stderr}");
    let paths: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .collect();
    for expected in CONTENTS {
        assert!(
            paths.contains(expected),
            "{expected} is not in the package:\n{listing}"
        );
    }
    let (ok, conffiles, _) = run(Command::new(&dpkg_deb).arg("-I").arg(&deb).arg("conffiles"));
    assert!(
        ok && conffiles.lines().any(|line| line == "/etc/default/gaspard"),
        "{conffiles}"
    );

    // Installed into a scratch root (dpkg -x: dpkg --root would also run the
    // maintainer scripts, which create a user and start the service).
    let root = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run(Command::new(&dpkg).arg("-x").arg(&deb).arg(root.path()));
    assert!(ok, "dpkg -x: {stderr}");
    let installed = |path: &str| {
        root.path()
            .join(path.trim_start_matches("./").trim_start_matches('/'))
    };

    // The packaged /etc/default/gaspard is a configuration --check accepts,
    // its handler (the packaged echo) moved into the scratch root.
    let defaults = std::fs::read_to_string(installed("/etc/default/gaspard")).unwrap();
    let mut check = Command::new(installed("/usr/bin/gaspard"));
    check.arg("--check").env_remove("RUST_LOG");
    let mut handler_set = false;
    for (key, value) in defaults
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once('='))
    {
        if key == "GASPARD_HANDLER" {
            assert_eq!(value, "/usr/lib/gaspard/handlers/libecho.so");
            check.env(key, installed(value));
            handler_set = true;
        } else {
            check.env(key, value);
        }
    }
    assert!(
        handler_set,
        "/etc/default/gaspard sets no handler:\n{defaults}"
    );
    let (ok, stdout, stderr) = run(&mut check);
    assert!(ok, "installed gaspard --check failed: {stdout}{stderr}");
    let (ok, stdout, stderr) = run(Command::new(installed("/usr/bin/gaspard"))
        .arg("--check")
        .arg("--handler")
        .arg(installed("/usr/lib/gaspard/handlers/libecho.so")));
    assert!(
        ok,
        "installed gaspard --check --handler failed: {stdout}{stderr}"
    );

    // The man page renders, NAME first.
    let page = installed("/usr/share/man/man1/gaspard.1.gz");
    match which("man") {
        Ok(man) => {
            let (ok, text, stderr) = run(Command::new(man)
                .arg("-l")
                .arg(&page)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "80"));
            assert!(ok, "man -l: {stderr}");
            let name = text
                .lines()
                .position(|line| line.trim() == "NAME")
                .expect("a NAME section");
            assert!(
                text.lines()
                    .nth(name + 1)
                    .is_some_and(|line| line.trim().starts_with("gaspard - ")),
                "{text}"
            );
        }
        Err(()) => {
            eprintln!("skipped the man page: man is not installed (.ci/run installs man-db)")
        }
    }

    // The packaged units verify, pointed at the scratch root's files.
    if let Ok(analyze) = which("systemd-analyze") {
        let units = tempfile::tempdir().unwrap();
        for unit in ["gaspard.service", "gaspard.socket"] {
            let text =
                std::fs::read_to_string(installed(&format!("/usr/lib/systemd/system/{unit}")))
                    .unwrap();
            let text = text
                .replace(
                    "/usr/bin/gaspard",
                    installed("/usr/bin/gaspard").to_str().unwrap(),
                )
                .replace(
                    "/etc/default/gaspard",
                    installed("/etc/default/gaspard").to_str().unwrap(),
                );
            std::fs::write(units.path().join(unit), text).unwrap();
        }
        let (ok, _, stderr) = run(Command::new(analyze)
            .args([
                "verify",
                "--man=no",
                "./gaspard.service",
                "./gaspard.socket",
            ])
            .current_dir(units.path()));
        assert!(
            ok && stderr.trim().is_empty(),
            "systemd-analyze verify: {stderr}"
        );
    } else {
        eprintln!("skipped the units: systemd-analyze is not installed (.ci/run installs it)");
    }

    // lintian: no error; warnings are listed.
    match which("lintian") {
        Ok(lintian) => {
            let (_, stdout, stderr) = run(Command::new(lintian).arg(&deb));
            let errors: Vec<&str> = stdout
                .lines()
                .filter(|line| line.starts_with("E: "))
                .collect();
            for warning in stdout.lines().filter(|line| line.starts_with("W: ")) {
                eprintln!("lintian: {warning}");
            }
            assert!(errors.is_empty(), "lintian errors:\n{stdout}{stderr}");
        }
        Err(()) => eprintln!("skipped lintian: it is not installed (.ci/run installs it)"),
    }
}

/// A unit's settings, header comments and the settings in `differ` left out.
fn settings_but(path: &Path, differ: &[&str]) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip_while(|line| !line.starts_with('['))
        .filter(|line| {
            !differ
                .iter()
                .any(|key| line.starts_with(&format!("{key}=")))
        })
        .map(str::to_string)
        .collect()
}

/// The packaged units are docs/systemd's, sandbox included, but for where
/// the binary and its flags are and which user runs it.
#[test]
fn the_packaged_units_are_the_documented_ones_but_for_paths_and_user() {
    let docs = repo().join("docs/systemd");
    let debian = repo().join("gaspard/debian");
    let differ = [
        "Documentation",
        "ExecStart",
        "EnvironmentFile",
        "DynamicUser",
        "User",
        "Group",
    ];
    assert_eq!(
        settings_but(&debian.join("units/gaspard.service"), &differ),
        settings_but(&docs.join("gaspard.service"), &differ)
    );
    assert_eq!(
        settings_but(&debian.join("gaspard.socket"), &differ),
        settings_but(&docs.join("gaspard.socket"), &differ)
    );
}
