//! `ifloom stats` on runs of pipelines/ultraif.yaml against the simulator's rules
//! (tests/it/ultraif.rs). Every expected figure below was worked out by hand from those
//! rules, as the comments show, not by running the same SQL.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{self, ifloom, ok, root, stderr};
use crate::ultraif::{fixture, run_ultraif, s};

fn stats_json(args: &[&str]) -> Value {
    let mut a = vec!["stats", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(&root(), &a)).unwrap()
}

/// The rows of a section as objects keyed by column.
pub(crate) fn section(stats: &Value, id: &str) -> Vec<serde_json::Map<String, Value>> {
    let sec = stats["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no section {id} in {stats}"));
    let cols: Vec<&str> = sec["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    sec["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            cols.iter()
                .zip(r.as_array().unwrap())
                .map(|(c, v)| (c.to_string(), v.clone()))
                .collect()
        })
        .collect()
}

fn row<'a>(
    rows: &'a [serde_json::Map<String, Value>],
    key: &str,
    value: &str,
) -> &'a serde_json::Map<String, Value> {
    rows.iter()
        .find(|r| r[key] == value)
        .unwrap_or_else(|| panic!("no row with {key} = {value}"))
}

/// Pick some columns of a row, as one JSON object.
fn pick(r: &serde_json::Map<String, Value>, cols: &[&str]) -> Value {
    Value::Object(
        cols.iter()
            .map(|c| (c.to_string(), r[*c].clone()))
            .collect(),
    )
}

#[test]
fn stats_of_an_ultraif_run_match_the_rules() {
    let f = fixture();
    let run = run_ultraif(&f, "run", &[]);
    let st = stats_json(&[s(&run), "--gpus", "2"]);

    // Funnel. 7 instructions, all 10..2000 characters, no duplicates. Each composer round
    // answers 7 rows; "Tell me a joke." gets prose, one parse failure per round. The two rounds
    // are stacked (14); 4 of them have a question (the other 3 instructions were guarded in
    // both rounds), K = 3 gives 12 responses; the judge's "seems fine" answer for UNCLEAR does
    // not parse (1 unjudged). SFT: Describe, Explain, Summarize (3); DPO: Describe (1).
    let funnel = section(&st, "funnel");
    let f_cols = ["rows_in", "rows_out", "kept"];
    for (stage, expect) in [
        ("seeds", json!({"rows_in": 7, "rows_out": 7, "kept": 1.0})),
        (
            "unique_seeds",
            json!({"rows_in": 7, "rows_out": 7, "kept": 1.0}),
        ),
        (
            "compose_r1",
            json!({"rows_in": 7, "rows_out": 7, "kept": 1.0}),
        ),
        (
            "augmented",
            json!({"rows_in": null, "rows_out": 14, "kept": null}),
        ),
        (
            "to_generate",
            json!({"rows_in": 14, "rows_out": 4, "kept": 0.2857}),
        ),
        (
            "responses",
            json!({"rows_in": 4, "rows_out": 12, "kept": 3.0}),
        ),
        (
            "judged",
            json!({"rows_in": 12, "rows_out": 12, "kept": 1.0}),
        ),
        ("sft", json!({"rows_in": 12, "rows_out": 3, "kept": 0.25})),
        ("dpo", json!({"rows_in": 12, "rows_out": 1, "kept": 0.0833})),
        (
            "sft_clean",
            json!({"rows_in": 3, "rows_out": 3, "kept": 1.0}),
        ),
    ] {
        assert_eq!(
            pick(row(&funnel, "stage", stage), &f_cols),
            expect,
            "{stage}"
        );
    }
    let reason = |stage: &str| row(&funnel, "stage", stage)["reason"].clone();
    assert_eq!(reason("instructions"), "input");
    assert_eq!(reason("unique_seeds"), "0 exact duplicates removed");
    assert_eq!(
        reason("compose_r2"),
        "0 request failures (dead-lettered), 1 parse failures (kept, unparsed)"
    );
    assert_eq!(
        reason("to_generate"),
        "10 filtered out by the stage's query"
    );
    assert_eq!(reason("augmented"), "combines query_r1,query_r2");
    assert_eq!(
        reason("judged"),
        "1 unjudged (kept, in neither SFT nor DPO)"
    );
    assert_eq!(reason("sft_near"), "0 near duplicates removed");
    assert_eq!(reason("sft_clean"), "0 removed by decontamination");
    // The funnel lists stages in the order they finished: every stage after its parents.
    let order: Vec<&str> = funnel
        .iter()
        .map(|r| r["stage"].as_str().unwrap())
        .collect();
    let at = |s: &str| order.iter().position(|x| *x == s).unwrap();
    assert!(
        at("instructions") < at("seeds") && at("judge") < at("judged") && at("judged") < at("sft")
    );

    // LLM accounting. vllm profile: K = 3 samples go as one request with n = 3 (4 requests
    // for 4 rows). Round 2 asks the composer the same prompt as round 1 for the 3 guarded
    // instructions (their query did not change): 3 cache hits, 4 requests. Completion tokens of the responses are the simulator's words (truncated
    // at 12): 6+4+2 + 5+3+5 + 2+3+2 + 12+3+2 = 49.
    let llm = section(&st, "llm");
    let cols = [
        "rows",
        "requests",
        "cache_hits",
        "retries",
        "failures",
        "parse_failures",
    ];
    for (stage, expect) in [
        ("compose_r1", json!([7, 7, 0, 0, 0, 1])),
        ("compose_r2", json!([7, 4, 3, 0, 0, 1])),
        ("responses", json!([12, 4, 0, 0, 0, 0])),
        // The judge's text is read by the verdict stage, not parsed by the llm stage: its
        // unreadable answer is counted as unjudged there (below), not as a parse failure here.
        ("judge", json!([12, 12, 0, 0, 0, 0])),
    ] {
        let r = row(&llm, "stage", stage);
        let got: Vec<Value> = cols.iter().map(|c| r[*c].clone()).collect();
        assert_eq!(Value::Array(got), expect, "{stage}");
    }
    let resp = row(&llm, "stage", "responses");
    assert_eq!(resp["completion_tokens"], 49);
    // GPU-seconds are the stage's seconds x --gpus.
    let (secs, gpu) = (
        resp["seconds"].as_f64().unwrap(),
        resp["gpu_seconds"].as_f64().unwrap(),
    );
    assert!(
        (gpu - (secs * 2.0 * 10.0).round() / 10.0).abs() < 0.051,
        "{secs} {gpu}"
    );
    // Latency: every response was sent (none cached), 12 rows after explode.
    let lat = section(&st, "latency");
    assert_eq!(row(&lat, "stage", "responses")["sent"], 12);
    assert_eq!(row(&lat, "stage", "judge")["sent"], 12);

    // Pass rates. Describe: GOOD pass, BAD fail (Q1 NO), BAD2 fail. Explain: GOOD, GOOD pass,
    // OKAY pass (messy but all yes). List: 3 fail. Summarize: 2 GOOD pass, UNCLEAR unjudged.
    // SFT rate 3/4, DPO rate 1/4 (only Describe has both), responses 6/(6+5), unjudged 1/12.
    let pr = section(&st, "pass_rates");
    assert_eq!(
        Value::Object(pr[0].clone()),
        json!({"table": "judged", "instructions": 4, "responses": 12, "pass": 6, "fail": 5,
               "unjudged": 1, "sft_pass_rate": 0.75, "dpo_pass_rate": 0.25,
               "response_pass_rate": 0.5455, "judge_parse_failure_rate": 0.0833})
    );
    let by_round = section(&st, "pass_by_round");
    assert_eq!(
        by_round.len(),
        1,
        "only the final round is generated by default"
    );
    assert_eq!(by_round[0]["round"], 2);
    assert_eq!(by_round[0]["sft_pass_rate"], 0.75);
    // Q1 (bullet points, format): YES from GOOD×4, OKAY... : Describe GOOD, Explain ×3,
    // Summarize GOOD×2 = 6; NO from BAD, BAD2 (Describe), List ×3 = 5; UNCLEAR unanswered.
    // Q2 (ends with a question, stylistic): FIRST_NO says YES to it, so only the ALL_NO
    // answers (BAD2 ×2) are NO: 9 YES, 2 NO.
    let q = section(&st, "pass_by_question");
    let qcols = ["question", "asked", "yes", "no", "unanswered", "pass_rate"];
    assert_eq!(
        pick(&q[0], &qcols),
        json!({"question": 1, "asked": 12, "yes": 6, "no": 5, "unanswered": 1, "pass_rate": 0.5455})
    );
    assert_eq!(
        pick(&q[1], &qcols),
        json!({"question": 2, "asked": 12, "yes": 9, "no": 2, "unanswered": 1, "pass_rate": 0.8182})
    );
    let cat = section(&st, "pass_by_category");
    assert_eq!(
        cat.iter()
            .map(|r| pick(r, &["category", "yes", "no", "pass_rate"]))
            .collect::<Vec<_>>(),
        vec![
            json!({"category": "format", "yes": 6, "no": 5, "pass_rate": 0.5455}),
            json!({"category": "stylistic", "yes": 9, "no": 2, "pass_rate": 0.8182}),
        ]
    );

    // Dataset statistics of the responses: lengths 8 8 10 12 14 17 18 20 25 32 32 56 chars
    // (the long one cut at 12 words), words 2 2 2 2 3 3 3 4 5 5 6 12.
    let text = section(&st, "text");
    let r = row(&text, "table", "responses");
    assert_eq!(
        pick(
            r,
            &[
                "column",
                "rows",
                "nulls",
                "distinct",
                "min_chars",
                "p50_chars",
                "p90_chars",
                "max_chars",
                "min_words",
                "p50_words",
                "p90_words",
                "max_words"
            ]
        ),
        json!({"column": "response", "rows": 12, "nulls": 0, "distinct": 12, "min_chars": 8,
               "p50_chars": 17.5, "p90_chars": 32.0, "max_chars": 56, "min_words": 2,
               "p50_words": 3.0, "p90_words": 5.9, "max_words": 12})
    );
    // Every judged response carries its instruction's 2 questions.
    let lists = section(&st, "lists");
    assert_eq!(
        pick(
            row(&lists, "table", "judged"),
            &[
                "column",
                "rows",
                "empty",
                "min_items",
                "max_items",
                "mean_items"
            ]
        ),
        json!({"column": "questions", "rows": 12, "empty": 0, "min_items": 2, "max_items": 2, "mean_items": 2.0})
    );
    // The character histogram: max 56 → buckets of 5; 8,8 | 10,12,14 | 17,18 | 20 | 25 | 32,32 | 56.
    let h = st["histograms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["table"] == "responses" && h["column"] == "response")
        .unwrap();
    assert_eq!(h["bucket"], 5);
    assert_eq!(
        h["bins"],
        json!([[5, 2], [10, 3], [15, 2], [20, 1], [25, 1], [30, 2], [55, 1]])
    );

    // The terminal form shows the same figures, rates as percentages.
    let out = ok(&root(), &["stats", s(&run)]);
    assert!(
        out.contains("Funnel") && out.contains("75.0%") && out.contains("54.5%"),
        "{out}"
    );
}

#[test]
fn compare_two_runs_and_bad_arguments() {
    let f = fixture();
    let a = run_ultraif(&f, "final", &[]);
    // Every round generated: round 1 has the same 4 instructions with one question (bullet
    // points), and the same answers: 6 pass, 5 fail, 1 unjudged again.
    let b = run_ultraif(&f, "all", &["--set", "generate_rounds=all"]);
    let c = stats_json(&["--compare", s(&a), s(&b)]);
    let sec = c["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "pass_rates")
        .unwrap();
    let v = &sec["rows"][0]["values"];
    assert_eq!(v["responses"], json!({"a": 12, "b": 24, "delta": 12.0}));
    assert_eq!(
        v["sft_pass_rate"],
        json!({"a": 0.75, "b": 0.75, "delta": 0.0})
    );
    let rounds = c["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "pass_by_round")
        .unwrap();
    // Round 2 in both; round 1 only in b.
    let keys: Vec<Value> = rounds["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"][1].clone())
        .collect();
    assert_eq!(keys, vec![json!(2), json!(1)]);
    assert_eq!(rounds["rows"][1]["values"]["responses"]["a"], Value::Null);
    let text = ok(&root(), &["stats", "--compare", s(&a), s(&b)]);
    assert!(text.contains("12 → 24 (+12)"), "{text}");

    // Bad input: a clear message, exit code 2 (usage), nothing written.
    let o = common::ifloom(&root(), &["stats", s(&a), "--column", "judgd.response"]);
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(
        err.contains("no table `judgd`") && err.contains("judged"),
        "{err}"
    );
    let o = common::ifloom(&root(), &["stats", s(&a), "--column", "judged.nope"]);
    assert!(common::stderr(&o).contains("`judged` has no column `nope`"));
    let o = common::ifloom(&root(), &["stats", s(&f.dir.join("missing"))]);
    assert!(
        common::stderr(&o).contains("no run at"),
        "{}",
        common::stderr(&o)
    );
    assert!(!Path::new(&f.dir.join("missing")).exists());
}

#[test]
fn every_canned_query_is_compiled_in_and_found_outside_the_repository() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("sql"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let mut compiled: Vec<String> = ifloom::stats::queries()
        .map(|(n, _)| n.to_string())
        .collect();
    compiled.sort();
    assert_eq!(files, compiled);
    // From a folder with no sql/ in it, `-f sql/rows_per_stage.sql` runs the compiled-in query.
    let tmp = crate::common::tempdir();
    let run = tmp.path().join("run");
    ok(
        &root(),
        &[
            "run",
            "pipelines/sample_dedup.yaml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
    );
    let rows = ok(
        tmp.path(),
        &[
            "sql",
            "--run",
            run.to_str().unwrap(),
            "--format",
            "csv",
            "-f",
            "sql/rows_per_stage.sql",
        ],
    );
    assert!(rows.contains("final"), "{rows}");
    // Another missing file is still an error naming it.
    let o = ifloom(
        tmp.path(),
        &["sql", "--run", run.to_str().unwrap(), "-f", "sql/nope.sql"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sql/nope.sql"), "{}", stderr(&o));
}
