//! GGUF import: reads a GGUF v2/v3 file (llama.cpp's single-file model format),
//! dequantizes its tensors to f32 and writes the Hugging Face layout of a
//! `LlamaForCausalLM` (config.json, model.safetensors, tokenizer.json and the small
//! generation/tokenizer configs) that [`crate`]'s models and Python transformers load.
//!
//! This module owns the file format and the conversion; it knows nothing about
//! running a model. Format reference: ggml's `docs/gguf.md`; tensor names and the
//! Q/K row permutation: llama.cpp's `convert_hf_to_gguf.py`, which this inverts.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::stage::{write_atomic, AtomicDir, Stage};

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Weights per block of the block-quantized types read here.
pub const QK: usize = 32;

/// One metadata value. Arrays hold values of one type (GGUF allows nested arrays).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float. An f32 is widened through its shortest decimal form, so
    /// that 1e-5 stored as f32 reads back as 1e-5 and not 9.999999747378752e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => format!("{v}").parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types. Only the ones [`dequantize`] reads are named; any other
/// keeps its numeric id so the error can say which it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    Bf16,
    Other(u32),
}

impl GgmlType {
    /// The type of ggml's numeric id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Bf16 => 30,
            Self::Other(id) => id,
        }
    }

    /// (weights per block, bytes per block), or None for a type not read here.
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::Bf16 => Some((1, 2)),
            // f16 d, 16 bytes of nibbles.
            Self::Q4_0 => Some((QK, 2 + QK / 2)),
            // f16 d, f16 m, 16 bytes of nibbles.
            Self::Q4_1 => Some((QK, 4 + QK / 2)),
            // f16 d, 32 int8.
            Self::Q8_0 => Some((QK, 2 + QK)),
            Self::Other(_) => None,
        }
    }

    /// ggml's name of the type (its enum name for the ones not read here).
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Bf16 => "BF16".into(),
            Self::Other(id) => {
                const NAMES: [&str; 31] = [
                    "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
                    "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64",
                    "F64", "IQ1_M", "BF16",
                ];
                NAMES
                    .get(id as usize)
                    .map_or_else(|| format!("type {id}"), |n| (*n).to_owned())
            }
        }
    }
}

/// One tensor's description from the file header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous one (a row), so the
    /// row-major (PyTorch) shape is this reversed.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row-major shape (PyTorch / safetensors order).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: its metadata and tensor descriptions, its data memory-mapped.
/// Every tensor's data range has been checked to lie inside the file.
pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Alignment of the tensor data.
    pub alignment: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the header bytes. Its errors name
/// what was being read and where, and [`Gguf::open`] prefixes the file name.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = (self.pos as u64).checked_add(n);
        match end {
            Some(end) if end <= self.bytes.len() as u64 => {
                let s = &self.bytes[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            _ => bail!(
                "truncated: {} needs {n} bytes at offset {} but the file has {} bytes",
                what(),
                self.pos,
                self.bytes.len()
            ),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("{} is not valid UTF-8 (offset {})", what(), self.pos))
    }

    fn value(&mut self, ty: u32, depth: u32, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{} is a bool stored as {b} (must be 0 or 1)", what()),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 8 {
                    bail!("{} nests arrays more than 8 deep", what());
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count larger than what is
                // left is a corrupt file, not a reason to allocate.
                let left = (self.bytes.len() - self.pos) as u64;
                if n > left {
                    bail!(
                        "truncated: {} claims {n} elements but only {left} bytes are left",
                        what()
                    );
                }
                let mut items = Vec::with_capacity(n as usize);
                for i in 0..n {
                    let item = || format!("{}[{i}]", what());
                    items.push(self.value(elem, depth + 1, &item)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => bail!("{} has unknown value type {other}", what()),
        })
    }
}

impl Gguf {
    /// Opens and validates a GGUF file: header, metadata, tensor infos, and that each
    /// tensor's data lies inside the file (so a truncated download fails here, with
    /// the file named, not half-way through an import).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the map is read-only and lives as long as `Gguf`; like every
        // memory-mapped reader we assume nobody truncates the file while we read it.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        Self::parse(path, map).with_context(|| format!("{}: not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self> {
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
        };
        let magic = c.array::<4>(&|| "the magic number".into())?;
        if &magic != MAGIC {
            bail!("bad magic {magic:02x?} (expected \"GGUF\")");
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (this reader knows 2 and 3)");
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        // A key takes at least 8 bytes: bound the counts by the file size before
        // allocating anything.
        let size = map.len() as u64;
        if n_kv > size / 8 || n_tensors > size / 8 {
            bail!(
                "truncated or corrupt: the header claims {n_kv} metadata entries and \
                 {n_tensors} tensors but the file has only {size} bytes"
            );
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("the key of metadata entry {i}"))?;
            let what = || format!("metadata '{key}'");
            let ty = c.u32(&what)?;
            let value = c.value(ty, 0, &what)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                bail!("metadata key '{key}' appears twice");
            }
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let what = || format!("tensor '{name}'");
            let n_dims = c.u32(&what)?;
            if n_dims > 4 {
                bail!("tensor '{name}' has {n_dims} dimensions (ggml allows at most 4)");
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&what))
                .collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType::from_id(c.u32(&what)?);
            let offset = c.u64(&what)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!(
                    "general.alignment = {:?} is not a power of two",
                    metadata[i].1
                ),
            },
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let g = Self {
            path: path.to_owned(),
            map,
            version,
            metadata,
            index,
            tensors,
            data_offset,
            alignment,
        };
        for t in &g.tensors {
            g.check_range(t)?;
        }
        Ok(g)
    }

    /// The byte length of a tensor's data, or an error for a type or shape that
    /// cannot be read.
    fn byte_len(t: &TensorInfo) -> Result<u64> {
        let (per_block, block_bytes) = t.ggml_type.block().ok_or_else(|| {
            anyhow!(
                "tensor '{}' has type {} (id {}), which this importer cannot dequantize \
                 (it reads F32, F16, BF16, Q4_0, Q4_1 and Q8_0)",
                t.name,
                t.ggml_type.name(),
                t.ggml_type.id()
            )
        })?;
        let row = t.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(per_block as u64) {
            bail!(
                "tensor '{}' ({}) has rows of {row} weights, not a multiple of its block of {per_block}",
                t.name,
                t.ggml_type.name()
            );
        }
        t.dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| (n / per_block as u64).checked_mul(block_bytes as u64))
            .ok_or_else(|| anyhow!("tensor '{}' has absurd dimensions {:?}", t.name, t.dims))
    }

    fn check_range(&self, t: &TensorInfo) -> Result<()> {
        let len = Self::byte_len(t)?;
        if !t.offset.is_multiple_of(self.alignment) {
            bail!(
                "tensor '{}' starts at data offset {}, not a multiple of the alignment {}",
                t.name,
                t.offset,
                self.alignment
            );
        }
        let start = self.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match end {
            Some(end) if end <= self.map.len() as u64 => Ok(()),
            _ => bail!(
                "truncated: tensor '{}' needs bytes {}..{} but the file has {} bytes",
                t.name,
                self.data_offset.saturating_add(t.offset),
                self.data_offset
                    .saturating_add(t.offset)
                    .saturating_add(len),
                self.map.len()
            ),
        }
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A tensor description by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor's data (range checked at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let len = Self::byte_len(t)?;
        let start = (self.data_offset + t.offset) as usize;
        Ok(&self.map[start..start + len as usize])
    }

    /// A tensor dequantized to f32, in row-major order of [`TensorInfo::shape`].
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        dequantize(t.ggml_type, self.tensor_bytes(t)?, t.len() as usize)
            .with_context(|| format!("{}: tensor '{}'", self.path.display(), t.name))
    }

    fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {msg}", self.path.display())
    }

    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.err(format_args!("missing metadata key '{key}'")))
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        v.as_u64().ok_or_else(|| {
            self.err(format_args!(
                "metadata '{key}' = {v:?} is not a non-negative integer"
            ))
        })
    }

    fn req_f64(&self, key: &str) -> Result<f64> {
        let v = self.req(key)?;
        v.as_f64()
            .ok_or_else(|| self.err(format_args!("metadata '{key}' = {v:?} is not a number")))
    }

    fn req_str(&self, key: &str) -> Result<&str> {
        let v = self.req(key)?;
        v.as_str()
            .ok_or_else(|| self.err(format_args!("metadata '{key}' is not a string")))
    }

    fn req_strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.req(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.err(format_args!("metadata '{key}' is not an array of strings")))
    }
}

/// Dequantizes `n` weights of type `ty` from `bytes` (exactly their blocks) to f32,
/// in parallel over blocks. Block layouts are ggml's (`ggml-common.h`):
/// Q4_0: f16 d, 16 bytes; w = d·(q − 8). Q4_1: f16 d, f16 m, 16 bytes; w = d·q + m.
/// Q8_0: f16 d, 32 int8; w = d·q. In Q4 blocks byte j holds weight j in its low
/// nibble and weight j+16 in its high nibble.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let (per_block, block_bytes) = ty
        .block()
        .ok_or_else(|| anyhow!("cannot dequantize type {}", ty.name()))?;
    if !n.is_multiple_of(per_block) || bytes.len() != n / per_block * block_bytes {
        bail!(
            "{} weights of type {} need {} bytes, got {}",
            n,
            ty.name(),
            n.div_ceil(per_block) * block_bytes,
            bytes.len()
        );
    }
    let mut out = vec![0f32; n];
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    // Blocks per rayon task: large enough that scheduling costs nothing.
    const CHUNK: usize = 1024;
    let (o, b) = (&mut out, bytes);
    match ty {
        GgmlType::F32 => o
            .par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK * 4))
            .for_each(|(o, b)| {
                for (w, x) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *w = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                }
            }),
        GgmlType::F16 => o
            .par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK * 2))
            .for_each(|(o, b)| {
                for (w, x) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *w = f16::from_le_bytes([x[0], x[1]]).to_f32();
                }
            }),
        GgmlType::Bf16 => o
            .par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK * 2))
            .for_each(|(o, b)| {
                for (w, x) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *w = bf16::from_le_bytes([x[0], x[1]]).to_f32();
                }
            }),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => o
            .par_chunks_mut(QK * CHUNK)
            .zip(b.par_chunks(block_bytes * CHUNK))
            .for_each(|(o, b)| {
                for (w, x) in o.chunks_exact_mut(QK).zip(b.chunks_exact(block_bytes)) {
                    let d = f16_at(x, 0);
                    match ty {
                        GgmlType::Q4_0 => {
                            for (j, &q) in x[2..].iter().enumerate() {
                                w[j] = d * ((q & 0x0f) as i32 - 8) as f32;
                                w[j + QK / 2] = d * ((q >> 4) as i32 - 8) as f32;
                            }
                        }
                        GgmlType::Q4_1 => {
                            let m = f16_at(x, 2);
                            for (j, &q) in x[4..].iter().enumerate() {
                                w[j] = d * (q & 0x0f) as f32 + m;
                                w[j + QK / 2] = d * (q >> 4) as f32 + m;
                            }
                        }
                        _ => {
                            for (j, &q) in x[2..].iter().enumerate() {
                                w[j] = d * (q as i8) as f32;
                            }
                        }
                    }
                }
            }),
        GgmlType::Other(_) => unreachable!("rejected by block()"),
    }
    Ok(out)
}

/// Undoes llama.cpp's permutation of Q or K projection rows. Its converter stores
/// `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)` so that each head's rotary pairs
/// are adjacent (GGML's interleaved RoPE); Hugging Face's Llama rotates the two
/// halves of each head instead. So GGUF row `h·d + 2i + j` is HF row `h·d + j·d/2 + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows.max(1)) {
        bail!("cannot un-permute {rows} rows into {n_head} heads of rotary pairs");
    }
    let cols = w.len() / rows;
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let (h, rest) = (r / d, r % d);
        let (j, i) = (rest / half, rest % half);
        let src = h * d + 2 * i + j;
        dst.copy_from_slice(&w[src * cols..(src + 1) * cols]);
    });
    Ok(out)
}

/// The Hugging Face name of a llama GGUF tensor, and the number of heads to
/// un-permute its rows with (Q: attention heads, K: key/value heads).
fn hf_name(name: &str, n_head: usize, n_kv: usize) -> Option<(String, Option<usize>)> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let fixed = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((format!("{f}.{kind}"), None));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(n_head)),
        "attn_k" => ("self_attn.k_proj", Some(n_kv)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{kind}"), heads))
}

/// The llama hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaParams {
    /// Reads the `llama.*` keys (and the vocabulary size) of a llama GGUF.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.req_str("general.architecture")?;
        if arch != "llama" {
            return Err(g.err(format_args!(
                "architecture '{arch}' is not supported (this importer writes llama only)"
            )));
        }
        let u = |k: &str| g.req_u64(&format!("llama.{k}")).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = match g.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => num_attention_heads,
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(g.err(format_args!(
                "{num_attention_heads} attention heads cannot share {num_key_value_heads} key/value heads"
            )));
        }
        let head_dim = match g.get("llama.attention.key_length") {
            Some(_) => u("attention.key_length")?,
            None => hidden_size / num_attention_heads,
        };
        let vocab_size = match g.get("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => g.req_strings("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = match g.get("llama.rope.freq_base") {
            Some(_) => g.req_f64("llama.rope.freq_base")?,
            // llama.cpp's default when the key is absent.
            None => 10_000.0,
        };
        Ok(Self {
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: g.req_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta,
            max_position_embeddings: u("context_length")?,
            vocab_size,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
        })
    }

    /// The row-major shape each HF tensor must have.
    fn expected_shape(&self, hf: &str) -> Option<Vec<usize>> {
        let (d, ff, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let last = hf.rsplit('.').nth(1)?;
        let bias = hf.ends_with(".bias");
        let shape = match last {
            "embed_tokens" | "lm_head" => vec![v, d],
            "norm" | "input_layernorm" | "post_attention_layernorm" => vec![d],
            "q_proj" => vec![q, d],
            "k_proj" | "v_proj" => vec![kv, d],
            "o_proj" => vec![d, q],
            "gate_proj" | "up_proj" => vec![ff, d],
            "down_proj" => vec![d, ff],
            _ => return None,
        };
        Some(if bias { shape[..1].to_vec() } else { shape })
    }
}

/// The special token ids the GGUF names.
fn special_ids(g: &Gguf) -> Result<BTreeMap<&'static str, u64>> {
    let mut ids = BTreeMap::new();
    for (name, key) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
    ] {
        if g.get(key).is_some() {
            ids.insert(name, g.req_u64(key)?);
        }
    }
    Ok(ids)
}

/// config.json of a `LlamaForCausalLM` (keys as transformers writes them; the rope
/// base under both the v4 and the v5 name, so either reader finds it).
pub fn llama_config(g: &Gguf, p: &LlamaParams) -> Result<Json> {
    let ids = special_ids(g)?;
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "max_position_embeddings": p.max_position_embeddings,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        // transformers 5 reads `dtype`, older releases `torch_dtype`.
        "dtype": "float32",
        "torch_dtype": "float32",
    });
    for (name, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "pad_token_id"),
    ] {
        if let Some(id) = ids.get(name) {
            c[key] = json!(id);
        }
    }
    Ok(c)
}

/// GPT-2's map from bytes to printable characters, in which byte-level BPE
/// vocabularies spell their tokens.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

/// tokenizer.json for the GGUF's byte-level BPE vocabulary (`tokenizer.ggml.model`
/// = gpt2): vocabulary and merges as the file gives them, control tokens (type 3)
/// as special added tokens and user-defined ones (type 4) as plain added tokens,
/// the ByteLevel decoder, and the pre-tokenizer the `tokenizer.ggml.pre` names.
pub fn tokenizer_json(g: &Gguf) -> Result<Json> {
    let model = g.req_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(g.err(format_args!(
            "tokenizer model '{model}' is not supported (this importer builds byte-level BPE, 'gpt2', only)"
        )));
    }
    let tokens = g.req_strings("tokenizer.ggml.tokens")?;
    let merges = g.req_strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| g.err("metadata 'tokenizer.ggml.token_type' is not an integer array"))?,
    };
    if types.len() != tokens.len() {
        return Err(g.err(format_args!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        let in_alphabet = tok.chars().all(|ch| alphabet.contains(&ch));
        // A token outside the byte alphabet cannot come out of byte-level BPE: spell
        // its UTF-8 bytes as the alphabet does (as transformers' GGUF reader does).
        let spelled = if in_alphabet {
            tok.to_owned()
        } else {
            tok.bytes().map(|b| table[b as usize]).collect()
        };
        if vocab.insert(spelled.clone(), json!(id)).is_some() {
            return Err(g.err(format_args!(
                "token {id} ({tok:?}) appears twice in the vocabulary"
            )));
        }
        // 3 = control (<|endoftext|>, <|im_start|>...), 4 = user-defined: matched
        // whole in the text, never split by BPE.
        if (ty == 3 && in_alphabet) || ty == 4 {
            added.push(json!({
                "id": id, "content": spelled, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    for m in &merges {
        if m.split(' ').count() != 2 {
            return Err(g.err(format_args!(
                "merge {m:?} is not two tokens separated by a space"
            )));
        }
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // GPT-2's split alone.
        "default" | "gpt2" | "gpt-2" => byte_level,
        // Every digit its own piece first (llama.cpp's `\p{N}` step for these), then
        // GPT-2's split: SmolLM's and StarCoder's tokenizer.json say exactly this.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        other => {
            return Err(g.err(format_args!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported (known: gpt2, smollm, starcoder, refact)"
            )))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// tokenizer_config.json, special_tokens_map.json and generation_config.json.
fn side_configs(g: &Gguf, p: &LlamaParams) -> Result<(Json, Json, Json)> {
    let tokens = g.req_strings("tokenizer.ggml.tokens")?;
    let ids = special_ids(g)?;
    let mut map = serde_json::Map::new();
    for (name, id) in &ids {
        let tok = tokens.get(*id as usize).ok_or_else(|| {
            g.err(format_args!(
                "{name} token id {id} is outside the vocabulary of {}",
                tokens.len()
            ))
        })?;
        map.insert(format!("{name}_token"), json!(tok));
    }
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        "add_eos_token": g.get("tokenizer.ggml.add_eos_token").and_then(Value::as_bool).unwrap_or(false),
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.max_position_embeddings,
    });
    for (k, v) in &map {
        tok_cfg[k] = v.clone();
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
        tok_cfg["chat_template"] = json!(t);
    }
    let mut gen = json!({});
    for (name, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "pad_token_id"),
    ] {
        if let Some(id) = ids.get(name) {
            gen[key] = json!(id);
        }
    }
    Ok((tok_cfg, Json::Object(map), gen))
}

/// A dequantized tensor ready for safetensors (f32, little-endian bytes).
struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Dequantizes and renames every tensor (un-permuting Q and K), checking each shape
/// against the config.
fn hf_tensors(g: &Gguf, p: &LlamaParams) -> Result<BTreeMap<String, F32Tensor>> {
    let mut out = BTreeMap::new();
    for t in &g.tensors {
        let (name, heads) = hf_name(&t.name, p.num_attention_heads, p.num_key_value_heads)
            .ok_or_else(|| {
                g.err(format_args!(
                    "tensor '{}' has no Hugging Face Llama name",
                    t.name
                ))
            })?;
        let shape = t.shape();
        if let Some(want) = p.expected_shape(&name) {
            if want != shape {
                return Err(g.err(format_args!(
                    "tensor '{}' has shape {shape:?} but the metadata implies {want:?}",
                    t.name
                )));
            }
        }
        if let Some(layer) = name.strip_prefix("model.layers.") {
            let n: usize = layer
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if n >= p.num_hidden_layers {
                return Err(g.err(format_args!(
                    "tensor '{}' is in layer {n} but llama.block_count is {}",
                    t.name, p.num_hidden_layers
                )));
            }
        }
        let mut w = g.dequantize(t)?;
        if let Some(h) = heads {
            w = unpermute_rows(&w, shape[0], h)
                .with_context(|| format!("{}: tensor '{}'", g.path.display(), t.name))?;
        }
        let mut bytes = vec![0u8; w.len() * 4];
        bytes
            .par_chunks_mut(4 * 4096)
            .zip(w.par_chunks(4096))
            .for_each(|(b, w)| {
                for (b, x) in b.chunks_exact_mut(4).zip(w) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
            });
        if out
            .insert(name.clone(), F32Tensor { shape, bytes })
            .is_some()
        {
            return Err(g.err(format_args!("two tensors map to '{name}'")));
        }
    }
    let expected = 2 + 9 * p.num_hidden_layers + usize::from(!p.tie_word_embeddings);
    let weights = out.keys().filter(|k| k.ends_with(".weight")).count();
    if weights != expected {
        return Err(g.err(format_args!(
            "{weights} weight tensors, but a llama of {} layers has {expected}",
            p.num_hidden_layers
        )));
    }
    Ok(out)
}

/// Writes the Hugging Face layout of the llama GGUF `g` into the (existing, empty)
/// folder `dir`.
pub fn convert(g: &Gguf, dir: &Path) -> Result<()> {
    let p = LlamaParams::from_gguf(g)?;
    let config = llama_config(g, &p)?;
    let tokenizer = tokenizer_json(g)?;
    let (tok_cfg, special_map, gen) = side_configs(g, &p)?;
    let tensors = hf_tensors(g, &p)?;
    let st = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        &Some(meta),
        &st,
    )
    .map_err(|e| anyhow!("{}: cannot write: {e:?}", st.display()))?;
    drop(tensors);
    let pretty = |v: &Json| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    write_atomic(&dir.join("config.json"), &pretty(&config))?;
    write_atomic(&dir.join("generation_config.json"), &pretty(&gen))?;
    write_atomic(&dir.join("tokenizer_config.json"), &pretty(&tok_cfg))?;
    write_atomic(&dir.join("special_tokens_map.json"), &pretty(&special_map))?;
    // Compact: the vocabulary and merges are large and nobody reads them by eye.
    write_atomic(
        &dir.join("tokenizer.json"),
        &serde_json::to_vec(&tokenizer).expect("JSON values serialize"),
    )?;
    Ok(())
}

/// Bumped whenever the conversion's output changes, so that old imports are redone.
const IMPORT_VERSION: u32 = 1;

#[derive(Serialize)]
struct ImportParams {
    layout: &'static str,
    dtype: &'static str,
    import_version: u32,
}

/// The `quark-import` stage: converts `gguf` into the Hugging Face layout at `out`,
/// content-hashed (a finished import of the same file is left alone) and atomic (a
/// crash leaves nothing under `out`). Returns `out`.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<PathBuf> {
    let params = ImportParams {
        layout: "hf-llama",
        dtype: "float32",
        import_version: IMPORT_VERSION,
    };
    let stage = Stage::new("import", &params, &[gguf])?;
    if stage.is_done(out) {
        eprintln!("quark-import: {} is up to date", out.display());
        return Ok(out.to_owned());
    }
    stage.check_replaceable(out)?;
    let started = std::time::Instant::now();
    let g = Gguf::open(gguf)?;
    let dir = AtomicDir::create(out)?;
    convert(&g, dir.dir())?;
    let path = dir.commit(stage.meta())?;
    eprintln!(
        "quark-import: {} -> {} in {:.2} s",
        gguf.display(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute, written as its converter does it, as the reference.
    fn permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
        let cols = w.len() / rows;
        let d = rows / n_head;
        let mut out = vec![0f32; w.len()];
        // out viewed as (h, i, j) with shape (n_head, d/2, 2) = w viewed as (h, j, i).
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * (d / 2) + i;
                    let dst = h * d + i * 2 + j;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, heads);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, rows, heads).unwrap(), w);
        // Head 0 of 8 rows: GGUF rows 0..8 hold HF rows 0,4,1,5,2,6,3,7.
        let order: Vec<usize> = (0..8).map(|r| p[r * cols] as usize / cols).collect();
        assert_eq!(order, [0, 4, 1, 5, 2, 6, 3, 7]);
        assert!(unpermute_rows(&w, 10, 3).is_err());
    }

    #[test]
    fn hand_worked_blocks() {
        // Q4_1: d = 0.5, m = -1, byte j = (j+16 nibble) << 4 | (j nibble).
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(((15 - j) << 4) | j);
        }
        let w = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(w[0], -1.0);
        assert_eq!(w[3], 0.5);
        assert_eq!(w[15], 6.5);
        assert_eq!(w[16], 6.5);
        assert_eq!(w[31], -1.0);
        // Q8_0: d = 0.25, q = -128, -1, 0, 1, 127, ...
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        let qs: Vec<i8> = (0..32).map(|i| [-128, -1, 0, 1, 127][i % 5]).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let w = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&w[..5], &[-32.0, -0.25, 0.0, 0.25, 31.75]);
        // A wrong byte count is an error, not a panic.
        assert!(dequantize(GgmlType::Q8_0, &b[..33], 32).is_err());
        assert!(dequantize(GgmlType::Other(12), &b, 32).is_err());
    }

    #[test]
    fn tensor_names_map_to_hf() {
        let n = |s| hf_name(s, 9, 3);
        assert_eq!(
            n("token_embd.weight").unwrap().0,
            "model.embed_tokens.weight"
        );
        assert_eq!(
            n("blk.12.attn_k.weight").unwrap(),
            ("model.layers.12.self_attn.k_proj.weight".into(), Some(3))
        );
        assert_eq!(
            n("blk.0.attn_q.weight").unwrap(),
            ("model.layers.0.self_attn.q_proj.weight".into(), Some(9))
        );
        assert_eq!(
            n("blk.3.ffn_norm.weight").unwrap().0,
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert!(n("rope_freqs.weight").is_none());
        assert!(n("blk.x.attn_q.weight").is_none());
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        let set: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(set.len(), 256);
    }
}
