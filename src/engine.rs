//! The boundary between the two engines. DataFusion runs SQL (stages, `ifloom sql`,
//! statistics); Polars runs `transform` stages. They meet at Parquet files, and the Arrow
//! schema is the one currency for validation: a Polars plan is checked by building it over an
//! empty frame of the parent's schema, and its result schema is read back through Parquet.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use polars::prelude::{DataFrame, ParquetReader, ParquetWriter, SerReader};

use crate::error::{Error, Result};
use crate::table::Table;

/// Shared settings for running queries.
#[derive(Debug, Clone)]
pub struct Engine {
    /// DataFusion's memory pool; sorts, joins and aggregations spill to disk beyond it.
    pub memory_limit: usize,
    pub spill_dir: Option<PathBuf>,
    pub target_partitions: usize,
    pub rt: tokio::runtime::Handle,
    /// The response cache named on the command line (`--cache`); `None`: the default of the
    /// kind that keeps one (the llm stage's is `$IFLOOM_CACHE`, else under `~/.cache/ifloom`).
    pub cache_path: Option<PathBuf>,
    /// SQL functions every session gets: the engine names none itself, the caller passes the
    /// registry's ([`crate::registry::functions`]).
    pub functions: Arc<[ScalarUDF]>,
}

impl Engine {
    pub fn new(rt: tokio::runtime::Handle, functions: Vec<ScalarUDF>) -> Self {
        Engine {
            memory_limit: 2 << 30,
            spill_dir: None,
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            rt,
            cache_path: None,
            functions: functions.into(),
        }
    }

    /// A DataFusion session with a bounded, spilling memory pool.
    pub fn session(&self) -> Result<SessionContext> {
        let mut builder = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(self.memory_limit)));
        if let Some(dir) = &self.spill_dir {
            // DataFusion creates a missing spill folder with `create_dir` after checking that
            // it does not exist: two stages starting at once raced, and the loser failed with
            // "File exists". Created here first, idempotently.
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            builder = builder.with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![dir.clone()])),
            );
        }
        let runtime = builder.build_arc()?;
        let mut config = SessionConfig::new()
            .with_target_partitions(self.target_partitions)
            .with_information_schema(true);
        // Same row-group bound as the files ifloom writes itself (see `ROW_GROUP_ROWS`).
        config.options_mut().execution.parquet.max_row_group_size = ROW_GROUP_ROWS;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for f in self.functions.iter() {
            ctx.register_udf(f.clone());
        }
        Ok(ctx)
    }

    /// Run a future to completion from a blocking (non-runtime) thread.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Register a finished table's Parquet files under its id.
pub async fn register(ctx: &SessionContext, table: &Table) -> Result<()> {
    let paths: Vec<String> = table
        .files
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let opts = ParquetReadOptions::default().schema(&table.schema);
    let df = ctx.read_parquet(paths, opts).await?;
    ctx.register_table(table.id.as_str(), df.into_view())?;
    Ok(())
}

/// Parquet part files of a stage folder, in name order.
pub fn list_parts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut parts = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "parquet") {
            parts.push(p);
        }
    }
    parts.sort();
    Ok(parts)
}

/// Rename whatever Parquet files a writer produced into `part-00000.parquet`, ...; write an
/// empty file with `schema` when there were none, so every table has at least one part.
pub fn normalize_parts(dir: &Path, schema: &SchemaRef) -> Result<Vec<PathBuf>> {
    let parts = list_parts(dir)?;
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let target = dir.join(format!("part-{i:05}.parquet"));
        if *p != target {
            std::fs::rename(p, &target).map_err(|e| Error::io(p, e))?;
        }
        out.push(target);
    }
    if out.is_empty() {
        let target = dir.join("part-00000.parquet");
        write_empty(&target, schema)?;
        out.push(target);
    }
    Ok(out)
}

/// Rows per Parquet row group in the files ifloom writes itself. The parquet crate's default
/// (1,048,576) buffers a whole million-row table in memory before the first flush, and a table
/// of one row group is scanned by one core; 128k rows keeps the writer's buffer to tens of MB
/// and gives DataFusion row groups to split between cores.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Writer settings for every Parquet file ifloom writes: LZ4 (raw) and bounded row groups.
/// Stage tables are written once and read a few times on the same disk, so write speed wins:
/// ZSTD level 1 made the 1M-row dedup stage 2.4 s -> 3.6 s (benches/engine.rs); LZ4 writes
/// several times faster for files ~1.3x larger. Every Parquet reader trainers use (pyarrow,
/// Polars, DuckDB, Spark) reads LZ4_RAW.
pub fn writer_props() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::LZ4_RAW)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

/// A Parquet writer with [`writer_props`].
pub fn parquet_writer<W: std::io::Write + Send>(w: W, schema: SchemaRef) -> Result<ArrowWriter<W>> {
    Ok(ArrowWriter::try_new(w, schema, Some(writer_props()))?)
}

pub fn write_empty(path: &Path, schema: &SchemaRef) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let w = parquet_writer(f, schema.clone())?;
    w.close()?;
    Ok(())
}

/// A Parquet part written batch by batch (see [`writer_props`]), created with the first
/// batch's schema, so a stage whose output or side table stays empty still ends with a valid
/// empty file.
pub struct LazyPart {
    path: PathBuf,
    w: Option<ArrowWriter<File>>,
}

impl LazyPart {
    pub fn new(path: PathBuf) -> Self {
        LazyPart { path, w: None }
    }

    pub fn write(&mut self, b: &arrow::array::RecordBatch) -> Result<()> {
        let w = match &mut self.w {
            Some(w) => w,
            None => {
                let f = File::create(&self.path).map_err(|e| Error::io(&self.path, e))?;
                self.w.insert(parquet_writer(f, b.schema())?)
            }
        };
        w.write(b)?;
        Ok(())
    }

    /// Close the file, or write an empty one with `schema` when no batch came.
    pub fn finish(self, schema: &SchemaRef) -> Result<()> {
        match self.w {
            Some(w) => {
                w.close()?;
                Ok(())
            }
            None => write_empty(&self.path, schema),
        }
    }
}

/// Read the Arrow schema stored in a Parquet file.
pub fn parquet_schema(path: &Path) -> Result<SchemaRef> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)?;
    Ok(b.schema().clone())
}

/// Row count from Parquet footers (no data read).
pub fn count_rows(files: &[PathBuf]) -> Result<u64> {
    let mut n = 0u64;
    for p in files {
        let f = File::open(p).map_err(|e| Error::io(p, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(f)?;
        n += b.metadata().file_metadata().num_rows() as u64;
    }
    Ok(n)
}

/// An empty Polars frame with the given Arrow schema (through an in-memory Parquet file, so
/// the type mapping is exactly the one used when reading real data).
pub fn empty_polars_frame(schema: &SchemaRef) -> Result<DataFrame> {
    let mut buf = Vec::new();
    {
        let w = ArrowWriter::try_new(&mut buf, schema.clone(), None)?;
        w.close()?;
    }
    Ok(ParquetReader::new(Cursor::new(buf)).finish()?)
}

/// The Arrow schema Polars writes for a frame, read back from an in-memory Parquet file.
pub fn polars_arrow_schema(df: &mut DataFrame) -> Result<SchemaRef> {
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf).finish(df)?;
    let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(buf))?;
    Ok(b.schema().clone())
}

/// DataFusion messages start with the error class; keep the part that says what is wrong.
pub fn tidy_sql_error(e: &datafusion::error::DataFusionError) -> String {
    let s = e.to_string();
    let s = s
        .strip_prefix("Error during planning: ")
        .or_else(|| s.strip_prefix("SQL error: "))
        .unwrap_or(&s)
        .replace("Schema error: ", "");
    // sqlparser errors print as `ParserError("...")`: keep the words inside.
    let s = ["ParserError(\"", "TokenizerError(\""]
        .iter()
        .find_map(|p| s.strip_prefix(p)?.strip_suffix("\")"))
        .map_or(s.clone(), |inner| inner.replace("\\\"", "\""));
    // One line, so the message stays on its `error:` line.
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
