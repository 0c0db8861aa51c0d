//! The `sentiment` scorer: VADER (Hutto & Gilbert, ICWSM 2014), a line-by-line port
//! of PyPI vaderSentiment 3.3.2's `polarity_scores` (its compound score, unrounded),
//! over that package's own lexicons, which `just setup` copies to data/rewards/vader/
//! (scripts/assets/21-vader.sh). The Rust crate `vader_sentiment` was not used: its
//! lexicon is older and its rules differ (punctuation on neutral text, the emoticon
//! length test), up to 1.0 apart in compound on RealToxicityPrompts texts.
//!
//! The raw column `sentiment` is the compound score mapped from [-1, 1] to [0, 1] as
//! (compound + 1) / 2 (1 = most positive); the reward is that value for
//! `--target positive` and 1 minus it for `--target negative`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// The raw column this scorer writes (the evaluation reads it by this name).
pub const COLUMN: &str = "sentiment";

/// The lexicon file names inside the lexicon folder (as vaderSentiment ships them).
pub const LEXICON_FILE: &str = "vader_lexicon.txt";
pub const EMOJI_FILE: &str = "emoji_utf8_lexicon.txt";

/// Where `just setup` puts the lexicons, relative to the project root.
pub const DEFAULT_LEXICON_DIR: &str = "data/rewards/vader";

// Empirically derived constants of VADER.
const B_INCR: f64 = 0.293;
const B_DECR: f64 = -0.293;
const C_INCR: f64 = 0.733;
const N_SCALAR: f64 = -0.74;

const NEGATE: &[&str] = &[
    "aint",
    "arent",
    "cannot",
    "cant",
    "couldnt",
    "darent",
    "didnt",
    "doesnt",
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "dont",
    "hadnt",
    "hasnt",
    "havent",
    "isnt",
    "mightnt",
    "mustnt",
    "neither",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "neednt",
    "needn't",
    "never",
    "none",
    "nope",
    "nor",
    "not",
    "nothing",
    "nowhere",
    "oughtnt",
    "shant",
    "shouldnt",
    "uhuh",
    "wasnt",
    "werent",
    "oughtn't",
    "shan't",
    "shouldn't",
    "uh-uh",
    "wasn't",
    "weren't",
    "without",
    "wont",
    "wouldnt",
    "won't",
    "wouldn't",
    "rarely",
    "seldom",
    "despite",
];

const BOOSTER_INCR: &[&str] = &[
    "absolutely",
    "amazingly",
    "awfully",
    "completely",
    "considerable",
    "considerably",
    "decidedly",
    "deeply",
    "effing",
    "enormous",
    "enormously",
    "entirely",
    "especially",
    "exceptional",
    "exceptionally",
    "extreme",
    "extremely",
    "fabulously",
    "flipping",
    "flippin",
    "frackin",
    "fracking",
    "fricking",
    "frickin",
    "frigging",
    "friggin",
    "fully",
    "fuckin",
    "fucking",
    "fuggin",
    "fugging",
    "greatly",
    "hella",
    "highly",
    "hugely",
    "incredible",
    "incredibly",
    "intensely",
    "major",
    "majorly",
    "more",
    "most",
    "particularly",
    "purely",
    "quite",
    "really",
    "remarkably",
    "so",
    "substantially",
    "thoroughly",
    "total",
    "totally",
    "tremendous",
    "tremendously",
    "uber",
    "unbelievably",
    "unusually",
    "utter",
    "utterly",
    "very",
];

const BOOSTER_DECR: &[&str] = &[
    "almost",
    "barely",
    "hardly",
    "just enough",
    "kind of",
    "kinda",
    "kindof",
    "kind-of",
    "less",
    "little",
    "marginal",
    "marginally",
    "occasional",
    "occasionally",
    "partly",
    "scarce",
    "scarcely",
    "slight",
    "slightly",
    "somewhat",
    "sort of",
    "sorta",
    "sortof",
    "sort-of",
];

const SPECIAL_CASES: [(&str, f64); 9] = [
    ("the shit", 3.0),
    ("the bomb", 3.0),
    ("bad ass", 1.5),
    ("badass", 1.5),
    ("bus stop", 0.0),
    ("yeah right", -2.0),
    ("kiss of death", -1.5),
    ("to die for", 3.0),
    ("beating heart", 3.5),
];

fn booster(word: &str) -> Option<f64> {
    if BOOSTER_INCR.contains(&word) {
        Some(B_INCR)
    } else if BOOSTER_DECR.contains(&word) {
        Some(B_DECR)
    } else {
        None
    }
}

fn special_case(seq: &str) -> Option<f64> {
    SPECIAL_CASES
        .iter()
        .find(|(k, _)| *k == seq)
        .map(|(_, v)| *v)
}

/// Python's `str.isspace` (Rust's White_Space plus the ASCII information separators).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Titlecase letters (category Lt), which make Python's `isupper` false.
fn titlecase(c: char) -> bool {
    matches!(
        c,
        '\u{1c5}' | '\u{1c8}' | '\u{1cb}' | '\u{1f2}' | '\u{1fbc}' | '\u{1fcc}' | '\u{1ffc}'
    ) || ('\u{1f88}'..='\u{1f8f}').contains(&c)
        || ('\u{1f98}'..='\u{1f9f}').contains(&c)
        || ('\u{1fa8}'..='\u{1faf}').contains(&c)
}

/// Python's `str.isupper`: at least one uppercase letter and no lower/titlecase one.
fn py_isupper(s: &str) -> bool {
    let mut upper = false;
    for c in s.chars() {
        if c.is_lowercase() || titlecase(c) {
            return false;
        }
        upper |= c.is_uppercase();
    }
    upper
}

/// `token.strip(string.punctuation)`, kept only when more than two characters remain
/// (shorter ones are likely emoticons such as ":)").
fn strip_punc_if_word(token: &str) -> &str {
    let stripped = token.trim_matches(|c: char| c.is_ascii_punctuation());
    if stripped.chars().count() <= 2 {
        token
    } else {
        stripped
    }
}

fn negated(word: &str) -> bool {
    NEGATE.contains(&word) || word.contains("n't")
}

fn normalize(score: f64) -> f64 {
    let n = score / (score * score + 15.0).sqrt();
    n.clamp(-1.0, 1.0)
}

/// The VADER analyzer over a loaded lexicon.
pub struct Vader {
    lexicon: HashMap<String, f64>,
    emojis: HashMap<char, String>,
}

impl Vader {
    /// Loads `vader_lexicon.txt` and `emoji_utf8_lexicon.txt` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "{}: cannot read the VADER lexicon (`just setup` copies it with scripts/assets/21-vader.sh)",
                    p.display()
                )
            })
        };
        let mut lexicon = HashMap::new();
        for line in read(LEXICON_FILE)?.trim_end_matches('\n').split('\n') {
            if line.is_empty() {
                continue;
            }
            let mut f = line.trim_matches(py_space).split('\t');
            let (Some(word), Some(measure)) = (f.next(), f.next()) else {
                bail!("{}: bad line {line:?}", dir.join(LEXICON_FILE).display());
            };
            let v: f64 = measure.trim().parse().with_context(|| {
                format!(
                    "{}: bad valence in {line:?}",
                    dir.join(LEXICON_FILE).display()
                )
            })?;
            lexicon.insert(word.to_owned(), v);
        }
        let mut emojis = HashMap::new();
        for line in read(EMOJI_FILE)?.trim_end_matches('\n').split('\n') {
            let mut f = line.trim_matches(py_space).split('\t');
            let (Some(emoji), Some(desc)) = (f.next(), f.next()) else {
                bail!("{}: bad line {line:?}", dir.join(EMOJI_FILE).display());
            };
            // Python looks emojis up one code point at a time, so only single-character
            // entries can ever match.
            let mut cs = emoji.chars();
            if let (Some(c), None) = (cs.next(), cs.next()) {
                emojis.insert(c, desc.to_owned());
            }
        }
        Ok(Self { lexicon, emojis })
    }

    fn in_lexicon(&self, word: &str) -> bool {
        self.lexicon.contains_key(word)
    }

    /// VADER's compound score of `text` in [-1, 1] (not rounded to 4 decimals as
    /// Python's `polarity_scores` prints it).
    pub fn compound(&self, text: &str) -> f64 {
        let mut no_emoji = String::with_capacity(text.len());
        let mut prev_space = true;
        for c in text.chars() {
            if let Some(desc) = self.emojis.get(&c) {
                if !prev_space {
                    no_emoji.push(' ');
                }
                no_emoji.push_str(desc);
                prev_space = false;
            } else {
                no_emoji.push(c);
                prev_space = c == ' ';
            }
        }
        let text = no_emoji.trim_matches(py_space);
        let words: Vec<&str> = text
            .split(py_space)
            .filter(|w| !w.is_empty())
            .map(strip_punc_if_word)
            .collect();
        let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
        let all_caps = words.iter().filter(|w| py_isupper(w)).count();
        let cap_diff = all_caps > 0 && all_caps < words.len();

        let mut sentiments = Vec::with_capacity(words.len());
        for i in 0..words.len() {
            if booster(&lower[i]).is_some()
                || (i + 1 < words.len() && lower[i] == "kind" && lower[i + 1] == "of")
            {
                sentiments.push(0.0);
                continue;
            }
            sentiments.push(self.valence(&words, &lower, cap_diff, i));
        }
        but_check(&lower, &mut sentiments);
        if sentiments.is_empty() {
            return 0.0;
        }
        let mut sum: f64 = sentiments.iter().sum();
        let punct = punctuation_emphasis(text);
        if sum > 0.0 {
            sum += punct;
        } else if sum < 0.0 {
            sum -= punct;
        }
        normalize(sum)
    }

    fn valence(&self, words: &[&str], lower: &[String], cap_diff: bool, i: usize) -> f64 {
        let item = lower[i].as_str();
        let Some(&base) = self.lexicon.get(item) else {
            return 0.0;
        };
        let mut valence = base;
        if item == "no" && i != words.len() - 1 && self.in_lexicon(&lower[i + 1]) {
            valence = 0.0;
        }
        if (i > 0 && lower[i - 1] == "no")
            || (i > 1 && lower[i - 2] == "no")
            || (i > 2 && lower[i - 3] == "no" && (lower[i - 1] == "or" || lower[i - 1] == "nor"))
        {
            valence = base * N_SCALAR;
        }
        if py_isupper(words[i]) && cap_diff {
            if valence > 0.0 {
                valence += C_INCR;
            } else {
                valence -= C_INCR;
            }
        }
        for start in 0..3 {
            if i > start && !self.in_lexicon(&lower[i - (start + 1)]) {
                let mut s = scalar_inc_dec(
                    words[i - (start + 1)],
                    &lower[i - (start + 1)],
                    valence,
                    cap_diff,
                );
                if start == 1 && s != 0.0 {
                    s *= 0.95;
                }
                if start == 2 && s != 0.0 {
                    s *= 0.9;
                }
                valence += s;
                valence = negation_check(valence, lower, start, i);
                if start == 2 {
                    valence = special_idioms_check(valence, lower, i);
                }
            }
        }
        self.least_check(valence, lower, i)
    }

    fn least_check(&self, valence: f64, lower: &[String], i: usize) -> f64 {
        if i > 1 && !self.in_lexicon(&lower[i - 1]) && lower[i - 1] == "least" {
            if lower[i - 2] != "at" && lower[i - 2] != "very" {
                return valence * N_SCALAR;
            }
        } else if i > 0 && !self.in_lexicon(&lower[i - 1]) && lower[i - 1] == "least" {
            return valence * N_SCALAR;
        }
        valence
    }
}

fn scalar_inc_dec(word: &str, word_lower: &str, valence: f64, cap_diff: bool) -> f64 {
    let Some(mut scalar) = booster(word_lower) else {
        return 0.0;
    };
    if valence < 0.0 {
        scalar = -scalar;
    }
    if py_isupper(word) && cap_diff {
        if valence > 0.0 {
            scalar += C_INCR;
        } else {
            scalar -= C_INCR;
        }
    }
    scalar
}

fn negation_check(valence: f64, w: &[String], start: usize, i: usize) -> f64 {
    match start {
        0 if negated(&w[i - 1]) => valence * N_SCALAR,
        1 => {
            if w[i - 2] == "never" && (w[i - 1] == "so" || w[i - 1] == "this") {
                valence * 1.25
            } else if w[i - 2] == "without" && w[i - 1] == "doubt" {
                valence
            } else if negated(&w[i - 2]) {
                valence * N_SCALAR
            } else {
                valence
            }
        }
        2 => {
            // Python's precedence: (a and (b or c)) or (d or e).
            if (w[i - 3] == "never" && (w[i - 2] == "so" || w[i - 2] == "this"))
                || (w[i - 1] == "so" || w[i - 1] == "this")
            {
                valence * 1.25
            } else if w[i - 3] == "without" && (w[i - 2] == "doubt" || w[i - 1] == "doubt") {
                valence
            } else if negated(&w[i - 3]) {
                valence * N_SCALAR
            } else {
                valence
            }
        }
        _ => valence,
    }
}

fn special_idioms_check(mut valence: f64, w: &[String], i: usize) -> f64 {
    let onezero = format!("{} {}", w[i - 1], w[i]);
    let twoonezero = format!("{} {} {}", w[i - 2], w[i - 1], w[i]);
    let twoone = format!("{} {}", w[i - 2], w[i - 1]);
    let threetwoone = format!("{} {} {}", w[i - 3], w[i - 2], w[i - 1]);
    let threetwo = format!("{} {}", w[i - 3], w[i - 2]);
    for seq in [&onezero, &twoonezero, &twoone, &threetwoone, &threetwo] {
        if let Some(v) = special_case(seq) {
            valence = v;
            break;
        }
    }
    if w.len() - 1 > i {
        if let Some(v) = special_case(&format!("{} {}", w[i], w[i + 1])) {
            valence = v;
        }
    }
    if w.len() - 1 > i + 1 {
        if let Some(v) = special_case(&format!("{} {} {}", w[i], w[i + 1], w[i + 2])) {
            valence = v;
        }
    }
    for n_gram in [&threetwoone, &threetwo, &twoone] {
        if let Some(b) = booster(n_gram) {
            valence += b;
        }
    }
    valence
}

/// vaderSentiment's `_but_check`, quirks included: each sentiment is looked up by
/// value (Python's `list.index`), so the first equal one is the one scaled.
fn but_check(lower: &[String], sentiments: &mut [f64]) {
    let Some(bi) = lower.iter().position(|w| w == "but") else {
        return;
    };
    for k in 0..sentiments.len() {
        let s = sentiments[k];
        let si = sentiments.iter().position(|&x| x == s).unwrap_or(k);
        if si < bi {
            sentiments[si] = s * 0.5;
        } else if si > bi {
            sentiments[si] = s * 1.5;
        }
    }
}

fn punctuation_emphasis(text: &str) -> f64 {
    let ep = text.matches('!').count().min(4) as f64 * 0.292;
    let qm = match text.matches('?').count() {
        0 | 1 => 0.0,
        n @ 2..=3 => n as f64 * 0.18,
        _ => 0.96,
    };
    ep + qm
}

/// Which sentiment the reward favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Positive,
    Negative,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Positive => "positive",
            Target::Negative => "negative",
        }
    }
}

/// The VADER sentiment scorer.
pub struct SentimentScorer {
    vader: Vader,
    dir: PathBuf,
    target: Target,
}

impl SentimentScorer {
    /// A scorer over the lexicons in `dir` whose reward favours `target`.
    pub fn open(dir: &Path, target: Target) -> Result<Self> {
        Ok(Self {
            vader: Vader::load(dir)?,
            dir: dir.to_owned(),
            target,
        })
    }

    /// The loaded analyzer.
    pub fn vader(&self) -> &Vader {
        &self.vader
    }
}

impl Scorer for SentimentScorer {
    fn name(&self) -> &'static str {
        "sentiment"
    }
    fn columns(&self) -> Vec<String> {
        vec![COLUMN.to_owned()]
    }
    fn params(&self) -> Value {
        json!({ "target": self.target.as_str() })
    }
    fn assets(&self) -> Vec<PathBuf> {
        vec![self.dir.join(LEXICON_FILE), self.dir.join(EMOJI_FILE)]
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        Ok(rows
            .par_iter()
            .map(|r| {
                let s = (self.vader.compound(&r.completion) + 1.0) / 2.0;
                let reward = match self.target {
                    Target::Positive => s,
                    Target::Negative => 1.0 - s,
                };
                Score::new(reward, vec![s])
            })
            .collect())
    }
}
