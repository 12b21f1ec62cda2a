//! Data-generation methods with code of their own, one folder each (UltraIF and IOPO are
//! pipelines over the core kinds and need none), declared in the folder's `MODULE` (see
//! [`crate::registry`]).

pub mod autoif;
