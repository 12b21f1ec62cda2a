//! `kind: followbench` — FollowBench's verdict on each instruction (one row per instruction
//! at a constraint level 1-5), by the reference's rule-based and LLM-based protocol
//! (YJiangcm/FollowBench `code/rule_based_evaluation.py`, `code/gpt4_based_evaluation.py`):
//! rows a rule checks (see [`rules::checker`]) get the rule's verdict on the response; the
//! others get the judge's list of YES/NO, one per added constraint, read as the reference
//! reads it ([`rules::parse_judgement`]).
//!
//! The input needs `constraint_type` (content, situation, style, format, example, mixed: the
//! data file), `example_id`, `level`, `source`, `category`, `target`, the response and the
//! judge's answer (null on rows a rule checks, or that were not judged). Added columns:
//! `checker` (the rule's name; null: judged), `satisfied` (the judge's verdict per added
//! constraint), `hard` (every constraint satisfied), `soft` (the share satisfied), both null
//! when there is no verdict, and `eval_error` saying why. Counters: `rule_checked`, `judged`,
//! `hard_satisfied`, `unjudged`. The same choice of rule is the SQL function
//! `followbench_checker(constraint_type, category, source, example_id)`, so a pipeline sends
//! the judge only what no rule checks.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, BooleanBuilder, Float64Array, ListBuilder, StringArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rules;
use crate::error::{Diagnostic, Error, Result};
use crate::stages::{
    KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, text_column,
    unknown_column,
};
use crate::table::{string_col, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "followbench",
    about: "FollowBench's verdict per instruction: the reference's rule checks, or the judge's YES/NO list per added constraint",
    build: crate::stages::build::<FollowBenchStage>,
    schema: |g| FollowBenchStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

fn d_response() -> String {
    "response".into()
}
fn d_judgement() -> String {
    "judgement".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowBenchStage {
    /// The response under test (null: none to evaluate).
    #[serde(default = "d_response")]
    pub response: String,
    /// The judge's answer (null where a rule checks the row, or the judge was not asked).
    #[serde(default = "d_judgement")]
    pub judgement: String,
    /// A text column saying why a row has no response or no judgement (request failed, not
    /// recorded), copied to `eval_error`.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Columns every row needs, besides the response and the judgement.
const NEEDED: [&str; 6] = [
    "constraint_type",
    "example_id",
    "level",
    "source",
    "category",
    "target",
];
const INTEGERS: [&str; 2] = ["example_id", "level"];
const ADDED: [&str; 5] = ["checker", "satisfied", "hard", "soft", "eval_error"];

impl Stage for FollowBenchStage {
    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let mut errs = Vec::new();
        for (field, col) in [("response", &self.response), ("judgement", &self.judgement)] {
            if let Some(mut d) = text_column(ctx, col, "followbench") {
                d.pos = ctx.node.pos_at(&[field]);
                errs.push(d);
            }
        }
        if let Some(r) = &self.reason
            && ctx.parent().field_with_name(r).is_err()
        {
            errs.push(unknown_column(ctx, &["reason"], r, ctx.parent()));
        }
        for col in NEEDED {
            match ctx.parent().field_with_name(col) {
                Err(_) => errs.push(unknown_column(ctx, &["from"], col, ctx.parent()).hint(
                    format!(
                        "followbench reads the data files' `{col}` (and `constraint_type`, the \
                         file: content, situation, style, format, example, mixed); select it \
                         upstream"
                    ),
                )),
                Ok(f) if INTEGERS.contains(&col) && !f.data_type().is_integer() => errs.push(
                    ctx.err(
                        &["from"],
                        format!(
                            "column `{col}` is {}, but followbench needs an integer",
                            f.data_type()
                        ),
                    )
                    .hint(format!(
                        "cast it upstream: `CAST({col} AS BIGINT) AS {col}`"
                    )),
                ),
                Ok(_) => {}
            }
        }
        errs.extend(reserved_columns(ctx, &ADDED, "which followbench adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(with_fields(ctx.parent(), &added_fields()))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let (mut rule_checked, mut judged, mut hard_ok, mut unjudged) = (0i64, 0i64, 0i64, 0i64);
        kit::append_columns(ctx, |b| {
            let col = |name: &str| string_col(b, name);
            let (ty, cat, src, target) = (
                col("constraint_type")?,
                col("category")?,
                col("source")?,
                col("target")?,
            );
            let (resp, judge) = (col(&self.response)?, col(&self.judgement)?);
            let reasons = match &self.reason {
                Some(r) => Some(col(r)?),
                None => None,
            };
            let int = |name: &str| -> Result<arrow::array::Int64Array> {
                let a = b
                    .column_by_name(name)
                    .ok_or_else(|| Error::stage(ctx.id, format!("no column `{name}`")))?;
                Ok(arrow::compute::cast(a, &DataType::Int64)?
                    .as_primitive::<Int64Type>()
                    .clone())
            };
            let (ids, levels) = (int("example_id")?, int("level")?);
            let text = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
            let mut checker_b: Vec<Option<&'static str>> = Vec::with_capacity(b.num_rows());
            let mut sat_b = ListBuilder::new(BooleanBuilder::new());
            let mut hard_b = Vec::with_capacity(b.num_rows());
            let mut soft_b = Vec::with_capacity(b.num_rows());
            let mut err_b: Vec<Option<String>> = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                let level = (!levels.is_null(i)).then(|| levels.value(i));
                let id = (!ids.is_null(i)).then(|| ids.value(i));
                let checker = rules::checker(
                    &text(&ty, i).unwrap_or_default(),
                    &text(&cat, i).unwrap_or_default(),
                    &text(&src, i).unwrap_or_default(),
                    id.unwrap_or(-1),
                );
                // The reason column's text, else `default`.
                let why = |default: &str| {
                    reasons
                        .as_ref()
                        .and_then(|r| text(r, i))
                        .unwrap_or_else(|| default.into())
                };
                let verdict: std::result::Result<Vec<bool>, String> = match (level, text(&resp, i))
                {
                    (None, _) | (Some(..=0), _) => {
                        Err("no constraint level (1-5) on the row".to_string())
                    }
                    (_, None) => Err(why("no response")),
                    (Some(level), Some(r)) => match checker {
                        Some(name) => {
                            rules::check(name, &r, &text(&target, i).unwrap_or_default(), level)
                                .map(|ok| vec![ok])
                        }
                        None => match text(&judge, i) {
                            None => Err(why("no judgement")),
                            Some(j) => rules::parse_judgement(&j, level),
                        },
                    },
                };
                match &verdict {
                    Ok(v) => {
                        if checker.is_some() {
                            rule_checked += 1;
                            sat_b.append_null();
                        } else {
                            judged += 1;
                            sat_b.append_value(v.iter().map(|x| Some(*x)));
                        }
                        let yes = v.iter().filter(|x| **x).count();
                        hard_ok += (yes == v.len()) as i64;
                        hard_b.push(Some(yes == v.len()));
                        soft_b.push(Some(yes as f64 / v.len().max(1) as f64));
                        err_b.push(None);
                    }
                    Err(e) => {
                        unjudged += 1;
                        sat_b.append_null();
                        hard_b.push(None);
                        soft_b.push(None);
                        err_b.push(Some(e.clone()));
                    }
                }
                checker_b.push(checker);
            }
            Ok(vec![
                Arc::new(StringArray::from(checker_b)),
                Arc::new(sat_b.finish()),
                Arc::new(BooleanArray::from(hard_b)),
                Arc::new(Float64Array::from(soft_b)),
                Arc::new(StringArray::from(err_b)),
            ])
        })?;
        let mut out = RunOutput::default();
        out.counters.insert("rule_checked".into(), rule_checked);
        out.counters.insert("judged".into(), judged);
        out.counters.insert("hard_satisfied".into(), hard_ok);
        out.counters.insert("unjudged".into(), unjudged);
        Ok(out)
    }
}

fn added_fields() -> [Field; 5] {
    [
        Field::new("checker", DataType::Utf8, true),
        Field::new(
            "satisfied",
            DataType::List(Arc::new(Field::new("item", DataType::Boolean, true))),
            true,
        ),
        Field::new("hard", DataType::Boolean, true),
        Field::new("soft", DataType::Float64, true),
        Field::new("eval_error", DataType::Utf8, true),
    ]
}
