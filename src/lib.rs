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
//! - [`yaml`]: a positioned YAML tree and a serde deserializer over it (every error at its
//!   line:column, many errors per file).
//! - [`spec`]: the pipeline file's types and loading (named steps that each collect errors),
//!   `${params.x}` / `${ENV}` interpolation, the top-level sections of stage families.
//! - [`compile`]: spec → plan: ids, references, cycles, inputs and each stage's output schema,
//!   with all problems reported together.
//! - [`stages`]: the [`stages::Stage`] trait, the registry of kinds with their
//!   [`stages::Capability`]s, and one file or folder per kind (`sql`, `transform`, `dedup`,
//!   `minhash`, `decontaminate`, `output`, `export`, `verdict`, `ifeval`, `llm/`); adding a kind is its
//!   file plus one line in [`stages::registry`]. The core asks for capabilities, never names.
//! - [`ifeval`]: IFEval's 25 verifiable-instruction checks (strict and loose) with the
//!   Python behaviours they depend on (Punkt sentences, NLTK word cuts, langdetect, `json`,
//!   `str` case rules); the `ifeval` kind runs them over tables.
//! - [`table`]: finished tables and the helpers every kind reads them with.
//! - [`input`]: reading Parquet / JSONL / JSON / CSV inputs and giving each row its `_id`.
//! - [`llm`]: the LLM client library behind the `llm` kind: canonical requests and their
//!   ids, the endpoint pool (retries, concurrency) and its HTTP transport, response decoding,
//!   the SQLite response cache, and parsing of messy output.
//! - [`engine`]: the DataFusion session (bounded memory) and the Parquet bridge to Polars.
//! - [`store`]: the run directory: manifests, atomic stage commits, the run lock.
//! - [`exec`]: running a plan, reusing stages whose fingerprint has not changed.
//! - [`target`]: runs that stop at a target (`run --target TABLE=N`): passes on growing input
//!   prefixes sized by the yield seen so far, a request budget, resume from `target.json`.
//! - [`cancel`]: the run's stop signals (Ctrl-C, its grace period, a failed stage) as one
//!   handle every stage gets.
//! - [`query`]: `ifloom sql` over a run's tables.
//! - [`sim`]: a simulated OpenAI-compatible server behaving like vLLM under load (latency,
//!   queueing, seeded faults, rule-based answers) for tests, benchmarks and offline demos.
//! - [`sandbox`]: untrusted Python (LLM-written verifier functions) run in a pool of locked-down
//!   worker processes, never in ifloom's, with a result cache; the AutoIF kinds use it.
//! - [`report`]: `ifloom report`: one self-contained HTML page, inline SVG charts, sample rows.
//! - [`stats`]: `ifloom stats`: funnel, LLM accounting, pass rates and dataset figures, each
//!   from one canned query of `sql/`; `--compare` pairs two runs.
//! - [`udf`]: SQL functions ifloom adds to DataFusion (`to_json`).
//! - [`cli`]: the command-line verbs, one file each.
//! - [`json`]: canonical JSON (sorted keys) for everything that is hashed.
//! - [`error`]: typed errors and diagnostics.

pub mod cancel;
pub mod cli;
pub mod compile;
pub mod engine;
pub mod error;
pub mod exec;
pub mod ifeval;
pub mod input;
pub mod json;
pub mod llm;
pub mod query;
pub mod report;
pub mod sandbox;
pub mod sim;
pub mod spec;
pub mod stages;
pub mod stats;
pub mod store;
pub mod table;
pub mod target;
pub mod udf;
pub mod yaml;
