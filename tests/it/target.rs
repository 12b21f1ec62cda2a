//! `ifloom run --target TABLE=N`: runs that stop at a target, against `ifloom sim` over real
//! HTTP, with every pass, row count and request count worked out by hand from the rules.
//!
//! The pipeline: 200 prompts `question number i` (i = 0..199, in file order); one llm stage
//! `ask` whose rule answers `keep` to the numbers ending in 0 or 5 and `drop` to the others;
//! a sql stage `kept` with the `keep` rows. The first n input rows give ceil(n / 5) kept rows
//! and send n requests (one per row, each once: the cache answers the rest).
//!
//! The passes for `--target kept=30` (N = 30, 200 rows available), from `target::next_step`:
//! - 3 rows (N/10) → 1 kept; yield 1/3;
//! - 12: the 29 missing rows plus 2·√29 at 1/3 is 120 more rows, capped at ×4 → 3 kept;
//! - 48: (27 + 2·√27) / (3/12) = 150 more, capped at ×4 → 10 kept;
//! - 187: 48 + ceil((20 + 2·√20) / (10/48)) = 48 + 139 → 38 kept: reached, 187 requests;
//! - the search back, all cached: 145 (interpolated between 48 and 187, aimed at 29.5 rows:
//!   48 + ceil(19.5 × 139 / 28) → 29 kept), 148 (interpolated: 145 + ceil(0.5 × 42 / 9) → 30),
//!   146 (bisected, 1 target row left in the bracket: 30) → 146 is the smallest;
//! - a final pass on 146 rows: `kept` holds 30 rows (0, 5, ..., 145).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{ifloom, run_cmd, s, sql_rows, stderr, tempdir};
use crate::llm::Sim;

const PASSES: [u64; 7] = [3, 12, 48, 187, 145, 148, 146];

fn rules(dir: &Path) -> PathBuf {
    let p = dir.join("rules.json");
    std::fs::write(
        &p,
        serde_json::json!({"rules": [
            {"match": "number \\d*[05]$", "response": "keep"},
            {"match": "number \\d+$", "response": "drop"}
        ]})
        .to_string(),
    )
    .unwrap();
    p
}

fn pipeline(dir: &Path, url: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let rows: String = (0..200)
        .map(|i| format!("{{\"prompt\": \"question number {i}\"}}\n"))
        .collect();
    std::fs::write(dir.join("data/in.jsonl"), rows).unwrap();
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "name: target\ninputs:\n  src: data/in.jsonl\nstages:\n  - id: ask\n    kind: llm\n    from: src\n    endpoints: [\"{url}\"]\n    max_in_flight: 2\n    model: sim-model\n    messages:\n      - role: user\n        content: \"{{{{ prompt }}}}\"\n    params: {{max_tokens: 8}}\n  - id: kept\n    kind: sql\n    from: ask\n    query: SELECT _id, prompt, response FROM ask WHERE response = 'keep'\n"
        ),
    )
    .unwrap();
    p
}

fn state(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("target.json")).unwrap()).unwrap()
}

fn prefixes(run: &Path) -> Vec<u64> {
    state(run)["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prefix"].as_u64().unwrap())
        .collect()
}

/// The numbers of the prompts in `kept`, sorted.
fn kept(dir: &Path, run: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = sql_rows(dir, run, "SELECT prompt FROM kept")
        .iter()
        .map(|r| r[0].rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn target_run_stops_at_exactly_n_rows_with_the_requests_worked_out() {
    let tmp = tempdir();
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--rules",
        s(&rules(tmp.path())),
    ]);
    let p = pipeline(tmp.path(), &sim.url);
    let run = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .args(["--target", "kept=30"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(prefixes(&run), PASSES, "{err}");
    assert_eq!(state(&run)["status"], "reached");
    assert_eq!(state(&run)["final_prefix"], 146);
    // Every table is the pipeline's output on the first 146 rows.
    assert_eq!(
        kept(tmp.path(), &run),
        (0..30).map(|k| 5 * k).collect::<Vec<_>>()
    );
    assert_eq!(
        sql_rows(tmp.path(), &run, "SELECT count(*) FROM src")[0][0],
        "146"
    );
    assert_eq!(
        sql_rows(tmp.path(), &run, "SELECT count(*) FROM ask")[0][0],
        "146"
    );
    // Each of the first 187 prompts was sent once; the search and the final pass sent none.
    let stats = sim.stats();
    assert_eq!(stats["requests_total"], 187, "{err}");
    assert!(
        stats["per_request"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v == 1)
    );
    let sent: Vec<u64> = state(&run)["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sent"].as_u64().unwrap())
        .collect();
    assert_eq!(sent, [3, 9, 36, 139, 0, 0, 0]);
    // Progress per pass: target rows, input rows, requests and the projection.
    assert!(
        err.contains("target kept: 10 / 30 rows · input 48 / 200 · requests 48 (projected 144)"),
        "{err}"
    );
    assert!(
        err.contains(
            "target run reached: kept has 30 rows (target 30) from the first 146 input rows"
        ),
        "{err}"
    );
    // The same command again: the last pass's tables are reused, nothing is sent.
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .args(["--target", "kept=30"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sim.stats()["requests_total"], 187);
    assert_eq!(kept(tmp.path(), &run).len(), 30);
    // A higher target goes on from the recorded passes.
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .args(["--target", "kept=38"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sim.stats()["requests_total"], 187, "{}", stderr(&o));
    assert_eq!(kept(tmp.path(), &run).len(), 38);
}

#[test]
fn target_run_stops_before_the_pass_that_would_pass_the_budget() {
    let tmp = tempdir();
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--rules",
        s(&rules(tmp.path())),
    ]);
    let p = pipeline(tmp.path(), &sim.url);
    let run = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    // 3 rows (3 requests), 12 (9 more), then 48 would make 48 > 40: the pass is cut to the
    // 28 rows the budget has left (40 rows, 8 kept), after which nothing fits.
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .args(["--target", "kept=30", "--max-requests", "40"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(prefixes(&run), [3, 12, 40], "{err}");
    assert_eq!(state(&run)["status"], "budget");
    assert_eq!(sim.stats()["requests_total"], 40);
    assert_eq!(
        kept(tmp.path(), &run),
        (0..8).map(|k| 5 * k).collect::<Vec<_>>()
    );
    assert!(
        err.contains("requests 40 (projected 150 of budget 40)")
            && err.contains(
                "stopped at the request budget: kept has 8 of 30 rows from the first 40 input rows"
            ),
        "{err}"
    );
}

#[test]
fn target_run_on_an_input_that_runs_out_ends_with_the_whole_input() {
    let tmp = tempdir();
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--rules",
        s(&rules(tmp.path())),
    ]);
    let p = pipeline(tmp.path(), &sim.url);
    let run = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    // 200 rows give 40 kept rows, short of 100: 10 rows (2 kept), 40 (×4: 8 kept), 160
    // (×4: 32 kept), then all 200 (the 68 missing rows need more than there are).
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .args(["--target", "kept=100"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(prefixes(&run), [10, 40, 160, 200], "{err}");
    assert_eq!(state(&run)["status"], "exhausted");
    assert_eq!(kept(tmp.path(), &run).len(), 40);
    assert_eq!(sim.stats()["requests_total"], 200);
    assert!(
        err.contains("input exhausted: kept has 40 of 100 rows from all 200 input rows"),
        "{err}"
    );
}

#[test]
fn killed_target_run_resumes_to_the_tables_of_an_uninterrupted_one() {
    let tmp = tempdir();
    let rules = rules(tmp.path());
    // Uninterrupted, on its own simulator and cache.
    let clean_sim = Sim::start(&["--slots", "4", "--base-ms", "1", "--rules", s(&rules)]);
    let clean_dir = tmp.path().join("clean");
    std::fs::create_dir_all(&clean_dir).unwrap();
    let p = pipeline(&clean_dir, &clean_sim.url);
    let clean = clean_dir.join("run");
    let o = run_cmd(&clean_dir, &p, &clean, &clean_dir.join("cache.sqlite"))
        .args(["--target", "kept=30"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Slow (2 slots × 20 ms, 2 in flight: ~100 requests/s), killed in the fourth pass (the
    // first three send 48 requests, the fourth 139).
    let sim = Sim::start(&["--slots", "2", "--base-ms", "20", "--rules", s(&rules)]);
    let dir = tmp.path().join("killed");
    std::fs::create_dir_all(&dir).unwrap();
    let p = pipeline(&dir, &sim.url);
    let run = dir.join("run");
    let cache = dir.join("cache.sqlite");
    let mut child = run_cmd(&dir, &p, &run, &cache)
        .args(["--target", "kept=30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while sim.requests() < 80 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL: no handler runs.
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = sim.requests();
    assert!((80..187).contains(&at_kill), "killed at {at_kill}");
    assert_eq!(prefixes(&run), [3, 12, 48]);
    let o = run_cmd(&dir, &p, &run, &cache)
        .args(["--target", "kept=30"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resumed after 3 recorded pass(es)"), "{err}");
    // The same passes and the same tables as the uninterrupted run.
    assert_eq!(prefixes(&run), PASSES);
    assert_eq!(kept(&dir, &run), kept(&clean_dir, &clean));
    let q = "SELECT _id, prompt, response FROM ask ORDER BY _id";
    assert_eq!(sql_rows(&dir, &run, q), sql_rows(&clean_dir, &clean, q));
    // Finished work is not repeated: every prompt reached the server once, apart from the
    // few in flight (2) or not yet committed to the cache at the kill.
    let stats = sim.stats();
    let per = stats["per_request"].as_object().unwrap();
    assert_eq!(per.len(), 187);
    let repeats: u64 = per.values().map(|v| v.as_u64().unwrap() - 1).sum();
    assert!(repeats <= 8, "{repeats} requests sent twice");
}

#[test]
fn bad_target_flags_are_reported_together() {
    let tmp = tempdir();
    let p = pipeline(tmp.path(), "http://127.0.0.1:9/v1");
    let run = tmp.path().join("run");
    let o = ifloom(
        tmp.path(),
        &[
            "run",
            s(&p),
            "--run-dir",
            s(&run),
            "--target",
            "kepts=0",
            "--max-requests",
            "0",
            "--target-input",
            "srcs",
            "--dry-run",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    for want in [
        "error: --target cannot be combined with --dry-run",
        "error: --target kepts=0: the row count must be at least 1, not 0",
        "error: --max-requests 0: the budget must allow at least one request",
        "error: --target kepts=0: the pipeline has no stage `kepts`\n  hint: did you mean 'kept'?",
        "error: --target-input srcs: the pipeline has no input `srcs`\n  hint: did you mean 'src'?",
        "5 errors found; nothing was run",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!run.exists(), "a run directory was made");
    let o = ifloom(
        tmp.path(),
        &["run", s(&p), "--run-dir", s(&run), "--target", "src=5"],
    );
    assert!(
        stderr(&o).contains("error: --target src=5: `src` is an input, not a stage"),
        "{}",
        stderr(&o)
    );
    let o = ifloom(
        tmp.path(),
        &["run", s(&p), "--run-dir", s(&run), "--target", "kept=lots"],
    );
    assert!(
        stderr(&o).contains("`lots` is not a row count"),
        "{}",
        stderr(&o)
    );
    let o = ifloom(
        tmp.path(),
        &["run", s(&p), "--run-dir", s(&run), "--max-requests", "10"],
    );
    assert!(
        stderr(&o).contains("error: --max-requests is the budget of a target run"),
        "{}",
        stderr(&o)
    );
    assert!(!run.exists());
}
