//! What both binaries' command lines share: clap's usage errors exit 64 (EX_USAGE, like
//! every other usage error of ours), shell completions (`clap_complete`), man pages
//! (`clap_mangen`), one page per command and subcommand, and whether logs are JSON
//! (`HERALD_LOG_FORMAT=json`).

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Exit code of a usage error (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Parses the command line; on `--help` or `--version` prints and exits 0, on a usage
/// error prints clap's message and exits [`EXIT_USAGE`].
pub fn parse<P: clap::Parser>() -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                i32::from(EXIT_USAGE)
            } else {
                0
            });
        }
    }
}

/// Writes the completion script for `shell` of the command `P` (a closed pipe, as in
/// `| head`, ends the output quietly).
pub fn completions<P: clap::CommandFactory>(shell: Shell, out: &mut impl Write) {
    let mut command = P::command();
    let name = command.get_name().to_string();
    // clap_complete panics on a write error: generate in memory, then write.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    let _ = out.write_all(&script).and_then(|()| out.flush());
}

/// Writes man pages for the command `P` into `dir`: `NAME.1` and one
/// `NAME-SUB[-SUB...].1` per subcommand (hidden ones left out). Returns the files.
pub fn man_pages<P: clap::CommandFactory>(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut command = P::command();
    command.build();
    write_pages(&command, command.get_name().to_string(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(
    command: &clap::Command,
    name: String,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let page = command.clone().name(name.clone());
    let mut text = Vec::new();
    clap_mangen::Man::new(page).render(&mut text)?;
    let path = dir.join(format!("{name}.1"));
    crate::files::write_atomic(&path, &text).map_err(std::io::Error::other)?;
    written.push(path);
    for sub in command.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

/// Whether `HERALD_LOG_FORMAT` asks for JSON logs (one object per line); anything but
/// `json` (or nothing) means text.
pub fn log_json() -> bool {
    std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line like ours: a subcommand with its own subcommand, and a hidden one.
    #[derive(clap::Parser)]
    #[command(name = "demo-cli", version, about = "A demo")]
    struct Demo {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        /// Messages.
        Message {
            #[command(subcommand)]
            action: Action,
        },
        /// Hidden.
        #[command(hide = true)]
        Secret,
    }

    #[derive(clap::Subcommand)]
    enum Action {
        /// Send one.
        Send {
            /// Its title.
            #[arg(long)]
            title: String,
        },
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!(
            "herald-man-{}",
            hex_suffix(crate::random_bytes::<6>())
        ));
        let written = man_pages::<Demo>(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec![
                "demo-cli.1",
                "demo-cli-message.1",
                "demo-cli-message-send.1"
            ]
        );
        let send = std::fs::read_to_string(dir.join("demo-cli-message-send.1")).unwrap();
        assert!(send.contains("title"), "{send}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        completions::<Demo>(Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("message") && script.contains("send"),
            "{script}"
        );
        assert!(script.contains("demo-cli"));
    }

    fn hex_suffix(bytes: [u8; 6]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
