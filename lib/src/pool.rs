//! The data pool and its reward quantiles (Quark step 3, "quantize"): the previous
//! pool plus the newly scored rows, sorted by reward (highest first, ties broken by
//! prompt_id, sample_index, iteration), cut into K equal quantiles with the
//! remainder in the last (worst) one. Quantile 0 is the best. Rows without a reward
//! stay in the file with a null quantile and take no part in learning.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::schema::{read_table, PoolRow, ScoredRow, TableReader, TableWriter};
use crate::stage::Stage;

/// How quark-bin builds a pool.
#[derive(Clone, Debug, Serialize)]
pub struct BinOptions {
    /// Number of reward quantiles K.
    pub quantiles: u32,
    /// Keep only the newest rows (by iteration) when the pool is larger.
    pub max_pool_rows: Option<usize>,
    /// Keep only the rows of the newest iteration.
    pub only_latest: bool,
}

/// The summary of one quantile, printed and stored in the pool's metadata.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct QuantileSummary {
    pub quantile: u32,
    pub rows: usize,
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

/// Metadata key under which a pool stores its per-quantile summary (JSON).
pub const SUMMARY_KEY: &str = "quark.quantiles";

/// Orders rows best first: reward descending, then the row identity ascending.
/// Rows without a reward come last.
fn compare(a: &ScoredRow, b: &ScoredRow) -> std::cmp::Ordering {
    let id = |r: &ScoredRow| {
        (
            r.generation.prompt_id.clone(),
            r.generation.sample_index,
            r.generation.iteration,
        )
    };
    match (a.reward, b.reward) {
        (Some(x), Some(y)) => y.total_cmp(&x).then_with(|| id(a).cmp(&id(b))),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => id(a).cmp(&id(b)),
    }
}

/// Sorts `rows` best first and sets each row's quantile. With n scored rows the
/// quantile size is max(1, n / k): rank r gets min(r / size, k - 1), so the
/// remainder falls in the last quantile, and a pool smaller than K puts each row in
/// a quantile of its own, best first.
pub fn assign_quantiles(rows: &mut [ScoredRow], k: u32) -> Result<()> {
    if k == 0 {
        bail!("the number of quantiles must be at least 1");
    }
    if let Some(r) = rows.iter().find(|r| r.reward.is_some_and(|x| x.is_nan())) {
        bail!(
            "row ({}, {}, iteration {}) has a NaN reward",
            r.generation.prompt_id,
            r.generation.sample_index,
            r.generation.iteration
        );
    }
    rows.sort_by(compare);
    let scored = rows.iter().filter(|r| r.reward.is_some()).count();
    let size = (scored / k as usize).max(1);
    for (rank, row) in rows.iter_mut().enumerate() {
        row.quantile = row.reward.map(|_| ((rank / size) as u32).min(k - 1));
    }
    Ok(())
}

/// Summaries of each non-empty quantile, best first.
pub fn summarize(rows: &[ScoredRow], k: u32) -> Vec<QuantileSummary> {
    (0..k)
        .filter_map(|q| {
            let rewards: Vec<f64> = rows
                .iter()
                .filter(|r| r.quantile == Some(q))
                .filter_map(|r| r.reward)
                .collect();
            (!rewards.is_empty()).then(|| QuantileSummary {
                quantile: q,
                rows: rewards.len(),
                min_reward: rewards.iter().copied().fold(f64::INFINITY, f64::min),
                mean_reward: rewards.iter().sum::<f64>() / rewards.len() as f64,
                max_reward: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            })
        })
        .collect()
}

/// Puts rows with different score columns on one list of columns (the union, in
/// first-seen order); a row lacking a column gets null there.
fn align(tables: Vec<(Vec<String>, Vec<ScoredRow>)>) -> (Vec<String>, Vec<ScoredRow>) {
    let mut names: Vec<String> = Vec::new();
    for (cols, _) in &tables {
        for c in cols {
            if !names.contains(c) {
                names.push(c.clone());
            }
        }
    }
    let mut out = Vec::new();
    for (cols, rows) in tables {
        let index: Vec<Option<usize>> = names
            .iter()
            .map(|n| cols.iter().position(|c| c == n))
            .collect();
        out.extend(rows.into_iter().map(|mut r| {
            r.scores = index.iter().map(|i| i.and_then(|i| r.scores[i])).collect();
            r
        }));
    }
    (names, out)
}

/// The stage (and so the pool's key) of binning `scored` onto `previous` with
/// `opts`, once the options are checked.
pub fn stage(scored: &[PathBuf], previous: Option<&Path>, opts: &BinOptions) -> Result<Stage> {
    if scored.is_empty() {
        bail!("no scored files given");
    }
    let max = crate::check::MAX_QUANTILES;
    if opts.quantiles == 0 || opts.quantiles > max {
        bail!("--quantiles {}: must be 1 to {max}", opts.quantiles);
    }
    let mut inputs: Vec<&Path> = previous.into_iter().collect();
    inputs.extend(scored.iter().map(PathBuf::as_path));
    Stage::new("pool", opts, &inputs)
}

/// Builds the new pool from `previous` (optional) and the `scored` files and writes
/// it to `out` (a file, or a folder to name it by its key in). Returns the path;
/// does nothing if that output already exists for the same inputs and options.
pub fn bin(
    scored: &[PathBuf],
    previous: Option<&Path>,
    opts: &BinOptions,
    out: &Path,
) -> Result<PathBuf> {
    let stage = stage(scored, previous, opts)?;
    let mut inputs: Vec<&Path> = previous.into_iter().collect();
    inputs.extend(scored.iter().map(PathBuf::as_path));
    let path = stage.resolve_out(out, ".parquet");
    if stage.is_done(&path) {
        return Ok(path);
    }

    let mut tables = Vec::new();
    if let Some(p) = previous {
        let reader = TableReader::<PoolRow>::open(p)?;
        let extra = reader.extra().to_vec();
        let rows = reader.read_all()?.into_iter().map(|r| r.0).collect();
        tables.push((extra, rows));
    }
    for p in scored {
        let reader = TableReader::<ScoredRow>::open(p)?;
        let extra = reader.extra().to_vec();
        let mut rows = reader.read_all()?;
        // A scored file's quantile (if it is itself a pool) is recomputed here.
        rows.iter_mut().for_each(|r| r.quantile = None);
        check_rewards(p, &rows)?;
        tables.push((extra, rows));
    }
    let (extra, mut rows) = align(tables);
    check_unique(&inputs, &rows)?;
    keep_newest(&mut rows, opts);
    let n_scored = rows.iter().filter(|r| r.reward.is_some()).count();
    if n_scored == 0 {
        bail!(
            "{}: the pool has no scored rows (every reward is null or the inputs are empty)",
            scored[0].display()
        );
    }
    if n_scored < opts.quantiles as usize {
        // Fewer rows than quantiles would leave the worst quantiles empty while
        // the pool still records K, and quark-fit would make K control tokens.
        bail!(
            "{}: --quantiles {} needs at least {} scored rows, the pool has {n_scored}",
            scored[0].display(),
            opts.quantiles,
            opts.quantiles
        );
    }
    assign_quantiles(&mut rows, opts.quantiles)?;
    let summary = summarize(&rows, opts.quantiles);
    print_summary(&summary, rows.len());
    let mut w = TableWriter::<PoolRow>::create_with(
        &path,
        &extra,
        stage.meta(),
        &[(SUMMARY_KEY.to_owned(), serde_json::to_string(&summary)?)],
    )?;
    w.write(rows.into_iter().map(PoolRow))?;
    w.finish()
}

/// Refuses a NaN or infinite reward: a scorer writes null where it has no value,
/// and a NaN would sort nowhere (and vanish from an average).
pub(crate) fn check_rewards(path: &Path, rows: &[ScoredRow]) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        if let Some(x) = r.reward.filter(|x| !x.is_finite()) {
            bail!(
                "{}: row {i} (prompt_id {}, sample_index {}, iteration {}) has a non-finite reward {x}",
                path.display(),
                r.generation.prompt_id,
                r.generation.sample_index,
                r.generation.iteration,
            );
        }
    }
    Ok(())
}

/// Refuses a row identity (prompt_id, sample_index, iteration) seen twice.
pub(crate) fn check_unique(inputs: &[&Path], rows: &[ScoredRow]) -> Result<()> {
    let mut seen = HashSet::new();
    for r in rows {
        let g = &r.generation;
        if !seen.insert((g.prompt_id.as_str(), g.sample_index, g.iteration)) {
            bail!(
                "{}: row (prompt_id {}, sample_index {}, iteration {}) appears twice in the inputs",
                inputs
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                g.prompt_id,
                g.sample_index,
                g.iteration
            );
        }
    }
    Ok(())
}

/// Applies `--only-latest` and `--max-pool-rows` (newest iterations are kept; within
/// an iteration, the row order by identity decides).
fn keep_newest(rows: &mut Vec<ScoredRow>, opts: &BinOptions) {
    let newest = rows.iter().map(|r| r.generation.iteration).max();
    if opts.only_latest {
        rows.retain(|r| Some(r.generation.iteration) == newest);
    }
    if let Some(max) = opts.max_pool_rows {
        if rows.len() > max {
            rows.sort_by(|a, b| {
                let key =
                    |r: &ScoredRow| (r.generation.prompt_id.clone(), r.generation.sample_index);
                b.generation
                    .iteration
                    .cmp(&a.generation.iteration)
                    .then_with(|| key(a).cmp(&key(b)))
            });
            rows.truncate(max);
        }
    }
}

fn print_summary(summary: &[QuantileSummary], total: usize) {
    eprintln!("pool: {total} rows");
    eprintln!(
        "{:>8} {:>8} {:>10} {:>10} {:>10}",
        "quantile", "rows", "min", "mean", "max"
    );
    for s in summary {
        eprintln!(
            "{:>8} {:>8} {:>10.4} {:>10.4} {:>10.4}",
            s.quantile, s.rows, s.min_reward, s.mean_reward, s.max_reward
        );
    }
}

/// Reads a pool's rows (for quark-fit and tests).
pub fn read_pool(path: &Path) -> Result<Vec<ScoredRow>> {
    Ok(read_table::<PoolRow>(path)?
        .into_iter()
        .map(|r| r.0)
        .collect())
}
