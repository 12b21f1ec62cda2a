//! More of the llm stage end to end: several endpoints, re-asks on parse errors, `on_error:
//! fail`, the completions API, reasoning, per-row params, the cache CLI and two processes on
//! one cache. Real processes, real HTTP on 127.0.0.1 against `ifloom sim`, real Parquet read
//! back with `ifloom sql`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use crate::common::{
    chat_stage, ifloom, numbered, ok, pipeline_named, run_cmd, run_llm, run_llm_ok, s, sql_json,
    sql_rows, stderr, tempdir,
};
use crate::llm::Sim;

fn pipeline(dir: &Path, rows: &[Value], stage: &str) -> PathBuf {
    pipeline_named(dir, "p", rows, stage)
}

/// One value of a one-row, one-column query.
fn scalar(dir: &Path, run: &Path, q: &str) -> String {
    let rows = sql_rows(dir, run, q);
    assert_eq!(rows.len(), 1, "{q}: {rows:?}");
    rows[0][0].clone()
}

fn counters(run: &Path) -> Value {
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stages/ask/manifest.json")).unwrap(),
    )
    .unwrap();
    m["counters"].clone()
}

fn rules_file(dir: &Path, rules: Value) -> PathBuf {
    let p = dir.join("rules.json");
    std::fs::write(&p, json!({ "rules": rules }).to_string()).unwrap();
    p
}

/// The request ids the simulator saw (the `x-ifloom-request-id` header), with their counts.
fn seen(sim: &Sim) -> HashMap<String, u64> {
    sim.stats()["per_request"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

fn column_set(dir: &Path, run: &Path, q: &str) -> BTreeSet<String> {
    sql_rows(dir, run, q)
        .into_iter()
        .map(|r| r[0].clone())
        .collect()
}

/// `ifloom batch export` of the stage's uncached requests, one JSON value per line.
fn export(dir: &Path, p: &Path, run: &Path, cache: &Path) -> Vec<Value> {
    let out = dir.join("requests.jsonl");
    crate::cache_batch::batch(dir, "export", p, run, cache, &["-o", s(&out)]);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_endpoints_share_the_rows_and_the_faster_one_gets_more() {
    // The slow server is listed first: the first request (both idle) goes to it.
    let slow = Sim::start(&["--slots", "8", "--base-ms", "50", "--per-token-ms", "0"]);
    let fast = Sim::start(&["--slots", "8", "--base-ms", "1", "--per-token-ms", "0"]);
    let tmp = tempdir();
    let n = 100;
    let stage = chat_stage(&slow.url, "    max_in_flight: 2\n").replace(
        &format!("[\"{}\"]", slow.url),
        &format!("[\"{}\", \"{}\"]", slow.url, fast.url),
    );
    let p = pipeline(tmp.path(), &numbered(0..n), &stage);
    let r = tmp.path().join("run");
    run_llm_ok(tmp.path(), &p, &r, &tmp.path().join("c.sqlite"));
    let (a, b) = (slow.requests(), fast.requests());
    eprintln!("slow endpoint: {a} requests, fast endpoint: {b}");
    assert!(a > 0, "the slow endpoint got nothing");
    assert!(b > 0, "the fast endpoint got nothing");
    assert_eq!(a + b, n as u64, "no faults: one request per row");
    // Least outstanding: the slow server is at its limit of 2 most of the time, so the
    // fast one takes the bulk (measured about 10:1 and more).
    assert!(b > a, "least-outstanding balancing: fast {b}, slow {a}");
    // Every row answered, in order, each request sent to exactly one server.
    let rows = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, response, response_error IS NULL, response_request_id FROM ask",
    );
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], format!("question number {i}"));
        assert_eq!(row[1], format!("echo: Q: question number {i}"));
        assert_eq!(row[2], "true");
    }
    let (sa, sb) = (seen(&slow), seen(&fast));
    assert!(
        sa.keys().all(|k| !sb.contains_key(k)),
        "a request went to both"
    );
    let ids: BTreeSet<String> = rows.iter().map(|r| r[3].clone()).collect();
    let sent: BTreeSet<String> = sa.keys().chain(sb.keys()).cloned().collect();
    assert_eq!(ids, sent);
    assert_eq!(
        scalar(tmp.path(), &r, "SELECT count(*) FROM ask__failed"),
        "0"
    );
}

#[test]
fn a_failed_parse_is_asked_again_and_the_re_ask_can_succeed() {
    // With `samples: 2` on vLLM the first ask is one request with n = 2: sample 1 is choice 1,
    // which this rule answers with prose. Its re-ask (another seed) is a request of its own
    // with n = 1, answered by choice 0: valid JSON.
    let tmp = tempdir();
    let rules = rules_file(
        tmp.path(),
        json!([{"match": "number (\\d+)$", "responses": ["{\"a\": ${1}}", "no JSON for ${1}"]}]),
    );
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1", "--rules", s(&rules)]);
    let n = 8;
    let parse = "    samples: 2\n    explode: true\n    retry_on_parse_error: 2\n    parse:\n      json:\n        fields:\n          - {name: a, type: int, required: true}\n";
    let p = pipeline(tmp.path(), &numbered(0..n), &chat_stage(&sim.url, parse));
    let r = tmp.path().join("run");
    let cache = tmp.path().join("c.sqlite");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    // One request with n = 2 per row, plus one re-ask of sample 1.
    assert_eq!(sim.requests(), 2 * n as u64);
    let rows = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, sample_index, response_parsed['a'], response_parse_error IS NULL FROM ask ORDER BY prompt, sample_index",
    );
    assert_eq!(rows.len(), 2 * n, "{rows:?}");
    for row in &rows {
        let i = row[0].rsplit(' ').next().unwrap();
        assert_eq!(row[2], i, "{row:?}");
        assert_eq!(row[3], "true", "{row:?}");
    }
    assert_eq!(counters(&r)["parse_failures"], 0);
    // The ids the rows carry are those the server was asked: sample 0 under the request with
    // n = 2, sample 1 under its re-ask (a distinct id).
    let ids = column_set(tmp.path(), &r, "SELECT response_request_id FROM ask");
    assert_eq!(ids.len(), 2 * n);
    let sent: BTreeSet<String> = seen(&sim).into_keys().collect();
    assert_eq!(ids, sent);
    assert_eq!(
        scalar(tmp.path(), &r, "SELECT count(*) FROM ask__failed"),
        "0"
    );
    // The re-asks are cached too: a fresh run directory sends nothing.
    run_llm_ok(tmp.path(), &p, &tmp.path().join("run2"), &cache);
    assert_eq!(sim.requests(), 2 * n as u64);
}

#[test]
fn an_answer_that_never_parses_is_asked_one_plus_k_times_then_dropped_or_kept() {
    let tmp = tempdir();
    let rules = rules_file(
        tmp.path(),
        json!([{"match": "number", "response": "I would rather not."}]),
    );
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1", "--rules", s(&rules)]);
    let n = 6;
    let parse = "    retry_on_parse_error: 2\n    parse:\n      json:\n        fields:\n          - {name: a, type: int, required: true}\n";
    let cache = tmp.path().join("c.sqlite");
    let p = pipeline(
        tmp.path(),
        &numbered(0..n),
        &chat_stage(&sim.url, &format!("{parse}    on_parse_error: drop\n")),
    );
    let r = tmp.path().join("run_drop");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    // 1 + 2 asks per row, each a distinct request sent once.
    let sent = seen(&sim);
    assert_eq!(sim.requests(), 3 * n as u64);
    assert_eq!(sent.len(), 3 * n);
    assert!(sent.values().all(|&c| c == 1), "{sent:?}");
    assert_eq!(scalar(tmp.path(), &r, "SELECT count(*) FROM ask"), "0");
    let failed = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, starts_with(reason, 'parse:'), raw = 'I would rather not.', request_id FROM ask__failed ORDER BY prompt",
    );
    assert_eq!(failed.len(), n);
    for (i, f) in failed.iter().enumerate() {
        assert_eq!(f[0], format!("question number {i}"));
        assert_eq!(f[1..3], ["true", "true"], "{f:?}");
        assert!(sent.contains_key(&f[3]), "{f:?}");
    }
    assert_eq!(counters(&r)["parse_failures"], n as i64);
    // on_parse_error: keep (a new fingerprint, the same requests): every ask comes from the
    // cache and the rows are kept with the parse error.
    let p = pipeline(tmp.path(), &numbered(0..n), &chat_stage(&sim.url, parse));
    let r = tmp.path().join("run_keep");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(sim.requests(), 3 * n as u64, "a cached ask was sent again");
    let kept = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, response = 'I would rather not.', response_parsed IS NULL, response_parse_error IS NOT NULL, response_cached, response_request_id FROM ask",
    );
    assert_eq!(kept.len(), n);
    for (i, k) in kept.iter().enumerate() {
        assert_eq!(k[0], format!("question number {i}"));
        assert_eq!(k[1..5], ["true", "true", "true", "true"], "{k:?}");
        assert!(sent.contains_key(&k[5]), "{k:?}");
    }
    assert_eq!(
        scalar(tmp.path(), &r, "SELECT count(*) FROM ask__failed"),
        "0"
    );
}

#[test]
fn on_error_fail_stops_the_run_where_the_default_dead_letters() {
    let bad = Sim::start(&["--slots", "4", "--base-ms", "1", "--fault-malformed", "1.0"]);
    let tmp = tempdir();
    let cache = tmp.path().join("c.sqlite");
    let p = pipeline(
        tmp.path(),
        &numbered(0..4),
        &chat_stage(&bad.url, "    on_error: fail\n"),
    );
    let o = run_llm(tmp.path(), &p, &tmp.path().join("run_fail"), &cache);
    let e = stderr(&o);
    assert!(!o.status.success(), "on_error: fail succeeded:\n{e}");
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("(on_error: fail)"), "{e}");
    assert!(e.contains("not valid JSON"), "{e}");
    assert!(bad.requests() >= 1);
    // The default (dead_letter): the same requests, the run succeeds, all rows dead-lettered.
    let p = pipeline(tmp.path(), &numbered(0..4), &chat_stage(&bad.url, ""));
    let r = tmp.path().join("run");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(scalar(tmp.path(), &r, "SELECT count(*) FROM ask"), "0");
    let failed = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, strpos(reason, 'not valid JSON') > 0, raw IS NOT NULL FROM ask__failed ORDER BY prompt",
    );
    assert_eq!(failed.len(), 4);
    for (i, f) in failed.iter().enumerate() {
        assert_eq!(f[0], format!("question number {i}"));
        assert_eq!(f[1..], ["true", "true"], "{f:?}");
    }
}

#[test]
fn completions_api_sends_the_rendered_prompt_and_answers_in_order() {
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1"]);
    let tmp = tempdir();
    let n = 12;
    let stage = format!(
        "    endpoints: [\"{}\"]\n    api: completions\n    prompt: \"Complete: {{{{ prompt | upper }}}}\"\n    params: {{max_tokens: 64}}\n",
        sim.url
    );
    let p = pipeline(tmp.path(), &numbered(0..n), &stage);
    let r = tmp.path().join("run");
    let cache = tmp.path().join("c.sqlite");
    // What would go on the wire: the completions path and body, with the rendered prompt.
    let lines = export(tmp.path(), &p, &r, &cache);
    assert_eq!(lines.len(), n);
    let prompts: BTreeSet<String> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["url"], "/v1/completions", "{l}");
            assert!(l["body"].get("messages").is_none(), "{l}");
            l["body"]["prompt"].as_str().unwrap().to_string()
        })
        .collect();
    let want: BTreeSet<String> = (0..n)
        .map(|i| format!("Complete: QUESTION NUMBER {i}"))
        .collect();
    assert_eq!(prompts, want);
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(sim.requests(), n as u64);
    let rows = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, response, response_finish_reason FROM ask",
    );
    assert_eq!(rows.len(), n);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], format!("question number {i}"), "input order kept");
        assert_eq!(row[1], format!("echo: Complete: QUESTION NUMBER {i}"));
        assert_eq!(row[2], "stop");
    }
}

#[test]
fn think_blocks_go_to_the_reasoning_column_or_stay_with_reasoning_keep() {
    let tmp = tempdir();
    let rules = rules_file(
        tmp.path(),
        json!([{"match": "number", "response": "<think>secret plan</think>{\"a\": 1}"}]),
    );
    let sim = Sim::start(&["--slots", "4", "--base-ms", "1", "--rules", s(&rules)]);
    let n = 3;
    let parse = "    parse:\n      json:\n        fields:\n          - {name: a, type: int}\n";
    let cache = tmp.path().join("c.sqlite");
    let p = pipeline(tmp.path(), &numbered(0..n), &chat_stage(&sim.url, parse));
    let r = tmp.path().join("run");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(sim.requests(), n as u64);
    let q = "SELECT response = '{\"a\": 1}', strpos(response, 'secret') = 0, response_reasoning = 'secret plan', response_parsed['a'], response_parse_error IS NULL FROM ask";
    let rows = sql_rows(tmp.path(), &r, q);
    assert_eq!(rows.len(), n);
    for row in &rows {
        assert_eq!(row, &["true", "true", "true", "1", "true"]);
    }
    // reasoning: keep, a new fingerprint but the same requests: from the cache, the text as
    // the server sent it.
    let p = pipeline(
        tmp.path(),
        &numbered(0..n),
        &chat_stage(&sim.url, &format!("{parse}    reasoning: keep\n")),
    );
    let r = tmp.path().join("run_keep");
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(sim.requests(), n as u64, "a cached request was sent again");
    let q = "SELECT response = '<think>secret plan</think>{\"a\": 1}', response_reasoning IS NULL, response_parsed['a'], response_cached FROM ask";
    let rows = sql_rows(tmp.path(), &r, q);
    assert_eq!(rows.len(), n);
    for row in &rows {
        assert_eq!(row, &["true", "true", "1", "true"]);
    }
}

#[test]
fn params_from_columns_reach_the_server_per_row() {
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1"]);
    let tmp = tempdir();
    // Rows i and i + 6 share prompt and max_tokens but not temperature.
    let rows: Vec<Value> = (0..12)
        .map(|i| {
            json!({
                "prompt": format!("tell me about topic {}", i % 6),
                "temp": if i < 6 { 0.2 } else { 0.7 },
                "mt": 1 + i % 6,
            })
        })
        .collect();
    let stage = format!(
        "    endpoints: [\"{}\"]\n    messages:\n      - role: user\n        content: \"Q: {{{{ prompt }}}}\"\n    params:\n      temperature: {{column: temp}}\n      max_tokens: {{column: mt}}\n",
        sim.url
    );
    let p = pipeline(tmp.path(), &rows, &stage);
    let r = tmp.path().join("run");
    let cache = tmp.path().join("c.sqlite");
    // The request bodies carry each row's own values.
    let lines = export(tmp.path(), &p, &r, &cache);
    assert_eq!(
        lines.len(),
        12,
        "distinct temperatures make distinct requests"
    );
    let got: BTreeSet<(String, String, i64)> = lines
        .iter()
        .map(|l| {
            let b = &l["body"];
            (
                b["messages"][0]["content"].as_str().unwrap().to_string(),
                format!("{:.2}", b["temperature"].as_f64().unwrap()),
                b["max_tokens"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, i64)> = rows
        .iter()
        .map(|r| {
            (
                format!("Q: {}", r["prompt"].as_str().unwrap()),
                format!("{:.2}", r["temp"].as_f64().unwrap()),
                r["mt"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    run_llm_ok(tmp.path(), &p, &r, &cache);
    assert_eq!(sim.requests(), 12);
    assert_eq!(seen(&sim).len(), 12);
    // The server honoured each row's max_tokens: the echo cut to that many words.
    let out = sql_rows(
        tmp.path(),
        &r,
        "SELECT prompt, mt, response, response_finish_reason, response_completion_tokens FROM ask",
    );
    assert_eq!(out.len(), 12);
    for (i, row) in out.iter().enumerate() {
        let mt = 1 + i % 6;
        assert_eq!(row[1], mt.to_string());
        let full = format!("echo: Q: tell me about topic {}", i % 6);
        let cut: Vec<&str> = full.split_whitespace().take(mt).collect();
        assert_eq!(row[2], cut.join(" "), "{row:?}");
        assert_eq!(row[3], "length", "{row:?}");
        assert_eq!(row[4], mt.to_string(), "{row:?}");
    }
}

#[test]
fn cache_stats_counts_and_gc_keeps_or_removes() {
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1"]);
    let tmp = tempdir();
    let cache = tmp.path().join("c.sqlite");
    let n = 7;
    let p = pipeline(tmp.path(), &numbered(0..n), &chat_stage(&sim.url, ""));
    run_llm_ok(tmp.path(), &p, &tmp.path().join("run1"), &cache);
    assert_eq!(sim.requests(), n as u64);
    let stats = |tmp: &Path| -> Value {
        serde_json::from_str(&ok(
            tmp,
            &["cache", "stats", "--json", "--cache", s(&cache)],
        ))
        .unwrap()
    };
    let st = stats(tmp.path());
    assert_eq!(st["responses"], n as i64, "{st}");
    assert_eq!(st["models"], json!([["sim-model", n]]), "{st}");
    let text = ok(tmp.path(), &["cache", "stats", "--cache", s(&cache)]);
    assert!(text.contains(&format!("responses: {n}\n")), "{text}");
    // A cutoff of a day keeps responses written just now.
    let out = ok(
        tmp.path(),
        &[
            "cache",
            "gc",
            "--older-than-days",
            "1",
            "--cache",
            s(&cache),
        ],
    );
    assert!(out.starts_with("removed 0 responses"), "{out}");
    assert_eq!(stats(tmp.path())["responses"], n as i64);
    run_llm_ok(tmp.path(), &p, &tmp.path().join("run2"), &cache);
    assert_eq!(sim.requests(), n as u64, "gc removed a recent response");
    // 0 days: everything goes, and the next run asks again.
    let out = ok(
        tmp.path(),
        &[
            "cache",
            "gc",
            "--older-than-days",
            "0",
            "--cache",
            s(&cache),
        ],
    );
    assert!(out.starts_with(&format!("removed {n} responses")), "{out}");
    assert_eq!(stats(tmp.path())["responses"], 0);
    let r3 = tmp.path().join("run3");
    run_llm_ok(tmp.path(), &p, &r3, &cache);
    assert_eq!(sim.requests(), 2 * n as u64);
    assert_eq!(
        scalar(
            tmp.path(),
            &r3,
            "SELECT count(*) FROM ask WHERE NOT response_cached"
        ),
        n.to_string()
    );
    assert_eq!(stats(tmp.path())["responses"], n as i64);
}

#[test]
fn two_processes_share_one_cache_file() {
    // Slow enough that the two runs overlap: 4 slots x 20 ms for both.
    let sim = Sim::start(&["--slots", "4", "--base-ms", "20", "--per-token-ms", "0"]);
    let tmp = tempdir();
    let cache = tmp.path().join("shared.sqlite");
    let stage = chat_stage(&sim.url, "    max_in_flight: 4\n");
    // Overlapping inputs: rows 60..120 are in both.
    let pa = pipeline_named(tmp.path(), "a", &numbered(0..120), &stage);
    let pb = pipeline_named(tmp.path(), "b", &numbered(60..180), &stage);
    let (ra, rb) = (tmp.path().join("run_a"), tmp.path().join("run_b"));
    let spawn = |p: &Path, r: &Path| {
        run_cmd(tmp.path(), p, r, &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(&pa, &ra), spawn(&pb, &rb));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let sent = sim.requests();
    eprintln!("two processes sent {sent} requests for 180 distinct ones");
    assert!((180..=240).contains(&sent), "{sent}");
    for (r, range) in [(&ra, 0..120), (&rb, 60..180)] {
        let rows = sql_rows(tmp.path(), r, "SELECT prompt, response FROM ask");
        assert_eq!(rows.len(), 120);
        for (row, i) in rows.iter().zip(range) {
            assert_eq!(row[0], format!("question number {i}"));
            assert_eq!(row[1], format!("echo: Q: question number {i}"));
        }
    }
    let st: Value = serde_json::from_str(&ok(
        tmp.path(),
        &["cache", "stats", "--json", "--cache", s(&cache)],
    ))
    .unwrap();
    assert_eq!(st["responses"], 180, "{st}");
    // A third run over all of it, into a fresh run directory: everything is cached.
    let pc = pipeline_named(tmp.path(), "c", &numbered(0..180), &stage);
    let rc = tmp.path().join("run_c");
    run_llm_ok(tmp.path(), &pc, &rc, &cache);
    assert_eq!(sim.requests(), sent, "the third run sent requests");
    assert_eq!(
        scalar(
            tmp.path(),
            &rc,
            "SELECT count(*) FROM ask WHERE response_cached"
        ),
        "180"
    );
    let o = ifloom(
        tmp.path(),
        &["sql", "--run", s(&rc), "SELECT count(*) FROM ask__failed"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn stop_sequences_come_from_a_string_or_list_column() {
    let tmp = tempdir();
    let rows: Vec<Value> = (0..3)
        .map(|i| json!({"prompt": format!("p {i}"), "stops": vec![format!("<{i}>"); i + 1], "one": format!("#{i}")}))
        .collect();
    for (param, want) in [
        (
            "{column: stops}",
            Box::new(|i: usize| json!(vec![format!("<{i}>"); i + 1]))
                as Box<dyn Fn(usize) -> Value>,
        ),
        (
            "{column: one}",
            Box::new(|i: usize| json!([format!("#{i}")])),
        ),
        ("\"END\"", Box::new(|_| json!(["END"]))),
    ] {
        let stage = format!(
            "    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - role: user\n        content: \"{{{{ prompt }}}}\"\n    params:\n      stop: {param}\n"
        );
        let p = pipeline(tmp.path(), &rows, &stage);
        let lines = export(
            tmp.path(),
            &p,
            &tmp.path().join("run"),
            &tmp.path().join("c.sqlite"),
        );
        assert_eq!(lines.len(), 3);
        for l in &lines {
            let content = l["body"]["messages"][0]["content"].as_str().unwrap();
            let i: usize = content.strip_prefix("p ").unwrap().parse().unwrap();
            assert_eq!(l["body"]["stop"], want(i), "{param}: {l}");
        }
    }
}

/// A one-thread HTTP/1.1 server on 127.0.0.1 that answers `/v1/models` for `sim-model` and
/// every POST with `answer(request body)`: a status and an `application/json` body (raw bytes,
/// so it can send what no JSON library would write). One request per connection.
fn raw_server(answer: impl Fn(&str) -> (u16, Vec<u8>) + Send + Sync + 'static) -> String {
    raw_server_seeing(|_| {}, answer)
}

/// [`raw_server`], also handing `seen` the head (request line and header lines, as sent) of
/// every request, GET /models included. A 429 asks for a long wait (`retry-after: 600`).
fn raw_server_seeing(
    seen: impl Fn(&str) + Send + Sync + 'static,
    answer: impl Fn(&str) -> (u16, Vec<u8>) + Send + Sync + 'static,
) -> String {
    raw_server_headers(seen, move |body| {
        let (status, out) = answer(body);
        let wait = if status == 429 {
            "retry-after: 600\r\n"
        } else {
            ""
        };
        (status, out, wait.to_string())
    })
}

/// [`raw_server_seeing`] whose `answer` also gives the response's extra header lines (each
/// ending in `\r\n`).
fn raw_server_headers(
    seen: impl Fn(&str) + Send + Sync + 'static,
    answer: impl Fn(&str) -> (u16, Vec<u8>, String) + Send + Sync + 'static,
) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let seen = std::sync::Arc::new(seen);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (answer, seen) = (answer.clone(), seen.clone());
            // A thread per connection: an answer that takes its time holds up no other.
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let (mut first, mut len) = (String::new(), 0usize);
                if r.read_line(&mut first).is_err() {
                    return;
                }
                let mut head = first.clone();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    head.push_str(&h);
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                seen(&head);
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let (status, out, extra) = if first.starts_with("GET") {
                    (
                        200,
                        br#"{"object":"list","data":[{"id":"sim-model","object":"model"}]}"#
                            .to_vec(),
                        String::new(),
                    )
                } else {
                    answer(&String::from_utf8_lossy(&body))
                };
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
                    out.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&out);
            });
        }
    });
    url
}

#[test]
fn bodies_the_json_parser_rejects_are_kept_byte_for_byte() {
    // Question 0 gets a body with bytes that are not UTF-8 (Latin-1 "café"), question 1 a lone
    // surrogate escape (ASCII, but rejected by serde), question 2 a proper answer.
    let url = raw_server(|body| {
        let answer = if body.contains("question number 0") {
            b"{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"caf\xe9\"},\"finish_reason\":\"stop\"}]}".to_vec()
        } else if body.contains("question number 1") {
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"x\ud800y"},"finish_reason":"stop"}]}"#.to_vec()
        } else {
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#.to_vec()
        };
        (200, answer)
    });
    let tmp = tempdir();
    let run = tmp.path().join("run");
    let p = pipeline(tmp.path(), &numbered(0..3), &chat_stage(&url, ""));
    run_llm_ok(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"));
    assert_eq!(
        sql_rows(tmp.path(), &run, "SELECT prompt, response FROM ask"),
        [["question number 2", "fine"]]
    );
    let failed = sql_json(
        tmp.path(),
        &run,
        "SELECT prompt, strpos(reason, 'not valid JSON') > 0 AS said, raw, \
         encode(raw_bytes, 'hex') AS hex FROM ask__failed ORDER BY prompt",
    );
    assert_eq!(failed.len(), 2, "{failed:?}");
    let sent0 = b"{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"caf\xe9\"},\"finish_reason\":\"stop\"}]}";
    let hex: String = sent0.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        failed[0],
        json!({"prompt": "question number 0", "said": true,
               "raw": String::from_utf8_lossy(sent0), "hex": hex}),
        "raw_bytes is not the body as sent"
    );
    // Valid UTF-8: `raw` is the body exactly, and `raw_bytes` is not needed.
    let sent1 = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"x\ud800y"},"finish_reason":"stop"}]}"#;
    assert_eq!(
        failed[1],
        // (jsonl leaves null columns out: no "hex")
        json!({"prompt": "question number 1", "said": true, "raw": sent1})
    );
}

#[test]
fn a_refused_api_key_stops_the_stage_instead_of_failing_every_row() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let posts = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = posts.clone();
    let url = raw_server(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        (
            401,
            br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#.to_vec(),
        )
    });
    let tmp = tempdir();
    let p = keyed_pipeline(tmp.path(), &url, 40);
    let run = tmp.path().join("run");
    let o = run_cmd(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"))
        .env("IFLOOM_TEST_KEY", "sk-wrong")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("HTTP 401")
            && e.contains("the server refused the API key in `IFLOOM_TEST_KEY`")
            && e.contains("Incorrect API key provided")
            && e.contains("rerun the same command to resume"),
        "{e}"
    );
    // The requests on the wire when the first 401 came back, not one per row.
    let sent = posts.load(Ordering::SeqCst);
    assert!((1..=4).contains(&sent), "{sent} requests for 40 rows");
    // Nothing was dead-lettered: the stage did not finish.
    assert!(!run.join("stages/ask/manifest.json").exists());
}

/// A chat stage over `rows` numbered questions, sent to `url` through an endpoint group
/// (`g`, 2 in flight) whose key is in `IFLOOM_TEST_KEY`.
fn keyed_pipeline(dir: &Path, url: &str, rows: usize) -> PathBuf {
    let p = pipeline(dir, &numbered(0..rows), &chat_stage(url, ""));
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(&format!("    endpoints: [\"{url}\"]\n"), "    endpoint: g\n")
        .replace(
            "inputs:",
            &format!("endpoints:\n  g:\n    urls: [\"{url}\"]\n    max_in_flight: 2\n    api_key_env: IFLOOM_TEST_KEY\ninputs:"),
        );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_key_goes_in_a_bearer_header_of_every_request_and_nowhere_else() {
    // Each request's head, as the server read it off the socket.
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = heads.clone();
    let url = raw_server_seeing(
        move |h| log.lock().unwrap().push(h.to_string()),
        |_| {
            (
                200,
                br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#.to_vec(),
            )
        },
    );
    let tmp = tempdir();
    let p = keyed_pipeline(tmp.path(), &url, 6);
    let run = tmp.path().join("run");
    // The trailing newline of a key read from a file (`export K=$(cat key)` keeps none, but
    // an .env loader may) is not part of the key.
    let o = run_cmd(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"))
        .env("IFLOOM_TEST_KEY", "sk-ifloom-auth-7f3e\n")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let heads = heads.lock().unwrap().clone();
    // The endpoint check and the six rows.
    assert_eq!(heads.len(), 7, "{heads:?}");
    assert!(heads[0].starts_with("GET /v1/models "), "{}", heads[0]);
    for h in &heads {
        let auth: Vec<&str> = h
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .collect();
        assert_eq!(auth.len(), 1, "{h}");
        assert_eq!(
            auth[0].split_once(':').unwrap().1.trim(),
            "Bearer sk-ifloom-auth-7f3e"
        );
    }
    for h in &heads[1..] {
        assert!(h.starts_with("POST /v1/chat/completions "), "{h}");
        let lower = h.to_ascii_lowercase();
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{h}"
        );
        assert!(lower.contains("\r\nx-ifloom-request-id: "), "{h}");
    }
    // A key that no header can carry: said before anything is sent, without the key.
    let o = run_cmd(
        tmp.path(),
        &p,
        &tmp.path().join("run2"),
        &tmp.path().join("c2.sqlite"),
    )
    .env("IFLOOM_TEST_KEY", "sk-ifloom-\u{1}-bad")
    .output()
    .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("environment variable `IFLOOM_TEST_KEY` (api_key_env) holds a line break or another character an HTTP header cannot carry"),
        "{e}"
    );
    assert!(!e.contains("sk-ifloom-"), "{e}");
}

#[test]
fn a_row_the_template_cannot_render_is_a_user_error_in_a_dry_run() {
    let tmp = tempdir();
    let stage =
        chat_stage("http://127.0.0.1:9/v1", "").replace("{{ prompt }}", "{{ prompt.foo.bar }}");
    let p = pipeline(tmp.path(), &numbered(0..2), &stage);
    let run = tmp.path().join("run");
    let mut c = run_cmd(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"));
    let o = c.arg("--dry-run").output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("row 1 of the stage's input cannot be rendered")
            && e.contains("undefined")
            && !e.contains("internal error"),
        "{e}"
    );
}

#[test]
fn a_response_format_that_is_not_a_json_schema_fails_validation() {
    let tmp = tempdir();
    let url = "http://127.0.0.1:9/v1";
    for (format, said) in [
        (
            "\"json please\"",
            "response_format: a schema must be a mapping, got \"json please\"",
        ),
        (
            "{type: objekt, properties: {answer: {type: strin}}}",
            "response_format.type: \"objekt\" is not a JSON Schema type",
        ),
        (
            "{type: object, properties: {answer: {type: string}}, required: answer}",
            "response_format.required: must be a list of field names",
        ),
        (
            "{type: object, properties: {answer: {type: string}}, required: [answr]}",
            "response_format.required: `answr` is not one of the properties (answer)",
        ),
    ] {
        let p = pipeline(
            tmp.path(),
            &numbered(0..1),
            &chat_stage(url, &format!("    response_format: {format}\n")),
        );
        let o = ifloom(tmp.path(), &["validate", s(&p)]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{format}: {e}");
        assert!(e.contains(said) && e.contains("p.yaml:"), "{format}: {e}");
    }
    // The nested error is reported too, and a proper schema validates.
    let p = pipeline(
        tmp.path(),
        &numbered(0..1),
        &chat_stage(
            url,
            "    response_format: {type: objekt, properties: {answer: {type: strin}}}\n",
        ),
    );
    let e = stderr(&ifloom(tmp.path(), &["validate", s(&p)]));
    assert!(
        e.contains("response_format.properties.answer.type: \"strin\""),
        "{e}"
    );
    let p = pipeline(
        tmp.path(),
        &numbered(0..1),
        &chat_stage(
            url,
            "    response_format: {type: object, properties: {answer: {type: string}, tags: {type: array, items: {type: string}}}, required: [answer]}\n",
        ),
    );
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn table_token_counters_are_the_same_for_a_run_answered_from_the_cache() {
    let sim = Sim::start(&["--slots", "8", "--base-ms", "1"]);
    let tmp = tempdir();
    let cache = tmp.path().join("c.sqlite");
    let p = pipeline(
        tmp.path(),
        &numbered(0..5),
        &chat_stage(&sim.url, "    samples: 2\n"),
    );
    let first = tmp.path().join("run1");
    run_llm_ok(tmp.path(), &p, &first, &cache);
    let a = counters(&first);
    // Nothing was cached: the table's usage is what was sent (one n: 2 request per row).
    assert_eq!(a["requests"], 5);
    assert!(a["completion_tokens"].as_i64().unwrap() > 0);
    assert_eq!(a["table_completion_tokens"], a["completion_tokens"]);
    assert_eq!(a["table_prompt_tokens"], a["prompt_tokens"]);
    // The same table from the cache: nothing sent, the same table figures, which also match
    // the table's own columns.
    let second = tmp.path().join("run2");
    run_llm_ok(tmp.path(), &p, &second, &cache);
    let b = counters(&second);
    assert_eq!(
        (b["requests"].as_i64(), b["completion_tokens"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(b["table_completion_tokens"], a["table_completion_tokens"]);
    assert_eq!(b["table_prompt_tokens"], a["table_prompt_tokens"]);
    let sums = sql_rows(
        tmp.path(),
        &second,
        "SELECT sum(response_prompt_tokens), CAST(sum(array_sum(response_completion_tokens)) AS BIGINT) FROM ask",
    );
    assert_eq!(
        sums,
        [[
            a["table_prompt_tokens"].to_string(),
            a["table_completion_tokens"].to_string()
        ]]
    );
    // Where K samples are K requests (llama-cpp), each reads the prompt: the table's prompt
    // tokens are counted per sample, as the requests were.
    let p = pipeline(
        tmp.path(),
        &numbered(0..5),
        &chat_stage(&sim.url, "    samples: 2\n    profile: llama-cpp\n"),
    );
    let third = tmp.path().join("run3");
    run_llm_ok(tmp.path(), &p, &third, &tmp.path().join("other.sqlite"));
    let c = counters(&third);
    assert_eq!(c["requests"], 10);
    assert_eq!(c["table_prompt_tokens"], c["prompt_tokens"]);
    assert_eq!(c["table_completion_tokens"], c["completion_tokens"]);
}

#[test]
fn params_out_of_range_and_parse_options_without_parse_fail_validation() {
    let tmp = tempdir();
    let p = pipeline(
        tmp.path(),
        &numbered(0..1),
        &chat_stage(
            "http://127.0.0.1:9/v1",
            "    on_parse_error: drop\n    retry_on_parse_error: 2\n",
        )
        .replace(
            "      max_tokens: 64\n",
            "      max_tokens: 0\n      top_p: 7\n      presence_penalty: -3\n",
        ),
    );
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    for said in [
        "params.max_tokens: must be at least 1, got 0",
        "params.top_p: must be above 0 and at most 1, got 7",
        "params.presence_penalty: must be from -2 to 2, got -3",
        "on_parse_error has no effect without `parse:`",
        "retry_on_parse_error has no effect without `parse:`",
    ] {
        assert!(e.contains(said), "{said}: {e}");
    }
    assert!(e.contains("5 errors"), "{e}");
}

#[test]
fn a_base_url_without_v1_gets_a_hint() {
    let sim = Sim::start(&["--slots", "2", "--base-ms", "1"]);
    let tmp = tempdir();
    let base = sim.url.trim_end_matches("/v1").to_string();
    let p = pipeline(tmp.path(), &numbered(0..1), &chat_stage(&base, ""));
    let o = run_llm(
        tmp.path(),
        &p,
        &tmp.path().join("run"),
        &tmp.path().join("c.sqlite"),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("usually ends in /v1"), "{e}");
}

#[test]
fn template_syntax_errors_name_the_file_and_its_line() {
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("prompts")).unwrap();
    std::fs::write(
        tmp.path().join("prompts/judge.j2"),
        "Judge this.\n\n{% if prompt %}{{ prompt }\n{% endif %}\n",
    )
    .unwrap();
    let stage = "    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - role: system\n        content: \"Be {{ brief\"\n      - role: user\n        file: prompts/judge.j2\n";
    let p = pipeline(tmp.path(), &numbered(0..1), stage);
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    // Both errors, each at its own message; the file's by its name and line, not "(in m1:3)".
    assert!(
        e.contains("p.yaml:12:18: stage 'ask': template syntax error (message 1, line 1)"),
        "{e}"
    );
    assert!(
        e.contains("p.yaml:14:15: stage 'ask': template syntax error in prompts/judge.j2, line 3"),
        "{e}"
    );
    assert!(!e.contains("(in m1"), "{e}");
    // An unknown variable in a file: the line that uses it.
    std::fs::write(
        tmp.path().join("prompts/judge.j2"),
        "Judge this.\n\n{% if prompt %}{{ answr }}{% endif %}\n",
    )
    .unwrap();
    let p = pipeline(
        tmp.path(),
        &numbered(0..1),
        &stage.replace("\"Be {{ brief\"", "\"Be brief\""),
    );
    let e = stderr(&ifloom(tmp.path(), &["validate", s(&p)]));
    assert!(
        e.contains("template variable `answr` is not a column of `src` (prompts/judge.j2, line 3)"),
        "{e}"
    );
}

#[test]
fn a_dry_run_says_how_samples_become_http_requests() {
    let tmp = tempdir();
    let p = pipeline(
        tmp.path(),
        &numbered(0..4),
        &chat_stage("http://127.0.0.1:9/v1", "    samples: 3\n"),
    );
    let mut c = run_cmd(
        tmp.path(),
        &p,
        &tmp.path().join("run"),
        &tmp.path().join("c.sqlite"),
    );
    let o = c.arg("--dry-run").output().unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("4 rows x 3 sample(s): 12 distinct requests, 0 already cached, 12 to send")
            && e.contains("go out as one HTTP request with n: 3"),
        "{e}"
    );
}

/// Run `cmd` to its end and return its status and stderr; kill it and panic with `hang` when
/// it runs past `secs` seconds (guards tests against a hang, not a speed).
fn finish_within(
    mut cmd: std::process::Command,
    secs: u64,
    hang: &str,
) -> (std::process::ExitStatus, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{hang}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

#[test]
fn a_429_with_retry_after_ms_is_retried_after_the_milliseconds_not_the_seconds() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Every first attempt gets a 429 saying `retry-after: 600` and, more precisely (as OpenAI
    // sends it), `retry-after-ms: 30`; every retry is answered. Waiting out the 600 s would
    // announce it on stderr and hang the stage (a hang, not a speed, is what this guards).
    let posts = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    let tried = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let url = raw_server_headers(
        |_| {},
        move |body| {
            counted.fetch_add(1, Ordering::SeqCst);
            let v: Value = serde_json::from_str(body).unwrap();
            let prompt = v["messages"][0]["content"].as_str().unwrap().to_string();
            if tried.lock().unwrap().insert(prompt) {
                (
                    429,
                    br#"{"error":{"message":"slow down"}}"#.to_vec(),
                    "retry-after: 600\r\nretry-after-ms: 30\r\n".to_string(),
                )
            } else {
                (
                    200,
                    br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"fine"},"finish_reason":"stop"}]}"#.to_vec(),
                    String::new(),
                )
            }
        },
    );
    let tmp = tempdir();
    let p = pipeline(tmp.path(), &numbered(0..4), &chat_stage(&url, ""));
    let run = tmp.path().join("run");
    let (status, err) = finish_within(
        run_cmd(tmp.path(), &p, &run, &tmp.path().join("c.sqlite")),
        120,
        "the stage waited out `retry-after: 600` instead of `retry-after-ms: 30`",
    );
    assert!(status.success(), "{err}");
    assert!(!err.contains("asked to wait"), "{err}");
    assert_eq!(
        posts.load(Ordering::SeqCst),
        8,
        "one 429 and one answer per row"
    );
    assert_eq!(
        scalar(
            tmp.path(),
            &run,
            "SELECT count(*) FROM ask WHERE response = 'fine'"
        ),
        "4"
    );
}

#[test]
fn a_refused_key_also_stops_requests_sleeping_out_a_retry_after() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // The first request gets a 429 asking for 600 s, every later one a 401: the stop must not
    // wait for the sleeper (a hang, not a speed, is what this guards against).
    let posts = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = posts.clone();
    let url = raw_server(move |_| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        let status = if n == 0 { 429 } else { 401 };
        (status, br#"{"error":{"message":"no"}}"#.to_vec())
    });
    let tmp = tempdir();
    let p = pipeline(
        tmp.path(),
        &numbered(0..8),
        &chat_stage(&url, "    max_in_flight: 1\n"),
    );
    let (status, err) = finish_within(
        run_cmd(
            tmp.path(),
            &p,
            &tmp.path().join("run"),
            &tmp.path().join("c.sqlite"),
        ),
        60,
        "the stage waited out the Retry-After after a 401",
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("HTTP 401") && err.contains("set `api_key_env`"),
        "{err}"
    );
    // The sleeping request was not sent again.
    assert_eq!(posts.load(Ordering::SeqCst), 2, "{err}");
}

#[test]
fn filters_in_raw_blocks_and_comments_and_valid_schemas_are_not_errors() {
    let tmp = tempdir();
    let url = "http://127.0.0.1:9/v1";
    let valid = |stage: &str| {
        let p = pipeline(tmp.path(), &numbered(0..1), stage);
        let o = ifloom(tmp.path(), &["validate", s(&p)]);
        (o.status.success(), stderr(&o))
    };
    let (ok, e) = valid(&chat_stage(url, "").replace(
        "Q: {{ prompt }}",
        "{% raw %}{{ name | shout }}{% endraw %}{# {{ prompt | shout }} #}{{- prompt | upper -}}",
    ));
    assert!(ok, "{e}");
    // The filter tag is checked too.
    let (ok, e) = valid(&chat_stage(url, "").replace(
        "Q: {{ prompt }}",
        "{% filter shout %}{{ prompt }}{% endfilter %}",
    ));
    assert!(!ok && e.contains("unknown filter `shout`"), "{e}");
    for schema in [
        "{type: object, properties: {a: {type: string}}, additionalProperties: {type: integer}, required: [a, b]}",
        "{type: object, allOf: [{properties: {b: {type: string}}}], properties: {a: {type: string}}, required: [a, b]}",
        "{type: array, items: [{type: string}, {type: integer}]}",
        "{type: object, properties: {a: {type: [string, \"null\"]}, b: {const: 1}}, $defs: {x: {type: string}}}",
    ] {
        let (ok, e) = valid(&chat_stage(
            url,
            &format!("    response_format: {schema}\n"),
        ));
        assert!(ok, "{schema}: {e}");
    }
    let (ok, e) = valid(&chat_stage(
        url,
        "    response_format: {type: object, properties: {a: {type: [string, null]}}}\n",
    ));
    assert!(!ok && e.contains("write the type null quoted"), "{e}");
}

#[test]
fn a_403_after_successes_fails_only_its_row() {
    // A proxy's moderation 403 for one input, after other requests of the stage succeeded:
    // that row is dead-lettered, the stage completes.
    let url = raw_server(|body| {
        if body.contains("question number 5") {
            // Answered last, whatever order the requests go out in.
            std::thread::sleep(std::time::Duration::from_millis(500));
            (
                403,
                br#"{"error":{"message":"Your input was flagged"}}"#.to_vec(),
            )
        } else {
            (
                200,
                br#"{"choices":[{"message":{"content":"fine"},"finish_reason":"stop"}]}"#.to_vec(),
            )
        }
    });
    let tmp = tempdir();
    let run = tmp.path().join("run");
    let p = pipeline(
        tmp.path(),
        &numbered(0..8),
        &chat_stage(&url, "    max_in_flight: 8\n"),
    );
    run_llm_ok(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"));
    assert_eq!(scalar(tmp.path(), &run, "SELECT count(*) FROM ask"), "7");
    let failed = sql_json(tmp.path(), &run, "SELECT prompt, reason FROM ask__failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["prompt"], "question number 5");
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("HTTP 403"),
        "{failed:?}"
    );
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with the openssl command
/// (Debian's `openssl`): `(ca.pem, cert.pem, key.pem)` in `dir`. A self-signed certificate
/// alone would not do: rustls refuses a CA certificate as a server's own.
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian's openssl package; .ci/run installs it)");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509", "-days", "2", "-subj", "/CN=ifloom test CA"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "cert.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[test]
fn an_https_endpoint_of_a_private_ca_is_refused_clearly_then_trusted_through_ca_cert() {
    let tmp = tempdir();
    let (_, cert, key) = private_ca(&tmp.path().join("certs"));
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "1",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
    ]);
    assert!(sim.url.starts_with("https://127.0.0.1:"), "{}", sim.url);
    let p = keyed_pipeline(tmp.path(), &sim.url, 12);
    let cache = tmp.path().join("c.sqlite");
    let key_var = "sk-ifloom-tls-5b1e";

    // Not trusted: the endpoint check stops the stage before a row is sent, saying why (not
    // "connection refused") and what to set.
    let run = tmp.path().join("run");
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .env("IFLOOM_TEST_KEY", key_var)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("certificate")
            && e.contains("ca_cert")
            && e.contains("is not trusted")
            && !e.contains("is down")
            && !e.contains("connection refused"),
        "{e}"
    );
    assert!(!run.join("stages/ask/manifest.json").exists());

    // A wrong path is a validation error at its line, before anything runs.
    let text = std::fs::read_to_string(&p).unwrap();
    let with = |ca: &str| {
        text.replace(
            "    api_key_env: IFLOOM_TEST_KEY\n",
            &format!("    api_key_env: IFLOOM_TEST_KEY\n    ca_cert: {ca}\n"),
        )
    };
    std::fs::write(&p, with("certs/nope.pem")).unwrap();
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("p.yaml:7:14") && e.contains("ca_cert: cannot read") && e.contains("nope.pem"),
        "{e}"
    );
    std::fs::write(&p, with("certs/key.pem")).unwrap();
    let e = stderr(&ifloom(tmp.path(), &["validate", s(&p)]));
    assert!(e.contains("holds no `-----BEGIN CERTIFICATE-----`"), "{e}");

    // The CA (relative to the pipeline file): every row answered over https, the key sent.
    std::fs::write(&p, with("certs/ca.pem")).unwrap();
    let o = run_cmd(tmp.path(), &p, &run, &cache)
        .env("IFLOOM_TEST_KEY", key_var)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = sql_rows(
        tmp.path(),
        &run,
        "SELECT prompt, response, response_error IS NULL FROM ask",
    );
    assert_eq!(rows.len(), 12);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], format!("question number {i}"));
        assert_eq!(row[1], format!("echo: Q: question number {i}"));
        assert_eq!(row[2], "true");
    }
    assert_eq!(counters(&run)["requests"], 12);
    // The cache works the same behind TLS: a fresh run directory sends nothing.
    let again = tmp.path().join("run2");
    let o = run_cmd(tmp.path(), &p, &again, &cache)
        .env("IFLOOM_TEST_KEY", key_var)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(counters(&again)["requests"], 0);
}

/// `turns: <column>`: a row's earlier turns go out as chat messages at that place (ShareGPT's
/// `from`/`value` or `role`/`content`); a null column sends none; a turn with a role no chat
/// server knows dead-letters its row with the reason. Checked in the bodies the simulator got.
#[test]
fn turns_become_chat_messages() {
    let tmp = tempdir();
    let record = tmp.path().join("requests.jsonl");
    let sim = Sim::start(&["--slots", "4", "--base-ms", "1", "--record", s(&record)]);
    let rows = [
        json!({"prompt": "q1", "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json!({"prompt": "q2", "history": null}),
        json!({"prompt": "q3", "history": [{"role": "narrator", "content": "once"}]}),
    ];
    let stage = format!(
        "    endpoints: [\"{}\"]\n    messages:\n      - {{role: system, content: \"Be brief.\"}}\n      - turns: history\n      - {{role: user, content: \"Q: {{{{ prompt }}}}\"}}\n",
        sim.url
    );
    let p = pipeline(tmp.path(), &rows, &stage);
    let run = tmp.path().join("run");
    run_llm_ok(tmp.path(), &p, &run, &tmp.path().join("c.sqlite"));
    let sent: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut msgs: Vec<Value> = sent.iter().map(|r| r["messages"].clone()).collect();
    msgs.sort_by_key(|m| m.to_string());
    assert_eq!(
        msgs,
        vec![
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: q2"}]),
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Q: q1"}]),
        ]
    );
    assert_eq!(scalar(tmp.path(), &run, "SELECT count(*) FROM ask"), "2");
    let failed = sql_json(tmp.path(), &run, "SELECT reason FROM ask__failed");
    assert_eq!(failed.len(), 1);
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "turn 1 of `history` has a role other than user/human, assistant/gpt or system"
        ),
        "{reason}"
    );
}

#[test]
fn turns_mistakes_are_named_at_validate_time() {
    let tmp = tempdir();
    let rows = [json!({"prompt": "q1", "history": "not turns"})];
    // Config: a turns entry with a role, a message without one.
    let stage = "    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - {turns: history, role: user}\n      - {content: \"Q\"}\n";
    let p = pipeline(tmp.path(), &rows, stage);
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(":11:9: stage 'ask': a `turns` entry takes no `role`, `content` or `file`"),
        "{e}"
    );
    assert!(
        e.contains(":12:9: stage 'ask': a message needs a `role`"),
        "{e}"
    );
    // Plan: a text column, and a column that does not exist (with a suggestion).
    let stage = "    endpoints: [\"http://127.0.0.1:9/v1\"]\n    messages:\n      - turns: history\n      - turns: histroy\n      - {role: user, content: \"Q\"}\n";
    let p = pipeline(tmp.path(), &rows, stage);
    let o = ifloom(tmp.path(), &["validate", s(&p)]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(":11:16: stage 'ask': turns: column `history` is Utf8, expected a list of {role, content} or {from, value}"),
        "{e}"
    );
    assert!(
        e.contains(":12:16: stage 'ask'") && e.contains("histroy"),
        "{e}"
    );
    assert!(e.contains("history"), "{e}");
}
