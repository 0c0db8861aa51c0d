//! Helpers shared by the score_* tests: the repository paths, the Python of the venv
//! and the exported toxicity classifier.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use quark::schema::GenerationRow;
pub use quark::testing::python;

/// The repository root (lib/..).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lib has a parent")
        .to_owned()
}

/// ../shared/data of the repository, when present.
pub fn shared_data(name: &str) -> Option<PathBuf> {
    let p = quark::testing::shared_data()
        .map(|d| d.join(name))
        .filter(|p| p.exists());
    if p.is_none() {
        eprintln!("skipped: ../shared/data/{name} is absent");
    }
    p
}

/// Runs a Python script of the repository with arguments; panics with its stderr.
pub fn run_python(script: &Path, args: &[&Path]) {
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The exported toxicity classifier: the one `just setup` wrote under data/rewards
/// when it is up to date, else a fresh export into a temp folder (once per test binary).
pub fn toxicity_asset() -> PathBuf {
    static ASSET: OnceLock<PathBuf> = OnceLock::new();
    ASSET
        .get_or_init(|| {
            let script = repo().join("scripts").join("export_toxicity.py");
            let data = repo().join(quark::score::DEFAULT_TOXICITY_MODEL);
            let newer = |a: &Path, b: &Path| {
                let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
                matches!((m(a), m(b)), (Some(x), Some(y)) if x >= y)
            };
            if data.exists() && newer(&data, &script) {
                return data;
            }
            let dir = tempfile::tempdir().expect("temp dir").keep();
            let out = dir.join("toxicity-linear.json");
            run_python(&script, &[&out]);
            out
        })
        .clone()
}

/// A generation row with the given texts and tokens.
pub fn row(id: &str, sample: u32, prompt: &str, completion: &str, tokens: &[u32]) -> GenerationRow {
    GenerationRow {
        prompt_id: id.to_owned(),
        prompt: prompt.to_owned(),
        prompt_tokens: vec![1, 2, 3],
        sample_index: sample,
        completion: completion.to_owned(),
        completion_tokens: tokens.to_vec(),
        token_logprobs: vec![-1.0; tokens.len()],
        logprob: -(tokens.len() as f64),
        finish_reason: "length".to_owned(),
        condition: None,
        model: "test".to_owned(),
        iteration: 0,
        seed: 7,
    }
}

/// The (prompt, continuation, continuation toxicity) records of rtp-nontoxic-1200.
pub fn rtp_records(path: &Path) -> Vec<(String, String, Option<f64>)> {
    std::fs::read_to_string(path)
        .expect("readable")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["prompt"]["text"].as_str().unwrap_or_default().to_owned(),
                v["continuation"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                v["continuation"]["toxicity"].as_f64(),
            )
        })
        .collect()
}

/// The VADER lexicon folder: data/rewards/vader when `just setup` made it, else the
/// installed vaderSentiment package's own folder.
pub fn vader_dir() -> PathBuf {
    let data = repo().join(quark::score::sentiment::DEFAULT_LEXICON_DIR);
    if data.join(quark::score::sentiment::LEXICON_FILE).exists() {
        return data;
    }
    let out = Command::new(python())
        .arg(repo().join("tests/python/vader_reference.py"))
        .arg("--lexicon-dir")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
