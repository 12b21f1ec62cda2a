//! Runs that stop at a target (`ifloom run FILE --target TABLE=N [--max-requests M]`).
//!
//! A target run takes the first `n` rows of the pipeline's source input(s) (a deterministic
//! prefix, so the response cache makes every earlier slice free), runs the whole pipeline on
//! them, reads the target table's row count, and grows `n` from the yield it observed (target
//! rows per input row) until the table has N rows, the input is exhausted or the request
//! budget would be exceeded. When a pass overshoots, it searches back (every request of a
//! smaller prefix is cached) for the smallest prefix whose table has N rows or more, and the
//! run ends with a pass on that prefix: every table is exactly what the pipeline computes
//! from the rows taken, nothing is cut afterwards.
//!
//! The passes are recorded in `<run>/target.json` (prefix, rows taken, target rows, requests
//! sent). The next prefix depends only on those facts, so a killed target run, started again
//! with the same command, goes on from the pass it was in and ends with the tables an
//! uninterrupted run ends with.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::cancel::INTERRUPTED_MSG;
use crate::compile::{Plan, hash_json};
use crate::engine::Engine;
use crate::error::{Error, Result, did_you_mean};
use crate::exec::{self, RunOptions, RunReport};
use crate::registry::kind_can;
use crate::stages::Capability;
use crate::store::{RunDir, write_atomic};

/// Growth per pass is capped at this factor (an early yield estimate can be far off).
const MAX_GROWTH: u64 = 4;
/// The first pass takes this fraction of the target's row count as input rows (a probe that
/// measures the yield; at a yield of 1 it is a tenth of the work).
const FIRST_PASS_DIVISOR: u64 = 10;

/// A checked target: the table, its row count, the budget and the inputs taken in prefixes.
#[derive(Debug, Clone)]
pub struct Target {
    pub table: String,
    pub rows: u64,
    pub max_requests: Option<u64>,
    pub inputs: Vec<String>,
}

/// What the command line asked for, before it is checked against the pipeline.
#[derive(Debug, Default, Clone)]
pub struct TargetArgs {
    /// `TABLE=N`.
    pub target: Option<String>,
    pub max_requests: Option<u64>,
    pub inputs: Vec<String>,
    /// Other flags given with `--target` that a target run does not combine with.
    pub conflicts: Vec<&'static str>,
}

/// One problem with the target flags, in the house style of diagnostics.
struct Problem {
    message: String,
    hint: Option<String>,
}

fn problems_error(ps: Vec<Problem>) -> Error {
    let n = ps.len();
    let mut s = String::new();
    for (i, p) in ps.iter().enumerate() {
        // The first line's `error: ` is the one every command-line error gets.
        if i > 0 {
            s.push_str("\nerror: ");
        }
        s.push_str(&p.message);
        if let Some(h) = &p.hint {
            s.push_str(&format!("\n  hint: {h}"));
        }
    }
    s.push_str(&format!(
        "\n{n} error{} found; nothing was run",
        if n == 1 { "" } else { "s" }
    ));
    Error::usage(s)
}

/// `20000`, `20_000` or `20,000`.
fn parse_count(s: &str) -> Option<i128> {
    let t: String = s
        .trim()
        .chars()
        .filter(|c| *c != '_' && *c != ',')
        .collect();
    t.parse::<i128>().ok()
}

/// Check the target flags against the plan; every problem is reported together.
/// `Ok(None)`: no target run was asked for.
pub fn check(plan: &Plan, a: &TargetArgs) -> Result<Option<Target>> {
    let mut ps: Vec<Problem> = Vec::new();
    let Some(spec) = &a.target else {
        if a.max_requests.is_some() {
            ps.push(Problem {
                message: "--max-requests is the budget of a target run".into(),
                hint: Some("add --target TABLE=N (e.g. --target sft_clean=20000)".into()),
            });
        }
        if !a.inputs.is_empty() {
            ps.push(Problem {
                message: "--target-input names the input a target run takes in prefixes".into(),
                hint: Some("add --target TABLE=N".into()),
            });
        }
        return if ps.is_empty() {
            Ok(None)
        } else {
            Err(problems_error(ps))
        };
    };
    for flag in &a.conflicts {
        ps.push(Problem {
            message: format!("--target cannot be combined with {flag}"),
            hint: Some(format!(
                "run the target run first, then `ifloom run` with {flag} and the same --run-dir"
            )),
        });
    }
    let ids: Vec<&str> = plan.order.iter().map(String::as_str).collect();
    let (table, rows) = match spec.split_once('=') {
        Some((t, n)) => (t.trim().to_string(), Some(n)),
        None => (spec.trim().to_string(), None),
    };
    let rows = match rows.map(parse_count) {
        None => {
            ps.push(Problem {
                message: format!("--target {spec}: expected TABLE=N"),
                hint: Some("e.g. --target sft_clean=20000 (rows of that table)".into()),
            });
            None
        }
        Some(None) => {
            ps.push(Problem {
                message: format!(
                    "--target {spec}: `{}` is not a row count",
                    rows.unwrap_or("")
                ),
                hint: Some("N is a whole number of rows, e.g. 20000".into()),
            });
            None
        }
        Some(Some(n)) if n <= 0 => {
            ps.push(Problem {
                message: format!("--target {spec}: the row count must be at least 1, not {n}"),
                hint: None,
            });
            None
        }
        Some(Some(n)) => Some(u64::try_from(n).unwrap_or(u64::MAX)),
    };
    if a.max_requests == Some(0) {
        ps.push(Problem {
            message: "--max-requests 0: the budget must allow at least one request".into(),
            hint: Some("leave it out for no budget".into()),
        });
    }
    let known = ids.contains(&table.as_str());
    if !known {
        ps.push(Problem {
            message: format!("--target {spec}: the pipeline has no stage `{table}`"),
            hint: did_you_mean(&table, ids.iter().copied())
                .or_else(|| Some(format!("its stages: {}", stage_ids(plan).join(", ")))),
        });
    } else if plan.is_input(&table) {
        ps.push(Problem {
            message: format!("--target {spec}: `{table}` is an input, not a stage"),
            hint: Some(format!(
                "name a stage computed from it (its `limit: {}` takes the first rows of an input)",
                rows.unwrap_or(1)
            )),
        });
    }
    // The inputs taken in prefixes: named, or the one the target is computed from.
    let sources: Vec<String> = if known {
        plan.ancestors(&table)
            .into_iter()
            .filter(|id| plan.is_input(id))
            .collect()
    } else {
        Vec::new()
    };
    let mut inputs = Vec::new();
    for i in &a.inputs {
        if !plan.is_input(i) {
            let names: Vec<&str> = plan.pipeline.inputs.iter().map(|i| i.id.as_str()).collect();
            ps.push(Problem {
                message: format!("--target-input {i}: the pipeline has no input `{i}`"),
                hint: did_you_mean(i, names.iter().copied())
                    .or_else(|| Some(format!("its inputs: {}", names.join(", ")))),
            });
        } else if known && !sources.contains(i) {
            ps.push(Problem {
                message: format!("--target-input {i}: `{table}` is not computed from `{i}`"),
                hint: Some(format!("`{table}` reads the inputs {}", sources.join(", "))),
            });
        } else if !inputs.contains(i) {
            inputs.push(i.clone());
        }
    }
    if a.inputs.is_empty() && known && !plan.is_input(&table) {
        match sources.len() {
            1 => inputs = sources.clone(),
            _ => ps.push(Problem {
                message: format!(
                    "--target {spec}: `{table}` is computed from several inputs ({}); which one is taken in growing prefixes?",
                    sources.join(", ")
                ),
                hint: Some(format!(
                    "add --target-input {} (repeatable; reference tables such as a benchmark stay whole)",
                    sources[0]
                )),
            }),
        }
    }
    if !ps.is_empty() {
        return Err(problems_error(ps));
    }
    Ok(Some(Target {
        table,
        rows: rows.unwrap_or(1),
        max_requests: a.max_requests,
        inputs,
    }))
}

fn stage_ids(plan: &Plan) -> Vec<&str> {
    plan.order
        .iter()
        .filter(|id| !plan.is_input(id))
        .map(String::as_str)
        .collect()
}

/// One finished pass of a target run: the facts the next prefix is chosen from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pass {
    /// The prefix asked for (rows of each sliced input).
    pub prefix: u64,
    /// Rows actually taken: the largest sliced input's row count (below `prefix` once the
    /// input is exhausted).
    pub taken: u64,
    /// Rows of the target table.
    pub target_rows: u64,
    /// Requests sent to servers in this pass (cache misses and retries, not cache hits).
    pub sent: u64,
}

/// Why a target run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The target table has N rows or more, on the smallest prefix found.
    Reached,
    /// Every input row is taken and the table has fewer than N rows.
    Exhausted,
    /// The next pass was projected to exceed the request budget.
    Budget,
}

/// What a target run does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run a pass on this prefix.
    Run(u64),
    /// Stop; the final tables are the ones of this prefix.
    Done(Stop, u64),
}

/// The next step from the passes so far (a pure function of them, so a resumed run decides
/// exactly as an uninterrupted one). `avail`: the most rows a sliced input can give.
pub fn next_step(passes: &[Pass], n: u64, avail: u64, budget: Option<u64>) -> Step {
    let avail = avail.max(1);
    if passes.is_empty() {
        return Step::Run(n.div_ceil(FIRST_PASS_DIVISOR).clamp(1, avail));
    }
    let sent: u64 = passes.iter().map(|p| p.sent).sum();
    let (lo, hi) = bracket(passes, n);
    let (lo_n, lo_t) = lo.map_or((0, 0), |p| (p.taken, p.target_rows));
    if let Some(h) = hi {
        let (hi_n, hi_t) = (h.taken, h.target_rows);
        if hi_n <= lo_n + 1 {
            return Step::Done(Stop::Reached, h.prefix);
        }
        // Search (lo_n, hi_n) for the smallest prefix that reaches N: interpolation, aimed
        // half a row below N so that near the boundary it lands on either side of it; a
        // bisection when the bracket holds 3 target rows or fewer (interpolation is a guess
        // there), or when the last three probes all moved the same end (interpolation
        // converging from one side), so that it ends in a few more than log2 steps however
        // uneven the yield.
        let width = hi_n - lo_n;
        let first_hi = passes.iter().position(|p| p.target_rows >= n).unwrap_or(0);
        let probes = &passes[first_hi + 1..];
        let one_sided = probes.len() >= 3
            && probes[probes.len() - 3..]
                .windows(2)
                .all(|w| (w[0].target_rows >= n) == (w[1].target_rows >= n));
        let p = if hi_t - lo_t > 3 && !one_sided {
            let rise = (hi_t - lo_t) as f64;
            lo_n + ((n as f64 - 0.5 - lo_t as f64) * width as f64 / rise).ceil() as u64
        } else {
            lo_n + width / 2
        };
        return Step::Run(p.clamp(lo_n + 1, hi_n - 1));
    }
    let cur = lo.expect("a pass below the target");
    if cur.taken < cur.prefix || cur.taken >= avail {
        return Step::Done(Stop::Exhausted, cur.prefix);
    }
    let n0 = cur.taken;
    let mut next = if cur.target_rows == 0 {
        n0.saturating_mul(MAX_GROWTH)
    } else {
        // The input rows that should give the missing rows at the yield seen so far, plus
        // two standard deviations of the count (≈ 2·√missing rows) so that the next pass
        // is unlikely to fall just short.
        let missing = (n - cur.target_rows) as f64;
        let yield_ = cur.target_rows as f64 / n0 as f64;
        n0 + ((missing + 2.0 * missing.sqrt()) / yield_).ceil() as u64
    };
    next = next
        .min(n0.saturating_mul(MAX_GROWTH))
        .min(avail)
        .max(n0 + 1);
    if let Some(b) = budget {
        if sent >= b {
            return Step::Done(Stop::Budget, cur.prefix);
        }
        let per_row = sent as f64 / n0 as f64;
        if per_row > 0.0 && sent as f64 + per_row * (next - n0) as f64 > b as f64 {
            let fits = ((b - sent) as f64 / per_row).floor() as u64;
            if fits == 0 {
                return Step::Done(Stop::Budget, cur.prefix);
            }
            next = n0 + fits;
        }
    }
    Step::Run(next)
}

/// The search bracket: the largest pass below the target that is smaller than every pass
/// reaching it, and the smallest pass reaching it (by rows taken).
fn bracket(passes: &[Pass], n: u64) -> (Option<&Pass>, Option<&Pass>) {
    let hi = passes
        .iter()
        .filter(|p| p.target_rows >= n)
        .min_by_key(|p| p.taken);
    let lo = passes
        .iter()
        .filter(|p| p.target_rows < n && hi.is_none_or(|h| p.taken < h.taken))
        .max_by_key(|p| p.taken);
    (lo, hi)
}

/// The requests a run reaching the target would send in all, at the rates seen so far:
/// `None` before any target row.
pub fn projected_requests(passes: &[Pass], n: u64) -> Option<u64> {
    let sent: u64 = passes.iter().map(|p| p.sent).sum();
    let cur = passes.iter().max_by_key(|p| p.taken)?;
    if cur.target_rows >= n {
        return Some(sent);
    }
    if cur.target_rows == 0 || cur.taken == 0 {
        return None;
    }
    let needed = cur.taken as f64 * n as f64 / cur.target_rows as f64;
    let per_row = sent as f64 / cur.taken as f64;
    Some(sent + (per_row * (needed - cur.taken as f64)).ceil() as u64)
}

/// `target.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// What the passes' facts are valid for: the target table, the sliced inputs and every
    /// table's fingerprint as written in the pipeline file. The row count and the budget are
    /// not in it: raising either goes on from the recorded passes.
    pub key: String,
    pub table: String,
    pub inputs: Vec<String>,
    pub rows: u64,
    pub max_requests: Option<u64>,
    pub passes: Vec<Pass>,
    /// `running`, or why it stopped.
    pub status: String,
    /// The prefix the final tables are computed from, once stopped.
    pub final_prefix: Option<u64>,
    /// Requests the final pass sent: those of the stages the target is not computed from,
    /// which only the final pass runs (not under the budget).
    #[serde(default)]
    pub final_sent: u64,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Run the plan as a target run (the caller has checked `t` with [`check`]).
pub fn run(
    plan: &mut Plan,
    dir: &RunDir,
    engine: &Engine,
    opts: &RunOptions,
    t: &Target,
) -> Result<RunReport> {
    let _lock = dir.lock()?;
    let written: HashMap<String, Option<u64>> = plan
        .pipeline
        .inputs
        .iter()
        .map(|i| (i.id.clone(), i.spec.limit))
        .collect();
    // The most rows a sliced input can give (its scan, its own limit and sample size).
    let avail = t
        .inputs
        .iter()
        .map(|id| {
            let def = plan.pipeline.input(id).expect("checked");
            let mut rows = plan.scans[id].rows;
            if let Some(l) = def.spec.limit {
                rows = rows.min(l);
            }
            if let Some(k) = def.spec.sample.as_ref().and_then(|s| s.n) {
                rows = rows.min(k);
            }
            rows
        })
        .max()
        .unwrap_or(0);
    let fps: BTreeMap<&String, &String> = plan.fingerprints.iter().collect();
    let key = hash_json(&serde_json::json!({
        "table": t.table,
        "inputs": t.inputs,
        "fingerprints": fps,
    }));
    let path = dir.path.join("target.json");
    let mut state = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str::<State>(&s).ok())
        .filter(|s| s.key == key)
        .map(|mut s| {
            s.rows = t.rows;
            s.max_requests = t.max_requests;
            s.status = "running".into();
            s.final_prefix = None;
            s
        })
        .unwrap_or_else(|| State {
            key: key.clone(),
            table: t.table.clone(),
            inputs: t.inputs.clone(),
            rows: t.rows,
            max_requests: t.max_requests,
            passes: Vec::new(),
            status: "running".into(),
            final_prefix: None,
            final_sent: 0,
        });
    if !state.passes.is_empty() {
        eprintln!(
            "ifloom: target run resumed after {} recorded pass(es), {} requests sent so far",
            state.passes.len(),
            thousands(state.passes.iter().map(|p| p.sent).sum())
        );
    }
    let save = |s: &State| -> Result<()> {
        write_atomic(&path, serde_json::to_string_pretty(s)?.as_bytes())
    };
    loop {
        match next_step(&state.passes, t.rows, avail, t.max_requests) {
            Step::Run(n) => {
                save(&state)?;
                eprintln!(
                    "ifloom: target pass {}: the first {} rows of {}",
                    state.passes.len() + 1,
                    thousands(n),
                    t.inputs.join(", ")
                );
                let report = pass(plan, dir, engine, opts, t, &written, n, false)?;
                let facts = facts(dir, t, n, &report)?;
                state.passes.push(facts);
                save(&state)?;
                eprintln!("{}", progress(&state.passes, t, avail));
                if opts.cancel.is_interrupted() {
                    return Err(Error::usage(INTERRUPTED_MSG));
                }
            }
            Step::Done(stop, n) => {
                // The final pass runs the whole pipeline (the tables of the target's
                // ancestors are reused when the last pass was on the same prefix).
                eprintln!(
                    "ifloom: target final pass: the first {} rows of {}",
                    thousands(n),
                    t.inputs.join(", ")
                );
                let report = pass(plan, dir, engine, opts, t, &written, n, true)?;
                let target_rows = dir.manifest(&t.table).map_or(0, |m| m.rows);
                state.status = match stop {
                    Stop::Reached => "reached",
                    Stop::Exhausted => "exhausted",
                    Stop::Budget => "budget",
                }
                .into();
                state.final_prefix = Some(n);
                state.final_sent = sent_by(dir, &report);
                save(&state)?;
                let sent = state.passes.iter().map(|p| p.sent).sum::<u64>() + state.final_sent;
                let taken = state
                    .passes
                    .iter()
                    .find(|p| p.prefix == n)
                    .map_or(n, |p| p.taken);
                let why = match stop {
                    Stop::Reached => format!(
                        "reached: {} has {} rows (target {}) from the first {} input rows, the fewest that give {}",
                        t.table,
                        thousands(target_rows),
                        thousands(t.rows),
                        thousands(taken),
                        thousands(t.rows)
                    ),
                    Stop::Exhausted => format!(
                        "input exhausted: {} has {} of {} rows from all {} input rows",
                        t.table,
                        thousands(target_rows),
                        thousands(t.rows),
                        thousands(taken)
                    ),
                    Stop::Budget => format!(
                        "stopped at the request budget: {} has {} of {} rows from the first {} input rows; another pass was projected to exceed {} requests (raise --max-requests and run the same command to go on)",
                        t.table,
                        thousands(target_rows),
                        thousands(t.rows),
                        thousands(taken),
                        thousands(t.max_requests.unwrap_or(0))
                    ),
                };
                eprintln!(
                    "ifloom: target run {why}; {} requests sent in {} pass(es) and the final one",
                    thousands(sent),
                    state.passes.len()
                );
                // The last pass's report (what it computed and reused).
                return Ok(report);
            }
        }
    }
}

/// One pass: the pipeline on the first `n` rows of the sliced inputs. Passes before the
/// final one run only the target and the tables it is computed from (`--until`): the other
/// stages (exports, the other branches) would be redone on every pass for nothing.
#[allow(clippy::too_many_arguments)]
fn pass(
    plan: &mut Plan,
    dir: &RunDir,
    engine: &Engine,
    opts: &RunOptions,
    t: &Target,
    written: &HashMap<String, Option<u64>>,
    n: u64,
    last: bool,
) -> Result<RunReport> {
    plan.set_prefix(&t.inputs, written, Some(n));
    let until = RunOptions {
        until: (!last).then(|| t.table.clone()),
        quiet_until: true,
        ..opts.clone()
    };
    exec::run_locked(plan, dir, engine, &until)
}

/// The facts of a finished pass, read from the manifests.
fn facts(dir: &RunDir, t: &Target, n: u64, report: &RunReport) -> Result<Pass> {
    let rows = |id: &str| {
        dir.manifest(id)
            .map(|m| m.rows)
            .ok_or_else(|| Error::Internal(format!("no manifest for `{id}` after a pass")))
    };
    let mut taken = 0;
    for i in &t.inputs {
        taken = taken.max(rows(i)?);
    }
    Ok(Pass {
        prefix: n,
        taken,
        target_rows: rows(&t.table)?,
        sent: sent_by(dir, report),
    })
}

/// Requests the stages a pass computed sent to servers (retries included, cache hits not).
fn sent_by(dir: &RunDir, report: &RunReport) -> u64 {
    report
        .computed
        .iter()
        .filter_map(|id| dir.manifest(id))
        .filter(|m| kind_can(&m.kind, Capability::SendsRequests))
        .map(|m| {
            let c = |k: &str| m.counters.get(k).copied().unwrap_or(0).max(0) as u64;
            c("requests") + c("retries")
        })
        .sum()
}

/// `target sft_clean: 7,412 / 10,000 rows · input 3,000 / 50,000 · requests 41,200
/// (projected 55,600 of budget 300,000)`.
fn progress(passes: &[Pass], t: &Target, avail: u64) -> String {
    let cur = passes.last().expect("a pass");
    let sent: u64 = passes.iter().map(|p| p.sent).sum();
    let projected = match projected_requests(passes, t.rows) {
        Some(p) => format!("projected {}", thousands(p)),
        None => "projected: not yet known".into(),
    };
    let budget = t
        .max_requests
        .map(|b| format!(" of budget {}", thousands(b)))
        .unwrap_or_default();
    format!(
        "target {}: {} / {} rows · input {} / {} · requests {} ({projected}{budget})",
        t.table,
        thousands(cur.target_rows),
        thousands(t.rows),
        thousands(cur.taken),
        thousands(avail),
        thousands(sent),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulate a target run over a pipeline whose target rows for a prefix are `f(prefix)`
    /// and which sends `per_row` requests per new input row: the passes' prefixes and the
    /// final step.
    fn simulate(
        n: u64,
        avail: u64,
        budget: Option<u64>,
        per_row: u64,
        f: impl Fn(u64) -> u64,
    ) -> (Vec<u64>, Step, u64) {
        let mut passes: Vec<Pass> = Vec::new();
        let mut max_taken = 0;
        for _ in 0..200 {
            match next_step(&passes, n, avail, budget) {
                Step::Run(p) => {
                    let taken = p.min(avail);
                    let sent = taken.saturating_sub(max_taken) * per_row;
                    max_taken = max_taken.max(taken);
                    passes.push(Pass {
                        prefix: p,
                        taken,
                        target_rows: f(taken),
                        sent,
                    });
                }
                done => {
                    let sent = passes.iter().map(|p| p.sent).sum();
                    return (passes.iter().map(|p| p.prefix).collect(), done, sent);
                }
            }
        }
        panic!("no end after 200 passes: {passes:?}");
    }

    #[test]
    fn reaches_the_smallest_prefix_with_few_extra_requests() {
        // Every third input row passes: 10,000 rows need 30,000 (the 30,000th passes).
        let f = |p: u64| p / 3;
        let (prefixes, done, sent) = simulate(10_000, 1_000_000, None, 5, f);
        assert_eq!(done, Step::Done(Stop::Reached, 30_000), "{prefixes:?}");
        assert_eq!(prefixes[0], 1_000);
        // Requests sent ÷ the minimum (5 per row of the 30,000).
        let ratio = sent as f64 / (30_000.0 * 5.0);
        assert!(ratio <= 1.1, "{ratio} {prefixes:?}");
        assert!(prefixes.len() <= 20, "{prefixes:?}");
    }

    #[test]
    fn an_uneven_yield_still_ends_at_the_boundary() {
        // Nothing passes in the first 5,000 rows, then every row.
        let f = |p: u64| p.saturating_sub(5_000);
        let (_, done, _) = simulate(100, 1_000_000, None, 1, f);
        assert_eq!(done, Step::Done(Stop::Reached, 5_100));
        // More than one target row per input row: the smallest prefix with ≥ N.
        let (_, done, _) = simulate(1_001, 1_000_000, None, 1, |p| 2 * p);
        assert_eq!(done, Step::Done(Stop::Reached, 501));
    }

    #[test]
    fn exhausted_input_and_budget() {
        let (_, done, _) = simulate(10_000, 2_000, None, 1, |p| p / 2);
        assert_eq!(done, Step::Done(Stop::Exhausted, 2_000));
        // 2 requests per row, budget 1,000: at most 500 rows; the pass that would pass the
        // budget is never started.
        // 2 requests per row, budget 5,000: the probe (1,000 rows) sends 2,000; the next pass
        // is cut to the 1,500 rows the rest of the budget pays for, then nothing fits.
        let (prefixes, done, sent) = simulate(10_000, 1_000_000, Some(5_000), 2, |p| p / 2);
        assert_eq!(prefixes, [1_000, 2_500]);
        assert_eq!(sent, 5_000);
        assert_eq!(done, Step::Done(Stop::Budget, 2_500));
    }

    #[test]
    fn the_next_step_depends_only_on_the_recorded_passes() {
        let passes = vec![
            Pass {
                prefix: 100,
                taken: 100,
                target_rows: 50,
                sent: 100,
            },
            Pass {
                prefix: 400,
                taken: 400,
                target_rows: 200,
                sent: 300,
            },
        ];
        let a = next_step(&passes, 1000, 10_000, None);
        let b = next_step(&passes, 1000, 10_000, None);
        assert_eq!(a, b);
        // 800 missing at a yield of 0.5, plus 2·√800 ≈ 57 rows: 400 + 1,714 capped at ×4.
        assert_eq!(a, Step::Run(1_600));
        // 400 requests for 400 rows; 1,000 target rows need 2,000 input rows at a yield of 0.5.
        assert_eq!(projected_requests(&passes, 1000), Some(2_000));
    }

    #[test]
    fn target_counts_parse() {
        assert_eq!(parse_count("20,000"), Some(20_000));
        assert_eq!(parse_count("20_000"), Some(20_000));
        assert_eq!(parse_count("-3"), Some(-3));
        assert_eq!(parse_count("lots"), None);
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }
}
