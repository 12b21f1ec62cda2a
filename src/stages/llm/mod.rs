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

use crate::cancel::{Cancel, INTERRUPTED_MSG};
use crate::error::{Diagnostic, Error, Result, did_you_mean};
use crate::llm_client::cache::{Cache, CachedResponse};
use crate::llm_client::parse::{self, ParseSpec};
use crate::llm_client::pool::{CallError, EndpointGroup, Pool};
use crate::llm_client::request::{Api, Canonical, Message, Profile, Sampling, id_key};
use crate::llm_client::response;
use crate::stages::{BuildCtx, Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage};
use crate::table::{batch_rows, read_batches};
use crate::yaml::Node;

mod checks;
pub mod endpoints;
mod progress;
mod rounds;
mod templates;
mod write;

pub use templates::plan_requests;

/// The response cache a run uses: `--cache`, else the cache's default path.
pub fn cache_path(engine: &crate::engine::Engine) -> std::path::PathBuf {
    crate::llm_client::cache::path(engine.cache_path.as_deref())
}
pub use write::kept_logprobs;

pub const KIND: KindEntry = KindEntry {
    name: "llm",
    about: "LLM requests per row (templates over columns) to OpenAI-compatible servers",
    build: crate::stages::build::<LlmStage>,
    schema: |g| LlmStage::json_schema(g),
    capabilities: &[Capability::SendsRequests, Capability::RetriesFailed],
    removed_rows: "",
};

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

/// A message; `content` is a Jinja template over the row's columns, inline or from `file`
/// (relative to the pipeline file, e.g. `prompts/judge.j2`). Or `turns: <column>`: the
/// row's earlier conversation turns, one chat message each, at this place.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageSpec {
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    /// A list column of turns, `{role, content}` or ShareGPT's `{from, value}` (`human` →
    /// user, `gpt` → assistant), each sent as its own message; null or empty sends none.
    #[serde(default)]
    pub turns: Option<String>,
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
    /// The message (index in `messages`) each template comes from.
    #[serde(skip)]
    #[schemars(skip)]
    template_msg: Vec<usize>,
    /// `turns:` entries: (number of templates before it, column).
    #[serde(skip)]
    #[schemars(skip)]
    turns: Vec<(usize, String)>,
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
        self.check_config(node, ctx)
    }

    // Where and how fast requests go (endpoints, their profile and key, concurrency) does
    // not change the answers; `messages` / `prompt` are covered by the templates loaded from
    // them (a template file that moved keeps the table).
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &[
            "endpoint",
            "endpoints",
            "profile",
            "api_key_env",
            "max_in_flight",
            "messages",
            "prompt",
        ]
    }

    fn fingerprint_extra(&self) -> serde_json::Value {
        serde_json::json!({ "templates": self.templates, "turns": self.turns })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        self.check_plan(ctx)
    }

    /// A bad template or per-row param leaves the columns this stage adds as they are, so
    /// the stages below are still checked; an added column that clashes with an upstream one
    /// leaves the output unclear, and they are not.
    fn schema_despite_errors(&self, ctx: &PlanCtx) -> Option<SchemaRef> {
        let parent = ctx.parent();
        let added = self.new_fields();
        if added
            .iter()
            .any(|f| parent.field_with_name(f.name()).is_ok())
        {
            return None;
        }
        let fields: Vec<Field> = parent.fields().iter().map(|f| f.as_ref().clone()).collect();
        Some(Arc::new(Schema::new([fields, added].concat())))
    }

    fn dry_run(&self, ctx: &RunCtx) -> Result<String> {
        let mut rows = Vec::new();
        for b in read_batches(&ctx.parent().files) {
            rows.extend(batch_rows(&b?)?);
        }
        let reqs = plan_requests(self, &rows)?;
        let ids: Vec<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
        let cached = Cache::open(&cache_path(ctx.engine))?.get_many(&ids)?.len();
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
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        self.run_rounds(ctx)
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
