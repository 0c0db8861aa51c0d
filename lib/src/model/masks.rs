//! What each position of a batch sees: position ids from a left-padding mask, which
//! keys each query may attend to (or, for a packed batch, its own row's), which
//! positions go on to the head, and the training forward pass that keeps what the
//! backward pass (with gradient checkpointing, each layer run again) needs.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use super::packed::Slots;
use super::Model;

/// Position ids from a left-padding mask: cumsum - 1, clamped at 0, so a padded row
/// sees the same positions as the unpadded sequence.
pub(crate) fn position_ids(mask: &Tensor) -> Result<Tensor> {
    Ok(mask
        .f_cumsum(-1, Kind::Int64)?
        .f_sub_scalar(1)?
        .f_clamp_min(0)?)
}

/// Checks a batch's shapes; its position ids and what each query may see.
pub(crate) fn batch_inputs(
    input_ids: &Tensor,
    attention_mask: &Tensor,
) -> Result<(Tensor, Visible)> {
    if input_ids.size() != attention_mask.size() || input_ids.dim() != 2 {
        bail!(
            "forward: input_ids {:?} and attention_mask {:?} must both be [batch, time]",
            input_ids.size(),
            attention_mask.size()
        );
    }
    let t = input_ids.size()[1];
    Ok((
        position_ids(attention_mask)?,
        visibility(attention_mask, t)?,
    ))
}

/// Which positions of a pass's output `[b, t, d]` go on to the final norm and the
/// head: the head, the largest matrix of a small model, then runs on those alone.
/// A layer given one runs its attention at every position and the rest (output
/// projection, residual, MLP) at the kept positions only.
pub(crate) enum Keep<'a> {
    /// Every position.
    All,
    /// The last n of each row.
    Tail(i64),
    /// These positions (`[m]` i64) of a packed batch's `[1, N, d]`.
    At(&'a Tensor),
}

impl Keep<'_> {
    /// The last `tail` positions, or all of them for None.
    pub(crate) fn tail(tail: Option<i64>) -> Self {
        tail.map_or(Keep::All, Keep::Tail)
    }

    /// The positions kept of `x` `[b, t, d]`.
    pub(crate) fn of(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Keep::All => x.shallow_clone(),
            Keep::Tail(n) => {
                let t = x.size()[1];
                let n = (*n).clamp(0, t);
                x.f_narrow(1, t - n, n)?.f_contiguous()?
            }
            Keep::At(at) => x.f_index_select(1, at)?,
        })
    }
}

/// A training forward pass from [`Model::train_forward`].
pub struct TrainForward {
    pub(crate) hidden: Tensor,
    /// The token embeddings the layers ran on, a leaf of the graph: their gradient
    /// goes into the embedding's rows by hand ([`super::arch::Arch::embed_backward`]).
    pub(crate) embedded: Tensor,
    /// The packed batch's token ids and positions, for the embedding's gradient and
    /// for the layers run again under checkpointing.
    pub(crate) ids: Tensor,
    pub(crate) positions: Tensor,
    pub(crate) checkpoint: Option<Checkpoint>,
}

/// What gradient checkpointing keeps of a forward pass: each layer's input, the
/// last layer's output (cut from the graph), the batch's visibility and the kept
/// positions (its ids and positions are [`TrainForward`]'s).
pub(crate) struct Checkpoint {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) last: Tensor,
    pub(crate) allowed: Visible,
    /// The positions the loss reads, kept by the last layer.
    pub(crate) at: Tensor,
}

impl Checkpoint {
    /// What layer `i` of `n` keeps, run on its own: the last one only the positions
    /// the loss reads, as [`super::arch::Arch::hidden`] keeps them.
    pub(crate) fn keep(at: &Tensor, i: usize, n: usize) -> Keep<'_> {
        if i + 1 == n {
            Keep::At(at)
        } else {
            Keep::All
        }
    }
}

impl TrainForward {
    /// The final hidden states of the positions asked for.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// Adds the gradient of a loss to `model`'s parameters, given `grad`, the loss's
    /// gradient with respect to [`TrainForward::hidden`]. `model` must be the model
    /// that made this pass.
    pub fn backward(self, model: &Model, grad: &Tensor) -> Result<()> {
        // d(Σ hidden ⊙ grad)/d hidden = grad: back-propagates `grad` exactly.
        let along = |y: &Tensor, g: &Tensor| -> Result<()> {
            y.f_mul(g)?.f_sum(Kind::Float)?.f_backward()?;
            Ok(())
        };
        along(&self.hidden, grad)?;
        let arch = &model.arch;
        if let Some(ck) = self.checkpoint {
            let mut g = ck.last.grad();
            let n = ck.inputs.len();
            for (i, x) in ck.inputs.into_iter().enumerate().rev() {
                let x = x.set_requires_grad(true);
                let y = arch.layers(
                    i..i + 1,
                    x.shallow_clone(),
                    &self.positions,
                    &ck.allowed,
                    None,
                    &Checkpoint::keep(&ck.at, i, n),
                )?;
                along(&y, &g)?;
                g = x.grad();
            }
        }
        arch.embed_backward(&self.ids, &self.positions, &self.embedded.grad())
    }
}

/// Which keys the new queries may see.
pub(crate) enum Visible {
    /// Every earlier key and itself: no padding anywhere, nothing cached.
    Causal,
    /// Every key: one new token per row after an unpadded cache.
    Everything,
    /// An explicit `[b, 1, n, past + n]` boolean mask (true = attend).
    Mask(Tensor),
    /// Each row attends to its own real keys only (left padding: row r's start at
    /// key index `starts[r]`), causally, one row at a time with plain matrix
    /// products and a softmax. Slower than the fused kernels, but a row's numbers
    /// depend on nothing else in the batch: not on the other rows (the fused CPU
    /// kernel partitions its work by batch size, which changes the rounding) and not
    /// on how much padding the batch's longest row forces on it (a longer reduction
    /// over masked keys rounds differently too).
    PerRow(Vec<i64>),
    /// A packed batch's rows, each its own tokens causally ([`super::packed`]).
    Packed(Slots),
}

/// The cheapest [`Visible`] for `mask` (`[b, past + n]`): without padding the
/// fused kernels' own causal masking applies (as transformers does), else an
/// explicit mask.
pub(crate) fn visibility(mask: &Tensor, n: i64) -> Result<Visible> {
    let (_, total) = mask.size2()?;
    let unpadded = mask.f_ne(0)?.f_all()?.f_int64_value(&[])? != 0;
    Ok(match (unpadded, total == n, n == 1) {
        (true, true, _) => Visible::Causal,
        (true, false, true) => Visible::Everything,
        _ => Visible::Mask(attention_allowed(mask, n)?),
    })
}

/// Which keys each of the `n` new queries may see: `[b, 1, n, past + n]`, true =
/// attend. Causal and not padding; every query also sees itself, so that a padding
/// query (which may see no real key) never has an empty row: some SDPA kernels
/// return NaN there, and a NaN would leak into a masked loss through 0 * NaN.
fn attention_allowed(mask: &Tensor, n: i64) -> Result<Tensor> {
    let (_, total) = mask.size2()?;
    let past = total - n;
    let dev = mask.device();
    let q_pos = Tensor::f_arange_start(past, total, (Kind::Int64, dev))?.f_view([n, 1])?;
    let k_pos = Tensor::f_arange(total, (Kind::Int64, dev))?.f_view([1, total])?;
    let causal = k_pos.f_le_tensor(&q_pos)?;
    let itself = k_pos.f_eq_tensor(&q_pos)?;
    let valid = mask.f_ne(0)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
    Ok(causal.f_logical_and(&valid)?.f_logical_or(&itself)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_ignore_left_padding() {
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1]).view([2, 4]);
        let pos = position_ids(&mask).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(pos.view([-1])).unwrap(),
            [0, 0, 0, 1, 0, 1, 2, 3]
        );
    }

    #[test]
    fn padding_rows_attend_only_to_themselves() {
        let mask = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
        let a = attention_allowed(&mask, 3).unwrap().view([3, 3]);
        let got = Vec::<bool>::try_from(a.view([-1])).unwrap();
        assert_eq!(
            got,
            [true, false, false, false, true, false, false, true, true]
        );
    }
}
