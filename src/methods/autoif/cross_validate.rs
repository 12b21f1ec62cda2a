//! `kind: cross_validate` — AutoIF's cross-validation of LLM-written verifier functions
//! (Qwen's `code/3_cross_validation.py`): per instruction, parse each answer, run its function
//! in the [`crate::sandbox`] on every test case, keep the cases some function agrees with and
//! the functions that get enough of them right.
//!
//! Per answer, as upstream: the first ```` ```json ```` block (lower case, non-greedy) is the
//! answer, stripped as Python's `str.strip()`, read with Python's strict `json.loads` rules
//! (no fence or bad JSON drops it); `func` is stripped and every line containing `download` or
//! `requests` is deleted; a source that fails to execute drops the answer and its cases.
//! Functions deduplicate by exact source and cases by exact (input, label); an instruction
//! needs `min_functions` functions and `min_cases` cases after deduplication and before case
//! filtering; a case is kept when any function's value `==` its label (Python equality: `1 ==
//! True`, `"true" != True`); a function's accuracy is its share of kept cases answered right
//! (exceptions and timeouts are wrong); functions at `min_accuracy` or above are kept.
//!
//! `reference: flywheel` follows the Post-Training-Data-Flywheel re-implementation's step 3
//! instead (`IF-generation/code/3_cross_validation.py`): before `json.loads` the fenced text is
//! repaired by its `col_formatter` (the line breaks from `def evaluate(response):` up to the
//! first `return` after it are escaped as `\n`, so a function written with raw line breaks in
//! its JSON string parses); nothing is deduplicated; an answer without `cases` keeps its
//! function (it counts toward `min_functions` and is scored on the other answers' cases).
//!
//! Added columns (names other tools read; keep them): `n_answers`, `n_parsed`, `n_compiled`,
//! `n_functions`, `n_cases`, `n_cases_kept` (null when the minimums dropped the row first),
//! `function_accuracy` (one per distinct function, first-seen order; null for a function with
//! no `evaluate`), `kept_functions`, `kept_accuracy`, `kept_cases` (JSON `[input, label]`),
//! `kept`, `drop_reason`, `answer_status` (one per answer).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Builder, Int64Array, ListBuilder, StringArray, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Diagnostic, Result};
use crate::python::{pyjson, pytext};
use crate::sandbox::{Executions, SandboxConfig};
use crate::stages::{
    KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, unknown_column,
};
use crate::table::{batch_rows, read_batches, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "cross_validate",
    about: "AutoIF's cross-validation of LLM-written Python verifier functions on their test cases (sandboxed)",
    build: crate::stages::build::<CrossValidateStage>,
    schema: |g| CrossValidateStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

fn d_instruction() -> String {
    "instruction".into()
}
fn d_answers() -> String {
    "answers".into()
}
fn d_min_functions() -> usize {
    3
}
fn d_min_cases() -> usize {
    10
}
fn d_min_accuracy() -> f64 {
    0.8
}
/// Whose step 3 the stage follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reference {
    /// Qwen's `code/3_cross_validation.py` (the paper's authors).
    #[default]
    Qwen,
    /// The Post-Training-Data-Flywheel re-implementation: JSON repair (`col_formatter`), no
    /// deduplication, functions of answers without `cases` kept.
    Flywheel,
}
fn d_drop_lines() -> Vec<String> {
    vec!["download".into(), "requests".into()]
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrossValidateStage {
    /// Text column with the instruction (kept as is; for lineage and later steps).
    #[serde(default = "d_instruction")]
    pub instruction: String,
    /// Column with the LLM's answers: a list of strings (upstream's `gpt-answer`) or one string.
    #[serde(default = "d_answers")]
    pub answers: String,
    /// Distinct compiled functions an instruction needs (upstream: 3).
    #[serde(default = "d_min_functions")]
    pub min_functions: usize,
    /// Distinct test cases of the compiled answers an instruction needs, before case
    /// filtering (upstream: 10).
    #[serde(default = "d_min_cases")]
    pub min_cases: usize,
    /// A function is kept at this accuracy on the kept cases or above (upstream: 0.8).
    #[serde(default = "d_min_accuracy")]
    pub min_accuracy: f64,
    /// Whose step 3 to follow: `qwen` (default) or `flywheel` (see the module docs).
    #[serde(default)]
    pub reference: Reference,
    /// Deduplicate functions by exact source and cases by exact (input, label). Default: as
    /// the reference does (Qwen: yes; Flywheel: no, so five identical answers pass the
    /// three-function minimum). Setting it changes only the deduplication.
    #[serde(default)]
    pub dedup: Option<bool>,
    /// Source lines containing any of these are deleted before execution (upstream:
    /// `download`, `requests`, so `nltk.download(...)` and `import requests` go).
    #[serde(default = "d_drop_lines")]
    pub drop_lines_containing: Vec<String>,
    /// How the functions run (interpreter, timeout, memory, workers).
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

const ADDED: [&str; 13] = [
    "n_answers",
    "n_parsed",
    "n_compiled",
    "n_functions",
    "n_cases",
    "n_cases_kept",
    "function_accuracy",
    "kept_functions",
    "kept_accuracy",
    "kept_cases",
    "kept",
    "drop_reason",
    "answer_status",
];

fn list_of(t: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", t, true)))
}

impl Stage for CrossValidateStage {
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
        let mut errs = self.sandbox.diagnostics(&ctx.file, node);
        if !(0.0..=1.0).contains(&self.min_accuracy) {
            errs.push(Diagnostic::new(
                &ctx.file,
                node.pos_at(&["min_accuracy"]),
                format!(
                    "min_accuracy must be between 0 and 1, not {}",
                    self.min_accuracy
                ),
            ));
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        if let Some(d) = crate::stages::text_column(ctx, &self.instruction, "cross_validate") {
            errs.push(ctx.err(&["instruction"], d.message).maybe_hint(d.hint));
        }
        match schema.field_with_name(&self.answers) {
            Err(_) => errs.push(unknown_column(ctx, &["answers"], &self.answers, schema)),
            Ok(f) => {
                let t = f.data_type();
                let ok = crate::table::is_string_list(t) || crate::table::is_string_type(t);
                if !ok {
                    errs.push(
                        ctx.err(
                            &["answers"],
                            format!(
                                "column `{}` is {}, but the answers must be a list of strings (or one string)",
                                self.answers,
                                f.data_type()
                            ),
                        )
                        .hint("upstream's files have them as `gpt-answer`: a list of raw LLM answers"),
                    );
                }
            }
        }
        errs.extend(reserved_columns(ctx, &ADDED, "which cross_validate adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(out_schema(schema))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let mut rows: Vec<Vec<Answer>> = Vec::new();
        let mut batches = Vec::new();
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            for row in batch_rows(&b)? {
                let answers = match &row[&self.answers] {
                    Value::Array(a) => a.iter().map(|v| v.as_str().map(str::to_string)).collect(),
                    Value::String(s) => vec![Some(s.clone())],
                    _ => Vec::new(),
                };
                rows.push(answers.iter().map(|a| self.parse(a.as_deref())).collect());
            }
            batches.push(b);
        }
        // Phase 1: execute every distinct source once (compile only).
        let mut sources: Vec<(String, Vec<Value>)> = Vec::new();
        let mut seen = HashSet::new();
        for a in rows.iter().flatten() {
            if let Answer::Parsed { func, .. } = a
                && seen.insert(func.clone())
            {
                sources.push((func.clone(), Vec::new()));
            }
        }
        let compiled = kit::run_in_sandbox(ctx, &self.sandbox, &sources, &|_| {})?;
        // Phase 2: the instructions that meet the minimums call each function on each case.
        let collected: Vec<Collected> = rows.iter().map(|r| self.collect(r, &compiled)).collect();
        let mut wanted: Vec<(String, Vec<Value>)> = Vec::new();
        for c in collected.iter().filter(|c| c.meets_minimums(self)) {
            for f in c
                .functions
                .iter()
                .filter(|f| compiled.compiled[*f].has_evaluate)
            {
                wanted.push((f.clone(), c.cases.iter().map(|(i, _)| i.clone()).collect()));
            }
        }
        let total: usize = wanted.iter().map(|w| w.1.len()).sum();
        tracing::info!("{}: {} function calls on test cases", ctx.id, total);
        let calls = kit::run_in_sandbox(ctx, &self.sandbox, &wanted, &|n| {
            tracing::debug!("{n} calls done")
        })?;
        let results: Vec<Validated> = collected.iter().map(|c| self.validate(c, &calls)).collect();
        let mut out = RunOutput::default();
        let mut count = |k: &str, n: usize| *out.counters.entry(k.into()).or_default() += n as i64;
        count(
            "calls_executed",
            (compiled.executed + calls.executed) as usize,
        );
        count(
            "calls_cached",
            (compiled.from_cache + calls.from_cache) as usize,
        );
        for (c, v) in collected.iter().zip(&results) {
            count("answers", c.statuses.len());
            count("answers_parsed", c.n_parsed);
            count("answers_compiled", c.n_compiled);
            count("functions", c.functions.len());
            count("functions_kept", v.kept_functions.len());
            count("cases", c.cases.len());
            count("cases_kept", v.n_cases_kept.unwrap_or(0));
            count(if v.kept() { "pass" } else { "fail" }, 1);
        }
        let mut at = 0;
        kit::write_with_columns(ctx, batches.into_iter().map(Ok), |b| {
            let n = b.num_rows();
            let cols = columns(&collected[at..at + n], &results[at..at + n]);
            at += n;
            Ok(cols)
        })?;
        Ok(out)
    }
}

fn out_schema(parent: &Schema) -> SchemaRef {
    with_fields(
        parent,
        &[
            Field::new("n_answers", DataType::Int64, false),
            Field::new("n_parsed", DataType::Int64, false),
            Field::new("n_compiled", DataType::Int64, false),
            Field::new("n_functions", DataType::Int64, false),
            Field::new("n_cases", DataType::Int64, false),
            Field::new("n_cases_kept", DataType::Int64, true),
            Field::new("function_accuracy", list_of(DataType::Float64), false),
            Field::new("kept_functions", list_of(DataType::Utf8), false),
            Field::new("kept_accuracy", list_of(DataType::Float64), false),
            Field::new("kept_cases", list_of(DataType::Utf8), false),
            Field::new("kept", DataType::Boolean, false),
            Field::new("drop_reason", DataType::Utf8, true),
            Field::new("answer_status", list_of(DataType::Utf8), false),
        ],
    )
}

/// One answer after parsing.
#[derive(Debug, Clone)]
enum Answer {
    /// Why it was dropped before execution.
    Dropped(String),
    Parsed {
        func: String,
        cases: Vec<(Value, Value)>,
    },
}

/// An instruction's functions and cases from its compiled answers.
struct Collected {
    statuses: Vec<String>,
    n_parsed: usize,
    n_compiled: usize,
    /// Distinct compiled sources, first-seen order (all of them without dedup).
    functions: Vec<String>,
    /// Distinct (input, label), first-seen order.
    cases: Vec<(Value, Value)>,
}

impl Collected {
    fn meets_minimums(&self, s: &CrossValidateStage) -> bool {
        self.functions.len() >= s.min_functions && self.cases.len() >= s.min_cases
    }
}

struct Validated {
    n_cases_kept: Option<usize>,
    accuracy: Vec<Option<f64>>,
    kept_functions: Vec<String>,
    kept_accuracy: Vec<f64>,
    kept_cases: Vec<String>,
    drop_reason: Option<&'static str>,
}

impl Validated {
    fn kept(&self) -> bool {
        self.drop_reason.is_none()
    }
}

fn fence() -> &'static Regex {
    static R: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    R.get_or_init(|| Regex::new(r"(?s)```json(.*?)```").expect("valid regex"))
}

/// The Flywheel's `col_formatter`: in `s`, the line breaks from the first
/// `def evaluate(response):` up to the first `return` after it become the two characters `\n`
/// (text without either is returned as it is).
pub fn col_formatter(s: &str) -> String {
    let Some(start) = s.find("def evaluate(response):") else {
        return s.to_string();
    };
    let Some(len) = s[start..].find("return") else {
        return s.to_string();
    };
    let end = start + len;
    format!(
        "{}{}{}",
        &s[..start],
        s[start..end].replace('\n', "\\n"),
        &s[end..]
    )
}

impl CrossValidateStage {
    fn dedup(&self) -> bool {
        self.dedup.unwrap_or(self.reference == Reference::Qwen)
    }

    fn parse(&self, answer: Option<&str>) -> Answer {
        let Some(answer) = answer else {
            return Answer::Dropped("null".into());
        };
        let Some(m) = fence().captures(answer) else {
            return Answer::Dropped("no_json_fence".into());
        };
        let mut text = pytext::strip(m.get(1).map_or("", |g| g.as_str())).to_string();
        if self.reference == Reference::Flywheel {
            text = col_formatter(&text);
        }
        if !pyjson::python_json_loads_accepts(&text) {
            return Answer::Dropped("json_error".into());
        }
        // Python accepted it; serde reads the same value (it refuses only NaN/Infinity,
        // which no verifier answer holds: counted as json_error all the same).
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Answer::Dropped("json_error".into());
        };
        // Upstream's script crashes on these shapes; here the answer is dropped.
        let Some(obj) = v.as_object() else {
            return Answer::Dropped("not_an_object".into());
        };
        let Some(func) = obj.get("func").and_then(Value::as_str) else {
            return Answer::Dropped("no_func".into());
        };
        // The Flywheel appends the function before it looks for `cases` (and skips the rest
        // of the answer when there are none); Qwen's script crashes without them.
        let no_cases = Vec::new();
        let cases = match obj.get("cases").and_then(Value::as_array) {
            Some(c) => c,
            None if self.reference == Reference::Flywheel && obj.get("cases").is_none() => {
                &no_cases
            }
            None => return Answer::Dropped("no_cases".into()),
        };
        let func = pytext::strip(func)
            .split('\n')
            .filter(|line| {
                !self
                    .drop_lines_containing
                    .iter()
                    .any(|w| line.contains(w.as_str()))
            })
            .collect::<Vec<_>>()
            .join("\n");
        // A case without `input` or `output` is skipped (upstream: KeyError, printed).
        let cases = cases
            .iter()
            .filter_map(|c| Some((c.get("input")?.clone(), c.get("output")?.clone())))
            .collect();
        Answer::Parsed { func, cases }
    }

    fn collect(&self, answers: &[Answer], ex: &Executions) -> Collected {
        let mut c = Collected {
            statuses: Vec::new(),
            n_parsed: 0,
            n_compiled: 0,
            functions: Vec::new(),
            cases: Vec::new(),
        };
        let mut seen_f = HashSet::new();
        let mut seen_c = HashSet::new();
        for a in answers {
            match a {
                Answer::Dropped(why) => c.statuses.push(why.clone()),
                Answer::Parsed { func, cases } => {
                    c.n_parsed += 1;
                    let comp = &ex.compiled[func];
                    if !comp.ok {
                        c.statuses.push(format!(
                            "exec_failed: {}",
                            comp.error.as_deref().unwrap_or("error")
                        ));
                        continue;
                    }
                    c.n_compiled += 1;
                    c.statuses.push("compiled".into());
                    if !self.dedup() || seen_f.insert(func.clone()) {
                        c.functions.push(func.clone());
                    }
                    for (input, label) in cases {
                        // Python's json.dumps((input, output)) as the identity: key order,
                        // 1 vs 1.0 and true vs "True" all count.
                        let key = serde_json::to_string(&(input, label)).unwrap_or_default();
                        if !self.dedup() || seen_c.insert(key) {
                            c.cases.push((input.clone(), label.clone()));
                        }
                    }
                }
            }
        }
        c
    }

    fn validate(&self, c: &Collected, ex: &Executions) -> Validated {
        let mut v = Validated {
            n_cases_kept: None,
            accuracy: Vec::new(),
            kept_functions: Vec::new(),
            kept_accuracy: Vec::new(),
            kept_cases: Vec::new(),
            drop_reason: None,
        };
        if c.functions.len() < self.min_functions {
            v.drop_reason = Some("too_few_functions");
            return v;
        }
        if c.cases.len() < self.min_cases {
            v.drop_reason = Some("too_few_cases");
            return v;
        }
        let callable: Vec<&String> = c
            .functions
            .iter()
            .filter(|f| ex.compiled.get(*f).is_some_and(|x| x.has_evaluate))
            .collect();
        let right = |f: &str, input: &Value, label: &Value| {
            ex.call(f, input)
                .is_some_and(|call| call.equals_label(label))
        };
        let kept: Vec<&(Value, Value)> = c
            .cases
            .iter()
            .filter(|(i, l)| callable.iter().any(|f| right(f, i, l)))
            .collect();
        v.n_cases_kept = Some(kept.len());
        v.kept_cases = kept
            .iter()
            .map(|(i, l)| serde_json::to_string(&[i, l]).unwrap_or_default())
            .collect();
        for f in &c.functions {
            if !ex.compiled.get(f).is_some_and(|x| x.has_evaluate) {
                v.accuracy.push(None);
                continue;
            }
            let acc = if kept.is_empty() {
                0.0
            } else {
                kept.iter().filter(|(i, l)| right(f, i, l)).count() as f64 / kept.len() as f64
            };
            v.accuracy.push(Some(acc));
            if acc >= self.min_accuracy {
                v.kept_functions.push(f.clone());
                v.kept_accuracy.push(acc);
            }
        }
        if v.kept_functions.is_empty() {
            v.drop_reason = Some("no_function_passes");
        }
        v
    }
}

fn columns(c: &[Collected], v: &[Validated]) -> Vec<ArrayRef> {
    let ints = |f: &dyn Fn(usize) -> Option<i64>| -> ArrayRef {
        Arc::new((0..c.len()).map(f).collect::<Int64Array>())
    };
    let strings = |f: &dyn Fn(usize) -> Vec<String>| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for i in 0..c.len() {
            for s in f(i) {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let floats = |f: &dyn Fn(usize) -> Vec<Option<f64>>| -> ArrayRef {
        let mut b = ListBuilder::new(Float64Builder::new());
        for i in 0..c.len() {
            for x in f(i) {
                b.values().append_option(x);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    vec![
        ints(&|i| Some(c[i].statuses.len() as i64)),
        ints(&|i| Some(c[i].n_parsed as i64)),
        ints(&|i| Some(c[i].n_compiled as i64)),
        ints(&|i| Some(c[i].functions.len() as i64)),
        ints(&|i| Some(c[i].cases.len() as i64)),
        ints(&|i| v[i].n_cases_kept.map(|n| n as i64)),
        floats(&|i| v[i].accuracy.clone()),
        strings(&|i| v[i].kept_functions.clone()),
        floats(&|i| v[i].kept_accuracy.iter().map(|x| Some(*x)).collect()),
        strings(&|i| v[i].kept_cases.clone()),
        Arc::new(v.iter().map(|x| Some(x.kept())).collect::<BooleanArray>()),
        Arc::new(v.iter().map(|x| x.drop_reason).collect::<StringArray>()),
        strings(&|i| c[i].statuses.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::col_formatter;

    /// Inputs and outputs of the Flywheel's own `col_formatter` (IF-generation/code/
    /// 3_cross_validation.py), run in Python on these texts.
    #[test]
    fn col_formatter_escapes_line_breaks_up_to_the_first_return_as_the_flywheel() {
        // Raw line breaks in the function's JSON string: escaped, and the JSON reads.
        assert_eq!(
            col_formatter(
                "{\"func\": \"def evaluate(response):\n    x = 1\n    return x\", \"cases\": []}"
            ),
            "{\"func\": \"def evaluate(response):\\n    x = 1\\n    return x\", \"cases\": []}"
        );
        // No `return` in the function: the first one is in a case, and the line break
        // between two JSON members is escaped too, which breaks the JSON (as there).
        assert_eq!(
            col_formatter(
                "{\n\"func\": \"def evaluate(response):\\n    pass\",\n\"cases\": [{\"input\": \"return\", \"output\": true}]}"
            ),
            "{\n\"func\": \"def evaluate(response):\\n    pass\",\\n\"cases\": [{\"input\": \"return\", \"output\": true}]}"
        );
        // No `def evaluate(response):`: unchanged.
        let other = "{\"func\": \"def check(r):\n    return True\"}";
        assert_eq!(col_formatter(other), other);
    }
}
