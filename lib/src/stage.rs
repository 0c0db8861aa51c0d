//! Content-hashed stages: a stage's output is a pure function of its inputs and
//! parameters, so its key is blake3(stage name, format version, canonical JSON
//! parameters, the content hash of each input). A finished output with the same key
//! is never recomputed. Outputs are written to a temporary name in the same folder
//! and renamed into place, so a crash never leaves a half file under a final name.
//!
//! This module is the floor every stage stands on and uses nothing else of the
//! crate. It owns the metadata keys that record how an output was made (which
//! [`crate::schema`] stamps into each table file's footer, and a directory output
//! writes into its marker file) and the names of the files of a directory output
//! that its content hash leaves out.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// Metadata keys every table file carries.
pub mod meta_key {
    pub const STAGE: &str = "quark.stage";
    pub const VERSION: &str = "quark.version";
    pub const KEY: &str = "quark.key";
    pub const PARAMS: &str = "quark.params";
    pub const INPUTS: &str = "quark.inputs";
}

/// Bumped whenever a stage's output format or semantics change, so that old
/// outputs are not mistaken for new ones.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the marker that a finished directory output (a checkpoint) carries.
pub const DIR_MARKER: &str = "quark-stage.json";

/// What every output records about how it was made.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Meta {
    pub stage: String,
    pub version: u32,
    pub key: String,
    /// Canonical JSON of the parameters.
    pub params: String,
    /// Content hashes of the inputs, in the order given.
    pub inputs: Vec<String>,
}

/// Serialises a JSON value with object keys sorted and no whitespace, so that
/// equal parameters always give equal bytes.
pub fn canonical_json(value: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                Value::Object(keys.into_iter().map(|k| (k.clone(), sort(&m[k]))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(value)).expect("JSON values serialize")
}

/// Files at least this large are hashed memory-mapped on all cores.
const PARALLEL_HASH_BYTES: u64 = 1 << 20;

/// The blake3 hash of one file's content, streamed (memory-mapped and hashed on all
/// cores for large files).
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let len = fs::metadata(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .len();
    let mut h = blake3::Hasher::new();
    if len >= PARALLEL_HASH_BYTES {
        h.update_mmap_rayon(path)
    } else {
        File::open(path).and_then(|f| h.update_reader(f))
    }
    .map(|_| ())
    .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(h.finalize())
}

/// The file in which a directory output records its run, step by step (a fit's
/// metrics: throughput differs on every run).
pub const METRICS_FILE: &str = "metrics.parquet";

/// Files of a stage folder that record how it was made rather than what it is, left
/// out of its content hash: the stage marker (so that a checkpoint hashes the same
/// before and after it is marked finished) and [`METRICS_FILE`] (a rerun fit must
/// give the same key downstream).
pub const RECORD_FILES: [&str; 2] = [DIR_MARKER, METRICS_FILE];

/// The content hash of a file, or of a directory (every regular file under it but
/// the [`RECORD_FILES`], by sorted relative path, name and content).
pub fn hash_path(path: &Path) -> Result<blake3::Hash> {
    let meta = fs::metadata(path).with_context(|| format!("{}: not found", path.display()))?;
    if !meta.is_dir() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    collect_files(path, path, &mut files)?;
    files.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"quark-dir\0");
    for rel in files {
        let name = rel.to_string_lossy();
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(hash_file(&path.join(&rel))?.as_bytes());
    }
    Ok(h.finalize())
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if RECORD_FILES.contains(&name.as_ref()) || name.starts_with(".tmp-") {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).expect("under root").to_owned());
        }
    }
    Ok(())
}

/// One run of a stage: its name, parameters and inputs, and the key they give.
#[derive(Clone, Debug)]
pub struct Stage {
    meta: Meta,
}

impl Stage {
    /// Computes the key of stage `name` with `params` over the content of `inputs`
    /// (files or directories).
    pub fn new(name: &str, params: &impl Serialize, inputs: &[&Path]) -> Result<Self> {
        let hashes = inputs
            .iter()
            .map(|p| hash_path(p).map(|h| h.to_hex().to_string()))
            .collect::<Result<Vec<_>>>()?;
        Self::from_hashes(name, params, hashes)
    }

    /// As [`Stage::new`], from input content hashes already known.
    pub fn from_hashes(name: &str, params: &impl Serialize, inputs: Vec<String>) -> Result<Self> {
        let params = canonical_json(&serde_json::to_value(params)?);
        let mut h = blake3::Hasher::new();
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(&FORMAT_VERSION.to_le_bytes());
        h.update(params.as_bytes());
        h.update(b"\0");
        for i in &inputs {
            h.update(i.as_bytes());
            h.update(b"\0");
        }
        Ok(Self {
            meta: Meta {
                stage: name.to_owned(),
                version: FORMAT_VERSION,
                key: h.finalize().to_hex().to_string(),
                params,
                inputs,
            },
        })
    }

    /// The full hex key.
    pub fn key(&self) -> &str {
        &self.meta.key
    }

    /// What the output records about this run.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Where the output goes for `--out out`: inside a folder (an existing one, or a
    /// path ending in `/`) the file is named `{stage}-{key[..16]}{ext}`; any other
    /// path is used as given.
    pub fn resolve_out(&self, out: &Path, ext: &str) -> PathBuf {
        let is_dir = out.is_dir() || out.as_os_str().to_string_lossy().ends_with('/');
        if is_dir {
            out.join(format!(
                "{}-{}{}",
                self.meta.stage,
                &self.meta.key[..16],
                ext
            ))
        } else {
            out.to_owned()
        }
    }

    /// Where a directory output (a checkpoint) goes for `--out out`: `out` itself when
    /// it is an output of this stage already (it holds a [`DIR_MARKER`] of this
    /// stage; a different key replaces it) or does not exist; inside it, named by key,
    /// when it is any other folder or ends in `/`. The output of another stage (an
    /// imported model, say) is refused: a checkpoint inside it would change its
    /// content, and so its key.
    pub fn resolve_out_dir(&self, out: &Path) -> Result<PathBuf> {
        match marker_stage(out) {
            Some(stage) if stage == self.meta.stage => Ok(out.to_owned()),
            Some(stage) => bail!(
                "{}: is a `{stage}` output, not a folder for `{}` outputs (give another --out)",
                out.display(),
                self.meta.stage
            ),
            None => Ok(self.resolve_out(out, "")),
        }
    }

    /// Refuses to replace a folder at `out` that this stage did not make: one is
    /// replaced only when it is empty or an earlier output of this stage (a
    /// different key), so that no folder of the user's is ever deleted.
    pub fn check_replaceable(&self, out: &Path) -> Result<()> {
        check_replaceable(&self.meta.stage, out)
    }

    /// Whether `path` is a finished output of exactly this run: a Parquet file whose
    /// footer carries this key, or a directory whose marker does. Says so on stderr
    /// when it is (the stage is skipped).
    pub fn is_done(&self, path: &Path) -> bool {
        let done = self.has_output(path);
        if done {
            eprintln!(
                "{}: {} is up to date (key {}), skipped",
                self.meta.stage,
                path.display(),
                &self.meta.key[..16]
            );
        }
        done
    }

    fn has_output(&self, path: &Path) -> bool {
        if path.is_dir() {
            let marker = path.join(DIR_MARKER);
            fs::read(marker)
                .ok()
                .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
                .is_some_and(|m| m.key == self.meta.key)
        } else {
            read_metadata(path)
                .and_then(|m| m.get(meta_key::KEY).cloned())
                .is_some_and(|k| k == self.meta.key)
        }
    }
}

/// [`Stage::check_replaceable`] for the stage named `stage`.
fn check_replaceable(stage: &str, out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{}: exists and is not a folder", out.display());
    }
    if marker_stage(out).is_some_and(|s| s == stage) {
        return Ok(());
    }
    let empty = fs::read_dir(out)
        .with_context(|| format!("{}: cannot list", out.display()))?
        .next()
        .is_none();
    if !empty {
        bail!(
            "{}: exists and is not an earlier `{stage}` output; refusing to replace it (give a new folder)",
            out.display(),
        );
    }
    Ok(())
}

/// The stage named by the marker of the directory output at `dir`, if it is one.
fn marker_stage(dir: &Path) -> Option<String> {
    fs::read(dir.join(DIR_MARKER))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
        .map(|m| m.stage)
}

/// Creates the folder `path` will be written in, so that an unusable output path
/// fails before the work rather than after it.
pub fn prepare_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fs::create_dir_all(p)
            .with_context(|| format!("{}: cannot create the output folder", p.display())),
        _ => Ok(()),
    }
}

/// Reads only the key-value metadata of a Parquet file (None if it is not one).
pub fn read_metadata(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    use parquet::file::reader::FileReader;
    let file = File::open(path).ok()?;
    let reader = parquet::file::serialized_reader::SerializedFileReader::new(file).ok()?;
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    Some(
        kv.iter()
            .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
            .collect(),
    )
}

/// A file written under a temporary name beside its final path and renamed into
/// place by [`AtomicFile::commit`]. Dropped without commit, it removes itself.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

/// The temporary sibling of `path` for this process: `.tmp-<pid>-<host>-<name>`. The
/// temporary siblings of `path` that a killed run left (their process is gone) are
/// removed first: only those of the same final name, so of the same stage and key.
fn temp_sibling(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .with_context(|| format!("{}: cannot create folder", parent.display()))?;
    remove_stale_temps(&parent, &name);
    Ok(parent.join(format!(".tmp-{}-{}-{name}", std::process::id(), host_tag())))
}

/// This machine, in the names of temporary files (`.tmp-<pid>-<host>-<name>`): a
/// folder shared between machines holds other machines' runs, whose process ids mean
/// nothing here.
pub fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        blake3::hash(host.trim().as_bytes()).to_hex()[..8].to_owned()
    })
}

/// Removes `.tmp-<pid>-<host>-<name>` (and its `.old` twin) in `dir` for every pid
/// of this machine that is no longer a running process. Best effort: what cannot be
/// removed stays.
fn remove_stale_temps(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let here = host_tag();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let Some((pid, rest)) = file.strip_prefix(".tmp-").and_then(|r| r.split_once('-')) else {
            continue;
        };
        let Some((host, tail)) = rest.split_once('-') else {
            continue;
        };
        let ours = tail == name || tail.strip_suffix(".old") == Some(name);
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !ours || host != here || pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Whether a process with this id runs (on Linux, /proc knows; elsewhere every
/// process is taken to run, so that nothing of a live run is removed).
fn process_alive(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

impl AtomicFile {
    /// Opens a temporary file beside `path` (creating the folder).
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_sibling(path)?;
        let file =
            File::create(&tmp).with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(Self {
            file: Some(file),
            tmp,
            path: path.to_owned(),
        })
    }

    /// Syncs the data and renames it to the final path (replacing any old file).
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all()
            .with_context(|| format!("{}: cannot sync", self.path.display()))?;
        drop(file);
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("open").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("open").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a small file atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .with_context(|| format!("{}: write failed", path.display()))?;
    f.commit()
}

/// Writes `path` atomically through `write`, which writes the file at the temporary
/// path it is given, in place (for writers that take a path, not a stream): an
/// [`AtomicFile`] that is synced and renamed on success and removed otherwise.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file = AtomicFile::create(path)?;
    write(&file.tmp)?;
    file.commit()
}

/// A directory output (a checkpoint) built under a temporary name and renamed into
/// place by [`AtomicDir::commit`], which also writes the stage marker.
pub struct AtomicDir {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Creates an empty temporary directory beside `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_sibling(path)?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(Self {
            tmp,
            path: path.to_owned(),
            committed: false,
        })
    }

    /// The (temporary) folder to write the output's files into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes the marker for `meta`, replaces any old directory at the final path
    /// and renames this one into place.
    pub fn commit(mut self, meta: &Meta) -> Result<PathBuf> {
        write_atomic(
            &self.tmp.join(DIR_MARKER),
            serde_json::to_string_pretty(meta)?.as_bytes(),
        )?;
        if self.path.exists() {
            check_replaceable(&meta.stage, &self.path)?;
            // Move the old one aside first so the final name is never half-deleted:
            // beside this run's temporary folder, as its `.old` twin.
            let mut old = self.tmp.clone().into_os_string();
            old.push(".old");
            fs::rename(&self.path, &old)?;
            fs::remove_dir_all(&old)?;
        }
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("{}: cannot rename into place", self.path.display()))?;
        self.committed = true;
        Ok(self.path.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Copies standard input into a file under `dir` named by its content hash and
/// returns that path, so that `-` inputs can be hashed and re-read like files.
pub fn spool_stdin(dir: &Path) -> Result<PathBuf> {
    let mut bytes = Vec::new();
    io::stdin()
        .read_to_end(&mut bytes)
        .context("<stdin>: cannot read")?;
    let path = dir.join(format!(
        "stdin-{}",
        &blake3::hash(&bytes).to_hex().as_str()[..16]
    ));
    if !path.exists() {
        write_atomic(&path, &bytes)?;
    }
    Ok(path)
}
