//! Python's behaviours where a reference implementation's verdict depends on them, reproduced
//! in Rust: what `json.loads` accepts ([`pyjson`]) and `str`'s whitespace, case and `\w` rules
//! ([`pytext`]). IFEval's checks and AutoIF's answer parsing both read text as Python does.

pub mod pyjson;
pub mod pytext;
