//! Release-build benchmark of `pipelines/ultraif.yaml` end to end against `ifloom sim` with a
//! vLLM-like latency model (issue 4: wall time ÷ the lower bound implied by the simulator's
//! capacity ≤ 1.1).
//!
//! `CARGO_TARGET_DIR=~/.cache/ifloom/target-bench cargo bench --bench ultraif` (BENCHMARKS.md).
//!
//! `IFLOOM_ULTRAIF_TARGET=N` runs a target run instead (`--target sft=N`, issue 21; see
//! [`target_run`]).
//!
//! `IFLOOM_ULTRAIF_ROWS` (default 10,000) generated instructions; the pipeline's defaults
//! (3 augmentation rounds, K = 5 responses, `dpo_pair: first`), `max_in_flight` 256. The
//! simulator runs in its own process with `--slots 64 --base-ms 50 --per-token-ms 1` and rules
//! that answer every prompt deterministically: the composer adds one constraint per round, the
//! responder returns 5 distinct responses, the judge answers by how a response starts (all
//! YES, one NO, all NO, or no JSON).
//!
//! **The lower bound.** The simulator holds `min(n, slots)` slots for
//! `base_ms + per_token_ms × tokens of the longest choice` per request, so no client can finish
//! a stage in less than Σ(slots held × hold time) ÷ slots. The llm stages depend on each other
//! (round 1 → 2 → 3 → responses → judge), so the run's bound is the sum of the stages' bounds;
//! the SQL, verdict, dedup and export stages add time no server bound accounts for, and they
//! are in the measured wall time. Every request's tokens come from the run's own tables:
//! `<output>_completion_tokens` for single-choice requests; for the responses stage (K choices
//! in one request) the longest choice's length in words (the simulator's tokens), because the
//! server reports usage for all choices together and the per-sample column is that total ÷ K.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_ifloom");
const SLOTS: u64 = 64;
const BASE_MS: u64 = 50;
const PER_TOKEN_MS: u64 = 1;
const TARGET: f64 = 1.1;
const TOPICS: [&str; 12] = [
    "a sunrise",
    "recursion",
    "the water cycle",
    "a budget",
    "photosynthesis",
    "a job interview",
    "the moon landing",
    "a recipe for bread",
    "climate change",
    "a chess opening",
    "a poem",
    "a city at night",
];

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rules(failing: Option<&str>) -> Value {
    let yes = r#"{"Question 1": {"explanation": "ok", "score": "YES"}, "Question 2": {"explanation": "ok", "score": "YES"}, "Question 3": {"explanation": "ok", "score": "YES"}}"#;
    let one_no = r#"{"Question 1": {"explanation": "ok", "score": "YES"}, "Question 2": {"explanation": "misses it", "score": "NO"}, "Question 3": {"explanation": "ok", "score": "YES"}}"#;
    let all_no = r#"{"Question 1": {"explanation": "no", "score": "NO"}, "Question 2": {"explanation": "no", "score": "NO"}, "Question 3": {"explanation": "no", "score": "NO"}}"#;
    let composed = |extra: &str, q: &str, cat: &str| {
        format!(
            r#"{{"augmented query": "${{q}} {extra}", "question": ["{q}"], "category": "{cat}"}}"#
        )
    };
    json!({"rules": [
        // The judge (the authors' prompt quotes the response after `[Response] `).
        {"match": r"\[Response\] GOOD", "response": yes},
        {"match": r"\[Response\] FAIR", "response": one_no},
        {"match": r"\[Response\] BAD", "response": all_no},
        {"match": r"\[Response\] ", "response": "I am not sure how to judge this one."},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*End with a question\.)\n</query>",
         "response": composed("Use fewer than 80 words.", "Does the response use fewer than 80 words?", "numerical")},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*Use bullet points\.)\n</query>",
         "response": composed("End with a question.", "Does the response end with a question?", "stylistic")},
        {"match": r"(?s)<query>\n(?P<q>[^\n]*)\n</query>",
         "response": composed("Use bullet points.", "Does the response use bullet points?", "format")},
        // Target runs: the instructions whose number ends in one of the `failing` pairs of
        // digits get five bad responses, so they give no SFT row.
        {"match": failing.map_or("^$".to_string(), |f| format!(r"\[Query\] Task \d*({f}):")),
         "responses": ["BAD: one", "BAD: two", "BAD: three", "BAD: four", "BAD: five"]},
        {"match": "(?s).*", "responses": [
            "GOOD: - first point about the topic\n- second point, with a detail?",
            "FAIR: - one point only, written as a long sentence that goes on",
            "BAD: a paragraph with no bullet points at all and no question",
            "GOOD: - short\n- list?",
            "HMM: unsure"
        ]}
    ]})
}

struct Sim {
    child: Child,
    url: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim(dir: &Path, failing: Option<&str>) -> Sim {
    std::fs::write(dir.join("rules.json"), rules(failing).to_string()).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "sim",
            "--port",
            "0",
            "--slots",
            &SLOTS.to_string(),
            "--base-ms",
        ])
        .arg(BASE_MS.to_string())
        .args(["--per-token-ms", &PER_TOKEN_MS.to_string(), "--rules"])
        .arg(dir.join("rules.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no url in {line:?}"))
        .to_string();
    Sim { child, url }
}

fn sql(run: &Path, q: &str) -> Vec<Value> {
    let o = Command::new(BIN)
        .args(["sql", "--format", "jsonl", "--run"])
        .arg(run)
        .arg(q)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{q}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn manifest_ms(run: &Path, stage: &str) -> f64 {
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join(format!("stages/{stage}/manifest.json"))).unwrap(),
    )
    .unwrap();
    m["duration_ms"].as_f64().unwrap()
}

fn main() {
    if let Some(n) = std::env::var("IFLOOM_ULTRAIF_TARGET")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return target_run(n);
    }
    let rows = env_num("IFLOOM_ULTRAIF_ROWS", 10_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data: String = (0..rows)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("Task {i}: explain {} to a twelve-year-old.", TOPICS[i % TOPICS.len()])})
            )
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), data).unwrap();
    let sim = start_sim(dir, None);
    eprintln!(
        "simulator at {} ({SLOTS} slots, {BASE_MS} ms + {PER_TOKEN_MS} ms/token)",
        sim.url
    );
    let run = dir.join("run");
    let root = env!("CARGO_MANIFEST_DIR");
    let sets = [
        format!("data={}", dir.join("in.jsonl").display()),
        format!("url={}", sim.url),
        format!("composer_url={}", sim.url),
        "model=sim-model".to_string(),
        "composer_model=sim-model".to_string(),
        "max_tokens=256".to_string(),
    ];
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "pipelines/ultraif.yaml", "--run-dir"])
        .arg(&run)
        .arg("--cache")
        .arg(dir.join("cache.sqlite"))
        .current_dir(root);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let t = Instant::now();
    let o = cmd.output().unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("ultraif.yaml on {rows} instructions: {wall:.1} s");

    // Per llm stage: slot-milliseconds the simulator had to spend, from the run's tables.
    let hold = |tokens: &str| format!("({BASE_MS} + {PER_TOKEN_MS} * coalesce({tokens}, 0))");
    let mut stages: Vec<(String, u64, f64)> = Vec::new();
    for r in 1..=3 {
        let id = format!("compose_r{r}");
        let q = format!(
            "SELECT count(*) AS n, sum({}) AS work FROM {id} WHERE NOT coalesce(composed_cached, false)",
            hold("composed_completion_tokens")
        );
        let v = &sql(&run, &q)[0];
        stages.push((
            id,
            v["n"].as_u64().unwrap(),
            v["work"].as_f64().unwrap_or(0.0),
        ));
    }
    // K samples go as one request with n = K: K slots for the longest choice. Usage covers
    // all K choices together, so the longest is measured on the text (sim tokens = words).
    let v = &sql(
        &run,
        &format!(
            "SELECT count(*) AS n, sum(k * {}) AS work FROM (SELECT _id, count(*) AS k, max(word_count(response)) AS longest FROM responses WHERE NOT coalesce(response_cached, false) GROUP BY _id)",
            hold("longest")
        ),
    )[0];
    stages.push((
        "responses".into(),
        v["n"].as_u64().unwrap(),
        v["work"].as_f64().unwrap_or(0.0),
    ));
    let v = &sql(
        &run,
        &format!(
            "SELECT count(*) AS n, sum({}) AS work FROM judge WHERE NOT coalesce(judgement_cached, false)",
            hold("judgement_completion_tokens")
        ),
    )[0];
    stages.push((
        "judge".into(),
        v["n"].as_u64().unwrap(),
        v["work"].as_f64().unwrap_or(0.0),
    ));

    let mut md = String::new();
    let _ = writeln!(
        md,
        "### `pipelines/ultraif.yaml` on {rows} instructions against `ifloom sim` ({SLOTS} slots, {BASE_MS} ms + {PER_TOKEN_MS} ms/token)\n\n\
         | llm stage | requests | lower bound s | stage s | stage ÷ bound |\n|---|---|---|---|---|"
    );
    let mut bound = 0.0;
    for (id, n, work) in &stages {
        let b = work / SLOTS as f64 / 1000.0;
        bound += b;
        let s = manifest_ms(&run, id) / 1000.0;
        let _ = writeln!(md, "| {id} | {n} | {b:.1} | {s:.1} | {:.3} |", s / b);
    }
    let counts = sql(
        &run,
        "SELECT (SELECT count(*) FROM judged) AS judged, (SELECT count(*) FROM sft) AS sft, (SELECT count(*) FROM dpo) AS dpo",
    );
    let ratio = wall / bound;
    let _ = writeln!(
        md,
        "\n| whole run | value | target | |\n|---|---|---|---|\n\
         | lower bound (sum of the llm stages' bounds) | {bound:.1} s | | |\n\
         | wall time of `ifloom run` (all 30-odd stages) | {wall:.1} s | | |\n\
         | wall ÷ lower bound | {ratio:.3} | ≤ {TARGET} | {} |\n\
         | judged responses, SFT rows, DPO rows | {} | | |",
        if ratio <= TARGET { "met" } else { "missed" },
        counts[0]
    );
    println!("{md}");
    drop(sim);
}

impl Sim {
    /// `requests_total` of GET /sim/stats (a plain HTTP/1.0 request).
    fn requests(&self) -> u64 {
        use std::io::{Read, Write};
        let base = self
            .url
            .trim_end_matches("/v1")
            .trim_start_matches("http://")
            .to_string();
        let mut s = std::net::TcpStream::connect(&base).unwrap();
        write!(s, "GET /sim/stats HTTP/1.0\r\nHost: {base}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let v: Value = serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
        v["requests_total"].as_u64().unwrap()
    }
}

/// `IFLOOM_ULTRAIF_TARGET=N`: a target run of N SFT rows (`--target sft=N`) over generated
/// instructions of which 30% can pass (the responses to the other 70%, picked by the last two
/// digits of their number in a fixed shuffle, are all judged NO). Figures: requests sent ÷
/// the requests of the smallest prefix that gives N rows (what a run that knew it would
/// send; target ≤ 1.1), and wall time ÷ the capacity bound of those requests (the same
/// slot-time bound as the plain run, over every request in the final tables).
fn target_run(n: usize) {
    // 70 of the 100 two-digit endings fail, in a fixed shuffle (an LCG), so the yield is even
    // over a hundred rows but not row by row.
    let mut endings: Vec<u32> = (0..100).collect();
    let mut x: u64 = 42;
    for i in (1..endings.len()).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        endings.swap(i, (x >> 33) as usize % (i + 1));
    }
    let failing: Vec<String> = endings[..70].iter().map(|e| format!("{e:02}")).collect();
    let rows = env_num("IFLOOM_ULTRAIF_ROWS", n * 5);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data: String = (0..rows)
        .map(|i| {
            format!(
                "{}\n",
                json!({"prompt": format!("Task {i}: explain {} to a twelve-year-old.", TOPICS[i % TOPICS.len()])})
            )
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), data).unwrap();
    let sim = start_sim(dir, Some(&failing.join("|")));
    let run = dir.join("run");
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "pipelines/ultraif.yaml", "--run-dir"])
        .arg(&run)
        .arg("--cache")
        .arg(dir.join("cache.sqlite"))
        .args(["--target", &format!("sft={n}")])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for s in [
        format!("data={}", dir.join("in.jsonl").display()),
        format!("url={}", sim.url),
        format!("composer_url={}", sim.url),
        "model=sim-model".to_string(),
        "composer_model=sim-model".to_string(),
        "max_tokens=256".to_string(),
    ] {
        cmd.args(["--set", &s]);
    }
    let t = Instant::now();
    let o = cmd.output().unwrap();
    let wall = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for l in err.lines().filter(|l| l.contains("target")) {
        eprintln!("{l}");
    }
    let sent = sim.requests();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("target.json")).unwrap()).unwrap();
    let passes = state["passes"].as_array().unwrap();
    let prefix = state["final_prefix"].as_u64().unwrap();
    let max_taken = passes
        .iter()
        .map(|p| p["taken"].as_u64().unwrap())
        .max()
        .unwrap();
    // Every request of the final tables (the smallest prefix), cached or not, and the
    // slot time the simulator needs for them.
    let hold = |tokens: &str| format!("({BASE_MS} + {PER_TOKEN_MS} * coalesce({tokens}, 0))");
    let mut min_requests = 0;
    let mut work = 0.0;
    let mut add = |v: &Value| {
        min_requests += v["n"].as_u64().unwrap();
        work += v["work"].as_f64().unwrap_or(0.0);
    };
    for r in 1..=3 {
        add(&sql(
            &run,
            &format!(
                "SELECT count(*) AS n, sum({}) AS work FROM compose_r{r}",
                hold("composed_completion_tokens")
            ),
        )[0]);
    }
    add(&sql(
        &run,
        &format!(
            "SELECT count(*) AS n, sum(k * {}) AS work FROM (SELECT _id, count(*) AS k, max(word_count(response)) AS longest FROM responses GROUP BY _id)",
            hold("longest")
        ),
    )[0]);
    add(&sql(
        &run,
        &format!(
            "SELECT count(*) AS n, sum({}) AS work FROM judge",
            hold("judgement_completion_tokens")
        ),
    )[0]);
    let sft = sql(&run, "SELECT count(*) AS n FROM sft")[0]["n"]
        .as_u64()
        .unwrap();
    let bound = work / SLOTS as f64 / 1000.0;
    let ratio = sent as f64 / min_requests as f64;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### `ifloom run pipelines/ultraif.yaml --target sft={n}` against `ifloom sim` ({SLOTS} slots, {BASE_MS} ms + {PER_TOKEN_MS} ms/token), {rows} instructions, 30% can pass\n\n\
         | figure | value | target | |\n|---|---|---|---|\n\
         | passes (growth and search), final prefix | {} passes, {prefix} instructions (largest taken {max_taken}) | | |\n\
         | SFT rows in the final table | {sft} | {n} | |\n\
         | requests sent (the simulator's count) | {sent} | | |\n\
         | requests of the final prefix (the minimum) | {min_requests} | | |\n\
         | sent ÷ minimum | {ratio:.3} | ≤ {TARGET} | {} |\n\
         | capacity bound of the minimum's requests | {bound:.1} s | | |\n\
         | wall time of the target run | {wall:.1} s | | |\n\
         | wall ÷ bound | {:.3} | | |",
        passes.len(),
        if ratio <= TARGET { "met" } else { "missed" },
        wall / bound
    );
    println!("{md}");
    drop(sim);
}
