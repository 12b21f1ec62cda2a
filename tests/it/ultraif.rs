//! The shipped UltraIF pipelines end to end against `ifloom sim`, whose rules answer every
//! prompt (composer, responder, judge, decomposer, question writer) deterministically, so the
//! row count of every stage and the SFT/DPO contents are known before the run.

use std::path::Path;

use serde_json::{Value, json};

use crate::common::{jsonl, ok, root, tempdir};
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
            r#"{{"augmented query": "{q} {extra}", "question": ["{question}"], "category": "{cat}"}}"#
        )
    };
    json!({"rules": [
        // The judge (the authors' prompt): it quotes the response after `[Response] `.
        {"match": r"\[Response\] GOOD", "response": ALL_YES},
        {"match": r"\[Response\] BAD2", "response": ALL_NO},
        {"match": r"\[Response\] BAD", "response": FIRST_NO},
        {"match": r"\[Response\] OKAY", "response": MESSY_YES},
        {"match": r"\[Response\] UNCLEAR", "response": "The response seems fine to me overall."},
        // The composer: round 2 adds a second constraint to what round 1 added.
        {"match": r"(?s)<query>\nName a fruit\.", "response": composed("Name a fruit.", "Answer in JSON for the human evaluator.", "Is it JSON?", "format")},
        {"match": r"(?s)<query>\nTell me a joke\.", "response": "I would rather not add anything."},
        {"match": r"(?s)<query>\nSay hello\.", "response": r#"{"augmented query": "Say hello.", "question": ["Does it say hello?"], "category": "content"}"#},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*Use bullet points\.)\n</query>", "response": composed("${q}", "End with a question.", "Does the response end with a question?", "stylistic")},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*)\n</query>", "response": composed("${q}", "Use bullet points.", "Does the response use bullet points?", "format")},
        // The responder (the authors' prompt): K = 3 choices per augmented instruction.
        {"match": r"^Now please answer[^\n]*\n\[Query\] Describe a sunrise", "responses": ["GOOD: gold light over the hills?", "BAD: it is morning", "BAD2: no"]},
        {"match": r"^Now please answer[^\n]*\n\[Query\] Explain recursion", "responses": ["GOOD: a function calling itself?", "GOOD: see recursion?", "OKAY: base case and step?"]},
        {"match": r"^Now please answer[^\n]*\n\[Query\] List three colours", "responses": ["BAD: red", "BAD: red green", "BAD2: none"]},
        {"match": r"^Now please answer[^\n]*\n\[Query\] Summarize the news", "responses": ["GOOD: this answer is far too long for the token limit of this test so it gets cut off", "GOOD: short news?", "UNCLEAR: hmm"]},
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
    fixture_with(ultraif_rules())
}

/// [`fixture`] with other simulator rules.
fn fixture_with(rules: Value) -> Fixture {
    let tmp = tempdir();
    let dir = tmp.path().to_path_buf();
    write_jsonl(&dir.join("in.jsonl"), &instructions());
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
        "--record",
        s(&dir.join("requests.jsonl")),
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

/// Rules for both prompt sets of `ultraif_composer_data.yaml`: the authors' prompts (keyed on
/// their `Query: ` / `Constraint: ` lines; answers in their shape, fenced, Python literals)
/// and ifloom's (`<instruction>` / `<constraint>` tags; answers in its shape). Both describe
/// the same decompositions, so both sets must give the same pairs.
fn composer_rules() -> Value {
    let authors_q = |c: &str| format!(r"(?s)\nConstraint: {c}\n```json");
    json!({"rules": [
        // The authors' question writer: the real constraint line is followed by the fence.
        {"match": authors_q("in French"), "response": "```json\n{\n    \"question\": \"Is the response written in French?\"\n}\n```"},
        {"match": authors_q("exactly 3 lines"), "response": r#"{"question": "Does the response have exactly 3 lines?"}"#},
        {"match": authors_q("friendly"), "response": r#"{"question": ""}"#},
        {"match": authors_q("[^\n]*"), "response": r#"{'question': 'Is it all lowercase?',}"#},
        // The authors' decomposer, keyed on the query line after the definition.
        {"match": r"Definition of Constraint:[^\n]*\n\nQuery: Write a poem in French in exactly 3 lines\.", "response": "```json\n{\n    \"Complex\": True,\n    \"Basic Query\": \"Write a poem.\",\n    \"Numerical Constraints\": [{\"constraint\": \"exactly 3 lines\", \"simplified query\": \"Write a poem in French.\"}],\n    \"Format Constraints\": [{\"constraint\": \"a poem\", \"simplified query\": \"Write a poem in French in exactly 3 lines.\"}],\n    \"Linguistic Constraints\": [{\"constraint\": \"in French\", \"simplified query\": \"Write a poem in exactly 3 lines.\"}],\n}\n```"},
        {"match": r"Definition of Constraint:[^\n]*\n\nQuery: What is 2\+2\?", "response": "```json\n{\n    \"Complex\": False\n}\n```"},
        {"match": r"Definition of Constraint:[^\n]*\n\nQuery: Write a friendly note", "response": r#"{"Complex": true, "Basic Query": "Write a note.", "Stylistic Constraints": [{"constraint": "friendly", "simplified query": "Write a note."}], "Linguistic Constraints": [{"constraint": "all lowercase", "simplified query": "Write a friendly note."}]}"#},
        {"match": r"Definition of Constraint:[^\n]*\n\nQuery: Shout", "response": "I cannot decompose this."},
        // ifloom's question writer: its prompt quotes the constraint.
        {"match": r"(?s)<constraint>\nin French", "response": r#"{"question": "Is the response written in French?"}"#},
        {"match": r"(?s)<constraint>\nexactly 3 lines", "response": r#"{"question": "Does the response have exactly 3 lines?"}"#},
        {"match": r"(?s)<constraint>\nfriendly", "response": r#"{"question": ""}"#},
        {"match": r"(?s)<constraint>\n", "response": r#"{"question": "Is it all lowercase?"}"#},
        // ifloom's decomposer, keyed on the instruction.
        {"match": r"(?s)<instruction>\nWrite a poem in French in exactly 3 lines\.", "response": r#"{"has_constraints": true, "basic_query": "Write a poem.", "constraints": {"content": [], "numerical": [{"constraint": "exactly 3 lines", "simplified_query": "Write a poem in French."}], "stylistic": [], "format": [{"constraint": "a poem", "simplified_query": "Write a poem in French in exactly 3 lines."}], "linguistic": [{"constraint": "in French", "simplified_query": "Write a poem in exactly 3 lines."}]}}"#},
        {"match": r"(?s)<instruction>\nWhat is 2\+2\?", "response": "```python\n{'has_constraints': False, 'basic_query': 'What is 2+2?', 'constraints': {'content': [], 'numerical': [], 'stylistic': [], 'format': [], 'linguistic': []}}\n```"},
        {"match": r"(?s)<instruction>\nWrite a friendly note", "response": r#"{"has_constraints": true, "basic_query": "Write a note.", "constraints": {"stylistic": [{"constraint": "friendly", "simplified_query": "Write a note."}], "linguistic": [{"constraint": "all lowercase", "simplified_query": "Write a friendly note."}]}}"#},
        {"match": r"(?s)<instruction>\nShout", "response": "I cannot decompose this."},
    ]})
}

/// The note's earlier turns (ShareGPT), and how Python's repr() prints them (written by hand:
/// the value with an apostrophe is double-quoted).
const NOTE_HISTORY_REPR: &str =
    r#"[{'from': 'human', 'value': "Hi, it's Ann."}, {'from': 'gpt', 'value': 'Hello Ann!'}]"#;

fn note_history() -> Value {
    json!([{"from": "human", "value": "Hi, it's Ann."}, {"from": "gpt", "value": "Hello Ann!"}])
}

fn run_composer_data(dir: &Path, sim: &Sim, run: &str, extra: &[&str]) -> std::path::PathBuf {
    let run = dir.join(run);
    let data = format!("data={}", s(&dir.join("in.jsonl")));
    let url = format!("url={}", sim.url);
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/ultraif_composer_data.yaml",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
        "--set",
        &data,
        "--set",
        &url,
        "--set",
        "model=sim-model",
        "--set",
        "history_expr=history",
    ];
    args.extend_from_slice(extra);
    ok(&root(), &args);
    run
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
            json!({"prompt": "Write a friendly note, all lowercase.", "history": note_history()}),
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
    // The note's input carries its history as UltraComposer reads it; the others have none.
    let note_input =
        format!("[history]: {NOTE_HISTORY_REPR} \n [initial query]: Write a friendly note.");
    let expected_pairs = [
        (
            "[initial query]: Write a poem in French.".to_string(),
            json!({"augmented query": "Write a poem in French in exactly 3 lines.", "question": ["Does the response have exactly 3 lines?"]}),
            "numerical",
        ),
        (
            "[initial query]: Write a poem in exactly 3 lines.".to_string(),
            json!({"augmented query": "Write a poem in French in exactly 3 lines.", "question": ["Is the response written in French?"]}),
            "linguistic",
        ),
        (
            note_input.clone(),
            json!({"augmented query": "Write a friendly note, all lowercase.", "question": ["Is it all lowercase?"]}),
            "linguistic",
        ),
    ];
    for (set, run) in [("authors", "run"), ("ifloom", "run-ifloom")] {
        let prompts = format!("prompts={set}");
        let run = run_composer_data(dir, &sim, run, &["--set", &prompts]);
        // The poem has 3 constraints (one whose simplified query is the poem itself), the sum
        // none, the note 2 ("friendly" gets an empty question), and the last answer does not
        // parse.
        assert_eq!(count(&run, "decomposed"), 4, "{set}");
        assert_eq!(count(&run, "constraints"), 5, "{set}");
        assert_eq!(count(&run, "questions"), 5, "{set}");
        let pairs = query(
            &run,
            "SELECT prompt, response, category FROM composer_pairs ORDER BY category, prompt",
        );
        let got: Vec<(String, Value, String)> = pairs
            .iter()
            .map(|p| {
                (
                    p["prompt"].as_str().unwrap().to_string(),
                    serde_json::from_str(p["response"].as_str().unwrap()).unwrap(),
                    p["category"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut want: Vec<(String, Value, String)> = expected_pairs
            .iter()
            .map(|(p, r, c)| (p.clone(), r.clone(), c.to_string()))
            .collect();
        want.sort_by(|a, b| (&a.2, &a.0).cmp(&(&b.2, &b.0)));
        assert_eq!(got, want, "{set}");
    }
    let run = dir.join("run");
    // The SFT export, read back: a user turn with UltraComposer's input and an assistant turn
    // whose JSON has exactly the authors' keys, the question a list.
    let sft = jsonl(&run.join("out/composer_sft_messages.jsonl"));
    assert_eq!(sft.len(), 3);
    for line in &sft {
        let m = line["messages"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["role"], "user");
        assert!(
            m[0]["content"]
                .as_str()
                .unwrap()
                .contains("[initial query]: ")
        );
        assert_eq!(m[1]["role"], "assistant");
        let target: Value = serde_json::from_str(m[1]["content"].as_str().unwrap()).unwrap();
        let keys: Vec<&String> = target.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["augmented query", "question"]);
        assert_eq!(target["question"].as_array().unwrap().len(), 1);
    }
    assert!(
        sft.iter()
            .any(|l| l["messages"][0]["content"] == note_input.as_str())
    );
    // The authors' own record shape (UltraComposer/sft_data.py): "simplified query", "query"
    // and "tool", the JSON text of {"question": [q]}.
    let upstream = jsonl(&run.join("out/ultracomposer_sft.jsonl"));
    assert_eq!(upstream.len(), 3);
    let note = upstream
        .iter()
        .find(|r| r["simplified query"] == "Write a friendly note.")
        .unwrap();
    let mut keys: Vec<&str> = note
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["query", "simplified query", "tool"]);
    assert_eq!(note["query"], "Write a friendly note, all lowercase.");
    let tool: Value = serde_json::from_str(note["tool"].as_str().unwrap()).unwrap();
    assert_eq!(tool, json!({"question": ["Is it all lowercase?"]}));

    // The other direction: a composer that answers exactly these training targets to exactly
    // these inputs (what a composer trained on the pairs learns) drives ultraif.yaml with
    // `composer: finetuned`: the simplified queries come back augmented with their question.
    let rules: Vec<Value> = sft
        .iter()
        .map(|l| {
            json!({"match": format!("^{}$", regex::escape(l["messages"][0]["content"].as_str().unwrap())),
                   "response": l["messages"][1]["content"]})
        })
        .collect();
    std::fs::write(dir.join("rules2.json"), json!({"rules": rules}).to_string()).unwrap();
    let sim2 = Sim::start(&[
        "--slots",
        "8",
        "--base-ms",
        "1",
        "--rules",
        s(&dir.join("rules2.json")),
    ]);
    write_jsonl(
        &dir.join("simplified.jsonl"),
        &[
            json!({"prompt": "Write a poem in French."}),
            json!({"prompt": "Write a poem in exactly 3 lines."}),
            json!({"prompt": "Write a friendly note.", "history": note_history()}),
        ],
    );
    let run2 = dir.join("back");
    let data = format!("data={}", s(&dir.join("simplified.jsonl")));
    let url = format!("url={}", sim2.url);
    let curl = format!("composer_url={}", sim2.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif.yaml",
            "--run-dir",
            s(&run2),
            "--cache",
            s(&dir.join("cache.sqlite")),
            "--until",
            "query_r1",
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
            "composer=finetuned",
            "--set",
            "rounds=1",
            "--set",
            "history_expr=history",
        ],
    );
    let back = query(
        &run2,
        "SELECT query, questions, guard FROM query_r1 ORDER BY query, questions",
    );
    assert_eq!(
        back,
        vec![
            json!({"query": "Write a friendly note, all lowercase.", "questions": ["Is it all lowercase?"], "guard": "ok"}),
            json!({"query": "Write a poem in French in exactly 3 lines.", "questions": ["Does the response have exactly 3 lines?"], "guard": "ok"}),
            json!({"query": "Write a poem in French in exactly 3 lines.", "questions": ["Is the response written in French?"], "guard": "ok"}),
        ]
    );
}

/// Recorded answers in UltraComposer's format through `composer: finetuned`, two rounds:
/// fenced and pretty-printed, unfenced, Python literals, quotes left unescaped (the authors'
/// key-splitting fallback), a bare-string question, an empty question list, the authors' two
/// guard strings, an unchanged query and prose.
#[test]
fn finetuned_composer_reads_ultracomposer_answers() {
    let rules = json!({"rules": [
        {"match": r"^\[initial query\]: Describe a sunrise\.$",
         "response": "```json\n{\n    \"augmented query\": \"Describe a sunrise. Use bullet points.\",\n    \"question\": [\"Does the response use bullet points?\"]\n}\n```"},
        {"match": r"^\[initial query\]: Describe a sunrise\. Use bullet points\.$",
         "response": r#"{"augmented query": "Describe a sunrise. Use bullet points. End with a question.", "question": ["Does the response end with a question?"]}"#},
        {"match": r"^\[initial query\]: Explain recursion\.$",
         "response": "{'augmented query': 'Explain recursion in three sentences.', 'question': ['Does the response have exactly three sentences?']}"},
        {"match": r"^\[initial query\]: Explain recursion in three sentences\.$",
         "response": r#"{"augmented query": "Explain recursion in three sentences, titled "Loops".", "question": ["Is the response titled "Loops"?"]}"#},
        {"match": r"^\[initial query\]: Name a fruit\.$",
         "response": r#"{"augmented query": "Name a fruit and explain it to the human evaluator.", "question": ["Is it explained?"]}"#},
        {"match": r"^\[initial query\]: List three colours\.$",
         "response": r#"{"augmented query": "List three colours. Please provide the response in JSON format.", "question": ["Is it JSON?"]}"#},
        {"match": r"^\[initial query\]: Say hello\.$",
         "response": r#"{"augmented query": "Say hello.", "question": ["Does it say hello?"]}"#},
        {"match": r"^\[initial query\]: Tell me a joke\.$", "response": "I would rather not add anything."},
        {"match": r"^\[initial query\]: Summarize the news\.$",
         "response": r#"{"augmented query": "Summarize the news in French.", "question": "Is the summary in French?"}"#},
        {"match": r"^\[initial query\]: Summarize the news in French\.$",
         "response": r#"{"augmented query": "Summarize the news in French, briefly.", "question": []}"#},
    ]});
    let f = fixture_with(rules);
    let record = f.dir.join("requests.jsonl");
    let run = f.dir.join("ft");
    let data = format!("data={}", s(&f.dir.join("in.jsonl")));
    let url = format!("url={}", f.sim.url);
    let curl = format!("composer_url={}", f.sim.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif.yaml",
            "--run-dir",
            s(&run),
            "--cache",
            s(&f.dir.join("cache.sqlite")),
            "--until",
            "augmented",
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
            "composer=finetuned",
            "--set",
            "rounds=2",
        ],
    );
    // Round 1: Describe (fenced), Explain (Python literals), Summarize (a bare-string
    // question) are augmented; Name a fruit and List leak the authors' guard strings; Say
    // hello comes back unchanged; the joke has no JSON. Round 2: the three augmented ones
    // are asked anew (the others' query did not change: cache hits, the same answers);
    // Describe (unfenced) and Explain (unescaped quotes) are augmented again, Summarize's
    // empty question list is `empty`.
    let guards = query(
        &run,
        "SELECT round, guard, count(*) AS n FROM augmented GROUP BY round, guard ORDER BY round, guard",
    );
    assert_eq!(
        guards,
        vec![
            json!({"round": 1, "guard": "leak", "n": 2}),
            json!({"round": 1, "guard": "ok", "n": 3}),
            json!({"round": 1, "guard": "unchanged", "n": 1}),
            json!({"round": 1, "guard": "unparsed", "n": 1}),
            json!({"round": 2, "guard": "empty", "n": 1}),
            json!({"round": 2, "guard": "leak", "n": 2}),
            json!({"round": 2, "guard": "ok", "n": 2}),
            json!({"round": 2, "guard": "unchanged", "n": 1}),
            json!({"round": 2, "guard": "unparsed", "n": 1}),
        ]
    );
    let r2 = query(
        &run,
        "SELECT query, questions, categories FROM query_r2 WHERE cardinality(questions) > 0 ORDER BY query",
    );
    assert_eq!(
        r2,
        vec![
            json!({"query": "Describe a sunrise. Use bullet points. End with a question.",
                   "questions": ["Does the response use bullet points?", "Does the response end with a question?"],
                   "categories": [null, null]}),
            json!({"query": "Explain recursion in three sentences, titled \"Loops\".",
                   "questions": ["Does the response have exactly three sentences?", "Is the response titled \"Loops\"?"],
                   "categories": [null, null]}),
            json!({"query": "Summarize the news in French.", "questions": ["Is the summary in French?"],
                   "categories": [null]}),
        ]
    );
    // 7 composer requests in round 1, 3 in round 2; nothing else was sent (--until).
    let sent = jsonl(&record);
    assert_eq!(sent.len(), 10);
    // Each is one user message, UltraComposer's input, at the authors' temperature, with no
    // response format imposed on the model.
    let first = sent
        .iter()
        .find(|r| r["messages"][0]["content"] == "[initial query]: Describe a sunrise.")
        .expect("the composer got the authors' input");
    assert_eq!(first["messages"].as_array().unwrap().len(), 1);
    assert_eq!(first["messages"][0]["role"], "user");
    assert_eq!(first["temperature"], 0.7);
    assert!(first.get("response_format").is_none());
}

/// The two pass rules on the same judged table (the judge's answers come from the cache the
/// second time). Judge answers changed from `ultraif_rules`: "BAD: it is morning" gets only
/// Question 1, a NO; "BAD: red green" only Question 1, a YES; "BAD2: none" a YES and an
/// unreadable "N/A".
#[test]
fn pass_rules_on_the_same_judged_table() {
    let mut rules = ultraif_rules();
    let extra = [
        json!({"match": r"\[Response\] BAD: it is morning", "response": r#"{"Question 1": {"explanation": "no", "score": "NO"}}"#}),
        json!({"match": r"\[Response\] BAD: red green", "response": r#"{"Question 1": {"explanation": "ok", "score": "YES"}}"#}),
        json!({"match": r"\[Response\] BAD2: none", "response": r#"{"Question 1": {"score": "YES"}, "Question 2": {"score": "N/A"}}"#}),
    ];
    let list = rules["rules"].as_array_mut().unwrap();
    for (i, r) in extra.into_iter().enumerate() {
        list.insert(i, r);
    }
    let f = fixture_with(rules);
    let all_yes = run_ultraif(&f, "all_yes", &[]);
    let sent = f.sim.requests();
    let no_no = run_ultraif(&f, "no_no", &["--set", "pass_rule=no_no"]);
    assert_eq!(
        f.sim.requests(),
        sent,
        "the judge's answers came from the cache"
    );
    let rates = |run: &Path| {
        ok(
            &root(),
            &[
                "sql",
                "--run",
                s(run),
                "--format",
                "jsonl",
                "-f",
                "sql/pass_rates.sql",
                "--param",
                "table=judged",
                "--param",
                "instruction=source_id",
            ],
        )
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect::<Vec<_>>()
    };
    // all_yes. Describe: GOOD pass, BAD unjudged (Q2 missing), BAD2 fail. Explain: 3 pass.
    // List: BAD fail, "red green" and "none" unjudged. Summarize: 2 pass, UNCLEAR unjudged.
    // SFT 3/4 (not List), DPO 1/4 (Describe), responses 6/(6+2), unjudged 4/12.
    assert_eq!(
        rates(&all_yes),
        vec![
            json!({"table": "judged", "instructions": 4, "responses": 12, "pass": 6, "fail": 2,
                    "unjudged": 4, "sft_pass_rate": 0.75, "dpo_pass_rate": 0.25,
                    "response_pass_rate": 0.75, "judge_parse_failure_rate": 0.3333})
        ]
    );
    // no_no. Describe: BAD now fails (a NO). List: "red green" and "none" pass (no NO).
    // SFT 4/4, DPO 2/4 (Describe, List), responses 8/(8+3), unjudged 1/12 (UNCLEAR).
    assert_eq!(
        rates(&no_no),
        vec![
            json!({"table": "judged", "instructions": 4, "responses": 12, "pass": 8, "fail": 3,
                    "unjudged": 1, "sft_pass_rate": 1.0, "dpo_pass_rate": 0.5,
                    "response_pass_rate": 0.7273, "judge_parse_failure_rate": 0.0833})
        ]
    );
    // What reaches SFT and DPO follows: List gains its first passing sample (1), and a pair.
    assert_eq!(count(&all_yes, "sft"), 3);
    assert_eq!(count(&no_no, "sft"), 4);
    assert_eq!(
        query(&no_no, "SELECT response FROM sft WHERE prompt LIKE 'List%'"),
        vec![json!({"response": "BAD: red green"})]
    );
    assert_eq!(count(&all_yes, "dpo"), 1);
    assert_eq!(
        query(&no_no, "SELECT chosen, rejected FROM dpo ORDER BY chosen"),
        vec![
            json!({"chosen": "BAD: red green", "rejected": "BAD: red"}),
            json!({"chosen": "GOOD: gold light over the hills?", "rejected": "BAD: it is morning"}),
        ]
    );
}

/// A multi-turn instruction: the composer reads its history as UltraComposer does, the
/// responder gets the earlier turns as chat messages between the system prompt and the
/// instruction, and the judge, on its own server and model, sees the same turns.
#[test]
fn multi_turn_context_and_a_separate_judge() {
    let tmp = tempdir();
    let dir = tmp.path();
    write_jsonl(
        &dir.join("in.jsonl"),
        &[json!({"prompt": "Now make it rhyme.", "history": [
            {"from": "human", "value": "Write a line about the sea."},
            {"from": "gpt", "value": "The sea is wide."}]})],
    );
    let composer_input = "[history]: [{'from': 'human', 'value': 'Write a line about the sea.'}, {'from': 'gpt', 'value': 'The sea is wide.'}] \n [initial query]: Now make it rhyme.";
    let main_rules = json!({"rules": [
        {"match": format!("^{}$", regex::escape(composer_input)),
         "response": r#"{"augmented query": "Now make it rhyme, in two lines.", "question": ["Does the response have two lines?"]}"#},
        {"match": r"\[Query\] Now make it rhyme, in two lines\.$", "response": "The sea is wide, the sky is blue."},
    ]});
    let judge_rules = json!({"rules": [
        {"match": r"\[Response\] The sea is wide", "response": r#"{"Question 1": {"explanation": "two lines", "score": "YES"}}"#},
    ]});
    std::fs::write(dir.join("main.json"), main_rules.to_string()).unwrap();
    std::fs::write(dir.join("judge.json"), judge_rules.to_string()).unwrap();
    let (main_rec, judge_rec) = (dir.join("main.jsonl"), dir.join("judge.jsonl"));
    let main = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--rules",
        s(&dir.join("main.json")),
        "--record",
        s(&main_rec),
    ]);
    let judge = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--model",
        "judge-model",
        "--rules",
        s(&dir.join("judge.json")),
        "--record",
        s(&judge_rec),
    ]);
    let run = dir.join("run");
    let data = format!("data={}", s(&dir.join("in.jsonl")));
    let url = format!("url={}", main.url);
    let curl = format!("composer_url={}", main.url);
    let jurl = format!("judge_url={}", judge.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif.yaml",
            "--run-dir",
            s(&run),
            "--cache",
            s(&dir.join("cache.sqlite")),
            "--set",
            &data,
            "--set",
            &url,
            "--set",
            &curl,
            "--set",
            &jurl,
            "--set",
            "judge_model=judge-model",
            "--set",
            "model=sim-model",
            "--set",
            "composer_model=sim-model",
            "--set",
            "composer=finetuned",
            "--set",
            "rounds=1",
            "--set",
            "samples=1",
            "--set",
            "history_expr=history",
        ],
    );
    let main_sent = jsonl(&main_rec);
    let judge_sent = jsonl(&judge_rec);
    // The main server: the composer and the responder; the judge server: the judge only.
    assert_eq!(main_sent.len(), 2);
    assert_eq!(judge_sent.len(), 1);
    assert_eq!(
        main_sent[0]["messages"],
        json!([{"role": "user", "content": composer_input}])
    );
    let system = "You are an expert tasked with answering the given query. Please provide a clear and concise response directly, without introductory phrases such as 'What a great question,' 'Here is the answer,' or similar expressions. Focus solely on addressing the query.";
    let instruction = "Now please answer the given query while stritly following its inside constraints.\n[Query] Now make it rhyme, in two lines.";
    assert_eq!(
        main_sent[1]["messages"],
        json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "Write a line about the sea."},
            {"role": "assistant", "content": "The sea is wide."},
            {"role": "user", "content": instruction},
        ])
    );
    assert_eq!(judge_sent[0]["model"], "judge-model");
    let jm = judge_sent[0]["messages"].as_array().unwrap();
    assert_eq!(jm.len(), 3);
    assert_eq!(
        jm[0],
        json!({"role": "user", "content": "Write a line about the sea."})
    );
    assert_eq!(
        jm[1],
        json!({"role": "assistant", "content": "The sea is wide."})
    );
    let prompt = jm[2]["content"].as_str().unwrap();
    assert!(
        prompt.starts_with("You are an expert that is good at judging"),
        "{prompt}"
    );
    assert!(
        prompt.contains("[Query] Now make it rhyme, in two lines.\n[Response] The sea is wide, the sky is blue.\n[Evaluator Question] 1. Does the response have two lines?\n\n\nFor each question"),
        "{prompt}"
    );
    // It passed, and the SFT export writes the same turns before it.
    assert_eq!(
        query(&run, "SELECT verdict FROM judged"),
        vec![json!({"verdict": "pass"})]
    );
    let sft = jsonl(&run.join("out/sft_messages.jsonl"));
    assert_eq!(
        sft[0]["messages"],
        json!([
            {"role": "user", "content": "Write a line about the sea."},
            {"role": "assistant", "content": "The sea is wide."},
            {"role": "user", "content": "Now make it rhyme, in two lines."},
            {"role": "assistant", "content": "The sea is wide, the sky is blue."},
        ])
    );
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

/// Structured output is off by default (the authors' scripts send none); the `local` profile
/// gives the composer a schema of UltraComposer's keys and the judge JSON mode, through
/// params that hold mappings. Seen in the bodies the simulator got (llama.cpp's dialect).
#[test]
fn structured_output_is_a_param_the_local_profile_turns_on() {
    let f = fixture();
    let record = f.dir.join("requests.jsonl");
    let url = format!("url={}", f.sim.url);
    let curl = format!("composer_url={}", f.sim.url);
    let data = format!("data={}", s(&f.dir.join("in.jsonl")));
    let cache = f.dir.join("cache.sqlite");
    for (run, profile) in [("plain", None), ("local", Some("local"))] {
        let before = if record.exists() {
            jsonl(&record).len()
        } else {
            0
        };
        let run_dir = f.dir.join(run);
        let mut args = vec![
            "run",
            "pipelines/ultraif.yaml",
            "--run-dir",
            s(&run_dir),
            "--cache",
            s(&cache),
            "--until",
            "compose_r1",
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
            "rows=1",
        ];
        if let Some(p) = profile {
            args.extend(["--profile", p]);
        }
        ok(&root(), &args);
        let sent = jsonl(&record).split_off(before);
        assert_eq!(sent.len(), 1, "{run}");
        let rf = &sent[0]["response_format"];
        match profile {
            None => assert!(rf.is_null(), "{run}: {rf}"),
            Some(_) => {
                assert_eq!(rf["type"], "json_object");
                assert_eq!(
                    rf["schema"]["required"],
                    json!(["augmented query", "question"])
                );
                assert_eq!(rf["schema"]["properties"]["question"]["type"], "array");
            }
        }
    }
}

/// `--profile paper`: the authors' setup (BambiSheng/UltraIF Preprocessing/augment_query.py
/// and rejection_sampling.py) in one flag. Every expected value below is read off their code:
/// the UltraComposer at temperature 0.7 with no token limit (their offline vLLM ran to the
/// model's context), three rounds, K = 5 responses at 1.0 / top_p 0.95 / 4096 tokens after
/// their system prompt, the judge at 0 / 4096 tokens; a response fails on a NO only
/// (`no_no`); DPO pairs the last passing with the last failing response
/// (merge_query_with_response_dpo overwrites `pos` / `neg` in sample order); SFT takes the
/// first passing response, else the last response whatever its judgement
/// (merge_query_with_response).
#[test]
fn the_paper_profile_is_the_authors_setup_in_one_flag() {
    let rules = json!({"rules": [
        // The composer (UltraComposer's input), rounds 1 and 2; round 3 gets no JSON back.
        {"match": r"^\[initial query\]: Describe a sunrise\.$",
         "response": r#"{"augmented query": "Describe a sunrise. Use bullet points.", "question": ["Does the response use bullet points?"]}"#},
        {"match": r"^\[initial query\]: Describe a sunrise\. Use bullet points\.$",
         "response": r#"{"augmented query": "Describe a sunrise. Use bullet points. End with a question.", "question": ["Does the response end with a question?"]}"#},
        {"match": r"^\[initial query\]: Explain recursion\.$",
         "response": r#"{"augmented query": "Explain recursion in three sentences.", "question": ["Does the response have exactly three sentences?"]}"#},
        // The judge.
        {"match": r"\[Response\] GOOD", "response": ALL_YES},
        {"match": r"\[Response\] BAD2", "response": ALL_NO},
        {"match": r"\[Response\] BAD", "response": FIRST_NO},
        // The responder: five choices each.
        {"match": r"^Now please answer[^\n]*\n\[Query\] Describe a sunrise", "responses": ["GOOD: first?", "BAD: second", "GOOD: third?", "BAD2: fourth", "BAD: fifth"]},
        {"match": r"^Now please answer[^\n]*\n\[Query\] Explain recursion", "responses": ["BAD: one", "BAD2: two", "BAD: three", "BAD: four", "BAD2: five"]},
    ]});
    let f = fixture_with(rules);
    let record = f.dir.join("requests.jsonl");
    let run = f.dir.join("paper");
    let data = format!("data={}", s(&f.dir.join("in.jsonl")));
    let url = format!("url={}", f.sim.url);
    let curl = format!("composer_url={}", f.sim.url);
    ok(
        &root(),
        &[
            "run",
            "pipelines/ultraif.yaml",
            "--profile",
            "paper",
            "--run-dir",
            s(&run),
            "--cache",
            s(&f.dir.join("cache.sqlite")),
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
        ],
    );
    let sent = jsonl(&record);
    let of = |start: &str| -> Vec<&Value> {
        sent.iter()
            .filter(|r| {
                r["messages"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["content"].as_str().unwrap_or_default().starts_with(start))
                })
            })
            .collect()
    };
    let composer = of("[initial query]: ");
    // Round 1: the 7 instructions; round 2: the 2 augmented; round 3: the 1 augmented again.
    assert_eq!(composer.len(), 10);
    for r in &composer {
        assert_eq!(r["temperature"], json!(0.7));
        assert!(r.get("max_tokens").is_none(), "{r}");
    }
    let system = "You are an expert tasked with answering the given query. Please provide a clear and concise response directly, without introductory phrases such as 'What a great question,' 'Here is the answer,' or similar expressions. Focus solely on addressing the query.";
    let responder = of(system);
    // The final round's two augmented instructions, five samples each (n = 5 on vLLM).
    assert_eq!(responder.len(), 2);
    for r in &responder {
        assert_eq!(r["messages"][0]["role"], json!("system"));
        assert_eq!(
            (
                r["temperature"].clone(),
                r["top_p"].clone(),
                r["max_tokens"].clone(),
                r["n"].clone()
            ),
            (json!(1.0), json!(0.95), json!(4096), json!(5))
        );
    }
    let judge = of("You are an expert that is good at judging");
    assert_eq!(judge.len(), 10);
    for r in &judge {
        assert_eq!(
            (r["temperature"].clone(), r["max_tokens"].clone()),
            (json!(0.0), json!(4096))
        );
    }
    // DPO: Describe's last pass (sample 2) and last fail (sample 4); Explain has no pass.
    assert_eq!(
        query(&run, "SELECT prompt, chosen, rejected FROM dpo"),
        vec![
            json!({"prompt": "Describe a sunrise. Use bullet points. End with a question.",
                    "chosen": "GOOD: third?", "rejected": "BAD: fifth"})
        ]
    );
    // SFT: Describe's first pass; Explain, with none, its last response.
    assert_eq!(
        query(
            &run,
            "SELECT prompt, response, sft_source FROM sft ORDER BY prompt"
        ),
        vec![
            json!({"prompt": "Describe a sunrise. Use bullet points. End with a question.",
                   "response": "GOOD: first?", "sft_source": "pass"}),
            json!({"prompt": "Explain recursion in three sentences.",
                   "response": "BAD2: five", "sft_source": "fallback"}),
        ]
    );
}
