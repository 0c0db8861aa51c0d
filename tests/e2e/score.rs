//! quark-score as a user runs it: the real binary on a generations file in a work
//! folder; stdout carries only the written path, errors are one line with exit 2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use quark::schema::{write_table, GenerationRow, ScoredRow, TableReader};
use quark::stage::Stage;

fn quark_score(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quark-score"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("quark-score starts");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("stdin written");
    }
    drop(input);
    child.wait_with_output().expect("quark-score runs")
}

fn generations(dir: &Path) -> PathBuf {
    let rows: Vec<GenerationRow> = (0..10u32)
        .map(|i| GenerationRow {
            prompt_id: format!("p{}", i / 2),
            prompt: "Once upon a time".into(),
            prompt_tokens: vec![1, 2, 3],
            sample_index: i % 2,
            completion: if i % 2 == 0 {
                "the the the the".into()
            } else {
                "a fine tale".into()
            },
            completion_tokens: if i % 2 == 0 {
                vec![5, 5, 5, 5]
            } else {
                vec![6, 7, 8]
            },
            token_logprobs: vec![-1.0; 3],
            logprob: -3.0,
            finish_reason: "length".into(),
            condition: None,
            model: "m".into(),
            iteration: 0,
            seed: 1,
        })
        .collect();
    let meta = Stage::from_hashes("generations", &serde_json::json!({}), vec![])
        .unwrap()
        .meta()
        .clone();
    write_table(&dir.join("gen.parquet"), rows, &[], &meta).unwrap()
}

fn stdout_path(out: &Output) -> PathBuf {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one path on stdout: {text:?}");
    PathBuf::from(lines[0])
}

#[test]
fn quark_score_writes_scored_file_and_skips_a_rerun() {
    let dir = tempfile::tempdir().unwrap();
    generations(dir.path());
    let args = [
        "--in",
        "gen.parquet",
        "--scorer",
        "repetition",
        "--out",
        "scored/",
    ];
    let first = quark_score(dir.path(), &args, None);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let path = dir.path().join(stdout_path(&first));
    let reader = TableReader::<ScoredRow>::open(&path).unwrap();
    assert_eq!(reader.extra(), ["rep_2", "rep_3", "rep_4", "diversity"]);
    let rows = reader.read_all().unwrap();
    assert_eq!(rows.len(), 10);
    // [5 5 5 5]: rep-2 = 2/3, rep-3 = 1/2, rep-4 = 0; [6 7 8]: no repeats.
    assert!((rows[0].reward.unwrap() - (1.0 / 3.0) * 0.5).abs() < 1e-12);
    assert_eq!(rows[1].reward, Some(1.0));

    let second = quark_score(dir.path(), &args, None);
    assert!(second.status.success());
    assert_eq!(dir.path().join(stdout_path(&second)), path);
    assert!(String::from_utf8_lossy(&second.stderr).contains("up to date"));

    // The same table on stdin has the same content, hence the same key and output.
    let bytes = std::fs::read(dir.path().join("gen.parquet")).unwrap();
    let piped = quark_score(
        dir.path(),
        &["--in", "-", "--scorer", "repetition", "--out", "scored/"],
        Some(&bytes),
    );
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert_eq!(dir.path().join(stdout_path(&piped)), path);
}

#[test]
fn quark_score_errors_are_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    generations(dir.path());
    let cases: [(&[&str], &str); 3] = [
        (
            &["--in", "missing.parquet", "--scorer", "repetition"],
            "missing.parquet",
        ),
        (
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "command",
                "--command",
                "read l; echo 1",
            ],
            "exited after printing 1 lines for 10 rows",
        ),
        (
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "toxicity",
                "--toxicity-model",
                "nope.json",
            ],
            "nope.json",
        ),
    ];
    for (args, needle) in cases {
        let out = quark_score(dir.path(), args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim_end().lines().last().unwrap_or_default();
        assert!(last.starts_with("quark-score: error: "), "{err}");
        assert!(last.contains(needle), "{err}");
    }
}
