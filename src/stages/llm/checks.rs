//! The llm stage's checks: its own config when the pipeline is loaded (`prepare`: params,
//! templates, response schemas, endpoints) and its columns against the parent's schema
//! (`plan`: template variables, per-row params, clashing output names).

use super::endpoints::{self, Endpoints};
use super::*;

impl LlmStage {
    pub(super) fn check_config(
        &mut self,
        node: &Node,
        ctx: &BuildCtx,
    ) -> Result<(), Vec<Diagnostic>> {
        let mut errs = Vec::new();
        let at = |path: &[&str], msg: String| Diagnostic::new(&ctx.file, node.pos_at(path), msg);
        if self.samples == 0 {
            errs.push(at(&["samples"], "samples must be at least 1".into()));
        }
        for (name, p, kind) in self.column_params() {
            if let Some(ParamValue::Value(v)) = p {
                if !kind.accepts(v) {
                    errs.push(at(
                        &["params", name],
                        format!(
                            "params.{name}: expected {} or {{column: name}}, got {v}",
                            kind.expected()
                        ),
                    ));
                } else if let Some(range) = param_range(name, v) {
                    errs.push(at(
                        &["params", name],
                        format!("params.{name}: {range}, got {v}"),
                    ));
                }
            }
        }
        if self.parse.is_none() && self.retry_on_parse_error > 0 {
            errs.push(at(
                &["retry_on_parse_error"],
                "retry_on_parse_error has no effect without `parse:`".into(),
            ));
        }
        if self.parse.is_none() && self.on_parse_error != OnParseError::default() {
            errs.push(
                at(
                    &["on_parse_error"],
                    "on_parse_error has no effect without `parse:`".into(),
                )
                .hint(
                    "add parse: {json: ...}, {regex: ...} or {choice: ...}, or drop on_parse_error",
                ),
            );
        }
        if let Some(k) = self.params.top_logprobs
            && k > 20
        {
            errs.push(at(
                &["params", "top_logprobs"],
                format!("top_logprobs must be 0 to 20, got {k}"),
            ));
        }
        if self.params.logprobs == Some(false) && self.params.top_logprobs.is_some() {
            errs.push(at(
                &["params", "top_logprobs"],
                "top_logprobs needs logprobs: drop `logprobs: false`".into(),
            ));
        }
        if self.output.is_empty()
            || !self
                .output
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            errs.push(at(
                &["output"],
                format!("output `{}` is not a valid column name", self.output),
            ));
        }
        match self.api {
            Api::Chat if self.messages.is_empty() => errs.push(
                at(
                    &["messages"],
                    "an llm stage with api: chat needs `messages`".into(),
                )
                .hint("messages: [{role: user, content: \"{{ prompt }}\"}]"),
            ),
            Api::Completions if self.prompt.is_none() => errs.push(at(
                &["prompt"],
                "api: completions needs a `prompt` template".into(),
            )),
            _ => {}
        }
        for (i, m) in self.messages.iter().enumerate() {
            let path = ["messages", &i.to_string()];
            if let Some(col) = &m.turns {
                if m.role.is_some() || m.content.is_some() || m.file.is_some() {
                    errs.push(
                        at(
                            &path,
                            "a `turns` entry takes no `role`, `content` or `file`".into(),
                        )
                        .hint("give the earlier turns as their own entry: - {turns: history}"),
                    );
                } else if self.api == Api::Completions {
                    errs.push(at(
                        &["messages", &i.to_string(), "turns"],
                        "`turns` needs api: chat (a completions prompt has no messages)".into(),
                    ));
                } else {
                    self.turns.push((self.templates.len(), col.clone()));
                }
                continue;
            }
            let Some(role) = &m.role else {
                errs.push(at(&path, "a message needs a `role`".into()).hint(
                    "{role: user, content: \"...\"}, or {turns: <column>} for earlier turns",
                ));
                continue;
            };
            let src = match (&m.content, &m.file) {
                (Some(c), None) => Some(c.clone()),
                (None, Some(f)) => match std::fs::read_to_string(ctx.dir.join(f)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errs.push(
                            at(
                                &["messages", &i.to_string(), "file"],
                                format!("cannot read template {f}: {e}"),
                            )
                            .hint("template files are relative to the pipeline file"),
                        );
                        None
                    }
                },
                _ => {
                    errs.push(at(
                        &path,
                        "a message needs exactly one of `content` and `file`".into(),
                    ));
                    None
                }
            };
            if let Some(s) = src {
                self.templates.push((role.clone(), s));
                self.template_msg.push(i);
            }
        }
        if self.api == Api::Completions
            && let Some(p) = &self.prompt
        {
            self.templates.push(("user".into(), p.clone()));
        }
        // Each template on its own, so each error points at its own message (and, for a file,
        // says the line in that file rather than minijinja's internal name for it).
        let probe = minijinja::Environment::new();
        for (i, (_, src)) in self.templates.iter().enumerate() {
            let Err(e) = probe.template_from_str(src) else {
                continue;
            };
            let detail = e.detail().unwrap_or("invalid syntax");
            let line = e.line().map(|l| format!(", line {l}")).unwrap_or_default();
            let path = self.template_path(i);
            let msg = match (self.is_prompt(i), self.template_file(i)) {
                (true, _) => format!("template syntax error (prompt{line}): {detail}"),
                (_, Some(f)) => format!("template syntax error in {f}{line}: {detail}"),
                (_, None) => {
                    format!("template syntax error (message {}{line}): {detail}", i + 1)
                }
            };
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            errs.push(
                at(&path, msg)
                    .hint("templates use Jinja syntax: {{ column }}, {% if %}...{% endif %}"),
            );
        }
        if errs.is_empty()
            && let Err(e) = self.env()
        {
            errs.push(at(&["messages"], format!("template syntax error: {e}")));
        }
        // The endpoint group: named (top level `endpoints:`) or inline.
        let no_groups = Endpoints::default();
        let groups = ctx
            .section::<Endpoints>(endpoints::SECTION.name)
            .unwrap_or(&no_groups);
        let group = match (&self.endpoint, self.endpoints.is_empty()) {
            (Some(name), true) => match groups.get(name) {
                Some(g) => Some(g.clone()),
                None => {
                    errs.push(
                        at(&["endpoint"], format!("unknown endpoint group `{name}`"))
                            .maybe_hint(did_you_mean(name, groups.names()))
                            .hint_if_none(format!(
                                "define it under the top-level `endpoints:` (defined: {})",
                                groups.names().collect::<Vec<_>>().join(", ")
                            )),
                    );
                    None
                }
            },
            (None, false) => Some(EndpointGroup::new(self.endpoints.clone())),
            (Some(_), false) => {
                errs.push(at(
                    &["endpoints"],
                    "give either `endpoint` (a group name) or `endpoints` (URLs), not both".into(),
                ));
                None
            }
            (None, true) => {
                errs.push(
                    at(
                        &[],
                        "an llm stage needs `endpoint: <group>` or `endpoints: [URL]`".into(),
                    )
                    .hint("e.g. endpoints: [\"http://127.0.0.1:8000/v1\"]"),
                );
                None
            }
        };
        if let Some(p) = &self.parse
            && let Err(e) = p.check()
        {
            errs.push(at(&["parse"], format!("parse: {e}")));
        }
        if let Some(schema) = &self.response_format {
            for p in schema_problems(schema, "response_format") {
                errs.push(at(&["response_format"], p).hint(
                    "a JSON Schema, e.g. {type: object, properties: {answer: {type: string}}, required: [answer]}",
                ));
            }
        }
        // The same rule and words as for an endpoint group (`EndpointGroup::problems`): 0 is
        // a mistake, not a request for the smallest value.
        if self.max_in_flight == Some(0) {
            errs.push(at(
                &["max_in_flight"],
                "max_in_flight: must be at least 1".into(),
            ));
        }
        if let Some(mut g) = group {
            if let Some(p) = self.profile {
                g.profile = p;
            }
            if let Some(k) = &self.api_key_env {
                g.api_key_env = Some(k.clone());
            }
            if let Some(m) = self.max_in_flight {
                g.max_in_flight = m;
            }
            self.group = Some(g);
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    pub(super) fn check_plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut errs = Vec::new();
        let env = match self.env() {
            Ok(e) => e,
            Err(e) => {
                return Err(vec![
                    ctx.err(&["messages"], format!("template syntax error: {e}")),
                ]);
            }
        };
        for i in 0..self.templates.len() {
            let Ok(t) = env.get_template(&format!("m{i}")) else {
                continue;
            };
            let path = self.template_path(i);
            let p: Vec<&str> = path.iter().map(String::as_str).collect();
            // minijinja looks filters and tests up only when it renders: every row would fail.
            for (kind, name) in unknown_filters_and_tests(&env, &self.templates[i].1) {
                errs.push(ctx.err(&p, format!("unknown {kind} `{name}` in the template")).hint(
                    format!(
                        "see minijinja's built-in {kind}s (https://docs.rs/minijinja/latest/minijinja/{kind}s/)"
                    ),
                ));
            }
            let mut vars: Vec<String> = t.undeclared_variables(false).into_iter().collect();
            vars.sort();
            for v in vars {
                if !cols.contains(&v.as_str()) {
                    // In a template file, also the line that uses it (the first one).
                    let at_line = self
                        .template_file(i)
                        .and_then(|f| {
                            let re =
                                regex::Regex::new(&format!(r"\b{}\b", regex::escape(&v))).ok()?;
                            let n = self.templates[i].1.lines().position(|l| re.is_match(l))?;
                            Some(format!(" ({f}, line {})", n + 1))
                        })
                        .unwrap_or_default();
                    errs.push(
                        ctx.err(
                            &p,
                            format!(
                                "template variable `{v}` is not a column of `{}`{at_line}",
                                ctx.parents[0].0
                            ),
                        )
                        .maybe_hint(did_you_mean(&v, cols.iter().copied()))
                        .hint_if_none(format!("columns: {}", cols.join(", "))),
                    );
                }
            }
        }
        for (name, p, kind) in self.column_params() {
            let Some(ParamValue::Column { column }) = p else {
                continue;
            };
            match schema.field_with_name(column) {
                Err(_) => errs.push(crate::stages::unknown_column(
                    ctx,
                    &["params", name, "column"],
                    column,
                    schema,
                )),
                Ok(f) if !kind.accepts_type(f.data_type()) => errs.push(
                    ctx.err(
                        &["params", name, "column"],
                        format!(
                            "params.{name}: column `{column}` is {}, expected {}",
                            f.data_type(),
                            kind.expected()
                        ),
                    )
                    .hint(format!(
                        "cast it in an upstream sql stage, e.g. CAST({column} AS {})",
                        kind.sql_type()
                    )),
                ),
                Ok(_) => {}
            }
        }
        for (_, column) in &self.turns {
            let i = self
                .messages
                .iter()
                .position(|m| m.turns.as_ref() == Some(column))
                .unwrap_or_default()
                .to_string();
            let path = ["messages", i.as_str(), "turns"];
            match schema.field_with_name(column) {
                Err(_) => errs.push(crate::stages::unknown_column(ctx, &path, column, schema)),
                Ok(f) if !turns_type_ok(f.data_type()) => errs.push(
                    ctx.err(
                        &path,
                        format!(
                            "turns: column `{column}` is {}, expected a list of {{role, content}} or {{from, value}}",
                            f.data_type()
                        ),
                    )
                    .hint("build it in an upstream sql stage, e.g. make_array(named_struct('role', 'user', 'content', q1), named_struct('role', 'assistant', 'content', a1))"),
                ),
                Ok(_) => {}
            }
        }
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for f in self.new_fields() {
            if cols.contains(&f.name().as_str()) {
                errs.push(
                    ctx.err(
                        &["output"],
                        format!("column `{}` already exists upstream", f.name()),
                    )
                    .hint("choose another `output:` name for this stage's columns"),
                );
            }
            fields.push(f);
        }
        if errs.is_empty() {
            Ok(Arc::new(Schema::new(fields)))
        } else {
            Err(errs)
        }
    }
}

/// A column `turns:` can read: a list of structs with text `role` and `content` (or
/// ShareGPT's `from` and `value`), or an untyped null.
fn turns_type_ok(t: &DataType) -> bool {
    let text =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    match t {
        DataType::Null => true,
        DataType::List(f) | DataType::LargeList(f) => match f.data_type() {
            DataType::Struct(fields) => {
                let has = |name: &str| {
                    fields
                        .iter()
                        .any(|x| x.name() == name && text(x.data_type()))
                };
                (has("role") && has("content")) || (has("from") && has("value"))
            }
            _ => false,
        },
        _ => false,
    }
}

/// What is wrong with a JSON Schema at `path`, in the parts servers act on (`type`,
/// `properties`, `required`, `items`, `enum`, the combinators): a schema a server rejects
/// fails every request of the stage, so it is found at validate time instead.
pub(super) fn schema_problems(v: &serde_json::Value, path: &str) -> Vec<String> {
    use serde_json::Value;
    const TYPES: [&str; 7] = [
        "object", "array", "string", "number", "integer", "boolean", "null",
    ];
    let mut out = Vec::new();
    let m = match v {
        Value::Object(m) => m,
        Value::Bool(_) => return out,
        other => {
            out.push(format!("{path}: a schema must be a mapping, got {other}"));
            return out;
        }
    };
    // A YAML `null` unquoted is no type name: say how to write it.
    let null_hint = |t: &Value| {
        if t.is_null() || t.as_array().is_some_and(|a| a.iter().any(Value::is_null)) {
            " (write the type null quoted, \"null\", in YAML)"
        } else {
            ""
        }
    };
    let type_ok = |t: &Value| t.as_str().is_some_and(|t| TYPES.contains(&t));
    match m.get("type") {
        None => {}
        Some(Value::Array(ts)) if ts.iter().all(type_ok) => {}
        Some(t) if type_ok(t) => {}
        Some(t) => out.push(format!(
            "{path}.type: {t} is not a JSON Schema type ({}){}",
            TYPES.join(", "),
            null_hint(t)
        )),
    }
    match m.get("properties") {
        None => {}
        Some(Value::Object(props)) => {
            for (k, p) in props {
                out.extend(schema_problems(p, &format!("{path}.properties.{k}")));
            }
        }
        Some(other) => out.push(format!(
            "{path}.properties: must be a mapping of field names to schemas, got {other}"
        )),
    }
    match m.get("required") {
        None => {}
        Some(Value::Array(r)) if r.iter().all(Value::is_string) => {
            // A required name may also come from elsewhere in the schema: checked against
            // `properties` only when nothing else can define fields.
            let elsewhere = [
                "allOf",
                "anyOf",
                "oneOf",
                "$ref",
                "additionalProperties",
                "patternProperties",
                "dependentSchemas",
                "if",
            ]
            .iter()
            .any(|k| m.contains_key(*k));
            if !elsewhere && let Some(Value::Object(props)) = m.get("properties") {
                for f in r.iter().filter_map(Value::as_str) {
                    if !props.contains_key(f) {
                        out.push(format!(
                            "{path}.required: `{f}` is not one of the properties ({})",
                            props.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
            }
        }
        Some(other) => out.push(format!(
            "{path}.required: must be a list of field names, got {other}"
        )),
    }
    match m.get("items") {
        // A tuple (draft 4's list of schemas).
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                out.extend(schema_problems(item, &format!("{path}.items.{i}")));
            }
        }
        Some(items) => out.extend(schema_problems(items, &format!("{path}.items"))),
        None => {}
    }
    if let Some(e) = m.get("enum")
        && !e.is_array()
    {
        out.push(format!("{path}.enum: must be a list of values, got {e}"));
    }
    for comb in ["anyOf", "oneOf", "allOf"] {
        match m.get(comb) {
            None => {}
            Some(Value::Array(subs)) => {
                for (i, sub) in subs.iter().enumerate() {
                    out.extend(schema_problems(sub, &format!("{path}.{comb}.{i}")));
                }
            }
            Some(other) => out.push(format!(
                "{path}.{comb}: must be a list of schemas, got {other}"
            )),
        }
    }
    out
}

/// The range a literal param must be in, as OpenAI documents it and vLLM checks it (a request
/// outside it is a 400 for every row), when `v` is outside it.
pub(super) fn param_range(name: &str, v: &serde_json::Value) -> Option<&'static str> {
    let x = v.as_f64()?;
    let (ok, range) = match name {
        "temperature" => (x >= 0.0, "must be 0 or more"),
        "top_p" => (x > 0.0 && x <= 1.0, "must be above 0 and at most 1"),
        "max_tokens" => (x >= 1.0, "must be at least 1"),
        "presence_penalty" | "frequency_penalty" => {
            ((-2.0..=2.0).contains(&x), "must be from -2 to 2")
        }
        _ => (true, ""),
    };
    (!ok).then_some(range)
}

/// Filters and tests a template uses that the environment does not have. The names are read
/// from the template's `{{ }}` and `{% %}` blocks (string literals left out) and each is tried
/// on a literal: minijinja's parser keeps no list of them, and resolves them only when it
/// renders.
pub(super) fn unknown_filters_and_tests(
    env: &minijinja::Environment,
    src: &str,
) -> Vec<(&'static str, String)> {
    use minijinja::ErrorKind;
    use std::sync::LazyLock;
    static BLOCK: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"(?s)\{\{.*?\}\}|\{%.*?%\}").expect("valid regex"));
    // What is never rendered: `{% raw %}` blocks and `{# #}` comments.
    static INERT: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?s)\{%-?\s*raw\s*-?%\}.*?\{%-?\s*endraw\s*-?%\}|\{#.*?#\}")
            .expect("valid regex")
    });
    static STRING: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"#).expect("valid regex")
    });
    // `x | name`, and the `{% filter name %}` tag.
    static FILTER: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\|\s*([A-Za-z_]\w*)|^\{%-?\s*filter\s+([A-Za-z_]\w*)")
            .expect("valid regex")
    });
    static TEST: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"\bis\s+(?:not\s+)?([A-Za-z_]\w*)").expect("valid regex")
    });
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let src = INERT.replace_all(src, "");
    for block in BLOCK.find_iter(&src) {
        let code = STRING.replace_all(block.as_str(), "''");
        for (kind, re, probe, missing) in [
            (
                "filter",
                &*FILTER,
                "{{ 1 | NAME }}",
                ErrorKind::UnknownFilter,
            ),
            ("test", &*TEST, "{{ 1 is NAME }}", ErrorKind::UnknownTest),
        ] {
            for c in re.captures_iter(&code) {
                let Some(name) = c.get(1).or_else(|| c.get(2)) else {
                    continue;
                };
                let name = name.as_str().to_string();
                if out.iter().any(|(k, n)| *k == kind && *n == name) {
                    continue;
                }
                let unknown = env
                    .render_str(&probe.replace("NAME", &name), ())
                    .is_err_and(|e| e.kind() == missing);
                if unknown {
                    out.push((kind, name));
                }
            }
        }
    }
    out
}
