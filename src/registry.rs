//! The registry of modules: everything the core knows of a method or a benchmark comes from
//! its [`Module`] declaration, one line in [`modules`]. The pipeline parser finds kinds here,
//! the engine is given the functions, `stats` computes the sections and `report` draws the
//! charts; none of them names a module.

use std::sync::OnceLock;

use datafusion::logical_expr::ScalarUDF;

use crate::module::{CannedQuery, Module};
use crate::stages::{Capability, KindEntry};

/// The core: the kinds every pipeline may use, the general SQL functions, and the canned
/// queries of the funnel, LLM accounting, pass rates and dataset figures.
pub static CORE: Module = Module {
    name: "core",
    kinds: crate::stages::KINDS,
    functions: core_functions,
    queries: &[
        ("funnel.sql", include_str!("../sql/funnel.sql")),
        (
            "llm_accounting.sql",
            include_str!("../sql/llm_accounting.sql"),
        ),
        ("llm_latency.sql", include_str!("../sql/llm_latency.sql")),
        ("removed.sql", include_str!("../sql/removed.sql")),
        (
            "contamination.sql",
            include_str!("../sql/contamination.sql"),
        ),
        ("pass_rates.sql", include_str!("../sql/pass_rates.sql")),
        (
            "pass_rates_by_round.sql",
            include_str!("../sql/pass_rates_by_round.sql"),
        ),
        (
            "pass_rates_by_question.sql",
            include_str!("../sql/pass_rates_by_question.sql"),
        ),
        (
            "pass_rates_by_category.sql",
            include_str!("../sql/pass_rates_by_category.sql"),
        ),
        ("text_length.sql", include_str!("../sql/text_length.sql")),
        ("list_length.sql", include_str!("../sql/list_length.sql")),
        ("histogram.sql", include_str!("../sql/histogram.sql")),
        (
            "length_histogram.sql",
            include_str!("../sql/length_histogram.sql"),
        ),
        (
            "rows_per_stage.sql",
            include_str!("../sql/rows_per_stage.sql"),
        ),
        (
            "duplicates_removed.sql",
            include_str!("../sql/duplicates_removed.sql"),
        ),
    ],
    sections: &[],
    charts: &[],
    shares: &[],
};

fn core_functions() -> Vec<ScalarUDF> {
    let mut f = crate::udf::functions();
    f.push(crate::stages::yes_no::udf());
    f
}

/// Every module, core first. The order is the order of kinds in the schema and of sections
/// and charts in `stats` and the report.
pub fn modules() -> &'static [&'static Module] {
    static MODULES: &[&Module] = &[
        &CORE,
        &crate::benchmarks::ifeval::MODULE,
        &crate::benchmarks::eifbench::MODULE,
        &crate::benchmarks::infobench::MODULE,
        &crate::methods::autoif::MODULE,
        &crate::benchmarks::trace::MODULE,
        &crate::benchmarks::followbench::MODULE,
    ];
    MODULES
}

/// Every stage kind of every module.
pub fn kinds() -> &'static [&'static KindEntry] {
    static KINDS: OnceLock<Vec<&'static KindEntry>> = OnceLock::new();
    KINDS.get_or_init(|| modules().iter().flat_map(|m| m.kinds.iter()).collect())
}

/// The registry entry of a kind, by name (`None` for `input` and unknown names).
pub fn kind(name: &str) -> Option<&'static KindEntry> {
    kinds().iter().copied().find(|k| k.name == name)
}

/// Does the kind of this name declare this capability? (`input` tables declare none.)
pub fn kind_can(name: &str, capability: Capability) -> bool {
    kind(name).is_some_and(|k| k.can(capability))
}

/// Every module's SQL functions, for [`crate::engine::Engine::new`].
pub fn functions() -> Vec<ScalarUDF> {
    modules().iter().flat_map(|m| (m.functions)()).collect()
}

/// Every module's canned queries.
pub fn queries() -> impl Iterator<Item = &'static CannedQuery> {
    modules().iter().flat_map(|m| m.queries.iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_across_modules() {
        let mut kinds: Vec<&str> = kinds().iter().map(|k| k.name).collect();
        let n = kinds.len();
        kinds.sort();
        kinds.dedup();
        assert_eq!(kinds.len(), n, "a kind is registered twice");
        let mut functions: Vec<String> = functions().iter().map(|f| f.name().to_string()).collect();
        let n = functions.len();
        functions.sort();
        functions.dedup();
        assert_eq!(functions.len(), n, "a function is registered twice");
        let mut sections: Vec<&str> = modules()
            .iter()
            .flat_map(|m| {
                m.sections
                    .iter()
                    .flat_map(|g| g.sections.iter().map(|s| s.id))
            })
            .collect();
        let n = sections.len();
        sections.sort();
        sections.dedup();
        assert_eq!(sections.len(), n, "a stats section id is declared twice");
    }

    #[test]
    fn declared_figures_name_what_exists() {
        let queries: Vec<&str> = queries().map(|(n, _)| *n).collect();
        let kinds: Vec<&str> = kinds().iter().map(|k| k.name).collect();
        for m in modules() {
            for g in m.sections {
                for k in g.kinds {
                    assert!(
                        kinds.contains(k),
                        "{}: sections for unknown kind {k}",
                        m.name
                    );
                }
                for s in g.sections {
                    assert!(
                        queries.contains(&s.query),
                        "{}: section {} runs {}, which no module compiles in",
                        m.name,
                        s.id,
                        s.query
                    );
                }
            }
            for c in m.charts {
                assert!(
                    m.sections
                        .iter()
                        .any(|g| g.sections.iter().any(|s| s.id == c.section)),
                    "{}: chart of section {}, which the module does not declare",
                    m.name,
                    c.section
                );
            }
        }
    }

    /// Every field of every kind's config is in its fingerprint unless the kind excludes it
    /// (and an exclusion names a real field), over the stages of every shipped pipeline.
    #[test]
    fn fingerprints_cover_every_config_field_but_the_excluded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        let mut kinds_seen = std::collections::BTreeSet::new();
        for file in files {
            let Ok((pipeline, _)) = crate::spec::load(&file, &[], &|k| std::env::var(k).ok())
            else {
                continue;
            };
            for s in &pipeline.stages {
                let entry = kind(&s.kind).unwrap();
                let fields: Vec<String> = entry
                    .fields()
                    .into_iter()
                    .filter(|f| !["id", "kind", "from", "description"].contains(&f.as_str()))
                    .collect();
                let excluded = s.stage.fingerprint_excludes();
                let fp = crate::stages::fingerprint(&*s.stage);
                let fp = fp.as_object().unwrap();
                for f in &fields {
                    assert!(
                        excluded.contains(&f.as_str()) || fp.contains_key(f),
                        "{}: stage {} ({}): field `{f}` is neither in the fingerprint nor excluded",
                        file.display(),
                        s.id,
                        s.kind
                    );
                }
                for e in excluded {
                    assert!(
                        fields.iter().any(|f| f == e),
                        "kind {}: excludes `{e}`, which is not one of its fields",
                        s.kind
                    );
                }
                kinds_seen.insert(s.kind.clone());
            }
        }
        // The shipped pipelines use nearly every kind: the check is not vacuous.
        assert!(kinds_seen.len() >= 14, "kinds checked: {kinds_seen:?}");
    }
}
