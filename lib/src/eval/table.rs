//! The evaluation's rows as people read them: JSON, and the table printed on stderr.

use std::collections::HashMap;

use crate::schema::{col, EvalMetricsRow};

use super::metrics::metric;

/// The metric rows as a JSON array of objects with the table's column names.
pub fn rows_json(rows: &[EvalMetricsRow]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            // JSON has no NaN or infinity: those become null.
            let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
            serde_json::json!({
                col::TASK: r.task,
                col::MODEL: r.model,
                col::ITERATION: r.iteration,
                col::SAMPLES_PER_PROMPT: r.samples_per_prompt,
                col::METRIC: r.metric,
                col::VALUE: finite(r.value),
                col::COUNT: r.count,
                col::CI_LOW: finite(r.ci_low),
                col::CI_HIGH: finite(r.ci_high),
                col::DIFF: finite(r.diff),
                col::DIFF_LOW: finite(r.diff_low),
                col::DIFF_HIGH: finite(r.diff_high),
            })
        })
        .collect()
}

/// A number with about four significant digits.
fn num(v: f64) -> String {
    match v.abs() {
        a if a < 10.0 => format!("{v:.3}"),
        a if a < 100.0 => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

/// "value [low, high]", or the value alone without an interval, or "-".
fn cell(value: Option<f64>, low: Option<f64>, high: Option<f64>) -> String {
    match (value, low, high) {
        (Some(v), Some(l), Some(h)) => format!("{} [{}, {}]", num(v), num(l), num(h)),
        (Some(v), _, _) => num(v),
        _ => "-".to_owned(),
    }
}

/// One line per model (label, iteration and samples per prompt), one column per
/// metric in the order the metrics first appear; `text` gives a row's cell, or None
/// where the line has none.
fn wide(rows: &[EvalMetricsRow], text: impl Fn(&EvalMetricsRow) -> Option<String>) -> String {
    type Line<'a> = (&'a str, Option<u32>, u32);
    let mut metrics: Vec<&str> = Vec::new();
    let mut models: Vec<Line> = Vec::new();
    let mut cells: HashMap<(Line, &str), String> = HashMap::new();
    for r in rows {
        let Some(t) = text(r) else { continue };
        if !metrics.contains(&r.metric.as_str()) {
            metrics.push(&r.metric);
        }
        let model = (r.model.as_str(), r.iteration, r.samples_per_prompt);
        if !models.contains(&model) {
            models.push(model);
        }
        cells.insert((model, &r.metric), t);
    }
    let names: Vec<String> = models
        .iter()
        .map(|(m, i, n)| match i {
            Some(i) => format!("{m} (iteration {i}, {n}/prompt)"),
            None => format!("{m} ({n}/prompt)"),
        })
        .collect();
    let first = names.iter().map(String::len).max().unwrap_or(0).max(5);
    let widths: Vec<usize> = metrics
        .iter()
        .map(|m| {
            let longest = models
                .iter()
                .filter_map(|l| cells.get(&(*l, *m)))
                .map(String::len)
                .max()
                .unwrap_or(0);
            m.len().max(longest)
        })
        .collect();
    let mut s = format!("{:<first$}", "model");
    for (m, w) in metrics.iter().zip(&widths) {
        s.push_str(&format!("  {m:>w$}"));
    }
    s.push('\n');
    for (model, name) in models.iter().zip(&names) {
        s.push_str(&format!("{name:<first$}"));
        for (m, w) in metrics.iter().zip(&widths) {
            let c = cells.get(&(*model, *m)).map_or("-", String::as_str);
            s.push_str(&format!("  {c:>w$}"));
        }
        s.push('\n');
    }
    s
}

/// A readable report: every model's metrics with their 95% intervals, then each
/// policy's difference to the reference sampled with as many samples per prompt.
pub fn format_table(rows: &[EvalMetricsRow]) -> String {
    let mut s = String::from("metrics [95% bootstrap interval over prompts]\n");
    s.push_str(&wide(rows, |r| {
        Some(if r.metric == metric::SAMPLES {
            r.value.map_or("-".to_owned(), |v| format!("{v:.0}"))
        } else {
            cell(r.value, r.ci_low, r.ci_high)
        })
    }));
    if rows.iter().any(|r| r.diff.is_some()) {
        s.push_str(
            "\ndifference to the reference at the same samples per prompt [paired 95% interval]\n",
        );
        s.push_str(&wide(rows, |r| {
            r.diff.map(|d| cell(Some(d), r.diff_low, r.diff_high))
        }));
    }
    s
}
