//! The HTTP client: a pool of OpenAI-compatible endpoints, balanced by least outstanding
//! requests, each with an in-flight limit (fixed, or adaptive: AIMD cut on 429/503/timeouts,
//! grown on success), retries with exponential backoff and full jitter honouring
//! `Retry-After`, and a circuit breaker so a dead server stops eating every row's retries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use hyper::header::HeaderValue;

use super::http::{Reply, Target, Transport};
use super::request::{Api, Profile};
use super::response::{Completion, parse_body, snippet};
use crate::cancel::{Cancel, INTERRUPTED_MSG};

/// Twice vLLM's long-standing default `max_num_seqs` (256): the requests beyond the server's
/// running batch wait in its queue, so a sequence that finishes is replaced at once instead
/// of after a round trip to the client (measured against the simulator's 256 slots, 100k
/// requests, bench part a: 0.945 of capacity with 256 in flight, 0.99 with 512).
fn d_in_flight() -> usize {
    512
}
fn d_timeout() -> f64 {
    600.0
}
fn d_retries() -> u32 {
    6
}
fn d_backoff() -> u64 {
    500
}
fn d_backoff_max() -> u64 {
    30_000
}
fn d_all_down() -> f64 {
    120.0
}
fn d_bench() -> f64 {
    5.0
}

/// One group of interchangeable servers (replicas of the same model). Operational settings
/// only: none of this is part of a stage's fingerprint, so changing it reuses finished work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointGroup {
    /// Base URLs, e.g. `http://127.0.0.1:8000/v1`.
    pub urls: Vec<String>,
    #[serde(default)]
    pub profile: Profile,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight per URL (vLLM batches what is in flight: keep it above the server's
    /// `max_num_seqs`, so that its queue hides each request's round trip).
    #[serde(default = "d_in_flight")]
    pub max_in_flight: usize,
    /// Start at half of `max_in_flight` and find the capacity: double per window of responses
    /// until overloads (429, 503, timeouts) pass 5% of a window, halve then, grow by 1/16 per
    /// clean window.
    #[serde(default)]
    pub adaptive: bool,
    /// Per-request timeout in seconds.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Retries per request after the first attempt.
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    #[serde(default = "d_backoff")]
    pub backoff_ms: u64,
    #[serde(default = "d_backoff_max")]
    pub backoff_max_ms: u64,
    /// A PEM file of CA certificates trusted for this group's `https://` URLs besides the
    /// platform's (a private CA, a self-signed server); relative to the pipeline file.
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// Stop the stage (resumably) when every URL has failed for this many seconds.
    #[serde(default = "d_all_down")]
    pub all_down_s: f64,
    /// A URL that failed 8 requests in a row is benched for this many seconds; then one probe
    /// request at a time goes to it until one succeeds. A failed probe costs its row no retry.
    #[serde(default = "d_bench")]
    pub bench_s: f64,
}

impl EndpointGroup {
    pub fn new(urls: Vec<String>) -> Self {
        EndpointGroup {
            urls,
            profile: Profile::default(),
            api_key_env: None,
            ca_cert: None,
            max_in_flight: d_in_flight(),
            adaptive: false,
            timeout_s: d_timeout(),
            max_retries: d_retries(),
            backoff_ms: d_backoff(),
            backoff_max_ms: d_backoff_max(),
            all_down_s: d_all_down(),
            bench_s: d_bench(),
        }
    }

    /// What is wrong with the numbers (all of it), as `field: problem`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_in_flight == 0 {
            out.push("max_in_flight: must be at least 1".to_string());
        }
        for (name, v, min_exclusive) in [
            ("timeout_s", self.timeout_s, true),
            ("all_down_s", self.all_down_s, false),
            ("bench_s", self.bench_s, false),
        ] {
            // Durations are built from these: a negative or infinite one would panic there.
            let ok = v.is_finite() && v < 1e9 && if min_exclusive { v > 0.0 } else { v >= 0.0 };
            if !ok {
                let bound = if min_exclusive {
                    "above 0"
                } else {
                    "0 or more"
                };
                out.push(format!(
                    "{name}: must be a number of seconds {bound}, got {v}"
                ));
            }
        }
        out
    }
}

/// Why a call failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The row fails (dead-lettered); `raw` keeps the body, byte for byte, when there was one.
    #[error("{message}")]
    Row {
        message: String,
        raw: Option<bytes::Bytes>,
        retries: u32,
    },
    /// The stage must stop (every endpoint down): rerunning resumes from the cache.
    #[error("{0}")]
    Abort(String),
}

enum Attempt {
    Ok(Completion),
    Retry {
        message: String,
        after: Option<Duration>,
        overload: bool,
        /// The server answered (a 429): it is up, whatever else.
        alive: bool,
        /// No connection could be made: the endpoint is down, not this request's fault.
        unreachable: bool,
        /// The body, kept for the dead-letter table if this was the last attempt.
        raw: Option<bytes::Bytes>,
    },
    Fatal {
        message: String,
        raw: Option<bytes::Bytes>,
    },
    /// No request of the stage can succeed (a refused API key, a model the server does not
    /// serve): the stage stops, resumably, instead of dead-lettering every row.
    Stop(String),
}

struct Endpoint {
    url: String,
    /// `{url}/{api.path()}` for each of [`Api::ALL`], parsed once: parsing a string URL on
    /// every request cost ~3% of a sending run's CPU.
    targets: [Target; 2],
    /// `{url}/models`, for the endpoint check.
    models: Target,
    outstanding: AtomicUsize,
    /// Current in-flight limit (changes only in adaptive mode).
    limit: AtomicUsize,
    aimd: Mutex<Window>,
    consecutive_failures: AtomicU32,
    /// The circuit breaker: `None` closed (in use); a time in the future open (benched); a
    /// time past half-open: one probe request at a time until one succeeds.
    down_until: Mutex<Option<Instant>>,
    /// A probe is on the wire to this half-open endpoint.
    probing: AtomicBool,
    /// The last failure of a request to it, for the message when every endpoint is down.
    last_error: Mutex<Option<String>>,
}

/// A Retry-After longer than this is announced (once per stage) instead of waited out
/// silently.
const LONG_WAIT: Duration = Duration::from_secs(30);

pub struct Pool {
    group: EndpointGroup,
    endpoints: Vec<Endpoint>,
    http: Transport,
    /// The `Authorization` header (sensitive: never in debug output).
    auth: Option<HeaderValue>,
    notify: Notify,
    /// Requests wait for a slot in arrival order (tokio's Mutex is FIFO). Without it a
    /// request woken for a freed slot could lose it to one that just arrived and go to the
    /// back of the wait: the first chunk's last requests then waited behind the next chunks'
    /// (measured: the servers drained at every input batch while the oldest chunk waited).
    line: tokio::sync::Mutex<()>,
    all_down_since: Mutex<Option<Instant>>,
    pub retries: AtomicUsize,
    /// Set when an answer showed that no request can succeed (401, 403, 404): why.
    fatal: std::sync::OnceLock<String>,
    /// A long Retry-After was announced already.
    said_long_wait: AtomicBool,
    /// `api_key_env` names a variable that is not set, or holds what cannot be a header:
    /// why nothing can be sent.
    missing_key: Option<String>,
    /// A request of the stage has succeeded (a 403 or 404 after that is the request's own).
    answered: AtomicBool,
    /// The stage's stop signals: Ctrl-C, its grace period, the stage stopping elsewhere.
    cancel: Cancel,
}

/// Adaptive mode's count of the responses since the limit last changed.
#[derive(Debug)]
struct Window {
    responses: usize,
    overloads: usize,
    /// Doubling per window until the first overloaded window, then additive (like TCP).
    slow_start: bool,
}

/// A window is `max(limit, MIN_WINDOW)` responses: small windows would read one stray 429 as
/// a 10% overload rate.
const MIN_WINDOW: usize = 32;
/// The share of overload answers (429, 503, timeouts) in a window above which the limit is
/// halved. A busy shared server answers a few stray 429s whatever the load; a real overload
/// rejects far more than this. Cutting on every single 429 (the textbook rule) never lets the
/// limit grow past a few dozen at a 0.5% stray rate (measured: at most 39 of 256 in flight).
const OVERLOAD_RATE: f64 = 0.05;
/// And at least this many overload answers: in a window of 32, two stray 429s at a 1% rate
/// happen once in 25 windows (enough to stall slow start in a few hundred responses, seen on a
/// busy CI machine), three once in 220.
const MIN_OVERLOADS: usize = 3;

/// Failures in a row before an endpoint is benched for a while.
const TRIP_AFTER: u32 = 8;

impl Pool {
    pub fn new(group: &EndpointGroup, cancel: Cancel) -> Result<Pool, String> {
        // A missing key matters only when something is sent: a stage answered from the cache,
        // a dry run and `batch export` need none. The endpoint check, which comes before the
        // first request, says so.
        let (auth, missing_key) = match &group.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) => match super::http::bearer(k.trim()) {
                    Some(h) => (Some(h), None),
                    None => (
                        None,
                        Some(format!(
                            "environment variable `{var}` (api_key_env) holds a line break or another character an HTTP header cannot carry: export the key alone"
                        )),
                    ),
                },
                Err(_) => (
                    None,
                    Some(format!(
                        "environment variable `{var}` (api_key_env) is not set: export the API key in it"
                    )),
                ),
            },
            None => (None, None),
        };
        // Adaptive mode starts at half the ceiling (256 of the default 512, vLLM's default
        // `max_num_seqs`), so a server that queues is full from the first round trip, and a
        // shedding one is halved down to its size in a few windows of fast 429s. Each round
        // trip of a ramp is one wave of the server's slots, and 10k requests on 256 slots
        // are only 40 waves: slow start from 32 lost over two of them (measured: 0.92 of the
        // simulator's capacity at 10k requests against 0.97 for a fixed window; from 8, 0.75).
        let start = if group.adaptive {
            group.max_in_flight.div_ceil(2)
        } else {
            group.max_in_flight
        };
        let endpoints: Vec<Endpoint> = group
            .urls
            .iter()
            .map(|u| u.trim_end_matches('/'))
            .map(|u| Endpoint {
                url: u.to_string(),
                targets: Api::ALL.map(|api| Target::new(&format!("{u}/{}", api.path()))),
                models: Target::new(&format!("{u}/models")),
                outstanding: AtomicUsize::new(0),
                limit: AtomicUsize::new(start.max(1)),
                aimd: Mutex::new(Window {
                    responses: 0,
                    overloads: 0,
                    slow_start: true,
                }),
                consecutive_failures: AtomicU32::new(0),
                down_until: Mutex::new(None),
                probing: AtomicBool::new(false),
                last_error: Mutex::new(None),
            })
            .collect();
        // reqwest (and the platform's root certificates) only for https endpoints.
        let tls = endpoints.iter().any(|e| matches!(e.models, Target::Tls(_)));
        let roots = match &group.ca_cert {
            Some(p) if tls => {
                super::http::roots(std::path::Path::new(p)).map_err(|e| format!("ca_cert: {e}"))?
            }
            _ => Vec::new(),
        };
        let http = Transport::new(group.max_in_flight.max(8), tls, roots)?;
        Ok(Pool {
            group: group.clone(),
            endpoints,
            http,
            auth,
            notify: Notify::new(),
            line: tokio::sync::Mutex::new(()),
            all_down_since: Mutex::new(None),
            retries: AtomicUsize::new(0),
            fatal: std::sync::OnceLock::new(),
            said_long_wait: AtomicBool::new(false),
            missing_key,
            answered: AtomicBool::new(false),
            cancel,
        })
    }

    pub fn profile(&self) -> Profile {
        self.group.profile
    }

    /// Requests on the wire right now, over all endpoints.
    pub fn in_flight(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| e.outstanding.load(Ordering::Relaxed))
            .sum()
    }

    /// Retries a row may spend (`max_retries`).
    pub fn max_retries(&self) -> u32 {
        self.group.max_retries
    }

    pub fn capacity(&self) -> usize {
        self.group.max_in_flight * self.endpoints.len()
    }

    /// Check every endpoint answers `/models` and serves `model`. All problems in one message.
    pub async fn health_check(&self, model: &str) -> Result<(), String> {
        if let Some(m) = &self.missing_key {
            return Err(m.clone());
        }
        let mut problems = Vec::new();
        let mut down = Vec::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let answer = self
                .http
                .get(&ep.models, self.auth.as_ref(), Duration::from_secs(10))
                .await;
            match answer {
                Err(e) => down.push((i, e)),
                Ok(r) if !r.status.is_success() => {
                    let hint =
                        if r.status == hyper::StatusCode::NOT_FOUND && !ep.url.ends_with("/v1") {
                            " (an OpenAI-compatible base URL usually ends in /v1)"
                        } else {
                            ""
                        };
                    problems.push(format!(
                        "{} answered {} to GET /models{hint}",
                        ep.url, r.status
                    ))
                }
                Ok(r) => {
                    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                    let ids: Vec<String> = v["data"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|m| m["id"].as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    if !ids.is_empty() && !ids.iter().any(|i| i == model) {
                        problems.push(format!(
                            "{} serves {}, not `{model}`",
                            ep.url,
                            ids.join(", ")
                        ));
                    }
                }
            }
        }
        // Replicas that are down while others are up: the stage starts without them, benched
        // and probed like a replica that dies mid-stage. Any other problem (a wrong model, an
        // error answer) is a configuration mistake and stops the stage before it sends.
        if problems.is_empty() && down.len() < self.endpoints.len() {
            for (i, e) in down {
                eprintln!(
                    "ifloom: {}; starting on the other endpoints, probing it every {} s",
                    unusable(&self.endpoints[i].url, &e),
                    self.group.bench_s
                );
                let ep = &self.endpoints[i];
                ep.consecutive_failures.store(TRIP_AFTER, Ordering::Release);
                self.bench(ep);
                if let Ok(mut l) = ep.last_error.lock() {
                    *l = Some(e.message);
                }
            }
            return Ok(());
        }
        problems.extend(
            down.into_iter()
                .map(|(i, e)| unusable(&self.endpoints[i].url, &e)),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Wait (in arrival order) for a slot on the least busy usable endpoint. `Ok((i, probe))`:
    /// endpoint `i`; `probe` when it is half-open and this request is its one probe.
    async fn acquire(&self) -> Result<(usize, bool), CallError> {
        // Only the head of the line waits for a release; the others wait for their turn.
        let _turn = self.line.lock().await;
        loop {
            // Registered before looking, so a release between the look and the wait is not
            // lost; each release wakes one waiter (waking all of them made every release cost
            // a scan per waiting request: hundreds when a chunk queues behind the limit).
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let mut best: Option<(usize, usize)> = None;
            let mut any_closed = false;
            let mut probe = None;
            // When the first bench ends (a bench ends by the clock, not by a release).
            let mut wake = Duration::from_millis(200);
            for (i, ep) in self.endpoints.iter().enumerate() {
                match ep.down_until.lock().map(|d| *d).unwrap_or(None) {
                    Some(t) if t > now => {
                        wake = wake.min(t - now);
                        continue;
                    }
                    Some(_) => {
                        if probe.is_none() && !ep.probing.load(Ordering::Acquire) {
                            probe = Some(i);
                        }
                        continue;
                    }
                    None => {}
                }
                any_closed = true;
                let out = ep.outstanding.load(Ordering::Acquire);
                if out < ep.limit.load(Ordering::Acquire) && best.is_none_or(|(_, b)| out < b) {
                    best = Some((i, out));
                }
            }
            // A half-open endpoint gets its one probe even while others are up: otherwise a
            // replica that came back would never be used again.
            if let Some(i) = probe {
                let ep = &self.endpoints[i];
                if ep
                    .probing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    ep.outstanding.fetch_add(1, Ordering::AcqRel);
                    return Ok((i, true));
                }
            }
            if let Some((i, _)) = best {
                let ep = &self.endpoints[i];
                // Another task may have taken the slot meanwhile: check again after claiming.
                let prev = ep.outstanding.fetch_add(1, Ordering::AcqRel);
                if prev < ep.limit.load(Ordering::Acquire) {
                    return Ok((i, false));
                }
                ep.outstanding.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            if any_closed {
                notified.await;
                continue;
            }
            // Every endpoint is benched or being probed: the stage stops (resumable) once
            // this has lasted `all_down_s`, instead of spending every row's retries; not while
            // a probe is still out (a slow answer is an answer).
            let probing = self
                .endpoints
                .iter()
                .any(|e| e.probing.load(Ordering::Acquire));
            let t = {
                let mut since = self
                    .all_down_since
                    .lock()
                    .map_err(|_| CallError::Abort("lock".into()))?;
                *since.get_or_insert(now)
            };
            if !probing && now.duration_since(t).as_secs_f64() > self.group.all_down_s {
                let last: Vec<String> = self
                    .endpoints
                    .iter()
                    .map(|e| {
                        let err = e.last_error.lock().ok().and_then(|l| l.clone());
                        format!("{}: {}", e.url, err.as_deref().unwrap_or("no answer"))
                    })
                    .collect();
                return Err(CallError::Abort(format!(
                    "every endpoint has failed for {:.0} s ({}): stopping; rerun the same command to resume",
                    self.group.all_down_s,
                    last.join("; ")
                )));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// Give back a slot that was not used (the stage stopped before sending).
    fn unclaim(&self, i: usize, probe: bool) {
        self.free_slot(i, probe);
        self.notify.notify_one();
    }

    /// The slot (and the probe, if this was one) is free again; waking a waiter is the
    /// caller's.
    fn free_slot(&self, i: usize, probe: bool) -> &Endpoint {
        let ep = &self.endpoints[i];
        if probe {
            ep.probing.store(false, Ordering::Release);
        }
        ep.outstanding.fetch_sub(1, Ordering::AcqRel);
        ep
    }

    fn release(&self, i: usize, probe: bool, ok: bool, overload: bool) {
        let ep = self.free_slot(i, probe);
        if ok {
            // Closing the circuit takes its lock only when it may be open.
            if (ep.consecutive_failures.swap(0, Ordering::AcqRel) >= TRIP_AFTER || probe)
                && let Ok(mut d) = ep.down_until.lock()
            {
                *d = None;
            }
            if let Ok(mut s) = self.all_down_since.lock() {
                *s = None;
            }
        } else {
            let n = ep.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
            // A failed probe benches the endpoint again at once.
            if n >= TRIP_AFTER || probe {
                self.bench(ep);
            }
        }
        if self.group.adaptive && self.adapt(ep, overload) {
            // The limit grew: there may be room for more than one waiter.
            self.notify.notify_waiters();
        } else {
            self.notify.notify_one();
        }
    }

    /// Stop feeding `ep` for `bench_s`; after that it gets one probe at a time.
    fn bench(&self, ep: &Endpoint) {
        if let Ok(mut d) = ep.down_until.lock() {
            *d = Some(Instant::now() + Duration::from_secs_f64(self.group.bench_s));
        }
    }

    /// AIMD over windows of responses: after each window, halve the limit when more than
    /// `OVERLOAD_RATE` of it (and at least `MIN_OVERLOADS`) were overload answers; otherwise
    /// double it (slow start, until the first overloaded window) or add 1/16 (at least 1).
    /// Never above `max_in_flight`.
    /// Returns whether the limit grew.
    fn adapt(&self, ep: &Endpoint, overload: bool) -> bool {
        let Ok(mut w) = ep.aimd.lock() else {
            return false;
        };
        w.responses += 1;
        w.overloads += overload as usize;
        let lim = ep.limit.load(Ordering::Acquire);
        if w.responses < lim.max(MIN_WINDOW) {
            return false;
        }
        let rate = w.overloads as f64 / w.responses as f64;
        let next = if rate > OVERLOAD_RATE && w.overloads >= MIN_OVERLOADS {
            w.slow_start = false;
            lim.div_ceil(2)
        } else if w.slow_start {
            lim * 2
        } else {
            lim + (lim / 16).max(1)
        };
        let next = next.clamp(1, self.group.max_in_flight.max(1));
        ep.limit.store(next, Ordering::Release);
        w.responses = 0;
        w.overloads = 0;
        next > lim
    }

    /// Send one request body (to `api`'s path under each base URL), with retries until
    /// `stopped()`.
    pub async fn call(
        &self,
        api: Api,
        body: bytes::Bytes,
        request_id: &str,
        n: u32,
        budget: &AtomicU32,
        stopped: impl Fn() -> bool,
    ) -> Result<Completion, CallError> {
        let mut attempt = 0u32;
        loop {
            // A stopping stage finishes what is on the wire but starts no retry; after an
            // answer that stops the stage (`fatal`) nothing more is sent.
            if (attempt > 0 && stopped()) || self.fatal.get().is_some() {
                return Err(self.stop_error("before this request's retry"));
            }
            let (i, probe) = self.acquire().await?;
            // Checked again after the wait for a slot: a stage stopped by Ctrl-C sends
            // nothing more, however many requests were queued for slots.
            if stopped() || self.fatal.get().is_some() {
                self.unclaim(i, probe);
                return Err(self.stop_error("before this request was sent"));
            }
            let started = Instant::now();
            // Raced against the end of the Ctrl-C grace period. Registered before the flag is
            // read, so an abandon between the two is not missed.
            let abandon = self.cancel.abandoned();
            tokio::pin!(abandon);
            abandon.as_mut().enable();
            let result = if self.cancel.is_abandoned() {
                None
            } else {
                tokio::select! {
                    biased;
                    r = self.attempt(i, api, body.clone(), request_id, n) => Some(r),
                    _ = abandon => None,
                }
            };
            let Some(result) = result else {
                self.unclaim(i, probe);
                return Err(self.stop_error("before this request was answered"));
            };
            match result {
                Attempt::Ok(mut c) => {
                    self.answered.store(true, Ordering::Relaxed);
                    self.release(i, probe, true, false);
                    c.latency_ms = started.elapsed().as_millis() as i64;
                    c.retries = attempt;
                    return Ok(c);
                }
                Attempt::Fatal { message, raw } => {
                    self.release(i, probe, true, false);
                    return Err(CallError::Row {
                        message,
                        raw,
                        retries: attempt,
                    });
                }
                Attempt::Stop(message) => {
                    // Set before the slot is freed, so the request that takes it sees it.
                    // Every other request of the stage stops at its next attempt; those
                    // sleeping out a backoff or a Retry-After are woken for it.
                    let m = self.fatal.get_or_init(|| message).clone();
                    self.release(i, probe, true, false);
                    self.cancel.wake();
                    return Err(CallError::Abort(m));
                }
                Attempt::Retry {
                    message,
                    after,
                    overload,
                    alive,
                    unreachable,
                    raw,
                } => {
                    self.release(i, probe, alive, overload);
                    if !alive && let Ok(mut l) = self.endpoints[i].last_error.lock() {
                        *l = Some(message.clone());
                    }
                    // A probe of a benched endpoint that could not even connect is the
                    // endpoint's failure, not this row's: it costs the row no retry (all
                    // endpoints down ends in a resumable stop after `all_down_s`, not in
                    // dead-lettered rows). A server that answers 5xx or times out is up
                    // and charges the row as usual.
                    if probe && unreachable {
                        let wait = Duration::from_millis(self.group.backoff_ms);
                        if !self.pause(wait, &stopped).await {
                            return Err(self.stop_error("before this request's retry"));
                        }
                        continue;
                    }
                    // The row's budget, shared with its other requests (see `Budget`).
                    if budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                        .is_err()
                    {
                        let why = if attempt >= self.group.max_retries {
                            String::new()
                        } else {
                            format!(
                                "; its row's other requests spent the rest of max_retries ({})",
                                self.group.max_retries
                            )
                        };
                        return Err(CallError::Row {
                            message: format!(
                                "{message} (gave up after {} attempts{why})",
                                attempt + 1
                            ),
                            raw,
                            retries: attempt,
                        });
                    }
                    let cap = self
                        .group
                        .backoff_max_ms
                        .min(self.group.backoff_ms.saturating_mul(1 << attempt.min(16)));
                    let jitter = Duration::from_millis(rand::rng().random_range(0..=cap.max(1)));
                    let wait = after.map_or(jitter, |a| a.max(jitter / 4));
                    if wait > LONG_WAIT && !self.said_long_wait.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "ifloom: {} asked to wait {:.0} s before a retry (Retry-After); waiting (Ctrl-C stops, the same command resumes)",
                            self.endpoints[i].url,
                            wait.as_secs_f64()
                        );
                    }
                    if !self.pause(wait, &stopped).await {
                        return Err(self.stop_error("before this request's retry"));
                    }
                    // Counted once it is sent (a retry cancelled by a stop is none).
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                }
            }
        }
    }

    /// Sleep out a backoff; `false` when the stage stopped meanwhile (Ctrl-C or a failure
    /// elsewhere wakes every sleeper through [`Cancel::wake`], so a long `Retry-After` does
    /// not hold up the stop).
    async fn pause(&self, d: Duration, stopped: &impl Fn() -> bool) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            let wake = self.cancel.woken();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if stopped() || self.fatal.get().is_some() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    return !stopped() && self.fatal.get().is_none();
                }
                _ = wake => {}
            }
        }
    }

    async fn attempt(
        &self,
        i: usize,
        api: Api,
        body: bytes::Bytes,
        request_id: &str,
        n: u32,
    ) -> Attempt {
        let ep = &self.endpoints[i];
        let timeout = Duration::from_secs_f64(self.group.timeout_s);
        let reply = self
            .http
            .post(
                &ep.targets[api as usize],
                body,
                request_id,
                self.auth.as_ref(),
                timeout,
            )
            .await;
        let Reply {
            status,
            headers,
            body: bytes,
        } = match reply {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    message: e.message,
                    after: None,
                    overload: e.timeout,
                    alive: false,
                    unreachable: e.connect,
                    raw: None,
                };
            }
        };
        let retry_after = wait_asked(&headers);
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            return Attempt::Retry {
                message: format!("HTTP {code}: {}", snippet(&bytes)),
                after: retry_after,
                overload: code == 429 || code == 503,
                // A 429 comes from a live server asking for patience (Retry-After is honoured
                // and adaptive mode backs off): not a failure for the circuit breaker, which
                // would otherwise bench a busy server for seconds after 8 of them in a row.
                alive: code == 429,
                unreachable: false,
                raw: Some(bytes),
            };
        }
        // A refused key (401) stops the stage at once. A 403 or 404 does so only while nothing
        // of the stage has succeeded: then it is the setup (a key without access, a model or
        // API the server does not serve); after successes it is about this request (a proxy's
        // moderation 403 for one input) and fails the row like any other 4xx.
        if code == 401 || ((code == 403 || code == 404) && !self.answered.load(Ordering::Relaxed)) {
            let ep = &self.endpoints[i];
            let what = match code {
                404 => format!(
                    "the server does not serve this model or this API (`{}`)",
                    api.path()
                ),
                _ => match &self.group.api_key_env {
                    Some(var) => format!("the server refused the API key in `{var}`"),
                    None => {
                        "the server wants an API key: set `api_key_env` on the endpoint".to_string()
                    }
                },
            };
            return Attempt::Stop(format!(
                "HTTP {code} from {}: {what} ({}); no request of this stage can succeed, so it stops: fix it and rerun the same command to resume",
                ep.url,
                snippet(&bytes)
            ));
        }
        if !status.is_success() {
            // Other 4xx will not succeed on retry (e.g. a prompt longer than the context).
            return Attempt::Fatal {
                message: format!("HTTP {code}: {}", snippet(&bytes)),
                raw: Some(bytes),
            };
        }
        match parse_body(&bytes, n) {
            Ok(c) => Attempt::Ok(c),
            // As the status it names: a 429 is a live server asking for patience.
            Err(e) if e.retry() => Attempt::Retry {
                message: e.message,
                after: retry_after,
                overload: matches!(e.code, Some(429 | 503)),
                alive: e.code == Some(429),
                unreachable: false,
                raw: Some(bytes),
            },
            Err(e) => Attempt::Fatal {
                message: match unasked(
                    headers.get(hyper::header::CONTENT_ENCODING),
                    headers.get(hyper::header::CONTENT_TYPE),
                ) {
                    Some(why) => format!("{why} ({})", e.message),
                    None => e.message,
                },
                raw: Some(bytes),
            },
        }
    }
}

/// An endpoint the health check could not use, and why: a refused certificate is not a
/// server that is down (it answered the handshake), and reads as what to fix.
fn unusable(url: &str, e: &super::http::HttpError) -> String {
    let state = if e.untrusted {
        "is not trusted"
    } else {
        "is down"
    };
    format!("{url} {state} ({})", e.message)
}

/// How long the server asked to wait: OpenAI's `retry-after-ms` (milliseconds, more precise
/// than a whole second; OpenAI's own Python client reads it first too), else `Retry-After`.
fn wait_asked(headers: &hyper::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    text("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| wait_of(ms / 1000.0))
        .or_else(|| text("retry-after").and_then(retry_after))
}

/// A wait of `s` seconds, capped at an hour; `None` for a negative or non-finite number.
fn wait_of(s: f64) -> Option<Duration> {
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(3600.0)))
}

/// A `Retry-After` header: seconds, or an HTTP date (RFC 9110), capped at an hour (a server
/// asking for more is not one to wait for row by row).
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    match v.parse::<f64>() {
        Ok(s) => wait_of(s),
        Err(_) => {
            let d = httpdate::parse_http_date(v)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Some(d.min(Duration::from_secs(3600)))
        }
    }
}

/// What a body that does not parse is, when its headers say: a server that compresses or
/// streams without being asked (said in the row's reason). Only looked at on that error path.
fn unasked(encoding: Option<&HeaderValue>, content_type: Option<&HeaderValue>) -> Option<String> {
    let lower =
        |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    match (lower(encoding), lower(content_type)) {
        (Some(enc), _) if enc != "identity" => Some(format!(
            "the server sent a `{enc}`-encoded body, which ifloom does not ask for"
        )),
        (_, Some(t)) if t.starts_with("text/event-stream") => Some(
            "the server streamed its answer (text/event-stream) although `stream` was not asked"
                .to_string(),
        ),
        _ => None,
    }
}

impl Pool {
    /// Why a request was not sent: an answer that stops the stage (401, 403, 404), else
    /// why the stage stopped.
    fn stop_error(&self, when: &str) -> CallError {
        match self.fatal.get() {
            Some(m) => CallError::Abort(m.clone()),
            // Ctrl-C (with how to resume), or the stage failed elsewhere.
            None if self.cancel.is_interrupted() => CallError::Abort(INTERRUPTED_MSG.into()),
            None => CallError::Abort(format!("the stage stopped {when}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn retry_after_ms_comes_first_and_a_bad_one_falls_back_to_retry_after() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = hyper::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            wait_asked(&m)
        };
        assert_eq!(h(&[]), None);
        assert_eq!(h(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(
            h(&[("retry-after", "1"), ("retry-after-ms", "250")]),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            h(&[("retry-after-ms", " 12.5 ")]),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(
            h(&[("retry-after", "3"), ("retry-after-ms", "soon")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(h(&[("retry-after-ms", "-1")]), None);
        assert_eq!(
            h(&[("retry-after-ms", "1e12")]),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("-3"), None);
        assert_eq!(retry_after("NaN"), None);
        assert_eq!(retry_after("1e300"), Some(Duration::from_secs(3600)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!((118..=120).contains(&d.as_secs()), "{d:?}");
        let past = retry_after("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(past, Some(Duration::ZERO));
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn slots_go_to_waiters_in_arrival_order() {
        let mut g = EndpointGroup::new(vec!["http://127.0.0.1:9/v1".into()]);
        g.max_in_flight = 1;
        let pool = std::sync::Arc::new(Pool::new(&g, Cancel::new()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let order = std::sync::Arc::new(Mutex::new(Vec::new()));
            assert_eq!(pool.acquire().await.unwrap(), (0, false));
            let waiter = |name: &'static str| {
                let (pool, order) = (pool.clone(), order.clone());
                tokio::spawn(async move {
                    let (i, _) = pool.acquire().await.unwrap();
                    order.lock().unwrap().push(name);
                    pool.release(i, false, true, false);
                })
            };
            let early = waiter("early");
            // Let it find no slot and wait.
            tokio::task::yield_now().await;
            // Free the slot and ask for it again at once, before the early waiter ran: this
            // newcomer must queue behind it instead of taking the slot (it did, before the
            // line).
            pool.release(0, false, true, false);
            let (i, _) = pool.acquire().await.unwrap();
            order.lock().unwrap().push("late");
            pool.release(i, false, true, false);
            early.await.unwrap();
            assert_eq!(*order.lock().unwrap(), ["early", "late"]);
        });
    }

    #[test]
    fn a_failing_endpoint_is_benched_then_probed_one_request_at_a_time() {
        let mut g = EndpointGroup::new(vec!["http://127.0.0.1:9/v1".into()]);
        g.max_in_flight = 4;
        // Benches long enough that a stalled test thread does not see one end early.
        g.bench_s = 0.3;
        g.all_down_s = 2.0;
        let pool = Pool::new(&g, Cancel::new()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let soon = Duration::from_millis(20);
        rt.block_on(async {
            // Eight failures in a row (two rounds of four) bench it.
            for _ in 0..2 {
                for _ in 0..4 {
                    assert_eq!(pool.acquire().await.unwrap(), (0, false));
                }
                for _ in 0..4 {
                    pool.release(0, false, false, false);
                }
            }
            assert!(tokio::time::timeout(soon, pool.acquire()).await.is_err());
            // After the bench: one probe, and nothing else while it is out.
            let (i, probe) = pool.acquire().await.unwrap();
            assert_eq!((i, probe), (0, true));
            assert!(tokio::time::timeout(soon, pool.acquire()).await.is_err());
            // A failed probe benches it again; the next probe succeeds and closes it.
            pool.release(0, true, false, false);
            assert!(tokio::time::timeout(soon, pool.acquire()).await.is_err());
            assert_eq!(pool.acquire().await.unwrap(), (0, true));
            pool.release(0, true, true, false);
            for _ in 0..4 {
                assert_eq!(pool.acquire().await.unwrap(), (0, false));
            }
            for _ in 0..4 {
                pool.release(0, false, false, false);
            }
            // Down for good: probes keep failing until `all_down_s` stops the stage.
            for _ in 0..4 {
                assert_eq!(pool.acquire().await.unwrap(), (0, false));
            }
            for _ in 0..4 {
                pool.release(0, false, false, false);
            }
            let stopped = loop {
                match pool.acquire().await {
                    Ok((0, true)) => pool.release(0, true, false, false),
                    Ok(other) => panic!("only probes while benched, got {other:?}"),
                    Err(e) => break e.to_string(),
                }
            };
            assert!(
                stopped.contains("rerun the same command to resume"),
                "{stopped}"
            );
        });
    }

    fn adaptive_pool(max: usize) -> Pool {
        let mut g = EndpointGroup::new(vec!["http://127.0.0.1:9/v1".into()]);
        g.adaptive = true;
        g.max_in_flight = max;
        Pool::new(&g, Cancel::new()).unwrap()
    }

    /// Feed one window of `n` responses, `overloads` of them overload answers.
    fn window(p: &Pool, n: usize, overloads: usize) -> usize {
        for k in 0..n {
            p.adapt(&p.endpoints[0], k < overloads);
        }
        p.endpoints[0].limit.load(Ordering::Acquire)
    }

    #[test]
    fn adaptive_limit_doubles_then_halves_then_grows_slowly() {
        let p = adaptive_pool(1024);
        assert_eq!(
            p.endpoints[0].limit.load(Ordering::Acquire),
            512,
            "half the ceiling"
        );
        // Windows are max(limit, 32) responses; slow start doubles per clean window.
        assert_eq!(window(&p, 511, 0), 512, "no change before a window is full");
        // One stray 429 in 512 (0.2%) is noise: still doubling.
        assert_eq!(window(&p, 1, 1), 1024);
        assert_eq!(window(&p, 1024, 0), 1024, "capped at max_in_flight");
        // 52 of 1024 (5.1%) is an overload: halve, and leave slow start.
        assert_eq!(window(&p, 1024, 52), 512);
        assert_eq!(window(&p, 512, 0), 544, "additive: +1/16 per clean window");
        assert_eq!(
            window(&p, 544, 27),
            578,
            "27 of 544 (4.96%) is under the rate"
        );
        assert_eq!(window(&p, 578, 29), 289, "29 of 578 (5.02%) halves again");

        // Small windows: 2 of 32 (6.3%) could be two stray 429s; 3 of 32 is an overload.
        let p = adaptive_pool(64);
        assert_eq!(p.endpoints[0].limit.load(Ordering::Acquire), 32);
        assert_eq!(window(&p, 32, 2), 64, "two overloads in 32 do not halve");
        let p = adaptive_pool(64);
        assert_eq!(window(&p, 32, 3), 16, "three do");
        // Tiny ceilings still start at one or more.
        assert_eq!(
            adaptive_pool(3).endpoints[0].limit.load(Ordering::Acquire),
            2
        );
        assert_eq!(
            adaptive_pool(1).endpoints[0].limit.load(Ordering::Acquire),
            1
        );
    }
}
