//! The SQL function `followbench_checker(constraint_type, category, source, example_id)`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The function, to register with a session.
pub fn udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(FollowBenchChecker {
        signature: Signature::any(4, Volatility::Immutable),
    })
}

/// `followbench_checker(constraint_type, category, source, example_id)`: the name of the rule
/// FollowBench checks an instruction with, null when the judge does, as `kind: followbench`
/// chooses (a pipeline sends the judge only the rest).
#[derive(Debug, PartialEq, Eq, Hash)]
struct FollowBenchChecker {
    signature: Signature,
}

impl ScalarUDFImpl for FollowBenchChecker {
    fn name(&self) -> &str {
        "followbench_checker"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [ty, category, source, id] = arrays.as_slice() else {
            return Err(DataFusionError::Plan(
                "followbench_checker takes four arguments: followbench_checker(constraint_type, category, source, example_id)".into(),
            ));
        };
        let text = |a: &ArrayRef| -> DfResult<StringArray> {
            Ok(arrow::compute::cast(a, &DataType::Utf8)?
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("Utf8")
                .clone())
        };
        let (ty, category, source) = (text(ty)?, text(category)?, text(source)?);
        let id = arrow::compute::cast(id, &DataType::Int64)?;
        let id = id
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .expect("Int64");
        fn value(a: &StringArray, i: usize) -> &str {
            if a.is_null(i) { "" } else { a.value(i) }
        }
        let out: StringArray = (0..ty.len())
            .map(|i| {
                super::rules::checker(
                    value(&ty, i),
                    value(&category, i),
                    value(&source, i),
                    if id.is_null(i) { -1 } else { id.value(i) },
                )
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
