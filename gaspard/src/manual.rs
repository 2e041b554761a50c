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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_and_completions_name_every_flag() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        assert_eq!(files.len(), 4);
        let page = std::fs::read_to_string(dir.path().join("gaspard.1")).unwrap();
        assert!(page.contains(".SH NAME"), "{page}");
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // roff escapes the dashes: \-\-handler.
            let flag = format!("\\-\\-{}", long.replace('-', "\\-"));
            assert!(page.contains(&flag), "the man page lacks --{long}");
            for file in &files[1..] {
                let text = std::fs::read_to_string(file).unwrap();
                assert!(text.contains(long), "{} lacks --{long}", file.display());
            }
        }
    }
}
