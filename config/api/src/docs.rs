//! Man pages and shell completions, generated from a program's clap
//! definition (`clap_mangen`, `clap_complete`) so they never drift from
//! `--help`. Shared by `lbd` and `lb-controller`: each flattens
//! [`DocsCommand`] into its subcommands. Writes files or stdout; knows
//! nothing about the programs themselves.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The subcommands that print a program's own documentation.
#[derive(Debug, clap::Subcommand)]
pub enum DocsCommand {
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (section 1: the program and each subcommand) into DIR.
    #[command(hide = true)]
    Man {
        /// The directory to write `NAME.1`, `NAME-SUBCOMMAND.1`, ... into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

impl DocsCommand {
    /// Runs the subcommand for the program described by `cmd`.
    pub fn run(&self, cmd: clap::Command) -> std::io::Result<()> {
        match self {
            Self::Completions { shell } => {
                let mut out = std::io::stdout().lock();
                write_completions(cmd, *shell, &mut out)?;
                out.flush()
            }
            Self::Man { dir } => {
                for page in write_man_pages(cmd, dir)? {
                    println!("{}", page.display());
                }
                Ok(())
            }
        }
    }
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn write_completions(
    mut cmd: clap::Command,
    shell: clap_complete::Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_owned();
    // clap_complete panics on a failed write; render in memory first.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)
}

/// Writes one man page per visible command of `cmd` (the program, then each
/// subcommand as `NAME-SUB.1`) into `dir`, created if missing; returns their
/// paths, sorted.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A program shaped like ours: one real subcommand and the docs ones.
    #[derive(Parser)]
    #[command(name = "demo-prog", version, about = "A demo.")]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        /// Serve things.
        Serve {
            /// Where.
            #[arg(long)]
            config: PathBuf,
        },
        #[command(flatten)]
        Docs(DocsCommand),
    }

    #[test]
    fn completions_name_the_program_and_its_subcommands() {
        let mut out = Vec::new();
        write_completions(Cli::command(), clap_complete::Shell::Bash, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("-o default demo-prog"), "{text}");
        assert!(text.contains("serve"), "{text}");
        assert!(text.contains("--config"), "{text}");
    }

    #[test]
    fn one_man_page_per_visible_command() {
        let dir = std::env::temp_dir().join(format!("weir-manual-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pages = write_man_pages(Cli::command(), &dir).unwrap();
        let names: Vec<_> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // `man` is hidden: a packaging tool, not something to read about.
        assert_eq!(
            names,
            [
                "demo-prog-completions.1",
                "demo-prog-serve.1",
                "demo-prog.1"
            ]
        );
        let main = std::fs::read_to_string(&pages[2]).unwrap();
        assert!(main.starts_with(".ie \\n(.g .ds Aq"), "{main}");
        assert!(main.contains(".TH demo-prog 1"), "{main}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
