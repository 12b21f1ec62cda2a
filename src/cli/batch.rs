//! Offline batch mode for vLLM's `run-batch` (and the OpenAI Batch API): export every
//! uncached request of an LLM stage in the batch format, run it elsewhere, import the results
//! into the cache; the next `ifloom run` then completes the stage without network calls.

use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::exec::{self, RunOptions};
use crate::llm_client::cache::{Cache, CachedResponse};
use crate::llm_client::response;
use crate::stages::llm::{self, LlmStage};
use crate::store::RunDir;
use crate::table::{batch_rows, read_batches};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// The LLM stage.
    #[arg(long)]
    pub stage: String,
    #[command(flatten)]
    pub place: super::RunPlaceArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Write the stage's uncached requests as batch JSONL (`custom_id` = request id).
    Export {
        #[command(flatten)]
        common: Common,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Load batch results (JSONL) into the cache: only results whose `custom_id` is one of the
    /// stage's requests, and not already cached.
    Import {
        #[command(flatten)]
        common: Common,
        results: PathBuf,
    },
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    match a.action {
        Action::Export { common, out } => export(common, out, engine),
        Action::Import { common, results } => import(common, results, engine),
    }
}

fn setup(c: &Common, engine: &Engine) -> Result<(crate::compile::Plan, RunDir, Engine)> {
    let plan = c.pipeline.compile(engine)?;
    let Some(stage) = plan.pipeline.stage(&c.stage) else {
        return Err(Error::usage(format!(
            "the pipeline has no stage `{}`",
            c.stage
        )));
    };
    if stage.stage.downcast_ref::<LlmStage>().is_none() {
        return Err(Error::usage(format!(
            "stage `{}` is a {} stage, not llm",
            c.stage, stage.kind
        )));
    }
    let dir = c.place.run_dir(&plan);
    Ok((plan, dir, c.place.engine(engine)))
}

/// The llm stage named on the command line (`setup` checked that it is one).
fn llm_stage<'p>(c: &Common, plan: &'p crate::compile::Plan) -> &'p LlmStage {
    plan.pipeline
        .stage(&c.stage)
        .and_then(|d| d.stage.downcast_ref::<LlmStage>())
        .expect("checked by setup")
}

/// The stage's requests (id, canonical request), from its input rows: what `export` writes
/// and the ids `import` accepts.
fn stage_requests(
    c: &Common,
    plan: &crate::compile::Plan,
    dir: &RunDir,
    engine: &Engine,
) -> Result<Vec<(String, crate::llm_client::request::Canonical)>> {
    // Materialize what needs no LLM (the stage's inputs, if they do not depend on one).
    exec::run(
        plan,
        dir,
        engine,
        &RunOptions {
            force: vec![],
            dry_run: true,
            until: None,
            cancel: Default::default(),
            ..Default::default()
        },
    )?;
    let def = plan.pipeline.stage(&c.stage).expect("checked");
    let st = llm_stage(c, plan);
    let parent = &def.from[0].0;
    let Some(m) = dir.manifest(parent) else {
        return Err(Error::usage(format!(
            "the input of `{}` (`{parent}`) is not computed yet: it depends on another LLM stage; run the stages before it first: ifloom run FILE --until {parent} (same --set/--profile/--run-dir)",
            c.stage
        )));
    };
    let files: Vec<PathBuf> = m
        .parts
        .iter()
        .map(|p| dir.stage_dir(parent).join(p))
        .collect();
    let mut rows = Vec::new();
    for b in read_batches(&files) {
        rows.extend(batch_rows(&b?)?);
    }
    llm::plan_requests(st, &rows)
}

fn export(c: Common, out: PathBuf, engine: &Engine) -> Result<()> {
    let (plan, dir, engine) = setup(&c, engine)?;
    let reqs = stage_requests(&c, &plan, &dir, &engine)?;
    let st = llm_stage(&c, &plan);
    let ids: Vec<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
    let cached = Cache::open(&llm::cache_path(&engine))?.get_many(&ids)?;
    let f = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
    let mut w = BufWriter::new(f);
    let mut n = 0;
    for (id, req) in &reqs {
        if cached.contains_key(id) {
            continue;
        }
        let body = req.body_value(st.profile(), 1);
        let line = serde_json::json!({"custom_id": id, "method": "POST", "url": format!("/v1/{}", req.api.path()), "body": body});
        writeln!(w, "{line}").map_err(|e| Error::io(&out, e))?;
        n += 1;
    }
    w.flush().map_err(|e| Error::io(&out, e))?;
    eprintln!(
        "wrote {n} requests to {} ({} already cached); run them with vLLM's run-batch, then: {}",
        out.display(),
        cached.len(),
        import_command(&c)
    );
    Ok(())
}

/// The `ifloom batch import` command that loads the results of an export made with `c`: the
/// same pipeline, stage, profile, params, run dir and cache, shell-quoted, with `RESULTS.jsonl`
/// standing for the results file.
fn import_command(c: &Common) -> String {
    let mut args: Vec<String> = vec![
        "ifloom".into(),
        "batch".into(),
        "import".into(),
        path_arg(&c.pipeline.file),
        "--stage".into(),
        c.stage.clone(),
    ];
    if let Some(p) = &c.pipeline.profile {
        args.extend(["--profile".into(), p.clone()]);
    }
    for (k, v) in &c.pipeline.set {
        args.extend(["--set".into(), format!("{k}={v}")]);
    }
    if let Some(d) = &c.place.run_dir {
        args.extend(["--run-dir".into(), path_arg(d)]);
    }
    if let Some(p) = &c.place.cache {
        args.extend(["--cache".into(), path_arg(p)]);
    }
    args.push("RESULTS.jsonl".into());
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A path as an argument: a relative path that starts with `-` gets `./` in front, so it is
/// not read as an option.
fn path_arg(p: &std::path::Path) -> String {
    let s = p.to_string_lossy().into_owned();
    if s.starts_with('-') {
        format!("./{s}")
    } else {
        s
    }
}

/// `s` as one POSIX shell word: as is when it holds only characters no shell treats
/// specially, else in single quotes (a `'` inside as `'\''`).
pub(crate) fn shell_quote(s: &str) -> String {
    let plain = |ch: char| ch.is_ascii_alphanumeric() || "_-./=:,+@%".contains(ch);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// How many ids of unknown results to name in the report.
const SHOW_UNKNOWN: usize = 5;

fn import(c: Common, results: PathBuf, engine: &Engine) -> Result<()> {
    let (plan, dir, engine) = setup(&c, engine)?;
    // The ids `batch export` would write for this stage (cached or not): a result with any
    // other custom_id belongs to another stage, pipeline or parameter set and is not stored.
    let reqs = stage_requests(&c, &plan, &dir, &engine)?;
    let st = llm_stage(&c, &plan);
    let ids: Vec<String> = reqs.into_iter().map(|(id, _)| id).collect();
    let f = std::fs::File::open(&results).map_err(|e| Error::io(&results, e))?;
    let cache = Cache::open(&llm::cache_path(&engine))?;
    let mut seen: HashSet<String> = cache.get_many(&ids)?.into_keys().collect();
    let known: HashSet<String> = ids.into_iter().collect();
    let (mut stored, mut cached, mut failed) = (0usize, 0usize, 0usize);
    let mut unknown: Vec<String> = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(&results, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", results.display(), i + 1);
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{at}: failed, not JSON: {e}");
                failed += 1;
                continue;
            }
        };
        let id = v["custom_id"].as_str().unwrap_or_default().to_string();
        if id.is_empty() {
            eprintln!("{at}: failed, no custom_id");
            failed += 1;
            continue;
        }
        if !known.contains(&id) {
            unknown.push(id);
            continue;
        }
        let comp = match result_completion(&v) {
            Ok(comp) => comp,
            Err(why) => {
                eprintln!("{at}: failed, custom_id `{id}`: {why}");
                failed += 1;
                continue;
            }
        };
        // Already in the cache, or earlier in this file: the first answer stays.
        if !seen.insert(id.clone()) {
            cached += 1;
            continue;
        }
        let ch = comp.choices.into_iter().next().expect("one choice checked");
        cache.put(
            id,
            st.model().into(),
            CachedResponse {
                text: ch.text,
                reasoning: ch.reasoning,
                finish_reason: ch.finish_reason,
                logprobs: llm::kept_logprobs(st.wants_logprobs(), ch.logprobs),
                prompt_tokens: comp.prompt_tokens,
                completion_tokens: comp.completion_tokens,
                latency_ms: 0,
            },
        );
        stored += 1;
    }
    let written = cache.close()?;
    debug_assert_eq!(written, stored as u64);
    let mut report = format!(
        "imported {stored} responses into {}: {} unknown ids skipped, {cached} already cached, {failed} failed",
        llm::cache_path(&engine).display(),
        unknown.len(),
    );
    if !unknown.is_empty() {
        let shown: Vec<String> = unknown
            .iter()
            .take(SHOW_UNKNOWN)
            .map(|id| format!("`{id}`"))
            .collect();
        let more = if unknown.len() > SHOW_UNKNOWN {
            format!(" and {} more", unknown.len() - SHOW_UNKNOWN)
        } else {
            String::new()
        };
        report.push_str(&format!(
            "\n  unknown: {}{more}, not requests of stage `{}` (results of another stage, pipeline or --set?)",
            shown.join(", "),
            c.stage
        ));
    }
    eprintln!("{report}");
    Ok(())
}

/// The completion of one batch result line, or why there is none: the line's own `error`
/// (vLLM and the OpenAI Batch API put a failed request's error there, with `response` null
/// or without a body), a status other than 200 with the body's error message, or a 200 body
/// that is not a completion.
fn result_completion(v: &serde_json::Value) -> std::result::Result<response::Completion, String> {
    if response::is_error(&v["error"]) {
        return Err(format!("batch error: {}", error_message(&v["error"])));
    }
    let resp = &v["response"];
    if resp.is_null() {
        return Err("the result has neither a response nor an error".into());
    }
    let Some(status) = resp["status_code"].as_u64() else {
        return Err(format!(
            "the response has no status_code: {}",
            snippet(&resp.to_string())
        ));
    };
    let body = &resp["body"];
    if status != 200 {
        let why = if response::is_error(&body["error"]) {
            error_message(&body["error"])
        } else if body.get("message").is_some_and(response::is_error) {
            // vLLM's older error body: `{"object": "error", "message": ...}`.
            error_message(body)
        } else if body.is_null() {
            "no body".into()
        } else {
            snippet(&match body {
                serde_json::Value::String(s) => s.clone(),
                b => b.to_string(),
            })
        };
        return Err(format!("HTTP {status}: {why}"));
    }
    response::parse_completion(body.to_string().as_bytes(), 1)
}

/// The message of an error value: its `message` (or that of an `error` inside it, as vLLM
/// nests them), a string as is, else the value as JSON.
fn error_message(e: &serde_json::Value) -> String {
    for m in [&e["message"], &e["error"]["message"]] {
        if let Some(m) = m.as_str().filter(|m| !m.is_empty()) {
            return m.to_string();
        }
    }
    snippet(&match e {
        serde_json::Value::String(s) => s.clone(),
        e => e.to_string(),
    })
}

/// At most 300 characters of `s`, on one line.
fn snippet(s: &str) -> String {
    let out: String = s.chars().take(300).collect();
    let out = out.replace('\n', " ");
    if s.chars().nth(300).is_some() {
        out + "..."
    } else {
        out
    }
}
