//! What kinds share when they run: adding columns to their parent's rows, splitting rows into
//! kept and removed, and running functions in the Python sandbox.

use arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Field, SchemaRef};
use serde_json::Value;

use super::RunCtx;
use crate::engine::LazyPart;
use crate::error::{Error, Result};
use crate::sandbox::{self, Executions, SandboxConfig};
use crate::table::{read_batches, with_fields};

/// Write the stage's table: the parent's rows with the columns `add` computes for each of its
/// batches, in the order of the stage's planned schema.
pub fn append_columns(
    ctx: &RunCtx,
    add: impl FnMut(&RecordBatch) -> Result<Vec<ArrayRef>>,
) -> Result<()> {
    write_with_columns(ctx, read_batches(&ctx.parent().files), add)
}

/// [`append_columns`] over batches the kind has read already (in the parent's order).
pub fn write_with_columns(
    ctx: &RunCtx,
    batches: impl IntoIterator<Item = Result<RecordBatch>>,
    mut add: impl FnMut(&RecordBatch) -> Result<Vec<ArrayRef>>,
) -> Result<()> {
    let mut part = LazyPart::new(ctx.out.join("part-00000.parquet"));
    for b in batches {
        let b = b?;
        let mut cols = b.columns().to_vec();
        cols.extend(add(&b)?);
        part.write(&RecordBatch::try_new(ctx.schema.clone(), cols)?)?;
    }
    part.finish(&ctx.schema)
}

/// `b` with `cols` appended as `fields`.
pub fn with_columns(b: &RecordBatch, fields: &[Field], cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    let mut all = b.columns().to_vec();
    all.extend(cols);
    Ok(RecordBatch::try_new(with_fields(&b.schema(), fields), all)?)
}

/// The rows of `b` that `keep` marks, and the others.
pub fn split(b: &RecordBatch, keep: &BooleanArray) -> Result<(RecordBatch, RecordBatch)> {
    let drop: BooleanArray = keep.iter().map(|k| k.map(|k| !k)).collect();
    Ok((
        filter_record_batch(b, keep)?,
        filter_record_batch(b, &drop)?,
    ))
}

/// The side table `<id>__removed` of a kind that removes rows: each removed row with the
/// columns that say why.
pub struct RemovedRows {
    part: LazyPart,
    rows: i64,
}

impl RemovedRows {
    pub fn new(ctx: &RunCtx) -> Result<RemovedRows> {
        let dir = ctx.side_dir("removed");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(RemovedRows {
            part: LazyPart::new(dir.join("part-00000.parquet")),
            rows: 0,
        })
    }

    /// Add removed rows (none is fine).
    pub fn write(&mut self, b: &RecordBatch) -> Result<()> {
        if b.num_rows() == 0 {
            return Ok(());
        }
        self.rows += b.num_rows() as i64;
        self.part.write(b)
    }

    /// Close the table (`schema` when no row was removed); the number of rows removed.
    pub fn finish(self, schema: &SchemaRef) -> Result<i64> {
        self.part.finish(schema)?;
        Ok(self.rows)
    }
}

/// Run functions in the Python sandbox for a stage: the run's result cache, stopped by the
/// run's stop signals, a kernel that refused the network namespace logged.
pub fn run_in_sandbox(
    ctx: &RunCtx,
    config: &SandboxConfig,
    wanted: &[(String, Vec<Value>)],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Executions> {
    let cache = sandbox::cache_path(ctx.engine);
    let stop = || ctx.cancel.is_interrupted();
    let (ex, isolation) = sandbox::execute(config, &cache, wanted, &stop, progress)?;
    sandbox::log_isolation(ctx.id, isolation);
    sandbox::log_modules(ctx.id, ex.modules.as_ref());
    Ok(ex)
}
