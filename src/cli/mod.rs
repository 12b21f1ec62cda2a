//! Command-line verbs, one file each; every verb has its args struct and a `run()`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::compile::{self, Plan};
use crate::engine::Engine;
use crate::error::{Error, Result};

mod batch;
mod cache;
mod graph;
mod report;
mod run;
mod runs;
mod schema;
mod sim;
mod sql;
mod stats;
mod validate;

#[derive(Debug, Parser)]
#[command(
    name = "ifloom",
    version,
    about = "Build instruction-following training data with declarative pipelines"
)]
pub struct Cli {
    /// Debug logs on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a pipeline file completely without running anything.
    Validate(validate::Args),
    /// Run a pipeline; finished stages whose inputs and config did not change are reused.
    Run(run::Args),
    /// Query a run's tables with SQL.
    Sql(sql::Args),
    /// Print a pipeline's stage graph.
    Graph(graph::Args),
    /// List runs and their stages.
    Runs(runs::Args),
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// Inspect or prune the LLM response cache.
    Cache(cache::Args),
    /// Offline batch mode: export uncached LLM requests, import batch results.
    Batch(batch::Args),
    /// Serve a simulated OpenAI-compatible LLM server (latency, queueing, faults) for tests.
    Sim(sim::Args),
    /// Funnel, LLM accounting, pass rates and dataset statistics of a run (or two, compared).
    Stats(stats::Args),
    /// Write a self-contained HTML report (charts, figures, sample rows) of a run.
    Report(report::Args),
}

pub fn main(cli: Cli) -> Result<ExitCode> {
    if cli.verbose {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the async runtime: {e}")))?;
    let engine = Engine::new(rt.handle().clone(), crate::registry::functions());
    let result = match cli.command {
        Command::Validate(a) => validate::run(a, &engine),
        Command::Run(a) => run::run(a, &engine),
        Command::Sql(a) => sql::run(a, &engine),
        Command::Graph(a) => graph::run(a, &engine),
        Command::Runs(a) => runs::run(a),
        Command::Schema => schema::run(),
        Command::Cache(a) => cache::run(a),
        Command::Batch(a) => batch::run(a, &engine),
        Command::Sim(a) => sim::run(a, &engine),
        Command::Stats(a) => stats::run(a, &engine),
        Command::Report(a) => report::run(a, &engine),
    };
    // Writer tasks of a failed stage may still be finishing: wait for them (bounded), then
    // remove what they left in the failed stages' temporary folders.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    crate::exec::sweep_abandoned();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Error::Invalid(d)) => {
            eprintln!("{d}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e),
    }
}

/// The pipeline a verb works on and how its file is read, flattened into every verb that
/// takes one (`validate`, `graph`, `run`, `batch`).
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// Override a param: key=value (repeatable).
    #[arg(long = "set", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
    /// Apply a named param profile from the pipeline's `profiles:` (before any --set).
    #[arg(long)]
    pub profile: Option<String>,
}

impl PipelineArgs {
    /// Load and check the pipeline completely (every problem reported together).
    pub fn compile(&self, engine: &Engine) -> Result<Plan> {
        compile_file(&self.file, &with_profile(&self.set, &self.profile), engine)
    }
}

/// Where a pipeline's run keeps its tables and its responses (`run`, `batch`).
#[derive(Debug, Clone, clap::Args)]
pub struct RunPlaceArgs {
    /// Where the run's tables go (default: runs/<pipeline name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// The LLM response cache (default: $IFLOOM_CACHE, else ~/.cache/ifloom/llm-cache.sqlite).
    #[arg(long)]
    pub cache: Option<PathBuf>,
}

impl RunPlaceArgs {
    pub fn run_dir(&self, plan: &Plan) -> crate::store::RunDir {
        crate::store::RunDir::new(
            self.run_dir
                .clone()
                .unwrap_or_else(|| default_run_dir(&plan.pipeline.name)),
        )
    }

    /// The engine with this run's cache.
    pub fn engine(&self, engine: &Engine) -> Engine {
        let mut engine = engine.clone();
        if let Some(c) = &self.cache {
            engine.cache_path = Some(c.clone());
        }
        engine
    }
}

/// Parse `key=value` for `--set`.
pub fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got `{s}`"))
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Compile a pipeline file, turning diagnostics into [`Error::Invalid`].
/// Warnings go to stderr.
pub fn compile_file(file: &Path, set: &[(String, String)], engine: &Engine) -> Result<Plan> {
    let plan = compile::compile(file, set, &env_lookup, engine).map_err(Error::Invalid)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    Ok(plan)
}

/// `runs/<pipeline name>` unless given.
pub fn default_run_dir(name: &str) -> PathBuf {
    PathBuf::from("runs").join(name)
}

/// `--set` overrides with a `--profile` in front: the pipeline loader applies the profile's
/// params first, so an explicit `--set` still wins.
pub fn with_profile(set: &[(String, String)], profile: &Option<String>) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(set.len() + 1);
    if let Some(p) = profile {
        out.push((crate::spec::PROFILE_KEY.to_string(), p.clone()));
    }
    out.extend(set.iter().cloned());
    out
}
