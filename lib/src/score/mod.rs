//! Quark step 2, "score": a reward per (prompt, completion), higher is better. This
//! module owns the [`Scorer`] trait, the built-in scorers (one file each) and
//! [`score_file`], which streams a generations table through a scorer into a scored
//! table, content-hashed like every stage.
//!
//! Non-finite values: a built-in scorer that yields NaN or an infinity has a bug, so
//! [`score_file`] stops with an error naming the file and the row. An external scorer
//! ([`Scorer::external`]: `command`, `perspective`) is outside our control; its
//! non-finite values become nulls (unscored rows, which learning skips) and one
//! warning on stderr counts them.

pub mod command;
pub(crate) mod input;
mod partial;
pub mod perplexity;
pub mod perspective;
pub mod profanity;
pub mod repetition;
pub mod sentiment;
pub mod toxicity;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::schema::{BatchWriter, GenerationRow, ScoredRow, TableWriter};
use crate::stage::Stage;
use input::{Batch, ScoringInput};

/// The score of one row: its reward and the scorer's raw values (aligned with
/// [`Scorer::columns`]). None marks a row the scorer cannot score (its final
/// answer); `failure` marks a row it could not score this time (a service was
/// unreachable): such a result is never cached as complete, and a rerun tries again.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub reward: Option<f64>,
    pub raw: Vec<Option<f64>>,
    /// Why this try failed, for a row worth another try.
    pub failure: Option<String>,
}

impl Score {
    /// A score whose reward and raw values are all known.
    pub fn new(reward: f64, raw: Vec<f64>) -> Self {
        Self {
            reward: Some(reward),
            raw: raw.into_iter().map(Some).collect(),
            failure: None,
        }
    }

    /// An unscored row with `columns` null raw values.
    pub fn null(columns: usize) -> Self {
        Self {
            reward: None,
            raw: vec![None; columns],
            failure: None,
        }
    }

    /// A row whose scoring failed this time, for `why`.
    pub fn failed(columns: usize, why: String) -> Self {
        Self {
            failure: Some(why),
            ..Self::null(columns)
        }
    }
}

/// A reward model. [`score_file`] calls [`Scorer::begin`] once with the input file,
/// [`Scorer::score`] on each batch of rows in file order, then [`Scorer::finish`].
pub trait Scorer: Send {
    /// The scorer's name (`--scorer NAME`), part of the stage key.
    fn name(&self) -> &'static str;

    /// Names of the raw columns it adds after `reward` (e.g. `["toxicity"]`).
    fn columns(&self) -> Vec<String>;

    /// The options that change its scores, as JSON: part of the stage key.
    fn params(&self) -> Value {
        json!({})
    }

    /// Files the scores depend on (model assets); their content is part of the key.
    fn assets(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Whether it reads the completion's token ids (`completion_tokens`), which
    /// another tool's table may lack.
    fn needs_tokens(&self) -> bool {
        false
    }

    /// Whether the scores come from outside the project (a user's program, a web
    /// service): their non-finite values become nulls instead of an error.
    fn external(&self) -> bool {
        false
    }

    /// Called once before the first batch with the input file and its row count.
    fn begin(&mut self, _input: &Path, _rows: usize) -> Result<()> {
        Ok(())
    }

    /// Scores a batch of rows: one [`Score`] per row, in order.
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>>;

    /// Called once after the last batch (a program's exit status is checked here).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The stage parameters of a scorer run: its name, options and columns.
fn stage_params(scorer: &dyn Scorer) -> Value {
    json!({
        "scorer": scorer.name(),
        "options": scorer.params(),
        "columns": scorer.columns(),
    })
}

/// The stage a scorer run on `input` is: key = input content, scorer name, options
/// and the content of its assets.
pub fn score_stage(input: &Path, scorer: &dyn Scorer) -> Result<Stage> {
    let assets = scorer.assets();
    let mut inputs: Vec<&Path> = vec![input];
    inputs.extend(assets.iter().map(PathBuf::as_path));
    Stage::new(
        crate::schema::Table::Scored.name(),
        &stage_params(scorer),
        &inputs,
    )
}

/// Scores every row of `input` (a generations table, a scored table or pool, whose
/// score columns are kept, or any table with `prompt` and `completion`, whose columns
/// are carried through; see [`input`]) and writes the scored table to `out` (a file,
/// or a folder to name it `scored-<key>.parquet` in). Streams one batch at a time, so
/// memory stays flat. Does nothing and returns the path when that output already
/// exists for the same key.
///
/// Only a complete result is written under the output's name. When a scorer fails
/// on some rows (an unreachable web service), the scores it got are kept beside the
/// output in `.partial-<name>` and the run is an error; the next run with the same
/// key scores only the rows that failed.
pub fn score_file(input: &Path, scorer: &mut dyn Scorer, out: &Path) -> Result<PathBuf> {
    let stage = score_stage(input, scorer)?;
    let path = stage.resolve_out(out, ".parquet");
    if stage.is_done(&path) {
        return Ok(path);
    }
    let name = scorer.name();
    let new_columns = scorer.columns();
    let mut input_rows = ScoringInput::open(input, &new_columns)?;
    if scorer.needs_tokens() && !input_rows.has_tokens() {
        bail!(
            "{}: the {name} scorer needs the column `{}` (token ids)",
            input.display(),
            crate::schema::col::COMPLETION_TOKENS
        );
    }
    let total = input_rows.num_rows();
    let partial_path = partial::path_for(&path);
    let earlier_run = partial::load(&partial_path, &stage, total, new_columns.len())?;
    // A scored table scored again keeps its scorer columns (so that, say, a
    // perplexity and a toxicity column end up side by side), except those the new
    // scorer writes afresh; its reward is replaced.
    let kept: Vec<usize> = (0..input_rows.extra.len())
        .filter(|&i| !new_columns.contains(&input_rows.extra[i]))
        .collect();
    let mut columns: Vec<String> = kept.iter().map(|&i| input_rows.extra[i].clone()).collect();
    columns.extend(new_columns.iter().cloned());
    let mut writer = match input_rows.carried_schema() {
        None => Output::Table(TableWriter::<ScoredRow>::create(
            &path,
            &columns,
            stage.meta(),
        )?),
        Some(carried) => Output::Batches(BatchWriter::create(
            &path,
            scored_schema(&carried, &new_columns),
            stage.meta(),
            &[],
        )?),
    };
    let progress = progress_bar(total as u64, name);
    scorer.begin(input, total)?;
    let mut all: Vec<Score> = Vec::with_capacity(total);
    let mut replaced = 0usize;
    while let Some(batch) = input_rows.next_batch() {
        let batch = batch?;
        let first = all.len();
        let todo: Vec<usize> = (0..batch.rows.len())
            .filter(|&i| {
                earlier_run
                    .as_ref()
                    .is_none_or(|e| e[first + i].failure.is_some())
            })
            .collect();
        let fresh = if todo.len() == batch.rows.len() {
            scorer.score(&batch.rows)?
        } else if todo.is_empty() {
            Vec::new()
        } else {
            let rows: Vec<GenerationRow> = todo.iter().map(|&i| batch.rows[i].clone()).collect();
            scorer.score(&rows)?
        };
        if fresh.len() != todo.len() {
            bail!(
                "{}: the {name} scorer returned {} scores for {} rows",
                input.display(),
                fresh.len(),
                todo.len()
            );
        }
        let mut fresh = fresh.into_iter();
        let mut scores = Vec::with_capacity(batch.rows.len());
        for (i, generation) in batch.rows.iter().enumerate() {
            let mut score = if todo.binary_search(&i).is_ok() {
                fresh.next().expect("one score a row to do")
            } else {
                earlier_run.as_ref().expect("an earlier run")[first + i].clone()
            };
            if score.raw.len() != new_columns.len() {
                bail!(
                    "{}: the {name} scorer returned {} raw values for {} columns",
                    input.display(),
                    score.raw.len(),
                    new_columns.len()
                );
            }
            let bad = score.reward.is_some_and(|x| !x.is_finite())
                || score.raw.iter().any(|x| x.is_some_and(|x| !x.is_finite()));
            if bad {
                if !scorer.external() {
                    bail!(
                        "{}: row {} (prompt_id {}, sample_index {}, iteration {}): the {name} scorer gave a non-finite value (reward {:?}, raw {:?})",
                        input.display(),
                        first + i,
                        generation.prompt_id,
                        generation.sample_index,
                        generation.iteration,
                        score.reward,
                        score.raw
                    );
                }
                replaced += 1;
                score.reward = score.reward.filter(|x| x.is_finite());
                score.raw = score
                    .raw
                    .into_iter()
                    .map(|x| x.filter(|x| x.is_finite()))
                    .collect();
            }
            scores.push(score);
        }
        writer.write(batch, &kept, &scores)?;
        all.extend(scores);
        progress.set_position(all.len() as u64);
    }
    scorer.finish()?;
    progress.finish_and_clear();
    let failed: Vec<&Score> = all.iter().filter(|s| s.failure.is_some()).collect();
    if !failed.is_empty() {
        let mut why: Vec<&str> = Vec::new();
        for s in &failed {
            let w = s.failure.as_deref().unwrap_or_default();
            if why.len() < 3 && !why.contains(&w) {
                why.push(w);
            }
        }
        let n = failed.len();
        partial::save(&partial_path, &stage, &all)?;
        drop(writer);
        bail!(
            "{}: the {name} scorer could not score {n} of {} rows (e.g. {}); the other scores are kept in {} and a rerun scores only the {n} that failed",
            input.display(),
            all.len(),
            why.join("; "),
            partial_path.display()
        );
    }
    if replaced > 0 {
        eprintln!(
            "score: warning: {}: the {name} scorer gave {replaced} non-finite values; those rows are null",
            input.display()
        );
    }
    let nulls = all.iter().filter(|s| s.reward.is_none()).count();
    if nulls > 0 {
        eprintln!(
            "score: {}: {nulls} of {} rows have no reward (null)",
            input.display(),
            all.len()
        );
    }
    let path = writer
        .finish()
        .with_context(|| format!("{}: cannot write the scored table", path.display()))?;
    if partial_path.exists() {
        std::fs::remove_file(&partial_path)
            .with_context(|| format!("{}: cannot remove", partial_path.display()))?;
    }
    Ok(path)
}

/// The output of another tool's table: its carried columns, `reward`, the scorer's.
fn scored_schema(
    carried: &arrow::datatypes::SchemaRef,
    columns: &[String],
) -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    let mut fields: Vec<Field> = carried
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(
        crate::schema::col::REWARD,
        DataType::Float64,
        true,
    ));
    fields.extend(
        columns
            .iter()
            .map(|c| Field::new(c, DataType::Float64, true)),
    );
    std::sync::Arc::new(Schema::new(fields))
}

/// Where scored rows go: a scored table, or another tool's columns with the scores.
enum Output {
    Table(TableWriter<ScoredRow>),
    Batches(BatchWriter),
}

impl Output {
    /// Writes a batch's rows with their scores (and, for a scored input, the kept
    /// earlier score columns).
    fn write(&mut self, batch: Batch, kept: &[usize], scores: &[Score]) -> Result<()> {
        match self {
            Output::Table(w) => {
                let rows = batch.rows.into_iter().zip(scores).enumerate().map(
                    |(i, (generation, score))| {
                        let mut values: Vec<Option<f64>> = match &batch.earlier {
                            Some(e) => kept.iter().map(|&j| e[i][j]).collect(),
                            None => Vec::new(),
                        };
                        values.extend(score.raw.iter().copied());
                        ScoredRow {
                            generation,
                            reward: score.reward,
                            scores: values,
                            quantile: None,
                        }
                    },
                );
                w.write(rows)
            }
            Output::Batches(w) => {
                use arrow::array::{ArrayRef, Float64Array};
                let carried = batch
                    .carried
                    .expect("another tool's table carries its columns");
                let mut cols: Vec<ArrayRef> = carried.columns().to_vec();
                cols.push(std::sync::Arc::new(
                    scores.iter().map(|s| s.reward).collect::<Float64Array>(),
                ));
                let n_raw = w.schema().fields().len() - cols.len();
                for j in 0..n_raw {
                    cols.push(std::sync::Arc::new(
                        scores.iter().map(|s| s.raw[j]).collect::<Float64Array>(),
                    ));
                }
                let schema = w.schema();
                let out = arrow::array::RecordBatch::try_new(schema, cols)?;
                w.write(&out)
            }
        }
    }

    fn finish(self) -> Result<PathBuf> {
        match self {
            Output::Table(w) => w.finish(),
            Output::Batches(w) => w.finish(),
        }
    }
}

fn progress_bar(total: u64, name: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} rows ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("score ({name})"));
    bar
}

/// The built-in scorers, as `--scorer` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScorerKind {
    Toxicity,
    Profanity,
    Sentiment,
    Repetition,
    Command,
    Perspective,
    Perplexity,
}

/// Everything a scorer may need from the command line; each scorer reads its part.
#[derive(Clone, Debug)]
pub struct ScorerOptions {
    /// The exported toxicity classifier (scripts/export_toxicity.py).
    pub toxicity_model: PathBuf,
    /// The folder of VADER's lexicons (scripts/assets/21-vader.sh).
    pub vader_lexicon: PathBuf,
    /// Which sentiment the sentiment reward favours.
    pub target: sentiment::Target,
    /// The program of the command scorer (run with `sh -c`).
    pub command: Option<String>,
    /// How long the command scorer waits for one row's answer.
    pub command_timeout: std::time::Duration,
    /// The Perspective API settings (the key comes from the environment).
    pub perspective: perspective::PerspectiveOptions,
    /// The language model of the perplexity scorer, where it runs and its dtype.
    pub model: Option<PathBuf>,
    pub device: tch::Device,
    pub kind: tch::Kind,
}

/// The default location of the exported toxicity classifier, relative to the
/// project's home ([`crate::home`], where `just setup` writes it).
pub const DEFAULT_TOXICITY_MODEL: &str = "data/rewards/toxicity-linear.json";

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            toxicity_model: crate::home::asset(DEFAULT_TOXICITY_MODEL),
            vader_lexicon: crate::home::asset(sentiment::DEFAULT_LEXICON_DIR),
            command_timeout: command::DEFAULT_TIMEOUT,
            target: sentiment::Target::Positive,
            command: None,
            perspective: perspective::PerspectiveOptions::default(),
            model: None,
            device: tch::Device::Cpu,
            kind: tch::Kind::Float,
        }
    }
}

/// Builds the scorer `kind` from the options (loading its assets).
pub fn build(kind: ScorerKind, opts: &ScorerOptions) -> Result<Box<dyn Scorer>> {
    Ok(match kind {
        ScorerKind::Toxicity => Box::new(toxicity::ToxicityScorer::open(&opts.toxicity_model)?),
        ScorerKind::Profanity => Box::new(profanity::ProfanityScorer),
        ScorerKind::Sentiment => Box::new(sentiment::SentimentScorer::open(
            &opts.vader_lexicon,
            opts.target,
        )?),
        ScorerKind::Repetition => Box::new(repetition::RepetitionScorer),
        ScorerKind::Command => {
            let Some(cmd) = opts.command.as_deref() else {
                bail!("the command scorer needs --command 'PROGRAM ARGS'");
            };
            Box::new(command::CommandScorer::new(cmd, opts.command_timeout)?)
        }
        ScorerKind::Perspective => Box::new(perspective::PerspectiveScorer::new(
            opts.perspective.clone(),
        )?),
        ScorerKind::Perplexity => {
            let Some(dir) = opts.model.as_deref() else {
                bail!("the perplexity scorer needs --model DIR (the reference model)");
            };
            Box::new(perplexity::PerplexityScorer::open(
                dir,
                opts.device,
                opts.kind,
            )?)
        }
    })
}
