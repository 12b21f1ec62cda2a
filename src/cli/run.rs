use std::time::Instant;

use crate::cancel::Cancel;
use crate::engine::Engine;
use crate::error::Result;
use crate::exec::{self, RunOptions};
use crate::registry::kind_can;
use crate::stages::Capability;

#[derive(Debug, clap::Args)]
#[command(after_long_help = TARGET_HELP)]
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
    /// Run until stage TABLE has N rows: passes on growing prefixes of the input (see below).
    #[arg(long, value_name = "TABLE=N")]
    pub target: Option<String>,
    /// A target run's request budget: no pass starts that is projected to send more
    /// requests in all (cache hits are free).
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// The input a target run takes in growing prefixes (repeatable); needed only when the
    /// target table is computed from several inputs.
    #[arg(long, value_name = "INPUT")]
    pub target_input: Vec<String>,
}

const TARGET_HELP: &str = "\
Target runs (--target TABLE=N [--max-requests M] [--target-input INPUT]):
  The run takes the first n rows of the input (a prefix, so the response cache makes every
  earlier slice free) and runs the whole pipeline on them. The first pass takes N/10 rows;
  each next one grows n by the rows the yield seen so far (TABLE rows per input row) says are
  missing, plus a margin of two standard deviations, at most x4 per pass. A pass that reaches
  N is followed by a search back (all cached) for the smallest prefix whose TABLE has N rows
  or more; the run ends with a pass on it (passes before it run only TABLE and the stages
  it is computed from, the final one everything). Every table is then exactly what the pipeline
  computes from the rows taken: TABLE has N rows when no input row gives more than one of its
  rows, else at most that many minus one over N. It also stops when the input is exhausted,
  or when the next pass is projected to pass --max-requests (requests sent to servers,
  counted after the first pass). The passes are recorded in <run>/target.json: the same
  command resumes a killed run, and a higher N or budget goes on from the recorded passes.";

fn parse_grace(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..1e9).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds (0 or more)")),
    }
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let started = Instant::now();
    let mut plan = a.pipeline.compile(engine)?;
    let mut conflicts = Vec::new();
    for (given, flag) in [
        (a.dry_run, "--dry-run"),
        (a.until.is_some(), "--until"),
        (!a.retry_failed.is_empty(), "--retry-failed"),
        (!a.force.is_empty(), "--force"),
    ] {
        if given {
            conflicts.push(flag);
        }
    }
    let target = crate::target::check(
        &plan,
        &crate::target::TargetArgs {
            target: a.target.clone(),
            max_requests: a.max_requests,
            inputs: a.target_input.clone(),
            conflicts,
        },
    )?;
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
        ..Default::default()
    };
    let report = match &target {
        Some(t) => crate::target::run(&mut plan, &dir, &engine, &opts, t)?,
        None => exec::run(&plan, &dir, &engine, &opts)?,
    };
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
