//! Stage kinds. Every kind implements [`Stage`]: *plan* (given the parents' Arrow schemas,
//! return this stage's output schema or every problem found, with no I/O beyond schema reads)
//! and *run* (given the parents' Parquet files, write this stage's table).
//!
//! Adding a kind is one new file plus one line in [`registry`]. A top-level section of the
//! pipeline file that only one family of kinds reads (`endpoints:` for llm stages) is one
//! [`SectionEntry`] in [`sections`], parsed by that family's module.

use std::any::Any;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use serde::de::DeserializeOwned;

use crate::engine::Engine;
use crate::error::{Diagnostic, Result};
use crate::spec::StageDef;
use crate::yaml::Node;

pub mod decontaminate;
pub mod dedup;
pub mod export;
pub mod minhash;
pub mod output;
pub mod sql;
pub mod transform;
pub mod verdict;

/// The registry of stage kinds.
pub fn registry() -> &'static [KindEntry] {
    static KINDS: &[KindEntry] = &[
        sql::KIND,
        transform::KIND,
        dedup::KIND,
        minhash::KIND,
        decontaminate::KIND,
        output::KIND,
        export::KIND,
        verdict::KIND,
        crate::llm::KIND,
    ];
    KINDS
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
}

impl KindEntry {
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
    static SECTIONS: &[SectionEntry] = &[crate::llm::endpoints::SECTION];
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

pub trait Stage: std::fmt::Debug + Send + Sync {
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

    /// The semantic configuration: what the fingerprint covers. Operational settings
    /// (concurrency, endpoints, timeouts) must not be in it.
    fn fingerprint(&self) -> serde_json::Value;

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

    /// The LLM stage behind this object, for the verbs that work on LLM requests.
    fn llm(&self) -> Option<&crate::llm::LlmStage> {
        None
    }

    /// For `run --dry-run`: what the stage would send, without sending it. `None` for kinds
    /// that send nothing (they run normally in a dry run).
    fn dry_run(&self, _ctx: &RunCtx) -> Option<Result<String>> {
        None
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput>;
}

/// What `plan` sees.
pub struct PlanCtx<'a> {
    pub def: &'a StageDef,
    pub file: &'a Path,
    /// Schemas of every dependency (`from` first, in order, then extra deps).
    pub parents: Vec<(String, SchemaRef)>,
    pub engine: &'a Engine,
}

impl PlanCtx<'_> {
    /// A diagnostic at the YAML path inside this stage.
    pub fn err(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        Diagnostic::new(self.file, self.def.node.pos_at(path), message).stage(&self.def.id)
    }

    pub fn parent(&self) -> &SchemaRef {
        &self.parents[0].1
    }

    pub fn schema_of(&self, id: &str) -> Option<&SchemaRef> {
        self.parents.iter().find(|(n, _)| n == id).map(|(_, s)| s)
    }
}

/// One finished table: its Parquet files and schema.
#[derive(Debug, Clone)]
pub struct Table {
    pub id: String,
    pub files: Vec<PathBuf>,
    pub schema: SchemaRef,
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

/// Schema helper: does the schema have this column?
pub fn has_col(schema: &SchemaRef, name: &str) -> bool {
    schema.field_with_name(name).is_ok()
}

/// A diagnostic for a missing column, with "did you mean".
pub fn unknown_column(ctx: &PlanCtx, path: &[&str], col: &str, schema: &SchemaRef) -> Diagnostic {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    ctx.err(path, format!("unknown column `{col}`"))
        .maybe_hint(crate::error::did_you_mean(col, names.iter().copied()))
        .hint_if_none(format!("available columns: {}", names.join(", ")))
}

pub trait HintIfNone {
    fn hint_if_none(self, h: String) -> Self;
}

impl HintIfNone for Diagnostic {
    fn hint_if_none(self, h: String) -> Self {
        if self.hint.is_some() {
            self
        } else {
            self.hint(h)
        }
    }
}

pub fn arc_schema(s: arrow::datatypes::Schema) -> SchemaRef {
    Arc::new(s)
}
