//! A smoke test against a real model: llama.cpp's Python server (llama-cpp-python) serving
//! SmolLM2-135M-Instruct, installed by `scripts/local-llm.sh install`.
//!
//! Without that install the test prints how to get it and passes, unless
//! `IFLOOM_REQUIRE_REAL_MODEL` is set (as CI does), where a missing install is a failure.
//! The model is tiny and messy: the test checks that every row is accounted for and that
//! parse failures are counted, not what the model says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use crate::common::{root, s, sql_rows, stderr, stdout, tempdir};

fn script() -> PathBuf {
    root().join("scripts/local-llm.sh")
}

/// `scripts/local-llm.sh ARGS`, with the server's pid file and log in `run_dir`.
fn local_llm(run_dir: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .env("IFLOOM_LLM_RUN_DIR", run_dir)
        .output()
        .expect("spawn bash scripts/local-llm.sh")
}

/// The server started by `scripts/local-llm.sh start`; stopped on drop, even when an
/// assertion fails.
struct Server {
    run_dir: PathBuf,
    url: String,
}

impl Server {
    fn start(run_dir: &Path) -> Server {
        // A port that was free a moment ago (bound, then released for the server).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let o = local_llm(run_dir, &["start", &port.to_string()]);
        let server = Server {
            run_dir: run_dir.to_path_buf(),
            url: stdout(&o).trim().to_string(),
        };
        assert!(
            o.status.success(),
            "scripts/local-llm.sh start {port} failed:\n{}",
            stderr(&o)
        );
        eprintln!("server at {} after {:.1?}", server.url, t.elapsed());
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = local_llm(&self.run_dir, &["stop"]);
    }
}

fn count(dir: &Path, run: &Path, query: &str) -> i64 {
    sql_rows(dir, run, query)[0][0].parse().unwrap()
}

/// Whether the model is installed; a missing install fails under IFLOOM_REQUIRE_REAL_MODEL.
fn model_installed(dir: &Path) -> bool {
    let model = local_llm(dir, &["model-path"]);
    if !model.status.success() {
        assert!(
            std::env::var_os("IFLOOM_REQUIRE_REAL_MODEL").is_none(),
            "IFLOOM_REQUIRE_REAL_MODEL is set but the model is not installed: {}",
            stderr(&model).trim()
        );
        eprintln!(
            "skipping: the real model is not installed; run scripts/local-llm.sh install \
             (set IFLOOM_REQUIRE_REAL_MODEL=1 to make this a failure)"
        );
        return false;
    }
    eprintln!("model: {}", stdout(&model).trim());
    true
}

/// The README's first run: pipelines/ultraif.yaml with the `local` profile (8 instructions of
/// data/, one round, K = 2, 256 tokens) on the real model, then `ifloom stats` and the report.
/// A 135M model writes messy JSON and odd judgements: the test checks that the run completes,
/// that at least one instruction reaches a judged response, and that the figures add up.
#[test]
fn first_run_ultraif_local_profile_on_the_real_model() {
    let tmp = tempdir();
    if !model_installed(tmp.path()) {
        return;
    }
    let server = Server::start(tmp.path());
    let run = tmp.path().join("run");
    let cache = tmp.path().join("cache.sqlite");
    let (url, curl) = (
        format!("url={}", server.url),
        format!("composer_url={}", server.url),
    );
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args([
            "run",
            "pipelines/ultraif.yaml",
            "--profile",
            "local",
            "--run-dir",
        ])
        .args([s(&run), "--cache", s(&cache), "--set", &url, "--set", &curl])
        .current_dir(root())
        .output()
        .unwrap();
    eprintln!("ultraif --profile local took {:.1?}", t.elapsed());
    assert!(o.status.success(), "ifloom run failed:\n{}", stderr(&o));
    let judged = count(&root(), &run, "SELECT count(*) FROM judged");
    assert!(judged >= 1, "no instruction reached a judged response");

    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["stats", "--json", s(&run)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let st: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let section = |id: &str| {
        st["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap_or_else(|| panic!("no {id} section"))
            .clone()
    };
    let cols = |sec: &serde_json::Value| -> Vec<String> {
        sec["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    };
    let pr = section("pass_rates");
    let c = cols(&pr);
    let r = &pr["rows"][0];
    let v = |name: &str| {
        r[c.iter().position(|x| x == name).unwrap()]
            .as_i64()
            .unwrap()
    };
    assert_eq!(v("responses"), judged);
    assert_eq!(v("pass") + v("fail") + v("unjudged"), judged);
    // The 8 instructions of the profile went through the composer, on a fresh cache.
    let llm = section("llm");
    let c = cols(&llm);
    let compose = llm["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == "compose_r1")
        .unwrap();
    let at = |name: &str| {
        compose[c.iter().position(|x| x == name).unwrap()]
            .as_i64()
            .unwrap()
    };
    assert_eq!((at("rows"), at("requests"), at("cache_hits")), (8, 8, 0));
    eprintln!(
        "{}",
        stdout(
            &Command::new(env!("CARGO_BIN_EXE_ifloom"))
                .args(["stats", s(&run)])
                .output()
                .unwrap()
        )
    );

    let page = tmp.path().join("report.html");
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["report", s(&run), "-o", s(&page)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read_to_string(&page)
            .unwrap()
            .contains("<svg class=\"chart\"")
    );
    drop(server);
}

#[test]
fn llama_cpp_smollm2_answers_an_llm_stage_with_samples_and_a_schema() {
    let tmp = tempdir();
    if !model_installed(tmp.path()) {
        return;
    }
    let server = Server::start(tmp.path());

    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("data/in.jsonl"),
        "{\"prompt\": \"What is the capital of France?\"}\n\
         {\"prompt\": \"Name a colour of the sky.\"}\n\
         {\"prompt\": \"What is 2 + 2?\"}\n",
    )
    .unwrap();
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            r#"name: real-model
inputs:
  src: data/in.jsonl
stages:
  - id: ask
    kind: llm
    from: src
    endpoints: ["{url}"]
    profile: llama-cpp
    model: smollm2
    messages:
      - role: system
        content: 'Reply with JSON only, like {{"answer": "..."}}.'
      - role: user
        content: "{{{{ prompt }}}}"
    params: {{max_tokens: 48, temperature: 0.7, seed: 1}}
    samples: 2
    explode: true
    response_format:
      type: object
      properties: {{answer: {{type: string}}}}
      required: [answer]
    parse:
      json:
        fields:
          - {{name: answer, type: string}}
"#,
            url = server.url
        ),
    )
    .unwrap();

    let run = dir.join("run");
    let cache = dir.join("cache.sqlite");
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["run", s(&p), "--run-dir", s(&run), "--cache", s(&cache)])
        .current_dir(dir)
        .output()
        .unwrap();
    eprintln!("ifloom run took {:.1?}", t.elapsed());
    assert!(
        o.status.success(),
        "ifloom run failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );

    // 3 prompts × 2 samples: every one is a row of `ask` or of `ask__failed`.
    let ok_rows = count(dir, &run, "SELECT count(*) FROM ask");
    let failed = count(dir, &run, "SELECT count(*) FROM ask__failed");
    assert_eq!(ok_rows + failed, 6, "{ok_rows} rows + {failed} failed");
    let answered = count(
        dir,
        &run,
        "SELECT count(*) FROM ask WHERE length(trim(response)) > 0",
    );
    assert!(answered >= 1, "no non-empty response among {ok_rows} rows");

    // A 135M model's JSON is often broken: each answer is parsed or counted as a failure.
    let parsed = count(
        dir,
        &run,
        "SELECT count(*) FROM ask WHERE response_parse_error IS NULL",
    );
    let unparsed = count(
        dir,
        &run,
        "SELECT count(*) FROM ask WHERE response_parse_error IS NOT NULL",
    );
    assert_eq!(parsed + unparsed, ok_rows);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stages/ask/manifest.json")).unwrap(),
    )
    .unwrap();
    let c = &m["counters"];
    assert_eq!(c["parse_failures"].as_i64(), Some(unparsed), "{c}");
    assert_eq!(c["failures"].as_i64(), Some(failed), "{c}");
    assert_eq!(
        c["requests"].as_i64(),
        Some(6),
        "one request per sample: {c}"
    );
    eprintln!(
        "rows: {ok_rows} answered ({answered} non-empty, {parsed} parsed, {unparsed} unparsed), \
         {failed} failed; counters: {c}"
    );
    for r in sql_rows(
        dir,
        &run,
        "SELECT sample_index, response_finish_reason, response_completion_tokens, \
         response_parsed['answer'] FROM ask",
    ) {
        eprintln!("  {r:?}");
    }
}
