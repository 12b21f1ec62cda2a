//! TRACE end to end: `pipelines/eval_trace.yaml` judging recorded responses (replay profile)
//! with `ifloom sim` as the judge. The rules give well-formed fine-grained JSON, Chinese prose
//! with no JSON, JSON that leaves a constraint out and no overall score, and text with no
//! score at all; the accuracies (threshold 9) are worked out by hand below.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::common::{judged_replay, ok, root, s, tempdir};
use crate::llm::Sim;
use crate::stats::section;
use crate::ultraif::query;

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// A constraint's text without its numbering and end punctuation, as a judge would key it.
fn key(c: &str) -> String {
    let t = c.trim_start_matches(|ch: char| ch.is_ascii_digit());
    t.trim_start_matches(['.', ' '])
        .trim_end_matches(['；', '。', ';'])
        .to_string()
}

/// A stats section's column names, in order.
pub(crate) fn columns(st: &Value, id: &str) -> Vec<String> {
    let sec = st["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .unwrap_or_else(|| panic!("no section {id}"));
    strs(&sec["columns"])
}

#[test]
fn trace_accuracies_from_a_simulated_judge_with_messy_answers() {
    let all: Vec<Value> =
        std::fs::read_to_string(root().join("../shared/data/trace/202409_trace_evaluation.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let with_n = |n: usize, skip: &[&Value]| -> Value {
        all.iter()
            .find(|i| {
                strs(&i["constraints_splits"]).len() == n
                    && !skip.iter().any(|s| s["id"] == i["id"])
            })
            .unwrap()
            .clone()
    };
    let a = with_n(3, &[]);
    let b = with_n(2, &[]);
    let c = with_n(3, &[&a]);
    let d = with_n(1, &[]);
    let e = with_n(2, &[&b]);
    let items = [&a, &b, &c, &d, &e];
    let tmp = tempdir();
    let dir = tmp.path();
    let subset: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.join("subset.jsonl"), subset).unwrap();
    let resp = |i: &Value| format!("RESP-{}", i["id"].as_str().unwrap());
    // d has no recorded response.
    let recorded: String = [&a, &b, &c, &e]
        .iter()
        .map(|i| format!("{}\n", json!({"id": i["id"], "response": resp(i)})))
        .collect();
    std::fs::write(dir.join("responses.jsonl"), recorded).unwrap();

    let (ca, cc) = (
        strs(&a["constraints_splits"]),
        strs(&c["constraints_splits"]),
    );
    // a: JSON keyed by constraint, in another order: scores 10, 8, 10; overall 9.
    let mut obj = serde_json::Map::new();
    obj.insert(key(&ca[2]), json!(10));
    obj.insert(key(&ca[0]), json!(10));
    obj.insert(key(&ca[1]), json!("8"));
    let judge_a = format!(
        "Explanation:\n1. 符合。\n2. 不够。\n3. 符合。\nFine Grained Score: {}\nConstraints Overall Score: [[9]]",
        json!([obj])
    );
    // b: Chinese prose only: 10 and 9; then a second overall score, which the reference's
    // re.search never reaches (the first match is 9).
    let judge_b = "Explanation:\n1. 语气：完全符合要求，得分10分。\n2、格式：基本符合，得分：9分\nConstraints Overall Score: [[9]]\n修正：Constraints Overall Score: [[7]]";
    // c: JSON scores two of three constraints (10, 10), no overall score.
    let mut obj = serde_json::Map::new();
    obj.insert(key(&cc[0]), json!(10));
    obj.insert(key(&cc[2]), json!(10));
    let judge_c = format!("Fine Grained Score: {}", json!([obj]));
    // e: no score anywhere.
    let judge_e = "抱歉，我无法评估这个回答。";
    let rules: Vec<Value> = [
        (&a, judge_a.as_str()),
        (&b, judge_b),
        (&c, judge_c.as_str()),
        (&e, judge_e),
    ]
    .iter()
    .map(|(i, r)| json!({"match": format!("< response >:\n{}\n", resp(i)), "response": r}))
    .collect();
    let (_sim, run, record) = judged_replay(
        dir,
        "pipelines/eval_trace.yaml",
        &rules,
        &[
            format!("trace={}", s(&dir.join("subset.jsonl"))),
            format!("responses={}", s(&dir.join("responses.jsonl"))),
            "threshold=9".into(),
        ],
    );

    // The judge got the reference's prompt with the user's query, constraints and response.
    let sent: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sent.len(), 4);
    let p = sent
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_string())
        .find(|c| c.contains(&resp(&a)))
        .unwrap();
    let query_a = a["messages"][1]["content"].as_str().unwrap();
    assert!(p.starts_with("[System]\nYou are a fair judge"));
    assert!(p.ends_with(&format!(
        "< query >:\n{query_a}\n< constraints >:\n{}\n< response >:\n{}\n\n—OUTPUT—",
        a["constraints"].as_str().unwrap(),
        resp(&a)
    )));

    let rows = query(
        &run,
        "SELECT id, scores, satisfied, all_satisfied, overall_score, n_unscored FROM trace_scores ORDER BY id",
    );
    let by_id: BTreeMap<String, &Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    let id = |i: &Value| i["id"].as_str().unwrap().to_string();
    let want = [
        (
            &a,
            json!([10.0, 8.0, 10.0]),
            json!([true, false, true]),
            json!(false),
            json!(9.0),
            0,
        ),
        (
            &b,
            json!([10.0, 9.0]),
            json!([true, true]),
            json!(true),
            json!(9.0),
            0,
        ),
        (
            &c,
            json!([10.0, null, 10.0]),
            json!([true, null, true]),
            Value::Null,
            Value::Null,
            1,
        ),
        (
            &d,
            json!([null]),
            json!([null]),
            Value::Null,
            Value::Null,
            1,
        ),
        (
            &e,
            json!([null, null]),
            json!([null, null]),
            Value::Null,
            Value::Null,
            2,
        ),
    ];
    for (item, scores, sat, all, overall, unscored) in &want {
        let r = by_id[&id(item)];
        let get = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        assert_eq!(get("scores"), *scores, "{}", id(item));
        assert_eq!(get("satisfied"), *sat, "{}", id(item));
        assert_eq!(get("all_satisfied"), *all, "{}", id(item));
        assert_eq!(get("overall_score"), *overall, "{}", id(item));
        assert_eq!(r["n_unscored"], json!(unscored), "{}", id(item));
    }

    // By hand: 11 constraints, 7 scored, 6 satisfied; instructions: a fails, b passes, c, d, e
    // have unscored constraints and no failure (left out); overall scores 9 and 9.
    let r4 = |x: f64| (x * 10000.0).round() / 10000.0;
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let acc = section(&st, "constraint_accuracy");
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0]["instructions"], json!(5));
    assert_eq!(acc[0]["constraints"], json!(11));
    assert_eq!(acc[0]["unscored"], json!(4));
    assert_eq!(acc[0]["constraint_level_acc"], json!(r4(6.0 / 7.0)));
    assert_eq!(acc[0]["instruction_level_acc"], json!(0.5));
    assert_eq!(acc[0]["instructions_unscored"], json!(3));
    assert_eq!(
        acc[0]["mean_overall"],
        json!(9.0),
        "the first match of a and b: 9, 9"
    );
    assert_eq!(acc[0]["with_overall"], json!(2));
    // The headline (the reference's figure) comes first after the table name.
    assert_eq!(columns(&st, "constraint_accuracy")[1], "mean_overall");
    // Split by the number of constraints, by hand from `want`: 1 = d (nothing scored);
    // 2 = b, e (overall 9; constraints T,T of 2 scored; instructions b true, e left out);
    // 3 = a, c (overall 9; constraints T,F,T and T,T of 5 scored -> 0.8; a false, c left out).
    let by_count = ok(
        &root(),
        &[
            "sql",
            "--run",
            s(&run),
            "--format",
            "jsonl",
            "-f",
            "sql/constraint_accuracy_by_count.sql",
            "--param",
            "table=trace_scores",
        ],
    );
    let got: Vec<Value> = by_count
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want_count = [
        json!({"n_constraints": 1, "instructions": 1, "constraints": 1, "unscored": 1,
               "instructions_unscored": 1}),
        json!({"n_constraints": 2, "mean_overall": 9.0, "constraint_level_acc": 1.0,
               "instruction_level_acc": 1.0, "instructions": 2, "constraints": 4,
               "unscored": 2, "instructions_unscored": 1}),
        json!({"n_constraints": 3, "mean_overall": 9.0, "constraint_level_acc": 0.8,
               "instruction_level_acc": 0.0, "instructions": 2, "constraints": 6,
               "unscored": 1, "instructions_unscored": 1}),
    ];
    let strip_nulls = |v: &Value| -> Value {
        Value::Object(
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k.clone(), x.clone()))
                .collect(),
        )
    };
    assert_eq!(got.iter().map(strip_nulls).collect::<Vec<_>>(), want_count);
    // Per category, from the items' own levels2 and the satisfied flags above.
    let mut cat: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new(); // constraints, scored, satisfied
    for (item, _, sat, _, _, _) in &want {
        for (l, s) in strs(&item["levels2"]).iter().zip(sat.as_array().unwrap()) {
            let e = cat.entry(l.clone()).or_default();
            e.0 += 1;
            e.1 += (!s.is_null()) as i64;
            e.2 += (s == &json!(true)) as i64;
        }
    }
    let by_cat = section(&st, "constraint_accuracy_by_category");
    assert_eq!(by_cat.len(), cat.len());
    for r in &by_cat {
        let (n, scored, satisfied) = cat[r["category"].as_str().unwrap()];
        assert_eq!(r["constraints"], json!(n));
        assert_eq!(r["scored"], json!(scored));
        let want = if scored == 0 {
            Value::Null
        } else {
            json!(r4(satisfied as f64 / scored as f64))
        };
        assert_eq!(
            r.get("constraint_level_acc")
                .cloned()
                .unwrap_or(Value::Null),
            want,
            "{r:?}"
        );
    }
}

/// Every judged benchmark pipeline run live (no replay) with the model under test and the
/// judge both an `ifloom sim` without rules: the model's answers are echoes, and so are the
/// judge's, which no benchmark's rule reads as intended. Nothing crashes, every question or
/// constraint is accounted for, and the stats sections are there.
#[test]
fn judged_pipelines_run_live_against_the_simulator_and_count_unreadable_judgements() {
    let tmp = tempdir();
    let dir = tmp.path();
    let record = dir.join("requests.jsonl");
    let sim = Sim::start(&[
        "--slots",
        "16",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--record",
        s(&record),
    ]);
    for (pipeline, table, sections, rows, chart) in [
        (
            "eval_infobench",
            "infobench_answers",
            vec!["drfr", "drfr_by_subset"],
            "rows=2",
            "DRFR per subset",
        ),
        (
            "eval_eifbench",
            "eifbench_answers",
            vec!["eifbench", "drfr"],
            "rows=1",
            "EIFBench accuracy",
        ),
        (
            "eval_trace",
            "trace_scores",
            vec!["constraint_accuracy", "constraint_accuracy_by_category"],
            "rows=3",
            "Constraint-level accuracy per category",
        ),
    ] {
        let run = dir.join(pipeline);
        let file = format!("pipelines/{pipeline}.yaml");
        let generate = rows.replace("rows", "generate");
        let sets = [
            format!("url={}", sim.url),
            format!("judge_url={}", sim.url),
            "model=sim-model".into(),
            "judge_model=sim-model".into(),
            "judge_profile=vllm".into(),
            rows.to_string(),
            generate,
        ];
        let cache = dir.join("cache.sqlite");
        let mut args = vec![
            "run",
            file.as_str(),
            "--run-dir",
            s(&run),
            "--cache",
            s(&cache),
        ];
        for kv in &sets {
            args.extend(["--set", kv.as_str()]);
        }
        ok(&root(), &args);
        let n: usize = rows[5..].parse().unwrap();
        let answers = query(&run, "SELECT response FROM answers");
        assert_eq!(answers.len(), n, "{pipeline}");
        assert!(
            answers
                .iter()
                .all(|r| r["response"].as_str().unwrap().starts_with("echo: "))
        );
        assert!(
            !query(&run, &format!("SELECT * FROM {table}")).is_empty(),
            "{pipeline}"
        );
        let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
        for sec in sections {
            assert!(!section(&st, sec).is_empty(), "{pipeline}: {sec}");
        }
        // The report charts the benchmark's figures.
        let page = dir.join(format!("{pipeline}.html"));
        ok(&root(), &["report", s(&run), "-o", s(&page)]);
        let html = std::fs::read_to_string(&page).unwrap();
        assert!(html.contains(chart), "{pipeline}: no chart {chart:?}");
    }
    // TRACE's model under test answers at the reference's temperature, 0.1
    // (Eval_script/config/models/vllm_qwen2_7b_trace.yaml); its judge at 0.
    let trace_msgs: Vec<Value> = query(&dir.join("eval_trace"), "SELECT messages FROM items")
        .into_iter()
        .map(|r| r["messages"].clone())
        .collect();
    assert_eq!(trace_msgs.len(), 3);
    let sent = crate::common::jsonl(&record);
    let to_model: Vec<&Value> = sent
        .iter()
        .filter(|r| trace_msgs.contains(&r["messages"]))
        .collect();
    assert_eq!(to_model.len(), 3, "one request per TRACE item");
    assert!(to_model.iter().all(|r| r["temperature"] == json!(0.1)));
    let to_judge: Vec<&Value> = sent
        .iter()
        .filter(|r| {
            r["messages"][0]["content"]
                .as_str()
                .is_some_and(|c| c.starts_with("[System]\nYou are a fair judge"))
        })
        .collect();
    assert_eq!(to_judge.len(), 3);
    assert!(to_judge.iter().all(|r| r["temperature"] == json!(0.0)));
    // InfoBench: the echoed judge prompt has both 'YES' and 'NO': unreadable, so each of the
    // two instructions stops after question 1 and the rest are not asked.
    let run = dir.join("eval_infobench");
    let r = query(
        &run,
        "SELECT question_index, answer_error FROM infobench_answers ORDER BY id, question_index",
    );
    for row in &r {
        let want = if row["question_index"] == 1 {
            "no YES or NO in the judge's answer"
        } else {
            "not asked: question 1 got no answer"
        };
        assert_eq!(row["answer_error"], want, "{row}");
    }
}
