//! The `command` scorer: any program as a reward model. It runs `sh -c COMMAND` once
//! per input file, writes one JSON object per row to its stdin
//! (`{"prompt_id", "sample_index", "iteration", "prompt", "completion"}`, one a line,
//! in file order) and reads one value per line from its stdout: a number (the reward,
//! higher is better; also the raw column `command`) or `null` for a row it cannot
//! score. Its stderr passes through to ours.
//!
//! Memory stays flat however large the file: a writer thread reads the input file a
//! batch at a time and feeds the program, while [`score_file`](super::score_file)
//! reads the same file again, batch by batch, and pairs each row with the program's
//! next output line. Only the OS pipes (bounded) sit between the two, so a program
//! that streams and one that reads everything before answering both work, and no row
//! is held twice. A program that exits non-zero, exits before answering every row,
//! prints more lines than rows, or prints something that is not a number is an error
//! naming the command and the input file; so is one that gives no answer for a row
//! within `--timeout` (it is stopped).

use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::input::ScoringInput;
use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// A running scorer program, the thread that feeds it and the lines it printed
/// (read by a thread of their own, so that a program that stops answering is
/// noticed after the time limit).
struct Running {
    child: Child,
    lines: Receiver<std::io::Result<String>>,
    writer: Option<JoinHandle<Result<()>>>,
    input: PathBuf,
    rows: usize,
    read: usize,
}

/// Scores rows by a user's program (see the module header for the protocol).
pub struct CommandScorer {
    command: String,
    timeout: Duration,
    running: Option<Running>,
}

/// How long the command scorer waits for one row's answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

impl CommandScorer {
    /// A scorer that runs `command` with `sh -c` and waits at most `timeout` for
    /// each row's answer (the first one included, which may come after the program
    /// has loaded a model).
    pub fn new(command: &str, timeout: Duration) -> Result<Self> {
        if command.trim().is_empty() {
            bail!("--command is empty");
        }
        if timeout.is_zero() {
            bail!("--timeout must be above 0");
        }
        Ok(Self {
            command: command.to_owned(),
            timeout,
            running: None,
        })
    }

    fn context(&self, input: &Path) -> String {
        // A multi-line script stays on the one line of an error message.
        let command = self.command.replace('\n', "\\n");
        format!("command `{command}` on {}", input.display())
    }

    /// Why the program stopped early: its exit status and the writer's error.
    fn failure(&mut self, what: String) -> anyhow::Error {
        let Some(mut run) = self.running.take() else {
            return anyhow!(what);
        };
        let ctx = self.context(&run.input);
        let status = stop(&mut run.child);
        let writer = run.writer.take().map(|h| h.join());
        let mut msg = format!("{ctx}: {what}");
        if let Some(s) = status.filter(|s| !s.success()) {
            msg.push_str(&format!(" (the program {s})"));
        }
        if let Some(Ok(Err(e))) = writer {
            msg.push_str(&format!(" (writing its input: {e:#})"));
        }
        anyhow!(msg)
    }
}

/// Writes every row of `input` as one JSON line to the program's stdin. A closed
/// pipe means the program stopped reading: the reader side reports that.
fn feed(input: PathBuf, stdin: std::process::ChildStdin) -> Result<()> {
    let mut out = BufWriter::new(stdin);
    let mut reader = ScoringInput::open(&input, &[])?;
    while let Some(batch) = reader.next_batch() {
        for r in batch?.rows {
            let line = json!({
                "prompt_id": r.prompt_id,
                "sample_index": r.sample_index,
                "iteration": r.iteration,
                "prompt": r.prompt,
                "completion": r.completion,
            });
            let res = serde_json::to_writer(&mut out, &line)
                .map_err(std::io::Error::from)
                .and_then(|_| out.write_all(b"\n"));
            match res {
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(()),
                other => other.context("cannot write to the program")?,
            }
        }
    }
    match out.flush() {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("cannot write to the program")?),
    }
    // Dropping `out` closes stdin: the program sees end of input.
}

/// The exit status of a program we stop reading from: it gets a moment to exit by
/// itself (so that its own status is reported), then it is killed, as it may be
/// blocked writing to us or waiting for input.
fn stop(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    kill_group(child);
    child.wait().ok()
}

/// Kills the program and everything it started (`sh -c 'a | b'` runs a and b in the
/// program's process group, which is its own): nothing of it outlives the run or
/// keeps its pipes open.
fn kill_group(child: &mut Child) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    const SIGKILL: i32 = 9;
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) takes any pid; a negative one names the process group the
        // child leads (spawned with process_group(0)), which only it and its
        // descendants are in.
        unsafe { kill(-pid, SIGKILL) };
    }
    let _ = child.kill();
}

/// Parses one output line: a number, or null / None / NaN for an unscored row
/// (non-finite numbers become nulls in score_file).
fn parse_value(line: &str) -> Option<Option<f64>> {
    let t = line.trim();
    match t {
        "null" | "None" | "NaN" | "nan" => Some(None),
        _ => t.parse::<f64>().ok().map(Some),
    }
}

impl Scorer for CommandScorer {
    fn name(&self) -> &'static str {
        "command"
    }
    fn columns(&self) -> Vec<String> {
        vec!["command".into()]
    }
    fn params(&self) -> Value {
        json!({ "command": self.command })
    }
    fn external(&self) -> bool {
        true
    }

    fn begin(&mut self, input: &Path, rows: usize) -> Result<()> {
        let ctx = self.context(input);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            // Its own process group, so that a stop ends everything it started.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("{ctx}: cannot start"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("{ctx}: no pipes to the program");
        };
        // Bounded, as the pipe was: a program that prints without end cannot fill
        // the memory.
        let (tx, lines) = std::sync::mpsc::sync_channel(1024);
        std::thread::Builder::new()
            .name("quark-score-command-out".into())
            .spawn(move || {
                let mut stdout = BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    let got =
                        stdout
                            .read_line(&mut line)
                            .map(|n| if n == 0 { String::new() } else { line });
                    let end = !matches!(&got, Ok(l) if !l.is_empty());
                    if tx.send(got).is_err() || end {
                        break;
                    }
                }
            })
            .with_context(|| format!("{ctx}: cannot start the reader thread"))?;
        let path = input.to_owned();
        let writer = std::thread::Builder::new()
            .name("quark-score-command".into())
            .spawn(move || feed(path, stdin))
            .with_context(|| format!("{ctx}: cannot start the writer thread"))?;
        self.running = Some(Running {
            child,
            lines,
            writer: Some(writer),
            input: input.to_owned(),
            rows,
            read: 0,
        });
        Ok(())
    }

    // The program reads every row of the file in order (`feed`), so `rows` must be
    // every row in order too: score_file passes a subset only to retry rows a
    // scorer failed on, and this one never fails a row (it fails the run).
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        let mut out = Vec::with_capacity(rows.len());
        for _ in rows {
            let run = self
                .running
                .as_mut()
                .ok_or_else(|| anyhow!("the command scorer was not started"))?;
            let got = run.lines.recv_timeout(self.timeout);
            let (read, total) = (run.read, run.rows);
            let line = match got {
                Ok(Ok(l)) if l.is_empty() => {
                    return Err(self.failure(format!(
                        "the program exited after printing {read} lines for {total} rows"
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(format!(
                        "the program exited after printing {read} lines for {total} rows"
                    )))
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Waited long enough: no grace period before the kill.
                    kill_group(&mut run.child);
                    return Err(self.failure(format!(
                        "no answer for row {} within {} s (--timeout); the program was stopped",
                        read + 1,
                        self.timeout.as_secs_f64()
                    )));
                }
                Ok(Err(e)) => {
                    return Err(self.failure(format!("cannot read its output: {e}")));
                }
                Ok(Ok(l)) => l,
            };
            let Some(v) = parse_value(&line) else {
                let shown: String = line.trim_end().chars().take(60).collect();
                return Err(self.failure(format!(
                    "line {} of its output is not a number or null: {shown:?}",
                    read + 1
                )));
            };
            run.read += 1;
            out.push(Score {
                reward: v,
                raw: vec![v],
                failure: None,
            });
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<()> {
        let Some(run) = self.running.as_mut() else {
            return Ok(());
        };
        let extra = run.lines.recv_timeout(self.timeout);
        let (read, total) = (run.read, run.rows);
        match extra {
            Ok(Ok(rest)) if rest.is_empty() => {}
            Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(self.failure(format!(
                    "the program did not exit within {} s of its last answer (--timeout)",
                    self.timeout.as_secs_f64()
                )))
            }
            Ok(Ok(rest)) => {
                return Err(self.failure(format!(
                    "the program printed more lines than the {total} rows (line {} is {:?})",
                    read + 1,
                    rest.trim_end().chars().take(60).collect::<String>()
                )))
            }
            Ok(Err(e)) => return Err(self.failure(format!("cannot read its output: {e}"))),
        }
        let Some(mut run) = self.running.take() else {
            return Ok(());
        };
        let ctx = self.context(&run.input);
        let status = run
            .child
            .wait()
            .with_context(|| format!("{ctx}: cannot wait for the program"))?;
        let writer = run.writer.take().map(|h| h.join());
        if !status.success() {
            bail!("{ctx}: the program {status}");
        }
        match writer {
            Some(Ok(res)) => res.with_context(|| format!("{ctx}: feeding the program")),
            Some(Err(_)) => bail!("{ctx}: the writer thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for CommandScorer {
    fn drop(&mut self) {
        // Stopped before finish (an error elsewhere): end our own child, reap it.
        if let Some(mut run) = self.running.take() {
            kill_group(&mut run.child);
            let _ = run.child.wait();
            if let Some(h) = run.writer.take() {
                let _ = h.join();
            }
        }
    }
}
