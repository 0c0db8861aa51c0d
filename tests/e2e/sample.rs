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

/// `--dtype auto`, the default: f32 on a CPU without native bf16 (forced by
/// QUARK_NATIVE_BF16=0, whatever this machine has), bf16 on one with it; the
/// resolved dtype is what the output's key and parameters record, so an auto run
/// and an explicit run of the same dtype are one output.
#[test]
fn dtype_auto_resolves_by_the_cpu_and_the_output_records_it() {
    let w = Workdir::new();
    let m = model();
    std::fs::write(w.path("p.txt"), "Hello world\n").unwrap();
    let sample = |dtype: &str, native: &str, out: &str| {
        let run = w.run_with_stdin_env(
            SAMPLE,
            &[
                "--model",
                &m,
                "--prompts",
                "p.txt",
                "--dtype",
                dtype,
                "--out",
                out,
                "--quiet",
            ],
            b"",
            &[("QUARK_NATIVE_BF16", std::ffi::OsStr::new(native))],
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        let path = w.root().join(run.stdout.trim());
        let params = quark::schema::read_metadata(&path).unwrap()["quark.params"].clone();
        (path, params, run.stderr)
    };
    let (auto_path, params, stderr) = sample("auto", "0", "out/");
    assert!(params.contains(r#""dtype":"f32""#), "{params}");
    assert!(stderr.contains("tokens/s, f32)"), "{stderr}");
    let (f32_path, _, again) = sample("f32", "0", "out/");
    assert_eq!(f32_path, auto_path, "auto on this CPU is the f32 output");
    assert!(again.contains("is up to date"), "{again}");
    let (_, params, _) = sample("auto", "1", "native/");
    assert!(params.contains(r#""dtype":"bf16""#), "{params}");
    // Asked for by name where it is slow, bf16 is kept, with the measured reason.
    let (_, params, stderr) = sample("bf16", "0", "slow/");
    assert!(params.contains(r#""dtype":"bf16""#), "{params}");
    let warning: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: --dtype bf16"))
        .collect();
    assert_eq!(warning.len(), 1, "{stderr}");
    assert!(
        warning[0].contains("GFLOP/s") && warning[0].contains("--dtype auto picks f32"),
        "{stderr}"
    );
}
