use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project root (where Cargo.toml is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run the ifloom binary with `args` in `cwd`.
pub fn ifloom(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn ifloom")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and insist on success, returning stdout.
pub fn ok(cwd: &Path, args: &[&str]) -> String {
    let o = ifloom(cwd, args);
    assert!(
        o.status.success(),
        "ifloom {args:?} failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `ifloom sql --format csv` and return the rows (without header) as vectors of strings.
pub fn sql_rows(cwd: &Path, run: &Path, query: &str) -> Vec<Vec<String>> {
    let out = ok(
        cwd,
        &[
            "sql",
            "--run",
            run.to_str().unwrap(),
            "--format",
            "csv",
            query,
        ],
    );
    out.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// `ifloom sql --format jsonl`, one JSON object per row.
pub fn sql_json(cwd: &Path, run: &Path, query: &str) -> Vec<serde_json::Value> {
    ok(cwd, &["sql", "--run", s(run), "--format", "jsonl", query])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A temporary folder for one test. With `IFLOOM_TEST_KEEP=DIR` it is made inside DIR and
/// kept, so the runs the tests make can be read afterwards (the before/after comparison of
/// `ifloom stats --json` and `ifloom report` over every test's run, when code moves).
pub fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("IFLOOM_TEST_KEEP") {
        Some(dir) => {
            std::fs::create_dir_all(&dir).expect("IFLOOM_TEST_KEEP folder");
            tempfile::Builder::new()
                .disable_cleanup(true)
                .tempdir_in(dir)
                .expect("tempdir")
        }
        None => tempfile::tempdir().expect("tempdir"),
    }
}

/// A path as the `&str` command lines take (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ifloom run P --run-dir RUN --cache CACHE` in `dir`, ready to be given more and started.
pub fn run_cmd(dir: &Path, p: &Path, run: &Path, cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ifloom"));
    c.args(["run", s(p), "--run-dir", s(run), "--cache", s(cache)])
        .current_dir(dir);
    c
}

/// [`run_cmd`], run to the end.
pub fn run_llm(dir: &Path, p: &Path, run: &Path, cache: &Path) -> Output {
    run_cmd(dir, p, run, cache).output().expect("spawn ifloom")
}

/// [`run_llm`], which must succeed.
pub fn run_llm_ok(dir: &Path, p: &Path, run: &Path, cache: &Path) {
    let o = run_llm(dir, p, run, cache);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `{"prompt": "question number i", "temp": 0.(i % 10)}` for i in `range`.
pub fn numbered(range: std::ops::Range<usize>) -> Vec<serde_json::Value> {
    range
        .map(|i| serde_json::json!({"prompt": format!("question number {i}"), "temp": (i % 10) as f64 / 10.0}))
        .collect()
}

/// A pipeline `<name>.yaml` (named `name`) over `data/<name>.jsonl` (`rows`) with one llm
/// stage `ask` from `src`; `stage` holds the stage's further keys, indented by four spaces.
pub fn pipeline_named(dir: &Path, name: &str, rows: &[serde_json::Value], stage: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join(format!("data/{name}.jsonl")), data).unwrap();
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "name: {name}\ninputs:\n  src: data/{name}.jsonl\nstages:\n  - id: ask\n    kind: llm\n    from: src\n    model: sim-model\n{stage}"
        ),
    )
    .unwrap();
    p
}

/// The usual chat stage keys: one endpoint, "Q: {{ prompt }}", temperature from `temp`.
pub fn chat_stage(url: &str, extra: &str) -> String {
    format!(
        "    endpoints: [\"{url}\"]\n    messages:\n      - role: user\n        content: \"Q: {{{{ prompt }}}}\"\n    params:\n      temperature: {{column: temp}}\n      max_tokens: 64\n{extra}"
    )
}

/// Every line of a JSON Lines file as JSON (a blank or bad line fails the test).
pub fn jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", p.display())))
        .collect()
}

/// `t` as a regular expression that matches it literally (the simulator's rules are regexes).
pub fn regex_escape(t: &str) -> String {
    let mut out = String::new();
    for c in t.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A judged benchmark's recorded responses judged by the simulator: `rules` (the simulator's
/// `{"match", "response"}` list) fix the judge's answers, every request is recorded in
/// `dir/requests.jsonl`, and `pipeline`'s `replay` profile runs into `dir/run` with `sets`
/// (the benchmark's and responses' files, thresholds) after the endpoint params. Returns the
/// simulator (alive while it is held), the run directory and the request record.
pub fn judged_replay(
    dir: &Path,
    pipeline: &str,
    rules: &[serde_json::Value],
    sets: &[String],
) -> (crate::llm::Sim, PathBuf, PathBuf) {
    let rules_file = dir.join("rules.json");
    std::fs::write(&rules_file, serde_json::json!({"rules": rules}).to_string()).unwrap();
    let record = dir.join("requests.jsonl");
    let sim = crate::llm::Sim::start(&[
        "--slots",
        "16",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&rules_file),
        "--record",
        s(&record),
    ]);
    let run = dir.join("run");
    let mut all = vec![
        format!("judge_url={}", sim.url),
        format!("url={}", sim.url),
        "judge_model=sim-model".into(),
        "judge_profile=vllm".into(),
    ];
    all.extend(sets.iter().cloned());
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        pipeline,
        "--profile",
        "replay",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
    ];
    for kv in &all {
        args.extend(["--set", kv.as_str()]);
    }
    ok(&root(), &args);
    (sim, run, record)
}
