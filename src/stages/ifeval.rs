//! `kind: ifeval` — IFEval's verifiable-instruction checks (Google's 25 instruction types,
//! strict and loose) on rows holding a response, its `instruction_id_list` and their
//! `kwargs`. The checks are [`crate::ifeval`]; this file reads the columns, runs rows in
//! parallel and writes the verdicts.
//!
//! Added columns (names other tools read; keep them):
//! - `strict`, `loose`: one bool per instruction, aligned with `instruction_id_list` (null
//!   where the instruction could not be set up: unknown id, bad kwargs);
//! - `prompt_strict`, `prompt_loose`: every instruction followed (null if one is null);
//! - `verdict`: `pass` / `fail` / `unjudged` from the prompt-level result of the `verdict:`
//!   mode, so pass rates, SFT/DPO splits and `stats` work as for judged tables;
//! - `ifeval_error`: why instructions could not be checked (null when all could).

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, reserved_columns, text_column,
    unknown_column,
};
use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result};
use crate::ifeval::{self, RowVerdict};
use crate::table::{batch_rows, read_batches, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "ifeval",
    about: "IFEval's 25 verifiable-instruction checks (strict and loose) on responses",
    build: super::build::<IfevalStage>,
    schema: |g| IfevalStage::json_schema(g),
    capabilities: &[
        Capability::ProducesVerdicts,
        Capability::VerifiesInstructions,
    ],
    removed_rows: "",
};

fn d_response() -> String {
    "response".into()
}
fn d_instructions() -> String {
    "instruction_id_list".into()
}
fn d_kwargs() -> String {
    "kwargs".into()
}

/// Which prompt-level result makes the `verdict` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VerdictMode {
    #[default]
    Strict,
    Loose,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IfevalStage {
    /// Text column with the response to check.
    #[serde(default = "d_response")]
    pub response: String,
    /// List-of-strings column with the instruction ids (`keywords:existence`, ...).
    #[serde(default = "d_instructions")]
    pub instructions: String,
    /// Column with one kwargs object per instruction: a list of structs (as IFEval's JSONL
    /// reads), a list of JSON-object strings, or one JSON-array string.
    #[serde(default = "d_kwargs")]
    pub kwargs: String,
    /// `strict` (default) or `loose`: which prompt-level result `verdict` reports.
    #[serde(default)]
    pub verdict: VerdictMode,
}

const ADDED: [&str; 6] = [
    "strict",
    "loose",
    "prompt_strict",
    "prompt_loose",
    "verdict",
    "ifeval_error",
];

fn bool_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Boolean, true)))
}

fn is_string_list(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) => {
            crate::table::is_string_type(f.data_type()) || f.data_type() == &DataType::Null
        }
        _ => false,
    }
}

impl Stage for IfevalStage {
    fn version(&self) -> u32 {
        1
    }

    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({
            "response": self.response,
            "instructions": self.instructions,
            "kwargs": self.kwargs,
            "verdict": self.verdict,
        })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        if let Some(d) = text_column_at(ctx, &self.response, "response") {
            errs.push(d);
        }
        match schema.field_with_name(&self.instructions) {
            Err(_) => errs.push(unknown_column(
                ctx,
                &["instructions"],
                &self.instructions,
                schema,
            )),
            Ok(f) if !is_string_list(f.data_type()) => errs.push(
                ctx.err(
                    &["instructions"],
                    format!(
                        "column `{}` is {}, but the instruction ids must be a list of strings",
                        self.instructions,
                        f.data_type()
                    ),
                )
                .hint("IFEval's input_data.jsonl has them as `instruction_id_list`"),
            ),
            Ok(_) => {}
        }
        match schema.field_with_name(&self.kwargs) {
            Err(_) => errs.push(unknown_column(ctx, &["kwargs"], &self.kwargs, schema)),
            Ok(f) => {
                let ok = match f.data_type() {
                    DataType::List(i) | DataType::LargeList(i) => matches!(
                        i.data_type(),
                        DataType::Struct(_)
                            | DataType::Utf8
                            | DataType::LargeUtf8
                            | DataType::Utf8View
                            | DataType::Null
                    ),
                    t => crate::table::is_string_type(t),
                };
                if !ok {
                    errs.push(
                        ctx.err(
                            &["kwargs"],
                            format!(
                                "column `{}` is {}, but kwargs must be a list of objects (or of JSON strings, or one JSON-array string)",
                                self.kwargs,
                                f.data_type()
                            ),
                        )
                        .hint("IFEval's input_data.jsonl has them as `kwargs`, one object per instruction"),
                    );
                }
            }
        }
        errs.extend(reserved_columns(ctx, &ADDED, "which ifeval adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(self.out_schema(schema))
    }

    fn schema_despite_errors(&self, ctx: &PlanCtx) -> Option<SchemaRef> {
        let parent = ctx.parent();
        let kept: Vec<Field> = parent
            .fields()
            .iter()
            .filter(|f| !ADDED.contains(&f.name().as_str()))
            .map(|f| f.as_ref().clone())
            .collect();
        Some(self.out_schema(&Arc::new(Schema::new(kept))))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let mut part = LazyPart::new(ctx.out.join("part-00000.parquet"));
        let mut out = RunOutput::default();
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            let rows = self.rows(&b)?;
            let verdicts: Vec<RowVerdict> = rows
                .par_iter()
                .map(|(ids, kwargs, response)| match (ids, kwargs, response) {
                    (Ok(ids), Ok(kwargs), Some(r)) => {
                        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                        ifeval::evaluate(&ids, kwargs, r)
                    }
                    (ids, kwargs, response) => {
                        let n = ids.as_ref().map_or(0, Vec::len);
                        let why = match (ids, kwargs) {
                            (Err(e), _) | (_, Err(e)) => e.clone(),
                            _ if response.is_none() => "the response is null".to_string(),
                            _ => unreachable!(),
                        };
                        RowVerdict {
                            strict: vec![None; n],
                            loose: vec![None; n],
                            errors: vec![why],
                        }
                    }
                })
                .collect();
            let cols = self.columns(&verdicts, &mut out);
            let mut all: Vec<ArrayRef> = b.columns().to_vec();
            all.extend(cols);
            part.write(&RecordBatch::try_new(ctx.schema.clone(), all)?)?;
        }
        part.finish(&ctx.schema)?;
        Ok(out)
    }
}

/// `text_column` for a field other than `column:`.
fn text_column_at(ctx: &PlanCtx, column: &str, field: &str) -> Option<Diagnostic> {
    let d = text_column(ctx, column, "ifeval")?;
    // Re-point the diagnostic at this stage's own field.
    Some(ctx.err(&[field], d.message).maybe_hint(d.hint))
}

/// A row's kwargs objects, or why they cannot be read.
type RowKwargs = std::result::Result<Vec<Map<String, Value>>, String>;

type RowInput = (
    std::result::Result<Vec<String>, String>,
    RowKwargs,
    Option<String>,
);

impl IfevalStage {
    fn out_schema(&self, parent: &Schema) -> SchemaRef {
        with_fields(
            parent,
            &[
                Field::new("strict", bool_list(), true),
                Field::new("loose", bool_list(), true),
                Field::new("prompt_strict", DataType::Boolean, true),
                Field::new("prompt_loose", DataType::Boolean, true),
                Field::new("verdict", DataType::Utf8, false),
                Field::new("ifeval_error", DataType::Utf8, true),
            ],
        )
    }

    /// Each row's ids, kwargs and response, or why they cannot be read.
    fn rows(&self, b: &RecordBatch) -> Result<Vec<RowInput>> {
        let col = |name: &str| {
            b.column_by_name(name)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("ifeval: no column {name}")))
        };
        let response = cast(&col(&self.response)?, &DataType::Utf8)?;
        let response = response
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::Internal("response is not Utf8".into()))?;
        let ids = cast(
            &col(&self.instructions)?,
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        )?;
        let ids = ids
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(|| Error::Internal("instructions is not a list".into()))?;
        let kwargs = kwargs_objects(&col(&self.kwargs)?)?;
        Ok((0..b.num_rows())
            .map(|i| {
                let ids = if ids.is_null(i) {
                    Err("instruction_id_list is null".to_string())
                } else {
                    let v = ids.value(i);
                    let v = v
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .expect("cast to Utf8");
                    v.iter()
                        .map(|s| {
                            s.map(str::to_string)
                                .ok_or("an instruction id is null".into())
                        })
                        .collect()
                };
                let response = (!response.is_null(i)).then(|| response.value(i).to_string());
                (ids, kwargs[i].clone(), response)
            })
            .collect())
    }

    fn columns(&self, verdicts: &[RowVerdict], out: &mut RunOutput) -> Vec<ArrayRef> {
        let list = |pick: fn(&RowVerdict) -> &Vec<Option<bool>>| {
            let mut lb = ListBuilder::new(BooleanBuilder::new());
            for v in verdicts {
                for x in pick(v) {
                    lb.values().append_option(*x);
                }
                lb.append(true);
            }
            Arc::new(lb.finish()) as ArrayRef
        };
        let strict = list(|v| &v.strict);
        let loose = list(|v| &v.loose);
        let ps: BooleanArray = verdicts
            .iter()
            .map(|v| RowVerdict::prompt_level(&v.strict))
            .collect();
        let pl: BooleanArray = verdicts
            .iter()
            .map(|v| RowVerdict::prompt_level(&v.loose))
            .collect();
        let chosen = if self.verdict == VerdictMode::Strict {
            &ps
        } else {
            &pl
        };
        let verdict: StringArray = (0..verdicts.len())
            .map(|i| {
                let v = if chosen.is_null(i) || verdicts[i].strict.is_empty() {
                    "unjudged"
                } else if chosen.value(i) {
                    "pass"
                } else {
                    "fail"
                };
                *out.counters.entry(v.into()).or_default() += 1;
                Some(v)
            })
            .collect();
        let errors: StringArray = verdicts
            .iter()
            .map(|v| (!v.errors.is_empty()).then(|| v.errors.join("; ")))
            .collect();
        let n_err = errors.len() - errors.null_count();
        if n_err > 0 {
            *out.counters.entry("ifeval_errors".into()).or_default() += n_err as i64;
        }
        vec![
            strict,
            loose,
            Arc::new(ps),
            Arc::new(pl),
            Arc::new(verdict),
            Arc::new(errors),
        ]
    }
}

/// Per row, the kwargs objects (one per instruction), from a list of structs, a list of JSON
/// strings or a JSON-array string.
fn kwargs_objects(col: &ArrayRef) -> Result<Vec<RowKwargs>> {
    let objects = |v: Value| -> RowKwargs {
        match v {
            Value::Null => Err("kwargs is null".into()),
            Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::Object(m) => Ok(m),
                    // An instruction without arguments may have a null entry.
                    Value::Null => Ok(Map::new()),
                    Value::String(s) => match serde_json::from_str(&s) {
                        Ok(Value::Object(m)) => Ok(m),
                        _ => Err(format!("kwargs entry is not a JSON object: {s:?}")),
                    },
                    other => Err(format!("kwargs entry is not an object: {other}")),
                })
                .collect(),
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(v @ Value::Array(_)) => objects_of(v),
                _ => Err(format!("kwargs is not a JSON array of objects: {s:?}")),
            },
            other => Err(format!("kwargs is not a list: {other}")),
        }
    };
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "k",
            col.data_type().clone(),
            true,
        )])),
        vec![col.clone()],
    )?;
    Ok(batch_rows(&batch)?
        .into_iter()
        .map(|mut row| objects(row["k"].take()))
        .collect())
}

/// A JSON array of kwargs objects.
fn objects_of(v: Value) -> RowKwargs {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(m) => Ok(m),
                Value::Null => Ok(Map::new()),
                other => Err(format!("kwargs entry is not an object: {other}")),
            })
            .collect(),
        other => Err(format!("kwargs is not a list: {other}")),
    }
}
