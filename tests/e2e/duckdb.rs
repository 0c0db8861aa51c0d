//! DuckDB reads every table the programs write, with its key-value metadata.

use crate::util::{duckdb, Workdir};
use quark::schema::{write_table, PoolRow, PromptRow, Record};
use quark::testing;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_quark-bin");

fn write<R: Record>(w: &Workdir, rows: Vec<R>, extra: &[String]) -> String {
    let path = w.path(&format!("{}.parquet", R::TABLE.name()));
    let meta = testing::meta(R::TABLE.name(), json!({"k": 1}));
    write_table(&path, rows, extra, &meta).unwrap();
    path.to_string_lossy().into_owned()
}

fn kv(path: &str, key: &str) -> String {
    let rows = duckdb(&format!(
        "SELECT decode(value) FROM parquet_kv_metadata('{path}') WHERE decode(key) = '{key}'"
    ));
    rows[0][0].as_str().unwrap().to_owned()
}

#[test]
fn duckdb_reads_every_table_and_its_metadata() {
    let w = Workdir::new();
    let extra = vec!["toxicity".to_owned()];
    let files = [
        write(
            &w,
            vec![PromptRow {
                prompt_id: "a".into(),
                prompt: "é 🙂".into(),
            }],
            &[],
        ),
        write(
            &w,
            (0..3).map(|i| testing::generation("a", i, 0)).collect(),
            &[],
        ),
        write(
            &w,
            (0..3)
                .map(|i| testing::scored("a", i, 0, Some(0.5), 1))
                .collect(),
            &extra,
        ),
        write(
            &w,
            (0..3)
                .map(|i| {
                    let mut r = testing::scored("a", i, 0, Some(i as f64), 1);
                    r.quantile = Some(i);
                    PoolRow(r)
                })
                .collect(),
            &extra,
        ),
        write(&w, (0..3).map(testing::fit_metrics).collect(), &[]),
        write(&w, vec![testing::eval_metrics("dist_1", Some(0.5))], &[]),
    ];
    for f in &files {
        let stage = kv(f, "quark.stage");
        assert!(
            f.ends_with(&format!("{stage}.parquet")),
            "{f}: stage {stage}"
        );
        assert_eq!(kv(f, "quark.params"), r#"{"k":1}"#);
        assert_eq!(kv(f, "quark.key").len(), 64);
        let n = duckdb(&format!("SELECT count(*) FROM '{f}'"));
        assert!(n[0][0].as_u64().unwrap() >= 1, "{f}");
    }
    let prompt = duckdb(&format!("SELECT prompt FROM '{}'", files[0]));
    assert_eq!(prompt, json!([["é 🙂"]]));
    // Lists of token ids come back as lists of unsigned integers.
    let g = duckdb(&format!(
        "SELECT sample_index, completion_tokens, len(token_logprobs), condition FROM '{}' ORDER BY sample_index",
        files[1]
    ));
    assert_eq!(g[2], json!([2, [0, 7, 14, 21, 28], 5, null]));
    let q = duckdb(&format!(
        "SELECT quantile, reward, toxicity FROM '{}' ORDER BY quantile",
        files[3]
    ));
    assert_eq!(q[1], json!([1, 1.0, 0.0]));
    let m = duckdb(&format!(
        "SELECT step, loss, tokens_per_s FROM '{}' ORDER BY step",
        files[4]
    ));
    assert_eq!(m[3 - 1], json!([2, 2.0, null]));
}

#[test]
fn duckdb_reads_the_pool_written_by_quark_bin() {
    let w = Workdir::new();
    let meta = testing::meta("scored", json!({}));
    let rows = (0..10).map(|i| testing::scored("p", i, 0, Some(i as f64), 1));
    write_table(&w.path("s.parquet"), rows, &["toxicity".into()], &meta).unwrap();
    let pool = w.root().join(
        w.run(
            BIN,
            &[
                "--in",
                "s.parquet",
                "--quantiles",
                "5",
                "--out",
                "pool.parquet",
            ],
        )
        .path(),
    );
    let pool = pool.to_string_lossy();
    let by_q = duckdb(&format!(
        "SELECT quantile, count(*), min(reward), max(reward) FROM '{pool}' GROUP BY quantile ORDER BY quantile"
    ));
    assert_eq!(
        by_q,
        json!([
            [0, 2, 8.0, 9.0],
            [1, 2, 6.0, 7.0],
            [2, 2, 4.0, 5.0],
            [3, 2, 2.0, 3.0],
            [4, 2, 0.0, 1.0]
        ])
    );
    let summary = kv(&pool, "quark.quantiles");
    assert!(summary.contains("\"mean_reward\":8.5"), "{summary}");
}
