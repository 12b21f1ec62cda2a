//! Agreement with the reference implementations, verdict by verdict (issue 33, item 5). The
//! fixtures in tests/fixtures/reference/ were made by the references themselves, run
//! unchanged on real model answers (benches/reference_fixtures.sh; versions and sources in
//! the README beside them): Google's IFEval checks and FollowBench's rule-based evaluation.
//! Each test runs ifloom's pipeline on the fixture's answers and compares every verdict; a
//! disagreement names the row, the instruction and both verdicts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{jsonl, ok, root, s, tempdir};
use crate::llm::Sim;
use crate::ultraif::query;

fn fixture(name: &str) -> Vec<Value> {
    jsonl(&root().join("tests/fixtures/reference").join(name))
}

fn write_jsonl(path: &Path, rows: impl Iterator<Item = Value>) {
    let text: String = rows.map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect()
}

fn excerpt(t: &str) -> String {
    let t: String = t.chars().take(80).collect();
    t.replace('\n', "\\n")
}

#[test]
fn ifeval_verdicts_equal_googles_on_real_answers() {
    let fx = fixture("ifeval_verdicts.jsonl");
    assert!(fx.len() >= 250, "{} rows", fx.len());
    // Every one of IFEval's 25 instruction types is checked, and both verdicts occur.
    let types: std::collections::BTreeSet<&str> = fx
        .iter()
        .flat_map(|r| r["instruction_id_list"].as_array().unwrap())
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 25, "{types:?}");
    for mode in ["strict", "loose"] {
        let all: Vec<bool> = fx.iter().flat_map(|r| bools(&r[mode])).collect();
        assert!(all.contains(&true) && all.contains(&false), "{mode}");
    }

    let tmp = tempdir();
    let dir = tmp.path();
    let responses = dir.join("responses.jsonl");
    write_jsonl(
        &responses,
        fx.iter()
            .map(|r| json!({"key": r["key"], "response": r["response"]})),
    );
    let run = dir.join("run");
    let cache = dir.join("cache.sqlite");
    let set = format!("responses={}", s(&responses));
    ok(
        &root(),
        &[
            "run",
            "pipelines/eval_ifeval.yaml",
            "--profile",
            "replay",
            "--run-dir",
            s(&run),
            "--cache",
            s(&cache),
            "--set",
            &set,
        ],
    );
    let got: BTreeMap<i64, Value> = query(
        &run,
        "SELECT key, instruction_id_list, strict, loose FROM ifeval_verdicts",
    )
    .into_iter()
    .map(|r| (r["key"].as_i64().unwrap(), r))
    .collect();

    let mut diffs = Vec::new();
    let mut n = 0;
    for r in &fx {
        let key = r["key"].as_i64().unwrap();
        let g = &got[&key];
        assert_eq!(
            g["instruction_id_list"], r["instruction_id_list"],
            "key {key}"
        );
        for mode in ["strict", "loose"] {
            let (ours, theirs) = (bools(&g[mode]), bools(&r[mode]));
            assert_eq!(ours.len(), theirs.len(), "key {key} {mode}");
            for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                n += 1;
                if o != t {
                    diffs.push(format!(
                        "key {key}, {} ({mode}): ifloom {o}, reference {t}; response \"{}\"",
                        r["instruction_id_list"][i].as_str().unwrap(),
                        excerpt(r["response"].as_str().unwrap())
                    ));
                }
            }
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {n} verdicts differ from the reference's:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// One replay of pipelines/eval_followbench.yaml with `responses` (instruction, response).
fn followbench_replay(dir: &Path, sim: &Sim, responses: &Path) -> PathBuf {
    let run = dir.join("run");
    let cache = dir.join("cache.sqlite");
    let sets = [
        format!("responses={}", s(responses)),
        format!("judge_url={}", sim.url),
        format!("url={}", sim.url),
        "model=sim-model".into(),
        "judge_model=sim-model".into(),
        "judge_profile=vllm".into(),
    ];
    let mut args = vec![
        "run",
        "pipelines/eval_followbench.yaml",
        "--profile",
        "replay",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
    ];
    for kv in &sets {
        args.extend(["--set", kv.as_str()]);
    }
    ok(&root(), &args);
    run
}

/// FollowBench's instruction of each (constraint type, example id, level), from the data.
fn followbench_instructions() -> BTreeMap<(String, i64, i64), String> {
    let mut out = BTreeMap::new();
    for ty in [
        "content",
        "situation",
        "style",
        "format",
        "example",
        "mixed",
    ] {
        let path = root().join(format!(
            "../shared/data/followbench/data/{ty}_constraints.json"
        ));
        let data: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for d in data {
            out.insert(
                (
                    ty.to_string(),
                    d["example_id"].as_i64().unwrap(),
                    d["level"].as_i64().unwrap(),
                ),
                d["instruction"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

fn fb_key(r: &Value) -> (String, i64, i64) {
    (
        r["constraint_type"].as_str().unwrap().to_string(),
        r["example_id"].as_i64().unwrap(),
        r["level"].as_i64().unwrap(),
    )
}

#[test]
fn followbench_rule_verdicts_equal_the_references_on_all_350_rule_instructions() {
    let fx = fixture("followbench_rule_verdicts.jsonl");
    let instructions = followbench_instructions();
    let mut sets: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in &fx {
        sets.entry(r["set"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    assert!(sets.len() >= 2, "{:?}", sets.keys());
    assert_eq!(
        sets["target"].len(),
        350,
        "the target set covers every rule instruction"
    );
    let sim = Sim::start(&["--slots", "4", "--base-ms", "1", "--per-token-ms", "0"]);
    let mut diffs = Vec::new();
    let mut n = 0;
    for (name, rows) in &sets {
        let tmp = tempdir();
        let dir = tmp.path();
        let responses = dir.join("responses.jsonl");
        write_jsonl(
            &responses,
            rows.iter().map(
                |r| json!({"instruction": instructions[&fb_key(r)], "response": r["response"]}),
            ),
        );
        let run = followbench_replay(dir, &sim, &responses);
        // Every instruction with an answer was checked, and by a rule, not the judge.
        let got: BTreeMap<(String, i64, i64), Value> = query(
            &run,
            "SELECT constraint_type, example_id, level, checker, hard FROM followbench \
             WHERE response IS NOT NULL",
        )
        .into_iter()
        .map(|r| (fb_key(&r), r))
        .collect();
        assert_eq!(got.len(), rows.len(), "set {name}");
        for r in rows {
            n += 1;
            let g = &got[&fb_key(r)];
            let rule = g["checker"].as_str();
            let ours = g.get("hard").and_then(Value::as_bool);
            let theirs = r["verdict"].as_bool().unwrap();
            if rule.is_none() || ours != Some(theirs) {
                diffs.push(format!(
                    "set {name}, {} example {} level {} ({}): ifloom {} by rule {:?}, reference {theirs}; response \"{}\"",
                    r["constraint_type"].as_str().unwrap(),
                    r["example_id"],
                    r["level"],
                    r["source"].as_str().unwrap_or(""),
                    ours.map_or("no verdict".to_string(), |b| b.to_string()),
                    rule,
                    excerpt(r["response"].as_str().unwrap())
                ));
            }
        }
    }
    // Both verdicts occur in the fixture.
    let verdicts: Vec<bool> = fx.iter().map(|r| r["verdict"].as_bool().unwrap()).collect();
    assert!(verdicts.contains(&true) && verdicts.contains(&false));
    assert!(
        diffs.is_empty(),
        "{} of {n} verdicts differ from the reference's:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
