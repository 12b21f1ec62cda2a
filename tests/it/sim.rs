//! `ifloom sim` as a subprocess, spoken to over real HTTP.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `ifloom sim`; killed when dropped, so a failing test leaves no server behind.
struct Sim {
    child: Child,
    /// Kept open: closing it would make the server's later writes to stdout fail.
    _stdout: BufReader<ChildStdout>,
    /// `http://127.0.0.1:PORT` (without `/v1`).
    root: String,
}

impl Sim {
    fn start(args: &[&str]) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ifloom"))
            .args(["sim", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            // Piped to keep the banner out of the test output; it is one short line, far
            // below the pipe's buffer, so the server never blocks on it.
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ifloom sim");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the first line");
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let mut err = String::new();
            let _ = child.kill();
            let _ = child.wait();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("ifloom sim {args:?} did not start: {line:?}\n{err}");
        };
        let root = url
            .strip_suffix("/v1")
            .expect("url ends with /v1")
            .to_string();
        Sim {
            child,
            _stdout: stdout,
            root,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn chat_body(user: &str) -> Value {
    json!({
        "model": "sim-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": user},
        ],
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    let r = client.get(url).send().await.expect("send");
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json().await.expect("JSON body")
}

fn content(v: &Value, i: usize) -> &str {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in choice {i}: {v}"))
}

#[test]
fn sim_models_echo_usage_and_wrong_model() {
    let sim = Sim::start(&["--base-ms", "1", "--per-token-ms", "0"]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let models = get(&c, &sim.url("/v1/models")).await;
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "sim-model");

        let (status, v) = post(
            &c,
            &sim.url("/v1/chat/completions"),
            &chat_body("hello there world"),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "sim-model");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().is_some());
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(content(&v, 0), "echo: hello there world");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        // 2 words of system prompt + 3 of user prompt; "echo:" + 3 words.
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
        );

        let (status, v) = post(
            &c,
            &sim.url("/v1/completions"),
            &json!({"model": "sim-model", "prompt": "one two"}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "echo: one two");
        assert_eq!(v["usage"]["prompt_tokens"], 2);

        let mut wrong = chat_body("hi");
        wrong["model"] = json!("gpt-4o");
        let (status, v) = post(&c, &sim.url("/v1/chat/completions"), &wrong).await;
        assert_eq!(status, 404, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4o"));
    });
}

#[test]
fn sim_rules_templates_and_canned_json() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        json!({"rules": [
            {"match": r"capital of (?P<country>\w+)", "response": "The capital of ${country} is $1-city."},
            {"match": r"^give me json", "json": {"ok": true, "items": [1, 2]}},
        ]})
        .to_string(),
    )
    .unwrap();
    let sim = Sim::start(&[
        "--rules",
        rules.to_str().unwrap(),
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
    ]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let url = sim.url("/v1/chat/completions");
        let (_, v) = post(&c, &url, &chat_body("What is the capital of France?")).await;
        assert_eq!(content(&v, 0), "The capital of France is France-city.");

        let (_, v) = post(&c, &url, &chat_body("give me json please")).await;
        let parsed: Value = serde_json::from_str(content(&v, 0)).unwrap();
        assert_eq!(parsed, json!({"ok": true, "items": [1, 2]}));

        // JSON requested, no rule matches: an empty object rather than an echo.
        let mut body = chat_body("nothing matches this");
        body["response_format"] = json!({"type": "json_object"});
        let (_, v) = post(&c, &url, &body).await;
        assert_eq!(
            serde_json::from_str::<Value>(content(&v, 0)).unwrap(),
            json!({})
        );
    });
}

#[test]
fn sim_n_choices_are_distinct_and_deterministic() {
    let sim = Sim::start(&["--base-ms", "1", "--per-token-ms", "0"]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let mut body = chat_body("tell me a story");
        body["n"] = json!(3);
        let url = sim.url("/v1/chat/completions");
        let (_, a) = post(&c, &url, &body).await;
        let (_, b) = post(&c, &url, &body).await;
        let texts: Vec<&str> = (0..3).map(|i| content(&a, i)).collect();
        assert_eq!(a["choices"].as_array().unwrap().len(), 3);
        for (i, choice) in a["choices"].as_array().unwrap().iter().enumerate() {
            assert_eq!(choice["index"], i);
        }
        assert!(
            texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2],
            "{texts:?}"
        );
        let again: Vec<&str> = (0..3).map(|i| content(&b, i)).collect();
        assert_eq!(texts, again);
    });
}

#[test]
fn sim_max_tokens_truncates_with_finish_reason_length() {
    let sim = Sim::start(&["--base-ms", "1", "--per-token-ms", "0"]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let mut body = chat_body("a b c d e f g h");
        body["max_tokens"] = json!(3);
        let (_, v) = post(&c, &sim.url("/v1/chat/completions"), &body).await;
        assert_eq!(content(&v, 0), "echo: a b");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    });
}

#[test]
fn sim_latency_is_bounded_by_slots() {
    let sim = Sim::start(&["--slots", "2", "--base-ms", "100", "--per-token-ms", "0"]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let url = sim.url("/v1/chat/completions");
        let start = Instant::now();
        let requests = (0..6).map(|i| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, &chat_body(&format!("request {i}"))).await })
        });
        for r in futures::future::join_all(requests).await {
            assert_eq!(r.unwrap().0, 200);
        }
        // 6 requests of 100 ms through 2 slots: at least 3 rounds, whatever the machine (less
        // the simulator's half-tick timer correction, at most 0.5 ms a round).
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_micros(298_500), "{elapsed:?}");
        let stats = get(&c, &sim.url("/sim/stats")).await;
        // Slot time: 6 planned holds of 100 ms; responses left at most half a tick early.
        let held = stats["slot_seconds"].as_f64().unwrap();
        assert!((held - 0.6).abs() < 1e-6, "{stats}");
        let late = stats["late_seconds"].as_f64().unwrap();
        assert!(late >= -0.003, "{stats}");
        assert_eq!(stats["requests_total"], 6);
        assert_eq!(stats["by_status"]["200"], 6);
        let max = stats["max_in_flight_seen"].as_u64().unwrap();
        assert!((1..=2).contains(&max), "{stats}");
        assert_eq!(stats["in_flight"], 0);
    });
}

#[test]
fn sim_faults_at_rate_one() {
    let rt = rt();
    let body = chat_body("hello");

    let sim = Sim::start(&["--fault-500", "1", "--base-ms", "1"]);
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(sim.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 500);
    });
    drop(sim);

    let sim = Sim::start(&["--fault-429", "1", "--base-ms", "1"]);
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(sim.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
    });
    drop(sim);

    let sim = Sim::start(&["--fault-malformed", "1", "--base-ms", "1"]);
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(sim.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().await.unwrap();
        assert!(!text.is_empty());
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
    });
    drop(sim);

    let sim = Sim::start(&["--fault-hang", "1", "--base-ms", "1"]);
    rt.block_on(async {
        let c = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let err = c
            .post(sim.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect_err("a hanging request must time out");
        assert!(err.is_timeout(), "{err:?}");
    });
    drop(sim);

    let sim = Sim::start(&["--fault-drop", "1", "--base-ms", "1"]);
    rt.block_on(async {
        let c = reqwest::Client::new();
        let result = match c
            .post(sim.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r.bytes().await.map(|_| ()),
            Err(e) => Err(e),
        };
        let err = result.expect_err("a dropped connection must fail");
        assert!(!err.is_timeout(), "{err:?}");
        // The server still counts it.
        let stats = get(&c, &sim.url("/sim/stats")).await;
        assert_eq!(stats["by_status"]["dropped"], 1, "{stats}");
    });
}

#[test]
fn sim_faults_are_seeded() {
    let statuses = |seed: &str| {
        let sim = Sim::start(&["--fault-500", "0.5", "--seed", seed, "--base-ms", "1"]);
        rt().block_on(async {
            let c = reqwest::Client::new();
            let mut out = Vec::new();
            for i in 0..20 {
                let r = c
                    .post(sim.url("/v1/chat/completions"))
                    .header("x-ifloom-request-id", format!("r{}", i % 10))
                    .json(&chat_body("hi"))
                    .send()
                    .await
                    .unwrap();
                out.push(r.status().as_u16());
            }
            out
        })
    };
    let a = statuses("7");
    assert_eq!(a, statuses("7"));
    assert!(a.contains(&500) && a.contains(&200), "{a:?}");
}

#[test]
fn sim_counts_per_request_id_and_resets() {
    let sim = Sim::start(&["--base-ms", "1", "--per-token-ms", "0"]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let url = sim.url("/v1/chat/completions");
        for id in ["a", "a", "b"] {
            let r = c
                .post(&url)
                .header("x-ifloom-request-id", id)
                .json(&chat_body(id))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
        let anonymous = chat_body("no id");
        post(&c, &url, &anonymous).await;

        let stats = get(&c, &sim.url("/sim/stats")).await;
        assert_eq!(stats["requests_total"], 4);
        let key = ifloom::sim::request_key(&anonymous);
        assert_eq!(
            stats["per_request"],
            json!({"a": 2, "b": 1, key: 1}),
            "{stats}"
        );

        let r = c.post(sim.url("/sim/reset")).send().await.unwrap();
        assert!(r.status().is_success());
        let stats = get(&c, &sim.url("/sim/stats")).await;
        assert_eq!(stats["requests_total"], 0);
        assert_eq!(stats["per_request"], json!({}));
        assert_eq!(stats["by_status"], json!({}));
    });
}

#[test]
fn sim_time_per_token_usage_of_n_choices_and_context_length() {
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--base-ms",
        "10",
        "--per-token-ms",
        "20",
        "--max-model-len",
        "12",
    ]);
    rt().block_on(async {
        let c = reqwest::Client::new();
        let url = sim.url("/v1/chat/completions");
        // "echo: a b c" is 4 tokens: one sequence holds a slot for 10 + 4 x 20 ms (planned).
        let (status, v) = post(&c, &url, &chat_body("a b c")).await;
        assert_eq!(status, 200, "{v}");
        let stats = get(&c, &sim.url("/sim/stats")).await;
        let held = stats["slot_seconds"].as_f64().unwrap();
        assert!((held - 0.090).abs() < 1e-6, "{stats}");
        // n = 2: usage adds both choices; the prompt (5 words over both messages) counts once.
        let mut body = chat_body("a b c");
        body["n"] = json!(2);
        let (_, v) = post(&c, &url, &body).await;
        assert_eq!(content(&v, 1), "echo[1]: a b c");
        assert_eq!(v["usage"]["completion_tokens"], 8);
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        // The context: 5 prompt tokens leave 7; max_tokens 8 does not fit, 7 does, and
        // without max_tokens the answer is cut to what is left.
        body["n"] = json!(1);
        body["max_tokens"] = json!(8);
        let (status, v) = post(&c, &url, &body).await;
        assert_eq!(status, 400);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length is 12 tokens and your request has 5 input tokens (8 > 12 - 5)"),
            "{v}"
        );
        body["max_tokens"] = json!(7);
        assert_eq!(post(&c, &url, &body).await.0, 200);
        let models = get(&c, &sim.url("/v1/models")).await;
        assert_eq!(models["data"][0]["max_model_len"], 12);
        let long = chat_body("one two three four five six seven eight nine ten eleven");
        let (status, v) = post(&c, &url, &long).await;
        assert_eq!(status, 400);
        assert!(v["error"]["message"].as_str().unwrap().contains("your request has 13 input tokens"), "{v}");
    });
}
