//! # ifloom
//!
//! A dataflow engine for building instruction-following training data. A YAML pipeline file
//! names inputs and stages; ifloom validates the whole pipeline (schema, graph, columns)
//! before doing any work, runs each stage as a lazy DataFusion SQL or Polars transform over
//! Parquet, keeps every stage's table in a run directory, and lets you query any of them with
//! SQL.
//!
//! ## Layout
//!
//! The binary is a thin `main` over [`cli`]; the crate's public surface is what it, the
//! tests and the benches use ([`cli`], [`sandbox`], [`stats`], [`sim`]), everything else is
//! `pub(crate)`.
//!
//! Layers from the bottom up; a module imports only from its own layer's foundations and the
//! layers below it (the one circle is inherent: the pipeline parser looks kinds up in the
//! registry, and the registry holds what kinds are).
//!
//! 1. Foundations:
//!    - [`yaml`]: a positioned YAML tree and a serde deserializer over it (every error at
//!      its line:column, many errors per file).
//!    - [`error`]: typed errors and diagnostics. [`json`]: canonical JSON (sorted keys) for
//!      everything that is hashed. [`cancel`]: the run's stop signals (Ctrl-C, its grace
//!      period, a failed stage) as one handle every stage gets.
//!    - [`python`]: Python's behaviours that reference verdicts depend on (`json.loads`,
//!      `str` rules).
//! 2. Data: [`table`] (finished tables, the `_id` column, the helpers every kind reads them
//!    with), [`input`] (the input section's types; reading Parquet / JSONL / JSON / CSV /
//!    text and giving each row its `_id`), [`engine`] (the DataFusion session with bounded
//!    memory and the functions it is given; the Parquet bridge to Polars), [`store`] (the run
//!    directory: manifests, atomic stage commits, the run lock).
//! 3. Services the kinds call: [`llm_client`] (canonical requests and their ids, the
//!    endpoint pool and its HTTP transport, response decoding, the SQLite response cache,
//!    parsing of messy output), [`sandbox`] (untrusted Python run in locked-down worker
//!    processes, never in ifloom's, with a result cache), [`udf`] (the general SQL
//!    functions: `to_json`, `word_count`, `py_repr`, `string_list`, `struct_entries`).
//! 4. Stage kinds: [`stages`] (the [`stages::Stage`] trait, [`stages::Capability`], and the
//!    kinds every pipeline may use, one file or folder each), [`module`] (what a method or a
//!    benchmark declares: kinds, SQL functions, canned queries, stats sections, report
//!    charts), [`benchmarks`] (IFEval, InfoBench, EIFBench, FollowBench, TRACE: one folder
//!    each with its rules, kinds and declaration) and [`methods`] (AutoIF).
//! 5. [`registry`]: the list of modules, and what the core asks of them (kinds by name,
//!    capabilities, functions, canned queries).
//! 6. The pipeline: [`spec`] (the pipeline file's types and loading, `${params.x}` /
//!    `${ENV}` interpolation, the top-level sections of stage families), [`compile`] (spec →
//!    plan: ids, references, cycles, inputs and each stage's output schema, all problems
//!    reported together).
//! 7. Running and reading runs: [`exec`] (running a plan, reusing stages whose fingerprint
//!    has not changed), [`target`] (runs that stop at a target), [`query`] (`ifloom sql` over
//!    a run's tables), [`stats`] (the figures, each from one canned query of `sql/`;
//!    `--compare`), [`report`] (one self-contained HTML page, inline SVG charts, sample rows).
//! 8. [`sim`]: a simulated OpenAI-compatible server behaving like vLLM under load, for tests,
//!    benchmarks and offline demos; [`cli`]: the command-line verbs, one file each.
//!
//! Adding a benchmark touches its folder under `benchmarks/` (rules, kinds, `MODULE`), one
//! line in [`registry::modules`], its pipeline, its SQL, its tests and its docs page.

pub(crate) mod benchmarks;
pub(crate) mod cancel;
pub mod cli;
pub(crate) mod compile;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod exec;
pub(crate) mod input;
pub(crate) mod json;
pub(crate) mod llm_client;
pub(crate) mod methods;
pub(crate) mod module;
pub(crate) mod python;
pub(crate) mod query;
pub(crate) mod registry;
pub(crate) mod report;
pub mod sandbox;
pub mod sim;
pub(crate) mod spec;
pub(crate) mod stages;
pub mod stats;
pub(crate) mod store;
pub(crate) mod table;
pub(crate) mod target;
pub(crate) mod udf;
pub(crate) mod yaml;
