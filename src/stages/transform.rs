//! `kind: transform` — a list of lazy Polars operations. Expressions are strings in SQL
//! expression syntax (`length(text) > 10`, `upper(category) AS cat`), parsed by Polars.
//!
//! Planning applies the same operations to an empty frame of the parent's schema and reads
//! the resulting schema back, so a wrong column is caught before anything runs.

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;
use polars::prelude::*;
use polars::sql::sql_expr;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{BuildCtx, KindEntry, PlanCtx, RunCtx, RunOutput, Stage};
use crate::engine;
use crate::error::{Diagnostic, Error, Result};
use crate::yaml::Node;

pub const KIND: KindEntry = KindEntry {
    name: "transform",
    about: "lazy Polars operations with SQL-syntax expressions",
    build: super::build::<TransformStage>,
    schema: |g| TransformStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformStage {
    /// Operations applied in order.
    pub ops: Vec<Op>,
}

/// One operation; written as a one-key mapping, e.g. `- filter: "length(text) > 10"`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// Keep these columns or expressions (`expr AS name`).
    Select(Vec<String>),
    /// Keep rows where the expression is true.
    Filter(String),
    /// Add or replace columns: `name: expression`.
    WithColumns(BTreeMap<String, String>),
    /// Rename columns: `old: new`.
    Rename(BTreeMap<String, String>),
    /// Remove columns.
    Drop(Vec<String>),
    /// One row per element of these list columns.
    Explode(Vec<String>),
    /// Turn struct columns into their fields.
    Unnest(Vec<String>),
    Sort(SortOp),
    /// Keep the first n rows.
    Limit(u64),
    /// Keep a seeded random sample.
    Sample(SampleOp),
    /// Drop duplicate rows (over `subset` columns), keeping order.
    Unique(UniqueOp),
    Join(JoinOp),
    /// Append the rows of other tables (columns matched by name; missing ones become null).
    Concat(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SortOp {
    pub by: Vec<String>,
    #[serde(default)]
    pub descending: bool,
    #[serde(default)]
    pub nulls_last: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampleOp {
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    #[default]
    First,
    Last,
    /// Drop every row that has a duplicate.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UniqueOp {
    #[serde(default)]
    pub subset: Option<Vec<String>>,
    #[serde(default)]
    pub keep: Keep,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum How {
    #[default]
    Inner,
    Left,
    Right,
    Full,
    Semi,
    Anti,
    Cross,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinOp {
    /// The table to join with (an input or stage id).
    pub with: String,
    /// Columns with the same name on both sides.
    #[serde(default)]
    pub on: Vec<String>,
    #[serde(default)]
    pub left_on: Vec<String>,
    #[serde(default)]
    pub right_on: Vec<String>,
    #[serde(default)]
    pub how: How,
    /// Suffix for right-side columns whose names clash (default `_right`).
    #[serde(default)]
    pub suffix: Option<String>,
}

fn expr(s: &str) -> PolarsResult<Expr> {
    sql_expr(s)
}

fn exprs(v: &[String]) -> PolarsResult<Vec<Expr>> {
    v.iter().map(|s| expr(s)).collect()
}

/// Make Polars messages read as ifloom's: the first line, without the error class prefix.
fn tidy(e: &PolarsError) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or(&s).trim().to_string()
}

impl TransformStage {
    /// Apply the ops to `lf`; `tables` gives frames for joined or concatenated tables. On
    /// error, returns the op index so the diagnostic points at it.
    fn apply(
        &self,
        mut lf: LazyFrame,
        tables: &dyn Fn(&str) -> Result<LazyFrame>,
        check: bool,
    ) -> std::result::Result<LazyFrame, (usize, String)> {
        for (i, op) in self.ops.iter().enumerate() {
            let e = |e: PolarsError| (i, tidy(&e));
            lf = match op {
                Op::Select(cols) => lf.select(exprs(cols).map_err(e)?),
                Op::Filter(f) => lf.filter(expr(f).map_err(e)?),
                Op::WithColumns(m) => {
                    let mut v = Vec::new();
                    for (name, x) in m {
                        v.push(expr(x).map_err(e)?.alias(name.as_str()));
                    }
                    lf.with_columns(v)
                }
                Op::Rename(m) => lf.rename(m.keys(), m.values(), true),
                Op::Drop(cols) => lf.drop(cols_sel(cols)),
                Op::Explode(cols) => lf.explode(
                    cols_sel(cols),
                    ExplodeOptions {
                        empty_as_null: true,
                        keep_nulls: true,
                    },
                ),
                Op::Unnest(cols) => lf.unnest(cols_sel(cols), None),
                Op::Sort(s) => lf.sort(
                    s.by.iter()
                        .map(|c| PlSmallStr::from(c.as_str()))
                        .collect::<Vec<_>>(),
                    SortMultipleOptions::default()
                        .with_order_descending(s.descending)
                        .with_nulls_last(s.nulls_last)
                        .with_maintain_order(true),
                ),
                Op::Limit(n) => lf.limit(*n as IdxSize),
                Op::Sample(s) => {
                    let x = match (s.n, s.fraction) {
                        (Some(n), None) => {
                            all()
                                .as_expr()
                                .sample_n(lit(n), false, Some(false), Some(s.seed))
                        }
                        (None, Some(f)) => {
                            all()
                                .as_expr()
                                .sample_frac(lit(f), false, Some(false), Some(s.seed))
                        }
                        _ => {
                            return Err((
                                i,
                                "sample takes exactly one of `n` and `fraction`".into(),
                            ));
                        }
                    };
                    lf.select([x])
                }
                Op::Unique(u) => {
                    let keep = match u.keep {
                        Keep::First => UniqueKeepStrategy::First,
                        Keep::Last => UniqueKeepStrategy::Last,
                        Keep::None => UniqueKeepStrategy::None,
                    };
                    lf.unique_stable(u.subset.as_ref().map(|s| cols_sel(s)), keep)
                }
                Op::Join(j) => {
                    let other = tables(&j.with).map_err(|er| (i, er.to_string()))?;
                    let (l, r) = if !j.on.is_empty() {
                        (j.on.clone(), j.on.clone())
                    } else {
                        (j.left_on.clone(), j.right_on.clone())
                    };
                    if j.how == How::Cross {
                        lf.cross_join(other, j.suffix.as_deref().map(PlSmallStr::from))
                    } else {
                        if l.is_empty() || l.len() != r.len() {
                            return Err((
                                i,
                                "join needs `on`, or `left_on` and `right_on` of the same length"
                                    .into(),
                            ));
                        }
                        let how = match j.how {
                            How::Inner => JoinType::Inner,
                            How::Left => JoinType::Left,
                            How::Right => JoinType::Right,
                            How::Full => JoinType::Full,
                            How::Semi => JoinType::Semi,
                            How::Anti => JoinType::Anti,
                            How::Cross => unreachable!("handled above"),
                        };
                        let le: Vec<Expr> = l.iter().map(|c| col(c.as_str())).collect();
                        let re: Vec<Expr> = r.iter().map(|c| col(c.as_str())).collect();
                        lf.join_builder()
                            .with(other)
                            .left_on(le)
                            .right_on(re)
                            .how(how)
                            .suffix(j.suffix.clone().unwrap_or_else(|| "_right".into()))
                            .finish()
                    }
                }
                Op::Concat(others) => {
                    let mut frames = vec![lf];
                    for o in others {
                        frames.push(tables(o).map_err(|er| (i, er.to_string()))?);
                    }
                    concat_lf_diagonal(frames, UnionArgs::default()).map_err(e)?
                }
            };
            if check {
                // Planning: resolve the schema op by op so the error names the op at fault.
                lf.collect_schema().map_err(e)?;
            }
        }
        Ok(lf)
    }
}

fn cols_sel(names: &[String]) -> Selector {
    by_name(names.iter().map(String::as_str), true, false)
}

impl Stage for TransformStage {
    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        if self.ops.is_empty() {
            return Err(vec![
                Diagnostic::new(
                    &ctx.file,
                    node.pos_at(&["ops"]),
                    "a transform needs at least one op",
                )
                .hint("e.g. `ops: [{filter: \"length(text) > 10\"}]`"),
            ]);
        }
        Ok(())
    }

    fn extra_deps(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Join(j) => out.push((
                    j.with.clone(),
                    vec!["ops".into(), i.to_string(), "join".into(), "with".into()],
                )),
                Op::Concat(others) => {
                    for (k, o) in others.iter().enumerate() {
                        out.push((
                            o.clone(),
                            vec!["ops".into(), i.to_string(), "concat".into(), k.to_string()],
                        ));
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let frame =
            |s: &SchemaRef| -> Result<LazyFrame> { Ok(engine::empty_polars_frame(s)?.lazy()) };
        let base = frame(ctx.parent()).map_err(|e| vec![ctx.err(&[], e.to_string())])?;
        let tables = |id: &str| -> Result<LazyFrame> {
            let s = ctx
                .schema_of(id)
                .ok_or_else(|| Error::Internal(format!("no schema for {id}")))?;
            frame(s)
        };
        let lf = self.apply(base, &tables, true).map_err(|(i, msg)| {
            let op = op_name(&self.ops[i]);
            let names: Vec<String> = ctx
                .parent()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            let hint = column_hint(&msg, &names);
            vec![
                ctx.err(
                    &["ops", &i.to_string(), op],
                    format!("transform op {} (`{op}`): {msg}", i + 1),
                )
                .maybe_hint(hint),
            ]
        })?;
        let mut df = lf.collect().map_err(|e| {
            vec![ctx.err(&["ops"], format!("transform does not plan: {}", tidy(&e)))]
        })?;
        engine::polars_arrow_schema(&mut df).map_err(|e| vec![ctx.err(&["ops"], e.to_string())])
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let scan = |files: &[std::path::PathBuf]| -> Result<LazyFrame> {
            let paths: Vec<PlRefPath> = files
                .iter()
                .map(|p| PlRefPath::new(p.to_string_lossy().as_ref()))
                .collect();
            Ok(LazyFrame::scan_parquet_files(
                paths.into_iter().collect(),
                ScanArgsParquet::default(),
            )?)
        };
        let base = scan(&ctx.parent().files)?;
        let tables = |id: &str| -> Result<LazyFrame> {
            let t = ctx
                .parents
                .iter()
                .find(|t| t.id == id)
                .ok_or_else(|| Error::Internal(format!("no table {id}")))?;
            scan(&t.files)
        };
        let lf = self
            .apply(base, &tables, false)
            .map_err(|(i, msg)| Error::stage(ctx.id, format!("op {}: {msg}", i + 1)))?;
        let path = ctx.out.join("part-00000.parquet");
        // Stream to Parquet with Polars' streaming engine, so filters and projections run in
        // bounded memory; operations it cannot stream fall back to the in-memory engine.
        let sink = lf.clone().sink(
            SinkDestination::File {
                target: SinkTarget::Path(PlRefPath::new(path.to_string_lossy().as_ref())),
            },
            FileWriteFormat::Parquet(std::sync::Arc::new(ParquetWriteOptions::default())),
            UnifiedSinkArgs {
                maintain_order: true,
                ..Default::default()
            },
        );
        let streamed = sink.and_then(|s| {
            s.collect_with_engine(polars::prelude::Engine::Streaming)
                .map(|_| ())
        });
        if let Err(e) = streamed {
            tracing::debug!("streaming sink failed ({e}); collecting in memory");
            let _ = std::fs::remove_file(&path);
            let mut df = lf.collect()?;
            let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            ParquetWriter::new(f)
                .with_compression(ParquetCompression::Zstd(None))
                .finish(&mut df)?;
        }
        Ok(RunOutput::default())
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Select(_) => "select",
        Op::Filter(_) => "filter",
        Op::WithColumns(_) => "with_columns",
        Op::Rename(_) => "rename",
        Op::Drop(_) => "drop",
        Op::Explode(_) => "explode",
        Op::Unnest(_) => "unnest",
        Op::Sort(_) => "sort",
        Op::Limit(_) => "limit",
        Op::Sample(_) => "sample",
        Op::Unique(_) => "unique",
        Op::Join(_) => "join",
        Op::Concat(_) => "concat",
    }
}

/// Polars says `unable to find column "txt"; valid columns: [...]`: suggest the close one.
fn column_hint(msg: &str, names: &[String]) -> Option<String> {
    let start = msg.find('"')? + 1;
    let end = start + msg[start..].find('"')?;
    let missing = &msg[start..end];
    crate::error::did_you_mean(missing, names.iter().map(String::as_str))
}
