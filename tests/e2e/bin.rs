//! quark-bin as a program: prints only the pool's path, skips a finished stage,
//! and fails with one line naming the file.

use crate::util::Workdir;
use quark::schema::write_table;
use quark::testing;

const BIN: &str = env!("CARGO_BIN_EXE_quark-bin");

fn scored_file(w: &Workdir, name: &str, n: u32) -> String {
    let rows = (0..n).map(|i| testing::scored("p", i, 0, Some(i as f64 / n as f64), 1));
    let meta = testing::meta("scored", serde_json::json!({}));
    write_table(&w.path(name), rows, &["toxicity".into()], &meta).unwrap();
    name.to_owned()
}

#[test]
fn quark_bin_prints_the_pool_path_and_skips_when_done() {
    let w = Workdir::new();
    let s = scored_file(&w, "scored.parquet", 10);
    let first = w.run(BIN, &["--in", &s, "--quantiles", "5", "--out", "pools/"]);
    let pool = first.path();
    assert!(pool.starts_with("pools") && pool.to_string_lossy().contains("pool-"));
    assert!(
        first.stderr.contains("quantile"),
        "summary on stderr: {}",
        first.stderr
    );
    let again = w.run(BIN, &["--in", &s, "--quantiles", "5", "--out", "pools/"]);
    assert_eq!(again.path(), pool);
    let other = w.run(BIN, &["--in", &s, "--quantiles", "4", "--out", "pools/"]);
    assert_ne!(other.path(), pool);
}

#[test]
fn quark_bin_errors_are_one_line_naming_the_file() {
    let w = Workdir::new();
    std::fs::write(w.path("junk.parquet"), b"not parquet").unwrap();
    w.run(BIN, &["--in", "junk.parquet"]).one_line_error(
        "quark-bin",
        &["junk.parquet", "not a readable Parquet file"],
    );
    w.run(BIN, &["--in", "missing.parquet"])
        .one_line_error("quark-bin", &["missing.parquet"]);
}
