//! quark-bin: add scored samples to the data pool and cut it into reward quantiles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quark::pool::{bin, BinOptions};

/// Add newly scored samples to the data pool and assign reward quantiles.
///
/// The new pool holds every row of --pool (the previous iteration's pool) and of each
/// --in file, sorted by reward (highest first; ties by prompt_id, sample_index,
/// iteration) and cut into K equal quantiles, the remainder going to the last, worst
/// one. Quantile 0 is the best; quark-fit conditions each row on its quantile token.
/// Rows with a null reward stay in the file with a null quantile.
///
/// Reads the output of quark-score; feeds quark-fit. Cost: reads the whole pool into
/// memory (a few hundred bytes a row). Prints the pool's path; a per-quantile summary
/// goes to stderr and into the file's metadata (`quark.quantiles`).
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// Scored Parquet files (quark-score output) to add to the pool.
    #[arg(long = "in", required = true, num_args = 1..)]
    inputs: Vec<PathBuf>,
    /// The previous pool (quark-bin output); none on the first iteration.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// Number of reward quantiles K (the paper uses 5).
    #[arg(long, default_value_t = 5, value_parser = quark::check::quantiles)]
    quantiles: u32,
    /// Keep at most N rows, the newest iterations first.
    #[arg(long, value_parser = quark::check::count)]
    max_pool_rows: Option<usize>,
    /// Keep only the newest iteration's rows (an on-policy variant).
    #[arg(long)]
    only_latest: bool,
    /// Output file, or a folder to write `pool-<key>.parquet` into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-bin");
    quark::cli::run("quark-bin", || {
        let opts = BinOptions {
            quantiles: args.quantiles,
            max_pool_rows: args.max_pool_rows,
            only_latest: args.only_latest,
        };
        Ok(vec![bin(
            &args.inputs,
            args.pool.as_deref(),
            &opts,
            &args.out,
        )?])
    })
}
