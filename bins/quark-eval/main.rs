//! quark-eval: the paper's metrics per evaluated model, as a table and a plot.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quark::eval::{evaluate, format_table};

/// Compute the paper's evaluation metrics of each model and draw them across iterations.
///
/// Each --in file is a scored table (quark-score output) holding the evaluation
/// samples of ONE model, several per held-out prompt: the reference (rows without a
/// control token) or a policy (conditioned on `<|quark:0|>`, labelled `policy`, or on
/// `<|quark:k|>`, labelled `policy@qk`) at the iteration its rows record. Per model:
/// average max toxicity and toxicity probability (with a `toxicity` column),
/// perplexity under the reference (with a `perplexity` column), dist-1/2/3, share of
/// positive completions (with a `sentiment` column), rep-2/3/4 and diversity (from the
/// completion tokens), the mean reward and the number of samples.
///
/// Writes the folder --out with metrics.parquet (long format: task, model, iteration,
/// metric, value, count), metrics.json (the same rows) and metrics.png (the pools'
/// mean reward per quantile and each metric across iterations, the reference as a
/// dashed line). Prints the paths of metrics.parquet and metrics.png; the metrics go to
/// stderr as a table. Content-hashed: run again on the same inputs, it does nothing.
///
/// Reads quark-score (and quark-bin) outputs; feeds people and DuckDB. Cost: reads
/// every input into memory; seconds for thousands of samples.
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// Scored Parquet files, one model each (quark-score output on held-out prompts);
    /// `-` reads one from stdin.
    #[arg(long = "in", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// Pools (quark-bin output) whose reward quantiles to draw across iterations.
    #[arg(long = "pool", num_args = 1..)]
    pools: Vec<PathBuf>,
    /// The output folder (replaced only if it is an older quark-eval output).
    #[arg(long)]
    out: PathBuf,
    /// Task name stored in the table [default: toxicity or sentiment when the inputs
    /// carry that score column, else repetition].
    #[arg(long)]
    task: Option<String>,
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-eval");
    quark::cli::run("quark-eval", || {
        let inputs = args
            .inputs
            .iter()
            .map(|p| quark::cli::input_path(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let out = evaluate(&inputs, &args.pools, args.task.as_deref(), &args.out)?;
        if out.skipped {
            eprintln!("quark-eval: {} is up to date", out.dir.display());
        }
        eprint!("{}", format_table(&out.rows));
        Ok(vec![out.metrics, out.plot])
    })
}
