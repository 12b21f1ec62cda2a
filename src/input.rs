//! Reading inputs (Parquet, JSONL, JSON arrays, CSV; files or globs) and giving every row its
//! stable `_id`: a hash of the row's content (seeded by the input id) plus an occurrence index
//! for repeated rows, so ids survive reordering and insertions in the source file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::table::ID_COL;
use crate::yaml::{Node, Pos};

/// File formats an input can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Parquet,
    Jsonl,
    Json,
    Csv,
    /// Plain text, one row per line in a column `text` (AutoIF's seed instruction files).
    Text,
}

impl Format {
    pub fn from_path(path: &str) -> Option<Format> {
        let lower = path.to_lowercase();
        let ext = lower.rsplit('.').next()?;
        Some(match ext {
            "parquet" | "pq" => Format::Parquet,
            "jsonl" | "ndjson" => Format::Jsonl,
            "json" => Format::Json,
            "csv" => Format::Csv,
            "txt" => Format::Text,
            _ => return None,
        })
    }
}

/// A seeded random sample of an input: either `n` rows or a `fraction` of them. The choice
/// depends only on each row's `_id` and the seed, never on file order or threads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleSpec {
    /// Number of rows to keep.
    #[serde(default)]
    pub n: Option<u64>,
    /// Share of rows to keep, between 0 and 1.
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Seed of the selection.
    #[serde(default)]
    pub seed: u64,
}

/// A named source of rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// File path or glob, relative to the pipeline file.
    pub path: String,
    /// File format; taken from the file extension when omitted.
    #[serde(default)]
    pub format: Option<Format>,
    /// Keep only the first `limit` rows (after reading all matched files in name order).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Keep a seeded random sample of the rows.
    #[serde(default)]
    pub sample: Option<SampleSpec>,
}

#[derive(Debug)]
pub struct InputDef {
    pub id: String,
    pub pos: Pos,
    pub node: Node,
    pub spec: InputSpec,
}

const BATCH: usize = 8192;

/// What validation learns about an input without writing anything.
#[derive(Debug, Clone)]
pub struct InputScan {
    pub files: Vec<PathBuf>,
    pub format: Format,
    /// Schema of the source columns (without `_id`).
    pub source_schema: SchemaRef,
    /// Blake3 over the files' names and contents: the input's fingerprint.
    pub content_hash: String,
    pub rows: u64,
}

impl InputScan {
    /// The materialized schema: `_id` first, then the source columns.
    pub fn schema(&self) -> SchemaRef {
        let mut fields = vec![Arc::new(Field::new(ID_COL, DataType::Utf8, false))];
        fields.extend(
            self.source_schema
                .fields()
                .iter()
                .filter(|f| f.name() != ID_COL)
                .cloned(),
        );
        Arc::new(Schema::new(fields))
    }
}

/// A problem with an input, said in words a user can act on.
#[derive(Debug, Clone)]
pub struct InputError {
    pub message: String,
    pub hint: Option<String>,
}

fn ierr(message: impl Into<String>, hint: Option<&str>) -> InputError {
    InputError {
        message: message.into(),
        hint: hint.map(str::to_string),
    }
}

/// Resolve the input's path or glob, relative to the pipeline folder.
pub fn resolve(def: &InputDef, dir: &Path) -> Result<Vec<PathBuf>, InputError> {
    let raw = &def.spec.path;
    let full = if Path::new(raw).is_absolute() {
        PathBuf::from(raw)
    } else {
        dir.join(raw)
    };
    let s = full.to_string_lossy().into_owned();
    if raw.contains(['*', '?', '[']) {
        let paths = glob::glob(&s).map_err(|e| {
            ierr(
                format!("bad glob pattern `{raw}`: {}", e.msg),
                Some("globs use *, ? and [..]; check the brackets"),
            )
        })?;
        let mut files: Vec<PathBuf> = paths
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ierr(
                format!("no file matches `{raw}` (looked for {s})"),
                Some("paths are relative to the pipeline file"),
            ));
        }
        Ok(files)
    } else if full.is_file() {
        Ok(vec![full])
    } else {
        Err(ierr(
            format!("input file not found: {s}"),
            Some("paths are relative to the pipeline file; check the spelling"),
        ))
    }
}

fn format_of(def: &InputDef, files: &[PathBuf]) -> Result<Format, InputError> {
    if let Some(f) = def.spec.format {
        return Ok(f);
    }
    Format::from_path(&files[0].to_string_lossy()).ok_or_else(|| {
        ierr(
            format!("cannot tell the format of {}", files[0].display()),
            Some("add `format: jsonl` (or parquet, json, csv, text)"),
        )
    })
}

/// Check an input completely (it is read once: UTF-8, JSON syntax, schema, rows) and hash it.
pub fn scan(def: &InputDef, dir: &Path) -> Result<InputScan, InputError> {
    let files = resolve(def, dir)?;
    let format = format_of(def, &files)?;
    let mut hasher = blake3::Hasher::new();
    for f in &files {
        hasher.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        let mut file = File::open(f).map_err(|e| ierr(format!("{}: {e}", f.display()), None))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| ierr(format!("{}: {e}", f.display()), None))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    let content_hash = hasher.finalize().to_hex().to_string();
    let mut rows = 0u64;
    let mut schema: Option<SchemaRef> = None;
    read(&files, format, &mut |b| {
        rows += b.num_rows() as u64;
        if schema.is_none() {
            schema = Some(b.schema());
        }
        Ok(())
    })?;
    let Some(source_schema) = schema.filter(|_| rows > 0) else {
        return Err(ierr(
            format!(
                "input has no rows ({} file(s) matched, all empty)",
                files.len()
            ),
            Some("check the file; an input must hold at least one row"),
        ));
    };
    Ok(InputScan {
        files,
        format,
        source_schema,
        content_hash,
        rows,
    })
}

/// Stream every batch of the input files to `f`.
pub fn read(
    files: &[PathBuf],
    format: Format,
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    match format {
        Format::Jsonl => read_jsonl(files, f),
        Format::Json => read_json(files, f),
        Format::Csv => read_csv(files, f),
        Format::Parquet => read_parquet(files, f),
        Format::Text => read_text(files, f),
    }
}

/// One row per line (a final line without a newline counts; a final empty one does not), in a
/// column `text` without the line break (`\r\n` or `\n`).
fn read_text(
    files: &[PathBuf],
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
        "text",
        arrow::datatypes::DataType::Utf8,
        false,
    )]));
    for file in files {
        let bytes = read_utf8(file)?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text
            .split_terminator('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        for chunk in lines.chunks(BATCH) {
            let col = arrow::array::StringArray::from(chunk.to_vec());
            let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(col)])
                .map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
            f(b)?;
        }
    }
    Ok(())
}

fn utf8_line<'a>(bytes: &'a [u8], file: &Path, line: usize) -> Result<&'a str, InputError> {
    std::str::from_utf8(bytes).map_err(|e| {
        ierr(
            format!(
                "{}:{line}:{}: text is not valid UTF-8",
                file.display(),
                e.valid_up_to() + 1
            ),
            Some("re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
        )
    })
}

/// A whole file's bytes, refused with the line and column of the first invalid UTF-8 byte.
fn read_utf8(file: &Path) -> Result<Vec<u8>, InputError> {
    let bytes = std::fs::read(file).map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
    if let Err(e) = std::str::from_utf8(&bytes) {
        let prefix = &bytes[..e.valid_up_to()];
        let line = prefix.iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = prefix
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        utf8_line(&bytes[line_start..], file, line)?;
    }
    Ok(bytes)
}

#[derive(Clone, Copy)]
enum JsonlMode {
    Objects,
    Strings,
}

fn read_jsonl(
    files: &[PathBuf],
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    // Pass 1: parse every line (errors with line numbers) and infer one schema for all files.
    let mut mode: Option<JsonlMode> = None;
    let mut values: Vec<serde_json::Value> = Vec::new();
    let mut schema: Option<Schema> = None;
    let infer = |values: &mut Vec<serde_json::Value>,
                 schema: &mut Option<Schema>|
     -> Result<(), InputError> {
        if values.is_empty() {
            return Ok(());
        }
        let s = arrow::json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
            .map_err(|e| {
                ierr(
                    format!("cannot infer a schema: {e}"),
                    Some("make each field's type consistent across rows"),
                )
            })?;
        *schema = Some(match schema.take() {
            None => s,
            Some(prev) => Schema::try_merge([prev, s]).map_err(|e| {
                ierr(
                    format!("rows disagree on a column type: {e}"),
                    Some("make each field's type consistent across rows"),
                )
            })?,
        });
        values.clear();
        Ok(())
    };
    for file in files {
        let r = BufReader::new(
            File::open(file).map_err(|e| ierr(format!("{}: {e}", file.display()), None))?,
        );
        for (i, line) in r.split(b'\n').enumerate() {
            let line = line.map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
            let text = utf8_line(&line, file, i + 1)?;
            let t = text.trim();
            if t.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(t).map_err(|e| {
                ierr(
                    format!(
                        "{}:{}:{}: invalid JSON: {}",
                        file.display(),
                        i + 1,
                        e.column() + (text.len() - text.trim_start().len()),
                        json_msg(&e)
                    ),
                    Some("each line of a .jsonl file must be one JSON object (or one JSON string)"),
                )
            })?;
            let this = match &v {
                serde_json::Value::String(_) => JsonlMode::Strings,
                serde_json::Value::Object(_) => JsonlMode::Objects,
                other => {
                    return Err(ierr(
                        format!(
                            "{}:{}: expected a JSON object or string, found {}",
                            file.display(),
                            i + 1,
                            json_type(other)
                        ),
                        Some(
                            "each line must be an object (columns) or a bare string (a `text` column)",
                        ),
                    ));
                }
            };
            match (&mode, &this) {
                (None, _) => mode = Some(this),
                (Some(JsonlMode::Objects), JsonlMode::Strings)
                | (Some(JsonlMode::Strings), JsonlMode::Objects) => {
                    return Err(ierr(
                        format!(
                            "{}:{}: mixes bare strings and objects",
                            file.display(),
                            i + 1
                        ),
                        Some("use one kind of line per input"),
                    ));
                }
                _ => {}
            }
            if matches!(this, JsonlMode::Objects) {
                values.push(v);
                if values.len() >= 4096 {
                    infer(&mut values, &mut schema)?;
                }
            }
        }
    }
    infer(&mut values, &mut schema)?;
    match mode {
        None => Ok(()),
        Some(JsonlMode::Strings) => {
            let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, true)]));
            let mut buf: Vec<String> = Vec::new();
            for file in files {
                let r = BufReader::new(
                    File::open(file).map_err(|e| ierr(format!("{}: {e}", file.display()), None))?,
                );
                for line in r.lines() {
                    let line = line.map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let s: String =
                        serde_json::from_str(line.trim()).map_err(|e| ierr(e.to_string(), None))?;
                    buf.push(s);
                    if buf.len() >= BATCH {
                        f(string_batch(&schema, &mut buf))?;
                    }
                }
            }
            if !buf.is_empty() {
                f(string_batch(&schema, &mut buf))?;
            }
            Ok(())
        }
        Some(JsonlMode::Objects) => {
            let schema = Arc::new(schema.unwrap_or_else(Schema::empty));
            let mut decoder = arrow::json::ReaderBuilder::new(schema)
                .with_batch_size(BATCH)
                .build_decoder()
                .map_err(|e| ierr(e.to_string(), None))?;
            for file in files {
                let r = BufReader::new(
                    File::open(file).map_err(|e| ierr(format!("{}: {e}", file.display()), None))?,
                );
                for (i, line) in r.split(b'\n').enumerate() {
                    let line = line.map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    decoder
                        .decode(&line)
                        .map_err(|e| ierr(format!("{}:{}: {e}", file.display(), i + 1), None))?;
                    decoder
                        .decode(b"\n")
                        .map_err(|e| ierr(e.to_string(), None))?;
                    if decoder.len() >= BATCH
                        && let Some(b) = decoder
                            .flush()
                            .map_err(|e| ierr(format!("{}:{}: {e}", file.display(), i + 1), None))?
                    {
                        f(b)?;
                    }
                }
            }
            if let Some(b) = decoder.flush().map_err(|e| ierr(e.to_string(), None))? {
                f(b)?;
            }
            Ok(())
        }
    }
}

/// serde_json's message without its own ` at line L column C` (the caller gives the place).
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).unwrap_or(&s).to_string()
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn string_batch(schema: &SchemaRef, buf: &mut Vec<String>) -> RecordBatch {
    let arr: StringArray = buf.drain(..).map(Some).collect();
    RecordBatch::try_new(schema.clone(), vec![Arc::new(arr) as ArrayRef]).expect("one Utf8 column")
}

fn read_json(
    files: &[PathBuf],
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    let mut all = Vec::new();
    for file in files {
        let bytes = read_utf8(file)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ierr(
                format!(
                    "{}:{}:{}: invalid JSON: {}",
                    file.display(),
                    e.line(),
                    e.column(),
                    json_msg(&e)
                ),
                Some("a .json input must be one JSON array of objects"),
            )
        })?;
        match v {
            serde_json::Value::Array(items) => all.extend(items),
            other => {
                return Err(ierr(
                    format!(
                        "{}: expected a JSON array, found {}",
                        file.display(),
                        json_type(&other)
                    ),
                    Some("use .jsonl for one object per line"),
                ));
            }
        }
    }
    if all.is_empty() {
        return Ok(());
    }
    if all.iter().all(|v| v.is_string()) {
        let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, true)]));
        let mut buf: Vec<String> = all
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        return f(string_batch(&schema, &mut buf));
    }
    if let Some(bad) = all.iter().position(|v| !v.is_object()) {
        return Err(ierr(
            format!(
                "element {bad} of the array is {}, not an object",
                json_type(&all[bad])
            ),
            Some("every element must be an object"),
        ));
    }
    let schema = arrow::json::reader::infer_json_schema_from_iterator(all.iter().map(Ok))
        .map_err(|e| ierr(format!("cannot infer a schema: {e}"), None))?;
    let mut decoder = arrow::json::ReaderBuilder::new(Arc::new(schema))
        .with_batch_size(BATCH)
        .build_decoder()
        .map_err(|e| ierr(e.to_string(), None))?;
    for chunk in all.chunks(BATCH) {
        decoder
            .serialize(chunk)
            .map_err(|e| ierr(e.to_string(), None))?;
        if let Some(b) = decoder.flush().map_err(|e| ierr(e.to_string(), None))? {
            f(b)?;
        }
    }
    Ok(())
}

fn read_csv(
    files: &[PathBuf],
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    let format = arrow::csv::reader::Format::default().with_header(true);
    let mut schema: Option<SchemaRef> = None;
    for file in files {
        let bytes = read_utf8(file)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (s, _) = format
            .infer_schema(std::io::Cursor::new(&bytes), None)
            .map_err(|e| {
                ierr(
                    format!("{}: {e}", file.display()),
                    Some("check the CSV header and quoting"),
                )
            })?;
        let s = Arc::new(s);
        if schema.is_none() {
            schema = Some(s.clone());
        }
        let reader = arrow::csv::ReaderBuilder::new(schema.clone().unwrap_or(s))
            .with_format(format.clone())
            .with_batch_size(BATCH)
            .build(std::io::Cursor::new(bytes))
            .map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
        for b in reader {
            f(b.map_err(|e| {
                ierr(
                    format!("{}: {e}", file.display()),
                    Some("check the CSV quoting and column count"),
                )
            })?)?;
        }
    }
    Ok(())
}

fn read_parquet(
    files: &[PathBuf],
    f: &mut dyn FnMut(RecordBatch) -> Result<(), InputError>,
) -> Result<(), InputError> {
    for file in files {
        let fh = File::open(file).map_err(|e| ierr(format!("{}: {e}", file.display()), None))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(fh)
            .and_then(|b| b.with_batch_size(BATCH).build())
            .map_err(|e| {
                ierr(
                    format!("{}: not a readable Parquet file: {e}", file.display()),
                    Some("the file may be truncated or not Parquet; re-export it"),
                )
            })?;
        for b in reader {
            f(b.map_err(|e| {
                ierr(
                    format!("{}: corrupt Parquet data: {e}", file.display()),
                    None,
                )
            })?)?;
        }
    }
    Ok(())
}

/// Per-row content hashes, seeded with the input id so equal rows of two inputs differ.
fn row_hashes(batch: &RecordBatch, seed: u64) -> Vec<u64> {
    let cols: Vec<ArrayRef> = batch.columns().to_vec();
    let fields: Vec<SortField> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    if let Ok(conv) = RowConverter::new(fields)
        && let Ok(rows) = conv.convert_columns(&cols)
    {
        return rows
            .iter()
            .map(|r| xxhash_rust::xxh3::xxh3_64_with_seed(r.as_ref(), seed))
            .collect();
    }
    // Types the row format cannot encode: hash the displayed values instead.
    let opts = arrow::util::display::FormatOptions::default();
    let fmts: Vec<_> = cols
        .iter()
        .filter_map(|c| arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &opts).ok())
        .collect();
    (0..batch.num_rows())
        .map(|i| {
            let mut s = String::new();
            for fm in &fmts {
                s.push_str(&fm.value(i).to_string());
                s.push('\u{1f}');
            }
            xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), seed)
        })
        .collect()
}

/// Write the input as a Parquet table with `_id` into `out`, applying sample and limit.
/// Returns the number of rows written.
pub fn materialize(def: &InputDef, scan: &InputScan, out: &Path) -> Result<u64, InputError> {
    let seed = xxhash_rust::xxh3::xxh3_64(def.id.as_bytes());
    let schema = scan.schema();
    let has_own_id = scan.source_schema.field_with_name(ID_COL).is_ok();
    let mut occurrences: HashMap<u64, u32> = HashMap::new();
    let sample = def.spec.sample.clone();
    let score = |id: &str, s: u64| xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), s);

    let with_ids =
        |b: &RecordBatch, occ: &mut HashMap<u64, u32>| -> Result<RecordBatch, InputError> {
            let ids: ArrayRef = if has_own_id {
                arrow::compute::cast(b.column_by_name(ID_COL).expect("checked"), &DataType::Utf8)
                    .map_err(|e| ierr(e.to_string(), None))?
            } else {
                let hashes = row_hashes(b, seed);
                let arr: StringArray = hashes
                    .iter()
                    .map(|h| {
                        let k = occ.entry(*h).or_insert(0);
                        let id = if *k == 0 {
                            format!("{h:016x}")
                        } else {
                            format!("{h:016x}-{k}")
                        };
                        *k += 1;
                        Some(id)
                    })
                    .collect();
                Arc::new(arr)
            };
            let mut cols = vec![ids];
            for (i, fld) in b.schema().fields().iter().enumerate() {
                if fld.name() != ID_COL {
                    cols.push(b.column(i).clone());
                }
            }
            RecordBatch::try_new(schema.clone(), cols).map_err(|e| ierr(e.to_string(), None))
        };

    // With `sample.n`, a first pass finds the score threshold of the n smallest ids.
    let threshold: Option<u64> = match &sample {
        Some(s) if s.n.is_some() => {
            let n = s.n.unwrap_or(0) as usize;
            let mut scores = Vec::new();
            let mut occ = HashMap::new();
            read(&scan.files, scan.format, &mut |b| {
                let b = with_ids(&b, &mut occ)?;
                let ids = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("utf8 ids");
                scores.extend(ids.iter().flatten().map(|id| score(id, s.seed)));
                Ok(())
            })?;
            scores.sort_unstable();
            Some(if n == 0 {
                0
            } else {
                scores.get(n - 1).copied().unwrap_or(u64::MAX)
            })
        }
        Some(s) => Some(((s.fraction.unwrap_or(1.0).clamp(0.0, 1.0)) * u64::MAX as f64) as u64),
        None => None,
    };
    let keep_none = matches!(&sample, Some(s) if s.n == Some(0));

    let path = out.join("part-00000.parquet");
    let file = File::create(&path).map_err(|e| ierr(format!("{}: {e}", path.display()), None))?;
    let mut w = crate::engine::parquet_writer(file, schema.clone())
        .map_err(|e| ierr(e.to_string(), None))?;
    let mut written = 0u64;
    let limit = def.spec.limit.unwrap_or(u64::MAX);
    read(&scan.files, scan.format, &mut |b| {
        if written >= limit {
            return Ok(());
        }
        let mut b = with_ids(&b, &mut occurrences)?;
        if let (Some(t), Some(s)) = (threshold, &sample) {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8 ids");
            let mask: arrow::array::BooleanArray = ids
                .iter()
                .map(|id| Some(!keep_none && id.is_some_and(|id| score(id, s.seed) <= t)))
                .collect();
            b = arrow::compute::filter_record_batch(&b, &mask)
                .map_err(|e| ierr(e.to_string(), None))?;
        }
        let take = (limit - written).min(b.num_rows() as u64) as usize;
        let b = b.slice(0, take);
        written += take as u64;
        w.write(&b).map_err(|e| ierr(e.to_string(), None))
    })?;
    w.close().map_err(|e| ierr(e.to_string(), None))?;
    Ok(written)
}
