//! The pool as training data: its rows checked against the models before the first
//! step, and the order in which steps draw them (seeded epochs that a later fit
//! continues).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::loss::TrainRow;
use crate::model::{ControlTokens, Model};
use crate::schema::{meta_key, read_metadata, ScoredRow};

/// The order in which pool rows are visited: epoch e is a permutation of the pool
/// seeded by (seed, e, pool size); position n is row n % len of epoch n / len. A
/// later fit continues at the position the last one reached.
fn permutation(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut h = blake3::Hasher::new_derive_key("quark-rs fit order 1");
    h.update(&seed.to_le_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(len as u64).to_le_bytes());
    let mut xof = h.finalize_xof();
    let mut perm: Vec<usize> = (0..len).collect();
    // Fisher-Yates with unbiased draws (rejection on the 64-bit range).
    for i in (1..len).rev() {
        let bound = (i + 1) as u64;
        let zone = u64::MAX - u64::MAX % bound;
        let j = loop {
            let mut b = [0u8; 8];
            xof.fill(&mut b);
            let x = u64::from_le_bytes(b);
            if x < zone {
                break (x % bound) as usize;
            }
        };
        perm.swap(i, j);
    }
    perm
}

/// The indices (into the `len` trained rows) of the step that starts at position
/// `start` of the run: the order quark-fit visits them in, for callers that replay
/// it (the benchmarks).
pub fn batch_indices(len: usize, seed: u64, start: u64, n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(n);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for pos in start..start + n as u64 {
        let epoch = pos / len as u64;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, permutation(seed, epoch, len)));
        }
        let perm = &cached.as_ref().expect("set above").1;
        out.push(perm[(pos % len as u64) as usize]);
    }
    out
}

/// The rows of the step that starts at position `start` of the run.
pub(crate) fn batch_rows(rows: &[TrainRow], seed: u64, start: u64, n: usize) -> Vec<TrainRow> {
    batch_indices(rows.len(), seed, start, n)
        .into_iter()
        .map(|i| rows[i].clone())
        .collect()
}

/// The identity of a pool row in messages: its row number and (prompt_id,
/// sample_index, iteration).
fn row_name(i: usize, r: &ScoredRow) -> String {
    let g = &r.generation;
    format!(
        "row {i} (prompt_id {}, sample_index {}, iteration {})",
        g.prompt_id, g.sample_index, g.iteration
    )
}

/// Every row's quantile is one of the pool's K, and every trained row has a prompt
/// (the reference predicts the first completion token from it).
pub(crate) fn check_quantiles(pool: &Path, rows: &[ScoredRow], k: u32) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        match r.quantile {
            Some(q) if q >= k => bail!(
                "{}: {} has quantile {q}, but the pool has {k} quantiles (0..{})",
                pool.display(),
                row_name(i, r),
                k - 1
            ),
            Some(_) if r.generation.prompt_tokens.is_empty() => bail!(
                "{}: {} has no prompt tokens: the reference would have nothing to predict its first token from",
                pool.display(),
                row_name(i, r)
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Every token id of the trained rows is in the reference's vocabulary (the policy
/// has those ids and its control tokens) and is not one of the policy's control
/// tokens (which sit inside that vocabulary when the embedding's spare rows became
/// them), and every row, with its control token, fits the policy's positions:
/// checked for all rows before the first step, so that no bad row waits for its
/// batch.
pub(crate) fn check_tokens(
    pool: &Path,
    rows: &[ScoredRow],
    reference: &Model,
    control: ControlTokens,
    positions: Option<usize>,
) -> Result<()> {
    let vocab = reference.vocab_size();
    for (i, r) in rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.quantile.is_some())
    {
        let g = &r.generation;
        for (column, tokens) in [
            ("prompt_tokens", &g.prompt_tokens),
            ("completion_tokens", &g.completion_tokens),
        ] {
            if let Some((t, why)) = token_problem(tokens, vocab, control) {
                bail!(
                    "{}: {} has token id {t} in `{column}`, {why}",
                    pool.display(),
                    row_name(i, r)
                );
            }
        }
        let len = 1 + g.prompt_tokens.len() + g.completion_tokens.len();
        if let Some(limit) = positions.filter(|&l| len > l) {
            bail!(
                "{}: {} has {len} tokens with its control token, more than the policy's {limit} positions",
                pool.display(),
                row_name(i, r)
            );
        }
    }
    Ok(())
}

/// The first token id that training cannot take, and why: one past the
/// reference's `vocab`, or one of the `control` tokens. A control token inside the
/// vocabulary is a spare embedding row that a sampler drew before it became
/// `<|quark:q|>`; as a target it would name another token's logit.
fn token_problem(tokens: &[u32], vocab: i64, control: ControlTokens) -> Option<(i64, String)> {
    tokens.iter().map(|&t| i64::from(t)).find_map(|t| {
        let why = if t >= vocab {
            format!("outside the model's vocabulary of {vocab} ids (a pool sampled from another model?)")
        } else if control.ids().contains(&t) {
            format!(
                "the policy's control token <|quark:{}|> (a spare embedding row, drawn before it became one)",
                t - control.first_id
            )
        } else {
            return None;
        };
        Some((t, why))
    })
}

/// K: the number of quantiles the pool was cut into (from its parameters).
pub(crate) fn pool_quantiles(pool: &Path) -> Result<u32> {
    let meta = read_metadata(pool)
        .with_context(|| format!("{}: not a readable Parquet file", pool.display()))?;
    let params: serde_json::Value = meta
        .get(meta_key::PARAMS)
        .and_then(|p| serde_json::from_str(p).ok())
        .with_context(|| {
            format!(
                "{}: no quark.params metadata (not a quark-bin pool?)",
                pool.display()
            )
        })?;
    let k = params["quantiles"]
        .as_u64()
        .with_context(|| format!("{}: quark.params has no `quantiles`", pool.display()))?;
    let max = crate::check::MAX_QUANTILES;
    if k == 0 || k > u64::from(max) {
        bail!(
            "{}: the pool records {k} quantiles; quark-fit takes 1 to {max}",
            pool.display()
        );
    }
    Ok(k as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_past_the_vocabulary_or_on_a_control_token_are_named() {
        // Control tokens past the vocabulary of 10: only ids of 10 and up are refused.
        let past = ControlTokens { k: 2, first_id: 10 };
        assert_eq!(token_problem(&[0, 9, 3], 10, past), None);
        let (t, why) = token_problem(&[4, 12, 10], 10, past).unwrap();
        assert_eq!(t, 12);
        assert!(
            why.starts_with("outside the model's vocabulary of 10 ids"),
            "{why}"
        );
        // Control tokens on spare rows 6 and 7 of a vocabulary of 10: 5, 8 and 9
        // are ordinary ids, 7 is <|quark:1|>.
        let spare = ControlTokens { k: 2, first_id: 6 };
        assert_eq!(token_problem(&[5, 8, 9], 10, spare), None);
        let (t, why) = token_problem(&[5, 7, 6], 10, spare).unwrap();
        assert_eq!(t, 7);
        assert!(
            why.starts_with("the policy's control token <|quark:1|>"),
            "{why}"
        );
    }
}
