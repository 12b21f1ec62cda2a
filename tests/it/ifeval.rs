//! IFEval evaluation end to end: `pipelines/eval_ifeval.yaml` on recorded responses (the
//! replay profile, both file shapes) and against the simulator, the `ifeval` kind on bad
//! rows, and the four accuracies through `ifloom stats --json`. Every verdict below is worked
//! out by hand from the reference's rules (comments show how), not by running the checks.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{ifloom, ok, root, s, sql_json, stderr, tempdir};
use crate::llm::Sim;

/// IFEval's own rows for these keys, read from the shared data folder into `dir`.
fn ifeval_subset(dir: &Path, keys: &[i64]) -> PathBuf {
    let all = std::fs::read_to_string(root().join("../shared/data/ifeval/input_data.jsonl"))
        .expect("../shared/data/ifeval/input_data.jsonl");
    let mut out = String::new();
    for line in all.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if keys.contains(&v["key"].as_i64().unwrap()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(out.lines().count(), keys.len());
    let p = dir.join("ifeval_subset.jsonl");
    std::fs::write(&p, out).unwrap();
    p
}

/// Hand-written responses and, for each, the verdicts worked out by hand.
/// (key, response, strict, loose)
fn golden() -> Vec<(i64, &'static str, Vec<bool>, Vec<bool>)> {
    vec![
        // no_comma: the intro line has a comma; loose drops the first line.
        (
            1001,
            "Sure, here you go\nNo commas below",
            vec![false],
            vec![true],
        ),
        // capital words < 10, >= 1 (THE SUN BRIGHT: 3), quotation.
        (
            1040,
            "\"THE SUN is BRIGHT today\"",
            vec![true, true, true],
            vec![true, true, true],
        ),
        // two_responses: the two are identical; no variant has two different ones.
        (
            1098,
            "Answer one.\n******\nAnswer one.",
            vec![false],
            vec![false],
        ),
        // 4 x "SECTION n" (>= 4) and the end phrase.
        (
            1127,
            "SECTION 1 a\nSECTION 2 b\nSECTION 3 c\nSECTION 4 d\nCan I get my money back for the classes I missed?",
            vec![true, true],
            vec![true, true],
        ),
        // one 'o' (< 6), two sentences (< 6), two highlights (*First*, *Second*) (>= 2).
        (
            1174,
            "*First* part. *Second* part.",
            vec![true, true, true],
            vec![true, true, true],
        ),
        // json with a remark after the fence: strict fails, removing the last line passes.
        (
            1075,
            "```json\n{\"name\": \"x\"}\n```\nThis is the JSON.",
            vec![false],
            vec![true],
        ),
        // two "Section n" where four are asked.
        (1131, "Section 1\nA\nSection 2\nB", vec![false], vec![false]),
    ]
}

fn keys() -> Vec<i64> {
    golden().iter().map(|g| g.0).collect()
}

/// Run the eval pipeline with `sets` (key=value) into `run`.
fn run_eval(
    dir: &Path,
    run: &Path,
    profile: Option<&str>,
    sets: &[String],
) -> std::process::Output {
    let p = root().join("pipelines/eval_ifeval.yaml");
    let cache = dir.join("cache.sqlite");
    let mut args = vec!["run", s(&p), "--run-dir", s(run), "--cache", s(&cache)];
    if let Some(pr) = profile {
        args.extend(["--profile", pr]);
    }
    for kv in sets {
        args.extend(["--set", kv.as_str()]);
    }
    ifloom(dir, &args)
}

fn verdicts(dir: &Path, run: &Path) -> Vec<Value> {
    sql_json(
        dir,
        run,
        "SELECT key, strict, loose, prompt_strict, prompt_loose, verdict, ifeval_error \
         FROM ifeval_verdicts ORDER BY key",
    )
}

fn check_golden(rows: &[Value]) {
    let mut want = golden();
    want.sort_by_key(|g| g.0);
    assert_eq!(rows.len(), want.len());
    for (row, (key, _, strict, loose)) in rows.iter().zip(&want) {
        assert_eq!(row["key"], json!(key));
        assert_eq!(row["strict"], json!(strict), "key {key}");
        assert_eq!(row["loose"], json!(loose), "key {key}");
        assert_eq!(
            row["prompt_strict"],
            json!(strict.iter().all(|b| *b)),
            "key {key}"
        );
        assert_eq!(
            row["prompt_loose"],
            json!(loose.iter().all(|b| *b)),
            "key {key}"
        );
        let verdict = if strict.iter().all(|b| *b) {
            "pass"
        } else {
            "fail"
        };
        assert_eq!(row["verdict"], json!(verdict));
        assert_eq!(row["ifeval_error"], Value::Null);
    }
}

#[test]
fn replayed_responses_get_the_verdicts_and_accuracies_worked_out_by_hand() {
    let tmp = tempdir();
    let subset = ifeval_subset(tmp.path(), &keys());
    let by_key = tmp.path().join("responses.jsonl");
    let by_prompt = tmp.path().join("input_response_data.jsonl");
    let prompts: std::collections::HashMap<i64, String> = std::fs::read_to_string(&subset)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["key"].as_i64().unwrap(),
                v["prompt"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (mut a, mut b) = (String::new(), String::new());
    for (key, response, ..) in golden() {
        a.push_str(&json!({"key": key, "response": response}).to_string());
        a.push('\n');
        b.push_str(&json!({"prompt": prompts[&key], "response": response}).to_string());
        b.push('\n');
    }
    std::fs::write(&by_key, a).unwrap();
    std::fs::write(&by_prompt, b).unwrap();

    let run = tmp.path().join("run_key");
    let o = run_eval(
        tmp.path(),
        &run,
        Some("replay"),
        &[
            format!("ifeval={}", s(&subset)),
            format!("responses={}", s(&by_key)),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    check_golden(&verdicts(tmp.path(), &run));

    // The reference's input_response_data shape: prompt + response, matched on the prompt.
    let run2 = tmp.path().join("run_prompt");
    let o = run_eval(
        tmp.path(),
        &run2,
        Some("replay"),
        &[
            format!("ifeval={}", s(&subset)),
            format!("responses={}", s(&by_prompt)),
            "match_on=prompt".into(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    check_golden(&verdicts(tmp.path(), &run2));

    // The four accuracies: 12 instructions, 8 strict / 10 loose; 7 prompts, 3 strict
    // (1040, 1127, 1174) / 5 loose (+1001, 1075).
    let stats: Value =
        serde_json::from_str(&ok(tmp.path(), &["stats", "--json", s(&run)])).unwrap();
    let acc = crate::stats::section(&stats, "ifeval");
    assert_eq!(acc.len(), 1);
    let a = &acc[0];
    assert_eq!(a["prompts"], json!(7));
    assert_eq!(a["instructions"], json!(12));
    assert_eq!(a["prompt_level_strict_acc"], json!(0.4286));
    assert_eq!(a["inst_level_strict_acc"], json!(0.6667));
    assert_eq!(a["prompt_level_loose_acc"], json!(0.7143));
    assert_eq!(a["inst_level_loose_acc"], json!(0.8333));
    assert_eq!(a["unchecked"], json!(0));
    let by_type = crate::stats::section(&stats, "ifeval_by_type");
    let t = |id: &str| {
        by_type
            .iter()
            .find(|r| r["instruction_type"] == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };
    // multiple_sections: 1127 passes, 1131 fails.
    assert_eq!(
        t("detectable_format:multiple_sections")["instructions"],
        json!(2)
    );
    assert_eq!(
        t("detectable_format:multiple_sections")["strict_acc"],
        json!(0.5)
    );
    assert_eq!(
        t("change_case:capital_word_frequency")["instructions"],
        json!(2)
    );
    assert_eq!(
        t("change_case:capital_word_frequency")["strict_acc"],
        json!(1.0)
    );
    assert_eq!(t("detectable_format:json_format")["strict_acc"], json!(0.0));
    assert_eq!(t("detectable_format:json_format")["loose_acc"], json!(1.0));
    // no_comma, capital_word_frequency, quotation, two_responses, multiple_sections,
    // end_checker, letter_frequency, number_sentences, highlighted_sections, json_format
    assert_eq!(by_type.len(), 10);

    // --compare: the same model twice shows no change.
    let cmp: Value = serde_json::from_str(&ok(
        tmp.path(),
        &["stats", "--json", "--compare", s(&run), s(&run2)],
    ))
    .unwrap();
    let sec = cmp["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "ifeval")
        .expect("ifeval in the comparison");
    assert_eq!(
        sec["rows"][0]["values"]["inst_level_loose_acc"]["delta"],
        json!(0.0),
        "{sec}"
    );
}

#[test]
fn a_prompt_without_a_recorded_response_is_unjudged_and_counted() {
    let tmp = tempdir();
    let subset = ifeval_subset(tmp.path(), &[1001, 1131]);
    let resp = tmp.path().join("r.jsonl");
    std::fs::write(&resp, "{\"key\": 1001, \"response\": \"no commas\"}\n").unwrap();
    let run = tmp.path().join("run");
    let o = run_eval(
        tmp.path(),
        &run,
        Some("replay"),
        &[
            format!("ifeval={}", s(&subset)),
            format!("responses={}", s(&resp)),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = verdicts(tmp.path(), &run);
    assert_eq!(rows[0]["verdict"], "pass");
    assert_eq!(rows[1]["verdict"], "unjudged");
    assert_eq!(rows[1]["strict"], json!([null]));
    assert_eq!(rows[1]["ifeval_error"], "the response is null");
}

#[test]
fn a_served_model_is_asked_each_prompt_once_and_its_answers_are_checked() {
    let tmp = tempdir();
    let rules = tmp.path().join("rules.json");
    std::fs::write(
        &rules,
        json!({"rules": [{"match": ".", "response": "Section 1 no commas in this answer"}]})
            .to_string(),
    )
    .unwrap();
    let sim = Sim::start(&[
        "--rules",
        s(&rules),
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
    ]);
    let subset = ifeval_subset(tmp.path(), &[1001, 1131]);
    let run = tmp.path().join("run");
    let sets = [
        format!("ifeval={}", s(&subset)),
        format!("url={}", sim.url),
        "model=sim-model".to_string(),
    ];
    let o = run_eval(tmp.path(), &run, None, &sets);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sim.requests(), 2);
    let rows = verdicts(tmp.path(), &run);
    // 1001 no_comma: no comma -> pass. 1131 four "Section n": one -> fail.
    assert_eq!(rows[0]["strict"], json!([true]));
    assert_eq!(rows[1]["strict"], json!([false]));
    // A rerun asks nothing again.
    let o = run_eval(tmp.path(), &tmp.path().join("run2"), None, &sets);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sim.requests(), 2);
}

#[test]
fn bad_rows_get_clear_errors_or_verdicts_never_a_panic() {
    let tmp = tempdir();
    let rows = [
        // an unknown id next to a good one
        json!({"id": "a", "instruction_id_list": ["punctuation:no_comma", "keywords:existance"], "kwargs": [{}, {"keywords": ["x"]}], "response": "fine"}),
        // a missing kwarg
        json!({"id": "b", "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"relation": "at least"}], "response": "fine"}),
        // an empty response follows nothing
        json!({"id": "c", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": ""}),
        // a null response
        json!({"id": "d", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "response": null}),
        // ids and kwargs of different lengths
        json!({"id": "e", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}], "response": "x"}),
        // no instructions at all
        json!({"id": "f", "instruction_id_list": [], "kwargs": [], "response": "x"}),
    ];
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(tmp.path().join("rows.jsonl"), data).unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: t\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: checked\n    kind: ifeval\n    from: rows\n",
    )
    .unwrap();
    let run = tmp.path().join("run");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    let got = sql_json(
        tmp.path(),
        &run,
        "SELECT id, strict, verdict, ifeval_error FROM checked ORDER BY id",
    );
    assert_eq!(got[0]["strict"], json!([true, null]));
    assert_eq!(got[0]["verdict"], "unjudged");
    let e = got[0]["ifeval_error"].as_str().unwrap();
    assert!(
        e.contains("unknown instruction id \"keywords:existance\""),
        "{e}"
    );
    assert!(e.contains("keywords:existence"), "did-you-mean: {e}");
    assert!(
        got[1]["ifeval_error"]
            .as_str()
            .unwrap()
            .contains("`num_words` is missing")
    );
    assert_eq!(got[2]["strict"], json!([false]));
    assert_eq!(got[2]["verdict"], "fail");
    assert_eq!(got[3]["ifeval_error"], "the response is null");
    assert!(got[4]["ifeval_error"].as_str().unwrap().contains("aligned"));
    assert_eq!(got[5]["verdict"], "unjudged");

    // A column of the wrong type is a validation error at the stage, with a hint.
    std::fs::write(
        tmp.path().join("flat.jsonl"),
        "{\"instruction_id_list\": \"punctuation:no_comma\", \"kwargs\": [{}], \"response\": \"x\"}\n",
    )
    .unwrap();
    let p2 = tmp.path().join("p2.yaml");
    std::fs::write(
        &p2,
        "name: t2\ninputs:\n  rows: flat.jsonl\nstages:\n  - id: checked\n    kind: ifeval\n    from: rows\n    response: answer\n",
    )
    .unwrap();
    let o = ifloom(tmp.path(), &["validate", s(&p2)]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("p2.yaml:8:"), "{err}");
    assert!(err.contains("unknown column `answer`"), "{err}");
    assert!(err.contains("must be a list of strings"), "{err}");
}

#[test]
fn a_replay_file_that_is_not_utf8_is_refused_with_its_line() {
    let tmp = tempdir();
    let subset = ifeval_subset(tmp.path(), &[1001]);
    let resp = tmp.path().join("r.jsonl");
    std::fs::write(
        &resp,
        b"{\"key\": 1001, \"response\": \"ok\"}\n{\"key\": 1001, \"response\": \"\xff\xfe\"}\n",
    )
    .unwrap();
    let o = run_eval(
        tmp.path(),
        &tmp.path().join("run"),
        Some("replay"),
        &[
            format!("ifeval={}", s(&subset)),
            format!("responses={}", s(&resp)),
        ],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("r.jsonl") && err.contains("UTF-8"), "{err}");
}

#[test]
fn kwargs_as_json_strings_or_one_json_array_give_the_same_verdicts() {
    let tmp = tempdir();
    // The same two instructions three ways: structs, a list of JSON strings, one JSON array.
    // "keywords:existence" with ["sun"] and no_comma on "the sun, here": sun found (true),
    // a comma (false).
    let rows = [
        json!({"id": "a", "instruction_id_list": ["keywords:existence", "punctuation:no_comma"], "kwargs": [{"keywords": ["sun"]}, {}], "response": "the sun, here"}),
    ];
    let strings = [
        json!({"id": "b", "instruction_id_list": ["keywords:existence", "punctuation:no_comma"], "kwargs": ["{\"keywords\": [\"sun\"]}", "{}"], "response": "the sun, here"}),
    ];
    let array = [
        json!({"id": "c", "instruction_id_list": ["keywords:existence", "punctuation:no_comma"], "kwargs": "[{\"keywords\": [\"sun\"]}, {}]", "response": "the sun, here"}),
    ];
    for (name, rows) in [("structs", &rows), ("strings", &strings), ("array", &array)] {
        let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(tmp.path().join(format!("{name}.jsonl")), data).unwrap();
        let p = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!("name: {name}\ninputs:\n  rows: {name}.jsonl\nstages:\n  - id: checked\n    kind: ifeval\n    from: rows\n"),
        )
        .unwrap();
        let run = tmp.path().join(format!("run_{name}"));
        ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
        let got = sql_json(tmp.path(), &run, "SELECT strict, ifeval_error FROM checked");
        assert_eq!(got[0]["strict"], json!([true, false]), "{name}");
        assert_eq!(got[0]["ifeval_error"], Value::Null, "{name}");
    }
}
