//! A YAML tree that remembers where every node came from, and a serde `Deserializer` over it.
//!
//! Why not deserialize straight from the text with a serde YAML crate: those stop at the first
//! error and, for the parts of a file they buffer, forget positions. ifloom wants *every* error
//! in a pipeline file at once, each at its own line:column. So the file is parsed once into a
//! [`Node`] tree (yaml-rust2's marked events), parameters are interpolated into the tree (so
//! positions stay those of the file), and then each part (every stage on its own) is
//! deserialized from its node; an error in one stage does not hide the errors in the next.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Error as _, IntoDeserializer, Unexpected, Visitor};
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

/// From serde's "unknown field `x`, expected one of `a`, `b`" (or "unknown variant"): the
/// unknown name and the expected ones.
pub fn unknown_name(message: &str) -> Option<(String, Vec<String>)> {
    let start = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| message.find(p).map(|i| i + p.len()))?;
    let rest = &message[start..];
    let end = rest.find('`')?;
    let expected = rest[end + 1..]
        .split_once("expected")
        .map(|(_, list)| {
            list.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((rest[..end].to_string(), expected))
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            pos: None,
            path: String::new(),
            message: msg.to_string(),
        }
    }
}

thread_local! {
    /// Errors set aside by [`collecting`] (`None` outside of it).
    static RECOVERED: RefCell<Option<Vec<DeError>>> = const { RefCell::new(None) };
}

/// Run `f`, which deserializes nodes, so that a value of the wrong type does not end the
/// deserialization: the error is set aside and a stand-in value of the expected type (`0`,
/// `false`, `""`, an empty list or mapping, an enum's first variant) is used instead, so the
/// fields after it are checked too. Returns what `f` returned and the errors set aside, in
/// file order. `f`'s result was built from stand-ins when any were set aside: use it only to
/// find more errors. Errors that leave no stand-in (unknown fields, missing fields, a wrong
/// value inside a struct given as a mapping) still end the deserialization as usual.
pub fn collecting<R>(f: impl FnOnce() -> R) -> (R, Vec<DeError>) {
    /// Restores the enclosing state, also when `f` panics.
    struct Restore(Option<Option<Vec<DeError>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(prev) = self.0.take() {
                RECOVERED.with(|r| *r.borrow_mut() = prev);
            }
        }
    }
    let prev = RECOVERED.with(|r| r.borrow_mut().replace(Vec::new()));
    let restore = Restore(Some(prev));
    let out = f();
    let errs = RECOVERED
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default();
    drop(restore);
    (out, errs)
}

fn is_collecting() -> bool {
    RECOVERED.with(|r| r.borrow().is_some())
}

/// Set `e` aside when [`collecting`], else give it back as the error to return.
fn set_aside(e: DeError) -> Result<(), DeError> {
    RECOVERED.with(|r| match r.borrow_mut().as_mut() {
        Some(v) => {
            v.push(e);
            Ok(())
        }
        None => Err(e),
    })
}

/// A stand-in could not be used after all (a struct's required fields, an enum's first variant
/// that takes a value): the error set aside for it becomes the error returned, so the mistake
/// is reported once, and not as what the stand-in lacked.
fn take_back(fallback: DeError) -> DeError {
    RECOVERED
        .with(|r| r.borrow_mut().as_mut().and_then(Vec::pop))
        .unwrap_or(fallback)
}

/// A primitive number type: the node fits when it is an integer within range. Under
/// [`collecting`] a misfit is set aside and `0` is used instead.
macro_rules! int_method {
    ($method:ident, $t:ty, $visit:ident) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let e = match self.node.value {
                Value::Int(i) if <$t>::try_from(i).is_ok() => None,
                Value::Int(i) => Some(DeError::invalid_value(Unexpected::Signed(i), &visitor)),
                _ => Some(DeError::invalid_type(self.unexpected(), &visitor)),
            };
            match e {
                Some(e) if is_collecting() => {
                    set_aside(self.fix(e))?;
                    visitor.$visit(0).map_err(take_back)
                }
                _ => self.deserialize_any(visitor),
            }
        }
    };
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

    /// The node as serde names what it got, for serde's own "invalid type" messages.
    fn unexpected(&self) -> Unexpected<'_> {
        match &self.node.value {
            Value::Null => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Int(i) => Unexpected::Signed(*i),
            Value::Float(f) => Unexpected::Float(*f),
            Value::Str(s) => Unexpected::Str(s),
            Value::Seq(_) => Unexpected::Seq,
            Value::Map(_) => Unexpected::Map,
        }
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
            _ => {
                set_aside(self.invalid("a string"))?;
                return visitor.visit_str("").map_err(take_back);
            }
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
            _ => {
                set_aside(self.invalid("a list"))?;
                visitor
                    .visit_seq(SeqDe {
                        items: [].iter(),
                        idx: 0,
                        path: &self.path,
                    })
                    .map_err(take_back)
            }
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Map(_) => self.deserialize_any(visitor),
            _ => {
                set_aside(self.invalid("a mapping"))?;
                visitor
                    .visit_map(MapDe {
                        entries: [].iter(),
                        value: None,
                        path: &self.path,
                        key: String::new(),
                    })
                    .map_err(take_back)
            }
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
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        // Under `collecting`, a name that is no variant (or a node that is no enum at all) is
        // set aside and the first variant stands in.
        let stand_in = |e: DeError| -> Result<&'static str, DeError> {
            match variants.first() {
                Some(first) if is_collecting() => {
                    set_aside(e)?;
                    Ok(*first)
                }
                _ => Err(e),
            }
        };
        let r = match &self.node.value {
            Value::Str(s) if is_collecting() && !variants.contains(&s.as_str()) => {
                let e = self.fix(DeError::unknown_variant(s, variants));
                return visitor
                    .visit_enum(stand_in(e)?.into_deserializer())
                    .map_err(take_back);
            }
            Value::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Map(entries) if entries.len() == 1 => visitor.visit_enum(EnumDe {
                key: &entries[0].0,
                value: &entries[0].1,
                path: &self.path,
            }),
            _ => {
                let e = self.invalid("a name, or a mapping with one key");
                return visitor
                    .visit_enum(stand_in(e)?.into_deserializer())
                    .map_err(take_back);
            }
        };
        r.map_err(|e| self.fix(e))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Bool(_) => self.deserialize_any(visitor),
            _ if is_collecting() => {
                set_aside(self.fix(DeError::invalid_type(self.unexpected(), &visitor)))?;
                visitor.visit_bool(false).map_err(take_back)
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.value {
            Value::Int(_) | Value::Float(_) => self.deserialize_any(visitor),
            _ if is_collecting() => {
                set_aside(self.fix(DeError::invalid_type(self.unexpected(), &visitor)))?;
                visitor.visit_f64(0.0).map_err(take_back)
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    int_method!(deserialize_i8, i8, visit_i64);
    int_method!(deserialize_i16, i16, visit_i64);
    int_method!(deserialize_i32, i32, visit_i64);
    int_method!(deserialize_i64, i64, visit_i64);
    int_method!(deserialize_u8, u8, visit_u64);
    int_method!(deserialize_u16, u16, visit_u64);
    int_method!(deserialize_u32, u32, visit_u64);
    int_method!(deserialize_u64, u64, visit_u64);

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct tuple tuple_struct
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

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Many {
        n: u32,
        flag: bool,
        name: String,
        list: Vec<u8>,
        inner: Option<S>,
        e: E,
    }

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum E {
        One,
        Two,
    }

    #[test]
    fn collecting_reports_every_wrong_value() {
        let text = "n: two\nflag: maybe\nname: [x]\nlist: [1, 300]\ninner: {a: 1}\ne: three\n";
        let n = parse(text).unwrap();
        let (r, errs) = collecting(|| n.deserialize::<Many>(""));
        assert!(r.is_ok(), "{r:?}");
        let got: Vec<(usize, String)> = errs
            .iter()
            .map(|e| (e.pos.unwrap().line, e.path.clone()))
            .collect();
        assert_eq!(
            got,
            [1, 2, 3, 4, 6]
                .iter()
                .zip(["n", "flag", "name", "list[1]", "e"])
                .map(|(l, p)| (*l, p.to_string()))
                .collect::<Vec<_>>()
        );
        assert!(
            errs[0].message.contains("invalid type: string \"two\""),
            "{}",
            errs[0].message
        );
        assert!(
            errs[4].message.contains("unknown variant `three`"),
            "{}",
            errs[4].message
        );
        // Outside `collecting`, the first error ends it as before.
        let e = n.deserialize::<Many>("").unwrap_err();
        assert_eq!(e.path, "n");
    }

    #[test]
    fn a_stand_in_that_cannot_serve_is_reported_once() {
        let n = parse("inner: 5\nn: x\n").unwrap();
        let (r, errs) = collecting(|| n.deserialize::<Many>(""));
        let e = r.unwrap_err();
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(e.pos, Some(Pos { line: 1, col: 8 }));
        assert!(e.message.contains("expected a mapping"), "{}", e.message);
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
