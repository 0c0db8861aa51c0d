//! Progress bars on stderr for long work (sampling, scoring, fitting): rate and
//! ETA, hidden when stderr is not a terminal or the caller turned them off.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting `total` `unit`s, labelled `prefix`; hidden unless `enabled`.
pub fn bar(enabled: bool, total: u64, prefix: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !enabled {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} (ETA {{eta}}) {{msg}}"
        ))
        .expect("valid template"),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}
