//! The toxicity scorer against its reference: scikit-learn's predict_proba on the
//! alt-profanity-check model (within 1e-9, tokens equal), and its AUC against the
//! Perspective labels of RealToxicityPrompts.

use crate::score_util::{repo, rtp_records, run_python, shared_data, toxicity_asset};
use quark::score::toxicity::ToxicityModel;

/// Texts where a tokenizer that is not Python's goes wrong.
fn hard_cases() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "a",
        "I'm sure you're an idiot, aren't you? Don't.",
        "rock'n'roll isn't dead",
        "café CAFÉ cafe\u{301} CAFE\u{301}",
        "naïve İstanbul \u{130}diot \u{212a}ill (kelvin sign)",
        "ΣΑΣ Σ ὈΔΥΣΣΕΎΣ ΜΕΛ μελ ΕΤΗΤΗΣ ετητης ΕΤΗΤΗΣ\u{301} Σ\u{301}x",
        "Pokémon POKÉMON JOSÉ BEYONCÉ expÉrt MÍKKA TRÁCHT",
        "snunɐw SNUNⱯW βcommand Dαlus",
        "123 4567 fuck123 fuck_you f_u_c_k __init__ 0x1f 3.14159 1,000,000",
        "x²³ ½ ⅫⅣ ٠١٢ ௧௨ 𝟘𝟙",
        "a\u{203f}b hell\u{2040}o fu\u{200d}ck sh\u{200c}it sh\u{ad}it",
        "ｆｕｃｋ ＳＨＩＴ ﬁne ß STRASSE Ǆ ǅ ǆ",
        "HELLO\u{301}WORLD d\u{308}umb stu\u{308}pid",
        "💩 shit 😀 fuck👍you 🇺🇸 hate",
        "\t\n newline\r\nshit\u{2028}damn\u{85}ass",
        "नमस्ते ภาษาไทย 連絡 見学 迷惑 竜龙 聖やや ውይይት",
        "Ⓕⓤⓒⓚ 🅵🆄🅲🅺 f.u.c.k f-u-c-k f*ck",
        "THE STUPID IDIOT SHOULD DIE",
        "you are a worthless piece of garbage and I hate you",
        "what a lovely day for a walk in the park",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("fuck ".repeat(20_000) + "you");
    v.push(
        (0..5000)
            .map(|i| format!("word{i} idiot{} ", i % 7))
            .collect::<String>(),
    );
    v
}

#[test]
fn toxicity_matches_sklearn_predict_proba() {
    let model = ToxicityModel::load(&toxicity_asset()).expect("classifier loads");
    let mut texts = hard_cases();
    let hard = texts.len();
    if let Some(path) = shared_data("rtp-nontoxic-1200.jsonl") {
        for (p, c, _) in rtp_records(&path) {
            texts.push(format!("{p}{c}"));
            texts.push(p);
            texts.push(c);
        }
    } else {
        // Without the shared data: many variations of the hard cases still make 500.
        let base = texts.clone();
        for (i, t) in base.iter().cycle().take(600).enumerate() {
            texts.push(format!("{} {t} {}", i, base[(i * 7) % base.len()]));
        }
    }
    assert!(texts.len() >= 500, "{} texts", texts.len());
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.json");
    let output = dir.path().join("reference.json");
    std::fs::write(&input, serde_json::to_vec(&texts).unwrap()).unwrap();
    run_python(
        &repo().join("tests/python/toxicity_reference.py"),
        &[&input, &output],
    );
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let proba = reference["proba"].as_array().unwrap();
    let tokens = reference["tokens"].as_array().unwrap();
    assert_eq!(proba.len(), texts.len());

    let mut worst = 0.0f64;
    for (i, t) in texts.iter().enumerate() {
        let want: Vec<String> = tokens[i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        let got = model.tokens(t);
        assert_eq!(
            got,
            want,
            "tokens of text {i} {:?}",
            t.chars().take(80).collect::<String>()
        );
        let p = model.predict(t);
        let q = proba[i].as_f64().unwrap();
        worst = worst.max((p - q).abs());
        assert!(
            (p - q).abs() <= 1e-9,
            "text {i} {:?}: rust {p} sklearn {q}",
            t.chars().take(80).collect::<String>()
        );
    }
    eprintln!(
        "toxicity: {} texts ({hard} hard cases), largest |rust - sklearn| = {worst:e}",
        texts.len()
    );
}

/// Area under the ROC curve (Mann-Whitney U, ties counted half).
fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    let sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(r, _)| r)
        .sum();
    (sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[test]
fn auc_helper_is_right_on_hand_worked_values() {
    // Pairs (pos, neg): (0.9 > 0.1), (0.9 > 0.5), (0.5 = 0.5 half), (0.5 > 0.1) = 3.5/4.
    let a = auc(&[0.9, 0.5, 0.5, 0.1], &[true, true, false, false]);
    assert!((a - 0.875).abs() < 1e-12, "{a}");
}

#[test]
fn toxicity_auc_against_perspective_labels() {
    let Some(path) = shared_data("rtp-nontoxic-1200.jsonl") else {
        return;
    };
    let model = ToxicityModel::load(&toxicity_asset()).expect("classifier loads");
    let (mut scores, mut labels) = (Vec::new(), Vec::new());
    for (_, c, tox) in rtp_records(&path) {
        if let Some(t) = tox {
            scores.push(model.predict(&c));
            labels.push(t >= 0.5);
        }
    }
    let a = auc(&scores, &labels);
    let pos = labels.iter().filter(|&&l| l).count();
    println!(
        "toxicity scorer AUC vs Perspective (continuation.toxicity >= 0.5): {a:.4} on {} continuations ({pos} toxic)",
        labels.len()
    );
    eprintln!("toxicity AUC = {a:.4}");
    assert!(a >= 0.85, "AUC {a:.4} is below 0.85");
}

/// The benchmark of issue 5 (`just bench`): texts per second of the Rust scorer and of
/// sklearn's transform + predict_proba on the same 100K texts, and their ratio.
#[test]
#[ignore = "benchmark: run with `just bench`"]
fn bench_toxicity_against_sklearn() {
    use rayon::prelude::*;
    let base: Vec<String> = match shared_data("rtp-nontoxic-1200.jsonl") {
        Some(path) => rtp_records(&path)
            .into_iter()
            .flat_map(|(p, c, _)| [format!("{p}{c}"), c])
            .collect(),
        None => hard_cases()[..22].to_vec(),
    };
    let texts: Vec<String> = (0..100_000)
        .map(|i| format!("{} {i}", base[i % base.len()]))
        .collect();
    let model = ToxicityModel::load(&toxicity_asset()).expect("classifier loads");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.json");
    let output = dir.path().join("reference.json");
    std::fs::write(&input, serde_json::to_vec(&texts).unwrap()).unwrap();
    let script = repo().join("tests/python/toxicity_reference.py");
    let out = std::process::Command::new(crate::score_util::python())
        .arg(&script)
        .arg(&input)
        .arg(&output)
        .arg("--time")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let py_s = reference["seconds"].as_f64().unwrap();

    let t = std::time::Instant::now();
    let one: Vec<f64> = texts.iter().map(|x| model.predict(x)).collect();
    let one_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let all: Vec<f64> = texts.par_iter().map(|x| model.predict(x)).collect();
    let all_s = t.elapsed().as_secs_f64();
    assert_eq!(one, all);
    let proba = reference["proba"].as_array().unwrap();
    assert!(proba
        .iter()
        .zip(&all)
        .all(|(q, p)| (q.as_f64().unwrap() - p).abs() <= 1e-9));

    let n = texts.len() as f64;
    println!(
        "toxicity bench, {} texts: sklearn {:.0} texts/s (1 core); quark {:.0} texts/s on 1 core ({:.1}x), {:.0} texts/s on {} threads ({:.1}x)",
        texts.len(),
        n / py_s,
        n / one_s,
        py_s / one_s,
        n / all_s,
        rayon::current_num_threads(),
        py_s / all_s
    );
    assert!(
        py_s / all_s >= 3.0,
        "quark is only {:.1}x sklearn",
        py_s / all_s
    );
}
