//! The architectures behind [`super::Model`]: one variant per model file, and the
//! forward pass composed of their parts (embedding, layers, final norm, head).

use std::ops::Range;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::cache::KvCache;
use super::masks::{Keep, Visible};
use super::{gpt2, llama, rowwise};

pub(crate) enum Arch {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

impl Arch {
    /// The final (normalised) hidden states `[b, n, d]` of the positions `keep` names.
    ///
    /// A packed batch's positions ([`Keep::At`], training's) are kept inside the last
    /// layer: its attention runs at every position, its output projection, residual
    /// and MLP only where a completion token is predicted, since nothing else reads
    /// their output there. A tail (the sampler's last position after a prompt) is
    /// taken after the last layer, which keeps the prompt pass's products as they
    /// were: they are a small part of sampling.
    pub(crate) fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
        keep: Keep,
    ) -> Result<Tensor> {
        let x = self.embed(ids, positions)?;
        self.hidden_of(x, positions, allowed, cache, keep)
    }

    /// As [`Arch::hidden`], from the input embeddings `x`.
    pub(crate) fn hidden_of(
        &self,
        x: Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
        keep: Keep,
    ) -> Result<Tensor> {
        let (inside, after) = match keep {
            Keep::At(_) => (keep, Keep::All),
            _ => (Keep::All, keep),
        };
        let x = self.layers(0..self.n_layers(), x, positions, allowed, cache, &inside)?;
        self.final_norm(&after.of(&x)?)
    }

    /// The input embeddings `[b, t, d]` of `ids` at `positions`.
    pub(crate) fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        match self {
            Arch::Gpt2(m) => m.embed(ids, positions),
            Arch::Llama(m) => m.embed(ids, positions),
        }
    }

    /// Adds `g` `[b, t, d]`, the gradient of [`Arch::embed`]'s output, into the
    /// gradients of the embedding matrices (each one's looked-up rows, in place).
    pub(crate) fn embed_backward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        g: &Tensor,
    ) -> Result<()> {
        match self {
            Arch::Gpt2(m) => m.embed_backward(ids, positions, g),
            Arch::Llama(m) => m.embed_backward(ids, g),
        }
    }

    /// Runs the transformer layers `layers` on `x`, the last of them only at the
    /// positions `keep` names.
    pub(crate) fn layers(
        &self,
        layers: Range<usize>,
        x: Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
        keep: &Keep,
    ) -> Result<Tensor> {
        if layers.is_empty() {
            return keep.of(&x);
        }
        match self {
            Arch::Gpt2(m) => m.layers(layers, x, positions, allowed, cache, keep),
            Arch::Llama(m) => m.layers(layers, x, positions, allowed, cache, keep),
        }
    }

    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Arch::Gpt2(m) => m.final_norm(x),
            Arch::Llama(m) => m.final_norm(x),
        }
    }

    /// The head: logits (f32) of hidden states `[.., d]`.
    pub(crate) fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(rowwise::linear(hidden, &self.head(), None)?.f_to_kind(Kind::Float)?)
    }

    /// The head's matrix `[vocab, d]`: its own, or the input embedding when tied.
    pub(crate) fn head(&self) -> Tensor {
        let (emb, head) = self.vocab_matrices();
        head.unwrap_or(emb)
    }

    pub(crate) fn n_layers(&self) -> usize {
        match self {
            Arch::Gpt2(m) => m.n_layers(),
            Arch::Llama(m) => m.n_layers(),
        }
    }

    /// The input embedding and, when untied, the output head (both `[vocab, d]`).
    pub(crate) fn vocab_matrices(&self) -> (Tensor, Option<Tensor>) {
        match self {
            Arch::Gpt2(m) => m.vocab_matrices(),
            Arch::Llama(m) => m.vocab_matrices(),
        }
    }

    pub(crate) fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Arch::Gpt2(m) => m.hf_tensors(),
            Arch::Llama(m) => m.hf_tensors(),
        }
    }
}

/// Gives a trainable `w` a gradient (zeros) where it has none yet, so that it can
/// be added into in place: the gradient of zero times one row's sum, which
/// autograd builds as zeros of `w`'s shape, one write.
pub(crate) fn ensure_grad(w: &Tensor) -> Result<()> {
    if w.requires_grad() && !w.grad().defined() {
        w.f_narrow(0, 0, 1)?
            .f_sum(Kind::Float)?
            .f_mul_scalar(0.0)?
            .f_backward()?;
    }
    Ok(())
}

/// Adds `g` `[.., d]`, the gradient of a lookup of `ids` `[..]` in the matrix `w`
/// `[rows, d]`, into `w`'s gradient in place, one row per distinct id: what
/// autograd would build as a dense array of `w`'s size, zeros but for those rows,
/// and then add. A token's occurrences are summed in f32 first, so that a bf16
/// gradient (a tied head's, already large) rounds once per row, not once per
/// occurrence, and the sum does not depend on the order of a device's atomics.
pub(crate) fn add_rows(w: &Tensor, ids: &Tensor, g: &Tensor) -> Result<()> {
    if !w.requires_grad() || !g.defined() {
        return Ok(());
    }
    ensure_grad(w)?;
    let d = w.size()[1];
    tch::no_grad(|| -> Result<()> {
        let (distinct, slot, _) = ids
            .f_reshape([-1])?
            .f_internal_unique2(false, true, false)?;
        let mut sums = Tensor::f_zeros([distinct.size()[0], d], (Kind::Float, w.device()))?;
        let _ = sums.f_index_add_(0, &slot, &g.f_reshape([-1, d])?.f_to_kind(Kind::Float)?)?;
        let _ = w
            .grad()
            .f_index_add_(0, &distinct, &sums.f_to_kind(w.kind())?)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// libtorch's CPU `index_add_` already sums a bf16 row's occurrences in f32; on
    /// a GPU (`QUARK_TEST_DEVICE=cuda`) it adds each one by an atomic in bf16, and
    /// this is the test that tells the two apart there.
    #[test]
    fn a_tokens_occurrences_are_summed_before_a_bf16_gradient_rounds() {
        let dev = testing::device();
        let w = Tensor::ones([3, 2], (Kind::BFloat16, dev)).set_requires_grad(true);
        let one = Tensor::ones([1, 2], (Kind::Float, dev));
        add_rows(&w, &Tensor::from_slice(&[0i64]).to(dev), &one).unwrap();
        // 128 occurrences of token 0, 2^-10 each: one at a time, each rounds away
        // against 1 (bf16 steps by 2^-7 there); summed first they add 1/8.
        let ids = Tensor::zeros([2, 64], (Kind::Int64, dev));
        let g = Tensor::full([2, 64, 2], 2f64.powi(-10), (Kind::Float, dev));
        add_rows(&w, &ids, &g).unwrap();
        let got = Vec::<f32>::try_from(
            w.grad()
                .to_kind(Kind::Float)
                .reshape([-1])
                .to(tch::Device::Cpu),
        )
        .unwrap();
        assert_eq!(got, [1.125, 1.125, 0.0, 0.0, 0.0, 0.0]);
    }
}
