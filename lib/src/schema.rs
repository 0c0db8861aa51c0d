//! Every table that the quark programs exchange, defined once as an Arrow schema,
//! with a typed row struct, a streaming reader that validates the columns it needs,
//! and a writer that stamps the stage metadata. Column names are the public
//! interface that DuckDB users query: they live here as constants and nowhere else.
//!
//! This module owns the file format (Parquet, zstd, key-value metadata); it does not
//! decide where files go or whether a stage runs (see [`crate::stage`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Float64Array, Float64Builder, ListBuilder,
    RecordBatch, StringArray, StringBuilder, UInt32Array, UInt32Builder, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::stage::{AtomicFile, Meta};

/// Column names: the stable public interface of every file.
pub mod col {
    pub const PROMPT_ID: &str = "prompt_id";
    pub const PROMPT: &str = "prompt";
    pub const PROMPT_TOKENS: &str = "prompt_tokens";
    pub const SAMPLE_INDEX: &str = "sample_index";
    pub const COMPLETION: &str = "completion";
    pub const COMPLETION_TOKENS: &str = "completion_tokens";
    pub const TOKEN_LOGPROBS: &str = "token_logprobs";
    pub const LOGPROB: &str = "logprob";
    pub const FINISH_REASON: &str = "finish_reason";
    pub const CONDITION: &str = "condition";
    pub const MODEL: &str = "model";
    pub const ITERATION: &str = "iteration";
    pub const SEED: &str = "seed";
    pub const REWARD: &str = "reward";
    pub const QUANTILE: &str = "quantile";
    pub const STEP: &str = "step";
    pub const METRIC: &str = "metric";
    pub const VALUE: &str = "value";
    pub const COUNT: &str = "count";
    pub const TASK: &str = "task";
    pub const SAMPLES_PER_PROMPT: &str = "samples_per_prompt";
    pub const CI_LOW: &str = "ci_low";
    pub const CI_HIGH: &str = "ci_high";
    pub const DIFF: &str = "diff";
    pub const DIFF_LOW: &str = "diff_low";
    pub const DIFF_HIGH: &str = "diff_high";
}

/// Metadata keys every file carries (the stage layer's, which stamps them).
pub use crate::stage::meta_key;

/// Rows per Parquet row group and per streamed batch.
pub const BATCH_ROWS: usize = 8192;

fn tokens_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)))
}

fn logprobs_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

fn field(name: &str, dtype: DataType, nullable: bool) -> Field {
    Field::new(name, dtype, nullable)
}

/// The tables the programs exchange (the README's table list). `extra` names the scorer columns (nullable f64) that a
/// scored table or a pool carries after `reward`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// prompt_id, prompt: what quark-sample reads once inputs are normalised.
    Prompts,
    /// One row per (prompt, sample): what quark-sample writes.
    Generations,
    /// Generations plus `reward` and the scorer's raw columns: what quark-score writes.
    Scored,
    /// Scored rows of every iteration plus `quantile`: what quark-bin writes.
    Pool,
    /// One row per optimisation step: what quark-fit writes beside its checkpoint.
    FitMetrics,
    /// Long-format metrics (model, iteration, samples per prompt, metric, value, its
    /// 95% interval, the difference to the reference and its interval): what
    /// quark-eval writes.
    EvalMetrics,
}

impl Table {
    /// The stage name stored in `quark.stage` for files of this table.
    pub fn name(self) -> &'static str {
        match self {
            Table::Prompts => "prompts",
            Table::Generations => "generations",
            Table::Scored => "scored",
            Table::Pool => "pool",
            Table::FitMetrics => "fit-metrics",
            Table::EvalMetrics => "eval-metrics",
        }
    }

    /// The Arrow schema of this table, with `extra` scorer columns where it has them.
    pub fn schema(self, extra: &[String]) -> SchemaRef {
        let mut fields = match self {
            Table::Prompts => vec![
                field(col::PROMPT_ID, DataType::Utf8, false),
                field(col::PROMPT, DataType::Utf8, false),
            ],
            Table::Generations | Table::Scored | Table::Pool => generation_fields(),
            Table::FitMetrics => {
                let mut f = vec![
                    field(col::ITERATION, DataType::UInt32, false),
                    field(col::STEP, DataType::UInt64, false),
                ];
                f.extend(
                    FIT_METRICS
                        .iter()
                        .map(|m| field(m, DataType::Float64, true)),
                );
                f
            }
            Table::EvalMetrics => vec![
                field(col::TASK, DataType::Utf8, false),
                field(col::MODEL, DataType::Utf8, false),
                field(col::ITERATION, DataType::UInt32, true),
                field(col::SAMPLES_PER_PROMPT, DataType::UInt32, false),
                field(col::METRIC, DataType::Utf8, false),
                field(col::VALUE, DataType::Float64, true),
                field(col::COUNT, DataType::UInt64, false),
                field(col::CI_LOW, DataType::Float64, true),
                field(col::CI_HIGH, DataType::Float64, true),
                field(col::DIFF, DataType::Float64, true),
                field(col::DIFF_LOW, DataType::Float64, true),
                field(col::DIFF_HIGH, DataType::Float64, true),
            ],
        };
        if matches!(self, Table::Scored | Table::Pool) {
            fields.push(field(col::REWARD, DataType::Float64, true));
            fields.extend(extra.iter().map(|n| field(n, DataType::Float64, true)));
        }
        if self == Table::Pool {
            fields.push(field(col::QUANTILE, DataType::UInt32, true));
        }
        Arc::new(Schema::new(fields))
    }
}

fn generation_fields() -> Vec<Field> {
    vec![
        field(col::PROMPT_ID, DataType::Utf8, false),
        field(col::PROMPT, DataType::Utf8, false),
        field(col::PROMPT_TOKENS, tokens_type(), false),
        field(col::SAMPLE_INDEX, DataType::UInt32, false),
        field(col::COMPLETION, DataType::Utf8, false),
        field(col::COMPLETION_TOKENS, tokens_type(), false),
        field(col::TOKEN_LOGPROBS, logprobs_type(), false),
        field(col::LOGPROB, DataType::Float64, false),
        field(col::FINISH_REASON, DataType::Utf8, false),
        field(col::CONDITION, DataType::UInt32, true),
        field(col::MODEL, DataType::Utf8, false),
        field(col::ITERATION, DataType::UInt32, false),
        field(col::SEED, DataType::UInt64, false),
    ]
}

/// The per-step columns of the fit metrics table, after `iteration` and `step`.
pub const FIT_METRICS: [&str; 10] = [
    "loss",
    "nll",
    "kl",
    "entropy",
    "unlikelihood",
    "lr",
    "grad_norm",
    "kl_coef",
    "tokens",
    "tokens_per_s",
];

/// A prompt as every program sees it once its input format is resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptRow {
    pub prompt_id: String,
    pub prompt: String,
}

/// Why a completion stopped.
pub mod finish {
    pub const EOS: &str = "eos";
    pub const LENGTH: &str = "length";
}

/// One sampled completion (the generations table).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRow {
    pub prompt_id: String,
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub sample_index: u32,
    pub completion: String,
    pub completion_tokens: Vec<u32>,
    /// Log-probability of each completion token under the sampling distribution.
    pub token_logprobs: Vec<f32>,
    /// Sum of `token_logprobs`.
    pub logprob: f64,
    pub finish_reason: String,
    /// The quantile token the prompt was conditioned on; None for the reference.
    pub condition: Option<u32>,
    /// Content hash of the model directory that sampled it.
    pub model: String,
    pub iteration: u32,
    pub seed: u64,
}

/// A generation with its reward (the scored table) and, in a pool, its quantile.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredRow {
    pub generation: GenerationRow,
    /// Higher is better; None when the scorer could not score the row.
    pub reward: Option<f64>,
    /// The scorer's raw values, aligned with the table's extra column names.
    pub scores: Vec<Option<f64>>,
    /// The reward quantile (0 = best); only pools have it, None for unscored rows.
    pub quantile: Option<u32>,
}

/// One optimisation step of quark-fit.
#[derive(Clone, Debug, PartialEq)]
pub struct FitMetricsRow {
    pub iteration: u32,
    pub step: u64,
    /// Values in the order of [`FIT_METRICS`].
    pub values: [Option<f64>; FIT_METRICS.len()],
}

impl FitMetricsRow {
    /// The row of step `step` from each metric's value by its column name: every
    /// column of [`FIT_METRICS`] given once, in any order.
    pub fn from_named(iteration: u32, step: u64, named: &[(&str, f64)]) -> Result<Self> {
        if let Some((n, _)) = named.iter().find(|(n, _)| !FIT_METRICS.contains(n)) {
            bail!("fit metrics: no column `{n}`");
        }
        let mut values = [None; FIT_METRICS.len()];
        for (slot, column) in values.iter_mut().zip(FIT_METRICS) {
            let mut given = named.iter().filter(|(n, _)| *n == column);
            match (given.next(), given.next()) {
                (Some((_, v)), None) => *slot = Some(*v),
                _ => bail!("fit metrics: column `{column}` must be given once"),
            }
        }
        Ok(Self {
            iteration,
            step,
            values,
        })
    }
}

/// One metric of one evaluated model.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalMetricsRow {
    pub task: String,
    pub model: String,
    pub iteration: Option<u32>,
    /// The samples of each prompt (of the busiest one): metrics such as average max
    /// toxicity grow with it, so models compare at equal values only.
    pub samples_per_prompt: u32,
    pub metric: String,
    pub value: Option<f64>,
    /// How many prompts (or rows) the value is computed over.
    pub count: u64,
    /// The 95% bootstrap interval of `value` (prompts resampled).
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// `value` minus the reference's at the same samples per prompt (on the prompts
    /// both have), with its paired 95% bootstrap interval; null for the reference.
    pub diff: Option<f64>,
    pub diff_low: Option<f64>,
    pub diff_high: Option<f64>,
}

/// A typed row of one table: how it becomes columns and comes back from them.
pub trait Record: Sized {
    /// The table these rows belong to.
    const TABLE: Table;
    /// Builds one record batch of `schema` (which holds `extra` columns) from rows.
    fn to_batch(rows: &[Self], schema: &SchemaRef, extra: &[String]) -> Result<RecordBatch>;
    /// Reads rows back from a batch that [`validate`] accepted.
    fn from_batch(batch: &RecordBatch, extra: &[String]) -> Result<Vec<Self>>;
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| anyhow!("missing column `{name}`"))
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    Ok(column(batch, name)?.as_string::<i32>())
}

fn u32s<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a UInt32Array> {
    Ok(column(batch, name)?.as_primitive::<UInt32Type>())
}

fn f64s<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a Float64Array> {
    Ok(column(batch, name)?.as_primitive())
}

fn opt<A: Array, T>(a: &A, i: usize, get: impl Fn(&A, usize) -> T) -> Option<T> {
    if a.is_null(i) {
        None
    } else {
        Some(get(a, i))
    }
}

fn list_u32(batch: &RecordBatch, name: &str) -> Result<Vec<Vec<u32>>> {
    let list = column(batch, name)?.as_list::<i32>();
    Ok((0..list.len())
        .map(|i| {
            let v = list.value(i);
            v.as_primitive::<UInt32Type>().values().to_vec()
        })
        .collect())
}

fn list_f32(batch: &RecordBatch, name: &str) -> Result<Vec<Vec<f32>>> {
    let list = column(batch, name)?.as_list::<i32>();
    Ok((0..list.len())
        .map(|i| {
            let v = list.value(i);
            v.as_primitive::<Float32Type>().values().to_vec()
        })
        .collect())
}

fn string_array<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn u32_array(values: impl Iterator<Item = Option<u32>>) -> ArrayRef {
    Arc::new(values.collect::<UInt32Array>())
}

fn f64_array(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    Arc::new(values.collect::<Float64Array>())
}

fn tokens_array<'a>(values: impl Iterator<Item = &'a [u32]>) -> ArrayRef {
    let mut b = ListBuilder::new(UInt32Builder::new());
    for v in values {
        b.values().append_slice(v);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn logprobs_array<'a>(values: impl Iterator<Item = &'a [f32]>) -> ArrayRef {
    let mut b = ListBuilder::new(Float32Builder::new());
    for v in values {
        b.values().append_slice(v);
        b.append(true);
    }
    Arc::new(b.finish())
}

fn generation_columns<'a>(rows: impl Iterator<Item = &'a GenerationRow> + Clone) -> Vec<ArrayRef> {
    let r = rows;
    vec![
        string_array(r.clone().map(|g| g.prompt_id.as_str())),
        string_array(r.clone().map(|g| g.prompt.as_str())),
        tokens_array(r.clone().map(|g| g.prompt_tokens.as_slice())),
        u32_array(r.clone().map(|g| Some(g.sample_index))),
        string_array(r.clone().map(|g| g.completion.as_str())),
        tokens_array(r.clone().map(|g| g.completion_tokens.as_slice())),
        logprobs_array(r.clone().map(|g| g.token_logprobs.as_slice())),
        f64_array(r.clone().map(|g| Some(g.logprob))),
        string_array(r.clone().map(|g| g.finish_reason.as_str())),
        u32_array(r.clone().map(|g| g.condition)),
        string_array(r.clone().map(|g| g.model.as_str())),
        u32_array(r.clone().map(|g| Some(g.iteration))),
        Arc::new(r.map(|g| Some(g.seed)).collect::<UInt64Array>()),
    ]
}

fn generations_from(batch: &RecordBatch) -> Result<Vec<GenerationRow>> {
    let prompt_id = strings(batch, col::PROMPT_ID)?;
    let prompt = strings(batch, col::PROMPT)?;
    let prompt_tokens = list_u32(batch, col::PROMPT_TOKENS)?;
    let sample_index = u32s(batch, col::SAMPLE_INDEX)?;
    let completion = strings(batch, col::COMPLETION)?;
    let completion_tokens = list_u32(batch, col::COMPLETION_TOKENS)?;
    let token_logprobs = list_f32(batch, col::TOKEN_LOGPROBS)?;
    let logprob = f64s(batch, col::LOGPROB)?;
    let finish_reason = strings(batch, col::FINISH_REASON)?;
    let condition = u32s(batch, col::CONDITION)?;
    let model = strings(batch, col::MODEL)?;
    let iteration = u32s(batch, col::ITERATION)?;
    let seed = column(batch, col::SEED)?.as_primitive::<arrow::datatypes::UInt64Type>();
    Ok(prompt_tokens
        .into_iter()
        .zip(completion_tokens)
        .zip(token_logprobs)
        .enumerate()
        .map(
            |(i, ((prompt_tokens, completion_tokens), token_logprobs))| GenerationRow {
                prompt_id: prompt_id.value(i).to_owned(),
                prompt: prompt.value(i).to_owned(),
                prompt_tokens,
                sample_index: sample_index.value(i),
                completion: completion.value(i).to_owned(),
                completion_tokens,
                token_logprobs,
                logprob: logprob.value(i),
                finish_reason: finish_reason.value(i).to_owned(),
                condition: opt(condition, i, |a, i| a.value(i)),
                model: model.value(i).to_owned(),
                iteration: iteration.value(i),
                seed: seed.value(i),
            },
        )
        .collect())
}

impl Record for PromptRow {
    const TABLE: Table = Table::Prompts;
    fn to_batch(rows: &[Self], schema: &SchemaRef, _: &[String]) -> Result<RecordBatch> {
        let cols = vec![
            string_array(rows.iter().map(|r| r.prompt_id.as_str())),
            string_array(rows.iter().map(|r| r.prompt.as_str())),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
    fn from_batch(batch: &RecordBatch, _: &[String]) -> Result<Vec<Self>> {
        let id = strings(batch, col::PROMPT_ID)?;
        let text = strings(batch, col::PROMPT)?;
        Ok((0..batch.num_rows())
            .map(|i| PromptRow {
                prompt_id: id.value(i).to_owned(),
                prompt: text.value(i).to_owned(),
            })
            .collect())
    }
}

impl Record for GenerationRow {
    const TABLE: Table = Table::Generations;
    fn to_batch(rows: &[Self], schema: &SchemaRef, _: &[String]) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            schema.clone(),
            generation_columns(rows.iter()),
        )?)
    }
    fn from_batch(batch: &RecordBatch, _: &[String]) -> Result<Vec<Self>> {
        generations_from(batch)
    }
}

/// Scored rows and pool rows share one struct; the table decides whether the
/// `quantile` column is written.
fn scored_to_batch(
    rows: &[ScoredRow],
    schema: &SchemaRef,
    extra: &[String],
    with_quantile: bool,
) -> Result<RecordBatch> {
    if let Some(bad) = rows.iter().find(|r| r.scores.len() != extra.len()) {
        bail!(
            "row ({}, {}) has {} scores for {} score columns",
            bad.generation.prompt_id,
            bad.generation.sample_index,
            bad.scores.len(),
            extra.len()
        );
    }
    let mut cols = generation_columns(rows.iter().map(|r| &r.generation));
    cols.push(f64_array(rows.iter().map(|r| r.reward)));
    for j in 0..extra.len() {
        let mut b = Float64Builder::with_capacity(rows.len());
        for r in rows {
            b.append_option(r.scores[j]);
        }
        cols.push(Arc::new(b.finish()));
    }
    if with_quantile {
        cols.push(u32_array(rows.iter().map(|r| r.quantile)));
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

fn scored_from_batch(
    batch: &RecordBatch,
    extra: &[String],
    with_quantile: bool,
) -> Result<Vec<ScoredRow>> {
    let generations = generations_from(batch)?;
    let reward = f64s(batch, col::REWARD)?;
    let extras = extra
        .iter()
        .map(|n| f64s(batch, n))
        .collect::<Result<Vec<_>>>()?;
    let quantile = if with_quantile {
        Some(u32s(batch, col::QUANTILE)?)
    } else {
        None
    };
    Ok(generations
        .into_iter()
        .enumerate()
        .map(|(i, generation)| ScoredRow {
            generation,
            reward: opt(reward, i, |a, i| a.value(i)),
            scores: extras
                .iter()
                .map(|a| opt(*a, i, |a, i| a.value(i)))
                .collect(),
            quantile: quantile.and_then(|q| opt(q, i, |a, i| a.value(i))),
        })
        .collect())
}

/// A scored row seen as a pool row: the same struct, written with its quantile.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolRow(pub ScoredRow);

impl Record for ScoredRow {
    const TABLE: Table = Table::Scored;
    fn to_batch(rows: &[Self], schema: &SchemaRef, extra: &[String]) -> Result<RecordBatch> {
        scored_to_batch(rows, schema, extra, false)
    }
    fn from_batch(batch: &RecordBatch, extra: &[String]) -> Result<Vec<Self>> {
        scored_from_batch(batch, extra, false)
    }
}

impl Record for PoolRow {
    const TABLE: Table = Table::Pool;
    fn to_batch(rows: &[Self], schema: &SchemaRef, extra: &[String]) -> Result<RecordBatch> {
        // PoolRow is a transparent wrapper, so a slice of it is a slice of ScoredRow.
        let inner: Vec<ScoredRow> = rows.iter().map(|r| r.0.clone()).collect();
        scored_to_batch(&inner, schema, extra, true)
    }
    fn from_batch(batch: &RecordBatch, extra: &[String]) -> Result<Vec<Self>> {
        Ok(scored_from_batch(batch, extra, true)?
            .into_iter()
            .map(PoolRow)
            .collect())
    }
}

impl Record for FitMetricsRow {
    const TABLE: Table = Table::FitMetrics;
    fn to_batch(rows: &[Self], schema: &SchemaRef, _: &[String]) -> Result<RecordBatch> {
        let mut cols = vec![
            u32_array(rows.iter().map(|r| Some(r.iteration))),
            Arc::new(rows.iter().map(|r| Some(r.step)).collect::<UInt64Array>()) as ArrayRef,
        ];
        for j in 0..FIT_METRICS.len() {
            cols.push(f64_array(rows.iter().map(|r| r.values[j])));
        }
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
    fn from_batch(batch: &RecordBatch, _: &[String]) -> Result<Vec<Self>> {
        let iteration = u32s(batch, col::ITERATION)?;
        let step = column(batch, col::STEP)?.as_primitive::<arrow::datatypes::UInt64Type>();
        let values = FIT_METRICS
            .iter()
            .map(|n| f64s(batch, n))
            .collect::<Result<Vec<_>>>()?;
        Ok((0..batch.num_rows())
            .map(|i| FitMetricsRow {
                iteration: iteration.value(i),
                step: step.value(i),
                values: std::array::from_fn(|j| opt(values[j], i, |a, i| a.value(i))),
            })
            .collect())
    }
}

impl Record for EvalMetricsRow {
    const TABLE: Table = Table::EvalMetrics;
    fn to_batch(rows: &[Self], schema: &SchemaRef, _: &[String]) -> Result<RecordBatch> {
        let cols = vec![
            string_array(rows.iter().map(|r| r.task.as_str())),
            string_array(rows.iter().map(|r| r.model.as_str())),
            u32_array(rows.iter().map(|r| r.iteration)),
            u32_array(rows.iter().map(|r| Some(r.samples_per_prompt))),
            string_array(rows.iter().map(|r| r.metric.as_str())),
            f64_array(rows.iter().map(|r| r.value)),
            Arc::new(rows.iter().map(|r| Some(r.count)).collect::<UInt64Array>()) as ArrayRef,
            f64_array(rows.iter().map(|r| r.ci_low)),
            f64_array(rows.iter().map(|r| r.ci_high)),
            f64_array(rows.iter().map(|r| r.diff)),
            f64_array(rows.iter().map(|r| r.diff_low)),
            f64_array(rows.iter().map(|r| r.diff_high)),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
    fn from_batch(batch: &RecordBatch, _: &[String]) -> Result<Vec<Self>> {
        let task = strings(batch, col::TASK)?;
        let model = strings(batch, col::MODEL)?;
        let iteration = u32s(batch, col::ITERATION)?;
        let samples = u32s(batch, col::SAMPLES_PER_PROMPT)?;
        let metric = strings(batch, col::METRIC)?;
        let count = column(batch, col::COUNT)?.as_primitive::<arrow::datatypes::UInt64Type>();
        let [value, ci_low, ci_high, diff, diff_low, diff_high] = [
            col::VALUE,
            col::CI_LOW,
            col::CI_HIGH,
            col::DIFF,
            col::DIFF_LOW,
            col::DIFF_HIGH,
        ]
        .map(|c| f64s(batch, c));
        let (value, ci_low, ci_high) = (value?, ci_low?, ci_high?);
        let (diff, diff_low, diff_high) = (diff?, diff_low?, diff_high?);
        let f = |a: &Float64Array, i| opt(a, i, |a, i| a.value(i));
        Ok((0..batch.num_rows())
            .map(|i| EvalMetricsRow {
                task: task.value(i).to_owned(),
                model: model.value(i).to_owned(),
                iteration: opt(iteration, i, |a, i| a.value(i)),
                samples_per_prompt: samples.value(i),
                metric: metric.value(i).to_owned(),
                value: f(value, i),
                count: count.value(i),
                ci_low: f(ci_low, i),
                ci_high: f(ci_high, i),
                diff: f(diff, i),
                diff_low: f(diff_low, i),
                diff_high: f(diff_high, i),
            })
            .collect())
    }
}

/// Checks that `found` has every column of `expected` with the expected type.
/// Extra columns are allowed (a scored file is a valid generations file).
fn validate(path: &Path, expected: &Schema, found: &Schema) -> Result<()> {
    for f in expected.fields() {
        match found.field_with_name(f.name()) {
            Err(_) => bail!(
                "{}: missing column `{}` (expected {})",
                path.display(),
                f.name(),
                f.data_type()
            ),
            Ok(g) if !types_match(f.data_type(), g.data_type()) => bail!(
                "{}: column `{}` has type {}, expected {}",
                path.display(),
                f.name(),
                g.data_type(),
                f.data_type()
            ),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// List item names and nullability differ between writers (DuckDB writes
/// `element`); only the item type matters.
fn types_match(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => x.data_type() == y.data_type(),
        _ => a == b,
    }
}

/// The score columns of a scored table or pool: nullable f64 columns after `reward`
/// other than the core columns.
fn extra_columns(table: Table, schema: &Schema) -> Vec<String> {
    if !matches!(table, Table::Scored | Table::Pool) {
        return Vec::new();
    }
    let core = table.schema(&[]);
    schema
        .fields()
        .iter()
        .filter(|f| core.field_with_name(f.name()).is_err())
        .filter(|f| f.data_type() == &DataType::Float64)
        .map(|f| f.name().clone())
        .collect()
}

/// A streaming reader of one table file: validates the schema on open, then yields
/// typed rows a batch at a time so that memory stays flat on large files.
pub struct TableReader<R: Record> {
    path: PathBuf,
    extra: Vec<String>,
    metadata: HashMap<String, String>,
    rows: usize,
    inner: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    _marker: std::marker::PhantomData<R>,
}

impl<R: Record> TableReader<R> {
    /// Opens `path` and checks that it has every column of `R`'s table.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_batch(path, BATCH_ROWS)
    }

    /// As [`TableReader::open`], yielding batches of at most `batch_rows` rows.
    pub fn open_with_batch(path: &Path, batch_rows: usize) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
        let schema = builder.schema().clone();
        let extra = extra_columns(R::TABLE, &schema);
        validate(path, &R::TABLE.schema(&extra), &schema)?;
        let metadata = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let rows = builder.metadata().file_metadata().num_rows() as usize;
        let inner = builder
            .with_batch_size(batch_rows)
            .build()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            extra,
            metadata,
            rows,
            inner,
            _marker: std::marker::PhantomData,
        })
    }

    /// The scorer columns this file carries (empty for tables without them).
    pub fn extra(&self) -> &[String] {
        &self.extra
    }

    /// The file's key-value metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Rows in the whole file.
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Reads every remaining row.
    pub fn read_all(self) -> Result<Vec<R>> {
        let mut out = Vec::with_capacity(self.rows);
        for chunk in self {
            out.extend(chunk?);
        }
        Ok(out)
    }
}

impl<R: Record> Iterator for TableReader<R> {
    type Item = Result<Vec<R>>;
    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.inner.next()?;
        Some(
            batch
                .map_err(anyhow::Error::from)
                .and_then(|b| R::from_batch(&b, &self.extra))
                .with_context(|| format!("{}: cannot read rows", self.path.display())),
        )
    }
}

/// Reads a whole table file.
pub fn read_table<R: Record>(path: &Path) -> Result<Vec<R>> {
    TableReader::<R>::open(path)?.read_all()
}

/// Reads only the key-value metadata of a Parquet file (None if it is not one).
pub use crate::stage::read_metadata;

/// A writer of one table file: rows go to a temporary file beside `path`, which is
/// renamed into place by [`TableWriter::finish`]; dropped unfinished, it leaves
/// nothing under the final name.
pub struct TableWriter<R: Record> {
    schema: SchemaRef,
    extra: Vec<String>,
    buffer: Vec<R>,
    writer: BatchWriter,
}

/// Writer properties for every table: zstd, row groups of [`BATCH_ROWS`], metadata.
fn properties(meta: &Meta, extra_kv: &[(String, String)]) -> WriterProperties {
    let mut kv = vec![
        KeyValue::new(meta_key::STAGE.into(), meta.stage.clone()),
        KeyValue::new(meta_key::VERSION.into(), meta.version.to_string()),
        KeyValue::new(meta_key::KEY.into(), meta.key.clone()),
        KeyValue::new(meta_key::PARAMS.into(), meta.params.clone()),
        KeyValue::new(
            meta_key::INPUTS.into(),
            serde_json::to_string(&meta.inputs).expect("strings serialize"),
        ),
    ];
    kv.extend(
        extra_kv
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid level"),
        ))
        .set_max_row_group_row_count(Some(BATCH_ROWS))
        .set_key_value_metadata(Some(kv))
        .build()
}

impl<R: Record> TableWriter<R> {
    /// Starts writing `path` (atomically) with `extra` scorer columns and metadata.
    pub fn create(path: &Path, extra: &[String], meta: &Meta) -> Result<Self> {
        Self::create_with(path, extra, meta, &[])
    }

    /// As [`TableWriter::create`], with further key-value metadata.
    pub fn create_with(
        path: &Path,
        extra: &[String],
        meta: &Meta,
        extra_kv: &[(String, String)],
    ) -> Result<Self> {
        let schema = R::TABLE.schema(extra);
        let writer = BatchWriter::create(path, schema.clone(), meta, extra_kv)?;
        Ok(Self {
            schema,
            extra: extra.to_vec(),
            buffer: Vec::new(),
            writer,
        })
    }

    /// Adds rows; they are flushed a row group at a time.
    pub fn write(&mut self, rows: impl IntoIterator<Item = R>) -> Result<()> {
        for r in rows {
            self.buffer.push(r);
            if self.buffer.len() >= BATCH_ROWS {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let batch = R::to_batch(&self.buffer, &self.schema, &self.extra)
            .with_context(|| format!("{}: cannot build rows", self.writer.path.display()))?;
        self.writer.write(&batch)?;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the footer, syncs and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.flush()?;
        self.writer.finish()
    }
}

/// A writer of record batches of any schema (a table another tool made, carried
/// through a stage): written atomically with the stage metadata, like
/// [`TableWriter`].
pub struct BatchWriter {
    writer: ArrowWriter<AtomicFile>,
    schema: SchemaRef,
    path: PathBuf,
}

impl BatchWriter {
    /// Starts writing `path` (atomically) with `schema` and the stage metadata.
    pub fn create(
        path: &Path,
        schema: SchemaRef,
        meta: &Meta,
        extra_kv: &[(String, String)],
    ) -> Result<Self> {
        let file = AtomicFile::create(path)?;
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties(meta, extra_kv)))
            .with_context(|| format!("{}: cannot start Parquet writer", path.display()))?;
        Ok(Self {
            writer,
            schema,
            path: path.to_owned(),
        })
    }

    /// The schema every batch must have.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Adds one batch of the writer's schema.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer
            .write(batch)
            .with_context(|| format!("{}: write failed", self.path.display()))
    }

    /// Writes the footer, syncs and renames the file into place.
    pub fn finish(self) -> Result<PathBuf> {
        let file = self
            .writer
            .into_inner()
            .with_context(|| format!("{}: cannot close Parquet writer", self.path.display()))?;
        file.commit()?;
        Ok(self.path)
    }
}

/// Opens any Parquet file as a stream of record batches of at most [`BATCH_ROWS`]
/// rows, with its schema and row count.
pub fn open_batches(
    path: &Path,
) -> Result<(
    SchemaRef,
    usize,
    parquet::arrow::arrow_reader::ParquetRecordBatchReader,
)> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let schema = builder.schema().clone();
    let rows = builder.metadata().file_metadata().num_rows() as usize;
    let reader = builder
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok((schema, rows, reader))
}

/// Writes a whole table file atomically.
pub fn write_table<R: Record>(
    path: &Path,
    rows: impl IntoIterator<Item = R>,
    extra: &[String],
    meta: &Meta,
) -> Result<PathBuf> {
    let mut w = TableWriter::<R>::create(path, extra, meta)?;
    w.write(rows)?;
    w.finish()
}
