//! Every table round-trips through Parquet with its metadata, and a file with a
//! missing or mistyped column is rejected with an error naming the file and column.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use quark::schema::{
    meta_key, read_metadata, read_table, write_table, EvalMetricsRow, FitMetricsRow, GenerationRow,
    PoolRow, PromptRow, Record, TableReader, TableWriter, BATCH_ROWS,
};
use quark::testing;

fn round_trip<R: Record + Clone + PartialEq + std::fmt::Debug>(rows: Vec<R>, extra: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.parquet");
    let meta = testing::meta(R::TABLE.name(), serde_json::json!({"b": 2, "a": [1, 2]}));
    write_table(&path, rows.clone(), extra, &meta).unwrap();
    let reader = TableReader::<R>::open(&path).unwrap();
    assert_eq!(reader.extra(), extra);
    assert_eq!(reader.num_rows(), rows.len());
    let kv = reader.metadata().clone();
    assert_eq!(reader.read_all().unwrap(), rows);
    assert_eq!(kv[meta_key::STAGE], R::TABLE.name());
    assert_eq!(kv[meta_key::KEY], meta.key);
    assert_eq!(kv[meta_key::PARAMS], r#"{"a":[1,2],"b":2}"#);
    assert_eq!(kv[meta_key::VERSION], "1");
    assert_eq!(read_metadata(&path).unwrap(), kv);
    // Nothing but the file itself is left in the folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn prompts_round_trip() {
    round_trip(
        vec![
            PromptRow {
                prompt_id: "a".into(),
                prompt: "Hello".into(),
            },
            PromptRow {
                prompt_id: "b".into(),
                prompt: String::new(),
            },
        ],
        &[],
    );
}

#[test]
fn generations_round_trip_across_row_groups() {
    let rows: Vec<GenerationRow> = (0..BATCH_ROWS as u32 + 5)
        .map(|i| testing::generation(&format!("p{}", i % 97), i % 4, i % 3))
        .collect();
    round_trip(rows, &[]);
}

#[test]
fn scored_round_trip_with_nulls_and_extra_columns() {
    let rows = vec![
        testing::scored("a", 0, 0, Some(0.25), 2),
        testing::scored("b", 1, 0, None, 2),
    ];
    round_trip(rows, &["toxicity".to_owned(), "rep_2".to_owned()]);
}

#[test]
fn pool_round_trip_keeps_quantiles() {
    let mut a = testing::scored("a", 0, 1, Some(0.9), 1);
    a.quantile = Some(0);
    let b = testing::scored("b", 0, 1, None, 1);
    round_trip(vec![PoolRow(a), PoolRow(b)], &["toxicity".to_owned()]);
}

#[test]
fn fit_metrics_round_trip() {
    round_trip(
        (0..4)
            .map(testing::fit_metrics)
            .collect::<Vec<FitMetricsRow>>(),
        &[],
    );
}

#[test]
fn eval_metrics_round_trip() {
    round_trip(
        vec![
            testing::eval_metrics("avg_max_toxicity", Some(0.3)),
            testing::eval_metrics("dist_1", None),
        ] as Vec<EvalMetricsRow>,
        &[],
    );
}

#[test]
fn a_scored_file_reads_as_generations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.parquet");
    let row = testing::scored("a", 0, 0, Some(0.5), 1);
    let meta = testing::meta("scored", serde_json::json!({}));
    write_table(&path, vec![row.clone()], &["toxicity".into()], &meta).unwrap();
    let back = read_table::<GenerationRow>(&path).unwrap();
    assert_eq!(back, vec![row.generation]);
}

fn write_plain(path: &std::path::Path, fields: Vec<Field>, cols: Vec<arrow::array::ArrayRef>) {
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn missing_column_is_named_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.parquet");
    write_plain(
        &path,
        vec![Field::new("prompt_id", DataType::Utf8, false)],
        vec![Arc::new(StringArray::from(vec!["a"]))],
    );
    let err = format!("{:#}", TableReader::<PromptRow>::open(&path).err().unwrap());
    assert!(err.contains("prompts.parquet"), "{err}");
    assert!(err.contains("missing column `prompt`"), "{err}");
}

#[test]
fn mistyped_column_is_named_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.parquet");
    write_plain(
        &path,
        vec![
            Field::new("prompt_id", DataType::Int64, false),
            Field::new("prompt", DataType::Utf8, false),
        ],
        vec![
            Arc::new(Int64Array::from(vec![1])),
            Arc::new(StringArray::from(vec!["x"])),
        ],
    );
    let err = format!("{:#}", TableReader::<PromptRow>::open(&path).err().unwrap());
    assert!(err.contains("prompts.parquet"), "{err}");
    assert!(
        err.contains("column `prompt_id` has type Int64, expected Utf8"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.parquet");
    let rows: Vec<_> = (0..50).map(|i| testing::generation("p", i, 0)).collect();
    let meta = testing::meta("generations", serde_json::json!({}));
    write_table(&path, rows, &[], &meta).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        TableReader::<GenerationRow>::open(&path).err().unwrap()
    );
    assert!(
        err.contains("g.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );
}

#[test]
fn an_unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.parquet");
    let meta = testing::meta("generations", serde_json::json!({}));
    let mut w = TableWriter::<GenerationRow>::create(&path, &[], &meta).unwrap();
    w.write((0..10).map(|i| testing::generation("p", i, 0)))
        .unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
