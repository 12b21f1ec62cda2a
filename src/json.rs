//! Canonical JSON: object keys sorted at every level, no whitespace. Hashes of JSON (stage
//! fingerprints, request ids, the simulator's request keys) are taken over this form, never
//! over serde_json's own output, whose key order depends on a Cargo feature
//! (`preserve_order`) that any dependency can switch on for the whole build (the `langdetect`
//! crate does).

use serde_json::{Map, Value};

/// `v` written with sorted keys and no whitespace: byte for byte what serde_json writes for
/// the same value when its maps are sorted (`BTreeMap`, the default feature set).
pub fn canonical_string(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A copy of `v` whose objects hold their keys in sorted order, so that serializing it (as
/// part of a larger struct) writes the canonical order whatever the map type is.
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect::<Map<String, Value>>(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Does `v` hold an object anywhere (so that its serialization depends on map order)?
pub fn has_object(v: &Value) -> bool {
    match v {
        Value::Object(_) => true,
        Value::Array(a) => a.iter().any(has_object),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_at_every_level_whatever_the_insertion_order() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"d": 2, "c": "é\n"}], "x": "s"}}"#)
                .unwrap();
        let want = r#"{"a":{"x":"s","y":[1,{"c":"é\n","d":2}]},"b":1}"#;
        assert_eq!(canonical_string(&a), want);
        assert_eq!(serde_json::to_string(&sorted(&a)).unwrap(), want);
        assert!(has_object(&a) && !has_object(&serde_json::json!([1, "x"])));
    }
}
