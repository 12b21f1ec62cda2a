//! InfoBench (qinyiwei/InfoBench): decomposed yes/no questions asked one by one, judged by
//! `kind: yes_no` with its `infobench` rule; this module adds DRFR overall and per subset and
//! category to `stats` and the report, for every question table: the reference's own
//! `bool_ratio` first (YES among the questions asked, an unreadable answer counting NO), then
//! the share among readable answers and among all questions.

use crate::module::{Chart, Column, Module, Param, SectionDecl, SectionGroup, no_functions};

const DRFR_SERIES: &[(&str, &str)] = &[
    ("drfr", "asked questions (reference)"),
    ("drfr_judged", "readable answers"),
    ("drfr_all", "all questions"),
];

pub static MODULE: Module = Module {
    name: "infobench",
    kinds: &[],
    functions: no_functions,
    queries: &[("drfr.sql", include_str!("../../../sql/drfr.sql"))],
    sections: &[SectionGroup {
        kinds: &["yes_no"],
        sections: &[
            SectionDecl {
                id: "drfr",
                title: "InfoBench's DRFR: the share of YES among the questions asked (the reference's bool_ratio)",
                keys: 2,
                query: "drfr.sql",
                params: &[("table", Param::Table), ("by", Param::Text("'all'"))],
                requires: &[],
            },
            SectionDecl {
                id: "drfr_by_subset",
                title: "DRFR per subset",
                keys: 2,
                query: "drfr.sql",
                params: &[("table", Param::Table), ("by", Param::Text("subset"))],
                requires: &[Column::Any("subset")],
            },
            SectionDecl {
                id: "drfr_by_category",
                title: "DRFR per category",
                keys: 2,
                query: "drfr.sql",
                params: &[("table", Param::Table), ("by", Param::Text("category"))],
                requires: &[Column::Any("category")],
            },
        ],
    }],
    charts: &[
        Chart {
            section: "drfr",
            unless: None,
            title: "DRFR (the reference's: YES among the questions asked)",
            axis: "share of questions answered YES (%)",
            label: "{table} {slice}",
            series: DRFR_SERIES,
            percent: true,
        },
        Chart {
            section: "drfr_by_subset",
            unless: None,
            title: "DRFR per subset",
            axis: "share of questions answered YES (%)",
            label: "{table} {slice}",
            series: DRFR_SERIES,
            percent: true,
        },
        Chart {
            section: "drfr_by_category",
            unless: None,
            title: "DRFR per category",
            axis: "share of questions answered YES (%)",
            label: "{table} {slice}",
            series: DRFR_SERIES,
            percent: true,
        },
    ],
    shares: &["drfr"],
};
