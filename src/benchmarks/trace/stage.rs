//! `kind: constraint_scores` — a judge's 0–10 score for every constraint of an instruction
//! (TRACE's protocol: an explanation per constraint, then `Fine Grained Score:` as JSON
//! mapping each constraint to its score, then `Constraints Overall Score: [[d]]`). The public
//! script reads only the overall score; this kind reads each constraint's, so accuracy can be
//! counted per constraint and per instruction.
//!
//! Reading, in order, never failing the row:
//! 1. the JSON after the last `Fine Grained Score` that has one (an object, or a list of objects, as the prompt's
//!    example writes it): entries whose key is a constraint's text (numbering and end
//!    punctuation aside) go to that constraint; when the entries are as many as the
//!    constraints, they are taken in order; otherwise the unmatched constraints have none;
//! 2. for constraints still without a score, the explanation's numbered lines (`2. …得分8分`,
//!    `2、… score: 8`, `2. … 8/10`): the last score-like number of the line numbered k goes to
//!    constraint k.
//!
//! A score outside 0–10 is no score. Added columns: `scores` (a double per constraint, null
//! where the judge gave none), `satisfied` (per constraint: score ≥ `pass_score`, null where
//! unscored), `all_satisfied` (every constraint satisfied; null when one is unscored and none
//! failed), `overall_score` (the first `Constraints Overall Score: [[d]]`, as the script reads it), `n_unscored`, `scores_error`. Counters: `scored`,
//! `unscored` (constraints), `rows_with_missing`.

use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BooleanArray, BooleanBuilder, Float64Array, Float64Builder, Int64Array,
    ListBuilder, StringArray,
};
use arrow::datatypes::{DataType, Field, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Diagnostic, Error, Result};
use crate::stages::{
    KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, text_column,
    unknown_column,
};
use crate::table::{string_col, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "constraint_scores",
    about: "a judge's 0-10 score per constraint (TRACE's fine-grained scores), read from JSON or prose",
    build: crate::stages::build::<ConstraintScoresStage>,
    schema: |g| ConstraintScoresStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

fn d_judgement() -> String {
    "judgement".into()
}
fn d_constraints() -> String {
    "constraints".into()
}
fn d_pass() -> f64 {
    10.0
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConstraintScoresStage {
    /// The judge's answer (null: not judged).
    #[serde(default = "d_judgement")]
    pub judgement: String,
    /// The instruction's constraints, a list of strings.
    #[serde(default = "d_constraints")]
    pub constraints: String,
    /// The score (0–10) at which a constraint counts as satisfied (default 10).
    #[serde(default = "d_pass")]
    pub pass_score: f64,
}

/// Constraint text without its numbering (`3. `, `3、`) and end punctuation, for matching.
fn norm(s: &str) -> String {
    let t = s.trim();
    let t = t.trim_start_matches(|c: char| c.is_ascii_digit());
    let t = t.trim_start_matches(['.', '、', ')', '）', ' ']);
    t.trim_end_matches(['；', ';', '。', '.', '，', ',', ' '])
        .trim()
        .to_string()
}

fn score_of(v: &serde_json::Value) -> Option<f64> {
    let x = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().trim_end_matches('分').trim().parse().ok()?,
        _ => return None,
    };
    (0.0..=10.0).contains(&x).then_some(x)
}

/// The first JSON value at or after `from` that parses (an object or a list).
fn json_after(text: &str, from: usize) -> Option<serde_json::Value> {
    let rest = &text[from..];
    for (i, c) in rest.char_indices() {
        if c == '{' || c == '[' {
            let mut it =
                serde_json::Deserializer::from_str(&rest[i..]).into_iter::<serde_json::Value>();
            if let Some(Ok(v)) = it.next() {
                return Some(v);
            }
        }
    }
    None
}

/// The overall score as the reference reads it (Complex-IF TRACE `trace.py`):
/// `re.search(r"Constraints Overall Score:\s*\[\[([0-9.]+)\]\]", text)`, the first match, and
/// `float()` of the group (none when that fails, e.g. `1.2.3`).
pub fn overall(text: &str) -> Option<f64> {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"Constraints Overall Score:\s*\[\[([0-9.]+)\]\]").expect("valid regex")
    });
    RE.captures(text)?.get(1)?.as_str().parse().ok()
}

/// The last score-like number of a line: `得分8分`, `8分`, `score: 8`, `8/10`.
fn line_score(line: &str) -> Option<f64> {
    static RE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)(?:得分\s*[:：]?\s*(\d+(?:\.\d+)?))|(?:(\d+(?:\.\d+)?)\s*分)|(?:score\s*[:：]?\s*(\d+(?:\.\d+)?))|(?:(\d+(?:\.\d+)?)\s*/\s*10\b)",
        )
        .expect("valid regex")
    });
    RE.captures_iter(line)
        .filter_map(|c| (1..=4).find_map(|g| c.get(g)))
        .filter_map(|m| m.as_str().parse::<f64>().ok())
        .filter(|x| (0.0..=10.0).contains(x))
        .last()
}

/// Each constraint's score (None where the judge gave none).
pub fn parse(text: &str, constraints: &[&str]) -> Vec<Option<f64>> {
    let n = constraints.len();
    let mut out: Vec<Option<f64>> = vec![None; n];
    // The last `Fine Grained Score` followed by JSON: a judge may restate the format first.
    let found = text
        .match_indices("Fine Grained Score")
        .chain(text.match_indices("Fine-Grained Score"))
        .map(|(i, _)| i)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .rev()
        .find_map(|i| json_after(text, i));
    if let Some(v) = found {
        let mut entries: Vec<(String, Option<f64>)> = Vec::new();
        let objects: Vec<&serde_json::Value> = match &v {
            serde_json::Value::Array(a) => a.iter().collect(),
            o => vec![o],
        };
        for o in objects {
            if let Some(m) = o.as_object() {
                entries.extend(m.iter().map(|(k, v)| (k.clone(), score_of(v))));
            } else {
                entries.push((String::new(), score_of(o)));
            }
        }
        let normed: Vec<String> = constraints.iter().map(|c| norm(c)).collect();
        let mut matched = 0;
        for (k, s) in &entries {
            let k = norm(k);
            if k.is_empty() {
                continue;
            }
            if let Some(j) = normed.iter().position(|c| {
                !c.is_empty() && (*c == k || c.contains(&k) || k.contains(c.as_str()))
            }) && out[j].is_none()
            {
                out[j] = *s;
                matched += 1;
            }
        }
        if matched < n && entries.len() == n {
            // Keys that are not the constraints' text: take the scores in order.
            for (j, (_, s)) in entries.iter().enumerate() {
                if out[j].is_none() {
                    out[j] = *s;
                }
            }
        }
    }
    if out.iter().any(Option::is_none) {
        // Numbered lines of the explanation: "k. ..." / "k、..." / "**k.** ...".
        for line in text.lines() {
            let l = line.trim().trim_start_matches(['*', '#', '-', ' ']);
            let digits: String = l.chars().take_while(|c| c.is_ascii_digit()).collect();
            let Ok(k) = digits.parse::<usize>() else {
                continue;
            };
            let after = &l[digits.len()..];
            if !after.starts_with(['.', '、', ')', '）']) || k == 0 || k > n || out[k - 1].is_some()
            {
                continue;
            }
            out[k - 1] = line_score(after);
        }
    }
    out
}

const ADDED: [&str; 6] = [
    "scores",
    "satisfied",
    "all_satisfied",
    "overall_score",
    "n_unscored",
    "scores_error",
];

fn added_fields() -> [Field; 6] {
    [
        Field::new(
            "scores",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new(
            "satisfied",
            DataType::List(Arc::new(Field::new("item", DataType::Boolean, true))),
            true,
        ),
        Field::new("all_satisfied", DataType::Boolean, true),
        Field::new("overall_score", DataType::Float64, true),
        Field::new("n_unscored", DataType::Int64, false),
        Field::new("scores_error", DataType::Utf8, true),
    ]
}

impl Stage for ConstraintScoresStage {
    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let mut errs = Vec::new();
        if let Some(mut d) = text_column(ctx, &self.judgement, "constraint_scores") {
            d.pos = ctx.node.pos_at(&["judgement"]);
            errs.push(d);
        }
        match ctx.parent().field_with_name(&self.constraints) {
            Err(_) => errs.push(unknown_column(
                ctx,
                &["constraints"],
                &self.constraints,
                ctx.parent(),
            )),
            Ok(f) if !matches!(f.data_type(), DataType::List(i) if crate::table::is_string_type(i.data_type())) => {
                errs.push(ctx.err(
                    &["constraints"],
                    format!(
                        "column `{}` is {}, but the constraints must be a list of strings",
                        self.constraints,
                        f.data_type()
                    ),
                ))
            }
            Ok(_) => {}
        }
        if !(0.0..=10.0).contains(&self.pass_score) {
            errs.push(ctx.err(&["pass_score"], "pass_score must be within 0-10"));
        }
        errs.extend(reserved_columns(
            ctx,
            &ADDED,
            "which constraint_scores adds",
        ));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(with_fields(ctx.parent(), &added_fields()))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let (mut scored, mut unscored, mut rows_missing) = (0i64, 0i64, 0i64);
        kit::append_columns(ctx, |b| {
            let texts = string_col(b, &self.judgement)?;
            let cons = b
                .column_by_name(&self.constraints)
                .ok_or_else(|| Error::stage(ctx.id, "constraints column missing"))?;
            let cons = arrow::compute::cast(
                cons,
                &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            )?;
            let cons = cons.as_list::<i32>();
            let mut scores_b = ListBuilder::new(Float64Builder::new());
            let mut sat_b = ListBuilder::new(BooleanBuilder::new());
            let mut all_b = Vec::with_capacity(b.num_rows());
            let mut overall_b = Vec::with_capacity(b.num_rows());
            let mut unscored_b = Vec::with_capacity(b.num_rows());
            let mut err_b: Vec<Option<String>> = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                let list: Vec<String> = if cons.is_null(i) {
                    Vec::new()
                } else {
                    let v = cons.value(i);
                    let v = v.as_string::<i32>();
                    v.iter().map(|s| s.unwrap_or("").to_string()).collect()
                };
                let refs: Vec<&str> = list.iter().map(String::as_str).collect();
                let (s, ov) = if texts.is_null(i) {
                    (vec![None; refs.len()], None)
                } else {
                    (parse(texts.value(i), &refs), overall(texts.value(i)))
                };
                let missing = s.iter().filter(|x| x.is_none()).count();
                scored += (s.len() - missing) as i64;
                unscored += missing as i64;
                rows_missing += (missing > 0) as i64;
                let sat: Vec<Option<bool>> =
                    s.iter().map(|x| x.map(|v| v >= self.pass_score)).collect();
                let all = if sat.contains(&Some(false)) {
                    Some(false)
                } else if missing > 0 {
                    None
                } else {
                    Some(true)
                };
                scores_b.append_value(s.iter().copied());
                sat_b.append_value(sat.iter().copied());
                all_b.push(all);
                overall_b.push(ov);
                unscored_b.push(missing as i64);
                err_b.push(if texts.is_null(i) {
                    Some("no judgement".into())
                } else if missing > 0 {
                    Some(format!(
                        "no score for constraint{} {} of {}",
                        if missing == 1 { "" } else { "s" },
                        s.iter()
                            .enumerate()
                            .filter(|(_, x)| x.is_none())
                            .map(|(j, _)| (j + 1).to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        s.len()
                    ))
                } else {
                    None
                });
            }
            Ok(vec![
                Arc::new(scores_b.finish()),
                Arc::new(sat_b.finish()),
                Arc::new(BooleanArray::from(all_b)),
                Arc::new(Float64Array::from(overall_b)),
                Arc::new(Int64Array::from(unscored_b)),
                Arc::new(StringArray::from(err_b)),
            ])
        })?;
        let mut out = RunOutput::default();
        out.counters.insert("scored".into(), scored);
        out.counters.insert("unscored".into(), unscored);
        out.counters
            .insert("rows_with_missing".into(), rows_missing);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONS: [&str; 3] = [
        "1. 描述需采用文艺的语气风格；",
        "2. 字数不少于200字；",
        "3. 使用比喻手法。",
    ];

    #[test]
    fn json_scores_by_key_or_in_order() {
        let t = "Explanation: ...\nFine Grained Score: [{\"描述需采用文艺的语气风格\": 10, \"使用比喻手法\": 6, \"字数不少于200字\": \"8\"}]\nConstraints Overall Score: [[7]]";
        assert_eq!(parse(t, &CONS), [Some(10.0), Some(8.0), Some(6.0)]);
        assert_eq!(overall(t), Some(7.0));
        // The last JSON counts (a judge may restate the format before answering).
        let t2 = format!("Write the Fine Grained Score as JSON like [{{\"x\": 1}}].\n{t}");
        assert_eq!(parse(&t2, &CONS), [Some(10.0), Some(8.0), Some(6.0)]);
        // Keys that are not the constraints, as many as the constraints: in order.
        let t = "Fine Grained Score: {\"a\": 1, \"b\": 2, \"c\": 3}";
        assert_eq!(parse(t, &CONS), [Some(1.0), Some(2.0), Some(3.0)]);
    }

    #[test]
    fn prose_scores_and_missing_constraints() {
        // No JSON: the numbered lines; constraint 3 is never scored.
        let t = "1. 语气：符合要求，得分10分。\n2、字数：只有150字，不符合，得分：3分\n总体来说不错。\nConstraints Overall Score: [[6]]";
        assert_eq!(parse(t, &CONS), [Some(10.0), Some(3.0), None]);
        // JSON with one key missing, the prose fills it in; an out-of-range score is none.
        let t = "1. ok score: 9\n2. fine 7/10\n3. bad 得分12分\nFine Grained Score: [{\"描述需采用文艺的语气风格\": 10}]";
        assert_eq!(parse(t, &CONS), [Some(10.0), Some(7.0), None]);
        // Garbage, broken JSON, nothing at all: no scores, no panic.
        assert_eq!(
            parse("Fine Grained Score: [{\"x\": ", &CONS),
            [None, None, None]
        );
        assert_eq!(parse("", &CONS), [None, None, None]);
        assert_eq!(overall("Overall Score: [[ten]]"), None);
    }

    #[test]
    fn overall_score_is_the_first_match_of_the_reference_regex() {
        // re.search: the first place the whole pattern matches.
        let t = "Constraints Overall Score: [[4]]\n...\nConstraints Overall Score: [[9]]";
        assert_eq!(overall(t), Some(4.0));
        // A mention without [[d]] is not a match; the search goes on to the next.
        let t = "the Constraints Overall Score: comes last\nConstraints Overall Score:\n [[7.5]]";
        assert_eq!(overall(t), Some(7.5));
        // Only "Constraints Overall Score:" with the colon, digits and dots in [[ ]].
        assert_eq!(overall("Overall Score: [[6]]"), None);
        assert_eq!(overall("Constraints Overall Score: [[ 6 ]]"), None);
        assert_eq!(overall("Constraints Overall Score: [[6/10]]"), None);
        // float(): "7." is 7.0, "1.2.3" fails (the script's except: no rating).
        assert_eq!(overall("Constraints Overall Score: [[7.]]"), Some(7.0));
        assert_eq!(overall("Constraints Overall Score: [[1.2.3]]"), None);
        // No range check: the script keeps what it reads.
        assert_eq!(overall("Constraints Overall Score: [[12]]"), Some(12.0));
    }
}
