//! Judged benchmarks against `ifloom sim` (issue 24): judge-request throughput of
//! `pipelines/eval_eifbench.yaml` on EIFBench's 8,025 scoring questions (one request each, all
//! independent) and of `pipelines/eval_infobench.yaml` on InfoBench's 2,250 questions (asked
//! one by one per instruction: 15 dependent rounds), both on recorded responses (the replay
//! profile), then `ifloom stats --json` on each finished run.
//!
//! `cargo bench --bench judged` (figures in BENCHMARKS.md).
//!
//! The simulator holds a slot for `base_ms` per request (no per-token time), so its capacity
//! is `slots / base_ms` requests per second. The lower bound of a judge stage is `requests /
//! capacity` (and at least one `base_ms`); for InfoBench's rounds it is the sum over rounds.
//! Reported: the judge stages' time (manifest `duration_ms`), the whole command's wall time,
//! bound ÷ time, and the best of 3 `ifloom stats --json` walls.
//!
//! Environment: `IFLOOM_JUDGED_SLOTS` (default 256), `IFLOOM_JUDGED_BASE_MS` (default 100),
//! `IFLOOM_JUDGED_IN_FLIGHT` (judge window, default 512), `IFLOOM_BENCH_KEEP=1` keeps the
//! temporary folder. Progress on stderr, the Markdown report on stdout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ifloom");

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn start_sim(slots: u64, base_ms: u64, rules: &Path) -> Sim {
    let mut child = Command::new(BIN)
        .args(["sim", "--port", "0", "--slots", &slots.to_string()])
        .args(["--base-ms", &base_ms.to_string(), "--per-token-ms", "0"])
        .args(["--rules", rules.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ifloom sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("sim printed {line:?}"))
        .to_string();
    Sim { child, url }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn stage_s(run: &Path, id: &str) -> (f64, u64) {
    let m = read_json(&run.join(format!("stages/{id}/manifest.json")));
    (
        m["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
        m["counters"]["requests"].as_u64().unwrap_or(0),
    )
}

fn run_pipeline(root: &Path, yaml: &str, run: &Path, cache: &Path, sets: &[String]) -> f64 {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root)
        .args(["run", yaml, "--profile", "replay", "--run-dir"])
        .arg(run)
        .arg("--cache")
        .arg(cache);
    for kv in sets {
        cmd.args(["--set", kv]);
    }
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{yaml}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn stats_best_of_3(run: &Path) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new(BIN)
                .args(["stats", "--json"])
                .arg(run)
                .output()
                .unwrap();
            assert!(out.status.success());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("../shared/data");
    let (slots, base_ms) = (
        env_or("IFLOOM_JUDGED_SLOTS", 256),
        env_or("IFLOOM_JUDGED_BASE_MS", 100),
    );
    let in_flight = env_or("IFLOOM_JUDGED_IN_FLIGHT", 512);
    let capacity = slots as f64 / (base_ms as f64 / 1000.0);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(
        dir.join("rules.json"),
        r#"{"rules": [{"match": "约束", "response": "分析：满足。\n答案：是"}, {"match": ".", "response": "YES"}]}"#,
    )
    .unwrap();
    let sim = start_sim(slots, base_ms, &dir.join("rules.json"));
    let common = [
        format!("judge_url={}", sim.url),
        format!("url={}", sim.url),
        "judge_model=sim-model".to_string(),
        "judge_profile=vllm".to_string(),
        format!("judge_max_in_flight={in_flight}"),
    ];

    // EIFBench: a recorded response per item.
    let items: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(data.join("eifbench/sorted_party100.json")).unwrap(),
    )
    .unwrap();
    let rec: String = items
        .iter()
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"main_id": i["main_id"], "response": format!("回答 {}", i["main_id"])})
            )
        })
        .collect();
    std::fs::write(dir.join("eif_responses.jsonl"), rec).unwrap();
    let mut sets = common.to_vec();
    sets.push(format!(
        "responses={}",
        dir.join("eif_responses.jsonl").display()
    ));
    eprintln!("eifbench: judging 8,025 questions ...");
    let eif_run = dir.join("eif");
    let eif_wall = run_pipeline(
        &root,
        "pipelines/eval_eifbench.yaml",
        &eif_run,
        &dir.join("eif.sqlite"),
        &sets,
    );
    let (eif_judge_s, eif_requests) = stage_s(&eif_run, "judge");
    let eif_bound = (eif_requests as f64 / capacity).max(base_ms as f64 / 1000.0);
    let eif_stats = stats_best_of_3(&eif_run);

    // InfoBench: a recorded response per instruction; rounds of dependent questions.
    let ib: Vec<Value> = std::fs::read_to_string(data.join("infobench/InfoBench.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rec: String = ib
        .iter()
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": i["id"], "response": "A recorded answer."})
            )
        })
        .collect();
    std::fs::write(dir.join("ib_responses.jsonl"), rec).unwrap();
    let mut sets = common.to_vec();
    sets.push(format!(
        "responses={}",
        dir.join("ib_responses.jsonl").display()
    ));
    eprintln!("infobench: judging 2,250 questions in 15 rounds ...");
    let ib_run = dir.join("ib");
    let ib_wall = run_pipeline(
        &root,
        "pipelines/eval_infobench.yaml",
        &ib_run,
        &dir.join("ib.sqlite"),
        &sets,
    );
    let (mut ib_judge_s, mut ib_requests, mut ib_bound) = (0.0, 0u64, 0.0);
    for k in 1..=15 {
        let (s, n) = stage_s(&ib_run, &format!("judge_q{k}"));
        ib_judge_s += s;
        ib_requests += n;
        if n > 0 {
            ib_bound += (n as f64 / capacity).max(base_ms as f64 / 1000.0);
        }
    }
    let ib_stats = stats_best_of_3(&ib_run);

    println!(
        "simulator: {slots} slots x {base_ms} ms = {capacity:.0} requests/s; judge window {in_flight}\n"
    );
    println!(
        "| benchmark | judge requests | bound (s) | judge stages (s) | bound ÷ judge | whole run (s) | stats --json best of 3 (s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, n, bound, judge, wall, st) in [
        (
            "EIFBench",
            eif_requests,
            eif_bound,
            eif_judge_s,
            eif_wall,
            eif_stats,
        ),
        (
            "InfoBench",
            ib_requests,
            ib_bound,
            ib_judge_s,
            ib_wall,
            ib_stats,
        ),
    ] {
        println!(
            "| {name} | {n} | {bound:.2} | {judge:.2} | {:.3} | {wall:.2} | {st:.3} |",
            bound / judge
        );
    }
    if std::env::var("IFLOOM_BENCH_KEEP").is_ok() {
        eprintln!("kept {}", tmp.keep().display());
    }
}
