//! AutoIF (QwenLM/AutoIF): verifier functions written by an LLM, cross-validated on test
//! cases in the Python sandbox (`kind: cross_validate`, [`cross_validate`]) and run on
//! responses (`kind: run_verifiers`, [`run_verifiers`]), and an NLI classifier behind HTTP
//! for the contradiction filter (`kind: nli_classifier`, [`nli`]); this module adds the
//! function-level funnel to `stats`.

pub mod cross_validate;
pub mod nli;
pub mod run_verifiers;

use crate::module::{Module, Param, SectionDecl, SectionGroup, no_functions};

pub static MODULE: Module = Module {
    name: "autoif",
    kinds: &[cross_validate::KIND, run_verifiers::KIND, nli::KIND],
    functions: no_functions,
    queries: &[(
        "verifier_functions.sql",
        include_str!("../../../sql/verifier_functions.sql"),
    )],
    sections: &[SectionGroup {
        kinds: &["cross_validate"],
        sections: &[
            SectionDecl {
                id: "verifier_functions",
                title: "Verifier functions: answers parsed and compiled, functions and cases kept",
                keys: 1,
                query: "verifier_functions.sql",
                params: &[("table", Param::Table), ("by", Param::Text("'all'"))],
                requires: &[],
            },
            SectionDecl {
                id: "verifier_drops",
                title: "Verifier functions: instructions per drop reason (null: kept)",
                keys: 1,
                query: "verifier_functions.sql",
                params: &[("table", Param::Table), ("by", Param::Text("drop_reason"))],
                requires: &[],
            },
        ],
    }],
    charts: &[],
    shares: &[],
};
