//! SQL functions ifloom adds to DataFusion, available in `sql` stages and `ifloom sql`.
//!
//! - `to_json(x)`: any value (struct, list, scalar) as JSON text. Pipelines build LLM targets
//!   and exports that are JSON documents (an UltraComposer target is
//!   `{"augmented_query": …, "eval_question": …}`), and string concatenation cannot escape
//!   quotes and newlines correctly.

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
}
