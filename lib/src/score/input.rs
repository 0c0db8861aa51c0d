//! What quark-score reads, a batch at a time: a generations table, a scored table
//! or pool (whose score columns are kept), or any other Parquet table with the text
//! columns `prompt` and `completion` (texts another tool generated). A scorer sees
//! every row as a [`GenerationRow`]; from another tool's table it gets the prompt and
//! completion, and `prompt_id`, `sample_index`, `iteration` and `completion_tokens`
//! where the table has them (else the row number, 0, 0 and no tokens). Such a
//! table's own columns are carried through to the output unchanged.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;

use crate::schema::{
    col, meta_key, open_batches, read_metadata, GenerationRow, ScoredRow, TableReader,
};

/// One batch of rows to score.
pub(crate) struct Batch {
    /// The rows as a scorer sees them.
    pub rows: Vec<GenerationRow>,
    /// A scored input's earlier score values, aligned with [`ScoringInput::extra`].
    pub earlier: Option<Vec<Vec<Option<f64>>>>,
    /// Another tool's table: the columns carried to the output, for these rows.
    pub carried: Option<RecordBatch>,
}

enum Source {
    Generations(TableReader<GenerationRow>),
    Scored(TableReader<ScoredRow>),
    Foreign(Foreign),
}

/// The rows of one input file.
pub(crate) struct ScoringInput {
    source: Source,
    /// The score columns a scored input already has (empty otherwise).
    pub extra: Vec<String>,
}

impl ScoringInput {
    /// Opens `path`: a scored table, else a generations table, else any table with
    /// `prompt` and `completion`, whose columns named in `replaced` (and `reward` and
    /// `quantile`) are not carried (the scorer writes them afresh).
    pub fn open(path: &Path, replaced: &[String]) -> Result<Self> {
        if let Ok(r) = TableReader::<ScoredRow>::open(path) {
            let extra = r.extra().to_vec();
            return Ok(Self {
                source: Source::Scored(r),
                extra,
            });
        }
        match TableReader::<GenerationRow>::open(path) {
            Ok(r) => {
                return Ok(Self {
                    source: Source::Generations(r),
                    extra: Vec::new(),
                })
            }
            // A file a quark program wrote that does not read as its table is damaged,
            // not another tool's: say what is wrong with it.
            Err(e) if read_metadata(path).is_some_and(|m| m.contains_key(meta_key::STAGE)) => {
                return Err(e)
            }
            Err(_) => {}
        }
        Ok(Self {
            source: Source::Foreign(Foreign::open(path, replaced)?),
            extra: Vec::new(),
        })
    }

    /// Rows in the whole file.
    pub fn num_rows(&self) -> usize {
        match &self.source {
            Source::Generations(r) => r.num_rows(),
            Source::Scored(r) => r.num_rows(),
            Source::Foreign(f) => f.rows,
        }
    }

    /// Whether the rows carry their completion's token ids.
    pub fn has_tokens(&self) -> bool {
        match &self.source {
            Source::Foreign(f) => f.tokens.is_some(),
            _ => true,
        }
    }

    /// For another tool's table: the schema of the columns it carries.
    pub fn carried_schema(&self) -> Option<SchemaRef> {
        match &self.source {
            Source::Foreign(f) => Some(f.carried.clone()),
            _ => None,
        }
    }

    /// The next batch, None at the end.
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        let plain = |rows| Batch {
            rows,
            earlier: None,
            carried: None,
        };
        match &mut self.source {
            Source::Generations(r) => r.next().map(|b| b.map(plain)),
            Source::Scored(r) => r.next().map(|b| {
                b.map(|rows| {
                    let (rows, scores) = rows.into_iter().map(|s| (s.generation, s.scores)).unzip();
                    Batch {
                        rows,
                        earlier: Some(scores),
                        carried: None,
                    }
                })
            }),
            Source::Foreign(f) => f.next(),
        }
    }
}

/// Another tool's table.
struct Foreign {
    path: std::path::PathBuf,
    reader: ParquetRecordBatchReader,
    rows: usize,
    /// Rows read so far (numbers the rows without a `prompt_id`).
    seen: usize,
    /// The carried columns: (index in the file, field).
    carried_columns: Vec<usize>,
    carried: SchemaRef,
    tokens: Option<usize>,
}

/// Whether a column can be read as text.
fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

impl Foreign {
    fn open(path: &Path, replaced: &[String]) -> Result<Self> {
        let (schema, rows, reader) = open_batches(path)?;
        for name in [col::PROMPT, col::COMPLETION] {
            match schema.field_with_name(name) {
                Ok(f) if is_text(f.data_type()) => {}
                Ok(f) => bail!(
                    "{}: column `{name}` has type {}, expected text",
                    path.display(),
                    f.data_type()
                ),
                Err(_) => bail!(
                    "{}: missing column `{name}` (a table to score needs the text columns `{}` and `{}`)",
                    path.display(),
                    col::PROMPT,
                    col::COMPLETION
                ),
            }
        }
        let dropped =
            |n: &str| n == col::REWARD || n == col::QUANTILE || replaced.iter().any(|r| r == n);
        let carried_columns: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| !dropped(schema.field(i).name()))
            .collect();
        let carried = Arc::new(Schema::new(
            carried_columns
                .iter()
                .map(|&i| schema.field(i).as_ref().clone())
                .collect::<Vec<Field>>(),
        ));
        let tokens = schema.index_of(col::COMPLETION_TOKENS).ok().filter(|&i| {
            matches!(schema.field(i).data_type(), DataType::List(f) | DataType::LargeList(f) if f.data_type().is_integer())
        });
        Ok(Self {
            path: path.to_owned(),
            reader,
            rows,
            seen: 0,
            carried_columns,
            carried,
            tokens,
        })
    }

    fn next(&mut self) -> Option<Result<Batch>> {
        let batch = self.reader.next()?;
        Some(
            batch
                .map_err(anyhow::Error::from)
                .and_then(|b| self.views(&b).map(|rows| (b, rows)))
                .and_then(|(b, rows)| {
                    let carried = b
                        .project(&self.carried_columns)
                        .map_err(anyhow::Error::from)?;
                    Ok(Batch {
                        rows,
                        earlier: None,
                        carried: Some(carried),
                    })
                })
                .with_context(|| format!("{}: cannot read rows", self.path.display())),
        )
    }

    /// The rows as a scorer sees them.
    fn views(&mut self, b: &RecordBatch) -> Result<Vec<GenerationRow>> {
        let text = |name: &str| -> Result<Option<ArrayRef>> {
            b.column_by_name(name)
                .map(|c| cast(c, &DataType::Utf8).map_err(|e| anyhow!("column `{name}`: {e}")))
                .transpose()
        };
        let number = |name: &str| -> Option<ArrayRef> {
            b.column_by_name(name)
                .and_then(|c| cast(c, &DataType::UInt32).ok())
        };
        let prompt = text(col::PROMPT)?.expect("checked on open");
        let completion = text(col::COMPLETION)?.expect("checked on open");
        let prompt_id = text(col::PROMPT_ID).ok().flatten();
        let sample_index = number(col::SAMPLE_INDEX);
        let iteration = number(col::ITERATION);
        let tokens = match self.tokens {
            Some(i) => Some(
                cast(
                    b.column(i),
                    &DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
                )
                .map_err(|e| anyhow!("column `{}`: {e}", col::COMPLETION_TOKENS))?,
            ),
            None => None,
        };
        for (name, a) in [(col::PROMPT, &prompt), (col::COMPLETION, &completion)] {
            if let Some(i) = (0..a.len()).find(|&i| a.is_null(i)) {
                bail!(
                    "row {}: `{name}` is null (give the empty text instead)",
                    self.seen + i
                );
            }
        }
        if let Some(t) = &tokens {
            let list = t.as_list::<i32>();
            if let Some(i) =
                (0..list.len()).find(|&i| list.is_valid(i) && list.value(i).null_count() > 0)
            {
                bail!(
                    "row {}: `{}` holds values that are not token ids (negative or too large)",
                    self.seen + i,
                    col::COMPLETION_TOKENS
                );
            }
        }
        let s = |a: &ArrayRef, i: usize| -> String {
            let a = a.as_string::<i32>();
            if a.is_null(i) {
                String::new()
            } else {
                a.value(i).to_owned()
            }
        };
        let n = |a: &Option<ArrayRef>, i: usize| -> u32 {
            a.as_ref()
                .map(|a| a.as_primitive::<UInt32Type>())
                .filter(|a| !a.is_null(i))
                .map_or(0, |a| a.value(i))
        };
        let rows = (0..b.num_rows())
            .map(|i| GenerationRow {
                prompt_id: prompt_id
                    .as_ref()
                    .filter(|a| !a.is_null(i))
                    .map_or_else(|| (self.seen + i).to_string(), |a| s(a, i)),
                prompt: s(&prompt, i),
                prompt_tokens: Vec::new(),
                sample_index: n(&sample_index, i),
                completion: s(&completion, i),
                completion_tokens: tokens
                    .as_ref()
                    .filter(|a| !a.is_null(i))
                    .map(|a| {
                        a.as_list::<i32>()
                            .value(i)
                            .as_primitive::<UInt32Type>()
                            .values()
                            .to_vec()
                    })
                    .unwrap_or_default(),
                token_logprobs: Vec::new(),
                logprob: 0.0,
                finish_reason: String::new(),
                condition: None,
                model: String::new(),
                iteration: n(&iteration, i),
                seed: 0,
            })
            .collect();
        self.seen += b.num_rows();
        Ok(rows)
    }
}
