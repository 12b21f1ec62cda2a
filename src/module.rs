//! What a method or a benchmark adds to ifloom, declared as data: its stage kinds, its SQL
//! functions, its canned queries, and the figures it shows in `ifloom stats` and `ifloom
//! report`.
//!
//! A [`SectionGroup`] says which finished tables a module's sections are computed for (the
//! tables of some kinds) and, per section, the canned query of `sql/` that computes it, its
//! params and the columns the table must have; a [`Chart`] draws one section as horizontal
//! bars. The core iterates the declarations of every module in [`crate::registry`] and names
//! none. A module's folder holds its declaration (`MODULE`), its rules and its kinds.

use datafusion::logical_expr::ScalarUDF;

use crate::stages::KindEntry;

/// What a method, a benchmark or the core adds to ifloom.
pub struct Module {
    /// The module's name (the folder it lives in): what the registry's checks name when a
    /// declaration is wrong; the core itself never asks for it.
    #[cfg_attr(not(test), allow(dead_code))]
    pub name: &'static str,
    /// Its stage kinds, in the order `ifloom schema` and hints list them.
    pub kinds: &'static [KindEntry],
    /// Its SQL functions, registered with every session.
    pub functions: fn() -> Vec<ScalarUDF>,
    /// Its canned queries of `sql/`, compiled in.
    pub queries: &'static [CannedQuery],
    /// Its sections of `ifloom stats`.
    pub sections: &'static [SectionGroup],
    /// Its charts of `ifloom report`, drawn after the core's pass-rate charts.
    pub charts: &'static [Chart],
    /// Column-name prefixes of its figures that are shares (shown as percentages, compared in
    /// points) besides the core's `*_rate` and `*_acc`.
    pub shares: &'static [&'static str],
}

/// No SQL functions.
pub fn no_functions() -> Vec<ScalarUDF> {
    Vec::new()
}

/// Canned queries a module compiles in: `(file name in sql/, text)`. `ifloom sql -f
/// sql/NAME.sql` finds them from any folder, and sections name them by file name.
pub type CannedQuery = (&'static str, &'static str);

/// Sections computed for every finished table of the given kinds, in table order: for each
/// such table, each section whose required columns the table has, in declaration order.
#[derive(Debug)]
pub struct SectionGroup {
    /// Stage kinds whose tables the sections describe.
    pub kinds: &'static [&'static str],
    pub sections: &'static [SectionDecl],
}

/// One table of figures from one canned query over one stage's table.
#[derive(Debug)]
pub struct SectionDecl {
    /// The section's id in `ifloom stats --json` (and what charts name).
    pub id: &'static str,
    pub title: &'static str,
    /// The first `keys` columns identify a row (`--compare` pairs rows on them).
    pub keys: usize,
    /// The canned query's file name in `sql/` (compiled in by the declaring module).
    pub query: &'static str,
    /// The query's `${name}` params.
    pub params: &'static [(&'static str, Param)],
    /// Columns the table must have for the section to be computed.
    pub requires: &'static [Column],
}

/// A value of a canned query's param.
#[derive(Debug, Clone, Copy)]
pub enum Param {
    /// The id of the table the section is computed for.
    Table,
    /// This text as it is (a column name, or a quoted SQL literal such as `'all'`).
    Text(&'static str),
}

/// A column a section needs.
#[derive(Debug, Clone, Copy)]
pub enum Column {
    /// Present, of any type.
    Any(&'static str),
    /// Present and a list.
    List(&'static str),
}

/// A horizontal bar chart of one section: one row per section row, one bar per series.
#[derive(Debug)]
pub struct Chart {
    /// The section drawn; the chart is left out when the run has no such section.
    pub section: &'static str,
    /// Left out when the run has this section (a finer chart of the same figures).
    pub unless: Option<&'static str>,
    pub title: &'static str,
    /// The value axis' caption.
    pub axis: &'static str,
    /// How a row is labelled: `{column}` is the row's value of the column (text as it is),
    /// `{column|tail}` the part after its first `:` (`detectable_format:title` → `title`).
    pub label: &'static str,
    /// `(column, legend name)` per bar.
    pub series: &'static [(&'static str, &'static str)],
    /// Values are shares: a 0-100 % axis.
    pub percent: bool,
}

/// A row's label from a chart's label template.
pub fn label(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let field = &rest[start + 1..start + len];
        let (column, tail) = match field.strip_suffix("|tail") {
            Some(c) => (c, true),
            None => (field, false),
        };
        let v = value(column);
        if tail {
            out.push_str(v.split_once(':').map_or(v.as_str(), |(_, t)| t));
        } else {
            out.push_str(&v);
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_fill_columns_and_tails() {
        let v = |c: &str| match c {
            "table" => "judged".to_string(),
            "round" => "2".to_string(),
            "instruction_type" => "detectable_format:title".to_string(),
            "plain" => "no_colon".to_string(),
            _ => String::new(),
        };
        assert_eq!(label("{table} round {round}", v), "judged round 2");
        assert_eq!(label("{instruction_type|tail}", v), "title");
        assert_eq!(label("{plain|tail}", v), "no_colon");
        assert_eq!(label("question {missing}", v), "question ");
        assert_eq!(label("open {brace", v), "open {brace");
    }
}
