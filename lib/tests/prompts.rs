//! Prompt input in every format people have, and clear errors for bad files.

use quark::prompts::{prompt_id, read_prompts};
use quark::schema::{write_table, PromptRow};
use quark::testing;

fn texts(rows: &[PromptRow]) -> Vec<&str> {
    rows.iter().map(|r| r.prompt.as_str()).collect()
}

#[test]
fn jsonl_with_prompt_text_or_text_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"prompt": {"text": "So I said", "toxicity": 0.1}, "continuation": {"text": "x"}}"#,
            "\n",
            r#"{"text": "plain", "id": 7}"#,
            "\n",
            "\n",
            r#"{"prompt": "flat", "prompt_id": "mine"}"#,
            "\n",
        ),
    )
    .unwrap();
    let rows = read_prompts(&path).unwrap();
    assert_eq!(texts(&rows), vec!["So I said", "plain", "flat"]);
    assert_eq!(rows[0].prompt_id, prompt_id("So I said"));
    assert_eq!(rows[0].prompt_id.len(), 16);
    assert_eq!(rows[1].prompt_id, "7");
    assert_eq!(rows[2].prompt_id, "mine");
}

#[test]
fn text_lines_keep_leading_spaces_and_skip_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.txt");
    std::fs::write(&path, "first line\r\n\n  indented\nlast").unwrap();
    let rows = read_prompts(&path).unwrap();
    assert_eq!(texts(&rows), vec!["first line", "  indented", "last"]);
}

#[test]
fn parquet_with_text_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.parquet");
    let rows = vec![PromptRow {
        prompt_id: "x1".into(),
        prompt: "hello".into(),
    }];
    write_table(
        &path,
        rows.clone(),
        &[],
        &testing::meta("prompts", serde_json::json!({})),
    )
    .unwrap();
    assert_eq!(read_prompts(&path).unwrap(), rows);
}

#[test]
fn empty_file_gives_no_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(&path, "").unwrap();
    assert!(read_prompts(&path).unwrap().is_empty());
}

#[test]
fn non_utf8_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.txt");
    std::fs::write(&path, b"ok\nbad \xff byte\n").unwrap();
    let err = format!("{:#}", read_prompts(&path).unwrap_err());
    assert!(err.contains("p.txt:2: not UTF-8"), "{err}");
}

#[test]
fn bad_json_and_missing_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(&path, "{\"text\": \"a\"}\n{\"other\": 1}\n").unwrap();
    let err = format!("{:#}", read_prompts(&path).unwrap_err());
    assert!(err.contains("p.jsonl:2: no `prompt.text`"), "{err}");
    let err = format!(
        "{:#}",
        read_prompts(&dir.path().join("nope.txt")).unwrap_err()
    );
    assert!(err.contains("nope.txt: cannot open"), "{err}");
}

#[test]
fn shared_rtp_prompts_read_when_present() {
    let Some(data) = testing::shared_data() else {
        eprintln!("skipped: ../shared/data is absent");
        return;
    };
    let rows = read_prompts(&data.join("rtp-nontoxic-1200.jsonl")).unwrap();
    assert_eq!(rows.len(), 1200);
    assert!(rows.iter().all(|r| !r.prompt.is_empty()));
}

#[test]
fn format_is_sniffed_without_an_extension() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("stdin-json");
    std::fs::write(&json, "\n {\"text\": \"from a pipe\"}\n").unwrap();
    assert_eq!(texts(&read_prompts(&json).unwrap()), vec!["from a pipe"]);
    let text = dir.path().join("stdin-text");
    std::fs::write(&text, "just words\n").unwrap();
    assert_eq!(texts(&read_prompts(&text).unwrap()), vec!["just words"]);
    let pq = dir.path().join("stdin-parquet");
    let rows = vec![PromptRow {
        prompt_id: "i".into(),
        prompt: "pq".into(),
    }];
    write_table(
        &pq,
        rows.clone(),
        &[],
        &testing::meta("prompts", serde_json::json!({})),
    )
    .unwrap();
    assert_eq!(read_prompts(&pq).unwrap(), rows);
}

#[test]
fn repeated_texts_get_ids_of_their_own_and_repeated_given_ids_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("dup.txt");
    std::fs::write(&text, "same\nother\nsame\nsame\nsame#1\n").unwrap();
    let rows = read_prompts(&text).unwrap();
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.prompt_id.as_str()).collect();
    assert_eq!(ids.len(), 5, "{rows:?}");
    assert_eq!(rows[0].prompt_id, quark::prompts::prompt_id("same"));
    assert_eq!(read_prompts(&text).unwrap(), rows, "stable across reads");
    let jsonl = dir.path().join("ids.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"a\", \"text\": \"y\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", read_prompts(&jsonl).unwrap_err());
    assert!(err.contains("ids.jsonl") && err.contains("`a`"), "{err}");
}

/// The sentiment task's prompts, made at set-up by scripts/prepare_prompts.py from the
/// prose packages: the first halves of sentences of 8 to 30 words that VADER rates
/// negative (as the built-in scorer rates them too), the neutral ones apart for the
/// evaluation, each split into train and held-out the same way on every run.
#[test]
fn sentiment_prompts_are_the_openings_vader_rates_negative() {
    use crate::score_util::{repo, run_python, vader_dir};
    use quark::score::sentiment::Vader;

    let dir = tempfile::tempdir().unwrap();
    let pack = |name: &str, file: &str, body: &str| pack(dir.path(), name, file, body);
    let moby = pack(
        "moby",
        "chapter_1.json",
        &serde_json::json!({"text": "The storm destroyed the ship and killed every sailor aboard it last night. \
            The captain walked to the other end of the deck with his chart. \
            What a wonderful, happy and lovely morning it was for all of us here today. It was bad."})
        .to_string(),
    );
    let sotu = pack(
        "sotu",
        "1801_jefferson.txt",
        "Our enemies brought terror, war and grief to this nation in that dark year.\n\
         We shall meet again in the chamber of this house next week.\n\
         Mr. Smith and Dr. J. Jones of St. Louis were killed in the dreadful flood here.\n",
    );
    let prepare = |out: &std::path::Path| {
        let script = repo().join("scripts/prepare_prompts.py");
        let task = std::path::Path::new("sentiment");
        run_python(&script, &[task, &moby, &sotu, out]);
    };
    let out = dir.path().join("prompts/sentiment");
    prepare(&out);
    let neutral_dir = dir.path().join("prompts/sentiment-neutral");
    let negative = both_splits(&out);
    let neutral = both_splits(&neutral_dir);
    // Sentence halves (rounded up); the positive sentence and the 3-word one are out.
    assert_eq!(
        negative,
        [
            "Our enemies brought terror, war and grief",
            "The storm destroyed the ship and killed"
        ]
    );
    assert_eq!(
        neutral,
        [
            // A sentence of 16 words: the full stops of titles and initials end none.
            "Mr. Smith and Dr. J. Jones of St.",
            "The captain walked to the other end",
            "We shall meet again in the"
        ]
    );
    let vader = Vader::load(&vader_dir()).unwrap();
    for p in &negative {
        assert!(
            vader.compound(p) <= -0.05,
            "{p}: negative to the reward's VADER"
        );
    }
    for p in &neutral {
        assert!(
            vader.compound(p).abs() < 0.05,
            "{p}: neutral to the reward's VADER"
        );
    }
    // Deterministic: a second run writes the same files.
    prepare(&dir.path().join("again/sentiment"));
    same_files(dir.path(), &["sentiment", "sentiment-neutral"]);
}

/// The repetition task's prompts: 32-word passages of the same prose that start at
/// a sentence's first word (a title's full stop ends no sentence), split into train
/// and held-out the same way on every run.
#[test]
fn repetition_prompts_start_where_sentences_start() {
    use crate::score_util::{repo, run_python};

    let dir = tempfile::tempdir().unwrap();
    let first = "Some years ago I went to sea with little money in my purse and nothing to interest me on deck.";
    let second = "There I met Mr. Smith and Dr. Jones beside the harbour wall.";
    let rest = "Nothing else mattered to me then, for the whale was near and the sky was grey above the long cold water.";
    let moby = pack(
        dir.path(),
        "moby",
        "chapter_1.json",
        &serde_json::json!({ "text": format!("{first} {second} {rest} The end came soon after that.") }).to_string(),
    );
    // Too short for a passage.
    let sotu = pack(
        dir.path(),
        "sotu",
        "1801_jefferson.txt",
        "We met. It rained.\n",
    );
    let prepare = |out: &std::path::Path| {
        let script = repo().join("scripts/prepare_prompts.py");
        let task = std::path::Path::new("repetition");
        run_python(&script, &[task, &moby, &sotu, out]);
    };
    prepare(&dir.path().join("prompts/repetition"));
    let text = [first, second, rest].join(" ");
    let words: Vec<&str> = text.split(' ').collect();
    let passage = |start: usize| words[start..start + 32].join(" ");
    // At "Some" and "There"; not at "Smith" or "Jones", behind "Mr." and "Dr." (the
    // text is long enough for both), nor at "Nothing", which leaves too few words.
    // The first is held out by its text's hash (one in six is), the second is not.
    let split = |name: &str| -> Vec<String> {
        let path = dir.path().join("prompts/repetition").join(name);
        read_prompts(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.prompt)
            .collect()
    };
    assert_eq!(split("heldout.jsonl"), [passage(0)]);
    assert_eq!(split("train.jsonl"), [passage(first.split(' ').count())]);
    prepare(&dir.path().join("again/repetition"));
    same_files(dir.path(), &["repetition"]);
}

/// A gzipped npm-style package NAME.tgz in `dir` holding package/data/FILE.
fn pack(dir: &std::path::Path, name: &str, file: &str, body: &str) -> std::path::PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("package/data")).unwrap();
    std::fs::write(root.join("package/data").join(file), body).unwrap();
    let tgz = dir.join(format!("{name}.tgz"));
    let ok = std::process::Command::new("tar")
        .arg("czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&root)
        .arg("package")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar packs {name}");
    tgz
}

/// The prompts of train.jsonl and heldout.jsonl in `d` together, sorted, after
/// checking that no prompt is in both.
fn both_splits(d: &std::path::Path) -> Vec<String> {
    let split = |name: &str| {
        read_prompts(&d.join(name))
            .unwrap()
            .into_iter()
            .map(|r| r.prompt)
            .collect::<Vec<_>>()
    };
    let (mut train, heldout) = (split("train.jsonl"), split("heldout.jsonl"));
    assert!(
        train.iter().all(|p| !heldout.contains(p)),
        "train and held-out are disjoint"
    );
    train.extend(heldout);
    train.sort();
    train
}

/// Each set's files under `dir`/prompts and `dir`/again are the same bytes.
fn same_files(dir: &std::path::Path, sets: &[&str]) {
    for set in sets {
        for name in ["train.jsonl", "heldout.jsonl"] {
            let bytes = |run: &str| std::fs::read(dir.join(run).join(set).join(name)).unwrap();
            assert_eq!(
                bytes("prompts"),
                bytes("again"),
                "{set}/{name} on a second run"
            );
        }
    }
}
