//! 95% bootstrap confidence intervals that resample prompts (the unit the held-out
//! set is drawn in): each replicate draws as many prompts as the model has, with
//! replacement, and recomputes every metric from the drawn prompts' parts
//! ([`PromptParts`]); the interval is the 2.5th to 97.5th percentile of the
//! replicates (percentile bootstrap, 1,000 replicates, a fixed seed so an evaluation
//! is reproducible, [`SplitMix64`]). A policy's difference to the reference is paired: one resample
//! of the prompts both have serves both models.

use super::metrics::PromptParts;
pub use crate::rng::SplitMix64;

/// Replicates per interval.
pub const REPLICATES: usize = 1000;
/// The seed of every resample: the same inputs give the same intervals.
pub const SEED: u64 = 0x0b00_7575_7261_7000;
/// The interval's coverage.
pub const LEVEL: f64 = 0.95;

/// The prompt indices of each replicate: `n` draws with replacement from 0..n.
pub fn resamples(n: usize, replicates: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed);
    (0..replicates)
        .map(|_| (0..n).map(|_| rng.below(n)).collect())
        .collect()
}

/// The q-quantile (0..=1) of `values` with linear interpolation between order
/// statistics (numpy's default `percentile`); None for no values.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = q * (v.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (at - lo as f64))
}

/// The central [`LEVEL`] interval of replicate values.
fn interval(values: &[f64]) -> Option<(f64, f64)> {
    let tail = (1.0 - LEVEL) / 2.0;
    Some((percentile(values, tail)?, percentile(values, 1.0 - tail)?))
}

/// Each metric's interval over `replicates` resamples of the model's prompts
/// (a replicate in which a metric has no value is left out of its interval).
pub fn intervals(parts: &PromptParts, replicates: usize, seed: u64) -> Vec<Option<(f64, f64)>> {
    let mut per_metric = vec![Vec::with_capacity(replicates); parts.metrics.len()];
    for draw in resamples(parts.prompts.len(), replicates, seed) {
        for (m, (v, _)) in parts.values(draw).into_iter().enumerate() {
            per_metric[m].extend(v);
        }
    }
    per_metric.iter().map(|v| interval(v)).collect()
}

/// A model's difference to the reference on one metric: model minus reference over
/// the prompts both have, and its paired interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Difference {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// Each of `model`'s metrics minus `reference`'s (None where the reference lacks the
/// metric or the two share no prompt): the point difference on their common prompts
/// and its interval, each replicate resampling those prompts once for both models.
pub fn differences(
    model: &PromptParts,
    reference: &PromptParts,
    replicates: usize,
    seed: u64,
) -> Vec<Option<Difference>> {
    // The common prompts as index pairs (both lists are sorted).
    let mut pairs = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < model.prompts.len() && j < reference.prompts.len() {
        match model.prompts[i].cmp(&reference.prompts[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                pairs.push((i, j));
                i += 1;
                j += 1;
            }
        }
    }
    let columns: Vec<Option<usize>> = model
        .metrics
        .iter()
        .map(|m| reference.metrics.iter().position(|r| r == m))
        .collect();
    let diff = |draw: &[usize]| -> Vec<Option<f64>> {
        let a = model.values(draw.iter().map(|&d| pairs[d].0));
        let b = reference.values(draw.iter().map(|&d| pairs[d].1));
        columns
            .iter()
            .zip(&a)
            .map(|(c, (va, _))| Some(va.as_ref()? - b[(*c)?].0?))
            .collect()
    };
    if pairs.is_empty() {
        return vec![None; model.metrics.len()];
    }
    let all: Vec<usize> = (0..pairs.len()).collect();
    let point = diff(&all);
    let mut per_metric = vec![Vec::with_capacity(replicates); model.metrics.len()];
    for draw in resamples(pairs.len(), replicates, seed) {
        for (m, d) in diff(&draw).into_iter().enumerate() {
            per_metric[m].extend(d);
        }
    }
    point
        .into_iter()
        .zip(&per_metric)
        .map(|(p, reps)| {
            let (low, high) = interval(reps)?;
            Some(Difference {
                value: p?,
                low,
                high,
            })
        })
        .collect()
}
