//! FollowBench (YJiangcm/FollowBench): five levels of added constraints. The rule-based
//! checkers and the judge-answer parsing ([`rules`]), `kind: followbench` that gives each
//! instruction its verdict ([`stage`]), the SQL function `followbench_checker` that tells a
//! pipeline which rows a rule checks ([`function`]), and HSR / SSR / CSL in `stats` and the
//! report.

pub mod function;
pub mod rules;
pub mod stage;

use crate::module::{Chart, Module, Param, SectionDecl, SectionGroup};

const RATES: &[(&str, &str)] = &[("hsr", "HSR"), ("ssr", "SSR")];

fn functions() -> Vec<datafusion::logical_expr::ScalarUDF> {
    vec![function::udf()]
}

pub static MODULE: Module = Module {
    name: "followbench",
    kinds: &[stage::KIND],
    functions,
    queries: &[
        (
            "followbench_cells.sql",
            include_str!("../../../sql/followbench_cells.sql"),
        ),
        (
            "followbench_levels.sql",
            include_str!("../../../sql/followbench_levels.sql"),
        ),
        (
            "followbench_types.sql",
            include_str!("../../../sql/followbench_types.sql"),
        ),
    ],
    sections: &[SectionGroup {
        kinds: &["followbench"],
        sections: &[
            SectionDecl {
                id: "followbench_types",
                title: "FollowBench per constraint type: HSR, SSR (mean over levels, and weighted by level), CSL",
                keys: 2,
                query: "followbench_types.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
            SectionDecl {
                id: "followbench_levels",
                title: "FollowBench per level: HSR and SSR (mean over constraint types)",
                keys: 2,
                query: "followbench_levels.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
            SectionDecl {
                id: "followbench_cells",
                title: "FollowBench per constraint type and level: HSR and SSR",
                keys: 3,
                query: "followbench_cells.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
        ],
    }],
    charts: &[
        Chart {
            section: "followbench_levels",
            unless: None,
            title: "FollowBench per level (mean over constraint types)",
            axis: "satisfaction rate (%)",
            label: "{table} level {level}",
            series: RATES,
            percent: true,
        },
        Chart {
            section: "followbench_types",
            unless: None,
            title: "FollowBench per constraint type (mean over levels)",
            axis: "satisfaction rate (%)",
            label: "{table} {constraint_type}",
            series: RATES,
            percent: true,
        },
        Chart {
            section: "followbench_types",
            unless: None,
            title: "FollowBench consistent satisfaction levels (CSL) per constraint type",
            axis: "levels satisfied in a row from level 1 (0-5)",
            label: "{table} {constraint_type}",
            series: &[("csl", "CSL")],
            percent: false,
        },
    ],
    shares: &["hsr", "ssr"],
};
