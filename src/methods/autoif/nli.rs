//! `kind: nli_classifier` — a natural-language-inference classifier behind HTTP: one
//! (premise, hypothesis) pair per row, labelled `entailment` / `neutral` / `contradiction`.
//!
//! AutoIF's step 5 (Qwen's `code/5_eval_func_backtranslator_filter.py`) runs
//! `MoritzLaurer/mDeBERTa-v3-base-xnli-multilingual-nli-2mil7` on (instruction, back-translated
//! instruction): softmax over the logits, names `["entailment", "neutral", "contradiction"]` in
//! the model's output order, each probability as `round(p * 100, 1)`, the label the first
//! maximum (Python's `max(dict, key=dict.get)`). This kind does the same with the model served
//! by either
//! - Text Embeddings Inference (`api: tei`): `POST {url}/predict` with
//!   `{"inputs": [[premise, hypothesis], ...], "truncate": true}` (true text pairs, truncated as
//!   upstream's tokenizer call does); the answer's labels are the model's `id2label` names
//!   (`LABEL_i` is read as the `i`-th of `labels`);
//! - vLLM (`api: vllm`): `POST {url}/classify` with `{"model", "input": [text, ...]}`, each
//!   text `premise + pair_separator + hypothesis` (vLLM's classify API takes single texts), the
//!   answer's `probs` named by `labels` in order.
//!
//! Pairs go out `batch_size` to a request, `max_in_flight` requests at once; each pair's
//! scores are cached in the LLM response cache (key: api, model, labels, separator, premise,
//! hypothesis; not the URL), so a rerun sends nothing twice. A request that fails (connection,
//! timeout, 429, 5xx) is retried `max_retries` times with backoff; a pair that still has no
//! answer, or an answer that does not read, stops the stage with the reason (what was answered
//! is cached: rerunning resumes).
//!
//! Added columns: `<output>_label` (lower case), `<output>_scores` (JSON text
//! `{label: probability}`), `<output>_latency_ms` (the request's, 0 from the cache),
//! `<output>_cached`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result};
use crate::llm_client::cache::{Cache, CachedResponse};
use crate::llm_client::http::{Target, Transport};
use crate::stages::{
    Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, llm::cache_path, reserved_columns,
    unknown_column,
};
use crate::table::{batch_rows, read_batches, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "nli_classifier",
    about: "an NLI classifier served by Text Embeddings Inference (/predict) or vLLM (/classify): entailment / neutral / contradiction per (premise, hypothesis) row",
    build: crate::stages::build::<NliStage>,
    schema: |g| NliStage::json_schema(g),
    capabilities: &[Capability::SendsRequests],
    removed_rows: "",
};

/// The classification API the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NliApi {
    /// Text Embeddings Inference: `POST {url}/predict` with text pairs.
    #[default]
    Tei,
    /// vLLM: `POST {url}/classify` with one text per pair.
    Vllm,
}

fn d_premise() -> String {
    "premise".into()
}
fn d_hypothesis() -> String {
    "hypothesis".into()
}
fn d_labels() -> Vec<String> {
    vec![
        "entailment".into(),
        "neutral".into(),
        "contradiction".into(),
    ]
}
fn d_separator() -> String {
    " [SEP] ".into()
}
fn d_batch() -> usize {
    32
}
fn d_in_flight() -> usize {
    4
}
fn d_timeout() -> f64 {
    120.0
}
fn d_retries() -> u32 {
    5
}
fn d_output() -> String {
    "nli".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NliStage {
    /// Text column with the premise (AutoIF: the instruction).
    #[serde(default = "d_premise")]
    pub premise: String,
    /// Text column with the hypothesis (AutoIF: a back-translated instruction).
    #[serde(default = "d_hypothesis")]
    pub hypothesis: String,
    /// The server's base URL, without the API path (`http://127.0.0.1:8080`).
    pub url: String,
    /// `tei` (default) or `vllm`.
    #[serde(default)]
    pub api: NliApi,
    /// The served model's name (vLLM checks it; for TEI only part of the cache key).
    #[serde(default)]
    pub model: Option<String>,
    /// The model's labels in output order (upstream's model: entailment, neutral,
    /// contradiction).
    #[serde(default = "d_labels")]
    pub labels: Vec<String>,
    /// Between premise and hypothesis in the single text vLLM's classify API takes.
    #[serde(default = "d_separator")]
    pub pair_separator: String,
    /// Pairs per HTTP request.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Requests on the wire at once.
    #[serde(default = "d_in_flight")]
    pub max_in_flight: usize,
    /// Seconds per request.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Retries of a request that failed (connection, timeout, 429, 5xx).
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    /// Name of an environment variable holding an API key (sent as a bearer token).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Prefix of the added columns.
    #[serde(default = "d_output")]
    pub output: String,
}

/// One pair's answer, as cached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Scores {
    /// Probability per label, in `labels` order.
    probs: Vec<f64>,
}

impl NliStage {
    fn columns(&self) -> [String; 4] {
        let o = &self.output;
        [
            format!("{o}_label"),
            format!("{o}_scores"),
            format!("{o}_latency_ms"),
            format!("{o}_cached"),
        ]
    }

    fn endpoint(&self) -> String {
        let base = self.url.trim_end_matches('/');
        match self.api {
            NliApi::Tei => format!("{base}/predict"),
            NliApi::Vllm => format!("{base}/classify"),
        }
    }

    /// The cache key of a pair (hex, as the llm stage's ids).
    fn pair_id(&self, premise: &str, hypothesis: &str) -> String {
        let key = json!({
            "kind": "nli_classifier/1",
            "api": self.api,
            "model": self.model,
            "labels": self.labels,
            "separator": if self.api == NliApi::Vllm { Some(&self.pair_separator) } else { None },
            "premise": premise,
            "hypothesis": hypothesis,
        });
        blake3::hash(crate::json::canonical_string(&key).as_bytes()).to_hex()[..32].to_string()
    }

    fn body(&self, pairs: &[(&str, &str)]) -> Value {
        match self.api {
            NliApi::Tei => json!({
                "inputs": pairs.iter().map(|(p, h)| [p, h]).collect::<Vec<_>>(),
                "truncate": true,
            }),
            NliApi::Vllm => {
                let mut b = json!({
                    "input": pairs
                        .iter()
                        .map(|(p, h)| format!("{p}{}{h}", self.pair_separator))
                        .collect::<Vec<_>>(),
                });
                if let Some(m) = &self.model {
                    b["model"] = json!(m);
                }
                b
            }
        }
    }

    /// The probabilities per label of each pair of a batch's answer.
    fn read_answer(&self, body: &[u8], n: usize) -> std::result::Result<Vec<Scores>, String> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON ({e})"))?;
        let out: Vec<Scores> = match self.api {
            NliApi::Tei => {
                let items = v.as_array().ok_or("TEI's /predict answer is not a list")?;
                items
                    .iter()
                    .map(|preds| self.tei_scores(preds))
                    .collect::<std::result::Result<_, _>>()?
            }
            NliApi::Vllm => {
                let data = v["data"]
                    .as_array()
                    .ok_or("vLLM's /classify answer has no `data` list")?;
                let mut by_index: Vec<(u64, Scores)> = data
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let probs: Vec<f64> = d["probs"]
                            .as_array()
                            .ok_or("an entry of `data` has no `probs`")?
                            .iter()
                            .map(|p| p.as_f64().ok_or("a probability is not a number"))
                            .collect::<std::result::Result<_, _>>()?;
                        if probs.len() != self.labels.len() {
                            return Err(format!(
                                "the model answers {} classes, but `labels` names {}",
                                probs.len(),
                                self.labels.len()
                            ));
                        }
                        Ok((d["index"].as_u64().unwrap_or(i as u64), Scores { probs }))
                    })
                    .collect::<std::result::Result<_, String>>()?;
                by_index.sort_by_key(|(i, _)| *i);
                by_index.into_iter().map(|(_, s)| s).collect()
            }
        };
        if out.len() != n {
            return Err(format!("{} answers for {n} pairs", out.len()));
        }
        Ok(out)
    }

    /// One pair's TEI predictions (`[{label, score}]`, any order) in `labels` order.
    fn tei_scores(&self, preds: &Value) -> std::result::Result<Scores, String> {
        let preds = preds
            .as_array()
            .ok_or("an entry of TEI's answer is not a list of predictions")?;
        let mut probs = vec![f64::NAN; self.labels.len()];
        for p in preds {
            let label = p["label"].as_str().ok_or("a prediction has no label")?;
            let score = p["score"].as_f64().ok_or("a prediction has no score")?;
            let at = self
                .labels
                .iter()
                .position(|l| l.eq_ignore_ascii_case(label))
                .or_else(|| {
                    label
                        .strip_prefix("LABEL_")
                        .and_then(|i| i.parse::<usize>().ok())
                        .filter(|i| *i < self.labels.len())
                })
                .ok_or_else(|| {
                    format!(
                        "the model's label `{label}` is none of `labels` ({})",
                        self.labels.join(", ")
                    )
                })?;
            probs[at] = score;
        }
        if probs.iter().any(|p| p.is_nan()) {
            return Err(format!(
                "the answer lacks a score for some of `labels` ({})",
                self.labels.join(", ")
            ));
        }
        Ok(Scores { probs })
    }
}

/// Upstream's label: each probability as `round(p * 100, 1)`, the first maximum in label
/// order (Python's `max(d, key=d.get)` over a dict built in that order).
pub fn upstream_label(labels: &[String], probs: &[f64]) -> Option<String> {
    let rounded: Vec<f64> = probs
        .iter()
        .map(|p| {
            // `{:.1}` rounds the exact binary value half to even, as Python's round() does.
            format!("{:.1}", p * 100.0)
                .parse::<f64>()
                .unwrap_or(f64::NAN)
        })
        .collect();
    let mut best: Option<usize> = None;
    for (i, r) in rounded.iter().enumerate() {
        if best.is_none_or(|b| *r > rounded[b]) {
            best = Some(i);
        }
    }
    best.and_then(|i| labels.get(i)).map(|l| l.to_lowercase())
}

/// Each row's (premise, hypothesis) and the input batches they came from.
type Pairs = (Vec<(String, String)>, Vec<RecordBatch>);

/// A batch's outcome: its pairs' scores, or why it failed for good.
type BatchResult = (
    Vec<usize>,
    std::result::Result<Vec<Scores>, String>,
    i64,
    u32,
);

impl Stage for NliStage {
    // Where and how fast the pairs are sent cannot change a label (the cache key has neither).
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &[
            "url",
            "batch_size",
            "max_in_flight",
            "timeout_s",
            "max_retries",
            "api_key_env",
        ]
    }

    fn prepare(
        &mut self,
        node: &crate::yaml::Node,
        ctx: &crate::stages::BuildCtx,
    ) -> Result<(), Vec<Diagnostic>> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, m: String| {
            errs.push(Diagnostic::new(&ctx.file, node.pos_at(&[field]), m));
        };
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bad(
                "url",
                format!(
                    "url must start with http:// or https://, not `{}` (the classifier server's base URL, e.g. http://127.0.0.1:8080)",
                    self.url
                ),
            );
        }
        if self.labels.len() < 2 {
            bad("labels", "labels must name at least two classes".into());
        }
        if self.batch_size == 0 {
            bad("batch_size", "batch_size must be at least 1".into());
        }
        if self.max_in_flight == 0 {
            bad("max_in_flight", "max_in_flight must be at least 1".into());
        }
        if self.timeout_s.is_nan() || self.timeout_s <= 0.0 {
            bad("timeout_s", "timeout_s must be above 0".into());
        }
        if self.api == NliApi::Vllm && self.model.is_none() {
            bad(
                "model",
                "api: vllm needs `model`, the name the classifier is served as".into(),
            );
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        for (field, col) in [("premise", &self.premise), ("hypothesis", &self.hypothesis)] {
            match schema.field_with_name(col) {
                Err(_) => errs.push(unknown_column(ctx, &[field], col, schema)),
                Ok(f) if !crate::table::is_string_type(f.data_type()) => errs.push(ctx.err(
                    &[field],
                    format!("column `{col}` is {}, not text", f.data_type()),
                )),
                Ok(_) => {}
            }
        }
        let cols = self.columns();
        let names: Vec<&str> = cols.iter().map(String::as_str).collect();
        errs.extend(reserved_columns(ctx, &names, "which nli_classifier adds"));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(with_fields(
            schema,
            &[
                Field::new(&cols[0], DataType::Utf8, true),
                Field::new(&cols[1], DataType::Utf8, true),
                Field::new(&cols[2], DataType::Int64, true),
                Field::new(&cols[3], DataType::Boolean, true),
            ],
        ))
    }

    fn dry_run(&self, ctx: &RunCtx) -> Result<String> {
        let (rows, _) = self.read(ctx)?;
        let ids = self.distinct_ids(&rows);
        let cached = Cache::open(&cache_path(ctx.engine))?.get_many(&ids)?.len();
        Ok(format!(
            "    {} rows: {} distinct pairs, {} already cached, {} to send to {} in batches of {}",
            rows.len(),
            ids.len(),
            cached,
            ids.len() - cached,
            self.endpoint(),
            self.batch_size
        ))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let (rows, batches) = self.read(ctx)?;
        let ids: Vec<String> = rows.iter().map(|(p, h)| self.pair_id(p, h)).collect();
        let cache = Cache::open_watched(&cache_path(ctx.engine), None)?;
        let distinct = self.distinct_ids(&rows);
        let found = cache.get_many(&distinct)?;
        let mut scores: HashMap<String, (Scores, i64, bool)> = HashMap::new();
        for (id, r) in &found {
            if let Ok(s) = serde_json::from_str::<Scores>(&r.text)
                && s.probs.len() == self.labels.len()
            {
                scores.insert(id.clone(), (s, 0, true));
            }
        }
        let cache_hits = scores.len();
        // The pairs to send: one row per distinct missing id.
        let mut todo: Vec<usize> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, id) in ids.iter().enumerate() {
            if !scores.contains_key(id) && seen.insert(id.clone()) {
                todo.push(i);
            }
        }
        let chunks: Vec<Vec<usize>> = todo.chunks(self.batch_size).map(<[_]>::to_vec).collect();
        let n_requests = chunks.len();
        let (results, retries) = if chunks.is_empty() {
            (Vec::new(), 0)
        } else {
            self.send_all(ctx, &rows, chunks)?
        };
        let model: Arc<str> = Arc::from(self.model.clone().unwrap_or_default());
        let mut failed: Vec<String> = Vec::new();
        for (members, outcome, latency, _) in results {
            match outcome {
                Ok(s) => {
                    for (i, sc) in members.into_iter().zip(s) {
                        cache.put(
                            ids[i].clone(),
                            model.clone(),
                            CachedResponse {
                                text: serde_json::to_string(&sc)?,
                                reasoning: None,
                                finish_reason: "classified".into(),
                                logprobs: None,
                                prompt_tokens: 0,
                                completion_tokens: 0,
                                latency_ms: latency,
                            },
                        );
                        scores.insert(ids[i].clone(), (sc, latency, false));
                    }
                }
                Err(e) => failed.push(format!("{} pairs: {e}", members.len())),
            }
        }
        cache.close()?;
        if let Some(first) = failed.first() {
            return Err(Error::Stage {
                stage: ctx.id.to_string(),
                message: format!(
                    "{} of {n_requests} classification requests to {} failed for good (first: {first}); the answered pairs are cached: fix the server and rerun to resume",
                    failed.len(),
                    self.endpoint()
                ),
            });
        }
        if ctx.cancel.is_interrupted() {
            return Err(Error::Internal("interrupted".into()));
        }
        let mut out = RunOutput::default();
        let mut count = |k: &str, n: usize| *out.counters.entry(k.into()).or_default() += n as i64;
        count("requests", n_requests);
        count("retries", retries as usize);
        count("cache_hits", cache_hits);
        count("failures", 0);
        let mut labels_of: BTreeMap<String, usize> = BTreeMap::new();
        let mut part = LazyPart::new(ctx.out.join("part-00000.parquet"));
        let mut at = 0;
        for b in batches {
            let n = b.num_rows();
            let mut label = Vec::with_capacity(n);
            let mut text = Vec::with_capacity(n);
            let mut lat = Vec::with_capacity(n);
            let mut cached = Vec::with_capacity(n);
            for id in &ids[at..at + n] {
                let (s, l, c) = &scores[id];
                let name = upstream_label(&self.labels, &s.probs);
                *labels_of
                    .entry(name.clone().unwrap_or_default())
                    .or_default() += 1;
                label.push(name);
                let map: serde_json::Map<String, Value> = self
                    .labels
                    .iter()
                    .zip(&s.probs)
                    .map(|(l, p)| (l.to_lowercase(), json!(p)))
                    .collect();
                text.push(Some(Value::Object(map).to_string()));
                lat.push(Some(*l));
                cached.push(Some(*c));
            }
            at += n;
            let mut all: Vec<ArrayRef> = b.columns().to_vec();
            all.push(Arc::new(StringArray::from(label)));
            all.push(Arc::new(StringArray::from(text)));
            all.push(Arc::new(Int64Array::from(lat)));
            all.push(Arc::new(BooleanArray::from(cached)));
            part.write(&RecordBatch::try_new(ctx.schema.clone(), all)?)?;
        }
        part.finish(&ctx.schema)?;
        for (l, n) in labels_of {
            count(&format!("label_{l}"), n);
        }
        Ok(out)
    }
}

impl NliStage {
    /// The (premise, hypothesis) of every row (null as empty text) and the input batches.
    fn read(&self, ctx: &RunCtx) -> Result<Pairs> {
        let mut rows = Vec::new();
        let mut batches = Vec::new();
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            for row in batch_rows(&b)? {
                let text = |c: &str| row[c].as_str().unwrap_or_default().to_string();
                rows.push((text(&self.premise), text(&self.hypothesis)));
            }
            batches.push(b);
        }
        Ok((rows, batches))
    }

    fn distinct_ids(&self, rows: &[(String, String)]) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        rows.iter()
            .map(|(p, h)| self.pair_id(p, h))
            .filter(|id| seen.insert(id.clone()))
            .collect()
    }

    /// Send every batch (`max_in_flight` at once, each retried); returns each batch's outcome
    /// and the retries made.
    fn send_all(
        &self,
        ctx: &RunCtx,
        rows: &[(String, String)],
        chunks: Vec<Vec<usize>>,
    ) -> Result<(Vec<BatchResult>, u32)> {
        let tls = self.url.starts_with("https://");
        let transport =
            Transport::new(self.max_in_flight.max(2), tls, Vec::new()).map_err(Error::Internal)?;
        let auth = match &self.api_key_env {
            Some(var) => {
                let key = std::env::var(var).map_err(|_| Error::Stage {
                    stage: ctx.id.to_string(),
                    message: format!(
                        "environment variable `{var}` (api_key_env) is not set: export the API key in it"
                    ),
                })?;
                Some(
                    crate::llm_client::http::bearer(key.trim()).ok_or_else(|| Error::Stage {
                        stage: ctx.id.to_string(),
                        message: format!(
                            "environment variable `{var}` holds what cannot be an HTTP header"
                        ),
                    })?,
                )
            }
            None => None,
        };
        let target = Target::new(&self.endpoint());
        let timeout = Duration::from_secs_f64(self.timeout_s);
        let cancel = ctx.cancel;
        let this = self;
        let results: Vec<BatchResult> = ctx.engine.block_on(async {
            futures::stream::iter(chunks.into_iter().map(|members| {
                let pairs: Vec<(&str, &str)> = members
                    .iter()
                    .map(|&i| (rows[i].0.as_str(), rows[i].1.as_str()))
                    .collect();
                let body = bytes::Bytes::from(this.body(&pairs).to_string());
                let request_id = this.pair_id(pairs[0].0, pairs[0].1);
                let (transport, target, auth) = (&transport, &target, auth.as_ref());
                async move {
                    let mut attempt = 0u32;
                    loop {
                        if cancel.is_interrupted() {
                            return (members, Err("interrupted".to_string()), 0, attempt);
                        }
                        let started = Instant::now();
                        let reply = transport
                            .post(target, body.clone(), &request_id, auth, timeout)
                            .await;
                        let latency = started.elapsed().as_millis() as i64;
                        let retryable = match reply {
                            Ok(r) if r.status.is_success() => {
                                let n = members.len();
                                return match this.read_answer(&r.body, n) {
                                    Ok(s) => (members, Ok(s), latency, attempt),
                                    Err(e) => (members, Err(e), latency, attempt),
                                };
                            }
                            Ok(r) => {
                                let code = r.status.as_u16();
                                let msg = format!(
                                    "HTTP {code}: {}",
                                    String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                                );
                                if code == 408 || code == 429 || r.status.is_server_error() {
                                    msg
                                } else {
                                    return (members, Err(msg), latency, attempt);
                                }
                            }
                            Err(e) => e.message,
                        };
                        if attempt >= this.max_retries {
                            return (
                                members,
                                Err(format!(
                                    "{retryable} (gave up after {} attempts)",
                                    attempt + 1
                                )),
                                latency,
                                attempt,
                            );
                        }
                        let wait = Duration::from_millis(200u64 << attempt.min(5));
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                }
            }))
            .buffer_unordered(this.max_in_flight)
            .collect()
            .await
        });
        let retries = results.iter().map(|r| r.3).sum();
        Ok((results, retries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        d_labels()
    }

    #[test]
    fn the_label_is_the_first_maximum_after_upstreams_rounding() {
        // Upstream: {name: round(p * 100, 1)}, then max(d, key=d.get): the first maximum.
        assert_eq!(
            upstream_label(&labels(), &[0.2, 0.1, 0.7]).as_deref(),
            Some("contradiction")
        );
        // A tie keeps the earlier label: entailment before contradiction.
        assert_eq!(
            upstream_label(&labels(), &[0.4, 0.2, 0.4]).as_deref(),
            Some("entailment")
        );
        // 0.40004 and 0.40001 both round to 40.0: a tie after rounding, so entailment,
        // although contradiction's raw probability is higher.
        assert_eq!(
            upstream_label(&labels(), &[0.40001, 0.19995, 0.40004]).as_deref(),
            Some("entailment")
        );
        // 39.94 -> 39.9 and 40.06 -> 40.1: contradiction is the maximum.
        assert_eq!(
            upstream_label(&labels(), &[0.3994, 0.2, 0.4006]).as_deref(),
            Some("contradiction")
        );
    }
}

#[cfg(test)]
mod answers {
    use super::*;

    fn stage(api: NliApi) -> NliStage {
        serde_json::from_value(json!({"url": "http://127.0.0.1:1", "api": api, "model": "m"}))
            .unwrap()
    }

    #[test]
    fn tei_answers_are_read_by_label_name_or_index_in_labels_order() {
        let s = stage(NliApi::Tei);
        // TEI sorts each input's predictions by score; names or LABEL_i.
        let body = br#"[[{"label": "contradiction", "score": 0.7}, {"label": "entailment", "score": 0.2}, {"label": "neutral", "score": 0.1}],
                        [{"label": "LABEL_1", "score": 0.5}, {"label": "LABEL_0", "score": 0.3}, {"label": "LABEL_2", "score": 0.2}]]"#;
        let got = s.read_answer(body, 2).unwrap();
        assert_eq!(got[0].probs, [0.2, 0.1, 0.7]);
        assert_eq!(got[1].probs, [0.3, 0.5, 0.2]);
        let err = s
            .read_answer(br#"[[{"label": "positive", "score": 1.0}]]"#, 1)
            .unwrap_err();
        assert!(err.contains("`positive` is none of `labels`"), "{err}");
        let err = s
            .read_answer(br#"[[{"label": "entailment", "score": 1.0}]]"#, 1)
            .unwrap_err();
        assert!(err.contains("lacks a score"), "{err}");
        assert!(
            s.read_answer(b"[]", 1)
                .unwrap_err()
                .contains("0 answers for 1 pairs")
        );
    }

    #[test]
    fn vllm_answers_are_read_by_index_with_labels_naming_the_probabilities() {
        let s = stage(NliApi::Vllm);
        let body = br#"{"data": [{"index": 1, "label": "x", "probs": [0.1, 0.1, 0.8]},
                                 {"index": 0, "label": "y", "probs": [0.6, 0.3, 0.1]}]}"#;
        let got = s.read_answer(body, 2).unwrap();
        assert_eq!(got[0].probs, [0.6, 0.3, 0.1]);
        assert_eq!(got[1].probs, [0.1, 0.1, 0.8]);
        let err = s
            .read_answer(br#"{"data": [{"index": 0, "probs": [0.5, 0.5]}]}"#, 1)
            .unwrap_err();
        assert!(err.contains("answers 2 classes"), "{err}");
        assert_eq!(
            s.body(&[("p", "h")]),
            json!({"input": ["p [SEP] h"], "model": "m"})
        );
    }
}
