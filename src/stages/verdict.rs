//! `kind: verdict` — turn an LLM judge's answers to numbered yes/no evaluation questions into
//! a pass / fail / unjudged verdict per response.
//!
//! The judge (UltraIF's evaluation step) is asked one question per constraint and answers
//! JSON keyed `Question 1..n`, each with an explanation and a `YES`/`NO` score. Real judges
//! wrap the JSON in prose, write Python literals, lowercase the scores, skip questions or
//! return no JSON at all. The rule here is strict on purpose:
//!
//! - **pass**: every one of the row's `n` questions has a YES;
//! - **fail**: every question has an answer and at least one is NO;
//! - **unjudged**: the answer has no JSON, a question is missing or has an unreadable score,
//!   or the row has no questions. Upstream's script counted these as failures, which puts
//!   responses nobody judged into DPO as "rejected"; here they reach neither SFT nor DPO and
//!   are counted apart (`unjudged` counter, `verdict_error` says why).
//!
//! That is `pass_rule: all_yes` (the default). `pass_rule: no_no` is the rule of UltraIF's
//! `rejection_sampling.py`: a response passes when no question is answered NO, so a question
//! the judge skipped or scored unreadably does not hold it back; it fails when one is NO, and
//! is unjudged only when the answer has no JSON, no readable score at all, or the row has no
//! questions.
//!
//! Added columns: `verdict`, `n_questions`, `n_yes`, `n_no`, `scores` (one bool per question,
//! null where the judge gave no readable score), `verdict_error`.

use std::fs::File;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanBuilder, Int64Array, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, unknown_column};
use crate::error::{Diagnostic, Error, Result};
use crate::table::read_batches;

pub const KIND: KindEntry = KindEntry {
    name: "verdict",
    about: "pass/fail/unjudged from a judge's YES/NO answers to numbered evaluation questions",
    build: super::build::<VerdictStage>,
    schema: |g| VerdictStage::json_schema(g),
    capabilities: &[Capability::ProducesVerdicts],
    removed_rows: "",
};

fn d_judgement() -> String {
    "judgement".into()
}
fn d_questions() -> String {
    "questions".into()
}
fn d_key() -> String {
    "Question {i}".into()
}
fn d_score_field() -> String {
    "score".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerdictStage {
    /// Text column holding the judge's answer.
    #[serde(default = "d_judgement")]
    pub judgement: String,
    /// List-of-strings column with the questions the judge was asked (question i is item i).
    #[serde(default = "d_questions")]
    pub questions: String,
    /// How the judge names question i in its JSON; matched ignoring case, spaces and `_`.
    #[serde(default = "d_key")]
    pub key: String,
    /// Field of a question's object that holds YES/NO (a bare string or bool also works).
    #[serde(default = "d_score_field")]
    pub score_field: String,
    /// `all_yes`: pass when every question has a YES; `no_no`: pass when no question has a
    /// NO (UltraIF's script).
    #[serde(default)]
    pub pass_rule: PassRule,
}

/// When a judged response passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PassRule {
    /// Every question answered YES; a missing or unreadable answer leaves it unjudged.
    #[default]
    AllYes,
    /// No question answered NO (UltraIF's `rejection_sampling.py`).
    NoNo,
}

const ADDED: &[&str] = &[
    "verdict",
    "n_questions",
    "n_yes",
    "n_no",
    "scores",
    "verdict_error",
];

/// The verdict on one judge answer for `n` questions: per-question scores and the reason a
/// verdict could not be reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub scores: Vec<Option<bool>>,
    pub error: Option<String>,
}

impl Judged {
    /// The verdict by `all_yes`.
    #[cfg(test)]
    pub fn verdict(&self) -> &'static str {
        self.verdict_by(PassRule::AllYes)
    }

    pub fn verdict_by(&self, rule: PassRule) -> &'static str {
        let any_no = self.scores.contains(&Some(false));
        match rule {
            PassRule::AllYes => {
                if self.error.is_some() || self.scores.iter().any(Option::is_none) {
                    "unjudged"
                } else if !any_no {
                    "pass"
                } else {
                    "fail"
                }
            }
            PassRule::NoNo => {
                if any_no {
                    "fail"
                } else if self.scores.iter().any(Option::is_some) {
                    "pass"
                } else {
                    "unjudged"
                }
            }
        }
    }
}

/// Comparable form of a key: lowercase, without spaces, `_`, `-` or `:`.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '_' | '-' | ':' | '#'))
        .flat_map(char::to_lowercase)
        .collect()
}

/// YES / NO from a score value: strings are read from their first word (`"Yes."`,
/// `"NO - the list has 4 items"`), booleans as they are.
fn read_score(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => {
            let w: String = s
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphabetic())
                .flat_map(char::to_lowercase)
                .collect();
            match w.as_str() {
                "yes" | "true" | "pass" => Some(true),
                "no" | "false" | "fail" => Some(false),
                _ => None,
            }
        }
        _ => None,
    }
}

impl VerdictStage {
    /// Judge one answer for `n` questions.
    pub fn judge(&self, text: Option<&str>, n: usize) -> Judged {
        let missing = |error: &str| Judged {
            scores: vec![None; n],
            error: Some(error.to_string()),
        };
        let Some(text) = text else {
            return missing("no judge answer");
        };
        if n == 0 {
            return missing("no evaluation questions");
        }
        let (answer, _) = crate::llm_client::parse::strip_reasoning(text);
        let json = match crate::llm_client::parse::extract_json(&answer) {
            Ok((v, _)) => v,
            Err(e) => return missing(&format!("no JSON in the judge's answer: {e}")),
        };
        let score_key = squash(&self.score_field);
        let score_of = |v: &Value| -> Option<bool> {
            match v {
                Value::Object(m) => m
                    .iter()
                    .find(|(k, _)| squash(k) == score_key)
                    .and_then(|(_, s)| read_score(s)),
                other => read_score(other),
            }
        };
        let mut scores = Vec::with_capacity(n);
        for i in 1..=n {
            let want = squash(&self.key.replace("{i}", &i.to_string()));
            let v = match &json {
                Value::Object(m) => m.iter().find(|(k, _)| squash(k) == want).map(|(_, v)| v),
                // A list of answers in question order.
                Value::Array(a) => a.get(i - 1),
                _ => None,
            };
            scores.push(v.and_then(score_of));
        }
        let error = scores.iter().position(Option::is_none).map(|i| {
            format!(
                "no readable YES/NO for {}",
                self.key.replace("{i}", &(i + 1).to_string())
            )
        });
        Judged { scores, error }
    }

    fn out_schema(&self, parent: &SchemaRef) -> SchemaRef {
        let mut fields: Vec<Field> = parent
            .fields()
            .iter()
            .filter(|f| !ADDED.contains(&f.name().as_str()))
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend([
            Field::new("verdict", DataType::Utf8, false),
            Field::new("n_questions", DataType::Int64, false),
            Field::new("n_yes", DataType::Int64, false),
            Field::new("n_no", DataType::Int64, false),
            Field::new(
                "scores",
                DataType::List(Arc::new(Field::new("item", DataType::Boolean, true))),
                false,
            ),
            Field::new("verdict_error", DataType::Utf8, true),
        ]);
        Arc::new(Schema::new(fields))
    }

    fn process(&self, batch: &RecordBatch, schema: &SchemaRef) -> Result<(RecordBatch, [i64; 3])> {
        let text = cast(
            batch
                .column_by_name(&self.judgement)
                .ok_or_else(|| Error::Internal(format!("no column {}", self.judgement)))?,
            &DataType::Utf8,
        )?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| Error::Internal("judgement is not text".into()))?;
        let q = batch
            .column_by_name(&self.questions)
            .ok_or_else(|| Error::Internal(format!("no column {}", self.questions)))?;
        let q = cast(
            q,
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        )?;
        let q = q
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(|| Error::Internal("questions is not a list".into()))?;
        let mut verdicts = Vec::with_capacity(batch.num_rows());
        let mut nq = Vec::new();
        let mut ny = Vec::new();
        let mut nn = Vec::new();
        let mut errs: Vec<Option<String>> = Vec::new();
        let mut scores = ListBuilder::new(BooleanBuilder::new());
        let mut counts = [0i64; 3];
        for row in 0..batch.num_rows() {
            let n = if q.is_null(row) {
                0
            } else {
                q.value(row).len()
            };
            let t = (!text.is_null(row)).then(|| text.value(row));
            let j = self.judge(t, n);
            let v = j.verdict_by(self.pass_rule);
            counts[match v {
                "pass" => 0,
                "fail" => 1,
                _ => 2,
            }] += 1;
            verdicts.push(v);
            nq.push(n as i64);
            ny.push(j.scores.iter().filter(|s| **s == Some(true)).count() as i64);
            nn.push(j.scores.iter().filter(|s| **s == Some(false)).count() as i64);
            for s in &j.scores {
                scores.values().append_option(*s);
            }
            scores.append(true);
            errs.push(j.error);
        }
        let mut cols: Vec<ArrayRef> = Vec::new();
        for f in schema.fields() {
            let c: ArrayRef = match f.name().as_str() {
                "verdict" => Arc::new(StringArray::from(verdicts.clone())),
                "n_questions" => Arc::new(Int64Array::from(nq.clone())),
                "n_yes" => Arc::new(Int64Array::from(ny.clone())),
                "n_no" => Arc::new(Int64Array::from(nn.clone())),
                "scores" => Arc::new(scores.finish_cloned()),
                "verdict_error" => Arc::new(StringArray::from(errs.clone())),
                name => batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::Internal(format!("no column {name}")))?
                    .clone(),
            };
            cols.push(c);
        }
        Ok((RecordBatch::try_new(schema.clone(), cols)?, counts))
    }
}

impl Stage for VerdictStage {
    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        match schema.field_with_name(&self.judgement) {
            Err(_) => errs.push(unknown_column(
                ctx,
                &["judgement"],
                &self.judgement,
                schema,
            )),
            Ok(f) if !matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
                errs.push(
                    ctx.err(
                        &["judgement"],
                        format!("`{}` is {}, expected text", self.judgement, f.data_type()),
                    )
                    .hint("point `judgement` at the judge's response column (one response per row: use `explode: true` on the llm stage)"),
                )
            }
            Ok(_) => {}
        }
        match schema.field_with_name(&self.questions) {
            Err(_) => errs.push(unknown_column(ctx, &["questions"], &self.questions, schema)),
            Ok(f) if !matches!(f.data_type(), DataType::List(_) | DataType::LargeList(_)) => errs
                .push(
                    ctx.err(
                        &["questions"],
                        format!(
                            "`{}` is {}, expected a list of strings",
                            self.questions,
                            f.data_type()
                        ),
                    )
                    .hint("build it with SQL, e.g. make_array(q1, q2) or array_agg(question)"),
                ),
            Ok(_) => {}
        }
        if !self.key.contains("{i}") {
            errs.push(
                ctx.err(&["key"], format!("key `{}` has no `{{i}}`", self.key))
                    .hint("e.g. key: \"Question {i}\""),
            );
        }
        if errs.is_empty() {
            Ok(self.out_schema(schema))
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let path = ctx.out.join("part-00000.parquet");
        let mut w: Option<ArrowWriter<File>> = None;
        let mut totals = [0i64; 3];
        for b in read_batches(&ctx.parent().files) {
            let (out, counts) = self.process(&b?, &ctx.schema)?;
            for (t, c) in totals.iter_mut().zip(counts) {
                *t += c;
            }
            let w = match &mut w {
                Some(w) => w,
                None => {
                    let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                    w.insert(crate::engine::parquet_writer(f, ctx.schema.clone())?)
                }
            };
            w.write(&out)?;
        }
        match w {
            Some(w) => {
                w.close()?;
            }
            None => crate::engine::write_empty(&path, &ctx.schema)?,
        }
        let mut out = RunOutput::default();
        out.counters.insert("pass".into(), totals[0]);
        out.counters.insert("fail".into(), totals[1]);
        out.counters.insert("unjudged".into(), totals[2]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> VerdictStage {
        VerdictStage {
            judgement: d_judgement(),
            questions: d_questions(),
            key: d_key(),
            score_field: d_score_field(),
            pass_rule: PassRule::AllYes,
        }
    }

    fn v(text: &str, n: usize) -> (&'static str, Vec<Option<bool>>) {
        let j = stage().judge(Some(text), n);
        (j.verdict(), j.scores)
    }

    #[test]
    fn strict_json() {
        let t = r#"{"Question 1": {"explanation": "ok", "score": "YES"},
                    "Question 2": {"explanation": "has 4 items", "score": "NO"}}"#;
        assert_eq!(v(t, 2), ("fail", vec![Some(true), Some(false)]));
        let t = r#"{"Question 1": {"explanation": "ok", "score": "YES"}}"#;
        assert_eq!(v(t, 1), ("pass", vec![Some(true)]));
    }

    #[test]
    fn prose_around_json_and_lowercase_scores() {
        let t = "Sure! Here is my evaluation:\n```json\n{\"question 1\": {\"Explanation\": \"fine\", \"Score\": \"yes\"}, \"Question_2\": {\"score\": \"Yes.\"}}\n```\nHope this helps.";
        assert_eq!(v(t, 2), ("pass", vec![Some(true), Some(true)]));
    }

    #[test]
    fn python_literals_and_single_quotes() {
        let t =
            "{'Question 1': {'explanation': 'ok', 'score': True}, 'Question 2': {'score': False,}}";
        assert_eq!(v(t, 2), ("fail", vec![Some(true), Some(false)]));
    }

    #[test]
    fn missing_question_is_unjudged_even_with_a_no() {
        let t = r#"{"Question 1": {"score": "NO"}}"#;
        let j = stage().judge(Some(t), 2);
        assert_eq!(j.verdict(), "unjudged");
        assert_eq!(j.scores, vec![Some(false), None]);
        assert!(j.error.unwrap().contains("Question 2"));
    }

    #[test]
    fn unreadable_score_and_no_json() {
        assert_eq!(v(r#"{"Question 1": {"score": "maybe"}}"#, 1).0, "unjudged");
        assert_eq!(
            v("The response follows every constraint. YES", 1).0,
            "unjudged"
        );
        assert_eq!(stage().judge(None, 1).verdict(), "unjudged");
        assert_eq!(v(r#"{"Question 1": {"score": "YES"}}"#, 0).0, "unjudged");
    }

    #[test]
    fn bare_scores_lists_and_reasoning() {
        assert_eq!(
            v(r#"{"Question 1": "YES", "Question 2": "no"}"#, 2).0,
            "fail"
        );
        assert_eq!(v(r#"[{"score": "YES"}, {"score": "YES"}]"#, 2).0, "pass");
        // The reasoning block mentions a NO; only the answer after it counts.
        let t = "<think>{\"Question 1\": {\"score\": \"NO\"}}</think>{\"Question 1\": {\"score\": \"YES\"}}";
        assert_eq!(v(t, 1).0, "pass");
    }

    #[test]
    fn no_no_passes_what_has_no_no() {
        let by = |t: &str, n: usize| {
            let j = stage().judge(Some(t), n);
            (j.verdict_by(PassRule::AllYes), j.verdict_by(PassRule::NoNo))
        };
        // Question 2 skipped: unjudged by all_yes, a pass by no_no.
        assert_eq!(
            by(r#"{"Question 1": {"score": "YES"}}"#, 2),
            ("unjudged", "pass")
        );
        // An unreadable score beside a YES: likewise.
        assert_eq!(
            by(
                r#"{"Question 1": {"score": "YES"}, "Question 2": {"score": "partly"}}"#,
                2
            ),
            ("unjudged", "pass")
        );
        // A NO with a question missing: unjudged by all_yes, a failure by no_no.
        assert_eq!(
            by(r#"{"Question 1": {"score": "NO"}}"#, 2),
            ("unjudged", "fail")
        );
        // The same where both rules agree.
        assert_eq!(
            by(r#"{"Question 1": "YES", "Question 2": "YES"}"#, 2),
            ("pass", "pass")
        );
        assert_eq!(
            by(r#"{"Question 1": "YES", "Question 2": "NO"}"#, 2),
            ("fail", "fail")
        );
        // Nothing readable: unjudged by both.
        assert_eq!(by("no JSON here", 2), ("unjudged", "unjudged"));
        assert_eq!(
            by(r#"{"Question 1": {"score": "maybe"}}"#, 1),
            ("unjudged", "unjudged")
        );
        assert_eq!(by(r#"{"Question 1": "YES"}"#, 0), ("unjudged", "unjudged"));
    }

    #[test]
    fn extra_questions_in_the_answer_are_ignored() {
        let t = r#"{"Question 1": {"score": "YES"}, "Question 2": {"score": "NO"}}"#;
        assert_eq!(v(t, 1).0, "pass");
    }
}
