//! The `repetition` scorer: how much a completion repeats itself, on its token ids
//! (so that learning and scoring see the same units). rep-n = 1 - unique n-grams /
//! total n-grams (0 when the completion has fewer than n tokens) for n = 2, 3, 4;
//! diversity = Π (1 - rep-n) is the reward. Raw columns: rep_2, rep_3, rep_4, diversity.

use std::collections::HashSet;

use anyhow::Result;
use rayon::prelude::*;

use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// The n-gram orders measured.
pub const ORDERS: [usize; 3] = [2, 3, 4];

/// rep-n of a token sequence: the share of its n-grams that repeat an earlier one.
pub fn rep_n(tokens: &[u32], n: usize) -> f64 {
    if n == 0 || tokens.len() < n {
        return 0.0;
    }
    let windows = tokens.windows(n);
    let total = windows.len();
    let unique: HashSet<&[u32]> = windows.collect();
    1.0 - unique.len() as f64 / total as f64
}

/// (rep-2, rep-3, rep-4, diversity) of a token sequence.
pub fn repetition(tokens: &[u32]) -> [f64; 4] {
    let reps = ORDERS.map(|n| rep_n(tokens, n));
    let diversity = reps.iter().map(|r| 1.0 - r).product();
    [reps[0], reps[1], reps[2], diversity]
}

/// Scores completions by their diversity (higher is less repetitive).
#[derive(Clone, Copy, Debug, Default)]
pub struct RepetitionScorer;

impl Scorer for RepetitionScorer {
    fn name(&self) -> &'static str {
        "repetition"
    }
    fn columns(&self) -> Vec<String> {
        ["rep_2", "rep_3", "rep_4", "diversity"]
            .map(String::from)
            .to_vec()
    }
    fn needs_tokens(&self) -> bool {
        true
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        Ok(rows
            .par_iter()
            .map(|r| {
                let v = repetition(&r.completion_tokens);
                Score::new(v[3], v.to_vec())
            })
            .collect())
    }
}
