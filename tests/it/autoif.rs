//! AutoIF (pipelines/autoif.yaml, kinds cross_validate and run_verifiers): real LLM-written
//! verifier answers through a real Python sandbox, hostile functions, a killed run resumed,
//! and the whole method against `ifloom sim` with every count known in advance.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::{root, s, stderr, stdout, tempdir};
use crate::llm::Sim;
use crate::ultraif::query;

fn real_answers() -> PathBuf {
    root().join("../shared/data/autoif/eval_func_rft.jsonl")
}

/// The interpreter of the sandbox venv (`scripts/sandbox-venv.sh`: upstream's nltk and numpy,
/// NLTK's Punkt data), or `None` when it is not installed; under `IFLOOM_REQUIRE_SANDBOX_VENV`
/// (CI sets it) a missing venv is a failure.
pub fn sandbox_venv() -> Option<String> {
    static FOUND: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let o = Command::new("bash")
                .arg(root().join("scripts/sandbox-venv.sh"))
                .arg("python")
                .output()
                .unwrap();
            if o.status.success() {
                return Some(stdout(&o).trim().to_string());
            }
            assert!(
                std::env::var_os("IFLOOM_REQUIRE_SANDBOX_VENV").is_none(),
                "IFLOOM_REQUIRE_SANDBOX_VENV is set but the sandbox venv is not installed: {}",
                stderr(&o).trim()
            );
            eprintln!(
                "the sandbox venv is not installed (scripts/sandbox-venv.sh install); AutoIF runs \
                 here use python3 and the nltk/numpy tests are skipped (set \
                 IFLOOM_REQUIRE_SANDBOX_VENV=1 to make this a failure)"
            );
            None
        })
        .clone()
}

/// `ifloom run` with these args in the project root; returns stdout + stderr, asserting success.
/// Runs of pipelines/autoif.yaml use its default interpreter (the sandbox venv) when it is
/// installed, else `python3`.
fn run(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ifloom"));
    c.args(args).current_dir(root());
    if args.contains(&"pipelines/autoif.yaml")
        && !args.iter().any(|a| a.starts_with("sandbox_python="))
        && sandbox_venv().is_none()
    {
        c.args(["--set", "sandbox_python=python3"]);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "ifloom {args:?}:\n{text}");
    text
}

/// The number after `name ` on the summary line of stage `stage`.
fn counter(output: &str, stage: &str, name: &str) -> i64 {
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{stage} (")))
        .unwrap_or_else(|| panic!("no line for {stage} in\n{output}"));
    let at = line
        .find(&format!(" {name} "))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    line[at + name.len() + 2..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The function source of answer `i` of a line of upstream's file, read the simple way: the
/// text between the json fence, as JSON, `func`, stripped.
fn answer_func(line: &Value, i: usize) -> String {
    let a = line["gpt-answer"][i].as_str().unwrap();
    let body = a
        .split("```json")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let v: Value = serde_json::from_str(body.trim()).unwrap();
    v["func"].as_str().unwrap().trim().to_string()
}

/// Per line: n_parsed, n_functions, n_cases, n_cases_kept, kept answer indexes, accuracies k/n.
type Expected = (i64, i64, i64, i64, &'static [usize], &'static [(i64, i64)]);

#[test]
fn recorded_verifier_answers_cross_validate_as_the_reference_script_does() {
    let tmp = tempdir();
    let run_dir = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    let funcs = format!("funcs={}", s(&real_answers()));
    let args = [
        "run",
        "pipelines/autoif.yaml",
        "--profile",
        "replay_funcs",
        "--set",
        &funcs,
        "--until",
        "verified_instructions",
        "--run-dir",
        s(&run_dir),
        "--cache",
        s(&cache),
    ];
    let out = run(&args, &[]);
    // The figures of Qwen's code/3_cross_validation.py run unchanged on this file (and of an
    // independent re-implementation that agrees with it): read off its output, not ifloom's.
    // Line 2 loses two answers to json.loads (an invalid `\'` escape, a Python `True`), line 4
    // one (Python literals); line 5 has two identical answers (7 distinct functions); every
    // string label ("True") matches no bool return, so those cases are never kept.
    let rows = query(
        &run_dir,
        "SELECT instruction, n_answers, n_parsed, n_compiled, n_functions, n_cases, n_cases_kept, \
         function_accuracy, kept_functions, kept, drop_reason FROM verified_instructions",
    );
    assert_eq!(rows.len(), 5);
    let lines: Vec<Value> = std::fs::read_to_string(real_answers())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (n_parsed, n_functions, n_cases, n_cases_kept, kept answer indexes, accuracies as k/n)
    let expected: [Expected; 5] = [
        (
            8,
            8,
            23,
            16,
            &[2, 5],
            &[
                (9, 16),
                (9, 16),
                (15, 16),
                (9, 16),
                (9, 16),
                (13, 16),
                (11, 16),
                (9, 16),
            ],
        ),
        (
            6,
            6,
            18,
            13,
            &[0, 5, 7],
            &[(13, 13), (5, 13), (5, 13), (13, 13), (7, 13), (13, 13)],
        ),
        (
            8,
            8,
            24,
            21,
            &[],
            &[
                (14, 21),
                (13, 21),
                (12, 21),
                (14, 21),
                (14, 21),
                (11, 21),
                (11, 21),
                (12, 21),
            ],
        ),
        (
            7,
            7,
            17,
            13,
            &[0, 3, 5, 6, 7],
            &[
                (13, 13),
                (9, 13),
                (13, 13),
                (7, 13),
                (13, 13),
                (11, 13),
                (13, 13),
            ],
        ),
        (8, 7, 24, 10, &[0, 1, 2, 3, 4, 6, 7], &[(10, 10); 7]),
    ];
    for (line, (parsed, nf, nc, nk, kept_idx, acc)) in lines.iter().zip(expected) {
        let row = rows
            .iter()
            .find(|r| r["instruction"] == line["instruction"])
            .expect("one row per instruction");
        let full = row;
        assert_eq!(full["n_functions"], json!(nf));
        assert_eq!(full["n_cases"], json!(nc));
        assert_eq!(full["n_answers"], json!(8));
        assert_eq!(full["n_parsed"], json!(parsed));
        assert_eq!(full["n_compiled"], json!(parsed));
        assert_eq!(row["n_cases_kept"], json!(nk));
        let got: Vec<f64> = full["function_accuracy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = acc.iter().map(|(k, n)| *k as f64 / *n as f64).collect();
        assert_eq!(got, want, "{}", line["instruction"]);
        let kept_sources: Vec<String> = kept_idx.iter().map(|i| answer_func(line, *i)).collect();
        let got_sources: Vec<String> = row["kept_functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got_sources, kept_sources, "{}", line["instruction"]);
        assert_eq!(row["kept"], json!(!kept_idx.is_empty()));
        let reason = if kept_idx.is_empty() {
            json!("no_function_passes")
        } else {
            Value::Null
        };
        assert_eq!(row["drop_reason"], reason);
    }
    assert_eq!(counter(&out, "verified_instructions", "answers"), 40);
    assert_eq!(counter(&out, "verified_instructions", "functions_kept"), 17);
    assert_eq!(counter(&out, "verified_instructions", "cases_kept"), 73);
    assert!(counter(&out, "verified_instructions", "calls_executed") > 0);
    // A second run (another run folder, the same cache) executes nothing again.
    let run2 = tmp.path().join("run2");
    let mut args2 = args.to_vec();
    args2[9] = s(&run2);
    let out2 = run(&args2, &[]);
    assert_eq!(counter(&out2, "verified_instructions", "calls_executed"), 0);
    assert_eq!(
        counter(&out2, "verified_instructions", "calls_cached"),
        counter(&out, "verified_instructions", "calls_executed")
    );
}

/// A pipeline with one `run_verifiers` stage over `rows` ({response, functions}).
fn verifier_pipeline(dir: &Path, rows: &[Value], workers: usize) -> PathBuf {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("rows.jsonl"), text).unwrap();
    let p = dir.join("verify.yaml");
    std::fs::write(
        &p,
        format!(
            "name: verify\ninputs:\n  rows: {}\nstages:\n  - id: verified\n    kind: run_verifiers\n    from: rows\n    functions: functions\n    sandbox: {{timeout_s: 1, workers: {workers}}}\n",
            s(&dir.join("rows.jsonl"))
        ),
    )
    .unwrap();
    p
}

#[test]
fn hostile_verifiers_are_contained_recorded_and_the_run_goes_on() {
    let tmp = tempdir();
    let dir = tmp.path();
    let hostile = [
        (
            "def evaluate(r):\n    while True:\n        pass\n",
            "timeout",
        ),
        (
            "def evaluate(r):\n    x = bytearray(10 * 1024**3)\n    return True\n",
            "error",
        ),
        (
            "import socket\ndef evaluate(r):\n    socket.create_connection(('127.0.0.1', 9))\n    return True\n",
            "refused",
        ),
        (
            "def evaluate(r):\n    open('/tmp/ifloom-autoif-escape', 'w').write(r)\n    return True\n",
            "refused",
        ),
        // The key is in ifloom's environment, not in the function's.
        (
            "import os\ndef evaluate(r):\n    return os.environ.get('IFLOOM_TEST_SECRET') is None\n",
            "ok",
        ),
        (
            "import subprocess\ndef evaluate(r):\n    return True\n",
            "not_run",
        ),
        (
            "import os\ndef evaluate(r):\n    os.fork()\n    return True\n",
            "refused",
        ),
        ("import sys\ndef evaluate(r):\n    sys.exit(0)\n", "error"),
        ("import os\ndef evaluate(r):\n    os._exit(0)\n", "crashed"),
        (
            "import os, signal\ndef evaluate(r):\n    os.kill(os.getppid(), signal.SIGKILL)\n",
            "refused",
        ),
        (
            "def evaluate(r):\n    print('x' * 3_000_000)\n    return 1\n",
            "ok",
        ),
        ("def evaluate(r):\n    return 'yes'\n", "ok"),
        ("def evaluate(r)\n    return True\n", "not_run"),
    ];
    let rows: Vec<Value> = hostile
        .iter()
        .map(|(src, _)| json!({"response": "an answer", "functions": [src, "def evaluate(r):\n    return len(r) > 3\n"]}))
        .collect();
    let p = verifier_pipeline(dir, &rows, 2);
    let run_dir = dir.join("run");
    let cache = dir.join("cache.sqlite");
    run(
        &["run", s(&p), "--run-dir", s(&run_dir), "--cache", s(&cache)],
        &[("IFLOOM_TEST_SECRET", "sk-do-not-leak")],
    );
    let got = query(
        &run_dir,
        "SELECT verifier_outcomes, verifier_values, verifier_score, verdict FROM verified",
    );
    assert_eq!(got.len(), hostile.len());
    for ((src, outcome), row) in hostile.iter().zip(&got) {
        assert_eq!(row["verifier_outcomes"], json!([outcome, "ok"]), "{src}");
        // The well-behaved second function still ran after each hostile one: len > 3.
        assert_eq!(row["verifier_values"][1], json!(1), "{src}");
    }
    // Upstream's score: the mean of int(value) over usable values. The env check returns
    // True (no key visible): (1 + 1) / 2; `print` returns 1; 'yes' is not int()-able: 1 / 1.
    assert_eq!(got[4]["verifier_values"], json!([1, 1]));
    assert_eq!(got[11]["verifier_values"], json!([null, 1]));
    assert_eq!(got[11]["verifier_score"], json!(1.0));
    assert!(!Path::new("/tmp/ifloom-autoif-escape").exists());
    // Nothing of the key anywhere in the run folder or the caches.
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(14).any(|w| w == b"sk-do-not-leak"),
            "{}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_killed_verification_resumes_without_running_finished_calls_again() {
    let tmp = tempdir();
    let dir = tmp.path();
    // 40 distinct functions (one job each), 0.2 s per call on one worker: about 8 s in all.
    let rows: Vec<Value> = (0..40)
        .map(|k| {
            json!({"response": "x".repeat(k),
                   "functions": [format!("import time\ndef evaluate(r):\n    time.sleep(0.2)\n    return len(r) > {}\n", 20 + k % 3)]})
        })
        .collect();
    let p = verifier_pipeline(dir, &rows, 1);
    let cache = dir.join("cache.sqlite");
    let run_dir = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["run", s(&p), "--run-dir", s(&run_dir), "--cache", s(&cache)])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some calls are stored, well before the end.
    let python_cache = dir.join("python-cache.sqlite");
    let start = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let stored = rusqlite::Connection::open(&python_cache)
            .and_then(|c| c.query_row("SELECT count(*) FROM results", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0);
        // One compile result and one call per finished job.
        if stored >= 10 || start.elapsed().as_secs() > 60 {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = run(
        &["run", s(&p), "--run-dir", s(&run_dir), "--cache", s(&cache)],
        &[],
    );
    let executed = counter(&out, "verified", "calls_executed");
    let cached = counter(&out, "verified", "calls_cached");
    assert_eq!(executed + cached, 40, "{out}");
    assert!(cached >= 5 && executed < 40, "{out}");
    // The table is what an uninterrupted run makes (worked out here: len(r) > 20 + k % 3).
    let got = query(&run_dir, "SELECT response, verifier_values FROM verified");
    assert_eq!(got.len(), 40);
    for row in got {
        let k = row["response"].as_str().unwrap().len();
        let want = i64::from(k > 20 + k % 3);
        assert_eq!(row["verifier_values"], json!([want]), "k = {k}");
    }
}

// ---- the whole method against the simulator -----------------------------------------------

/// A verifier answer as upstream's models write it: a fenced JSON object.
fn fenced(func: &str, cases: &[(&str, bool)]) -> String {
    let cases: Vec<Value> = cases
        .iter()
        .map(|(i, o)| json!({"input": i, "output": o}))
        .collect();
    format!(
        "Here is the function:\n```json\n{}\n```",
        json!({"func": func, "cases": cases})
    )
}

/// Step 1's answer (the same for both samples).
const SEEDED: &str =
    "- Answer in lowercase letters only.\n- Use no commas.\n- Write exactly three paragraphs.";

fn autoif_rules() -> Value {
    let lower = [
        fenced(
            "def evaluate(response):\n    return response == response.lower()",
            &[
                ("abc", true),
                ("Abc", false),
                ("hello world", true),
                ("HELLO", false),
            ],
        ),
        fenced(
            "def evaluate(response):\n    return not any(c.isupper() for c in response)",
            &[
                ("xyz", true),
                ("xYz", false),
                ("lower case", true),
                ("UPPER", false),
            ],
        ),
        fenced(
            "def evaluate(response):\n    return response.lower() == response",
            &[
                ("q", true),
                ("Q", false),
                ("mixed Case", false),
                ("all good", true),
            ],
        ),
    ];
    let question = [
        fenced(
            "def evaluate(response):\n    return response.rstrip().endswith('?')",
            &[("why?", true), ("no", false), ("ok ? ", true), ("x", false)],
        ),
        fenced(
            "def evaluate(response):\n    return response.strip()[-1:] == '?'",
            &[
                ("what?", true),
                ("what", false),
                ("a?", true),
                ("b.", false),
            ],
        ),
        fenced(
            "def evaluate(response):\n    return response.strip().endswith('?')",
            &[
                ("is it?", true),
                ("it is", false),
                ("c?", true),
                ("d!", false),
            ],
        ),
    ];
    let commas = [
        fenced(
            "def evaluate(response):\n    return response.count(',') == 0",
            &[
                ("a b", true),
                ("a, b", false),
                ("c d", true),
                ("c, d", false),
            ],
        ),
        fenced(
            "def evaluate(response):\n    return ',' not in response",
            &[
                ("e f", true),
                ("e, f", false),
                ("g h", true),
                ("g, h", false),
            ],
        ),
        fenced(
            "def evaluate(response):\n    return response.find(',') < 0",
            &[
                ("i j", true),
                ("i, j", false),
                ("k l", true),
                ("k, l", false),
            ],
        ),
    ];
    // No fence: upstream's parser finds nothing.
    let unfenced = r#"{"func": "def evaluate(response):\n    return True", "cases": []}"#;
    json!({"rules": [
        // Step 1: the seeds come back with one duplicate and two new instructions.
        {"match": "Please provide 50 different instructions",
         "responses": [SEEDED, SEEDED]},
        // Step 2.
        {"match": r"Here is the instruction: Answer in lowercase letters only\.", "responses": lower},
        {"match": r"Here is the instruction: End your response with a question mark\.", "responses": question},
        {"match": r"Here is the instruction: Use no commas\.", "responses": commas},
        {"match": r"Here is the instruction: Write exactly three paragraphs\.", "responses": [unfenced, unfenced, unfenced]},
        // Step 4 (the prompt quotes the functions): the commas answer lists two, not three.
        {"match": r"return response == response\.lower\(\)", "response": r#"["Answer in lowercase.", "Use only lowercase letters.", "Write in lower case."]"#},
        {"match": r"endswith\('\?'\)", "response": r#"Sure: ['Do not end with a question mark.', 'Never ask.', 'No questions.']"#},
        {"match": r"response\.count\(','\)", "response": r#"["Use no commas.", "Avoid commas."]"#},
        // Step 5.
        {"match": r"Premise: End your response", "response": "contradiction"},
        {"match": r"Premise: ", "response": "Entailment."},
        // Step 8 (before step 6's rules: its prompt quotes the query too).
        {"match": r"\[Response\] all lowercase one", "response": "Good.\nScore: 9"},
        {"match": r"\[Response\] also lowercase two", "response": "Great.\nScore: 10"},
        {"match": r"\[Response\] lowercase and fine", "response": "Fine.\nScore: 8"},
        // Step 6: two responses per prompt.
        {"match": r"\[Query\] Tell me about the history of tea please$", "responses": ["all lowercase one", "Not Lowercase"]},
        {"match": r"\[Query\] What is a good name for a small cat\?$", "responses": ["also lowercase two", "lowercase and fine"]},
        {"match": r"\[Query\] Describe the sound of rain on a roof\.$", "responses": ["Capital Start", "Also Capital"]},
    ]})
}

#[test]
fn autoif_end_to_end_against_the_simulator_with_every_count_known() {
    let tmp = tempdir();
    let dir = tmp.path();
    std::fs::write(
        dir.join("seeds.txt"),
        "Answer in lowercase letters only.\nEnd your response with a question mark.\n",
    )
    .unwrap();
    let queries = [
        "Tell me about the history of tea please",
        "What is a good name for a small cat?",
        "Describe the sound of rain on a roof.",
        "Too short.",
        &"very long ".repeat(40),
    ];
    let text: String = queries.iter().map(|q| format!("{}\n", json!(q))).collect();
    std::fs::write(dir.join("queries.jsonl"), text).unwrap();
    std::fs::write(dir.join("rules.json"), autoif_rules().to_string()).unwrap();
    let sim = Sim::start(&[
        "--slots",
        "8",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&dir.join("rules.json")),
    ]);
    let run_dir = dir.join("run");
    let sets = [
        format!("seeds={}", s(&dir.join("seeds.txt"))),
        format!("queries={}", s(&dir.join("queries.jsonl"))),
        format!("url={}", sim.url),
        "model=sim-model".into(),
        "augment_requests=2".into(),
        "func_samples=3".into(),
        "queries_per_instruction=3".into(),
        "max_tokens=64".into(),
    ];
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/autoif.yaml",
        "--run-dir",
        s(&run_dir),
        "--cache",
        s(&cache),
    ];
    for x in &sets {
        args.extend(["--set", x]);
    }
    let out = run(&args, &[]);
    let count = |t: &str| {
        query(&run_dir, &format!("SELECT count(*) AS n FROM {t}"))[0]["n"]
            .as_i64()
            .unwrap()
    };
    // 2 seeds + 3 generated lines (one a seed again) = 4 instructions; "three paragraphs"
    // has no fenced answer; the commas back-translation lists 2 instructions for 3
    // functions; every back-translation of the question-mark one is a contradiction.
    for (table, n) in [
        ("instructions", 4),
        ("verified_instructions", 4),
        ("valid_instructions", 3),
        ("back_translate", 3),
        ("hypotheses", 6),
        ("nli", 6),
        ("consistent_instructions", 1),
        ("query_pool", 3),
        ("prompts", 3),
        ("candidates", 6),
        ("verified_responses", 6),
        ("to_score", 3),
        ("sft_rows", 2),
        ("sft", 2),
        ("dpo", 1),
        ("dpo_clean", 1),
    ] {
        assert_eq!(count(table), n, "{table}\n{out}");
    }
    let dropped = query(
        &run_dir,
        "SELECT instruction, drop_reason, n_functions, n_cases FROM verified_instructions WHERE NOT kept",
    );
    assert_eq!(dropped.len(), 1);
    assert_eq!(
        dropped[0]["instruction"],
        json!("Write exactly three paragraphs.")
    );
    assert_eq!(dropped[0]["drop_reason"], json!("too_few_functions"));
    let lower = query(
        &run_dir,
        "SELECT n_functions, n_cases, n_cases_kept, kept_accuracy FROM verified_instructions \
         WHERE instruction = 'Answer in lowercase letters only.'",
    );
    assert_eq!(lower[0]["n_cases"], json!(12));
    assert_eq!(lower[0]["n_cases_kept"], json!(12));
    assert_eq!(lower[0]["kept_accuracy"], json!([1.0, 1.0, 1.0]));
    // Step 7: the lowercase responses pass, the capitalised ones fail.
    let verdicts = query(
        &run_dir,
        "SELECT response, verdict, verifier_score FROM verified_responses ORDER BY response",
    );
    let passing: Vec<&str> = verdicts
        .iter()
        .filter(|r| r["verdict"] == json!("pass"))
        .map(|r| r["response"].as_str().unwrap())
        .collect();
    assert_eq!(
        passing,
        [
            "all lowercase one",
            "also lowercase two",
            "lowercase and fine"
        ]
    );
    // Step 9: upstream's SFT prompt (query, then instruction; Qwen keeps the double period).
    let sft = query(
        &run_dir,
        "SELECT prompt, response, quality, query, instruction_id FROM sft ORDER BY quality",
    );
    assert_eq!(
        sft[0]["prompt"],
        json!("Tell me about the history of tea please. Answer in lowercase letters only..")
    );
    assert_eq!(sft[0]["response"], json!("all lowercase one"));
    assert_eq!(
        sft[1]["prompt"],
        json!("What is a good name for a small cat? Answer in lowercase letters only..")
    );
    assert_eq!(sft[1]["quality"], json!(10));
    // Lineage: every SFT row names its instruction and query.
    let ids = query(&run_dir, "SELECT _id FROM consistent_instructions");
    assert!(sft.iter().all(|r| r["instruction_id"] == ids[0]["_id"]));
    let dpo = query(&run_dir, "SELECT prompt, chosen, rejected FROM dpo_clean");
    // Upstream's DPO samples (sample_data/dpo_query_w_funcs.jsonl): the instruction, a space,
    // the query as written, then '.' (even after '?' or '.').
    assert_eq!(
        dpo[0]["prompt"],
        json!("Answer in lowercase letters only. Tell me about the history of tea please.")
    );
    assert_eq!(dpo[0]["chosen"], json!("all lowercase one"));
    assert_eq!(dpo[0]["rejected"], json!("Not Lowercase"));
    // The exports read back.
    let alpaca = std::fs::read_to_string(run_dir.join("out/autoif_sft.jsonl")).unwrap();
    let first: Value = serde_json::from_str(alpaca.lines().next().unwrap()).unwrap();
    assert!(first.get("instruction").is_some() && first.get("output").is_some());
    assert_eq!(alpaca.lines().count(), 2);
    let trl = std::fs::read_to_string(run_dir.join("out/autoif_dpo_trl.jsonl")).unwrap();
    assert_eq!(trl.lines().count(), 1);
}

// ---- upstream's namespace: nltk and numpy ---------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// Per instruction of a replay: its row of `verified_instructions`.
fn verified(run_dir: &Path) -> Vec<Value> {
    query(
        run_dir,
        "SELECT instruction, n_answers, n_parsed, n_functions, n_cases, n_cases_kept, \
         function_accuracy, kept_functions, kept_accuracy, kept, drop_reason, answer_status \
         FROM verified_instructions ORDER BY instruction",
    )
}

fn replay(fixture_file: &Path, run_dir: &Path, cache: &Path, extra: &[&str]) -> String {
    let funcs = format!("funcs={}", s(fixture_file));
    let mut args = vec![
        "run",
        "pipelines/autoif.yaml",
        "--profile",
        "replay_funcs",
        "--set",
        &funcs,
        "--until",
        "verified_instructions",
        "--run-dir",
        s(run_dir),
        "--cache",
        s(cache),
    ];
    args.extend_from_slice(extra);
    run(&args, &[])
}

/// A list of floats of a row, each rounded to 12 decimals (serde_json's float parsing can be
/// a unit in the last place off Python's `repr`).
fn fractions(row: &Value, col: &str) -> Vec<f64> {
    row[col]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| round12(v.as_f64().unwrap()))
        .collect()
}

fn round12(x: f64) -> f64 {
    (x * 1e12).round() / 1e12
}

/// tests/fixtures/autoif_nltk_numpy.jsonl: two instructions whose verifiers count sentences
/// with `nltk.sent_tokenize` and average with `np.mean`, neither imported, as LLMs write them.
/// The expected figures are those of Qwen's code/3_cross_validation.py run unchanged on that
/// file (nltk 3.9.2, numpy 1.26.4, punkt_tab): every function kept; the sentence counters are
/// right on 11 of 12 cases ("e.g. this is one sentence." is two sentences to Punkt), the
/// regex splitter on 10 (it cuts "Mr." and "Dr."); np.mean's `nan < 6` on "" is numpy's
/// False, which equals the label False.
#[test]
fn nltk_and_numpy_verifiers_cross_validate_as_upstream_with_the_sandbox_venv() {
    let Some(venv) = sandbox_venv() else { return };
    let tmp = tempdir();
    let run_dir = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    let file = fixture("autoif_nltk_numpy.jsonl");
    let out = replay(&file, &run_dir, &cache, &[]);
    let rows = verified(&run_dir);
    assert_eq!(rows.len(), 2, "{out}");
    let avg = &rows[1];
    assert_eq!(
        avg["instruction"],
        json!("Keep the average word length under six letters.")
    );
    assert_eq!(avg["n_functions"], json!(3));
    // 12 cases, ("", False) twice: 11 distinct, all kept.
    assert_eq!(
        (avg["n_cases"].clone(), avg["n_cases_kept"].clone()),
        (json!(11), json!(11))
    );
    // First-seen order: np.mean, the plain average (ZeroDivisionError on ""), the np.array one.
    let want = [10.0 / 11.0, 9.0 / 11.0, 1.0].map(round12);
    assert_eq!(fractions(avg, "function_accuracy"), want);
    assert_eq!(avg["kept"], json!(true));
    let two = &rows[0];
    assert_eq!(
        two["instruction"],
        json!("Answer in exactly two sentences.")
    );
    assert_eq!(
        (two["n_cases"].clone(), two["n_cases_kept"].clone()),
        (json!(12), json!(12))
    );
    let want = [11.0 / 12.0, 11.0 / 12.0, 10.0 / 12.0].map(round12);
    assert_eq!(fractions(two, "function_accuracy"), want);
    assert_eq!(two["kept_functions"].as_array().unwrap().len(), 3);
    assert_eq!(counter(&out, "verified_instructions", "functions_kept"), 6);
    // The same answers on a Python without nltk and numpy: the functions that use them raise
    // NameError on every case, so only the regex splitter keeps cases (its 10 of 12), and the
    // nltk functions score 0 and are dropped: what ifloom did before the venv.
    let run_bare = tmp.path().join("bare");
    let bare = replay(
        &file,
        &run_bare,
        &cache,
        &["--set", "sandbox_python=python3"],
    );
    let two_bare = &verified(&run_bare)[0];
    assert_eq!(two_bare["n_cases_kept"], json!(10), "{bare}");
    assert_eq!(fractions(two_bare, "function_accuracy"), [0.0, 0.0, 1.0]);
    assert_eq!(two_bare["kept_functions"].as_array().unwrap().len(), 1);
    // The venv is named by path as well as by `sandbox-venv`: the same figures.
    let run_path = tmp.path().join("by-path");
    let python = format!("sandbox_python={venv}");
    replay(&file, &run_path, &cache, &["--set", &python]);
    assert_eq!(verified(&run_path), rows);
}

/// tests/fixtures/autoif_flywheel.jsonl through `cross_validation: flywheel`. Expected: the
/// Post-Training-Data-Flywheel's IF-generation/code/3_cross_validation.py run unchanged on the
/// same answers (in its API-result format): "Use no commas." keeps 4 functions (the answer with
/// raw line breaks in its JSON string, repaired by col_formatter; its duplicate; the answer
/// without `cases`; a fourth), all at 1.0, and 10 of 11 cases; "Answer in capital letters
/// only." keeps its five identical answers (no dedup) and 10 cases. Qwen's script crashes on
/// the answer without `cases` (KeyError); ifloom's `qwen` mode drops it (`no_cases`), fails
/// the raw line breaks (`json_error`), and both instructions fall below 3 distinct functions.
#[test]
fn the_flywheel_reference_repairs_json_keeps_functions_without_cases_and_dedups_nothing() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache.sqlite");
    let file = fixture("autoif_flywheel.jsonl");
    let fly = tmp.path().join("flywheel");
    let out = replay(&file, &fly, &cache, &["--set", "cross_validation=flywheel"]);
    let rows = verified(&fly);
    assert_eq!(rows.len(), 2, "{out}");
    let caps = &rows[0];
    assert_eq!(caps["n_functions"], json!(5));
    assert_eq!(
        (caps["n_cases"].clone(), caps["n_cases_kept"].clone()),
        (json!(10), json!(10))
    );
    assert_eq!(fractions(caps, "kept_accuracy"), [1.0; 5]);
    let commas = &rows[1];
    assert_eq!(commas["instruction"], json!("Use no commas."));
    assert_eq!(commas["n_parsed"], json!(4));
    assert_eq!(
        commas["answer_status"],
        json!(["compiled", "compiled", "compiled", "compiled"])
    );
    assert_eq!(commas["n_functions"], json!(4));
    assert_eq!(
        (commas["n_cases"].clone(), commas["n_cases_kept"].clone()),
        (json!(11), json!(10))
    );
    assert_eq!(fractions(commas, "kept_accuracy"), [1.0; 4]);
    let kept: Vec<&str> = commas["kept_functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        kept,
        [
            "def evaluate(response):\n    return ',' not in response",
            "def evaluate(response):\n    return ',' not in response",
            "def evaluate(response):\n    return response.count(',') == 0",
            "def evaluate(response):\n    return response.find(',') == -1",
        ]
    );
    let qwen = tmp.path().join("qwen");
    replay(&file, &qwen, &cache, &[]);
    let rows = verified(&qwen);
    assert_eq!(rows[0]["n_functions"], json!(1));
    assert_eq!(rows[0]["drop_reason"], json!("too_few_functions"));
    assert_eq!(
        rows[1]["answer_status"],
        json!(["json_error", "compiled", "no_cases", "compiled"])
    );
    assert_eq!(rows[1]["drop_reason"], json!("too_few_functions"));
}

/// Step 5 with an NLI classifier (`nli: classifier`), the simulator serving TEI's /predict or
/// vLLM's /classify. Upstream's rule decides: the label is the first maximum of
/// `round(p * 100, 1)` over (entailment, neutral, contradiction). The question-mark
/// instruction's pairs are contradictions (0.9); the lowercase one's probabilities are
/// (0.40001, 0.19995, 0.40004): contradiction is higher, but both round to 40.0 and
/// entailment comes first, so it stays. Every count downstream is the LLM judge run's.
#[test]
fn an_nli_classifier_over_tei_or_vllm_drops_contradictions_by_upstreams_rule() {
    for api in ["tei", "vllm"] {
        let tmp = tempdir();
        let dir = tmp.path();
        std::fs::write(
            dir.join("seeds.txt"),
            "Answer in lowercase letters only.\nEnd your response with a question mark.\n",
        )
        .unwrap();
        let queries = [
            "Tell me about the history of tea please",
            "What is a good name for a small cat?",
            "Describe the sound of rain on a roof.",
        ];
        let text: String = queries.iter().map(|q| format!("{}\n", json!(q))).collect();
        std::fs::write(dir.join("queries.jsonl"), text).unwrap();
        let mut rules = autoif_rules();
        let classifier = [
            json!({"match": r"^End your response with a question mark\.(\n| \[SEP\] )", "response": "contradiction"}),
            json!({"match": r"^Answer in lowercase letters only\.(\n| \[SEP\] )", "json": [0.40001, 0.19995, 0.40004]}),
        ];
        let list = rules["rules"].as_array_mut().unwrap();
        for (i, r) in classifier.into_iter().enumerate() {
            list.insert(i, r);
        }
        std::fs::write(dir.join("rules.json"), rules.to_string()).unwrap();
        let record = dir.join("requests.jsonl");
        let sim = Sim::start(&[
            "--slots",
            "8",
            "--base-ms",
            "1",
            "--per-token-ms",
            "0",
            "--model",
            "sim-model",
            "--rules",
            s(&dir.join("rules.json")),
            "--record",
            s(&record),
        ]);
        let root_url = sim.url.trim_end_matches("/v1").to_string();
        let run_dir = dir.join("run");
        let sets = [
            format!("seeds={}", s(&dir.join("seeds.txt"))),
            format!("queries={}", s(&dir.join("queries.jsonl"))),
            format!("url={}", sim.url),
            "model=sim-model".into(),
            "augment_requests=2".into(),
            "func_samples=3".into(),
            "queries_per_instruction=3".into(),
            "max_tokens=64".into(),
            "nli=classifier".into(),
            format!("nli_url={root_url}"),
            format!("nli_api={api}"),
            "nli_model=sim-model".into(),
        ];
        let cache = dir.join("cache.sqlite");
        let mut args = vec![
            "run",
            "pipelines/autoif.yaml",
            "--run-dir",
            s(&run_dir),
            "--cache",
            s(&cache),
        ];
        for x in &sets {
            args.extend(["--set", x]);
        }
        let out = run(&args, &[]);
        let count = |t: &str| {
            query(&run_dir, &format!("SELECT count(*) AS n FROM {t}"))[0]["n"]
                .as_i64()
                .unwrap()
        };
        for (table, n) in [
            ("hypotheses", 6),
            ("nli", 0),
            ("nli_classified", 6),
            ("consistent_instructions", 1),
            ("sft", 2),
            ("dpo_clean", 1),
        ] {
            assert_eq!(count(table), n, "{api} {table}\n{out}");
        }
        let labels = query(
            &run_dir,
            "SELECT instruction, nli_label, count(*) AS n FROM nli_classified \
             GROUP BY instruction, nli_label ORDER BY instruction",
        );
        assert_eq!(
            labels,
            [
                json!({"instruction": "Answer in lowercase letters only.", "nli_label": "entailment", "n": 3}),
                json!({"instruction": "End your response with a question mark.", "nli_label": "contradiction", "n": 3}),
            ],
            "{api}"
        );
        // One batched request with the six pairs, in the API's own shape.
        let sent: Vec<Value> = std::fs::read_to_string(&record)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &Value| v.get("inputs").is_some() || v.get("input").is_some())
            .collect();
        assert_eq!(sent.len(), 1, "{api}");
        let first = match api {
            "tei" => {
                assert_eq!(sent[0]["truncate"], json!(true));
                sent[0]["inputs"][0].clone()
            }
            _ => {
                assert_eq!(sent[0]["model"], json!("sim-model"));
                sent[0]["input"][0].clone()
            }
        };
        let n = if api == "tei" {
            &sent[0]["inputs"]
        } else {
            &sent[0]["input"]
        };
        assert_eq!(n.as_array().unwrap().len(), 6);
        if api == "tei" {
            assert!(first.as_array().is_some_and(|p| p.len() == 2), "{first}");
        } else {
            assert!(first.as_str().unwrap().contains(" [SEP] "), "{first}");
        }
        if api != "tei" {
            continue;
        }
        // A rerun (new run folder, same cache) sends nothing to the classifier.
        let run2 = dir.join("run2");
        let mut args2 = args.clone();
        args2[3] = s(&run2);
        let out2 = run(&args2, &[]);
        assert_eq!(counter(&out2, "nli_classified", "requests"), 0, "{out2}");
        assert_eq!(counter(&out2, "nli_classified", "cache_hits"), 6, "{out2}");
    }
}

/// `kind: nli_classifier` on its own: 5 pairs in batches of 2 against a simulator that fails
/// half its answers with a 500 (retried until answered), labels by the rules; then a server
/// that always fails stops the stage with the reason, and a bad `url` is a validation error
/// at its line.
#[test]
fn the_nli_classifier_retries_failures_and_stops_with_the_reason_when_they_persist() {
    let tmp = tempdir();
    let dir = tmp.path();
    let pairs = [
        ("The sky is blue.", "The sky has a colour."),
        ("The sky is blue.", "The sky is green."),
        ("Use no commas.", "Avoid commas."),
        ("Use no commas.", "Write long sentences."),
        ("Use no commas.", "Use many commas."),
    ];
    let rows: String = pairs
        .iter()
        .map(|(p, h)| format!("{}\n", json!({"premise": p, "hypothesis": h})))
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), rows).unwrap();
    std::fs::write(
        dir.join("rules.json"),
        json!({"rules": [
            {"match": "\n.*(green|many)", "response": "contradiction"},
            {"match": "\nWrite long", "json": [0.2, 0.7, 0.1]},
            {"match": "\n", "response": "entailment"},
        ]})
        .to_string(),
    )
    .unwrap();
    let pipeline = |url: &str, retries: u32| {
        let p = dir.join("nli.yaml");
        std::fs::write(
            &p,
            format!(
                "name: nli\ninputs:\n  pairs: {}\nstages:\n  - id: labelled\n    kind: nli_classifier\n    from: pairs\n    url: {url}\n    batch_size: 2\n    max_retries: {retries}\n",
                s(&dir.join("pairs.jsonl"))
            ),
        )
        .unwrap();
        p
    };
    let flaky = Sim::start(&[
        "--fault-500",
        "0.5",
        "--seed",
        "3",
        "--rules",
        s(&dir.join("rules.json")),
    ]);
    let p = pipeline(flaky.url.trim_end_matches("/v1"), 10);
    let run_dir = dir.join("run");
    let cache = dir.join("cache.sqlite");
    let out = run(
        &["run", s(&p), "--run-dir", s(&run_dir), "--cache", s(&cache)],
        &[],
    );
    assert_eq!(counter(&out, "labelled", "requests"), 3, "{out}");
    let retries = counter(&out, "labelled", "retries");
    // Every request the simulator counted beyond the 3 batches was a retry of a 500.
    assert_eq!(flaky.requests() as i64, 3 + retries, "{out}");
    assert!(retries > 0, "seed 3 draws some 500s: {out}");
    let got = query(
        &run_dir,
        "SELECT hypothesis, nli_label FROM labelled ORDER BY hypothesis",
    );
    let labels: Vec<(&str, &str)> = got
        .iter()
        .map(|r| {
            (
                r["hypothesis"].as_str().unwrap(),
                r["nli_label"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        labels,
        [
            ("Avoid commas.", "entailment"),
            ("The sky has a colour.", "entailment"),
            ("The sky is green.", "contradiction"),
            ("Use many commas.", "contradiction"),
            ("Write long sentences.", "neutral"),
        ]
    );
    // A server that always fails: the stage stops and says why; nothing was cached for it.
    let down = Sim::start(&["--fault-500", "1", "--rules", s(&dir.join("rules.json"))]);
    let p = pipeline(down.url.trim_end_matches("/v1"), 1);
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args([
            "run",
            s(&p),
            "--run-dir",
            s(&dir.join("run-down")),
            "--cache",
            s(&dir.join("other.sqlite")),
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("3 of 3 classification requests")
            && err.contains("HTTP 500")
            && err.contains("gave up after 2 attempts"),
        "{err}"
    );
    // A URL without a scheme is a validation error at its line.
    let p = pipeline("127.0.0.1:8080", 1);
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["validate", s(&p)])
        .current_dir(root())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("nli.yaml:8:10:") && err.contains("url must start with http://"),
        "{err}"
    );
}
