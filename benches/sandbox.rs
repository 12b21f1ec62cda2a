//! Release-build benchmark of the Python sandbox (issue 23): function executions per second
//! through ifloom's pool of sandboxed workers against the upstream approach (every function
//! exec'd in one Python process, each call under `signal.alarm(5)`: Qwen's AutoIF scripts) on
//! the same (function, input) pairs in the same run; CPU per execution and peak RSS.
//!
//! ```sh
//! CARGO_TARGET_DIR=~/.cache/ifloom/target-bench cargo bench --bench sandbox
//! ```
//!
//! Pairs: real LLM-written verifier functions (the compiled answers of
//! `../shared/data/autoif/eval_func_rft.jsonl`, the kept functions of `back_trans.jsonl`,
//! `query_rft.jsonl` and `dpo_query_w_funcs.jsonl`) × real responses (`query_rft.jsonl`'s
//! and `dpo_query_w_funcs.jsonl`'s), `IFLOOM_SANDBOX_PAIRS` of them (default 10,000), grouped
//! by function as both AutoIF steps run them. The pool starts cold (a fresh result cache:
//! every pair executes) with one worker per core.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use ifloom::sandbox::{self, SandboxConfig};
use serde_json::{Value, json};

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// CPU seconds (user + system) and peak RSS (KiB) of `who` (`RUSAGE_SELF`, `RUSAGE_CHILDREN`).
fn rusage(who: libc::c_int) -> (f64, i64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    (cpu, ru.ru_maxrss)
}

fn main() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/autoif");
    let n_pairs: usize = std::env::var("IFLOOM_SANDBOX_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // Functions.
    let mut functions: BTreeSet<String> = BTreeSet::new();
    let fence = regex::Regex::new(r"(?s)```json(.*?)```").unwrap();
    for line in read_jsonl(&data.join("eval_func_rft.jsonl")) {
        for a in line["gpt-answer"].as_array().unwrap() {
            let Some(m) = fence.captures(a.as_str().unwrap()) else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<Value>(m[1].trim())
                && let Some(f) = v["func"].as_str()
            {
                functions.insert(f.trim().to_string());
            }
        }
    }
    for file in [
        "back_trans.jsonl",
        "query_rft.jsonl",
        "dpo_query_w_funcs.jsonl",
    ] {
        for line in read_jsonl(&data.join(file)) {
            for f in line["eval_func"].as_array().into_iter().flatten() {
                if let Some(src) = f[0].as_str() {
                    functions.insert(src.to_string());
                }
            }
        }
    }
    // Responses.
    let mut responses: Vec<String> = Vec::new();
    for file in ["query_rft.jsonl", "dpo_query_w_funcs.jsonl"] {
        for line in read_jsonl(&data.join(file)) {
            for r in line["gpt-answer"].as_array().into_iter().flatten() {
                responses.push(r.as_str().unwrap().to_string());
            }
        }
    }
    let functions: Vec<String> = functions.into_iter().collect();
    let per = n_pairs.div_ceil(functions.len());
    let mut wanted: Vec<(String, Vec<Value>)> = Vec::new();
    let mut pairs: Vec<Value> = Vec::new();
    let mut left = n_pairs;
    for (i, f) in functions.iter().enumerate() {
        let k = per.min(left);
        let inputs: Vec<Value> = (0..k)
            .map(|j| json!(responses[(i * 7 + j) % responses.len()]))
            .collect();
        for x in &inputs {
            pairs.push(json!([f, x]));
        }
        left -= k;
        wanted.push((f.clone(), inputs));
    }
    // Distinct inputs per function (a repeated response would be one execution).
    let distinct: usize = wanted
        .iter()
        .map(|(_, v)| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<BTreeSet<_>>()
                .len()
        })
        .sum();
    println!(
        "pairs: {} ({} distinct) = {} real functions x real responses ({} distinct)",
        pairs.len(),
        distinct,
        functions.len(),
        responses.iter().collect::<BTreeSet<_>>().len()
    );
    let tmp = std::env::temp_dir().join(format!("ifloom-sandbox-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();

    // Upstream: one process, exec + alarm per call.
    let pairs_file = tmp.join("pairs.json");
    std::fs::write(&pairs_file, json!({"pairs": pairs}).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/autoif_upstream_exec.py");
    let python = sandbox::resolve_python("python3").unwrap();
    let t = Instant::now();
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(&pairs_file)
        .arg(tmp.join("upstream.json"))
        .current_dir(&tmp)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    let upstream_wall = t.elapsed().as_secs_f64();
    assert!(status.success());
    let up: Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.join("upstream.json")).unwrap()).unwrap();
    let up_s = up["seconds"].as_f64().unwrap();
    let up_rate = pairs.len() as f64 / up_s;

    // ifloom's start-up alone (resolving the interpreter, starting the workers, one call):
    // the cold run below pays it too.
    let config = SandboxConfig::default();
    let t = Instant::now();
    sandbox::execute(
        &config,
        &tmp.join("startup-cache.sqlite"),
        &[(
            "def evaluate(r):\n    return True".to_string(),
            vec![json!("x")],
        )],
        &|| false,
        &|_| {},
    )
    .unwrap();
    let startup_s = t.elapsed().as_secs_f64();

    // ifloom: the pool, cold cache.
    let (self_cpu0, _) = rusage(libc::RUSAGE_SELF);
    let (child_cpu0, _) = rusage(libc::RUSAGE_CHILDREN);
    let t = Instant::now();
    let (ex, iso) = sandbox::execute(
        &config,
        &tmp.join("python-cache.sqlite"),
        &wanted,
        &|| false,
        &|_| {},
    )
    .unwrap();
    let pool_s = t.elapsed().as_secs_f64();
    let (self_cpu1, self_rss) = rusage(libc::RUSAGE_SELF);
    let (child_cpu1, child_rss) = rusage(libc::RUSAGE_CHILDREN);
    let pool_cpu = (self_cpu1 - self_cpu0) + (child_cpu1 - child_cpu0);
    let rate = ex.executed as f64 / pool_s;
    // Same answers as upstream where both return a usable value.
    let mut same = 0usize;
    let mut both = 0usize;
    for (pair, r) in pairs.iter().zip(up["results"].as_array().unwrap()) {
        let (f, x) = (pair[0].as_str().unwrap(), &pair[1]);
        let ours = ex
            .call(f, x)
            .filter(|c| c.outcome == sandbox::Outcome::Ok)
            .and_then(|c| c.as_int);
        if let (Some(a), Some(b)) = (ours, r.as_i64()) {
            both += 1;
            same += usize::from(a == b);
        }
    }
    println!(
        "upstream (exec in one process, alarm per call): {:.2} s ({:.2} s with start-up), {:.0} executions/s, {:.1} us CPU each, peak RSS {} MiB",
        up_s,
        upstream_wall,
        up_rate,
        up["cpu_s"].as_f64().unwrap() / pairs.len() as f64 * 1e6,
        up["max_rss_kb"].as_i64().unwrap() / 1024
    );
    println!(
        "ifloom sandbox ({} workers, {:?}): {:.2} s, {} executed, {:.0} executions/s, {:.1} us CPU each (workers {:.1} + ifloom {:.1}), peak RSS worker {} MiB, ifloom {} MiB",
        config
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        iso,
        pool_s,
        ex.executed,
        rate,
        pool_cpu / ex.executed.max(1) as f64 * 1e6,
        (child_cpu1 - child_cpu0) / ex.executed.max(1) as f64 * 1e6,
        (self_cpu1 - self_cpu0) / ex.executed.max(1) as f64 * 1e6,
        child_rss / 1024,
        self_rss / 1024
    );
    println!(
        "ratio (ifloom / upstream executions per second): {:.2}; both with start-up ({:.2} s of ifloom's is start-up): {:.2}; both without: {:.2}",
        rate / up_rate,
        startup_s,
        (ex.executed as f64 / pool_s) / (pairs.len() as f64 / upstream_wall),
        (ex.executed as f64 / (pool_s - startup_s).max(1e-9)) / up_rate
    );
    println!("agreement where both returned an int()-able value: {same} / {both}");
    let _ = std::fs::remove_dir_all(&tmp);
}
