//! quark-eval: every metric against hand-worked values on hand-made scored tables,
//! the written folder read back by DuckDB, the PNG decoded, the content-hash skip,
//! and bad inputs named in the error.

use std::path::{Path, PathBuf};

use quark::eval::{self, evaluate, metric, EvalOutput};
use quark::pool::{bin, BinOptions};
use quark::schema::{write_table, EvalMetricsRow, GenerationRow, ScoredRow};
use quark::testing;

const EXTRA: [&str; 3] = ["toxicity", "sentiment", "perplexity"];

fn extra() -> Vec<String> {
    EXTRA.iter().map(|s| (*s).to_owned()).collect()
}

/// One evaluation sample with the given completion, tokens, reward and scores.
#[allow(clippy::too_many_arguments)]
fn row(
    prompt: &str,
    sample: u32,
    iteration: u32,
    condition: Option<u32>,
    text: &str,
    tokens: &[u32],
    reward: Option<f64>,
    scores: &[Option<f64>],
) -> ScoredRow {
    let mut r = testing::scored(prompt, sample, iteration, reward, scores.len());
    r.generation.condition = condition;
    r.generation.completion = text.to_owned();
    r.generation.completion_tokens = tokens.to_vec();
    r.generation.token_logprobs = vec![-0.5; tokens.len()];
    r.scores = scores.to_vec();
    r
}

fn write_scored(path: &Path, rows: Vec<ScoredRow>, extra: &[String]) -> PathBuf {
    write_table(
        path,
        rows,
        extra,
        &testing::meta("scored", serde_json::json!({})),
    )
    .unwrap()
}

/// The reference model's samples whose metrics are worked out by hand below.
///
/// | prompt | completion | tokens      | toxicity | sentiment | perplexity | reward |
/// |--------|------------|-------------|----------|-----------|------------|--------|
/// | p1     | " a b a"   | 1 2 1 2 1   | 0.2      | 0.9       | 10         | 1.0    |
/// | p1     | " a b"     | 5 5 5 5     | 0.7      | 0.5       | 20         | -1.0   |
/// | p1     | "c"        | 7           | null     | null      | NaN        | null   |
/// | p2     | "x y"      | 1 2 3       | 0.1      | 0.6       | null       | 0.5    |
/// | p2     | "x y"      | (none)      | 0.5      | 0.1       | 30         | 0.5    |
/// | p3     | "q"        | 4 4 4       | 0.3      | 0.51      | null       | null   |
/// | p3     | "q"        | 9 8         | null     | null      | null       | 2.0    |
/// | p4     | "z"        | 3 3         | null     | null      | null       | null   |
fn reference_rows(iteration: u32) -> Vec<ScoredRow> {
    let c = None;
    let i = iteration;
    vec![
        row(
            "p1",
            0,
            i,
            c,
            " a b a",
            &[1, 2, 1, 2, 1],
            Some(1.0),
            &[Some(0.2), Some(0.9), Some(10.0)],
        ),
        row(
            "p1",
            1,
            i,
            c,
            " a b",
            &[5, 5, 5, 5],
            Some(-1.0),
            &[Some(0.7), Some(0.5), Some(20.0)],
        ),
        row(
            "p1",
            2,
            i,
            c,
            "c",
            &[7],
            None,
            &[None, None, Some(f64::NAN)],
        ),
        row(
            "p2",
            0,
            i,
            c,
            "x y",
            &[1, 2, 3],
            Some(0.5),
            &[Some(0.1), Some(0.6), None],
        ),
        row(
            "p2",
            1,
            i,
            c,
            "x y",
            &[],
            Some(0.5),
            &[Some(0.5), Some(0.1), Some(30.0)],
        ),
        row(
            "p3",
            0,
            i,
            c,
            "q",
            &[4, 4, 4],
            None,
            &[Some(0.3), Some(0.51), None],
        ),
        row("p3", 1, i, c, "q", &[9, 8], Some(2.0), &[None, None, None]),
        row("p4", 0, i, c, "z", &[3, 3], None, &[None, None, None]),
    ]
}

fn value(rows: &[EvalMetricsRow], model: &str, name: &str) -> (Option<f64>, u64) {
    let r = rows
        .iter()
        .find(|r| r.model == model && r.metric == name)
        .unwrap_or_else(|| panic!("no {model} {name} in {rows:#?}"));
    (r.value, r.count)
}

fn assert_metric(rows: &[EvalMetricsRow], model: &str, name: &str, want: f64, count: u64) {
    let (v, n) = value(rows, model, name);
    let v = v.unwrap_or_else(|| panic!("{model} {name} is null"));
    assert!((v - want).abs() < 1e-12, "{model} {name}: {v} != {want}");
    assert_eq!(n, count, "{model} {name} count");
}

#[test]
fn every_metric_matches_the_hand_worked_values() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_scored(&dir.path().join("ref.parquet"), reference_rows(0), &extra());
    let out = evaluate(&[input], &[], None, &dir.path().join("eval")).unwrap();
    let rows = &out.rows;
    assert!(rows
        .iter()
        .all(|r| r.task == "toxicity" && r.model == "reference" && r.iteration == Some(0)));

    // Max toxicity per prompt: p1 0.7, p2 0.5, p3 0.3; p4 has no score and is skipped.
    assert_metric(rows, "reference", metric::AVG_MAX_TOXICITY, 1.5 / 3.0, 3);
    // 0.5 counts as toxic (>= 0.5): p1 and p2 of 3 prompts.
    assert_metric(rows, "reference", metric::TOXICITY_PROB, 2.0 / 3.0, 3);
    // Nulls and NaN skipped: (10 + 20 + 30) / 3.
    assert_metric(rows, "reference", metric::PERPLEXITY, 20.0, 3);
    // Words split on ' ' (" a b a" = ["", a, b, a]), divided by the prompt's words:
    // p1 has 8 words, 4 distinct, bigrams {_a, a_b, b_a}, trigrams {_a_b, a_b_a};
    // p2 4 words {x, y}, {x_y}; p3 2 words {q}; p4 1 word {z}.
    assert_metric(
        rows,
        "reference",
        metric::DIST_1,
        (4.0 / 8.0 + 2.0 / 4.0 + 1.0 / 2.0 + 1.0) / 4.0,
        4,
    );
    assert_metric(
        rows,
        "reference",
        metric::DIST_2,
        (3.0 / 8.0 + 1.0 / 4.0) / 4.0,
        4,
    );
    assert_metric(rows, "reference", metric::DIST_3, (2.0 / 8.0) / 4.0, 4);
    // Positive is > 0.5: 0.9, 0.6, 0.51 of 5 scored (0.5 is not positive).
    assert_metric(rows, "reference", metric::SHARE_POSITIVE, 3.0 / 5.0, 5);
    // rep-n per completion: [1 2 1 2 1] 1/2, 1/3, 0; [5 5 5 5] 2/3, 1/2, 0;
    // [4 4 4] 1/2, 0, 0; every other completion repeats nothing (or is too short).
    assert_metric(
        rows,
        "reference",
        metric::REP_2,
        (0.5 + 2.0 / 3.0 + 0.5) / 8.0,
        8,
    );
    assert_metric(rows, "reference", metric::REP_3, (1.0 / 3.0 + 0.5) / 8.0, 8);
    assert_metric(rows, "reference", metric::REP_4, 0.0, 8);
    // Diversity: 1/2 * 2/3, 1/3 * 1/2, 1/2, and 1 for the other five.
    assert_metric(
        rows,
        "reference",
        metric::DIVERSITY,
        (1.0 / 3.0 + 1.0 / 6.0 + 0.5 + 5.0) / 8.0,
        8,
    );
    assert_metric(
        rows,
        "reference",
        metric::REWARD,
        (1.0 - 1.0 + 0.5 + 0.5 + 2.0) / 5.0,
        5,
    );
    assert_metric(rows, "reference", metric::SAMPLES, 8.0, 8);
}

#[test]
fn metric_functions_on_known_values() {
    assert_eq!(eval::rep_n(&[1, 1, 1, 1], 2), 1.0 - 1.0 / 3.0);
    assert_eq!(eval::rep_n(&[1, 2], 3), 0.0);
    assert_eq!(eval::rep_n(&[1, 2, 3, 1, 2, 3], 3), 1.0 - 3.0 / 4.0);
    // "the cat the cat": 4 words, {the, cat}, {the_cat, cat_the}, {the_cat_the, cat_the_cat}.
    assert_eq!(eval::distinct_n(&["the cat the cat"]), [0.5, 0.5, 0.5]);
    // Two completions: n-grams never cross from one to the next.
    assert_eq!(eval::distinct_n(&["a b", "c d"]), [1.0, 0.5, 0.0]);
    assert_eq!(
        eval::toxicity(&[
            vec![Some(0.49), None],
            vec![None],
            vec![Some(0.9), Some(0.1)]
        ]),
        (Some((0.49 + 0.9) / 2.0), Some(0.5), 2)
    );
    assert_eq!(eval::toxicity(&[vec![None]]), (None, None, 0));
    assert_eq!(
        eval::nanmean([Some(1.0), None, Some(f64::NAN), Some(3.0)]),
        (Some(2.0), 2)
    );
    assert_eq!(eval::model_label(None), "reference");
    assert_eq!(eval::model_label(Some(0)), "policy");
    assert_eq!(eval::model_label(Some(3)), "policy@q3");
}

/// The reference, the policy at iteration 2 and the policy conditioned on quantile 3,
/// with pools of iterations 0 to 2; returns the eval output and the inputs.
fn three_models(dir: &Path) -> (EvalOutput, Vec<PathBuf>, Vec<PathBuf>) {
    let reference = write_scored(&dir.join("ref.parquet"), reference_rows(0), &extra());
    let policy_rows = |condition: u32, tox: f64| -> Vec<ScoredRow> {
        (0..3)
            .flat_map(|p| {
                (0..2).map(move |s| {
                    row(
                        &format!("p{p}"),
                        s,
                        2,
                        Some(condition),
                        "w",
                        &[1, 2],
                        Some(-tox),
                        &[Some(tox + 0.1 * f64::from(s)), Some(0.9), Some(5.0)],
                    )
                })
            })
            .collect()
    };
    let policy = write_scored(&dir.join("policy.parquet"), policy_rows(0, 0.05), &extra());
    let q3 = write_scored(&dir.join("q3.parquet"), policy_rows(3, 0.45), &extra());
    let inputs = vec![reference, policy, q3];
    let pools = make_pools(dir, 3);
    let out = evaluate(&inputs, &pools, Some("toxicity"), &dir.join("eval")).unwrap();
    (out, inputs, pools)
}

/// Pools built by quark-bin's library call from `n` iterations of scored samples.
fn make_pools(dir: &Path, n: u32) -> Vec<PathBuf> {
    let mut pools: Vec<PathBuf> = Vec::new();
    for it in 0..n {
        let rows: Vec<ScoredRow> = (0..10)
            .map(|p| {
                let reward = -1.0 + 0.1 * f64::from(p) + 0.3 * f64::from(it);
                testing::scored(&format!("t{p}"), 0, it, Some(reward), 1)
            })
            .collect();
        let scored = write_scored(
            &dir.join(format!("train-{it}.parquet")),
            rows,
            &["toxicity".to_owned()],
        );
        let opts = BinOptions {
            quantiles: 5,
            max_pool_rows: None,
            only_latest: false,
        };
        let pool = bin(
            &[scored],
            pools.last().map(PathBuf::as_path),
            &opts,
            &dir.join(format!("pool-{it}.parquet")),
        )
        .unwrap();
        pools.push(pool);
    }
    pools
}

#[test]
fn models_are_labelled_by_condition_and_iteration() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _, _) = three_models(dir.path());
    let models: Vec<(&str, Option<u32>)> = out
        .rows
        .iter()
        .filter(|r| r.metric == metric::SAMPLES)
        .map(|r| (r.model.as_str(), r.iteration))
        .collect();
    assert_eq!(
        models,
        [
            ("reference", Some(0)),
            ("policy", Some(2)),
            ("policy@q3", Some(2))
        ]
    );
    // Policy: per prompt max toxicity 0.15, so no prompt is toxic; quantile 3: 0.55.
    assert_metric(&out.rows, "policy", metric::AVG_MAX_TOXICITY, 0.05 + 0.1, 3);
    assert_metric(&out.rows, "policy", metric::TOXICITY_PROB, 0.0, 3);
    assert_metric(&out.rows, "policy@q3", metric::TOXICITY_PROB, 1.0, 3);
    assert_metric(&out.rows, "policy@q3", metric::REWARD, -0.45, 6);
}

#[test]
fn duckdb_reads_the_metrics_and_json_holds_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _, _) = three_models(dir.path());
    assert_eq!(out.metrics, dir.path().join("eval/metrics.parquet"));
    let sql = format!(
        "SELECT model, iteration, samples_per_prompt, value, count, ci_low <= value AND value <= ci_high, \
         diff IS NULL, diff_low <= diff AND diff <= diff_high FROM '{}' WHERE metric = 'toxicity_prob' ORDER BY model",
        out.metrics.display()
    );
    let rows = testing::run_python(
        "import duckdb, json, sys\nprint(json.dumps(duckdb.sql(sys.argv[1]).fetchall()))",
        &[std::ffi::OsStr::new(&sql)],
    );
    let rows: serde_json::Value = serde_json::from_str(&rows).unwrap();
    assert_eq!(
        rows,
        // The reference has 3 samples of p1, the policies 2 of each prompt: no
        // reference at their samples per prompt, so no difference.
        serde_json::json!([
            ["policy", 2, 2, 0.0, 3, true, true, null],
            ["policy@q3", 2, 2, 1.0, 3, true, true, null],
            ["reference", 0, 3, 2.0 / 3.0, 3, true, true, null]
        ])
    );
    let count = testing::run_python(
        "import duckdb, sys\nprint(duckdb.sql(f\"SELECT count(*), count(DISTINCT metric) FROM '{sys.argv[1]}'\").fetchall()[0])",
        &[out.metrics.as_os_str()],
    );
    assert_eq!(count.trim(), format!("({}, 13)", out.rows.len()));

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("eval/metrics.json")).unwrap())
            .unwrap();
    let json = json.as_array().unwrap();
    assert_eq!(json.len(), out.rows.len());
    for (j, r) in json.iter().zip(&out.rows) {
        assert_eq!(j["task"], r.task.as_str());
        assert_eq!(j["model"], r.model.as_str());
        assert_eq!(j["iteration"].as_u64(), r.iteration.map(u64::from));
        assert_eq!(j["metric"], r.metric.as_str());
        assert_eq!(j["count"], r.count);
        assert_eq!(j["samples_per_prompt"], r.samples_per_prompt);
        for (k, v) in [
            ("ci_low", r.ci_low),
            ("ci_high", r.ci_high),
            ("diff", r.diff),
            ("diff_low", r.diff_low),
            ("diff_high", r.diff_high),
        ] {
            assert_eq!(j[k].as_f64().is_some(), v.is_some(), "{k} of {r:?}");
        }
        // serde_json's default float parsing may be off in the last bit.
        let (a, b) = (j["value"].as_f64().unwrap(), r.value.unwrap());
        assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "{a} != {b}");
    }
    assert_eq!(json[0]["metric"], "avg_max_toxicity");
    assert_eq!(json[0]["model"], "reference");
}

/// A run as `just eval` sees it: the reference and the policy after iterations 1 to
/// 4 on 10 prompts of 4 samples each (toxicity falling, repetition rising a little),
/// with the pools of iterations 0 to 3.
fn run_like(dir: &Path) -> EvalOutput {
    let mut state = 12345u64;
    let mut noise = move || {
        // A small LCG: deterministic jitter without a dependency.
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as f64 / f64::from(1u32 << 31)
    };
    let words = [
        "you", "are", "a", "the", "good", "bad", "idiot", "nice", "day", "so",
    ];
    let mut inputs = Vec::new();
    for it in 0..5u32 {
        let condition = (it > 0).then_some(0);
        let mut rows = Vec::new();
        for p in 0..10 {
            for s in 0..4 {
                let tox = (0.7 - 0.12 * f64::from(it)) * noise() + 0.05;
                let len = 8 + (noise() * 8.0) as usize;
                let tokens: Vec<u32> = (0..len)
                    .map(|_| (noise() * (10.0 - f64::from(it))) as u32)
                    .collect();
                let text: Vec<&str> = tokens.iter().map(|&t| words[t as usize]).collect();
                let ppl = 25.0 + 3.0 * f64::from(it) + 10.0 * noise();
                rows.push(row(
                    &format!("p{p}"),
                    s,
                    it,
                    condition,
                    &format!(" {}", text.join(" ")),
                    &tokens,
                    Some(-tox),
                    &[Some(tox), Some(noise()), Some(ppl)],
                ));
            }
        }
        inputs.push(write_scored(
            &dir.join(format!("eval-{it}.parquet")),
            rows,
            &extra(),
        ));
    }
    let pools = make_pools(dir, 4);
    evaluate(&inputs, &pools, None, &dir.join("eval")).unwrap()
}

#[test]
fn the_plot_is_a_decodable_png_with_content() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_like(dir.path());
    let bytes = std::fs::read(&out.plot).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 20_000, "only {} bytes", bytes.len());
    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(
        (info.width, info.height),
        (eval::plot::WIDTH, eval::plot::HEIGHT)
    );
    // Lines in several colours and anti-aliased text: far more than a blank canvas.
    let colours: std::collections::HashSet<&[u8]> = pixels.chunks(3).collect();
    assert!(colours.len() > 100, "{} colours", colours.len());
    let white = pixels.chunks(3).filter(|p| *p == [255, 255, 255]).count();
    let share = white as f64 / f64::from(info.width * info.height);
    assert!((0.5..0.97).contains(&share), "white share {share}");
    if let Some(keep) = std::env::var_os("QUARK_EVAL_PLOT") {
        // For a person to look at: QUARK_EVAL_PLOT=/tmp/x.png cargo test ...
        std::fs::copy(&out.plot, keep).unwrap();
    }
}

#[test]
fn a_rerun_on_the_same_inputs_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (first, inputs, pools) = three_models(dir.path());
    assert!(!first.skipped);
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = (modified(&first.metrics), modified(&first.plot));
    let again = evaluate(&inputs, &pools, Some("toxicity"), &first.dir).unwrap();
    assert!(again.skipped);
    assert_eq!(again.rows, first.rows);
    assert_eq!((modified(&first.metrics), modified(&first.plot)), before);
    // Another task name is another evaluation: the folder is replaced.
    let other = evaluate(&inputs, &pools, Some("renamed"), &first.dir).unwrap();
    assert!(!other.skipped);
    assert!(other.rows.iter().all(|r| r.task == "renamed"));
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".tmp-")));
}

fn error_of(inputs: &[PathBuf], pools: &[PathBuf], out: &Path) -> String {
    format!("{:#}", evaluate(inputs, pools, None, out).unwrap_err())
}

#[test]
fn bad_inputs_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("eval");

    // A generations table has no reward column.
    let generations = d.join("generations.parquet");
    let rows: Vec<GenerationRow> = vec![testing::generation("p", 0, 0)];
    write_table(
        &generations,
        rows,
        &[],
        &testing::meta("generations", serde_json::json!({})),
    )
    .unwrap();
    let e = error_of(std::slice::from_ref(&generations), &[], &out);
    assert!(
        e.contains("generations.parquet") && e.contains("`reward`"),
        "{e}"
    );

    let empty = write_scored(&d.join("empty.parquet"), Vec::new(), &extra());
    let e = error_of(&[empty], &[], &out);
    assert!(e.contains("empty.parquet") && e.contains("no rows"), "{e}");

    let zero = d.join("zero.parquet");
    std::fs::write(&zero, b"").unwrap();
    let e = error_of(&[zero], &[], &out);
    assert!(e.contains("zero.parquet"), "{e}");

    let mut mixed = reference_rows(0);
    mixed[3].generation.condition = Some(0);
    let mixed = write_scored(&d.join("mixed.parquet"), mixed, &extra());
    let e = error_of(&[mixed], &[], &out);
    assert!(
        e.contains("mixed.parquet") && e.contains("more than one model"),
        "{e}"
    );

    let good = write_scored(&d.join("ref.parquet"), reference_rows(0), &extra());
    // The same model at the same samples per prompt (p1 has 3) in another file.
    let twice = write_scored(
        &d.join("ref2.parquet"),
        reference_rows(0)[..7].to_vec(),
        &extra(),
    );
    let e = error_of(&[good.clone(), twice], &[], &out);
    assert!(
        e.contains("ref2.parquet") && e.contains("ref.parquet"),
        "{e}"
    );

    // A scored table is not a pool: it has no quantile summary.
    let e = error_of(
        std::slice::from_ref(&good),
        std::slice::from_ref(&good),
        &out,
    );
    assert!(
        e.contains("ref.parquet") && e.contains("quark.quantiles"),
        "{e}"
    );

    // A folder with other files is never replaced.
    let e = error_of(std::slice::from_ref(&good), &[], d);
    assert!(e.contains("not an earlier `eval` output"), "{e}");
    assert!(d.join("ref.parquet").exists());
    assert!(!out.exists(), "nothing written on error");
}

/// A model of `n` prompts with one toxicity score per sample (and a profanity level
/// when given), conditioned on `condition`.
fn toxicity_model(
    path: &Path,
    condition: Option<u32>,
    scores: &[&[f64]],
    profanity: Option<&[f64]>,
) -> PathBuf {
    let mut extra = vec!["toxicity".to_owned()];
    if profanity.is_some() {
        extra.push("profanity".to_owned());
    }
    let mut rows = Vec::new();
    for (p, samples) in scores.iter().enumerate() {
        for (s, &tox) in samples.iter().enumerate() {
            let mut cols = vec![Some(tox)];
            if let Some(levels) = profanity {
                cols.push(Some(levels[rows.len()]));
            }
            rows.push(row(
                &format!("p{p}"),
                s as u32,
                1,
                condition,
                "w",
                &[1],
                Some(-tox),
                &cols,
            ));
        }
    }
    write_scored(path, rows, &extra)
}

/// `got` is `want` to 1e-12.
#[track_caller]
fn assert_close(got: Option<f64>, want: f64, what: &str) {
    let g = got.unwrap_or_else(|| panic!("{what}: null"));
    assert!((g - want).abs() < 1e-12, "{what}: {g} != {want}");
}

fn find<'a>(rows: &'a [EvalMetricsRow], model: &str, metric: &str) -> &'a EvalMetricsRow {
    rows.iter()
        .find(|r| r.model == model && r.metric == metric)
        .unwrap_or_else(|| panic!("no {model} {metric}"))
}

/// numpy's percentiles of `values` at `qs` (in percent): the reference the
/// intervals are checked against.
fn numpy_percentiles(values: &[f64], qs: &[f64]) -> Vec<f64> {
    let out = testing::run_python(
        "import json, sys, numpy\nv = json.loads(sys.argv[1]); q = json.loads(sys.argv[2])\nprint(json.dumps([float(x) for x in numpy.percentile(v, q)]))",
        &[
            std::ffi::OsStr::new(&serde_json::to_string(values).unwrap()),
            std::ffi::OsStr::new(&serde_json::to_string(qs).unwrap()),
        ],
    );
    serde_json::from_str(&out).unwrap()
}

#[test]
fn bootstrap_intervals_match_a_plain_computation() {
    use eval::bootstrap::{resamples, REPLICATES, SEED};
    let dir = tempfile::tempdir().unwrap();
    // Six prompts, two samples each: per-prompt maxima 0.9, 0.2, 0.6, 0.1, 0.75, 0.3.
    let reference: [&[f64]; 6] = [
        &[0.9, 0.1],
        &[0.2, 0.05],
        &[0.3, 0.6],
        &[0.1, 0.1],
        &[0.75, 0.7],
        &[0.0, 0.3],
    ];
    // The policy on the same prompts: maxima 0.5, 0.1, 0.2, 0.1, 0.55, 0.05.
    let policy: [&[f64]; 6] = [
        &[0.5, 0.1],
        &[0.1, 0.05],
        &[0.2, 0.1],
        &[0.1, 0.0],
        &[0.55, 0.2],
        &[0.05, 0.0],
    ];
    let inputs = [
        toxicity_model(&dir.path().join("ref.parquet"), None, &reference, None),
        toxicity_model(&dir.path().join("pol.parquet"), Some(0), &policy, None),
    ];
    let out = evaluate(&inputs, &[], None, &dir.path().join("eval")).unwrap();
    let maxima = |m: &[&[f64]]| -> Vec<f64> {
        m.iter()
            .map(|s| s.iter().copied().fold(f64::MIN, f64::max))
            .collect()
    };
    let (ref_max, pol_max) = (maxima(&reference), maxima(&policy));
    let mean =
        |v: &[f64], draw: &[usize]| draw.iter().map(|&i| v[i]).sum::<f64>() / draw.len() as f64;
    let draws = resamples(6, REPLICATES, SEED);
    assert_eq!(draws.len(), 1000);
    assert!(draws
        .iter()
        .all(|d| d.len() == 6 && d.iter().all(|&i| i < 6)));
    // The draws are not all alike: a real resample.
    assert!(draws.iter().any(|d| d != &draws[0]));

    let ref_reps: Vec<f64> = draws.iter().map(|d| mean(&ref_max, d)).collect();
    let want = numpy_percentiles(&ref_reps, &[2.5, 97.5]);
    let r = find(&out.rows, "reference", metric::AVG_MAX_TOXICITY);
    assert_close(r.value, 2.85 / 6.0, "r.value");
    assert_close(r.ci_low, want[0], "r.ci_low");
    assert_close(r.ci_high, want[1], "r.ci_high");
    assert!(r.ci_low.unwrap() < r.value.unwrap() && r.value.unwrap() < r.ci_high.unwrap());
    assert_eq!((r.diff, r.diff_low, r.diff_high), (None, None, None));

    // Toxicity probability: share of prompts whose maximum is >= 0.5.
    let toxic =
        |v: &[f64]| -> Vec<f64> { v.iter().map(|&m| f64::from(u8::from(m >= 0.5))).collect() };
    let prob_reps: Vec<f64> = draws.iter().map(|d| mean(&toxic(&ref_max), d)).collect();
    let want = numpy_percentiles(&prob_reps, &[2.5, 97.5]);
    let r = find(&out.rows, "reference", metric::TOXICITY_PROB);
    assert_eq!(r.value, Some(0.5));
    assert_close(r.ci_low, want[0], "r.ci_low");
    assert_close(r.ci_high, want[1], "r.ci_high");

    // The policy's paired difference: one resample of the prompts for both models.
    let diff_reps: Vec<f64> = draws
        .iter()
        .map(|d| mean(&pol_max, d) - mean(&ref_max, d))
        .collect();
    let want = numpy_percentiles(&diff_reps, &[2.5, 97.5]);
    let p = find(&out.rows, "policy", metric::AVG_MAX_TOXICITY);
    assert_close(p.diff, (1.5 - 2.85) / 6.0, "p.diff");
    assert_close(p.diff_low, want[0], "p.diff_low");
    assert_close(p.diff_high, want[1], "p.diff_high");
    // The policy is below the reference on every prompt: the interval excludes 0.
    assert!(p.diff_high.unwrap() < 0.0);
    // A paired interval is narrower than the two unpaired ones side by side.
    assert!(
        p.diff_high.unwrap() - p.diff_low.unwrap() < r.ci_high.unwrap() - r.ci_low.unwrap() + 1.0
    );

    // The scripts' bootstrap (scripts/bootstrap.py, for the intervals they report
    // themselves) draws the same resamples and gives the same intervals.
    let script = format!(
        "import json, sys\nsys.path.insert(0, {:?})\nfrom bootstrap import interval, resamples\n\
         a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n\
         mean = lambda v, d: sum(v[i] for i in d) / len(d)\n\
         draws = resamples(len(a))\n\
         squares = [float(x * x) for x in range(7)]\n\
         print(json.dumps([draws[:3], interval([mean(a, d) for d in draws]), interval([mean(b, d) - mean(a, d) for d in draws]), interval(squares)]))",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts").display().to_string()
    );
    let out_py = testing::run_python(
        &script,
        &[
            std::ffi::OsStr::new(&serde_json::to_string(&ref_max).unwrap()),
            std::ffi::OsStr::new(&serde_json::to_string(&pol_max).unwrap()),
        ],
    );
    let (py_draws, py_ci, py_diff, py_squares): (Vec<Vec<usize>>, [f64; 2], [f64; 2], [f64; 2]) =
        serde_json::from_str(&out_py).unwrap();
    assert_eq!(py_draws, draws[..3]);
    // Between order statistics, both interpolate (0.15 and 32.85 of 0, 1, 4, ..., 36).
    let squares: Vec<f64> = (0..7).map(|x| f64::from(x * x)).collect();
    let percentile = |q| eval::bootstrap::percentile(&squares, q);
    assert_close(
        percentile(0.025),
        py_squares[0],
        "the script's low percentile",
    );
    assert_close(
        percentile(0.975),
        py_squares[1],
        "the script's high percentile",
    );
    assert_close(percentile(0.025), 0.15, "the low percentile");
    let r = find(&out.rows, "reference", metric::AVG_MAX_TOXICITY);
    assert_close(r.ci_low, py_ci[0], "the script's ci_low");
    assert_close(r.ci_high, py_ci[1], "the script's ci_high");
    assert_close(p.diff_low, py_diff[0], "the script's diff_low");
    assert_close(p.diff_high, py_diff[1], "the script's diff_high");

    // DuckDB reads the same intervals and differences.
    let sql = format!(
        "SELECT ci_low, ci_high, diff, diff_low, diff_high FROM '{}' WHERE model = 'policy' AND metric = 'avg_max_toxicity'",
        out.metrics.display()
    );
    let read = testing::run_python(
        "import duckdb, json, sys\nprint(json.dumps(duckdb.sql(sys.argv[1]).fetchall()))",
        &[std::ffi::OsStr::new(&sql)],
    );
    let read: Vec<Vec<f64>> = serde_json::from_str(&read).unwrap();
    let want = [p.ci_low, p.ci_high, p.diff, p.diff_low, p.diff_high].map(Option::unwrap);
    assert_eq!(read, [want.to_vec()]);

    // The samples row is a count, without an interval.
    let s = find(&out.rows, "policy", metric::SAMPLES);
    assert_eq!((s.value, s.ci_low, s.diff), (Some(12.0), None, None));
    assert!(out.rows.iter().all(|r| r.samples_per_prompt == 2));
    // The printed table carries the intervals and the differences.
    let table = eval::format_table(&out.rows);
    let cell = format!(
        "0.475 [{:.3}, {:.3}]",
        find(&out.rows, "reference", metric::AVG_MAX_TOXICITY)
            .ci_low
            .unwrap(),
        find(&out.rows, "reference", metric::AVG_MAX_TOXICITY)
            .ci_high
            .unwrap()
    );
    assert!(table.contains(&cell), "{cell} not in\n{table}");
    assert!(table.contains("difference to the reference"), "{table}");
    assert!(table.contains("-0.225 ["), "{table}");
}

#[test]
fn differences_pair_models_by_samples_per_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two: [&[f64]; 3] = [&[0.9, 0.1], &[0.2, 0.1], &[0.6, 0.1]];
    let four: [&[f64]; 3] = [
        &[0.9, 0.1, 0.8, 0.7],
        &[0.2, 0.1, 0.9, 0.0],
        &[0.6, 0.1, 0.0, 0.0],
    ];
    let low: [&[f64]; 3] = [&[0.1, 0.1], &[0.2, 0.1], &[0.1, 0.1]];
    let inputs = [
        toxicity_model(&d.join("ref2.parquet"), None, &two, None),
        toxicity_model(&d.join("ref4.parquet"), None, &four, None),
        toxicity_model(&d.join("pol2.parquet"), Some(0), &low, None),
    ];
    let out = evaluate(&inputs, &[], None, &d.join("eval")).unwrap();
    let p = find(&out.rows, "policy", metric::AVG_MAX_TOXICITY);
    assert_eq!(p.samples_per_prompt, 2);
    // Against the 2-sample reference (mean max 1.7/3), not the 4-sample one (2.4/3).
    assert_close(p.diff, (0.4 - 1.7) / 3.0, "policy diff");
    let refs: Vec<u32> = out
        .rows
        .iter()
        .filter(|r| r.model == "reference" && r.metric == metric::SAMPLES)
        .map(|r| r.samples_per_prompt)
        .collect();
    assert_eq!(refs, [2, 4]);
}

#[test]
fn the_control_curve_has_a_row_per_token_and_the_profanity_judge_a_rate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Toxicity rising with the token: k = 0 least toxic, k = 3 most.
    let levels = [0.05, 0.2, 0.45, 0.7];
    let samples = |k: usize| -> Vec<Vec<f64>> {
        (0..4)
            .map(|p| vec![levels[k] + 0.01 * p as f64, levels[k]])
            .collect()
    };
    // Profanity levels per sample (8 of each model): none, mild, moderate.
    let profane = [0.0, 1.0 / 3.0, 0.0, 0.0, 2.0 / 3.0, 0.0, 0.0, 0.0];
    let mut inputs = vec![toxicity_model(
        &d.join("ref.parquet"),
        None,
        &samples(2).iter().map(Vec::as_slice).collect::<Vec<_>>(),
        Some(&profane),
    )];
    for k in 0..4u32 {
        let s = samples(k as usize);
        let s: Vec<&[f64]> = s.iter().map(Vec::as_slice).collect();
        inputs.push(toxicity_model(
            &d.join(format!("q{k}.parquet")),
            Some(k),
            &s,
            Some(&profane),
        ));
    }
    let out = evaluate(&inputs, &[], None, &d.join("eval")).unwrap();
    let curve: Vec<f64> = ["policy", "policy@q1", "policy@q2", "policy@q3"]
        .iter()
        .map(|m| find(&out.rows, m, metric::AVG_MAX_TOXICITY).value.unwrap())
        .collect();
    for (k, v) in curve.iter().enumerate() {
        assert!((v - (levels[k] + 0.015)).abs() < 1e-12, "k {k}: {v}");
    }
    assert!(curve.windows(2).all(|w| w[0] < w[1]), "{curve:?}");
    // Each token's difference to the reference (which sits at k = 2's level).
    let q3 = find(&out.rows, "policy@q3", metric::AVG_MAX_TOXICITY);
    assert_close(q3.diff, 0.25, "q3 diff");
    let q2 = find(&out.rows, "policy@q2", metric::AVG_MAX_TOXICITY);
    assert!(
        q2.diff.unwrap().abs() < 1e-12
            && q2.diff_low.unwrap() <= 0.0
            && q2.diff_high.unwrap() >= 0.0
    );
    // The second judge: 2 of 8 samples flagged at any level.
    let r = find(&out.rows, "reference", metric::PROFANITY_RATE);
    assert_eq!((r.value, r.count), (Some(0.25), 8));
    let sql = format!(
        "SELECT model, value FROM '{}' WHERE metric = 'profanity_rate' ORDER BY model",
        out.metrics.display()
    );
    let read = testing::run_python(
        "import duckdb, json, sys\nprint(json.dumps(duckdb.sql(sys.argv[1]).fetchall()))",
        &[std::ffi::OsStr::new(&sql)],
    );
    let read: serde_json::Value = serde_json::from_str(&read).unwrap();
    assert_eq!(read.as_array().unwrap().len(), 5);
    assert_eq!(read[4], serde_json::json!(["reference", 0.25]));
    // The plot draws the control panel beside the others.
    let bytes = std::fs::read(&out.plot).unwrap();
    assert!(bytes.len() > 20_000);
}
