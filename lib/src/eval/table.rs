//! The evaluation's rows as people read them: JSON, and the table printed on stderr.

use std::collections::HashMap;

use crate::schema::{col, EvalMetricsRow};

use super::metrics::metric;

/// The metric rows as a JSON array of objects with the table's column names.
pub fn rows_json(rows: &[EvalMetricsRow]) -> serde_json::Value {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                col::TASK: r.task,
                col::MODEL: r.model,
                col::ITERATION: r.iteration,
                col::METRIC: r.metric,
                // JSON has no NaN or infinity: those become null.
                col::VALUE: r.value.filter(|v| v.is_finite()),
                col::COUNT: r.count,
            })
        })
        .collect()
}

/// A readable table, one line per model (label and iteration) and one column per
/// metric, in the order the metrics first appear.
pub fn format_table(rows: &[EvalMetricsRow]) -> String {
    let mut metrics: Vec<&str> = Vec::new();
    let mut models: Vec<(&str, Option<u32>)> = Vec::new();
    let mut cells: HashMap<(&str, Option<u32>, &str), Option<f64>> = HashMap::new();
    for r in rows {
        if !metrics.contains(&r.metric.as_str()) {
            metrics.push(&r.metric);
        }
        let model = (r.model.as_str(), r.iteration);
        if !models.contains(&model) {
            models.push(model);
        }
        cells.insert((model.0, model.1, &r.metric), r.value);
    }
    let names: Vec<String> = models
        .iter()
        .map(|(m, i)| match i {
            Some(i) => format!("{m} (iteration {i})"),
            None => (*m).to_owned(),
        })
        .collect();
    let first = names.iter().map(String::len).max().unwrap_or(0).max(5);
    let widths: Vec<usize> = metrics.iter().map(|m| m.len().max(10)).collect();
    let mut s = format!("{:<first$}", "model");
    for (m, w) in metrics.iter().zip(&widths) {
        s.push_str(&format!("  {m:>w$}"));
    }
    s.push('\n');
    for ((model, iteration), name) in models.iter().zip(&names) {
        s.push_str(&format!("{name:<first$}"));
        for (m, w) in metrics.iter().zip(&widths) {
            let cell = match cells.get(&(*model, *iteration, *m)).copied().flatten() {
                Some(v) if *m == metric::SAMPLES => format!("{v:.0}"),
                Some(v) => format!("{v:.4}"),
                None => "-".to_owned(),
            };
            s.push_str(&format!("  {cell:>w$}"));
        }
        s.push('\n');
    }
    s
}
