//! `kind: ifeval` — IFEval's verifiable-instruction checks (Google's 25 instruction types,
//! strict and loose) on rows holding a response, its `instruction_id_list` and their
//! `kwargs`. The checks are [`super::checks`]; this file reads the columns, runs rows in
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

use arrow::array::AsArray;
use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::checks::{self as ifeval, RowVerdict};
use crate::error::{Diagnostic, Error, Result};
use crate::stages::{
    Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, text_column,
    unknown_column,
};
use crate::table::{batch_rows, is_string_list, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "ifeval",
    about: "IFEval's 25 verifiable-instruction checks (strict and loose) on responses",
    build: crate::stages::build::<IfevalStage>,
    schema: |g| IfevalStage::json_schema(g),
    capabilities: &[Capability::ProducesVerdicts],
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

impl Stage for IfevalStage {
    fn version(&self) -> u32 {
        1
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
        let mut out = RunOutput::default();
        kit::append_columns(ctx, |b| {
            let (response, ids, kwargs) = self.inputs(b)?;
            let (response, ids) = (response.as_string::<i32>(), ids.as_list::<i32>());
            // Rows are read where they are checked, on the worker threads: responses are
            // borrowed from the batch, not copied.
            let verdicts: Vec<RowVerdict> = kwargs
                .into_par_iter()
                .enumerate()
                .map(|(i, kwargs)| {
                    let ids_i = (!ids.is_null(i)).then(|| ids.value(i));
                    let ids_i: std::result::Result<Vec<&str>, String> = match &ids_i {
                        None => Err("instruction_id_list is null".into()),
                        Some(v) => v
                            .as_string::<i32>()
                            .iter()
                            .map(|s| s.ok_or_else(|| "an instruction id is null".to_string()))
                            .collect(),
                    };
                    let response = (!response.is_null(i)).then(|| response.value(i));
                    match (ids_i, kwargs, response) {
                        (Ok(ids), Ok(kwargs), Some(r)) => ifeval::evaluate(&ids, &kwargs, r),
                        (ids, kwargs, _) => {
                            let n = ids.as_ref().map_or(0, Vec::len);
                            let why = match (ids, kwargs) {
                                (Err(e), _) | (_, Err(e)) => e,
                                _ => "the response is null".to_string(),
                            };
                            RowVerdict {
                                strict: vec![None; n],
                                loose: vec![None; n],
                                errors: vec![why],
                            }
                        }
                    }
                })
                .collect();
            Ok(self.columns(&verdicts, &mut out))
        })?;
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

    /// The batch's response column as Utf8, its instruction ids as a list of Utf8, and each
    /// row's kwargs objects (or why they cannot be read).
    fn inputs(&self, b: &RecordBatch) -> Result<(ArrayRef, ArrayRef, Vec<RowKwargs>)> {
        let col = |name: &str| {
            b.column_by_name(name)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("ifeval: no column {name}")))
        };
        let response = cast(&col(&self.response)?, &DataType::Utf8)?;
        let ids = cast(
            &col(&self.instructions)?,
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        )?;
        let kwargs = kwargs_objects(&col(&self.kwargs)?)?;
        Ok((response, ids, kwargs))
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
    if let Some(rows) = kwargs_from_structs(col) {
        return Ok(rows);
    }
    kwargs_through_json(col)
}

/// The common shape (a list of structs of strings, numbers, booleans and string lists, as
/// IFEval's JSONL reads) read straight from Arrow, without writing and parsing JSON text;
/// `None` for any other shape.
fn kwargs_from_structs(col: &ArrayRef) -> Option<Vec<RowKwargs>> {
    use arrow::array::StructArray;
    use arrow::datatypes::{Float64Type, Int64Type};
    let list = col.as_any().downcast_ref::<ListArray>()?;
    let structs = list.values().as_any().downcast_ref::<StructArray>()?;
    enum Col<'a> {
        Str(&'a StringArray),
        Int(&'a arrow::array::Int64Array),
        Float(&'a arrow::array::Float64Array),
        Bool(&'a BooleanArray),
        Strs(&'a ListArray),
        Null,
    }
    let mut cols = Vec::new();
    for (f, c) in structs.fields().iter().zip(structs.columns()) {
        let col = match f.data_type() {
            DataType::Utf8 => Col::Str(c.as_string::<i32>()),
            DataType::Int64 => Col::Int(c.as_primitive::<Int64Type>()),
            DataType::Float64 => Col::Float(c.as_primitive::<Float64Type>()),
            DataType::Boolean => Col::Bool(c.as_boolean()),
            DataType::List(i) if i.data_type() == &DataType::Utf8 => Col::Strs(c.as_list::<i32>()),
            DataType::Null => Col::Null,
            _ => return None,
        };
        cols.push((f.name().clone(), col));
    }
    let object = |i: usize| -> Map<String, Value> {
        let mut m = Map::new();
        if structs.is_null(i) {
            return m;
        }
        for (name, c) in &cols {
            let v = match c {
                Col::Null => continue,
                Col::Str(a) if a.is_valid(i) => Value::from(a.value(i)),
                Col::Int(a) if a.is_valid(i) => Value::from(a.value(i)),
                Col::Float(a) if a.is_valid(i) => Value::from(a.value(i)),
                Col::Bool(a) if a.is_valid(i) => Value::from(a.value(i)),
                Col::Strs(a) if a.is_valid(i) => {
                    let items = a.value(i);
                    let items = items.as_string::<i32>();
                    Value::Array(
                        items
                            .iter()
                            .map(|s| s.map_or(Value::Null, Value::from))
                            .collect(),
                    )
                }
                _ => continue,
            };
            m.insert(name.clone(), v);
        }
        m
    };
    Some(
        (0..list.len())
            .map(|r| {
                if list.is_null(r) {
                    return Err("kwargs is null".to_string());
                }
                let (a, b) = (
                    list.value_offsets()[r] as usize,
                    list.value_offsets()[r + 1] as usize,
                );
                Ok((a..b).map(object).collect())
            })
            .collect(),
    )
}

/// Any other shape: each row as JSON, then read.
fn kwargs_through_json(col: &ArrayRef) -> Result<Vec<RowKwargs>> {
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
        .map(|mut row| match row["k"].take() {
            Value::Null => Err("kwargs is null".into()),
            // A list column: its entries are objects or JSON-object strings.
            Value::Array(items) => kwargs_entries(items, true),
            // One JSON-array string: its entries are objects.
            Value::String(s) => match serde_json::from_str::<Value>(&s) {
                Ok(Value::Array(items)) => kwargs_entries(items, false),
                _ => Err(format!("kwargs is not a JSON array of objects: {s:?}")),
            },
            other => Err(format!("kwargs is not a list: {other}")),
        })
        .collect())
}

/// The kwargs objects of a row's entries; `strings`: an entry may be a JSON-object string.
fn kwargs_entries(items: Vec<Value>, strings: bool) -> RowKwargs {
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(m) => Ok(m),
            // An instruction without arguments may have a null entry.
            Value::Null => Ok(Map::new()),
            Value::String(s) if strings => match serde_json::from_str(&s) {
                Ok(Value::Object(m)) => Ok(m),
                _ => Err(format!("kwargs entry is not a JSON object: {s:?}")),
            },
            other => Err(format!("kwargs entry is not an object: {other}")),
        })
        .collect()
}
