//! All integration tests, compiled into one binary (one link instead of one per file).
//! They drive the real `ifloom` binary as a subprocess over real files.

mod common;

mod autoif;
mod bad_pipelines;
mod cache_batch;
mod decontamination;
mod docs;
mod eifbench;
mod engine;
mod export;
mod followbench;
mod ifeval;
mod infobench;
mod iopo;
mod llm;
mod llm_features;
mod near_dup;
mod real_model;
mod reference;
mod report;
mod sim;
mod slt;
mod stats;
mod target;
mod trace;
mod ultraif;
mod verifiable_if;
