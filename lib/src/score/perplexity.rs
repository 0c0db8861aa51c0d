//! The perplexity scorer: the completion's perplexity under a language model given
//! its prompt (the paper's fluency metric, with the reference model), reward =
//! -ln(perplexity), the mean log-probability of the completion's tokens.
//!
//! The text is tokenized afresh with the scoring model's own tokenizer, as the
//! DExperts/Quark evaluation does: prompt + completion encoded together, and the
//! loss of the tokens past the prompt's own token count (their `full_loss -
//! prompt_loss`), so any model in the Hugging Face layout can judge any generations,
//! whatever model wrote them. An empty prompt starts from BOS (or EOS); a completion
//! that adds no token has no perplexity (null). A model with a position limit (GPT-2's
//! n_positions) sees the prompt's last tokens that fit beside the completion, and of
//! a completion longer than the limit its first limit - 1 tokens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::{Score, Scorer};
use crate::model::Model;
use crate::schema::GenerationRow;

/// The raw column this scorer writes (the evaluation reads it by this name).
pub const COLUMN: &str = "perplexity";

/// Rows per forward pass.
pub const BATCH_ROWS: usize = 16;

/// Perplexity under the model of one folder.
pub struct PerplexityScorer {
    dir: PathBuf,
    dtype: String,
    model: Model,
}

impl PerplexityScorer {
    /// Loads the model of `dir` on `device`, computing in `kind`.
    pub fn open(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let model = Model::load(dir, device, kind)
            .with_context(|| format!("{}: cannot load the perplexity model", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            dtype: format!("{kind:?}"),
            model,
        })
    }

    /// Token ids of `text`, with the tokenizer's special tokens (BOS) for a prompt.
    fn encode(&self, text: &str, prompt: bool) -> Result<Vec<i64>> {
        let enc = self
            .model
            .tokenizer()
            .encode(text, prompt)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(enc.get_ids().iter().map(|&t| i64::from(t)).collect())
    }

    /// Sum of the completion's token log-probabilities and its token count, for
    /// rows given as (prompt ids, completion ids), in one left-padded batch.
    fn log_likelihoods(&self, rows: &[(Vec<i64>, Vec<i64>)]) -> Result<Vec<(f64, usize)>> {
        let width = rows
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        let n = rows.len();
        let mut ids = vec![0i64; n * width];
        let mut mask = vec![0i64; n * width];
        let mut target = vec![0i64; n * width];
        let mut on = vec![0f32; n * width];
        for (r, (p, c)) in rows.iter().enumerate() {
            let pad = width - p.len() - c.len();
            let row = r * width;
            for (j, &t) in p.iter().chain(c).enumerate() {
                ids[row + pad + j] = t;
                mask[row + pad + j] = 1;
            }
            // Position i predicts token i + 1: the completion's tokens are predicted
            // from the last prompt token on.
            for (j, &t) in c.iter().enumerate() {
                let at = row + pad + p.len() - 1 + j;
                target[at] = t;
                on[at] = 1.0;
            }
        }
        let device = self.model.device();
        let shape = [n as i64, width as i64];
        let to = |v: &[i64]| Tensor::from_slice(v).view(shape).to(device);
        let logits = tch::no_grad(|| self.model.forward(&to(&ids), &to(&mask)))?;
        let logp = logits
            .f_log_softmax(-1, Kind::Float)?
            .f_gather(-1, &to(&target).unsqueeze(-1), false)?
            .squeeze_dim(-1);
        let on = Tensor::from_slice(&on).view(shape).to(device);
        let sums = Vec::<f64>::try_from(
            (logp * &on)
                .sum_dim_intlist(-1, false, Kind::Double)
                .to_device(Device::Cpu),
        )?;
        Ok(sums
            .into_iter()
            .zip(rows)
            .map(|(s, (_, c))| (s, c.len()))
            .collect())
    }
}

impl Scorer for PerplexityScorer {
    fn name(&self) -> &'static str {
        "perplexity"
    }

    fn columns(&self) -> Vec<String> {
        vec![COLUMN.to_owned()]
    }

    fn params(&self) -> Value {
        json!({ "dtype": self.dtype })
    }

    fn assets(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        let start = self.model.bos_token_id().or(self.model.eos_token_id());
        let mut encoded = Vec::with_capacity(rows.len());
        for r in rows {
            let (prefix, rest) = if r.prompt.is_empty() {
                (
                    start.into_iter().collect(),
                    self.encode(&r.completion, false)?,
                )
            } else {
                let prompt_len = self.encode(&r.prompt, true)?.len();
                let mut full = self.encode(&format!("{}{}", r.prompt, r.completion), true)?;
                let rest = full.split_off(prompt_len.min(full.len()));
                (full, rest)
            };
            encoded.push(fit_positions(prefix, rest, self.model.max_positions()));
        }
        let mut scores = vec![Score::null(1); rows.len()];
        // Rows with a completion to judge, longest first so batches pad little.
        let mut order: Vec<usize> = (0..rows.len())
            .filter(|&i| !encoded[i].1.is_empty() && !encoded[i].0.is_empty())
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].0.len() + encoded[i].1.len()));
        for chunk in order.chunks(BATCH_ROWS) {
            let batch: Vec<(Vec<i64>, Vec<i64>)> =
                chunk.iter().map(|&i| encoded[i].clone()).collect();
            for (&i, (sum, len)) in chunk.iter().zip(self.log_likelihoods(&batch)?) {
                let mean = sum / len as f64;
                scores[i] = Score::new(mean, vec![(-mean).exp()]);
            }
        }
        Ok(scores)
    }
}

/// Cuts (prompt ids, completion ids) to at most `limit` positions: the prompt keeps
/// its last tokens (at least one), the completion its first.
fn fit_positions(
    mut prompt: Vec<i64>,
    mut completion: Vec<i64>,
    limit: Option<usize>,
) -> (Vec<i64>, Vec<i64>) {
    if let Some(limit) = limit.filter(|&l| l >= 2) {
        completion.truncate(limit - 1);
        let keep = limit - completion.len();
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
    }
    (prompt, completion)
}
