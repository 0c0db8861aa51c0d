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
pub mod perplexity;
pub mod perspective;
pub mod profanity;
pub mod repetition;
pub mod sentiment;
pub mod toxicity;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::schema::{GenerationRow, ScoredRow, TableReader, TableWriter};
use crate::stage::Stage;

/// The score of one row: its reward and the scorer's raw values (aligned with
/// [`Scorer::columns`]). None marks a row the scorer could not score.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub reward: Option<f64>,
    pub raw: Vec<Option<f64>>,
}

impl Score {
    /// A score whose reward and raw values are all known.
    pub fn new(reward: f64, raw: Vec<f64>) -> Self {
        Self {
            reward: Some(reward),
            raw: raw.into_iter().map(Some).collect(),
        }
    }

    /// An unscored row with `columns` null raw values.
    pub fn null(columns: usize) -> Self {
        Self {
            reward: None,
            raw: vec![None; columns],
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

/// Scores every row of `input` (a generations table, or any table with its columns:
/// a scored file or a pool is read as generations and scored afresh) and writes the
/// scored table to `out` (a file, or a folder to name it `scored-<key>.parquet` in).
/// Streams one batch at a time, so memory stays flat. Does nothing and returns the
/// path when that output already exists for the same key.
pub fn score_file(input: &Path, scorer: &mut dyn Scorer, out: &Path) -> Result<PathBuf> {
    let stage = score_stage(input, scorer)?;
    let path = stage.resolve_out(out, ".parquet");
    if stage.is_done(&path) {
        return Ok(path);
    }
    let mut input_rows = Carried::open(input)?;
    let total = input_rows.num_rows();
    let name = scorer.name();
    // A scored table scored again keeps its scorer columns (so that, say, a
    // perplexity and a toxicity column end up side by side), except those the new
    // scorer writes afresh; its reward is replaced.
    let new_columns = scorer.columns();
    let kept: Vec<usize> = (0..input_rows.extra.len())
        .filter(|&i| !new_columns.contains(&input_rows.extra[i]))
        .collect();
    let mut columns: Vec<String> = kept.iter().map(|&i| input_rows.extra[i].clone()).collect();
    columns.extend(new_columns.iter().cloned());
    let mut writer = TableWriter::<ScoredRow>::create(&path, &columns, stage.meta())?;
    let progress = progress_bar(total as u64, name);
    scorer.begin(input, total)?;
    let mut done = 0usize;
    let mut replaced = 0usize;
    let mut nulls = 0usize;
    while let Some(batch) = input_rows.next_batch() {
        let (rows, earlier) = batch?;
        let scores = scorer.score(&rows)?;
        if scores.len() != rows.len() {
            bail!(
                "{}: the {name} scorer returned {} scores for {} rows",
                input.display(),
                scores.len(),
                rows.len()
            );
        }
        let mut out_rows = Vec::with_capacity(rows.len());
        for (i, (generation, mut score)) in rows.into_iter().zip(scores).enumerate() {
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
                        done + i,
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
            nulls += usize::from(score.reward.is_none());
            let mut values: Vec<Option<f64>> = match &earlier {
                Some(e) => kept.iter().map(|&j| e[i][j]).collect(),
                None => Vec::new(),
            };
            values.extend(score.raw);
            out_rows.push(ScoredRow {
                generation,
                reward: score.reward,
                scores: values,
                quantile: None,
            });
        }
        done += out_rows.len();
        progress.set_position(done as u64);
        writer.write(out_rows)?;
    }
    scorer.finish()?;
    progress.finish_and_clear();
    if replaced > 0 {
        eprintln!(
            "score: warning: {}: the {name} scorer gave {replaced} non-finite values; those rows are null",
            input.display()
        );
    }
    if nulls > 0 {
        eprintln!(
            "score: {}: {nulls} of {done} rows have no reward (null)",
            input.display()
        );
    }
    writer
        .finish()
        .with_context(|| format!("{}: cannot write the scored table", path.display()))
}

/// The rows to score, a batch at a time: from a generations table, or from a scored
/// table or pool together with the scorer columns it already has.
enum ScoringInput {
    Generations(TableReader<GenerationRow>),
    Scored(TableReader<ScoredRow>),
}

impl ScoringInput {
    fn open(input: &Path) -> Result<(Self, Vec<String>)> {
        match TableReader::<ScoredRow>::open(input) {
            Ok(r) => {
                let extra = r.extra().to_vec();
                Ok((Self::Scored(r), extra))
            }
            // Not a scored table: it must be a generations table (whose error, if it
            // is not one either, names the missing generations column).
            Err(_) => Ok((Self::Generations(TableReader::open(input)?), Vec::new())),
        }
    }
}

/// [`ScoringInput`] with the names of the score columns it carries.
struct Carried {
    input: ScoringInput,
    extra: Vec<String>,
}

impl Carried {
    fn open(input: &Path) -> Result<Self> {
        let (input, extra) = ScoringInput::open(input)?;
        Ok(Self { input, extra })
    }

    fn num_rows(&self) -> usize {
        match &self.input {
            ScoringInput::Generations(r) => r.num_rows(),
            ScoringInput::Scored(r) => r.num_rows(),
        }
    }

    /// The next batch: its generations and, for a scored input, each row's earlier
    /// score values (aligned with `extra`).
    #[allow(clippy::type_complexity)]
    fn next_batch(
        &mut self,
    ) -> Option<Result<(Vec<GenerationRow>, Option<Vec<Vec<Option<f64>>>>)>> {
        match &mut self.input {
            ScoringInput::Generations(r) => r.next().map(|b| b.map(|rows| (rows, None))),
            ScoringInput::Scored(r) => r.next().map(|b| {
                b.map(|rows| {
                    let (gens, scores) = rows.into_iter().map(|s| (s.generation, s.scores)).unzip();
                    (gens, Some(scores))
                })
            }),
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
    /// The Perspective API settings (the key comes from the environment).
    pub perspective: perspective::PerspectiveOptions,
    /// The language model of the perplexity scorer, where it runs and its dtype.
    pub model: Option<PathBuf>,
    pub device: tch::Device,
    pub kind: tch::Kind,
}

/// The default location of the exported toxicity classifier, relative to the
/// project root (where `just setup` writes it).
pub const DEFAULT_TOXICITY_MODEL: &str = "data/rewards/toxicity-linear.json";

impl Default for ScorerOptions {
    fn default() -> Self {
        Self {
            toxicity_model: PathBuf::from(DEFAULT_TOXICITY_MODEL),
            vader_lexicon: PathBuf::from(sentiment::DEFAULT_LEXICON_DIR),
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
            Box::new(command::CommandScorer::new(cmd)?)
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
