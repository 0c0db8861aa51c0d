//! Quark's control tokens `<|quark:0|>`..`<|quark:K-1|>`: their ids, and how a
//! model gets them (special tokens of the tokenizer, new embedding rows drawn from
//! the statistics of the existing ones).

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use tch::{Kind, Tensor};
use tokenizers::AddedToken;

use super::Model;

/// The text of control token `q` (`<|quark:0|>` is the best reward quantile).
pub fn control_token_text(q: u32) -> String {
    format!("<|quark:{q}|>")
}

/// The K control tokens of a model: `<|quark:q|>` has id `first_id + q`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlTokens {
    pub k: u32,
    pub first_id: i64,
}

impl ControlTokens {
    /// The id of `<|quark:q|>`, or None when q >= K.
    pub fn id(&self, q: u32) -> Option<i64> {
        (q < self.k).then(|| self.first_id + i64::from(q))
    }

    /// The ids of all K tokens (to mask their logits when sampling).
    pub fn ids(&self) -> std::ops::Range<i64> {
        self.first_id..self.first_id + i64::from(self.k)
    }
}

impl Model {
    /// Adds Quark's K control tokens `<|quark:0|>`..`<|quark:K-1|>` with rows that
    /// start at the vocabulary's mean ([`ControlInit::Mean`]); see
    /// [`Model::add_control_tokens_with`].
    pub fn add_control_tokens(&mut self, k: u32, seed: u64) -> Result<()> {
        self.add_control_tokens_with(k, seed, ControlInit::Mean)
    }

    /// Adds Quark's K control tokens `<|quark:0|>`..`<|quark:K-1|>`: special tokens
    /// in the tokenizer with contiguous ids, and new embedding rows (new head rows
    /// too when untied) that start as `init` says, any noise from a generator seeded
    /// by `seed` (the same on every device).
    pub fn add_control_tokens_with(&mut self, k: u32, seed: u64, init: ControlInit) -> Result<()> {
        if k == 0 {
            bail!("add_control_tokens: K must be at least 1");
        }
        if self.control.is_some() || self.tokenizer.token_to_id(&control_token_text(0)).is_some() {
            bail!("add_control_tokens: the model already has control tokens");
        }
        // Read before the tokenizer changes, so that a failure leaves the model as it was.
        let spellings = match init {
            ControlInit::Mean => None,
            ControlInit::Numerals => Some(self.spellings(k)?),
        };
        let tokens: Vec<AddedToken> = (0..k)
            .map(|q| AddedToken::from(control_token_text(q), true))
            .collect();
        self.tokenizer.add_special_tokens(&tokens);
        let first = self
            .tokenizer
            .token_to_id(&control_token_text(0))
            .map(i64::from)
            .ok_or_else(|| anyhow!("add_control_tokens: the tokenizer did not take the tokens"))?;
        let ct = ControlTokens { k, first_id: first };
        for q in 0..k {
            if self
                .tokenizer
                .token_to_id(&control_token_text(q))
                .map(i64::from)
                != ct.id(q)
            {
                bail!("add_control_tokens: the tokenizer gave non-contiguous ids");
            }
        }
        let rows = self.vocab_size();
        if first > rows {
            bail!("add_control_tokens: the tokenizer has more ids ({first}) than the embedding has rows ({rows})");
        }
        let (emb, head) = self.arch.vocab_matrices();
        grow_rows(&emb, ct, seed, spellings.as_deref())?;
        if let Some(head) = head {
            grow_rows(
                &head,
                ct,
                seed ^ 0x9e37_79b9_7f4a_7c15,
                spellings.as_deref(),
            )?;
        }
        let vocab = self.vocab_size();
        self.config["vocab_size"] = json!(vocab);
        self.control = Some(ct);
        Ok(())
    }

    /// The ids of the tokens that spell each of 0..k, each a row of the embedding.
    fn spellings(&self, k: u32) -> Result<Vec<Vec<i64>>> {
        let rows = self.vocab_size();
        (0..k)
            .map(|q| {
                let encoding = self
                    .tokenizer
                    .encode(q.to_string(), false)
                    .map_err(|e| anyhow!("add_control_tokens: cannot spell {q}: {e}"))?;
                let ids: Vec<i64> = encoding.get_ids().iter().map(|&t| i64::from(t)).collect();
                if ids.is_empty() || ids.iter().any(|&t| t >= rows) {
                    bail!("add_control_tokens: the tokenizer spells {q} with {ids:?}, not rows of the {rows}-row embedding");
                }
                Ok(ids)
            })
            .collect()
    }
}

/// The spread of a new control token's row around the vocabulary's mean, as a
/// share of each dimension's standard deviation.
pub const INIT_NOISE: f64 = 0.01;
/// The initialisation's name in a fit's key.
pub const INIT: &str = "vocabulary mean + 0.01 std";

/// Where new control tokens' rows start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlInit {
    /// The vocabulary's mean embedding plus [`INIT_NOISE`] of its spread: a neutral
    /// prefix, but the K rows are nearly equal (about 0.05 apart on the default
    /// model, where a real token's nearest neighbour is 2 away), so the network
    /// cannot tell them apart until their own training moves them.
    #[default]
    Mean,
    /// Token k starts as the mean of the rows of the tokens that spell k ("0", "1",
    /// ...): real, ordered, distinguishable rows from the first step (1.3 to 2.4
    /// apart on the default model), as a soft prompt starts from vocabulary
    /// (Lester et al. 2021).
    Numerals,
}

impl ControlInit {
    /// Its name in a fit's key (the mean's is the one keys have always held).
    pub fn key(self) -> &'static str {
        match self {
            ControlInit::Mean => INIT,
            ControlInit::Numerals => "rows of the tokens spelling k",
        }
    }
}

impl std::str::FromStr for ControlInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(ControlInit::Mean),
            "numerals" => Ok(ControlInit::Numerals),
            _ => bail!("`{s}`: mean or numerals"),
        }
    }
}

impl std::fmt::Display for ControlInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ControlInit::Mean => "mean",
            ControlInit::Numerals => "numerals",
        })
    }
}

/// Resizes a `[vocab, d]` variable in place so that rows `ct.ids()` exist: with
/// `spellings`, row k is the mean of the rows `spellings[k]`; else each is the
/// mean of the rows before them plus [`INIT_NOISE`] times their per-dimension
/// standard deviation (unbiased, as torch.std) times a standard normal draw: the
/// average embedding (Hewitt 2021) is a neutral prefix the model reads much as it
/// reads no token, where a full draw from N(mean, std) is a random token that moves
/// the untrained policy's samples away from the reference's (their perplexity
/// under the reference rose by a third); the small noise keeps the K rows apart.
/// Every clone of the variable (the model's layers, the var store's lists) shares
/// its storage, so all of them see the new rows.
fn grow_rows(
    var: &Tensor,
    ct: ControlTokens,
    seed: u64,
    spellings: Option<&[Vec<i64>]>,
) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let (rows, d) = var.size2()?;
        let first = ct.first_id;
        let k = i64::from(ct.k);
        let w = var.f_to_kind(Kind::Float)?;
        let existing = w.f_narrow(0, 0, first)?;
        let new_rows = match spellings {
            None => {
                let mean = existing.f_mean_dim(0, false, Kind::Float)?;
                let std = existing.f_std_dim(0, true, false)?;
                let noise: Vec<f32> = normal_samples(seed, (k * d) as usize);
                Tensor::f_from_slice(&noise)?
                    .f_view([k, d])?
                    .f_to_device(w.device())?
                    .f_mul(&std)?
                    .f_mul_scalar(INIT_NOISE)?
                    .f_add(&mean)?
            }
            Some(spellings) => {
                let mut spelled = Vec::with_capacity(spellings.len());
                for ids in spellings {
                    let ids = Tensor::f_from_slice(ids)?.f_to_device(w.device())?;
                    spelled.push(existing.f_index_select(0, &ids)?.f_mean_dim(
                        0,
                        false,
                        Kind::Float,
                    )?);
                }
                Tensor::f_stack(&spelled, 0)?
            }
        };
        let mut parts = vec![existing, new_rows];
        if rows > first + k {
            parts.push(w.f_narrow(0, first + k, rows - first - k)?);
        }
        let grown = Tensor::f_cat(&parts, 0)?.f_to_kind(var.kind())?;
        let mut handle = var.shallow_clone();
        handle.set_data(&grown);
        Ok(())
    })
}

/// `n` standard normal draws from a small seeded generator (splitmix64 and
/// Box-Muller): the same numbers on every platform and device.
pub(crate) fn normal_samples(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut next = || rng.unit_open();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        if out.len() < n {
            out.push((r * a.sin()) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_samples_are_seeded_and_standard() {
        let a = normal_samples(7, 20_000);
        assert_eq!(a, normal_samples(7, 20_000));
        assert_ne!(a[..10], normal_samples(8, 10)[..]);
        let mean = a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64;
        let var = a
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
