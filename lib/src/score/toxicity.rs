//! The `toxicity` scorer (the default): alt-profanity-check's linear classifier, a
//! scikit-learn TfidfVectorizer feeding a CalibratedClassifierCV of 5 LinearSVC folds
//! with sigmoid calibration, re-implemented so that it equals sklearn's
//! `predict_proba` to rounding. scripts/export_toxicity.py writes the model
//! (vocabulary, idf, fold coefficients) and the Unicode tables of the Python that
//! trained it into one JSON file; this module reads it.
//!
//! reward = 1 - p(toxic); the raw column `toxicity` is p(toxic).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// The raw column this scorer writes (the evaluation reads it by this name).
pub const COLUMN: &str = "toxicity";

/// The format tag the exporter writes.
pub const FORMAT: &str = "quark-toxicity-linear/1";

#[derive(Deserialize)]
struct Fold {
    coef: Vec<f64>,
    intercept: f64,
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct UnicodeFile {
    word_chars: Vec<(u32, u32)>,
    lower: Vec<(u32, String)>,
    sigma_case_ignorable: Vec<(u32, u32)>,
    sigma_cased: Vec<(u32, u32)>,
}

#[derive(Deserialize)]
struct ModelFile {
    format: String,
    lowercase: bool,
    token_pattern: String,
    norm: String,
    sublinear_tf: bool,
    stop_words: Vec<String>,
    vocabulary: Vec<String>,
    idf: Vec<f64>,
    folds: Vec<Fold>,
    unicode: UnicodeFile,
}

/// Python's `str.lower` and `re`'s `\w`, from the tables the exporter took from the
/// Python that trained the model (see scripts/export_toxicity.py for why).
struct PyUnicode {
    word: Vec<(u32, u32)>,
    lower: Vec<(u32, String)>,
    ignorable: Vec<(u32, u32)>,
    cased: Vec<(u32, u32)>,
    ascii_word: [bool; 128],
}

fn in_ranges(ranges: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    // Ranges are sorted and disjoint: the last range starting at or before c.
    let i = ranges.partition_point(|&(lo, _)| lo <= c);
    i > 0 && c <= ranges[i - 1].1
}

const CAPITAL_SIGMA: char = '\u{3a3}';

impl PyUnicode {
    fn new(u: UnicodeFile) -> Result<Self> {
        let sorted = |r: &[(u32, u32)]| r.windows(2).all(|w| w[0].1 < w[1].0);
        if !sorted(&u.word_chars) || !sorted(&u.sigma_case_ignorable) || !sorted(&u.sigma_cased) {
            bail!("Unicode ranges are not sorted");
        }
        if !u.lower.windows(2).all(|w| w[0].0 < w[1].0) {
            bail!("the lowercase table is not sorted");
        }
        let mut ascii_word = [false; 128];
        for (c, w) in ascii_word.iter_mut().enumerate() {
            *w = in_ranges(&u.word_chars, char::from(c as u8));
        }
        Ok(Self {
            word: u.word_chars,
            lower: u.lower,
            ignorable: u.sigma_case_ignorable,
            cased: u.sigma_cased,
            ascii_word,
        })
    }

    fn is_word(&self, c: char) -> bool {
        if c.is_ascii() {
            self.ascii_word[c as usize]
        } else {
            in_ranges(&self.word, c)
        }
    }

    /// Python's lowercase of `c` (not U+03A3, which depends on its context).
    fn lower(&self, c: char) -> Option<&str> {
        let cp = c as u32;
        self.lower
            .binary_search_by_key(&cp, |(k, _)| *k)
            .ok()
            .map(|i| self.lower[i].1.as_str())
    }

    /// Whether the capital sigma at byte `i` of `text` lowercases to the final form,
    /// as CPython's `handle_capital_sigma`: preceded by a cased letter (skipping
    /// case-ignorable ones) and not followed by one.
    fn final_sigma(&self, text: &str, i: usize) -> bool {
        let next_stop = |mut it: Box<dyn Iterator<Item = char> + '_>| {
            it.find(|&c| !in_ranges(&self.ignorable, c))
        };
        let before = next_stop(Box::new(text[..i].chars().rev()));
        if !before.is_some_and(|c| in_ranges(&self.cased, c)) {
            return false;
        }
        let after = next_stop(Box::new(text[i + CAPITAL_SIGMA.len_utf8()..].chars()));
        !after.is_some_and(|c| in_ranges(&self.cased, c))
    }
}

/// The classifier: TF-IDF features and the calibrated folds.
pub struct ToxicityModel {
    vocab: HashMap<String, u32>,
    stop_words: HashSet<String>,
    idf: Vec<f64>,
    /// Fold coefficients, feature-major: `coef[j * folds + k]`.
    coef: Vec<f64>,
    intercept: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    unicode: PyUnicode,
}

impl ToxicityModel {
    /// Loads the file scripts/export_toxicity.py wrote.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "{}: cannot read the toxicity classifier (`just setup` exports it with scripts/assets/20-toxicity.sh)",
                path.display()
            )
        })?;
        let file: ModelFile = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a toxicity classifier file", path.display()))?;
        Self::from_file(file).with_context(|| format!("{}: invalid classifier", path.display()))
    }

    fn from_file(f: ModelFile) -> Result<Self> {
        if f.format != FORMAT {
            bail!("format `{}`, expected `{FORMAT}`", f.format);
        }
        if !f.lowercase || f.token_pattern != r"(?u)\b\w\w+\b" || f.norm != "l2" || f.sublinear_tf {
            bail!(
                "unsupported vectorizer settings (lowercase {}, token pattern {}, norm {}, sublinear_tf {})",
                f.lowercase,
                f.token_pattern,
                f.norm,
                f.sublinear_tf
            );
        }
        let n = f.vocabulary.len();
        if f.idf.len() != n || f.folds.is_empty() || f.folds.iter().any(|k| k.coef.len() != n) {
            bail!("vocabulary, idf and coefficients differ in length");
        }
        // sklearn drops stop words before the vocabulary lookup; a stop word in the
        // vocabulary could never be counted, so leaving it out of the map is the same.
        let stop: HashSet<&str> = f.stop_words.iter().map(String::as_str).collect();
        let mut vocab = HashMap::with_capacity(n);
        for (j, w) in f.vocabulary.iter().enumerate() {
            if !stop.contains(w.as_str()) && vocab.insert(w.clone(), j as u32).is_some() {
                bail!("`{w}` appears twice in the vocabulary");
            }
        }
        let k = f.folds.len();
        let mut coef = vec![0.0; n * k];
        for (fi, fold) in f.folds.iter().enumerate() {
            for (j, c) in fold.coef.iter().enumerate() {
                coef[j * k + fi] = *c;
            }
        }
        let stop_words = f.stop_words.iter().cloned().collect();
        Ok(Self {
            vocab,
            stop_words,
            idf: f.idf,
            coef,
            intercept: f.folds.iter().map(|x| x.intercept).collect(),
            a: f.folds.iter().map(|x| x.a).collect(),
            b: f.folds.iter().map(|x| x.b).collect(),
            unicode: PyUnicode::new(f.unicode)?,
        })
    }

    /// Calls `emit` with each token of `text` as sklearn's analyzer sees it (after
    /// lowercasing; stop words not yet removed). `(?u)\b\w\w+\b` matches exactly the
    /// maximal runs of two or more word characters of the lowercased text.
    fn for_each_token(&self, text: &str, mut emit: impl FnMut(&str)) {
        let u = &self.unicode;
        let mut buf = String::new();
        let mut run = 0usize;
        let mut push = |c: char, buf: &mut String, run: &mut usize| {
            if u.is_word(c) {
                buf.push(c);
                *run += 1;
            } else {
                if *run >= 2 {
                    emit(buf);
                }
                buf.clear();
                *run = 0;
            }
        };
        for (i, c) in text.char_indices() {
            if c.is_ascii() {
                push(c.to_ascii_lowercase(), &mut buf, &mut run);
            } else if c == CAPITAL_SIGMA {
                let s = if u.final_sigma(text, i) {
                    '\u{3c2}'
                } else {
                    '\u{3c3}'
                };
                push(s, &mut buf, &mut run);
            } else if let Some(low) = u.lower(c) {
                for l in low.chars() {
                    push(l, &mut buf, &mut run);
                }
            } else {
                push(c, &mut buf, &mut run);
            }
        }
        if run >= 2 {
            emit(&buf);
        }
    }

    /// The tokens of `text` as sklearn's analyzer returns them (stop words removed),
    /// for tests and debugging.
    pub fn tokens(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each_token(text, |t| {
            if !self.stop_words.contains(t) {
                out.push(t.to_owned());
            }
        });
        out
    }

    /// p(toxic) of `text`: the mean over folds of 1 / (1 + exp(a·f + b)), where f is
    /// the fold's decision value on the l2-normalised TF-IDF vector.
    pub fn predict(&self, text: &str) -> f64 {
        let mut feats: Vec<u32> = Vec::new();
        self.for_each_token(text, |t| {
            if let Some(&j) = self.vocab.get(t) {
                feats.push(j);
            }
        });
        feats.sort_unstable();
        // (feature, tf * idf) in feature order, as sklearn's sorted CSR row.
        let mut weights: Vec<(usize, f64)> = Vec::new();
        for j in feats {
            let j = j as usize;
            match weights.last_mut() {
                Some((last, w)) if *last == j => *w += self.idf[j],
                _ => weights.push((j, self.idf[j])),
            }
        }
        let norm = weights.iter().map(|(_, w)| w * w).sum::<f64>().sqrt();
        let k = self.intercept.len();
        let mut decision = vec![0.0; k];
        if norm > 0.0 {
            for &(j, w) in &weights {
                let x = w / norm;
                for (d, c) in decision.iter_mut().zip(&self.coef[j * k..(j + 1) * k]) {
                    *d += x * c;
                }
            }
        }
        let mut p = 0.0;
        for (f, d) in decision.iter().enumerate() {
            let t = d + self.intercept[f];
            p += 1.0 / (1.0 + (self.a[f] * t + self.b[f]).exp());
        }
        p / k as f64
    }
}

/// The `toxicity` scorer over a loaded [`ToxicityModel`].
pub struct ToxicityScorer {
    model: ToxicityModel,
    path: PathBuf,
}

impl ToxicityScorer {
    /// Loads the classifier exported to `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            model: ToxicityModel::load(path)?,
            path: path.to_owned(),
        })
    }

    /// The loaded classifier.
    pub fn model(&self) -> &ToxicityModel {
        &self.model
    }
}

impl Scorer for ToxicityScorer {
    fn name(&self) -> &'static str {
        "toxicity"
    }
    fn columns(&self) -> Vec<String> {
        vec![COLUMN.to_owned()]
    }
    fn params(&self) -> Value {
        // The classifier's content is in the key through `assets`; its path is not.
        json!({})
    }
    fn assets(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        Ok(rows
            .par_iter()
            .map(|r| {
                let p = self.model.predict(&r.completion);
                Score::new(1.0 - p, vec![p])
            })
            .collect())
    }
}
