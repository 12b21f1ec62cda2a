//! The llm stage's templates: Jinja over a row's columns, rendered once per row (or once per
//! stage when a template reads no column), and the canonical request each (row, sample)
//! becomes.

use super::*;

impl LlmStage {
    pub(super) fn env(
        &self,
    ) -> std::result::Result<minijinja::Environment<'static>, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (i, (_, src)) in self.templates.iter().enumerate() {
            env.add_template_owned(format!("m{i}"), src.clone())?;
        }
        Ok(env)
    }

    /// The params that may come from a column per row, by name.
    /// Whether template `i` is the completions API's `prompt` (pushed after the messages).
    pub(super) fn is_prompt(&self, i: usize) -> bool {
        self.api == Api::Completions && i + 1 == self.templates.len()
    }

    /// The message template `i` comes from.
    fn template_message(&self, i: usize) -> usize {
        self.template_msg.get(i).copied().unwrap_or(i)
    }

    /// The file template `i` was read from, if it was.
    pub(super) fn template_file(&self, i: usize) -> Option<&str> {
        if self.is_prompt(i) {
            return None;
        }
        self.messages
            .get(self.template_message(i))
            .and_then(|m| m.file.as_deref())
    }

    /// Where template `i` is written in the pipeline file, for errors about it: `prompt`, or
    /// the message's inline `content` or its `file`.
    pub(super) fn template_path(&self, i: usize) -> Vec<String> {
        if self.is_prompt(i) {
            return vec!["prompt".into()];
        }
        let key = if self.template_file(i).is_some() {
            "file"
        } else {
            "content"
        };
        vec![
            "messages".into(),
            self.template_message(i).to_string(),
            key.into(),
        ]
    }

    pub(super) fn column_params(&self) -> [(&'static str, &Option<ParamValue>, ParamKind); 7] {
        use ParamKind::*;
        [
            ("temperature", &self.params.temperature, Number),
            ("top_p", &self.params.top_p, Number),
            ("max_tokens", &self.params.max_tokens, Integer),
            ("seed", &self.params.seed, Integer),
            ("presence_penalty", &self.params.presence_penalty, Number),
            ("frequency_penalty", &self.params.frequency_penalty, Number),
            ("stop", &self.params.stop, Stop),
        ]
    }

    /// The columns a row's request depends on: template variables and per-row params.
    pub(super) fn context_columns(&self, env: &minijinja::Environment) -> Vec<String> {
        let mut cols: std::collections::BTreeSet<String> = Default::default();
        for i in 0..self.templates.len() {
            if let Ok(t) = env.get_template(&format!("m{i}")) {
                cols.extend(t.undeclared_variables(false));
            }
        }
        for (_, p, _) in self.column_params() {
            if let Some(ParamValue::Column { column }) = p {
                cols.insert(column.clone());
            }
        }
        for (_, column) in &self.turns {
            cols.insert(column.clone());
        }
        cols.into_iter().collect()
    }

    pub(super) fn resolve(
        &self,
        v: &Option<ParamValue>,
        row: &serde_json::Value,
    ) -> Option<serde_json::Value> {
        match v {
            None => None,
            Some(ParamValue::Value(x)) => Some(x.clone()),
            Some(ParamValue::Column { column }) => {
                row.get(column).cloned().filter(|x| !x.is_null())
            }
        }
    }

    /// The messages' templates, fetched from `env` once per stage. A template that reads no
    /// variable is rendered here, once, instead of once per row.
    pub(super) fn renderer<'e>(
        &self,
        env: &'e minijinja::Environment<'static>,
    ) -> std::result::Result<Renderer<'e>, String> {
        let mut messages = Vec::new();
        let turns_before = |k: usize, messages: &mut Vec<(String, Template<'e>)>| {
            for (_, column) in self.turns.iter().filter(|(at, _)| *at == k) {
                messages.push((String::new(), Template::Turns(column.clone())));
            }
        };
        for (i, (role, src)) in self.templates.iter().enumerate() {
            turns_before(i, &mut messages);
            let t = env
                .get_template(&format!("m{i}"))
                .map_err(|e| e.to_string())?;
            // `undeclared_variables` does not look into included templates.
            let pulls_in = ["include", "import", "extends"]
                .iter()
                .any(|w| src.contains(w));
            let text = if !pulls_in && t.undeclared_variables(false).is_empty() {
                t.render(minijinja::context! {}).ok()
            } else {
                None
            };
            let m = match text {
                Some(text) => Template::Fixed(text),
                // Rendered per row; errors then surface per row, with the row's context.
                None => Template::PerRow(t),
            };
            messages.push((role.clone(), m));
        }
        turns_before(self.templates.len(), &mut messages);
        Ok(Renderer { messages })
    }

    /// Render one row's messages (the same for all its samples).
    pub(super) fn render(
        &self,
        renderer: &Renderer,
        row: &serde_json::Value,
    ) -> std::result::Result<Vec<Message>, String> {
        // Converted once for all of the row's templates (`render(row)` converts per call).
        let mut context = None;
        let mut rendered = Vec::with_capacity(renderer.messages.len());
        let mut i = 0;
        for (role, t) in &renderer.messages {
            let content = match t {
                Template::Fixed(text) => text.clone(),
                Template::PerRow(t) => t
                    .render(context.get_or_insert_with(|| minijinja::Value::from_serialize(row)))
                    .map_err(|e| format!("template for message {}: {e}", i + 1))?,
                Template::Turns(column) => {
                    rendered.extend(turn_messages(row.get(column), column)?);
                    continue;
                }
            };
            i += 1;
            rendered.push(Message {
                role: role.clone(),
                content,
            });
        }
        Ok(rendered)
    }

    /// The canonical request for one row and one sample from the row's rendered messages
    /// (`attempt` > 0 re-asks after a parse failure, with another seed and so another id).
    pub(super) fn canonical(
        &self,
        mut rendered: Vec<Message>,
        row: &serde_json::Value,
        sample: u32,
        attempt: u32,
    ) -> Canonical {
        let f = |v: &Option<ParamValue>| self.resolve(v, row).and_then(|x| x.as_f64());
        let i = |v: &Option<ParamValue>| self.resolve(v, row).and_then(|x| x.as_i64());
        let mut seed = i(&self.params.seed);
        // Distinct samples need distinct seeds when each is its own request.
        if self.samples > 1 || attempt > 0 {
            seed = Some(seed.unwrap_or(0) + sample as i64 + 1_000_003 * attempt as i64);
        }
        let sampling = Sampling {
            temperature: f(&self.params.temperature),
            top_p: f(&self.params.top_p),
            max_tokens: i(&self.params.max_tokens),
            stop: self.resolve(&self.params.stop, row).and_then(|v| match v {
                serde_json::Value::String(s) => Some(vec![s]),
                serde_json::Value::Array(a) => Some(
                    a.into_iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect(),
                ),
                _ => None,
            }),
            seed,
            presence_penalty: f(&self.params.presence_penalty),
            frequency_penalty: f(&self.params.frequency_penalty),
            logprobs: self
                .params
                .logprobs
                .or(self.params.top_logprobs.map(|_| true)),
            top_logprobs: self.params.top_logprobs,
            extra_body: self.params.extra_body.clone(),
        };
        let (messages, prompt) = match self.api {
            Api::Chat => (Some(rendered), None),
            Api::Completions => (None, rendered.pop().map(|m| m.content)),
        };
        Canonical {
            model: self.model.clone(),
            api: self.api,
            messages,
            prompt,
            sampling,
            response_schema: self.response_format.clone(),
            sample: sample + 1000 * attempt,
        }
    }
}

/// A stage's message templates, ready to render rows.
pub(super) struct Renderer<'e> {
    pub(super) messages: Vec<(String, Template<'e>)>,
}

pub(super) enum Template<'e> {
    /// Reads no variable: rendered once.
    Fixed(String),
    PerRow(minijinja::Template<'e, 'e>),
    /// `turns: column`: the row's earlier turns, one message each.
    Turns(String),
}

/// The chat messages of a `turns` column's value: `{role, content}` or ShareGPT's
/// `{from, value}` per turn (`human` → user, `gpt` → assistant); null or missing: none.
pub(super) fn turn_messages(
    v: Option<&serde_json::Value>,
    column: &str,
) -> std::result::Result<Vec<Message>, String> {
    use serde_json::Value;
    let turns = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(format!("turns: `{column}` is not a list of turns: {other}"));
        }
    };
    let mut out = Vec::with_capacity(turns.len());
    for (n, t) in turns.iter().enumerate() {
        let field = |a: &str, b: &str| {
            t.get(a)
                .filter(|x| !x.is_null())
                .or_else(|| t.get(b).filter(|x| !x.is_null()))
        };
        let bad = |what: &str| format!("turns: turn {} of `{column}` {what}: {t}", n + 1);
        let role = match field("role", "from").and_then(Value::as_str) {
            Some("user" | "human") => "user",
            Some("assistant" | "gpt" | "chatgpt" | "bot" | "model") => "assistant",
            Some("system") => "system",
            Some(_) => {
                return Err(bad(
                    "has a role other than user/human, assistant/gpt or system",
                ));
            }
            None => return Err(bad("has no `role` (or `from`)")),
        };
        let Some(content) = field("content", "value").and_then(Value::as_str) else {
            return Err(bad("has no text `content` (or `value`)"));
        };
        out.push(Message {
            role: role.into(),
            content: content.to_string(),
        });
    }
    Ok(out)
}

/// The template context of each row: the `columns` of `batch` (those the templates and the
/// per-row params read; turning the rest into JSON would be wasted work).
pub(super) fn context_rows(
    batch: &RecordBatch,
    columns: &[String],
) -> Result<Vec<serde_json::Value>> {
    let idx: Vec<usize> = columns
        .iter()
        .filter_map(|c| batch.schema().index_of(c).ok())
        .collect();
    if idx.is_empty() {
        return Ok(vec![
            serde_json::Value::Object(Default::default());
            batch.num_rows()
        ]);
    }
    batch_rows(&batch.project(&idx)?)
}

/// Every distinct request id a stage would send for its input, for `--dry-run` and batch
/// export: (id, canonical request).
pub fn plan_requests(
    stage: &LlmStage,
    rows: &[serde_json::Value],
) -> Result<Vec<(String, Canonical)>> {
    let usage = |message: String| Error::Usage { message };
    let env = stage.env().map_err(|e| usage(e.to_string()))?;
    let renderer = stage.renderer(&env).map_err(usage)?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (n, row) in rows.iter().enumerate() {
        // A row the templates cannot render is dead-lettered by a run; here it is the answer.
        let messages = stage.render(&renderer, row).map_err(|e| {
            usage(format!(
                "row {} of the stage's input cannot be rendered: {e}\n  hint: a run dead-letters such rows (reason in the `__failed` table); fix the template or the data",
                n + 1
            ))
        })?;
        for s in 0..stage.samples {
            let c = stage.canonical(messages.clone(), row, s, 0);
            let id = c.id();
            if seen.insert(id.clone()) {
                out.push((id, c));
            }
        }
    }
    Ok(out)
}
