//! `compile`: a parsed pipeline → a [`Plan`] whose every table has a known schema. Every check
//! runs (ids, references, cycles, inputs, SQL, columns) and all problems come back together.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use arrow::datatypes::SchemaRef;

use crate::engine::Engine;
use crate::error::{Diagnostic, Diagnostics, did_you_mean};
use crate::input::{self, InputScan};
use crate::spec::{self, Pipeline};
use crate::stages::{Arity, PlanCtx};
use crate::table::ID_COL;
use crate::yaml::Pos;

/// Version of ifloom's input materialization (bump when `_id` or reading changes).
const INPUT_VERSION: u32 = 1;

#[derive(Debug)]
pub struct Plan {
    pub pipeline: Pipeline,
    /// Inputs first (file order), then stages in a dependency order.
    pub order: Vec<String>,
    pub deps: HashMap<String, Vec<String>>,
    pub schemas: HashMap<String, SchemaRef>,
    pub scans: HashMap<String, InputScan>,
    pub fingerprints: HashMap<String, String>,
    /// Problems that do not stop a run (an input that reads an evaluation set), shown by
    /// every verb that checks the pipeline.
    pub warnings: Vec<Diagnostic>,
}

impl Plan {
    pub fn is_input(&self, id: &str) -> bool {
        self.scans.contains_key(id)
    }

    /// `id` and every table it is computed from (`run --until`).
    pub fn ancestors(&self, id: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut todo = vec![id.to_string()];
        while let Some(n) = todo.pop() {
            if out.insert(n.clone()) {
                todo.extend(self.deps.get(&n).into_iter().flatten().cloned());
            }
        }
        out
    }

    /// Keep only the first `rows` rows of each input in `inputs` (a target run's prefix):
    /// their `limit` becomes the smaller of `rows` and the limit written in the file (kept in
    /// `written`), and every fingerprint is computed again, so the stages downstream of them
    /// are redone and the others reused.
    pub fn set_prefix(
        &mut self,
        inputs: &[String],
        written: &HashMap<String, Option<u64>>,
        rows: Option<u64>,
    ) {
        for i in self.pipeline.inputs.iter_mut() {
            if inputs.contains(&i.id) {
                let own = written.get(&i.id).copied().flatten();
                i.spec.limit = match (own, rows) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        self.fingerprints = fingerprints(&self.pipeline, &self.order, &self.deps, &self.scans);
    }

    /// `id` and every table downstream of it.
    pub fn descendants(&self, id: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.insert(id.to_string());
        for n in &self.order {
            if self
                .deps
                .get(n)
                .is_some_and(|d| d.iter().any(|p| out.contains(p)))
            {
                out.insert(n.clone());
            }
        }
        out
    }
}

/// Compile a pipeline file into a [`Plan`]. A sequence of steps, each adding what it finds to
/// one list of diagnostics, so every problem of the file is reported in one validation:
/// load (parse) → check_ids → resolve_references → find_cycles → scan_inputs →
/// plan_schemas → fingerprints (only for a pipeline without errors).
pub fn compile(
    file: &Path,
    overrides: &[(String, String)],
    env: &dyn Fn(&str) -> Option<String>,
    engine: &Engine,
) -> Result<Plan, Diagnostics> {
    let (pipeline, mut errs) = spec::load(file, overrides, env).map_err(Diagnostics)?;
    let duplicates = check_ids(&pipeline, &mut errs);
    let graph = resolve_references(&pipeline, &duplicates, &mut errs);
    let (order, in_cycle) = find_cycles(&pipeline, &graph.deps, &mut errs);
    let scans = scan_inputs(&pipeline, &mut errs);
    let schemas = plan_schemas(
        &pipeline, &graph, &order, &in_cycle, &scans, engine, &mut errs,
    );
    if !errs.is_empty() {
        errs.sort_by_key(|e| e.pos);
        return Err(Diagnostics(errs));
    }
    let fingerprints = fingerprints(&pipeline, &order, &graph.deps, &scans);
    let warnings = evaluation_set_warnings(&pipeline, &scans);
    Ok(Plan {
        pipeline,
        order,
        deps: graph.deps,
        schemas,
        scans,
        fingerprints,
        warnings,
    })
}

/// A warning for each input that reads a file some stage keeps out of training data
/// ([`crate::stages::Stage::evaluation_files`]): the run trains on an evaluation set.
fn evaluation_set_warnings(
    pipeline: &Pipeline,
    scans: &HashMap<String, InputScan>,
) -> Vec<Diagnostic> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    // (input, set, file) → the stages guarding against it, in file order.
    let mut found: Vec<((usize, String, std::path::PathBuf), Vec<String>)> = Vec::new();
    for s in &pipeline.stages {
        for (name, file) in s.stage.evaluation_files() {
            let file = canon(&file);
            for (n, i) in pipeline.inputs.iter().enumerate() {
                let reads = scans
                    .get(&i.id)
                    .is_some_and(|scan| scan.files.iter().any(|f| canon(f) == file));
                if !reads {
                    continue;
                }
                let key = (n, name.clone(), file.clone());
                match found.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, stages)) => stages.push(s.id.clone()),
                    None => found.push((key, vec![s.id.clone()])),
                }
            }
        }
    }
    found
        .into_iter()
        .map(|((n, name, file), stages)| {
            let i = &pipeline.inputs[n];
            at(
                pipeline,
                i.pos,
                format!(
                    "input `{}` reads {}, the evaluation set `{name}`: this run TRAINS ON AN \
                     EVALUATION SET. {} removes what still shares an n-gram with it, but \
                     rewrites get through: do not report `{name}` scores of a model trained \
                     on this data",
                    i.id,
                    file.display(),
                    stages
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            )
            .hint("seed from data that no benchmark uses for a model you will evaluate")
        })
        .collect()
}

/// A diagnostic in the pipeline file.
fn at(pipeline: &Pipeline, pos: Pos, message: String) -> Diagnostic {
    Diagnostic::new(&pipeline.file, pos, message)
}

/// Ids: one namespace for inputs and stages. Returns the indexes of the stages whose id was
/// taken already.
fn check_ids(pipeline: &Pipeline, errs: &mut Vec<Diagnostic>) -> BTreeSet<usize> {
    let mut seen: HashMap<String, Pos> = HashMap::new();
    let mut duplicates: BTreeSet<usize> = BTreeSet::new();
    for i in &pipeline.inputs {
        seen.insert(i.id.clone(), i.pos);
    }
    for (idx, s) in pipeline.stages.iter().enumerate() {
        if let Some(first) = seen.get(&s.id) {
            duplicates.insert(idx);
            errs.push(
                at(
                    pipeline,
                    s.node.pos_at(&["id"]),
                    format!(
                        "duplicate id `{}` (first defined at line {})",
                        s.id, first.line
                    ),
                )
                .stage(&s.id)
                .hint("every input and stage needs its own id"),
            );
        } else {
            seen.insert(s.id.clone(), s.node.pos_at(&["id"]));
        }
    }
    duplicates
}

/// The tables each stage reads.
struct Graph {
    /// Every stage's dependencies (`from` first, then extra deps), by id.
    deps: HashMap<String, Vec<String>>,
    /// Stages that read no table, themselves, an unknown table or a broken one: not planned.
    bad_refs: BTreeSet<String>,
}

/// References: every table a stage reads must be an input or another stage.
fn resolve_references(
    pipeline: &Pipeline,
    duplicates: &BTreeSet<usize>,
    errs: &mut Vec<Diagnostic>,
) -> Graph {
    let mut known: Vec<String> = pipeline.all_ids().iter().map(|s| s.to_string()).collect();
    known.extend(pipeline.broken.iter().cloned());
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut bad_refs: BTreeSet<String> = BTreeSet::new();
    for (idx, s) in pipeline.stages.iter().enumerate() {
        // A duplicate's id names the first definition, so `from: <its id>` is no self-read,
        // and its edges must not replace the first definition's.
        let duplicate = duplicates.contains(&idx);
        if s.from.is_empty() {
            errs.push(
                at(pipeline, s.pos, "missing field `from`".into())
                    .stage(&s.id)
                    .hint("name the input or stage this one reads: `from: <id>`"),
            );
            bad_refs.insert(s.id.clone());
        }
        if s.stage.arity() == Arity::One && s.from.len() > 1 {
            errs.push(
                at(
                    pipeline,
                    s.from[1].1,
                    format!(
                        "{} stage reads one table, but `from` names {}",
                        a_kind(&s.kind),
                        s.from.len()
                    ),
                )
                .stage(&s.id)
                .hint("join or union them first in a sql stage"),
            );
        }
        let mut ds = Vec::new();
        for (name, pos) in s.deps() {
            if name == s.id {
                // Reported here, not again as a one-stage cycle.
                if !duplicate {
                    errs.push(
                        at(pipeline, pos, format!("stage `{}` reads itself", s.id))
                            .stage(&s.id)
                            .hint("read an earlier stage"),
                    );
                    bad_refs.insert(s.id.clone());
                }
                continue;
            } else if pipeline.broken.contains(&name) {
                // Its own errors are already reported.
                bad_refs.insert(s.id.clone());
            } else if !known.contains(&name) {
                errs.push(
                    at(
                        pipeline,
                        pos,
                        format!("unknown table `{name}`: no input or stage has this id"),
                    )
                    .stage(&s.id)
                    .maybe_hint(did_you_mean(&name, known.iter().map(String::as_str)))
                    .hint_if_none(format!("known ids: {}", known.join(", "))),
                );
                bad_refs.insert(s.id.clone());
            }
            ds.push(name);
        }
        if !duplicate {
            deps.insert(s.id.clone(), ds);
        }
    }
    Graph { deps, bad_refs }
}

/// Cycles, each printed as a chain. Returns a dependency order (inputs first, in file order,
/// then stages) and the stages on a cycle.
fn find_cycles(
    pipeline: &Pipeline,
    deps: &HashMap<String, Vec<String>>,
    errs: &mut Vec<Diagnostic>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut order: Vec<String> = pipeline.inputs.iter().map(|i| i.id.clone()).collect();
    let mut state: HashMap<String, u8> = HashMap::new(); // 1 = visiting, 2 = done
    let mut in_cycle: BTreeSet<String> = BTreeSet::new();
    fn visit(
        id: &str,
        deps: &HashMap<String, Vec<String>>,
        state: &mut HashMap<String, u8>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
        cycles: &mut Vec<Vec<String>>,
    ) {
        match state.get(id) {
            Some(2) => return,
            Some(1) => {
                let start = stack.iter().position(|s| s == id).unwrap_or(0);
                let mut chain: Vec<String> = stack[start..].to_vec();
                chain.push(id.to_string());
                cycles.push(chain);
                return;
            }
            _ => {}
        }
        let Some(ds) = deps.get(id) else { return };
        state.insert(id.to_string(), 1);
        stack.push(id.to_string());
        for p in ds {
            visit(p, deps, state, stack, order, cycles);
        }
        stack.pop();
        state.insert(id.to_string(), 2);
        order.push(id.to_string());
    }
    let mut cycles = Vec::new();
    for s in &pipeline.stages {
        visit(
            &s.id,
            deps,
            &mut state,
            &mut Vec::new(),
            &mut order,
            &mut cycles,
        );
    }
    for chain in cycles {
        let first = &chain[0];
        if let Some(s) = pipeline.stage(first) {
            errs.push(
                at(
                    pipeline,
                    s.node.pos_at(&["from"]),
                    format!("cycle: {}", chain.join(" → ")),
                )
                .stage(first)
                .hint("a stage cannot depend on its own output; break the loop"),
            );
        }
        in_cycle.extend(chain);
    }
    (order, in_cycle)
}

/// Inputs: resolve, read completely, infer schemas.
fn scan_inputs(pipeline: &Pipeline, errs: &mut Vec<Diagnostic>) -> HashMap<String, InputScan> {
    let mut scans: HashMap<String, InputScan> = HashMap::new();
    for i in &pipeline.inputs {
        let mut bad = false;
        if let Some(s) = &i.spec.sample {
            if s.n.is_some() == s.fraction.is_some() {
                errs.push(
                    at(
                        pipeline,
                        i.node.pos_at(&["sample"]),
                        format!(
                            "input `{}`: sample takes exactly one of `n` and `fraction`",
                            i.id
                        ),
                    )
                    .hint("e.g. `sample: {n: 100, seed: 1}`"),
                );
                bad = true;
            }
            if s.fraction.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
                errs.push(at(
                    pipeline,
                    i.node.pos_at(&["sample", "fraction"]),
                    format!("input `{}`: fraction must be between 0 and 1", i.id),
                ));
                bad = true;
            }
        }
        if bad {
            continue;
        }
        match input::scan(i, &pipeline.dir) {
            Ok(scan) => {
                scans.insert(i.id.clone(), scan);
            }
            Err(e) => {
                let pos = i.node.pos_at(&["path"]);
                errs.push(
                    at(
                        pipeline,
                        if i.node.get("path").is_some() {
                            pos
                        } else {
                            i.node.pos
                        },
                        format!("input `{}`: {}", i.id, e.message),
                    )
                    .maybe_hint(e.hint),
                );
            }
        }
    }
    scans
}

/// Plan stages in dependency order: every table's schema. A stage whose parents failed is
/// skipped silently so one mistake is reported once, not again by every descendant; a parent
/// whose errors leave its schema known (`Stage::schema_despite_errors`) has not failed in this
/// sense.
fn plan_schemas(
    pipeline: &Pipeline,
    graph: &Graph,
    order: &[String],
    in_cycle: &BTreeSet<String>,
    scans: &HashMap<String, InputScan>,
    engine: &Engine,
    errs: &mut Vec<Diagnostic>,
) -> HashMap<String, SchemaRef> {
    let mut schemas: HashMap<String, SchemaRef> = scans
        .iter()
        .map(|(id, scan)| (id.clone(), scan.schema()))
        .collect();
    for id in order
        .iter()
        .filter(|id| !scans.contains_key(*id) && pipeline.input(id).is_none())
    {
        if graph.bad_refs.contains(id) || in_cycle.contains(id) {
            continue;
        }
        let Some(s) = pipeline.stage(id) else {
            continue;
        };
        let Some(parents) = graph.deps[id]
            .iter()
            .map(|p| schemas.get(p).map(|s| (p.clone(), s.clone())))
            .collect::<Option<Vec<_>>>()
        else {
            continue;
        };
        if s.stage.needs_id()
            && parents
                .first()
                .is_some_and(|(_, sc)| sc.field_with_name(ID_COL).is_err())
        {
            errs.push(
                at(
                    pipeline,
                    s.from.first().map_or(s.pos, |f| f.1),
                    format!(
                        "input table `{}` has no `{ID_COL}` column, which {} stage needs",
                        parents[0].0,
                        a_kind(&s.kind)
                    ),
                )
                .stage(id)
                .hint(format!(
                    "keep `{ID_COL}` in the upstream SELECT (e.g. `SELECT {ID_COL}, ...`)"
                )),
            );
            continue;
        }
        let ctx = PlanCtx {
            id: &s.id,
            node: &s.node,
            file: &pipeline.file,
            parents,
            engine,
        };
        match s.stage.plan(&ctx) {
            Ok(schema) => {
                schemas.insert(id.clone(), schema);
            }
            Err(mut e) => {
                errs.append(&mut e);
                // The validation fails either way; a schema the errors leave known lets the
                // descendants be checked too, so their mistakes are not found one run later.
                if let Some(schema) = s.stage.schema_despite_errors(&ctx) {
                    schemas.insert(id.clone(), schema);
                }
            }
        }
    }
    schemas
}

/// Every table's fingerprint, in dependency order: an input's covers its spec and content, a
/// stage's its kind, version, config and its parents' fingerprints.
fn fingerprints(
    pipeline: &Pipeline,
    order: &[String],
    deps: &HashMap<String, Vec<String>>,
    scans: &HashMap<String, InputScan>,
) -> HashMap<String, String> {
    let mut fingerprints: HashMap<String, String> = HashMap::new();
    for id in order {
        let fp = if let Some(scan) = scans.get(id) {
            let Some(i) = pipeline.input(id) else {
                continue;
            };
            hash_json(&serde_json::json!({
                "input": INPUT_VERSION,
                "id": i.id,
                "spec": {"format": scan.format, "limit": i.spec.limit, "sample": i.spec.sample},
                "content": scan.content_hash,
            }))
        } else {
            let (Some(s), Some(ds)) = (pipeline.stage(id), deps.get(id)) else {
                continue;
            };
            let parent_fps: Vec<String> = ds
                .iter()
                .map(|p| fingerprints.get(p).cloned().unwrap_or_default())
                .collect();
            hash_json(&serde_json::json!({
                "kind": s.kind,
                "version": s.stage.version(),
                "config": crate::stages::fingerprint(&*s.stage),
                "parents": ds,
                "parent_fingerprints": parent_fps,
            }))
        };
        fingerprints.insert(id.clone(), fp);
    }
    fingerprints
}

/// "a dedup", "an output": a stage kind with its article.
fn a_kind(kind: &str) -> String {
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

pub fn hash_json(v: &serde_json::Value) -> String {
    let s = crate::json::canonical_string(v);
    blake3::hash(s.as_bytes()).to_hex()[..32].to_string()
}
