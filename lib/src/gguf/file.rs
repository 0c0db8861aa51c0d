//! The GGUF file format (v2 and v3, llama.cpp's single-file model format), read
//! memory-mapped: metadata values, tensor infos and tensor data. Nothing here knows
//! what a tensor means. Format reference: ggml's `docs/gguf.md`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;

use super::dequant::{dequantize, GgmlType};

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Tensor data alignment when the file does not set `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

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

    pub(crate) fn err(&self, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: {msg}", self.path.display())
    }

    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.err(format_args!("missing metadata key '{key}'")))
    }

    pub(crate) fn req_u64(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        v.as_u64().ok_or_else(|| {
            self.err(format_args!(
                "metadata '{key}' = {v:?} is not a non-negative integer"
            ))
        })
    }

    pub(crate) fn req_f64(&self, key: &str) -> Result<f64> {
        let v = self.req(key)?;
        v.as_f64()
            .ok_or_else(|| self.err(format_args!("metadata '{key}' = {v:?} is not a number")))
    }

    pub(crate) fn req_str(&self, key: &str) -> Result<&str> {
        let v = self.req(key)?;
        v.as_str()
            .ok_or_else(|| self.err(format_args!("metadata '{key}' is not a string")))
    }

    pub(crate) fn req_strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.req(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.err(format_args!("metadata '{key}' is not an array of strings")))
    }
}
