//! The llm stage's tables: the columns it adds to each chunk of input rows, and the
//! dead-letter table `<id>__failed` of the samples that failed for good.

use super::rounds::Outcome;
use super::*;

/// Rows of the stage's table kept in the Parquet writer before they are flushed as a row group.
pub(super) const FLUSH_ROWS: usize = 1024;

/// Stored when logprobs were asked for and the server sent none: the entry is then known to be
/// complete (an entry without the field was cached by an ifloom that dropped logprobs).
pub(super) const NO_LOGPROBS: &str = "null";

/// The logprobs to cache for one choice.
pub fn kept_logprobs(asked: bool, got: Option<String>) -> Option<String> {
    if asked {
        Some(got.unwrap_or_else(|| NO_LOGPROBS.into()))
    } else {
        got
    }
}

impl LlmStage {
    pub(super) fn failed_schema(&self, parent: &SchemaRef) -> SchemaRef {
        let mut f: Vec<Field> = parent.fields().iter().map(|f| f.as_ref().clone()).collect();
        // The input may already carry one of these names (a judge stage over exploded samples
        // has `sample_index`): the dead-letter column then becomes `failed_<name>`, so the
        // input's value is kept and the table stays queryable.
        for (name, ty, nullable) in [
            ("sample_index", DataType::UInt32, false),
            ("request_id", DataType::Utf8, false),
            ("reason", DataType::Utf8, false),
            ("raw", DataType::Utf8, true),
            ("raw_bytes", DataType::Binary, true),
        ] {
            let taken = parent.fields().iter().any(|p| p.name() == name);
            let name = if taken {
                format!("failed_{name}")
            } else {
                name.to_string()
            };
            f.push(Field::new(name, ty, nullable));
        }
        Arc::new(Schema::new(f))
    }

    /// Append one chunk's rows to the main table and the dead-letter table.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_chunk(
        &self,
        ctx: &RunCtx,
        chunk: &RecordBatch,
        outcomes: &[Vec<Outcome>],
        new_schema: &SchemaRef,
        main_w: &mut Option<ArrowWriter<File>>,
        failed_w: &mut Option<ArrowWriter<File>>,
    ) -> Result<()> {
        let list = self.samples > 1 && !self.explode;
        let mut take: Vec<u32> = Vec::new();
        let mut out_rows: Vec<(&[Outcome], Option<u32>)> = Vec::new();
        let mut failed_take: Vec<u32> = Vec::new();
        let mut failed_cols: (
            Vec<u32>,
            Vec<String>,
            Vec<String>,
            Vec<Option<bytes::Bytes>>,
        ) = Default::default();
        let dropped = |o: &Outcome| {
            o.response.is_err()
                || (self.on_parse_error == OnParseError::Drop && matches!(o.parsed, Some(Err(_))))
        };
        for (r, samples) in outcomes.iter().enumerate() {
            // Dead-letter what failed.
            for (s, o) in samples.iter().enumerate() {
                if dropped(o) {
                    failed_take.push(r as u32);
                    failed_cols.0.push(s as u32);
                    failed_cols.1.push(o.request_id.clone());
                    let (reason, raw) = match (&o.response, &o.parsed) {
                        (Err((m, raw)), _) => (m.clone(), raw.clone()),
                        (Ok((resp, _)), Some(Err(e))) => (
                            format!("parse: {e}"),
                            Some(bytes::Bytes::from(resp.text.clone())),
                        ),
                        _ => (String::new(), None),
                    };
                    failed_cols.2.push(reason);
                    failed_cols.3.push(raw);
                }
            }
            if list {
                if samples.iter().all(dropped) {
                    continue;
                }
                take.push(r as u32);
                out_rows.push((samples, None));
            } else {
                for (s, o) in samples.iter().enumerate() {
                    if dropped(o) {
                        continue;
                    }
                    take.push(r as u32);
                    out_rows.push((std::slice::from_ref(o), self.explode.then_some(s as u32)));
                }
            }
        }
        let idx = UInt32Array::from(take);
        let mut cols: Vec<ArrayRef> = chunk
            .columns()
            .iter()
            .map(|c| arrow::compute::take(c, &idx, None))
            .collect::<std::result::Result<_, _>>()?;
        cols.extend(self.added_columns(new_schema, &out_rows, list)?);
        let mut fields: Vec<Field> = chunk
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(new_schema.fields().iter().map(|f| f.as_ref().clone()));
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
        let w = match main_w {
            Some(w) => w,
            None => {
                let p = ctx.out.join("part-00000.parquet");
                let f = File::create(&p).map_err(|e| Error::io(&p, e))?;
                main_w.insert(crate::engine::parquet_writer(f, out.schema())?)
            }
        };
        w.write(&out)?;
        // Encoded and written as the stage goes rather than all at `close`, after the last
        // response: what is left for then is at most this many rows and the last chunk.
        if w.in_progress_rows() >= FLUSH_ROWS {
            w.flush()?;
        }
        if !failed_take.is_empty() {
            let idx = UInt32Array::from(failed_take);
            let mut cols: Vec<ArrayRef> = chunk
                .columns()
                .iter()
                .map(|c| arrow::compute::take(c, &idx, None))
                .collect::<std::result::Result<_, _>>()?;
            cols.push(Arc::new(UInt32Array::from(failed_cols.0)));
            cols.push(Arc::new(arrow::array::StringArray::from(failed_cols.1)));
            cols.push(Arc::new(arrow::array::StringArray::from(failed_cols.2)));
            // `raw` is the body as text; a body that is not UTF-8 is also kept exactly in
            // `raw_bytes` (null otherwise: the text is then the body byte for byte).
            let text: Vec<Option<std::borrow::Cow<str>>> = failed_cols
                .3
                .iter()
                .map(|b| b.as_deref().map(String::from_utf8_lossy))
                .collect();
            let exact: Vec<Option<&[u8]>> = failed_cols
                .3
                .iter()
                .map(|b| b.as_deref().filter(|b| std::str::from_utf8(b).is_err()))
                .collect();
            cols.push(Arc::new(arrow::array::StringArray::from_iter(text)));
            cols.push(Arc::new(arrow::array::BinaryArray::from(exact)));
            let schema = self.failed_schema(&chunk.schema());
            let b = RecordBatch::try_new(schema.clone(), cols)?;
            let w = match failed_w {
                Some(w) => w,
                None => {
                    let p = ctx.side_dir("failed").join("part-00000.parquet");
                    let f = File::create(&p).map_err(|e| Error::io(&p, e))?;
                    failed_w.insert(crate::engine::parquet_writer(f, schema)?)
                }
            };
            w.write(&b)?;
        }
        Ok(())
    }

    /// The new columns (`new_schema`, in its order) of the output rows, built straight into
    /// Arrow arrays. Each row holds its samples (all K in list mode, else one) and, with
    /// `explode`, its sample index. Only `parsed` goes through arrow-json: its type is the
    /// user's schema. (A JSON object per row decoded by arrow-json, as before, cost more CPU
    /// than parsing the responses.)
    pub(super) fn added_columns(
        &self,
        new_schema: &SchemaRef,
        rows: &[(&[Outcome], Option<u32>)],
        list: bool,
    ) -> Result<Vec<ArrayRef>> {
        use arrow::array::{Array, BooleanArray, Int64Array, ListArray, StringArray};
        use arrow::buffer::OffsetBuffer;
        let all = || rows.iter().flat_map(|(s, _)| s.iter());
        fn resp(o: &Outcome) -> Option<&CachedResponse> {
            o.response.as_ref().ok().map(|(r, _)| r)
        }
        // One value per sample; in list mode each row's samples become one list.
        let per_sample = |values: ArrayRef| -> ArrayRef {
            if !list {
                return values;
            }
            let item = Arc::new(Field::new("item", values.data_type().clone(), true));
            let offsets = OffsetBuffer::from_lengths(rows.iter().map(|(s, _)| s.len()));
            Arc::new(ListArray::new(item, offsets, values, None))
        };
        let strings = |f: &dyn Fn(&Outcome) -> Option<&str>| -> ArrayRef {
            per_sample(Arc::new(StringArray::from_iter(all().map(f))))
        };
        let bools = |f: &dyn Fn(&Outcome) -> Option<bool>| -> ArrayRef {
            per_sample(Arc::new(BooleanArray::from_iter(all().map(f))))
        };
        let ints = |f: &dyn Fn(&Outcome) -> Option<i64>| -> ArrayRef {
            per_sample(Arc::new(Int64Array::from_iter(all().map(f))))
        };
        let mut cols: Vec<ArrayRef> = vec![
            strings(&|o| resp(o).map(|r| r.text.as_str())),
            strings(&|o| resp(o).map(|r| r.finish_reason.as_str())),
            bools(&|o| resp(o).map(|r| r.finish_reason == "length")),
            // Per row: the prompt is the same for every sample.
            Arc::new(Int64Array::from_iter(
                rows.iter()
                    .map(|(s, _)| s.iter().find_map(resp).map(|r| r.prompt_tokens)),
            )),
            ints(&|o| resp(o).map(|r| r.completion_tokens)),
            ints(&|o| resp(o).map(|r| r.latency_ms)),
            strings(&|o| Some(o.request_id.as_str())),
            bools(&|o| o.response.as_ref().ok().map(|(_, cached)| *cached)),
            strings(&|o| resp(o).and_then(|r| r.reasoning.as_deref())),
            // Per row: the first sample's error.
            Arc::new(StringArray::from_iter(rows.iter().map(|(s, _)| {
                s.iter()
                    .find_map(|o| o.response.as_ref().err().map(|(m, _)| m.as_str()))
            }))),
        ];
        if self.wants_logprobs() {
            cols.push(strings(&|o| {
                resp(o)
                    .and_then(|r| r.logprobs.as_deref())
                    .filter(|l| *l != NO_LOGPROBS)
            }));
        }
        if self.parse.is_some() {
            let field = new_schema.field_with_name(&self.out("parsed"))?;
            let item_type = match field.data_type() {
                DataType::List(item) if list => item.data_type().clone(),
                t => t.clone(),
            };
            #[derive(Serialize)]
            struct V<'a> {
                v: Option<&'a serde_json::Value>,
            }
            let values: Vec<V> = all()
                .map(|o| V {
                    v: match &o.parsed {
                        Some(Ok(p)) => Some(&p.value),
                        _ => None,
                    },
                })
                .collect();
            let schema = Arc::new(Schema::new(vec![Field::new("v", item_type.clone(), true)]));
            let mut d = arrow::json::ReaderBuilder::new(schema)
                .with_batch_size(values.len().max(1))
                .build_decoder()?;
            d.serialize(&values)?;
            let parsed = match d.flush()? {
                Some(b) => b.column(0).clone(),
                None => arrow::array::new_empty_array(&item_type),
            };
            cols.push(per_sample(parsed));
            cols.push(bools(&|o| match &o.parsed {
                Some(Ok(p)) => Some(p.repaired),
                _ => None,
            }));
            cols.push(strings(&|o| match &o.parsed {
                Some(Err(e)) => Some(e.as_str()),
                _ => None,
            }));
        }
        if self.explode {
            cols.push(Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|(_, i)| i.unwrap_or(0)),
            )));
        }
        Ok(cols)
    }
}
