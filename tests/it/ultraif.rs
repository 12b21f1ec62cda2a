//! The shipped UltraIF pipelines end to end against `ifloom sim`, whose rules answer every
//! prompt (composer, responder, judge, decomposer, question writer) deterministically, so the
//! row count of every stage and the SFT/DPO contents are known before the run.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{ok, root, tempdir};
use crate::llm::Sim;

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Rows of a query as JSON objects (`ifloom sql --format jsonl`).
pub(crate) fn query(run: &Path, sql: &str) -> Vec<Value> {
    ok(&root(), &["sql", "--run", s(run), "--format", "jsonl", sql])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count(run: &Path, table: &str) -> i64 {
    query(run, &format!("SELECT count(*) AS n FROM {table}"))[0]["n"]
        .as_i64()
        .unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Judge answers keyed on how the judged response starts.
const ALL_YES: &str = r#"{"Question 1": {"explanation": "ok", "score": "YES"}, "Question 2": {"explanation": "ok", "score": "YES"}, "Question 3": {"explanation": "ok", "score": "YES"}}"#;
const FIRST_NO: &str = r#"{"Question 1": {"explanation": "misses it", "score": "NO"}, "Question 2": {"explanation": "ok", "score": "YES"}, "Question 3": {"explanation": "ok", "score": "YES"}}"#;
const ALL_NO: &str = r#"{"Question 1": {"explanation": "no", "score": "NO"}, "Question 2": {"explanation": "no", "score": "NO"}, "Question 3": {"explanation": "no", "score": "NO"}}"#;
/// Prose around single-quoted JSON with Python literals and lowercase scores: still a pass.
const MESSY_YES: &str = "Sure! Here is my evaluation: {'Question 1': {'explanation': 'fine', 'score': 'yes'}, 'Question 2': {'explanation': 'fine', 'score': True}, 'Question 3': {'score': 'Yes.'},} Hope it helps.";

fn ultraif_rules() -> Value {
    let composed = |q: &str, extra: &str, question: &str, cat: &str| {
        format!(
            r#"{{"augmented_query": "{q} {extra}", "eval_question": "{question}", "category": "{cat}"}}"#
        )
    };
    json!({"rules": [
        // The judge: its prompt quotes the response.
        {"match": r"(?s)<response>\nGOOD", "response": ALL_YES},
        {"match": r"(?s)<response>\nBAD2", "response": ALL_NO},
        {"match": r"(?s)<response>\nBAD", "response": FIRST_NO},
        {"match": r"(?s)<response>\nOKAY", "response": MESSY_YES},
        {"match": r"(?s)<response>\nUNCLEAR", "response": "The response seems fine to me overall."},
        // The composer: round 2 adds a second constraint to what round 1 added.
        {"match": r"(?s)<query>\nName a fruit\.", "response": composed("Name a fruit.", "Answer in JSON for the human evaluator.", "Is it JSON?", "format")},
        {"match": r"(?s)<query>\nTell me a joke\.", "response": "I would rather not add anything."},
        {"match": r"(?s)<query>\nSay hello\.", "response": r#"{"augmented_query": "Say hello.", "eval_question": "Does it say hello?", "category": "content"}"#},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*Use bullet points\.)\n</query>", "response": composed("${q}", "End with a question.", "Does the response end with a question?", "stylistic")},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*)\n</query>", "response": composed("${q}", "Use bullet points.", "Does the response use bullet points?", "format")},
        // The responder: K = 3 choices per augmented instruction.
        {"match": "^Describe a sunrise", "responses": ["GOOD: gold light over the hills?", "BAD: it is morning", "BAD2: no"]},
        {"match": "^Explain recursion", "responses": ["GOOD: a function calling itself?", "GOOD: see recursion?", "OKAY: base case and step?"]},
        {"match": "^List three colours", "responses": ["BAD: red", "BAD: red green", "BAD2: none"]},
        {"match": "^Summarize the news", "responses": ["GOOD: this answer is far too long for the token limit of this test so it gets cut off", "GOOD: short news?", "UNCLEAR: hmm"]},
    ]})
}

fn instructions() -> Vec<Value> {
    [
        "Describe a sunrise.",
        "Explain recursion.",
        "List three colours.",
        "Summarize the news.",
        "Name a fruit.",
        "Tell me a joke.",
        "Say hello.",
    ]
    .iter()
    .map(|p| json!({"prompt": p, "category": "test"}))
    .collect()
}

pub(crate) struct Fixture {
    _tmp: tempfile::TempDir,
    pub dir: std::path::PathBuf,
    pub sim: Sim,
}

pub(crate) fn fixture() -> Fixture {
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    write_jsonl(&dir.join("in.jsonl"), &instructions());
    std::fs::write(dir.join("rules.json"), ultraif_rules().to_string()).unwrap();
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
    Fixture {
        _tmp: tmp,
        dir,
        sim,
    }
}

pub(crate) fn run_ultraif(f: &Fixture, run: &str, extra: &[&str]) -> std::path::PathBuf {
    let run_dir = f.dir.join(run);
    let data = format!("data={}", s(&f.dir.join("in.jsonl")));
    let url = format!("url={}", f.sim.url);
    let curl = format!("composer_url={}", f.sim.url);
    let cache = f.dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/ultraif.yaml",
        "--run-dir",
        s(&run_dir),
        "--cache",
        s(&cache),
        "--set",
        &data,
        "--set",
        &url,
        "--set",
        &curl,
        "--set",
        "model=sim-model",
        "--set",
        "composer_model=sim-model",
        "--set",
        "rounds=2",
        "--set",
        "samples=3",
        "--set",
        "max_tokens=12",
    ];
    args.extend_from_slice(extra);
    ok(&root(), &args);
    run_dir
}

#[test]
fn ultraif_counts_at_every_stage_and_no_failing_response_in_sft() {
    let f = fixture();
    let run = run_ultraif(&f, "run", &[]);
    // 7 instructions; "Name a fruit." leaks evaluator wording, "Tell me a joke." does not
    // parse and "Say hello." comes back unchanged: those keep their query and get no question.
    for (table, n) in [
        ("instructions", 7),
        ("query_r0", 7),
        ("compose_r1", 7),
        ("query_r1", 7),
        ("compose_r2", 7),
        ("query_r2", 7),
        ("augmented", 14),
        ("to_generate", 4),
        ("responses", 12),
        ("candidates", 12),
        ("judge", 12),
        ("judged", 12),
        ("sft", 3),
        ("dpo", 1),
        ("sft_clean", 3),
        ("dpo_clean", 1),
    ] {
        assert_eq!(count(&run, table), n, "rows of {table}");
    }
    let guards = query(
        &run,
        "SELECT guard, count(*) AS n FROM augmented GROUP BY guard ORDER BY guard",
    );
    assert_eq!(
        guards,
        vec![
            json!({"guard": "leak", "n": 2}),
            json!({"guard": "ok", "n": 8}),
            json!({"guard": "unchanged", "n": 2}),
            json!({"guard": "unparsed", "n": 2}),
        ]
    );
    // Round 2's query carries both constraints and both questions, in order.
    let r = query(
        &run,
        "SELECT query, questions FROM query_r2 WHERE query LIKE 'Describe%'",
    );
    assert_eq!(
        r[0]["query"],
        "Describe a sunrise. Use bullet points. End with a question."
    );
    assert_eq!(
        r[0]["questions"],
        json!([
            "Does the response use bullet points?",
            "Does the response end with a question?"
        ])
    );
    let verdicts = query(
        &run,
        "SELECT verdict, count(*) AS n FROM judged GROUP BY verdict ORDER BY verdict",
    );
    assert_eq!(
        verdicts,
        vec![
            json!({"verdict": "fail", "n": 5}),
            json!({"verdict": "pass", "n": 6}),
            json!({"verdict": "unjudged", "n": 1}),
        ]
    );
    // No failing, unjudged or truncated response reaches SFT.
    let bad = query(
        &run,
        "SELECT count(*) AS n FROM sft s JOIN judged j ON j._id = s._id
         WHERE j.verdict <> 'pass' OR j.response_truncated",
    );
    assert_eq!(bad[0]["n"], 0);
    let sft = query(
        &run,
        "SELECT response, sample_index FROM sft ORDER BY prompt",
    );
    assert_eq!(
        sft,
        vec![
            json!({"response": "GOOD: gold light over the hills?", "sample_index": 0}),
            json!({"response": "GOOD: a function calling itself?", "sample_index": 0}),
            // Sample 0 passed but was cut off by max_tokens.
            json!({"response": "GOOD: short news?", "sample_index": 1}),
        ]
    );
    let dpo = query(
        &run,
        "SELECT chosen, rejected, margin, n_pass, n_fail, n_unjudged FROM dpo",
    );
    assert_eq!(
        dpo,
        vec![
            json!({"chosen": "GOOD: gold light over the hills?", "rejected": "BAD: it is morning",
                    "margin": 1, "n_pass": 1, "n_fail": 2, "n_unjudged": 0})
        ]
    );
    // Lineage: one join from an SFT row reaches the source instruction.
    let lineage = query(
        &run,
        "SELECT i.prompt FROM sft s JOIN instructions i ON i._id = s.source_id ORDER BY i.prompt",
    );
    assert_eq!(
        lineage,
        vec![
            json!({"prompt": "Describe a sunrise."}),
            json!({"prompt": "Explain recursion."}),
            json!({"prompt": "Summarize the news."}),
        ]
    );
    // Every export was written and reads back in its format.
    let out = run.join("out");
    let lines = |f: &str| -> Vec<Value> {
        std::fs::read_to_string(out.join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let msgs = lines("sft_messages.jsonl");
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[0]["messages"][1]["role"], "assistant");
    assert_eq!(lines("sft_alpaca.jsonl").len(), 3);
    let pairs = lines("dpo_pairs.jsonl");
    assert_eq!(pairs[0]["rejected"], "BAD: it is morning");
    assert_eq!(lines("dpo_trl.jsonl")[0]["chosen"][0]["role"], "assistant");
    assert_eq!(lines("dpo_sharegpt.jsonl")[0]["chosen"]["from"], "gpt");
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("dataset_info.json")).unwrap())
            .unwrap();
    assert_eq!(info["ultraif_dpo"]["ranking"], true);
    assert_eq!(info["ultraif_dpo"]["file_name"], "dpo_sharegpt.jsonl");
    assert_eq!(info["ultraif_sft"]["file_name"], "sft_alpaca.jsonl");
    assert!(out.join("sft_messages.parquet").exists());
}

#[test]
fn dpo_pair_choice_and_every_round_generation() {
    let f = fixture();
    let run = run_ultraif(&f, "margin", &["--set", "dpo_pair=margin"]);
    let dpo = query(&run, "SELECT rejected, margin FROM dpo");
    assert_eq!(dpo, vec![json!({"rejected": "BAD2: no", "margin": 2})]);
    let sent = f.sim.requests();
    let run = run_ultraif(&f, "last", &["--set", "dpo_pair=last"]);
    assert_eq!(
        query(&run, "SELECT rejected FROM dpo"),
        vec![json!({"rejected": "BAD2: no"})]
    );
    // Only the DPO choice changed: every LLM answer came from the cache.
    assert_eq!(f.sim.requests(), sent);
    // generate_rounds=all answers and judges round 1 too (same 4 instructions, 1 question).
    let run = run_ultraif(&f, "all", &["--set", "generate_rounds=all"]);
    let per_round = query(
        &run,
        "SELECT round, count(*) AS n, sum(CASE WHEN verdict = 'pass' THEN 1 ELSE 0 END) AS pass
         FROM judged GROUP BY round ORDER BY round",
    );
    assert_eq!(
        per_round,
        vec![
            json!({"round": 1, "n": 12, "pass": 6}),
            json!({"round": 2, "n": 12, "pass": 6}),
        ]
    );
    assert_eq!(count(&run, "sft"), 6);
}

fn composer_rules() -> Value {
    json!({"rules": [
        // The question writer: its prompt quotes the constraint.
        {"match": r"(?s)<constraint>\nin French", "response": r#"{"question": "Is the response written in French?"}"#},
        {"match": r"(?s)<constraint>\nexactly 3 lines", "response": r#"{"question": "Does the response have exactly 3 lines?"}"#},
        {"match": r"(?s)<constraint>\nfriendly", "response": r#"{"question": ""}"#},
        {"match": r"(?s)<constraint>\n", "response": r#"{"question": "Is it all lowercase?"}"#},
        // The decomposer, keyed on the instruction.
        {"match": r"(?s)<instruction>\nWrite a poem in French in exactly 3 lines\.", "response": r#"{"has_constraints": true, "basic_query": "Write a poem.", "constraints": {"content": [], "numerical": [{"constraint": "exactly 3 lines", "simplified_query": "Write a poem in French."}], "stylistic": [], "format": [{"constraint": "a poem", "simplified_query": "Write a poem in French in exactly 3 lines."}], "linguistic": [{"constraint": "in French", "simplified_query": "Write a poem in exactly 3 lines."}]}}"#},
        {"match": r"(?s)<instruction>\nWhat is 2\+2\?", "response": "```python\n{'has_constraints': False, 'basic_query': 'What is 2+2?', 'constraints': {'content': [], 'numerical': [], 'stylistic': [], 'format': [], 'linguistic': []}}\n```"},
        {"match": r"(?s)<instruction>\nWrite a friendly note", "response": r#"{"has_constraints": true, "basic_query": "Write a note.", "constraints": {"stylistic": [{"constraint": "friendly", "simplified_query": "Write a note."}], "linguistic": [{"constraint": "all lowercase", "simplified_query": "Write a friendly note."}]}}"#},
        {"match": r"(?s)<instruction>\nShout", "response": "I cannot decompose this."},
    ]})
}

#[test]
fn composer_data_counts_and_targets() {
    let tmp = tempdir();
    let dir = tmp.path();
    write_jsonl(
        &dir.join("in.jsonl"),
        &[
            json!({"prompt": "Write a poem in French in exactly 3 lines."}),
            json!({"prompt": "What is 2+2?"}),
            json!({"prompt": "Write a friendly note, all lowercase."}),
            json!({"prompt": "Shout at the clouds loudly."}),
        ],
    );
    std::fs::write(dir.join("rules.json"), composer_rules().to_string()).unwrap();
    let sim = Sim::start(&[
        "--slots",
        "8",
        "--base-ms",
        "1",
        "--rules",
        s(&dir.join("rules.json")),
    ]);
    let run = dir.join("run");
    let data = format!("data={}", s(&dir.join("in.jsonl")));
    let url = format!("url={}", sim.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif_composer_data.yaml",
            "--run-dir",
            s(&run),
            "--cache",
            s(&dir.join("cache.sqlite")),
            "--set",
            &data,
            "--set",
            &url,
            "--set",
            "model=sim-model",
        ],
    );
    // The poem has 3 constraints (one whose simplified query is the poem itself), the sum
    // none (Python literals in a fence), the note 2 ("friendly" gets an empty question), and
    // the last answer does not parse.
    assert_eq!(count(&run, "decomposed"), 4);
    assert_eq!(count(&run, "constraints"), 5);
    assert_eq!(count(&run, "questions"), 5);
    let pairs = query(
        &run,
        "SELECT prompt, response, category FROM composer_pairs ORDER BY prompt",
    );
    assert_eq!(pairs.len(), 3, "{pairs:?}");
    let target: Value = serde_json::from_str(pairs[0]["response"].as_str().unwrap()).unwrap();
    assert_eq!(pairs[0]["prompt"], "Write a friendly note.");
    assert_eq!(
        target,
        json!({"augmented_query": "Write a friendly note, all lowercase.", "eval_question": "Is it all lowercase?"})
    );
    let cats: Vec<&str> = pairs
        .iter()
        .map(|p| p["category"].as_str().unwrap())
        .collect();
    assert_eq!(cats, ["linguistic", "numerical", "linguistic"]);
    let sft: Vec<Value> = std::fs::read_to_string(run.join("out/composer_sft_messages.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sft.len(), 3);
    assert_eq!(sft[0]["messages"][0]["role"], "user");
}

/// Both pipelines read each shared dataset named by a profile (Arena-Hard, OASST, InfoBench)
/// and the project's conversations sample: 3 rows each, against an echoing simulator (whose
/// answers never parse, so the run stops early by design), and every seed has a non-empty
/// instruction taken from the right column.
#[test]
fn data_profiles_read_the_shared_datasets() {
    let tmp = tempdir();
    let sim = Sim::start(&["--slots", "16", "--base-ms", "1", "--per-token-ms", "0"]);
    let url = format!("url={}", sim.url);
    let curl = format!("composer_url={}", sim.url);
    for pipeline in ["ultraif", "ultraif_composer_data"] {
        for profile in ["arena_hard", "oasst", "infobench", "conversations"] {
            let run = tmp.path().join(format!("{pipeline}-{profile}"));
            let file = format!("pipelines/{pipeline}.yaml");
            let cache = tmp.path().join("cache.sqlite");
            let mut args = vec![
                "run",
                &file,
                "--profile",
                profile,
                "--run-dir",
                s(&run),
                "--cache",
                s(&cache),
                "--set",
                "rows=3",
                "--set",
                &url,
                "--set",
                "model=sim-model",
            ];
            if pipeline == "ultraif" {
                args.extend([
                    "--set",
                    &curl,
                    "--set",
                    "composer_model=sim-model",
                    "--set",
                    "rounds=1",
                    "--set",
                    "samples=1",
                ]);
            }
            ok(&root(), &args);
            let seeds = query(&run, "SELECT query FROM seeds");
            assert!(
                !seeds.is_empty(),
                "{pipeline} --profile {profile}: no seeds"
            );
            for r in &seeds {
                let q = r["query"].as_str().unwrap_or_default();
                assert!(q.trim().len() >= 10, "{pipeline} --profile {profile}: {r}");
            }
        }
    }
    // The conversations profile of ultraif.yaml takes the last human turn as the instruction
    // and keeps the turns before it as history (checked against the file read here).
    let run = tmp.path().join("ultraif-conversations-all");
    let cache = tmp.path().join("cache.sqlite");
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif.yaml",
            "--profile",
            "conversations",
            "--run-dir",
            s(&run),
            "--cache",
            s(&cache),
            "--set",
            &url,
            "--set",
            &curl,
            "--set",
            "model=sim-model",
            "--set",
            "composer_model=sim-model",
            "--set",
            "rounds=1",
            "--set",
            "samples=1",
        ],
    );
    let mut expected: Vec<(String, usize)> =
        std::fs::read_to_string(root().join("data/conversations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let c: Value = serde_json::from_str(l).unwrap();
                let turns = c["conversations"].as_array().unwrap();
                let n = turns.len();
                (turns[n - 2]["value"].as_str().unwrap().to_string(), n - 2)
            })
            .filter(|(q, _)| (10..=2000).contains(&q.chars().count()))
            .collect();
    expected.sort();
    let mut got: Vec<(String, usize)> =
        query(&run, "SELECT query, cardinality(history) AS h FROM seeds")
            .iter()
            .map(|r| {
                (
                    r["query"].as_str().unwrap().to_string(),
                    r["h"].as_u64().unwrap() as usize,
                )
            })
            .collect();
    got.sort();
    assert_eq!(got, expected);
    assert!(
        got.iter().any(|(_, h)| *h > 0),
        "the sample has multi-turn conversations"
    );
}
