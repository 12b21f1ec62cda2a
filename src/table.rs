//! Finished tables and the helpers every stage kind reads them with: Parquet batches (all
//! columns or a few), string columns, row identity, JSON rows. Kept out of `stages/` so the
//! engine, the run directory and the kinds share them without importing one another.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Reserved row-identity column, added to every input row.
pub const ID_COL: &str = "_id";

/// One finished table: its Parquet files and schema.
#[derive(Debug, Clone)]
pub struct Table {
    pub id: String,
    pub files: Vec<PathBuf>,
    pub schema: SchemaRef,
}

/// Column of a side table naming the kept row a removed row duplicates (dedup, minhash).
pub const DUP_OF: &str = "_duplicate_of";

/// Read only the named top-level columns of Parquet files (a dedup key and `_id` are a small
/// share of a table's bytes).
pub fn read_columns<'a>(
    files: &'a [PathBuf],
    names: &'a [&'a str],
) -> impl Iterator<Item = Result<RecordBatch>> + 'a {
    read_parquet(files, Some(names))
}

/// Every column of Parquet files, batch by batch, in file order.
pub fn read_batches(files: &[PathBuf]) -> impl Iterator<Item = Result<RecordBatch>> + '_ {
    read_parquet(files, None)
}

/// Batches of Parquet files in order: all columns, or only `names` (top-level) when given.
fn read_parquet<'a>(
    files: &'a [PathBuf],
    names: Option<&'a [&'a str]>,
) -> impl Iterator<Item = Result<RecordBatch>> + 'a {
    files.iter().flat_map(move |p| {
        let it: Box<dyn Iterator<Item = Result<RecordBatch>>> =
            match File::open(p).map_err(|e| Error::io(p, e)).and_then(|f| {
                let mut b = ParquetRecordBatchReaderBuilder::try_new(f)?;
                if let Some(names) = names {
                    let roots: Vec<usize> = names
                        .iter()
                        .filter_map(|n| b.schema().index_of(n).ok())
                        .collect();
                    let mask = parquet::arrow::ProjectionMask::roots(b.parquet_schema(), roots);
                    b = b.with_projection(mask);
                }
                Ok(b.with_batch_size(65536).build()?)
            }) {
                Ok(r) => Box::new(r.map(|b| b.map_err(Error::from))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
        it
    })
}

/// A column of a batch as UTF-8 strings (cast when it is another string or scalar type).
pub fn string_col(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let a = batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("no column {name}")))?;
    let a = cast(a, &DataType::Utf8)?;
    Ok(a.as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
        .clone())
}

/// Position of each wanted `_id` in the inputs (declaration order, then row order).
pub fn input_ordinals(inputs: &[Table], wanted: &HashSet<String>) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    let mut ord = 0u64;
    for t in inputs {
        for b in read_columns(&t.files, &[ID_COL]) {
            let b = b?;
            let ids = string_col(&b, ID_COL)?;
            for i in 0..ids.len() {
                if wanted.contains(ids.value(i)) {
                    out.entry(ids.value(i).to_string()).or_insert(ord);
                }
                ord += 1;
            }
        }
    }
    Ok(out)
}

/// `schema` with extra fields appended.
pub fn with_fields(schema: &Schema, extra: &[Field]) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
    fields.extend(extra.iter().cloned().map(Arc::new));
    Arc::new(Schema::new(fields))
}

/// Is this one of Arrow's string types?
pub fn is_string_type(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Is this a list of strings (or a list whose items are all null, as an empty file reads)?
pub fn is_string_list(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) => {
            is_string_type(f.data_type()) || f.data_type() == &DataType::Null
        }
        _ => false,
    }
}

/// Does the schema have this column?
pub fn has_col(schema: &SchemaRef, name: &str) -> bool {
    schema.field_with_name(name).is_ok()
}

/// Turn a batch into one JSON object per row (template contexts, export records).
pub fn batch_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        w.write(batch)?;
        w.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_slice(&buf)?)
}

/// The file formats of datasets written outside the run's tables (`output`, `export`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutFormat {
    Parquet,
    Jsonl,
    /// One JSON array of records (the `.json` files LLaMA-Factory's own datasets are).
    Json,
}

impl OutFormat {
    /// Where each format of a dataset is written: `path` plus the format's extension; a
    /// relative `path` is inside the run directory.
    pub fn targets(path: &str, formats: &[OutFormat], run_dir: &Path) -> Vec<(OutFormat, PathBuf)> {
        let base = Path::new(path);
        let base = if base.is_absolute() {
            base.to_path_buf()
        } else {
            run_dir.join(base)
        };
        formats
            .iter()
            .map(|f| {
                let mut p = base.clone().into_os_string();
                p.push(".");
                p.push(f.ext());
                (*f, PathBuf::from(p))
            })
            .collect()
    }

    pub fn ext(self) -> &'static str {
        match self {
            OutFormat::Parquet => "parquet",
            OutFormat::Jsonl => "jsonl",
            OutFormat::Json => "json",
        }
    }
}
