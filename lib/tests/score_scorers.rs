//! The scorers other than toxicity's parity, and score_file end to end: hand-worked
//! repetition and sentiment values, the command scorer's protocol and failures, the
//! perspective scorer against a flaky loopback server, and the scored file (columns,
//! content-hash skip, errors on non-finite rewards).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::score_util::{python, row, toxicity_asset, vader_dir};
use anyhow::Result;
use quark::schema::{write_table, GenerationRow, ScoredRow, TableReader};
use quark::score::command::CommandScorer;
use quark::score::perspective::{PerspectiveOptions, PerspectiveScorer};
use quark::score::profanity::profanity;
use quark::score::repetition::{rep_n, repetition, RepetitionScorer};
use quark::score::sentiment::{SentimentScorer, Target, Vader};
use quark::score::toxicity::ToxicityScorer;
use quark::score::{score_file, score_stage, Score, Scorer};
use quark::stage::Stage;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn repetition_hand_worked() {
    // [1 2 1 2 1 2]: bigrams 12 21 12 21 12 (2 of 5 unique), trigrams 121 212 121 212
    // (2 of 4), 4-grams 1212 2121 1212 (2 of 3).
    let r = repetition(&[1, 2, 1, 2, 1, 2]);
    assert!(
        close(r[0], 0.6) && close(r[1], 0.5) && close(r[2], 1.0 / 3.0),
        "{r:?}"
    );
    assert!(close(r[3], 0.4 * 0.5 * (2.0 / 3.0)), "{r:?}");
    // [7 7 7]: bigrams 77 77 (1 of 2), one trigram, no 4-gram (rep 0).
    assert_eq!(repetition(&[7, 7, 7]), [0.5, 0.0, 0.0, 0.5]);
    assert_eq!(repetition(&[1, 2, 3, 4, 5]), [0.0, 0.0, 0.0, 1.0]);
    assert_eq!(repetition(&[]), [0.0, 0.0, 0.0, 1.0]);
    assert_eq!(rep_n(&[9], 2), 0.0);
}

fn vader() -> Vader {
    Vader::load(&vader_dir()).expect("lexicon loads")
}

#[test]
fn sentiment_hand_worked() {
    let v = vader();
    // compound = s / sqrt(s^2 + 15) for a single lexicon word of valence s
    // (vader_lexicon.txt: good 1.9, bad -2.5).
    let norm = |s: f64| s / (s * s + 15.0).sqrt();
    assert!(close(v.compound("good"), norm(1.9)));
    assert!(close(v.compound("bad"), norm(-2.5)));
    // "!!" adds 2 * 0.292 to a positive sum; "not" scales by -0.74.
    assert!(close(v.compound("good!!"), norm(1.9 + 0.584)));
    assert!(close(v.compound("not good"), norm(1.9 * -0.74)));
    // A neutral text stays 0 whatever its punctuation.
    assert_eq!(v.compound(""), 0.0);
    assert_eq!(v.compound("the table?? !!"), 0.0);
    assert!(v.compound("I love this, it is wonderful!") > 0.5);
    assert!(v.compound("I hate this, it is horrible.") < -0.5);

    let rows = vec![row("a", 0, "p", "good", &[1]), row("b", 0, "p", "", &[])];
    let dir = vader_dir();
    let pos = SentimentScorer::open(&dir, Target::Positive)
        .unwrap()
        .score(&rows)
        .unwrap();
    let neg = SentimentScorer::open(&dir, Target::Negative)
        .unwrap()
        .score(&rows)
        .unwrap();
    let s = (norm(1.9) + 1.0) / 2.0;
    assert!(close(pos[0].reward.unwrap(), s) && close(pos[0].raw[0].unwrap(), s));
    assert!(close(neg[0].reward.unwrap(), 1.0 - s) && close(neg[0].raw[0].unwrap(), s));
    assert_eq!(pos[1], Score::new(0.5, vec![0.5]));
}

/// Texts that exercise VADER's rules: negation, boosters, caps, "but", "least",
/// idioms, emoticons, emojis, punctuation, Python's whitespace and isupper.
const VADER_CASES: &[&str] = &[
    "VADER is smart, handsome, and funny.",
    "VADER is VERY SMART, uber handsome, and FRIGGIN FUNNY!!!",
    "VADER is not smart, handsome, nor funny.",
    "At least it isn't a horrible book.",
    "The book was only kind of good.",
    "The plot was good, but the characters are uncompelling and the dialog is not great.",
    "Today SUX!",
    "Today only kinda sux! But I'll get by, lol",
    "Make sure you :) or :D today!",
    "Catch utf-8 emoji such as 💘 and 💋 and 😁",
    "Not bad at all",
    "no good, no bad, no or nor worse",
    "It was the shit, yeah right, kiss of death, to die for, the bomb",
    "never so good; never this bad; without doubt great; without a doubt terrible",
    "very least good; at least good; least bad",
    "sort of nice kind of nice just enough nice",
    "good but bad but good but bad",
    "WHY??? Why?? why? what!!!!! ok",
    "I'm fine, you're not",
    "\u{1c}good\u{1d}bad\u{2028}great",
    "ǅungla GOOD Good gOOD",
];

#[test]
fn sentiment_matches_vader_sentiment_3_3_2() {
    let v = vader();
    let mut texts: Vec<String> = VADER_CASES.iter().map(|s| s.to_string()).collect();
    if let Some(path) = crate::score_util::shared_data("rtp-nontoxic-1200.jsonl") {
        for (p, c, _) in crate::score_util::rtp_records(&path) {
            texts.push(p);
            texts.push(c);
        }
    }
    for set in ["negative", "neutral", "positive"] {
        let Some(path) = crate::score_util::shared_data(&format!("sentiment-prompts/{set}.jsonl"))
        else {
            continue;
        };
        for l in std::fs::read_to_string(path).unwrap().lines() {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            texts.push(j["prompt"]["text"].as_str().unwrap_or_default().to_owned());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.json"), dir.path().join("out.json"));
    std::fs::write(&input, serde_json::to_vec(&texts).unwrap()).unwrap();
    crate::score_util::run_python(
        &crate::score_util::repo().join("tests/python/vader_reference.py"),
        &[&input, &output],
    );
    let want: Vec<f64> = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    assert_eq!(want.len(), texts.len());
    let mut worst = 0.0f64;
    for (t, w) in texts.iter().zip(&want) {
        let got = v.compound(t);
        worst = worst.max((got - w).abs());
        assert!((got - w).abs() <= 1e-12, "{t:?}: rust {got} python {w}");
    }
    eprintln!("vader: {} texts, largest difference {worst:e}", texts.len());
}

#[test]
fn profanity_levels() {
    assert_eq!(profanity("what a lovely day for a walk"), 0.0);
    assert_eq!(profanity(""), 0.0);
    assert!(profanity("you fucking piece of shit") >= 2.0 / 3.0);
    let mild = profanity("damn");
    assert!(mild > 0.0 && mild < 1.0, "{mild}");
}

// ---- score_file end to end ------------------------------------------------------

fn generations(n: usize) -> Vec<GenerationRow> {
    (0..n)
        .map(|i| {
            let toks: Vec<u32> = (0..(i % 9) as u32).map(|t| t % 3).collect();
            let text = match i % 3 {
                0 => "what a lovely day".to_owned(),
                1 => format!("you are a stupid idiot {i}"),
                _ => String::new(),
            };
            row(
                &format!("p{}", i / 4),
                (i % 4) as u32,
                "prompt",
                &text,
                &toks,
            )
        })
        .collect()
}

fn write_generations(dir: &Path, rows: Vec<GenerationRow>) -> PathBuf {
    let meta = Stage::from_hashes("generations", &serde_json::json!({}), vec![])
        .unwrap()
        .meta()
        .clone();
    write_table(&dir.join("generations.parquet"), rows, &[], &meta).unwrap()
}

#[test]
fn score_file_writes_reward_and_raw_columns_and_skips_a_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let rows = generations(50);
    let input = write_generations(dir.path(), rows.clone());
    let out_dir = dir.path().join("scored/");

    let out = score_file(&input, &mut RepetitionScorer, &out_dir).unwrap();
    assert!(out
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("scored-"));
    let reader = TableReader::<ScoredRow>::open(&out).unwrap();
    assert_eq!(reader.extra(), ["rep_2", "rep_3", "rep_4", "diversity"]);
    let scored = reader.read_all().unwrap();
    assert_eq!(scored.len(), rows.len());
    for (s, g) in scored.iter().zip(&rows) {
        assert_eq!(&s.generation, g);
        let r = repetition(&g.completion_tokens);
        assert_eq!(s.reward, Some(r[3]));
        assert_eq!(s.scores, r.map(Some).to_vec());
    }

    // Same input and scorer: nothing is rewritten.
    let before = std::fs::metadata(&out).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        score_file(&input, &mut RepetitionScorer, &out_dir).unwrap(),
        out
    );
    assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), before);

    // A scored file is itself a valid input: scored afresh, its earlier scorer
    // columns kept beside the new one, the reward the new scorer's.
    let mut sentiment = SentimentScorer::open(&vader_dir(), Target::Positive).unwrap();
    let again = score_file(&out, &mut sentiment, &out_dir).unwrap();
    let rescored = TableReader::<ScoredRow>::open(&again).unwrap();
    assert_eq!(
        rescored.extra(),
        ["rep_2", "rep_3", "rep_4", "diversity", "sentiment"]
    );
    let rescored = rescored.read_all().unwrap();
    assert_eq!(rescored.len(), rows.len());
    for (r, s) in rescored.iter().zip(&scored) {
        assert_eq!(
            r.scores[..4],
            s.scores[..],
            "the repetition columns are carried"
        );
        assert_eq!(
            r.reward, r.scores[4],
            "the reward is the sentiment scorer's"
        );
    }

    // Options are part of the key.
    let pos = score_stage(&input, &sentiment).unwrap();
    let negative = SentimentScorer::open(&vader_dir(), Target::Negative).unwrap();
    let neg = score_stage(&input, &negative).unwrap();
    assert_ne!(pos.key(), neg.key());
}

#[test]
fn toxicity_through_score_file_and_asset_content_in_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let rows = generations(30);
    let input = write_generations(dir.path(), rows.clone());
    let asset = toxicity_asset();
    let mut scorer = ToxicityScorer::open(&asset).unwrap();
    let out = score_file(&input, &mut scorer, &dir.path().join("tox.parquet")).unwrap();
    let scored = TableReader::<ScoredRow>::open(&out)
        .unwrap()
        .read_all()
        .unwrap();
    for (s, g) in scored.iter().zip(&rows) {
        let p = scorer.model().predict(&g.completion);
        assert_eq!(s.scores, vec![Some(p)]);
        assert_eq!(s.reward, Some(1.0 - p));
    }
    let toxic = scored
        .iter()
        .find(|s| s.generation.completion.contains("idiot"))
        .unwrap();
    let kind = scored
        .iter()
        .find(|s| s.generation.completion.contains("lovely"))
        .unwrap();
    assert!(toxic.reward < kind.reward);

    // The classifier's content, not its path, is in the key.
    let copy = dir.path().join("copy.json");
    std::fs::copy(&asset, &copy).unwrap();
    let same = score_stage(&input, &ToxicityScorer::open(&copy).unwrap()).unwrap();
    assert_eq!(same.key(), score_stage(&input, &scorer).unwrap().key());
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes.push(b'\n');
    std::fs::write(&copy, bytes).unwrap();
    let changed = score_stage(&input, &ToxicityScorer::open(&copy).unwrap()).unwrap();
    assert_ne!(changed.key(), same.key());
}

/// A scorer that returns NaN for the row whose completion is "nan".
struct NanScorer {
    external: bool,
}

impl Scorer for NanScorer {
    fn name(&self) -> &'static str {
        "nan-test"
    }
    fn columns(&self) -> Vec<String> {
        vec!["x".into()]
    }
    fn external(&self) -> bool {
        self.external
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        Ok(rows
            .iter()
            .map(|r| {
                let v = if r.completion == "nan" { f64::NAN } else { 1.0 };
                Score::new(v, vec![v])
            })
            .collect())
    }
}

#[test]
fn non_finite_reward_is_an_error_for_builtin_and_null_for_external_scorers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = generations(5);
    rows[3].completion = "nan".into();
    let input = write_generations(dir.path(), rows);
    let out = dir.path().join("out.parquet");
    let err = score_file(&input, &mut NanScorer { external: false }, &out).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("generations.parquet") && msg.contains("row 3"),
        "{msg}"
    );
    assert!(!out.exists(), "no half file under the final name");

    let out = score_file(&input, &mut NanScorer { external: true }, &out).unwrap();
    let scored = TableReader::<ScoredRow>::open(&out)
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(scored[3].reward, None);
    assert_eq!(scored[3].scores, vec![None]);
    assert_eq!(scored[2].reward, Some(1.0));
}

// ---- command --------------------------------------------------------------------

/// A Python one-liner as a shell command.
fn py(code: &str) -> String {
    format!("'{}' -c '{}'", python().display(), code)
}

/// Scores `input` with `command` into a temp file.
fn run_command(input: &Path, command: &str) -> Result<Vec<ScoredRow>> {
    let out = input.with_file_name(format!("cmd-{}.parquet", blake3::hash(command.as_bytes())));
    let mut scorer = CommandScorer::new(command, quark::score::command::DEFAULT_TIMEOUT)?;
    let path = score_file(input, &mut scorer, &out)?;
    TableReader::<ScoredRow>::open(&path)?.read_all()
}

const ECHO_LEN: &str = "import sys, json\nfor l in sys.stdin:\n    d = json.loads(l)\n    print(\"null\" if d[\"completion\"] == \"\" else len(d[\"completion\"]) + d[\"sample_index\"] / 10, flush=True)";

#[test]
fn command_scorer_streams_rows_through_a_program() {
    let dir = tempfile::tempdir().unwrap();
    // More rows than one batch and than a pipe holds, so that a program that answers
    // as it reads and one that reads everything first both have to work.
    let rows = generations(20_000);
    let input = write_generations(dir.path(), rows.clone());
    let expect = |g: &GenerationRow| {
        (!g.completion.is_empty())
            .then(|| g.completion.chars().count() as f64 + g.sample_index as f64 / 10.0)
    };
    let streaming = run_command(&input, &py(ECHO_LEN)).unwrap();
    let slurp = py("import sys, json\nls = sys.stdin.readlines()\nfor l in ls:\n    d = json.loads(l)\n    print(\"null\" if d[\"completion\"] == \"\" else len(d[\"completion\"]) + d[\"sample_index\"] / 10)");
    let slurping = run_command(&input, &slurp).unwrap();
    for scored in [streaming, slurping] {
        assert_eq!(scored.len(), rows.len());
        for (s, g) in scored.iter().zip(&rows) {
            assert_eq!(s.reward, expect(g), "{}", g.completion);
            assert_eq!(s.scores, vec![expect(g)]);
        }
    }
}

#[test]
fn command_scorer_sees_ids_and_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_generations(dir.path(), generations(8));
    let cmd = py("import sys, json\nfor l in sys.stdin:\n    d = json.loads(l)\n    assert d[\"prompt\"] == \"prompt\" and d[\"iteration\"] == 0\n    print(int(d[\"prompt_id\"][1:]) * 10 + d[\"sample_index\"])");
    let scored = run_command(&input, &cmd).unwrap();
    let got: Vec<Option<f64>> = scored.iter().map(|s| s.reward).collect();
    let want: Vec<Option<f64>> = [0, 1, 2, 3, 10, 11, 12, 13]
        .map(|v| Some(v as f64))
        .to_vec();
    assert_eq!(got, want);
}

fn command_error(rows: usize, command: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = write_generations(dir.path(), generations(rows));
    let err = run_command(&input, command).unwrap_err();
    let msg = format!("{err:#}");
    let shown = command.replace('\n', "\\n");
    assert!(msg.contains(&shown), "names the command: {msg}");
    assert!(
        msg.contains("generations.parquet"),
        "names the input: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    msg
}

#[test]
fn command_scorer_program_that_exits_early() {
    let msg = command_error(10, "read line; echo 1");
    assert!(
        msg.contains("exited after printing 1 lines for 10 rows"),
        "{msg}"
    );
    // Also when it exits early on a file larger than the pipe (the writer is cut off).
    let msg = command_error(20_000, "head -n 100 | sed 's/.*/0.5/'");
    assert!(
        msg.contains("after printing 100 lines for 20000 rows"),
        "{msg}"
    );
}

#[test]
fn command_scorer_wrong_line_counts() {
    let too_many = py("import sys\nfor l in sys.stdin:\n    print(1)\n    print(2)");
    let msg = command_error(5, &too_many);
    assert!(msg.contains("more lines than the 5 rows"), "{msg}");
    let too_few = py("import sys\nls = sys.stdin.readlines()\nfor l in ls[1:]:\n    print(1)");
    let msg = command_error(5, &too_few);
    assert!(
        msg.contains("exited after printing 4 lines for 5 rows"),
        "{msg}"
    );
}

#[test]
fn command_scorer_failures_are_errors() {
    let msg = command_error(3, "cat >/dev/null; echo 1; echo 1; echo 1; exit 3");
    assert!(msg.contains("exit status: 3"), "{msg}");
    let msg = command_error(3, "cat >/dev/null; echo 1; echo oops; echo 1");
    assert!(
        msg.contains("line 2 of its output is not a number or null"),
        "{msg}"
    );
    let msg = command_error(3, "no-such-program-quark-test");
    assert!(msg.contains("exited after printing 0 lines"), "{msg}");
}

// ---- perspective ----------------------------------------------------------------

/// What the loopback server saw.
#[derive(Default)]
struct Seen {
    times: Vec<Instant>,
    per_text: HashMap<String, usize>,
    served: HashMap<u16, usize>,
    /// While set, texts with "flaky" get 503 (the service is down for them).
    flaky_down: bool,
}

/// A Perspective stand-in on 127.0.0.1: answers 429 to every 4th request and 500 to
/// every 5th (by arrival), always 500 for texts with "always-500", 400 for
/// "bad-request", 503 for texts with "flaky" while `Seen::flaky_down` is set, else
/// 200 with toxicity = (chars % 10) / 10. It stops when the
/// flag is set or after 60 s, whichever comes first.
fn flaky_server(stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let (seen, count) = (seen.clone(), count.clone());
                    std::thread::spawn(move || handle(stream, &seen, &count));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    format!("http://{addr}/v1alpha1/comments:analyze")
}

fn handle(stream: TcpStream, seen: &Mutex<Seen>, count: &AtomicUsize) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut len = 0usize;
    let mut line = String::new();
    let mut target = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if target.is_empty() {
            target = line.clone();
        }
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = v["comment"]["text"].as_str().unwrap_or_default().to_owned();
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    let down = seen.lock().unwrap().flaky_down && text.contains("flaky");
    let (status, answer) = if !target.contains("key=test-key") {
        (403, "{}".to_owned())
    } else if down {
        (503, "{}".to_owned())
    } else if text.contains("always-500") {
        (500, "{}".to_owned())
    } else if text.contains("bad-request") {
        (400, r#"{"error": "bad"}"#.to_owned())
    } else if n.is_multiple_of(4) {
        (429, "{}".to_owned())
    } else if n.is_multiple_of(5) {
        (500, "{}".to_owned())
    } else {
        let t = (text.chars().count() % 10) as f64 / 10.0;
        (
            200,
            serde_json::json!({"attributeScores": {"TOXICITY": {"summaryScore": {"value": t, "type": "PROBABILITY"}}}}).to_string(),
        )
    };
    {
        let mut s = seen.lock().unwrap();
        s.times.push(Instant::now());
        *s.per_text.entry(text).or_default() += 1;
        *s.served.entry(status).or_default() += 1;
    }
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

fn perspective(url: String, rate: f64, retries: u32) -> PerspectiveScorer {
    PerspectiveScorer::new(PerspectiveOptions {
        api_key: Some("test-key".into()),
        url,
        rate_limit: rate,
        max_retries: retries,
        backoff: Duration::from_millis(5),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

#[test]
fn perspective_retries_rate_limits_and_never_crashes() {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = flaky_server(stop.clone(), seen.clone());
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<GenerationRow> = (0..36)
        .map(|i| {
            row(
                &format!("p{i}"),
                0,
                "prompt",
                &format!("text number {i}{}", "x".repeat(i % 7)),
                &[1],
            )
        })
        .collect();
    rows[5].completion = "always-500".into();
    rows[9].completion = "bad-request".into();
    rows[12].completion = "   ".into();
    let input = write_generations(dir.path(), rows.clone());
    let rate = 40.0;
    let retries = 6;
    let mut scorer = perspective(url, rate, retries);
    let started = Instant::now();
    let out = dir.path().join("p.parquet");
    // The always-500 row fails after its retries: the result is not complete, so
    // it is an error and nothing is written under the output's name.
    let err = format!("{:#}", score_file(&input, &mut scorer, &out).unwrap_err());
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(
        err.contains("could not score") && err.contains("HTTP 500 after 6 retries"),
        "{err}"
    );
    assert!(!out.exists());
    let failed: usize = err
        .split("could not score ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // Of 33 normal rows (not always-500, bad-request or empty), these were scored.
    let ok = 33 - (failed - 1);
    // 33 normal rows; a row fails 7 times in a row with probability < 1e-2.
    assert!(ok >= 31, "{ok} of 33 normal rows scored: {err}");

    let seen = seen.lock().unwrap();
    assert!(
        seen.served.get(&429).copied().unwrap_or(0) > 0,
        "{:?}",
        seen.served
    );
    assert!(
        seen.served.get(&500).copied().unwrap_or(0) > 0,
        "{:?}",
        seen.served
    );
    assert_eq!(
        seen.per_text["always-500"],
        1 + retries as usize,
        "retried, then null"
    );
    assert_eq!(seen.per_text["bad-request"], 1, "a 400 is not retried");
    assert!(
        !seen.per_text.contains_key("   "),
        "empty text sends no request"
    );
    // The rate limit holds: no half-second window holds more than rate/2 (+2 for
    // arrival jitter) requests.
    let mut times = seen.times.clone();
    times.sort();
    for (i, t) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_millis(500))
            .count();
        assert!(n <= (rate / 2.0) as usize + 2, "{n} requests within 0.5 s");
    }
    let min = Duration::from_secs_f64((times.len() - 1) as f64 / rate * 0.9);
    assert!(took >= min, "{} requests in {took:?}", times.len());
    eprintln!(
        "perspective: {} requests ({:?}) for {} rows in {took:?}, {ok} scored",
        times.len(),
        seen.served,
        rows.len()
    );
}

#[test]
fn perspective_unreachable_server_fails_the_run_and_caches_nothing() {
    // A port nothing listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/analyze");
    let dir = tempfile::tempdir().unwrap();
    let input = write_generations(dir.path(), generations(4));
    let mut scorer = perspective(url, 100.0, 2);
    let out = dir.path().join("p.parquet");
    let err = format!("{:#}", score_file(&input, &mut scorer, &out).unwrap_err());
    // Row 2's empty completion needs no request: it is null for good.
    assert!(err.contains("could not score 3 of 4 rows"), "{err}");
    assert!(!out.exists(), "an outage is never cached as a result");
    assert!(dir.path().join(".partial-p.parquet").exists());
    assert_eq!(scorer.failures(), 1);
}

#[test]
fn perspective_partial_result_is_never_up_to_date_and_the_rerun_fills_it() {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen {
        flaky_down: true,
        ..Seen::default()
    }));
    let url = flaky_server(stop.clone(), seen.clone());
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<GenerationRow> = (0..12)
        .map(|i| {
            let text = if i % 4 == 1 {
                format!("flaky text {i}")
            } else {
                format!("text {i}")
            };
            row(&format!("p{i}"), 0, "prompt", &text, &[1])
        })
        .collect();
    let input = write_generations(dir.path(), rows.clone());
    let out = dir.path().join("p.parquet");
    let retries = 6;
    let err = format!(
        "{:#}",
        score_file(&input, &mut perspective(url.clone(), 100.0, retries), &out).unwrap_err()
    );
    assert!(
        err.contains("could not score 3 of 12 rows") && err.contains("HTTP 503"),
        "{err}"
    );
    assert!(!out.exists());
    // The service is back: the rerun asks only for the rows that failed.
    let before = seen.lock().unwrap().per_text.clone();
    seen.lock().unwrap().flaky_down = false;
    let path = score_file(&input, &mut perspective(url, 100.0, retries), &out).unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(path, out);
    assert!(!dir.path().join(".partial-p.parquet").exists());
    let scored = TableReader::<ScoredRow>::open(&out)
        .unwrap()
        .read_all()
        .unwrap();
    for (s, g) in scored.iter().zip(&rows) {
        let t = (g.completion.chars().count() % 10) as f64 / 10.0;
        assert_eq!(s.scores, vec![Some(t)], "{}", g.completion);
        assert_eq!(s.reward, Some(1.0 - t));
    }
    let after = seen.lock().unwrap().per_text.clone();
    for g in &rows {
        let asked = after[&g.completion] - before.get(&g.completion).copied().unwrap_or(0);
        let flaky = g.completion.contains("flaky");
        assert!(
            if flaky { asked >= 1 } else { asked == 0 },
            "{}: asked {asked} times on the rerun",
            g.completion
        );
        if flaky {
            assert_eq!(
                before[&g.completion],
                1 + retries as usize,
                "retried before failing"
            );
        }
    }
}

#[test]
fn perspective_needs_a_key() {
    let err = PerspectiveScorer::new(PerspectiveOptions {
        api_key: Some(String::new()),
        ..PerspectiveOptions::default()
    })
    .err()
    .unwrap();
    assert!(format!("{err}").contains("PERSPECTIVE_API_KEY"));
}
