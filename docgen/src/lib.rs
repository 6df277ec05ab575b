//! Man pages and shell completions rendered from a binary's own clap definition, so that they
//! never drift from its options.
//!
//! Each binary crate has an optional `docgen` feature. Built with it (only for the host, by
//! `scripts/build-board.sh`), the binary writes its documents into `$HVV_DOCGEN_DIR` and exits
//! instead of running. Release binaries are built without the feature and carry none of this.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// The environment variable that names the output directory.
pub const DIR_VAR: &str = "HVV_DOCGEN_DIR";

/// The directory to write into, when the binary was asked to.
pub fn requested() -> Option<PathBuf> {
    std::env::var_os(DIR_VAR)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
}

/// Writes the documents of `A` under `dir` and returns the process's exit code.
pub fn run<A: CommandFactory>(dir: &Path) -> ExitCode {
    match write_all(A::command(), dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("docgen: cannot write into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// `dir` receives the layout of an installation prefix: `share/man/man1/NAME.1` (and
/// `NAME-SUB.1` per subcommand), `share/bash-completion/completions/NAME`,
/// `share/zsh/site-functions/_NAME` and `share/fish/vendor_completions.d/NAME.fish`.
pub fn write_all(cmd: clap::Command, dir: &Path) -> io::Result<()> {
    let name = cmd.get_name().to_owned();
    let man_dir = dir.join("share/man/man1");
    fs::create_dir_all(&man_dir)?;
    // NAME.1, and NAME-SUB.1 for each subcommand, which NAME.1 refers to.
    clap_mangen::generate_to(cmd.clone(), &man_dir)?;

    let shells = [
        (
            Shell::Bash,
            "share/bash-completion/completions",
            name.clone(),
        ),
        (Shell::Zsh, "share/zsh/site-functions", format!("_{name}")),
        (
            Shell::Fish,
            "share/fish/vendor_completions.d",
            format!("{name}.fish"),
        ),
    ];
    for (shell, sub, file) in shells {
        let out = dir.join(sub);
        fs::create_dir_all(&out)?;
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut script);
        fs::write(out.join(OsString::from(file)), script)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    #[command(name = "demo-tool", about = "A demo")]
    struct Demo {
        /// The size of the thing.
        #[arg(long)]
        size_mib: u64,
        #[command(subcommand)]
        command: Option<DemoCommand>,
    }

    #[derive(Debug, clap::Subcommand)]
    enum DemoCommand {
        /// Show the thing.
        Show,
    }

    #[test]
    fn writes_man_page_and_completions_with_the_options() {
        let dir = std::env::temp_dir().join(format!("hvv-docgen-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        write_all(Demo::command(), &dir).unwrap();
        let man = fs::read_to_string(dir.join("share/man/man1/demo-tool.1")).unwrap();
        assert!(man.contains(".TH demo-tool"), "{man}");
        assert!(man.contains("size\\-mib"), "{man}");
        let sub = fs::read_to_string(dir.join("share/man/man1/demo-tool-show.1")).unwrap();
        assert!(sub.contains("Show the thing"), "{sub}");
        for f in [
            "share/bash-completion/completions/demo-tool",
            "share/zsh/site-functions/_demo-tool",
            "share/fish/vendor_completions.d/demo-tool.fish",
        ] {
            let text = fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.contains("size-mib"), "{f}: {text}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
