//! Decontamination of the training pipelines against every benchmark
//! (`pipelines/references/benchmarks.yaml`): an UltraIF run seeded with instructions copied
//! from each benchmark keeps no row that shares a 13-word sequence with any benchmark text,
//! with the rows removed per benchmark counted in `ifloom stats`; near duplicates; and the
//! validation warning of profiles that seed from an evaluation set.
//!
//! The expected figures come from this file's own reading of the benchmark files and its own
//! tokenizer (lowercase runs of letters and digits, each Han / kana character a word), not
//! from ifloom.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::{Value, json};

use crate::common::{ifloom, ok, root, s, stderr, tempdir};
use crate::llm::Sim;
use crate::stats::section;
use crate::ultraif::query;

fn data(rel: &str) -> std::path::PathBuf {
    root().join("../shared/data").join(rel)
}

fn cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0x20000..=0x2FA1F)
}

fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.to_lowercase().chars() {
        if cjk(c) || !c.is_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if cjk(c) {
                out.push(c.to_string());
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn grams(text: &str) -> HashSet<String> {
    let t = tokens(text);
    t.windows(13).map(|w| w.join(" ")).collect()
}

/// Every string inside a JSON value, in order.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

fn rows_of(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    if path.extension().unwrap() == "json" {
        serde_json::from_str::<Vec<Value>>(&text).unwrap()
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Each benchmark's texts (a row: its fields' strings joined by newlines), read here.
fn benchmarks() -> BTreeMap<&'static str, Vec<String>> {
    let join = |row: &Value, fields: &[&str]| {
        let mut out = Vec::new();
        for f in fields {
            strings(&row[*f], &mut out);
        }
        out.join("\n")
    };
    let mut b = BTreeMap::new();
    let set = |file: &str, fields: &[&str]| -> Vec<String> {
        rows_of(&data(file))
            .iter()
            .map(|r| join(r, fields))
            .collect()
    };
    b.insert("ifeval", set("ifeval/input_data.jsonl", &["prompt"]));
    b.insert(
        "infobench",
        set(
            "infobench/InfoBench.jsonl",
            &["instruction", "input", "decomposed_questions"],
        ),
    );
    let mut fb = Vec::new();
    for dir in ["followbench/data", "followbench/data_zh"] {
        let mut files: Vec<_> = std::fs::read_dir(data(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            fb.extend(rows_of(&f).iter().map(|r| join(r, &["instruction"])));
        }
    }
    b.insert("followbench", fb);
    b.insert(
        "trace",
        set("trace/202409_trace_evaluation.jsonl", &["messages"]),
    );
    b.insert(
        "eifbench",
        set(
            "eifbench/sorted_party100.json",
            &["input", "sub_instructions"],
        ),
    );
    b.insert(
        "arena_hard",
        set("arena_hard/question_v0.1.jsonl", &["prompt"]),
    );
    b
}

/// A text the simulator can echo inside a JSON string: one line, no quotes or backslashes,
/// at least `min` tokens.
fn echoable(t: &str, min: usize) -> bool {
    !t.contains(['"', '\\', '\n', '\r', '$']) && tokens(t).len() >= min && t.chars().count() <= 1500
}

/// One seed copied from each benchmark.
fn contaminated_seeds() -> Vec<(&'static str, String)> {
    let first = |file: &str, f: &dyn Fn(&Value) -> Vec<String>| -> String {
        rows_of(&data(file))
            .iter()
            .flat_map(f)
            .find(|t| echoable(t, 20))
            .unwrap_or_else(|| panic!("no echoable text in {file}"))
    };
    let field = |k: &'static str| move |r: &Value| vec![r[k].as_str().unwrap_or("").to_string()];
    vec![
        ("ifeval", first("ifeval/input_data.jsonl", &field("prompt"))),
        (
            "infobench",
            first("infobench/InfoBench.jsonl", &|r: &Value| {
                vec![format!(
                    "{} {}",
                    r["instruction"].as_str().unwrap(),
                    r["input"].as_str().unwrap()
                )]
            }),
        ),
        (
            "followbench",
            first(
                "followbench/data/style_constraints.json",
                &field("instruction"),
            ),
        ),
        (
            "trace",
            first("trace/202409_trace_evaluation.jsonl", &field("description")),
        ),
        (
            "eifbench",
            first("eifbench/sorted_party100.json", &|r: &Value| {
                let mut out = Vec::new();
                strings(&r["sub_instructions"], &mut out);
                out
            }),
        ),
        (
            "arena_hard",
            first("arena_hard/question_v0.1.jsonl", &field("prompt")),
        ),
    ]
}

const CLEAN: [&str; 2] = [
    "Describe a sunrise over the hills.",
    "Explain recursion to a child.",
];

#[test]
fn a_decontaminated_ultraif_run_shares_no_13_gram_with_any_benchmark() {
    let tmp = tempdir();
    let dir = tmp.path();
    let seeds = contaminated_seeds();
    let mut rows: Vec<Value> = CLEAN.iter().map(|p| json!({"prompt": p})).collect();
    rows.extend(seeds.iter().map(|(_, p)| json!({"prompt": p})));
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("in.jsonl"), text).unwrap();
    // The composer appends one constraint; every instruction gets a passing and a failing
    // answer, so each is one SFT row and one DPO pair before decontamination.
    let rules = json!({"rules": [
        {"match": r"\[Response\] GOOD", "response": r#"{"Question 1": {"explanation": "ok", "score": "YES"}}"#},
        {"match": r"\[Response\] BAD", "response": r#"{"Question 1": {"explanation": "no", "score": "NO"}}"#},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*)\n</query>", "response": r#"{"augmented query": "${q} Use bullet points.", "question": ["Does the response use bullet points?"], "category": "format"}"#},
        {"match": r"^Now please answer", "responses": ["GOOD: fine", "BAD: no"]},
    ]});
    std::fs::write(dir.join("rules.json"), rules.to_string()).unwrap();
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
        format!("data={}", s(&dir.join("in.jsonl"))),
        format!("url={}", sim.url),
        format!("composer_url={}", sim.url),
        "model=sim-model".into(),
        "composer_model=sim-model".into(),
        "rounds=1".into(),
        "samples=2".into(),
    ];
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/ultraif.yaml",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
    ];
    for kv in &sets {
        args.extend(["--set", kv.as_str()]);
    }
    ok(&root(), &args);

    let n = rows.len() as i64;
    let count = |t: &str| query(&run, &format!("SELECT count(*) AS n FROM {t}"))[0]["n"].clone();
    assert_eq!(count("sft"), json!(n));
    assert_eq!(count("dpo"), json!(n));

    // What each benchmark shares with the SFT prompts, by this file's own reading.
    let bench = benchmarks();
    let bench_grams: BTreeMap<&str, HashSet<String>> = bench
        .iter()
        .map(|(k, texts)| (*k, texts.iter().flat_map(|t| grams(t)).collect()))
        .collect();
    let sft_prompts: Vec<String> = query(&run, "SELECT prompt FROM sft")
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    let mut want_hits: BTreeMap<&str, i64> = BTreeMap::new();
    let mut contaminated = 0;
    for p in &sft_prompts {
        let g = grams(p);
        let mut any = false;
        for (k, bg) in &bench_grams {
            if !g.is_disjoint(bg) {
                *want_hits.entry(k).or_default() += 1;
                any = true;
            }
        }
        contaminated += any as i64;
    }
    // Every copied seed is caught by its own benchmark, the clean ones by none.
    assert_eq!(contaminated, seeds.len() as i64);
    for (k, _) in &seeds {
        assert!(
            want_hits.get(k).copied().unwrap_or(0) >= 1,
            "{k}: {want_hits:?}"
        );
    }

    // The decontaminated tables keep exactly the clean instructions, and no row of theirs
    // shares a 13-gram with any benchmark.
    for (table, column) in [("sft_clean", "prompt"), ("dpo_clean", "prompt")] {
        let kept = query(
            &run,
            &format!("SELECT {column} FROM {table} ORDER BY {column}"),
        );
        let kept: Vec<&str> = kept.iter().map(|r| r[column].as_str().unwrap()).collect();
        assert_eq!(
            kept,
            CLEAN
                .iter()
                .map(|c| format!("{c} Use bullet points."))
                .collect::<Vec<_>>(),
            "{table}"
        );
        for p in &kept {
            let g = grams(p);
            for (k, bg) in &bench_grams {
                assert!(
                    g.is_disjoint(bg),
                    "{table} row shares a 13-gram with {k}: {p}"
                );
            }
        }
    }

    // Per-benchmark counts in `ifloom stats`, for both stages.
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let sec = section(&st, "contamination");
    for stage in ["sft_clean", "dpo_clean"] {
        let got: BTreeMap<String, (i64, i64)> = sec
            .iter()
            .filter(|r| r["stage"] == stage)
            .map(|r| {
                (
                    r["reference"].as_str().unwrap().to_string(),
                    (
                        r["ngram_rows"].as_i64().unwrap(),
                        r["near_dup_rows"].as_i64().unwrap(),
                    ),
                )
            })
            .collect();
        let want: BTreeMap<String, (i64, i64)> = bench
            .keys()
            .map(|k| (k.to_string(), (want_hits.get(k).copied().unwrap_or(0), 0)))
            .collect();
        assert_eq!(got, want, "{stage}");
    }
    // The removed rows say which set they matched first and the n-gram.
    let removed = query(
        &run,
        "SELECT _reference, _matched_ngram, _similarity FROM sft_clean__removed",
    );
    assert_eq!(removed.len(), seeds.len());
    for r in &removed {
        assert_eq!(
            tokens(r["_matched_ngram"].as_str().unwrap()).len(),
            13,
            "{r}"
        );
        assert_eq!(r["_similarity"], Value::Null);
    }
}

/// Near duplicates: a row under 13 words that copies a reference text with one word changed
/// is removed at the threshold, worked out by hand on 3-word shingles.
#[test]
fn near_duplicates_of_short_benchmark_prompts_are_removed() {
    let tmp = tempdir();
    let dir = tmp.path();
    // Reference: "choose an appealing title for your post" — 7 words, shingles
    // {choose an appealing, an appealing title, appealing title for, title for your,
    // for your post}: 5.
    std::fs::write(
        dir.join("ref.jsonl"),
        "{\"instruction\": \"Choose an appealing title for your post.\", \"input\": \"\"}\n",
    )
    .unwrap();
    // Row 1: "pick an appealing title for your post" — shares 4 of its 5 shingles (all but
    // the first): Jaccard 4 / (5 + 5 - 4) = 0.667.
    // Row 2: "choose an appealing title for your blog post" — shingles: choose an appealing,
    // an appealing title, appealing title for, title for your, for your blog, your blog post:
    // 4 shared, Jaccard 4 / (6 + 5 - 4) = 0.571.
    // Row 3: the reference verbatim with other punctuation: Jaccard 1.
    // Row 4: unrelated.
    let rows = [
        "Pick an appealing title for your post",
        "Choose an appealing title for your blog post",
        "CHOOSE an appealing title... for your post!",
        "Write a haiku about autumn leaves",
    ];
    let text: String = rows
        .iter()
        .map(|r| format!("{}\n", json!({"t": r})))
        .collect();
    std::fs::write(dir.join("rows.jsonl"), text).unwrap();
    for (threshold, want_removed) in [
        ("0.6", vec![0usize, 2]),
        ("0.55", vec![0, 1, 2]),
        ("1.0", vec![2]),
    ] {
        std::fs::write(
            dir.join("p.yaml"),
            format!(
                "name: near\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: clean\n    kind: decontaminate\n    from: rows\n    column: t\n    near_dup_threshold: {threshold}\n    references:\n      - {{path: ref.jsonl, column: [instruction, input], name: bench}}\n"
            ),
        )
        .unwrap();
        let run = dir.join(format!("run-{threshold}"));
        ok(dir, &["run", "p.yaml", "--run-dir", s(&run)]);
        let removed = query(&run, "SELECT t, _similarity FROM clean__removed ORDER BY t");
        let mut want: Vec<&str> = want_removed.iter().map(|i| rows[*i]).collect();
        want.sort();
        let got: Vec<&str> = removed.iter().map(|r| r["t"].as_str().unwrap()).collect();
        assert_eq!(got, want, "threshold {threshold}");
        let counters: Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("stages/clean/manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(counters["counters"]["near_dups_bench"], json!(want.len()));
        assert_eq!(counters["counters"]["hits_bench"], json!(0));
    }
}

/// Seeding UltraIF from InfoBench or Arena-Hard is an evaluation set in the training data:
/// validation says so, naming the input, the set and the stages; the default data does not.
#[test]
fn profiles_seeding_from_an_evaluation_set_warn_when_validated() {
    for (profile, set) in [("infobench", "infobench"), ("arena_hard", "arena_hard")] {
        let o = ifloom(
            &root(),
            &["validate", "pipelines/ultraif.yaml", "--profile", profile],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.matches("warning:").count(), 1, "{e}");
        assert!(e.contains("TRAINS ON AN EVALUATION SET"), "{e}");
        assert!(e.contains(&format!("the evaluation set `{set}`")), "{e}");
        assert!(e.contains("`sft_clean`, `dpo_clean`"), "{e}");
    }
    let o = ifloom(
        &root(),
        &["validate", "pipelines/ultraif.yaml", "--profile", "oasst"],
    );
    assert!(o.status.success());
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}
