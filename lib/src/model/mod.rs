//! Causal language models on libtorch, loaded from and saved to the Hugging Face
//! directory layout (config.json, model.safetensors or its shards, tokenizer.json).
//!
//! [`Model`] is what the sampler and the trainer use: a forward over a left-padded
//! batch, an incremental forward with a [`KvCache`], the Quark control tokens
//! ([`Model::add_control_tokens`]) and [`Model::save`]. One file per architecture
//! ([`gpt2`], [`llama`]) holds the network itself; this module owns files, masks,
//! positions and the vocabulary. Sampling lives elsewhere.

pub mod gpt2;
pub mod llama;

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};
use tokenizers::{AddedToken, Tokenizer};

use crate::stage::{write_atomic, write_atomic_with};

/// Name of the file that records Quark's additions to a model directory.
pub const QUARK_JSON: &str = "quark.json";

/// The text of control token `q` (`<|quark:0|>` is the best reward quantile).
pub fn control_token_text(q: u32) -> String {
    format!("<|quark:{q}|>")
}

// ---- device and dtype flags ---------------------------------------------------

/// Where a program runs its model (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The tch device; `Cuda` without a GPU is an error rather than a silent CPU run.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Auto if nvidia_driver_present() && cuda_available() => Ok(Device::Cuda(0)),
            DeviceArg::Auto | DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if cuda_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda if !load_cuda_backend() => bail!(
                "--device cuda: libtorch_cuda.so does not load (a libtorch built without CUDA?)"
            ),
            DeviceArg::Cuda => bail!("--device cuda: no CUDA device is available"),
        }
    }
}

/// Loads libtorch's CUDA half, libtorch_cuda.so, once; true if it is loaded.
///
/// The programs name none of its symbols, so the linker leaves it out, and without
/// it libtorch reports no GPU at all. Loading it at start-up would cost every CPU
/// run about 400 MB (it pulls in cuBLAS, cuDNN and the rest), so it is loaded here,
/// on demand, from the libtorch folder on the programs' run-time search path.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| dl::open(c"libtorch_cuda.so", dl::RTLD_NOW | dl::RTLD_GLOBAL))
}

/// Whether an NVIDIA driver is installed (its library loads): only then is the
/// CUDA half worth loading for `--device auto`.
fn nvidia_driver_present() -> bool {
    dl::open(c"libcuda.so.1", dl::RTLD_LAZY | dl::RTLD_LOCAL)
}

fn cuda_available() -> bool {
    load_cuda_backend() && tch::Cuda::is_available()
}

/// The dynamic loader (glibc's dlopen), for the libraries loaded on demand.
mod dl {
    use std::ffi::{c_char, c_int, c_void, CStr};

    pub const RTLD_LAZY: c_int = 0x1;
    pub const RTLD_NOW: c_int = 0x2;
    pub const RTLD_GLOBAL: c_int = 0x100;
    pub const RTLD_LOCAL: c_int = 0;

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    }

    /// Loads `name` (found as the dynamic loader finds libraries for the program,
    /// its run-time search path included) and keeps it loaded; true on success.
    pub fn open(name: &CStr, flags: c_int) -> bool {
        // SAFETY: `name` is a valid C string; a library that loads stays loaded for
        // the life of the process, so nothing refers to unloaded code.
        !unsafe { dlopen(name.as_ptr(), flags) }.is_null()
    }
}

impl FromStr for DeviceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => bail!("unknown device `{s}` (expected auto, cpu or cuda)"),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The floating-point type of a model's weights (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DTypeArg {
    #[default]
    F32,
    /// bfloat16: on CPUs with AVX512-BF16 several times faster than f32.
    Bf16,
}

impl From<DTypeArg> for Kind {
    fn from(d: DTypeArg) -> Kind {
        match d {
            DTypeArg::F32 => Kind::Float,
            DTypeArg::Bf16 => Kind::BFloat16,
        }
    }
}

impl FromStr for DTypeArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => bail!("unknown dtype `{s}` (expected f32 or bf16)"),
        }
    }
}

impl fmt::Display for DTypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

// ---- control tokens and the key/value cache -----------------------------------

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

/// Keys and values of the tokens seen so far, per layer: `[batch, kv_heads, past, head_dim]`.
/// Made by [`Model::new_cache`] for one model; grows by each [`Model::forward_cached`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    past: i64,
    /// Always attend through an explicit mask (see [`KvCache::batch_invariant`]).
    explicit_mask: bool,
}

impl KvCache {
    fn new(n_layers: usize) -> Self {
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

// ---- masks and positions --------------------------------------------------------

/// Position ids from a left-padding mask: cumsum - 1, clamped at 0, so a padded row
/// sees the same positions as the unpadded sequence.
fn position_ids(mask: &Tensor) -> Result<Tensor> {
    Ok(mask
        .f_cumsum(-1, Kind::Int64)?
        .f_sub_scalar(1)?
        .f_clamp_min(0)?)
}

/// Checks a batch's shapes; its position ids and what each query may see.
fn batch_inputs(input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Visible)> {
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

/// The last `tail` positions of `x` `[b, t, d]` (all of them for None).
fn tail_of(x: &Tensor, tail: Option<i64>) -> Result<Tensor> {
    Ok(match tail {
        Some(n) => {
            let t = x.size()[1];
            x.f_narrow(1, t - n.clamp(0, t), n.clamp(0, t))?
                .f_contiguous()?
        }
        None => x.shallow_clone(),
    })
}

/// A training forward pass from [`Model::train_forward`].
pub struct TrainForward {
    hidden: Tensor,
    checkpoint: Option<Checkpoint>,
}

/// What gradient checkpointing keeps of a forward pass: each layer's input, the
/// last layer's output (cut from the graph), and the batch to run layers on again.
struct Checkpoint {
    inputs: Vec<Tensor>,
    last: Tensor,
    ids: Tensor,
    positions: Tensor,
    allowed: Visible,
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
        let Some(ck) = self.checkpoint else {
            return Ok(());
        };
        let arch = &model.arch;
        let mut g = ck.last.grad();
        for (i, x) in ck.inputs.into_iter().enumerate().rev() {
            let x = x.set_requires_grad(true);
            let y = arch.layers(
                i..i + 1,
                x.shallow_clone(),
                &ck.positions,
                &ck.allowed,
                None,
            )?;
            along(&y, &g)?;
            g = x.grad();
        }
        along(&arch.embed(&ck.ids, &ck.positions)?, &g)
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
}

/// The cheapest [`Visible`] for `mask` (`[b, past + n]`): without padding the
/// fused kernels' own causal masking applies (as transformers does), else an
/// explicit mask.
fn visibility(mask: &Tensor, n: i64) -> Result<Visible> {
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

// ---- weights from safetensors ---------------------------------------------------

/// The tensors of a checkpoint (one file or shards), each with the file it came from,
/// so that errors name that file.
pub(crate) struct Weights {
    tensors: HashMap<String, (PathBuf, Tensor)>,
    /// What to name when a tensor is missing: the single file or the index.
    source: PathBuf,
    kind: Kind,
    device: Device,
    /// Old GPT-2 checkpoints name `h.0...` what transformers names `transformer.h.0...`.
    optional_prefix: Option<&'static str>,
}

impl Weights {
    fn open(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let (source, files) = if single.is_file() {
            (single.clone(), vec![single])
        } else if index.is_file() {
            let v: Value = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| {
                    anyhow!("{}: weight_map value is not a string", index.display())
                })?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            (index, files)
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let mut tensors = HashMap::new();
        for file in files {
            let bytes =
                std::fs::read(&file).with_context(|| format!("{}: cannot read", file.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| anyhow!("{}: not a safetensors file: {e:?}", file.display()))?;
            for (name, view) in st.tensors() {
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                let k = safetensors_kind(view.dtype())
                    .with_context(|| format!("{}: tensor {name}", file.display()))?;
                let t = Tensor::f_from_data_size(view.data(), &shape, k)
                    .with_context(|| format!("{}: tensor {name}", file.display()))?;
                tensors.insert(name, (file.clone(), t));
            }
        }
        Ok(Self {
            tensors,
            source,
            kind,
            device,
            optional_prefix: None,
        })
    }

    /// The checkpoint tensor `key`, checked against the shape config.json implies,
    /// converted to the model's kind and device.
    fn get(&self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let found = self.tensors.get(key).or_else(|| {
            let p = self.optional_prefix?;
            self.tensors.get(key.strip_prefix(p)?)
        });
        let (file, t) =
            found.ok_or_else(|| anyhow!("{}: tensor {key} is missing", self.source.display()))?;
        if t.size() != shape {
            bail!(
                "{}: tensor {key} has shape {:?} but config.json implies {:?}",
                file.display(),
                t.size(),
                shape
            );
        }
        Ok(t.f_to_dtype(self.kind, false, false)?
            .f_to_device(self.device)?)
    }

    /// Registers checkpoint tensor `p.name` as a trainable variable named after its key.
    pub(crate) fn var(&self, p: &nn::Path, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.get(&p.path(name), shape)?;
        Ok(p.add(name, t, true))
    }

    /// As [`Weights::var`] for a weight the checkpoint stores transposed: `shape` is
    /// the checkpoint's, the variable holds its transpose.
    pub(crate) fn var_transposed(
        &self,
        p: &nn::Path,
        name: &str,
        shape: [i64; 2],
    ) -> Result<Tensor> {
        let t = self
            .get(&p.path(name), &shape)?
            .f_t_copy()?
            .f_contiguous()?;
        Ok(p.add(name, t, true))
    }
}

fn safetensors_kind(d: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match d {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// A tensor on its way into a safetensors file: its bytes are read when written.
struct StView<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    tensor: &'a Tensor,
}

impl safetensors::View for StView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let t = self.tensor;
        if self.data_len() == 0 {
            std::borrow::Cow::Borrowed(&[])
        } else if t.device() == Device::Cpu && t.is_contiguous() {
            // SAFETY: a contiguous CPU tensor's storage holds data_len() bytes from
            // data_ptr(), and `t` (borrowed for 'a) keeps it alive while the slice is.
            let bytes =
                unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, self.data_len()) };
            std::borrow::Cow::Borrowed(bytes)
        } else {
            let t = t.to_device(Device::Cpu).contiguous();
            let mut data = vec![0u8; self.data_len()];
            t.copy_data_u8(&mut data, t.numel());
            std::borrow::Cow::Owned(data)
        }
    }
    fn data_len(&self) -> usize {
        self.tensor.numel() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes `tensors` as a safetensors file (atomically), one tensor at a time: a
/// contiguous CPU tensor's bytes go to the file straight from its storage, any other
/// is copied to the CPU on its turn, so saving never holds a second model in memory.
pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = match t.kind() {
            Kind::Float => safetensors::Dtype::F32,
            Kind::BFloat16 => safetensors::Dtype::BF16,
            Kind::Half => safetensors::Dtype::F16,
            k => bail!(
                "{}: cannot store tensor {name} of kind {k:?}",
                path.display()
            ),
        };
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((
            name.as_str(),
            StView {
                dtype,
                shape,
                tensor: t,
            },
        ));
    }
    // transformers refuses a safetensors file without format metadata.
    let meta = Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));
    write_atomic_with(path, |tmp| {
        safetensors::tensor::serialize_to_file(views, &meta, tmp)
            .map_err(|e| anyhow!("{}: cannot write: {e:?}", path.display()))
    })
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses an architecture's typed config out of config.json; a missing or
/// ill-typed key becomes a one-line error naming the file.
pub(crate) fn parse_config<T: DeserializeOwned>(path: &Path, v: &Value) -> Result<T> {
    T::deserialize(v).map_err(|e| anyhow!("{}: {e}", path.display()))
}

// ---- the model ----------------------------------------------------------------------

enum Arch {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

impl Arch {
    /// The final (normalised) hidden states `[b, n, d]` of every position, or of the
    /// last `tail` positions only (the head, the largest matrix of a small model,
    /// then runs on those alone).
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
        tail: Option<i64>,
    ) -> Result<Tensor> {
        let x = self.embed(ids, positions)?;
        let x = self.layers(0..self.n_layers(), x, positions, allowed, cache)?;
        self.final_norm(&tail_of(&x, tail)?)
    }

    /// The input embeddings `[b, t, d]` of `ids` at `positions`.
    fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        match self {
            Arch::Gpt2(m) => m.embed(ids, positions),
            Arch::Llama(m) => m.embed(ids, positions),
        }
    }

    /// Runs the transformer layers `layers` on `x`.
    fn layers(
        &self,
        layers: Range<usize>,
        x: Tensor,
        positions: &Tensor,
        allowed: &Visible,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Arch::Gpt2(m) => m.layers(layers, x, positions, allowed, cache),
            Arch::Llama(m) => m.layers(layers, x, positions, allowed, cache),
        }
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Arch::Gpt2(m) => m.final_norm(x),
            Arch::Llama(m) => m.final_norm(x),
        }
    }

    /// The head: logits (f32) of hidden states `[.., d]`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (emb, head) = self.vocab_matrices();
        Ok(hidden
            .f_linear::<Tensor>(head.as_ref().unwrap_or(&emb), None)?
            .f_to_kind(Kind::Float)?)
    }

    fn n_layers(&self) -> usize {
        match self {
            Arch::Gpt2(m) => m.n_layers(),
            Arch::Llama(m) => m.n_layers(),
        }
    }

    /// The input embedding and, when untied, the output head (both `[vocab, d]`).
    fn vocab_matrices(&self) -> (Tensor, Option<Tensor>) {
        match self {
            Arch::Gpt2(m) => m.vocab_matrices(),
            Arch::Llama(m) => m.vocab_matrices(),
        }
    }

    fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Arch::Gpt2(m) => m.hf_tensors(),
            Arch::Llama(m) => m.hf_tensors(),
        }
    }
}

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
    /// [`Model::forward_tail`] puts through the head: a trainer can then run the head
    /// on a few rows at a time.
    pub fn hidden_tail(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        tail: Option<i64>,
    ) -> Result<Tensor> {
        let (positions, allowed) = batch_inputs(input_ids, attention_mask)?;
        self.arch
            .hidden(input_ids, &positions, &allowed, None, tail)
    }

    /// As [`Model::hidden_tail`], kept for one [`TrainForward::backward`]. With
    /// `checkpoint` (gradient checkpointing), the layers run without a graph and only
    /// each layer's input is kept; the backward pass runs each layer again, one at a
    /// time, for its gradient: one more forward pass of the layers for a fraction of
    /// the activation memory.
    pub fn train_forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        tail: Option<i64>,
        checkpoint: bool,
    ) -> Result<TrainForward> {
        let (positions, allowed) = batch_inputs(input_ids, attention_mask)?;
        if !checkpoint {
            let hidden = self
                .arch
                .hidden(input_ids, &positions, &allowed, None, tail)?;
            return Ok(TrainForward {
                hidden,
                checkpoint: None,
            });
        }
        let mut inputs = Vec::with_capacity(self.arch.n_layers());
        let last = tch::no_grad(|| -> Result<Tensor> {
            let mut x = self.arch.embed(input_ids, &positions)?;
            for i in 0..self.arch.n_layers() {
                inputs.push(x.shallow_clone());
                x = self.arch.layers(i..i + 1, x, &positions, &allowed, None)?;
            }
            Ok(x)
        })?
        .set_requires_grad(true);
        let hidden = self.arch.final_norm(&tail_of(&last, tail)?)?;
        Ok(TrainForward {
            hidden,
            checkpoint: Some(Checkpoint {
                inputs,
                last,
                ids: input_ids.shallow_clone(),
                positions,
                allowed,
            }),
        })
    }

    /// The head: logits `[.., vocab]` (f32) of hidden states from [`Model::hidden_tail`].
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
        let hidden = self
            .arch
            .hidden(new_ids, &positions, &allowed, Some(cache), tail)?;
        let logits = self.logits(&hidden)?;
        cache.past = total;
        Ok(logits)
    }

    /// Rows of the output head (ids 0..vocab_size, control tokens included).
    pub fn vocab_size(&self) -> i64 {
        let (emb, head) = self.arch.vocab_matrices();
        head.unwrap_or(emb).size()[0]
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

/// Resizes a `[vocab, d]` variable in place so that rows `ct.ids()` exist, filled
/// with draws from N(mean, std) of the rows before them, per dimension (unbiased
/// std, as torch.std). Every clone of the variable (the model's layers, the var
/// store's lists) shares its storage, so all of them see the new rows.
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
        let new_rows = noise.f_mul(&std)?.f_add(&mean)?;
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
fn normal_samples(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
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

// ---- building blocks shared by the architectures -------------------------------

/// A dense layer `y = x W^T + b` with `W` `[out, in]`, as torch's `nn.Linear`.
pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.w, self.b.as_ref())?)
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
        Visible::PerRow(starts) => per_row_attention(q, k, v, starts, scale)?,
    };
    Ok(y.f_transpose(1, 2)?
        .f_contiguous()?
        .f_view([b, n, h * hd])?)
}

/// Where each row's real tokens start in a left-padding mask `[b, total]`.
fn padding_starts(mask: &Tensor) -> Result<Vec<i64>> {
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

    #[test]
    fn flags_parse() {
        assert_eq!("bf16".parse::<DTypeArg>().unwrap(), DTypeArg::Bf16);
        assert_eq!(Kind::from(DTypeArg::F32), Kind::Float);
        assert_eq!(
            "cpu".parse::<DeviceArg>().unwrap().device().unwrap(),
            Device::Cpu
        );
        assert!("gpu".parse::<DeviceArg>().is_err());
    }
}
