//! The pipeline's top-level `endpoints:` section: named groups of OpenAI-compatible servers
//! that llm stages name with `endpoint: <group>`. Parsed here, through the section registry
//! ([`crate::stages::sections`]), so the pipeline parser knows nothing about endpoints.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Diagnostic, did_you_mean};
use crate::llm_client::pool::EndpointGroup;
use crate::stages::{SectionCtx, SectionEntry};
use crate::yaml::{self, Node, Pos, Value};

pub const SECTION: SectionEntry = SectionEntry {
    name: "endpoints",
    about: "Named groups of OpenAI-compatible servers for llm stages.",
    parse: |node, ctx| {
        let (groups, errs) = parse(node, ctx);
        (Box::new(groups), errs)
    },
    schema: |g| {
        serde_json::json!({
            "type": "object",
            "additionalProperties": g.subschema_for::<EndpointGroup>().to_value(),
        })
    },
};

/// The endpoint groups by name, as a stage reads them with
/// `ctx.section::<Endpoints>(SECTION.name)`.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    groups: BTreeMap<String, EndpointGroup>,
}

impl Endpoints {
    pub fn get(&self, name: &str) -> Option<&EndpointGroup> {
        self.groups.get(name)
    }

    /// The group names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }
}

/// Every group of the section, each with all of its problems. A group counts as defined even
/// when it is wrong, so the stages naming it report nothing more.
fn parse(node: &Node, ctx: &SectionCtx) -> (Endpoints, Vec<Diagnostic>) {
    let file = ctx.file;
    let at = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let mut errs = Vec::new();
    let mut groups = BTreeMap::new();
    let Value::Map(m) = &node.value else {
        errs.push(at(
            node.pos,
            format!(
                "endpoints: invalid type: {}, expected a mapping of group names",
                node.type_name()
            ),
        ));
        return (Endpoints { groups }, errs);
    };
    for (k, v) in m {
        let name = k.scalar_text();
        let path = format!("endpoints.{name}");
        // Every bad field of the group at once (see `yaml::collecting`).
        let (group, recovered) = yaml::collecting(|| v.deserialize::<EndpointGroup>(&path));
        let bad_fields: Vec<String> = recovered
            .iter()
            .map(|e| {
                let rest = e.path.strip_prefix(&path).unwrap_or_default();
                let rest = rest.trim_start_matches('.');
                rest.split(['.', '['])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        for e in recovered.iter().chain(group.as_ref().err()) {
            errs.push(endpoint_error(file, v, e));
        }
        let group = match group {
            Ok(mut g) => {
                if g.urls.is_empty() && !bad_fields.iter().any(|f| f == "urls") {
                    errs.push(
                        at(v.pos, format!("endpoint group `{name}` has no urls"))
                            .hint("urls: [\"http://127.0.0.1:8000/v1\"]"),
                    );
                }
                for p in g.problems() {
                    // `field: problem`: point at the field (unless its value was already
                    // reported as the wrong type).
                    let field = p.split(':').next().unwrap_or_default();
                    if bad_fields.iter().any(|f| f == field) {
                        continue;
                    }
                    let pos = v.get(field).map_or(v.pos, |f| f.pos);
                    errs.push(at(pos, format!("endpoint group `{name}`: {p}")));
                }
                // Relative to the pipeline file, like its inputs; read now, so a wrong path is
                // an error with its line, not a failed stage.
                if let Some(p) = &mut g.ca_cert {
                    let full = ctx.dir.join(&*p);
                    if let Err(e) = crate::llm_client::http::roots(&full) {
                        let pos = v.get("ca_cert").map_or(v.pos, |f| f.pos);
                        errs.push(
                            at(pos, format!("endpoint group `{name}`: ca_cert: {e}"))
                                .hint("give the PEM file of the CA that signed the server's certificate (relative to the pipeline file)"),
                        );
                    }
                    *p = full.display().to_string();
                }
                g
            }
            Err(_) => EndpointGroup::new(Vec::new()),
        };
        // Kept even when wrong: its stages then report nothing more.
        groups.insert(name, group);
    }
    (Endpoints { groups }, errs)
}

/// The fields of an endpoint group, for hints.
const ENDPOINT_GROUP_FIELDS: &str = "urls, profile, api_key_env, ca_cert, max_in_flight, adaptive, timeout_s, max_retries, backoff_ms, backoff_max_ms, all_down_s, bench_s";

/// A deserialization error of an endpoint group, with a hint that fits it: the valid values
/// of an unknown variant, the closest field of an unknown field, else the group's fields.
fn endpoint_error(file: &Path, group: &Node, e: &yaml::DeError) -> Diagnostic {
    let d = Diagnostic::new(file, e.pos.unwrap_or(group.pos), e.to_string());
    let fields = || format!("an endpoint group takes {ENDPOINT_GROUP_FIELDS}");
    match yaml::unknown_name(&e.message) {
        Some((name, expected)) if e.message.starts_with("unknown variant") => {
            let field = e.path.rsplit('.').next().unwrap_or("the value");
            let valid = format!("{field} is one of: {}", expected.join(", "));
            match did_you_mean(&name, expected.iter().map(String::as_str)) {
                Some(dym) => d.hint(format!("{dym} {valid}")),
                None => d.hint(valid),
            }
        }
        Some((name, expected)) => {
            d.hint(did_you_mean(&name, expected.iter().map(String::as_str)).unwrap_or_else(fields))
        }
        None => d.hint(fields()),
    }
}
