//! Prompt input in the formats people have: Parquet with a `text` or `prompt`
//! column, JSON lines with `prompt.text` (RealToxicityPrompts) or `text`, or plain
//! text lines. Each prompt gets a stable `prompt_id`: the input's own id where it has
//! one (`prompt_id` or `id`), else a short blake3 of the text.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

use crate::schema::{col, PromptRow};

/// The id of a prompt that has none: the first 16 hex digits of blake3(text).
pub fn prompt_id(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..16].to_owned()
}

/// Reads prompts from `path`, choosing the format by extension (`.parquet`,
/// `.jsonl`/`.json`/`.ndjson`, `.txt`) or, for other names, by content; plain text
/// is one prompt a line.
/// Empty lines of a text file are skipped; an empty file gives no prompts.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let format = match ext.as_str() {
        "parquet" => Format::Parquet,
        "jsonl" | "json" | "ndjson" => Format::JsonLines,
        "txt" | "text" => Format::Text,
        _ => sniff(path)?,
    };
    let rows = match format {
        Format::Parquet => read_parquet(path, file),
        Format::JsonLines => read_lines(path, file, parse_json_line),
        Format::Text => read_lines(path, file, |line| {
            Ok(Some((None, line.trim_end_matches('\r').to_owned())))
        }),
    }?;
    unique_ids(path, rows)
}

/// Makes ids unique: a text that appears again gets the id of "text#n" (its n-th
/// repeat), so that its samples are rows of their own with their own random stream.
/// Ids the input gives must be unique already.
fn unique_ids(path: &Path, mut rows: Vec<PromptRow>) -> Result<Vec<PromptRow>> {
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::new();
    for r in &mut rows {
        if taken.insert(r.prompt_id.clone()) {
            continue;
        }
        if r.prompt_id != prompt_id(&r.prompt) {
            bail!(
                "{}: prompt id `{}` appears more than once",
                path.display(),
                r.prompt_id
            );
        }
        // The first "text#n" whose id is not taken yet.
        let mut n = 1;
        while !taken.insert(prompt_id(&format!("{}#{n}", r.prompt))) {
            n += 1;
        }
        r.prompt_id = prompt_id(&format!("{}#{n}", r.prompt));
    }
    Ok(rows)
}

enum Format {
    Parquet,
    JsonLines,
    Text,
}

/// Guesses the format of a file without a known extension (standard input is
/// spooled to one): Parquet by its magic bytes, JSON lines by a leading `{`.
fn sniff(path: &Path) -> Result<Format> {
    let mut head = [0u8; 256];
    let n = File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let head = &head[..n];
    Ok(if head.starts_with(b"PAR1") {
        Format::Parquet
    } else if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        Format::JsonLines
    } else {
        Format::Text
    })
}

type Parsed = Option<(Option<String>, String)>;

fn read_lines(
    path: &Path,
    file: File,
    parse: impl Fn(&str) -> Result<Parsed>,
) -> Result<Vec<PromptRow>> {
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|e| anyhow!("{}:{number}: not UTF-8 ({e})", path.display()))?;
        let line = line.strip_suffix('\n').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse(line).map_err(|e| anyhow!("{}:{number}: {e}", path.display()))?;
        if let Some((id, text)) = parsed {
            out.push(PromptRow {
                prompt_id: id.unwrap_or_else(|| prompt_id(&text)),
                prompt: text,
            });
        }
    }
    Ok(out)
}

fn parse_json_line(line: &str) -> Result<Parsed> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow!("invalid JSON ({e})"))?;
    let text = match (&v["prompt"], &v["text"]) {
        (Value::Object(p), _) => p.get("text").and_then(Value::as_str),
        (Value::String(s), _) => Some(s.as_str()),
        (_, Value::String(s)) => Some(s.as_str()),
        _ => None,
    }
    .ok_or_else(|| anyhow!("no `prompt.text`, `prompt` or `text` string"))?;
    let id = match (&v[col::PROMPT_ID], &v["id"]) {
        (Value::String(s), _) | (Value::Null, Value::String(s)) => Some(s.clone()),
        (Value::Number(n), _) | (Value::Null, Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Some((id, text.to_owned())))
}

fn read_parquet(path: &Path, file: File) -> Result<Vec<PromptRow>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let schema = builder.schema().clone();
    let text_col = ["text", col::PROMPT]
        .into_iter()
        .find(|c| {
            schema
                .field_with_name(c)
                .is_ok_and(|f| is_string(f.data_type()))
        })
        .ok_or_else(|| {
            anyhow!(
                "{}: missing column `text` or `prompt` (a string)",
                path.display()
            )
        })?;
    let id_col = [col::PROMPT_ID, "id"].into_iter().find(|c| {
        schema
            .field_with_name(c)
            .is_ok_and(|f| is_string(f.data_type()))
    });
    let mut out = Vec::new();
    for batch in builder.build()? {
        let batch = batch.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let cast = |name: &str| {
            arrow::compute::cast(
                batch.column_by_name(name).expect("checked"),
                &DataType::Utf8,
            )
        };
        let texts = cast(text_col)?;
        let texts = texts.as_string::<i32>();
        let ids = id_col.map(cast).transpose()?;
        for i in 0..batch.num_rows() {
            if texts.is_null(i) {
                bail!("{}: row {i} has a null `{text_col}`", path.display());
            }
            let text = texts.value(i).to_owned();
            let id = ids
                .as_ref()
                .map(|a| a.as_string::<i32>())
                .filter(|a| !a.is_null(i))
                .map(|a| a.value(i).to_owned());
            out.push(PromptRow {
                prompt_id: id.unwrap_or_else(|| prompt_id(&text)),
                prompt: text,
            });
        }
    }
    Ok(out)
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}
