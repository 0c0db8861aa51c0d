//! The perplexity scorer against transformers on tiny random models, and scoring a
//! scored file again keeping its earlier scorer columns side by side.

use quark::schema::{read_table, write_table, GenerationRow, ScoredRow};
use quark::score::perplexity::PerplexityScorer;
use quark::score::repetition::RepetitionScorer;
use quark::score::{score_file, Scorer};
use quark::testing;
use tch::{Device, Kind};

fn rows() -> Vec<GenerationRow> {
    let long = "many words ".repeat(60);
    let texts = [
        ("Hello world", " and all who live in it."),
        ("The capital of France is", " Paris"),
        ("", "An empty prompt starts from BOS"),
        (
            "Café «ünïcode» 🙂",
            " more text, with digits 1234 and code fn main() {}",
        ),
        ("A prompt with an empty completion", ""),
        // Longer than the tiny GPT-2's 64 positions: its start is dropped.
        (long.as_str(), " and the end."),
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, (p, c))| GenerationRow {
            prompt: p.to_string(),
            completion: c.to_string(),
            ..testing::generation(&format!("p{i}"), 0, 0)
        })
        .collect()
}

/// The DExperts evaluation's perplexity: prompt + completion encoded together, the
/// loss of the tokens past the prompt's token count; null when there are none. A
/// model with a position limit (GPT-2's n_positions) sees the prompt's last tokens
/// that fit beside the completion (and the completion's first n_positions - 1).
const REFERENCE: &str = r#"
import json, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
out = []
for p, c in json.loads(sys.argv[2]):
    if p:
        n_p = len(tok(p)["input_ids"])
        full = tok(p + c)["input_ids"]
        ids_p, ids_c = full[:n_p], full[n_p:]
    else:
        ids_p = [model.config.bos_token_id if model.config.bos_token_id is not None else model.config.eos_token_id]
        ids_c = tok(c, add_special_tokens=False)["input_ids"]
    if not ids_c:
        out.append(None)
        continue
    limit = getattr(model.config, "n_positions", None)
    if limit is not None:
        ids_c = ids_c[: limit - 1]
        ids_p = ids_p[len(ids_p) + len(ids_c) - limit :] if len(ids_p) + len(ids_c) > limit else ids_p
    ids = torch.tensor([ids_p + ids_c])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    lp = sum(logp[len(ids_p) - 1 + j, t].item() for j, t in enumerate(ids_c))
    out.append(math.exp(-lp / len(ids_c)))
print(json.dumps(out))
"#;

#[test]
fn perplexity_matches_transformers() {
    for name in ["gpt2", "llama-tied"] {
        let dir = testing::tiny_models().join(name);
        let rows = rows();
        let mut scorer = PerplexityScorer::open(&dir, Device::Cpu, Kind::Float).unwrap();
        let scores = scorer.score(&rows).unwrap();
        let pairs: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.prompt.clone(), r.completion.clone()))
            .collect();
        let out = testing::run_python(
            REFERENCE,
            &[
                dir.as_os_str(),
                std::ffi::OsStr::new(&serde_json::to_string(&pairs).unwrap()),
            ],
        );
        let expect: Vec<Option<f64>> = serde_json::from_str(&out).unwrap();
        assert_eq!(scores.len(), expect.len());
        for (s, e) in scores.iter().zip(&expect) {
            match e {
                None => assert_eq!(
                    s.reward, None,
                    "{name}: an empty completion has no perplexity"
                ),
                Some(e) => {
                    let ppl = s.raw[0].unwrap();
                    assert!(
                        (ppl - e).abs() / e < 1e-4,
                        "{name}: perplexity {ppl} vs transformers {e}"
                    );
                    assert!(
                        (s.reward.unwrap() + e.ln()).abs() < 1e-4,
                        "{name}: reward = -ln ppl"
                    );
                }
            }
        }
    }
}

#[test]
fn scoring_a_scored_file_keeps_its_columns() {
    let dir = tempfile::tempdir().unwrap();
    let generations = dir.path().join("generations.parquet");
    write_table(
        &generations,
        rows(),
        &[],
        &testing::meta("generations", serde_json::json!({})),
    )
    .unwrap();
    let mut perplexity = PerplexityScorer::open(
        &testing::tiny_models().join("gpt2"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let first = score_file(
        &generations,
        &mut perplexity,
        &dir.path().join("ppl.parquet"),
    )
    .unwrap();
    let second = score_file(
        &first,
        &mut RepetitionScorer,
        &dir.path().join("both.parquet"),
    )
    .unwrap();
    let before = read_table::<ScoredRow>(&first).unwrap();
    let after = quark::schema::TableReader::<ScoredRow>::open(&second).unwrap();
    assert_eq!(
        after.extra(),
        ["perplexity", "rep_2", "rep_3", "rep_4", "diversity"]
    );
    let after = after.read_all().unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.generation, b.generation);
        assert_eq!(a.scores[0], b.scores[0], "the perplexity column is carried");
        assert_eq!(a.reward, a.scores[4], "the reward is the new scorer's");
    }
    // Scoring again with the first scorer replaces its column instead of doubling it.
    let third = score_file(&second, &mut perplexity, &dir.path().join("again.parquet")).unwrap();
    let third = quark::schema::TableReader::<ScoredRow>::open(&third).unwrap();
    assert_eq!(
        third.extra(),
        ["rep_2", "rep_3", "rep_4", "diversity", "perplexity"]
    );
}
