//! The programs against bad input, as a hostile but ordinary user gives it. Every
//! case must end with exit 2 and one line on stderr (`quark-x: error: ...`) naming
//! the file or the flag at fault, nothing on stdout, no panic, no libtorch text, and
//! no new file under a final name. Then the cases where nothing may be lost: a
//! user's folder is never replaced, a killed run's temporary files are cleaned up by
//! the next run, standard input is never left behind, and the assets are found from
//! any folder.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use quark::schema::{col, write_table, GenerationRow, PoolRow, ScoredRow};
use quark::testing;

use crate::util::Workdir;

const SAMPLE: &str = env!("CARGO_BIN_EXE_quark-sample");
const SCORE: &str = env!("CARGO_BIN_EXE_quark-score");
const BIN: &str = env!("CARGO_BIN_EXE_quark-bin");
const FIT: &str = env!("CARGO_BIN_EXE_quark-fit");
const EVAL: &str = env!("CARGO_BIN_EXE_quark-eval");
const IMPORT: &str = env!("CARGO_BIN_EXE_quark-import");

/// Text that must never reach a user: a panic, libtorch's C++ frames, an abort.
const FORBIDDEN: [&str; 5] = [
    "panicked at",
    "frame #",
    "Internal torch error",
    "Aborted",
    "RUST_BACKTRACE",
];

/// One bad input: the program, its arguments, its stdin and what the error names.
struct Case {
    exe: &'static str,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    names: Vec<&'static str>,
}

fn case<S: AsRef<str>>(exe: &'static str, args: &[S], names: &[&'static str]) -> Case {
    Case {
        exe,
        args: args.iter().map(|s| s.as_ref().to_string()).collect(),
        stdin: None,
        names: names.to_vec(),
    }
}

/// Every regular file under `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn program(exe: &str) -> &str {
    Path::new(exe).file_name().unwrap().to_str().unwrap()
}

/// Runs every case in `w` and checks the rules of the module header; returns how
/// many ran.
fn check(w: &Workdir, cases: &[Case]) -> usize {
    for c in cases {
        let before = files(w.root());
        let out = w.run_with_stdin(c.exe, &c.args, c.stdin.as_deref().unwrap_or_default());
        let (stdout, stderr) = (out.stdout, out.stderr);
        let what = format!("{} {:?}", program(c.exe), c.args);
        assert_eq!(out.code, 2, "{what}: stderr {stderr}");
        assert!(stdout.is_empty(), "{what}: stdout {stdout}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: stderr {stderr}");
        let prefix = format!("{}: error: ", program(c.exe));
        assert!(lines[0].starts_with(&prefix), "{what}: {}", lines[0]);
        for n in &c.names {
            assert!(lines[0].contains(n), "{what}: `{n}` not in {}", lines[0]);
        }
        for f in FORBIDDEN {
            assert!(!stderr.contains(f), "{what}: {stderr}");
        }
        let new: Vec<_> = files(w.root()).difference(&before).cloned().collect();
        assert!(new.is_empty(), "{what}: left {new:?}");
    }
    cases.len()
}

fn tiny(name: &str) -> String {
    testing::tiny_models()
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A pool of `n` rows for the tiny models (ids below their vocabulary), K = 2, with
/// `edit` applied to the rows and `quantiles` recorded in its parameters.
fn pool(w: &Workdir, name: &str, quantiles: u64, edit: impl Fn(&mut [ScoredRow])) -> String {
    let mut rows: Vec<ScoredRow> = (0..8)
        .map(|i| {
            let mut r = testing::scored(&format!("p{i}"), 0, 0, Some(i as f64 / 8.0), 0);
            r.quantile = Some(u32::from(i >= 4));
            r
        })
        .collect();
    edit(&mut rows);
    let meta = testing::meta("pool", serde_json::json!({ "quantiles": quantiles }));
    write_table(&w.path(name), rows.into_iter().map(PoolRow), &[], &meta).unwrap();
    name.to_owned()
}

/// `gen.parquet`: `n` generations.
fn generations(w: &Workdir, n: u32) {
    let gens: Vec<GenerationRow> = (0..n).map(|i| testing::generation("p", i, 0)).collect();
    let meta = testing::meta("generations", serde_json::json!({}));
    write_table(&w.path("gen.parquet"), gens, &[], &meta).unwrap();
}

fn scored(w: &Workdir, name: &str, rows: Vec<ScoredRow>) -> String {
    let meta = testing::meta("scored", serde_json::json!({}));
    write_table(&w.path(name), rows, &["toxicity".into()], &meta).unwrap();
    name.to_owned()
}

/// Another tool's table: the rows of a DuckDB query written as Parquet.
fn duckdb_write(w: &Workdir, query: &str, name: &str) {
    let sql = format!(
        "copy ({query}) to '{}' (format parquet)",
        w.path(name).display()
    );
    testing::run_python(
        "import duckdb, sys\nduckdb.sql(sys.argv[1])",
        &[std::ffi::OsStr::new(&sql)],
    );
}

fn ten_scored() -> Vec<ScoredRow> {
    (0..10)
        .map(|i| testing::scored("p", i, 0, Some(i as f64 / 10.0), 1))
        .collect()
}

#[test]
fn quark_sample_refuses_bad_options_and_prompts_before_any_work() {
    let w = Workdir::new();
    let m = tiny("gpt2");
    std::fs::write(w.path("p.txt"), "Hello world\nThe capital of France is\n").unwrap();
    // A prompt longer than the tiny GPT-2's 64 positions.
    std::fs::write(w.path("long.txt"), "word ".repeat(400)).unwrap();
    std::fs::write(w.path("a-file"), "not a folder").unwrap();
    let base = ["--model", m.as_str(), "--prompts", "p.txt"];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases = vec![
        case(
            SAMPLE,
            &with(&["--max-prompt-tokens", "0"]),
            &["--max-prompt-tokens"],
        ),
        case(SAMPLE, &with(&["--temperature", "-1"]), &["--temperature"]),
        case(
            SAMPLE,
            &with(&["--temperature", "NaN"]),
            &["--temperature", "finite"],
        ),
        case(
            SAMPLE,
            &with(&["--temperature", "inf"]),
            &["--temperature", "finite"],
        ),
        case(SAMPLE, &with(&["--temperature", "0"]), &["--temperature"]),
        case(SAMPLE, &with(&["--top-p", "NaN"]), &["--top-p"]),
        case(SAMPLE, &with(&["--top-p", "2"]), &["--top-p"]),
        case(SAMPLE, &with(&["--top-p", "0"]), &["--top-p"]),
        case(SAMPLE, &with(&["--batch-size", "0"]), &["--batch-size"]),
        case(
            SAMPLE,
            &with(&["--samples-per-prompt", "0"]),
            &["--samples-per-prompt"],
        ),
        case(
            SAMPLE,
            &with(&["--max-new-tokens", "0"]),
            &["--max-new-tokens"],
        ),
        case(SAMPLE, &with(&["--seed", "-1"]), &["--seed"]),
        case(SAMPLE, &with(&["--shard", "2/2"]), &["--shard"]),
        case(SAMPLE, &with(&["--device", "tpu"]), &["--device"]),
        case(SAMPLE, &with(&["--condition", "0"]), &["control tokens"]),
        case(
            SAMPLE,
            &[
                "--model",
                &m,
                "--prompts",
                "long.txt",
                "--max-prompt-tokens",
                "100000",
            ],
            &["long.txt", "positions", "--max-prompt-tokens"],
        ),
        case(
            SAMPLE,
            &with(&["--out", "a-file/out.parquet"]),
            &["a-file", "cannot create"],
        ),
        case(
            SAMPLE,
            &["--model", &m, "--prompts", "missing.jsonl"],
            &["missing.jsonl"],
        ),
        case(
            SAMPLE,
            &["--model", "no-model", "--prompts", "p.txt"],
            &["no-model"],
        ),
    ];
    let n = check(&w, &cases);
    eprintln!("quark-sample: {n} bad inputs");
}

#[test]
fn quark_score_refuses_bad_tables_options_and_stuck_programs() {
    let w = Workdir::new();
    generations(&w, 4);
    std::fs::write(w.path("junk.parquet"), b"PAR1 not parquet at all").unwrap();
    // Another tool's texts: no token ids, no prompt column.
    duckdb_write(
        &w,
        "select * from (values ('a'), ('b')) t(completion)",
        "no-prompt.parquet",
    );
    duckdb_write(
        &w,
        "select * from (values ('x', 'a a a'), ('y', 'b')) t(prompt, completion)",
        "texts.parquet",
    );
    let mut garbage = case(
        SCORE,
        &["--in", "-", "--scorer", "profanity"],
        &["<stdin>", "Parquet"],
    );
    garbage.stdin = Some(b"this is not a parquet file".to_vec());
    let cases = vec![
        case(
            SCORE,
            &["--in", "junk.parquet"],
            &["junk.parquet", "Parquet"],
        ),
        case(SCORE, &["--in", "missing.parquet"], &["missing.parquet"]),
        garbage,
        case(
            SCORE,
            &["--in", "no-prompt.parquet", "--scorer", "profanity"],
            &["no-prompt.parquet", "`prompt`"],
        ),
        case(
            SCORE,
            &["--in", "texts.parquet", "--scorer", "repetition"],
            &["texts.parquet", "completion_tokens"],
        ),
        case(
            SCORE,
            &["--in", "gen.parquet", "--scorer", "command"],
            &["--command"],
        ),
        case(
            SCORE,
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "command",
                "--command",
                "cat",
                "--timeout",
                "0",
            ],
            &["--timeout"],
        ),
        case(
            SCORE,
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "command",
                "--command",
                "sleep 30",
                "--timeout",
                "1",
            ],
            &["gen.parquet", "no answer", "--timeout"],
        ),
        case(
            SCORE,
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "command",
                "--command",
                "echo 1; echo x",
            ],
            &["gen.parquet", "not a number"],
        ),
        case(
            SCORE,
            &["--in", "gen.parquet", "--scorer", "perplexity"],
            &["--model"],
        ),
        case(
            SCORE,
            &[
                "--in",
                "gen.parquet",
                "--scorer",
                "perspective",
                "--rate-limit",
                "NaN",
            ],
            &["--rate-limit"],
        ),
        case(
            SCORE,
            &["--in", "gen.parquet", "--toxicity-model", "nope.json"],
            &["nope.json"],
        ),
        case(
            SCORE,
            &["--in", "gen.parquet", "--scorer", "oracle"],
            &["--scorer"],
        ),
    ];
    let n = check(&w, &cases);
    eprintln!("quark-score: {n} bad inputs");
}

#[test]
fn quark_bin_refuses_bad_quantiles_and_rows() {
    let w = Workdir::new();
    let ten = scored(&w, "ten.parquet", ten_scored());
    let mut nan = ten_scored();
    nan[3].reward = Some(f64::NAN);
    let nan = scored(&w, "nan.parquet", nan);
    let again = scored(&w, "again.parquet", ten_scored());
    std::fs::write(w.path("junk.parquet"), b"junk").unwrap();
    let cases = vec![
        case(BIN, &["--in", &ten, "--quantiles", "0"], &["--quantiles"]),
        case(
            BIN,
            &["--in", &ten, "--quantiles", "4294967295"],
            &["--quantiles"],
        ),
        case(BIN, &["--in", &ten, "--quantiles", "-3"], &["--quantiles"]),
        case(
            BIN,
            &["--in", &ten, "--quantiles", "20"],
            &["ten.parquet", "--quantiles 20", "10"],
        ),
        case(
            BIN,
            &["--in", &nan],
            &["nan.parquet", "row 3", "non-finite"],
        ),
        case(
            BIN,
            &["--in", &ten, &again],
            &["again.parquet", "appears twice"],
        ),
        case(
            BIN,
            &["--in", &ten, "--max-pool-rows", "0"],
            &["--max-pool-rows"],
        ),
        case(BIN, &["--in", "junk.parquet"], &["junk.parquet"]),
        case(
            BIN,
            &["--in", &ten, "--pool", "junk.parquet"],
            &["junk.parquet"],
        ),
    ];
    let n = check(&w, &cases);
    eprintln!("quark-bin: {n} bad inputs");
}

#[test]
fn quark_fit_refuses_bad_options_and_pools_before_training() {
    let w = Workdir::new();
    let m = tiny("gpt2");
    let good = pool(&w, "good.parquet", 2, |_| {});
    let vocab_out = pool(&w, "vocab.parquet", 2, |r| {
        r[6].generation.completion_tokens[1] = 999_999
    });
    let prompt_out = pool(&w, "prompt-vocab.parquet", 2, |r| {
        r[2].generation.prompt_tokens[0] = 999_999
    });
    let quantile = pool(&w, "quantile.parquet", 2, |r| r[5].quantile = Some(7));
    let no_prompt = pool(&w, "no-prompt.parquet", 2, |r| {
        r[1].generation.prompt_tokens.clear()
    });
    let long = pool(&w, "long.parquet", 2, |r| {
        r[4].generation.completion_tokens = vec![3; 80]
    });
    let huge_k = pool(&w, "huge-k.parquet", 4_294_967_295, |_| {});
    // An imported model folder is nobody's checkpoint folder.
    std::fs::create_dir(w.path("imported")).unwrap();
    std::fs::write(w.path("imported/config.json"), "{}").unwrap();
    let marker = testing::meta("import", serde_json::json!({}));
    std::fs::write(
        w.path("imported").join(quark::stage::DIR_MARKER),
        serde_json::to_string(&marker).unwrap(),
    )
    .unwrap();
    let fit = |pool: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--pool",
            pool,
            "--policy",
            &m,
            "--reference",
            &m,
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--out") {
            a.extend(["--out".to_owned(), "ckpt".to_owned()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let c = |args: Vec<String>, names: &[&'static str]| Case {
        exe: FIT,
        args,
        stdin: None,
        names: names.to_vec(),
    };
    let cases = vec![
        c(fit(&good, &["--lr", "NaN"]), &["--lr", "finite"]),
        c(fit(&good, &["--lr", "-1"]), &["--lr"]),
        c(fit(&good, &["--lr", "inf"]), &["--lr"]),
        c(fit(&good, &["--lr", "0"]), &["--lr"]),
        c(
            fit(&good, &["--schedule", "cosine"]),
            &["--schedule", "linear or constant"],
        ),
        c(fit(&good, &["--adam-eps", "0"]), &["--adam-eps"]),
        c(fit(&good, &["--kl-coef", "-0.1"]), &["--kl-coef"]),
        c(fit(&good, &["--entropy-coef", "NaN"]), &["--entropy-coef"]),
        c(fit(&good, &["--max-grad-norm", "0"]), &["--max-grad-norm"]),
        c(
            fit(&good, &["--grad-accum", "3"]),
            &["--batch-size 4", "--grad-accum 3"],
        ),
        c(fit(&good, &["--batch-size", "0"]), &["--batch-size"]),
        c(fit(&good, &["--dtype", "fp8"]), &["--dtype"]),
        c(
            fit(&vocab_out, &[]),
            &["vocab.parquet", "row 6", "999999", "completion_tokens"],
        ),
        c(
            fit(&prompt_out, &[]),
            &["prompt-vocab.parquet", "row 2", "prompt_tokens"],
        ),
        c(
            fit(&quantile, &[]),
            &["quantile.parquet", "row 5", "quantile 7"],
        ),
        c(
            fit(&no_prompt, &[]),
            &["no-prompt.parquet", "row 1", "no prompt tokens"],
        ),
        c(fit(&long, &[]), &["long.parquet", "row 4", "positions"]),
        c(fit(&huge_k, &[]), &["huge-k.parquet", "4294967295"]),
        c(
            fit(&good, &["--out", "imported"]),
            &["imported", "`import` output"],
        ),
        c(fit("missing.parquet", &[]), &["missing.parquet"]),
    ];
    let n = check(&w, &cases);
    assert!(
        w.path("imported/config.json").is_file(),
        "the import is intact"
    );
    eprintln!("quark-fit: {n} bad inputs");
}

#[test]
fn quark_eval_and_quark_import_refuse_bad_input_and_keep_user_folders() {
    let w = Workdir::new();
    let mut nan: Vec<ScoredRow> = (0..4)
        .map(|i| testing::scored(&format!("p{i}"), 0, 0, Some(0.5), 1))
        .collect();
    nan[2].reward = Some(f64::NAN);
    let nan = scored(&w, "nan.parquet", nan);
    let mut twice: Vec<ScoredRow> = (0..4)
        .map(|i| testing::scored(&format!("p{i}"), 0, 0, Some(0.5), 1))
        .collect();
    twice.push(twice[1].clone());
    let twice = scored(&w, "twice.parquet", twice);
    let empty = scored(&w, "empty.parquet", Vec::new());
    let good = scored(
        &w,
        "good.parquet",
        (0..4)
            .map(|i| testing::scored(&format!("p{i}"), 0, 0, Some(0.5), 1))
            .collect(),
    );
    std::fs::create_dir(w.path("mine")).unwrap();
    std::fs::write(w.path("mine/notes.txt"), "my notes").unwrap();
    std::fs::write(w.path("fake.gguf"), b"GGUF but not really").unwrap();
    let cases = vec![
        case(
            EVAL,
            &["--in", &nan, "--out", "report"],
            &["nan.parquet", "row 2", "non-finite"],
        ),
        case(
            EVAL,
            &["--in", &twice, "--out", "report"],
            &["twice.parquet", "appears twice"],
        ),
        case(
            EVAL,
            &["--in", &empty, "--out", "report"],
            &["empty.parquet", "no rows"],
        ),
        case(
            EVAL,
            &["--in", &good, "--out", "mine"],
            &["mine", "refusing"],
        ),
        case(
            EVAL,
            &["--in", &good, "--out", "report", "--pool", "nan.parquet"],
            &["nan.parquet"],
        ),
        case(
            IMPORT,
            &["--gguf", "fake.gguf", "--out", "mine"],
            &["mine", "refusing"],
        ),
        case(
            IMPORT,
            &["--gguf", "fake.gguf", "--out", "model"],
            &["fake.gguf"],
        ),
        case(
            IMPORT,
            &["--gguf", "missing.gguf", "--out", "model"],
            &["missing.gguf"],
        ),
    ];
    let n = check(&w, &cases);
    assert_eq!(
        std::fs::read_to_string(w.path("mine/notes.txt")).unwrap(),
        "my notes",
        "the user's folder is intact"
    );
    eprintln!("quark-eval and quark-import: {n} bad inputs");
}

#[test]
fn a_killed_runs_temporary_files_are_removed_by_the_next_run_of_the_same_stage() {
    let w = Workdir::new();
    let ten = scored(&w, "ten.parquet", ten_scored());
    let args = [
        "--in",
        ten.as_str(),
        "--quantiles",
        "2",
        "--out",
        "pool.parquet",
    ];
    let host = quark::stage::host_tag();
    // What runs killed mid-write leave (their processes are long gone), a live run's
    // file (this test's own process), another machine's, and another output's.
    let dead = format!(".tmp-999999999-{host}-pool.parquet");
    let dead_old = format!(".tmp-999999998-{host}-pool.parquet.old");
    let live = format!(".tmp-{}-{host}-pool.parquet", std::process::id());
    let elsewhere = ".tmp-999999999-0badc0de-pool.parquet".to_owned();
    let other = format!(".tmp-999999999-{host}-ckpt");
    for f in [&dead, &dead_old, &live, &elsewhere] {
        std::fs::write(w.path(f), b"half").unwrap();
    }
    std::fs::create_dir(w.path(&other)).unwrap();
    assert_eq!(w.run(BIN, &args).path(), PathBuf::from("pool.parquet"));
    assert!(!w.path(&dead).exists() && !w.path(&dead_old).exists());
    assert!(w.path(&live).exists(), "a running process's file stays");
    assert!(w.path(&elsewhere).exists(), "another machine's file stays");
    assert!(
        w.path(&other).exists(),
        "another output's temporary folder stays"
    );
}

#[test]
fn standard_input_is_named_as_such_and_never_left_behind() {
    let w = Workdir::new();
    generations(&w, 3);
    let bytes = std::fs::read(w.path("gen.parquet")).unwrap();
    std::fs::create_dir(w.path("out")).unwrap();
    // The spooled copy goes to the temporary folder, which must be empty again after.
    std::fs::create_dir(w.path("tmp")).unwrap();
    let run = w.run_with_stdin_env(
        SCORE,
        &["--in", "-", "--scorer", "profanity", "--out", "out/"],
        &bytes,
        &[("TMPDIR", w.path("tmp").as_os_str())],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        std::fs::read_dir(w.path("tmp")).unwrap().count(),
        0,
        "the spool is removed"
    );
    let written: Vec<_> = std::fs::read_dir(w.path("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(written.len(), 1, "only the scored file: {written:?}");
    assert!(written[0].to_string_lossy().starts_with("scored-"));
}

#[test]
fn the_programs_find_their_assets_from_any_folder() {
    let w = Workdir::new();
    generations(&w, 3);
    // The work folder is far from the checkout: the classifier comes from the
    // program's own installation.
    let scored = w.run(
        SCORE,
        &[
            "--in",
            "gen.parquet",
            "--scorer",
            "toxicity",
            "--out",
            "s.parquet",
        ],
    );
    assert_eq!(
        scored.path(),
        PathBuf::from("s.parquet"),
        "{}",
        scored.stderr
    );
    let rows = quark::schema::read_table::<ScoredRow>(&w.path("s.parquet")).unwrap();
    assert!(rows.iter().all(|r| r.reward.is_some()));
}

#[test]
fn quark_score_scores_another_tools_texts_and_carries_their_columns() {
    let w = Workdir::new();
    duckdb_write(
        &w,
        "select * from (values ('web', 'You are', ' a damn fool', 3::bigint), \
         ('book', 'It was', ' a fine day', 4::bigint)) t(source, prompt, completion, length)",
        "texts.parquet",
    );
    let out = w
        .run(
            SCORE,
            &[
                "--in",
                "texts.parquet",
                "--scorer",
                "profanity",
                "--out",
                "s.parquet",
            ],
        )
        .path();
    let rows = crate::util::duckdb(&format!(
        "select source, prompt, completion, length, reward is not null, profanity >= 0 from '{}' order by source",
        w.root().join(out).display()
    ));
    assert_eq!(
        rows,
        serde_json::json!([
            ["book", "It was", " a fine day", 4, true, true],
            ["web", "You are", " a damn fool", 3, true, true]
        ])
    );
    let cols = crate::util::duckdb(&format!(
        "select column_name from (describe select * from '{}')",
        w.path("s.parquet").display()
    ));
    assert_eq!(
        cols,
        serde_json::json!([
            ["source"],
            ["prompt"],
            ["completion"],
            ["length"],
            [col::REWARD],
            ["profanity"]
        ])
    );
}

#[test]
fn empty_tables_map_to_empty_tables_and_aggregates_refuse_them() {
    let w = Workdir::new();
    let m = tiny("gpt2");
    std::fs::write(w.path("none.txt"), "").unwrap();
    let gens = w
        .run(
            SAMPLE,
            &[
                "--model",
                &m,
                "--prompts",
                "none.txt",
                "--out",
                "gen.parquet",
                "--quiet",
            ],
        )
        .path();
    let scored_path = w
        .run(
            SCORE,
            &[
                "--in",
                gens.to_str().unwrap(),
                "--scorer",
                "profanity",
                "--out",
                "s.parquet",
            ],
        )
        .path();
    let s = scored_path.to_str().unwrap();
    assert!(quark::schema::read_table::<ScoredRow>(&w.root().join(s))
        .unwrap()
        .is_empty());
    let cases = vec![
        case(BIN, &["--in", s], &["s.parquet", "no scored rows"]),
        case(
            EVAL,
            &["--in", s, "--out", "report"],
            &["s.parquet", "no rows"],
        ),
    ];
    check(&w, &cases);
    // An empty table beside rows is fine: the pool is the rows.
    let ten = scored(&w, "ten.parquet", ten_scored());
    w.run(
        BIN,
        &["--in", &ten, s, "--quantiles", "2", "--out", "pool.parquet"],
    )
    .path();
}
