//! `kind: decontaminate` — drop rows that share a word n-gram with a reference set
//! (benchmark prompts such as IFEval), or that are near duplicates of one of its texts, so
//! evaluation text does not leak into training data.
//!
//! Text is lowercased and cut into words, a word being a run of Unicode letters and digits
//! (so punctuation and whitespace never matter), except that every Han, Hiragana and Katakana
//! character is a word of its own: Chinese and Japanese are written without spaces, and a
//! 13-gram of characters is the usual contamination test for them. Every n-gram of `ngram`
//! consecutive words of every reference row is hashed (xxh3 of the words joined by single
//! spaces) into one set; each row is then checked in parallel. Texts with fewer than `ngram`
//! words have no n-gram: they never match, and a short reference row contributes nothing.
//!
//! A reference row's text is every string of its columns, nested lists and structs included
//! (TRACE's `messages`, EIFBench's `sub_instructions`), in order, joined by newlines.
//!
//! With `near_dup_threshold`, a row that shares no n-gram is also removed when the Jaccard
//! similarity of its set of `shingle_words`-word shingles with a reference text's reaches the
//! threshold (computed exactly through an inverted index of the reference shingles; the
//! reference texts are each string of a row and, when there are several, their join). This
//! catches short prompts (InfoBench's instructions are often under 13 words) copied with a
//! word changed.
//!
//! `references:` is a list of sets, or the path of a reference-set file (`sets:` with the same
//! entries, paths relative to that file), so several pipelines decontaminate against one
//! definition (`pipelines/references/benchmarks.yaml`).
//!
//! The reference files are read when the pipeline is checked (they must exist, parse, and
//! have the columns), and a hash of their bytes is part of the stage's fingerprint, so
//! editing a reference redoes the stage. A pipeline input that reads one of them gets a
//! validation warning ([`Stage::evaluation_files`]).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BuildCtx, Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns,
    text_column,
};
use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result, did_you_mean};
use crate::input::Format;
use crate::table::{read_batches, string_col, with_fields};
use crate::yaml::{Node, Pos};

pub const KIND: KindEntry = KindEntry {
    name: "decontaminate",
    about: "drop rows sharing a word n-gram with reference sets (benchmarks), or near duplicates of their texts; removed rows in <id>__removed",
    build: super::build::<DecontaminateStage>,
    schema: |g| DecontaminateStage::json_schema(g),
    capabilities: &[Capability::RemovesRows, Capability::MatchesReferences],
    removed_rows: "removed by decontamination",
};

/// Side-table column: the name of the reference set the row matched.
pub const REFERENCE: &str = "_reference";
/// Side-table column: the first n-gram of the row found in a reference set (null for a near
/// duplicate).
pub const MATCHED: &str = "_matched_ngram";
/// Side-table column: the Jaccard similarity of a near duplicate (null for an n-gram match).
pub const SIMILARITY: &str = "_similarity";

/// At most this many reference sets (each is a bit of a mask).
const MAX_REFERENCES: usize = 64;

/// One reference set: a file (or glob) and its text columns.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// A .jsonl, .json, .parquet or .csv file, or a glob of them, relative to the pipeline
    /// file (or to the reference-set file that lists it).
    pub path: String,
    /// The text column of the reference file (`text` for a JSONL of bare strings), or a list
    /// of them; nested lists and structs give every string inside them.
    pub column: Columns,
    /// The set's name in `_reference` and in the counters `hits_<name>` /
    /// `near_dups_<name>` (default: the file name without its extension).
    #[serde(default)]
    pub name: Option<String>,
}

/// One column or several.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Columns {
    One(String),
    Many(Vec<String>),
}

impl Columns {
    fn list(&self) -> Vec<String> {
        match self {
            Columns::One(c) => vec![c.clone()],
            Columns::Many(v) => v.clone(),
        }
    }
}

/// The reference sets: listed here, or the path of a reference-set file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum References {
    /// A YAML file with `sets:` (a list like the one below), relative to the pipeline file.
    File(String),
    Sets(Vec<Reference>),
}

/// A reference-set file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetFile {
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    sets: Vec<Reference>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecontaminateStage {
    /// The text column of the rows to check.
    pub column: String,
    /// The reference sets; a row matching any of them is removed.
    pub references: References,
    /// Words per n-gram (default 13).
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// Also remove rows whose shingle set has at least this Jaccard similarity with a
    /// reference text (0–1; default: off).
    #[serde(default)]
    pub near_dup_threshold: Option<f64>,
    /// Words per shingle for near duplicates (default 3; a shorter text is one shingle).
    #[serde(default = "default_shingle_words")]
    pub shingle_words: usize,
    /// The reference files as read by `prepare`.
    #[serde(skip)]
    loaded: Vec<Loaded>,
}

fn default_ngram() -> usize {
    13
}

fn default_shingle_words() -> usize {
    3
}

/// A reference set found and checked by `prepare`.
#[derive(Debug, Clone)]
struct Loaded {
    name: String,
    files: Vec<PathBuf>,
    columns: Vec<String>,
    format: Format,
    /// Blake3 of the files' bytes: part of the fingerprint.
    content_hash: String,
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF        // Hiragana, Katakana
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xF900..=0xFAFF      // compatibility ideographs
        | 0x20000..=0x2FA1F) // extensions B-F, compatibility supplement
}

/// Lowercase words of a text: runs of Unicode letters and digits, each Han / kana character
/// a word of its own.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if is_cjk(c) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            cur.push(c);
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
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

/// The distinct shingle hashes of a text's words, sorted (a text shorter than one shingle is
/// one shingle; no words, none).
pub fn shingles(words: &[String], n: usize) -> Vec<u64> {
    if words.is_empty() {
        return Vec::new();
    }
    let mut out = ngram_hashes(words, n.min(words.len()));
    out.sort_unstable();
    out.dedup();
    out
}

/// What a row matched: the first matched n-gram's set and text (or the most similar reference
/// text's set and the similarity), and every set it touched.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub reference: usize,
    /// The first shared n-gram; `None` for a near duplicate.
    pub ngram: Option<String>,
    /// The Jaccard similarity of a near duplicate.
    pub similarity: Option<f64>,
    /// Bit i: the row shares an n-gram with (or is a near duplicate of) reference set i.
    pub sets: u64,
}

/// Check one text against the reference n-grams (hash → mask of sets containing it).
#[cfg(test)]
pub fn check(text: &str, n: usize, refs: &HashMap<u64, u64>) -> Option<Hit> {
    check_words(&words(text), n, refs)
}

fn check_words(w: &[String], n: usize, refs: &HashMap<u64, u64>) -> Option<Hit> {
    let mut hit: Option<Hit> = None;
    for (i, h) in ngram_hashes(w, n).into_iter().enumerate() {
        let Some(&mask) = refs.get(&h) else { continue };
        match &mut hit {
            None => {
                hit = Some(Hit {
                    reference: mask.trailing_zeros() as usize,
                    ngram: Some(w[i..i + n].join(" ")),
                    similarity: None,
                    sets: mask,
                })
            }
            Some(h) => h.sets |= mask,
        }
    }
    hit
}

/// The reference texts' shingle sets, for near duplicates: shingle → texts holding it.
#[derive(Debug, Default)]
pub struct NearIndex {
    postings: HashMap<u64, Vec<u32>>,
    /// Per text: its number of distinct shingles and its set.
    sizes: Vec<u32>,
    owner: Vec<u8>,
}

impl NearIndex {
    pub fn add(&mut self, set: usize, shingles: &[u64]) {
        if shingles.is_empty() {
            return;
        }
        let id = self.sizes.len() as u32;
        self.sizes.push(shingles.len() as u32);
        self.owner.push(set as u8);
        for s in shingles {
            self.postings.entry(*s).or_default().push(id);
        }
    }

    /// The set of the most similar reference text at or above `threshold`, the similarity,
    /// and the mask of every set with a text at or above it.
    pub fn best(&self, shingles: &[u64], threshold: f64) -> Option<(usize, f64, u64)> {
        let mut shared: HashMap<u32, u32> = HashMap::new();
        for s in shingles {
            for &t in self.postings.get(s).into_iter().flatten() {
                *shared.entry(t).or_default() += 1;
            }
        }
        let mut best: Option<(usize, f64)> = None;
        let mut mask = 0u64;
        // Ties go to the earliest text, so the answer does not depend on hash order.
        let mut found: Vec<(u32, f64)> = shared
            .into_iter()
            .map(|(t, c)| {
                let union = shingles.len() as u32 + self.sizes[t as usize] - c;
                (t, c as f64 / union as f64)
            })
            .filter(|(_, j)| *j >= threshold)
            .collect();
        found.sort_by_key(|(t, _)| *t);
        for (t, j) in found {
            let set = self.owner[t as usize] as usize;
            mask |= 1 << set;
            if best.is_none_or(|(_, b)| j > b) {
                best = Some((set, j));
            }
        }
        best.map(|(s, j)| (s, j, mask))
    }
}

fn file_hash(hasher: &mut blake3::Hasher, path: &Path) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    std::io::copy(&mut f, hasher)?;
    Ok(())
}

/// Does a column of this type hold text (itself, or inside lists and structs)?
fn holds_text(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            holds_text(f.data_type())
        }
        DataType::Struct(fs) => fs.iter().any(|f| holds_text(f.data_type())),
        _ => false,
    }
}

/// Every string of row `row` of `a`, nested lists and structs included, in order.
fn push_strings(a: &dyn Array, row: usize, out: &mut Vec<String>) {
    if a.is_null(row) {
        return;
    }
    match a.data_type() {
        DataType::Utf8 => out.push(a.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => out.push(a.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => out.push(a.as_string_view().value(row).to_string()),
        DataType::List(_) => {
            let v = a.as_list::<i32>().value(row);
            (0..v.len()).for_each(|j| push_strings(v.as_ref(), j, out));
        }
        DataType::LargeList(_) => {
            let v = a.as_list::<i64>().value(row);
            (0..v.len()).for_each(|j| push_strings(v.as_ref(), j, out));
        }
        DataType::FixedSizeList(_, _) => {
            let v = a.as_fixed_size_list().value(row);
            (0..v.len()).for_each(|j| push_strings(v.as_ref(), j, out));
        }
        DataType::Struct(_) => {
            for c in a.as_struct().columns() {
                push_strings(c.as_ref(), row, out);
            }
        }
        _ => {}
    }
}

/// Where a reference entry was written: its file, and the node of its list (`references:`
/// of the stage, or `sets:` of a reference-set file) with the path prefix inside it.
struct Origin<'a> {
    file: PathBuf,
    dir: PathBuf,
    list: &'a Node,
    prefix: Vec<String>,
}

impl Origin<'_> {
    fn at(&self, i: usize, field: &str, msg: String) -> Diagnostic {
        let mut path: Vec<String> = self.prefix.clone();
        path.push(i.to_string());
        if !field.is_empty() {
            path.push(field.to_string());
        }
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        Diagnostic::new(&self.file, self.list.pos_at(&p), msg)
    }
}

impl DecontaminateStage {
    fn removed_fields() -> [Field; 3] {
        [
            Field::new(REFERENCE, DataType::Utf8, false),
            Field::new(MATCHED, DataType::Utf8, true),
            Field::new(SIMILARITY, DataType::Float64, true),
        ]
    }

    /// Each reference row's strings (its columns' strings in order; rows with none skipped).
    fn reference_rows(&self, i: usize) -> std::result::Result<Vec<Vec<String>>, String> {
        let l = &self.loaded[i];
        let mut out = Vec::new();
        let mut bad_column: Option<String> = None;
        crate::input::read(&l.files, l.format, &mut |b| {
            let mut cols = Vec::new();
            for c in &l.columns {
                match b.column_by_name(c) {
                    Some(a) => cols.push(a.clone()),
                    None => {
                        bad_column = Some(c.clone());
                        return Ok(());
                    }
                }
            }
            for row in 0..b.num_rows() {
                let mut texts = Vec::new();
                for a in &cols {
                    push_strings(a.as_ref(), row, &mut texts);
                }
                texts.retain(|t| !t.trim().is_empty());
                if !texts.is_empty() {
                    out.push(texts);
                }
            }
            Ok(())
        })
        .map_err(|e| match e.hint {
            Some(h) => format!("{}\n  hint: {h}", e.message),
            None => e.message,
        })?;
        if let Some(c) = bad_column {
            return Err(format!("a file has no column `{c}`"));
        }
        Ok(out)
    }

    /// Check and load the sets of one list.
    fn load_sets(
        &self,
        sets: &[Reference],
        origin: &Origin,
        errs: &mut Vec<Diagnostic>,
    ) -> Vec<Loaded> {
        if sets.is_empty() {
            errs.push(
                Diagnostic::new(
                    &origin.file,
                    origin
                        .list
                        .pos_at(&origin.prefix.iter().map(String::as_str).collect::<Vec<_>>()),
                    "decontaminate needs at least one reference set",
                )
                .hint("e.g. `references: [{path: ifeval.jsonl, column: prompt, name: ifeval}]`"),
            );
        }
        if sets.len() > MAX_REFERENCES {
            errs.push(origin.at(0, "", format!("at most {MAX_REFERENCES} reference sets")));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut loaded = Vec::new();
        for (i, r) in sets.iter().enumerate() {
            let name = r.name.clone().unwrap_or_else(|| {
                Path::new(&r.path)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let name_field = if r.name.is_some() { "name" } else { "path" };
            if name.is_empty() {
                errs.push(origin.at(
                    i,
                    name_field,
                    "a reference set needs a non-empty name".into(),
                ));
            } else if let Some(first) = names.insert(name.clone(), i) {
                errs.push(
                    origin
                        .at(
                            i,
                            name_field,
                            format!("reference name `{name}` is used twice (also entry {first})"),
                        )
                        .hint("give each reference set its own `name:`"),
                );
            }
            let full = if Path::new(&r.path).is_absolute() {
                PathBuf::from(&r.path)
            } else {
                origin.dir.join(&r.path)
            };
            let files: Vec<PathBuf> = if r.path.contains(['*', '?', '[']) {
                let mut v: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
                    .map(|g| g.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect())
                    .unwrap_or_default();
                v.sort();
                v
            } else if full.is_file() {
                vec![full.clone()]
            } else {
                Vec::new()
            };
            if files.is_empty() {
                errs.push(
                    origin
                        .at(
                            i,
                            "path",
                            if r.path.contains(['*', '?', '[']) {
                                format!("no reference file matches {}", full.display())
                            } else {
                                format!("reference file not found: {}", full.display())
                            },
                        )
                        .hint("paths are relative to the file that lists them; check the spelling"),
                );
                continue;
            }
            let Some(format) = Format::from_path(&files[0].to_string_lossy()) else {
                errs.push(
                    origin
                        .at(
                            i,
                            "path",
                            format!("cannot tell the format of {}", files[0].display()),
                        )
                        .hint("use a .jsonl, .json, .parquet or .csv file"),
                );
                continue;
            };
            let mut hasher = blake3::Hasher::new();
            if let Some(e) = files.iter().find_map(|f| file_hash(&mut hasher, f).err()) {
                errs.push(origin.at(i, "path", format!("cannot read {}: {e}", full.display())));
                continue;
            }
            // Parse it once now: a corrupt file or a wrong column is a validation error.
            let mut schema: Option<SchemaRef> = None;
            let mut rows = 0usize;
            let read = crate::input::read(&files, format, &mut |b| {
                rows += b.num_rows();
                schema.get_or_insert_with(|| b.schema());
                Ok(())
            });
            if let Err(e) = read {
                errs.push(
                    origin
                        .at(i, "path", format!("reference `{name}`: {}", e.message))
                        .maybe_hint(e.hint),
                );
                continue;
            }
            let Some(s) = schema.filter(|_| rows > 0) else {
                errs.push(
                    origin
                        .at(i, "path", format!("reference `{name}` has no rows"))
                        .hint("an empty reference set would match nothing"),
                );
                continue;
            };
            let columns = r.column.list();
            let mut ok = !columns.is_empty();
            for c in &columns {
                match s.field_with_name(c) {
                    Err(_) => {
                        ok = false;
                        let cols: Vec<&str> =
                            s.fields().iter().map(|f| f.name().as_str()).collect();
                        errs.push(
                            origin
                                .at(
                                    i,
                                    "column",
                                    format!("reference `{name}` has no column `{c}`"),
                                )
                                .maybe_hint(did_you_mean(c, cols.iter().copied()))
                                .hint_if_none(format!("its columns: {}", cols.join(", "))),
                        );
                    }
                    Ok(f) if !holds_text(f.data_type()) => {
                        ok = false;
                        errs.push(origin.at(
                            i,
                            "column",
                            format!(
                                "column `{c}` of reference `{name}` is {}, not text",
                                f.data_type()
                            ),
                        ))
                    }
                    Ok(_) => {}
                }
            }
            if ok {
                loaded.push(Loaded {
                    name,
                    files,
                    columns,
                    format,
                    content_hash: hasher.finalize().to_hex().to_string(),
                });
            }
        }
        loaded
    }
}

impl Stage for DecontaminateStage {
    fn version(&self) -> u32 {
        // 2: Han and kana characters are words of their own; columns hold nested text;
        // near duplicates; `_similarity` in the side table.
        2
    }

    fn side_tables(&self) -> &'static [&'static str] {
        &["removed"]
    }

    fn evaluation_files(&self) -> Vec<(String, PathBuf)> {
        self.loaded
            .iter()
            .flat_map(|l| l.files.iter().map(|f| (l.name.clone(), f.clone())))
            .collect()
    }

    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        let at = |path: &[&str], msg: String| Diagnostic::new(&ctx.file, node.pos_at(path), msg);
        let mut errs = Vec::new();
        if self.ngram == 0 {
            errs.push(at(&["ngram"], "ngram must be at least 1".into()).hint("13 is usual"));
        }
        if self.shingle_words == 0 {
            errs.push(at(
                &["shingle_words"],
                "shingle_words must be at least 1".into(),
            ));
        }
        if let Some(t) = self.near_dup_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            errs.push(
                at(
                    &["near_dup_threshold"],
                    format!("near_dup_threshold must be in (0, 1], not {t}"),
                )
                .hint("0.8 is usual"),
            );
        }
        let loaded = match &self.references {
            References::Sets(sets) => {
                let origin = Origin {
                    file: ctx.file.clone(),
                    dir: ctx.dir.clone(),
                    list: node,
                    prefix: vec!["references".into()],
                };
                self.load_sets(sets, &origin, &mut errs)
            }
            References::File(p) => {
                let file = if Path::new(p).is_absolute() {
                    PathBuf::from(p)
                } else {
                    ctx.dir.join(p)
                };
                let text = match std::fs::read_to_string(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        errs.push(
                            at(
                                &["references"],
                                format!("cannot read reference-set file {}: {e}", file.display()),
                            )
                            .hint("a path relative to the pipeline file, or a list of sets"),
                        );
                        return Err(errs);
                    }
                };
                let root = match crate::yaml::parse(&text) {
                    Ok(n) => n,
                    Err(e) => {
                        errs.push(Diagnostic::new(&file, e.pos, e.message));
                        return Err(errs);
                    }
                };
                let parsed: SetFile = match root.deserialize("") {
                    Ok(s) => s,
                    Err(e) => {
                        errs.push(Diagnostic::new(
                            &file,
                            e.pos.unwrap_or(Pos { line: 1, col: 1 }),
                            e.to_string(),
                        ));
                        return Err(errs);
                    }
                };
                let origin = Origin {
                    file: file.clone(),
                    dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
                    list: &root,
                    prefix: vec!["sets".into()],
                };
                self.load_sets(&parsed.sets, &origin, &mut errs)
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        self.loaded = loaded;
        Ok(())
    }

    // The reference sets as loaded (name, columns, format, content hash) stand for
    // `references`: a set whose file moved but whose content did not keeps the table.
    fn fingerprint_excludes(&self) -> &'static [&'static str] {
        &["references"]
    }

    fn fingerprint_extra(&self) -> serde_json::Value {
        serde_json::json!({
            "references": self.loaded.iter().map(|l| {
                serde_json::json!({
                    "name": l.name,
                    "columns": l.columns,
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
            &[REFERENCE, MATCHED, SIMILARITY],
            "which decontaminate adds to <id>__removed",
        ));
        if errs.is_empty() {
            Ok(schema.clone())
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        // Every n-gram of every reference set → the sets containing it; and, for near
        // duplicates, every reference text's shingles.
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut near = NearIndex::default();
        for (i, l) in self.loaded.iter().enumerate() {
            let rows = self
                .reference_rows(i)
                .map_err(|e| Error::stage(ctx.id, format!("reference `{}`: {e}", l.name)))?;
            let grams: HashSet<u64> = rows
                .par_iter()
                .flat_map_iter(|t| ngram_hashes(&words(&t.join("\n")), self.ngram))
                .collect();
            for g in grams {
                *refs.entry(g).or_default() |= 1 << i;
            }
            if self.near_dup_threshold.is_some() {
                let sets: Vec<Vec<Vec<u64>>> = rows
                    .par_iter()
                    .map(|t| {
                        let mut units: Vec<Vec<u64>> = Vec::new();
                        if t.len() > 1 {
                            units.push(shingles(&words(&t.join("\n")), self.shingle_words));
                        }
                        units.extend(t.iter().map(|s| shingles(&words(s), self.shingle_words)));
                        units
                    })
                    .collect();
                for s in sets.iter().flatten() {
                    near.add(i, s);
                }
            }
        }

        let mut kept_w = LazyPart::new(ctx.out.join("part-00000.parquet"));
        let mut removed_w = kit::RemovedRows::new(ctx)?;
        let mut kept = 0i64;
        let mut hits = vec![0i64; self.loaded.len()];
        let mut near_hits = vec![0i64; self.loaded.len()];
        for b in read_batches(&ctx.parent().files) {
            let b = b?;
            let texts = string_col(&b, &self.column)?;
            let found: Vec<Option<Hit>> = (0..texts.len())
                .into_par_iter()
                .map(|i| {
                    if texts.is_null(i) {
                        return None;
                    }
                    let w = words(texts.value(i));
                    check_words(&w, self.ngram, &refs).or_else(|| {
                        let t = self.near_dup_threshold?;
                        let (reference, similarity, sets) =
                            near.best(&shingles(&w, self.shingle_words), t)?;
                        Some(Hit {
                            reference,
                            ngram: None,
                            similarity: Some(similarity),
                            sets,
                        })
                    })
                })
                .collect();
            for h in found.iter().flatten() {
                let counts = if h.ngram.is_some() {
                    &mut hits
                } else {
                    &mut near_hits
                };
                for (i, n) in counts.iter_mut().enumerate() {
                    if h.sets & (1 << i) != 0 {
                        *n += 1;
                    }
                }
            }
            let keep_mask: BooleanArray = found.iter().map(|h| Some(h.is_none())).collect();
            let (kb, gb) = kit::split(&b, &keep_mask)?;
            kept += kb.num_rows() as i64;
            kept_w.write(&kb)?;
            let gone: Vec<&Hit> = found.iter().flatten().collect();
            if gone.is_empty() {
                continue;
            }
            let reference: StringArray = gone
                .iter()
                .map(|h| Some(self.loaded[h.reference].name.as_str()))
                .collect();
            let matched: StringArray = gone.iter().map(|h| h.ngram.as_deref()).collect();
            let similarity: Float64Array = gone.iter().map(|h| h.similarity).collect();
            removed_w.write(&kit::with_columns(
                &gb,
                &Self::removed_fields(),
                vec![Arc::new(reference), Arc::new(matched), Arc::new(similarity)],
            )?)?;
        }
        kept_w.finish(&ctx.parent().schema)?;
        let removed =
            removed_w.finish(&with_fields(&ctx.parent().schema, &Self::removed_fields()))?;
        let mut out = RunOutput::default();
        out.counters.insert("removed".into(), removed);
        out.counters.insert("kept".into(), kept);
        for ((l, n), m) in self.loaded.iter().zip(hits).zip(near_hits) {
            out.counters.insert(format!("hits_{}", l.name), n);
            if self.near_dup_threshold.is_some() {
                out.counters.insert(format!("near_dups_{}", l.name), m);
            }
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
        // Han and kana characters are words of their own; Latin runs beside them stay whole.
        assert_eq!(
            words("为一首Song写描述，カタ!"),
            ["为", "一", "首", "song", "写", "描", "述", "カ", "タ"]
        );
    }

    #[test]
    fn near_duplicates_by_exact_shingle_jaccard() {
        let sh = |t: &str| shingles(&words(t), 2);
        let mut idx = NearIndex::default();
        // "a b c d" has shingles {ab, bc, cd}; "x y" has {xy}.
        idx.add(0, &sh("a b c d"));
        idx.add(1, &sh("x y"));
        idx.add(1, &sh("a b c e"));
        // {ab, bc, cd, de}: 3 shared with set 0's text (3/4), 2 with set 1's {ab, bc, ce} (2/5).
        assert_eq!(idx.best(&sh("a b c d e"), 0.7), Some((0, 0.75, 0b01)));
        assert_eq!(idx.best(&sh("a b c d e"), 0.4), Some((0, 0.75, 0b11)));
        assert_eq!(idx.best(&sh("a b c d e"), 0.8), None);
        // Shorter than one shingle: the whole text is one shingle.
        assert_eq!(sh("x"), shingles(&words("X!"), 5));
        assert_eq!(idx.best(&sh("X, Y"), 1.0), Some((1, 1.0, 0b10)));
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
        assert_eq!(hit.ngram.as_deref(), Some("write a story about a"));
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
        assert_eq!(hit.ngram.as_deref(), Some("four five six"));
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
        let before = crate::stages::fingerprint(&ok);
        assert_eq!(ok.loaded[0].name, "r");
        std::fs::write(dir.path().join("r.jsonl"), "{\"prompt\": \"a b d\"}\n").unwrap();
        ok.prepare(&node, &ctx).unwrap();
        assert_ne!(
            crate::stages::fingerprint(&ok),
            before,
            "editing a reference changes the fingerprint"
        );
    }
}
