//! `kind: decontaminate` — drop rows that share a word n-gram with a reference set
//! (benchmark prompts such as IFEval), so evaluation text does not leak into training data.
//!
//! Text is lowercased and cut into words, a word being a run of Unicode letters and digits
//! (so punctuation and whitespace never matter). Every n-gram of `ngram` consecutive words
//! of every reference row is hashed (xxh3 of the words joined by single spaces) into one
//! set; each row is then checked in parallel. Texts with fewer than `ngram` words have no
//! n-gram: they never match, and a short reference row contributes nothing.
//!
//! The reference files are read when the pipeline is checked (they must exist, parse, and
//! have the column), and a hash of their bytes is part of the stage's fingerprint, so
//! editing a reference redoes the stage.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, SchemaRef};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BuildCtx, Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, reserved_columns,
    text_column,
};
use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result, did_you_mean};
use crate::spec::Format;
use crate::table::{is_string_type, read_batches, string_col, with_fields};
use crate::yaml::Node;

pub const KIND: KindEntry = KindEntry {
    name: "decontaminate",
    about: "drop rows sharing a word n-gram with reference sets (benchmarks); removed rows in <id>__removed",
    build: super::build::<DecontaminateStage>,
    schema: |g| DecontaminateStage::json_schema(g),
    capabilities: &[Capability::RemovesRows],
    removed_rows: "removed by decontamination",
};

/// Side-table column: the name of the reference set the row matched.
pub const REFERENCE: &str = "_reference";
/// Side-table column: the first n-gram of the row found in a reference set.
pub const MATCHED: &str = "_matched_ngram";

/// At most this many reference sets (each is a bit of a mask).
const MAX_REFERENCES: usize = 64;

/// One reference set: a file and its text column.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// A .jsonl, .json, .parquet or .csv file, relative to the pipeline file.
    pub path: String,
    /// The text column of the reference file (`text` for a JSONL of bare strings).
    pub column: String,
    /// The set's name in `_reference` and in the counter `hits_<name>` (default: the file
    /// name without its extension).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateStage {
    /// The text column of the rows to check.
    pub column: String,
    /// The reference sets; a row matching any of them is removed.
    pub references: Vec<Reference>,
    /// Words per n-gram (default 13).
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// The reference files as read by `prepare`.
    #[serde(skip)]
    loaded: Vec<Loaded>,
}

fn default_ngram() -> usize {
    13
}

/// A reference file found and checked by `prepare`.
#[derive(Debug, Clone)]
struct Loaded {
    name: String,
    file: PathBuf,
    format: Format,
    /// Blake3 of the file's bytes: part of the fingerprint.
    content_hash: String,
}

/// Lowercase words of a text: runs of Unicode letters and digits.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The hash of each n-gram of a text's words, in order.
pub fn ngram_hashes(words: &[String], n: usize) -> Vec<u64> {
    if n == 0 || words.len() < n {
        return Vec::new();
    }
    let mut buf = String::new();
    (0..=words.len() - n)
        .map(|i| {
            buf.clear();
            for (k, w) in words[i..i + n].iter().enumerate() {
                if k > 0 {
                    buf.push(' ');
                }
                buf.push_str(w);
            }
            xxhash_rust::xxh3::xxh3_64(buf.as_bytes())
        })
        .collect()
}

/// What a row matched: the first matched n-gram's set and text, and every set it touched.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub reference: usize,
    pub ngram: String,
    /// Bit i: the row shares an n-gram with reference set i.
    pub sets: u64,
}

/// Check one text against the reference n-grams (hash → mask of sets containing it).
pub fn check(text: &str, n: usize, refs: &HashMap<u64, u64>) -> Option<Hit> {
    let w = words(text);
    let mut hit: Option<Hit> = None;
    for (i, h) in ngram_hashes(&w, n).into_iter().enumerate() {
        let Some(&mask) = refs.get(&h) else { continue };
        match &mut hit {
            None => {
                hit = Some(Hit {
                    reference: mask.trailing_zeros() as usize,
                    ngram: w[i..i + n].join(" "),
                    sets: mask,
                })
            }
            Some(h) => h.sets |= mask,
        }
    }
    hit
}

fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut f = File::open(path)?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

impl DecontaminateStage {
    fn removed_fields() -> [Field; 2] {
        [
            Field::new(REFERENCE, DataType::Utf8, false),
            Field::new(MATCHED, DataType::Utf8, false),
        ]
    }

    /// Every text of a reference set's column (nulls skipped).
    fn reference_texts(&self, i: usize) -> std::result::Result<Vec<String>, String> {
        let (r, l) = (&self.references[i], &self.loaded[i]);
        let mut out = Vec::new();
        let mut bad_column: Option<String> = None;
        crate::input::read(std::slice::from_ref(&l.file), l.format, &mut |b| {
            let Some(a) = b.column_by_name(&r.column) else {
                let names: Vec<String> = b
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                bad_column = Some(names.join(", "));
                return Ok(());
            };
            let a =
                arrow::compute::cast(a, &DataType::Utf8).map_err(|e| crate::input::InputError {
                    message: format!("column `{}` is not text: {e}", r.column),
                    hint: None,
                })?;
            let s = a
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8");
            out.extend(s.iter().flatten().map(str::to_string));
            Ok(())
        })
        .map_err(|e| match e.hint {
            Some(h) => format!("{}\n  hint: {h}", e.message),
            None => e.message,
        })?;
        if let Some(names) = bad_column {
            return Err(format!("no column `{}` (columns: {names})", r.column));
        }
        Ok(out)
    }
}

impl Stage for DecontaminateStage {
    fn side_tables(&self) -> &'static [&'static str] {
        &["removed"]
    }

    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        let at = |path: &[&str], msg: String| Diagnostic::new(&ctx.file, node.pos_at(path), msg);
        let mut errs = Vec::new();
        if self.ngram == 0 {
            errs.push(at(&["ngram"], "ngram must be at least 1".into()).hint("13 is usual"));
        }
        if self.references.is_empty() {
            errs.push(
                at(
                    &["references"],
                    "decontaminate needs at least one reference set".into(),
                )
                .hint("e.g. `references: [{path: ifeval.jsonl, column: prompt, name: ifeval}]`"),
            );
        }
        if self.references.len() > MAX_REFERENCES {
            errs.push(at(
                &["references"],
                format!("at most {MAX_REFERENCES} reference sets"),
            ));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut loaded = Vec::new();
        for (i, r) in self.references.iter().enumerate() {
            let idx = i.to_string();
            let name = r.name.clone().unwrap_or_else(|| {
                Path::new(&r.path)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let name_path: &[&str] = if r.name.is_some() {
                &["references", &idx, "name"]
            } else {
                &["references", &idx, "path"]
            };
            if name.is_empty() {
                errs.push(at(
                    name_path,
                    "a reference set needs a non-empty name".into(),
                ));
            } else if let Some(first) = names.insert(name.clone(), i) {
                errs.push(
                    at(
                        name_path,
                        format!("reference name `{name}` is used twice (also references[{first}])"),
                    )
                    .hint("give each reference set its own `name:`"),
                );
            }
            let path_at = ["references", idx.as_str(), "path"];
            let file = if Path::new(&r.path).is_absolute() {
                PathBuf::from(&r.path)
            } else {
                ctx.dir.join(&r.path)
            };
            if !file.is_file() {
                errs.push(
                    at(
                        &path_at,
                        format!("reference file not found: {}", file.display()),
                    )
                    .hint("paths are relative to the pipeline file; check the spelling"),
                );
                continue;
            }
            let Some(format) = Format::from_path(&r.path) else {
                errs.push(
                    at(
                        &path_at,
                        format!("cannot tell the format of {}", file.display()),
                    )
                    .hint("use a .jsonl, .json, .parquet or .csv file"),
                );
                continue;
            };
            let content_hash = match file_hash(&file) {
                Ok(h) => h,
                Err(e) => {
                    errs.push(at(&path_at, format!("cannot read {}: {e}", file.display())));
                    continue;
                }
            };
            // Parse it once now: a corrupt file or a wrong column is a validation error.
            let mut schema: Option<SchemaRef> = None;
            let mut rows = 0usize;
            let read = crate::input::read(std::slice::from_ref(&file), format, &mut |b| {
                rows += b.num_rows();
                schema.get_or_insert_with(|| b.schema());
                Ok(())
            });
            if let Err(e) = read {
                errs.push(
                    at(&path_at, format!("reference `{name}`: {}", e.message)).maybe_hint(e.hint),
                );
                continue;
            }
            match schema.filter(|_| rows > 0) {
                None => errs.push(
                    at(&path_at, format!("reference `{name}` has no rows"))
                        .hint("an empty reference set would match nothing"),
                ),
                Some(s) => match s.field_with_name(&r.column) {
                    Err(_) => {
                        let cols: Vec<&str> =
                            s.fields().iter().map(|f| f.name().as_str()).collect();
                        errs.push(
                            at(
                                &["references", &idx, "column"],
                                format!("reference `{name}` has no column `{}`", r.column),
                            )
                            .maybe_hint(did_you_mean(&r.column, cols.iter().copied()))
                            .hint_if_none(format!("its columns: {}", cols.join(", "))),
                        );
                    }
                    Ok(f) if !is_string_type(f.data_type()) => errs.push(at(
                        &["references", &idx, "column"],
                        format!(
                            "column `{}` of reference `{name}` is {}, not text",
                            r.column,
                            f.data_type()
                        ),
                    )),
                    Ok(_) => loaded.push(Loaded {
                        name,
                        file,
                        format,
                        content_hash,
                    }),
                },
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        self.loaded = loaded;
        Ok(())
    }

    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({
            "column": self.column,
            "ngram": self.ngram,
            "references": self.references.iter().zip(&self.loaded).map(|(r, l)| {
                serde_json::json!({
                    "name": l.name,
                    "column": r.column,
                    "format": l.format,
                    "content": l.content_hash,
                })
            }).collect::<Vec<_>>(),
        })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        errs.extend(text_column(ctx, &self.column, "decontaminate"));
        errs.extend(reserved_columns(
            ctx,
            &[REFERENCE, MATCHED],
            "which decontaminate adds to <id>__removed",
        ));
        if errs.is_empty() {
            Ok(schema.clone())
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        // Every n-gram of every reference set → the sets containing it.
        let mut refs: HashMap<u64, u64> = HashMap::new();
        for (i, l) in self.loaded.iter().enumerate() {
            let texts = self
                .reference_texts(i)
                .map_err(|e| Error::stage(ctx.id, format!("reference `{}`: {e}", l.name)))?;
            let grams: HashSet<u64> = texts
                .par_iter()
                .flat_map_iter(|t| ngram_hashes(&words(t), self.ngram))
                .collect();
            for g in grams {
                *refs.entry(g).or_default() |= 1 << i;
            }
        }

        let side_dir = ctx.side_dir("removed");
        std::fs::create_dir_all(&side_dir).map_err(|e| Error::io(&side_dir, e))?;
        let mut kept_w = LazyPart::new(ctx.out.join("part-00000.parquet"));
        let mut side_w = LazyPart::new(side_dir.join("part-00000.parquet"));
        let mut removed = 0i64;
        let mut kept = 0i64;
        let mut hits = vec![0i64; self.loaded.len()];
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            let texts = string_col(&b, &self.column)?;
            let found: Vec<Option<Hit>> = (0..texts.len())
                .into_par_iter()
                .map(|i| {
                    if texts.is_null(i) {
                        None
                    } else {
                        check(texts.value(i), self.ngram, &refs)
                    }
                })
                .collect();
            for h in found.iter().flatten() {
                for (i, n) in hits.iter_mut().enumerate() {
                    if h.sets & (1 << i) != 0 {
                        *n += 1;
                    }
                }
            }
            let keep_mask: BooleanArray = found.iter().map(|h| Some(h.is_none())).collect();
            let kb = filter_record_batch(&b, &keep_mask)?;
            kept += kb.num_rows() as i64;
            kept_w.write(&kb)?;
            let gone: Vec<&Hit> = found.iter().flatten().collect();
            if gone.is_empty() {
                continue;
            }
            let drop_mask: BooleanArray = found.iter().map(|h| Some(h.is_some())).collect();
            let gb = filter_record_batch(&b, &drop_mask)?;
            let reference: StringArray = gone
                .iter()
                .map(|h| Some(self.loaded[h.reference].name.as_str()))
                .collect();
            let matched: StringArray = gone.iter().map(|h| Some(h.ngram.as_str())).collect();
            let mut cols = gb.columns().to_vec();
            cols.push(Arc::new(reference));
            cols.push(Arc::new(matched));
            let sb =
                RecordBatch::try_new(with_fields(&gb.schema(), &Self::removed_fields()), cols)?;
            removed += sb.num_rows() as i64;
            side_w.write(&sb)?;
        }
        kept_w.finish(&ctx.parent().schema)?;
        side_w.finish(&with_fields(&ctx.parent().schema, &Self::removed_fields()))?;
        let mut out = RunOutput::default();
        out.counters.insert("removed".into(), removed);
        out.counters.insert("kept".into(), kept);
        for (l, n) in self.loaded.iter().zip(hits) {
            out.counters.insert(format!("hits_{}", l.name), n);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_lowercase_alphanumeric_runs() {
        assert_eq!(
            words("Hello, World! It's 2024 — naïve_café\n(ok)"),
            ["hello", "world", "it", "s", "2024", "naïve", "café", "ok"]
        );
        assert!(words(" ... ").is_empty());
    }

    #[test]
    fn ngrams_match_regardless_of_case_and_punctuation() {
        let reference = "Write a story about a cat, in exactly three paragraphs. Use no commas!";
        let mut refs = HashMap::new();
        for h in ngram_hashes(&words(reference), 5) {
            refs.insert(h, 0b10);
        }
        let hit = check(
            "Please: WRITE a story -- about a CAT in exactly 3 paragraphs",
            5,
            &refs,
        )
        .unwrap();
        assert_eq!(hit.reference, 1);
        assert_eq!(hit.ngram, "write a story about a");
        assert_eq!(hit.sets, 0b10);
        assert!(check("write a story about the dog", 5, &refs).is_none());
        // Fewer words than the n-gram: no n-gram at all.
        assert!(ngram_hashes(&words("a b c"), 5).is_empty());
        assert_eq!(ngram_hashes(&words("a b c d e f"), 5).len(), 2);
    }

    #[test]
    fn a_row_counts_for_every_set_it_touches() {
        let mut refs = HashMap::new();
        for h in ngram_hashes(&words("one two three"), 3) {
            *refs.entry(h).or_insert(0) |= 0b01;
        }
        for h in ngram_hashes(&words("four five six"), 3) {
            *refs.entry(h).or_insert(0) |= 0b10;
        }
        let hit = check("zero four five six and one two three", 3, &refs).unwrap();
        assert_eq!(
            hit.reference, 1,
            "the first matched n-gram decides `_reference`"
        );
        assert_eq!(hit.ngram, "four five six");
        assert_eq!(hit.sets, 0b11);
    }

    #[test]
    fn prepare_reports_missing_files_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.jsonl"), "{\"prompt\": \"a b c\"}\n").unwrap();
        let ctx = BuildCtx {
            file: dir.path().join("p.yaml"),
            dir: dir.path().to_path_buf(),
            sections: Default::default(),
        };
        let node = Node::new(crate::yaml::Value::Map(vec![]), Default::default());
        let mut s: DecontaminateStage = serde_json::from_value(serde_json::json!({
            "column": "t",
            "references": [
                {"path": "missing.jsonl", "column": "prompt"},
                {"path": "r.jsonl", "column": "promt"},
            ]
        }))
        .unwrap();
        let e = s.prepare(&node, &ctx).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].message.contains("reference file not found"), "{e:?}");
        assert!(e[1].message.contains("no column `promt`"), "{e:?}");
        assert!(
            e[1].hint.as_deref().unwrap_or("").contains("prompt"),
            "{e:?}"
        );

        let mut ok: DecontaminateStage = serde_json::from_value(serde_json::json!({
            "column": "t",
            "references": [{"path": "r.jsonl", "column": "prompt"}]
        }))
        .unwrap();
        ok.prepare(&node, &ctx).unwrap();
        let before = ok.fingerprint();
        assert_eq!(ok.loaded[0].name, "r");
        std::fs::write(dir.path().join("r.jsonl"), "{\"prompt\": \"a b d\"}\n").unwrap();
        ok.prepare(&node, &ctx).unwrap();
        assert_ne!(
            ok.fingerprint(),
            before,
            "editing a reference changes the fingerprint"
        );
    }
}
