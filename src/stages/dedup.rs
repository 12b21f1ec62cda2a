//! `kind: dedup` — exact deduplication on a normalized-text hash over chosen columns.
//!
//! The kept row of each duplicate group is the one whose `_id` comes first in the inputs
//! (lowest input position), never whichever partition a thread read first, so reruns keep the
//! same rows. Removed rows go to the side table `<id>__removed` with `_duplicate_of`.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;
use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, unknown_column};
use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result};
use crate::table::ID_COL;
use crate::table::{DUP_OF, has_col, input_ordinals, read_batches, read_columns, string_col};

pub const KIND: KindEntry = KindEntry {
    name: "dedup",
    about: "exact deduplication on normalized text; removed rows in <id>__removed",
    build: super::build::<DedupStage>,
    schema: |g| DedupStage::json_schema(g),
    capabilities: &[Capability::RemovesRows],
    removed_rows: "exact duplicates removed",
};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupStage {
    /// Columns whose (normalized) values together define a duplicate.
    pub columns: Vec<String>,
    #[serde(default)]
    pub lowercase: bool,
    /// Trim, and turn every run of whitespace into one space.
    #[serde(default)]
    pub collapse_whitespace: bool,
    /// Remove Unicode punctuation (general category P).
    #[serde(default)]
    pub strip_punctuation: bool,
}

static PUNCT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\p{P}+").expect("static regex"));

/// ASCII bytes in Unicode category P (`$+<=>^`|~` are symbols, category S, and stay).
static ASCII_PUNCT: LazyLock<[bool; 128]> = LazyLock::new(|| {
    let mut t = [false; 128];
    for (b, slot) in t.iter_mut().enumerate() {
        *slot = PUNCT.is_match(&(b as u8 as char).to_string());
    }
    t
});

/// `char::is_whitespace` restricted to ASCII (it includes the vertical tab, which
/// `u8::is_ascii_whitespace` does not).
fn ascii_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t'..=b'\r')
}

impl DedupStage {
    #[cfg(test)]
    pub fn normalize(&self, s: &str) -> String {
        let mut out = Vec::new();
        self.normalize_into(s, &mut out);
        String::from_utf8(out).expect("normalized text stays UTF-8")
    }

    /// Append the normalized text to `out`: lowercase, then strip punctuation, then collapse
    /// whitespace. ASCII text (most of it) goes through a byte loop with no allocation; other
    /// text takes the general path, which `str::to_lowercase` needs (a final sigma lowercases
    /// differently from one inside a word).
    fn normalize_into(&self, s: &str, out: &mut Vec<u8>) {
        if !self.lowercase && !self.collapse_whitespace && !self.strip_punctuation {
            // Exact dedup: the byte loop below was 18% of the 1M-row exact stage (perf).
            out.extend_from_slice(s.as_bytes());
            return;
        }
        if s.is_ascii() {
            let punct = &*ASCII_PUNCT;
            let start = out.len();
            let mut pending_space = false;
            for &b in s.as_bytes() {
                let b = if self.lowercase {
                    b.to_ascii_lowercase()
                } else {
                    b
                };
                if self.strip_punctuation && punct[b as usize] {
                    continue;
                }
                if self.collapse_whitespace && ascii_space(b) {
                    pending_space = out.len() > start;
                    continue;
                }
                if pending_space {
                    out.push(b' ');
                    pending_space = false;
                }
                out.push(b);
            }
            return;
        }
        self.normalize_general(s, out);
    }

    fn normalize_general(&self, s: &str, out: &mut Vec<u8>) {
        let mut t = if self.lowercase {
            s.to_lowercase()
        } else {
            s.to_string()
        };
        if self.strip_punctuation {
            t = PUNCT.replace_all(&t, "").into_owned();
        }
        if self.collapse_whitespace {
            for (i, w) in t.split_whitespace().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(w.as_bytes());
            }
        } else {
            out.extend_from_slice(t.as_bytes());
        }
    }

    /// 128-bit hash of the normalized key of every row of a batch.
    fn keys(&self, batch: &RecordBatch) -> Result<Vec<u128>> {
        let cols: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|c| {
                let a = batch
                    .column_by_name(c)
                    .ok_or_else(|| Error::Internal(format!("column {c} vanished")))?;
                Ok(cast(a, &DataType::Utf8)?)
            })
            .collect::<Result<_>>()?;
        let strs: Vec<&StringArray> = cols
            .iter()
            .map(|a| {
                a.as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8")
            })
            .collect();
        Ok((0..batch.num_rows())
            .into_par_iter()
            .map_init(Vec::new, |key, row| {
                key.clear();
                for a in &strs {
                    if a.is_null(row) {
                        key.push(0u8);
                    } else {
                        key.push(1u8);
                        self.normalize_into(a.value(row), key);
                    }
                    key.push(0x1f);
                }
                xxhash_rust::xxh3::xxh3_128(key)
            })
            .collect())
    }
}

impl Stage for DedupStage {
    fn needs_id(&self) -> bool {
        true
    }

    fn side_tables(&self) -> &'static [&'static str] {
        &["removed"]
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        if self.columns.is_empty() {
            errs.push(
                ctx.err(&["columns"], "dedup needs at least one column")
                    .hint("e.g. `columns: [prompt]`"),
            );
        }
        for (i, c) in self.columns.iter().enumerate() {
            if !has_col(schema, c) {
                errs.push(unknown_column(ctx, &["columns", &i.to_string()], c, schema));
            }
        }
        if errs.is_empty() {
            Ok(schema.clone())
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let files = &ctx.parent().files;
        // Pass 1: key of every row, in file order, reading only the key columns and `_id`.
        let mut wanted_cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        wanted_cols.push(ID_COL);
        let mut keys: Vec<u128> = Vec::new();
        let mut id_parts: Vec<ArrayRef> = Vec::new();
        for b in read_columns(files, &wanted_cols) {
            let b = b?;
            keys.extend(self.keys(&b)?);
            id_parts.push(Arc::new(string_col(&b, ID_COL)?));
        }
        let ids: StringArray = if id_parts.is_empty() {
            StringArray::from(Vec::<&str>::new())
        } else {
            let parts: Vec<&dyn Array> = id_parts.iter().map(|a| a.as_ref()).collect();
            let all = arrow::compute::concat(&parts)?;
            all.as_any()
                .downcast_ref::<StringArray>()
                .expect("concat of Utf8")
                .clone()
        };
        drop(id_parts);
        let n = keys.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.par_sort_unstable_by_key(|&i| (keys[i as usize], i));

        // Groups of equal keys; only rows in groups need ranking by input position.
        let mut groups: Vec<&[u32]> = Vec::new();
        let mut start = 0;
        for i in 1..=n {
            if i == n || keys[order[i] as usize] != keys[order[start] as usize] {
                if i - start > 1 {
                    groups.push(&order[start..i]);
                }
                start = i;
            }
        }
        let wanted: HashSet<String> = groups
            .iter()
            .flat_map(|g| g.iter().map(|&r| ids.value(r as usize).to_string()))
            .collect();
        let ords = input_ordinals(&ctx.inputs, &wanted)?;
        let mut dup_of: Vec<Option<u32>> = vec![None; n];
        for g in &groups {
            let rank = |r: u32| {
                let id = ids.value(r as usize);
                (ords.get(id).copied().unwrap_or(u64::MAX), id, r)
            };
            let keep = g
                .iter()
                .copied()
                .min_by_key(|&r| rank(r))
                .expect("non-empty group");
            for &r in g.iter() {
                if r != keep {
                    dup_of[r as usize] = Some(keep);
                }
            }
        }

        // Pass 2: split rows into kept and removed, keeping file order.
        let with_dup_of = |s: &Schema| {
            let mut fields: Vec<Arc<Field>> = s.fields().iter().cloned().collect();
            fields.push(Arc::new(Field::new(DUP_OF, DataType::Utf8, false)));
            Arc::new(Schema::new(fields))
        };
        // The kept rows (most of the table) are encoded and written on their own thread
        // while this one reads and splits the next batches: the two halves of pass 2 took
        // about the same time, one after the other, on one core.
        let (kept_tx, kept_rx) = std::sync::mpsc::sync_channel::<RecordBatch>(4);
        let kept_path = ctx.out.join("part-00000.parquet");
        let schema = ctx.schema.clone();
        let (split, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || -> Result<()> {
                let mut kept_w = LazyPart::new(kept_path);
                for b in kept_rx {
                    kept_w.write(&b)?;
                }
                kept_w.finish(&schema)
            });
            let split = (move || -> Result<i64> {
                let mut removed_w = kit::RemovedRows::new(ctx)?;
                let mut row = 0usize;
                for b in read_batches(files) {
                    let b = b?;
                    let len = b.num_rows();
                    let slice = &dup_of[row..row + len];
                    row += len;
                    let keep_mask: BooleanArray = slice.iter().map(|d| Some(d.is_none())).collect();
                    let (kept, gone) = kit::split(&b, &keep_mask)?;
                    if kept_tx.send(kept).is_err() {
                        // The writer stopped on an error; it is reported below.
                        break;
                    }
                    if gone.num_rows() == 0 {
                        continue;
                    }
                    let of: StringArray = slice
                        .iter()
                        .filter_map(|d| d.map(|k| Some(ids.value(k as usize))))
                        .collect();
                    removed_w.write(&kit::with_columns(
                        &gone,
                        &[Field::new(DUP_OF, DataType::Utf8, false)],
                        vec![Arc::new(of)],
                    )?)?;
                }
                removed_w.finish(&with_dup_of(&ctx.schema))
            })();
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("dedup writer panicked".into())));
            (split, written)
        });
        written?;
        let removed = split?;
        let mut out = RunOutput::default();
        out.counters.insert("removed".into(), removed);
        out.counters.insert("kept".into(), (n as i64) - removed);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_options_compose() {
        let d = DedupStage {
            columns: vec![],
            lowercase: true,
            collapse_whitespace: true,
            strip_punctuation: true,
        };
        assert_eq!(
            d.normalize("  How do I  reverse a List? "),
            "how do i reverse a list"
        );
        assert_eq!(d.normalize("¿Qué tal?"), "qué tal");
        let exact = DedupStage {
            columns: vec![],
            lowercase: false,
            collapse_whitespace: false,
            strip_punctuation: false,
        };
        assert_eq!(exact.normalize(" A  b "), " A  b ");
    }

    #[test]
    fn ascii_fast_path_equals_the_general_path() {
        // Every option combination over strings drawn from all 128 ASCII bytes.
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut texts = vec![
            String::new(),
            " ".into(),
            "\x0b a\x0c".into(),
            "$a+b<c>^d`|~e".into(),
        ];
        for _ in 0..2000 {
            let len = (x % 24) as usize;
            let mut t = String::new();
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t.push((x % 128) as u8 as char);
            }
            texts.push(t);
        }
        for bits in 0..8 {
            let d = DedupStage {
                columns: vec![],
                lowercase: bits & 1 != 0,
                collapse_whitespace: bits & 2 != 0,
                strip_punctuation: bits & 4 != 0,
            };
            for t in &texts {
                let (mut fast, mut slow) = (Vec::new(), Vec::new());
                d.normalize_into(t, &mut fast);
                d.normalize_general(t, &mut slow);
                assert_eq!(fast, slow, "{bits:03b} {t:?}");
            }
        }
    }
}
