//! quark-sample and quark-fit as programs: the paths on stdout, a rerun skipped,
//! `-` for stdin, and one-line errors naming the file.

use crate::util::Workdir;
use quark::schema::{read_table, GenerationRow};

const SAMPLE: &str = env!("CARGO_BIN_EXE_quark-sample");
const FIT: &str = env!("CARGO_BIN_EXE_quark-fit");

fn model() -> String {
    quark::testing::tiny_models()
        .join("gpt2")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn quark_sample_prints_its_path_skips_when_done_and_reads_stdin() {
    let w = Workdir::new();
    std::fs::write(
        w.path("prompts.txt"),
        "Hello world\nThe capital of France is\n",
    )
    .unwrap();
    let m = model();
    let args = [
        "--model",
        &m,
        "--prompts",
        "prompts.txt",
        "--samples-per-prompt",
        "2",
        "--out",
        "out/",
    ];
    let first = w.run(SAMPLE, &args);
    let path = first.path();
    assert_eq!(
        read_table::<GenerationRow>(&w.root().join(&path))
            .unwrap()
            .len(),
        4
    );
    let again = w.run(SAMPLE, &args);
    assert_eq!(again.path(), path);
    assert!(again.stderr.contains("is up to date"), "{}", again.stderr);

    // The same prompts on stdin give the same rows.
    let out = w.run_with_stdin(
        SAMPLE,
        &[
            "--model",
            &m,
            "--prompts",
            "-",
            "--samples-per-prompt",
            "2",
            "--out",
            "stdin.parquet",
        ],
        b"Hello world\nThe capital of France is\n",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        read_table::<GenerationRow>(&w.path("stdin.parquet")).unwrap(),
        read_table::<GenerationRow>(&w.root().join(&path)).unwrap()
    );
}

#[test]
fn quark_sample_errors_are_one_line_naming_the_file() {
    let w = Workdir::new();
    let m = model();
    std::fs::write(w.path("bad.txt"), b"fine\n\xff\xfe not utf-8\n").unwrap();
    w.run(SAMPLE, &["--model", &m, "--prompts", "bad.txt"])
        .one_line_error("quark-sample", &["bad.txt:2", "UTF-8"]);
    w.run(SAMPLE, &["--model", &m, "--prompts", "missing.jsonl"])
        .one_line_error("quark-sample", &["missing.jsonl"]);
    std::fs::write(w.path("p.txt"), "hi\n").unwrap();
    w.run(SAMPLE, &["--model", "no-model", "--prompts", "p.txt"])
        .one_line_error("quark-sample", &["no-model"]);
    w.run(
        SAMPLE,
        &["--model", &m, "--prompts", "p.txt", "--condition", "0"],
    )
    .one_line_error("quark-sample", &["control tokens"]);
}

#[test]
fn quark_fit_errors_are_one_line_naming_the_file() {
    let w = Workdir::new();
    let m = model();
    std::fs::write(w.path("pool.parquet"), b"PAR1 truncated").unwrap();
    w.run(
        FIT,
        &[
            "--pool",
            "pool.parquet",
            "--policy",
            &m,
            "--reference",
            &m,
            "--out",
            "ckpt",
            "--steps",
            "1",
        ],
    )
    .one_line_error("quark-fit", &["pool.parquet"]);
}
