//! Quantile assignment on hand-made pools: ties, the remainder, nulls, K larger
//! than the pool, and the pool file quark-bin writes.

use quark::pool::{assign_quantiles, bin, read_pool, summarize, BinOptions};
use quark::schema::{write_table, ScoredRow};
use quark::testing;

fn rows(rewards: &[Option<f64>]) -> Vec<ScoredRow> {
    rewards
        .iter()
        .enumerate()
        .map(|(i, r)| testing::scored(&format!("p{i:02}"), 0, 0, *r, 0))
        .collect()
}

/// (prompt_id, quantile) in the order the pool keeps them.
fn assigned(rewards: &[Option<f64>], k: u32) -> Vec<(String, Option<u32>)> {
    let mut r = rows(rewards);
    assign_quantiles(&mut r, k).unwrap();
    r.into_iter()
        .map(|r| (r.generation.prompt_id, r.quantile))
        .collect()
}

fn q(pairs: &[(&str, Option<u32>)]) -> Vec<(String, Option<u32>)> {
    pairs.iter().map(|(p, q)| (p.to_string(), *q)).collect()
}

#[test]
fn equal_quantiles_best_first_remainder_to_the_last() {
    // 7 rows, K=3: size 2, ranks 0-1 -> 0, 2-3 -> 1, 4-6 -> 2.
    let got = assigned(
        &[
            Some(0.1),
            Some(0.7),
            Some(0.3),
            Some(0.9),
            Some(0.5),
            Some(0.2),
            Some(0.8),
        ],
        3,
    );
    assert_eq!(
        got,
        q(&[
            ("p03", Some(0)),
            ("p06", Some(0)),
            ("p01", Some(1)),
            ("p04", Some(1)),
            ("p02", Some(2)),
            ("p05", Some(2)),
            ("p00", Some(2)),
        ])
    );
}

#[test]
fn ties_break_by_prompt_id_then_sample_then_iteration() {
    let mut r = vec![
        testing::scored("b", 0, 0, Some(0.5), 0),
        testing::scored("a", 1, 0, Some(0.5), 0),
        testing::scored("a", 0, 1, Some(0.5), 0),
        testing::scored("a", 0, 0, Some(0.5), 0),
    ];
    assign_quantiles(&mut r, 2).unwrap();
    let order: Vec<_> = r
        .iter()
        .map(|r| {
            let g = &r.generation;
            (
                g.prompt_id.as_str(),
                g.sample_index,
                g.iteration,
                r.quantile,
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ("a", 0, 0, Some(0)),
            ("a", 0, 1, Some(0)),
            ("a", 1, 0, Some(1)),
            ("b", 0, 0, Some(1)),
        ]
    );
    // The same rows in any input order give the same pool.
    let mut shuffled = r.clone();
    shuffled.reverse();
    assign_quantiles(&mut shuffled, 2).unwrap();
    assert_eq!(shuffled, r);
}

#[test]
fn null_rewards_stay_last_without_a_quantile() {
    let got = assigned(&[None, Some(0.2), Some(0.4), None], 2);
    assert_eq!(
        got,
        q(&[
            ("p02", Some(0)),
            ("p01", Some(1)),
            ("p00", None),
            ("p03", None)
        ])
    );
}

#[test]
fn k_larger_than_the_pool_gives_each_row_its_own_quantile() {
    let got = assigned(&[Some(0.2), Some(0.9), Some(0.5)], 5);
    assert_eq!(
        got,
        q(&[("p01", Some(0)), ("p02", Some(1)), ("p00", Some(2))])
    );
}

#[test]
fn nan_reward_and_zero_quantiles_are_errors() {
    let mut r = rows(&[Some(f64::NAN)]);
    assert!(format!("{:#}", assign_quantiles(&mut r, 2).unwrap_err()).contains("NaN"));
    let mut r = rows(&[Some(1.0)]);
    assert!(assign_quantiles(&mut r, 0).is_err());
}

#[test]
fn summary_counts_each_quantile() {
    let mut r = rows(&[Some(1.0), Some(3.0), Some(2.0), Some(4.0), None]);
    assign_quantiles(&mut r, 2).unwrap();
    let s = summarize(&r, 2);
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].rows, s[0].min_reward, s[0].max_reward), (2, 3.0, 4.0));
    assert_eq!((s[1].rows, s[1].mean_reward), (2, 1.5));
}

fn write_scored(
    dir: &std::path::Path,
    name: &str,
    rows: Vec<ScoredRow>,
    extra: &[&str],
) -> std::path::PathBuf {
    let path = dir.join(name);
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    write_table(
        &path,
        rows,
        &extra,
        &testing::meta("scored", serde_json::json!({})),
    )
    .unwrap();
    path
}

#[test]
fn bin_appends_to_the_previous_pool_and_skips_when_done() {
    let dir = tempfile::tempdir().unwrap();
    let it0 = write_scored(
        dir.path(),
        "s0.parquet",
        (0..4)
            .map(|i| testing::scored("a", i, 0, Some(i as f64), 1))
            .collect(),
        &["toxicity"],
    );
    let it1 = write_scored(
        dir.path(),
        "s1.parquet",
        (0..4)
            .map(|i| testing::scored("a", i, 1, Some(10.0 + i as f64), 1))
            .collect(),
        &["toxicity"],
    );
    let opts = BinOptions {
        quantiles: 2,
        max_pool_rows: None,
        only_latest: false,
    };
    let out = dir.path().join("pools/");
    let p0 = bin(&[it0], None, &opts, &out).unwrap();
    let new = std::slice::from_ref(&it1);
    let p1 = bin(new, Some(&p0), &opts, &out).unwrap();
    let pool = read_pool(&p1).unwrap();
    assert_eq!(pool.len(), 8);
    assert!(pool[..4]
        .iter()
        .all(|r| r.generation.iteration == 1 && r.quantile == Some(0)));
    assert!(pool[4..]
        .iter()
        .all(|r| r.generation.iteration == 0 && r.quantile == Some(1)));
    assert_eq!(pool[0].scores, vec![Some(1.0 - 13.0)]);
    // Same inputs: the stage finds its output and does not rewrite it.
    let mtime = std::fs::metadata(&p1).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(bin(new, Some(&p0), &opts, &out).unwrap(), p1);
    assert_eq!(std::fs::metadata(&p1).unwrap().modified().unwrap(), mtime);

    let latest = BinOptions {
        only_latest: true,
        ..opts.clone()
    };
    let only = read_pool(&bin(new, Some(&p0), &latest, &out).unwrap()).unwrap();
    assert!(only.len() == 4 && only.iter().all(|r| r.generation.iteration == 1));
    let capped = BinOptions {
        max_pool_rows: Some(6),
        ..opts.clone()
    };
    let cap = read_pool(&bin(new, Some(&p0), &capped, &out).unwrap()).unwrap();
    assert_eq!(
        cap.iter().filter(|r| r.generation.iteration == 0).count(),
        2
    );

    // The same rows twice is a mistake worth an error.
    let err = bin(new, Some(&p1), &opts, &out).unwrap_err();
    assert!(format!("{err:#}").contains("appears twice"), "{err:#}");
}

#[test]
fn empty_or_unscored_inputs_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write_scored(dir.path(), "empty.parquet", vec![], &[]);
    let opts = BinOptions {
        quantiles: 5,
        max_pool_rows: None,
        only_latest: false,
    };
    let err = format!("{:#}", bin(&[empty], None, &opts, dir.path()).unwrap_err());
    assert!(
        err.contains("empty.parquet") && err.contains("no scored rows"),
        "{err}"
    );
    let nan = write_scored(
        dir.path(),
        "nan.parquet",
        vec![testing::scored("a", 0, 0, Some(f64::NAN), 0)],
        &[],
    );
    let err = format!("{:#}", bin(&[nan], None, &opts, dir.path()).unwrap_err());
    assert!(
        err.contains("nan.parquet") && err.contains("non-finite"),
        "{err}"
    );
}
