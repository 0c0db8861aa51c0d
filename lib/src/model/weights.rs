//! Weights on disk: a checkpoint's safetensors (one file or shards with their
//! index) read into tensors that remember their file, a model's tensors written
//! back, and config.json read into an architecture's typed config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tch::{nn, Device, Kind, Tensor};

use crate::stage::write_atomic_with;

/// The tensors of a checkpoint (one file or shards), each with the file it came from,
/// so that errors name that file.
pub(crate) struct Weights {
    tensors: HashMap<String, (PathBuf, Tensor)>,
    /// What to name when a tensor is missing: the single file or the index.
    source: PathBuf,
    kind: Kind,
    device: Device,
    /// Old GPT-2 checkpoints name `h.0...` what transformers names `transformer.h.0...`.
    pub(crate) optional_prefix: Option<&'static str>,
}

impl Weights {
    pub(crate) fn open(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
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

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses an architecture's typed config out of config.json; a missing or
/// ill-typed key becomes a one-line error naming the file.
pub(crate) fn parse_config<T: DeserializeOwned>(path: &Path, v: &Value) -> Result<T> {
    T::deserialize(v).map_err(|e| anyhow!("{}: {e}", path.display()))
}
