//! What every program does the same way around its one library call: print the
//! paths it wrote on stdout (one a line, nothing else), report an error as one line
//! on stderr naming the program, and exit quietly when stdout is a closed pipe.

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status of a program that failed on its input or environment.
pub const EXIT_ERROR: u8 = 2;

/// Runs `body`, prints the paths it returns and maps failure to a one-line error.
pub fn run(program: &str, body: impl FnOnce() -> anyhow::Result<Vec<PathBuf>>) -> ExitCode {
    match body() {
        Ok(paths) => {
            let mut out = std::io::stdout().lock();
            for p in paths {
                if let Err(e) = writeln!(out, "{}", p.display()) {
                    // A closed pipe (`| head`) is the reader's choice, not an error.
                    if e.kind() == ErrorKind::BrokenPipe {
                        return ExitCode::SUCCESS;
                    }
                    eprintln!("{program}: error: stdout: {e}");
                    return ExitCode::from(EXIT_ERROR);
                }
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            // anyhow's `{:#}` joins the context chain on one line: "file: problem: cause".
            let line = format!("{err:#}").replace('\n', " ");
            eprintln!("{program}: error: {line}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Resolves an input argument: `-` is standard input, spooled to a file named by
/// its content hash (so it can be hashed for the stage key and read like a file).
pub fn input_path(arg: &std::path::Path) -> anyhow::Result<PathBuf> {
    if arg.as_os_str() == "-" {
        let dir = std::env::temp_dir().join("quark-stdin");
        crate::stage::spool_stdin(&dir)
    } else {
        Ok(arg.to_owned())
    }
}
