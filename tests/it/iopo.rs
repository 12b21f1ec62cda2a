//! IOPO end to end: `pipelines/iopo.yaml` against `ifloom sim`, whose rules decide every
//! rewrite, every answer and each of the judge's four checks per quadruple, so every table's
//! count is known in advance (worked out below). The exported files are read back: the
//! authors' record shape (a JSON array with its `dataset_info.json`) and the DPO pairs both
//! ways.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{ifloom, jsonl, ok, root, s, stderr, tempdir};
use crate::llm::Sim;
use crate::stats::section;
use crate::ultraif::query;

/// The judge's answer to each check of an item: (y1|x1, y1|x2, y2|x2, y2|x1); `None` is an
/// answer with no YES or NO in it.
type Checks = [Option<&'static str>; 4];

const KEEP: Checks = [
    Some("YES, every constraint is met."),
    Some("NO. The length is wrong."),
    Some("yes - it fits"),
    Some("No, it breaks constraint 1."),
];

fn x1(k: usize, task: &str) -> String {
    format!("ITEM-{k} original: {task}\n1. Keep it short.\n2. Use a calm tone.")
}

fn x2(k: usize) -> String {
    format!("ITEM-{k} changed: the same task.\n1. Make it long.\n2. Use an excited tone.")
}

fn y1(k: usize) -> String {
    format!("ANSWER-{k}-ONE done.")
}

fn y2(k: usize) -> String {
    format!("ANSWER-{k}-TWO done.")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn count(run: &Path, table: &str) -> i64 {
    query(run, &format!("SELECT count(*) AS n FROM {table}"))[0]["n"]
        .as_i64()
        .unwrap()
}

fn counters(run: &Path, stage: &str) -> Value {
    read_json(&run.join(format!("stages/{stage}/manifest.json")))["counters"].clone()
}

#[test]
fn iopo_quadruples_kept_by_four_checks_and_exported_both_ways() {
    let ifeval: Value = serde_json::from_str(
        std::fs::read_to_string(root().join("../shared/data/ifeval/input_data.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let ifeval_prompt = ifeval["prompt"].as_str().unwrap();
    // Items 1-11. 8: the rewrite has no JSON; 9: the rewrite is x1 again; 11: the rewrite is
    // the prompt's placeholder; 10 quotes an IFEval prompt (kept by the judge, removed by
    // decontamination); 2's y2 is cut off by max_tokens.
    let tasks: Vec<(usize, String)> = (1..=11)
        .map(|k| {
            let task = match k {
                4 => "为一家书店写一句宣传语".to_string(),
                10 => ifeval_prompt.to_string(),
                _ => format!("describe object number {k}"),
            };
            (k, task)
        })
        .collect();
    let judged: Vec<(usize, Checks)> = vec![
        (1, KEEP),
        (2, KEEP),
        (3, [Some("NO"), Some("NO"), Some("YES"), Some("NO")]),
        (
            4,
            [
                Some("YES"),
                Some("Yes, it also fits."),
                Some("YES"),
                Some("NO"),
            ],
        ),
        (
            5,
            [Some("YES"), Some("NO"), Some("NO, too short."), Some("NO")],
        ),
        (
            6,
            [
                Some("YES"),
                Some("NO"),
                Some("YES"),
                Some("YES, it fits too."),
            ],
        ),
        (7, [Some("YES"), None, Some("YES"), Some("NO")]),
        (10, KEEP),
    ];

    let tmp = tempdir();
    let dir = tmp.path();
    let data: String = tasks
        .iter()
        .map(|(k, t)| {
            format!(
                "{}\n",
                json!({"id": format!("item-{k}"), "prompt": x1(*k, t),
                       "constraints": ["Keep it short.", "Use a calm tone."]})
            )
        })
        .collect();
    std::fs::write(dir.join("items.jsonl"), data).unwrap();

    let mut rules: Vec<Value> = Vec::new();
    // The judge: its prompt holds the instruction, then the response.
    for (k, answers) in &judged {
        let pairs = [
            ("original", "ONE"),
            ("changed", "ONE"),
            ("changed", "TWO"),
            ("original", "TWO"),
        ];
        for ((x, y), a) in pairs.iter().zip(answers) {
            rules.push(json!({
                "match": format!("(?s)<instruction>\nITEM-{k} {x}:.*<response>\nANSWER-{k}-{y}"),
                "response": a.unwrap_or("I cannot decide this one."),
            }));
        }
    }
    // The rewrites: 8 writes no JSON, 9 gives x1 back, 11 the placeholder, the others x2.
    let rewrite =
        |k: usize| format!("(?s)# Original instruction\n<instruction>\nITEM-{k} original:");
    rules.push(json!({"match": rewrite(8), "response": "I would rather not change it."}));
    rules.push(json!({"match": rewrite(9),
                      "json": {"changed": [], "instruction": x1(9, &tasks[8].1)}}));
    rules.push(json!({"match": rewrite(11),
                      "json": {"changed": ["<a change>"], "instruction": " <the full new instruction> "}}));
    rules.push(json!({
        "match": "(?s)# Original instruction\n<instruction>\nITEM-(\\d+) original:",
        "response": "```json\n{\"changed\": [\"Make it long.\", \"Use an excited tone.\"], \"instruction\": \"ITEM-$1 changed: the same task.\\n1. Make it long.\\n2. Use an excited tone.\"}\n```",
    }));
    // The answers: y1 to x1, y2 to x2; 2's y2 runs past max_tokens (6 words).
    rules.push(json!({"match": "^ITEM-2 changed:",
                      "response": "ANSWER-2-TWO done and then it goes on and on."}));
    rules.push(json!({"match": "^ITEM-(\\d+) original:", "response": "ANSWER-$1-ONE done."}));
    rules.push(json!({"match": "^ITEM-(\\d+) changed:", "response": "ANSWER-$1-TWO done."}));
    std::fs::write(dir.join("rules.json"), json!({"rules": rules}).to_string()).unwrap();

    let sim = Sim::start(&[
        "--slots",
        "16",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&dir.join("rules.json")),
    ]);
    let run = dir.join("run");
    let sets = [
        format!("data={}", s(&dir.join("items.jsonl"))),
        format!("url={}", sim.url),
        "model=sim-model".into(),
        "max_tokens=6".into(),
    ];
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/iopo.yaml",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
    ];
    for kv in &sets {
        args.extend(["--set", kv.as_str()]);
    }
    let o = ifloom(&root(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Seeded from data no benchmark uses: no evaluation-set warning.
    assert!(
        !stderr(&o).contains("TRAINS ON AN EVALUATION SET"),
        "{}",
        stderr(&o)
    );

    // Every table's rows, by hand: 11 items; 8, 9 and 11 lose their rewrite (8 pairs, 16 answers,
    // 8 quadruples, 32 judge requests); 7 has an unreadable check, 3, 4, 5 and 6 fail one check
    // each, which leaves 1, 2 and 10; decontamination removes 10.
    let expected = [
        ("instructions", 11),
        ("seeds", 11),
        ("unique_seeds", 11),
        ("change", 11),
        ("rewrites", 11),
        ("x2_parsed", 9),
        ("x2_changed", 8),
        ("to_answer", 16),
        ("answers", 16),
        ("quadruples", 8),
        ("to_judge", 32),
        ("judge", 32),
        ("judged", 32),
        ("checks", 8),
        ("keep_judged", 7),
        ("keep_y1_fits_x1", 6),
        ("keep_y1_fails_x2", 5),
        ("keep_y2_fits_x2", 4),
        ("keep_y2_fails_x1", 3),
        ("clean_x1", 2),
        ("clean_x2", 2),
        ("dpo", 4),
    ];
    for (table, n) in expected {
        assert_eq!(count(&run, table), n, "rows of {table}");
    }
    let status = query(
        &run,
        "SELECT change_status, count(*) AS n FROM rewrites GROUP BY change_status ORDER BY change_status",
    );
    assert_eq!(
        status,
        [
            json!({"change_status": "ok", "n": 8}),
            json!({"change_status": "placeholder", "n": 1}),
            json!({"change_status": "unchanged", "n": 1}),
            json!({"change_status": "unparsed", "n": 1}),
        ]
    );
    // The judge: 16 YES, 15 NO, 1 unreadable (item 7's y1|x2).
    let c = counters(&run, "judged");
    assert_eq!(
        (c["yes"].as_i64(), c["no"].as_i64(), c["unjudged"].as_i64()),
        (Some(16), Some(15), Some(1))
    );
    let reasons = query(
        &run,
        "SELECT i.id, c.drop_reason FROM checks c JOIN instructions i ON i._id = c.source_id ORDER BY i.id",
    );
    let reasons: Vec<(String, Value)> = reasons
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["drop_reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("item-1".into(), Value::Null),
            ("item-10".into(), Value::Null),
            ("item-2".into(), Value::Null),
            ("item-3".into(), json!("y1_fails_x1")),
            ("item-4".into(), json!("y1_fits_x2")),
            ("item-5".into(), json!("y2_fails_x2")),
            ("item-6".into(), json!("y2_fits_x1")),
            ("item-7".into(), json!("unjudged")),
        ]
    );
    let c = counters(&run, "clean_x1");
    assert_eq!(
        (c["removed"].as_i64(), c["hits_ifeval"].as_i64()),
        (Some(1), Some(1))
    );

    // The funnel names each drop: one row per check, with the rows it filtered out.
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let funnel = section(&st, "funnel");
    let reason = |stage: &str| {
        funnel
            .iter()
            .find(|r| r["stage"] == stage)
            .unwrap_or_else(|| panic!("no funnel row {stage}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (stage, n) in [
        ("x2_parsed", 2),
        ("x2_changed", 1),
        ("keep_judged", 1),
        ("keep_y1_fits_x1", 1),
        ("keep_y1_fails_x2", 1),
        ("keep_y2_fits_x2", 1),
        ("keep_y2_fails_x1", 1),
    ] {
        assert_eq!(
            reason(stage),
            format!("{n} filtered out by the stage's query"),
            "{stage}"
        );
    }
    assert_eq!(reason("clean_x1"), "1 removed by decontamination");
    // Item 2's y2 was cut off: its IOPO record and both its DPO pairs are left out.
    assert_eq!(
        reason("iopo_records"),
        "1 records written, 0 empty skipped, 1 truncated left out"
    );
    for stage in ["dpo_pairs", "dpo_trl", "dpo_sharegpt"] {
        assert_eq!(
            reason(stage),
            "2 records written, 0 empty skipped, 2 truncated left out",
            "{stage}"
        );
    }

    // (a) The authors' shape: a JSON array like their trace.json, and their dataset_info.json
    // entry, byte for byte the same JSON.
    let x1_1 = x1(1, &tasks[0].1);
    let records = read_json(&run.join("out/iopo/trace.json"));
    assert_eq!(
        records,
        json!([{
            "conversations": [{"from": "human", "value": x1_1}, {"from": "human", "value": x2(1)}],
            "chosen": {"from": "gpt", "value": y1(1)},
            "rejected": {"from": "gpt", "value": y2(1)},
        }])
    );
    let upstream = read_json(&root().join("../shared/data/iopo/dataset_info.json"));
    assert_eq!(read_json(&run.join("out/iopo/dataset_info.json")), upstream);
    // The upstream example has the same keys and turn roles as ours.
    let example = read_json(&root().join("../shared/data/iopo/trace.json"));
    let shape = |r: &Value| {
        let froms: Vec<Value> = r["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["from"].clone())
            .collect();
        (
            froms,
            r["chosen"]["from"].clone(),
            r["rejected"]["from"].clone(),
        )
    };
    assert_eq!(shape(&example[0]), shape(&records[0]));

    // (b) DPO both ways: exactly two pairs per exported quadruple, chosen and rejected swapped.
    let pairs = jsonl(&run.join("out/dpo_pairs.jsonl"));
    let mut got: Vec<(String, String, String)> = pairs
        .iter()
        .map(|p| {
            (
                p["prompt"].as_str().unwrap().into(),
                p["chosen"].as_str().unwrap().into(),
                p["rejected"].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![(x1_1.clone(), y1(1), y2(1)), (x2(1), y2(1), y1(1))];
    want.sort();
    assert_eq!(got, want);
    let trl = jsonl(&run.join("out/dpo_trl.jsonl"));
    assert_eq!(trl.len(), 2);
    for r in &trl {
        let prompt = r["prompt"][0]["content"].as_str().unwrap();
        let (chosen, rejected) = if prompt == x1_1 {
            (y1(1), y2(1))
        } else {
            (y2(1), y1(1))
        };
        assert_eq!(
            r["chosen"],
            json!([{"role": "assistant", "content": chosen}]),
            "{r}"
        );
        assert_eq!(
            r["rejected"],
            json!([{"role": "assistant", "content": rejected}]),
            "{r}"
        );
    }
    let sg = jsonl(&run.join("out/dpo_sharegpt.jsonl"));
    assert_eq!(sg.len(), 2);
    for r in &sg {
        // One human turn: what stock LLaMA-Factory accepts.
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv.len(), 1, "{r}");
        assert_eq!(conv[0]["from"], "human");
    }
    let info = read_json(&run.join("out/dataset_info.json"));
    assert_eq!(info["iopo_dpo"]["file_name"], "dpo_sharegpt.jsonl");
    assert_eq!(info["iopo_dpo"]["ranking"], true);
    // Lineage: each pair reaches its source instruction.
    let lineage = query(
        &run,
        "SELECT d.direction, i.id FROM dpo d JOIN instructions i ON i._id = d.source_id ORDER BY i.id, d.direction",
    );
    assert_eq!(
        lineage,
        [
            json!({"direction": "x1", "id": "item-1"}),
            json!({"direction": "x2", "id": "item-1"}),
            json!({"direction": "x1", "id": "item-2"}),
            json!({"direction": "x2", "id": "item-2"}),
        ]
    );
}

#[test]
fn iopo_seeded_from_trace_warns_that_it_trains_on_an_evaluation_set() {
    let o = ifloom(
        &root(),
        &["validate", "pipelines/iopo.yaml", "--profile", "trace"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("TRAINS ON AN EVALUATION SET"), "{err}");
    assert!(err.contains("`trace`"), "{err}");
    assert!(err.contains("`clean_x1`, `clean_x2`"), "{err}");
}

#[test]
fn iopo_reads_an_ultraif_runs_augmented_instructions() {
    // UltraIF's own test fixture: 4 augmented instructions reach `to_generate`.
    let f = crate::ultraif::fixture();
    let ultraif = crate::ultraif::run_ultraif(&f, "ultraif", &[]);
    assert_eq!(count(&ultraif, "to_generate"), 4);
    // A second simulator for IOPO: x2 is x1 marked CHANGED with one more constraint, the
    // answers echo the instruction, and the judge says YES exactly when the echo is of the
    // instruction judged, so every quadruple passes its four checks.
    let rules = json!({"rules": [
        {"match": "(?s)# Original instruction\n<instruction>\n(?P<q>[^\n]*)\n</instruction>",
         "response": "{\"changed\": [\"Answer in one word.\"], \"instruction\": \"CHANGED ${q} Answer in one word.\"}"},
        {"match": "(?s)<instruction>\nCHANGED .*<response>\necho: CHANGED ", "response": "YES"},
        {"match": "(?s)<instruction>\nCHANGED ", "response": "NO"},
        {"match": "(?s)<response>\necho: CHANGED ", "response": "NO"},
        {"match": "(?s)<instruction>\n", "response": "YES"},
    ]});
    std::fs::write(f.dir.join("iopo_rules.json"), rules.to_string()).unwrap();
    let sim = Sim::start(&[
        "--slots",
        "16",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&f.dir.join("iopo_rules.json")),
    ]);
    let run = f.dir.join("iopo");
    let data = format!(
        "data={}",
        s(&ultraif.join("stages/to_generate/part-*.parquet"))
    );
    let url = format!("url={}", sim.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/iopo.yaml",
            "--profile",
            "ultraif",
            "--run-dir",
            s(&run),
            "--cache",
            s(&f.dir.join("iopo_cache.sqlite")),
            "--set",
            &data,
            "--set",
            &url,
            "--set",
            "model=sim-model",
        ],
    );
    for (table, n) in [
        ("instructions", 4),
        ("x2_changed", 4),
        ("answers", 8),
        ("judged", 16),
        ("keep_y2_fails_x1", 4),
        ("clean_x2", 4),
        ("dpo", 8),
    ] {
        assert_eq!(count(&run, table), n, "rows of {table}");
    }
    // x1 is UltraIF's augmented query; its evaluation questions are the constraints.
    let ultraif_rows = query(
        &ultraif,
        "SELECT _id, source_id, query, questions FROM to_generate ORDER BY _id",
    );
    let iopo_rows = query(
        &run,
        "SELECT i._id, i.source_id, c.x1 AS query, c.constraints AS questions \
         FROM clean_x2 c JOIN instructions i ON i._id = c.source_id ORDER BY i._id",
    );
    assert_eq!(iopo_rows, ultraif_rows);
    let records = read_json(&run.join("out/iopo/trace.json"));
    assert_eq!(records.as_array().unwrap().len(), 4);
    for r in records.as_array().unwrap() {
        let x1 = r["conversations"][0]["value"].as_str().unwrap();
        let x2 = r["conversations"][1]["value"].as_str().unwrap();
        assert_eq!(x2, format!("CHANGED {x1} Answer in one word."));
        assert_eq!(r["chosen"]["value"], format!("echo: {x1}"));
        assert_eq!(r["rejected"]["value"], format!("echo: {x2}"));
    }
    assert_eq!(jsonl(&run.join("out/dpo_pairs.jsonl")).len(), 8);
}
