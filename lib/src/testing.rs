//! Small fixtures for tests of this crate and of the programs: hand-made rows of
//! each table, so that every test builds its input the same way. Not for use
//! outside tests.

use crate::schema::{finish, EvalMetricsRow, FitMetricsRow, GenerationRow, ScoredRow, FIT_METRICS};
use crate::stage::{Meta, Stage};

/// A generation whose fields all derive from its identity (and vary with it).
pub fn generation(prompt_id: &str, sample_index: u32, iteration: u32) -> GenerationRow {
    let tokens: Vec<u32> = (0..3 + sample_index).map(|t| t * 7 + iteration).collect();
    GenerationRow {
        prompt_id: prompt_id.to_owned(),
        prompt: format!("prompt {prompt_id} «ünïcode» 🙂"),
        prompt_tokens: vec![1, 2, 3],
        sample_index,
        completion: format!(" completion {sample_index} of {prompt_id}"),
        token_logprobs: tokens.iter().map(|&t| -(t as f32) / 10.0).collect(),
        logprob: tokens.iter().map(|&t| -(t as f64) / 10.0).sum(),
        completion_tokens: tokens,
        finish_reason: finish::LENGTH.to_owned(),
        condition: (iteration > 0).then_some(0),
        model: "0123456789abcdef".to_owned(),
        iteration,
        seed: 42,
    }
}

/// A scored row with `reward` and one raw score per name in `extra`.
pub fn scored(
    prompt_id: &str,
    sample_index: u32,
    iteration: u32,
    reward: Option<f64>,
    extra: usize,
) -> ScoredRow {
    ScoredRow {
        generation: generation(prompt_id, sample_index, iteration),
        reward,
        scores: (0..extra)
            .map(|j| reward.map(|r| 1.0 - r + j as f64))
            .collect(),
        quantile: None,
    }
}

/// A fit-metrics row with a null in the last column.
pub fn fit_metrics(step: u64) -> FitMetricsRow {
    FitMetricsRow {
        iteration: 1,
        step,
        values: std::array::from_fn(|j| {
            (j + 1 < FIT_METRICS.len()).then_some(step as f64 + j as f64)
        }),
    }
}

/// An eval-metrics row.
pub fn eval_metrics(metric: &str, value: Option<f64>) -> EvalMetricsRow {
    EvalMetricsRow {
        task: "toxicity".to_owned(),
        model: "policy".to_owned(),
        iteration: Some(2),
        samples_per_prompt: 5,
        metric: metric.to_owned(),
        value,
        count: 10,
        ci_low: value.map(|v| v - 0.25),
        ci_high: value.map(|v| v + 0.5),
        diff: value.map(|v| v - 1.0),
        diff_low: None,
        diff_high: value.map(|v| v * 2.0),
    }
}

/// Metadata of a test stage with the given parameters.
pub fn meta(stage: &str, params: serde_json::Value) -> Meta {
    Stage::from_hashes(stage, &params, vec!["00".repeat(32)])
        .expect("test params serialize")
        .meta()
        .clone()
}

/// The project venv's Python (`$QUARK_VENV`, else `.venv` at the workspace root),
/// which carries the reference libraries (transformers, scikit-learn, DuckDB).
pub fn python() -> std::path::PathBuf {
    let venv = std::env::var_os("QUARK_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    venv.join("bin/python")
}

/// Runs `script` with the venv's Python and `args`; panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("the venv's python runs (just setup makes it)");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("python prints UTF-8")
}

/// The device the model tests run on: the CPU, or `QUARK_TEST_DEVICE` (`cpu`,
/// `cuda`) for a check on a GPU machine.
pub fn device() -> tch::Device {
    let arg = std::env::var("QUARK_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    arg.parse::<crate::model::DeviceArg>()
        .and_then(|d| d.device())
        .unwrap_or_else(|e| panic!("QUARK_TEST_DEVICE={arg}: {e:#}"))
}

/// The folder of shared evaluation data beside the checkout, if present.
pub fn shared_data() -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    p.is_dir().then_some(p)
}

/// Tiny random checkpoints (GPT-2 and Llama, made by tests/python/make_tiny.py with
/// transformers; no weights are downloaded), built once per test process.
pub fn tiny_models() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/make_tiny.py");
        let out = std::process::Command::new(python())
            .arg(&script)
            .arg(dir.path())
            .output()
            .expect("the venv's python runs (just setup makes it)");
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

/// The tied tiny Llama with 8 embedding rows past its tokenizer's ids (as models
/// padded to a round vocabulary have), made once per test process by transformers'
/// `resize_token_embeddings`.
pub fn spare_rows_model() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let src = tiny_models().join("llama-tied");
        run_python(
            r#"
import shutil, sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
m.resize_token_embeddings(m.config.vocab_size + 8)
m.save_pretrained(sys.argv[2])
shutil.copy(sys.argv[1] + "/tokenizer.json", sys.argv[2])
"#,
            &[src.as_os_str(), dir.path().as_os_str()],
        );
        dir
    })
    .path()
}
