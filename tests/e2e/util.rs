//! The harness: a work folder per test and a way to run a program in it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A temporary folder that one test runs its programs in.
pub struct Workdir {
    dir: tempfile::TempDir,
}

/// What a finished program printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The paths printed on stdout, one a line.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.stdout.lines().map(PathBuf::from).collect()
    }

    /// Asserts success and returns the one path printed.
    pub fn path(&self) -> PathBuf {
        assert_eq!(self.code, 0, "failed: {}", self.stderr);
        let p = self.paths();
        assert_eq!(p.len(), 1, "stdout: {}", self.stdout);
        p.into_iter().next().unwrap()
    }

    /// Asserts a failure with exactly one line on stderr containing every `part`.
    pub fn one_line_error(&self, program: &str, parts: &[&str]) {
        assert_eq!(self.code, 2, "stderr: {}", self.stderr);
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr: {}", self.stderr);
        assert!(
            lines[0].starts_with(&format!("{program}: error: ")),
            "{}",
            lines[0]
        );
        for p in parts {
            assert!(lines[0].contains(p), "`{p}` not in: {}", lines[0]);
        }
    }
}

impl Workdir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Runs program `name` (one of this package's binaries) with `args` in the folder.
    pub fn run(&self, exe: &str, args: &[&str]) -> Run {
        self.run_with_stdin(exe, args, &[])
    }

    /// As [`Workdir::run`], with `stdin` on the program's standard input.
    pub fn run_with_stdin<S: AsRef<std::ffi::OsStr>>(
        &self,
        exe: &str,
        args: &[S],
        stdin: &[u8],
    ) -> Run {
        self.run_with_stdin_env(exe, args, stdin, &[])
    }

    /// As [`Workdir::run_with_stdin`], with more environment variables.
    pub fn run_with_stdin_env<S: AsRef<std::ffi::OsStr>>(
        &self,
        exe: &str,
        args: &[S],
        stdin: &[u8],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Run {
        let mut child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        // A program that fails before reading closes the pipe: that is its answer.
        let _ = input.write_all(stdin);
        drop(input);
        let out: Output = child.wait_with_output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs a DuckDB query with the venv's Python and returns its rows as JSON.
pub fn duckdb(sql: &str) -> serde_json::Value {
    let script = r#"
import duckdb, json, sys
rows = duckdb.sql(sys.argv[1]).fetchall()
print(json.dumps(rows, default=str))
"#;
    let out = quark::testing::run_python(script, &[std::ffi::OsStr::new(sql)]);
    serde_json::from_str(&out).unwrap()
}
