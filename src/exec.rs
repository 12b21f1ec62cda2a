//! Running a compiled plan: tables in dependency order (the ready ones of each wave run at the
//! same time), each reused when its stored fingerprint matches, otherwise written to a
//! temporary folder and renamed into place.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use crate::cancel::{Cancel, INTERRUPTED_MSG};
use crate::compile::Plan;
use crate::engine::{self, Engine};
use crate::error::{Error, Result};
use crate::input;
use crate::stages::{Capability, RunCtx};
use crate::store::{Manifest, RunDir, RunInfo, SideTable, now, schema_info};
use crate::table::Table;

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Recompute these tables and everything downstream.
    pub force: Vec<String>,
    /// Run what sends no requests; for LLM stages, print what they would send.
    pub dry_run: bool,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    /// The run's stop signals (Ctrl-C and its grace period), handed to every stage.
    pub cancel: Cancel,
    /// Say nothing about the stages `until` leaves out (a target run's passes).
    pub quiet_until: bool,
}

/// A finished table, and whether it was reused rather than computed.
type Finished = (Table, bool);

/// What happened to each table.
#[derive(Debug, Default)]
pub struct RunReport {
    pub computed: Vec<String>,
    pub reused: Vec<String>,
}

pub fn run(plan: &Plan, dir: &RunDir, engine: &Engine, opts: &RunOptions) -> Result<RunReport> {
    let _lock = dir.lock()?;
    run_locked(plan, dir, engine, opts)
}

/// [`run`] for a caller that holds the run directory's lock already (a target run holds it
/// across all of its passes).
pub fn run_locked(
    plan: &Plan,
    dir: &RunDir,
    engine: &Engine,
    opts: &RunOptions,
) -> Result<RunReport> {
    dir.clean_temporaries();
    // A stage named on the command line must exist (with a "did you mean").
    let named = opts.force.iter().map(|f| ("--force", f));
    for (flag, id) in named.chain(opts.until.iter().map(|u| ("--until", u))) {
        if !plan.order.contains(id) {
            return Err(Error::usage(format!(
                "{flag} {id}: the pipeline has no stage or input `{id}`{}",
                crate::error::did_you_mean(id, plan.order.iter().map(String::as_str))
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default()
            )));
        }
    }
    let forced: BTreeSet<String> = opts
        .force
        .iter()
        .flat_map(|f| plan.descendants(f))
        .collect();
    let mut info = RunInfo {
        pipeline: plan.pipeline.name.clone(),
        pipeline_file: plan.pipeline.file.display().to_string(),
        status: "running".into(),
        params: plan.pipeline.params.clone(),
        started_at: now(),
        finished_at: None,
        stages: plan.order.clone(),
        error: None,
    };
    dir.write_info(&info)?;

    let mut done: HashMap<String, Table> = HashMap::new();
    let mut report = RunReport::default();
    let mut partial = false;
    let mut pending: Vec<String> = match &opts.until {
        Some(u) => {
            let keep = plan.ancestors(u);
            let (kept, left): (Vec<String>, Vec<String>) =
                plan.order.iter().cloned().partition(|id| keep.contains(id));
            if !left.is_empty() && !opts.quiet_until {
                // Their tables from an earlier run (if any) stay queryable, and may no longer
                // match the stages run now: run.json says the run is partial.
                eprintln!(
                    "  (--until {u}) not run: {}; tables of theirs from an earlier run stay as they were",
                    left.join(", ")
                );
            }
            partial = !left.is_empty();
            kept
        }
        None => plan.order.clone(),
    };
    let mut failure: Option<Error> = None;
    while !pending.is_empty() && failure.is_none() {
        let (ready, rest): (Vec<String>, Vec<String>) = pending.into_iter().partition(|id| {
            plan.deps
                .get(id)
                .is_none_or(|ds| ds.iter().all(|d| done.contains_key(d)))
        });
        pending = rest;
        if ready.is_empty() {
            if opts.dry_run {
                eprintln!(
                    "  (dry run) not reached, downstream of a stage that sends requests: {}",
                    pending.join(", ")
                );
                break;
            }
            return Err(Error::Internal(
                "no stage is ready; the plan has a cycle".into(),
            ));
        }
        let inputs: Vec<Table> = plan
            .pipeline
            .inputs
            .iter()
            .filter_map(|i| done.get(&i.id).cloned())
            .collect();
        let shared = Shared {
            plan,
            dir,
            engine,
            cancel: &opts.cancel,
        };
        let results: Vec<(String, Result<Option<Finished>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ready
                .iter()
                .map(|id| {
                    let done = &done;
                    let inputs = inputs.clone();
                    let forced = forced.contains(id);
                    (
                        id.clone(),
                        s.spawn(move || {
                            if opts.dry_run
                                && let Some(r) = dry_run_one(shared, id, done, inputs.clone())
                            {
                                return r.map(|_| None);
                            }
                            run_one(shared, id, done, inputs, forced).map(Some)
                        }),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(id, h)| {
                    (
                        id,
                        h.join().unwrap_or_else(|_| {
                            Err(Error::Internal("stage thread panicked".into()))
                        }),
                    )
                })
                .collect()
        });
        for (id, r) in results {
            match r {
                Ok(None) => {}
                Ok(Some((t, reused))) => {
                    if reused {
                        report.reused.push(id.clone());
                    } else {
                        report.computed.push(id.clone());
                    }
                    done.insert(id, t);
                }
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(e);
                    }
                }
            }
        }
        // Ctrl-C during a stage that still finished (its requests came back within the grace
        // period): the run stops here all the same; the rest is for the rerun.
        if failure.is_none() && !pending.is_empty() && opts.cancel.is_interrupted() {
            failure = Some(Error::usage(format!(
                "{} (not started: {})",
                INTERRUPTED_MSG,
                pending.join(", ")
            )));
        }
    }
    info.finished_at = Some(now());
    match failure {
        Some(e) => {
            info.status = "failed".into();
            info.error = Some(e.to_string());
            dir.write_info(&info)?;
            Err(e)
        }
        None => {
            info.status = match &opts.until {
                Some(u) if partial => format!("partial (--until {u})"),
                _ => "finished".into(),
            };
            dir.write_info(&info)?;
            Ok(report)
        }
    }
}

/// What the stages of a run share.
#[derive(Clone, Copy)]
struct Shared<'a> {
    plan: &'a Plan,
    dir: &'a RunDir,
    engine: &'a Engine,
    cancel: &'a Cancel,
}

/// A dry run of one stage: `None` when the kind sends nothing (it then runs normally).
fn dry_run_one(
    Shared {
        plan,
        dir,
        engine,
        cancel,
    }: Shared,
    id: &str,
    done: &HashMap<String, Table>,
    inputs: Vec<Table>,
) -> Option<Result<()>> {
    let s = plan.pipeline.stage(id)?;
    if !crate::registry::kind_can(&s.kind, Capability::SendsRequests) {
        return None;
    }
    let deps = plan.deps.get(id).cloned().unwrap_or_default();
    let parents: Vec<Table> = deps.iter().map(|d| done[d].clone()).collect();
    let tmp = dir
        .stages()
        .join(format!(".dry-{id}-{}", std::process::id()));
    let ctx = RunCtx {
        id,
        parents,
        schema: plan.schemas[id].clone(),
        out: &tmp,
        engine,
        inputs,
        run_dir: &dir.path,
        cancel,
    };
    let report = s.stage.dry_run(&ctx);
    Some(report.map(|text| eprintln!("  {id} ({}) dry run:\n{text}", s.kind)))
}

fn table_of(dir: &RunDir, id: &str, m: &Manifest) -> Result<Table> {
    let sd = dir.stage_dir(id);
    let files: Vec<PathBuf> = m.parts.iter().map(|p| sd.join(p)).collect();
    let schema = engine::parquet_schema(&files[0])?;
    Ok(Table {
        id: id.to_string(),
        files,
        schema,
    })
}

fn run_one(
    Shared {
        plan,
        dir,
        engine,
        cancel,
    }: Shared,
    id: &str,
    done: &HashMap<String, Table>,
    inputs: Vec<Table>,
    forced: bool,
) -> Result<(Table, bool)> {
    let fp = plan.fingerprints.get(id).cloned().unwrap_or_default();
    let stage = plan.pipeline.stage(id);
    let kind = stage.map_or("input", |s| s.kind.as_str());
    if !forced
        && let Some(m) = dir.manifest(id)
        && m.fingerprint == fp
        && stage.is_none_or(|s| {
            s.stage
                .external_outputs(&dir.path)
                .iter()
                .all(|p| p.exists())
        })
    {
        eprintln!("  {id} ({kind}): reused, {} rows", m.rows);
        return Ok((table_of(dir, id, &m)?, true));
    }
    let started = Instant::now();
    let tmp = dir
        .stages()
        .join(format!(".tmp-{id}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let deps = plan.deps.get(id).cloned().unwrap_or_default();
    let schema = plan.schemas[id].clone();
    let mut counters = Default::default();
    let rows_in: u64;
    let result = if let Some(scan) = plan.scans.get(id) {
        let def = plan.pipeline.input(id).expect("input exists");
        rows_in = scan.rows;
        input::materialize(def, scan, &tmp)
            .map(|_| ())
            .map_err(|e| Error::stage(id, e.message))
    } else {
        let s = stage.expect("stage exists");
        let parents: Vec<Table> = deps.iter().map(|d| done[d].clone()).collect();
        rows_in = parents
            .iter()
            .map(|t| engine::count_rows(&t.files).unwrap_or(0))
            .sum();
        let ctx = RunCtx {
            id,
            parents,
            schema: schema.clone(),
            out: &tmp,
            engine,
            inputs,
            run_dir: &dir.path,
            cancel,
        };
        s.stage
            .run(&ctx)
            .map(|o| counters = o.counters)
            .map_err(|e| match e {
                Error::Stage { .. } => e,
                other => Error::stage(id, other),
            })
    };
    if let Err(e) = result {
        remove_tmp(&tmp);
        return Err(e);
    }
    let finish = || -> Result<Manifest> {
        let parts = engine::normalize_parts(&tmp, &schema)?;
        let rows = engine::count_rows(&parts)?;
        let bytes = parts
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let mut side_tables = Vec::new();
        for side in stage.map(|s| s.stage.side_tables()).unwrap_or(&[]) {
            let sd = tmp.join(side);
            let sparts = engine::list_parts(&sd)?;
            side_tables.push(SideTable {
                name: side.to_string(),
                rows: engine::count_rows(&sparts)?,
                parts: sparts
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect(),
            });
        }
        let actual = engine::parquet_schema(&parts[0])?;
        let m = Manifest {
            id: id.to_string(),
            kind: kind.to_string(),
            fingerprint: fp.clone(),
            parents: deps.clone(),
            parent_fingerprints: deps
                .iter()
                .map(|d| plan.fingerprints.get(d).cloned().unwrap_or_default())
                .collect(),
            schema: schema_info(&actual),
            rows,
            bytes,
            parts: parts
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect(),
            side_tables,
            counters,
            duration_ms: started.elapsed().as_millis() as u64,
            finished_at: now(),
        };
        // The manifest is written last: its presence is what marks the table complete.
        crate::store::write_atomic(
            &tmp.join("manifest.json"),
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )?;
        dir.commit_stage(id, &tmp)?;
        Ok(m)
    };
    match finish() {
        Ok(m) => {
            let extra: String = m
                .counters
                .iter()
                .map(|(k, v)| format!(", {k} {v}"))
                .collect();
            eprintln!(
                "  {id} ({kind}): {rows_in} rows in -> {} rows out{extra} ({:.2} s)",
                m.rows,
                started.elapsed().as_secs_f64()
            );
            Ok((table_of(dir, id, &m)?, false))
        }
        Err(e) => {
            remove_tmp(&tmp);
            Err(Error::stage(id, e))
        }
    }
}

/// Temporary folders of failed stages, removed once more by [`sweep_abandoned`].
static ABANDONED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Remove a failed stage's temporary folder. A query engine's writer tasks (DataFusion writes
/// through blocking tasks that create missing parent folders) can still be closing files after
/// the error surfaced and may bring the folder back, so the path is also remembered for
/// [`sweep_abandoned`], which the command line calls after the async runtime has shut down.
fn remove_tmp(tmp: &std::path::Path) {
    let _ = std::fs::remove_dir_all(tmp);
    if let Ok(mut a) = ABANDONED.lock() {
        a.push(tmp.to_path_buf());
    }
}

/// Remove the temporary folders of this process's failed stages for good. Call it when no
/// task can write any more (after the runtime's shutdown).
pub fn sweep_abandoned() {
    let paths = ABANDONED.lock().map(|mut a| std::mem::take(&mut *a));
    for p in paths.unwrap_or_default() {
        let _ = std::fs::remove_dir_all(&p);
    }
}
