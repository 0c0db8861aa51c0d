//! The Quark loop end to end on a tiny random model, through the same scripts that
//! `just iterate` and `just eval` run: three iterations; a rerun that skips every
//! stage; a run killed mid-fit that the next run finishes with the same files as an
//! uninterrupted one; the Airflow DAG on the same task; and every DuckDB query of the
//! README on the files the loop wrote.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The folder of the programs cargo built for this test.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_quark-sample"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A task file for the tiny model: the toxicity reward on a few prompts, small fits.
fn tiny_task(dir: &Path) -> PathBuf {
    let model = quark::testing::tiny_models().join("llama-tied");
    let train = dir.join("train.jsonl");
    let heldout = dir.join("heldout.jsonl");
    let line = |i: usize, kind: &str| {
        serde_json::json!({"prompt": {"text": format!("{kind} prompt {i}: you are such a")}})
            .to_string()
    };
    std::fs::write(
        &train,
        (0..12)
            .map(|i| line(i, "train"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    std::fs::write(
        &heldout,
        (0..4)
            .map(|i| line(i, "held-out"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let env = dir.join("tiny.env");
    std::fs::write(
        &env,
        format!(
            "MODEL={}\nTRAIN_PROMPTS={}\nEVAL_PROMPTS={}\nSCORER=toxicity\nSCORER_ARGS=\n\
             PROMPT_SHARDS=2\nSAMPLES_PER_PROMPT=2\nMAX_NEW_TOKENS=6\nMIN_NEW_TOKENS=2\nTOP_P=1.0\n\
             SAMPLE_BATCH=8\nQUANTILES=3\nITERATIONS=3\nFIT_STEPS=150\nBATCH_SIZE=8\nGRAD_ACCUM=2\n\
             LR=1e-3\nWARMUP_STEPS=2\nKL_COEF=0.05\nENTROPY_COEF=0.06\nUNLIKELIHOOD_COEF=0\nDTYPE=f32\n\
             FIT_ARGS=--gradient-checkpointing\n\
             SEED=0\nEVAL_SAMPLES=2\nEVAL_CURVE_SAMPLES=1\nEVAL_TOP_P=0.9\nEVAL_MAX_NEW_TOKENS=6\nEVAL_GREEDY=false\n",
            model.display(),
            train.display(),
            heldout.display()
        ),
    )
    .unwrap();
    env
}

/// A script of scripts/ with the programs on PATH, from the repository root.
fn script(name: &str, args: &[&Path]) -> Command {
    let mut cmd = Command::new(repo().join("scripts").join(name));
    cmd.args(args).current_dir(repo()).env(
        "PATH",
        format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    cmd
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{stderr}");
    stderr
}

/// Every file under `dir` (relative path -> bytes), the manifest aside.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().unwrap() != "manifest.tsv" {
                out.insert(
                    p.strip_prefix(root).unwrap().to_owned(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// (iteration, stage) rows of a run's manifest.
fn manifest(dir: &Path) -> Vec<(u32, String, PathBuf)> {
    std::fs::read_to_string(dir.join("manifest.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].parse().unwrap(), f[1].to_owned(), PathBuf::from(f[2]))
        })
        .collect()
}

/// Whether a quark-fit writing into `run` is running now.
fn fit_running(run: &Path) -> bool {
    let needle = run.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("quark-fit") && c.contains(&needle)
        })
    })
}

#[test]
fn three_iterations_rerun_skips_and_a_killed_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let env = tiny_task(tmp.path());
    let a = tmp.path().join("runs/a");

    // Three iterations in one go.
    run_ok(script("iterate.sh", &[&env, &a, Path::new("3")]));
    let m = manifest(&a);
    for stage in ["sample", "score", "bin", "fit"] {
        let its: Vec<u32> = m.iter().filter(|r| r.1 == stage).map(|r| r.0).collect();
        assert_eq!(its, vec![0, 1, 2], "{stage} in every iteration: {m:?}");
    }
    let first = files(&a);

    // Nothing left to do: returns at once.
    let started = Instant::now();
    let again = run_ok(script("iterate.sh", &[&env, &a, Path::new("1")]));
    assert!(again.contains("has done its 3 iterations"), "{again}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // Without the manifest every stage runs again and finds its output: all 12 skip.
    std::fs::remove_file(a.join("manifest.tsv")).unwrap();
    let rerun = run_ok(script("iterate.sh", &[&env, &a, Path::new("3")]));
    assert_eq!(rerun.matches("is up to date").count(), 12, "{rerun}");
    assert_eq!(files(&a), first, "a rerun changes no file");
    assert_eq!(manifest(&a), m);

    // Killed mid-fit, then run again: the same files as the uninterrupted run.
    let b = tmp.path().join("runs/b");
    let mut cmd = script("iterate.sh", &[&env, &b, Path::new("3")]);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    // The second iteration's fit (its pool holds two iterations' rows).
    while !(fit_running(&b) && manifest(&b).iter().any(|r| r.1 == "fit")) {
        assert!(Instant::now() < deadline, "no second fit started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SIGKILL to the whole group: no handler runs, as in a crash.
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    let fits = manifest(&b).iter().filter(|r| r.1 == "fit").count();
    assert_eq!(fits, 1, "killed while the second fit ran");
    assert!(!b.join("policy-1").join("model.safetensors").exists());
    run_ok(script("iterate.sh", &[&env, &b, Path::new("3")]));
    let resumed = files(&b);
    assert_eq!(
        resumed.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "no temporary file left behind, nothing missing"
    );
    for (path, bytes) in &first {
        if path.ends_with(quark::fit::METRICS_FILE) {
            // The fit metrics record throughput, which no two runs share: every other
            // value must agree.
            let values = |p: &Path| -> Vec<Vec<Option<f64>>> {
                quark::schema::read_table::<quark::schema::FitMetricsRow>(p)
                    .unwrap()
                    .into_iter()
                    .map(|r| r.values[..quark::schema::FIT_METRICS.len() - 1].to_vec())
                    .collect()
            };
            assert_eq!(
                values(&a.join(path)),
                values(&b.join(path)),
                "{}",
                path.display()
            );
            continue;
        }
        assert!(
            resumed[path] == *bytes,
            "{} differs from the uninterrupted run",
            path.display()
        );
    }

    // Evaluation, then the README's DuckDB queries on this run's files.
    run_ok(script("eval.sh", &[&env, &a]));
    check_report(&a.join("eval/report"));
    readme_queries(&a);
    airflow(&env, tmp.path());
}

/// The report of eval.sh on the tiny task (3 iterations, K = 3): the headline pair at
/// 2 samples per prompt, the curve over iterations and the control curve at 1, every
/// metric with an interval, the policies' differences to the reference at their own
/// samples per prompt, and the profanity judge's rate.
fn check_report(report: &Path) {
    let rows = quark::schema::read_table::<quark::schema::EvalMetricsRow>(
        &report.join(quark::eval::METRICS_PARQUET),
    )
    .unwrap();
    let models: Vec<(&str, Option<u32>, u32)> = rows
        .iter()
        .filter(|r| r.metric == quark::eval::metric::SAMPLES)
        .map(|r| (r.model.as_str(), r.iteration, r.samples_per_prompt))
        .collect();
    assert_eq!(
        models,
        [
            ("reference", Some(0), 2),
            ("policy", Some(3), 2),
            ("reference", Some(0), 1),
            ("policy", Some(1), 1),
            ("policy", Some(2), 1),
            ("policy", Some(3), 1),
            ("policy@q1", Some(3), 1),
            ("policy@q2", Some(3), 1),
        ]
    );
    for r in rows
        .iter()
        .filter(|r| r.metric == quark::eval::metric::AVG_MAX_TOXICITY)
    {
        assert!(r.ci_low.is_some() && r.ci_high.is_some(), "{r:?}");
        assert_eq!(r.diff.is_some(), r.model != "reference", "{r:?}");
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r.metric == quark::eval::metric::PROFANITY_RATE && r.value.is_some())
            .count(),
        models.len()
    );
}

/// Runs every ```sql block of the README's DuckDB section from a folder where
/// data/runs/toxicity is the run `run`; each must return at least one row.
fn readme_queries(run: &Path) {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let queries: Vec<&str> = readme
        .split("```sql\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(
        queries.len() >= 5,
        "the README shows at least five DuckDB queries"
    );
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("data/runs")).unwrap();
    std::os::unix::fs::symlink(run, root.path().join("data/runs/toxicity")).unwrap();
    let script = r#"
import duckdb, json, os, sys
os.chdir(sys.argv[1])
con = duckdb.connect()
rows = con.execute(sys.argv[2]).fetchall()
print(json.dumps(len(rows)))
"#;
    for q in queries {
        let out =
            quark::testing::run_python(script, &[root.path().as_os_str(), std::ffi::OsStr::new(q)]);
        let n: usize = serde_json::from_str(out.trim()).unwrap();
        assert!(n > 0, "no rows from:\n{q}");
    }
}

/// The Airflow DAG: one iteration of the tiny task in a real Airflow (`airflow dags
/// test`), with two sample/score workers; skipped with the reason when no Airflow
/// can be installed here.
fn airflow(env: &Path, tmp: &Path) {
    let run = tmp.join("runs/airflow");
    let out = Command::new(repo().join("tests/python/airflow_dag_test.sh"))
        .args([env.as_os_str(), run.as_os_str(), "2".as_ref()])
        .current_dir(repo())
        .env("QUARK_BIN_DIR", bin_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            let m = manifest(&run);
            assert_eq!(m.iter().filter(|r| r.1 == "fit").count(), 1, "{m:?}");
        }
        Some(77) => eprintln!("airflow: skipped: {}", stderr.lines().last().unwrap_or("")),
        _ => panic!("airflow_dag_test.sh failed:\n{stderr}"),
    }
}
