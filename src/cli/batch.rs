//! Offline batch mode for vLLM's `run-batch` (and the OpenAI Batch API): export every
//! uncached request of an LLM stage in the batch format, run it elsewhere, import the results
//! into the cache; the next `ifloom run` then completes the stage without network calls.

use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::exec::{self, RunOptions};
use crate::llm::cache::{Cache, CachedResponse};
use crate::llm::{self, client};
use crate::stages::dedup::read_batches;
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// The pipeline file.
    pub file: PathBuf,
    /// The LLM stage.
    #[arg(long)]
    pub stage: String,
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long = "set", value_parser = super::parse_kv)]
    pub set: Vec<(String, String)>,
    /// Apply a named param profile from the pipeline's `profiles:` (before any --set).
    #[arg(long)]
    pub profile: Option<String>,
    /// The response cache (default: $IFLOOM_CACHE, else ~/.cache/ifloom/llm-cache.sqlite).
    #[arg(long)]
    pub cache: Option<PathBuf>,
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
    let plan = super::compile_file(&c.file, &super::with_profile(&c.set, &c.profile), engine)?;
    let Some(stage) = plan.pipeline.stage(&c.stage) else {
        return Err(Error::usage(format!(
            "the pipeline has no stage `{}`",
            c.stage
        )));
    };
    if stage.stage.llm().is_none() {
        return Err(Error::usage(format!(
            "stage `{}` is a {} stage, not llm",
            c.stage, stage.kind
        )));
    }
    let dir = RunDir::new(
        c.run_dir
            .clone()
            .unwrap_or_else(|| super::default_run_dir(&plan.pipeline.name)),
    );
    let mut engine = engine.clone();
    if let Some(p) = &c.cache {
        engine.cache_path = p.clone();
    }
    Ok((plan, dir, engine))
}

/// The llm stage named on the command line (`setup` checked that it is one).
fn llm_stage<'p>(c: &Common, plan: &'p crate::compile::Plan) -> &'p llm::LlmStage {
    plan.pipeline
        .stage(&c.stage)
        .and_then(|d| d.stage.llm())
        .expect("checked by setup")
}

/// The stage's requests (id, canonical request), from its input rows: what `export` writes
/// and the ids `import` accepts.
fn stage_requests(
    c: &Common,
    plan: &crate::compile::Plan,
    dir: &RunDir,
    engine: &Engine,
) -> Result<Vec<(String, llm::request::Canonical)>> {
    // Materialize what needs no LLM (the stage's inputs, if they do not depend on one).
    exec::run(
        plan,
        dir,
        engine,
        &RunOptions {
            force: vec![],
            dry_run: true,
        },
    )?;
    let def = plan.pipeline.stage(&c.stage).expect("checked");
    let st = llm_stage(c, plan);
    let parent = &def.from[0].0;
    let Some(m) = dir.manifest(parent) else {
        return Err(Error::usage(format!(
            "the input of `{}` (`{parent}`) is not computed yet: it depends on another LLM stage; run the pipeline up to it first",
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
        rows.extend(llm::batch_rows(&b?)?);
    }
    llm::plan_requests(st, &rows)
}

fn export(c: Common, out: PathBuf, engine: &Engine) -> Result<()> {
    let (plan, dir, engine) = setup(&c, engine)?;
    let reqs = stage_requests(&c, &plan, &dir, &engine)?;
    let st = llm_stage(&c, &plan);
    let ids: Vec<String> = reqs.iter().map(|(id, _)| id.clone()).collect();
    let cached = Cache::open(&engine.cache_path)?.get_many(&ids)?;
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
        "wrote {n} requests to {} ({} already cached); run them with vLLM's run-batch, then: ifloom batch import {} --stage {} RESULTS.jsonl",
        out.display(),
        cached.len(),
        c.file.display(),
        c.stage
    );
    Ok(())
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
    let cache = Cache::open(&engine.cache_path)?;
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
        let status = v["response"]["status_code"].as_u64().unwrap_or(0);
        let body = serde_json::to_vec(&v["response"]["body"])?;
        let comp = match (status, client::parse_completion(&body, 1)) {
            (200, Ok(comp)) => comp,
            (_, r) => {
                let why = match r {
                    Err(e) => e,
                    Ok(_) => format!("status {status}"),
                };
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
                logprobs: crate::llm::kept_logprobs(st.wants_logprobs(), ch.logprobs),
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
        engine.cache_path.display(),
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
