//! The `perspective` scorer: Google's Perspective API (the toxicity measure of the
//! Quark paper), TOXICITY summary score of the completion. The key comes from the
//! environment (`PERSPECTIVE_API_KEY`), never from a flag or a file, and never enters
//! the stage key or a log line.
//!
//! A web service fails in ordinary ways, so nothing here ends the run: requests go
//! out from up to `ceil(rate_limit)` threads (enough to reach the rate when a request
//! takes under a second), all drawing start times from one limiter that spaces them
//! 1 / rate_limit seconds apart; retries take a slot too. A 429, a 5xx or a network
//! error is retried with exponential back-off (doubling from `backoff`, at least the
//! server's Retry-After). After `max_retries` retries, or on a 4xx other than 400,
//! the row has failed: quark-score then keeps the scores it got and fails, and its
//! rerun tries only those rows again. A text the API refuses (HTTP 400) and an
//! empty completion (no request is made) are null for good, counted in one warning. Raw column: `perspective_toxicity`;
//! reward = 1 - it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::{Score, Scorer};
use crate::schema::GenerationRow;

/// The environment variable that holds the API key.
pub const KEY_VAR: &str = "PERSPECTIVE_API_KEY";

/// The public endpoint.
pub const DEFAULT_URL: &str = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze";

/// Upper bound on concurrent requests, whatever the rate limit.
const MAX_WORKERS: usize = 64;
/// Longest wait between two tries of one row.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How the scorer talks to the API.
#[derive(Clone, Debug)]
pub struct PerspectiveOptions {
    /// The API key; None reads [`KEY_VAR`] from the environment.
    pub api_key: Option<String>,
    /// The endpoint (`--perspective-url`, for a proxy or a test server).
    pub url: String,
    /// Requests per second, retries included.
    pub rate_limit: f64,
    /// Retries of one row after its first try, before it has failed (and is tried
    /// again by the next run).
    pub max_retries: u32,
    /// The first back-off; it doubles on each retry.
    pub backoff: Duration,
    /// Time limit of one request.
    pub timeout: Duration,
}

impl Default for PerspectiveOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            url: DEFAULT_URL.to_owned(),
            rate_limit: 1.0,
            max_retries: 5,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Spaces request starts `interval` apart across threads.
struct Limiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Limiter {
    fn wait(&self) {
        let now = Instant::now();
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        std::thread::sleep(slot.saturating_duration_since(now));
    }
}

/// What one try gave.
enum Outcome {
    Score(f64),
    /// Worth another try (429, 5xx, network); the server's Retry-After if any.
    Retry(String, Option<Duration>),
    /// The API cannot score this text (HTTP 400): the row is null for good.
    Unscorable(String),
    /// Not worth another try now (another 4xx, an unexpected answer): the row
    /// failed, and a rerun tries it again.
    Fail(String),
}

/// The Perspective API scorer.
pub struct PerspectiveScorer {
    opts: PerspectiveOptions,
    key: String,
    agent: ureq::Agent,
    limiter: Limiter,
    failures: AtomicUsize,
    examples: Mutex<Vec<String>>,
}

impl PerspectiveScorer {
    /// A scorer with `opts`; fails when no API key is given or set.
    pub fn new(opts: PerspectiveOptions) -> Result<Self> {
        let key = match &opts.api_key {
            Some(k) => k.clone(),
            None => std::env::var(KEY_VAR).unwrap_or_default(),
        };
        if key.trim().is_empty() {
            bail!("the perspective scorer needs an API key in the environment variable {KEY_VAR}");
        }
        crate::check::check("--rate-limit", opts.rate_limit, crate::check::RATE)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(opts.timeout))
            .build()
            .into();
        let limiter = Limiter {
            interval: Duration::from_secs_f64(1.0 / opts.rate_limit),
            next: Mutex::new(Instant::now()),
        };
        Ok(Self {
            opts,
            key,
            agent,
            limiter,
            failures: AtomicUsize::new(0),
            examples: Mutex::new(Vec::new()),
        })
    }

    fn workers(&self, rows: usize) -> usize {
        (self.opts.rate_limit.ceil() as usize)
            .clamp(1, MAX_WORKERS)
            .min(rows.max(1))
    }

    /// Hides the key in anything that may be printed.
    fn redact(&self, s: String) -> String {
        s.replace(&self.key, "***")
    }

    fn try_once(&self, text: &str) -> Outcome {
        let sep = if self.opts.url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}key={}", self.opts.url, self.key);
        let body = json!({
            "comment": { "text": text },
            "languages": ["en"],
            "requestedAttributes": { "TOXICITY": {} },
        })
        .to_string();
        let mut resp = match self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body)
        {
            Ok(r) => r,
            Err(e) => return Outcome::Retry(self.redact(e.to_string()), None),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(MAX_BACKOFF.as_secs_f64())));
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Outcome::Retry(self.redact(e.to_string()), None),
        };
        match status {
            200 => {
                let value = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
                    v.pointer("/attributeScores/TOXICITY/summaryScore/value")
                        .and_then(Value::as_f64)
                });
                match value {
                    Some(v) => Outcome::Score(v),
                    None => Outcome::Fail(format!(
                        "unexpected answer {:?}",
                        text.chars().take(120).collect::<String>()
                    )),
                }
            }
            429 | 500..=599 => Outcome::Retry(format!("HTTP {status}"), retry_after),
            // A key the API refuses is answered with a 400 too (API_KEY_INVALID):
            // that is the run's failure, not the text's.
            400 if !text.contains("API_KEY") && !text.contains("API key") => {
                Outcome::Unscorable(self.redact(format!(
                    "HTTP 400: {}",
                    text.chars().take(120).collect::<String>()
                )))
            }
            _ => Outcome::Fail(self.redact(format!(
                "HTTP {status}: {}",
                text.chars().take(120).collect::<String>()
            ))),
        }
    }

    /// The toxicity of one text: Ok(Some) when scored, Ok(None) for a text the API
    /// cannot score (empty, or refused with HTTP 400), Err(why) when this try failed
    /// (the service unreachable, overloaded after the last retry, or refusing the
    /// key): a rerun tries that row again.
    pub fn toxicity(&self, text: &str) -> std::result::Result<Option<f64>, String> {
        if text.trim().is_empty() {
            self.note("empty text".into());
            return Ok(None);
        }
        let mut backoff = self.opts.backoff;
        for attempt in 0..=self.opts.max_retries {
            self.limiter.wait();
            match self.try_once(text) {
                Outcome::Score(v) => return Ok(Some(v)),
                Outcome::Unscorable(why) => {
                    self.note(why);
                    return Ok(None);
                }
                Outcome::Fail(why) => return Err(why),
                Outcome::Retry(why, after) => {
                    if attempt == self.opts.max_retries {
                        return Err(format!("{why} after {} retries", self.opts.max_retries));
                    }
                    std::thread::sleep(after.map_or(backoff, |a| a.max(backoff)));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        Err("no try made".into())
    }

    fn note(&self, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if ex.len() < 3 && !ex.contains(&why) {
            ex.push(why);
        }
    }

    /// Rows the API cannot score (null for good) so far.
    pub fn failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }
}

impl Scorer for PerspectiveScorer {
    fn name(&self) -> &'static str {
        "perspective"
    }
    fn columns(&self) -> Vec<String> {
        vec!["perspective_toxicity".into()]
    }
    fn params(&self) -> Value {
        json!({ "url": self.opts.url, "attribute": "TOXICITY", "languages": ["en"] })
    }
    fn external(&self) -> bool {
        true
    }
    fn score(&mut self, rows: &[GenerationRow]) -> Result<Vec<Score>> {
        let next = AtomicUsize::new(0);
        let this = &*self;
        let mut values = vec![Err("not tried".to_owned()); rows.len()];
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..this.workers(rows.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(r) = rows.get(i) else { break };
                            got.push((i, this.toxicity(&r.completion)));
                        }
                        got
                    })
                })
                .collect();
            for h in handles {
                // A worker only panics on a bug; its rows stay failed.
                for (i, v) in h.join().unwrap_or_default() {
                    values[i] = v;
                }
            }
        });
        Ok(values
            .into_iter()
            .map(|v| match v {
                Ok(v) => Score {
                    reward: v.map(|t| 1.0 - t),
                    raw: vec![v],
                    failure: None,
                },
                Err(why) => Score::failed(1, why),
            })
            .collect())
    }
    fn finish(&mut self) -> Result<()> {
        let n = self.failures();
        if n > 0 {
            let ex = self.examples.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "score: warning: perspective: {n} rows cannot be scored (null), e.g. {}",
                ex.join("; ")
            );
        }
        Ok(())
    }
}
