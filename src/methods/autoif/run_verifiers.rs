//! `kind: run_verifiers` — each row's Python verifier functions (AutoIF's cross-validated
//! `evaluate(response)` functions) run in the [`crate::sandbox`] on the row's response, as
//! Qwen's `code/7_query_vertification.py` does: the score is the mean of `int(value)` over the
//! functions that returned something `int()` accepts (exceptions, timeouts, `None` and values
//! such as `'true'` are left out, not counted as 0; none usable gives 0), and the row passes
//! when the score is above `pass_above` (upstream: 0, i.e. one function accepting is enough).
//! The DPO rule of `code_dpo/` reads the same score (chosen ≥ 0.5, rejected = 0).
//!
//! Added columns: `verifier_values` (`int(value)` per function, null where unusable),
//! `verifier_outcomes` (ok / error / timeout / refused / crashed / not_run per function),
//! `verifier_score`, `verdict` (pass / fail; `unjudged` for a row without functions or
//! response).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Builder, ListBuilder, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Diagnostic, Result};
use crate::sandbox::{Call, Outcome, SandboxConfig};
use crate::stages::{
    Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, unknown_column,
};
use crate::table::{batch_rows, read_batches, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "run_verifiers",
    about: "runs each row's Python verifier functions (sandboxed) on its response: AutoIF's response verification",
    build: crate::stages::build::<RunVerifiersStage>,
    schema: |g| RunVerifiersStage::json_schema(g),
    capabilities: &[Capability::ProducesVerdicts],
    removed_rows: "",
};

fn d_response() -> String {
    "response".into()
}
fn d_functions() -> String {
    "kept_functions".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunVerifiersStage {
    /// Text column with the response each function is called on.
    #[serde(default = "d_response")]
    pub response: String,
    /// List-of-strings column with the functions' sources (`cross_validate`'s
    /// `kept_functions`).
    #[serde(default = "d_functions")]
    pub functions: String,
    /// A row passes when its score is above this (upstream AutoIF: 0).
    #[serde(default)]
    pub pass_above: f64,
    /// How the functions run (interpreter, timeout, memory, workers).
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

const ADDED: [&str; 4] = [
    "verifier_values",
    "verifier_outcomes",
    "verifier_score",
    "verdict",
];

impl Stage for RunVerifiersStage {
    // The sandbox's workers change how fast, not what: only its semantic part counts.
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &["sandbox"]
    }

    fn fingerprint_extra(&self) -> Value {
        serde_json::json!({ "sandbox": self.sandbox.semantic() })
    }

    fn prepare(
        &mut self,
        node: &crate::yaml::Node,
        ctx: &crate::stages::BuildCtx,
    ) -> Result<(), Vec<Diagnostic>> {
        let errs = self.sandbox.diagnostics(&ctx.file, node);
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        if let Some(d) = crate::stages::text_column(ctx, &self.response, "run_verifiers") {
            errs.push(ctx.err(&["response"], d.message).maybe_hint(d.hint));
        }
        match schema.field_with_name(&self.functions) {
            Err(_) => errs.push(unknown_column(ctx, &["functions"], &self.functions, schema)),
            Ok(f) => {
                if !crate::table::is_string_list(f.data_type()) {
                    errs.push(
                        ctx.err(
                            &["functions"],
                            format!(
                                "column `{}` is {}, but the functions must be a list of strings (Python sources)",
                                self.functions,
                                f.data_type()
                            ),
                        )
                        .hint("cross_validate's `kept_functions` is one"),
                    );
                }
            }
        }
        errs.extend(reserved_columns(ctx, &ADDED, "which run_verifiers adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(out_schema(schema))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let mut batches = Vec::new();
        let mut rows: Vec<(Option<String>, Vec<String>)> = Vec::new();
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            for row in batch_rows(&b)? {
                let response = row[&self.response].as_str().map(str::to_string);
                let funcs = row[&self.functions]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                rows.push((response, funcs));
            }
            batches.push(b);
        }
        // Every function once, with every response it must judge.
        let mut by_source: HashMap<&str, Vec<Value>> = HashMap::new();
        let mut order: Vec<&str> = Vec::new();
        for (response, funcs) in &rows {
            let Some(r) = response else { continue };
            for f in funcs {
                let inputs = by_source.entry(f.as_str()).or_insert_with(|| {
                    order.push(f.as_str());
                    Vec::new()
                });
                inputs.push(Value::String(r.clone()));
            }
        }
        let wanted: Vec<(String, Vec<Value>)> = order
            .iter()
            .map(|f| (f.to_string(), by_source.remove(f).unwrap_or_default()))
            .collect();
        let ex = kit::run_in_sandbox(ctx, &self.sandbox, &wanted, &|_| {})?;
        let mut out = RunOutput::default();
        *out.counters.entry("calls_executed".into()).or_default() += ex.executed as i64;
        *out.counters.entry("calls_cached".into()).or_default() += ex.from_cache as i64;
        let judged: Vec<Judged> = rows
            .iter()
            .map(|(response, funcs)| {
                let Some(r) = response else {
                    return (Vec::new(), Vec::new(), None);
                };
                let input = Value::String(r.clone());
                let calls: Vec<Option<&Call>> = funcs.iter().map(|f| ex.call(f, &input)).collect();
                let values: Vec<Option<i64>> = calls
                    .iter()
                    .map(|c| {
                        c.filter(|c| c.outcome == Outcome::Ok)
                            .and_then(|c| c.as_int)
                    })
                    .collect();
                let outcomes = calls
                    .iter()
                    .map(|c| c.map_or("not_run", |c| outcome_name(c.outcome)))
                    .collect();
                let usable: Vec<i64> = values.iter().flatten().copied().collect();
                let score = if funcs.is_empty() {
                    None
                } else if usable.is_empty() {
                    Some(0.0)
                } else {
                    Some(usable.iter().map(|x| *x as f64).sum::<f64>() / usable.len() as f64)
                };
                (values, outcomes, score)
            })
            .collect();
        let mut at = 0;
        kit::write_with_columns(ctx, batches.into_iter().map(Ok), |b| {
            let n = b.num_rows();
            let slice = &judged[at..at + n];
            at += n;
            let mut values = ListBuilder::new(Int64Builder::new());
            let mut outcomes = ListBuilder::new(StringBuilder::new());
            for (v, o, _) in slice {
                for x in v {
                    values.values().append_option(*x);
                }
                values.append(true);
                for x in o {
                    outcomes.values().append_value(x);
                }
                outcomes.append(true);
            }
            let scores: Float64Array = slice.iter().map(|s| s.2).collect();
            let verdict: StringArray = slice
                .iter()
                .map(|s| {
                    let v = match s.2 {
                        None => "unjudged",
                        Some(x) if x > self.pass_above => "pass",
                        Some(_) => "fail",
                    };
                    *out.counters.entry(v.into()).or_default() += 1;
                    Some(v)
                })
                .collect();
            Ok(vec![
                Arc::new(values.finish()) as ArrayRef,
                Arc::new(outcomes.finish()),
                Arc::new(scores),
                Arc::new(verdict),
            ])
        })?;
        Ok(out)
    }
}

/// Per row: `int(value)` per function (null: unusable), each call's outcome, the score.
type Judged = (Vec<Option<i64>>, Vec<&'static str>, Option<f64>);

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Error => "error",
        Outcome::Timeout => "timeout",
        Outcome::Refused => "refused",
        Outcome::Crashed => "crashed",
        Outcome::NotRun => "not_run",
    }
}

fn out_schema(parent: &Schema) -> SchemaRef {
    let list = |t| DataType::List(Arc::new(Field::new("item", t, true)));
    with_fields(
        parent,
        &[
            Field::new("verifier_values", list(DataType::Int64), false),
            Field::new("verifier_outcomes", list(DataType::Utf8), false),
            Field::new("verifier_score", DataType::Float64, true),
            Field::new("verdict", DataType::Utf8, false),
        ],
    )
}
