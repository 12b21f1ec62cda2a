//! `kind: export` and cut-off answers: an llm stage against `ifloom sim` flags the answers
//! cut off by `max_tokens` (`response_truncated`), and the exports leave those rows out of
//! their JSONL and Parquet files unless `keep_truncated: true`, counting them in the manifest
//! and in `ifloom stats`. Real processes, real files read back here.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{jsonl, ok, run_llm_ok, s, sql_rows, tempdir};
use crate::llm::Sim;

/// Every row of a Parquet file as JSON (read with the parquet crate, not with ifloom).
fn parquet_rows(p: &Path) -> Vec<Value> {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        for b in reader {
            w.write(&b.unwrap()).unwrap();
        }
        w.finish().unwrap();
    }
    if buf.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice(&buf).unwrap()
}

fn counters(run: &Path, stage: &str) -> Value {
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join(format!("stages/{stage}/manifest.json"))).unwrap(),
    )
    .unwrap();
    m["counters"].clone()
}

/// The user turn of each `sft_messages` record.
fn prompts_of_messages(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            let m = r["messages"].as_array().unwrap();
            assert_eq!(m.last().unwrap()["role"], "assistant", "{r}");
            m[m.len() - 2]["content"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn sft_exports_leave_truncated_answers_out_unless_kept() {
    // The simulator echoes "echo: Q: <prompt>" cut to max_tokens words with finish_reason
    // length: `topic two` gets 2 tokens ("echo: Q:"), a non-empty answer that was cut off.
    let sim = Sim::start(&["--slots", "4", "--base-ms", "1"]);
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    let rows = [
        ("topic zero", 64),
        ("topic one", 64),
        ("topic two", 2),
        ("topic three", 64),
    ];
    let data: String = rows
        .iter()
        .map(|(p, mt)| format!("{}\n", json!({"prompt": p, "mt": mt})))
        .collect();
    std::fs::write(tmp.path().join("data/in.jsonl"), data).unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            r#"name: export_truncated
inputs:
  src: data/in.jsonl
stages:
  - id: ask
    kind: llm
    from: src
    endpoints: ["{url}"]
    model: sim-model
    messages:
      - role: user
        content: "Q: {{{{ prompt }}}}"
    params:
      temperature: 0
      max_tokens: {{column: mt}}
  - id: sft
    kind: export
    from: ask
    format: sft_messages
    path: out/sft
    formats: [jsonl, parquet]
  - id: sft_alpaca
    kind: export
    from: ask
    format: sft_alpaca
    path: out/sft_alpaca
  - id: sft_keep
    kind: export
    from: ask
    format: sft_messages
    path: out/sft_keep
    formats: [jsonl, parquet]
    keep_truncated: true
  # The flag left behind by a query: nothing tells the export, which writes every row.
  - id: no_flag
    kind: sql
    from: ask
    query: SELECT _id, prompt, response FROM ask
  - id: sft_no_flag
    kind: export
    from: no_flag
    format: sft_messages
    path: out/sft_no_flag
"#,
            url = sim.url
        ),
    )
    .unwrap();
    let r = tmp.path().join("run");
    let cache = tmp.path().join("c.sqlite");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    // The llm stage flagged exactly the cut-off answer.
    assert_eq!(
        sql_rows(
            tmp.path(),
            &r,
            "SELECT prompt, response, response_finish_reason FROM ask WHERE response_truncated"
        ),
        vec![vec!["topic two", "echo: Q:", "length"]]
    );
    let out = r.join("out");
    // (The export's prompt is the `prompt` column, not the rendered "Q: ..." message.)
    let complete = ["topic zero", "topic one", "topic three"];
    let all = ["topic zero", "topic one", "topic two", "topic three"];

    // Default: left out of the JSONL and of the Parquet file, and counted.
    assert_eq!(
        prompts_of_messages(&jsonl(&out.join("sft.jsonl"))),
        complete
    );
    assert_eq!(
        prompts_of_messages(&parquet_rows(&out.join("sft.parquet"))),
        complete
    );
    assert_eq!(
        counters(&r, "sft"),
        json!({"written": 3, "skipped": 0, "truncated": 1})
    );
    let alpaca: Vec<Value> = jsonl(&out.join("sft_alpaca.jsonl"))
        .iter()
        .map(|r| r["instruction"].clone())
        .collect();
    assert_eq!(alpaca, complete.map(Value::from));
    // The stage's own table is still its whole input, cut-off row included.
    assert_eq!(
        sql_rows(tmp.path(), &r, "SELECT count(*) FROM sft")[0][0],
        "4"
    );

    // keep_truncated: true writes it, with the cut-off text.
    let kept = jsonl(&out.join("sft_keep.jsonl"));
    assert_eq!(prompts_of_messages(&kept), all);
    assert_eq!(kept[2]["messages"][1]["content"], "echo: Q:");
    assert_eq!(
        prompts_of_messages(&parquet_rows(&out.join("sft_keep.parquet"))),
        all
    );
    assert_eq!(
        counters(&r, "sft_keep"),
        json!({"written": 4, "skipped": 0, "truncated": 0})
    );
    // No flag column in the export's input: every row, as before.
    assert_eq!(
        prompts_of_messages(&jsonl(&out.join("sft_no_flag.jsonl"))),
        all
    );

    // `ifloom stats` says where the row went.
    let st: Value = serde_json::from_str(&ok(tmp.path(), &["stats", "--json", s(&r)])).unwrap();
    let funnel = st["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "funnel")
        .unwrap();
    let cols: Vec<&str> = funnel["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let (stage, reason) = (
        cols.iter().position(|c| *c == "stage").unwrap(),
        cols.iter().position(|c| *c == "reason").unwrap(),
    );
    let reason_of = |id: &str| {
        funnel["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row[stage] == id)
            .unwrap_or_else(|| panic!("no funnel row {id}"))[reason]
            .clone()
    };
    assert_eq!(
        reason_of("sft"),
        "3 records written, 0 empty skipped, 1 truncated left out"
    );
    assert_eq!(
        reason_of("sft_keep"),
        "4 records written, 0 empty skipped, 0 truncated left out"
    );
}

#[test]
fn dpo_exports_leave_out_pairs_with_a_truncated_side() {
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    // Flags as an llm stage with `output: chosen` / `output: rejected` would add them; null
    // (no answer to judge) counts as not cut off.
    let rows = [
        json!({"prompt": "p1", "chosen": "good", "rejected": "bad", "chosen_truncated": false, "rejected_truncated": false}),
        json!({"prompt": "p2", "chosen": "good but cu", "rejected": "bad", "chosen_truncated": true, "rejected_truncated": false}),
        json!({"prompt": "p3", "chosen": "good", "rejected": "bad but cu", "chosen_truncated": false, "rejected_truncated": true}),
        json!({"prompt": "p4", "chosen": "good", "rejected": "bad", "chosen_truncated": null, "rejected_truncated": null}),
    ];
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(tmp.path().join("data/pairs.jsonl"), data).unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        r#"name: export_dpo_truncated
inputs:
  pairs: data/pairs.jsonl
stages:
  - id: dpo
    kind: export
    from: pairs
    format: dpo_pairs
    path: out/dpo
    formats: [jsonl, parquet]
  - id: dpo_keep
    kind: export
    from: pairs
    format: dpo_trl
    path: out/dpo_keep
    keep_truncated: true
"#,
    )
    .unwrap();
    let r = tmp.path().join("run");
    run_llm_ok(tmp.path(), &p, &r, &tmp.path().join("c.sqlite"));
    let prompts = |recs: Vec<Value>| -> Vec<Value> {
        recs.into_iter().map(|x| x["prompt"].clone()).collect()
    };
    assert_eq!(
        prompts(jsonl(&r.join("out/dpo.jsonl"))),
        [json!("p1"), json!("p4")]
    );
    assert_eq!(
        prompts(parquet_rows(&r.join("out/dpo.parquet"))),
        [json!("p1"), json!("p4")]
    );
    assert_eq!(
        counters(&r, "dpo"),
        json!({"written": 2, "skipped": 0, "truncated": 2})
    );
    let kept = jsonl(&r.join("out/dpo_keep.jsonl"));
    assert_eq!(kept.len(), 4);
    assert_eq!(kept[1]["chosen"][0]["content"], "good but cu");
    assert_eq!(
        counters(&r, "dpo_keep"),
        json!({"written": 4, "skipped": 0, "truncated": 0})
    );
}
