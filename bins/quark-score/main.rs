//! quark-score: append a reward (and the scorer's raw values) to every generation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use quark::home::asset;
use quark::model::{DTypeArg, DeviceArg};
use quark::score::perspective::{PerspectiveOptions, DEFAULT_URL};
use quark::score::sentiment::{Target, DEFAULT_LEXICON_DIR};
use quark::score::{build, score_file, ScorerKind, ScorerOptions, DEFAULT_TOXICITY_MODEL};

/// Score generations with a reward model: the same rows, with `reward` appended.
///
/// Reads a generations table (quark-sample output; a scored file or a pool also works,
/// its rows are scored afresh) and writes the same rows with `reward` (f64, higher is
/// better, null where the scorer could not score the row) and the scorer's raw
/// columns: toxicity -> `toxicity` (reward = 1 - toxicity); profanity -> `profanity`;
/// sentiment -> `sentiment` in [0, 1]; repetition -> `rep_2`, `rep_3`, `rep_4`,
/// `diversity` (reward = diversity); command -> `command`; perspective ->
/// `perspective_toxicity`; perplexity -> `perplexity` under --model given the prompt
/// (reward = -ln perplexity). Scoring a scored file keeps its earlier scorer columns
/// (the new reward replaces the old), so one file can carry several. Any other
/// Parquet table with the text columns `prompt` and `completion` (texts another tool
/// made) is scored too, its own columns carried through unchanged.
///
/// Only a complete result is written: when a scorer fails on some rows (the
/// Perspective API unreachable), the scores it got are kept in `.partial-NAME`
/// beside the output and the run fails; the next run asks only for the failed rows.
///
/// Feeds quark-bin (and quark-eval). Content-hashed: the output's key covers the
/// input's content, the scorer, its options and its model file, so a second run
/// prints the existing path at once. Cost: toxicity, profanity, sentiment and
/// repetition run on all cores, many thousands of rows a second; perplexity runs a
/// language model (hundreds of rows a second on a CPU for a small one); command and
/// perspective are as fast as the program or the API quota. Streams the input, so
/// memory stays flat. Prints the output path.
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// The table to score (Parquet: generations, scored, or any with `prompt` and
    /// `completion`); `-` reads it from stdin.
    #[arg(long = "in")]
    input: PathBuf,
    /// The reward model.
    #[arg(long, value_enum, default_value_t = ScorerArg::Toxicity)]
    scorer: ScorerArg,
    /// Output file, or a folder to write `scored-<key>.parquet` into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// toxicity: the classifier exported by `just setup` (scripts/export_toxicity.py)
    /// [default: data/rewards/toxicity-linear.json in the project's home: $QUARK_HOME,
    /// else the checkout the program was built in].
    #[arg(long)]
    toxicity_model: Option<PathBuf>,
    /// sentiment: the folder of VADER's lexicons (copied from PyPI vaderSentiment 3.3.2
    /// by `just setup`) [default: data/rewards/vader in the project's home].
    #[arg(long)]
    vader_lexicon: Option<PathBuf>,
    /// sentiment: which sentiment gets the high reward.
    #[arg(long, value_enum, default_value_t = TargetArg::Positive)]
    target: TargetArg,
    /// command: the program, run with `sh -c`; it reads one JSON object per row
    /// ({"prompt_id","sample_index","iteration","prompt","completion"}) on stdin and
    /// prints one number (the reward) or `null` per line, in order.
    #[arg(long)]
    command: Option<String>,
    /// command: seconds to wait for each row's answer (the first one included)
    /// before the program is stopped and the run fails.
    #[arg(long, default_value_t = 600.0, value_parser = quark::check::seconds)]
    timeout: f64,
    /// perspective: requests per second (retries included); the key is read from
    /// PERSPECTIVE_API_KEY.
    #[arg(long, default_value_t = 1.0, value_parser = quark::check::rate)]
    rate_limit: f64,
    /// perspective: retries of a row (429, 5xx, network errors; exponential back-off
    /// from 1 s) before it has failed: the run then fails, keeping the scores it got,
    /// and a rerun tries only the failed rows again.
    #[arg(long, default_value_t = 5)]
    max_retries: u32,
    /// perspective: the API endpoint (a proxy or a test server).
    #[arg(long, default_value = DEFAULT_URL)]
    perspective_url: String,
    /// perplexity: the language model folder (Hugging Face layout), normally the
    /// reference model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// perplexity: where the model runs (auto = cuda when available).
    #[arg(long, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// perplexity: the dtype the model computes in (auto: bf16 where the device
    /// computes it natively, else f32).
    #[arg(long, default_value_t = DTypeArg::Auto)]
    dtype: DTypeArg,
}

/// `--scorer` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScorerArg {
    /// alt-profanity-check's TF-IDF linear classifier (the default).
    Toxicity,
    /// The rustrict crate's profanity analysis.
    Profanity,
    /// VADER sentiment (see --target).
    Sentiment,
    /// Diversity of the completion's tokens (1 - rep-n, n = 2..4).
    Repetition,
    /// Any program (see --command).
    Command,
    /// The Perspective API (see --rate-limit).
    Perspective,
    /// Perplexity under a language model given the prompt (see --model).
    Perplexity,
}

impl From<ScorerArg> for ScorerKind {
    fn from(a: ScorerArg) -> Self {
        match a {
            ScorerArg::Toxicity => ScorerKind::Toxicity,
            ScorerArg::Profanity => ScorerKind::Profanity,
            ScorerArg::Sentiment => ScorerKind::Sentiment,
            ScorerArg::Repetition => ScorerKind::Repetition,
            ScorerArg::Command => ScorerKind::Command,
            ScorerArg::Perspective => ScorerKind::Perspective,
            ScorerArg::Perplexity => ScorerKind::Perplexity,
        }
    }
}

/// `--target` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum TargetArg {
    Positive,
    Negative,
}

impl From<TargetArg> for Target {
    fn from(a: TargetArg) -> Self {
        match a {
            TargetArg::Positive => Target::Positive,
            TargetArg::Negative => Target::Negative,
        }
    }
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-score");
    quark::cli::run("quark-score", || {
        let device = args.device.device()?;
        let opts = ScorerOptions {
            toxicity_model: args
                .toxicity_model
                .clone()
                .unwrap_or_else(|| asset(DEFAULT_TOXICITY_MODEL)),
            vader_lexicon: args
                .vader_lexicon
                .clone()
                .unwrap_or_else(|| asset(DEFAULT_LEXICON_DIR)),
            target: args.target.into(),
            command: args.command.clone(),
            command_timeout: Duration::from_secs_f64(args.timeout),
            perspective: PerspectiveOptions {
                api_key: None,
                url: args.perspective_url.clone(),
                rate_limit: args.rate_limit,
                max_retries: args.max_retries,
                backoff: Duration::from_secs(1),
                ..PerspectiveOptions::default()
            },
            model: args.model.clone(),
            device,
            // Only the perplexity scorer runs a model.
            kind: match args.scorer {
                ScorerArg::Perplexity => args.dtype.resolve(device).into(),
                _ => quark::device::DType::F32.into(),
            },
        };
        let mut scorer = build(args.scorer.into(), &opts)?;
        let input = quark::cli::input_path(&args.input)?;
        Ok(vec![score_file(&input, scorer.as_mut(), &args.out)?])
    })
}
