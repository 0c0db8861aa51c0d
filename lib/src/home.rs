//! Where the programs find the project's assets (the toxicity classifier and VADER's
//! lexicons that `just setup` writes under `data/rewards/`): the folder named by
//! `QUARK_HOME` when it is set, else the checkout the program was built in (found
//! from the program's own path, `<checkout>/target/release/quark-score`, or where it
//! was at build time), else the current folder. Never the current folder first: a program in a pipeline or an
//! Airflow task runs from wherever its caller stands.

use std::path::{Path, PathBuf};

/// The environment variable that names the project's home.
pub const HOME_VAR: &str = "QUARK_HOME";

/// The project's home (see the module header).
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os(HOME_VAR).filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    // The checkout the program was built in: found above the program, or (for a
    // program installed elsewhere) where it was at build time.
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .find(|d| is_checkout(d))
                .map(Path::to_owned)
        })
        .or_else(|| is_checkout(&built_in).then_some(built_in))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A quark-rs checkout: it has the set-up script and the task files.
fn is_checkout(dir: &Path) -> bool {
    dir.join("scripts/setup.sh").is_file() && dir.join("pipelines").is_dir()
}

/// The asset at `rel` (a path relative to the project's home).
pub fn asset(rel: &str) -> PathBuf {
    home().join(rel)
}
