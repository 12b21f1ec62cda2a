use std::time::Instant;

use crate::cancel::Cancel;
use crate::engine::Engine;
use crate::error::Result;
use crate::exec::{self, RunOptions};
use crate::stages::{Capability, kind_can};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    #[command(flatten)]
    pub place: super::RunPlaceArgs,
    /// Recompute this stage and everything downstream (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// DataFusion memory limit in MiB (sorts and joins spill to disk beyond it).
    #[arg(long, default_value_t = 2048)]
    pub memory_mb: usize,
    /// Send nothing: run the stages that need no LLM, and for each LLM stage show a few
    /// rendered prompts, the request count, approximate prompt tokens and what is cached.
    #[arg(long)]
    pub dry_run: bool,
    /// Re-send the requests of an LLM stage's dead-lettered rows (`<id>__failed`); its
    /// other responses come from the cache.
    #[arg(long)]
    pub retry_failed: Vec<String>,
    /// Run only this stage and the stages it is computed from (e.g. up to the input of an LLM
    /// stage whose requests go through `batch export` instead).
    #[arg(long)]
    pub until: Option<String>,
    /// After Ctrl-C, how long requests in flight may finish (into the cache) before they are
    /// abandoned; abandoned requests are sent again when the run resumes.
    #[arg(long, default_value_t = 30.0, value_parser = parse_grace)]
    pub grace_s: f64,
}

fn parse_grace(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds (0 or more)")),
    }
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let started = Instant::now();
    let plan = a.pipeline.compile(engine)?;
    let dir = a.place.run_dir(&plan);
    let mut engine = a.place.engine(engine);
    engine.memory_limit = a.memory_mb << 20;
    engine.spill_dir = Some(dir.path.join("spill"));
    eprintln!(
        "ifloom: running {} into {}",
        plan.pipeline.name,
        dir.path.display()
    );
    // Ctrl-C: stop sending, let requests in flight finish into the cache for `grace_s`, then
    // abandon the rest; the stage then stops, the cache is flushed, and the exit is non-zero.
    // A second Ctrl-C exits at once (the cache then loses at most its last 50 ms).
    let grace = std::time::Duration::from_secs_f64(a.grace_s);
    let cancel = Cancel::new();
    let signals = cancel.clone();
    engine.rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            signals.interrupt();
            eprintln!(
                "ifloom: interrupted; finishing requests in flight for up to {:.0} s (Ctrl-C again to quit now)",
                grace.as_secs_f64()
            );
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    if r.is_ok() {
                        std::process::exit(130);
                    }
                }
                _ = tokio::time::sleep(grace) => {
                    eprintln!("ifloom: grace period over; abandoning requests still in flight (Ctrl-C again to quit now)");
                    signals.abandon();
                    // Tokio keeps the SIGINT handler for the life of the process: without
                    // this, a further Ctrl-C would do nothing.
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            }
        }
    });
    let mut force = a.force;
    for s in a.retry_failed {
        match plan.pipeline.stage(&s) {
            Some(st) if kind_can(&st.kind, Capability::RetriesFailed) => force.push(s),
            _ => {
                return Err(crate::error::Error::usage(format!(
                    "--retry-failed {s}: not a stage of this pipeline that dead-letters failed rows (an llm stage)"
                )));
            }
        }
    }
    let opts = RunOptions {
        force,
        dry_run: a.dry_run,
        until: a.until.clone(),
        cancel,
    };
    let report = exec::run(&plan, &dir, &engine, &opts)?;
    // Dead-lettered samples are easy to miss in a stage's counters: say where they are and
    // how to send them again.
    for id in &report.computed {
        if let Some(m) = dir.manifest(id)
            && kind_can(&m.kind, Capability::RetriesFailed)
            && let Some(&n) = m.counters.get("failures")
            && n > 0
        {
            // The command as given (its --set, --run-dir, --cache ...), plus --retry-failed.
            let mut cmd: Vec<String> = std::env::args()
                .skip(1)
                .map(|a| super::batch::shell_quote(&a))
                .collect();
            if !cmd
                .windows(2)
                .any(|w| w[0] == "--retry-failed" && w[1] == *id)
            {
                cmd.extend(["--retry-failed".to_string(), super::batch::shell_quote(id)]);
            }
            eprintln!(
                "ifloom: {id}: {n} sample(s) failed and are in `{id}__failed` (reason, raw); `ifloom {}` sends the failed requests again",
                cmd.join(" ")
            );
        }
    }
    eprintln!(
        "ifloom: done in {:.2} s ({} computed, {} reused); query it with: ifloom sql --run {} \"SELECT ...\"",
        started.elapsed().as_secs_f64(),
        report.computed.len(),
        report.reused.len(),
        dir.path.display()
    );
    Ok(())
}
