//! `kind: yes_no` — a judge's YES/NO answer to one evaluation question per row, read by a
//! benchmark's own rule. The table it writes (one row per question) is what decomposed-
//! question benchmarks are scored on: InfoBench's DRFR, EIFBench's three levels.
//!
//! Rules (each the reference script's reading, with the deviations the README lists):
//! - `infobench` (kqsong/InFoBench `evaluation.py`): an answer starting with "yes" / "no"
//!   (any case; leading whitespace skipped, which the script does not) is that; otherwise
//!   "YES" without "NO" is yes, "NO" without "YES" is no (upper case, anywhere); anything else
//!   has no answer.
//! - `eifbench` (Tongyi-CCAI/Complex-IF `EIFBench/6_evaluation.py`): exactly one "答案：是" /
//!   "答案：否" (the full-width or the ASCII colon) decides; otherwise "是" without "否" is
//!   yes, and "否" anywhere is no; a text with neither has no answer (the script calls it no).
//!
//! Added columns: `answer` (bool; null when the judge gave none) and `answer_error` (why:
//! no YES/NO in the text, or, for a null judgement, the `reason` column's text). Counters:
//! `yes`, `no`, `unjudged`. The same rules are the SQL function `yes_no(text, rule)`, so a
//! pipeline that stops asking after an unreadable answer (InfoBench) decides as this kind.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, text_column,
    unknown_column,
};
use crate::error::{Diagnostic, Result};
use crate::table::{string_col, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "yes_no",
    about: "a judge's YES/NO answer per question, read by a benchmark's rule (infobench, eifbench)",
    build: super::build::<YesNoStage>,
    schema: |g| YesNoStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

/// How an answer is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Infobench,
    Eifbench,
}

impl Rule {
    pub fn from_name(s: &str) -> Option<Rule> {
        match s {
            "infobench" => Some(Rule::Infobench),
            "eifbench" => Some(Rule::Eifbench),
            _ => None,
        }
    }
}

/// The judge's answer to one question under `rule`; `None` when the text gives none.
pub fn parse(rule: Rule, text: &str) -> Option<bool> {
    match rule {
        Rule::Infobench => {
            let lower = text.trim_start().to_lowercase();
            if lower.starts_with("yes") {
                Some(true)
            } else if lower.starts_with("no") {
                Some(false)
            } else {
                match (text.contains("YES"), text.contains("NO")) {
                    (true, false) => Some(true),
                    (false, true) => Some(false),
                    _ => None,
                }
            }
        }
        Rule::Eifbench => {
            let marks: Vec<bool> = ["答案：是", "答案:是", "答案：否", "答案:否"]
                .iter()
                .enumerate()
                .flat_map(|(i, m)| std::iter::repeat_n(i < 2, text.matches(m).count()))
                .collect();
            if marks.len() == 1 {
                return Some(marks[0]);
            }
            match (text.contains('是'), text.contains('否')) {
                (true, false) => Some(true),
                (_, true) => Some(false),
                (false, false) => None,
            }
        }
    }
}

fn d_judgement() -> String {
    "judgement".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct YesNoStage {
    /// The judge's answer text (null: the question was not judged).
    #[serde(default = "d_judgement")]
    pub judgement: String,
    /// How to read it: `infobench` or `eifbench`.
    pub rule: Rule,
    /// A text column saying why a judgement is null (request failed, not asked), copied to
    /// `answer_error`.
    #[serde(default)]
    pub reason: Option<String>,
}

const ADDED: [&str; 2] = ["answer", "answer_error"];

impl Stage for YesNoStage {
    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let mut errs = Vec::new();
        if let Some(mut d) = text_column(ctx, &self.judgement, "yes_no") {
            d.pos = ctx.node.pos_at(&["judgement"]);
            errs.push(d);
        }
        if let Some(r) = &self.reason
            && ctx.parent().field_with_name(r).is_err()
        {
            errs.push(unknown_column(ctx, &["reason"], r, ctx.parent()));
        }
        errs.extend(reserved_columns(ctx, &ADDED, "which yes_no adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(with_fields(ctx.parent(), &added_fields()))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let (mut yes, mut no, mut unjudged) = (0i64, 0i64, 0i64);
        kit::append_columns(ctx, |b| {
            let texts = string_col(b, &self.judgement)?;
            let reasons = match &self.reason {
                Some(r) => Some(string_col(b, r)?),
                None => None,
            };
            let mut answers = Vec::with_capacity(b.num_rows());
            let mut errors: Vec<Option<String>> = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                let (a, e) = if texts.is_null(i) {
                    let why = reasons
                        .as_ref()
                        .filter(|r| !r.is_null(i))
                        .map(|r| r.value(i).to_string())
                        .unwrap_or_else(|| "no judgement".into());
                    (None, Some(why))
                } else {
                    match parse(self.rule, texts.value(i)) {
                        Some(a) => (Some(a), None),
                        None => (None, Some("no YES or NO in the judge's answer".into())),
                    }
                };
                match a {
                    Some(true) => yes += 1,
                    Some(false) => no += 1,
                    None => unjudged += 1,
                }
                answers.push(a);
                errors.push(e);
            }
            Ok(vec![
                Arc::new(BooleanArray::from(answers)),
                Arc::new(StringArray::from(errors)),
            ])
        })?;
        let mut out = RunOutput::default();
        out.counters.insert("yes".into(), yes);
        out.counters.insert("no".into(), no);
        out.counters.insert("unjudged".into(), unjudged);
        Ok(out)
    }
}

/// The SQL function `yes_no(text, rule)`, to register with a session.
pub fn udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(YesNo {
        signature: Signature::string(2, Volatility::Immutable),
    })
}

/// `yes_no(text, rule)`: a judge's YES/NO answer as `kind: yes_no` reads it under `rule`
/// (`infobench`, `eifbench`); null when the text gives none.
#[derive(Debug, PartialEq, Eq, Hash)]
struct YesNo {
    signature: Signature,
}

impl ScalarUDFImpl for YesNo {
    fn name(&self) -> &str {
        "yes_no"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [text, rule] = arrays.as_slice() else {
            return Err(DataFusionError::Plan(
                "yes_no takes two arguments: yes_no(text, rule)".into(),
            ));
        };
        let text = arrow::compute::cast(text, &DataType::Utf8)?;
        let rule = arrow::compute::cast(rule, &DataType::Utf8)?;
        let (text, rule) = (
            text.as_any().downcast_ref::<StringArray>().expect("Utf8"),
            rule.as_any().downcast_ref::<StringArray>().expect("Utf8"),
        );
        let mut out = arrow::array::BooleanBuilder::with_capacity(text.len());
        for i in 0..text.len() {
            if text.is_null(i) || rule.is_null(i) {
                out.append_null();
                continue;
            }
            let r = Rule::from_name(rule.value(i)).ok_or_else(|| {
                DataFusionError::Execution(format!(
                    "yes_no: unknown rule `{}` (infobench, eifbench)",
                    rule.value(i)
                ))
            })?;
            out.append_option(parse(r, text.value(i)));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

fn added_fields() -> [Field; 2] {
    [
        Field::new("answer", DataType::Boolean, true),
        Field::new("answer_error", DataType::Utf8, true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infobench_reads_answers_as_its_script_does() {
        let p = |t: &str| parse(Rule::Infobench, t);
        assert_eq!(p("YES"), Some(true));
        assert_eq!(p("Yes, it is."), Some(true));
        assert_eq!(p("no."), Some(false));
        // Starting with "no" decides, whatever follows ("Not" too, as in the script).
        assert_eq!(p("Nope, YES"), Some(false));
        assert_eq!(p("  \nYes"), Some(true), "leading whitespace is skipped");
        assert_eq!(p("The answer is YES."), Some(true));
        assert_eq!(p("Answer: NO"), Some(false));
        // The prefix decides before anything else.
        assert_eq!(p("YES and NO"), Some(true));
        // Otherwise both, or neither in upper case: no answer.
        assert_eq!(p("It is YES and NO"), None);
        assert_eq!(p("I think the answer is yes"), None);
        assert_eq!(p("Partly: YES, NOT fully"), None, "NOT contains NO");
        assert_eq!(p(""), None);
    }

    #[test]
    fn eifbench_reads_the_answer_marker_then_the_characters() {
        let p = |t: &str| parse(Rule::Eifbench, t);
        assert_eq!(p("分析：满足要求。答案：是"), Some(true));
        assert_eq!(p("虽然有些地方否定了，但答案：是"), Some(true));
        assert_eq!(p("答案:否"), Some(false));
        // Two markers: fall back to the characters, where 否 decides.
        assert_eq!(p("答案：是 ... 答案：否"), Some(false));
        assert_eq!(p("是的，满足"), Some(true));
        assert_eq!(p("不满足，否"), Some(false));
        assert_eq!(p("The response satisfies it."), None);
    }
}
