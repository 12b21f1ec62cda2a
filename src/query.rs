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

/// Name of the virtual table listing the run's tables (from their manifests).
pub const STAGES_TABLE: &str = "ifloom_stages";

/// One row per finished table: id, kind, rows, bytes, duration, parents, finished_at, and what
/// its kind can do (`capabilities`, see [`crate::stages::Capability`]; `removed_rows` is what
/// the funnel calls the rows a row-removing kind removed). Canned queries pick stages by
/// capability, so a new kind takes part without an edit to them.
fn stages_batch(tables: &[(crate::table::Table, crate::store::Manifest)]) -> Result<RecordBatch> {
    use arrow::array::{ListBuilder, StringArray, StringBuilder, UInt64Array};
    use std::sync::Arc;
    let mut capabilities = ListBuilder::new(StringBuilder::new());
    let mut removed_rows: Vec<Option<&str>> = Vec::new();
    let mut id = Vec::new();
    let mut kind = Vec::new();
    let mut rows = Vec::new();
    let mut bytes = Vec::new();
    let mut ms = Vec::new();
    let mut parents = Vec::new();
    let mut finished = Vec::new();
    for (t, m) in tables {
        let side = t.id.split_once("__").map(|(_, s)| s.to_string());
        id.push(t.id.clone());
        match &side {
            None => {
                let entry = crate::registry::kind(&m.kind);
                for c in entry.map_or(&[][..], |k| k.capabilities) {
                    capabilities.values().append_value(c.name());
                }
                removed_rows.push(
                    entry
                        .filter(|k| k.can(crate::stages::Capability::RemovesRows))
                        .map(|k| k.removed_rows),
                );
                kind.push(m.kind.clone());
                rows.push(m.rows);
                bytes.push(m.bytes);
                parents.push(m.parents.join(","));
            }
            Some(s) => {
                let st = m.side_tables.iter().find(|x| &x.name == s);
                removed_rows.push(None);
                kind.push(format!("{}:{s}", m.kind));
                rows.push(st.map_or(0, |x| x.rows));
                bytes.push(0);
                parents.push(m.id.clone());
            }
        }
        capabilities.append(true);
        ms.push(m.duration_ms);
        finished.push(m.finished_at.clone());
    }
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("id", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("kind", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("rows", arrow::datatypes::DataType::UInt64, false),
        arrow::datatypes::Field::new("bytes", arrow::datatypes::DataType::UInt64, false),
        arrow::datatypes::Field::new("duration_ms", arrow::datatypes::DataType::UInt64, false),
        arrow::datatypes::Field::new("parents", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("finished_at", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new(
            "capabilities",
            arrow::datatypes::DataType::List(Arc::new(arrow::datatypes::Field::new(
                "item",
                arrow::datatypes::DataType::Utf8,
                true,
            ))),
            true,
        ),
        arrow::datatypes::Field::new("removed_rows", arrow::datatypes::DataType::Utf8, true),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(id)),
            Arc::new(StringArray::from(kind)),
            Arc::new(UInt64Array::from(rows)),
            Arc::new(UInt64Array::from(bytes)),
            Arc::new(UInt64Array::from(ms)),
            Arc::new(StringArray::from(parents)),
            Arc::new(StringArray::from(finished)),
            Arc::new(capabilities.finish()),
            Arc::new(StringArray::from(removed_rows)),
        ],
    )?)
}

/// Name of the virtual table of every stage's counters (`stage`, `name`, `value`): requests,
/// cache hits, tokens of llm stages, rows removed by dedup, pass/fail of verdicts, ...
pub const COUNTERS_TABLE: &str = "ifloom_counters";

fn counters_batch(tables: &[(crate::table::Table, crate::store::Manifest)]) -> Result<RecordBatch> {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let (mut stage, mut name, mut value) = (Vec::new(), Vec::new(), Vec::new());
    // Side tables share their stage's manifest: count each stage once.
    for (_, m) in tables.iter().filter(|(t, _)| !t.id.contains("__")) {
        for (k, v) in &m.counters {
            stage.push(m.id.clone());
            name.push(k.clone());
            value.push(*v);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("stage", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("value", DataType::Int64, false),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(stage)),
            Arc::new(StringArray::from(name)),
            Arc::new(Int64Array::from(value)),
        ],
    )?)
}

/// Replace `${name}` placeholders of a canned query with `--param name=value` values.
pub fn substitute(sql: &str, params: &[(String, String)]) -> Result<String> {
    let mut out = sql.to_string();
    for (k, v) in params {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    if let Some(i) = out.find("${") {
        let name: String = out[i + 2..].chars().take_while(|c| *c != '}').collect();
        return Err(Error::usage(format!(
            "the query needs a value for `${{{name}}}`: pass --param {name}=VALUE"
        )));
    }
    Ok(out)
}

/// A session with every finished table of the run registered.
pub async fn session(engine: &Engine, dir: &RunDir) -> Result<SessionContext> {
    let ctx = engine.session()?;
    let tables = dir.tables()?;
    for (t, _) in &tables {
        engine::register(&ctx, t).await?;
    }
    ctx.register_batch(STAGES_TABLE, stages_batch(&tables)?)?;
    ctx.register_batch(COUNTERS_TABLE, counters_batch(&tables)?)?;
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
    let df = ctx
        .sql(sql)
        .await
        .map_err(|e| Error::usage(format!("SQL error: {}", crate::engine::tidy_sql_error(&e))))?;
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
            t.add_row(
                fmts.iter()
                    .map(|f| truncate(&f.value(r).to_string(), max_width)),
            );
            rows += 1;
        }
    }
    Ok(format!(
        "{t}\n({rows} row{})",
        if rows == 1 { "" } else { "s" }
    ))
}

fn truncate(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| {
            if c == '\n' || c == '\r' || c == '\t' {
                ' '
            } else {
                c
            }
        })
        .collect();
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
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::io(p, e))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    match format {
        OutFormat::Table => {
            writeln!(sink, "{}", pretty(batches, 60)?).map_err(|e| Error::io("stdout", e))?;
        }
        OutFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut sink);
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
            let mut w = crate::engine::parquet_writer(f, schema)?;
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
