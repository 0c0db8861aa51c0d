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
    /// Adds Quark's K control tokens `<|quark:0|>`..`<|quark:K-1|>`: special tokens
    /// in the tokenizer with contiguous ids, and new embedding rows (new head rows
    /// too when untied) drawn per dimension from N(mean, std) of the existing rows,
    /// from a generator seeded by `seed` (the same on every device).
    pub fn add_control_tokens(&mut self, k: u32, seed: u64) -> Result<()> {
        if k == 0 {
            bail!("add_control_tokens: K must be at least 1");
        }
        if self.control.is_some() || self.tokenizer.token_to_id(&control_token_text(0)).is_some() {
            bail!("add_control_tokens: the model already has control tokens");
        }
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
        grow_rows(&emb, ct, seed)?;
        if let Some(head) = head {
            grow_rows(&head, ct, seed ^ 0x9e37_79b9_7f4a_7c15)?;
        }
        let vocab = self.vocab_size();
        self.config["vocab_size"] = json!(vocab);
        self.control = Some(ct);
        Ok(())
    }
}

/// The spread of a new control token's row around the vocabulary's mean, as a
/// share of each dimension's standard deviation.
pub const INIT_NOISE: f64 = 0.01;
/// The initialisation's name in a fit's key.
pub const INIT: &str = "vocabulary mean + 0.01 std";

/// Resizes a `[vocab, d]` variable in place so that rows `ct.ids()` exist, each the
/// mean of the rows before them plus [`INIT_NOISE`] times their per-dimension
/// standard deviation (unbiased, as torch.std) times a standard normal draw: the
/// average embedding (Hewitt 2021) is a neutral prefix the model reads much as it
/// reads no token, where a full draw from N(mean, std) is a random token that moves
/// the untrained policy's samples away from the reference's (their perplexity
/// under the reference rose by a third); the small noise keeps the K rows apart.
/// Every clone of the variable (the model's layers, the var store's lists) shares
/// its storage, so all of them see the new rows.
fn grow_rows(var: &Tensor, ct: ControlTokens, seed: u64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let (rows, d) = var.size2()?;
        let first = ct.first_id;
        let k = i64::from(ct.k);
        let w = var.f_to_kind(Kind::Float)?;
        let existing = w.f_narrow(0, 0, first)?;
        let mean = existing.f_mean_dim(0, false, Kind::Float)?;
        let std = existing.f_std_dim(0, true, false)?;
        let noise: Vec<f32> = normal_samples(seed, (k * d) as usize);
        let noise = Tensor::f_from_slice(&noise)?
            .f_view([k, d])?
            .f_to_device(w.device())?;
        let new_rows = noise.f_mul(&std)?.f_mul_scalar(INIT_NOISE)?.f_add(&mean)?;
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
