//! Causal language models on libtorch, loaded from and saved to the Hugging Face
//! directory layout (config.json, model.safetensors or its shards, tokenizer.json).
//!
//! [`Model`] is what the sampler and the trainer use: a forward over a left-padded
//! batch, an incremental forward with a [`KvCache`], the Quark control tokens
//! ([`Model::add_control_tokens`]) and [`Model::save`]. One file per architecture
//! ([`gpt2`], [`llama`]) holds the network itself; [`arch`] composes them, and the
//! other files hold one concern each: [`attention`], [`cache`], [`control`],
//! [`masks`], [`packed`] (training batches without padding), [`rowwise`] (the
//! decode steps' CPU kernel), [`weights`]. Sampling lives elsewhere, and so do the
//! device and dtype ([`crate::device`]).

pub mod arch;
pub mod attention;
pub mod cache;
pub mod control;
pub mod gpt2;
pub mod llama;
pub mod masks;
pub mod packed;
pub mod rowwise;
pub mod weights;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};
use tokenizers::Tokenizer;

pub use crate::device::{load_cuda_backend, DType, DTypeArg, DeviceArg};
use crate::stage::write_atomic;
use arch::Arch;
use attention::padding_starts;
pub use cache::KvCache;
pub use control::{control_token_text, ControlInit, ControlTokens};
pub use masks::TrainForward;
use masks::{batch_inputs, position_ids, visibility, Checkpoint, Keep, Visible};
pub use packed::Packed;
pub(crate) use weights::write_safetensors;
use weights::{parse_config, read_json, Weights};

/// Name of the file that records Quark's additions to a model directory.
pub const QUARK_JSON: &str = "quark.json";

/// A causal language model with its tokenizer, loaded from a Hugging Face directory.
pub struct Model {
    arch: Arch,
    vs: nn::VarStore,
    tokenizer: Tokenizer,
    /// config.json as read; saved back with only `vocab_size` (and dtype) changed.
    config: Value,
    generation_config: Option<Value>,
    control: Option<ControlTokens>,
    kind: Kind,
    /// Tokenizer side files carried over verbatim on save (chat template, special
    /// token names), by file name.
    side_files: Vec<(String, Vec<u8>)>,
}

/// Files of a model directory that [`Model::save`] copies unchanged: transformers
/// reads the chat template and special-token names from them.
const SIDE_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

impl Model {
    /// Loads config.json, the weights (model.safetensors, or shards listed in
    /// model.safetensors.index.json) in `kind` (Float or BFloat16) onto `device`,
    /// tokenizer.json and, when present, generation_config.json and quark.json.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Model> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            bail!("{}: unsupported weight dtype {kind:?}", dir.display());
        }
        let config_path = dir.join("config.json");
        let config: Value = read_json(&config_path)?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{}: missing field `model_type`", config_path.display()))?;
        let archs: Vec<&str> = config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let expected = match model_type {
            "gpt2" => "GPT2LMHeadModel",
            "llama" => "LlamaForCausalLM",
            other => bail!(
                "{}: unknown model_type `{other}` (supported: gpt2, llama)",
                config_path.display()
            ),
        };
        if let Some(a) = archs.iter().find(|a| **a != expected) {
            bail!(
                "{}: unknown architecture `{a}` for model_type `{model_type}` (supported: {expected})",
                config_path.display()
            );
        }

        let mut weights = Weights::open(dir, kind, device)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let arch = match model_type {
            "gpt2" => {
                weights.optional_prefix = Some("transformer.");
                let cfg = parse_config(&config_path, &config)?;
                Arch::Gpt2(gpt2::Gpt2::load(&vs.root(), cfg, &weights)?)
            }
            _ => {
                let cfg = llama::Config::from_json(&config_path, &config)?;
                Arch::Llama(llama::Llama::load(&vs.root(), cfg, &weights)?)
            }
        };
        drop(weights);

        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        let gen_path = dir.join("generation_config.json");
        let generation_config = if gen_path.is_file() {
            Some(read_json(&gen_path)?)
        } else {
            None
        };
        let quark_path = dir.join(QUARK_JSON);
        let control = if quark_path.is_file() {
            let q: Value = read_json(&quark_path)?;
            let k = q
                .get("control_tokens")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    anyhow!("{}: missing field `control_tokens`", quark_path.display())
                })?;
            if k == 0 {
                None
            } else {
                let first = tokenizer
                    .token_to_id(&control_token_text(0))
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: has no token {}",
                            tok_path.display(),
                            control_token_text(0)
                        )
                    })?;
                let ct = ControlTokens {
                    k: k as u32,
                    first_id: i64::from(first),
                };
                for q in 0..ct.k {
                    if tokenizer.token_to_id(&control_token_text(q)).map(i64::from) != ct.id(q) {
                        bail!(
                            "{}: control token {} missing or not contiguous",
                            tok_path.display(),
                            control_token_text(q)
                        );
                    }
                }
                Some(ct)
            }
        } else {
            None
        };
        let mut side_files = Vec::new();
        for name in SIDE_FILES {
            let p = dir.join(name);
            if p.is_file() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
                side_files.push((name.to_owned(), bytes));
            }
        }
        let model = Model {
            arch,
            vs,
            tokenizer,
            config,
            generation_config,
            control,
            kind,
            side_files,
        };
        if let Some(ct) = control {
            if ct.first_id + i64::from(ct.k) > model.vocab_size() {
                bail!(
                    "{}: control tokens end at id {} but the embedding has {} rows",
                    quark_path.display(),
                    ct.first_id + i64::from(ct.k),
                    model.vocab_size()
                );
            }
        }
        Ok(model)
    }

    /// Logits `[b, t, vocab]` (f32) for a left-padded batch: `input_ids` `[b, t]`
    /// (i64) and `attention_mask` `[b, t]` (1 = token, 0 = padding). Positions come
    /// from the mask, so padding changes no logit of a real token.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.forward_tail(input_ids, attention_mask, None)
    }

    /// As [`Model::forward`], with the logits of the last `tail` positions only
    /// (`[b, tail, vocab]`; all of them for None): the trainer needs the completion's.
    pub fn forward_tail(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        tail: Option<i64>,
    ) -> Result<Tensor> {
        self.logits(&self.hidden_tail(input_ids, attention_mask, tail)?)
    }

    /// The final hidden states `[b, tail, d]` (in the model's kind) that
    /// [`Model::forward_tail`] puts through the head.
    pub fn hidden_tail(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        tail: Option<i64>,
    ) -> Result<Tensor> {
        let (positions, allowed) = batch_inputs(input_ids, attention_mask)?;
        self.arch
            .hidden(input_ids, &positions, &allowed, None, Keep::tail(tail))
    }

    /// The final hidden states `[1, m, d]` of a packed batch at its positions `at`
    /// (`[m]`, indices into the packed tokens).
    pub fn packed_hidden(&self, batch: &Packed, at: &Tensor) -> Result<Tensor> {
        let allowed = batch.visible();
        self.arch
            .hidden(&batch.ids, &batch.positions, &allowed, None, Keep::At(at))
    }

    /// As [`Model::packed_hidden`], kept for one [`TrainForward::backward`]. With
    /// `checkpoint` (gradient checkpointing), the layers run without a graph and only
    /// each layer's input is kept; the backward pass runs each layer again, one at a
    /// time, for its gradient: one more forward pass of the layers for a fraction of
    /// the activation memory.
    pub fn train_forward(
        &self,
        batch: &Packed,
        at: &Tensor,
        checkpoint: bool,
    ) -> Result<TrainForward> {
        let (ids, positions, allowed) = (&batch.ids, &batch.positions, batch.visible());
        // The embedding's lookup stays out of the graph: autograd would build its
        // gradient as a dense `[vocab, d]` array and then add that to the
        // parameter's; [`TrainForward::backward`] adds the looked-up rows' alone.
        let trainable = !self.vs.trainable_variables().is_empty();
        let embedded =
            tch::no_grad(|| self.arch.embed(ids, positions))?.set_requires_grad(trainable);
        let n = self.arch.n_layers();
        let (hidden, checkpoint) = if checkpoint {
            let mut inputs = Vec::with_capacity(n);
            let last = tch::no_grad(|| -> Result<Tensor> {
                let mut x = embedded.shallow_clone();
                for i in 0..n {
                    inputs.push(x.shallow_clone());
                    let keep = Checkpoint::keep(at, i, n);
                    x = self
                        .arch
                        .layers(i..i + 1, x, positions, &allowed, None, &keep)?;
                }
                Ok(x)
            })?
            .set_requires_grad(true);
            let hidden = self.arch.final_norm(&last)?;
            let ck = Checkpoint {
                inputs,
                last,
                allowed,
                at: at.shallow_clone(),
            };
            (hidden, Some(ck))
        } else {
            let x = embedded.shallow_clone();
            let hidden = self
                .arch
                .hidden_of(x, positions, &allowed, None, Keep::At(at))?;
            (hidden, None)
        };
        Ok(TrainForward {
            hidden,
            embedded,
            ids: ids.shallow_clone(),
            positions: positions.shallow_clone(),
            checkpoint,
        })
    }

    /// The head: logits `[.., vocab]` (f32) of final hidden states `[.., d]`
    /// ([`Model::hidden_tail`], [`Model::packed_hidden`]).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.arch.logits(hidden)
    }

    /// The most positions a sequence may have, for an architecture with a hard
    /// limit (GPT-2's learned positions); None for rotary ones (Llama).
    pub fn max_positions(&self) -> Option<usize> {
        match &self.arch {
            Arch::Gpt2(m) => Some(m.max_positions()),
            Arch::Llama(_) => None,
        }
    }

    /// The positions the model was made for: the hard limit, or the
    /// `max_position_embeddings` of a rotary model's config.json. Sampling and
    /// training refuse longer sequences (a rotary model would run, far outside what
    /// it learned, and a long prompt's attention can take more memory than exists).
    pub fn position_limit(&self) -> Option<usize> {
        self.max_positions().or_else(|| {
            self.config
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|n| n as usize)
        })
    }

    /// An empty key/value cache for [`Model::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.arch.n_layers())
    }

    /// Logits `[b, n, vocab]` (f32) for `n` new tokens per row after what `cache`
    /// holds; `attention_mask` covers the cached and the new positions `[b, past + n]`.
    /// Appends the new keys and values to the cache.
    pub fn forward_cached(
        &self,
        new_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_cached_tail(new_ids, attention_mask, cache, None)
    }

    /// As [`Model::forward_cached`], with the logits of the last `tail` new positions
    /// only: a sampler needs just the last one after a prompt.
    pub fn forward_cached_tail(
        &self,
        new_ids: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
        tail: Option<i64>,
    ) -> Result<Tensor> {
        let (b, n) = new_ids.size2()?;
        let (mb, total) = attention_mask.size2()?;
        if mb != b || total != cache.len() + n {
            bail!(
                "forward_cached: attention_mask {:?} must be [{b}, {}] (cached {} + new {n})",
                attention_mask.size(),
                cache.len() + n,
                cache.len()
            );
        }
        let positions = position_ids(attention_mask)?.f_narrow(1, total - n, n)?;
        let allowed = if cache.explicit_mask {
            Visible::PerRow(padding_starts(attention_mask)?)
        } else {
            visibility(attention_mask, n)?
        };
        let hidden =
            self.arch
                .hidden(new_ids, &positions, &allowed, Some(cache), Keep::tail(tail))?;
        let logits = self.logits(&hidden)?;
        cache.past = total;
        Ok(logits)
    }

    /// Rows of the output head (ids 0..vocab_size, control tokens included).
    pub fn vocab_size(&self) -> i64 {
        self.head().size()[0]
    }

    fn token_id(&self, key: &str) -> Option<i64> {
        let from = |v: &Value| match v.get(key)? {
            Value::Number(n) => n.as_i64(),
            Value::Array(a) => a.first()?.as_i64(),
            _ => None,
        };
        from(&self.config).or_else(|| self.generation_config.as_ref().and_then(from))
    }

    /// The end-of-sequence id (config.json, else generation_config.json; the first
    /// when several are listed).
    pub fn eos_token_id(&self) -> Option<i64> {
        self.token_id("eos_token_id")
    }

    /// Every end-of-sequence id the model declares (generation_config.json's list,
    /// as transformers' generate uses it, and config.json's): generation stops at
    /// any of them. Models like Llama 3 list several.
    pub fn eos_token_ids(&self) -> Vec<i64> {
        let mut ids = Vec::new();
        for v in [self.generation_config.as_ref(), Some(&self.config)]
            .into_iter()
            .flatten()
        {
            let found: Vec<i64> = match v.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
                _ => Vec::new(),
            };
            for id in found {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// The beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<i64> {
        self.token_id("bos_token_id")
    }

    /// The tokenizer from tokenizer.json (with the control tokens once added).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The variables; every trainable parameter lives here, named by its checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The variables, mutably (to freeze a reference model).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The weights' kind (Float or BFloat16).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The control tokens, once added.
    pub fn control_tokens(&self) -> Option<ControlTokens> {
        self.control
    }

    /// The input embedding `[vocab, d]` (the head too when tied).
    pub(crate) fn input_embedding(&self) -> Tensor {
        self.arch.vocab_matrices().0
    }

    /// The head's matrix `[vocab, d]`: its own, or the input embedding when tied.
    pub(crate) fn head(&self) -> Tensor {
        self.arch.head()
    }

    /// Writes the Hugging Face layout into `dir` (created if needed; each file
    /// written atomically): config.json (new vocab_size), model.safetensors (the
    /// checkpoint's key names and layouts, a tied head stored once, as transformers
    /// does), tokenizer.json, generation_config.json, quark.json and the tokenizer side
    /// files it was loaded with (tokenizer_config.json, ...). For an
    /// all-or-nothing checkpoint, save into [`crate::stage::AtomicDir::path`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            bail!(
                "{}: a sharded checkpoint is in the way; save into another folder",
                index.display()
            );
        }
        let mut config = self.config.clone();
        config["vocab_size"] = json!(self.vocab_size());
        config["dtype"] = json!(match self.kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        });
        write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let tensors = tch::no_grad(|| self.arch.hf_tensors())?;
        write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        let tok = self
            .tokenizer
            .to_string(true)
            .map_err(|e| anyhow!("{}: cannot serialize tokenizer: {e}", dir.display()))?;
        write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
        let gen = self.generation_config.clone().unwrap_or_else(|| {
            let mut g = json!({});
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = self.config.get(key).filter(|v| !v.is_null()) {
                    g[key] = v.clone();
                }
            }
            g
        });
        write_atomic(
            &dir.join("generation_config.json"),
            serde_json::to_string_pretty(&gen)?.as_bytes(),
        )?;
        let quark = json!({
            "control_tokens": self.control.map_or(0, |c| c.k),
            "first_control_token_id": self.control.map(|c| c.first_id),
        });
        write_atomic(
            &dir.join(QUARK_JSON),
            serde_json::to_string_pretty(&quark)?.as_bytes(),
        )?;
        for (name, bytes) in &self.side_files {
            write_atomic(&dir.join(name), bytes)?;
        }
        Ok(())
    }
}
