//! `kind: llm` — every row of a table becomes one or more LLM requests (Jinja templates over
//! the row's columns), sent to OpenAI-compatible servers in large concurrent batches; the
//! responses come back as columns, in input order.
//!
//! ```text
//! rows ─▶ render templates ─▶ canonical request ─▶ request id = hash(model, messages, params, sample)
//!      ─▶ cache hit? ─yes─▶ response
//!                  └─no──▶ endpoint pool (least outstanding, in-flight limit) ─▶ retries ─▶ response
//! responses ─▶ cache (immediately) ─▶ parse ─▶ Parquet; failures ─▶ <id>__failed
//! ```
//! Rows stream through in chunks, so memory does not grow with the table.

pub mod cache;
pub mod client;
pub mod endpoints;
pub mod http;
pub mod parse;
pub mod request;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use futures::FutureExt;
use parquet::arrow::ArrowWriter;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::cache::{Cache, CachedResponse};
use self::client::{CallError, EndpointGroup, Pool};
use self::endpoints::Endpoints;
use self::parse::ParseSpec;
use self::request::{Api, Canonical, Message, Profile, Sampling};
use crate::error::{Diagnostic, Error, Result, did_you_mean};
use crate::stages::dedup::read_batches;
use crate::stages::{BuildCtx, KindEntry, PlanCtx, RunCtx, RunOutput, Stage};
use crate::yaml::Node;

pub const KIND: KindEntry = KindEntry {
    name: "llm",
    about: "LLM requests per row (templates over columns) to OpenAI-compatible servers",
    build: crate::stages::build::<LlmStage>,
    schema: |g| LlmStage::json_schema(g),
};

/// Set on Ctrl-C: no new request is sent; those in flight finish and are cached.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set when the Ctrl-C grace period is over (with [`ABANDON`] notified): requests still on the
/// wire are dropped, and resuming sends them again.
pub static ABANDONED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
pub static ABANDON: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Abandon the requests in flight (the Ctrl-C grace period is over).
pub fn abandon() {
    ABANDONED.store(true, Ordering::SeqCst);
    ABANDON.notify_waiters();
}

/// Wakes requests sleeping out a retry backoff when something stopped (Ctrl-C, a failed stage,
/// a cache that cannot be written): each checks whether its own stage stopped.
pub static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Ctrl-C: send nothing more; requests on the wire finish (for the grace period).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    WAKE.notify_waiters();
}

/// What an interrupted stage says.
pub const INTERRUPTED_MSG: &str =
    "interrupted: the answers that arrived are cached; run the same command again to resume";

/// Rows rendered, sent and written together: 64 × the in-flight capacity, within these bounds
/// on memory. Chunks overlap (see [`PIPELINE_DEPTH`]), so their size no longer decides how
/// long the servers wait between chunks.
const MIN_CHUNK_ROWS: usize = 4096;
const MAX_CHUNK_ROWS: usize = 65536;

/// Full chunks between "requests handed to the runtime" and "written". With 2, the next
/// chunk's worth of rows is rendered, looked up and on the wire while the oldest chunk's last
/// requests (and their retries) finish and its rows are parsed and written: the servers never
/// drain between chunks, and the per-row CPU work overlaps the sending instead of adding to it.
const PIPELINE_DEPTH: usize = 2;

/// Rows of the stage's table kept in the Parquet writer before they are flushed as a row group.
const FLUSH_ROWS: usize = 1024;

/// Rows rendered before the first requests go out (later chunks double up to the chunk size).
const FIRST_CHUNK_ROWS: usize = 64;

/// Responses (or errors) of one round of sends, by request id.
type Sent = HashMap<String, std::result::Result<CachedResponse, CallError>>;

/// What the send tasks share.
#[derive(Clone)]
struct Shared {
    pool: Arc<Pool>,
    cache: Arc<Cache>,
    counters: Arc<Counters>,
    model: Arc<str>,
    /// When the stage started (for its debug log).
    started: Instant,
    /// Set when the stage fails: chunks still queued send nothing more.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// `clamp_max_tokens`.
    clamp: bool,
    /// Requests on the wire, by id, with where their answer will appear: a later round (the
    /// next chunk, or a parse retry) with the same request waits for it instead of sending
    /// it again.
    inflight: Arc<std::sync::Mutex<HashMap<u128, Answer>>>,
    /// Wakes the rounds waiting for such answers (rare: one Notify for the stage is enough).
    answered: Arc<tokio::sync::Notify>,
    /// Request tasks alive at once, across rounds (see [`send_units`]).
    window: Arc<tokio::sync::Semaphore>,
    /// Held by a round while it starts its requests, so rounds start theirs in the order the
    /// rounds began (the lock is fair): requests reach the servers in input order.
    admission: Arc<tokio::sync::Mutex<()>>,
}

/// The endpoint check (`/models` on every endpoint), started with the stage and awaited before
/// its first request; dropped (aborted) unawaited when every answer was cached.
struct EndpointCheck {
    task: Option<tokio::task::JoinHandle<std::result::Result<(), String>>>,
}

impl EndpointCheck {
    fn wait(&mut self, ctx: &RunCtx) -> Result<()> {
        if let Some(t) = self.task.take() {
            ctx.engine
                .block_on(t)
                .map_err(|e| Error::Internal(format!("endpoint check: {e}")))?
                .map_err(|e| Error::stage(ctx.id, format!("endpoint check failed: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for EndpointCheck {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A request id (32 hex digits) as the 128-bit number it spells: the in-flight map's key, kept
/// off the heap (the map holds every request on the wire, up to two chunks of them).
pub(crate) fn id_key(id: &str) -> u128 {
    u128::from_str_radix(id, 16).unwrap_or_else(|_| {
        // Not an id this stage made (it never happens): any stable hash will do.
        let h = blake3::hash(id.as_bytes());
        u128::from_le_bytes(h.as_bytes()[..16].try_into().unwrap_or_default())
    })
}

/// Where a work unit's answers appear once it finishes: set once, to the answers when a later
/// round waits for them, else to `None` (that round then sends the request itself). A small
/// allocation per request on the wire (a watch channel, with its nine Notifys, was ~25 MB of
/// peak RSS at 100k rows).
type Answer = Arc<std::sync::OnceLock<Option<Arc<UnitResult>>>>;
/// A round's work units: the samples' ids, the request, where to announce the answers, how
/// many samples it answers for the first time (the progress count), and the retries its row
/// has left.
type Unit = (Vec<String>, Canonical, Answer, u64, Budget);

/// The retries a row has left (`max_retries`), shared by every request made for the row in
/// a round: the K requests of a row sent one per sample (a server that ignores `n`) draw on
/// one budget, like the single `n: K` request they stand for.
type Budget = Arc<std::sync::atomic::AtomicU32>;

/// A fresh budget: the pool's `max_retries`.
fn budget(pool: &Pool) -> Budget {
    Budget::new(pool.max_retries().into())
}

/// One pass over a chunk's pending samples: rendered, looked up in the cache, and the misses
/// being sent by a task on the runtime.
struct Round {
    ids: Vec<(usize, usize, u32, std::result::Result<String, String>)>,
    hits: HashMap<String, CachedResponse>,
    sending: Option<tokio::task::JoinHandle<Sent>>,
    /// Ids this round sends (registered in [`Shared::inflight`] until the round finishes).
    leaders: Vec<u128>,
}

/// A chunk between its first send and its write.
struct InFlight {
    chunk: RecordBatch,
    rows: Vec<serde_json::Value>,
    outcomes: Vec<Vec<Option<Outcome>>>,
    round: Round,
}

/// How one sample of a round resolved.
enum Resolved {
    Done(usize, usize, Outcome),
    Retry(usize, usize, u32),
    Abort(String),
}

/// A message; `content` is a Jinja template over the row's columns, inline or from `file`
/// (relative to the pipeline file, e.g. `prompts/judge.j2`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
}

/// What a per-row parameter must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    Number,
    Integer,
    /// A string or a list of strings.
    Stop,
}

impl ParamKind {
    fn expected(self) -> &'static str {
        match self {
            ParamKind::Number => "a number",
            ParamKind::Integer => "an integer",
            ParamKind::Stop => "a string or a list of strings",
        }
    }

    fn sql_type(self) -> &'static str {
        match self {
            ParamKind::Number => "DOUBLE",
            ParamKind::Integer => "BIGINT",
            ParamKind::Stop => "VARCHAR",
        }
    }

    fn accepts(self, v: &serde_json::Value) -> bool {
        match self {
            ParamKind::Number => v.is_number(),
            ParamKind::Integer => v.is_i64() || v.is_u64(),
            ParamKind::Stop => {
                v.is_string()
                    || v.as_array()
                        .is_some_and(|a| a.iter().all(|x| x.is_string()))
            }
        }
    }

    fn accepts_type(self, t: &DataType) -> bool {
        let text =
            |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        match self {
            ParamKind::Number => t.is_numeric(),
            ParamKind::Integer => t.is_integer(),
            ParamKind::Stop => match t {
                DataType::List(f) | DataType::LargeList(f) => text(f.data_type()),
                t => text(t),
            },
        }
    }
}

/// A parameter value: a literal, or `{column: name}` to take it from the row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ParamValue {
    Column { column: String },
    Value(serde_json::Value),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    #[serde(default)]
    pub temperature: Option<ParamValue>,
    #[serde(default)]
    pub top_p: Option<ParamValue>,
    #[serde(default)]
    pub max_tokens: Option<ParamValue>,
    /// A string or a list of strings (or a column of either).
    #[serde(default)]
    pub stop: Option<ParamValue>,
    #[serde(default)]
    pub seed: Option<ParamValue>,
    #[serde(default)]
    pub presence_penalty: Option<ParamValue>,
    #[serde(default)]
    pub frequency_penalty: Option<ParamValue>,
    /// Token log-probabilities of each answer, in `<output>_logprobs` (JSON as the server
    /// sends them: chat `{"content": [{token, logprob, top_logprobs}]}`, completions
    /// `{"tokens", "token_logprobs", "top_logprobs"}`).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Alternatives per token (0-20); implies `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Passed through verbatim into the request body (vLLM: top_k, min_p, ...).
    #[serde(default)]
    pub extra_body: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnParseError {
    /// Keep the row with a null value and the reason in `<output>_parse_error`.
    #[default]
    Keep,
    /// Move the row to `<id>__failed`.
    Drop,
    /// Stop the stage.
    Fail,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Rows whose request fails after all retries go to `<id>__failed`; the stage completes.
    #[default]
    DeadLetter,
    Fail,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reasoning {
    /// Drop `<think>…</think>` and `reasoning_content` from the answer (kept in `<output>_reasoning`).
    #[default]
    Strip,
    /// Keep the text exactly as the server sent it.
    Keep,
}

fn d_samples() -> u32 {
    1
}
fn d_output() -> String {
    "response".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmStage {
    pub model: String,
    #[serde(default)]
    pub api: Api,
    /// Chat messages (api: chat).
    #[serde(default)]
    pub messages: Vec<MessageSpec>,
    /// Prompt template (api: completions).
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub params: Params,
    /// Responses per row.
    #[serde(default = "d_samples")]
    pub samples: u32,
    /// One row per sample (with `sample_index`) instead of list columns.
    #[serde(default)]
    pub explode: bool,
    /// A JSON Schema the response must follow (structured decoding where the server has it).
    #[serde(default)]
    pub response_format: Option<serde_json::Value>,
    #[serde(default)]
    pub parse: Option<ParseSpec>,
    #[serde(default)]
    pub on_parse_error: OnParseError,
    /// Ask again (another seed) up to this many times when parsing fails.
    #[serde(default)]
    pub retry_on_parse_error: u32,
    #[serde(default)]
    pub on_error: OnError,
    /// When the server answers that prompt + `max_tokens` exceeds the model's context and says
    /// how long the prompt is, ask once more with `max_tokens` set to the room left.
    #[serde(default)]
    pub clamp_max_tokens: bool,
    #[serde(default)]
    pub reasoning: Reasoning,
    /// Name of the response column; the others are `<output>_finish_reason`, ...
    #[serde(default = "d_output")]
    pub output: String,
    // Operational settings: not part of the fingerprint.
    /// A named group under the pipeline's top-level `endpoints:`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Or base URLs given here (with `profile`, `api_key_env`, `max_in_flight`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub profile: Option<Profile>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    #[serde(skip)]
    #[schemars(skip)]
    group: Option<EndpointGroup>,
    /// Template sources after loading files: (role, source).
    #[serde(skip)]
    #[schemars(skip)]
    templates: Vec<(String, String)>,
}

impl LlmStage {
    fn out(&self, suffix: &str) -> String {
        if suffix.is_empty() {
            self.output.clone()
        } else {
            format!("{}_{suffix}", self.output)
        }
    }

    fn group(&self) -> Result<&EndpointGroup> {
        self.group
            .as_ref()
            .ok_or_else(|| Error::Internal("endpoint group not resolved".into()))
    }

    /// The columns this stage adds.
    fn new_fields(&self) -> Vec<Field> {
        let list = self.samples > 1 && !self.explode;
        let wrap = |t: DataType| {
            if list {
                DataType::List(Arc::new(Field::new("item", t, true)))
            } else {
                t
            }
        };
        let mut f = vec![
            Field::new(self.out(""), wrap(DataType::Utf8), true),
            Field::new(self.out("finish_reason"), wrap(DataType::Utf8), true),
            Field::new(self.out("truncated"), wrap(DataType::Boolean), true),
            Field::new(self.out("prompt_tokens"), DataType::Int64, true),
            Field::new(self.out("completion_tokens"), wrap(DataType::Int64), true),
            Field::new(self.out("latency_ms"), wrap(DataType::Int64), true),
            Field::new(self.out("request_id"), wrap(DataType::Utf8), true),
            Field::new(self.out("cached"), wrap(DataType::Boolean), true),
            Field::new(self.out("reasoning"), wrap(DataType::Utf8), true),
            Field::new(self.out("error"), DataType::Utf8, true),
        ];
        if self.wants_logprobs() {
            f.push(Field::new(self.out("logprobs"), wrap(DataType::Utf8), true));
        }
        if let Some(p) = &self.parse {
            f.push(Field::new(
                self.out("parsed"),
                wrap(parse::arrow_type(p)),
                true,
            ));
            f.push(Field::new(
                self.out("repaired"),
                wrap(DataType::Boolean),
                true,
            ));
            f.push(Field::new(
                self.out("parse_error"),
                wrap(DataType::Utf8),
                true,
            ));
        }
        // With `explode`, `sample_index` is there whatever K is, so downstream SQL written
        // for K = 5 still plans when a run sets K = 1.
        if self.explode {
            f.push(Field::new("sample_index", DataType::UInt32, false));
        }
        f
    }

    fn env(&self) -> std::result::Result<minijinja::Environment<'static>, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (i, (_, src)) in self.templates.iter().enumerate() {
            env.add_template_owned(format!("m{i}"), src.clone())?;
        }
        Ok(env)
    }

    /// The params that may come from a column per row, by name.
    /// Whether template `i` is the completions API's `prompt` (pushed after the messages).
    fn is_prompt(&self, i: usize) -> bool {
        self.api == Api::Completions && i + 1 == self.templates.len()
    }

    /// The file template `i` was read from, if it was.
    fn template_file(&self, i: usize) -> Option<&str> {
        self.messages.get(i).and_then(|m| m.file.as_deref())
    }

    /// Where template `i` is written in the pipeline file, for errors about it: `prompt`, or
    /// the message's inline `content` or its `file`.
    fn template_path(&self, i: usize) -> Vec<String> {
        if self.is_prompt(i) {
            return vec!["prompt".into()];
        }
        let key = if self.template_file(i).is_some() {
            "file"
        } else {
            "content"
        };
        vec!["messages".into(), i.to_string(), key.into()]
    }

    fn column_params(&self) -> [(&'static str, &Option<ParamValue>, ParamKind); 7] {
        use ParamKind::*;
        [
            ("temperature", &self.params.temperature, Number),
            ("top_p", &self.params.top_p, Number),
            ("max_tokens", &self.params.max_tokens, Integer),
            ("seed", &self.params.seed, Integer),
            ("presence_penalty", &self.params.presence_penalty, Number),
            ("frequency_penalty", &self.params.frequency_penalty, Number),
            ("stop", &self.params.stop, Stop),
        ]
    }

    /// The columns a row's request depends on: template variables and per-row params.
    fn context_columns(&self, env: &minijinja::Environment) -> Vec<String> {
        let mut cols: std::collections::BTreeSet<String> = Default::default();
        for i in 0..self.templates.len() {
            if let Ok(t) = env.get_template(&format!("m{i}")) {
                cols.extend(t.undeclared_variables(false));
            }
        }
        for (_, p, _) in self.column_params() {
            if let Some(ParamValue::Column { column }) = p {
                cols.insert(column.clone());
            }
        }
        cols.into_iter().collect()
    }

    fn resolve(
        &self,
        v: &Option<ParamValue>,
        row: &serde_json::Value,
    ) -> Option<serde_json::Value> {
        match v {
            None => None,
            Some(ParamValue::Value(x)) => Some(x.clone()),
            Some(ParamValue::Column { column }) => {
                row.get(column).cloned().filter(|x| !x.is_null())
            }
        }
    }

    /// The messages' templates, fetched from `env` once per stage. A template that reads no
    /// variable is rendered here, once, instead of once per row.
    fn renderer<'e>(
        &self,
        env: &'e minijinja::Environment<'static>,
    ) -> std::result::Result<Renderer<'e>, String> {
        let mut messages = Vec::new();
        for (i, (role, src)) in self.templates.iter().enumerate() {
            let t = env
                .get_template(&format!("m{i}"))
                .map_err(|e| e.to_string())?;
            // `undeclared_variables` does not look into included templates.
            let pulls_in = ["include", "import", "extends"]
                .iter()
                .any(|w| src.contains(w));
            let text = if !pulls_in && t.undeclared_variables(false).is_empty() {
                t.render(minijinja::context! {}).ok()
            } else {
                None
            };
            let m = match text {
                Some(text) => Template::Fixed(text),
                // Rendered per row; errors then surface per row, with the row's context.
                None => Template::PerRow(t),
            };
            messages.push((role.clone(), m));
        }
        Ok(Renderer { messages })
    }

    /// Render one row's messages (the same for all its samples).
    fn render(
        &self,
        renderer: &Renderer,
        row: &serde_json::Value,
    ) -> std::result::Result<Vec<Message>, String> {
        // Converted once for all of the row's templates (`render(row)` converts per call).
        let mut context = None;
        let mut rendered = Vec::with_capacity(renderer.messages.len());
        for (i, (role, t)) in renderer.messages.iter().enumerate() {
            let content = match t {
                Template::Fixed(text) => text.clone(),
                Template::PerRow(t) => t
                    .render(context.get_or_insert_with(|| minijinja::Value::from_serialize(row)))
                    .map_err(|e| format!("template for message {}: {e}", i + 1))?,
            };
            rendered.push(Message {
                role: role.clone(),
                content,
            });
        }
        Ok(rendered)
    }

    /// The canonical request for one row and one sample from the row's rendered messages
    /// (`attempt` > 0 re-asks after a parse failure, with another seed and so another id).
    fn canonical(
        &self,
        mut rendered: Vec<Message>,
        row: &serde_json::Value,
        sample: u32,
        attempt: u32,
    ) -> Canonical {
        let f = |v: &Option<ParamValue>| self.resolve(v, row).and_then(|x| x.as_f64());
        let i = |v: &Option<ParamValue>| self.resolve(v, row).and_then(|x| x.as_i64());
        let mut seed = i(&self.params.seed);
        // Distinct samples need distinct seeds when each is its own request.
        if self.samples > 1 || attempt > 0 {
            seed = Some(seed.unwrap_or(0) + sample as i64 + 1_000_003 * attempt as i64);
        }
        let sampling = Sampling {
            temperature: f(&self.params.temperature),
            top_p: f(&self.params.top_p),
            max_tokens: i(&self.params.max_tokens),
            stop: self.resolve(&self.params.stop, row).and_then(|v| match v {
                serde_json::Value::String(s) => Some(vec![s]),
                serde_json::Value::Array(a) => Some(
                    a.into_iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect(),
                ),
                _ => None,
            }),
            seed,
            presence_penalty: f(&self.params.presence_penalty),
            frequency_penalty: f(&self.params.frequency_penalty),
            logprobs: self
                .params
                .logprobs
                .or(self.params.top_logprobs.map(|_| true)),
            top_logprobs: self.params.top_logprobs,
            extra_body: self.params.extra_body.clone(),
        };
        let (messages, prompt) = match self.api {
            Api::Chat => (Some(rendered), None),
            Api::Completions => (None, rendered.pop().map(|m| m.content)),
        };
        Canonical {
            model: self.model.clone(),
            api: self.api,
            messages,
            prompt,
            sampling,
            response_schema: self.response_format.clone(),
            sample: sample + 1000 * attempt,
        }
    }
}

/// A stage's message templates, ready to render rows.
struct Renderer<'e> {
    messages: Vec<(String, Template<'e>)>,
}

enum Template<'e> {
    /// Reads no variable: rendered once.
    Fixed(String),
    PerRow(minijinja::Template<'e, 'e>),
}

/// The template context of each row: the `columns` of `batch` (those the templates and the
/// per-row params read; turning the rest into JSON would be wasted work).
fn context_rows(batch: &RecordBatch, columns: &[String]) -> Result<Vec<serde_json::Value>> {
    let idx: Vec<usize> = columns
        .iter()
        .filter_map(|c| batch.schema().index_of(c).ok())
        .collect();
    if idx.is_empty() {
        return Ok(vec![
            serde_json::Value::Object(Default::default());
            batch.num_rows()
        ]);
    }
    batch_rows(&batch.project(&idx)?)
}

/// Turn a batch into one JSON object per row (the template context).
pub fn batch_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        w.write(batch)?;
        w.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_slice(&buf)?)
}

/// What became of one (row, sample).
#[derive(Debug, Clone)]
struct Outcome {
    request_id: String,
    response: std::result::Result<(CachedResponse, bool), (String, Option<bytes::Bytes>)>,
    parsed: Option<std::result::Result<parse::Parsed, String>>,
}

/// Counters reported in the manifest (and by `ifloom stats`).
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    cache_hits: AtomicU64,
    failures: AtomicU64,
    parse_failures: AtomicU64,
    /// Requests asked again with `max_tokens` clamped to the context left.
    clamped: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Usage of the answers in the finished table, cached ones included (see `complete`).
    table_prompt_tokens: AtomicU64,
    table_completion_tokens: AtomicU64,
    done: AtomicU64,
}

impl Stage for LlmStage {
    /// 2: `explode` adds `sample_index` for K = 1 too. 3: the dead-letter table has
    /// `raw_bytes`.
    fn version(&self) -> u32 {
        3
    }

    fn needs_id(&self) -> bool {
        true
    }

    fn side_tables(&self) -> &'static [&'static str] {
        &["failed"]
    }

    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        let mut errs = Vec::new();
        let at = |path: &[&str], msg: String| Diagnostic::new(&ctx.file, node.pos_at(path), msg);
        if self.samples == 0 {
            errs.push(at(&["samples"], "samples must be at least 1".into()));
        }
        for (name, p, kind) in self.column_params() {
            if let Some(ParamValue::Value(v)) = p {
                if !kind.accepts(v) {
                    errs.push(at(
                        &["params", name],
                        format!(
                            "params.{name}: expected {} or {{column: name}}, got {v}",
                            kind.expected()
                        ),
                    ));
                } else if let Some(range) = param_range(name, v) {
                    errs.push(at(
                        &["params", name],
                        format!("params.{name}: {range}, got {v}"),
                    ));
                }
            }
        }
        if self.parse.is_none() && self.retry_on_parse_error > 0 {
            errs.push(at(
                &["retry_on_parse_error"],
                "retry_on_parse_error has no effect without `parse:`".into(),
            ));
        }
        if self.parse.is_none() && self.on_parse_error != OnParseError::default() {
            errs.push(
                at(
                    &["on_parse_error"],
                    "on_parse_error has no effect without `parse:`".into(),
                )
                .hint(
                    "add parse: {json: ...}, {regex: ...} or {choice: ...}, or drop on_parse_error",
                ),
            );
        }
        if let Some(k) = self.params.top_logprobs
            && k > 20
        {
            errs.push(at(
                &["params", "top_logprobs"],
                format!("top_logprobs must be 0 to 20, got {k}"),
            ));
        }
        if self.params.logprobs == Some(false) && self.params.top_logprobs.is_some() {
            errs.push(at(
                &["params", "top_logprobs"],
                "top_logprobs needs logprobs: drop `logprobs: false`".into(),
            ));
        }
        if self.output.is_empty()
            || !self
                .output
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            errs.push(at(
                &["output"],
                format!("output `{}` is not a valid column name", self.output),
            ));
        }
        match self.api {
            Api::Chat if self.messages.is_empty() => errs.push(
                at(
                    &["messages"],
                    "an llm stage with api: chat needs `messages`".into(),
                )
                .hint("messages: [{role: user, content: \"{{ prompt }}\"}]"),
            ),
            Api::Completions if self.prompt.is_none() => errs.push(at(
                &["prompt"],
                "api: completions needs a `prompt` template".into(),
            )),
            _ => {}
        }
        for (i, m) in self.messages.iter().enumerate() {
            let path = ["messages", &i.to_string()];
            let src = match (&m.content, &m.file) {
                (Some(c), None) => Some(c.clone()),
                (None, Some(f)) => match std::fs::read_to_string(ctx.dir.join(f)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errs.push(
                            at(
                                &["messages", &i.to_string(), "file"],
                                format!("cannot read template {f}: {e}"),
                            )
                            .hint("template files are relative to the pipeline file"),
                        );
                        None
                    }
                },
                _ => {
                    errs.push(at(
                        &path,
                        "a message needs exactly one of `content` and `file`".into(),
                    ));
                    None
                }
            };
            if let Some(s) = src {
                self.templates.push((m.role.clone(), s));
            }
        }
        if self.api == Api::Completions
            && let Some(p) = &self.prompt
        {
            self.templates.push(("user".into(), p.clone()));
        }
        // Each template on its own, so each error points at its own message (and, for a file,
        // says the line in that file rather than minijinja's internal name for it).
        let probe = minijinja::Environment::new();
        for (i, (_, src)) in self.templates.iter().enumerate() {
            let Err(e) = probe.template_from_str(src) else {
                continue;
            };
            let detail = e.detail().unwrap_or("invalid syntax");
            let line = e.line().map(|l| format!(", line {l}")).unwrap_or_default();
            let path = self.template_path(i);
            let msg = match (self.is_prompt(i), self.template_file(i)) {
                (true, _) => format!("template syntax error (prompt{line}): {detail}"),
                (_, Some(f)) => format!("template syntax error in {f}{line}: {detail}"),
                (_, None) => {
                    format!("template syntax error (message {}{line}): {detail}", i + 1)
                }
            };
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            errs.push(
                at(&path, msg)
                    .hint("templates use Jinja syntax: {{ column }}, {% if %}...{% endif %}"),
            );
        }
        if errs.is_empty()
            && let Err(e) = self.env()
        {
            errs.push(at(&["messages"], format!("template syntax error: {e}")));
        }
        // The endpoint group: named (top level `endpoints:`) or inline.
        let no_groups = Endpoints::default();
        let groups = ctx
            .section::<Endpoints>(endpoints::SECTION.name)
            .unwrap_or(&no_groups);
        let group = match (&self.endpoint, self.endpoints.is_empty()) {
            (Some(name), true) => match groups.get(name) {
                Some(g) => Some(g.clone()),
                None => {
                    errs.push(
                        at(&["endpoint"], format!("unknown endpoint group `{name}`"))
                            .maybe_hint(did_you_mean(name, groups.names()))
                            .hint_or(format!(
                                "define it under the top-level `endpoints:` (defined: {})",
                                groups.names().collect::<Vec<_>>().join(", ")
                            )),
                    );
                    None
                }
            },
            (None, false) => Some(EndpointGroup::new(self.endpoints.clone())),
            (Some(_), false) => {
                errs.push(at(
                    &["endpoints"],
                    "give either `endpoint` (a group name) or `endpoints` (URLs), not both".into(),
                ));
                None
            }
            (None, true) => {
                errs.push(
                    at(
                        &[],
                        "an llm stage needs `endpoint: <group>` or `endpoints: [URL]`".into(),
                    )
                    .hint("e.g. endpoints: [\"http://127.0.0.1:8000/v1\"]"),
                );
                None
            }
        };
        if let Some(p) = &self.parse
            && let Err(e) = p.check()
        {
            errs.push(at(&["parse"], format!("parse: {e}")));
        }
        if let Some(schema) = &self.response_format {
            for p in schema_problems(schema, "response_format") {
                errs.push(at(&["response_format"], p).hint(
                    "a JSON Schema, e.g. {type: object, properties: {answer: {type: string}}, required: [answer]}",
                ));
            }
        }
        // The same rule and words as for an endpoint group (`EndpointGroup::problems`): 0 is
        // a mistake, not a request for the smallest value.
        if self.max_in_flight == Some(0) {
            errs.push(at(
                &["max_in_flight"],
                "max_in_flight: must be at least 1".into(),
            ));
        }
        if let Some(mut g) = group {
            if let Some(p) = self.profile {
                g.profile = p;
            }
            if let Some(k) = &self.api_key_env {
                g.api_key_env = Some(k.clone());
            }
            if let Some(m) = self.max_in_flight {
                g.max_in_flight = m;
            }
            self.group = Some(g);
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn fingerprint(&self) -> serde_json::Value {
        // The semantic request (templates, model, params, samples) and what is done with the
        // answer; endpoints, profile, keys and concurrency are left out on purpose.
        serde_json::json!({
            "model": self.model,
            "api": self.api,
            "templates": self.templates,
            "params": self.params,
            "samples": self.samples,
            "explode": self.explode,
            "response_format": self.response_format,
            "parse": self.parse,
            "on_parse_error": self.on_parse_error,
            "retry_on_parse_error": self.retry_on_parse_error,
            "on_error": self.on_error,
            "clamp_max_tokens": self.clamp_max_tokens,
            "reasoning": self.reasoning,
            "output": self.output,
        })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut errs = Vec::new();
        let env = match self.env() {
            Ok(e) => e,
            Err(e) => {
                return Err(vec![
                    ctx.err(&["messages"], format!("template syntax error: {e}")),
                ]);
            }
        };
        for i in 0..self.templates.len() {
            let Ok(t) = env.get_template(&format!("m{i}")) else {
                continue;
            };
            let path = self.template_path(i);
            let p: Vec<&str> = path.iter().map(String::as_str).collect();
            // minijinja looks filters and tests up only when it renders: every row would fail.
            for (kind, name) in unknown_filters_and_tests(&env, &self.templates[i].1) {
                errs.push(ctx.err(&p, format!("unknown {kind} `{name}` in the template")).hint(
                    format!(
                        "see minijinja's built-in {kind}s (https://docs.rs/minijinja/latest/minijinja/{kind}s/)"
                    ),
                ));
            }
            let mut vars: Vec<String> = t.undeclared_variables(false).into_iter().collect();
            vars.sort();
            for v in vars {
                if !cols.contains(&v.as_str()) {
                    // In a template file, also the line that uses it (the first one).
                    let at_line = self
                        .template_file(i)
                        .and_then(|f| {
                            let re =
                                regex::Regex::new(&format!(r"\b{}\b", regex::escape(&v))).ok()?;
                            let n = self.templates[i].1.lines().position(|l| re.is_match(l))?;
                            Some(format!(" ({f}, line {})", n + 1))
                        })
                        .unwrap_or_default();
                    errs.push(
                        ctx.err(
                            &p,
                            format!(
                                "template variable `{v}` is not a column of `{}`{at_line}",
                                ctx.parents[0].0
                            ),
                        )
                        .maybe_hint(did_you_mean(&v, cols.iter().copied()))
                        .hint_if_none(format!("columns: {}", cols.join(", "))),
                    );
                }
            }
        }
        for (name, p, kind) in self.column_params() {
            let Some(ParamValue::Column { column }) = p else {
                continue;
            };
            match schema.field_with_name(column) {
                Err(_) => errs.push(crate::stages::unknown_column(
                    ctx,
                    &["params", name, "column"],
                    column,
                    schema,
                )),
                Ok(f) if !kind.accepts_type(f.data_type()) => errs.push(
                    ctx.err(
                        &["params", name, "column"],
                        format!(
                            "params.{name}: column `{column}` is {}, expected {}",
                            f.data_type(),
                            kind.expected()
                        ),
                    )
                    .hint(format!(
                        "cast it in an upstream sql stage, e.g. CAST({column} AS {})",
                        kind.sql_type()
                    )),
                ),
                Ok(_) => {}
            }
        }
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for f in self.new_fields() {
            if cols.contains(&f.name().as_str()) {
                errs.push(
                    ctx.err(
                        &["output"],
                        format!("column `{}` already exists upstream", f.name()),
                    )
                    .hint("choose another `output:` name for this stage's columns"),
                );
            }
            fields.push(f);
        }
        if errs.is_empty() {
            Ok(Arc::new(Schema::new(fields)))
        } else {
            Err(errs)
        }
    }

    // Checking past errors (issue 25): whatever `plan` found wrong (template variables,
    // column params), the stage adds the same columns, so the stages downstream are checked
    // in the same validation.
    fn schema_despite_errors(&self, ctx: &PlanCtx) -> Option<SchemaRef> {
        let parent = ctx.parent();
        let added = self.new_fields();
        // An added column that clashes with an upstream one leaves the output unclear.
        if added
            .iter()
            .any(|f| parent.field_with_name(f.name()).is_ok())
        {
            return None;
        }
        let fields: Vec<Field> = parent.fields().iter().map(|f| f.as_ref().clone()).collect();
        Some(Arc::new(Schema::new([fields, added].concat())))
    }
    // End of checking past errors.

    fn llm(&self) -> Option<&LlmStage> {
        Some(self)
    }

    fn dry_run(&self, ctx: &RunCtx) -> Option<Result<String>> {
        Some((|| {
            let mut rows = Vec::new();
            for b in read_batches(&ctx.parent().files) {
                rows.extend(batch_rows(&b?)?);
            }
            let reqs = plan_requests(self, &rows)?;
            let ids: Vec<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
            let cached = Cache::open(&ctx.engine.cache_path)?.get_many(&ids)?.len();
            let tokens: usize = reqs.iter().map(|(_, c)| c.approx_prompt_tokens()).sum();
            let mut out = format!(
                "    {} rows x {} sample(s): {} distinct requests, {} already cached, {} to send; ~{} prompt words{}",
                rows.len(),
                self.samples,
                reqs.len(),
                cached,
                reqs.len() - cached,
                tokens,
                // The run's `requests` counter counts HTTP requests: one per row where the
                // server honours `n`.
                if self.samples > 1 && self.profile().honours_n() {
                    format!(
                        " (one request per sample and cache entry; a row's uncached samples go out as one HTTP request with n: {})",
                        self.samples
                    )
                } else {
                    String::new()
                }
            );
            for (id, c) in reqs.iter().take(2) {
                out.push_str(&format!("\n    request {id}:"));
                for m in c.messages.iter().flatten() {
                    let text: String = m.content.chars().take(400).collect();
                    out.push_str(&format!(
                        "\n      [{}] {}",
                        m.role,
                        text.replace('\n', "\n        ")
                    ));
                }
                if let Some(p) = &c.prompt {
                    out.push_str(&format!("\n      [prompt] {p}"));
                }
            }
            Ok(out)
        })())
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let started = Instant::now();
        let group = self.group()?.clone();
        let pool = Arc::new(Pool::new(&group).map_err(|e| Error::stage(ctx.id, e))?);
        let total_rows = crate::engine::count_rows(&ctx.parent().files)?;
        let failed_dir = ctx.side_dir("failed");
        std::fs::create_dir_all(&failed_dir).map_err(|e| Error::io(&failed_dir, e))?;
        if total_rows == 0 {
            // Nothing to send; the dead-letter table still exists (empty) so SQL over it plans.
            crate::engine::write_empty(
                &failed_dir.join("part-00000.parquet"),
                &self.failed_schema(&ctx.parent().schema),
            )?;
            return Ok(RunOutput::default());
        }
        // Checked while the cache opens and the first rows render; awaited before the first
        // request is sent (`start_round`), never when every answer is cached.
        let mut healthy = EndpointCheck {
            task: Some({
                let (p, model) = (pool.clone(), self.model.clone());
                ctx.engine
                    .rt
                    .spawn(async move { p.health_check(&model).await })
            }),
        };
        // The cache opens (~3 ms for a new one: its file, WAL and table) while the first rows
        // are read.
        let opening = {
            let path = ctx.engine.cache_path.clone();
            std::thread::spawn(move || Cache::open(&path))
        };
        let env = self.env().map_err(|e| Error::stage(ctx.id, e))?;
        let renderer = self.renderer(&env).map_err(|e| Error::stage(ctx.id, e))?;
        let counters = Arc::new(Counters::default());

        let new_schema = Arc::new(Schema::new(self.new_fields()));
        let mut main_w: Option<ArrowWriter<File>> = None;
        let mut failed_w: Option<ArrowWriter<File>> = None;

        let chunk_rows = (pool.capacity() * 64).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS);
        let k = self.samples as usize;
        let context = self.context_columns(&env);
        let mut queue: std::collections::VecDeque<InFlight> = Default::default();
        // Chunks in input order; `None` at the end drains the queue.
        // The first chunk is `FIRST_CHUNK_ROWS` and each next one twice the last, up to
        // `chunk_rows`: requests start after rendering a few dozen rows, not tens of
        // thousands (measured: ~0.5 s before the first request of a 10k-row stage; 6 ms with
        // a first chunk of one in-flight window, 512 rows).
        // Towards the end they halve again: the last chunk's responses are parsed and written
        // after the servers finished, so a small last chunk keeps that tail short (measured:
        // 0.4 s for a last chunk of 32768 rows).
        let floor = pool.capacity().clamp(1, chunk_rows);
        let mut size = floor.min(FIRST_CHUNK_ROWS);
        let mut remaining = total_rows as usize;
        let mut chunks = read_input(&ctx.parent().files, size).flat_map(move |b| {
            let mut pieces: Vec<Result<RecordBatch>> = Vec::new();
            match b {
                Ok(b) => {
                    let mut start = 0;
                    while start < b.num_rows() {
                        let want = size.min(remaining.div_ceil(2).max(floor));
                        let len = want.min(b.num_rows() - start);
                        pieces.push(Ok(b.slice(start, len)));
                        start += len;
                        remaining = remaining.saturating_sub(len);
                        size = (size * 2).min(chunk_rows);
                    }
                }
                Err(e) => pieces.push(Err(e)),
            }
            pieces
        });
        let mut first = Some(chunks.next().transpose()?);
        let cache = Arc::new(
            opening
                .join()
                .map_err(|_| Error::Internal("opening the cache panicked".into()))??,
        );
        tracing::debug!(
            "{}: client and cache ready at {:.3} s",
            ctx.id,
            started.elapsed().as_secs_f64()
        );
        // Progress: a bar on a terminal, plain periodic lines otherwise (CI logs).
        // Dropping `stop` ends the ticker at once (it used to sleep out its period: up to
        // 100 ms added to every stage).
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let ticker = {
            let (c, stop, pool, id) = (counters.clone(), stop_rx, pool.clone(), ctx.id.to_string());
            let total = total_rows * self.samples as u64;
            std::thread::spawn(move || progress(&id, total, started, &c, &pool, &stop))
        };

        let shared = Shared {
            pool: pool.clone(),
            cache: cache.clone(),
            counters: counters.clone(),
            model: self.model.as_str().into(),
            started,
            stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            clamp: self.clamp_max_tokens,
            inflight: Default::default(),
            answered: Default::default(),
            // Four times the pool's capacity: a request sleeping out a retry backoff (a 429's
            // Retry-After is often a whole second) holds no in-flight permit but does hold a
            // place here; with room for exactly the capacity, 1% faults left ~20% of the
            // permits unused.
            window: Arc::new(tokio::sync::Semaphore::new(pool.capacity().max(1) * 4)),
            admission: Default::default(),
        };
        let result = (|| -> Result<()> {
            loop {
                let next = match first.take() {
                    Some(c) => c,
                    None => chunks.next().transpose()?,
                };
                let end = next.is_none();
                if let Some(chunk) = next {
                    let rows = context_rows(&chunk, &context)?;
                    let pending: Vec<(usize, usize, u32)> = (0..rows.len())
                        .flat_map(|r| (0..k).map(move |s| (r, s, 0u32)))
                        .collect();
                    let round =
                        self.start_round(ctx, &renderer, &rows, &pending, &shared, &mut healthy)?;
                    queue.push_back(InFlight {
                        chunk,
                        outcomes: vec![vec![None; k]; rows.len()],
                        rows,
                        round,
                    });
                }
                // Complete (wait for, then write) the oldest chunk only when the chunks behind
                // it hold a full chunk of work for the servers meanwhile: with small first
                // chunks, one request sleeping out a 1 s Retry-After must not hold up the next
                // thousands (measured: a 10k-row stage with 1% faults took 4.3 s, not 3.7 s).
                while let Some(front) = queue.front() {
                    let behind: usize =
                        queue.iter().map(|c| c.rows.len()).sum::<usize>() - front.rows.len();
                    if !end && behind < chunk_rows * (PIPELINE_DEPTH - 1) {
                        break;
                    }
                    let c = queue.pop_front().expect("non-empty");
                    tracing::debug!(
                        "{}: completing a chunk of {} rows at {:.3} s",
                        ctx.id,
                        c.rows.len(),
                        started.elapsed().as_secs_f64()
                    );
                    self.complete(
                        ctx,
                        &renderer,
                        c,
                        &shared,
                        &mut healthy,
                        &new_schema,
                        &mut main_w,
                        &mut failed_w,
                    )?;
                }
                if end {
                    tracing::debug!(
                        "{}: every chunk written at {:.3} s",
                        ctx.id,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
            }
        })();
        if result.is_err() {
            // Chunks still queued send nothing more and retry nothing; what is on the wire
            // finishes and is cached (the server did the work: the rerun must not pay again).
            shared.stop.store(true, Ordering::SeqCst);
            WAKE.notify_waiters();
            for c in queue.drain(..) {
                if let Some(h) = c.round.sending {
                    let _ = ctx.engine.block_on(h);
                }
            }
        }
        drop(shared);
        drop(stop);
        let _ = ticker.join();
        // Flush the cache even when the stage failed: finished responses must survive. The
        // tables close meanwhile: both are left for after the last response.
        let cache =
            Arc::try_unwrap(cache).map_err(|_| Error::Internal("cache still shared".into()))?;
        let ok = result.is_ok();
        let (closed, tables) = std::thread::scope(|s| {
            let closing = s.spawn(move || cache.close());
            let tables = (|| -> Result<()> {
                if !ok {
                    return Ok(());
                }
                if let Some(w) = main_w {
                    w.close()?;
                }
                match failed_w {
                    Some(w) => {
                        w.close()?;
                    }
                    None => crate::engine::write_empty(
                        &failed_dir.join("part-00000.parquet"),
                        &self.failed_schema(&ctx.parent().schema),
                    )?,
                }
                Ok(())
            })();
            (closing.join(), tables)
        });
        let closed = closed
            .map_err(|_| Error::Internal("cache writer panicked".into()))?
            .map_err(|e| Error::stage(ctx.id, cache_failed(&e.to_string())));
        result?;
        closed?;
        tables?;
        tracing::debug!(
            "{}: tables closed at {:.3} s",
            ctx.id,
            started.elapsed().as_secs_f64()
        );
        let mut out = RunOutput::default();
        let c = &counters;
        for (k, v) in [
            ("requests", c.requests.load(Ordering::Relaxed)),
            ("cache_hits", c.cache_hits.load(Ordering::Relaxed)),
            ("failures", c.failures.load(Ordering::Relaxed)),
            ("parse_failures", c.parse_failures.load(Ordering::Relaxed)),
            ("clamped", c.clamped.load(Ordering::Relaxed)),
            ("retries", pool.retries.load(Ordering::Relaxed) as u64),
            ("prompt_tokens", c.prompt_tokens.load(Ordering::Relaxed)),
            (
                "completion_tokens",
                c.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "table_prompt_tokens",
                c.table_prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "table_completion_tokens",
                c.table_completion_tokens.load(Ordering::Relaxed),
            ),
        ] {
            out.counters.insert(k.into(), v as i64);
        }
        Ok(out)
    }
}

impl LlmStage {
    fn failed_schema(&self, parent: &SchemaRef) -> SchemaRef {
        let mut f: Vec<Field> = parent.fields().iter().map(|f| f.as_ref().clone()).collect();
        // The input may already carry one of these names (a judge stage over exploded samples
        // has `sample_index`): the dead-letter column then becomes `failed_<name>`, so the
        // input's value is kept and the table stays queryable.
        for (name, ty, nullable) in [
            ("sample_index", DataType::UInt32, false),
            ("request_id", DataType::Utf8, false),
            ("reason", DataType::Utf8, false),
            ("raw", DataType::Utf8, true),
            ("raw_bytes", DataType::Binary, true),
        ] {
            let taken = parent.fields().iter().any(|p| p.name() == name);
            let name = if taken {
                format!("failed_{name}")
            } else {
                name.to_string()
            };
            f.push(Field::new(name, ty, nullable));
        }
        Arc::new(Schema::new(f))
    }

    /// Render `pending` samples (in parallel), look them up in the cache and hand the misses
    /// to a task on the runtime; the caller collects them with [`Self::finish_round`].
    fn start_round(
        &self,
        ctx: &RunCtx,
        renderer: &Renderer,
        rows: &[serde_json::Value],
        pending: &[(usize, usize, u32)],
        sh: &Shared,
        healthy: &mut EndpointCheck,
    ) -> Result<Round> {
        use rayon::prelude::*;
        // A row's samples are adjacent in `pending`: render its messages once for all.
        let by_row: Vec<&[(usize, usize, u32)]> = pending.chunk_by(|a, b| a.0 == b.0).collect();
        let rendered: Vec<_> = by_row
            .par_iter()
            .flat_map_iter(|same_row| {
                let row = &rows[same_row[0].0];
                let messages = self.render(renderer, row);
                same_row.iter().map(move |&(r, s, attempt)| {
                    let c = messages
                        .clone()
                        .map(|m| self.canonical(m, row, s as u32, attempt));
                    (r, s, attempt, c.map(|c| (c.id(), c)))
                })
            })
            .collect();
        // Identical requests (same id) are sent once. Each request carries how many samples
        // it answers for the first time (its weight in the progress count; re-asks after a
        // parse failure add none).
        let mut reqs: HashMap<String, (Canonical, u64, usize)> = HashMap::new();
        let mut ids = Vec::with_capacity(rendered.len());
        let counters = &sh.counters;
        for (r, s, attempt, c) in rendered {
            let first = u64::from(attempt == 0);
            match c {
                Ok((id, c)) => {
                    reqs.entry(id.clone()).or_insert((c, 0, r)).1 += first;
                    ids.push((r, s, attempt, Ok(id)));
                }
                Err(e) => {
                    counters.done.fetch_add(first, Ordering::Relaxed);
                    ids.push((r, s, attempt, Err(e)))
                }
            }
        }
        if let Some(e) = sh.cache.failure() {
            return Err(Error::stage(ctx.id, cache_failed(e)));
        }
        let all: Vec<String> = reqs.keys().cloned().collect();
        let mut hits = sh.cache.get_many(&all)?;
        if self.wants_logprobs() {
            // Cached by an ifloom that did not keep logprobs (before 2026-11-28): ask again.
            hits.retain(|_, r| r.logprobs.is_some());
        }
        counters
            .cache_hits
            .fetch_add(hits.len() as u64, Ordering::Relaxed);
        let mut misses: HashMap<String, (Canonical, u64, usize)> = HashMap::new();
        let mut hit_weight = 0;
        for (id, (c, w, r)) in reqs {
            if hits.contains_key(&id) {
                hit_weight += w;
            } else {
                misses.insert(id, (c, w, r));
            }
        }
        counters.done.fetch_add(hit_weight, Ordering::Relaxed);
        if !misses.is_empty() {
            healthy.wait(ctx)?;
        }
        // Requests an earlier round is still sending (the previous chunk, or the first ask
        // before a parse retry) are not sent again: they wait for that answer.
        let mut follow: Vec<(String, Canonical, Answer, u64)> = Vec::new();
        if let Ok(map) = sh.inflight.lock()
            && !map.is_empty()
        {
            misses.retain(|id, (c, w, _)| match map.get(&id_key(id)) {
                Some(rx) => {
                    follow.push((id.clone(), c.clone(), rx.clone(), *w));
                    false
                }
                None => true,
            });
        }
        let profile = sh.pool.profile();
        // Work units: the K samples of a row as one request with `n: K` where the server
        // honours `n` (vLLM, OpenAI) and none of them is cached; otherwise one request per
        // sample, each with its own seed. Every choice is cached under its sample's id.
        let mut units: Vec<(Vec<String>, Canonical, u64, Budget)> = Vec::new();
        if profile.honours_n() && self.samples > 1 {
            let mut by_row: BTreeMap<(usize, u32), Vec<(usize, String)>> = BTreeMap::new();
            for (r, s, attempt, id) in &ids {
                if let Ok(id) = id {
                    by_row
                        .entry((*r, *attempt))
                        .or_default()
                        .push((*s, id.clone()));
                }
            }
            for (_, mut sample_ids) in by_row {
                sample_ids.sort();
                let all_missing = sample_ids.len() == self.samples as usize
                    && sample_ids.iter().all(|(_, id)| misses.contains_key(id));
                let distinct: HashSet<&String> = sample_ids.iter().map(|(_, id)| id).collect();
                if all_missing && distinct.len() == sample_ids.len() {
                    let group: Vec<String> = sample_ids.into_iter().map(|(_, id)| id).collect();
                    let (base, mut weight, _) = misses.remove(&group[0]).expect("checked missing");
                    for id in &group[1..] {
                        weight += misses.remove(id).map_or(0, |(_, w, _)| w);
                    }
                    units.push((group, base, weight, budget(&sh.pool)));
                }
            }
        }
        // One budget per row (a request shared by several rows, deduplicated, uses its first
        // row's).
        let mut row_budgets: HashMap<usize, Budget> = HashMap::new();
        units.extend(misses.into_iter().map(|(id, (c, w, r))| {
            let b = row_budgets
                .entry(r)
                .or_insert_with(|| budget(&sh.pool))
                .clone();
            (vec![id], c, w, b)
        }));
        tracing::debug!(
            "{}: {} requests handed to the runtime at {:.3} s",
            ctx.id,
            units.len(),
            sh.started.elapsed().as_secs_f64()
        );
        // Registered before the next round is built (on this thread), so it sees them.
        let mut leaders = Vec::new();
        let units: Vec<Unit> = match sh.inflight.lock() {
            Ok(mut map) => units
                .into_iter()
                .map(|(ids, c, w, b)| {
                    let slot = Answer::default();
                    for id in &ids {
                        map.insert(id_key(id), slot.clone());
                        leaders.push(id_key(id));
                    }
                    (ids, c, slot, w, b)
                })
                .collect(),
            Err(_) => return Err(Error::Internal("in-flight map poisoned".into())),
        };
        let sending = (!units.is_empty() || !follow.is_empty()).then(|| {
            ctx.engine
                .rt
                .spawn(send_units(units, follow, profile, sh.clone()))
        });
        Ok(Round {
            ids,
            hits,
            sending,
            leaders,
        })
    }

    /// Resolve a round whose sends finished: parse (in parallel), apply the error policies,
    /// fill `outcomes`; returns the samples to ask again (`retry_on_parse_error`).
    fn finish_round(
        &self,
        ctx: &RunCtx,
        round: Round,
        sent: Sent,
        outcomes: &mut [Vec<Option<Outcome>>],
        sh: &Shared,
    ) -> Result<Vec<(usize, usize, u32)>> {
        use rayon::prelude::*;
        let counters = &sh.counters;
        let Round {
            ids, hits, leaders, ..
        } = round;
        if !leaders.is_empty()
            && let Ok(mut map) = sh.inflight.lock()
        {
            for id in &leaders {
                map.remove(id);
            }
        }
        let resolved: Vec<Resolved> = ids
            .into_par_iter()
            .map(|(r, s, attempt, id)| {
                let id = match id {
                    Err(e) => {
                        return Resolved::Done(
                            r,
                            s,
                            Outcome {
                                request_id: String::new(),
                                response: Err((e, None)),
                                parsed: None,
                            },
                        );
                    }
                    Ok(id) => id,
                };
                let response = match (hits.get(&id), sent.get(&id)) {
                    (Some(h), _) => Ok((h.clone(), true)),
                    (None, Some(Ok(x))) => Ok((x.clone(), false)),
                    (None, Some(Err(CallError::Abort(m)))) => return Resolved::Abort(m.clone()),
                    (None, Some(Err(CallError::Row { message, raw, .. }))) => {
                        Err((message.clone(), raw.clone()))
                    }
                    (None, None) => Err(("no response".to_string(), None)),
                };
                let response = response.map(|(mut resp, cached)| {
                    if self.reasoning == Reasoning::Strip {
                        let (answer, thought) = parse::strip_reasoning(&resp.text);
                        if let Some(t) = thought {
                            resp.text = answer;
                            // A server may send both (`reasoning_content` and a `<think>`
                            // block in the text): keep both.
                            resp.reasoning = Some(match resp.reasoning.take() {
                                Some(r) if !r.is_empty() => format!("{r}\n\n{t}"),
                                _ => t,
                            });
                        }
                    }
                    (resp, cached)
                });
                let parsed = match (&self.parse, &response) {
                    (Some(spec), Ok((resp, _))) => {
                        Some(parse::parse(spec, &resp.text).map_err(|e| e.to_string()))
                    }
                    _ => None,
                };
                if matches!(parsed, Some(Err(_))) && attempt < self.retry_on_parse_error {
                    return Resolved::Retry(r, s, attempt + 1);
                }
                Resolved::Done(
                    r,
                    s,
                    Outcome {
                        request_id: id,
                        response,
                        parsed,
                    },
                )
            })
            .collect();
        let mut next = Vec::new();
        for res in resolved {
            let (r, s, outcome) = match res {
                Resolved::Abort(m) => return Err(Error::stage(ctx.id, m)),
                Resolved::Retry(r, s, attempt) => {
                    next.push((r, s, attempt));
                    continue;
                }
                Resolved::Done(r, s, o) => (r, s, o),
            };
            if outcome.response.is_err() {
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(Err(msg)) = &outcome.parsed {
                counters.parse_failures.fetch_add(1, Ordering::Relaxed);
                if self.on_parse_error == OnParseError::Fail {
                    return Err(Error::stage(
                        ctx.id,
                        format!("response does not parse (on_parse_error: fail): {msg}"),
                    ));
                }
            }
            if self.on_error == OnError::Fail
                && let Err((m, _)) = &outcome.response
            {
                return Err(Error::stage(
                    ctx.id,
                    format!("request failed (on_error: fail): {m}"),
                ));
            }
            outcomes[r][s] = Some(outcome);
        }
        Ok(next)
    }

    /// Wait for a chunk's sends, resolve them (re-asking parse failures as configured) and
    /// write its rows.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        ctx: &RunCtx,
        renderer: &Renderer,
        c: InFlight,
        sh: &Shared,
        healthy: &mut EndpointCheck,
        new_schema: &SchemaRef,
        main_w: &mut Option<ArrowWriter<File>>,
        failed_w: &mut Option<ArrowWriter<File>>,
    ) -> Result<()> {
        let InFlight {
            chunk,
            rows,
            mut outcomes,
            mut round,
        } = c;
        loop {
            let sent = match round.sending.take() {
                Some(h) => ctx
                    .engine
                    .block_on(h)
                    .map_err(|e| Error::Internal(format!("send task: {e}")))?,
                None => Sent::new(),
            };
            tracing::debug!(
                "{}: a chunk's sends done at {:.3} s",
                ctx.id,
                sh.started.elapsed().as_secs_f64()
            );
            let next = self.finish_round(ctx, round, sent, &mut outcomes, sh)?;
            if next.is_empty() {
                break;
            }
            round = self.start_round(ctx, renderer, &rows, &next, sh, healthy)?;
        }
        let outcomes: Vec<Vec<Outcome>> = outcomes
            .into_iter()
            .map(|v| {
                v.into_iter()
                    .map(|o| o.expect("every sample resolved"))
                    .collect()
            })
            .collect();
        // What the finished table's answers cost, whether sent now or by an earlier run (the
        // cache keeps each answer's usage): completion tokens of every answer; the prompt once
        // per row where the server reads it once for n: K, else once per sample (K requests).
        let once_per_row = sh.pool.profile().honours_n();
        let (mut prompt, mut completion) = (0u64, 0u64);
        for samples in &outcomes {
            let answers = samples.iter().filter_map(|o| o.response.as_ref().ok());
            for (i, (r, _)) in answers.enumerate() {
                if i == 0 || !once_per_row {
                    prompt += r.prompt_tokens.max(0) as u64;
                }
                completion += r.completion_tokens.max(0) as u64;
            }
        }
        let c = &sh.counters;
        c.table_prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        c.table_completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
        self.write_chunk(ctx, &chunk, &outcomes, new_schema, main_w, failed_w)
    }

    /// Append one chunk's rows to the main table and the dead-letter table.
    #[allow(clippy::too_many_arguments)]
    fn write_chunk(
        &self,
        ctx: &RunCtx,
        chunk: &RecordBatch,
        outcomes: &[Vec<Outcome>],
        new_schema: &SchemaRef,
        main_w: &mut Option<ArrowWriter<File>>,
        failed_w: &mut Option<ArrowWriter<File>>,
    ) -> Result<()> {
        let list = self.samples > 1 && !self.explode;
        let mut take: Vec<u32> = Vec::new();
        let mut out_rows: Vec<(&[Outcome], Option<u32>)> = Vec::new();
        let mut failed_take: Vec<u32> = Vec::new();
        let mut failed_cols: (
            Vec<u32>,
            Vec<String>,
            Vec<String>,
            Vec<Option<bytes::Bytes>>,
        ) = Default::default();
        let dropped = |o: &Outcome| {
            o.response.is_err()
                || (self.on_parse_error == OnParseError::Drop && matches!(o.parsed, Some(Err(_))))
        };
        for (r, samples) in outcomes.iter().enumerate() {
            // Dead-letter what failed.
            for (s, o) in samples.iter().enumerate() {
                if dropped(o) {
                    failed_take.push(r as u32);
                    failed_cols.0.push(s as u32);
                    failed_cols.1.push(o.request_id.clone());
                    let (reason, raw) = match (&o.response, &o.parsed) {
                        (Err((m, raw)), _) => (m.clone(), raw.clone()),
                        (Ok((resp, _)), Some(Err(e))) => (
                            format!("parse: {e}"),
                            Some(bytes::Bytes::from(resp.text.clone())),
                        ),
                        _ => (String::new(), None),
                    };
                    failed_cols.2.push(reason);
                    failed_cols.3.push(raw);
                }
            }
            if list {
                if samples.iter().all(dropped) {
                    continue;
                }
                take.push(r as u32);
                out_rows.push((samples, None));
            } else {
                for (s, o) in samples.iter().enumerate() {
                    if dropped(o) {
                        continue;
                    }
                    take.push(r as u32);
                    out_rows.push((std::slice::from_ref(o), self.explode.then_some(s as u32)));
                }
            }
        }
        let idx = UInt32Array::from(take);
        let mut cols: Vec<ArrayRef> = chunk
            .columns()
            .iter()
            .map(|c| arrow::compute::take(c, &idx, None))
            .collect::<std::result::Result<_, _>>()?;
        cols.extend(self.added_columns(new_schema, &out_rows, list)?);
        let mut fields: Vec<Field> = chunk
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(new_schema.fields().iter().map(|f| f.as_ref().clone()));
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
        let w = match main_w {
            Some(w) => w,
            None => {
                let p = ctx.out.join("part-00000.parquet");
                let f = File::create(&p).map_err(|e| Error::io(&p, e))?;
                main_w.insert(crate::engine::parquet_writer(f, out.schema())?)
            }
        };
        w.write(&out)?;
        // Encoded and written as the stage goes rather than all at `close`, after the last
        // response: what is left for then is at most this many rows and the last chunk.
        if w.in_progress_rows() >= FLUSH_ROWS {
            w.flush()?;
        }
        if !failed_take.is_empty() {
            let idx = UInt32Array::from(failed_take);
            let mut cols: Vec<ArrayRef> = chunk
                .columns()
                .iter()
                .map(|c| arrow::compute::take(c, &idx, None))
                .collect::<std::result::Result<_, _>>()?;
            cols.push(Arc::new(UInt32Array::from(failed_cols.0)));
            cols.push(Arc::new(arrow::array::StringArray::from(failed_cols.1)));
            cols.push(Arc::new(arrow::array::StringArray::from(failed_cols.2)));
            // `raw` is the body as text; a body that is not UTF-8 is also kept exactly in
            // `raw_bytes` (null otherwise: the text is then the body byte for byte).
            let text: Vec<Option<std::borrow::Cow<str>>> = failed_cols
                .3
                .iter()
                .map(|b| b.as_deref().map(String::from_utf8_lossy))
                .collect();
            let exact: Vec<Option<&[u8]>> = failed_cols
                .3
                .iter()
                .map(|b| b.as_deref().filter(|b| std::str::from_utf8(b).is_err()))
                .collect();
            cols.push(Arc::new(arrow::array::StringArray::from_iter(text)));
            cols.push(Arc::new(arrow::array::BinaryArray::from(exact)));
            let schema = self.failed_schema(&chunk.schema());
            let b = RecordBatch::try_new(schema.clone(), cols)?;
            let w = match failed_w {
                Some(w) => w,
                None => {
                    let p = ctx.side_dir("failed").join("part-00000.parquet");
                    let f = File::create(&p).map_err(|e| Error::io(&p, e))?;
                    failed_w.insert(crate::engine::parquet_writer(f, schema)?)
                }
            };
            w.write(&b)?;
        }
        Ok(())
    }

    /// The new columns (`new_schema`, in its order) of the output rows, built straight into
    /// Arrow arrays. Each row holds its samples (all K in list mode, else one) and, with
    /// `explode`, its sample index. Only `parsed` goes through arrow-json: its type is the
    /// user's schema. (A JSON object per row decoded by arrow-json, as before, cost more CPU
    /// than parsing the responses.)
    fn added_columns(
        &self,
        new_schema: &SchemaRef,
        rows: &[(&[Outcome], Option<u32>)],
        list: bool,
    ) -> Result<Vec<ArrayRef>> {
        use arrow::array::{Array, BooleanArray, Int64Array, ListArray, StringArray};
        use arrow::buffer::OffsetBuffer;
        let all = || rows.iter().flat_map(|(s, _)| s.iter());
        fn resp(o: &Outcome) -> Option<&CachedResponse> {
            o.response.as_ref().ok().map(|(r, _)| r)
        }
        // One value per sample; in list mode each row's samples become one list.
        let per_sample = |values: ArrayRef| -> ArrayRef {
            if !list {
                return values;
            }
            let item = Arc::new(Field::new("item", values.data_type().clone(), true));
            let offsets = OffsetBuffer::from_lengths(rows.iter().map(|(s, _)| s.len()));
            Arc::new(ListArray::new(item, offsets, values, None))
        };
        let strings = |f: &dyn Fn(&Outcome) -> Option<&str>| -> ArrayRef {
            per_sample(Arc::new(StringArray::from_iter(all().map(f))))
        };
        let bools = |f: &dyn Fn(&Outcome) -> Option<bool>| -> ArrayRef {
            per_sample(Arc::new(BooleanArray::from_iter(all().map(f))))
        };
        let ints = |f: &dyn Fn(&Outcome) -> Option<i64>| -> ArrayRef {
            per_sample(Arc::new(Int64Array::from_iter(all().map(f))))
        };
        let mut cols: Vec<ArrayRef> = vec![
            strings(&|o| resp(o).map(|r| r.text.as_str())),
            strings(&|o| resp(o).map(|r| r.finish_reason.as_str())),
            bools(&|o| resp(o).map(|r| r.finish_reason == "length")),
            // Per row: the prompt is the same for every sample.
            Arc::new(Int64Array::from_iter(
                rows.iter()
                    .map(|(s, _)| s.iter().find_map(resp).map(|r| r.prompt_tokens)),
            )),
            ints(&|o| resp(o).map(|r| r.completion_tokens)),
            ints(&|o| resp(o).map(|r| r.latency_ms)),
            strings(&|o| Some(o.request_id.as_str())),
            bools(&|o| o.response.as_ref().ok().map(|(_, cached)| *cached)),
            strings(&|o| resp(o).and_then(|r| r.reasoning.as_deref())),
            // Per row: the first sample's error.
            Arc::new(StringArray::from_iter(rows.iter().map(|(s, _)| {
                s.iter()
                    .find_map(|o| o.response.as_ref().err().map(|(m, _)| m.as_str()))
            }))),
        ];
        if self.wants_logprobs() {
            cols.push(strings(&|o| {
                resp(o)
                    .and_then(|r| r.logprobs.as_deref())
                    .filter(|l| *l != NO_LOGPROBS)
            }));
        }
        if self.parse.is_some() {
            let field = new_schema.field_with_name(&self.out("parsed"))?;
            let item_type = match field.data_type() {
                DataType::List(item) if list => item.data_type().clone(),
                t => t.clone(),
            };
            #[derive(Serialize)]
            struct V<'a> {
                v: Option<&'a serde_json::Value>,
            }
            let values: Vec<V> = all()
                .map(|o| V {
                    v: match &o.parsed {
                        Some(Ok(p)) => Some(&p.value),
                        _ => None,
                    },
                })
                .collect();
            let schema = Arc::new(Schema::new(vec![Field::new("v", item_type.clone(), true)]));
            let mut d = arrow::json::ReaderBuilder::new(schema)
                .with_batch_size(values.len().max(1))
                .build_decoder()?;
            d.serialize(&values)?;
            let parsed = match d.flush()? {
                Some(b) => b.column(0).clone(),
                None => arrow::array::new_empty_array(&item_type),
            };
            cols.push(per_sample(parsed));
            cols.push(bools(&|o| match &o.parsed {
                Some(Ok(p)) => Some(p.repaired),
                _ => None,
            }));
            cols.push(strings(&|o| match &o.parsed {
                Some(Err(e)) => Some(e.as_str()),
                _ => None,
            }));
        }
        if self.explode {
            cols.push(Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|(_, i)| i.unwrap_or(0)),
            )));
        }
        Ok(cols)
    }
}

/// The input's batches in order, its first `first` rows as a batch of their own: they are
/// the first chunk, and decoding a whole 64k-row batch before the first request took ~4 ms
/// (of a 2 s stage).
fn read_input(
    files: &[std::path::PathBuf],
    first: usize,
) -> impl Iterator<Item = Result<RecordBatch>> + '_ {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    files.iter().enumerate().flat_map(move |(i, p)| {
        // (offset, limit, batch size) of each reader over this file.
        let reads = if i == 0 {
            vec![(0, Some(first), first.max(1)), (first, None, 65536)]
        } else {
            vec![(0, None, 65536)]
        };
        reads.into_iter().flat_map(move |(offset, limit, batch)| {
            let reader = File::open(p).map_err(|e| Error::io(p, e)).and_then(|f| {
                let mut b = ParquetRecordBatchReaderBuilder::try_new(f)?
                    .with_batch_size(batch)
                    .with_offset(offset);
                if let Some(l) = limit {
                    b = b.with_limit(l);
                }
                Ok(b.build()?)
            });
            let it: Box<dyn Iterator<Item = Result<RecordBatch>>> = match reader {
                Ok(r) => Box::new(r.map(|b| b.map_err(Error::from))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            it
        })
    })
}

/// Send one round's work units (a bounded number at once; the pool's own in-flight limits
/// decide what is on the wire) and cache every choice the moment it arrives.
///
/// Each request is its own task: driven from one task (a plain `buffer_unordered`), a chunk's
/// body serialization, response parsing and cache hand-off all ran on one worker thread at a
/// time, and a response that arrived while that task was busy held its in-flight permit until
/// the task came round to it (measured: the simulator's slots idle ~10% of a 100k-row run).
///
/// Rounds start their tasks one round after the other ([`Shared::admission`]) under one window
/// for the stage ([`Shared::window`]). With a window per round, a later (smaller) chunk's
/// requests overtook the rest of a big one, so the big chunk finished last and was parsed and
/// written after the servers were done, with every chunk behind it (measured: 33 ms of a
/// 2.05 s 10k-row stage after its last response).
async fn send_units(
    units: Vec<Unit>,
    follow: Vec<(String, Canonical, Answer, u64)>,
    profile: Profile,
    sh: Shared,
) -> Sent {
    let leaders = {
        let sh = sh.clone();
        async move {
            let mut tasks = Vec::with_capacity(units.len());
            let admitted = sh.admission.clone().lock_owned().await;
            for (ids, c, slot, weight, budget) in units {
                let Ok(permit) = sh.window.clone().acquire_owned().await else {
                    break; // never closed
                };
                let sh = sh.clone();
                let keep = ids.clone();
                tasks.push((
                    keep,
                    tokio::spawn(async move {
                        let done = std::panic::AssertUnwindSafe(send_unit(
                            ids.clone(),
                            c,
                            profile,
                            sh.clone(),
                            budget,
                        ))
                        .catch_unwind()
                        .await
                        // A panic in a request task (a bug): its samples fail like a lost
                        // request, and a round waiting for them is told.
                        .unwrap_or_else(|_| {
                            fail(ids, CallError::Abort("request task panicked".into()))
                        });
                        drop(permit);
                        // The in-flight map holds the slot once per id, and this task once;
                        // more means a later round waits for this answer (copied only then).
                        // A round that takes the slot after this look finds `None` and sends
                        // the request itself.
                        let waited_for = Arc::strong_count(&slot) > done.len() + 1;
                        let _ = slot.set(waited_for.then(|| Arc::new(done.clone())));
                        if waited_for {
                            sh.answered.notify_waiters();
                        }
                        sh.counters.done.fetch_add(weight, Ordering::Relaxed);
                        done
                    }),
                ));
            }
            drop(admitted);
            let mut out = Vec::with_capacity(tasks.len());
            for (ids, task) in tasks {
                out.push(match task.await {
                    Ok(done) => done,
                    // Cancelled (the runtime is shutting down).
                    Err(e) => fail(ids, CallError::Abort(format!("request task failed: {e}"))),
                });
            }
            out
        }
    };
    let followers = futures::future::join_all(follow.into_iter().map(|(id, c, slot, w)| {
        let sh = sh.clone();
        async move {
            let answers = loop {
                // Registered before the look, so an answer set in between is not missed.
                let wake = sh.answered.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                if let Some(a) = slot.get() {
                    break a.clone();
                }
                wake.await;
            };
            let answer =
                answers.and_then(|a| a.iter().find(|(i, _)| *i == id).map(|(_, r)| r.clone()));
            let counters = sh.counters.clone();
            // The sender finished before this round registered (and found the map entry
            // still there): its answer is in the cache (queued or committed), unless it
            // failed; only then is the request sent after all.
            let answer = answer.or_else(|| {
                let hit = sh.cache.get_many(std::slice::from_ref(&id)).ok()?;
                let r = hit.into_values().next()?;
                (c.sampling.logprobs != Some(true) || r.logprobs.is_some()).then_some(Ok(r))
            });
            let got = match answer {
                Some(r) => vec![(id, r)],
                None => {
                    let b = budget(&sh.pool);
                    send_unit(vec![id], c, profile, sh, b).await
                }
            };
            counters.done.fetch_add(w, Ordering::Relaxed);
            got
        }
    }));
    let (leaders, followers) = futures::join!(leaders, followers);
    leaders.into_iter().chain(followers).flatten().collect()
}

type UnitResult = Vec<(String, std::result::Result<CachedResponse, CallError>)>;

/// Stored when logprobs were asked for and the server sent none: the entry is then known to be
/// complete (an entry without the field was cached by an ifloom that dropped logprobs).
const NO_LOGPROBS: &str = "null";

/// The logprobs to cache for one choice.
pub fn kept_logprobs(asked: bool, got: Option<String>) -> Option<String> {
    if asked {
        Some(got.unwrap_or_else(|| NO_LOGPROBS.into()))
    } else {
        got
    }
}

/// What a stage says when the cache writer gave up.
fn cache_failed(e: &str) -> String {
    format!(
        "the response cache cannot be written ({e}): stopped sending, since answers would be lost; \
         when the cache is writable again (another process holding its write lock? disk full?), \
         run the same command to resume"
    )
}

/// Every sample of a unit gets the same error.
fn fail(ids: Vec<String>, e: CallError) -> UnitResult {
    ids.into_iter().map(|id| (id, Err(e.clone()))).collect()
}

/// Why the stage sends nothing more, if it does not: Ctrl-C or a failure elsewhere in the
/// stage, or a cache that cannot be written (answers would be paid for and lost).
fn stop_reason(sh: &Shared) -> Option<String> {
    if INTERRUPTED.load(Ordering::SeqCst) || sh.stop.load(Ordering::SeqCst) {
        return Some(INTERRUPTED_MSG.into());
    }
    sh.cache.failure().map(cache_failed)
}

/// Send one work unit (one request for `ids.len()` samples) and cache its choices.
async fn send_unit(
    ids: Vec<String>,
    c: Canonical,
    profile: Profile,
    sh: Shared,
    budget: Budget,
) -> UnitResult {
    if let Some(m) = stop_reason(&sh) {
        return fail(ids, CallError::Abort(m));
    }
    let n = ids.len() as u32;
    let body = bytes::Bytes::from(c.to_body(profile, n));
    sh.counters.requests.fetch_add(1, Ordering::Relaxed);
    let stopped = || stop_reason(&sh).is_some();
    let mut r = sh
        .pool
        .call(c.api, body, &ids[0], n, &budget, stopped)
        .await;
    if let Err(CallError::Row {
        message,
        raw: Some(raw),
        ..
    }) = &mut r
        && let Some(limit) = std::str::from_utf8(raw)
            .ok()
            .and_then(client::context_limit)
    {
        let room = limit.room();
        let asked = c.max_tokens();
        if room < 1 {
            message.push_str(&format!(
                " (the prompt alone is {} tokens and the model's context {}: shorten the prompt)",
                limit.prompt, limit.context
            ));
        } else if !sh.clamp {
            message.push_str(&format!(
                " ({} tokens are left after the {}-token prompt: `clamp_max_tokens: true` on the stage asks again with max_tokens {room})",
                room, limit.prompt
            ));
        } else if asked.is_none_or(|m| room < m) {
            // The response is cached under the request as written: the rerun (same prompt,
            // same server) would be clamped the same way, so it sends nothing.
            let clamped = c.with_max_tokens(room);
            sh.counters.clamped.fetch_add(1, Ordering::Relaxed);
            sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            let body = bytes::Bytes::from(clamped.to_body(profile, n));
            r = sh
                .pool
                .call(c.api, body, &ids[0], n, &budget, stopped)
                .await;
        }
    }
    // Stopped because the cache cannot be written: say so (the pool only knows it stopped).
    if matches!(r, Err(CallError::Abort(_)))
        && let Some(e) = sh.cache.failure()
    {
        r = Err(CallError::Abort(cache_failed(e)));
    }
    let comp = match r {
        Ok(c) => c,
        Err(e) => return fail(ids, e),
    };
    sh.counters
        .prompt_tokens
        .fetch_add(comp.prompt_tokens.max(0) as u64, Ordering::Relaxed);
    sh.counters
        .completion_tokens
        .fetch_add(comp.completion_tokens.max(0) as u64, Ordering::Relaxed);
    // OpenAI-compatible servers report usage for all choices together: each sample gets a
    // share in proportion to its text, and the shares add up to the request's total.
    let lengths: Vec<usize> = comp
        .choices
        .iter()
        .map(|c| c.text.len() + c.reasoning.as_ref().map_or(0, String::len))
        .collect();
    let shares = apportion(comp.completion_tokens, &lengths);
    let asked_logprobs = c.sampling.logprobs == Some(true);
    ids.into_iter()
        .zip(comp.choices)
        .zip(shares)
        .map(|((id, ch), tokens)| {
            let resp = CachedResponse {
                text: ch.text,
                reasoning: ch.reasoning,
                finish_reason: ch.finish_reason,
                logprobs: kept_logprobs(asked_logprobs, ch.logprobs),
                prompt_tokens: comp.prompt_tokens,
                completion_tokens: tokens,
                latency_ms: comp.latency_ms,
            };
            // Persisted the moment it arrives: a crash after this loses nothing.
            sh.cache.put(id.clone(), sh.model.clone(), resp.clone());
            (id, Ok(resp))
        })
        .collect()
}

/// Split `total` into integer shares proportional to `weights` (equal shares when they are all
/// zero) that add up to `total`: the largest remainders get the leftover units.
fn apportion(total: i64, weights: &[usize]) -> Vec<i64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u128 = weights.iter().map(|&w| w as u128).sum();
    let (weights, sum): (Vec<u128>, u128) = if sum == 0 {
        (vec![1; weights.len()], weights.len() as u128)
    } else {
        (weights.iter().map(|&w| w as u128).collect(), sum)
    };
    let t = total.max(0) as u128;
    let mut shares: Vec<i64> = weights.iter().map(|w| (t * w / sum) as i64).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest remainder first; ties to the earlier choice, so the split is deterministic.
    order.sort_by_key(|&i| (std::cmp::Reverse(t * weights[i] % sum), i));
    let left = total.max(0) - shares.iter().sum::<i64>();
    for &i in order.iter().take(left as usize) {
        shares[i] += 1;
    }
    shares
}

/// Report a stage's progress until the sender of `stop` is dropped.
fn progress(
    id: &str,
    total: u64,
    started: Instant,
    c: &Counters,
    pool: &Pool,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    use std::io::IsTerminal;
    let line = || {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{:.1} req/s, {:.0} output tok/s, {} in flight, {} cached, {} retries, {} failed",
            c.requests.load(Ordering::Relaxed) as f64 / secs,
            c.completion_tokens.load(Ordering::Relaxed) as f64 / secs,
            pool.in_flight(),
            c.cache_hits.load(Ordering::Relaxed),
            pool.retries.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
        )
    };
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "  {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{id} (llm)"));
        let period = Duration::from_millis(200);
        loop {
            bar.set_position(c.done.load(Ordering::Relaxed));
            bar.set_message(line());
            if stop.recv_timeout(period) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                break;
            }
        }
        bar.finish_and_clear();
        return;
    }
    // Plain lines for logs (CI, nohup): every IFLOOM_PROGRESS_S seconds (default 10), and a
    // last one at the end when any was printed.
    let every = std::env::var("IFLOOM_PROGRESS_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map_or(Duration::from_secs(10), |v| {
            Duration::from_secs_f64(v.clamp(0.05, 86400.0))
        });
    let print = || {
        let done = c.done.load(Ordering::Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            f64::NAN
        };
        eprintln!(
            "  {id} (llm): {done}/{total} done, {}, ETA {eta:.0} s",
            line()
        );
    };
    let mut last = Instant::now();
    let mut printed = false;
    while stop.recv_timeout(every.min(Duration::from_millis(100)))
        == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
    {
        if last.elapsed() >= every {
            last = Instant::now();
            print();
            printed = true;
        }
    }
    if printed {
        print();
    }
}

impl LlmStage {
    /// Does the stage ask for token log-probabilities (and so add `<output>_logprobs`)?
    pub fn wants_logprobs(&self) -> bool {
        self.params.logprobs == Some(true) || self.params.top_logprobs.is_some()
    }

    /// The model name requests are sent (and cached) under.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The dialect of the stage's servers.
    pub fn profile(&self) -> Profile {
        self.group.as_ref().map(|g| g.profile).unwrap_or_default()
    }
}

/// What is wrong with a JSON Schema at `path`, in the parts servers act on (`type`,
/// `properties`, `required`, `items`, `enum`, the combinators): a schema a server rejects
/// fails every request of the stage, so it is found at validate time instead.
fn schema_problems(v: &serde_json::Value, path: &str) -> Vec<String> {
    use serde_json::Value;
    const TYPES: [&str; 7] = [
        "object", "array", "string", "number", "integer", "boolean", "null",
    ];
    let mut out = Vec::new();
    let m = match v {
        Value::Object(m) => m,
        Value::Bool(_) => return out,
        other => {
            out.push(format!("{path}: a schema must be a mapping, got {other}"));
            return out;
        }
    };
    // A YAML `null` unquoted is no type name: say how to write it.
    let null_hint = |t: &Value| {
        if t.is_null() || t.as_array().is_some_and(|a| a.iter().any(Value::is_null)) {
            " (write the type null quoted, \"null\", in YAML)"
        } else {
            ""
        }
    };
    let type_ok = |t: &Value| t.as_str().is_some_and(|t| TYPES.contains(&t));
    match m.get("type") {
        None => {}
        Some(Value::Array(ts)) if ts.iter().all(type_ok) => {}
        Some(t) if type_ok(t) => {}
        Some(t) => out.push(format!(
            "{path}.type: {t} is not a JSON Schema type ({}){}",
            TYPES.join(", "),
            null_hint(t)
        )),
    }
    match m.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            for (k, p) in props {
                out.extend(schema_problems(p, &format!("{path}.properties.{k}")));
            }
        }
        Some(other) => out.push(format!(
            "{path}.properties: must be a mapping of field names to schemas, got {other}"
        )),
    }
    match m.get("required") {
        None => {}
        Some(Value::Array(r)) if r.iter().all(Value::is_string) => {
            // A required name may also come from elsewhere in the schema: checked against
            // `properties` only when nothing else can define fields.
            let elsewhere = [
                "allOf",
                "anyOf",
                "oneOf",
                "$ref",
                "additionalProperties",
                "patternProperties",
                "dependentSchemas",
                "if",
            ]
            .iter()
            .any(|k| m.contains_key(*k));
            if !elsewhere && let Some(Value::Object(props)) = m.get("properties") {
                for f in r.iter().filter_map(Value::as_str) {
                    if !props.contains_key(f) {
                        out.push(format!(
                            "{path}.required: `{f}` is not one of the properties ({})",
                            props.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            }
        }
        Some(other) => out.push(format!(
            "{path}.required: must be a list of field names, got {other}"
        )),
    }
    match m.get("items") {
        // A tuple (draft 4's list of schemas).
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                out.extend(schema_problems(item, &format!("{path}.items.{i}")));
            }
        }
        Some(items) => out.extend(schema_problems(items, &format!("{path}.items"))),
        None => {}
    }
    if let Some(e) = m.get("enum")
        && !e.is_array()
    {
        out.push(format!("{path}.enum: must be a list of values, got {e}"));
    }
    for comb in ["anyOf", "oneOf", "allOf"] {
        match m.get(comb) {
            None => {}
            Some(Value::Array(subs)) => {
                for (i, sub) in subs.iter().enumerate() {
                    out.extend(schema_problems(sub, &format!("{path}.{comb}.{i}")));
                }
            }
            Some(other) => out.push(format!(
                "{path}.{comb}: must be a list of schemas, got {other}"
            )),
        }
    }
    out
}

/// The range a literal param must be in, as OpenAI documents it and vLLM checks it (a request
/// outside it is a 400 for every row), when `v` is outside it.
fn param_range(name: &str, v: &serde_json::Value) -> Option<&'static str> {
    let x = v.as_f64()?;
    let (ok, range) = match name {
        "temperature" => (x >= 0.0, "must be 0 or more"),
        "top_p" => (x > 0.0 && x <= 1.0, "must be above 0 and at most 1"),
        "max_tokens" => (x >= 1.0, "must be at least 1"),
        "presence_penalty" | "frequency_penalty" => {
            ((-2.0..=2.0).contains(&x), "must be from -2 to 2")
        }
        _ => (true, ""),
    };
    (!ok).then_some(range)
}

/// Filters and tests a template uses that the environment does not have. The names are read
/// from the template's `{{ }}` and `{% %}` blocks (string literals left out) and each is tried
/// on a literal: minijinja's parser keeps no list of them, and resolves them only when it
/// renders.
fn unknown_filters_and_tests(
    env: &minijinja::Environment,
    src: &str,
) -> Vec<(&'static str, String)> {
    use minijinja::ErrorKind;
    use std::sync::LazyLock;
    static BLOCK: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"(?s)\{\{.*?\}\}|\{%.*?%\}").expect("valid regex"));
    // What is never rendered: `{% raw %}` blocks and `{# #}` comments.
    static INERT: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?s)\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{#.*?#\}")
            .expect("valid regex")
    });
    static STRING: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"#).expect("valid regex")
    });
    // `x | name`, and the `{% filter name %}` tag.
    static FILTER: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\|\s*([A-Za-z_]\w*)|^\{%-?\s*filter\s+([A-Za-z_]\w*)")
            .expect("valid regex")
    });
    static TEST: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\bis\s+(?:not\s+)?([A-Za-z_]\w*)").expect("valid regex")
    });
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let src = INERT.replace_all(src, "");
    for block in BLOCK.find_iter(&src) {
        let code = STRING.replace_all(block.as_str(), "''");
        for (kind, re, probe, missing) in [
            (
                "filter",
                &*FILTER,
                "{{ 1 | NAME }}",
                ErrorKind::UnknownFilter,
            ),
            ("test", &*TEST, "{{ 1 is NAME }}", ErrorKind::UnknownTest),
        ] {
            for c in re.captures_iter(&code) {
                let Some(name) = c.get(1).or_else(|| c.get(2)) else {
                    continue;
                };
                let name = name.as_str().to_string();
                if out.iter().any(|(k, n)| *k == kind && *n == name) {
                    continue;
                }
                let unknown = env
                    .render_str(&probe.replace("NAME", &name), ())
                    .is_err_and(|e| e.kind() == missing);
                if unknown {
                    out.push((kind, name));
                }
            }
        }
    }
    out
}

/// Every distinct request id a stage would send for its input, for `--dry-run` and batch
/// export: (id, canonical request).
pub fn plan_requests(
    stage: &LlmStage,
    rows: &[serde_json::Value],
) -> Result<Vec<(String, Canonical)>> {
    let usage = |message: String| Error::Usage { message };
    let env = stage.env().map_err(|e| usage(e.to_string()))?;
    let renderer = stage.renderer(&env).map_err(usage)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        // A row the templates cannot render is dead-lettered by a run; here it is the answer.
        let messages = stage.render(&renderer, row).map_err(|e| {
            usage(format!(
                "row {} of the stage's input cannot be rendered: {e}\n  hint: a run dead-letters such rows (reason in the `__failed` table); fix the template or the data",
                n + 1
            ))
        })?;
        for s in 0..stage.samples {
            let c = stage.canonical(messages.clone(), row, s, 0);
            let id = c.id();
            if seen.insert(id.clone()) {
                out.push((id, c));
            }
        }
    }
    Ok(out)
}

trait HintOr {
    fn hint_or(self, h: String) -> Self;
    fn hint_if_none(self, h: String) -> Self;
}

impl HintOr for Diagnostic {
    fn hint_or(self, h: String) -> Self {
        if self.hint.is_some() {
            self
        } else {
            self.hint(h)
        }
    }
    fn hint_if_none(self, h: String) -> Self {
        self.hint_or(h)
    }
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn token_shares_follow_the_text_and_add_up() {
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(100, &[30, 10]), [75, 25]);
        assert_eq!(apportion(7, &[0, 0]), [4, 3]);
        assert_eq!(apportion(0, &[5, 5]), [0, 0]);
        assert_eq!(apportion(5, &[]), Vec::<i64>::new());
        for (total, w) in [(1001, vec![3usize, 7, 11, 0]), (3, vec![1, 1, 1, 1, 1])] {
            assert_eq!(apportion(total, &w).iter().sum::<i64>(), total);
        }
    }
}
