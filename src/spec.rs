//! The pipeline file: its serde types and the parse step that turns YAML text into a
//! [`Pipeline`], collecting every error (syntax, unknown fields, wrong types, unknown params)
//! instead of stopping at the first.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Diagnostic, did_you_mean};
use crate::input::{InputDef, InputSpec};
use crate::stages::{self, BuildCtx, SectionCtx, Stage};
use crate::yaml::{self, Node, Pos, Value};

/// Top-level keys of a pipeline file, in the order hints list them: the family sections (see
/// [`stages::sections`]) come between `profiles` and `inputs`.
pub fn top_level_keys() -> Vec<&'static str> {
    let sections = stages::sections().iter().map(|s| s.name);
    ["name", "description", "params", "profiles"]
        .into_iter()
        .chain(sections)
        .chain(["inputs", "stages"])
        .collect()
}

/// The override key that carries `--profile NAME` into [`load`].
pub const PROFILE_KEY: &str = "@profile";

/// Where problems of the whole file and of the command line (`--set`, `--profile`) point.
const START: Pos = Pos { line: 1, col: 1 };

/// One stage as written: its common fields, its node (for positions) and its kind's object.
#[derive(Debug)]
pub struct StageDef {
    pub id: String,
    pub pos: Pos,
    pub kind: String,
    pub from: Vec<(String, Pos)>,
    pub description: Option<String>,
    pub node: Node,
    pub stage: Box<dyn Stage>,
}

impl StageDef {
    /// Every table this stage reads: `from` plus any the kind names elsewhere (joins).
    pub fn deps(&self) -> Vec<(String, Pos)> {
        let mut d = self.from.clone();
        for (name, path) in self.stage.extra_deps() {
            let pos = self
                .node
                .pos_at(&path.iter().map(String::as_str).collect::<Vec<_>>());
            if !d.iter().any(|(n, _)| *n == name) {
                d.push((name, pos));
            }
        }
        d
    }
}

#[derive(Debug)]
pub struct Pipeline {
    /// The pipeline file as given on the command line.
    pub file: PathBuf,
    /// Folder of the pipeline file: relative paths start here.
    pub dir: PathBuf,
    pub name: String,
    pub description: Option<String>,
    /// Parameter values after `--set` overrides (literal, before environment interpolation).
    pub params: BTreeMap<String, serde_json::Value>,
    pub inputs: Vec<InputDef>,
    pub stages: Vec<StageDef>,
    /// Ids of inputs and stages that had errors while parsing: they are known names (so no
    /// "unknown table" follows) but are not planned, and neither is anything reading them.
    pub broken: Vec<String>,
}

impl Pipeline {
    pub fn stage(&self, id: &str) -> Option<&StageDef> {
        self.stages.iter().find(|s| s.id == id)
    }

    pub fn input(&self, id: &str) -> Option<&InputDef> {
        self.inputs.iter().find(|s| s.id == id)
    }

    /// Ids of every input and stage, in file order.
    pub fn all_ids(&self) -> Vec<&str> {
        self.inputs
            .iter()
            .map(|i| i.id.as_str())
            .chain(self.stages.iter().map(|s| s.id.as_str()))
            .collect()
    }
}

/// Read and parse a pipeline file. Errors that leave nothing to check further (unreadable
/// file, YAML syntax, not a mapping) are `Err`; all others come back beside the partly parsed
/// pipeline so compilation can go on and report the rest too. `overrides` are `--set key=value`
/// pairs (and `--profile` as [`PROFILE_KEY`]). `env` looks up environment variables (a closure
/// so tests need not touch the process environment).
///
/// A sequence of steps, each adding what it finds to one list: every mistake of the file is
/// reported in one go, not one per attempt.
pub fn load(
    file: &Path,
    overrides: &[(String, String)],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Pipeline, Vec<Diagnostic>), Vec<Diagnostic>> {
    let text = read_text(file)?;
    let mut root = parse_yaml(file, &text)?;
    let dir = folder_of(file);

    let mut errs = Vec::new();
    check_top_level_keys(file, &root, &mut errs);
    let params = read_params(file, &root, overrides, env, &mut errs);
    let mut broken = interpolate_pipeline(file, &mut root, &params.values, env, &mut errs);
    let name = read_name(file, &root, &mut errs);
    let description = root
        .get("description")
        .and_then(|d| d.as_str().map(str::to_string));
    let inputs = parse_inputs(file, &root, &mut broken, &mut errs);
    let build = BuildCtx {
        file: file.to_path_buf(),
        sections: parse_sections(file, &dir, &root, &mut errs),
        dir,
    };
    let stages = parse_stages(&root, &build, &mut broken, &mut errs);

    let pipeline = Pipeline {
        file: file.to_path_buf(),
        dir: build.dir,
        name,
        description,
        params: params.literal,
        inputs,
        stages,
        broken,
    };
    Ok((pipeline, errs))
}

/// The file's text; unreadable or not UTF-8 ends the load.
fn read_text(file: &Path) -> Result<String, Vec<Diagnostic>> {
    let bytes = std::fs::read(file).map_err(|e| {
        vec![
            Diagnostic::new(file, START, format!("cannot read pipeline file: {e}"))
                .hint("check the path; pipelines usually live in pipelines/"),
        ]
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let prefix = &e.as_bytes()[..valid];
        let line = prefix.iter().filter(|b| **b == b'\n').count() + 1;
        let col = valid
            - prefix
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        vec![
            Diagnostic::new(file, Pos { line, col }, "pipeline file is not valid UTF-8")
                .hint("save the file as UTF-8"),
        ]
    })
}

/// The YAML tree, which must be a mapping; a syntax error or another shape ends the load.
fn parse_yaml(file: &Path, text: &str) -> Result<Node, Vec<Diagnostic>> {
    let root = yaml::parse(text).map_err(|e| {
        vec![
            Diagnostic::new(file, e.pos, format!("YAML syntax error: {}", e.message))
                .hint("fix the YAML syntax"),
        ]
    })?;
    if !matches!(root.value, Value::Map(_)) {
        return Err(vec![
            Diagnostic::new(
                file,
                root.pos,
                format!(
                    "a pipeline file must be a mapping, found {}",
                    root.type_name()
                ),
            )
            .hint("start with `name:`, `inputs:` and `stages:`"),
        ]);
    }
    Ok(root)
}

/// Folder of the pipeline file: relative paths start here.
fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn check_top_level_keys(file: &Path, root: &Node, errs: &mut Vec<Diagnostic>) {
    let known = top_level_keys();
    for (k, _) in root.as_map().unwrap_or(&[]) {
        let key = k.scalar_text();
        if !known.contains(&key.as_str()) {
            errs.push(
                Diagnostic::new(file, k.pos, format!("unknown field `{key}`"))
                    .maybe_hint(did_you_mean(&key, known.iter().copied()))
                    .hint_if_none(format!("expected one of {}", known.join(", "))),
            );
        }
    }
}

/// The pipeline's params, resolved.
struct Params {
    /// What `${params.x}` gives: after `--profile`, `--set` and the environment.
    values: BTreeMap<String, serde_json::Value>,
    /// As written or set, never environment-expanded: what a run records.
    literal: BTreeMap<String, serde_json::Value>,
}

/// Params first: they are interpolated into everything else. Declared values, then the chosen
/// profile's, then `--set`; each param may read the environment and the params declared above
/// it (`judge_model: ${params.model}`), resolved in declaration order, so there is no cycle.
fn read_params(
    file: &Path,
    root: &Node,
    overrides: &[(String, String)],
    env: &dyn Fn(&str) -> Option<String>,
    errs: &mut Vec<Diagnostic>,
) -> Params {
    let mut nodes = declared_params(file, root, errs);
    let profiles = read_profiles(file, root, &nodes, errs);
    let chosen = apply_profile(file, overrides, &profiles, &mut nodes, errs);
    let sets: Vec<(String, String)> = overrides
        .iter()
        .filter(|(k, _)| k != PROFILE_KEY)
        .cloned()
        .collect();
    apply_sets(file, &sets, &mut nodes, errs);
    let order: Vec<String> = match root.get("params").map(|p| &p.value) {
        Some(Value::Map(m)) => m.iter().map(|(k, _)| k.scalar_text()).collect(),
        _ => Vec::new(),
    };
    let mut values = BTreeMap::new();
    for (i, k) in order.iter().enumerate() {
        let Some(node) = nodes.get_mut(k) else {
            continue;
        };
        // The params from this one down are declared but not readable yet: said as such
        // (not as unknown), and given as null so the same mistake is not reported twice.
        let later = &order[i..];
        forward_param_refs(node, k, later, file, errs);
        let mut visible = values.clone();
        for l in later {
            visible.insert(l.clone(), serde_json::Value::Null);
        }
        interpolate(node, &visible, env, file, errs);
        values.insert(k.clone(), node.to_json());
    }
    let chosen = chosen.and_then(|name| profiles.get(&name));
    Params {
        values,
        literal: literal_params(root, chosen, &sets),
    }
}

/// A param that reads itself or a param declared below it: an error (declaration order is
/// the evaluation order).
fn forward_param_refs(
    node: &Node,
    name: &str,
    later: &[String],
    file: &Path,
    errs: &mut Vec<Diagnostic>,
) {
    match &node.value {
        Value::Seq(items) => {
            for it in items {
                forward_param_refs(it, name, later, file, errs);
            }
        }
        Value::Map(m) => {
            for (_, v) in m {
                forward_param_refs(v, name, later, file, errs);
            }
        }
        Value::Str(s) => {
            for l in later {
                if s.contains(&format!("${{params.{l}}}")) {
                    let what = if l == name {
                        "itself".to_string()
                    } else {
                        format!("`{l}`, declared below it")
                    };
                    errs.push(
                        Diagnostic::new(
                            file,
                            node.pos,
                            format!("param `{name}` reads {what}"),
                        )
                        .hint("a param may read only the params declared above it; move it below the params it reads"),
                    );
                }
            }
        }
        _ => {}
    }
}

/// The `params:` mapping as written.
fn declared_params(file: &Path, root: &Node, errs: &mut Vec<Diagnostic>) -> BTreeMap<String, Node> {
    let mut nodes = BTreeMap::new();
    if let Some(p) = root.get("params") {
        match &p.value {
            Value::Map(m) => {
                for (k, v) in m {
                    nodes.insert(k.scalar_text(), v.clone());
                }
            }
            Value::Null => {}
            _ => errs.push(Diagnostic::new(
                file,
                p.pos,
                format!(
                    "params: invalid type: {}, expected a mapping of names to values",
                    p.type_name()
                ),
            )),
        }
    }
    nodes
}

/// Profiles: named sets of param values (`--profile local`), checked whether used or not.
fn read_profiles(
    file: &Path,
    root: &Node,
    params: &BTreeMap<String, Node>,
    errs: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Vec<(Node, Node)>> {
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let mut profiles = BTreeMap::new();
    let Some(p) = root.get("profiles") else {
        return profiles;
    };
    let Value::Map(m) = &p.value else {
        errs.push(
            at(
                p.pos,
                "profiles: expected a mapping of profile names".into(),
            )
            .hint("profiles: {local: {rows: 8}}"),
        );
        return profiles;
    };
    for (name, body) in m {
        let Value::Map(kv) = &body.value else {
            errs.push(
                at(
                    body.pos,
                    format!(
                        "profiles.{}: expected a mapping of params to values",
                        name.scalar_text()
                    ),
                )
                .hint("profiles: {local: {rows: 8, samples: 2}}"),
            );
            continue;
        };
        for (k, _) in kv {
            let key = k.scalar_text();
            if !params.contains_key(&key) {
                errs.push(
                    at(
                        k.pos,
                        format!(
                            "profile `{}` sets `{key}`, which is not a param",
                            name.scalar_text()
                        ),
                    )
                    .maybe_hint(did_you_mean(&key, params.keys().map(String::as_str)))
                    .hint_if_none("declare it under `params:` first"),
                );
            }
        }
        profiles.insert(name.scalar_text(), kv.clone());
    }
    profiles
}

/// `--profile NAME`: its values replace the declared ones. Returns the profile applied.
fn apply_profile(
    file: &Path,
    overrides: &[(String, String)],
    profiles: &BTreeMap<String, Vec<(Node, Node)>>,
    params: &mut BTreeMap<String, Node>,
    errs: &mut Vec<Diagnostic>,
) -> Option<String> {
    let mut chosen = None;
    for (_, v) in overrides.iter().filter(|(k, _)| k == PROFILE_KEY) {
        let Some(kv) = profiles.get(v) else {
            errs.push(
                Diagnostic::new(
                    file,
                    START,
                    format!("--profile {v}: the pipeline has no profile `{v}`"),
                )
                .maybe_hint(did_you_mean(v, profiles.keys().map(String::as_str)))
                .hint_if_none(format!(
                    "profiles: {}",
                    if profiles.is_empty() {
                        "(none)".to_string()
                    } else {
                        profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                    }
                )),
            );
            continue;
        };
        chosen = Some(v.clone());
        for (pk, pv) in kv {
            let key = pk.scalar_text();
            if params.contains_key(&key) {
                params.insert(key, pv.clone());
            }
        }
    }
    chosen
}

/// `--set key=value`: the value replaces the param's, at the param's position.
fn apply_sets(
    file: &Path,
    sets: &[(String, String)],
    params: &mut BTreeMap<String, Node>,
    errs: &mut Vec<Diagnostic>,
) {
    for (k, v) in sets {
        let Some(pos) = params.get(k).map(|n| n.pos) else {
            let known: Vec<&str> = params.keys().map(String::as_str).collect();
            errs.push(
                Diagnostic::new(
                    file,
                    START,
                    format!("--set {k}={v}: the pipeline has no param `{k}`"),
                )
                .maybe_hint(did_you_mean(k, known.iter().copied()))
                .hint_if_none(format!(
                    "declared params: {}",
                    if known.is_empty() {
                        "(none)".to_string()
                    } else {
                        known.join(", ")
                    }
                )),
            );
            continue;
        };
        let mut n = Node::new(yaml::resolve_plain(v), pos);
        n.raw = Some(v.clone());
        params.insert(k.clone(), n);
    }
}

/// Params literally as written, then as the profile and `--set` changed them; never their
/// environment-expanded values (a run records these).
fn literal_params(
    root: &Node,
    profile: Option<&Vec<(Node, Node)>>,
    sets: &[(String, String)],
) -> BTreeMap<String, serde_json::Value> {
    let mut literal = BTreeMap::new();
    if let Some(Value::Map(m)) = root.get("params").map(|p| &p.value) {
        for (k, v) in m {
            literal.insert(k.scalar_text(), v.to_json());
        }
    }
    for (pk, pv) in profile.into_iter().flatten() {
        if literal.contains_key(&pk.scalar_text()) {
            literal.insert(pk.scalar_text(), pv.to_json());
        }
    }
    for (k, v) in sets {
        if literal.contains_key(k) {
            literal.insert(
                k.clone(),
                Node::new(yaml::resolve_plain(v), START).to_json(),
            );
        }
    }
    literal
}

/// Interpolate params and the environment into the inputs, the family sections and the stages
/// (after expanding `repeat` blocks). Each input and stage on its own: one whose `${...}`
/// failed is returned as broken, so later checks skip it instead of reporting the same
/// mistake again.
fn interpolate_pipeline(
    file: &Path,
    root: &mut Node,
    params: &BTreeMap<String, serde_json::Value>,
    env: &dyn Fn(&str) -> Option<String>,
    errs: &mut Vec<Diagnostic>,
) -> Vec<String> {
    let mut broken: Vec<String> = Vec::new();
    let Value::Map(m) = &mut root.value else {
        return broken;
    };
    for (k, v) in m.iter_mut() {
        match (k.as_str(), &mut v.value) {
            (Some("inputs"), Value::Map(entries)) => {
                for (ik, iv) in entries.iter_mut() {
                    let before = errs.len();
                    interpolate(iv, params, env, file, errs);
                    if errs.len() > before {
                        broken.push(ik.scalar_text());
                    }
                }
            }
            (Some("stages"), Value::Seq(items)) => {
                // `repeat` blocks become their rounds' stages before anything else looks at
                // the list, so ids, references and columns of every round are checked like
                // hand-written stages.
                let taken = std::mem::take(items);
                *items = expand_repeats(taken, params, env, file, errs);
                for item in items.iter_mut() {
                    let before = errs.len();
                    interpolate(item, params, env, file, errs);
                    if errs.len() > before
                        && let Some(id) = item.get("id")
                    {
                        broken.push(id.scalar_text());
                    }
                }
            }
            (Some(key), _) if stages::sections().iter().any(|s| s.name == key) => {
                interpolate(v, params, env, file, errs)
            }
            _ => {}
        }
    }
    broken
}

fn read_name(file: &Path, root: &Node, errs: &mut Vec<Diagnostic>) -> String {
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let Some(n) = root.get("name") else {
        errs.push(
            at(root.pos, "missing field `name`".into()).hint("add `name: my_pipeline` at the top"),
        );
        return String::new();
    };
    match n.as_str() {
        Some(s) if valid_name(s) => s.to_string(),
        Some(s) => {
            errs.push(
                at(n.pos, format!("name `{s}` is not a valid pipeline name"))
                    .hint("use letters, digits, '_' and '-' (it names the run directory)"),
            );
            s.to_string()
        }
        None => {
            errs.push(at(
                n.pos,
                format!("name: invalid type: {}, expected a string", n.type_name()),
            ));
            String::new()
        }
    }
}

/// The `inputs:` mapping. An input with errors is added to `broken` instead.
fn parse_inputs(
    file: &Path,
    root: &Node,
    broken: &mut Vec<String>,
    errs: &mut Vec<Diagnostic>,
) -> Vec<InputDef> {
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let mut inputs = Vec::new();
    let Some(node) = root.get("inputs") else {
        return inputs;
    };
    let Value::Map(m) = &node.value else {
        errs.push(at(
            node.pos,
            format!(
                "inputs: invalid type: {}, expected a mapping of input ids to files",
                node.type_name()
            ),
        ));
        return inputs;
    };
    for (k, v) in m {
        let id = k.scalar_text();
        if broken.contains(&id) {
            continue;
        }
        if !valid_name(&id) {
            errs.push(
                at(k.pos, format!("input id `{id}` is not a valid name"))
                    .hint("use letters, digits and '_' (it becomes a SQL table name)"),
            );
        }
        // `name: path` is short for `name: {path: path}`.
        let spec = if let Value::Str(s) = &v.value {
            Ok(InputSpec {
                path: s.clone(),
                format: None,
                limit: None,
                sample: None,
            })
        } else {
            // Every bad field of the input at once (see `yaml::collecting`).
            let path = format!("inputs.{id}");
            let (spec, recovered) = yaml::collecting(|| v.deserialize::<InputSpec>(&path));
            match (spec, recovered.is_empty()) {
                (Ok(spec), true) => Ok::<_, Vec<yaml::DeError>>(spec),
                (spec, _) => Err(recovered.into_iter().chain(spec.err()).collect()),
            }
        };
        match spec {
            Ok(spec) => inputs.push(InputDef {
                id,
                pos: k.pos,
                node: v.clone(),
                spec,
            }),
            Err(es) => {
                broken.push(id);
                for e in es {
                    errs.push(
                        at(e.pos.unwrap_or(v.pos), e.to_string())
                            .hint("an input takes path, format, limit and sample"),
                    );
                }
            }
        }
    }
    inputs
}

/// Each family section the file has, parsed by its own entry (see [`stages::sections`]).
fn parse_sections(
    file: &Path,
    dir: &Path,
    root: &Node,
    errs: &mut Vec<Diagnostic>,
) -> BTreeMap<&'static str, Arc<dyn Any + Send + Sync>> {
    let ctx = SectionCtx { file, dir };
    let mut out = BTreeMap::new();
    for section in stages::sections() {
        if let Some(node) = root.get(section.name) {
            let (value, mut found) = (section.parse)(node, &ctx);
            errs.append(&mut found);
            out.insert(section.name, Arc::from(value));
        }
    }
    out
}

/// The `stages:` list. A stage with errors is added to `broken` instead.
fn parse_stages(
    root: &Node,
    build: &BuildCtx,
    broken: &mut Vec<String>,
    errs: &mut Vec<Diagnostic>,
) -> Vec<StageDef> {
    let at = |pos: Pos, msg: String| Diagnostic::new(&build.file, pos, msg);
    let mut stages_out = Vec::new();
    let Some(node) = root.get("stages") else {
        errs.push(at(root.pos, "missing field `stages`".into()).hint("add a `stages:` list"));
        return stages_out;
    };
    let Value::Seq(items) = &node.value else {
        errs.push(
            at(
                node.pos,
                format!(
                    "stages: invalid type: {}, expected a list",
                    node.type_name()
                ),
            )
            .hint("write each stage as a list item starting with `- id:`"),
        );
        return stages_out;
    };
    for (i, item) in items.iter().enumerate() {
        let id = item.get("id").map(Node::scalar_text);
        match parse_stage(i, item, build) {
            Ok(s) if !broken.contains(&s.id) => stages_out.push(s),
            Ok(_) => {}
            Err(mut e) => {
                errs.append(&mut e);
                broken.extend(id);
            }
        }
    }
    stages_out
}

/// Names of inputs, stages and pipelines become SQL table and folder names.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !s.starts_with('-')
        && !s.contains("__")
}

const COMMON_STAGE_KEYS: &[&str] = &["id", "kind", "from", "description"];

fn parse_stage(index: usize, node: &Node, build: &BuildCtx) -> Result<StageDef, Vec<Diagnostic>> {
    let file = &build.file;
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let Value::Map(entries) = &node.value else {
        return Err(vec![at(
            node.pos,
            format!(
                "stages[{index}]: invalid type: {}, expected a mapping",
                node.type_name()
            ),
        )]);
    };
    let mut errs = Vec::new();
    let id = match node.get("id") {
        Some(n) => match n.as_str() {
            Some(s) => s.to_string(),
            None => {
                errs.push(at(
                    n.pos,
                    format!(
                        "stages[{index}].id: expected a string, found {}",
                        n.type_name()
                    ),
                ));
                format!("stages[{index}]")
            }
        },
        None => {
            errs.push(
                at(node.pos, format!("stages[{index}]: missing field `id`"))
                    .hint("give every stage a unique `id:`"),
            );
            format!("stages[{index}]")
        }
    };
    if node.get("id").is_some() && !valid_name(&id) {
        errs.push(
            at(
                node.pos_at(&["id"]),
                format!("stage id `{id}` is not a valid name"),
            )
            .stage(&id)
            .hint("use letters, digits, '_' and '-', without '__' (it becomes a SQL table name)"),
        );
    }
    let kinds: Vec<&str> = crate::registry::kinds().iter().map(|k| k.name).collect();
    let kind = match node.get("kind") {
        Some(n) => match n.as_str() {
            Some(k) if kinds.contains(&k) => Some(k.to_string()),
            Some(k) => {
                errs.push(
                    at(n.pos, format!("unknown stage kind `{k}`"))
                        .stage(&id)
                        .maybe_hint(did_you_mean(k, kinds.iter().copied()))
                        .hint_if_none(format!("kinds: {}", kinds.join(", "))),
                );
                None
            }
            None => {
                errs.push(
                    at(
                        n.pos,
                        format!("kind: expected a string, found {}", n.type_name()),
                    )
                    .stage(&id),
                );
                None
            }
        },
        None => {
            errs.push(
                at(node.pos, "missing field `kind`".into())
                    .stage(&id)
                    .hint(format!("kinds: {}", kinds.join(", "))),
            );
            None
        }
    };
    let mut from = Vec::new();
    match node.get("from") {
        None => {}
        Some(n) => match &n.value {
            Value::Str(s) => from.push((s.clone(), n.pos)),
            Value::Seq(items) => {
                for it in items {
                    match it.as_str() {
                        Some(s) => from.push((s.to_string(), it.pos)),
                        None => errs.push(
                            at(
                                it.pos,
                                format!("from: expected a table id, found {}", it.type_name()),
                            )
                            .stage(&id),
                        ),
                    }
                }
            }
            _ => errs.push(
                at(
                    n.pos,
                    format!(
                        "from: expected a table id or a list of them, found {}",
                        n.type_name()
                    ),
                )
                .stage(&id),
            ),
        },
    }
    let description = node
        .get("description")
        .and_then(|d| d.as_str().map(str::to_string));

    let Some(kind) = kind else {
        return Err(errs);
    };
    let entry = crate::registry::kinds()
        .iter()
        .find(|k| k.name == kind)
        .expect("kind checked above");
    let fields = entry.fields();
    // Every key the kind does not know, each with its own hint, before deserializing (which
    // would stop at the first); the rest is deserialized without them.
    let mut unknown: Vec<String> = Vec::new();
    for (k, _) in entries {
        let key = k.scalar_text();
        if !fields.contains(&key) {
            errs.push(
                at(k.pos, format!("unknown field `{key}`"))
                    .stage(&id)
                    .maybe_hint(did_you_mean(&key, fields.iter().map(String::as_str)))
                    .hint_if_none(format!("stage kind `{kind}` takes: {}", fields.join(", "))),
            );
            unknown.push(key);
        }
    }
    let rest: Vec<(Node, Node)> = entries
        .iter()
        .filter(|(k, _)| {
            let key = k.scalar_text();
            !COMMON_STAGE_KEYS.contains(&key.as_str()) && !unknown.contains(&key)
        })
        .cloned()
        .collect();
    // A value of the wrong type is set aside with a stand-in, so the fields after it are
    // checked in the same run.
    let (built, recovered) = yaml::collecting(|| (entry.build)(&rest_node(&rest, node), build));
    let polish = |d: Diagnostic| stage_error(d, &id, &kind, &fields);
    // Top-level fields already reported (their value, or stand-ins for it, proves nothing more).
    let mut bad_fields: Vec<&Node> = Vec::new();
    for e in &recovered {
        let pos = e.pos.unwrap_or(node.pos);
        if let Some((k, v)) = rest
            .iter()
            .find(|(k, v)| k.pos == pos || subtree_has(v, pos))
        {
            bad_fields.push(k);
            bad_fields.push(v);
        }
        errs.push(polish(at(pos, e.to_string())));
    }
    let reported = !errs.is_empty();
    match built {
        Ok(stage) => {
            if reported {
                return Err(errs);
            }
            Ok(StageDef {
                pos: node.pos,
                id,
                kind,
                from,
                description,
                node: node.clone(),
                stage,
            })
        }
        Err(e) => {
            for d in e {
                // Once something in this stage was reported, keep only what cannot follow from
                // it: a required field that is missing (and no unknown key is a misspelling
                // of), or a problem inside a field that has no error of its own. A problem of
                // the whole stage may come from a stand-in, or a field left out as unknown.
                if reported {
                    let keep = match d.message.strip_prefix("missing field `") {
                        Some(m) => {
                            let missing = m.trim_end_matches('`');
                            !unknown.iter().any(|u| did_you_mean(u, [missing]).is_some())
                        }
                        None => {
                            d.pos != node.pos
                                && rest.iter().any(|(k, v)| {
                                    (k.pos == d.pos || subtree_has(v, d.pos))
                                        && !bad_fields.iter().any(|b| std::ptr::eq(*b, k))
                                })
                        }
                    };
                    if !keep {
                        continue;
                    }
                }
                errs.push(polish(d));
            }
            Err(errs)
        }
    }
}

/// The mapping of a stage's own fields, at the stage's position.
fn rest_node(rest: &[(Node, Node)], stage: &Node) -> Node {
    Node::new(Value::Map(rest.to_vec()), stage.pos)
}

/// Is `pos` the position of `node` or of any node (keys included) under it?
fn subtree_has(node: &Node, pos: Pos) -> bool {
    node.pos == pos
        || match &node.value {
            Value::Seq(items) => items.iter().any(|n| subtree_has(n, pos)),
            Value::Map(m) => m.iter().any(|(k, v)| k.pos == pos || subtree_has(v, pos)),
            _ => false,
        }
}

/// An error of a stage's own fields, named with its stage and hinted: serde's unknown field or
/// variant gets the closest name (for the stage's own fields, the common ones too).
fn stage_error(d: Diagnostic, id: &str, kind: &str, fields: &[String]) -> Diagnostic {
    let mut d = d.stage(id);
    if let Some((name, expected)) = yaml::unknown_name(&d.message) {
        // A field of the stage itself (the message starts with its own path):
        // serde lists only the kind's own fields; name the common ones too.
        let own = d.message.starts_with(&format!("{name}: unknown field "));
        let pool: Vec<&str> = if own {
            d.message = format!("unknown field `{name}`");
            fields.iter().map(String::as_str).collect()
        } else {
            expected.iter().map(String::as_str).collect()
        };
        if d.hint.is_none() {
            d.hint = did_you_mean(&name, pool).or_else(|| {
                own.then(|| format!("stage kind `{kind}` takes: {}", fields.join(", ")))
            });
        }
    }
    d
}

/// The fields of a `repeat` block's header.
const REPEAT_KEYS: &[&str] = &["times", "collect"];

/// Expand every `repeat` item of the stage list into `times` copies of its `stages`, with
/// `${repeat.round}` (1, 2, …), `${repeat.prev}` (0, 1, …) and `${repeat.last}` replaced in
/// every string. Copies keep the template's positions, so an error in round 2 points at the
/// line that wrote it (and names the stage id of that round). `collect: {id, from}` adds one
/// `sql` stage that stacks the `from` table of every round (`UNION ALL`).
///
/// ```yaml
/// - repeat: {times: 3, collect: {id: augmented, from: "query_r${repeat.round}"}}
///   stages:
///     - id: compose_r${repeat.round}
///       from: query_r${repeat.prev}      # round 1 reads query_r0, a stage written before
/// ```
fn expand_repeats(
    items: Vec<Node>,
    params: &BTreeMap<String, serde_json::Value>,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Path,
    errs: &mut Vec<Diagnostic>,
) -> Vec<Node> {
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some(header) = item.get("repeat") else {
            out.push(item);
            continue;
        };
        let mut header = header.clone();
        for (k, _) in item.as_map().unwrap_or(&[]) {
            let key = k.scalar_text();
            if key != "repeat" && key != "stages" {
                errs.push(
                    at(k.pos, format!("unknown field `{key}` in a repeat block"))
                        .hint("a repeat block has `repeat: {times, collect}` and `stages:`"),
                );
            }
        }
        // Only `times` takes params here: `collect.from` holds `${repeat.round}`, which is
        // replaced per round below, not by the params/env interpolation.
        if let Value::Map(m) = &mut header.value {
            for (k, v) in m.iter_mut() {
                if k.scalar_text() == "times" {
                    interpolate(v, params, env, file, errs);
                }
            }
        }
        let Some(hmap) = header.as_map() else {
            errs.push(
                at(
                    header.pos,
                    format!(
                        "repeat: invalid type: {}, expected a mapping",
                        header.type_name()
                    ),
                )
                .hint("repeat: {times: 3}"),
            );
            continue;
        };
        for (k, _) in hmap {
            let key = k.scalar_text();
            if !REPEAT_KEYS.contains(&key.as_str()) {
                errs.push(
                    at(k.pos, format!("unknown field `{key}` in repeat"))
                        .maybe_hint(did_you_mean(&key, REPEAT_KEYS.iter().copied()))
                        .hint_if_none(format!("expected one of {}", REPEAT_KEYS.join(", "))),
                );
            }
        }
        let times = match header.get("times").map(|t| &t.value) {
            Some(Value::Int(n)) if (1..=1000).contains(n) => *n as usize,
            Some(_) => {
                let t = header.get("times").map_or(header.pos, |t| t.pos);
                errs.push(
                    at(t, "repeat.times must be an integer from 1 to 1000".into())
                        .hint("e.g. times: ${params.rounds}"),
                );
                continue;
            }
            None => {
                errs.push(at(header.pos, "repeat needs `times`".into()).hint("repeat: {times: 3}"));
                continue;
            }
        };
        let template = match item.get("stages").map(|s| &s.value) {
            Some(Value::Seq(t)) if !t.is_empty() => t.clone(),
            _ => {
                errs.push(
                    at(
                        item.pos,
                        "a repeat block needs a non-empty `stages:` list".into(),
                    )
                    .hint("list the stages of one round under `stages:`"),
                );
                continue;
            }
        };
        for round in 1..=times {
            let vars = [
                ("${repeat.round}", round.to_string()),
                ("${repeat.prev}", (round - 1).to_string()),
                ("${repeat.last}", times.to_string()),
            ];
            for t in &template {
                let mut n = t.clone();
                substitute(&mut n, &vars);
                out.push(n);
            }
        }
        if let Some(c) = header.get("collect") {
            let id = c.get("id").and_then(Node::as_str);
            let from = c.get("from").and_then(Node::as_str);
            let (Some(id), Some(from)) = (id, from) else {
                errs.push(
                    at(c.pos, "repeat.collect needs `id` and `from`".into())
                        .hint("collect: {id: all_rounds, from: \"query_r${repeat.round}\"}"),
                );
                continue;
            };
            let tables: Vec<String> = (1..=times)
                .map(|r| from.replace("${repeat.round}", &r.to_string()))
                .collect();
            let query = tables
                .iter()
                .map(|t| format!("SELECT * FROM {t}"))
                .collect::<Vec<_>>()
                .join("\nUNION ALL\n");
            let s = |v: &str| Node::new(Value::Str(v.to_string()), c.pos);
            let key = |k: &str| Node::new(Value::Str(k.to_string()), c.pos);
            let entries = vec![
                (key("id"), s(id)),
                (key("kind"), s("sql")),
                (
                    key("from"),
                    Node::new(Value::Seq(tables.iter().map(|t| s(t)).collect()), c.pos),
                ),
                (
                    key("description"),
                    s("every round of a repeat block, stacked"),
                ),
                (key("query"), s(&query)),
            ];
            out.push(Node::new(Value::Map(entries), c.pos));
        }
    }
    out
}

/// Replace `${repeat.*}` in every string scalar (keys included) under `node`.
fn substitute(node: &mut Node, vars: &[(&str, String)]) {
    match &mut node.value {
        Value::Seq(items) => items.iter_mut().for_each(|n| substitute(n, vars)),
        Value::Map(m) => {
            for (k, v) in m.iter_mut() {
                substitute(k, vars);
                substitute(v, vars);
            }
        }
        Value::Str(s) if s.contains("${repeat.") => {
            let mut t = s.clone();
            for (k, v) in vars {
                t = t.replace(k, v);
            }
            // A scalar that was only `${repeat.round}` is an integer, like `${params.n}`.
            node.value = match t.parse::<i64>() {
                Ok(i) if vars.iter().any(|(k, _)| s == k) => Value::Int(i),
                _ => Value::Str(t.clone()),
            };
            node.raw = Some(t);
        }
        _ => {}
    }
}

/// Replace `${params.x}`, `${VAR}` and `${VAR:-default}` in every string scalar under `node`.
/// A scalar that is exactly one `${...}` takes the value's type (an integer param stays an
/// integer). `$${` writes a literal `${`.
fn interpolate(
    node: &mut Node,
    params: &BTreeMap<String, serde_json::Value>,
    env: &dyn Fn(&str) -> Option<String>,
    file: &Path,
    errs: &mut Vec<Diagnostic>,
) {
    match &mut node.value {
        Value::Seq(items) => {
            for it in items {
                interpolate(it, params, env, file, errs);
            }
        }
        Value::Map(m) => {
            for (_, v) in m.iter_mut() {
                interpolate(v, params, env, file, errs);
            }
        }
        Value::Str(s) if s.contains("${") => {
            let s = s.clone();
            let pos = node.pos;
            let mut out = String::new();
            let mut rest = s.as_str();
            let mut whole: Option<serde_json::Value> = None;
            let is_whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            while let Some(i) = rest.find("${") {
                if i > 0 && rest.as_bytes()[i - 1] == b'$' {
                    out.push_str(&rest[..i - 1]);
                    out.push_str("${");
                    rest = &rest[i + 2..];
                    continue;
                }
                out.push_str(&rest[..i]);
                let Some(end) = rest[i..].find('}') else {
                    errs.push(
                        Diagnostic::new(file, pos, format!("unterminated `${{` in `{s}`"))
                            .hint("close it with `}`, or write `$${` for a literal `${`"),
                    );
                    return;
                };
                let expr = &rest[i + 2..i + end];
                rest = &rest[i + end + 1..];
                let value = if expr.starts_with("repeat.") {
                    errs.push(
                        Diagnostic::new(file, pos, format!("`${{{expr}}}` outside a repeat block"))
                            .hint("${repeat.round}, ${repeat.prev} and ${repeat.last} exist only in the stages of a `repeat:` block (round, round - 1, number of rounds)"),
                    );
                    serde_json::Value::Null
                } else if let Some(p) = expr.strip_prefix("params.") {
                    match params.get(p) {
                        Some(v) => v.clone(),
                        None => {
                            let known: Vec<&str> = params.keys().map(String::as_str).collect();
                            errs.push(
                                Diagnostic::new(file, pos, format!("unknown param `{p}` in `{s}`"))
                                    .maybe_hint(did_you_mean(p, known.iter().copied()))
                                    .hint_if_none(format!(
                                        "declare it under `params:`; declared: {}",
                                        if known.is_empty() {
                                            "(none)".into()
                                        } else {
                                            known.join(", ")
                                        }
                                    )),
                            );
                            serde_json::Value::Null
                        }
                    }
                } else {
                    let (var, default) = match expr.split_once(":-") {
                        Some((v, d)) => (v, Some(d)),
                        None => (expr, None),
                    };
                    match env(var).or(default.map(str::to_string)) {
                        Some(v) => serde_json::Value::String(v),
                        None => {
                            errs.push(
                                Diagnostic::new(
                                    file,
                                    pos,
                                    format!("environment variable `{var}` is not set"),
                                )
                                .hint(format!("set it, or give a default: ${{{var}:-value}}")),
                            );
                            serde_json::Value::Null
                        }
                    }
                };
                if is_whole {
                    whole = Some(value.clone());
                }
                match value {
                    serde_json::Value::String(v) => out.push_str(&v),
                    other => out.push_str(&other.to_string()),
                }
            }
            out.push_str(rest);
            let raw = out.clone();
            node.value = match whole {
                Some(serde_json::Value::Bool(b)) => Value::Bool(b),
                Some(serde_json::Value::Number(n)) if n.is_i64() => {
                    Value::Int(n.as_i64().unwrap_or(0))
                }
                Some(serde_json::Value::Number(n)) => Value::Float(n.as_f64().unwrap_or(0.0)),
                Some(serde_json::Value::Null) => Value::Null,
                // A param holding a mapping or a list (e.g. a response_format schema, set by
                // a profile) is that mapping or list here.
                Some(v @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) => {
                    node_from_json(&v, pos).value
                }
                _ => Value::Str(out),
            };
            node.raw = Some(raw);
        }
        _ => {}
    }
}

/// A YAML node tree for a JSON value, every node at `pos` (where the `${params.x}` was).
fn node_from_json(v: &serde_json::Value, pos: Pos) -> Node {
    let value = match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(a) => {
            Value::Seq(a.iter().map(|x| node_from_json(x, pos)).collect())
        }
        serde_json::Value::Object(m) => Value::Map(
            m.iter()
                .map(|(k, x)| {
                    (
                        Node::new(Value::Str(k.clone()), pos),
                        node_from_json(x, pos),
                    )
                })
                .collect(),
        ),
    };
    Node::new(value, pos)
}

/// JSON Schema of pipeline files, generated from the Rust types (for editors).
pub fn json_schema() -> serde_json::Value {
    use serde_json::json;
    let mut g = schemars::SchemaGenerator::default();
    let input = g.subschema_for::<InputSpec>().to_value();
    let mut sections = serde_json::Map::new();
    for s in stages::sections() {
        let mut v = (s.schema)(&mut g);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("description".into(), json!(s.about));
        }
        sections.insert(s.name.into(), v);
    }
    let mut kinds = Vec::new();
    for k in crate::registry::kinds() {
        let mut v = (k.schema)(&mut g).to_value();
        if let Some(obj) = v.as_object_mut() {
            let props = obj.entry("properties").or_insert_with(|| json!({}));
            if let Some(p) = props.as_object_mut() {
                p.insert("id".into(), json!({"type": "string", "description": "Unique id; the stage's table name in SQL."}));
                p.insert(
                    "kind".into(),
                    json!({"const": k.name, "description": k.about}),
                );
                p.insert("from".into(), json!({"description": "Input or stage id(s) this stage reads.", "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}));
                p.insert("description".into(), json!({"type": "string"}));
            }
            let req = obj.entry("required").or_insert_with(|| json!([]));
            if let Some(r) = req.as_array_mut() {
                r.extend([json!("id"), json!("kind"), json!("from")]);
            }
            obj.remove("$schema");
            obj.remove("title");
        }
        kinds.push(v);
    }
    kinds.push(json!({
        "type": "object",
        "description": "A block of stages instantiated `times` times; ${repeat.round}, ${repeat.prev} and ${repeat.last} are replaced in each copy.",
        "additionalProperties": false,
        "required": ["repeat", "stages"],
        "properties": {
            "repeat": {
                "type": "object",
                "additionalProperties": false,
                "required": ["times"],
                "properties": {
                    "times": {"description": "Number of rounds (1..1000).", "oneOf": [{"type": "integer"}, {"type": "string"}]},
                    "collect": {"type": "object", "description": "Adds a sql stage `id` stacking the `from` table of every round.", "properties": {"id": {"type": "string"}, "from": {"type": "string"}}, "required": ["id", "from"]}
                }
            },
            "stages": {"type": "array", "description": "The stages of one round."}
        }
    }));
    let mut properties = json!({
        "name": {"type": "string", "description": "Pipeline name; names the run directory."},
        "description": {"type": "string"},
        "params": {"type": "object", "description": "Named defaults, used as ${params.x}; override with --set x=value."},
        "profiles": {"type": "object", "description": "Named sets of param values, applied with --profile NAME (before --set).", "additionalProperties": {"type": "object"}},
        "inputs": {"type": "object", "additionalProperties": {"oneOf": [{"type": "string"}, input]}},
        "stages": {"type": "array", "items": {"oneOf": kinds}},
    });
    if let Some(p) = properties.as_object_mut() {
        p.extend(sections);
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ifloom pipeline",
        "type": "object",
        "additionalProperties": false,
        "required": ["name", "stages"],
        "properties": properties,
        "$defs": g.definitions(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(s: &str) -> Node {
        yaml::parse(s).unwrap()
    }

    #[test]
    fn interpolation_keeps_types_and_reads_env() {
        let mut n = node("a: ${params.n}\nb: x-${params.n}\nc: ${HOME_X:-dflt}\nd: $${lit}\n");
        let mut params = BTreeMap::new();
        params.insert("n".to_string(), serde_json::json!(5));
        let mut errs = vec![];
        interpolate(&mut n, &params, &|_| None, Path::new("p.yaml"), &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(n.get("a").unwrap().value, Value::Int(5));
        assert_eq!(n.get("b").unwrap().value, Value::Str("x-5".into()));
        assert_eq!(n.get("c").unwrap().value, Value::Str("dflt".into()));
        assert_eq!(n.get("d").unwrap().value, Value::Str("${lit}".into()));
    }

    #[test]
    fn unknown_param_is_reported_at_its_scalar() {
        let mut n = node("x: 1\nq: ${params.nn}\n");
        let mut params = BTreeMap::new();
        params.insert("n".to_string(), serde_json::json!(5));
        let mut errs = vec![];
        interpolate(&mut n, &params, &|_| None, Path::new("p.yaml"), &mut errs);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].pos, Pos { line: 2, col: 4 });
    }
}
