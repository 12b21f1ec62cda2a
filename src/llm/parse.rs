//! PLACEHOLDER while the real parse module is written (JSON repair, regex, choice).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParseSpec {
    Json(serde_json::Value),
}

#[derive(Debug, Clone)]
pub struct Parsed {
    pub value: serde_json::Value,
    pub repaired: bool,
}

pub fn strip_reasoning(text: &str) -> (String, Option<String>) {
    (text.to_string(), None)
}

pub fn parse(_spec: &ParseSpec, text: &str) -> Result<Parsed, String> {
    serde_json::from_str(text)
        .map(|value| Parsed {
            value,
            repaired: false,
        })
        .map_err(|e| e.to_string())
}

pub fn arrow_type(_spec: &ParseSpec) -> arrow::datatypes::DataType {
    arrow::datatypes::DataType::Utf8
}
