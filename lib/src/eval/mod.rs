//! The paper's evaluation (quark-eval): per evaluated model (one scored table of
//! several samples per held-out prompt), average max toxicity and toxicity
//! probability, perplexity under the reference, dist-1/2/3, share of positive
//! completions, rep-2/3/4 and diversity, and the mean reward; written as a long table
//! (Parquet and JSON) and drawn with the pools' reward quantiles as a PNG
//! ([`plot`]).
//!
//! The metric functions follow the DExperts/Quark evaluation code where it fixes a
//! detail the paper leaves open (word splitting, denominators, NaN handling); each
//! says which. This module neither samples nor scores: perplexity and toxicity are
//! scorer columns of the input tables.
//!
//! [`metrics`] computes each model's metrics, [`table`] prints them and [`plot`]
//! draws them; this file reads the inputs and runs the stage.

pub mod bootstrap;
pub mod metrics;
pub mod plot;
pub mod table;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::AsArray;
use arrow::datatypes::UInt32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::pool::{QuantileSummary, SUMMARY_KEY};
use crate::schema::{
    col, read_metadata, read_table, EvalMetricsRow, ScoredRow, TableReader, TableWriter,
};
use crate::score::{sentiment, toxicity};
use crate::stage::{write_atomic, AtomicDir, Stage};
pub use metrics::{
    distinct_n, metric, model_metrics, nanmean, prompt_parts, rep_n, toxicity, PromptParts, Value,
    POSITIVE_THRESHOLD, TOXIC_THRESHOLD,
};
use plot::PoolPoint;
pub use table::{format_table, rows_json};

/// The files of an evaluation folder.
pub const METRICS_PARQUET: &str = "metrics.parquet";
pub const METRICS_JSON: &str = "metrics.json";
pub const METRICS_PNG: &str = "metrics.png";

/// What [`evaluate`] wrote (or found already written).
#[derive(Clone, Debug)]
pub struct EvalOutput {
    /// The evaluation folder.
    pub dir: PathBuf,
    /// `dir/metrics.parquet`.
    pub metrics: PathBuf,
    /// `dir/metrics.png`.
    pub plot: PathBuf,
    /// The metric rows, in the order written.
    pub rows: Vec<EvalMetricsRow>,
    /// True when the folder was already done for these inputs and nothing was written.
    pub skipped: bool,
}

/// The label of a model: `reference` without a control token, `policy` conditioned
/// on the best quantile `<|quark:0|>`, `policy@q{k}` on another one.
pub fn model_label(condition: Option<u32>) -> String {
    match condition {
        None => "reference".to_owned(),
        Some(0) => "policy".to_owned(),
        Some(k) => format!("policy@q{k}"),
    }
}

/// The quantile token a label of [`model_label`] conditions on (None for the
/// reference and for labels it does not make).
pub fn model_condition(label: &str) -> Option<u32> {
    match label {
        "policy" => Some(0),
        _ => label.strip_prefix("policy@q")?.parse().ok(),
    }
}

/// One input table: its model's label, iteration, scorer columns and the parts of
/// its metrics per prompt.
struct Model {
    label: String,
    iteration: u32,
    extra: Vec<String>,
    parts: PromptParts,
}

fn read_model(path: &Path) -> Result<Model> {
    let reader = TableReader::<ScoredRow>::open(path)?;
    let extra = reader.extra().to_vec();
    let rows = reader.read_all()?;
    let Some(first) = rows.first() else {
        bail!("{}: no rows to evaluate", path.display());
    };
    crate::pool::check_rewards(path, &rows)?;
    crate::pool::check_unique(&[path], &rows)?;
    let (condition, iteration) = (first.generation.condition, first.generation.iteration);
    if let Some(r) = rows
        .iter()
        .find(|r| (r.generation.condition, r.generation.iteration) != (condition, iteration))
    {
        bail!(
            "{}: holds more than one model ({} at iteration {} and {} at iteration {}); give each model's samples in its own file",
            path.display(),
            model_label(condition),
            iteration,
            model_label(r.generation.condition),
            r.generation.iteration
        );
    }
    Ok(Model {
        label: model_label(condition),
        iteration,
        parts: prompt_parts(&rows, &extra),
        extra,
    })
}

/// Every model's metric rows: each value with its bootstrap interval, and for a
/// policy its paired difference to the reference sampled with as many samples per
/// prompt (when the inputs hold one).
fn metric_rows(task: &str, models: &[Model]) -> Vec<EvalMetricsRow> {
    let mut rows = Vec::new();
    for m in models {
        let parts = &m.parts;
        let reference = models.iter().find(|r| {
            r.label == model_label(None) && r.parts.samples_per_prompt == parts.samples_per_prompt
        });
        let diffs = match reference {
            Some(r) if m.label != r.label => {
                bootstrap::differences(parts, &r.parts, bootstrap::REPLICATES, bootstrap::SEED)
            }
            _ => vec![None; parts.metrics.len()],
        };
        let intervals = bootstrap::intervals(parts, bootstrap::REPLICATES, bootstrap::SEED);
        let row = |metric: &str, value, count| EvalMetricsRow {
            task: task.to_owned(),
            model: m.label.clone(),
            iteration: Some(m.iteration),
            samples_per_prompt: parts.samples_per_prompt,
            metric: metric.to_owned(),
            value,
            count,
            ci_low: None,
            ci_high: None,
            diff: None,
            diff_low: None,
            diff_high: None,
        };
        let values = parts.values(0..parts.prompts.len());
        for (i, (v, den)) in values.into_iter().enumerate() {
            let (ci, d) = (intervals[i], diffs[i]);
            rows.push(EvalMetricsRow {
                ci_low: ci.map(|c| c.0),
                ci_high: ci.map(|c| c.1),
                diff: d.map(|d| d.value),
                diff_low: d.map(|d| d.low),
                diff_high: d.map(|d| d.high),
                ..row(parts.metrics[i], v, den as u64)
            });
        }
        rows.push(row(
            metric::SAMPLES,
            Some(parts.samples as f64),
            parts.samples,
        ));
    }
    rows
}

/// The task name used when none is given: the scorer column the inputs carry.
fn infer_task(models: &[Model]) -> String {
    let has = |c: &str| models.iter().any(|m| m.extra.iter().any(|e| e == c));
    if has(toxicity::COLUMN) {
        toxicity::COLUMN.to_owned()
    } else if has(sentiment::COLUMN) {
        sentiment::COLUMN.to_owned()
    } else {
        "repetition".to_owned()
    }
}

/// A pool's per-quantile summary (its `quark.quantiles` metadata) and the iteration
/// of its newest rows (None for an empty pool).
fn read_pool_point(path: &Path) -> Result<(Option<u32>, Vec<QuantileSummary>)> {
    let meta = read_metadata(path)
        .ok_or_else(|| anyhow!("{}: not a readable Parquet file", path.display()))?;
    let summary = meta.get(SUMMARY_KEY).ok_or_else(|| {
        anyhow!(
            "{}: no `{SUMMARY_KEY}` metadata (is it a quark-bin pool?)",
            path.display()
        )
    })?;
    let quantiles: Vec<QuantileSummary> = serde_json::from_str(summary)
        .with_context(|| format!("{}: bad `{SUMMARY_KEY}` metadata", path.display()))?;
    // Only the iteration column is read: a pool holds every earlier sample.
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let index = builder
        .schema()
        .index_of(col::ITERATION)
        .map_err(|_| anyhow!("{}: missing column `{}`", path.display(), col::ITERATION))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut newest = None;
    for batch in reader {
        let batch = batch.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let column = batch
            .column(0)
            .as_primitive_opt::<UInt32Type>()
            .ok_or_else(|| anyhow!("{}: column `iteration` is not u32", path.display()))?;
        newest = newest.max(column.iter().flatten().max());
    }
    Ok((newest, quantiles))
}

/// The stage name in the evaluation folder's marker.
pub const STAGE: &str = "eval";

/// The stage (and so the evaluation folder's key) of evaluating `inputs` with the
/// quantiles of `pools` under the task name `task`.
pub fn stage(inputs: &[PathBuf], pools: &[PathBuf], task: Option<&str>) -> Result<Stage> {
    if inputs.is_empty() {
        bail!("no scored files given");
    }
    let mut all: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    all.extend(pools.iter().map(PathBuf::as_path));
    let params = serde_json::json!({
        "task": task,
        "inputs": inputs.len(),
        "pools": pools.len(),
        "bootstrap": {"replicates": bootstrap::REPLICATES, "seed": bootstrap::SEED, "level": bootstrap::LEVEL},
    });
    Stage::new(STAGE, &params, &all)
}

/// Evaluates each scored table of `inputs` (one model each), draws the reward
/// quantiles of `pools` beside the metrics, and writes `out/` (metrics.parquet,
/// metrics.json, metrics.png) atomically. Does nothing when `out` is already the
/// evaluation of the same inputs and options.
pub fn evaluate(
    inputs: &[PathBuf],
    pools: &[PathBuf],
    task: Option<&str>,
    out: &Path,
) -> Result<EvalOutput> {
    let stage = stage(inputs, pools, task)?;
    let output = |rows, skipped| EvalOutput {
        dir: out.to_owned(),
        metrics: out.join(METRICS_PARQUET),
        plot: out.join(METRICS_PNG),
        rows,
        skipped,
    };
    if stage.is_done(out) {
        let rows = read_table::<EvalMetricsRow>(&out.join(METRICS_PARQUET))?;
        return Ok(output(rows, true));
    }
    stage.check_replaceable(out)?;

    let mut models = Vec::with_capacity(inputs.len());
    let mut seen: HashMap<(String, u32, u32), &Path> = HashMap::new();
    for path in inputs {
        let m = read_model(path)?;
        let key = (m.label.clone(), m.iteration, m.parts.samples_per_prompt);
        if let Some(other) = seen.insert(key, path) {
            bail!(
                "{}: {} at iteration {} with {} samples per prompt is also in {}; give each model once",
                path.display(),
                m.label,
                m.iteration,
                m.parts.samples_per_prompt,
                other.display()
            );
        }
        models.push(m);
    }
    let task = task.map_or_else(|| infer_task(&models), str::to_owned);
    let rows = metric_rows(&task, &models);
    let mut points = Vec::with_capacity(pools.len());
    for (i, path) in pools.iter().enumerate() {
        let (newest, quantiles) = read_pool_point(path)?;
        points.push(PoolPoint {
            // An empty pool has no newest rows: its place on the command line stands in.
            iteration: newest.unwrap_or(i as u32),
            quantiles,
        });
    }

    let dir = AtomicDir::create(out)?;
    let mut writer =
        TableWriter::<EvalMetricsRow>::create(&dir.dir().join(METRICS_PARQUET), &[], stage.meta())?;
    writer.write(rows.iter().cloned())?;
    writer.finish()?;
    write_atomic(
        &dir.dir().join(METRICS_JSON),
        serde_json::to_string_pretty(&rows_json(&rows))?.as_bytes(),
    )?;
    let png = plot::draw(&task, &rows, &points)
        .with_context(|| format!("{}: cannot draw the plot", out.join(METRICS_PNG).display()))?;
    write_atomic(&dir.dir().join(METRICS_PNG), &png)?;
    dir.commit(stage.meta())?;
    Ok(output(rows, false))
}
