//! `kind: export` — write SFT and DPO tables in the formats trainers read, and check each file
//! by reading it back.
//!
//! | format | one line | read by |
//! |---|---|---|
//! | `sft_messages` | `{"messages": [{role, content}, …]}` | TRL `SFTTrainer`, axolotl `chat_template`, LLaMA-Factory (sharegpt, openai tags) |
//! | `sft_alpaca` | `{"instruction", "input", "output", "system"?, "history": [[q, a], …]}` | LLaMA-Factory alpaca, xtuner |
//! | `dpo_pairs` | `{"prompt", "chosen", "rejected"}` strings | TRL `DPOTrainer` (standard) |
//! | `dpo_trl` | `{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}` | TRL `DPOTrainer` (conversational) |
//! | `dpo_sharegpt` | `{"conversations": [{from, value}], "chosen": {from, value}, "rejected": {…}}` | LLaMA-Factory ranking |
//! | `iopo` | `{"conversations": [x1 turn, x2 turn], "chosen": y1 turn, "rejected": y2 turn}` (ShareGPT turns) | the IOPO authors' LLaMA-Factory fork (`stage: iopo`) |
//!
//! `iopo` is the record of Tongyi-CCAI/Complex-IF's `IOPO/data/trace.json`: two human turns,
//! the instruction x1 (column `prompt`) and the one with changed constraints x2 (`prompt2`),
//! then y1 (`chosen`, the answer that fits x1) and y2 (`rejected`, the one that fits x2). The
//! fork's pairwise processor cuts `conversations` in half (first half x1's prompt, second half
//! x2's), so earlier turns are written before each of the two instructions. Stock LLaMA-Factory
//! rejects two human turns in a row: train it on the both-ways DPO pairs instead (README, IOPO).
//!
//! Multi-turn history comes from an optional list column of `{role, content}` (or ShareGPT
//! `{from, value}`) turns before the final prompt. The LLaMA-Factory formats also get their
//! entry merged into `dataset_info.json` beside the file. Rows whose prompt or answers are null
//! or empty are not written (counter `skipped`): an empty target teaches a trainer nothing.
//! Rows whose answer was cut off by `max_tokens` are not written either (counter `truncated`)
//! unless `keep_truncated: true`: an answer column `X` is flagged by a boolean column
//! `X_truncated` (what an llm stage with `output: X` adds) when the input has one. SFT formats
//! look at the response's flag, DPO formats at the chosen's and the rejected's: a pair with a
//! cut-off side is a length signal, not a preference. An answer column without such a flag
//! column is written as it is.
//! The stage's own table is its input, unchanged, so lineage columns stay queryable.

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{KindEntry, PlanCtx, RunCtx, RunOutput, Stage, unknown_column};
use crate::error::{Diagnostic, Error, Result};
use crate::table::{OutFormat, batch_rows, has_col, read_batches};

pub const KIND: KindEntry = KindEntry {
    name: "export",
    about: "SFT/DPO datasets in trainer formats (messages, alpaca, TRL, LLaMA-Factory), read back to check",
    build: super::build::<ExportStage>,
    schema: |g| ExportStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    SftMessages,
    SftAlpaca,
    DpoPairs,
    DpoTrl,
    DpoSharegpt,
    Iopo,
}

impl ExportFormat {
    /// Formats with a chosen and a rejected answer.
    fn is_dpo(self) -> bool {
        matches!(
            self,
            ExportFormat::DpoPairs
                | ExportFormat::DpoTrl
                | ExportFormat::DpoSharegpt
                | ExportFormat::Iopo
        )
    }
}

fn d_prompt() -> String {
    "prompt".into()
}
fn d_formats() -> Vec<OutFormat> {
    vec![OutFormat::Jsonl]
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportStage {
    pub format: ExportFormat,
    /// File path without extension; relative paths are inside the run directory.
    pub path: String,
    /// Files to write (default: jsonl).
    #[serde(default = "d_formats")]
    pub formats: Vec<OutFormat>,
    /// Column with the final user turn.
    #[serde(default = "d_prompt")]
    pub prompt: String,
    /// Column with the second instruction x2, the one with changed constraints (format `iopo`
    /// only; default `prompt2`).
    #[serde(default)]
    pub prompt2: Option<String>,
    /// Column with the answer (SFT formats; default `response`).
    #[serde(default)]
    pub response: Option<String>,
    /// Columns with the preferred and the dispreferred answer (DPO formats; default
    /// `chosen` / `rejected`).
    #[serde(default)]
    pub chosen: Option<String>,
    #[serde(default)]
    pub rejected: Option<String>,
    /// Optional column with a system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Optional list column with the earlier turns (`{role, content}` or `{from, value}`).
    #[serde(default)]
    pub history: Option<String>,
    /// Name of the dataset in `dataset_info.json` (default: the stage id).
    #[serde(default)]
    pub dataset_name: Option<String>,
    /// Also write rows whose answer was cut off by `max_tokens` (its `<column>_truncated` flag
    /// is true). Default false: they are left out and counted (counter `truncated`).
    #[serde(default)]
    pub keep_truncated: bool,
}

/// Stages of one run write in parallel threads; `dataset_info.json` is read, merged and
/// rewritten under this lock so two exports into one folder keep both entries.
static DATASET_INFO: Mutex<()> = Mutex::new(());

impl ExportStage {
    fn response_col(&self) -> String {
        self.response.clone().unwrap_or_else(|| "response".into())
    }
    fn chosen_col(&self) -> String {
        self.chosen.clone().unwrap_or_else(|| "chosen".into())
    }
    fn rejected_col(&self) -> String {
        self.rejected.clone().unwrap_or_else(|| "rejected".into())
    }
    fn prompt2_col(&self) -> String {
        self.prompt2.clone().unwrap_or_else(|| "prompt2".into())
    }

    fn targets(&self, run_dir: &Path) -> Vec<(OutFormat, PathBuf)> {
        OutFormat::targets(&self.path, &self.formats, run_dir)
    }

    /// The answer columns the format writes: `response`, or `chosen` and `rejected`.
    fn answer_columns(&self) -> Vec<String> {
        if self.format.is_dpo() {
            vec![self.chosen_col(), self.rejected_col()]
        } else {
            vec![self.response_col()]
        }
    }

    /// The truncation flags that leave a row out: `<answer>_truncated` for each answer column
    /// that has a boolean one in `schema` (none with `keep_truncated`).
    pub fn truncation_flags(&self, schema: &arrow::datatypes::Schema) -> Vec<String> {
        if self.keep_truncated {
            return Vec::new();
        }
        self.answer_columns()
            .into_iter()
            .map(|c| format!("{c}_truncated"))
            .filter(|f| {
                schema
                    .field_with_name(f)
                    .is_ok_and(|f| *f.data_type() == arrow::datatypes::DataType::Boolean)
            })
            .collect()
    }

    /// Columns the format reads, each with its YAML field.
    fn columns(&self) -> Vec<(&'static str, String)> {
        let mut c = vec![("prompt", self.prompt.clone())];
        if self.format == ExportFormat::Iopo {
            c.push(("prompt2", self.prompt2_col()));
        }
        if self.format.is_dpo() {
            c.push(("chosen", self.chosen_col()));
            c.push(("rejected", self.rejected_col()));
        } else {
            c.push(("response", self.response_col()));
        }
        if let Some(s) = &self.system {
            c.push(("system", s.clone()));
        }
        if let Some(h) = &self.history {
            c.push(("history", h.clone()));
        }
        c
    }

    /// One output record for one row, or `None` when a needed text is missing.
    pub fn record(&self, row: &Value) -> Option<Value> {
        let text = |col: &str| {
            row.get(col)
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
        };
        let prompt = text(&self.prompt)?;
        let system = self.system.as_deref().and_then(text);
        let history = self
            .history
            .as_deref()
            .map(|h| turns(row.get(h)))
            .unwrap_or_default();
        let msg = |role: &str, content: &str| json!({"role": role, "content": content});
        let mut prompt_msgs = Vec::new();
        if let Some(s) = &system {
            prompt_msgs.push(msg("system", s));
        }
        for (role, content) in &history {
            prompt_msgs.push(msg(role, content));
        }
        prompt_msgs.push(msg("user", &prompt));
        let out = match self.format {
            ExportFormat::SftMessages => {
                let response = text(&self.response_col())?;
                let mut m = prompt_msgs;
                m.push(msg("assistant", &response));
                json!({"messages": m})
            }
            ExportFormat::SftAlpaca => {
                let response = text(&self.response_col())?;
                let mut o = Map::new();
                o.insert("instruction".into(), prompt.into());
                o.insert("input".into(), "".into());
                o.insert("output".into(), response.into());
                if let Some(s) = system {
                    o.insert("system".into(), s.into());
                }
                o.insert("history".into(), Value::Array(pairs(&history)));
                Value::Object(o)
            }
            ExportFormat::DpoPairs => {
                let mut o = Map::new();
                o.insert("prompt".into(), prompt.into());
                o.insert("chosen".into(), text(&self.chosen_col())?.into());
                o.insert("rejected".into(), text(&self.rejected_col())?.into());
                if let Some(s) = system {
                    o.insert("system".into(), s.into());
                }
                Value::Object(o)
            }
            ExportFormat::DpoTrl => json!({
                "prompt": prompt_msgs,
                "chosen": [msg("assistant", &text(&self.chosen_col())?)],
                "rejected": [msg("assistant", &text(&self.rejected_col())?)],
            }),
            // ShareGPT ranking records: LLaMA-Factory's DPO shape has one instruction after
            // the history; the IOPO fork's has two (x1, then x2), each after the history, as
            // its processor cuts the prompt turns in half.
            ExportFormat::DpoSharegpt | ExportFormat::Iopo => {
                let instructions = if self.format == ExportFormat::Iopo {
                    vec![prompt, text(&self.prompt2_col())?]
                } else {
                    vec![prompt]
                };
                let from = |role: &str| if role == "assistant" { "gpt" } else { "human" };
                let mut conv: Vec<Value> = Vec::new();
                for x in &instructions {
                    conv.extend(
                        history
                            .iter()
                            .map(|(r, c)| json!({"from": from(r), "value": c})),
                    );
                    conv.push(json!({"from": "human", "value": x}));
                }
                let mut o = Map::new();
                o.insert("conversations".into(), Value::Array(conv));
                o.insert(
                    "chosen".into(),
                    json!({"from": "gpt", "value": text(&self.chosen_col())?}),
                );
                o.insert(
                    "rejected".into(),
                    json!({"from": "gpt", "value": text(&self.rejected_col())?}),
                );
                if let Some(s) = system {
                    o.insert("system".into(), s.into());
                }
                Value::Object(o)
            }
        };
        Some(out)
    }

    /// The LLaMA-Factory `dataset_info.json` entry for `file_name`, for formats it reads.
    fn dataset_info(&self, file_name: &str) -> Option<Value> {
        let mut e = match self.format {
            ExportFormat::SftAlpaca => json!({
                "file_name": file_name,
                "columns": {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}
            }),
            ExportFormat::SftMessages => json!({
                "file_name": file_name,
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}
            }),
            // The authors' entry (Complex-IF `IOPO/data/dataset_info.json`) is the same as a
            // stock ranking dataset's; only their fork's `stage: iopo` reads it as IOPO.
            ExportFormat::DpoSharegpt | ExportFormat::Iopo => json!({
                "file_name": file_name,
                "formatting": "sharegpt",
                "ranking": true,
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
            }),
            ExportFormat::DpoPairs | ExportFormat::DpoTrl => return None,
        };
        if self.system.is_some()
            && matches!(
                self.format,
                ExportFormat::SftAlpaca | ExportFormat::DpoSharegpt | ExportFormat::Iopo
            )
            && let Some(c) = e.get_mut("columns").and_then(Value::as_object_mut)
        {
            c.insert("system".into(), "system".into());
        }
        Some(e)
    }
}

/// Earlier turns as (role, content), accepting `{role, content}` and ShareGPT `{from, value}`.
fn turns(v: Option<&Value>) -> Vec<(String, String)> {
    let Some(Value::Array(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|t| {
            let role = t.get("role").or_else(|| t.get("from"))?.as_str()?;
            let content = t.get("content").or_else(|| t.get("value"))?.as_str()?;
            let role = match role {
                "human" | "user" => "user",
                "gpt" | "assistant" | "model" => "assistant",
                "system" => "system",
                other => other,
            };
            Some((role.to_string(), content.to_string()))
        })
        .collect()
}

/// Alpaca history: consecutive (user, assistant) pairs.
fn pairs(history: &[(String, String)]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut pending: Option<&str> = None;
    for (role, content) in history {
        match role.as_str() {
            "user" => pending = Some(content),
            "assistant" => {
                if let Some(q) = pending.take() {
                    out.push(json!([q, content]));
                }
            }
            _ => {}
        }
    }
    out
}

/// Check one written record against its format: the keys, types and roles a trainer needs.
pub fn check_record(format: ExportFormat, v: &Value) -> std::result::Result<(), String> {
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|_| ())
            .ok_or_else(|| format!("`{k}` is missing or not a non-empty string"))
    };
    let msgs = |k: &str| -> std::result::Result<Vec<(String, String)>, String> {
        let a = v
            .get(k)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("`{k}` is not a list of messages"))?;
        a.iter()
            .map(|m| {
                let r = m.get("role").and_then(Value::as_str);
                let c = m.get("content").and_then(Value::as_str);
                match (r, c) {
                    (Some(r), Some(c)) => Ok((r.to_string(), c.to_string())),
                    _ => Err(format!("a message of `{k}` lacks role or content")),
                }
            })
            .collect()
    };
    match format {
        ExportFormat::SftMessages => {
            let m = msgs("messages")?;
            if m.last().map(|x| x.0.as_str()) != Some("assistant") {
                return Err("the last message is not the assistant's".into());
            }
            if !m.iter().any(|x| x.0 == "user") {
                return Err("no user message".into());
            }
            Ok(())
        }
        ExportFormat::SftAlpaca => {
            s("instruction")?;
            s("output")?;
            if !v.get("input").is_some_and(Value::is_string) {
                return Err("`input` is not a string".into());
            }
            match v.get("history").and_then(Value::as_array) {
                Some(h) if h.iter().all(|p| p.as_array().is_some_and(|p| p.len() == 2)) => Ok(()),
                _ => Err("`history` is not a list of [instruction, response] pairs".into()),
            }
        }
        ExportFormat::DpoPairs => {
            s("prompt")?;
            s("chosen")?;
            s("rejected")
        }
        ExportFormat::DpoTrl => {
            let p = msgs("prompt")?;
            if p.last().map(|x| x.0.as_str()) != Some("user") {
                return Err("the prompt does not end with a user message".into());
            }
            for k in ["chosen", "rejected"] {
                let m = msgs(k)?;
                if m.len() != 1 || m[0].0 != "assistant" {
                    return Err(format!("`{k}` is not one assistant message"));
                }
            }
            Ok(())
        }
        ExportFormat::DpoSharegpt => {
            let c = v
                .get("conversations")
                .and_then(Value::as_array)
                .ok_or("`conversations` is not a list")?;
            if c.last().and_then(|t| t.get("from")).and_then(Value::as_str) != Some("human") {
                return Err("the conversation does not end with a human turn".into());
            }
            gpt_answers(v)
        }
        ExportFormat::Iopo => {
            let c = v
                .get("conversations")
                .and_then(Value::as_array)
                .ok_or("`conversations` is not a list")?;
            // The fork halves the list: x1's turns, then x2's, each ending with the human's.
            let human = |t: Option<&Value>| {
                t.and_then(|t| t.get("from")).and_then(Value::as_str) == Some("human")
                    && t.and_then(|t| t.get("value"))
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            };
            if c.is_empty() || c.len() % 2 != 0 {
                return Err(format!(
                    "`conversations` has {} turns, not the two halves (x1's, x2's) of equal length",
                    c.len()
                ));
            }
            let n = c.len() / 2;
            if !human(c.get(n - 1)) || !human(c.last()) {
                return Err("a half of `conversations` does not end with a human turn".into());
            }
            gpt_answers(v)
        }
    }
}

/// `chosen` and `rejected` are gpt turns with a non-empty text.
fn gpt_answers(v: &Value) -> std::result::Result<(), String> {
    for k in ["chosen", "rejected"] {
        let t = v.get(k);
        if t.and_then(|t| t.get("from")).and_then(Value::as_str) != Some("gpt")
            || t.and_then(|t| t.get("value"))
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            return Err(format!("`{k}` is not a gpt turn with a text"));
        }
    }
    Ok(())
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(s)
}

impl Stage for ExportStage {
    fn needs_id(&self) -> bool {
        true
    }

    fn external_outputs(&self, run_dir: &Path) -> Vec<PathBuf> {
        self.targets(run_dir).into_iter().map(|(_, p)| p).collect()
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<arrow::datatypes::SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        let dpo = self.format.is_dpo();
        let iopo = self.format == ExportFormat::Iopo;
        for (field, wrong) in [
            ("prompt2", !iopo && self.prompt2.is_some()),
            ("response", dpo && self.response.is_some()),
            ("chosen", !dpo && self.chosen.is_some()),
            ("rejected", !dpo && self.rejected.is_some()),
        ] {
            if wrong {
                errs.push(
                    ctx.err(
                        &[field],
                        format!("`{field}` does not apply to format {:?}", self.format),
                    )
                    .hint("SFT formats take `response`; DPO formats take `chosen` and `rejected`; `iopo` also takes `prompt2`"),
                );
            }
        }
        if self.formats.is_empty() {
            errs.push(
                ctx.err(&["formats"], "no file format given")
                    .hint("formats: [jsonl, parquet]"),
            );
        }
        for (field, col) in self.columns() {
            if !has_col(schema, &col) {
                // Defaulted columns have no YAML field of their own: point at `format`.
                let path = if ctx.node.get(field).is_some() {
                    field
                } else {
                    "format"
                };
                errs.push(
                    unknown_column(ctx, &[path], &col, schema)
                        .hint_if_none(format!("set `{field}:` to the column that holds it")),
                );
            }
        }
        if errs.is_empty() {
            Ok(schema.clone())
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let targets = self.targets(ctx.run_dir);
        for (_, p) in &targets {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
        }
        // The stage's own table: the input as it is.
        let table = ctx.out.join("part-00000.parquet");
        let mut tw: Option<parquet::arrow::ArrowWriter<File>> = None;
        let mut records: Vec<Value> = Vec::new();
        let mut jsonl: Option<(PathBuf, BufWriter<File>)> = None;
        if let Some((_, p)) = targets.iter().find(|(f, _)| *f == OutFormat::Jsonl) {
            let t = tmp_path(p);
            let f = File::create(&t).map_err(|e| Error::io(&t, e))?;
            jsonl = Some((t, BufWriter::new(f)));
        }
        // A JSON array, written record by record: `[`, records separated by `,\n`, `]`.
        let mut json_array: Option<(PathBuf, BufWriter<File>)> = None;
        if let Some((_, p)) = targets.iter().find(|(f, _)| *f == OutFormat::Json) {
            let t = tmp_path(p);
            let f = File::create(&t).map_err(|e| Error::io(&t, e))?;
            let mut w = BufWriter::new(f);
            w.write_all(b"[\n").map_err(|e| Error::io(&t, e))?;
            json_array = Some((t, w));
        }
        let want_parquet = targets.iter().any(|(f, _)| *f == OutFormat::Parquet);
        let (mut written, mut skipped, mut truncated) = (0i64, 0i64, 0i64);
        let flags = self.truncation_flags(&ctx.schema);
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            let w = match &mut tw {
                Some(w) => w,
                None => {
                    let f = File::create(&table).map_err(|e| Error::io(&table, e))?;
                    tw.insert(crate::engine::parquet_writer(f, b.schema())?)
                }
            };
            w.write(&b)?;
            for row in batch_rows(&b)? {
                // Before the empty-text check: an answer cut off before any text (a reasoning
                // model that spent max_tokens thinking) counts as truncated.
                if flags
                    .iter()
                    .any(|f| row.get(f).and_then(Value::as_bool) == Some(true))
                {
                    truncated += 1;
                    continue;
                }
                let Some(rec) = self.record(&row) else {
                    skipped += 1;
                    continue;
                };
                written += 1;
                if let Some((t, w)) = &mut jsonl {
                    serde_json::to_writer(&mut *w, &rec)?;
                    w.write_all(b"\n").map_err(|e| Error::io(&*t, e))?;
                }
                if let Some((t, w)) = &mut json_array {
                    if written > 1 {
                        w.write_all(b",\n").map_err(|e| Error::io(&*t, e))?;
                    }
                    serde_json::to_writer(&mut *w, &rec)?;
                }
                if want_parquet {
                    records.push(rec);
                }
            }
        }
        match tw {
            Some(w) => {
                w.close()?;
            }
            None => crate::engine::write_empty(&table, &ctx.schema)?,
        }
        if let Some((t, w)) = jsonl.take() {
            let f = w.into_inner().map_err(|e| Error::io(&t, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&t, e))?;
        }
        if let Some((t, mut w)) = json_array.take() {
            w.write_all(b"\n]\n").map_err(|e| Error::io(&t, e))?;
            let f = w.into_inner().map_err(|e| Error::io(&t, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&t, e))?;
        }
        if want_parquet && let Some((_, p)) = targets.iter().find(|(f, _)| *f == OutFormat::Parquet)
        {
            write_parquet(&tmp_path(p), &records)?;
        }
        // Read every file back before it takes its final name: a file a trainer cannot load
        // must not look finished.
        for (fmt, p) in &targets {
            let t = tmp_path(p);
            let n = match fmt {
                OutFormat::Jsonl => self.read_back_jsonl(&t)?,
                OutFormat::Json => self.read_back_json(&t)?,
                OutFormat::Parquet => crate::engine::count_rows(std::slice::from_ref(&t))? as i64,
            };
            if n != written {
                return Err(Error::Stage {
                    stage: ctx.id.to_string(),
                    message: format!("{} holds {n} records after writing {written}", t.display()),
                });
            }
            std::fs::rename(&t, p).map_err(|e| Error::io(p, e))?;
        }
        if let Some((_, p)) = targets.first() {
            // The first JSON file (lines or array) is the one LLaMA-Factory is pointed at.
            let file_name = targets
                .iter()
                .find(|(f, _)| matches!(f, OutFormat::Jsonl | OutFormat::Json))
                .unwrap_or(&targets[0])
                .1
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let (Some(entry), Some(dir)) = (self.dataset_info(&file_name), p.parent()) {
                let name = self
                    .dataset_name
                    .clone()
                    .unwrap_or_else(|| ctx.id.to_string());
                merge_dataset_info(&dir.join("dataset_info.json"), &name, entry)?;
            }
        }
        let mut out = RunOutput::default();
        out.counters.insert("written".into(), written);
        out.counters.insert("skipped".into(), skipped);
        out.counters.insert("truncated".into(), truncated);
        Ok(out)
    }
}

impl ExportStage {
    fn read_back_json(&self, path: &Path) -> Result<i64> {
        use serde::Deserializer;
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(f));
        let n = de
            .deserialize_seq(CheckArray {
                format: self.format,
                path,
            })
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        de.end()
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        Ok(n)
    }

    fn read_back_jsonl(&self, path: &Path) -> Result<i64> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut n = 0i64;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| Error::io(path, e))?;
            let v: Value = serde_json::from_str(&line)?;
            check_record(self.format, &v)
                .map_err(|e| Error::Internal(format!("{} line {}: {e}", path.display(), i + 1)))?;
            n += 1;
        }
        Ok(n)
    }
}

/// Checks each record of a JSON array as it is read, without holding the array.
struct CheckArray<'a> {
    format: ExportFormat,
    path: &'a Path,
}

impl<'de> serde::de::Visitor<'de> for CheckArray<'_> {
    type Value = i64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<i64, A::Error> {
        let mut n = 0i64;
        while let Some(v) = seq.next_element::<Value>()? {
            n += 1;
            check_record(self.format, &v).map_err(|e| {
                serde::de::Error::custom(format!("{} record {n}: {e}", self.path.display()))
            })?;
        }
        Ok(n)
    }
}

/// Nested JSON records to Parquet, with the Arrow schema inferred from the records.
fn write_parquet(path: &Path, records: &[Value]) -> Result<()> {
    use arrow::json::reader::{ReaderBuilder, infer_json_schema_from_iterator};
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    if records.is_empty() {
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::empty());
        crate::engine::parquet_writer(f, schema)?.close()?;
        return Ok(());
    }
    let schema = std::sync::Arc::new(infer_json_schema_from_iterator(
        records.iter().map(|r| Ok(r.clone())),
    )?);
    let mut w = crate::engine::parquet_writer(f, schema.clone())?;
    for chunk in records.chunks(8192) {
        let mut d = ReaderBuilder::new(schema.clone()).build_decoder()?;
        d.serialize(chunk)?;
        if let Some(b) = d.flush()? {
            w.write(&b)?;
        }
    }
    w.close()?;
    Ok(())
}

fn merge_dataset_info(path: &Path, name: &str, entry: Value) -> Result<()> {
    let _guard = DATASET_INFO.lock().unwrap_or_else(|e| e.into_inner());
    let mut info: Map<String, Value> = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
        Err(_) => Map::new(),
    };
    info.insert(name.to_string(), entry);
    let t = tmp_path(path);
    std::fs::write(&t, serde_json::to_vec_pretty(&Value::Object(info))?)
        .map_err(|e| Error::io(&t, e))?;
    std::fs::rename(&t, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(format: ExportFormat) -> ExportStage {
        ExportStage {
            format,
            path: "x".into(),
            formats: d_formats(),
            prompt: "prompt".into(),
            prompt2: None,
            response: None,
            chosen: None,
            rejected: None,
            system: Some("system".into()),
            history: Some("history".into()),
            dataset_name: None,
            keep_truncated: false,
        }
    }

    fn row() -> Value {
        json!({
            "prompt": "Now in French, in 3 bullet points.",
            "prompt2": "Now in German, in one sentence.",
            "response": "- a\n- b\n- c",
            "chosen": "- a\n- b\n- c",
            "rejected": "a, b and c",
            "system": "Be brief.",
            "history": [{"from": "human", "value": "List three colours."},
                        {"from": "gpt", "value": "Red, green, blue."}],
        })
    }

    #[test]
    fn every_format_keeps_history_and_passes_its_check() {
        for f in [
            ExportFormat::SftMessages,
            ExportFormat::SftAlpaca,
            ExportFormat::DpoPairs,
            ExportFormat::DpoTrl,
            ExportFormat::DpoSharegpt,
            ExportFormat::Iopo,
        ] {
            let r = stage(f).record(&row()).unwrap();
            check_record(f, &r).unwrap_or_else(|e| panic!("{f:?}: {e}: {r}"));
        }
        let m = stage(ExportFormat::SftMessages).record(&row()).unwrap();
        let roles: Vec<&str> = m["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        let a = stage(ExportFormat::SftAlpaca).record(&row()).unwrap();
        assert_eq!(
            a["history"],
            json!([["List three colours.", "Red, green, blue."]])
        );
        let s = stage(ExportFormat::DpoSharegpt).record(&row()).unwrap();
        assert_eq!(s["conversations"].as_array().unwrap().len(), 3);
        assert_eq!(s["rejected"]["value"], "a, b and c");
    }

    #[test]
    fn iopo_records_have_the_upstream_shape() {
        let mut plain = stage(ExportFormat::Iopo);
        plain.system = None;
        plain.history = None;
        let r = plain.record(&row()).unwrap();
        assert_eq!(
            r,
            json!({
                "conversations": [
                    {"from": "human", "value": "Now in French, in 3 bullet points."},
                    {"from": "human", "value": "Now in German, in one sentence."}],
                "chosen": {"from": "gpt", "value": "- a\n- b\n- c"},
                "rejected": {"from": "gpt", "value": "a, b and c"},
            })
        );
        // The upstream example reads as a valid record.
        let upstream = json!({"conversations": [{"from": "human", "value": "x1"},
                                                {"from": "human", "value": "x2"}],
                              "chosen": {"from": "gpt", "value": "y1"},
                              "rejected": {"from": "gpt", "value": "y2"}});
        check_record(ExportFormat::Iopo, &upstream).unwrap();
        // With history, each half carries the earlier turns before its instruction.
        let h = stage(ExportFormat::Iopo).record(&row()).unwrap();
        let froms: Vec<&str> = h["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["from"].as_str().unwrap())
            .collect();
        assert_eq!(froms, ["human", "gpt", "human", "human", "gpt", "human"]);
        assert_eq!(
            h["conversations"][5]["value"],
            "Now in German, in one sentence."
        );
        // No x2: skipped; odd halves and a missing answer: rejected.
        let mut r = row();
        r["prompt2"] = json!("");
        assert!(plain.record(&r).is_none());
        for bad in [
            json!({"conversations": [{"from": "human", "value": "x1"}],
                   "chosen": {"from": "gpt", "value": "y1"}, "rejected": {"from": "gpt", "value": "y2"}}),
            json!({"conversations": [{"from": "human", "value": "x1"}, {"from": "gpt", "value": "x2"}],
                   "chosen": {"from": "gpt", "value": "y1"}, "rejected": {"from": "gpt", "value": "y2"}}),
            json!({"conversations": [{"from": "human", "value": "x1"}, {"from": "human", "value": "x2"}],
                   "chosen": {"from": "gpt", "value": "y1"}}),
        ] {
            assert!(check_record(ExportFormat::Iopo, &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_texts_are_skipped_and_bad_records_rejected() {
        let mut r = row();
        r["chosen"] = json!("  ");
        assert!(stage(ExportFormat::DpoPairs).record(&r).is_none());
        assert!(stage(ExportFormat::SftMessages).record(&r).is_some());
        assert!(
            check_record(
                ExportFormat::DpoPairs,
                &json!({"prompt": "p", "chosen": "c"})
            )
            .is_err()
        );
        assert!(
            check_record(
                ExportFormat::SftMessages,
                &json!({"messages": [{"role": "user", "content": "q"}]})
            )
            .is_err()
        );
        assert!(
            check_record(
                ExportFormat::SftAlpaca,
                &json!({"instruction": "i", "input": "", "output": "o", "history": [["only one"]]})
            )
            .is_err()
        );
    }

    #[test]
    fn truncation_flags_follow_the_answer_columns() {
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Schema::new(vec![
            Field::new("response_truncated", DataType::Boolean, true),
            Field::new("chosen_truncated", DataType::Boolean, true),
            Field::new("answer_truncated", DataType::Boolean, true),
            // Samples as lists: not a per-row flag.
            Field::new(
                "rejected_truncated",
                DataType::List(std::sync::Arc::new(Field::new_list_field(
                    DataType::Boolean,
                    true,
                ))),
                true,
            ),
        ]);
        assert_eq!(
            stage(ExportFormat::SftMessages).truncation_flags(&schema),
            ["response_truncated"]
        );
        let mut answer = stage(ExportFormat::SftAlpaca);
        answer.response = Some("answer".into());
        assert_eq!(answer.truncation_flags(&schema), ["answer_truncated"]);
        answer.response = Some("text".into());
        assert!(answer.truncation_flags(&schema).is_empty());
        assert_eq!(
            stage(ExportFormat::DpoPairs).truncation_flags(&schema),
            ["chosen_truncated"]
        );
        let mut keep = stage(ExportFormat::SftMessages);
        keep.keep_truncated = true;
        assert!(keep.truncation_flags(&schema).is_empty());
    }
}
