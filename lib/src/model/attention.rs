//! Building blocks the architectures share: the dense layer and attention (the
//! fused kernel, or the batch-invariant one that runs each row on its own).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::masks::Visible;
use super::packed::packed_attention;
use super::rowwise;

/// A dense layer `y = x W^T + b` with `W` `[out, in]`, as torch's `nn.Linear`.
pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rowwise::linear(x, &self.w, self.b.as_ref())
    }
}

/// Attention over `q` `[b, h, n, hd]` and `k`, `v` `[b, kvh, T, hd]` (kvh divides h:
/// grouped-query attention) with `allowed` `[b, 1, n, T]`; returns `[b, n, h * hd]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    allowed: &Visible,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, n, hd) = q.size4()?;
    let gqa = k.size()[1] != h;
    let y = match allowed {
        Visible::Causal => {
            Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, scale, gqa)?
        }
        Visible::Everything => {
            Tensor::f_scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, scale, gqa)?
        }
        Visible::Mask(m) => {
            Tensor::f_scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, gqa)?
        }
        Visible::PerRow(starts) => match rowwise::attend(q, k, v, starts, scale)? {
            // A decode step's kernel: already `[b, 1, h * hd]`.
            Some(y) => return Ok(y),
            None => per_row_attention(q, k, v, starts, scale)?,
        },
        Visible::Packed(slots) => return packed_attention(q, k, v, slots, scale),
    };
    Ok(y.f_transpose(1, 2)?
        .f_contiguous()?
        .f_view([b, n, h * hd])?)
}

/// Where each row's real tokens start in a left-padding mask `[b, total]`.
pub(crate) fn padding_starts(mask: &Tensor) -> Result<Vec<i64>> {
    let (_, total) = mask.size2()?;
    let real = Vec::<i64>::try_from(
        mask.f_ne(0)?
            .f_sum_dim_intlist(1, false, Kind::Int64)?
            .f_to_device(Device::Cpu)?,
    )?;
    Ok(real.into_iter().map(|n| total - n).collect())
}

/// [`Visible::PerRow`] attention: `q` `[b, h, n, hd]` for the last n of T key
/// positions, `k`, `v` `[b, kvh, T, hd]`. Row r's queries at or after `starts[r]`
/// see its keys from `starts[r]` up to themselves; its padding queries get zeros.
/// Neighbouring rows with the same start share one batched product (a batched
/// product computes each matrix on its own, so this changes no number).
fn per_row_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &[i64],
    scale: f64,
) -> Result<Tensor> {
    let (b, h, n, hd) = q.size4()?;
    let kvh = k.size()[1];
    let total = k.size()[2];
    let past = total - n;
    let group = h / kvh;
    // In f32 whatever the model's dtype: small bf16 products are slow on CPUs, and
    // these are small (a few rows' keys).
    let kind = q.kind();
    let q = q.f_to_kind(Kind::Float)?.f_mul_scalar(scale)?;
    let (k, v) = (k.f_to_kind(Kind::Float)?, v.f_to_kind(Kind::Float)?);
    let start_of = |r: i64| starts[r as usize].clamp(0, total - 1);
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < b {
        let start = start_of(r0);
        let mut r1 = r0 + 1;
        while r1 < b && start_of(r1) == start {
            r1 += 1;
        }
        let g = r1 - r0;
        let keys = total - start;
        // Real queries of these rows: absolute positions first_q..total. Grouped-query
        // attention: the `group` query heads of a key head are rows of one product.
        let first_q = start.max(past);
        let nq = total - first_q;
        let q_g = q
            .f_narrow(0, r0, g)?
            .f_narrow(2, first_q - past, nq)?
            .f_reshape([g, kvh, group * nq, hd])?;
        let k_g = k.f_narrow(0, r0, g)?.f_narrow(2, start, keys)?;
        let v_g = v.f_narrow(0, r0, g)?.f_narrow(2, start, keys)?;
        let mut scores = q_g.f_matmul(&k_g.f_transpose(-1, -2)?)?;
        if nq > 1 {
            // Query i (absolute first_q + i) sees keys up to itself (absolute start + j).
            let dev = q.device();
            let qi = Tensor::f_arange_start(first_q, total, (Kind::Int64, dev))?.f_view([nq, 1])?;
            let kj = Tensor::f_arange_start(start, total, (Kind::Int64, dev))?.f_view([1, keys])?;
            scores = scores
                .f_view([g, kvh, group, nq, keys])?
                .f_masked_fill(&kj.f_gt_tensor(&qi)?, f64::NEG_INFINITY)?
                .f_view([g, kvh, group * nq, keys])?;
        }
        let y = scores
            .f_softmax(-1, Kind::Float)?
            .f_matmul(&v_g)?
            .f_view([g, h, nq, hd])?;
        let y = if nq < n {
            let pad = Tensor::f_zeros([g, h, n - nq, hd], (Kind::Float, q.device()))?;
            Tensor::f_cat(&[&pad, &y], 2)?
        } else {
            y
        };
        out.push(y);
        r0 = r1;
    }
    Ok(Tensor::f_cat(&out, 0)?.f_to_kind(kind)?)
}
