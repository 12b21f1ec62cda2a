//! SQL functions ifloom adds to DataFusion, available in `sql` stages and `ifloom sql`.
//!
//! - `to_json(x)`: any value (struct, list, scalar) as JSON text. Pipelines build LLM targets
//!   and exports that are JSON documents (an UltraComposer target is
//!   `{"augmented_query": …, "eval_question": …}`), and string concatenation cannot escape
//!   quotes and newlines correctly.
//! - `word_count(text)`: the number of whitespace-separated words (as `regexp_count(text,
//!   '\S+')`, several times faster: the statistics count words of every response).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Register every ifloom function with a session.
pub fn register_all(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(ToJson::new()));
    ctx.register_udf(ScalarUDF::new_from_impl(WordCount {
        signature: Signature::string(1, Volatility::Immutable),
    }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn to_json_escapes_and_nests() {
        let ctx = SessionContext::new();
        register_all(&ctx);
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

    #[tokio::test]
    async fn word_count_agrees_with_regexp_count() {
        let ctx = SessionContext::new();
        register_all(&ctx);
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
}
