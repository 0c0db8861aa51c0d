//! Dequantization of ggml's tensor types to f32: F32, F16, BF16 and the block
//! quantizations Q4_0, Q4_1 and Q8_0 (blocks of [`QK`] weights with f16 scales).

use anyhow::{anyhow, bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

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

/// Weights per block of the block-quantized types read here.
pub const QK: usize = 32;

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
