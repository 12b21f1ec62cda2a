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
        let s = serde_json::to_string(self).unwrap_or_default();
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

    /// The HTTP path (relative to a `/v1` base URL) and JSON body in `profile`'s dialect,
    /// asking for `n` choices.
    pub fn to_body(&self, profile: Profile, n: u32) -> (&'static str, serde_json::Value) {
        let mut body = serde_json::Map::new();
        body.insert("model".into(), self.model.clone().into());
        let path = match self.api {
            Api::Chat => {
                body.insert(
                    "messages".into(),
                    serde_json::to_value(self.messages.clone().unwrap_or_default())
                        .unwrap_or_default(),
                );
                "chat/completions"
            }
            Api::Completions => {
                body.insert(
                    "prompt".into(),
                    self.prompt.clone().unwrap_or_default().into(),
                );
                "completions"
            }
        };
        if let serde_json::Value::Object(m) =
            serde_json::to_value(&self.sampling).unwrap_or_default()
        {
            for (k, v) in m {
                if k != "extra_body" {
                    body.insert(k, v);
                }
            }
        }
        if n > 1 {
            body.insert("n".into(), n.into());
        }
        if let Some(schema) = &self.response_schema {
            let rf = match profile {
                Profile::LlamaCpp => serde_json::json!({"type": "json_object", "schema": schema}),
                Profile::Vllm | Profile::Openai => serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {"name": "response", "schema": schema, "strict": true}
                }),
            };
            body.insert("response_format".into(), rf);
        }
        // Passed through verbatim: vLLM's own options (top_k, min_p, structured_outputs...).
        for (k, v) in &self.sampling.extra_body {
            body.insert(k.clone(), v.clone());
        }
        (path, serde_json::Value::Object(body))
    }
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

    #[test]
    fn structured_output_dialects() {
        let (_, v) = req().to_body(Profile::Vllm, 1);
        assert_eq!(v["response_format"]["type"], "json_schema");
        assert_eq!(
            v["response_format"]["json_schema"]["schema"]["type"],
            "object"
        );
        let (_, l) = req().to_body(Profile::LlamaCpp, 1);
        assert_eq!(l["response_format"]["type"], "json_object");
        assert_eq!(l["response_format"]["schema"]["type"], "object");
        assert!(l.get("n").is_none());
        let (_, n) = req().to_body(Profile::Vllm, 3);
        assert_eq!(n["n"], 3);
    }
}
