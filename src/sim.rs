//! A simulated OpenAI-compatible LLM server that behaves like a vLLM server under load.
//!
//! It exists so that the `llm` stage, its client (retries, concurrency, caching) and the
//! benchmarks can be exercised without a GPU: tests, benchmarks and offline demos point the
//! pipeline at `ifloom sim` instead of vLLM. Everything it does is deterministic except
//! wall-clock timing:
//!
//! - **Endpoints.** `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` in the
//!   OpenAI shapes; `GET /sim/stats` and `POST /sim/reset` for the counters. Streaming is not
//!   simulated (`stream: true` is a 400).
//! - **Content.** The first [`Rule`] whose regex matches the last user message (the prompt for
//!   `/v1/completions`) answers, with `$1` / `${name}` expanded as in
//!   [`regex::Captures::expand`]; otherwise `echo: <last user message>`, or `{}` when the request
//!   asks for JSON output. With `n > 1`, choice `i` is distinct and reproducible: `echo[i]: ...`,
//!   or the rule's `responses[i]`, or its template prefixed `[i] ` (canned JSON stays identical
//!   in every choice, so it stays valid). Tokens are whitespace-separated words; `max_tokens`
//!   keeps the first ones and sets `finish_reason: "length"`.
//! - **Latency.** `slots` concurrent sequences (a FIFO semaphore, like vLLM's running batch);
//!   requests beyond that queue. A request holds its slots for
//!   `base_ms + per_token_ms * completion_tokens`, so capacity is `slots / mean service time`.
//!   The slots run on a planned clock like a GPU engine's: a queued request starts when the
//!   previous sequence in its slot was planned to end, so late timers on a busy machine delay
//!   responses without lowering the capacity.
//!   A request with `n` choices (or several prompts) is that many sequences: it holds
//!   `min(sequences, slots)` permits, for as many rounds as it needs to run all its sequences,
//!   each round as long as its longest choice (sequences of a batch decode in parallel).
//! - **Faults.** Each request draws one number from `xxh3(seed, request key, attempt number of
//!   that key)`, so a retry of the same request draws anew and the outcome does not depend on
//!   how concurrent requests interleave. The rates partition `[0, 1)` in the order 500, 429,
//!   hang, malformed, drop. 500 and 429 (with `Retry-After: 1`) answer at once without taking a
//!   slot; a hang sleeps `hang_ms` (600 s by default) without a slot, then answers normally;
//!   malformed and drop happen after the request was served: malformed sends a 200 whose JSON
//!   body is cut in half, drop closes the TCP connection without writing any response (the
//!   connection's socket wrapper refuses the write, so hyper closes it). With `max_queue`, a
//!   request that finds every slot busy and the queue full is shed with a 429 (`Retry-After: 1`).
//! - **Context length.** With `max_model_len`, a prompt (in words) that does not fit, or whose
//!   `max_tokens` does not fit beside it, gets a 400 worded as vLLM words it.
//! - **Counters.** Per request key: the `x-ifloom-request-id` header if present, otherwise the
//!   xxh3 of the body's canonical JSON ([`request_key`]). `GET /sim/stats` also reports
//!   `in_flight` (sequences holding slots, so `max_in_flight_seen <= slots`), `queued`
//!   (requests waiting for slots), `by_status` (HTTP statuses sent, plus `dropped`, and
//!   `cancelled` when the client gave up first, e.g. on a hang), `faults` (faults drawn), and
//!   `slot_seconds` / `late_seconds` (planned slot time, and the summed delay of responses past
//!   their planned end: positive when timers fire late), `active_seconds` (from the first
//!   planned start to the last planned end).
//!   Only completion requests are counted.
//! - **Classification.** `POST /predict` (Text Embeddings Inference: `inputs` a text, a pair or
//!   a batch of them; per input the `{label, score}` of each class, highest first) and
//!   `POST /classify` or `/v1/classify` (vLLM: `input` a text or a list; `data` with `index`,
//!   `label`, `probs`), as an NLI model with the classes `entailment`, `neutral`,
//!   `contradiction` (mDeBERTa-xnli's order). A pair is matched as `premise\nhypothesis`. The
//!   first rule matching the text answers: `json` a list of three probabilities, or `response`
//!   naming a class (it gets 0.9, the others 0.05); otherwise the probabilities come from
//!   `xxh3(seed, text)` (three 21-bit numbers plus one, normalised). Faults 500 and 429 apply;
//!   bodies are recorded with `record`.
//! - **Recording.** With `record`, every completion request's body is appended to that file
//!   as one JSON line, as received, so a test can check what a client sent (the messages of
//!   a multi-turn request, its params).

use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, Result};

/// The header a client sends to name a logical request; retries of it share the id.
pub const REQUEST_ID_HEADER: &str = "x-ifloom-request-id";

/// Everything the simulator is configured with. The JSON keys are the `ifloom sim` flags with
/// `_` for `-`; every field has a default, so `{}` is a valid config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The one model served; a request naming another model gets a 404, as from vLLM.
    pub model: String,
    /// Sequences decoded concurrently; more requests wait in a FIFO queue.
    pub slots: usize,
    /// Fixed time per request (prefill, scheduling), in milliseconds.
    pub base_ms: u64,
    /// Time per completion token, in milliseconds.
    pub per_token_ms: u64,
    /// Seeds the fault draws.
    pub seed: u64,
    /// Rate of HTTP 500 answers.
    pub fault_500: f64,
    /// Rate of HTTP 429 answers (with `Retry-After: 1`).
    pub fault_429: f64,
    /// Rate of requests that sleep `hang_ms` before answering.
    pub fault_hang: f64,
    /// Rate of 200 answers whose JSON body is truncated.
    pub fault_malformed: f64,
    /// Rate of connections closed without a response.
    pub fault_drop: f64,
    /// How long a hanging request sleeps; long enough for any client timeout to fire.
    pub hang_ms: u64,
    /// Shed load instead of queueing: a request that finds every slot busy and this many
    /// requests already waiting gets a 429 with `Retry-After: 1` (a server behind a
    /// rate-limiting gateway). `None`: queue without bound, as vLLM does.
    pub max_queue: Option<usize>,
    /// The model's context length in tokens (vLLM's `max_model_len`). A prompt that does not
    /// fit, or whose `max_tokens` does not fit beside it, gets vLLM's 400; without
    /// `max_tokens` the answer is cut to the room left. `None`: no limit.
    pub max_model_len: Option<usize>,
    /// Deterministic answers; the first match wins.
    pub rules: Vec<Rule>,
    /// Serve https with this certificate chain (PEM, the server's certificate first) ...
    pub tls_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Append every completion request's JSON body to this file, one line each (what a test
    /// checks the client sent: messages, params).
    pub record: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim-model".into(),
            slots: 64,
            base_ms: 20,
            per_token_ms: 1,
            seed: 1,
            fault_500: 0.0,
            fault_429: 0.0,
            fault_hang: 0.0,
            fault_malformed: 0.0,
            fault_drop: 0.0,
            hang_ms: 600_000,
            max_queue: None,
            max_model_len: None,
            rules: Vec::new(),
            tls_cert: None,
            tls_key: None,
            record: None,
        }
    }
}

/// One content rule. Exactly one of `response`, `responses` and `json` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A regex searched in the last user message (or the completion prompt).
    #[serde(rename = "match")]
    pub pattern: String,
    /// A template with `$1` / `${name}` capture groups (`$$` is a literal `$`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Templates for choices 0, 1, 2, ...; past the end they cycle, prefixed `[i] `.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<String>>,
    /// A canned JSON answer, sent serialized as the content of every choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
}

/// The rules file given with `--rules`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    rules: Vec<Rule>,
}

impl SimConfig {
    /// Read a JSON config file.
    pub fn from_file(path: &Path) -> Result<SimConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::usage(format!("{}: invalid simulator config: {e}", path.display())))
    }

    /// Check rates, slots and rules; [`serve`] refuses a config that fails this.
    pub fn check(&self) -> Result<()> {
        self.compile_rules().map(|_| ())?;
        if self.slots == 0 {
            return Err(Error::usage("simulator: slots must be at least 1"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::usage(
                "simulator: https needs both tls_cert and tls_key (--tls-cert, --tls-key)",
            ));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls_config(cert, key)?;
        }
        let rates = [
            ("fault_500", self.fault_500),
            ("fault_429", self.fault_429),
            ("fault_hang", self.fault_hang),
            ("fault_malformed", self.fault_malformed),
            ("fault_drop", self.fault_drop),
        ];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::usage(format!(
                    "simulator: {name} must be between 0 and 1, got {r}"
                )));
            }
        }
        let sum: f64 = rates.iter().map(|(_, r)| r).sum();
        if sum > 1.0 + 1e-9 {
            return Err(Error::usage(format!(
                "simulator: the fault rates add up to {sum}, more than 1"
            )));
        }
        Ok(())
    }

    fn compile_rules(&self) -> Result<Vec<CompiledRule>> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let bad =
                    |m: String| Error::usage(format!("simulator rule {i} (`{}`): {m}", r.pattern));
                let re = Regex::new(&r.pattern).map_err(|e| bad(e.to_string()))?;
                let answer = match (&r.response, &r.responses, &r.json) {
                    (Some(t), None, None) => Answer::Templates(vec![t.clone()]),
                    (None, Some(ts), None) if !ts.is_empty() => Answer::Templates(ts.clone()),
                    (None, None, Some(v)) => Answer::Json(v.to_string()),
                    _ => {
                        return Err(bad(
                            "needs exactly one of `response`, `responses` (non-empty) or `json`"
                                .into(),
                        ));
                    }
                };
                Ok(CompiledRule { re, answer })
            })
            .collect()
    }
}

/// Read a rules file: `{"rules": [{"match": ..., "response" | "responses" | "json": ...}]}`.
pub fn rules_from_file(path: &Path) -> Result<Vec<Rule>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<RulesFile>(&text)
        .map(|f| f.rules)
        .map_err(|e| Error::usage(format!("{}: invalid rules file: {e}", path.display())))
}

/// The key the counters use for a request without `x-ifloom-request-id`: xxh3-64 (hex) of the
/// body's canonical JSON (object keys sorted, no whitespace).
pub fn request_key(body: &Value) -> String {
    let s = crate::json::canonical_string(body);
    format!("{:016x}", xxh3_64(s.as_bytes()))
}

/// Serve the simulator on `listener` until the process ends (or the task is aborted). In
/// process, bind `127.0.0.1:0` and `tokio::spawn(serve(config, listener))`.
pub async fn serve(config: SimConfig, listener: TcpListener) -> Result<()> {
    config.check()?;
    let incoming = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => tls_handshakes(listener, tls_config(cert, key)?),
        _ => Incoming::Plain(listener),
    };
    let recorder = match &config.record {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?,
        )),
        None => None,
    };
    let sim = Arc::new(Sim {
        recorder,
        rules: config.compile_rules()?,
        slots: Semaphore::new(config.slots),
        free_at: Mutex::new(
            std::iter::repeat_n(std::cmp::Reverse(Instant::now()), config.slots).collect(),
        ),
        stats: Mutex::new(Stats::default()),
        next_id: AtomicU64::new(0),
        config,
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/predict", post(predict))
        .route("/classify", post(classify))
        .route("/v1/classify", post(classify))
        .route("/sim/stats", get(stats))
        .route("/sim/reset", post(reset))
        .with_state(sim);
    axum::serve(
        SimListener(incoming),
        app.into_make_service_with_connect_info::<CutSwitch>(),
    )
    .await
    .map_err(|e| Error::Internal(format!("simulator server stopped: {e}")))
}

enum Answer {
    Templates(Vec<String>),
    /// Serialized once; identical for every choice so it stays valid JSON.
    Json(String),
}

struct CompiledRule {
    re: Regex,
    answer: Answer,
}

struct Sim {
    config: SimConfig,
    rules: Vec<CompiledRule>,
    slots: Semaphore,
    /// When each slot's last sequence is planned to end (earliest first); see `occupy_slots`.
    free_at: Mutex<BinaryHeap<std::cmp::Reverse<Instant>>>,
    stats: Mutex<Stats>,
    next_id: AtomicU64,
    /// `record`: the file request bodies are appended to.
    recorder: Option<Mutex<std::fs::File>>,
}

#[derive(Default)]
struct Stats {
    requests_total: u64,
    /// HTTP statuses sent, plus `dropped` and `cancelled` (the client went away first).
    by_status: BTreeMap<String, u64>,
    faults: BTreeMap<String, u64>,
    per_request: BTreeMap<String, u64>,
    /// Sequences holding a slot.
    in_flight: usize,
    max_in_flight_seen: usize,
    /// Requests waiting for slots.
    queued: usize,
    /// Slot-seconds held (permits x time), and by how much the holds differed from the planned
    /// ones in sum (positive: timers fired late). With `slot_seconds / (slots x wall)` a
    /// benchmark tells a client that left slots idle from a simulator whose timers fire late
    /// on a busy machine.
    slot_seconds: f64,
    late_seconds: f64,
    /// Slot time left unused because no request was waiting when the slot became free.
    idle_seconds: f64,
    /// The first planned start and the last planned end: slots × their distance is the
    /// capacity offered while the client was sending, without its start-up and tail.
    first_start: Option<Instant>,
    last_end: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ServerError,
    RateLimited,
    Hang,
    Malformed,
    Drop,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::ServerError => "500",
            Fault::RateLimited => "429",
            Fault::Hang => "hang",
            Fault::Malformed => "malformed",
            Fault::Drop => "drop",
        }
    }

    /// The error response of a fault that refuses the request before it is served (a 500, a
    /// 429 with `Retry-After`); `None` for the faults that act on a served answer.
    fn refusal(self) -> Option<Response> {
        match self {
            Fault::ServerError => Some(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulated internal server error",
            )),
            Fault::RateLimited => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "simulated rate limit; retry after 1 s",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Some(r)
            }
            Fault::Hang | Fault::Malformed | Fault::Drop => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Api {
    Chat,
    Completions,
}

impl Sim {
    fn stats(&self) -> MutexGuard<'_, Stats> {
        // A panic while holding the lock leaves plain counters behind; keep serving.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot_free_at(&self) -> MutexGuard<'_, BinaryHeap<std::cmp::Reverse<Instant>>> {
        self.free_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn draw_fault(&self, key: &str, attempt: u64) -> Option<Fault> {
        let c = &self.config;
        let h = xxh3_64_with_seed(format!("{key}\n{attempt}").as_bytes(), c.seed);
        // 53 bits: exactly representable, uniform in [0, 1).
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        let mut edge = 0.0;
        for (rate, fault) in [
            (c.fault_500, Fault::ServerError),
            (c.fault_429, Fault::RateLimited),
            (c.fault_hang, Fault::Hang),
            (c.fault_malformed, Fault::Malformed),
            (c.fault_drop, Fault::Drop),
        ] {
            edge += rate;
            if rate > 0.0 && u < edge {
                return Some(fault);
            }
        }
        None
    }

    async fn handle(
        &self,
        api: Api,
        headers: &HeaderMap,
        body: &Bytes,
        cut: &CutSwitch,
    ) -> Response {
        let parsed = serde_json::from_slice::<Value>(body);
        if let (Some(rec), Ok(v)) = (&self.recorder, &parsed) {
            use std::io::Write as _;
            let mut f = rec.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{v}");
        }
        let key = match headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
            Some(id) => id.to_string(),
            None => match &parsed {
                Ok(v) => request_key(v),
                Err(_) => format!("{:016x}", xxh3_64(body)),
            },
        };
        let attempt = {
            let mut st = self.stats();
            st.requests_total += 1;
            let n = st.per_request.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let fault = self.draw_fault(&key, attempt);
        if let Some(f) = fault {
            *self.stats().faults.entry(f.label().into()).or_default() += 1;
        }
        let outcome = Outcome {
            sim: self,
            done: false,
        };
        let response = match fault.and_then(Fault::refusal) {
            Some(r) => r,
            None if self.shed() => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "simulated overload: every slot is busy and the queue is full",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            _ => {
                if fault == Some(Fault::Hang) {
                    tokio::time::sleep(Duration::from_millis(self.config.hang_ms)).await;
                }
                match parsed {
                    Ok(v) => self.complete(api, &v).await,
                    Err(e) => error(
                        StatusCode::BAD_REQUEST,
                        &format!("the body is not valid JSON: {e}"),
                    ),
                }
            }
        };
        match fault {
            Some(Fault::Drop) => {
                cut.0.store(true, Ordering::SeqCst);
                outcome.record("dropped");
                response
            }
            Some(Fault::Malformed) => {
                let status = response.status();
                outcome.record(status.as_str());
                let body = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
                    Ok(b) => b,
                    Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
                };
                // Every body here is a JSON object, and no proper prefix of an object is valid
                // JSON; cutting at a char boundary keeps it valid UTF-8 so only the JSON breaks.
                let text = String::from_utf8_lossy(&body);
                let mut cut_at = text.len() / 2;
                while !text.is_char_boundary(cut_at) {
                    cut_at -= 1;
                }
                (
                    status,
                    [(header::CONTENT_TYPE, "application/json")],
                    text[..cut_at].to_string(),
                )
                    .into_response()
            }
            _ => {
                outcome.record(response.status().as_str());
                response
            }
        }
    }

    /// Whether `max_queue` turns this request away.
    fn shed(&self) -> bool {
        match self.config.max_queue {
            Some(q) => self.slots.available_permits() == 0 && self.stats().queued >= q,
            None => false,
        }
    }

    async fn complete(&self, api: Api, req: &Value) -> Response {
        let bad = |m: &str| error(StatusCode::BAD_REQUEST, m);
        if req.get("stream").and_then(Value::as_bool) == Some(true) {
            return bad("stream: true is not supported by the simulator");
        }
        match req.get("model") {
            None | Some(Value::Null) => {}
            Some(Value::String(m)) if *m == self.config.model => {}
            Some(m) => {
                let m = m.as_str().map_or_else(|| m.to_string(), str::to_string);
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("The model `{m}` does not exist."),
                );
            }
        }
        // The text rules match against, the prompt token count, and the longest prompt.
        let (targets, prompt_tokens, longest) = match api {
            Api::Chat => {
                let Some(messages) = req.get("messages").and_then(Value::as_array) else {
                    return bad("`messages` must be an array");
                };
                let mut last_user = String::new();
                let mut words = 0;
                for m in messages {
                    let text = content_text(m.get("content").unwrap_or(&Value::Null));
                    words += word_count(&text);
                    if m.get("role").and_then(Value::as_str) == Some("user") {
                        last_user = text;
                    }
                }
                (vec![last_user], words, words)
            }
            Api::Completions => {
                let prompts = match req.get("prompt") {
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect(),
                    _ => return bad("`prompt` must be a string or a non-empty array of strings"),
                };
                let words = prompts.iter().map(|p| word_count(p)).sum();
                let longest = prompts.iter().map(|p| word_count(p)).max().unwrap_or(0);
                (prompts, words, longest)
            }
        };
        let n = match req.get("n") {
            None | Some(Value::Null) => 1,
            Some(v) => match v.as_u64() {
                Some(n @ 1..=1024) => n as usize,
                _ => return bad("`n` must be an integer from 1 to 1024"),
            },
        };
        let max_tokens = match req
            .get("max_tokens")
            .or_else(|| req.get("max_completion_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(m) => Some(m as usize),
                None => return bad("`max_tokens` must be a non-negative integer"),
            },
        };
        // vLLM's checks and wording (0.8 and later) when the request does not fit the context.
        let max_tokens = match (self.config.max_model_len, max_tokens) {
            (None, m) => m,
            (Some(len), _) if longest >= len => {
                return bad(&format!(
                    "This model's maximum context length is {len} tokens. However, your request has {longest} input tokens. Please reduce the length of the input messages."
                ));
            }
            (Some(len), Some(m)) if longest + m > len => {
                return bad(&format!(
                    "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length is {len} tokens and your request has {longest} input tokens ({m} > {len} - {longest})."
                ));
            }
            (Some(len), m) => Some(m.unwrap_or(len - longest)),
        };
        // Token log-probabilities with `k` alternatives: chat asks with `logprobs: true` and
        // `top_logprobs: k`, completions with `logprobs: k`.
        let logprobs = match api {
            Api::Chat => (req.get("logprobs").and_then(Value::as_bool) == Some(true)).then(|| {
                req.get("top_logprobs")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(20) as usize
            }),
            Api::Completions => req
                .get("logprobs")
                .and_then(Value::as_u64)
                .map(|k| k.min(20) as usize),
        };
        let json_mode = matches!(
            req.pointer("/response_format/type").and_then(Value::as_str),
            Some("json_object" | "json_schema")
        );

        let mut choices = Vec::with_capacity(targets.len() * n);
        for target in &targets {
            for i in 0..n {
                let text = self.answer(target, i, json_mode);
                let words: Vec<&str> = text.split_whitespace().collect();
                let (content, finish) = match max_tokens {
                    Some(m) if words.len() > m => (words[..m].join(" "), "length"),
                    _ => (text.clone(), "stop"),
                };
                choices.push((word_count(&content), content, finish));
            }
        }
        let completion_tokens: usize = choices.iter().map(|c| c.0).sum();

        self.occupy_slots(
            choices.len(),
            choices.iter().map(|c| c.0).max().unwrap_or(0),
        )
        .await;

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let choices: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(index, (_, content, finish))| {
                let lp = logprobs.map_or(Value::Null, |k| token_logprobs(api, &content, k));
                match api {
                    Api::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": lp,
                        "finish_reason": finish,
                    }),
                    Api::Completions => json!({
                        "index": index,
                        "text": content,
                        "logprobs": lp,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let (id_prefix, object) = match api {
            Api::Chat => ("chatcmpl", "chat.completion"),
            Api::Completions => ("cmpl", "text_completion"),
        };
        let body = json!({
            "id": format!("{id_prefix}-sim-{id}"),
            "object": object,
            "created": created,
            "model": self.config.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        });
        json_response(StatusCode::OK, &body)
    }

    /// The content of choice `i` for `target`: distinct per choice except canned JSON.
    fn answer(&self, target: &str, i: usize, json_mode: bool) -> String {
        // The choice index goes first, so choices stay distinct when max_tokens cuts them.
        let variant = |s: String, fresh: bool| {
            if fresh { s } else { format!("[{i}] {s}") }
        };
        for rule in &self.rules {
            let Some(caps) = rule.re.captures(target) else {
                continue;
            };
            return match &rule.answer {
                Answer::Json(s) => s.clone(),
                Answer::Templates(ts) => {
                    let mut out = String::new();
                    caps.expand(&ts[i % ts.len()], &mut out);
                    variant(out, i < ts.len())
                }
            };
        }
        if json_mode {
            "{}".into()
        } else {
            match i {
                0 => format!("echo: {target}"),
                _ => format!("echo[{i}]: {target}"),
            }
        }
    }

    /// Hold slots for the simulated decoding time of `sequences` sequences, the longest
    /// `longest` tokens. More sequences than slots run in rounds.
    async fn occupy_slots(&self, sequences: usize, longest: usize) {
        let slots = self.config.slots;
        let permits = sequences.clamp(1, slots);
        let rounds = sequences.div_ceil(slots).max(1) as u32;
        let per_round = self
            .config
            .base_ms
            .saturating_add(self.config.per_token_ms.saturating_mul(longest as u64));
        let arrived = Instant::now();
        let queued = Gauge::new(self, 1, |s| &mut s.queued);
        // `permits <= slots` and the semaphore is never closed, so this cannot fail.
        let Ok(permit) = self.slots.acquire_many(permits as u32).await else {
            return;
        };
        drop(queued);
        let planned = Duration::from_millis(per_round) * rounds;
        // The slots keep their own clock, as a GPU engine does: a sequence starts when its
        // request arrived or when the sequence before it in the slot was planned to end,
        // whichever is later, not when that sequence's timer happened to fire. A late timer
        // or a slow hand-off through the semaphore then delays a response but does not make
        // the server slower than its nominal `slots / base_ms`; no request is ever served in
        // less than `planned` after it arrived.
        let (start, free_since) = {
            let mut free = self.slot_free_at();
            let mut latest = None;
            for _ in 0..permits {
                // The lease below pushes its deadlines back before it releases its permits,
                // so there are at least as many entries as available permits.
                if let Some(std::cmp::Reverse(t)) = free.pop() {
                    latest = latest.max(Some(t));
                }
            }
            (latest.map_or(arrived, |t| t.max(arrived)), latest)
        };
        let lease = Lease {
            sim: self,
            n: permits,
            start,
            deadline: start + planned,
            _permit: permit,
        };
        // After `lease`, so it drops first: `in_flight` never counts a released slot.
        let _running = Gauge::new(self, permits, |s| &mut s.in_flight);
        {
            let mut st = self.stats();
            st.first_start = Some(st.first_start.map_or(start, |t| t.min(start)));
            st.last_end = Some(
                st.last_end
                    .map_or(lease.deadline, |t| t.max(lease.deadline)),
            );
        }
        // tokio's timer rounds a deadline up to its next 1 ms tick (0.5 ms late on average);
        // asking for half a tick less centres the delivery error on zero.
        tokio::time::sleep_until((lease.deadline - HALF_TICK).into()).await;
        let now = Instant::now();
        let late = now.saturating_duration_since(lease.deadline).as_secs_f64()
            - lease.deadline.saturating_duration_since(now).as_secs_f64();
        let mut st = self.stats();
        if let Some(f) = free_since {
            st.idle_seconds += permits as f64 * arrived.saturating_duration_since(f).as_secs_f64();
        }
        st.slot_seconds += permits as f64 * planned.as_secs_f64();
        st.late_seconds += permits as f64 * late;
        // Before `_running` drops: its Drop takes the same lock.
        drop(st);
    }
}

/// Slots held by one request; gives them back (their planned end into the slot clock, then
/// the permits) when the request is served or its client went away.
struct Lease<'a> {
    sim: &'a Sim,
    n: usize,
    start: Instant,
    deadline: Instant,
    /// Dropped after `drop` below pushed the deadlines: fields drop after the body.
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // A cancelled request frees its slots now (vLLM aborts the sequence).
        let end = self.deadline.min(Instant::now().max(self.start));
        let mut free = self.sim.slot_free_at();
        for _ in 0..self.n {
            free.push(std::cmp::Reverse(end));
        }
    }
}

const HALF_TICK: Duration = Duration::from_micros(500);

/// Adds to a stats gauge while alive; the drop side runs also when the client disconnects and
/// hyper drops the handler's future.
struct Gauge<'a> {
    sim: &'a Sim,
    n: usize,
    field: fn(&mut Stats) -> &mut usize,
}

impl<'a> Gauge<'a> {
    fn new(sim: &'a Sim, n: usize, field: fn(&mut Stats) -> &mut usize) -> Self {
        let mut st = sim.stats();
        *field(&mut st) += n;
        st.max_in_flight_seen = st.max_in_flight_seen.max(st.in_flight);
        Gauge { sim, n, field }
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        let mut st = self.sim.stats();
        let g = (self.field)(&mut st);
        *g = g.saturating_sub(self.n);
    }
}

/// Records how a request ended; `cancelled` when its future is dropped first.
struct Outcome<'a> {
    sim: &'a Sim,
    done: bool,
}

impl Outcome<'_> {
    fn record(mut self, label: &str) {
        self.done = true;
        *self.sim.stats().by_status.entry(label.into()).or_default() += 1;
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.done {
            *self
                .sim
                .stats()
                .by_status
                .entry("cancelled".into())
                .or_default() += 1;
        }
    }
}

fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        // The multi-part form: [{"type": "text", "text": "..."}, ...].
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Deterministic log-probabilities for `content`'s tokens (words), with `k` alternatives each
/// (the token itself first, then `<token>~1`, ... each a nat less likely), in the server's
/// shape for `api`.
fn token_logprobs(api: Api, content: &str, k: usize) -> Value {
    let words: Vec<&str> = content.split_whitespace().collect();
    let lp = |w: &str| -(((w.len() % 7) + 1) as f64) / 10.0;
    let alternatives = |w: &str| -> Vec<(String, f64)> {
        (0..k)
            .map(|j| {
                let t = if j == 0 {
                    w.to_string()
                } else {
                    format!("{w}~{j}")
                };
                (t, lp(w) - j as f64)
            })
            .collect()
    };
    match api {
        Api::Chat => json!({
            "content": words.iter().map(|w| json!({
                "token": w,
                "logprob": lp(w),
                "bytes": w.as_bytes(),
                "top_logprobs": alternatives(w).into_iter()
                    .map(|(t, l)| json!({"token": t, "logprob": l}))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        Api::Completions => json!({
            "tokens": words,
            "token_logprobs": words.iter().map(|w| lp(w)).collect::<Vec<_>>(),
            "top_logprobs": words.iter().map(|w| {
                alternatives(w)
                    .into_iter()
                    .map(|(t, l)| (t, json!(l)))
                    .collect::<serde_json::Map<String, Value>>()
            }).collect::<Vec<_>>(),
        }),
    }
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, message: &str) -> Response {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        429 => "RateLimitError",
        _ => "InternalServerError",
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}}),
    )
}

async fn models(State(sim): State<Arc<Sim>>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{"id": sim.config.model, "object": "model", "created": 0, "owned_by": "ifloom-sim",
                      "max_model_len": sim.config.max_model_len}],
        }),
    )
}

async fn chat(
    State(sim): State<Arc<Sim>>,
    ConnectInfo(cut): ConnectInfo<CutSwitch>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.handle(Api::Chat, &headers, &body, &cut).await
}

async fn completions(
    State(sim): State<Arc<Sim>>,
    ConnectInfo(cut): ConnectInfo<CutSwitch>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    sim.handle(Api::Completions, &headers, &body, &cut).await
}

/// The classes of the simulated NLI model, in its output order.
pub const NLI_LABELS: [&str; 3] = ["entailment", "neutral", "contradiction"];

impl Sim {
    /// The class probabilities for `text` (see the module docs).
    fn classify_text(&self, text: &str) -> Vec<f64> {
        for rule in &self.rules {
            if !rule.re.is_match(text) {
                continue;
            }
            match &rule.answer {
                Answer::Json(j) => {
                    if let Ok(v) = serde_json::from_str::<Vec<f64>>(j)
                        && v.len() == NLI_LABELS.len()
                    {
                        return v;
                    }
                }
                Answer::Templates(ts) => {
                    let name = ts[0].trim().to_lowercase();
                    if let Some(at) = NLI_LABELS.iter().position(|l| *l == name) {
                        return (0..NLI_LABELS.len())
                            .map(|i| if i == at { 0.9 } else { 0.05 })
                            .collect();
                    }
                }
            }
        }
        let h = xxh3_64_with_seed(text.as_bytes(), self.config.seed);
        let raw: Vec<f64> = (0..3)
            .map(|k| ((h >> (k * 21)) & 0x1F_FFFF) as f64 + 1.0)
            .collect();
        let sum: f64 = raw.iter().sum();
        raw.iter().map(|r| r / sum).collect()
    }

    /// Record, count and draw a fault for a classification request; `Err` is the answer when
    /// a fault (500, 429) or a bad body ends it.
    fn classification_request(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> std::result::Result<Value, Box<Response>> {
        let parsed = serde_json::from_slice::<Value>(body);
        if let (Some(rec), Ok(v)) = (&self.recorder, &parsed) {
            use std::io::Write as _;
            let mut f = rec.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(f, "{v}");
        }
        let key = match headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
            Some(id) => id.to_string(),
            None => format!("{:016x}", xxh3_64(body)),
        };
        let attempt = {
            let mut st = self.stats();
            st.requests_total += 1;
            let n = st.per_request.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let refused = self.draw_fault(&key, attempt).and_then(Fault::refusal);
        let response = match (refused, parsed) {
            (Some(r), _) => Err(Box::new(r)),
            (None, Ok(v)) => Ok(v),
            (None, Err(e)) => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not valid JSON: {e}"),
            ))),
        };
        let status = match &response {
            Ok(_) => "200".to_string(),
            Err(r) => r.status().as_str().to_string(),
        };
        *self.stats().by_status.entry(status).or_default() += 1;
        response
    }
}

/// One TEI input as the text rules see: a text, or a pair joined by a line break.
fn tei_text(input: &Value) -> Option<String> {
    match input {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if (1..=2).contains(&a.len()) && a.iter().all(Value::is_string) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// Text Embeddings Inference's `POST /predict`.
async fn predict(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match sim.classification_request(&headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let inputs = &req["inputs"];
    // A batch is a list of lists; a text or one pair is a single input.
    let (texts, batch) = match inputs {
        Value::Array(a) if a.iter().all(Value::is_array) && !a.is_empty() => {
            (a.iter().map(tei_text).collect::<Option<Vec<_>>>(), true)
        }
        other => (tei_text(other).map(|t| vec![t]), false),
    };
    let Some(texts) = texts else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "inputs must be a text, a pair of texts or a batch of them",
        );
    };
    let answers: Vec<Value> = texts
        .iter()
        .map(|t| {
            let probs = sim.classify_text(t);
            let mut preds: Vec<(f64, &str)> = probs
                .iter()
                .copied()
                .zip(NLI_LABELS.iter().copied())
                .collect();
            preds.sort_by(|a, b| b.0.total_cmp(&a.0));
            Value::Array(
                preds
                    .into_iter()
                    .map(|(score, label)| json!({"label": label, "score": score}))
                    .collect(),
            )
        })
        .collect();
    let body = if batch {
        Value::Array(answers)
    } else {
        answers.into_iter().next().unwrap_or(Value::Null)
    };
    json_response(StatusCode::OK, &body)
}

/// vLLM's `POST /classify`.
async fn classify(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match sim.classification_request(&headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match req.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if *m == sim.config.model => {}
        Some(m) => {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "The model `{}` does not exist.",
                    m.as_str().unwrap_or_default()
                ),
            );
        }
    }
    let texts: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a text or a list of texts",
            );
        }
    };
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let probs = sim.classify_text(t);
            let best = (0..probs.len())
                .fold(0, |b, k| if probs[k] > probs[b] { k } else { b });
            json!({"index": i, "label": NLI_LABELS[best], "probs": probs, "num_classes": probs.len()})
        })
        .collect();
    let tokens: usize = texts.iter().map(|t| word_count(t)).sum();
    json_response(
        StatusCode::OK,
        &json!({
            "id": format!("classify-{}", sim.next_id.fetch_add(1, Ordering::Relaxed)),
            "object": "list",
            "created": 0,
            "model": sim.config.model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }),
    )
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    let st = sim.stats();
    let body = json!({
        "requests_total": st.requests_total,
        "by_status": st.by_status,
        "faults": st.faults,
        "in_flight": st.in_flight,
        "queued": st.queued,
        "max_in_flight_seen": st.max_in_flight_seen,
        "slot_seconds": st.slot_seconds,
        "late_seconds": st.late_seconds,
        "idle_seconds": st.idle_seconds,
        "active_seconds": match (st.first_start, st.last_end) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        },
        "per_request": st.per_request,
        "slots": sim.config.slots,
        "model": sim.config.model,
    });
    drop(st);
    json_response(StatusCode::OK, &body)
}

/// Zero the counters. The per-key counts drive the fault draws, so after a reset the same
/// requests meet the same faults again. Gauges of requests still running are kept.
async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    let mut st = sim.stats();
    let (in_flight, queued) = (st.in_flight, st.queued);
    *st = Stats {
        in_flight,
        queued,
        max_in_flight_seen: in_flight,
        ..Stats::default()
    };
    drop(st);
    sim.next_id.store(0, Ordering::Relaxed);
    json_response(StatusCode::OK, &json!({"reset": true}))
}

/// A TCP listener whose connections can be cut by a handler (the drop fault). axum gives a
/// handler no access to its socket, so the switch travels as connect info.
struct SimListener(Incoming);

enum Incoming {
    Plain(TcpListener),
    /// Connections whose TLS handshake has finished, from [`tls_handshakes`].
    Tls(
        tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        SocketAddr,
    ),
}

impl Listener for SimListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let cut = CutSwitch(Arc::new(AtomicBool::new(false)));
        match &mut self.0 {
            Incoming::Plain(l) => {
                // axum's own accept loop for TcpListener, which retries transient errors.
                let (stream, addr) = Listener::accept(l).await;
                let _ = stream.set_nodelay(true);
                let stream = Either::Left(stream);
                (Conn { stream, cut }, addr)
            }
            Incoming::Tls(rx, _) => match rx.recv().await {
                Some((tls, addr)) => {
                    let stream = Either::Right(Box::new(tls));
                    (Conn { stream, cut }, addr)
                }
                // The handshake task ended (the runtime is shutting down).
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.0 {
            Incoming::Plain(l) => l.local_addr(),
            Incoming::Tls(_, addr) => Ok(*addr),
        }
    }
}

/// The server side of `--tls-cert` / `--tls-key`, with the provider reqwest's rustls uses.
fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |path: &Path, e: String| Error::usage(format!("simulator: {}: {e}", path.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "holds no PEM certificate".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS set-up: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(cert, e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accept TCP connections and run each TLS handshake in its own task: done in
/// `Listener::accept`, one slow or broken client would hold up every connection behind it.
fn tls_handshakes(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Incoming {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut listener = listener;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                got = Listener::accept(&mut listener) => got,
                // The server is gone (its future dropped): stop accepting.
                _ = tx.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let shake = acceptor.accept(stream);
                // A failed handshake (a client that does not trust the certificate) is the
                // client's to report; the server just drops the connection.
                if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), shake).await {
                    let _ = tx.send((tls, peer)).await;
                }
            });
        }
    });
    Incoming::Tls(rx, addr)
}

#[derive(Clone)]
struct CutSwitch(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, SimListener>> for CutSwitch {
    fn connect_info(stream: IncomingStream<'_, SimListener>) -> Self {
        stream.io().cut.clone()
    }
}

/// Once cut, writes fail and reads see EOF: hyper then gives up on the connection and drops
/// it, closing the socket before a byte of the response was written.
struct Conn {
    stream: Stream,
    cut: CutSwitch,
}

/// Plain TCP or TLS over it; tokio-util's `Either` reads and writes whichever it holds.
type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

impl Conn {
    fn is_cut(&self) -> bool {
        self.cut.0.load(Ordering::SeqCst)
    }
}

fn cut_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "simulated dropped connection",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_cut() {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_key_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(request_key(&a), request_key(&b));
        assert_eq!(
            crate::json::canonical_string(&a),
            r#"{"a":{"x":"s","y":[1,2]},"b":1}"#
        );
    }

    #[test]
    fn config_check_rejects_bad_rates_and_rules() {
        let ok = SimConfig::default();
        assert!(ok.check().is_ok());
        let too_much = SimConfig {
            fault_500: 0.6,
            fault_drop: 0.5,
            ..SimConfig::default()
        };
        assert!(too_much.check().is_err());
        let bad_rule: SimConfig =
            serde_json::from_str(r#"{"rules": [{"match": "(", "response": "x"}]}"#).unwrap();
        assert!(bad_rule.check().is_err());
        let two_answers: SimConfig =
            serde_json::from_str(r#"{"rules": [{"match": "a", "response": "x", "json": {}}]}"#)
                .unwrap();
        assert!(two_answers.check().is_err());
        assert!(serde_json::from_str::<SimConfig>(r#"{"slotz": 3}"#).is_err());
        let half_tls = SimConfig {
            tls_cert: Some("cert.pem".into()),
            ..SimConfig::default()
        };
        assert!(half_tls.check().is_err());
    }
}
