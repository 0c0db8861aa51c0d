//! What the benchmarks share: the model they run, the Python baseline they compare
//! with (bench/baseline.py, run as a child process on the same threads), and peak
//! memory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// $QUARK_BENCH_MODEL, else the imported default model (`just setup` makes it).
pub fn model_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("QUARK_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("data/models/smollm2-135m"));
    if !dir.join("config.json").is_file() {
        bail!(
            "{}: no model there: run `just setup` (or set QUARK_BENCH_MODEL)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The thread count both sides use: $QUARK_BENCH_THREADS, else libtorch's default.
pub fn threads() -> Result<i32> {
    let n = match std::env::var("QUARK_BENCH_THREADS") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("QUARK_BENCH_THREADS={v}: not a number"))?,
        Err(_) => tch::get_num_threads(),
    };
    tch::set_num_threads(n);
    Ok(n)
}

/// Runs the repository's Python script `script` (a path from the root) with `args`
/// in the venv's Python ($QUARK_VENV, else .venv); its stdout.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> Result<String> {
    run_python_with(script, args, &[])
}

/// [`run_python`] with `envs` added to its environment.
fn run_python_with<S: AsRef<std::ffi::OsStr>>(
    script: &str,
    args: &[S],
    envs: &[(&str, &str)],
) -> Result<String> {
    let venv = std::env::var_os("QUARK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    let script = repo_root().join(script);
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .with_context(|| format!("{}: cannot run (set QUARK_VENV)", venv.display()))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs `bench/baseline.py MODE ARGS...`; its one JSON line. The peer's malloc is set
/// as the programs set their own ([`quark::allocator::ENV`]): it gains as much (a
/// user's own settings, which the programs keep, reach it unchanged).
pub fn baseline(mode: &str, args: &[&std::ffi::OsStr]) -> Result<serde_json::Value> {
    let mut all: Vec<&std::ffi::OsStr> = vec![mode.as_ref()];
    all.extend_from_slice(args);
    let envs: &[(&str, &str)] = if quark::allocator::applies() {
        &quark::allocator::ENV
    } else {
        &[]
    };
    let text = run_python_with("bench/baseline.py", &all, envs)?;
    let last = text
        .lines()
        .last()
        .context("the baseline printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("baseline output: {last}"))
}

/// This process's peak resident memory so far, in MiB (VmHWM).
pub fn peak_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// The dtypes a benchmark compares, each measured in a process of its own so that
/// its peak memory is its own: without $QUARK_BENCH_DTYPE this process runs itself
/// once per dtype (with it set) and returns their JSON lines in order; with it set,
/// it returns None and the caller measures that one dtype and prints one JSON line.
pub fn per_dtype_children(dtypes: &[&str]) -> Result<Option<Vec<serde_json::Value>>> {
    if std::env::var_os("QUARK_BENCH_DTYPE").is_some() {
        // A child measures what the programs run: with their malloc settings.
        quark::allocator::tune();
        return Ok(None);
    }
    rounds()?; // a bad $QUARK_BENCH_ROUNDS fails before anything runs
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for d in dtypes {
        let child = Command::new(&exe)
            .env("QUARK_BENCH_DTYPE", d)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("{}: cannot run", exe.display()))?;
        if !child.status.success() {
            bail!("the {d} measurement failed");
        }
        let text = String::from_utf8(child.stdout)?;
        let last = text
            .lines()
            .last()
            .context("the measurement printed nothing")?;
        out.push(
            serde_json::from_str(last).with_context(|| format!("measurement output: {last}"))?,
        );
    }
    Ok(Some(out))
}

/// $QUARK_BENCH_ROUNDS (default 1): how many times a benchmark measures every
/// variant and every peer, one after the other (A B A B), keeping each one's best
/// round, so that a machine whose speed drifts from minute to minute treats both
/// sides alike.
pub fn rounds() -> Result<usize> {
    match std::env::var("QUARK_BENCH_ROUNDS") {
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("QUARK_BENCH_ROUNDS={v}: a whole number of rounds, 1 or more"),
        },
        Err(_) => Ok(1),
    }
}

/// A peer's measurement, by name (`PyTorch bf16+pool`, say).
pub type Named = (String, serde_json::Value);

/// The quark-rs measurements of `variants` (`first`: the children
/// [`per_dtype_children`] already ran) and the peers' (`peers` measures them once,
/// each named), over [`rounds`] rounds, quark-rs then the peers in each; every entry
/// keeps its best round on `field` (the lowest where `lower_is_better`).
pub fn measure_rounds(
    variants: &[&str],
    first: Vec<serde_json::Value>,
    mut peers: impl FnMut() -> Result<Vec<Named>>,
    field: &str,
    lower_is_better: bool,
) -> Result<(Vec<serde_json::Value>, Vec<Named>)> {
    let mut rust = first;
    let mut peer = peers()?;
    let better = |kept: &serde_json::Value, new: &serde_json::Value| match (
        kept[field].as_f64(),
        new[field].as_f64(),
    ) {
        (Some(k), Some(n)) => (n < k) == lower_is_better,
        (None, Some(_)) => true,
        _ => false,
    };
    for _ in 1..rounds()? {
        let again = per_dtype_children(variants)?.context("measured in the parent")?;
        for (kept, new) in rust.iter_mut().zip(again) {
            if better(kept, &new) {
                *kept = new;
            }
        }
        for ((_, kept), (_, new)) in peer.iter_mut().zip(peers()?) {
            if better(kept, &new) {
                *kept = new;
            }
        }
    }
    Ok((rust, peer))
}

/// The dtype this process measures ($QUARK_BENCH_DTYPE: f32 or bf16, optionally
/// with a `+variant` that the benchmark reads itself) and its kind.
pub fn child_kind() -> Result<(String, tch::Kind)> {
    let d = std::env::var("QUARK_BENCH_DTYPE").context("QUARK_BENCH_DTYPE is not set")?;
    let kind = match d.split('+').next().unwrap_or_default() {
        "f32" => tch::Kind::Float,
        "bf16" => tch::Kind::BFloat16,
        other => bail!("QUARK_BENCH_DTYPE={other}: f32 or bf16"),
    };
    Ok((d, kind))
}

/// Prints the CPU the figures come from: its model, the flags that decide
/// libtorch's kernels, the threads, and whether bf16 counts as native here.
pub fn print_cpu(threads: i32) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let shown: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    println!(
        "cpu: {}; flags: {}; {threads} threads; native bf16: {}",
        field("model name"),
        shown.join(" "),
        if quark::device::cpu_has_native_bf16() {
            "yes"
        } else {
            "no"
        }
    );
}

/// The dtypes the Python peer runs in: f32, and bf16 where the CPU computes it
/// natively (elsewhere bf16 is not what anyone would choose, and takes minutes).
pub fn peer_dtypes() -> Vec<&'static str> {
    if quark::device::cpu_has_native_bf16() {
        vec!["f32", "bf16"]
    } else {
        println!("  (no PyTorch bf16 rows: this CPU has no native bf16)");
        vec!["f32"]
    }
}

/// Prints how each quark-rs figure (`rust`, one per variant in `names`, such as
/// `bf16+pool` or `f32+checkpointing`) compares with the peer's (`peers`, named
/// `<peer> <dtype>[+pool]`) in the same dtype on the same work, on `field`: their
/// ratio, or its inverse when lower is better.
pub fn print_peer_ratios(
    names: &[&str],
    rust: &[serde_json::Value],
    peers: &[(String, serde_json::Value)],
    field: &str,
    lower_is_better: bool,
) -> Result<()> {
    for (name, v) in names.iter().zip(rust) {
        let parts: Vec<&str> = name.split('+').collect();
        let work = if parts.contains(&"pool") { "+pool" } else { "" };
        let wanted = format!(" {}{work}", parts[0]);
        let Some((peer, p)) = peers.iter().find(|(n, _)| n.ends_with(&wanted)) else {
            println!("  quark-rs {name}: no peer in {} here", parts[0]);
            continue;
        };
        let base = p[field]
            .as_f64()
            .with_context(|| format!("{peer} has no {field}"))?;
        let x = v[field]
            .as_f64()
            .with_context(|| format!("the {name} run has no {field}"))?;
        let ratio = if lower_is_better { base / x } else { x / base };
        println!("  quark-rs {name} against {peer}: {ratio:.2}x");
    }
    Ok(())
}
