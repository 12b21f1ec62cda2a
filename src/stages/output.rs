//! `kind: output` — write a table where users want it, as Parquet and/or JSONL, with column
//! renames. The stage's own table (queryable with SQL) has the renamed columns too.
//!
//! A relative `path` is resolved against the run directory, so two runs never overwrite each
//! other's datasets; give an absolute path (or `${params.out}`) to write elsewhere.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{KindEntry, PlanCtx, RunCtx, RunOutput, Stage, unknown_column};
use crate::error::{Diagnostic, Error, Result};
use crate::table::{OutFormat, has_col, read_batches};

pub const KIND: KindEntry = KindEntry {
    name: "output",
    about: "write a table to a file as Parquet and/or JSONL",
    build: super::build::<OutputStage>,
    schema: |g| OutputStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputStage {
    /// File path without extension (`.parquet` / `.jsonl` are added); relative paths are
    /// inside the run directory.
    pub path: String,
    /// Formats to write (default: parquet).
    #[serde(default = "default_formats")]
    pub formats: Vec<OutFormat>,
    /// Columns to write, in order (default: all).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Rename columns: `old: new`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

fn default_formats() -> Vec<OutFormat> {
    vec![OutFormat::Parquet]
}

impl OutputStage {
    /// Where each format is written for a run directory.
    pub fn targets(&self, run_dir: &Path) -> Vec<(OutFormat, PathBuf)> {
        OutFormat::targets(&self.path, &self.formats, run_dir)
    }

    /// Selected and renamed columns: (source name, output name).
    fn mapping(&self, schema: &SchemaRef) -> Vec<(String, String)> {
        let names: Vec<String> = match &self.columns {
            Some(c) => c.clone(),
            None => schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        names
            .into_iter()
            .map(|n| {
                let out = self.rename.get(&n).cloned().unwrap_or_else(|| n.clone());
                (n, out)
            })
            .collect()
    }

    fn project(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mapping = self.mapping(&batch.schema());
        let mut fields = Vec::new();
        let mut cols = Vec::new();
        for (src, dst) in mapping {
            let idx = batch.schema().index_of(&src)?;
            let f = batch.schema().field(idx).clone().with_name(dst);
            fields.push(Arc::new(f));
            cols.push(batch.column(idx).clone());
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }
}

impl Stage for OutputStage {
    fn needs_id(&self) -> bool {
        true
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        if self.formats.is_empty() {
            errs.push(
                ctx.err(&["formats"], "no output format given")
                    .hint("formats: [parquet, jsonl]"),
            );
        }
        if let Some(cols) = &self.columns {
            for (i, c) in cols.iter().enumerate() {
                if !has_col(schema, c) {
                    errs.push(unknown_column(ctx, &["columns", &i.to_string()], c, schema));
                }
            }
        }
        for k in self.rename.keys() {
            if !has_col(schema, k) {
                // The unknown column is the key (`old: new`), not the new name.
                let mut e = unknown_column(ctx, &["rename", k], k, schema);
                if let Some(key) = ctx.node.get("rename").and_then(|r| r.key_node(k)) {
                    e.pos = key.pos;
                }
                errs.push(e);
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut fields: Vec<Field> = Vec::new();
        for (src, dst) in self.mapping(schema) {
            if !seen.insert(dst.clone()) {
                errs.push(
                    ctx.err(
                        &["rename"],
                        format!("two output columns would be named `{dst}`"),
                    )
                    .hint("rename one of them to another name"),
                );
            }
            if let Ok(f) = schema.field_with_name(&src) {
                fields.push(f.clone().with_name(dst));
            }
        }
        if errs.is_empty() {
            Ok(Arc::new(Schema::new(fields)))
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let targets = self.targets(ctx.run_dir);
        // Each file is written under a temporary name and renamed when complete.
        let tmp = |p: &Path| {
            let mut s = p.as_os_str().to_owned();
            s.push(format!(".tmp-{}", std::process::id()));
            PathBuf::from(s)
        };
        for (_, p) in &targets {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
        }
        let table_path = ctx.out.join("part-00000.parquet");
        let mut table_w: Option<ArrowWriter<File>> = None;
        let mut pq_w: Option<ArrowWriter<File>> = None;
        let mut json_w: Option<arrow::json::LineDelimitedWriter<std::io::BufWriter<File>>> = None;
        let mut array_w: Option<arrow::json::ArrayWriter<std::io::BufWriter<File>>> = None;
        let mut rows = 0i64;
        for b in read_batches(&ctx.parent().files) {
            let b = self.project(&b?)?;
            rows += b.num_rows() as i64;
            let tw = match &mut table_w {
                Some(w) => w,
                None => {
                    let f = File::create(&table_path).map_err(|e| Error::io(&table_path, e))?;
                    table_w.insert(crate::engine::parquet_writer(f, b.schema())?)
                }
            };
            tw.write(&b)?;
            for (fmt, p) in &targets {
                let t = tmp(p);
                match fmt {
                    OutFormat::Parquet => {
                        let w = match &mut pq_w {
                            Some(w) => w,
                            None => {
                                let f = File::create(&t).map_err(|e| Error::io(&t, e))?;
                                pq_w.insert(crate::engine::parquet_writer(f, b.schema())?)
                            }
                        };
                        w.write(&b)?;
                    }
                    OutFormat::Jsonl => {
                        let w = match &mut json_w {
                            Some(w) => w,
                            None => {
                                let f = File::create(&t).map_err(|e| Error::io(&t, e))?;
                                // Every line has every key (null included), as loaders expect.
                                json_w.insert(
                                    arrow::json::WriterBuilder::new()
                                        .with_explicit_nulls(true)
                                        .build::<_, arrow::json::writer::LineDelimited>(
                                        std::io::BufWriter::new(f),
                                    ),
                                )
                            }
                        };
                        w.write(&b)?;
                    }
                    OutFormat::Json => {
                        let w = match &mut array_w {
                            Some(w) => w,
                            None => {
                                let f = File::create(&t).map_err(|e| Error::io(&t, e))?;
                                array_w.insert(
                                    arrow::json::WriterBuilder::new()
                                        .with_explicit_nulls(true)
                                        .build::<_, arrow::json::writer::JsonArray>(
                                        std::io::BufWriter::new(f),
                                    ),
                                )
                            }
                        };
                        w.write(&b)?;
                    }
                }
            }
        }
        if let Some(w) = table_w {
            w.close()?;
        }
        if let Some(w) = pq_w {
            w.close()?;
        }
        if let Some(mut w) = json_w {
            w.finish()?;
        }
        if let Some(mut w) = array_w {
            w.finish()?;
        }
        for (fmt, p) in &targets {
            let t = tmp(p);
            if !t.exists() {
                // An empty table still produces its files.
                match fmt {
                    OutFormat::Parquet => crate::engine::write_empty(&t, &ctx.schema)?,
                    OutFormat::Jsonl => {
                        File::create(&t).map_err(|e| Error::io(&t, e))?;
                    }
                    OutFormat::Json => std::fs::write(&t, b"[]\n").map_err(|e| Error::io(&t, e))?,
                }
            }
            std::fs::rename(&t, p).map_err(|e| Error::io(p, e))?;
        }
        let mut out = RunOutput::default();
        out.counters.insert("written".into(), rows);
        Ok(out)
    }

    fn external_outputs(&self, run_dir: &Path) -> Vec<PathBuf> {
        self.targets(run_dir).into_iter().map(|(_, p)| p).collect()
    }
}
