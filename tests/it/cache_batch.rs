//! The cache CLI on a path with no cache, and `batch import` of a results file that holds
//! another pipeline's result. Real `ifloom` processes; the cache is read back with rusqlite.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::common::{ok, pipeline_named, s, stderr, tempdir};

/// `ifloom ARGS` in `dir` with IFLOOM_CACHE / XDG_CACHE_HOME removed and HOME = `home`.
fn ifloom_home(dir: &Path, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ifloom"));
    c.args(args)
        .current_dir(dir)
        .env_remove("IFLOOM_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Every file and folder under `dir`.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

#[test]
fn cache_stats_and_gc_of_a_missing_cache_fail_and_create_nothing() {
    let tmp = tempdir();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let before = tree(tmp.path());
    let missing = tmp.path().join("nowhere").join("c.sqlite");
    let default = home.join(".cache/ifloom/llm-cache.sqlite");
    let env_path = tmp.path().join("env").join("cache.sqlite");
    let env_says = format!("$IFLOOM_CACHE is {}", env_path.display());
    /// How the cache is named, where the error must point, and what it says of $IFLOOM_CACHE.
    struct Case<'a> {
        flags: Vec<&'a str>,
        env: Vec<(&'a str, &'a str)>,
        path: &'a Path,
        env_says: &'a str,
    }
    let cases = [
        Case {
            flags: vec!["--cache", s(&missing)],
            env: vec![],
            path: &missing,
            env_says: "$IFLOOM_CACHE is not set",
        },
        Case {
            flags: vec![],
            env: vec![("IFLOOM_CACHE", s(&env_path))],
            path: &env_path,
            env_says: &env_says,
        },
        Case {
            flags: vec![],
            env: vec![],
            path: &default,
            env_says: "$IFLOOM_CACHE is not set",
        },
    ];
    for action in [
        vec!["stats"],
        vec!["stats", "--json"],
        vec!["gc", "--older-than-days", "0"],
    ] {
        for Case {
            flags,
            env,
            path,
            env_says,
        } in &cases
        {
            let mut args = vec!["cache"];
            args.extend(&action);
            args.extend(flags);
            let o = ifloom_home(tmp.path(), &home, env, &args);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
            assert!(
                e.starts_with(&format!(
                    "error: no LLM cache at {}: it does not exist",
                    path.display()
                )),
                "{args:?}: {e}"
            );
            for rule in [
                "--cache PATH if given, else $IFLOOM_CACHE, else ~/.cache/ifloom/llm-cache.sqlite",
                env_says,
            ] {
                assert!(e.contains(rule), "{args:?}: no {rule:?} in {e}");
            }
            assert!(o.stdout.is_empty(), "{args:?}");
        }
    }
    assert_eq!(tree(tmp.path()), before, "a file or folder was created");
}

/// A pipeline with one llm stage `ask` over three prompts, the user turn `{template}`; its
/// endpoint is never called (batch mode).
fn pipeline(dir: &Path, name: &str, template: &str) -> PathBuf {
    let rows: Vec<Value> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|p| json!({"prompt": p}))
        .collect();
    let stage = format!(
        "    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - role: user\n        content: \"{template}\"\n    params:\n      max_tokens: 16\n"
    );
    pipeline_named(dir, name, &rows, &stage)
}

/// `ifloom batch ACTION` for stage `ask` with the run dir and cache, then `last`; must succeed.
pub fn batch(
    dir: &Path,
    action: &str,
    p: &Path,
    run: &Path,
    cache: &Path,
    last: &[&str],
) -> Output {
    let mut args = vec![
        "batch",
        action,
        s(p),
        "--stage",
        "ask",
        "--run-dir",
        s(run),
        "--cache",
        s(cache),
    ];
    args.extend(last);
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// The custom_ids of `batch export`.
fn export_ids(dir: &Path, p: &Path, run: &Path, cache: &Path) -> Vec<String> {
    let out = dir.join("requests.jsonl");
    batch(dir, "export", p, run, cache, &["-o", s(&out)]);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// One line of vLLM's run-batch output.
fn result(id: &str, status: u64, text: &str) -> String {
    json!({
        "id": "batch-1",
        "custom_id": id,
        "response": {"status_code": status, "body": {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2}
        }},
        "error": null
    })
    .to_string()
        + "\n"
}

fn cached_ids(cache: &Path) -> BTreeSet<String> {
    let c = rusqlite::Connection::open(cache).unwrap();
    let mut st = c.prepare("SELECT id FROM responses").unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn batch_import_stores_only_the_stages_own_requests_and_says_what_it_skipped() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache.sqlite");
    let run = tmp.path().join("run");
    let p = pipeline(tmp.path(), "mine", "Q: {{ prompt }}");
    let ids = export_ids(tmp.path(), &p, &run, &cache);
    assert_eq!(ids.len(), 3);
    // A real request id of another pipeline (another prompt template): its result must not
    // land in the cache under this stage's import.
    let other = pipeline(tmp.path(), "other", "Answer: {{ prompt }}");
    let foreign = export_ids(tmp.path(), &other, &tmp.path().join("run_other"), &cache);
    assert_eq!(foreign.len(), 3);
    assert!(foreign.iter().all(|f| !ids.contains(f)));

    let res = tmp.path().join("results.jsonl");
    std::fs::write(
        &res,
        [
            result(&ids[0], 200, "first answer"),
            result(&foreign[0], 200, "an answer to another pipeline"),
            result(&ids[1], 500, "server error"),
            "{not json\n".to_string(),
        ]
        .concat(),
    )
    .unwrap();
    let o = batch(tmp.path(), "import", &p, &run, &cache, &[s(&res)]);
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "imported 1 responses into {}: 1 unknown ids skipped, 0 already cached, 2 failed",
            cache.display()
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "unknown: `{}`, not requests of stage `ask`",
            foreign[0]
        )),
        "{e}"
    );
    assert!(e.contains(&format!("{}:3: failed", res.display())), "{e}");
    assert!(
        e.contains(&format!("{}:4: failed, not JSON", res.display())),
        "{e}"
    );
    assert_eq!(cached_ids(&cache), BTreeSet::from([ids[0].clone()]));

    // The same file again: the stored result is already cached and stays as it was.
    let o = batch(tmp.path(), "import", &p, &run, &cache, &[s(&res)]);
    let e = stderr(&o);
    assert!(
        e.contains("imported 0 responses into")
            && e.contains("1 unknown ids skipped, 1 already cached, 2 failed"),
        "{e}"
    );
    assert_eq!(cached_ids(&cache), BTreeSet::from([ids[0].clone()]));
    // Only the imported request is done: the other two are exported again.
    assert_eq!(export_ids(tmp.path(), &p, &run, &cache), ids[1..].to_vec());
    // And the cache says which model answered (through the CLI that reads an existing cache).
    let st: Value = serde_json::from_str(&ok(
        tmp.path(),
        &["cache", "stats", "--json", "--cache", s(&cache)],
    ))
    .unwrap();
    assert_eq!(st["models"], json!([["sim-model", 1]]), "{st}");
}

#[test]
fn batch_import_reports_the_result_lines_own_error_and_http_status() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache.sqlite");
    let run = tmp.path().join("run");
    let p = pipeline(tmp.path(), "errs", "Q: {{ prompt }}");
    let ids = export_ids(tmp.path(), &p, &run, &cache);
    assert_eq!(ids.len(), 3);
    let res = tmp.path().join("results.jsonl");
    let lines = [
        // The request failed: no response, the line's own error.
        json!({"id": "batch-1", "custom_id": ids[0], "response": null,
               "error": {"code": "server_error", "message": "boom"}}),
        // A non-200 status with an OpenAI-style error body.
        json!({"id": "batch-1", "custom_id": ids[1], "response": {"status_code": 400,
               "request_id": "r1", "body": {"error": {"message": "max_tokens is too large",
               "type": "invalid_request_error", "code": null}}}, "error": null}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&res, text + &result(&ids[2], 200, "fine")).unwrap();
    let o = batch(tmp.path(), "import", &p, &run, &cache, &[s(&res)]);
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "{}:1: failed, custom_id `{}`: batch error: boom\n",
            res.display(),
            ids[0]
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "{}:2: failed, custom_id `{}`: HTTP 400: max_tokens is too large\n",
            res.display(),
            ids[1]
        )),
        "{e}"
    );
    assert!(
        e.contains("imported 1 responses into")
            && e.contains("0 unknown ids skipped, 0 already cached, 2 failed"),
        "{e}"
    );
    assert_eq!(cached_ids(&cache), BTreeSet::from([ids[2].clone()]));
}

#[test]
fn batch_export_prints_an_import_command_with_the_users_options() {
    let tmp = tempdir();
    // Params the request depends on, and a profile that sets one of them.
    let rows = [json!({"prompt": "alpha"}), json!({"prompt": "beta"})];
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(tmp.path().join("data/opts.jsonl"), data).unwrap();
    let p = tmp.path().join("opts.yaml");
    std::fs::write(
        &p,
        "name: opts\nparams:\n  prefix: Q\n  tokens: 16\nprofiles:\n  long:\n    tokens: 48\ninputs:\n  src: data/opts.jsonl\nstages:\n  - id: ask\n    kind: llm\n    from: src\n    model: sim-model\n    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - role: user\n        content: \"${params.prefix}: {{ prompt }}\"\n    params:\n      max_tokens: ${params.tokens}\n",
    )
    .unwrap();
    // A run dir and a cache whose paths need quoting, and a param value with a space and a quote.
    let run = tmp.path().join("my run");
    let cache = tmp.path().join("it's cache.sqlite");
    let reqs = tmp.path().join("requests.jsonl");
    let export = [
        "batch",
        "export",
        s(&p),
        "--stage",
        "ask",
        "--profile",
        "long",
        "--set",
        "prefix=Ask me, it's",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
        "-o",
        s(&reqs),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(export)
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    let lines: Vec<Value> = std::fs::read_to_string(&reqs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["body"]["max_tokens"], 48, "{}", lines[0]);
    assert!(
        lines[0]["body"]["messages"][0]["content"]
            .as_str()
            .unwrap()
            .starts_with("Ask me, it's: "),
        "{}",
        lines[0]
    );
    let cmd = e
        .split_once("then: ")
        .unwrap_or_else(|| panic!("no next step in {e}"))
        .1
        .lines()
        .next()
        .unwrap();
    assert!(cmd.starts_with("ifloom batch import "), "{cmd}");
    assert!(cmd.ends_with(" RESULTS.jsonl"), "{cmd}");
    for opt in ["--profile long", "--set ", "--run-dir ", "--cache "] {
        assert!(cmd.contains(opt), "no {opt:?} in {cmd}");
    }

    // The results of every exported request, then the command copied as printed, in a shell
    // (the binary for `ifloom`, the results file for RESULTS.jsonl).
    let results: String = lines
        .iter()
        .map(|l| result(l["custom_id"].as_str().unwrap(), 200, "an answer"))
        .collect();
    std::fs::write(tmp.path().join("RESULTS.jsonl"), results).unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ifloom"), bin.join("ifloom")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(tmp.path())
        .env("PATH", path)
        .env_remove("IFLOOM_CACHE")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{cmd}: {e}");
    assert!(
        e.contains(&format!(
            "imported 2 responses into {}: 0 unknown ids skipped, 0 already cached, 0 failed",
            cache.display()
        )),
        "{cmd}: {e}"
    );
    let ids: BTreeSet<String> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cached_ids(&cache), ids);
    // The run dir the command named is the export's own (no `runs/opts` beside it).
    assert!(!tmp.path().join("runs").exists());
}
