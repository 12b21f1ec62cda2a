//! SQL over a run: every finished table (and side table) registered under its id, queried
//! with DataFusion, printed as a readable table or written as CSV / JSON / JSONL / Parquet.
//! Works while a run is in progress: only tables whose manifest exists are visible.

use std::io::Write;
use std::path::Path;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use comfy_table::{ContentArrangement, Table as Pretty, presets};
use datafusion::prelude::SessionContext;

use crate::engine::{self, Engine};
use crate::error::{Error, Result};
use crate::store::RunDir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutFormat {
    Table,
    Csv,
    Json,
    Jsonl,
    Parquet,
}

/// A session with every finished table of the run registered.
pub async fn session(engine: &Engine, dir: &RunDir) -> Result<SessionContext> {
    let ctx = engine.session()?;
    for (t, _) in dir.tables()? {
        engine::register(&ctx, &t).await?;
    }
    Ok(ctx)
}

pub async fn query(engine: &Engine, dir: &RunDir, sql: &str) -> Result<Vec<RecordBatch>> {
    if !dir.stages().exists() {
        return Err(Error::usage(format!(
            "no run at {}: run a pipeline first, or pass --run DIR",
            dir.path.display()
        )));
    }
    let ctx = session(engine, dir).await?;
    let df = ctx.sql(sql).await.map_err(|e| {
        Error::usage(format!(
            "SQL error: {}",
            crate::stages::sql::tidy_sql_error(&e)
        ))
    })?;
    Ok(df.collect().await?)
}

/// Render batches as a terminal table, cutting long text to `max_width` characters.
pub fn pretty(batches: &[RecordBatch], max_width: usize) -> Result<String> {
    let mut t = Pretty::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    let Some(first) = batches.first() else {
        return Ok("(0 rows)".into());
    };
    t.set_header(first.schema().fields().iter().map(|f| f.name().clone()));
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = 0;
    for b in batches {
        let fmts = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for r in 0..b.num_rows() {
            t.add_row(fmts.iter().map(|f| truncate(&f.value(r).to_string(), max_width)));
            rows += 1;
        }
    }
    Ok(format!("{t}\n({rows} row{})", if rows == 1 { "" } else { "s" }))
}

fn truncate(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c == '\n' || c == '\r' || c == '\t' { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let t: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{t}…")
    }
}

/// Write batches in a machine format to `out` (or stdout).
pub fn write(batches: &[RecordBatch], format: OutFormat, out: Option<&Path>) -> Result<()> {
    let mut sink: Box<dyn Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?)),
        None => Box::new(std::io::stdout().lock()),
    };
    match format {
        OutFormat::Table => {
            writeln!(sink, "{}", pretty(batches, 60)?).map_err(|e| Error::io("stdout", e))?;
        }
        OutFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut sink);
            for b in batches {
                w.write(b)?;
            }
        }
        OutFormat::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut sink);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            writeln!(sink).map_err(|e| Error::io("stdout", e))?;
        }
        OutFormat::Jsonl => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut sink);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        OutFormat::Parquet => {
            let Some(p) = out else {
                return Err(Error::usage("--format parquet needs --out FILE"));
            };
            drop(sink);
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| std::sync::Arc::new(arrow::datatypes::Schema::empty()));
            let f = std::fs::File::create(p).map_err(|e| Error::io(p, e))?;
            let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None)?;
            for b in batches {
                w.write(b)?;
            }
            w.close()?;
            return Ok(());
        }
    }
    sink.flush().map_err(|e| Error::io("output", e))?;
    Ok(())
}
