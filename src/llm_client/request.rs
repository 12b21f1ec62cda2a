//! Canonical requests, their ids, and the translation into each server's dialect.
//!
//! The request id is a hash of the canonical request (model, messages or prompt, sampling
//! params including seed, response schema, sample index), computed *before* translation, so
//! the same logical request has the same id whichever server answers it. The endpoint URL and
//! API key are never part of it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a server speaks the OpenAI API. Servers differ in `n` and structured output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// vLLM: honours `n`; structured output as OpenAI's `json_schema` response format.
    #[default]
    Vllm,
    /// llama.cpp's server: one choice whatever `n`; `response_format: {type: json_object, schema}`.
    LlamaCpp,
    /// OpenAI and compatible hosted APIs.
    Openai,
}

impl Profile {
    /// Does the server return `n` choices when asked?
    pub fn honours_n(self) -> bool {
        !matches!(self, Profile::LlamaCpp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    #[default]
    Chat,
    Completions,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::Chat, Api::Completions];

    /// The request path under a `/v1` base URL.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "chat/completions",
            Api::Completions => "completions",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Sampling parameters after per-row resolution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Alternatives per token with `logprobs` (chat); the completions API takes this number
    /// as its `logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub extra_body: BTreeMap<String, serde_json::Value>,
}

/// One logical request for one sample of one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canonical {
    pub model: String,
    pub api: Api,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    pub sampling: Sampling,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_schema: Option<serde_json::Value>,
    pub sample: u32,
}

impl Canonical {
    /// Hash of the canonical JSON (keys in struct order, maps sorted): the cache key.
    pub fn id(&self) -> String {
        // Objects inside (a response schema, an extra_body value) are written with sorted
        // keys whatever serde_json's map order is (see `crate::json`); without any, the
        // struct serializes as it is (the common case, no copy).
        let nested = self
            .response_schema
            .iter()
            .chain(self.sampling.extra_body.values())
            .any(crate::json::has_object);
        let s = if nested {
            let mut c = self.clone();
            c.response_schema = c.response_schema.as_ref().map(crate::json::sorted);
            for v in c.sampling.extra_body.values_mut() {
                *v = crate::json::sorted(v);
            }
            serde_json::to_string(&c)
        } else {
            serde_json::to_string(self)
        }
        .unwrap_or_default();
        blake3::hash(s.as_bytes()).to_hex()[..32].to_string()
    }

    /// Approximate prompt size in tokens (words), for dry runs.
    pub fn approx_prompt_tokens(&self) -> usize {
        match (&self.messages, &self.prompt) {
            (Some(m), _) => m.iter().map(|m| m.content.split_whitespace().count()).sum(),
            (None, Some(p)) => p.split_whitespace().count(),
            _ => 0,
        }
    }

    /// The HTTP body for `profile` asking for `n` choices, serialized. Without `extra_body` (the common case) it is
    /// written straight from borrowed fields: building a `serde_json::Value` tree per request
    /// and dropping it again was ~5% of a sending run's CPU. With `extra_body`, whose keys may
    /// override any other, it goes through [`Canonical::body_value`].
    pub fn to_body(&self, profile: Profile, n: u32) -> Vec<u8> {
        let completions_logprobs = self.api == Api::Completions
            && (self.sampling.logprobs.is_some() || self.sampling.top_logprobs.is_some());
        if !self.sampling.extra_body.is_empty() || completions_logprobs {
            return serde_json::to_vec(&self.body_value(profile, n)).unwrap_or_default();
        }
        #[derive(Serialize)]
        struct Body<'a> {
            model: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            messages: Option<&'a [Message]>,
            #[serde(skip_serializing_if = "Option::is_none")]
            prompt: Option<&'a str>,
            #[serde(flatten)]
            sampling: &'a Sampling,
            #[serde(skip_serializing_if = "Option::is_none")]
            n: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            response_format: Option<serde_json::Value>,
        }
        let body = Body {
            model: &self.model,
            messages: matches!(self.api, Api::Chat)
                .then(|| self.messages.as_deref().unwrap_or_default()),
            prompt: matches!(self.api, Api::Completions)
                .then(|| self.prompt.as_deref().unwrap_or_default()),
            sampling: &self.sampling,
            n: (n > 1).then_some(n),
            response_format: self.response_format(profile),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The answer's token limit as sent: `extra_body` may set it too, and wins.
    pub fn max_tokens(&self) -> Option<i64> {
        let extra = &self.sampling.extra_body;
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| extra.get(*k).and_then(serde_json::Value::as_i64))
            .or(self.sampling.max_tokens)
    }

    /// The same request with its answer limited to `max` tokens, wherever the limit was set.
    pub fn with_max_tokens(&self, max: i64) -> Canonical {
        let mut c = self.clone();
        c.sampling.max_tokens = Some(max);
        for k in ["max_completion_tokens", "max_tokens"] {
            if let Some(v) = c.sampling.extra_body.get_mut(k) {
                *v = max.into();
            }
        }
        c
    }

    /// The HTTP body for `profile` as a JSON value (batch files embed it).
    pub fn body_value(&self, profile: Profile, n: u32) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("model".into(), self.model.clone().into());
        match self.api {
            Api::Chat => {
                body.insert(
                    "messages".into(),
                    serde_json::to_value(self.messages.clone().unwrap_or_default())
                        .unwrap_or_default(),
                );
            }
            Api::Completions => {
                body.insert(
                    "prompt".into(),
                    self.prompt.clone().unwrap_or_default().into(),
                );
            }
        }
        if let serde_json::Value::Object(m) =
            serde_json::to_value(&self.sampling).unwrap_or_default()
        {
            for (k, v) in m {
                if k != "extra_body" {
                    body.insert(k, v);
                }
            }
        }
        if self.api == Api::Completions {
            // The completions API's `logprobs` is the number of alternatives per token.
            body.remove("top_logprobs");
            body.remove("logprobs");
            if self.sampling.logprobs == Some(true) {
                body.insert(
                    "logprobs".into(),
                    self.sampling.top_logprobs.unwrap_or(0).into(),
                );
            }
        }
        if n > 1 {
            body.insert("n".into(), n.into());
        }
        if let Some(rf) = self.response_format(profile) {
            body.insert("response_format".into(), rf);
        }
        // Passed through verbatim: vLLM's own options (top_k, min_p, structured_outputs...).
        for (k, v) in &self.sampling.extra_body {
            body.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(body)
    }

    /// `response_format` in the profile's dialect.
    fn response_format(&self, profile: Profile) -> Option<serde_json::Value> {
        let schema = self.response_schema.as_ref()?;
        Some(match profile {
            Profile::LlamaCpp => serde_json::json!({"type": "json_object", "schema": schema}),
            // vLLM enforces any schema by structured decoding.
            Profile::Vllm => serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema, "strict": true}
            }),
            // OpenAI rejects `strict: true` unless every object closes its properties and
            // requires all of them: ask for strict mode only when the schema allows it.
            Profile::Openai => serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": schema, "strict": strict_ok(schema)}
            }),
        })
    }
}

/// Does `schema` meet OpenAI's strict structured-output rules: every object with
/// `properties` has `additionalProperties: false` and lists all of them in `required`?
fn strict_ok(schema: &serde_json::Value) -> bool {
    use serde_json::Value;
    match schema {
        Value::Object(m) => {
            let is_object = match m.get("type") {
                Some(Value::String(t)) => t == "object",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
                _ => m.contains_key("properties"),
            };
            // Every object, with properties or free-form, must be closed.
            if is_object && m.get("additionalProperties") != Some(&Value::Bool(false)) {
                return false;
            }
            if let Some(Value::Object(props)) = m.get("properties") {
                let required: Vec<&str> = m
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if !props.keys().all(|k| required.contains(&k.as_str())) {
                    return false;
                }
            }
            m.iter().all(|(k, v)| match k.as_str() {
                // A map of names to schemas: a property may be called `required` or `enum`.
                "properties" | "$defs" | "definitions" => v
                    .as_object()
                    .is_none_or(|props| props.values().all(strict_ok)),
                // Values, not schemas.
                "required" | "enum" | "const" | "default" | "examples" => true,
                _ => strict_ok(v),
            })
        }
        Value::Array(a) => a.iter().all(strict_ok),
        _ => true,
    }
}

/// A request id (32 hex digits) as the 128-bit number it spells: the in-flight map's key, kept
/// off the heap (the map holds every request on the wire, up to two chunks of them).
pub fn id_key(id: &str) -> u128 {
    u128::from_str_radix(id, 16).unwrap_or_else(|_| {
        // Not an id this stage made (it never happens): any stable hash will do.
        let h = blake3::hash(id.as_bytes());
        u128::from_le_bytes(h.as_bytes()[..16].try_into().unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Canonical {
        Canonical {
            model: "m".into(),
            api: Api::Chat,
            messages: Some(vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }]),
            prompt: None,
            sampling: Sampling {
                temperature: Some(0.7),
                ..Default::default()
            },
            response_schema: Some(serde_json::json!({"type": "object"})),
            sample: 0,
        }
    }

    #[test]
    fn id_depends_on_sample_and_params_not_on_profile() {
        let a = req();
        let mut b = req();
        b.sample = 1;
        assert_ne!(a.id(), b.id());
        let mut c = req();
        c.sampling.temperature = Some(0.8);
        assert_ne!(a.id(), c.id());
        assert_eq!(a.id(), req().id());
    }

    /// serde_json keeps insertion order when any crate of the build enables its
    /// `preserve_order` feature (langdetect does); a cache key must not change with it.
    #[test]
    fn id_does_not_depend_on_the_key_order_of_a_schema_or_extra_body() {
        let schema = |first_b: bool| {
            let mut m = serde_json::Map::new();
            let (x, y) = (
                (
                    "b".to_string(),
                    serde_json::json!({"z": 1, "y": [{"q": 1, "p": 2}]}),
                ),
                ("a".to_string(), serde_json::json!("s")),
            );
            if first_b {
                m.insert(x.0, x.1);
                m.insert(y.0, y.1);
            } else {
                m.insert(y.0, y.1);
                m.insert(x.0, x.1);
            }
            serde_json::Value::Object(m)
        };
        let (mut a, mut b) = (req(), req());
        a.response_schema = Some(schema(true));
        b.response_schema = Some(schema(false));
        a.sampling.extra_body = [("kw".to_string(), schema(true))].into();
        b.sampling.extra_body = [("kw".to_string(), schema(false))].into();
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), req().id());
    }

    #[test]
    fn serialized_body_equals_the_value_body() {
        let mut completions = req();
        completions.api = Api::Completions;
        completions.messages = None;
        completions.prompt = Some("say \"hi\"\n".into());
        completions.response_schema = None;
        let mut extra = req();
        extra.sampling.extra_body = [
            ("top_k".to_string(), serde_json::json!(20)),
            ("temperature".to_string(), serde_json::json!(0.1)),
        ]
        .into();
        let mut full = req();
        full.sampling = Sampling {
            temperature: Some(1.0),
            top_p: Some(0.95),
            max_tokens: Some(4096),
            stop: Some(vec!["</s>".into()]),
            seed: Some(7),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            logprobs: Some(true),
            top_logprobs: Some(2),
            extra_body: Default::default(),
        };
        let mut completions_logprobs = full.clone();
        completions_logprobs.api = Api::Completions;
        completions_logprobs.messages = None;
        completions_logprobs.prompt = Some("p".into());
        let v = completions_logprobs.body_value(Profile::Vllm, 1);
        assert_eq!(
            (v["logprobs"].clone(), v.get("top_logprobs")),
            (2.into(), None)
        );
        let v = full.body_value(Profile::Vllm, 1);
        assert_eq!(
            (v["logprobs"].clone(), v["top_logprobs"].clone()),
            (true.into(), 2.into())
        );
        for r in [req(), completions, extra, full, completions_logprobs] {
            for profile in [Profile::Vllm, Profile::LlamaCpp, Profile::Openai] {
                for n in [1, 4] {
                    let bytes: serde_json::Value =
                        serde_json::from_slice(&r.to_body(profile, n)).unwrap();
                    assert_eq!(bytes, r.body_value(profile, n), "{r:?} {profile:?} n={n}");
                }
            }
        }
        let mut e = req();
        e.sampling.extra_body = [("temperature".to_string(), serde_json::json!(0.1))].into();
        let v: serde_json::Value = serde_json::from_slice(&e.to_body(Profile::Vllm, 1)).unwrap();
        assert_eq!(v["temperature"], 0.1, "extra_body overrides a sampling key");
    }

    #[test]
    fn structured_output_dialects() {
        let v = req().body_value(Profile::Vllm, 1);
        assert_eq!(v["response_format"]["type"], "json_schema");
        assert_eq!(
            v["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        let l = req().body_value(Profile::LlamaCpp, 1);
        assert_eq!(l["response_format"]["type"], "json_object");
        assert_eq!(l["response_format"]["schema"]["type"], "object");
        assert!(l.get("n").is_none());
        let n = req().body_value(Profile::Vllm, 3);
        assert_eq!(n["n"], 3);
        // OpenAI: strict only for schemas its strict mode accepts.
        let strict = |schema: serde_json::Value| {
            let mut r = req();
            r.response_schema = Some(schema);
            r.body_value(Profile::Openai, 1)["response_format"]["json_schema"]["strict"].clone()
        };
        let closed = serde_json::json!({"type": "object", "additionalProperties": false,
            "required": ["a", "b"], "properties": {"a": {"type": "string"},
            "b": {"type": "array", "items": {"type": "object", "additionalProperties": false,
                  "required": ["c"], "properties": {"c": {"type": "integer"}}}}}});
        assert_eq!(strict(closed.clone()), true);
        let mut open_inner = closed.clone();
        open_inner["properties"]["b"]["items"]
            .as_object_mut()
            .unwrap()
            .remove("additionalProperties");
        assert_eq!(strict(open_inner), false);
        let mut optional = closed.clone();
        optional["required"] = serde_json::json!(["a"]);
        assert_eq!(strict(optional), false);
        // A free-form object (no properties) is not closed either.
        let mut free = closed;
        free["properties"]["meta"] = serde_json::json!({"type": "object"});
        free["required"] = serde_json::json!(["a", "b", "meta"]);
        assert_eq!(strict(free), false);
        // A property may itself be called `required`: it is a schema, checked as one.
        let named = serde_json::json!({"type": "object", "additionalProperties": false,
            "required": ["required"], "properties": {"required": {"type": "boolean"}}});
        assert_eq!(strict(named.clone()), true);
        let mut named_open = named;
        named_open["properties"]["required"] =
            serde_json::json!({"type": "object", "properties": {"x": {"type": "string"}}});
        assert_eq!(strict(named_open), false);
    }
}
