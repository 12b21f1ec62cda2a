//! Stage kinds. Every kind implements [`Stage`]: *plan* (given the parents' Arrow schemas,
//! return this stage's output schema or every problem found, with no I/O beyond schema reads)
//! and *run* (given the parents' Parquet files, write this stage's table).
//!
//! Adding a kind is one new file plus one line in [`KINDS`] (a method's or a benchmark's kind:
//! in its module's `kinds`, see [`crate::registry`]). A top-level section of the
//! pipeline file that only one family of kinds reads (`endpoints:` for llm stages) is one
//! [`SectionEntry`] in [`sections`], parsed by that family's module.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use serde::de::DeserializeOwned;

use crate::cancel::Cancel;
use crate::engine::Engine;
use crate::error::{Diagnostic, Result};
use crate::table::Table;
use crate::yaml::Node;

pub mod decontaminate;
pub mod dedup;
pub mod export;
pub mod kit;
pub mod llm;
pub mod minhash;
pub mod output;
pub mod sql;
pub mod transform;
pub mod verdict;
pub mod yes_no;

#[cfg(test)]
mod test_verdict;

/// The kinds every pipeline may use (the core module of [`crate::registry`]); a method's or a
/// benchmark's kinds are in its own module.
pub const KINDS: &[KindEntry] = &[
    sql::KIND,
    transform::KIND,
    dedup::KIND,
    minhash::KIND,
    decontaminate::KIND,
    output::KIND,
    export::KIND,
    verdict::KIND,
    yes_no::KIND,
    llm::KIND,
    // A throwaway kind of the unit tests (proves a new kind needs no edit elsewhere).
    #[cfg(test)]
    test_verdict::KIND,
];

/// What a kind can do, declared on its registry entry: what several kinds share and the core
/// treats specially (`stats`' funnel and LLM accounting, `run --dry-run`, `run
/// --retry-failed`), asked for by capability, never by a kind's name. Figures of one kind
/// are declared by its module instead ([`crate::module`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// A `verdict` column (`pass` / `fail` / `unjudged`) per row, and those three counters:
    /// pass rates in `stats` and the report (per question too when the table has `scores`,
    /// the judge's answers as a list of booleans).
    ProducesVerdicts,
    /// Removes rows, each kept in `<id>__removed`; the counter `removed` counts them.
    RemovesRows,
    /// Sends requests to servers: `--dry-run` shows them ([`Stage::dry_run`]) instead, and
    /// `stats` accounts for them (the `<output>_latency_ms` / `_cached` columns and counters
    /// `requests`, `cache_hits`, tokens).
    SendsRequests,
    /// Dead-letters rows that failed for good in `<id>__failed` (counter `failures`);
    /// `run --retry-failed <id>` recomputes the stage to try them again.
    RetriesFailed,
    /// Matches rows against named reference sets (benchmarks): counters `hits_<set>` (rows
    /// sharing an n-gram) and `near_dups_<set>` (near duplicates without one); `stats` shows
    /// them per set, and an input reading one of its [`Stage::evaluation_files`] is warned of.
    MatchesReferences,
}

impl Capability {
    /// The name in `ifloom_stages.capabilities` (what canned SQL filters on).
    pub fn name(self) -> &'static str {
        match self {
            Capability::ProducesVerdicts => "produces_verdicts",
            Capability::RemovesRows => "removes_rows",
            Capability::SendsRequests => "sends_requests",
            Capability::RetriesFailed => "retries_failed",
            Capability::MatchesReferences => "matches_references",
        }
    }
}

/// Deserializes a kind's own fields into its stage object.
pub type BuildFn = fn(&Node, &BuildCtx) -> Result<Box<dyn Stage>, Vec<Diagnostic>>;

/// What the pipeline parser knows about a kind.
pub struct KindEntry {
    pub name: &'static str,
    pub about: &'static str,
    /// Deserialize the stage's own fields (everything but id, kind, from, description).
    pub build: BuildFn,
    /// JSON Schema of the kind's own fields.
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// What the kind can do (see [`Capability`]).
    pub capabilities: &'static [Capability],
    /// What the funnel of `ifloom stats` says of the rows a [`Capability::RemovesRows`] kind
    /// removed, after their count ("exact duplicates removed").
    pub removed_rows: &'static str,
}

impl KindEntry {
    pub fn can(&self, capability: Capability) -> bool {
        self.capabilities.contains(&capability)
    }

    /// Field names the kind accepts, for "unknown field" hints.
    pub fn fields(&self) -> Vec<String> {
        let mut g = schemars::SchemaGenerator::default();
        let schema = (self.schema)(&mut g);
        let mut out: Vec<String> = ["id", "kind", "from", "description"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            out.extend(props.keys().cloned());
        }
        out
    }
}

/// The registry of top-level sections that belong to one family of kinds. The pipeline
/// parser knows them only through this list: their keys are accepted at the top level,
/// interpolated like the rest, parsed by their entry, and handed to the kinds in
/// [`BuildCtx::section`].
pub fn sections() -> &'static [SectionEntry] {
    static SECTIONS: &[SectionEntry] = &[llm::endpoints::SECTION];
    SECTIONS
}

/// Parses a section's node (after interpolation) into the value its kinds read, with every
/// problem found. The value comes back even when there are problems: whatever the section
/// still defines keeps the kinds from reporting the same mistake again.
pub type SectionParseFn = fn(&Node, &SectionCtx) -> (Box<dyn Any + Send + Sync>, Vec<Diagnostic>);

/// What the pipeline parser knows about a top-level section.
pub struct SectionEntry {
    /// Its top-level key.
    pub name: &'static str,
    /// One line on what it holds (its description in the JSON Schema).
    pub about: &'static str,
    pub parse: SectionParseFn,
    /// JSON Schema of the section's value (types it names go in the generator's `$defs`).
    pub schema: fn(&mut schemars::SchemaGenerator) -> serde_json::Value,
}

/// What a section's parser sees.
pub struct SectionCtx<'a> {
    /// The pipeline file, for diagnostics.
    pub file: &'a Path,
    /// Its folder: relative paths in the section start here.
    pub dir: &'a Path,
}

/// Context for building a stage object from its YAML.
#[derive(Debug, Clone)]
pub struct BuildCtx {
    pub file: PathBuf,
    pub dir: PathBuf,
    /// The parsed top-level sections by name (see [`sections`]); one the file leaves out is
    /// absent.
    pub sections: BTreeMap<&'static str, Arc<dyn Any + Send + Sync>>,
}

impl BuildCtx {
    /// The parsed section `name`, as the type its parser made; `None` when the file has no
    /// such section.
    pub fn section<T: Any>(&self, name: &str) -> Option<&T> {
        self.sections.get(name)?.downcast_ref()
    }
}

/// Deserialize a kind's config from its node and let it check itself.
pub fn build<T: DeserializeOwned + Stage + 'static>(
    node: &Node,
    ctx: &BuildCtx,
) -> Result<Box<dyn Stage>, Vec<Diagnostic>> {
    let mut t: T = node.deserialize("").map_err(|e| {
        vec![Diagnostic::new(
            &ctx.file,
            e.pos.unwrap_or(node.pos),
            e.to_string(),
        )]
    })?;
    t.prepare(node, ctx)?;
    Ok(Box::new(t))
}

/// How many `from` tables a kind takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    One,
    AtLeastOne,
}

/// A kind's parsed config as JSON: what its fingerprint is derived from. Every kind's config
/// is a serde type, so this comes with it.
pub trait Config {
    fn config(&self) -> serde_json::Value;
}

impl<T: serde::Serialize> Config for T {
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// The fingerprint of a stage's config (what decides whether its stored table is reused,
/// with its kind, version and parents'): its whole parsed config minus the fields the kind
/// names in [`Stage::fingerprint_excludes`], plus [`Stage::fingerprint_extra`]. Derived, not
/// listed, so a field a kind adds is covered without anyone remembering to list it.
pub fn fingerprint(stage: &dyn Stage) -> serde_json::Value {
    let mut config = stage.config();
    if let serde_json::Value::Object(fields) = &mut config {
        for excluded in stage.fingerprint_excludes() {
            fields.remove(*excluded);
        }
        let extra = stage.fingerprint_extra();
        if !extra.is_null() {
            // Not a field name any kind can have (fields are identifiers).
            fields.insert("(extra)".into(), extra);
        }
    }
    config
}

pub trait Stage: AsAny + Config + std::fmt::Debug + Send + Sync {
    /// Bump when the kind's output for the same config changes, so stored tables are redone.
    fn version(&self) -> u32 {
        1
    }

    fn arity(&self) -> Arity {
        Arity::One
    }

    /// Does the stage need the `_id` row-identity column in its input?
    fn needs_id(&self) -> bool {
        false
    }

    /// Post-deserialization checks and loading of referenced files (SQL, templates).
    fn prepare(&mut self, _node: &Node, _ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        Ok(())
    }

    /// Tables read besides `from`, each with the YAML path of where it is named.
    fn extra_deps(&self) -> Vec<(String, Vec<String>)> {
        Vec::new()
    }

    /// Side tables written next to the main one, registered for SQL as `<id>__<name>`.
    fn side_tables(&self) -> &'static [&'static str] {
        &[]
    }

    /// Evaluation sets the stage keeps out of training data (name, file): `decontaminate`'s
    /// references. A pipeline input that reads one of these files gets a warning when the
    /// pipeline is checked: the run trains on an evaluation set.
    fn evaluation_files(&self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }

    /// Config fields that cannot change the table (operational settings: endpoints,
    /// concurrency), left out of the [`fingerprint`]; each kind says why beside its list.
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &[]
    }

    /// What the table depends on that the config's fields do not show as written: text
    /// loaded from files when the stage was built, settings resolved from defaults, the part
    /// of an excluded group that does change results. Added to the [`fingerprint`].
    fn fingerprint_extra(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Files the stage writes outside its table (an output's datasets): the stage is redone
    /// when one of them has gone missing.
    fn external_outputs(&self, _run_dir: &Path) -> Vec<PathBuf> {
        Vec::new()
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>>;

    /// The output schema when [`plan`](Stage::plan) found errors that leave it known (a
    /// template naming a missing column does not change the columns an llm stage adds). With
    /// it the stages downstream are still checked, so one validation reports their mistakes
    /// too; without it (`None`, the default) they are skipped, as their errors could be
    /// consequences of this stage's.
    fn schema_despite_errors(&self, _ctx: &PlanCtx) -> Option<SchemaRef> {
        None
    }

    /// For `run --dry-run`, asked of kinds with [`Capability::SendsRequests`] (the others run
    /// normally in a dry run): what the stage would send, without sending it.
    fn dry_run(&self, _ctx: &RunCtx) -> Result<String> {
        Ok("    (this kind shows nothing of what it would send)".into())
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput>;
}

/// The concrete stage behind a `dyn Stage`, for the verbs that work on one kind's stages
/// (`batch` on llm stages): `stage.downcast_ref::<LlmStage>()`.
pub trait AsAny {
    fn as_any(&self) -> &dyn std::any::Any;
}

impl<T: std::any::Any> AsAny for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl dyn Stage {
    pub fn downcast_ref<T: Stage + 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
}

/// What `plan` sees.
pub struct PlanCtx<'a> {
    /// The stage's id.
    pub id: &'a str,
    /// The stage's YAML node, for the positions of diagnostics.
    pub node: &'a Node,
    pub file: &'a Path,
    /// Schemas of every dependency (`from` first, in order, then extra deps).
    pub parents: Vec<(String, SchemaRef)>,
    pub engine: &'a Engine,
}

impl PlanCtx<'_> {
    /// A diagnostic at the YAML path inside this stage.
    pub fn err(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.file, self.node.pos_at(path), message).stage(self.id)
    }

    pub fn parent(&self) -> &SchemaRef {
        &self.parents[0].1
    }

    pub fn schema_of(&self, id: &str) -> Option<&SchemaRef> {
        self.parents.iter().find(|(n, _)| n == id).map(|(_, s)| s)
    }
}

/// What `run` sees.
pub struct RunCtx<'a> {
    pub id: &'a str,
    /// Dependencies in the same order as `PlanCtx::parents`.
    pub parents: Vec<Table>,
    /// The schema `plan` returned.
    pub schema: SchemaRef,
    /// The stage's temporary folder: write `part-*.parquet` here, side tables in `<name>/`.
    pub out: &'a Path,
    pub engine: &'a Engine,
    /// Finished input tables, in declaration order (dedup ranks rows by their position).
    pub inputs: Vec<Table>,
    pub run_dir: &'a Path,
    /// The run's stop signals (Ctrl-C, its grace period); [`Cancel::for_stage`] gives a stage
    /// one of its own to stop.
    pub cancel: &'a Cancel,
}

impl RunCtx<'_> {
    pub fn parent(&self) -> &Table {
        &self.parents[0]
    }

    pub fn side_dir(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }
}

/// Counters a stage reports (rows removed, hits, ...), stored in its manifest.
#[derive(Debug, Default, Clone)]
pub struct RunOutput {
    pub counters: BTreeMap<String, i64>,
}

/// A diagnostic for a missing column, with "did you mean".
pub fn unknown_column(ctx: &PlanCtx, path: &[&str], col: &str, schema: &SchemaRef) -> Diagnostic {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    ctx.err(path, format!("unknown column `{col}`"))
        .maybe_hint(crate::error::did_you_mean(col, names.iter().copied()))
        .hint_if_none(format!("available columns: {}", names.join(", ")))
}

/// A problem with the text column a kind works on (`column:`): unknown, or not a string.
pub fn text_column(ctx: &PlanCtx, column: &str, kind: &str) -> Option<Diagnostic> {
    let schema = ctx.parent();
    match schema.field_with_name(column) {
        Err(_) => Some(unknown_column(ctx, &["column"], column, schema)),
        Ok(f) if !crate::table::is_string_type(f.data_type()) => Some(
            ctx.err(
                &["column"],
                format!(
                    "column `{column}` is {}, but {kind} needs a string column",
                    f.data_type()
                ),
            )
            .hint(format!(
                "cast it upstream, e.g. `SELECT CAST({column} AS VARCHAR) AS {column}`"
            )),
        ),
        Ok(_) => None,
    }
}

/// A problem for each column a kind adds that its input already has (`adds` ends the
/// message: "which minhash adds").
pub fn reserved_columns(ctx: &PlanCtx, reserved: &[&str], adds: &str) -> Vec<Diagnostic> {
    reserved
        .iter()
        .filter(|c| crate::table::has_col(ctx.parent(), c))
        .map(|c| {
            ctx.err(
                &["from"],
                format!("the input already has a `{c}` column, {adds}"),
            )
            .hint("drop or rename it upstream")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind with one field that changes its table and one that cannot.
    #[derive(Debug, serde::Serialize)]
    struct Probe {
        threshold: u32,
        workers: u32,
    }

    impl Stage for Probe {
        // How many threads work cannot change the rows.
        fn fingerprint_excludes(&self) -> &'static [&'static str] {
            &["workers"]
        }
        fn plan(&self, _ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
            Err(Vec::new())
        }
        fn run(&self, _ctx: &RunCtx) -> Result<RunOutput> {
            Ok(RunOutput::default())
        }
    }

    #[test]
    fn a_config_field_changes_the_fingerprint_unless_excluded() {
        let base = fingerprint(&Probe {
            threshold: 5,
            workers: 2,
        });
        let other_threshold = fingerprint(&Probe {
            threshold: 6,
            workers: 2,
        });
        let other_workers = fingerprint(&Probe {
            threshold: 5,
            workers: 8,
        });
        assert_ne!(base, other_threshold);
        assert_eq!(base, other_workers);
        assert_eq!(base, serde_json::json!({"threshold": 5}));
    }
}
