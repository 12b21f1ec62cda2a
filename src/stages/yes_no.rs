//! `kind: yes_no` — a judge's YES/NO answer to one evaluation question per row, read by a
//! benchmark's own rule. The table it writes (one row per question) is what decomposed-
//! question benchmarks are scored on: InfoBench's DRFR, EIFBench's three levels.
//!
//! Rules (each the reference script's reading of one answer):
//! - `infobench` (qinyiwei/InfoBench `evaluation.py`): an answer whose lower case starts with
//!   "yes" / "no" is that; otherwise "YES" without "NO" is yes, "NO" without "YES" is no (upper
//!   case, anywhere); anything else has no answer (the script writes None, which its
//!   `bool_ratio` counts as false, and stops asking).
//! - `eifbench` (Tongyi-CCAI/Complex-IF `EIFBench/6_evaluation.py`): exactly one "答案：是" /
//!   "答案：否" (full-width colon, as the script's regex) decides; otherwise "是" without "否"
//!   is yes, and "否" anywhere is no; a text with neither has no answer (the script calls it
//!   no).
//!
//! Added columns: `answer` (bool; null when the judge gave no readable answer or none),
//! `answer_ref` (the reference script's own figure for the question: `answer`, with an
//! unreadable answer counted as no; null only when the question was not judged at all — not
//! asked, no response, request failed — or, for EIFBench, when the judge's text is exactly
//! `None` or `Err`, which `8_metric.py` leaves out) and `answer_error` (why `answer` is null:
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
            let lower = text.to_lowercase();
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
            // `re.findall(r'答案：是|答案：否', ...)`: the two markers do not overlap.
            let yes_marks = text.matches("答案：是").count();
            let no_marks = text.matches("答案：否").count();
            if yes_marks + no_marks == 1 {
                return Some(yes_marks == 1);
            }
            match (text.contains('是'), text.contains('否')) {
                (true, false) => Some(true),
                (_, true) => Some(false),
                (false, false) => None,
            }
        }
    }
}

/// The reference script's figure for a question the judge answered with `text`: the answer,
/// an unreadable one counted as no (InfoBench's `bool_ratio` counts its None as false;
/// EIFBench's script calls a text with neither 是 nor 否 no). `None` only where the
/// reference leaves the judgement out: EIFBench's `8_metric.py` skips explanations that are
/// exactly `None` or `Err` (its request-failure markers).
pub fn reference(rule: Rule, text: &str) -> Option<bool> {
    if rule == Rule::Eifbench && (text == "None" || text == "Err") {
        return None;
    }
    Some(parse(rule, text).unwrap_or(false))
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

const ADDED: [&str; 3] = ["answer", "answer_ref", "answer_error"];

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
            let mut refs: Vec<Option<bool>> = Vec::with_capacity(b.num_rows());
            let mut errors: Vec<Option<String>> = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                refs.push(if texts.is_null(i) {
                    None
                } else {
                    reference(self.rule, texts.value(i))
                });
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
                Arc::new(BooleanArray::from(refs)),
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

fn added_fields() -> [Field; 3] {
    [
        Field::new("answer", DataType::Boolean, true),
        Field::new("answer_ref", DataType::Boolean, true),
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
        // The script does not skip leading whitespace: lower case "  \nyes" starts with
        // neither, and "Yes" is not upper case.
        assert_eq!(p("  \nYes"), None);
        assert_eq!(p(" NO"), Some(false), "upper case anywhere");
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
        // Only the full-width colon is the script's marker: "答案:是" falls back to the
        // characters, where 否 anywhere decides.
        assert_eq!(p("答案:否"), Some(false));
        assert_eq!(p("答案:是，没有否定"), Some(false));
        assert_eq!(p("答案：是 答案:否"), Some(true), "one full-width marker");
        // Two markers: fall back to the characters, where 否 decides.
        assert_eq!(p("答案：是 ... 答案：否"), Some(false));
        assert_eq!(p("答案：是 ... 答案：是"), Some(true));
        assert_eq!(p("是的，满足"), Some(true));
        assert_eq!(p("不满足，否"), Some(false));
        assert_eq!(p("The response satisfies it."), None);
    }

    #[test]
    fn reference_figures_count_unreadable_answers_as_no() {
        // InfoBench's bool_ratio: `if eva_value` is false for the None an unreadable answer
        // leaves in `eval`.
        let r = |t: &str| reference(Rule::Infobench, t);
        assert_eq!(r("YES"), Some(true));
        assert_eq!(r("no"), Some(false));
        assert_eq!(r("It is YES and NO"), Some(false));
        assert_eq!(
            r("None"),
            Some(false),
            "a judge's text, not a marker, for InfoBench"
        );
        // EIFBench's get_answer: `"是" in g and "否" not in g` else False, always a bool;
        // 8_metric.py skips point_explanation "None" / "Err".
        let r = |t: &str| reference(Rule::Eifbench, t);
        assert_eq!(r("答案：是"), Some(true));
        assert_eq!(r("The response satisfies it."), Some(false));
        assert_eq!(r(""), Some(false));
        assert_eq!(r("None"), None);
        assert_eq!(r("Err"), None);
        assert_eq!(r("None."), Some(false));
    }
}
