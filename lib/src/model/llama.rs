//! Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
//! Models"), as transformers' `LlamaForCausalLM`: RMSNorm, rotary position
//! embeddings, grouped-query attention, a SwiGLU MLP, a tied or untied head.
//! SmolLM2 and most current small LMs use it.
//!
//! Variables are named by their checkpoint keys (`model.layers.0.self_attn.q_proj.weight`)
//! and keep their layout, so loading and saving need no renaming.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use super::arch::add_rows;
use super::attention::{attention, Linear};
use super::cache::KvCache;
use super::masks::{Keep, Visible};
use super::weights::{parse_config, Weights};

/// How rotary frequencies are rescaled for long contexts (`rope_scaling` /
/// `rope_parameters` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3's: low frequencies divided by `factor`, high ones kept, a smooth
    /// blend in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The keys of a Llama config.json that the network depends on.
#[derive(Clone, Debug)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
}

/// Every tensor of a Llama checkpoint with its shape, named as transformers names
/// them: what [`Llama::load`] reads and [`Llama::hf_tensors`] writes (a test holds
/// both to this table), and what the GGUF import must produce.
pub fn checkpoint_shapes(cfg: &Config) -> BTreeMap<String, Vec<i64>> {
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".to_owned(), vec![v, d]);
    t.insert("model.norm.weight".to_owned(), vec![d]);
    if !cfg.tie_word_embeddings {
        t.insert("lm_head.weight".to_owned(), vec![v, d]);
    }
    let linears = [
        ("self_attn.q_proj", q, d, cfg.attention_bias),
        ("self_attn.k_proj", kv, d, cfg.attention_bias),
        ("self_attn.v_proj", kv, d, cfg.attention_bias),
        ("self_attn.o_proj", d, q, cfg.attention_bias),
        ("mlp.gate_proj", f, d, cfg.mlp_bias),
        ("mlp.up_proj", f, d, cfg.mlp_bias),
        ("mlp.down_proj", d, f, cfg.mlp_bias),
    ];
    for i in 0..cfg.num_hidden_layers {
        let k = format!("model.layers.{i}");
        t.insert(format!("{k}.input_layernorm.weight"), vec![d]);
        t.insert(format!("{k}.post_attention_layernorm.weight"), vec![d]);
        for (name, rows, cols, bias) in linears {
            t.insert(format!("{k}.{name}.weight"), vec![rows, cols]);
            if bias {
                t.insert(format!("{k}.{name}.bias"), vec![rows]);
            }
        }
    }
    t
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

#[derive(Deserialize)]
struct RawConfig {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    #[serde(default)]
    num_key_value_heads: Option<i64>,
    #[serde(default)]
    head_dim: Option<i64>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// transformers < 5 writes `rope_theta` and `rope_scaling` ...
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    /// ... transformers >= 5 one `rope_parameters` object holding both.
    #[serde(default)]
    rope_parameters: Option<Value>,
}

impl Config {
    /// Reads the typed config from config.json's value; errors name `path`.
    pub fn from_json(path: &Path, v: &Value) -> Result<Self> {
        let raw: RawConfig = parse_config(path, v)?;
        let err = |m: String| anyhow!("{}: {m}", path.display());
        if raw.hidden_act != "silu" {
            return Err(err(format!("unsupported hidden_act `{}`", raw.hidden_act)));
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if raw.num_hidden_layers < 1 {
            return Err(err(format!(
                "num_hidden_layers is {}: a network needs a layer",
                raw.num_hidden_layers
            )));
        }
        if heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
        let params = raw
            .rope_parameters
            .as_ref()
            .or(raw.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let num = |key: &str| -> Result<f64> {
            params
                .and_then(|p| p.get(key))
                .and_then(Value::as_f64)
                .ok_or_else(|| err(format!("rope parameters lack `{key}`")))
        };
        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => return Err(err(format!("unsupported rope_type `{other}`"))),
        };
        if params
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .is_some_and(|f| f != 1.0)
        {
            return Err(err("partial_rotary_factor is not supported".into()));
        }
        let rope_theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            rope_theta,
            rope_scaling,
        })
    }
}

/// The rotary inverse frequencies `[head_dim / 2]` (f32), computed with the same
/// f32 tensor operations as transformers' rope initialisers.
fn inv_freq(cfg: &Config) -> Result<Tensor> {
    let dim = cfg.head_dim;
    let exponent = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(dim as f64)?;
    let inv = Tensor::f_pow_scalar(cfg.rope_theta, &exponent)?.f_reciprocal()?;
    Ok(match cfg.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv.f_div_scalar(factor)?,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            let wavelen = inv
                .f_reciprocal()?
                .f_mul_scalar(2.0 * std::f64::consts::PI)?;
            let scaled = inv.f_div_scalar(factor)?;
            let inv_llama = scaled.f_where_self(&wavelen.f_gt(low_wavelen)?, &inv)?;
            // smooth = (old / wavelen - low) / (high - low)
            let smooth = wavelen
                .f_reciprocal()?
                .f_mul_scalar(old)?
                .f_sub_scalar(low)?
                .f_div_scalar(high - low)?;
            let smoothed = smooth
                .f_neg()?
                .f_add_scalar(1.0)?
                .f_mul(&inv_llama)?
                .f_div_scalar(factor)?
                .f_add(&smooth.f_mul(&inv_llama)?)?;
            let medium = wavelen
                .f_lt(high_wavelen)?
                .f_logical_not()?
                .f_logical_and(&wavelen.f_gt(low_wavelen)?.f_logical_not()?)?;
            smoothed.f_where_self(&medium, &inv_llama)?
        }
    })
}

/// `[x1, x2] -> [-x2, x1]` over the last dimension, as transformers' `rotate_half`.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    Ok(Tensor::f_cat(&[x2.f_neg()?, x1], -1)?)
}

fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(cos)?.f_add(&rotate_half(x)?.f_mul(sin)?)?)
}

struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(p: &nn::Path, d: i64, eps: f64, w: &Weights) -> Result<Self> {
        Ok(Self {
            w: w.var(p, "weight", &[d])?,
            eps,
        })
    }

    /// Normalised in f32 and cast back before the weight, as transformers does
    /// (it matters in bf16).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.f_to_kind(Kind::Float)?;
        let var = xf
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let y = xf.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.w.f_mul(&y.f_to_kind(x.kind())?)?)
    }
}

fn linear(p: &nn::Path, d_in: i64, d_out: i64, bias: bool, w: &Weights) -> Result<Linear> {
    Ok(Linear {
        w: w.var(p, "weight", &[d_out, d_in])?,
        b: if bias {
            Some(w.var(p, "bias", &[d_out])?)
        } else {
            None
        },
    })
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
}

impl Attention {
    fn load(p: &nn::Path, cfg: &Config, w: &Weights) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (h, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: linear(&(p / "q_proj"), d, h * hd, bias, w)?,
            k_proj: linear(&(p / "k_proj"), d, kvh * hd, bias, w)?,
            v_proj: linear(&(p / "v_proj"), d, kvh * hd, bias, w)?,
            o_proj: linear(&(p / "o_proj"), h * hd, d, bias, w)?,
            n_head: h,
            n_kv_head: kvh,
            head_dim: hd,
        })
    }

    /// The attention's output at the positions `keep` names: the attention runs at
    /// every position, the output projection at the kept ones alone.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        allowed: &Visible,
        cache: Option<(&mut KvCache, usize)>,
        keep: &Keep,
    ) -> Result<Tensor> {
        let (b, t, _) = x.size3()?;
        let split = |l: &Linear, heads: i64| -> Result<Tensor> {
            Ok(l.forward(x)?
                .f_view([b, t, heads, self.head_dim])?
                .f_transpose(1, 2)?)
        };
        let q = apply_rope(&split(&self.q_proj, self.n_head)?, cos, sin)?;
        let mut k = apply_rope(&split(&self.k_proj, self.n_kv_head)?, cos, sin)?;
        let mut v = split(&self.v_proj, self.n_kv_head)?;
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v)?;
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = attention(&q, &k, &v, allowed, scale)?;
        self.o_proj.forward(&keep.of(&y)?)
    }
}

/// SwiGLU: down(silu(gate(x)) * up(x)).
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(p: &nn::Path, cfg: &Config, w: &Weights) -> Result<Self> {
        let (d, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(&(p / "gate_proj"), d, f, bias, w)?,
            up_proj: linear(&(p / "up_proj"), d, f, bias, w)?,
            down_proj: linear(&(p / "down_proj"), f, d, bias, w)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?.f_silu()?;
        self.down_proj.forward(&g.f_mul(&self.up_proj.forward(x)?)?)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn load(p: &nn::Path, cfg: &Config, w: &Weights) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&(p / "input_layernorm"), d, eps, w)?,
            self_attn: Attention::load(&(p / "self_attn"), cfg, w)?,
            post_attention_layernorm: RmsNorm::load(&(p / "post_attention_layernorm"), d, eps, w)?,
            mlp: Mlp::load(&(p / "mlp"), cfg, w)?,
        })
    }
}

/// The Llama network with its language-model head.
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Only when `tie_word_embeddings` is false; otherwise the head is `embed_tokens`.
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
}

impl Llama {
    /// Builds the network under `root` from the checkpoint tensors.
    pub(crate) fn load(root: &nn::Path, cfg: Config, w: &Weights) -> Result<Self> {
        let p = root / "model";
        let d = cfg.hidden_size;
        if cfg.head_dim % 2 != 0 {
            bail!(
                "head_dim {} is odd: rotary embeddings need pairs",
                cfg.head_dim
            );
        }
        let embed_tokens = w.var(&(&p / "embed_tokens"), "weight", &[cfg.vocab_size, d])?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&(&p / "layers" / i), &cfg, w))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::load(&(&p / "norm"), d, cfg.rms_norm_eps, w)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.var(&(root / "lm_head"), "weight", &[cfg.vocab_size, d])?)
        };
        let inv_freq = inv_freq(&cfg)?.f_to_device(root.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The token embeddings of `ids` `[b, t, d]`.
    pub(crate) fn embed(&self, ids: &Tensor, _positions: &Tensor) -> Result<Tensor> {
        Ok(Tensor::f_embedding(
            &self.embed_tokens,
            ids,
            -1,
            false,
            false,
        )?)
    }

    /// Adds `g`, the gradient of [`Llama::embed`]'s output, into the embedding's.
    pub(crate) fn embed_backward(&self, ids: &Tensor, g: &Tensor) -> Result<()> {
        add_rows(&self.embed_tokens, ids, g)
    }

    /// Runs layers `layers` on `x` at `positions`, attending where `allowed` is true;
    /// the last of them only at the positions `keep` names (see [`Keep`]).
    pub(crate) fn layers(
        &self,
        layers: Range<usize>,
        mut x: Tensor,
        positions: &Tensor,
        allowed: &Visible,
        mut cache: Option<&mut KvCache>,
        keep: &Keep,
    ) -> Result<Tensor> {
        let last = layers.end.saturating_sub(1);
        // cos/sin computed in f32 and cast to the activations' kind, as transformers.
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let cos = emb.f_cos()?.f_to_kind(x.kind())?.f_unsqueeze(1)?;
        let sin = emb.f_sin()?.f_to_kind(x.kind())?.f_unsqueeze(1)?;
        for i in layers {
            let l = &self.layers[i];
            let keep = if i == last { keep } else { &Keep::All };
            let h = l.input_layernorm.forward(&x)?;
            let a = l.self_attn.forward(
                &h,
                &cos,
                &sin,
                allowed,
                cache.as_deref_mut().map(|c| (c, i)),
                keep,
            )?;
            x = keep.of(&x)?.f_add(&a)?;
            let h = l.post_attention_layernorm.forward(&x)?;
            x = x.f_add(&l.mlp.forward(&h)?)?;
        }
        Ok(x)
    }

    /// The final norm: hidden states `[b, t, d]` ready for the head.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    pub(crate) fn vocab_matrices(&self) -> (Tensor, Option<Tensor>) {
        (
            self.embed_tokens.shallow_clone(),
            self.lm_head.as_ref().map(Tensor::shallow_clone),
        )
    }

    /// The tensors under their checkpoint keys (a tied head is not stored, as
    /// transformers does).
    pub(crate) fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_owned(),
                self.embed_tokens.shallow_clone(),
            ),
            ("model.norm.weight".to_owned(), self.norm.w.shallow_clone()),
        ];
        let mut lin = |key: String, l: &Linear| {
            out.push((format!("{key}.weight"), l.w.shallow_clone()));
            if let Some(b) = &l.b {
                out.push((format!("{key}.bias"), b.shallow_clone()));
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            let k = format!("model.layers.{i}");
            lin(format!("{k}.self_attn.q_proj"), &l.self_attn.q_proj);
            lin(format!("{k}.self_attn.k_proj"), &l.self_attn.k_proj);
            lin(format!("{k}.self_attn.v_proj"), &l.self_attn.v_proj);
            lin(format!("{k}.self_attn.o_proj"), &l.self_attn.o_proj);
            lin(format!("{k}.mlp.gate_proj"), &l.mlp.gate_proj);
            lin(format!("{k}.mlp.up_proj"), &l.mlp.up_proj);
            lin(format!("{k}.mlp.down_proj"), &l.mlp.down_proj);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let k = format!("model.layers.{i}");
            out.push((
                format!("{k}.input_layernorm.weight"),
                l.input_layernorm.w.shallow_clone(),
            ));
            out.push((
                format!("{k}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.w.shallow_clone(),
            ));
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_owned(), h.shallow_clone()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: Value) -> Config {
        let mut v = json!({
            "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        Config::from_json(Path::new("config.json"), &v).unwrap()
    }

    #[test]
    fn rope_reads_both_config_formats() {
        // transformers < 5: top-level rope_theta and rope_scaling {type, factor}.
        let old =
            config(json!({"rope_theta": 100.0, "rope_scaling": {"type": "linear", "factor": 2.0}}));
        // transformers >= 5: one rope_parameters object.
        let new = config(
            json!({"rope_parameters": {"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0}}),
        );
        assert_eq!(
            (old.rope_theta, &old.rope_scaling),
            (100.0, &RopeScaling::Linear { factor: 2.0 })
        );
        assert_eq!(
            (new.rope_theta, &new.rope_scaling),
            (old.rope_theta, &old.rope_scaling)
        );
        assert_eq!(old.num_key_value_heads, 2);
        assert_eq!(old.head_dim, 8);
        // head_dim 8: inv_freq = 100^(-i/8) for i = 0, 2, 4, 6, divided by the factor.
        let got = Vec::<f32>::try_from(inv_freq(&old).unwrap()).unwrap();
        let want: Vec<f32> = [0.0f64, 2.0, 4.0, 6.0]
            .iter()
            .map(|i| (100f64.powf(-i / 8.0) / 2.0) as f32)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} {want:?}");
        }
        let plain = config(json!({}));
        assert_eq!(
            (plain.rope_theta, &plain.rope_scaling),
            (10_000.0, &RopeScaling::None)
        );
    }

    #[test]
    fn unsupported_rope_type_names_the_file() {
        let v = json!({
            "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
        });
        let err = Config::from_json(Path::new("m/config.json"), &v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m/config.json: unsupported rope_type `yarn`"
        );
    }
}
