//! `kind: sql` — a DataFusion query over the tables named in `from`.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Arity, BuildCtx, KindEntry, PlanCtx, RunCtx, RunOutput, Stage};
use crate::engine;
use crate::error::{Diagnostic, Error, Result};
use crate::yaml::Node;

pub const KIND: KindEntry = KindEntry {
    name: "sql",
    about: "a DataFusion SQL query; every `from` table is visible under its id",
    build: super::build::<SqlStage>,
    schema: |g| SqlStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

/// A SQL query, inline (`query`) or from a file (`file`, relative to the pipeline file).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlStage {
    /// The query text.
    #[serde(default)]
    pub query: Option<String>,
    /// A `.sql` file holding the query, relative to the pipeline file.
    #[serde(default)]
    pub file: Option<String>,
    #[serde(skip)]
    #[schemars(skip)]
    text: String,
}

impl SqlStage {
    fn where_(&self) -> &'static str {
        if self.query.is_some() {
            "query"
        } else {
            "file"
        }
    }
}

/// Only queries: a stage must not create, drop or modify tables.
fn sql_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

impl Stage for SqlStage {
    fn arity(&self) -> Arity {
        Arity::AtLeastOne
    }

    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        match (&self.query, &self.file) {
            (Some(q), None) => self.text = q.clone(),
            (None, Some(f)) => {
                let path = ctx.dir.join(f);
                match std::fs::read_to_string(&path) {
                    Ok(t) => self.text = t,
                    Err(e) => {
                        return Err(vec![
                            Diagnostic::new(
                                &ctx.file,
                                node.pos_at(&["file"]),
                                format!("cannot read SQL file {}: {e}", path.display()),
                            )
                            .hint("paths are relative to the pipeline file"),
                        ]);
                    }
                }
            }
            (Some(_), Some(_)) => {
                return Err(vec![
                    Diagnostic::new(
                        &ctx.file,
                        node.pos_at(&["file"]),
                        "give either `query` or `file`, not both",
                    )
                    .hint("keep the inline query or move it into the file"),
                ]);
            }
            (None, None) => {
                return Err(vec![
                    Diagnostic::new(&ctx.file, node.pos, "a sql stage needs `query` or `file`")
                        .hint("add `query: SELECT ... FROM <table>`"),
                ]);
            }
        }
        Ok(())
    }

    // The query's text, inline or from the file: editing the file redoes the stage, moving it
    // does not.
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &["file"]
    }

    fn fingerprint_extra(&self) -> serde_json::Value {
        serde_json::json!({ "query": self.text })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let session = ctx
            .engine
            .session()
            .map_err(|e| vec![ctx.err(&[], e.to_string())])?;
        for (id, schema) in &ctx.parents {
            let t = MemTable::try_new(schema.clone(), vec![vec![]])
                .map_err(|e| vec![ctx.err(&[], e.to_string())])?;
            session
                .register_table(id.as_str(), Arc::new(t))
                .map_err(|e| vec![ctx.err(&[], e.to_string())])?;
        }
        let text = self.text.clone();
        let df = ctx
            .engine
            .block_on(async move { session.sql_with_options(&text, sql_options()).await })
            .map_err(|e| {
                vec![
                    ctx.err(
                        &[self.where_()],
                        format!("SQL does not plan: {}", engine::tidy_sql_error(&e)),
                    )
                    .hint(format!(
                        "tables visible here: {}",
                        ctx.parents
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                ]
            })?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let mut seen = std::collections::HashSet::new();
        for f in schema.fields() {
            if !seen.insert(f.name().clone()) {
                return Err(vec![
                    ctx.err(
                        &[self.where_()],
                        format!("the query returns two columns named `{}`", f.name()),
                    )
                    .hint("give one of them an alias: `b.x AS b_x`"),
                ]);
            }
        }
        Ok(schema)
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let session: SessionContext = ctx.engine.session()?;
        // A trailing slash tells DataFusion to write a folder of parts, not one file.
        let out = format!("{}/", ctx.out.display());
        let text = self.text.clone();
        let parents = ctx.parents.clone();
        ctx.engine.block_on(async move {
            for t in &parents {
                engine::register(&session, t).await?;
            }
            let df = session.sql_with_options(&text, sql_options()).await?;
            df.write_parquet(&out, DataFrameWriteOptions::new(), None)
                .await?;
            Ok::<_, Error>(())
        })?;
        Ok(RunOutput::default())
    }
}
