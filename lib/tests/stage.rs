//! Stage keys change with every parameter and every input byte and with nothing
//! else; outputs appear atomically, even when the writer is killed mid-write.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quark::schema::{GenerationRow, TableWriter};
use quark::stage::{canonical_json, hash_path, write_atomic, AtomicDir, Stage};
use quark::testing;
use serde_json::json;

fn key(params: serde_json::Value, inputs: &[&Path]) -> String {
    Stage::new("sample", &params, inputs)
        .unwrap()
        .key()
        .to_owned()
}

#[test]
fn canonical_json_sorts_keys_at_every_depth() {
    let a = json!({"b": 1, "a": {"y": [1, {"q": 2, "p": 1}], "x": null}});
    assert_eq!(
        canonical_json(&a),
        r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#
    );
}

#[test]
fn same_inputs_same_key_and_any_change_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, b"hello prompts").unwrap();
    // Large enough for the memory-mapped, multi-threaded path.
    let big = dir.path().join("big.bin");
    let mut bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&big, &bytes).unwrap();

    let base = key(json!({"seed": 1, "top_p": 0.9}), &[&small, &big]);
    assert_eq!(base, key(json!({"top_p": 0.9, "seed": 1}), &[&small, &big]));
    assert_eq!(base.len(), 64);

    assert_ne!(base, key(json!({"seed": 2, "top_p": 0.9}), &[&small, &big]));
    assert_ne!(
        base,
        key(json!({"seed": 1, "top_p": 0.95}), &[&small, &big])
    );
    assert_ne!(base, key(json!({"seed": 1}), &[&small, &big]));
    assert_ne!(base, key(json!({"seed": 1, "top_p": 0.9}), &[&big, &small]));
    let other_stage =
        Stage::new("score", &json!({"seed": 1, "top_p": 0.9}), &[&small, &big]).unwrap();
    assert_ne!(base, other_stage.key());

    // One byte in the middle of the large file.
    bytes[1_500_000] ^= 1;
    std::fs::write(&big, &bytes).unwrap();
    let flipped = key(json!({"seed": 1, "top_p": 0.9}), &[&small, &big]);
    assert_ne!(base, flipped);
    bytes[1_500_000] ^= 1;
    std::fs::write(&big, &bytes).unwrap();
    assert_eq!(base, key(json!({"seed": 1, "top_p": 0.9}), &[&small, &big]));

    std::fs::write(&small, b"hello prompts!").unwrap();
    assert_ne!(base, key(json!({"seed": 1, "top_p": 0.9}), &[&small, &big]));
}

#[test]
fn directory_hash_covers_names_and_content_but_not_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(model.join("sub")).unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    std::fs::write(model.join("sub/w.bin"), b"weights").unwrap();
    let h = hash_path(&model).unwrap();
    std::fs::write(model.join("quark-stage.json"), b"{\"key\":1}").unwrap();
    assert_eq!(h, hash_path(&model).unwrap());
    std::fs::write(model.join("sub/w.bin"), b"weightz").unwrap();
    let h2 = hash_path(&model).unwrap();
    assert_ne!(h, h2);
    std::fs::rename(model.join("sub/w.bin"), model.join("sub/v.bin")).unwrap();
    assert_ne!(h2, hash_path(&model).unwrap());
}

#[test]
fn out_folder_names_the_file_by_key_and_done_means_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, b"x").unwrap();
    let stage = Stage::new("generations", &json!({"n": 1}), &[&input]).unwrap();
    let path = stage.resolve_out(dir.path(), ".parquet");
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        format!("generations-{}.parquet", &stage.key()[..16])
    );
    let named = dir.path().join("mine.parquet");
    assert_eq!(stage.resolve_out(&named, ".parquet"), named);

    assert!(!stage.is_done(&path));
    let mut w = TableWriter::<GenerationRow>::create(&path, &[], stage.meta()).unwrap();
    w.write([testing::generation("a", 0, 0)]).unwrap();
    w.finish().unwrap();
    assert!(stage.is_done(&path));
    let other = Stage::new("generations", &json!({"n": 2}), &[&input]).unwrap();
    assert!(!other.is_done(&path));
}

#[test]
fn atomic_dir_appears_whole_and_replaces_an_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ckpt");
    let stage = Stage::from_hashes("fit", &json!({}), vec![]).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("stale.bin"), b"old").unwrap();
    // A folder the stage did not make is never replaced.
    let d = AtomicDir::create(&out).unwrap();
    let err = format!("{:#}", d.commit(stage.meta()).unwrap_err());
    assert!(err.contains("refusing to replace"), "{err}");
    assert!(out.join("stale.bin").exists());
    // An earlier output of the same stage (another key) is.
    let earlier = Stage::from_hashes("fit", &json!({"old": true}), vec![]).unwrap();
    std::fs::write(
        out.join(quark::stage::DIR_MARKER),
        serde_json::to_string(earlier.meta()).unwrap(),
    )
    .unwrap();
    let d = AtomicDir::create(&out).unwrap();
    write_atomic(&d.dir().join("model.safetensors"), b"new").unwrap();
    assert!(!stage.is_done(&out));
    d.commit(stage.meta()).unwrap();
    assert!(stage.is_done(&out));
    assert!(!out.join("stale.bin").exists());
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"new"
    );
    // An abandoned directory output leaves nothing behind.
    let d = AtomicDir::create(&dir.path().join("other")).unwrap();
    drop(d);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
}

/// Child half of `a_killed_writer_leaves_no_file_under_the_final_name`: writes rows
/// forever to the path in QUARK_TEST_SLOW_WRITER. Only runs when the parent asks.
#[test]
#[ignore = "run by killed_writer test as a child process"]
fn child_slow_writer() {
    let path = std::env::var("QUARK_TEST_SLOW_WRITER").expect("parent sets the path");
    let meta = testing::meta("generations", json!({}));
    let mut w = TableWriter::<GenerationRow>::create(Path::new(&path), &[], &meta).unwrap();
    for i in 0.. {
        // More than a row group each round, so bytes reach the temporary file.
        w.write((0..9000).map(|j| testing::generation("p", j, i)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_writer_leaves_no_file_under_the_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generations.parquet");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "stage::child_slow_writer",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("QUARK_TEST_SLOW_WRITER", &path)
        .spawn()
        .unwrap();
    // Wait until the writer has put real bytes into its temporary file.
    let start = Instant::now();
    loop {
        let written: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        if written > 100_000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs.
    child.wait().unwrap();
    assert!(
        !path.exists(),
        "a half-written file appeared under the final name"
    );
    // A rerun writes the file whole, whatever the dead writer left beside it.
    let meta = testing::meta("generations", json!({}));
    let mut w = TableWriter::<GenerationRow>::create(&path, &[], &meta).unwrap();
    w.write([testing::generation("a", 0, 0)]).unwrap();
    w.finish().unwrap();
    assert_eq!(
        quark::schema::read_table::<GenerationRow>(&path)
            .unwrap()
            .len(),
        1
    );
}
