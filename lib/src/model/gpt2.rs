//! GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
//! Learners"), as transformers' `GPT2LMHeadModel`: learned positions, pre-LayerNorm
//! blocks, gelu_new, a head tied to the token embedding.
//!
//! Variables are named by their checkpoint keys (`transformer.h.0.attn.c_attn.weight`).
//! GPT-2 checkpoints store their projections as `Conv1D` weights `[in, out]`; they
//! are transposed once here, at the load boundary, into the `[out, in]` layout of
//! `nn.Linear`, and back in [`Gpt2::hf_tensors`] when saving.

use std::ops::Range;

use anyhow::{bail, Result};
use serde::Deserialize;
use tch::{nn, Tensor};

use super::arch::add_rows;
use super::attention::{attention, Linear};
use super::cache::KvCache;
use super::masks::{Keep, Visible};
use super::weights::Weights;

fn default_act() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// The keys of a GPT-2 config.json that the network depends on.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// The MLP width; null means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(p: &nn::Path, d: i64, eps: f64, w: &Weights) -> Result<Self> {
        Ok(Self {
            w: w.var(p, "weight", &[d])?,
            b: w.var(p, "bias", &[d])?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.w.size()[0];
        Ok(x.f_layer_norm([d], Some(&self.w), Some(&self.b), self.eps, false)?)
    }
}

/// A `Conv1D` projection: the checkpoint holds `[d_in, d_out]`, the variable `[d_out, d_in]`.
fn conv1d(p: &nn::Path, d_in: i64, d_out: i64, w: &Weights) -> Result<Linear> {
    Ok(Linear {
        w: w.var_transposed(p, "weight", [d_in, d_out])?,
        b: Some(w.var(p, "bias", &[d_out])?),
    })
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: i64,
    scale: f64,
}

impl Attention {
    fn load(p: &nn::Path, cfg: &Config, layer: i64, w: &Weights) -> Result<Self> {
        let d = cfg.n_embd;
        let head_dim = d / cfg.n_head;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (head_dim as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            c_attn: conv1d(&(p / "c_attn"), d, 3 * d, w)?,
            c_proj: conv1d(&(p / "c_proj"), d, d, w)?,
            n_head: cfg.n_head,
            scale,
        })
    }

    /// The attention's output at the positions `keep` names: the attention runs at
    /// every position, the output projection at the kept ones alone.
    fn forward(
        &self,
        x: &Tensor,
        allowed: &Visible,
        cache: Option<(&mut KvCache, usize)>,
        keep: &Keep,
    ) -> Result<Tensor> {
        let (b, t, d) = x.size3()?;
        let hd = d / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: i64| -> Result<Tensor> {
            Ok(qkv
                .f_narrow(2, i * d, d)?
                .f_view([b, t, self.n_head, hd])?
                .f_transpose(1, 2)?)
        };
        let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v)?;
        }
        let y = attention(&q, &k, &v, allowed, self.scale)?;
        self.c_proj.forward(&keep.of(&y)?)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: String,
}

impl Mlp {
    fn load(p: &nn::Path, cfg: &Config, w: &Weights) -> Result<Self> {
        let inner = cfg.n_inner.unwrap_or(4 * cfg.n_embd);
        let act = cfg.activation_function.clone();
        if !matches!(
            act.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu" | "relu"
        ) {
            bail!("unsupported activation_function `{act}`");
        }
        Ok(Self {
            c_fc: conv1d(&(p / "c_fc"), cfg.n_embd, inner, w)?,
            c_proj: conv1d(&(p / "c_proj"), inner, cfg.n_embd, w)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.act.as_str() {
            "gelu_new" => gelu_new(&h)?,
            "gelu_pytorch_tanh" => h.f_gelu("tanh")?,
            "gelu" => h.f_gelu("none")?,
            _ => h.f_relu()?,
        };
        self.c_proj.forward(&h)
    }
}

/// The tanh approximation of GELU written out op by op as transformers'
/// `NewGELUActivation`: in bf16 each step rounds, and torch's fused
/// `gelu(approximate="tanh")` (which computes in f32 inside) would round
/// differently from every GPT-2 run in transformers.
fn gelu_new(x: &Tensor) -> Result<Tensor> {
    let inner = x
        .f_pow_tensor_scalar(3.0)?
        .f_mul_scalar(0.044715)?
        .f_add(x)?
        .f_mul_scalar((2.0 / std::f64::consts::PI).sqrt())?;
    Ok(x.f_mul_scalar(0.5)?
        .f_mul(&inner.f_tanh()?.f_add_scalar(1.0)?)?)
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(p: &nn::Path, cfg: &Config, layer: i64, w: &Weights) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            ln_1: LayerNorm::load(&(p / "ln_1"), cfg.n_embd, eps, w)?,
            attn: Attention::load(&(p / "attn"), cfg, layer, w)?,
            ln_2: LayerNorm::load(&(p / "ln_2"), cfg.n_embd, eps, w)?,
            mlp: Mlp::load(&(p / "mlp"), cfg, w)?,
        })
    }

    /// The block's output at the positions `keep` names.
    fn forward(
        &self,
        x: &Tensor,
        allowed: &Visible,
        cache: Option<(&mut KvCache, usize)>,
        keep: &Keep,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.ln_1.forward(x)?, allowed, cache, keep)?;
        let x = keep.of(x)?.f_add(&a)?;
        Ok(x.f_add(&self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

/// The GPT-2 network with its language-model head.
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// Only when `tie_word_embeddings` is false; otherwise the head is `wte`.
    lm_head: Option<Tensor>,
    cfg: Config,
}

impl Gpt2 {
    /// Builds the network under `root` from the checkpoint tensors.
    pub(crate) fn load(root: &nn::Path, cfg: Config, w: &Weights) -> Result<Self> {
        let p = root / "transformer";
        let d = cfg.n_embd;
        if cfg.n_head <= 0 || d % cfg.n_head != 0 {
            bail!("n_embd {d} is not a multiple of n_head {}", cfg.n_head);
        }
        if cfg.n_layer < 1 {
            bail!("n_layer is {}: a network needs a layer", cfg.n_layer);
        }
        let wte = w.var(&(&p / "wte"), "weight", &[cfg.vocab_size, d])?;
        let wpe = w.var(&(&p / "wpe"), "weight", &[cfg.n_positions, d])?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::load(&(&p / "h" / i), &cfg, i, w))
            .collect::<Result<_>>()?;
        let ln_f = LayerNorm::load(&(&p / "ln_f"), d, cfg.layer_norm_epsilon, w)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.var(&(root / "lm_head"), "weight", &[cfg.vocab_size, d])?)
        };
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            cfg,
        })
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.h.len()
    }

    /// The token plus position embeddings of `ids` `[b, t, d]`.
    pub(crate) fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let max = positions.f_max()?.f_int64_value(&[])?;
        if max >= self.cfg.n_positions {
            bail!(
                "position {max} is beyond GPT-2's n_positions {}",
                self.cfg.n_positions
            );
        }
        Ok(
            Tensor::f_embedding(&self.wte, ids, -1, false, false)?.f_add(&Tensor::f_embedding(
                &self.wpe, positions, -1, false, false,
            )?)?,
        )
    }

    /// Adds `g`, the gradient of [`Gpt2::embed`]'s output, into the token and
    /// position embeddings'.
    pub(crate) fn embed_backward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        g: &Tensor,
    ) -> Result<()> {
        add_rows(&self.wte, ids, g)?;
        add_rows(&self.wpe, positions, g)
    }

    /// Runs blocks `layers` on `x`, attending where `allowed` is true; the last of
    /// them only at the positions `keep` names (see [`Keep`]).
    pub(crate) fn layers(
        &self,
        layers: Range<usize>,
        mut x: Tensor,
        _positions: &Tensor,
        allowed: &Visible,
        mut cache: Option<&mut KvCache>,
        keep: &Keep,
    ) -> Result<Tensor> {
        let last = layers.end.saturating_sub(1);
        for i in layers {
            let keep = if i == last { keep } else { &Keep::All };
            let cache = cache.as_deref_mut().map(|c| (c, i));
            x = self.h[i].forward(&x, allowed, cache, keep)?;
        }
        Ok(x)
    }

    /// The most positions a sequence can have (the learned position table's size).
    pub(crate) fn max_positions(&self) -> usize {
        self.cfg.n_positions as usize
    }

    /// The final layer norm: hidden states `[b, t, d]` ready for the head.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.ln_f.forward(x)
    }

    pub(crate) fn vocab_matrices(&self) -> (Tensor, Option<Tensor>) {
        (
            self.wte.shallow_clone(),
            self.lm_head.as_ref().map(Tensor::shallow_clone),
        )
    }

    /// The tensors under their checkpoint keys and layouts (Conv1D weights back to
    /// `[in, out]`; a tied head is not stored, as transformers does).
    pub(crate) fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            (
                "transformer.wte.weight".to_owned(),
                self.wte.shallow_clone(),
            ),
            (
                "transformer.wpe.weight".to_owned(),
                self.wpe.shallow_clone(),
            ),
            (
                "transformer.ln_f.weight".to_owned(),
                self.ln_f.w.shallow_clone(),
            ),
            (
                "transformer.ln_f.bias".to_owned(),
                self.ln_f.b.shallow_clone(),
            ),
        ];
        let conv = |out: &mut Vec<(String, Tensor)>, key: String, l: &Linear| -> Result<()> {
            out.push((format!("{key}.weight"), l.w.f_t_copy()?.f_contiguous()?));
            if let Some(b) = &l.b {
                out.push((format!("{key}.bias"), b.shallow_clone()));
            }
            Ok(())
        };
        for (i, b) in self.h.iter().enumerate() {
            let k = format!("transformer.h.{i}");
            for (name, ln) in [("ln_1", &b.ln_1), ("ln_2", &b.ln_2)] {
                out.push((format!("{k}.{name}.weight"), ln.w.shallow_clone()));
                out.push((format!("{k}.{name}.bias"), ln.b.shallow_clone()));
            }
            conv(&mut out, format!("{k}.attn.c_attn"), &b.attn.c_attn)?;
            conv(&mut out, format!("{k}.attn.c_proj"), &b.attn.c_proj)?;
            conv(&mut out, format!("{k}.mlp.c_fc"), &b.mlp.c_fc)?;
            conv(&mut out, format!("{k}.mlp.c_proj"), &b.mlp.c_proj)?;
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_owned(), h.shallow_clone()));
        }
        Ok(out)
    }
}
