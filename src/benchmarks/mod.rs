//! Benchmarks, one folder each: the rules (pure code over texts, no tables), the stage kinds
//! that run them over tables, their SQL functions, and the figures they add to `stats` and the
//! report, all declared in the folder's `MODULE` (see [`crate::registry`]).

pub mod eifbench;
pub mod followbench;
pub mod ifeval;
pub mod infobench;
pub mod trace;
