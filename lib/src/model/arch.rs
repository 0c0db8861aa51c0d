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
    /// layer: its keys and values cover every position, but its output projection
    /// and MLP run only where a completion token is predicted, since nothing else
    /// reads their output there. A tail (the sampler's last position after a prompt)
    /// is taken after the last layer, which keeps the prompt pass's products as they
    /// were: they are a small part of sampling.
    pub(crate) fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
        keep: Keep,
    ) -> Result<Tensor> {
        let (inside, after) = match keep {
            Keep::At(_) => (keep, Keep::All),
            _ => (Keep::All, keep),
        };
        let x = self.embed(ids, positions)?;
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
/// `[rows, d]`, into `w`'s gradient, row by row in place: what autograd would
/// build as a dense array of `w`'s size, zeros but for those rows, and then add.
pub(crate) fn add_rows(w: &Tensor, ids: &Tensor, g: &Tensor) -> Result<()> {
    if !w.requires_grad() || !g.defined() {
        return Ok(());
    }
    ensure_grad(w)?;
    let d = w.size()[1];
    tch::no_grad(|| -> Result<()> {
        let rows = g.f_reshape([-1, d])?.f_to_kind(w.kind())?;
        let _ = w.grad().f_index_add_(0, &ids.f_reshape([-1])?, &rows)?;
        Ok(())
    })
}
