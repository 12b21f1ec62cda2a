//! `kind: test_verdict` — a throwaway kind compiled into unit tests only. It shows what the
//! registry promises a new kind: declaring [`Capability::ProducesVerdicts`] on its entry is
//! all it takes for `ifloom stats` (and the report, which draws from it) to show its pass
//! rates; nothing outside this file and its registry line names it.
//!
//! The verdict: `pass` when `score >= threshold`, `fail` below it, `unjudged` when `score` is
//! null.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, unknown_column};
use crate::error::{Diagnostic, Error, Result};
use crate::table::with_fields;

pub const KIND: KindEntry = KindEntry {
    name: "test_verdict",
    about: "(tests only) pass when score >= threshold",
    build: super::build::<TestVerdict>,
    schema: |g| TestVerdict::json_schema(g),
    capabilities: &[Capability::ProducesVerdicts],
    removed_rows: "",
};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestVerdict {
    pub threshold: i64,
}

impl Stage for TestVerdict {
    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        match ctx.parent().field_with_name("score") {
            Ok(f) if f.data_type() == &DataType::Int64 => Ok(with_fields(
                ctx.parent(),
                &[Field::new("verdict", DataType::Utf8, false)],
            )),
            Ok(_) => Err(vec![ctx.err(&["from"], "`score` must be an integer")]),
            Err(_) => Err(vec![unknown_column(ctx, &["from"], "score", ctx.parent())]),
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let mut out = RunOutput::default();
        super::kit::append_columns(ctx, |b| {
            let score = b
                .column_by_name("score")
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| Error::Internal("score is not Int64".into()))?;
            let verdict: StringArray = (0..score.len())
                .map(|i| {
                    let v = if score.is_null(i) {
                        "unjudged"
                    } else if score.value(i) >= self.threshold {
                        "pass"
                    } else {
                        "fail"
                    };
                    *out.counters.entry(v.into()).or_default() += 1;
                    Some(v)
                })
                .collect();
            Ok(vec![Arc::new(verdict) as ArrayRef])
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::exec::{self, RunOptions};
    use crate::store::RunDir;

    /// A kind that declares `ProducesVerdicts` gets its pass rates in `ifloom stats --json`
    /// (the JSON is `Stats` serialized, as `cli/stats.rs` prints it).
    #[test]
    fn a_new_verdict_kind_shows_its_pass_rates_in_stats_without_an_edit_elsewhere() {
        let tmp = tempfile::tempdir().unwrap();
        // Four instructions (source_id), threshold 5:
        //   a: 9 pass, 3 fail    b: 2 fail, 1 fail    c: 8 pass, null unjudged    d: 7 pass
        std::fs::write(
            tmp.path().join("rows.jsonl"),
            [
                r#"{"source_id": "a", "score": 9}"#,
                r#"{"source_id": "a", "score": 3}"#,
                r#"{"source_id": "b", "score": 2}"#,
                r#"{"source_id": "b", "score": 1}"#,
                r#"{"source_id": "c", "score": 8}"#,
                r#"{"source_id": "c", "score": null}"#,
                r#"{"source_id": "d", "score": 7}"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let file = tmp.path().join("p.yaml");
        std::fs::write(
            &file,
            "name: t\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: judged\n    kind: test_verdict\n    from: rows\n    threshold: 5\n",
        )
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let engine = crate::engine::Engine::new(rt.handle().clone(), crate::registry::functions());
        let plan = crate::compile::compile(&file, &[], &|_| None, &engine).unwrap();
        let dir = RunDir::new(tmp.path().join("run"));
        exec::run(&plan, &dir, &engine, &RunOptions::default()).unwrap();
        let stats = crate::stats::compute_blocking(&engine, &dir, &Default::default()).unwrap();
        let json = serde_json::to_value(&stats).unwrap();

        let section = json["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "pass_rates")
            .unwrap_or_else(|| panic!("no pass_rates section in {json}"));
        let cols: Vec<&str> = section["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let rows = section["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{section}");
        let get = |name: &str| rows[0][cols.iter().position(|c| *c == name).unwrap()].clone();
        assert_eq!(get("table"), "judged");
        assert_eq!(get("instructions"), 4);
        assert_eq!(get("pass"), 3);
        assert_eq!(get("fail"), 3);
        assert_eq!(get("unjudged"), 1);
        // a, c and d have a passing response; only a has a passing and a failing one.
        assert_eq!(get("sft_pass_rate"), 0.75);
        assert_eq!(get("dpo_pass_rate"), 0.25);
        assert_eq!(get("response_pass_rate"), 0.5);
        // And the funnel says what a verdict stage says: how many went unjudged.
        let funnel = json["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "funnel")
            .unwrap();
        assert!(funnel.to_string().contains("1 unjudged (kept"), "{funnel}");
    }
}
