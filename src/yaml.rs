//! A YAML tree that remembers where every node came from, and a serde `Deserializer` over it.
//!
//! Why not deserialize straight from the text with a serde YAML crate: those stop at the first
//! error and, for the parts of a file they buffer, forget positions. ifloom wants *every* error
//! in a pipeline file at once, each at its own line:column. So the file is parsed once into a
//! [`Node`] tree (yaml-rust2's marked events), parameters are interpolated into the tree (so
//! positions stay those of the file), and then each part (every stage on its own) is
//! deserialized from its node; an error in one stage does not hide the errors in the next.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in the pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// One YAML node with its position. Scalars keep their source text in `raw` so a plain `42`
/// can still be read as the string "42" where a string is expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
    pub raw: Option<String>,
}

impl Node {
    pub fn new(value: Value, pos: Pos) -> Self {
        Node {
            value,
            pos,
            raw: None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The value under `key` of a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The key node (not the value) for `key`: errors about a field point at its name.
    pub fn key_node(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, _)| k)
    }

    /// Position of the node reached by `path` (mapping keys or sequence indexes), falling back
    /// to the deepest node that exists so a diagnostic always has a place.
    pub fn pos_at(&self, path: &[&str]) -> Pos {
        let mut node = self;
        for p in path {
            let next = match &node.value {
                Value::Map(_) => node.get(p),
                Value::Seq(items) => p.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos
    }

    /// A short name of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Convert to JSON (used for fingerprints and for param values).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => s.clone().into(),
            Value::Seq(items) => items.iter().map(Node::to_json).collect(),
            Value::Map(m) => {
                let mut obj = serde_json::Map::new();
                for (k, v) in m {
                    obj.insert(k.scalar_text(), v.to_json());
                }
                serde_json::Value::Object(obj)
            }
        }
    }

    /// The text of a scalar as written (or rendered).
    pub fn scalar_text(&self) -> String {
        if let Some(r) = &self.raw {
            return r.clone();
        }
        match &self.value {
            Value::Null => "null".into(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => s.clone(),
            Value::Seq(_) => "[...]".into(),
            Value::Map(_) => "{...}".into(),
        }
    }

    /// Deserialize this node into `T`, with positions on every error.
    pub fn deserialize<T: DeserializeOwned>(&self, path: &str) -> Result<T, DeError> {
        T::deserialize(NodeDe {
            node: self,
            path: path.to_string(),
        })
    }
}

/// Resolve a plain (unquoted) scalar the way YAML 1.2's core schema does.
pub fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Int(i);
    }
    let looks_numeric = s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && s.bytes().any(|b| b.is_ascii_digit());
    if looks_numeric && let Ok(f) = s.parse::<f64>() {
        return Value::Float(f);
    }
    match s {
        ".inf" | ".Inf" | "+.inf" => Value::Float(f64::INFINITY),
        "-.inf" | "-.Inf" => Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" => Value::Float(f64::NAN),
        _ => Value::Str(s.to_string()),
    }
}

/// A syntax error in the YAML text itself.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

fn pos_of(m: Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, pending, _, _)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => entries.push((key, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = pos_of(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let value = if style == TScalarStyle::Plain {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.clone())
                };
                let node = Node {
                    value,
                    pos,
                    raw: Some(text),
                };
                self.push_value(node, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(Vec::new(), pos, anchor)),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(Vec::new(), None, pos, anchor))
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq(items, p, anchor)) = self.stack.pop() {
                    self.push_value(Node::new(Value::Seq(items), p), anchor);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map(entries, _, p, anchor)) = self.stack.pop() {
                    // A block mapping's start event can be marked after its first key (at
                    // `- id:`, on the colon); the mapping starts at that key.
                    let p = entries.first().map_or(p, |(k, _)| p.min(k.pos));
                    self.push_value(Node::new(Value::Map(entries), p), anchor);
                }
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| Node::new(Value::Null, pos));
                self.push_value(node, 0);
            }
            _ => {}
        }
    }
}

/// Parse YAML text into a positioned tree. An empty document is a null node.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).map_err(|e| SyntaxError {
        pos: pos_of(*e.marker()),
        message: e.info().to_string(),
    })?;
    Ok(builder
        .root
        .unwrap_or_else(|| Node::new(Value::Null, Pos { line: 1, col: 1 })))
}

/// A deserialization error at a place in the file.
#[derive(Debug, Clone)]
pub struct DeError {
    pub pos: Option<Pos>,
    pub path: String,
    pub message: String,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            pos: None,
            path: String::new(),
            message: msg.to_string(),
        }
    }
}

struct NodeDe<'a> {
    node: &'a Node,
    path: String,
}

impl<'a> NodeDe<'a> {
    fn fix(&self, mut e: DeError) -> DeError {
        if e.pos.is_none() {
            e.pos = Some(self.node.pos);
            e.path = self.path.clone();
        }
        e
    }

    fn invalid(&self, expected: &str) -> DeError {
        DeError {
            pos: Some(self.node.pos),
            path: self.path.clone(),
            message: format!(
                "invalid type: {} `{}`, expected {expected}",
                self.node.type_name(),
                short(&self.node.scalar_text())
            ),
        }
    }
}

fn short(s: &str) -> String {
    if s.chars().count() > 40 {
        let t: String = s.chars().take(40).collect();
        format!("{t}…")
    } else {
        s.to_string()
    }
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                idx: 0,
                path: &self.path,
            }),
            Value::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                value: None,
                path: &self.path,
                key: String::new(),
            }),
        };
        r.map_err(|e| self.fix(e))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Str(s) => visitor.visit_str(s),
            Value::Bool(_) | Value::Int(_) | Value::Float(_) => {
                visitor.visit_str(&self.node.scalar_text())
            }
            _ => return Err(self.invalid("a string")),
        };
        r.map_err(|e| self.fix(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Seq(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid("a list")),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(_) => self.deserialize_any(visitor),
            _ => Err(self.invalid("a mapping")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(EnumDe {
                key: &entries[0].0,
                value: &entries[0].1,
                path: &self.path,
            }),
            _ => return Err(self.invalid("a name, or a mapping with one key")),
        };
        r.map_err(|e| self.fix(e))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct tuple tuple_struct
    }
}

struct SeqDe<'a, 'p> {
    items: std::slice::Iter<'a, Node>,
    idx: usize,
    path: &'p str,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = DeError;
    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.items.next() {
            None => Ok(None),
            Some(node) => {
                let path = format!("{}[{}]", self.path, self.idx);
                self.idx += 1;
                seed.deserialize(NodeDe { node, path }).map(Some)
            }
        }
    }
}

struct MapDe<'a, 'p> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    value: Option<&'a Node>,
    path: &'p str,
    key: String,
}

impl<'de> de::MapAccess<'de> for MapDe<'_, '_> {
    type Error = DeError;
    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.value = Some(v);
                self.key = k.scalar_text();
                let path = join(self.path, &self.key);
                seed.deserialize(NodeDe { node: k, path }).map(Some)
            }
        }
    }
    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DeError> {
        let node = self
            .value
            .take()
            .ok_or_else(|| de::Error::custom("value without key"))?;
        seed.deserialize(NodeDe {
            node,
            path: join(self.path, &self.key),
        })
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

struct EnumDe<'a, 'p> {
    key: &'a Node,
    value: &'a Node,
    path: &'p str,
}

impl<'de, 'a, 'p> de::EnumAccess<'de> for EnumDe<'a, 'p> {
    type Error = DeError;
    type Variant = NodeDe<'a>;
    fn variant_seed<V: de::DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, NodeDe<'a>), DeError> {
        let name = self.key.scalar_text();
        let path = join(self.path, &name);
        let v = seed.deserialize(NodeDe {
            node: self.key,
            path: path.clone(),
        })?;
        Ok((
            v,
            NodeDe {
                node: self.value,
                path,
            },
        ))
    }
}

impl<'de> de::VariantAccess<'de> for NodeDe<'_> {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        match self.node.value {
            Value::Null => Ok(()),
            _ => Err(self.invalid("nothing (this option takes no value)")),
        }
    }
    fn newtype_variant_seed<T: de::DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, DeError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct S {
        a: u32,
        b: Option<String>,
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("x:\n  a: 1\n  b: hi\n").unwrap();
        assert_eq!(n.get("x").unwrap().pos, Pos { line: 2, col: 3 });
        assert_eq!(n.pos_at(&["x", "b"]), Pos { line: 3, col: 6 });
    }

    #[test]
    fn wrong_type_points_at_value() {
        let n = parse("a: lots\nb: x\n").unwrap();
        let e = n.deserialize::<S>("").unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 1, col: 4 }));
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn unknown_field_points_at_key() {
        let n = parse("a: 1\nbb: x\n").unwrap();
        let e = n.deserialize::<S>("").unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, col: 1 }));
        assert!(e.message.contains("unknown field `bb`"), "{}", e.message);
    }

    #[test]
    fn block_mapping_in_a_list_starts_at_its_first_key() {
        let n = parse("stages:\n  - id: a\n    kind: sql\n").unwrap();
        assert_eq!(n.pos_at(&["stages", "0"]), Pos { line: 2, col: 5 });
        let f = parse("s: {a: 1}\n").unwrap();
        assert_eq!(f.pos_at(&["s"]), Pos { line: 1, col: 4 });
    }

    #[test]
    fn syntax_error_has_position() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1);
    }

    #[test]
    fn quoted_numbers_stay_strings() {
        let n = parse("a: '12'\nb: 12\n").unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Str("12".into()));
        assert_eq!(n.get("b").unwrap().value, Value::Int(12));
    }
}
