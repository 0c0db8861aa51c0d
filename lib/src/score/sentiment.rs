//! The `sentiment` scorer: VADER (Hutto & Gilbert, 2014; the `vader_sentiment` crate,
//! a port of the Python vaderSentiment with its lexicon) on the completion. The raw
//! column `sentiment` is the compound score mapped from [-1, 1] to [0, 1] as
//! (compound + 1) / 2 (1 = most positive); the reward is that value for
//! `--target positive` and 1 minus it for `--target negative`.

use anyhow::{anyhow, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use vader_sentiment::SentimentIntensityAnalyzer;

use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// Which sentiment the reward favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Positive,
    Negative,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Positive => "positive",
            Target::Negative => "negative",
        }
    }
}

/// VADER's compound score of `text`, in [-1, 1].
pub fn compound(text: &str) -> Result<f64> {
    // The port indexes its token lists directly; a panic on some odd input must
    // become an error, not take the whole run down.
    std::panic::catch_unwind(|| {
        SentimentIntensityAnalyzer::new()
            .polarity_scores(text)
            .get("compound")
            .copied()
    })
    .ok()
    .flatten()
    .ok_or_else(|| anyhow!("VADER failed on the text {:?}", truncate(text)))
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The VADER sentiment scorer.
#[derive(Clone, Copy, Debug)]
pub struct SentimentScorer {
    target: Target,
}

impl SentimentScorer {
    /// A scorer whose reward favours `target`.
    pub fn new(target: Target) -> Self {
        Self { target }
    }
}

impl Scorer for SentimentScorer {
    fn name(&self) -> &'static str {
        "sentiment"
    }
    fn columns(&self) -> Vec<String> {
        vec!["sentiment".into()]
    }
    fn params(&self) -> Value {
        json!({ "target": self.target.as_str() })
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        rows.par_iter()
            .map(|r| {
                let s = (compound(&r.completion)? + 1.0) / 2.0;
                let reward = match self.target {
                    Target::Positive => s,
                    Target::Negative => 1.0 - s,
                };
                Ok(Score::new(reward, vec![s]))
            })
            .collect()
    }
}
