//! The key/value cache of incremental decoding: per layer, the keys and values of
//! the tokens seen so far.

use anyhow::{anyhow, Result};
use tch::Tensor;

/// Keys and values of the tokens seen so far, per layer: `[batch, kv_heads, past, head_dim]`.
/// Made by [`Model::new_cache`] for one model; grows by each [`Model::forward_cached`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pub(crate) past: i64,
    /// Always attend through an explicit mask (see [`KvCache::batch_invariant`]).
    pub(crate) explicit_mask: bool,
}

impl KvCache {
    pub(crate) fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
            past: 0,
            explicit_mask: false,
        }
    }

    /// Makes every forward through this cache take the same attention kernel
    /// whatever the batch's padding, so that a row's logits do not depend on the
    /// rows it shares a batch with (the fused kernels without a mask round
    /// differently from the masked one). The sampler uses it for output that is
    /// identical across batch sizes.
    pub fn batch_invariant(mut self) -> Self {
        self.explicit_mask = true;
        self
    }

    /// How many positions the cache holds.
    pub fn len(&self) -> i64 {
        self.past
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.past == 0
    }

    /// Keeps only the batch rows `idx` (an i64 tensor of row indices), so that
    /// finished sequences stop costing compute. The caller narrows its attention
    /// mask the same way.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = idx.f_to_device(k.device())?;
            *k = k.f_index_select(0, &idx)?;
            *v = v.f_index_select(0, &idx)?;
        }
        Ok(())
    }

    /// Appends this step's keys and values of `layer` and returns the full ones.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| anyhow!("key/value cache has no layer {layer}"))?;
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::f_cat(&[pk, k], 2)?, Tensor::f_cat(&[pv, v], 2)?),
        };
        *slot = Some((k.shallow_clone(), v.shallow_clone()));
        Ok((k, v))
    }
}
