//! TRACE (Tongyi-CCAI/Complex-IF): a judge scores each constraint of an instruction 0-10;
//! `kind: constraint_scores` reads the scores ([`stage`]), and this module adds constraint-
//! and instruction-level accuracy (per constraint category where the table lists them) to
//! `stats` and the report.

pub mod stage;

use crate::module::{Chart, Column, Module, Param, SectionDecl, SectionGroup, no_functions};

pub static MODULE: Module = Module {
    name: "trace",
    kinds: &[stage::KIND],
    functions: no_functions,
    queries: &[
        (
            "constraint_accuracy.sql",
            include_str!("../../../sql/constraint_accuracy.sql"),
        ),
        (
            "constraint_accuracy_by_category.sql",
            include_str!("../../../sql/constraint_accuracy_by_category.sql"),
        ),
        (
            "constraint_accuracy_by_count.sql",
            include_str!("../../../sql/constraint_accuracy_by_count.sql"),
        ),
    ],
    sections: &[SectionGroup {
        kinds: &["constraint_scores"],
        sections: &[
            SectionDecl {
                id: "constraint_accuracy",
                title: "Constraint scores: constraint / instruction level accuracy",
                keys: 1,
                query: "constraint_accuracy.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
            SectionDecl {
                id: "constraint_accuracy_by_category",
                title: "Constraint-level accuracy per constraint category",
                keys: 1,
                query: "constraint_accuracy_by_category.sql",
                params: &[
                    ("table", Param::Table),
                    ("categories", Param::Text("categories")),
                ],
                requires: &[Column::List("categories")],
            },
            SectionDecl {
                id: "constraint_accuracy_by_count",
                title: "Constraint scores per number of constraints per instruction",
                keys: 1,
                query: "constraint_accuracy_by_count.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
        ],
    }],
    charts: &[
        Chart {
            section: "constraint_accuracy",
            unless: None,
            title: "Constraint scores: accuracy",
            axis: "share satisfied (%)",
            label: "{table}",
            series: &[
                ("constraint_level_acc", "constraint level"),
                ("instruction_level_acc", "instruction level"),
            ],
            percent: true,
        },
        Chart {
            section: "constraint_accuracy_by_category",
            unless: None,
            title: "Constraint-level accuracy per category",
            axis: "share satisfied (%)",
            label: "{category}",
            series: &[("constraint_level_acc", "accuracy")],
            percent: true,
        },
        Chart {
            section: "constraint_accuracy_by_count",
            unless: None,
            title: "Constraint scores per number of constraints",
            axis: "share satisfied (%)",
            label: "{n_constraints} constraints",
            series: &[
                ("constraint_level_acc", "constraint level"),
                ("instruction_level_acc", "instruction level"),
            ],
            percent: true,
        },
    ],
    shares: &[],
};
