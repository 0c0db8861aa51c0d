//! What every program does the same way around its one library call: parse its flags
//! (each numeric flag checked for range and finiteness by [`crate::check`]), print
//! the paths it wrote on stdout (one a line, nothing else), report an error as one
//! line on stderr naming the program, and exit quietly when stdout is a closed pipe;
//! and set glibc's malloc for libtorch ([`crate::allocator`]).

use std::cell::RefCell;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit status of a program that failed on its input or environment.
pub const EXIT_ERROR: u8 = 2;

/// How standard input is named in messages.
pub const STDIN_NAME: &str = "<stdin>";

thread_local! {
    /// Standard input spooled to files by [`input_path`]: removed when [`run`] ends,
    /// and named [`STDIN_NAME`] in its error line.
    static SPOOLED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// Parses the program's flags. A flag error is one line (`program: error: ...`,
/// exit 2) like every other error; `--help` and `--version` print as usual.
pub fn parse<A: clap::Parser>(program: &str) -> A {
    match A::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's message: "error: ...", indented details, a blank line, usage and
            // a pointer to --help. Keep the message and its details on one line.
            let text = e.to_string();
            let line = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("{program}: error: {line}");
            std::process::exit(i32::from(EXIT_ERROR));
        }
    }
}

/// Runs `body`, prints the paths it returns and maps failure to a one-line error.
/// A panic (a bug) is reported the same way, as an internal error.
pub fn run(program: &str, body: impl FnOnce() -> anyhow::Result<Vec<PathBuf>>) -> ExitCode {
    crate::allocator::tune();
    let name = program.to_owned();
    std::panic::set_hook(Box::new(move |info| {
        // A worker thread's panic reaches the main thread (rayon re-raises it, a
        // join returns it) and is reported there, or handled.
        if std::thread::current().name() != Some("main") {
            return;
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "{name}: error: internal error, please report it: {}{at}",
            first_line(&msg)
        );
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let spooled = SPOOLED.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for p in &spooled {
        let _ = std::fs::remove_file(p);
        if let Some(dir) = p.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    match result {
        Ok(Ok(paths)) => {
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
        Ok(Err(err)) => {
            eprintln!("{program}: error: {}", error_line(&err, &spooled));
            ExitCode::from(EXIT_ERROR)
        }
        // The hook has printed the line.
        Err(_) => ExitCode::from(EXIT_ERROR),
    }
}

/// anyhow's chain on one line ("file: problem: cause"), each cause cut to its first
/// line (libtorch's messages carry a C++ backtrace after it), with the spooled copies
/// of standard input named as such.
pub fn error_line(err: &anyhow::Error, spooled: &[PathBuf]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = first_line(&cause.to_string());
        // anyhow's context and a cause that already quotes it: keep it once.
        if parts.last().is_some_and(|p| p.contains(&text)) {
            continue;
        }
        parts.push(text);
    }
    let mut line = parts.join(": ");
    for p in spooled {
        line = line.replace(&p.display().to_string(), STDIN_NAME);
    }
    line
}

/// The first non-empty line of a message, without libtorch's decorations.
fn first_line(msg: &str) -> String {
    let line = msg
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_owned();
    line.strip_prefix("Internal torch error: ")
        .map(str::to_owned)
        .unwrap_or(line)
}

/// Resolves an input argument: `-` is standard input, spooled to a temporary file
/// named by its content hash (so it can be hashed for the stage key and read like a
/// file) and removed when [`run`] ends.
pub fn input_path(arg: &Path) -> anyhow::Result<PathBuf> {
    if arg.as_os_str() == "-" {
        let dir = std::env::temp_dir().join(format!("quark-stdin-{}", std::process::id()));
        let path = crate::stage::spool_stdin(&dir)?;
        SPOOLED.with(|s| s.borrow_mut().push(path.clone()));
        Ok(path)
    } else {
        Ok(arg.to_owned())
    }
}
