//! The man page and the shell completions, generated from the clap
//! definition of [`Cli`] by the hidden [`GENERATE_ARG`] mode, so that the
//! Debian package (and anyone installing by hand) ships pages that cannot
//! drift from `gaspard --help`.

use crate::config::Cli;
use clap::CommandFactory;
use clap_complete::Shell;
use std::io;
use std::path::{Path, PathBuf};

/// `gaspard __generate-docs DIR` writes the files below into DIR.
pub const GENERATE_ARG: &str = "__generate-docs";

/// Writes `DIR/gaspard.1` (the man page) and the completions
/// `DIR/completions/gaspard.bash`, `DIR/completions/_gaspard` (zsh) and
/// `DIR/completions/gaspard.fish`; returns the files written.
pub fn generate(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    let mut cmd = Cli::command();
    let mut written = Vec::new();

    let page = dir.join("gaspard.1");
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    std::fs::write(&page, out)?;
    written.push(page);

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            "gaspard",
            &completions,
        )?);
    }
    Ok(written)
}
