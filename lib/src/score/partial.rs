//! The scores of a run that failed on some rows, kept so that the next run of the
//! same stage (the same key) scores only those rows: `.partial-<output name>` beside
//! the output, a Parquet table with one row per input row (`row`, `reward`, the
//! scorer's raw values as `raw_0`, `raw_1`, ..., and `failure`, the reason a row
//! failed, null for a row that was scored), stamped with the stage's key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};

use super::Score;
use crate::schema::{meta_key, open_batches, read_metadata, BatchWriter};
use crate::stage::Stage;

/// The partial scores of the output `path`.
pub(super) fn path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".partial-{name}"))
}

/// Writes every row's score (atomically) to `path`.
pub(super) fn save(path: &Path, stage: &Stage, scores: &[Score]) -> Result<()> {
    let n_raw = scores.first().map_or(0, |s| s.raw.len());
    let mut fields = vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("reward", DataType::Float64, true),
    ];
    fields.extend((0..n_raw).map(|j| Field::new(format!("raw_{j}"), DataType::Float64, true)));
    fields.push(Field::new("failure", DataType::Utf8, true));
    let schema = Arc::new(Schema::new(fields));
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new((0..scores.len() as u64).collect::<UInt64Array>()),
        Arc::new(scores.iter().map(|s| s.reward).collect::<Float64Array>()),
    ];
    for j in 0..n_raw {
        cols.push(Arc::new(
            scores.iter().map(|s| s.raw[j]).collect::<Float64Array>(),
        ));
    }
    cols.push(Arc::new(
        scores
            .iter()
            .map(|s| s.failure.as_deref())
            .collect::<StringArray>(),
    ));
    let mut w = BatchWriter::create(path, schema.clone(), stage.meta(), &[])?;
    w.write(&RecordBatch::try_new(schema, cols)?)?;
    w.finish()?;
    Ok(())
}

/// The scores an earlier run of this stage kept at `path`, if any: one per input
/// row (`rows` of them) with `n_raw` raw values each. A file of another key is
/// ignored (its rows are not this run's).
pub(super) fn load(
    path: &Path,
    stage: &Stage,
    rows: usize,
    n_raw: usize,
) -> Result<Option<Vec<Score>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let same_key = read_metadata(path)
        .and_then(|m| m.get(meta_key::KEY).cloned())
        .is_some_and(|k| k == stage.key());
    if !same_key {
        return Ok(None);
    }
    let (_, n, reader) = open_batches(path)?;
    if n != rows {
        bail!(
            "{}: holds {n} rows for an input of {rows}; remove it to score afresh",
            path.display()
        );
    }
    let mut out = Vec::with_capacity(rows);
    for batch in reader {
        let b = batch.with_context(|| format!("{}: cannot read rows", path.display()))?;
        let get = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Float64Type>())
                .with_context(|| format!("{}: missing column `{name}`", path.display()))
        };
        let reward = get("reward")?;
        let raw = (0..n_raw)
            .map(|j| get(&format!("raw_{j}")))
            .collect::<Result<Vec<_>>>()?;
        let failure = b
            .column_by_name("failure")
            .and_then(|c| c.as_string_opt::<i32>())
            .with_context(|| format!("{}: missing column `failure`", path.display()))?;
        let value = |a: &Float64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
        for i in 0..b.num_rows() {
            out.push(Score {
                reward: value(reward, i),
                raw: raw.iter().map(|a| value(a, i)).collect(),
                failure: (!failure.is_null(i)).then(|| failure.value(i).to_owned()),
            });
        }
    }
    Ok(Some(out))
}
