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
