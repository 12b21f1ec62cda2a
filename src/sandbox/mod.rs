//! Running untrusted Python (LLM-written verifier functions) outside the ifloom process.
//!
//! A [`Pool`] keeps persistent Python workers (`worker.py`, one per core by default). A worker
//! never runs the code it is given: per job (one function's source and the inputs to call its
//! `evaluate` on) it forks a child that locks itself down and runs it, then reports one result
//! per call. The layers, outermost first:
//! - each worker starts in its own user + network namespace when the kernel allows one (no
//!   interface but a down loopback: nothing to connect to), with an empty environment (no API
//!   keys) and a scratch folder this module removes;
//! - each child sets rlimits (address space, CPU, file size, no core, no new processes for
//!   non-root users) and an audit hook that refuses sockets, processes, signals, native code
//!   (`ctypes`), raising limits, writes outside its scratch folder and reads outside it and
//!   Python's own library folders;
//! - per call a timer raises `TimeoutError` inside the function (upstream AutoIF's
//!   `signal.alarm`), and the worker kills a child that has not answered `grace` later;
//! - here, a watchdog kills a worker that has not finished a job in its whole time budget.
//!
//! A child or worker that dies is replaced; the call gets the reason; the run goes on.
//!
//! Results are cached by (interpreter, limits, source, input) in SQLite
//! ([`ResultCache`]), committed job by job, so a rerun or a resumed run executes nothing twice.

mod cache;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use cache::ResultCache;

use crate::error::{Error, Result};

/// The worker program, passed with `-c` (nothing is written to disk).
const WORKER: &str = include_str!("worker.py");

/// Bump when the worker's results for the same call could change (part of every cache key).
/// 2: `nltk` and `np` in the namespace when the interpreter has them.
const WORKER_VERSION: u32 = 2;

/// The `sandbox.python` name of the venv `scripts/sandbox-venv.sh install` makes (upstream's
/// extra names `nltk` and `numpy as np`, and NLTK's Punkt data).
pub const SANDBOX_VENV: &str = "sandbox-venv";

/// Where that venv lives: `$IFLOOM_SANDBOX_VENV`, else `~/.cache/ifloom/sandbox-venv`.
pub fn sandbox_venv_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IFLOOM_SANDBOX_VENV").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/ifloom/sandbox-venv")
}

fn d_python() -> String {
    "python3".into()
}
fn d_timeout() -> f64 {
    5.0
}
fn d_memory() -> u64 {
    1024
}

/// How verifier code runs: the `sandbox:` field of the kinds that run Python.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// The interpreter: a name looked up on PATH, a path, or `sandbox-venv` (the venv
    /// `scripts/sandbox-venv.sh install` makes, with `nltk`, `numpy` and NLTK's Punkt data as
    /// upstream AutoIF's functions had them). Default `python3`.
    #[serde(default = "d_python")]
    pub python: String,
    /// Worker processes (default: one per core).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Seconds per call before `TimeoutError` is raised inside it (upstream AutoIF: 5).
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Address-space limit of each function's process, in MiB.
    #[serde(default = "d_memory")]
    pub memory_mb: u64,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            python: d_python(),
            workers: None,
            timeout_s: d_timeout(),
            memory_mb: d_memory(),
        }
    }
}

impl SandboxConfig {
    /// What changes results (the fingerprint and cache keys cover it; `workers` does not).
    pub fn semantic(&self) -> Value {
        serde_json::json!({
            "python": self.python,
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
        })
    }

    /// [`check`](Self::check)'s problems as diagnostics at the stage's `sandbox:` field (the
    /// kinds that run Python call this when they are built).
    pub fn diagnostics(
        &self,
        file: &Path,
        stage: &crate::yaml::Node,
    ) -> Vec<crate::error::Diagnostic> {
        self.check()
            .into_iter()
            .map(|m| crate::error::Diagnostic::new(file, stage.pos_at(&["sandbox"]), m))
            .collect()
    }

    /// Problems a pipeline can be told about before anything runs.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = resolve_python(&self.python) {
            out.push(e);
        }
        if !(self.timeout_s > 0.0 && self.timeout_s <= 3600.0) {
            out.push(format!(
                "sandbox.timeout_s must be between 0 and 3600 seconds, not {}",
                self.timeout_s
            ));
        }
        if self.memory_mb < 64 {
            out.push(format!(
                "sandbox.memory_mb must be at least 64 (a Python process needs about 30), not {}",
                self.memory_mb
            ));
        }
        if self.workers == Some(0) {
            out.push("sandbox.workers must be at least 1".into());
        }
        out
    }
}

/// Say once per stage when the functions were kept off the network by the guard alone.
pub fn log_isolation(stage: &str, iso: Option<Isolation>) {
    if iso == Some(Isolation::GuardOnly) {
        tracing::warn!(
            "{stage}: the kernel refused a network namespace; verifier code is kept off the network by the sandbox's guard alone"
        );
    }
}

/// Warn once per stage when functions written for upstream's namespace would miss a name.
pub fn log_modules(stage: &str, modules: Option<&Modules>) {
    if let Some(missing) = modules.and_then(Modules::missing) {
        tracing::warn!(
            "{stage}: the sandbox's Python lacks {missing}, which upstream AutoIF's functions had; \
             functions using them fail here and are dropped. Run `scripts/sandbox-venv.sh \
             install` and set `sandbox.python: {SANDBOX_VENV}`"
        );
    }
}

/// The result cache a run uses: `python-cache.sqlite` beside the LLM response cache.
pub fn cache_path(engine: &crate::engine::Engine) -> PathBuf {
    crate::llm_client::cache::path(engine.cache_path.as_deref())
        .with_file_name("python-cache.sqlite")
}

/// The interpreter's path: `name` itself when it has a slash, the sandbox venv's for
/// `sandbox-venv`, else the first match on PATH.
pub fn resolve_python(name: &str) -> std::result::Result<PathBuf, String> {
    let install = "install Python 3 (Debian/Ubuntu: `apt-get install python3`) or set \
                   `sandbox.python` to an interpreter's path";
    if name == SANDBOX_VENV {
        let p = sandbox_venv_dir().join("bin/python");
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "sandbox.python is `{SANDBOX_VENV}` but {} does not exist: run \
                 `scripts/sandbox-venv.sh install` (a venv with upstream AutoIF's nltk and \
                 numpy and NLTK's Punkt data, ~20 s from PyPI), or set sandbox.python to \
                 `python3` (functions that use nltk or np then fail as NameError)",
                p.display()
            ))
        };
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "python interpreter `{name}` does not exist: {install}"
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "python interpreter `{name}` not found on PATH: {install}"
    ))
}

/// One function's source and the inputs to call its `evaluate` on (none: only compile it).
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub source: String,
    pub inputs: Vec<Value>,
}

/// How executing a function's source went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compiled {
    /// The source executed without raising.
    pub ok: bool,
    /// It defines a callable `evaluate`.
    #[serde(default)]
    pub has_evaluate: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It returned (`value`/`repr` hold what).
    Ok,
    /// It raised (`error` is the exception class).
    Error,
    /// It ran past the timeout (raised inside it, or killed when it would not stop).
    Timeout,
    /// The sandbox refused something it tried (network, processes, files outside scratch).
    Refused,
    /// Its process died or sent garbage (`os._exit`, a signal, a limit).
    Crashed,
    /// Not called: the source did not compile or defines no `evaluate`.
    NotRun,
}

/// One call's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub outcome: Outcome,
    /// The returned value when it is a plain JSON value (strings cut at 200 characters).
    #[serde(default)]
    pub value: Option<Value>,
    /// `repr()` of any other returned value.
    #[serde(default)]
    pub repr: Option<String>,
    /// Python type name of the returned value.
    #[serde(default, rename = "type")]
    pub type_name: Option<String>,
    /// Python's `value == True` / `value == False` (False when it raised).
    #[serde(default)]
    pub eq_true: bool,
    #[serde(default)]
    pub eq_false: bool,
    /// Python's `int(value)` when it succeeds (within i64).
    #[serde(default)]
    pub as_int: Option<i64>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub ms: f64,
}

impl Call {
    pub fn not_run() -> Call {
        Call {
            outcome: Outcome::NotRun,
            value: None,
            repr: None,
            type_name: None,
            eq_true: false,
            eq_false: false,
            as_int: None,
            truncated: false,
            error: None,
            message: None,
            ms: 0.0,
        }
    }

    /// Python's `res is not None and res == label` for a label read from JSON. Bools use the
    /// worker's own comparison (so `1 == True` and numpy bools behave as in Python); numbers
    /// compare numerically with int/float/bool results (a label 1 or 0 also as `== True` /
    /// `== False`); strings only with an uncut string result; `null`, lists and objects never
    /// match (upstream excludes `None`, and functions return no lists worth comparing).
    pub fn equals_label(&self, label: &Value) -> bool {
        if self.outcome != Outcome::Ok || self.type_name.as_deref() == Some("NoneType") {
            return false;
        }
        match label {
            Value::Bool(true) => self.eq_true,
            Value::Bool(false) => self.eq_false,
            Value::Number(n) => {
                let Some(x) = n.as_f64() else { return false };
                if x == 1.0 && self.eq_true || x == 0.0 && self.eq_false {
                    return true;
                }
                match &self.value {
                    Some(Value::Number(v)) => v.as_f64() == Some(x),
                    Some(Value::Bool(b)) => f64::from(u8::from(*b)) == x,
                    _ => false,
                }
            }
            Value::String(s) => {
                !self.truncated && matches!(&self.value, Some(Value::String(v)) if v == s)
            }
            _ => false,
        }
    }
}

/// What a worker sends back per job.
#[derive(Debug, Clone, Deserialize)]
pub struct JobResult {
    pub compile: Compiled,
    /// One per input; `None` where the call did not run.
    pub calls: Vec<Option<Call>>,
}

/// How a worker process was isolated (reported once per pool, shown in the stage's log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Own user + network namespace: no network at all.
    Namespace,
    /// The kernel refused a namespace: only the in-process guard stands between the code and
    /// the network.
    GuardOnly,
}

/// Persistent Python workers.
pub struct Pool {
    python: PathBuf,
    /// Its version (`3.11.7`): part of every cache key.
    version: String,
    workers: usize,
    config: SandboxConfig,
    scratch: PathBuf,
    isolation: Mutex<Option<Isolation>>,
    modules: Mutex<Option<Modules>>,
}

/// What of upstream AutoIF's extra names a worker has (reported in its first line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modules {
    /// `nltk.__version__`, when it imports.
    pub nltk: Option<String>,
    /// `numpy.__version__`, when it imports.
    pub numpy: Option<String>,
    /// `nltk.sent_tokenize` works (the Punkt data is there).
    pub punkt: bool,
}

impl Modules {
    /// What a function written for upstream's namespace misses here, if anything.
    pub fn missing(&self) -> Option<String> {
        let mut out = Vec::new();
        if self.nltk.is_none() {
            out.push("nltk");
        } else if !self.punkt {
            out.push("NLTK's Punkt data (nltk.sent_tokenize raises LookupError)");
        }
        if self.numpy.is_none() {
            out.push("numpy (np)");
        }
        (!out.is_empty()).then(|| out.join(", "))
    }
}

static POOLS: AtomicUsize = AtomicUsize::new(0);

impl Pool {
    pub fn new(config: &SandboxConfig) -> Result<Pool> {
        let found = resolve_python(&config.python).map_err(|message| Error::Usage { message })?;
        // The interpreter itself, not a wrapper (a pyenv shim is a shell script that sets
        // PATH and more before exec'ing Python): the workers start with an empty environment.
        let (python, version) = interpreter(&found)?;
        let workers = config.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        });
        let scratch = std::env::temp_dir().join(format!(
            "ifloom-sandbox-{}-{}",
            std::process::id(),
            POOLS.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(Pool {
            python,
            version,
            workers: workers.max(1),
            config: config.clone(),
            scratch,
            isolation: Mutex::new(None),
            modules: Mutex::new(None),
        })
    }

    /// What the workers have of upstream's `nltk` / `np` (known once one has started).
    pub fn modules(&self) -> Option<Modules> {
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn isolation(&self) -> Option<Isolation> {
        *self.isolation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run every job on the workers; `done(index, result)` is called as each finishes (the
    /// stage stores it in the cache). Stops early, with an error, when `stop()` turns true.
    pub fn run(
        &self,
        jobs: &[Job],
        stop: &(dyn Fn() -> bool + Sync),
        done: &(dyn Fn(usize, &JobResult) -> Result<()> + Sync),
    ) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let n = self.workers.min(jobs.len());
        std::thread::scope(|s| {
            for w in 0..n {
                let (next, failed) = (&next, &failed);
                s.spawn(move || {
                    if let Err(e) = self.work(w, jobs, next, stop, done) {
                        let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                        f.get_or_insert(e);
                        // The other workers stop taking jobs.
                        next.store(usize::MAX / 2, Ordering::SeqCst);
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        if stop() {
            return Err(Error::Internal("interrupted".into()));
        }
        Ok(())
    }

    /// One worker thread: takes jobs until none are left, restarting its process when it dies.
    fn work(
        &self,
        w: usize,
        jobs: &[Job],
        next: &AtomicUsize,
        stop: &(dyn Fn() -> bool + Sync),
        done: &(dyn Fn(usize, &JobResult) -> Result<()> + Sync),
    ) -> Result<()> {
        let mut worker: Option<Worker> = None;
        loop {
            if stop() {
                return Ok(());
            }
            let i = next.fetch_add(1, Ordering::SeqCst);
            if i >= jobs.len() {
                return Ok(());
            }
            let mut tries = 0;
            let result = loop {
                tries += 1;
                if worker.is_none() {
                    worker = Some(self.spawn(w)?);
                }
                let wk = worker.as_mut().expect("just spawned");
                match wk.run(&jobs[i], &self.config) {
                    Ok(r) => break r,
                    // The worker itself (trusted code) died or hung: kill it, start another,
                    // try the job once more; twice in a row is a fault, not the function's.
                    Err(e) => {
                        if let Some(old) = worker.take() {
                            old.kill();
                        }
                        if tries >= 2 {
                            return Err(Error::Internal(format!(
                                "python sandbox worker failed twice on one job: {e}"
                            )));
                        }
                    }
                }
            };
            done(i, &result)?;
        }
    }

    fn spawn(&self, w: usize) -> Result<Worker> {
        let scratch = self.scratch.join(format!("w{w}"));
        std::fs::create_dir_all(&scratch).map_err(|source| Error::Io {
            path: scratch.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.python);
        cmd.arg("-s")
            .arg("-B")
            .arg("-c")
            .arg(WORKER)
            .arg(&scratch)
            .env_clear()
            // Sets and dicts iterate the same way in every run: verdicts do not flicker.
            .env("PYTHONHASHSEED", "0")
            .env("LC_ALL", "C.UTF-8")
            // numpy's BLAS starts no thread pool (a forked child keeps none of its threads).
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("OMP_NUM_THREADS", "1")
            .env("MKL_NUM_THREADS", "1")
            .current_dir(&scratch)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; unshare is async-signal-safe and
            // touches nothing of the parent's state.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                        // Root without user namespaces can still take a network namespace.
                        let _ = libc::unshare(libc::CLONE_NEWNET);
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::Internal(format!(
                "cannot start python sandbox worker {}: {e}",
                self.python.display()
            ))
        })?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| Error::Internal(format!("python sandbox worker did not start: {e}")))?;
        let ready: Value = serde_json::from_str(&line).map_err(|_| {
            Error::Internal(format!(
                "python sandbox worker did not start ({} said {:?}); is it Python 3.8 or newer?",
                self.python.display(),
                line.trim()
            ))
        })?;
        let ifaces: Vec<&str> = ready["net"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let iso = if ifaces.iter().all(|i| *i == "lo") && !ready["net"].is_null() {
            Isolation::Namespace
        } else {
            Isolation::GuardOnly
        };
        *self.isolation.lock().unwrap_or_else(|e| e.into_inner()) = Some(iso);
        *self.modules.lock().unwrap_or_else(|e| e.into_inner()) = Some(Modules {
            nltk: ready["nltk"].as_str().map(str::to_string),
            numpy: ready["numpy"].as_str().map(str::to_string),
            punkt: ready["punkt"].as_bool().unwrap_or(false),
        });
        Ok(Worker::new(child, stdin, stdout))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A running worker process and its watchdog.
struct Worker {
    child: Arc<Mutex<Child>>,
    /// `None` once closed (which tells the worker to clean up and exit).
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// When the job under way must be finished (ms since `epoch`; 0: no job).
    deadline: Arc<AtomicU64>,
    epoch: Instant,
    alive: Arc<AtomicBool>,
}

impl Worker {
    fn new(child: Child, stdin: ChildStdin, stdout: BufReader<ChildStdout>) -> Worker {
        let child = Arc::new(Mutex::new(child));
        let deadline = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let epoch = Instant::now();
        // The watchdog: a worker that overruns its job's whole budget is killed, which ends
        // the blocked read below.
        {
            let (child, deadline, alive) = (child.clone(), deadline.clone(), alive.clone());
            std::thread::spawn(move || {
                while alive.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let d = deadline.load(Ordering::Relaxed);
                    if d != 0 && epoch.elapsed().as_millis() as u64 > d {
                        if let Ok(mut c) = child.lock() {
                            let _ = c.kill();
                        }
                        return;
                    }
                }
            });
        }
        Worker {
            child,
            stdin: Some(stdin),
            stdout,
            deadline,
            epoch,
            alive,
        }
    }

    fn run(&mut self, job: &Job, config: &SandboxConfig) -> std::result::Result<JobResult, String> {
        let grace = 2.0;
        let request = serde_json::json!({
            "source": job.source,
            "inputs": job.inputs,
            "timeout_s": config.timeout_s,
            "compile_timeout_s": config.timeout_s,
            "grace_s": grace,
            "limits": {"memory_mb": config.memory_mb},
        });
        // Every call may time out and need a fresh child; beyond that the worker is stuck.
        let budget = (config.timeout_s + grace) * (job.inputs.len() as f64 + 1.0) + 30.0;
        let ms = self.epoch.elapsed().as_millis() as u64 + (budget * 1000.0) as u64;
        self.deadline.store(ms, Ordering::Relaxed);
        let mut line = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        line.push('\n');
        let stdin = self.stdin.as_mut().ok_or("the worker is closed")?;
        stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("writing to the worker: {e}"))?;
        let mut answer = String::new();
        let n = self
            .stdout
            .read_line(&mut answer)
            .map_err(|e| format!("reading from the worker: {e}"))?;
        self.deadline.store(0, Ordering::Relaxed);
        if n == 0 {
            return Err("the worker exited".into());
        }
        let r: JobResult =
            serde_json::from_str(&answer).map_err(|e| format!("bad worker answer: {e}"))?;
        if r.calls.len() != job.inputs.len() {
            return Err("the worker answered for the wrong number of calls".into());
        }
        Ok(r)
    }

    fn kill(self) {
        self.alive.store(false, Ordering::Relaxed);
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        // Closing stdin ends the worker's loop; it removes its scratch folder and exits.
        self.stdin.take();
        if let Ok(mut c) = self.child.lock() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The cache key of a call (`input: None`: the compile result).
pub fn call_key(
    config: &SandboxConfig,
    python_version: &str,
    source: &str,
    input: Option<&Value>,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(format!("ifloom-sandbox/{WORKER_VERSION}\0{python_version}\0").as_bytes());
    h.update(crate::json::canonical_string(&config.semantic()).as_bytes());
    h.update(b"\0");
    h.update(&(source.len() as u64).to_le_bytes());
    h.update(source.as_bytes());
    match input {
        None => h.update(b"\0compile"),
        Some(v) => h.update(crate::json::canonical_string(v).as_bytes()),
    };
    *h.finalize().as_bytes()
}

/// Everything a stage asked for: the compile result per source and the call per (source,
/// input), from the cache or the pool.
#[derive(Debug, Default)]
pub struct Executions {
    pub compiled: HashMap<String, Compiled>,
    pub calls: HashMap<(String, String), Call>,
    /// How many calls ran now (the rest came from the cache).
    pub executed: u64,
    pub from_cache: u64,
    /// What the workers had of upstream's `nltk` / `np` (`None` when none started).
    pub modules: Option<Modules>,
}

impl Executions {
    pub fn call(&self, source: &str, input: &Value) -> Option<&Call> {
        self.calls
            .get(&(source.to_string(), crate::json::canonical_string(input)))
    }
}

/// A job's cache keys: its compile result's, each call's, and each input's canonical JSON.
type JobKeys = ([u8; 32], Vec<[u8; 32]>, Vec<String>);

/// At most this many inputs per job: a killed run loses at most one job per worker, and
/// progress moves.
const JOB_INPUTS: usize = 256;

/// Compile every source and call each on its inputs, reusing cached results and caching new
/// ones as each job finishes.
pub fn execute(
    config: &SandboxConfig,
    cache_path: &Path,
    wanted: &[(String, Vec<Value>)],
    stop: &(dyn Fn() -> bool + Sync),
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Executions, Option<Isolation>)> {
    let pool = Pool::new(config)?;
    let version = pool.version.clone();
    let cache = ResultCache::open(cache_path)?;
    let mut out = Executions::default();
    let mut jobs: Vec<Job> = Vec::new();
    let mut job_keys: Vec<JobKeys> = Vec::new();
    for (source, inputs) in wanted {
        let ckey = call_key(config, &version, source, None);
        let compiled = cache.get_compile(&ckey)?;
        let mut missing: Vec<(Value, [u8; 32], String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for input in inputs {
            let canon = crate::json::canonical_string(input);
            if !seen.insert(canon.clone()) {
                continue;
            }
            let key = call_key(config, &version, source, Some(input));
            match cache.get_call(&key)? {
                Some(c) => {
                    out.from_cache += 1;
                    out.calls.insert((source.clone(), canon), c);
                }
                None => missing.push((input.clone(), key, canon)),
            }
        }
        if let Some(c) = &compiled
            && !(c.ok && c.has_evaluate)
        {
            for (_, _, canon) in missing.drain(..) {
                out.calls.insert((source.clone(), canon), Call::not_run());
            }
        }
        match (&compiled, missing.is_empty()) {
            (Some(c), true) => {
                out.compiled.insert(source.clone(), c.clone());
            }
            _ => {
                let chunks: Vec<&[(Value, [u8; 32], String)]> = if missing.is_empty() {
                    vec![&[]]
                } else {
                    missing.chunks(JOB_INPUTS).collect()
                };
                for chunk in chunks {
                    jobs.push(Job {
                        source: source.clone(),
                        inputs: chunk.iter().map(|(v, _, _)| v.clone()).collect(),
                    });
                    job_keys.push((
                        ckey,
                        chunk.iter().map(|(_, k, _)| *k).collect(),
                        chunk.iter().map(|(_, _, c)| c.clone()).collect(),
                    ));
                }
            }
        }
    }
    let results: Mutex<Vec<Option<JobResult>>> = Mutex::new(vec![None; jobs.len()]);
    let executed = AtomicU64::new(0);
    pool.run(&jobs, stop, &|i, r: &JobResult| {
        let (ckey, keys, _) = &job_keys[i];
        let calls: Vec<([u8; 32], Call)> = keys
            .iter()
            .zip(&r.calls)
            .map(|(k, c)| (*k, c.clone().unwrap_or_else(Call::not_run)))
            .collect();
        cache.put(ckey, &r.compile, &calls)?;
        let ran = r.calls.iter().filter(|c| c.is_some()).count() as u64;
        let n = executed.fetch_add(ran, Ordering::Relaxed) + ran;
        progress(n);
        results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r.clone());
        Ok(())
    })?;
    out.executed = executed.into_inner();
    out.modules = pool.modules();
    for ((job, (_, _, canons)), r) in jobs
        .iter()
        .zip(&job_keys)
        .zip(results.into_inner().unwrap_or_else(|e| e.into_inner()))
    {
        let r = r.ok_or_else(|| Error::Internal("a sandbox job has no result".into()))?;
        out.compiled.insert(job.source.clone(), r.compile.clone());
        for (canon, c) in canons.iter().zip(r.calls) {
            out.calls.insert(
                (job.source.clone(), canon.clone()),
                c.unwrap_or_else(Call::not_run),
            );
        }
    }
    let iso = pool.isolation();
    Ok((out, iso))
}

/// Prints the interpreter, then its version with the nltk and numpy versions and whether NLTK's
/// Punkt data is where NLTK looks by default (the worker's results depend on all four), without
/// importing either (that takes half a second).
const PROBE: &str = r#"import os, sys
from importlib import metadata
print(sys.executable)
v = [sys.version.split()[0]]
for name in ("nltk", "numpy"):
    try:
        v.append("%s=%s" % (name, metadata.version(name)))
    except Exception:
        pass
roots = [os.path.expanduser("~/nltk_data")] + [os.path.join(sys.prefix, d) for d in ("nltk_data", "share/nltk_data", "lib/nltk_data")] + ["/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
if any(os.path.isdir(os.path.join(r, "tokenizers/punkt_tab/english")) for r in roots):
    v.append("punkt_tab")
print(" ".join(v))
"#;

/// The real interpreter behind `found` (`sys.executable`) and its version (with what the
/// worker's namespace will hold, see [`PROBE`]), asked with the caller's environment (which a
/// wrapper may need).
fn interpreter(found: &Path) -> Result<(PathBuf, String)> {
    let out = Command::new(found)
        .arg("-c")
        .arg(PROBE)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| Error::Usage {
            message: format!("cannot run the python interpreter {}: {e}", found.display()),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(exe), Some(version)) if out.status.success() && !exe.is_empty() => {
            Ok((PathBuf::from(exe), version.to_string()))
        }
        _ => Err(Error::Usage {
            message: format!(
                "{} did not answer as a Python 3 interpreter; set `sandbox.python` to one",
                found.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests;
