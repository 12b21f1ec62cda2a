//! SQL functions ifloom adds to DataFusion, available in `sql` stages and `ifloom sql`.
//!
//! - `to_json(x)`: any value (struct, list, scalar) as JSON text. Pipelines build LLM targets
//!   and exports that are JSON documents (an UltraComposer target is
//!   `{"augmented query": …, "question": […]}`), and string concatenation cannot escape
//!   quotes and newlines correctly.
//! - `word_count(text)`: the number of whitespace-separated words (as `regexp_count(text,
//!   '\S+')`, several times faster: the statistics count words of every response).
//! - `py_repr(x)`: a value as Python's `repr()` writes it (`[{'from': 'human', 'value':
//!   "it's"}]`, `None`, `True`), struct fields in their order. UltraIF's UltraComposer reads
//!   a conversation's history as the Python repr of its turns (`augment_query.py` formats the
//!   list into its prompt), so its inputs and training pairs are written with this.
//! - `string_list(text)`: the list of strings an LLM wrote somewhere in its answer, from the
//!   first `[` to the last `]`, read as JSON or as a Python literal (null when it is not a
//!   list). AutoIF's back-translation step reads its answers this way (the Flywheel
//!   re-implementation's `s[s.find('['):s.rfind(']')+1]` and `ast.literal_eval`); an item
//!   that is itself a list gives its first element, as there.
//! - `struct_entries(s)`: a struct used as a map (one field per key, one value type) as a
//!   list of `{key, value}`, to `unnest` (JSON objects used as maps, such as a benchmark's
//!   numbered sub-instructions).
//!
//! Stage kinds and benchmarks add functions of their own (a judge-answer reader, a rule
//! chooser): each module lists its functions in its [`crate::module::Module`], and the engine
//! registers what the registry gives it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The functions every session has (the core module's, see [`crate::registry`]).
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(ToJson::new()),
        ScalarUDF::new_from_impl(WordCount {
            signature: Signature::string(1, Volatility::Immutable),
        }),
        ScalarUDF::new_from_impl(PyRepr {
            signature: Signature::any(1, Volatility::Immutable),
        }),
        ScalarUDF::new_from_impl(StringList {
            signature: Signature::string(1, Volatility::Immutable),
        }),
        ScalarUDF::new_from_impl(StructEntries {
            signature: Signature::any(1, Volatility::Immutable),
        }),
    ]
}

/// `struct_entries(s)`: a struct whose fields all have one type, as a list of
/// `{key, value}` (its non-null fields, in order). JSON objects used as maps (EIFBench's
/// `sub_instructions`: `sub_instruction_0`, `sub_instruction_1`, ...) read as structs with a
/// field per key; this turns them into rows SQL can `unnest`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct StructEntries {
    signature: Signature,
}

fn entry_type(arg: &DataType) -> DfResult<DataType> {
    let DataType::Struct(fields) = arg else {
        return Err(DataFusionError::Plan(format!(
            "struct_entries takes a struct, not {arg}"
        )));
    };
    let Some(first) = fields.first() else {
        return Err(DataFusionError::Plan(
            "struct_entries: the struct has no fields".into(),
        ));
    };
    if let Some(f) = fields.iter().find(|f| f.data_type() != first.data_type()) {
        return Err(DataFusionError::Plan(format!(
            "struct_entries: field `{}` is {}, field `{}` is {}; the fields must have one type",
            first.name(),
            first.data_type(),
            f.name(),
            f.data_type()
        )));
    }
    Ok(DataType::Struct(
        vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", first.data_type().clone(), true),
        ]
        .into(),
    ))
}

impl ScalarUDFImpl for StructEntries {
    fn name(&self) -> &str {
        "struct_entries"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        let t = entry_type(arg_types.first().unwrap_or(&DataType::Null))?;
        Ok(DataType::List(Arc::new(Field::new("item", t, true))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        use arrow::array::{AsArray, ListArray, StructArray, UInt32Array};
        use arrow::buffer::OffsetBuffer;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = arrays
            .first()
            .ok_or_else(|| DataFusionError::Plan("struct_entries takes one argument".into()))?;
        let DataType::Struct(entry_fields) = entry_type(a.data_type())? else {
            unreachable!("entry_type returns a struct")
        };
        let st = a.as_struct();
        let names: Vec<&str> = st.fields().iter().map(|f| f.name().as_str()).collect();
        let children: Vec<&dyn Array> = st.columns().iter().map(|c| c.as_ref()).collect();
        let all = arrow::compute::concat(&children)?;
        let n = st.len();
        let (mut keys, mut take, mut offsets) = (Vec::new(), Vec::new(), vec![0i32]);
        for row in 0..n {
            if !st.is_null(row) {
                for (f, c) in children.iter().enumerate() {
                    if !c.is_null(row) {
                        keys.push(names[f]);
                        take.push((f * n + row) as u32);
                    }
                }
            }
            offsets.push(keys.len() as i32);
        }
        let values = arrow::compute::take(all.as_ref(), &UInt32Array::from(take), None)?;
        let entries = StructArray::try_new(
            entry_fields.clone(),
            vec![Arc::new(StringArray::from(keys)), values],
            None,
        )?;
        let item = Arc::new(Field::new("item", DataType::Struct(entry_fields), true));
        let list = ListArray::try_new(
            item,
            OffsetBuffer::new(offsets.into()),
            Arc::new(entries),
            st.nulls().cloned(),
        )?;
        Ok(ColumnarValue::Array(Arc::new(list)))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PyRepr {
    signature: Signature,
}

/// `s` as a Python string literal, as `repr(s)` writes it: single quotes unless the text has
/// a single quote and no double quote; backslash, the quote, `\t`, `\n`, `\r` escaped;
/// other control characters, non-ASCII spaces and format characters as `\xNN` / `\uNNNN`
/// / `\UNNNNNNNN` (Python's "not printable", for the characters that occur in text).
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            ' ' => out.push(' '),
            c if !py_printable(c) => {
                let n = c as u32;
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `str.isprintable` for one character (space aside): not a control, separator
/// (space, line, paragraph), format or private-use character.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || c.is_whitespace()
        || matches!(n, 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x180e | 0x200b..=0x200f
            | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff | 0xfff9..=0xfffb
            | 0xe000..=0xf8ff))
}

/// Row `i` of `a` as Python's repr.
fn py_repr_at(a: &dyn Array, i: usize) -> DfResult<String> {
    use arrow::array::AsArray;
    use arrow::datatypes::*;
    if a.is_null(i) {
        return Ok("None".into());
    }
    let float = |f: f64| {
        if f.is_nan() {
            "nan".to_string()
        } else if f.is_infinite() {
            if f > 0.0 { "inf" } else { "-inf" }.to_string()
        } else if f.fract() == 0.0 && f.abs() < 1e16 {
            format!("{f:.1}")
        } else {
            format!("{f}")
        }
    };
    Ok(match a.data_type() {
        DataType::Null => "None".into(),
        DataType::Boolean => if a.as_boolean().value(i) {
            "True"
        } else {
            "False"
        }
        .into(),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).to_string(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).to_string(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).to_string(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).to_string(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).to_string(),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => py_str_repr(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => py_str_repr(a.as_string::<i64>().value(i)),
        DataType::Utf8View => py_str_repr(a.as_string_view().value(i)),
        DataType::List(_) => py_repr_list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => py_repr_list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let st = a.as_struct();
            let mut parts = Vec::with_capacity(fields.len());
            for (f, col) in fields.iter().zip(st.columns()) {
                parts.push(format!(
                    "{}: {}",
                    py_str_repr(f.name()),
                    py_repr_at(col.as_ref(), i)?
                ));
            }
            format!("{{{}}}", parts.join(", "))
        }
        t => {
            return Err(DataFusionError::Plan(format!(
                "py_repr: values of type {t} are not supported (text, numbers, booleans, lists and structs are)"
            )));
        }
    })
}

fn py_repr_list(items: &dyn Array) -> DfResult<String> {
    let parts = (0..items.len())
        .map(|j| py_repr_at(items, j))
        .collect::<DfResult<Vec<_>>>()?;
    Ok(format!("[{}]", parts.join(", ")))
}

impl ScalarUDFImpl for PyRepr {
    fn name(&self) -> &str {
        "py_repr"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = arrays
            .first()
            .ok_or_else(|| DataFusionError::Plan("py_repr takes one argument".into()))?;
        let out = (0..a.len())
            .map(|i| {
                if a.is_null(i) {
                    Ok(None)
                } else {
                    py_repr_at(a.as_ref(), i).map(Some)
                }
            })
            .collect::<DfResult<StringArray>>()?;
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct WordCount {
    signature: Signature,
}

/// Words in `s`: maximal runs of non-whitespace (Unicode White_Space, as regex `\S+`).
pub fn word_count(s: &str) -> i64 {
    if s.is_ascii() {
        let mut n = 0;
        let mut in_word = false;
        for &b in s.as_bytes() {
            let space = matches!(b, b' ' | b'\t'..=b'\r');
            n += (!space && !in_word) as i64;
            in_word = !space;
        }
        return n;
    }
    s.split_whitespace().count() as i64
}

impl ScalarUDFImpl for WordCount {
    fn name(&self) -> &str {
        "word_count"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = arrays
            .first()
            .ok_or_else(|| DataFusionError::Plan("word_count takes one argument".into()))?;
        let a = arrow::compute::cast(a, &DataType::Utf8)?;
        let a = a
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| DataFusionError::Internal("word_count: not text".into()))?;
        let out: arrow::array::Int64Array = a.iter().map(|v| v.map(word_count)).collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ToJson {
    signature: Signature,
}

impl ToJson {
    fn new() -> Self {
        ToJson {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

/// Each value of `array` as JSON text (null stays null).
pub fn to_json_array(array: &ArrayRef) -> DfResult<StringArray> {
    let field = Field::new("v", array.data_type().clone(), true);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(vec![field])), vec![array.clone()])?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut buf);
        w.write(&batch)?;
        w.finish()?;
    }
    let rows: Vec<serde_json::Value> = if buf.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&buf).map_err(|e| DataFusionError::External(Box::new(e)))?
    };
    Ok(rows
        .into_iter()
        .map(|r| match r.get("v") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.to_string()),
        })
        .collect())
}

impl ScalarUDFImpl for ToJson {
    fn name(&self) -> &str {
        "to_json"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = arrays
            .first()
            .ok_or_else(|| DataFusionError::Plan("to_json takes one argument".into()))?;
        let out = to_json_array(a)?;
        debug_assert_eq!(out.len(), n);
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct StringList {
    signature: Signature,
}

/// See the module doc: `string_list(text)`.
pub fn string_list(text: &str) -> Option<Vec<String>> {
    let (start, end) = (text.find('[')?, text.rfind(']')?);
    if end < start {
        return None;
    }
    let slice = &text[start..=end];
    let v: serde_json::Value = serde_json::from_str(slice)
        .or_else(|_| serde_json::from_str(&crate::llm_client::parse::repair(slice)))
        .ok()?;
    v.as_array()?
        .iter()
        .map(|item| match item {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => a.first()?.as_str().map(str::to_string),
            _ => None,
        })
        .collect()
}

impl ScalarUDFImpl for StringList {
    fn name(&self) -> &str {
        "string_list"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::List(Arc::new(Field::new(
            "item",
            DataType::Utf8,
            true,
        ))))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let a = arrays
            .first()
            .ok_or_else(|| DataFusionError::Plan("string_list takes one argument".into()))?;
        let a = arrow::compute::cast(a, &DataType::Utf8)?;
        let a = a
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| DataFusionError::Internal("string_list: not text".into()))?;
        let mut b = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new());
        for v in a.iter() {
            match v.and_then(string_list) {
                Some(items) => {
                    for s in items {
                        b.values().append_value(s);
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(b.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn session() -> SessionContext {
        let ctx = SessionContext::new();
        for f in functions() {
            ctx.register_udf(f);
        }
        ctx
    }

    #[tokio::test]
    async fn to_json_escapes_and_nests() {
        let ctx = session();
        let df = ctx
            .sql(r#"SELECT to_json(named_struct('q', 'say "hi"' || chr(10), 'n', 2)) AS j, to_json(make_array(1, 2)) AS l, to_json(CAST(NULL AS VARCHAR)) AS z"#)
            .await
            .unwrap();
        let b = &df.collect().await.unwrap()[0];
        let s = |i: usize| {
            let c = b.column(i).as_any().downcast_ref::<StringArray>().unwrap();
            (!arrow::array::Array::is_null(c, 0)).then(|| c.value(0).to_string())
        };
        let v: serde_json::Value = serde_json::from_str(&s(0).unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"q": "say \"hi\"\n", "n": 2}));
        assert_eq!(s(1).unwrap(), "[1,2]");
        assert_eq!(s(2), None);
    }

    /// Expected strings written by hand from Python's rules (what `repr()` prints).
    #[tokio::test]
    async fn py_repr_writes_what_python_prints() {
        assert_eq!(py_str_repr("plain"), "'plain'");
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("both ' and \""), "'both \\' and \"'");
        assert_eq!(py_str_repr("a\\b\nc\td"), "'a\\\\b\\nc\\td'");
        assert_eq!(
            py_str_repr("caf\u{e9} \u{a0}x\u{7}"),
            "'caf\u{e9} \\xa0x\\x07'"
        );
        let ctx = session();
        let df = ctx
            .sql(r#"SELECT py_repr(make_array(named_struct('from', 'human', 'value', 'Hi, it''s me'), named_struct('from', 'gpt', 'value', 'Hello'))) AS h,
                           py_repr(make_array(1, 2)) AS l,
                           py_repr(named_struct('ok', true, 'x', 1.5, 'n', CAST(NULL AS VARCHAR))) AS s,
                           py_repr(CAST(NULL AS VARCHAR)) AS z"#)
            .await
            .unwrap();
        let b = &df.collect().await.unwrap()[0];
        let s = |i: usize| {
            let c = b.column(i).as_any().downcast_ref::<StringArray>().unwrap();
            (!arrow::array::Array::is_null(c, 0)).then(|| c.value(0).to_string())
        };
        assert_eq!(
            s(0).unwrap(),
            r#"[{'from': 'human', 'value': "Hi, it's me"}, {'from': 'gpt', 'value': 'Hello'}]"#
        );
        assert_eq!(s(1).unwrap(), "[1, 2]");
        assert_eq!(s(2).unwrap(), "{'ok': True, 'x': 1.5, 'n': None}");
        assert_eq!(s(3), None);
    }

    #[tokio::test]
    async fn word_count_agrees_with_regexp_count() {
        let ctx = session();
        let df = ctx
            .sql(r#"SELECT t, word_count(t) AS w, regexp_count(t, '\S+') AS r FROM (VALUES ('  two  words '), (''), ('one'), ('a' || chr(11) || 'b' || chr(10) || 'c'), ('naïve café' || chr(12288) || 'x'), (NULL)) AS v(t)"#)
            .await
            .unwrap();
        let b = &df.collect().await.unwrap()[0];
        let w = b
            .column(1)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let r = b
            .column(2)
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap();
        let got: Vec<Option<i64>> = w.iter().collect();
        assert_eq!(got, vec![Some(2), Some(0), Some(1), Some(3), Some(3), None]);
        assert_eq!(got, r.iter().collect::<Vec<_>>());
    }

    #[test]
    fn string_list_reads_json_and_python_lists_from_prose() {
        assert_eq!(
            string_list(r#"Here: ["Answer in lowercase.", "Use no capitals."] done"#),
            Some(vec![
                "Answer in lowercase.".into(),
                "Use no capitals.".into()
            ])
        );
        // Python literal (single quotes, an apostrophe inside double quotes), items as lists.
        assert_eq!(
            string_list(r#"['Do not ask.', "Don't ask.", ['Nested first', 'x']]"#),
            Some(vec![
                "Do not ask.".into(),
                "Don't ask.".into(),
                "Nested first".into()
            ])
        );
        assert_eq!(string_list("no list here"), None);
        assert_eq!(string_list("] backwards ["), None);
        assert_eq!(string_list("[1, 2]"), None);
    }
}
