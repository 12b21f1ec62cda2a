//! IFEval (google-research `instruction_following_eval`): the 25 verifiable-instruction checks
//! ([`checks`]), `kind: ifeval` that runs them over responses ([`stage`]), `kind:
//! ifeval_constraints` that attaches them to prompts for verifiable-constraint data
//! ([`constraints`]), and the four accuracies in `stats` and the report.

pub mod checks;
pub mod constraints;
pub mod stage;

use crate::module::{Chart, Column, Module, Param, SectionDecl, SectionGroup, no_functions};

pub static MODULE: Module = Module {
    name: "ifeval",
    kinds: &[stage::KIND, constraints::KIND],
    functions: no_functions,
    queries: &[
        (
            "ifeval_accuracy.sql",
            include_str!("../../../sql/ifeval_accuracy.sql"),
        ),
        (
            "ifeval_by_type.sql",
            include_str!("../../../sql/ifeval_by_type.sql"),
        ),
    ],
    sections: &[SectionGroup {
        kinds: &["ifeval"],
        sections: &[
            SectionDecl {
                id: "ifeval",
                title: "IFEval accuracy (prompt / instruction level, strict / loose)",
                keys: 1,
                query: "ifeval_accuracy.sql",
                params: &[("table", Param::Table)],
                requires: &[],
            },
            // Per instruction type where the table names its instructions as IFEval does.
            SectionDecl {
                id: "ifeval_by_type",
                title: "IFEval accuracy per instruction type",
                keys: 2,
                query: "ifeval_by_type.sql",
                params: &[
                    ("table", Param::Table),
                    ("instructions", Param::Text("instruction_id_list")),
                ],
                requires: &[Column::Any("instruction_id_list")],
            },
        ],
    }],
    charts: &[
        Chart {
            section: "ifeval",
            unless: None,
            title: "IFEval accuracy",
            axis: "share of prompts / instructions followed (%)",
            label: "{table}",
            series: &[
                ("prompt_level_strict_acc", "prompt strict"),
                ("inst_level_strict_acc", "instruction strict"),
                ("prompt_level_loose_acc", "prompt loose"),
                ("inst_level_loose_acc", "instruction loose"),
            ],
            percent: true,
        },
        Chart {
            section: "ifeval_by_type",
            unless: None,
            title: "IFEval accuracy by instruction type",
            axis: "share of instructions followed (%)",
            // `detectable_format:number_bullet_lists` → `number_bullet_lists`: the part after
            // the group is unique and fits the label column.
            label: "{instruction_type|tail}",
            series: &[("strict_acc", "strict"), ("loose_acc", "loose")],
            percent: true,
        },
    ],
    shares: &[],
};
