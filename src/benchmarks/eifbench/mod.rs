//! EIFBench (Tongyi-CCAI/Complex-IF `EIFBench/`): many sub-tasks in one response, judged one
//! question at a time by `kind: yes_no` with its `eifbench` rule; this module adds the three
//! accuracy levels (task, constraint, sub-task) to `stats` and the report for question tables
//! grouped in sub-tasks of items.

use crate::module::{Chart, Column, Module, Param, SectionDecl, SectionGroup, no_functions};

pub static MODULE: Module = Module {
    name: "eifbench",
    kinds: &[],
    functions: no_functions,
    queries: &[(
        "eifbench_levels.sql",
        include_str!("../../../sql/eifbench_levels.sql"),
    )],
    sections: &[SectionGroup {
        kinds: &["yes_no"],
        sections: &[SectionDecl {
            id: "eifbench",
            title: "EIFBench accuracy (task / constraint / sub-task level; the reference's rule)",
            keys: 1,
            query: "eifbench_levels.sql",
            params: &[("table", Param::Table)],
            requires: &[Column::Any("main_id"), Column::Any("sub_instruction_id")],
        }],
    }],
    charts: &[Chart {
        section: "eifbench",
        unless: None,
        title: "EIFBench accuracy",
        axis: "share (%)",
        label: "{table}",
        series: &[
            ("task_level_acc", "task level"),
            ("constraint_level_acc", "constraint level"),
            ("subtask_level_acc", "sub-task level"),
        ],
        percent: true,
    }],
    shares: &[],
};
