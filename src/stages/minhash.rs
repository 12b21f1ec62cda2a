//! `kind: minhash` — near-duplicate removal with MinHash LSH on one text column.
//!
//! Each row's text is normalized (optionally lowercased, runs of whitespace collapsed to one
//! space) and cut into word or character shingles, each hashed with xxh3. `num_perm`
//! universal hashes `(a·x + b) mod (2^61 − 1)` with fixed seeds give every row a signature of
//! minima (rows are signed in parallel). Rows whose signatures agree on a whole band of
//! `rows` values become candidates; a candidate pair is a duplicate when the exact Jaccard
//! similarity of the two shingle sets reaches the threshold. The signature's estimate would
//! be cheaper, but its noise (sqrt(J(1−J)/num_perm), 0.04 at 128) throws away true pairs
//! near the threshold and lets false ones in: checking the sets (kept as sorted 32-bit
//! shingle hashes, 4 bytes a shingle) makes LSH banding the only source of missed pairs.
//! Duplicates are joined into clusters (union-find, so similarity is transitive)
//! and each cluster keeps the row that comes first in the inputs, never whichever row a
//! thread saw first, so reruns keep the same rows.
//!
//! The main table holds the kept rows plus `_cluster`; removed rows go to `<id>__removed`
//! with `_duplicate_of` (the kept row's `_id`) and `_similarity` (exact Jaccard with it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Float64Array, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, SchemaRef};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BuildCtx, Capability, KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns,
    text_column,
};
use crate::engine::LazyPart;
use crate::error::{Diagnostic, Error, Result};
use crate::table::ID_COL;
use crate::table::{DUP_OF, input_ordinals, read_batches, string_col, with_fields};
use crate::yaml::Node;

pub const KIND: KindEntry = KindEntry {
    name: "minhash",
    about: "near-duplicate removal with MinHash LSH on one text column; removed rows in <id>__removed",
    build: super::build::<MinHashStage>,
    schema: |g| MinHashStage::json_schema(g),
    capabilities: &[Capability::RemovesRows],
    removed_rows: "near duplicates removed",
};

/// Column of the main table: the cluster a kept row heads.
pub const CLUSTER: &str = "_cluster";
/// Column of the side table: exact Jaccard similarity (of the shingle sets) with the kept row.
pub const SIMILARITY: &str = "_similarity";

/// The Mersenne prime 2^61 − 1, modulus of the universal hashes.
const P: u64 = (1 << 61) - 1;
/// Seed of the permutation parameters; changing it changes every signature (bump `version`).
const PERM_SEED: u64 = 0x1f10_0a5e_ed00_0001;
const MAX_PERM: usize = 4096;
/// Representatives kept per LSH bucket (see `run`).
const MAX_REPS: usize = 256;
/// Weights of the false-positive and false-negative areas when bands/rows are derived from
/// the threshold. Candidates are verified, so a false positive only costs time, while a
/// false negative is a missed duplicate: misses weigh more.
const FP_WEIGHT: f64 = 0.05;
const FN_WEIGHT: f64 = 0.95;

/// How text is cut into shingles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Shingle {
    /// `shingle_size` consecutive words (whitespace-separated, after normalization).
    #[default]
    Word,
    /// `shingle_size` consecutive characters (after normalization).
    Char,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MinHashStage {
    /// The text column (a string column).
    pub column: String,
    /// Number of hash permutations, i.e. the signature length (1–4096).
    #[serde(default = "default_num_perm")]
    pub num_perm: usize,
    /// LSH bands. Give together with `rows`; bands × rows must equal `num_perm`. When
    /// omitted, bands and rows are derived from `threshold`.
    #[serde(default)]
    pub bands: Option<usize>,
    /// Signature values per band. Give together with `bands`.
    #[serde(default)]
    pub rows: Option<usize>,
    /// Jaccard similarity of the shingle sets (0–1) at which two rows are duplicates. Default 0.8.
    /// With explicit `bands`/`rows` and no `threshold`, the LSH curve's own threshold
    /// (1/bands)^(1/rows) is used.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// `word` (default) or `char` shingles.
    #[serde(default)]
    pub shingle: Shingle,
    /// Words or characters per shingle (default 3 for words, 5 for chars). Texts shorter
    /// than one shingle are a single shingle.
    #[serde(default)]
    pub shingle_size: Option<usize>,
    /// Lowercase before shingling (default true). Whitespace is always collapsed.
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// The effective parameters, filled in by `prepare`.
    #[serde(skip)]
    params: Params,
}

fn default_num_perm() -> usize {
    128
}

fn yes() -> bool {
    true
}

/// Effective parameters after defaults and derivation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Params {
    pub num_perm: usize,
    pub bands: usize,
    pub rows: usize,
    pub threshold: f64,
    pub shingle_size: usize,
}

/// The band/row split minimising FP_WEIGHT·(false-positive area) + FN_WEIGHT·(false-negative
/// area) of the LSH S-curve `1 − (1 − s^rows)^bands` around `threshold`, with
/// bands × rows ≤ num_perm (every signature value still counts for the similarity estimate).
pub fn derive_bands_rows(threshold: f64, num_perm: usize) -> (usize, usize) {
    fn area(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
        const N: usize = 100;
        if b <= a {
            return 0.0;
        }
        let h = (b - a) / N as f64;
        let mut s = 0.5 * (f(a) + f(b));
        for i in 1..N {
            s += f(a + i as f64 * h);
        }
        s * h
    }
    let mut best = (f64::INFINITY, 1, num_perm.max(1));
    for b in 1..=num_perm {
        for r in 1..=num_perm / b {
            let p = |s: f64| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
            let fp = area(p, 0.0, threshold);
            let fneg = area(|s| 1.0 - p(s), threshold, 1.0);
            let err = FP_WEIGHT * fp + FN_WEIGHT * fneg;
            if err < best.0 - 1e-12 {
                best = (err, b, r);
            }
        }
    }
    (best.1, best.2)
}

/// `x mod (2^61 − 1)` for x < 2^122.
fn mod_p(x: u128) -> u64 {
    let folded = (x & P as u128) + (x >> 61);
    let s = ((folded & P as u128) + (folded >> 61)) as u64;
    if s >= P { s - P } else { s }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `(a, b)` of each universal hash, 1 ≤ a < p, 0 ≤ b < p, from a fixed seed.
pub fn permutations(num_perm: usize) -> Vec<(u64, u64)> {
    let mut state = PERM_SEED;
    (0..num_perm)
        .map(|_| {
            let a = 1 + splitmix64(&mut state) % (P - 1);
            let b = splitmix64(&mut state) % P;
            (a, b)
        })
        .collect()
}

/// Lowercase (optionally) and turn every run of whitespace into one space, trimmed.
pub fn normalize(s: &str, lowercase: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let lowered;
    let text = if lowercase {
        lowered = s.to_lowercase();
        lowered.as_str()
    } else {
        s
    };
    for w in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// xxh3 hashes of the distinct shingles of normalized text (empty for empty text).
pub fn shingle_hashes(norm: &str, kind: Shingle, size: usize) -> Vec<u64> {
    if norm.is_empty() {
        return Vec::new();
    }
    let h = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    // Byte offsets where each unit (word or char) starts and ends.
    let units: Vec<(usize, usize)> = match kind {
        Shingle::Word => {
            let mut v = Vec::new();
            let mut start = 0;
            for (i, c) in norm.char_indices() {
                if c == ' ' {
                    v.push((start, i));
                    start = i + 1;
                }
            }
            v.push((start, norm.len()));
            v
        }
        Shingle::Char => norm
            .char_indices()
            .map(|(i, c)| (i, i + c.len_utf8()))
            .collect(),
    };
    let mut out: Vec<u64> = if units.len() <= size {
        vec![h(norm)]
    } else {
        (0..=units.len() - size)
            .map(|i| h(&norm[units[i].0..units[i + size - 1].1]))
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// MinHash signature of a set of shingle hashes; `None` for an empty set.
pub fn signature(shingles: &[u64], perms: &[(u64, u64)]) -> Option<Vec<u32>> {
    if shingles.is_empty() {
        return None;
    }
    let mut sig = vec![u32::MAX; perms.len()];
    for &s in shingles {
        let x = (s % P) as u128;
        for (slot, &(a, b)) in sig.iter_mut().zip(perms) {
            let v = (mod_p(a as u128 * x + b as u128) & 0xffff_ffff) as u32;
            if v < *slot {
                *slot = v;
            }
        }
    }
    Some(sig)
}

/// Exact Jaccard similarity of two sorted, deduplicated sets.
pub fn set_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// Share of equal positions: the estimated Jaccard similarity of two signatures.
#[cfg(test)]
pub fn similarity(a: &[u32], b: &[u32]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len().max(1) as f64
}

struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n as u32).collect(),
        }
    }

    fn find(&mut self, x: u32) -> u32 {
        let mut root = x;
        while self.parent[root as usize] != root {
            root = self.parent[root as usize];
        }
        let mut x = x;
        while self.parent[x as usize] != root {
            let next = self.parent[x as usize];
            self.parent[x as usize] = root;
            x = next;
        }
        root
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // The root of a cluster is always its smallest row.
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

impl MinHashStage {
    #[cfg(test)]
    pub fn params(&self) -> &Params {
        &self.params
    }

    fn removed_fields() -> [Field; 2] {
        [
            Field::new(DUP_OF, DataType::Utf8, false),
            Field::new(SIMILARITY, DataType::Float64, false),
        ]
    }

    /// The signature of every row of a batch (`None` for a null or empty text).
    /// Per row: its signature and its shingle set as sorted 32-bit hashes (`None` for a
    /// null or empty text).
    #[allow(clippy::type_complexity)]
    fn sign(&self, texts: &StringArray, perms: &[(u64, u64)]) -> Vec<Option<(Vec<u32>, Vec<u32>)>> {
        let p = &self.params;
        (0..texts.len())
            .into_par_iter()
            .map(|i| {
                if texts.is_null(i) {
                    return None;
                }
                let norm = normalize(texts.value(i), self.lowercase);
                let sh = shingle_hashes(&norm, self.shingle, p.shingle_size);
                let sig = signature(&sh, perms)?;
                let mut set: Vec<u32> = sh.iter().map(|h| *h as u32).collect();
                set.sort_unstable();
                set.dedup();
                Some((sig, set))
            })
            .collect()
    }
}

impl Stage for MinHashStage {
    /// 2: candidates verified on exact Jaccard of the shingle sets (was the estimate).
    fn version(&self) -> u32 {
        2
    }

    fn needs_id(&self) -> bool {
        true
    }

    fn side_tables(&self) -> &'static [&'static str] {
        &["removed"]
    }

    fn prepare(&mut self, node: &Node, ctx: &BuildCtx) -> Result<(), Vec<Diagnostic>> {
        let at = |path: &[&str], msg: String| Diagnostic::new(&ctx.file, node.pos_at(path), msg);
        let mut errs = Vec::new();
        if !(1..=MAX_PERM).contains(&self.num_perm) {
            errs.push(
                at(
                    &["num_perm"],
                    format!("num_perm must be between 1 and {MAX_PERM}"),
                )
                .hint("128 or 256 are usual"),
            );
        }
        let size = self.shingle_size.unwrap_or(match self.shingle {
            Shingle::Word => 3,
            Shingle::Char => 5,
        });
        if size == 0 {
            errs.push(at(
                &["shingle_size"],
                "shingle_size must be at least 1".into(),
            ));
        }
        if let Some(t) = self.threshold
            && !(0.0..=1.0).contains(&t)
        {
            errs.push(at(
                &["threshold"],
                "threshold must be between 0 and 1".into(),
            ));
        }
        let (bands, rows) = match (self.bands, self.rows) {
            (Some(b), Some(r)) => {
                if b == 0 || r == 0 || b * r != self.num_perm {
                    errs.push(
                        at(
                            &["bands"],
                            format!(
                                "bands × rows must equal num_perm: {b} × {r} = {} ≠ {}",
                                b * r,
                                self.num_perm
                            ),
                        )
                        .hint(
                            "or leave out bands and rows: they are then derived from `threshold`",
                        ),
                    );
                }
                (b, r)
            }
            (None, None) => {
                if errs.is_empty() {
                    derive_bands_rows(self.threshold.unwrap_or(0.8), self.num_perm)
                } else {
                    (1, 1)
                }
            }
            (b, _) => {
                errs.push(
                    at(
                        if b.is_some() { &["bands"] } else { &["rows"] },
                        "give `bands` and `rows` together, or neither".into(),
                    )
                    .hint("without them, bands and rows are derived from `threshold`"),
                );
                (1, 1)
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        let threshold = match (self.threshold, self.bands) {
            (Some(t), _) => t,
            (None, Some(_)) => (1.0 / bands as f64).powf(1.0 / rows as f64),
            (None, None) => 0.8,
        };
        self.params = Params {
            num_perm: self.num_perm,
            bands,
            rows,
            threshold,
            shingle_size: size,
        };
        Ok(())
    }

    // The parameters as resolved from the given ones and their defaults.
    fn fingerprint_extra(&self) -> serde_json::Value {
        serde_json::json!({ "params": self.params })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        errs.extend(text_column(ctx, &self.column, "minhash"));
        errs.extend(reserved_columns(
            ctx,
            &[CLUSTER, DUP_OF, SIMILARITY],
            "which minhash adds",
        ));
        if errs.is_empty() {
            Ok(with_fields(
                schema,
                &[Field::new(CLUSTER, DataType::UInt64, false)],
            ))
        } else {
            Err(errs)
        }
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let p = &self.params;
        let files = &ctx.parent().files;
        let perms = permutations(p.num_perm);

        // Pass 1: a signature per row, in file order.
        let mut sigs: Vec<Option<Vec<u32>>> = Vec::new();
        let mut sets: Vec<Vec<u32>> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        for b in read_batches(files) {
            let b = b?;
            for s in self.sign(&string_col(&b, &self.column)?, &perms) {
                match s {
                    Some((sig, set)) => {
                        sigs.push(Some(sig));
                        sets.push(set);
                    }
                    None => {
                        sigs.push(None);
                        sets.push(Vec::new());
                    }
                }
            }
            let id = string_col(&b, ID_COL)?;
            ids.extend((0..id.len()).map(|i| id.value(i).to_string()));
        }
        let n = sigs.len();
        if n > u32::MAX as usize {
            return Err(Error::stage(ctx.id, "minhash handles at most 2^32 rows"));
        }
        let is_dup = |a: u32, b: u32| -> bool {
            let (x, y) = (&sets[a as usize], &sets[b as usize]);
            !x.is_empty() && !y.is_empty() && set_jaccard(x, y) >= p.threshold - 1e-9
        };

        // LSH: rows agreeing on a whole band are candidates. Inside a bucket (ascending row
        // order), each row is compared with one representative of every cluster already met
        // in that bucket, so a bucket of k copies costs k comparisons, not k². A bucket of
        // many mutually dissimilar rows (a very common shingle with char shingles and few
        // rows per band) keeps at most MAX_REPS representatives: later rows are compared
        // with those only, and other bands can still pair them.
        let mut uf = UnionFind::new(n);
        for band in 0..p.bands {
            let range = band * p.rows..(band + 1) * p.rows;
            let mut keys: Vec<(u64, u32)> = sigs
                .par_iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let s = s.as_ref()?;
                    let bytes: Vec<u8> = s[range.clone()]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    Some((
                        xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, band as u64),
                        i as u32,
                    ))
                })
                .collect();
            keys.par_sort_unstable();
            let mut start = 0;
            while start < keys.len() {
                let mut end = start + 1;
                while end < keys.len() && keys[end].0 == keys[start].0 {
                    end += 1;
                }
                if end - start > 1 {
                    let mut reps: Vec<u32> = Vec::new();
                    for &(_, m) in &keys[start..end] {
                        let root = uf.find(m);
                        if reps.iter().any(|&r| uf.find(r) == root) {
                            continue;
                        }
                        match reps.iter().copied().find(|&r| is_dup(r, m)) {
                            Some(r) => uf.union(r, m),
                            None if reps.len() < MAX_REPS => reps.push(m),
                            None => {}
                        }
                    }
                }
                start = end;
            }
        }

        // Signatures were only for banding; the sets stay for `_similarity`.
        drop(sigs);

        // Clusters with more than one row; each keeps the row first in the inputs.
        let mut members: HashMap<u32, Vec<u32>> = HashMap::new();
        for r in 0..n as u32 {
            let root = uf.find(r);
            if root != r {
                members.entry(root).or_default().push(r);
            }
        }
        for (root, m) in members.iter_mut() {
            m.push(*root);
        }
        let wanted: HashSet<String> = members
            .values()
            .flat_map(|g| g.iter().map(|&r| ids[r as usize].clone()))
            .collect();
        let ords = input_ordinals(&ctx.inputs, &wanted)?;
        // For every row: the kept row of its cluster (itself for kept rows).
        let mut keeper: Vec<u32> = (0..n as u32).collect();
        let mut roots: Vec<u32> = members.keys().copied().collect();
        roots.sort_unstable();
        for root in &roots {
            let g = &members[root];
            let rank = |r: u32| {
                let id = &ids[r as usize];
                (ords.get(id).copied().unwrap_or(u64::MAX), id.as_str(), r)
            };
            let keep = g
                .iter()
                .copied()
                .min_by_key(|&r| rank(r))
                .expect("non-empty cluster");
            for &r in g {
                keeper[r as usize] = keep;
            }
        }

        // Pass 2: split rows into kept and removed, keeping file order.
        let cluster_id = |k: u32| xxhash_rust::xxh3::xxh3_64(ids[k as usize].as_bytes());
        let mut kept_w = LazyPart::new(ctx.out.join("part-00000.parquet"));
        let mut removed_w = kit::RemovedRows::new(ctx)?;
        let mut row = 0usize;
        for b in read_batches(files) {
            let b = b?;
            let len = b.num_rows();
            let rows: Vec<u32> = (row as u32..(row + len) as u32).collect();
            row += len;
            let keep_mask: BooleanArray = rows
                .iter()
                .map(|&r| Some(keeper[r as usize] == r))
                .collect();
            let (kept, gb) = kit::split(&b, &keep_mask)?;
            let clusters: UInt64Array = rows
                .iter()
                .filter(|&&r| keeper[r as usize] == r)
                .map(|&r| cluster_id(r))
                .collect();
            kept_w.write(&kit::with_columns(
                &kept,
                &[Field::new(CLUSTER, DataType::UInt64, false)],
                vec![Arc::new(clusters)],
            )?)?;

            let gone: Vec<u32> = rows
                .iter()
                .copied()
                .filter(|&r| keeper[r as usize] != r)
                .collect();
            if gone.is_empty() {
                continue;
            }
            let of: StringArray = gone
                .iter()
                .map(|&r| Some(ids[keeper[r as usize] as usize].as_str()))
                .collect();
            let sim: Float64Array = gone
                .iter()
                .map(|&r| {
                    let k = keeper[r as usize] as usize;
                    Some(set_jaccard(&sets[r as usize], &sets[k]))
                })
                .collect();
            removed_w.write(&kit::with_columns(
                &gb,
                &Self::removed_fields(),
                vec![Arc::new(of), Arc::new(sim)],
            )?)?;
        }
        kept_w.finish(&with_fields(
            &ctx.parent().schema,
            &[Field::new(CLUSTER, DataType::UInt64, false)],
        ))?;
        let removed =
            removed_w.finish(&with_fields(&ctx.parent().schema, &Self::removed_fields()))?;
        let mut out = RunOutput::default();
        out.counters.insert("removed".into(), removed);
        out.counters.insert("kept".into(), n as i64 - removed);
        out.counters.insert("clusters".into(), roots.len() as i64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_jaccard(a: &[u64], b: &[u64]) -> f64 {
        let a: HashSet<_> = a.iter().collect();
        let b: HashSet<_> = b.iter().collect();
        a.intersection(&b).count() as f64 / a.union(&b).count() as f64
    }

    #[test]
    fn normalization_lowercases_and_collapses_whitespace() {
        assert_eq!(
            normalize("  How do I\n\treverse  a List? ", true),
            "how do i reverse a list?"
        );
        assert_eq!(normalize(" A  b ", false), "A b");
        assert_eq!(normalize(" \n ", true), "");
    }

    #[test]
    fn shingles_of_words_and_chars() {
        let n = normalize("The  quick brown FOX jumps", true);
        let w = shingle_hashes(&n, Shingle::Word, 3);
        assert_eq!(w.len(), 3);
        let x = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
        assert!(w.contains(&x("the quick brown")) && w.contains(&x("brown fox jumps")));
        // Shorter than one shingle: the whole text; empty text: none.
        assert_eq!(shingle_hashes("a b", Shingle::Word, 3), vec![x("a b")]);
        assert!(shingle_hashes("", Shingle::Word, 3).is_empty());
        // Characters, not bytes.
        let c = shingle_hashes("héllo!", Shingle::Char, 5);
        assert_eq!(c.len(), 2);
        assert!(c.contains(&x("héllo")) && c.contains(&x("éllo!")));
        // Repeated shingles count once.
        assert_eq!(shingle_hashes("a a a a a", Shingle::Word, 2).len(), 1);
    }

    #[test]
    fn mersenne_reduction_matches_u128_remainder() {
        let mut s = 7u64;
        for _ in 0..10_000 {
            let a = splitmix64(&mut s) % P;
            let x = splitmix64(&mut s);
            let b = splitmix64(&mut s) % P;
            let v = a as u128 * (x % P) as u128 + b as u128;
            assert_eq!(mod_p(v), (v % P as u128) as u64);
        }
        let max = (P - 1) as u128 * (P - 1) as u128 + (P - 1) as u128;
        assert_eq!(mod_p(max), (max % P as u128) as u64);
    }

    #[test]
    fn derived_bands_rows_fit_the_threshold() {
        for (t, n) in [(0.5, 128), (0.7, 128), (0.8, 128), (0.9, 256), (0.8, 64)] {
            let (b, r) = derive_bands_rows(t, n);
            assert!(b * r <= n, "{t} {n}: {b}×{r}");
            // Tuned for recall (candidates are verified): the S-curve's steepest point
            // (1/b)^(1/r) sits below t, a pair at the threshold is a candidate with
            // probability > 0.9, and pairs clearly above it almost always are.
            let knee = (1.0 / b as f64).powf(1.0 / r as f64);
            assert!((t - 0.2..t).contains(&knee), "{t}: {b}×{r} knee {knee}");
            let p = |s: f64| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
            assert!(p(t) > 0.9, "{t}: {b}×{r}");
            assert!(p((t + 0.1).min(1.0)) > 0.99, "{t}: {b}×{r}");
            // Unrelated rows rarely collide.
            assert!(p(0.1) < 0.03, "{t}: {b}×{r}");
        }
        assert_eq!(derive_bands_rows(0.7, 128), derive_bands_rows(0.7, 128));
    }

    fn stage(yaml_fields: serde_json::Value) -> MinHashStage {
        let mut s: MinHashStage = serde_json::from_value(yaml_fields).unwrap();
        let ctx = BuildCtx {
            file: "p.yaml".into(),
            dir: ".".into(),
            sections: Default::default(),
        };
        let node = Node::new(crate::yaml::Value::Map(vec![]), Default::default());
        s.prepare(&node, &ctx)
            .map(|_| s)
            .unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn prepare_fills_defaults_and_checks_bands() {
        let s = stage(serde_json::json!({"column": "t"}));
        let (b, r) = derive_bands_rows(0.8, 128);
        assert_eq!(
            s.params(),
            &Params {
                num_perm: 128,
                bands: b,
                rows: r,
                threshold: 0.8,
                shingle_size: 3
            }
        );
        let s =
            stage(serde_json::json!({"column": "t", "shingle": "char", "bands": 16, "rows": 8}));
        assert_eq!(s.params().shingle_size, 5);
        assert!((s.params().threshold - (1.0f64 / 16.0).powf(1.0 / 8.0)).abs() < 1e-12);

        let mut bad: MinHashStage =
            serde_json::from_value(serde_json::json!({"column": "t", "bands": 10, "rows": 10}))
                .unwrap();
        let ctx = BuildCtx {
            file: "p.yaml".into(),
            dir: ".".into(),
            sections: Default::default(),
        };
        let node = Node::new(crate::yaml::Value::Map(vec![]), Default::default());
        let e = bad.prepare(&node, &ctx).unwrap_err();
        assert!(e[0].message.contains("must equal num_perm"), "{e:?}");
    }

    #[test]
    fn signatures_are_deterministic_and_estimate_jaccard() {
        let perms = permutations(256);
        assert_eq!(perms, permutations(256));
        assert_eq!(&permutations(64)[..], &perms[..64]);
        let text = |n: usize, skip: Option<usize>| -> String {
            (0..n)
                .filter(|i| Some(*i) != skip)
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let a = shingle_hashes(&text(60, None), Shingle::Word, 3);
        let b = shingle_hashes(&text(60, Some(30)), Shingle::Word, 3);
        let sa = signature(&a, &perms).unwrap();
        assert_eq!(Some(sa.clone()), signature(&a, &perms));
        let sb = signature(&b, &perms).unwrap();
        let (est, exact) = (similarity(&sa, &sb), exact_jaccard(&a, &b));
        assert!((est - exact).abs() < 0.1, "estimate {est}, exact {exact}");
        assert_eq!(similarity(&sa, &sa), 1.0);
        assert!(signature(&[], &perms).is_none());
        // Pinned values: changing the hashing silently would change every stored result.
        let pinned = signature(&shingle_hashes("a b c d", Shingle::Word, 3), &perms[..4]).unwrap();
        assert_eq!(pinned, [3903729568, 2501483808, 1203695647, 3085565706]);
    }
}
