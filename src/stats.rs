//! `ifloom stats`: the figures a run is judged by (funnel, LLM accounting, pass rates, dataset
//! statistics), each computed by one canned query of `sql/`.
//!
//! The queries are compiled into the binary from the same files a user runs with
//! `ifloom sql -f sql/NAME.sql --param ...`, so the terminal table, `--json`, the HTML report
//! and a hand-run query can never disagree. This module only decides which query to run on
//! which table (stages by what their kind can do: those that send requests, remove rows or
//! produce verdicts; the sections each module declares for its kinds, see
//! [`crate::module`]; the columns a user names) and shapes the results; it computes no
//! figure itself except histogram bucket widths.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::module::{Column, Param};
use crate::query;
use crate::stages::Capability;
use crate::store::{Manifest, RunDir};
use crate::table::has_col;

/// Every canned query of `sql/` (each module's, see [`crate::module::Module::queries`]):
/// `ifloom sql -f sql/NAME.sql` finds them from any folder.
pub fn queries() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    crate::registry::queries()
}

fn canned(name: &str) -> &'static str {
    queries()
        .find(|(n, _)| *n == name)
        .map(|(_, q)| *q)
        .unwrap_or_else(|| panic!("sql/{name} is not compiled in"))
}

/// What to compute besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// GPUs behind the endpoints, for GPU-seconds (0: not reported).
    pub gpus: f64,
    /// Extra `(table, column)` pairs for dataset statistics.
    pub columns: Vec<(String, String)>,
}

/// One table of figures: the first `keys` columns identify a row (used by `--compare`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Section {
    pub id: String,
    pub title: String,
    /// How to get the same rows by hand.
    pub queries: Vec<String>,
    pub keys: usize,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Bins of a histogram: `from` is a bucket's lower bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histogram {
    pub table: String,
    pub column: String,
    /// What is counted: `characters`, `items` or `ms`.
    pub unit: String,
    pub bucket: i64,
    pub bins: Vec<(i64, i64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub run: String,
    pub sections: Vec<Section>,
    pub histograms: Vec<Histogram>,
}

impl Stats {
    pub fn section(&self, id: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.id == id)
    }
}

/// Batches as rows of JSON values, in the schema's column order.
pub fn json_rows(batches: &[RecordBatch]) -> Result<(Vec<String>, Vec<Vec<Value>>)> {
    let Some(first) = batches.first() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let columns: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        for b in batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    let objects: Vec<serde_json::Map<String, Value>> = if buf.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&buf)
            .map_err(|e| Error::Internal(format!("stats: unreadable JSON rows: {e}")))?
    };
    let rows = objects
        .into_iter()
        .map(|mut o| {
            columns
                .iter()
                .map(|c| o.remove(c).unwrap_or(Value::Null))
                .collect()
        })
        .collect();
    Ok((columns, rows))
}

struct Runner<'a> {
    ctx: SessionContext,
    stats: &'a mut Stats,
}

impl Runner<'_> {
    /// Append rows to section `id`, creating it on first use.
    fn push(
        &mut self,
        id: &str,
        title: &str,
        keys: usize,
        columns: Vec<String>,
        rows: Vec<Vec<Value>>,
        how: String,
    ) {
        match self.stats.sections.iter_mut().find(|s| s.id == id) {
            Some(s) => {
                s.rows.extend(rows);
                s.queries.push(how);
            }
            None => self.stats.sections.push(Section {
                id: id.into(),
                title: title.into(),
                queries: vec![how],
                keys,
                columns,
                rows,
            }),
        }
    }

    async fn rows(
        &self,
        file: &str,
        params: &[(&str, String)],
    ) -> Result<(Vec<String>, Vec<Vec<Value>>)> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let sql = query::substitute(canned(file), &params)?;
        let df = self.ctx.sql(&sql).await.map_err(|e| {
            Error::usage(format!("sql/{file}: {}", crate::engine::tidy_sql_error(&e)))
        })?;
        json_rows(&df.collect().await?)
    }

    /// Run `file` (once per params set) and append the rows to section `id`.
    async fn add(
        &mut self,
        id: &str,
        title: &str,
        keys: usize,
        file: &str,
        params: &[(&str, String)],
    ) -> Result<()> {
        let (columns, rows) = self.rows(file, params).await?;
        let how = std::iter::once(format!("sql/{file}"))
            .chain(params.iter().map(|(k, v)| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" ");
        self.push(id, title, keys, columns, rows, how);
        Ok(())
    }

    async fn histogram(
        &mut self,
        table: &str,
        column: &str,
        expr: &str,
        unit: &str,
        max: f64,
    ) -> Result<()> {
        let bucket = nice_bucket(max, 20);
        let (_, rows) = self
            .rows(
                "histogram.sql",
                &[
                    ("table", table.into()),
                    ("expr", expr.into()),
                    ("bucket", bucket.to_string()),
                ],
            )
            .await?;
        let bins = rows
            .iter()
            .filter_map(|r| Some((r.first()?.as_i64()?, r.get(1)?.as_i64()?)))
            .collect();
        self.stats.histograms.push(Histogram {
            table: table.into(),
            column: column.into(),
            unit: unit.into(),
            bucket,
            bins,
        });
        Ok(())
    }

    /// Text length or list length statistics of one column, plus its histogram.
    async fn column(&mut self, table: &str, column: &str, ty: &DataType) -> Result<()> {
        let p = [
            ("table", table.to_string()),
            ("column", quote_ident(column)),
        ];
        let (file, id, title, expr, unit, max_col) = match ty {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => (
                "text_length.sql",
                "text",
                "Text columns: length in characters and words",
                format!("character_length({})", quote_ident(column)),
                "characters",
                "max_chars",
            ),
            DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _) => (
                "list_length.sql",
                "lists",
                "List columns: items per row (constraints per instruction, turns per conversation)",
                format!("cardinality({})", quote_ident(column)),
                "items",
                "max_items",
            ),
            other => {
                return Err(Error::usage(format!(
                    "--column {table}.{column}: a {other} column; statistics are for text and list columns"
                )));
            }
        };
        let (columns, rows) = self.rows(file, &p).await?;
        let max = rows
            .first()
            .and_then(|r| {
                columns
                    .iter()
                    .position(|c| c == max_col)
                    .and_then(|i| r[i].as_f64())
            })
            .unwrap_or(0.0);
        let mut cols = vec!["table".to_string(), "column".to_string()];
        cols.extend(columns);
        let rows: Vec<Vec<Value>> = rows
            .into_iter()
            .map(|r| {
                let mut v = vec![Value::from(table), Value::from(column)];
                v.extend(r);
                v
            })
            .collect();
        let how = format!("sql/{file} table={table} column={column}");
        self.push(id, title, 2, cols, rows, how);
        self.histogram(table, column, &expr, unit, max).await
    }
}

/// A bucket width of 1, 2 or 5 × 10^k giving at most about `bins` bins up to `max`.
pub fn nice_bucket(max: f64, bins: usize) -> i64 {
    let raw = (max / bins.max(1) as f64).max(1.0);
    let mag = 10f64.powi(raw.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    step.max(1.0) as i64
}

fn quote_ident(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
    {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// Does the table have the column a section requires?
fn has_column(schema: &arrow::datatypes::SchemaRef, column: &Column) -> bool {
    match column {
        Column::Any(name) => has_col(schema, name),
        Column::List(name) => schema
            .field_with_name(name)
            .is_ok_and(|f| matches!(f.data_type(), DataType::List(_))),
    }
}

/// Compute every figure of a run.
pub async fn compute(engine: &Engine, dir: &RunDir, opts: &Options) -> Result<Stats> {
    if !dir.stages().exists() {
        return Err(Error::usage(format!(
            "no run at {}: run a pipeline first, or pass the run directory",
            dir.path.display()
        )));
    }
    let tables = dir.tables()?;
    let ctx = query::session(engine, dir).await?;
    let mut stats = Stats {
        run: dir.path.display().to_string(),
        sections: Vec::new(),
        histograms: Vec::new(),
    };
    let mut r = Runner {
        ctx,
        stats: &mut stats,
    };
    r.add(
        "funnel",
        "Funnel: rows per stage, share kept, why rows went",
        1,
        "funnel.sql",
        &[],
    )
    .await?;
    let main: Vec<&(crate::table::Table, Manifest)> = tables
        .iter()
        .filter(|(t, _)| !t.id.contains("__"))
        .collect();
    let can = |m: &Manifest, c: Capability| crate::registry::kind_can(&m.kind, c);
    let llm: Vec<_> = main
        .iter()
        .filter(|(_, m)| can(m, Capability::SendsRequests))
        .collect();
    if !llm.is_empty() {
        r.add(
            "llm",
            "LLM accounting per stage",
            1,
            "llm_accounting.sql",
            &[("gpus", format!("{}", opts.gpus))],
        )
        .await?;
        for (t, _) in &llm {
            // The stage's columns are `<output>_latency_ms` and `<output>_cached`.
            let Some(lat) = t
                .schema
                .fields()
                .iter()
                .find(|f| f.name().ends_with("_latency_ms"))
            else {
                continue;
            };
            let out = lat.name().trim_end_matches("_latency_ms").to_string();
            let cached = format!("{out}_cached");
            if !has_col(&t.schema, &cached) {
                continue;
            }
            let source = if matches!(lat.data_type(), DataType::List(_)) {
                // samples > 1 without explode: one list entry per sample.
                format!(
                    "(SELECT unnest({l}) AS {l}, unnest({cached}) AS {cached} FROM {id})",
                    l = lat.name(),
                    id = t.id
                )
            } else {
                t.id.clone()
            };
            let p = [
                ("table", source.clone()),
                ("latency", lat.name().clone()),
                ("cached", cached.clone()),
            ];
            let (columns, mut rows) = r.rows("llm_latency.sql", &p).await?;
            for row in &mut rows {
                row[0] = Value::from(t.id.clone());
            }
            let max = rows
                .first()
                .and_then(|row| {
                    row.get(columns.iter().position(|c| c == "max_ms")?)?
                        .as_f64()
                })
                .unwrap_or(0.0);
            let how = format!(
                "sql/llm_latency.sql table={} latency={} cached={cached}",
                t.id,
                lat.name()
            );
            r.push(
                "latency",
                "LLM latency per stage (ms; requests sent, cache hits left out)",
                1,
                columns,
                rows,
                how,
            );
            if max > 0.0 {
                let expr = lat.name().clone();
                let filtered =
                    format!("(SELECT * FROM {source} WHERE NOT coalesce({cached}, false))");
                r.histogram(&filtered, &t.id, &expr, "ms", max).await?;
                if let Some(h) = r.stats.histograms.last_mut() {
                    h.table = t.id.clone();
                    h.column = lat.name().clone();
                }
            }
        }
    }
    if main.iter().any(|(_, m)| can(m, Capability::RemovesRows)) {
        r.add(
            "removed",
            "Duplicates and contamination removed",
            3,
            "removed.sql",
            &[],
        )
        .await?;
    }
    if main
        .iter()
        .any(|(_, m)| can(m, Capability::MatchesReferences))
    {
        r.add(
            "contamination",
            "Contamination removed per benchmark (reference set)",
            2,
            "contamination.sql",
            &[],
        )
        .await?;
    }
    let verdicts: Vec<_> = main
        .iter()
        .filter(|(_, m)| can(m, Capability::ProducesVerdicts))
        .collect();
    for (t, _) in &verdicts {
        let s = &t.schema;
        let instruction = if has_col(s, "source_id") && has_col(s, "round") {
            "source_id || '/' || CAST(round AS VARCHAR)".to_string()
        } else if has_col(s, "source_id") {
            "source_id".to_string()
        } else {
            "_id".to_string()
        };
        let p = [("table", t.id.clone()), ("instruction", instruction)];
        r.add("pass_rates", "Pass rates", 1, "pass_rates.sql", &p)
            .await?;
        if has_col(s, "round") {
            r.add(
                "pass_by_round",
                "Pass rates per augmentation round",
                2,
                "pass_rates_by_round.sql",
                &p,
            )
            .await?;
        }
        // Per-question figures need the judge's answers per question (`scores`, a list of
        // booleans, as `verdict` writes it); a verdict table may have only `verdict`.
        if !has_col(s, "scores") {
            continue;
        }
        r.add(
            "pass_by_question",
            "Pass rate per evaluation question (question n = the constraint added in round n)",
            2,
            "pass_rates_by_question.sql",
            &[("table", t.id.clone())],
        )
        .await?;
        if let Ok(f) = s.field_with_name("categories")
            && matches!(f.data_type(), DataType::List(_))
        {
            r.add(
                "pass_by_category",
                "Pass rate per constraint category",
                2,
                "pass_rates_by_category.sql",
                &[("table", t.id.clone()), ("categories", "categories".into())],
            )
            .await?;
        }
    }
    // Each module's sections, for the tables of its kinds.
    for module in crate::registry::modules() {
        for group in module.sections {
            for (t, _) in main
                .iter()
                .filter(|(_, m)| group.kinds.contains(&m.kind.as_str()))
            {
                for sec in group.sections {
                    if !sec.requires.iter().all(|c| has_column(&t.schema, c)) {
                        continue;
                    }
                    let params: Vec<(&str, String)> = sec
                        .params
                        .iter()
                        .map(|(name, p)| {
                            let v = match p {
                                Param::Table => t.id.clone(),
                                Param::Text(v) => v.to_string(),
                            };
                            (*name, v)
                        })
                        .collect();
                    r.add(sec.id, sec.title, sec.keys, sec.query, &params)
                        .await?;
                }
            }
        }
    }
    // Dataset statistics: every llm stage's text output, the questions per judged instruction,
    // and whatever the user asked for.
    let mut columns: Vec<(String, String)> = Vec::new();
    for (t, _) in &llm {
        if let Some(lat) = t
            .schema
            .fields()
            .iter()
            .find(|f| f.name().ends_with("_latency_ms"))
        {
            let out = lat.name().trim_end_matches("_latency_ms");
            if let Ok(f) = t.schema.field_with_name(out)
                && matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
            {
                columns.push((t.id.clone(), out.to_string()));
            }
        }
    }
    for (t, _) in &verdicts {
        if has_col(&t.schema, "questions") {
            columns.push((t.id.clone(), "questions".into()));
        }
    }
    for c in &opts.columns {
        if !columns.contains(c) {
            columns.push(c.clone());
        }
    }
    let by_id: BTreeMap<&str, &crate::table::Table> =
        tables.iter().map(|(t, _)| (t.id.as_str(), t)).collect();
    for (table, column) in columns {
        let Some(t) = by_id.get(table.as_str()) else {
            let known: Vec<&str> = by_id.keys().copied().collect();
            return Err(Error::usage(format!(
                "--column {table}.{column}: no table `{table}` in this run{}",
                crate::error::did_you_mean(&table, known.iter().copied())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default()
            )));
        };
        let Ok(f) = t.schema.field_with_name(&column) else {
            let known: Vec<&str> = t
                .schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect();
            return Err(Error::usage(format!(
                "--column {table}.{column}: `{table}` has no column `{column}`; columns: {}",
                known.join(", ")
            )));
        };
        let ty = f.data_type().clone();
        r.column(&table, &column, &ty).await?;
    }
    Ok(stats)
}

/// Is the column a share (shown as a percentage, compared in points)?
fn is_share(column: &str) -> bool {
    column.ends_with("_rate")
        || column.ends_with("_acc")
        || column == "kept"
        || crate::registry::modules()
            .iter()
            .any(|m| m.shares.iter().any(|p| column.starts_with(p)))
}

/// A cell for the terminal: rates and shares as percentages, floats rounded.
fn cell(column: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if is_share(column) {
                format!("{:.1}%", f * 100.0)
            } else if n.is_f64() {
                let s = format!("{f:.3}");
                s.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                n.to_string()
            }
        }
        other => other.to_string(),
    }
}

fn table(header: &[String], rows: Vec<Vec<String>>) -> String {
    use comfy_table::{ContentArrangement, Table, presets};
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

/// The terminal rendering of `ifloom stats`.
pub fn render(s: &Stats) -> String {
    let mut out = format!("run: {}\n", s.run);
    for sec in &s.sections {
        out.push_str(&format!("\n{}\n", sec.title));
        if sec.rows.is_empty() {
            out.push_str("(no rows)\n");
            continue;
        }
        let rows = sec
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&sec.columns)
                    .map(|(v, c)| cell(c, v))
                    .collect()
            })
            .collect();
        out.push_str(&table(&sec.columns, rows));
        out.push('\n');
    }
    out
}

fn key_of(sec: &Section, row: &[Value]) -> String {
    row.iter()
        .take(sec.keys)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("|")
}

/// One compared figure.
#[derive(Debug, Clone, Serialize)]
pub struct Delta {
    pub a: Value,
    pub b: Value,
    /// b - a for numbers.
    pub delta: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComparedRow {
    pub key: Vec<Value>,
    pub values: BTreeMap<String, Delta>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComparedSection {
    pub id: String,
    pub title: String,
    pub keys: Vec<String>,
    pub columns: Vec<String>,
    pub rows: Vec<ComparedRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub sections: Vec<ComparedSection>,
}

/// Pair the figures of two runs: rows matched on their key columns (a row only one run has
/// shows null on the other side).
pub fn compare(a: &Stats, b: &Stats) -> Comparison {
    let mut ids: Vec<&str> = a.sections.iter().map(|s| s.id.as_str()).collect();
    for s in &b.sections {
        if !ids.contains(&s.id.as_str()) {
            ids.push(&s.id);
        }
    }
    let mut sections = Vec::new();
    for id in ids {
        let (sa, sb) = (a.section(id), b.section(id));
        let Some(base) = sa.or(sb) else { continue };
        let keys: Vec<String> = base.columns.iter().take(base.keys).cloned().collect();
        let columns: Vec<String> = base.columns.iter().skip(base.keys).cloned().collect();
        let mut order: Vec<(String, Vec<Value>)> = Vec::new();
        let mut ra: BTreeMap<String, &Vec<Value>> = BTreeMap::new();
        let mut rb: BTreeMap<String, &Vec<Value>> = BTreeMap::new();
        for (sec, map) in [(sa, &mut ra), (sb, &mut rb)] {
            let Some(sec) = sec else { continue };
            for row in &sec.rows {
                let k = key_of(sec, row);
                if !order.iter().any(|(o, _)| *o == k) {
                    order.push((k.clone(), row.iter().take(sec.keys).cloned().collect()));
                }
                map.insert(k, row);
            }
        }
        let col_of = |sec: Option<&Section>, row: Option<&&Vec<Value>>, c: &str| -> Value {
            match (sec, row) {
                (Some(sec), Some(row)) => sec
                    .columns
                    .iter()
                    .position(|x| x == c)
                    .and_then(|i| row.get(i).cloned())
                    .unwrap_or(Value::Null),
                _ => Value::Null,
            }
        };
        let rows = order
            .into_iter()
            .map(|(k, key)| {
                let values = columns
                    .iter()
                    .map(|c| {
                        let va = col_of(sa, ra.get(&k), c);
                        let vb = col_of(sb, rb.get(&k), c);
                        let delta = match (va.as_f64(), vb.as_f64()) {
                            (Some(x), Some(y)) => Some(y - x),
                            _ => None,
                        };
                        (
                            c.clone(),
                            Delta {
                                a: va,
                                b: vb,
                                delta,
                            },
                        )
                    })
                    .collect();
                ComparedRow { key, values }
            })
            .collect();
        sections.push(ComparedSection {
            id: id.into(),
            title: base.title.clone(),
            keys,
            columns,
            rows,
        });
    }
    Comparison {
        a: a.run.clone(),
        b: b.run.clone(),
        sections,
    }
}

/// The terminal rendering of `ifloom stats --compare`: `a → b (+delta)` per figure.
pub fn render_comparison(c: &Comparison) -> String {
    let mut out = format!("a: {}\nb: {}\n", c.a, c.b);
    for sec in &c.sections {
        out.push_str(&format!("\n{} (a → b)\n", sec.title));
        let header: Vec<String> = sec.keys.iter().chain(&sec.columns).cloned().collect();
        let rows = sec
            .rows
            .iter()
            .map(|r| {
                let mut cells: Vec<String> = r
                    .key
                    .iter()
                    .zip(&sec.keys)
                    .map(|(v, k)| cell(k, v))
                    .collect();
                for col in &sec.columns {
                    let d = &r.values[col];
                    let (a, b) = (cell(col, &d.a), cell(col, &d.b));
                    cells.push(match d.delta {
                        Some(x) if x != 0.0 => {
                            let pct = is_share(col);
                            let x = if pct { x * 100.0 } else { x };
                            let s = format!("{x:+.3}");
                            let s = s.trim_end_matches('0').trim_end_matches('.');
                            format!("{a} → {b} ({s}{})", if pct { " pt" } else { "" })
                        }
                        _ if a == b => a,
                        _ => format!("{a} → {b}"),
                    });
                }
                cells
            })
            .collect();
        out.push_str(&table(&header, rows));
        out.push('\n');
    }
    out
}

/// Compute the stats of a run on `engine`'s runtime.
pub fn compute_blocking(engine: &Engine, dir: &RunDir, opts: &Options) -> Result<Stats> {
    engine.block_on(compute(engine, dir, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_round_numbers() {
        assert_eq!(nice_bucket(0.0, 20), 1);
        assert_eq!(nice_bucket(19.0, 20), 1);
        assert_eq!(nice_bucket(41.0, 20), 5);
        assert_eq!(nice_bucket(585.0, 20), 50);
        assert_eq!(nice_bucket(3900.0, 20), 200);
    }

    #[test]
    fn comparison_matches_rows_by_key_and_subtracts() {
        let sec = |rows: Vec<Vec<Value>>| Section {
            id: "funnel".into(),
            title: "Funnel".into(),
            queries: vec![],
            keys: 1,
            columns: vec!["stage".into(), "rows_out".into(), "kept".into()],
            rows,
        };
        let a = Stats {
            run: "a".into(),
            sections: vec![sec(vec![
                vec!["x".into(), 10.into(), 0.5.into()],
                vec!["y".into(), 4.into(), Value::Null],
            ])],
            histograms: vec![],
        };
        let b = Stats {
            run: "b".into(),
            sections: vec![sec(vec![
                vec!["z".into(), 1.into(), Value::Null],
                vec!["x".into(), 12.into(), 0.75.into()],
            ])],
            histograms: vec![],
        };
        let c = compare(&a, &b);
        let rows = &c.sections[0].rows;
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].key, vec![Value::from("x")]);
        assert_eq!(rows[0].values["rows_out"].delta, Some(2.0));
        assert_eq!(rows[0].values["kept"].delta, Some(0.25));
        assert_eq!(rows[1].values["rows_out"].b, Value::Null);
        assert_eq!(rows[2].values["rows_out"].a, Value::Null);
        let text = render_comparison(&c);
        assert!(text.contains("10 → 12 (+2)"), "{text}");
        assert!(text.contains("50.0% → 75.0% (+25 pt)"), "{text}");
    }
}
