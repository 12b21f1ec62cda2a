//! Release-build benchmark of the `minhash` stage (issue 4: ≥ 50k docs/s on 2 cores, recall
//! ≥ 0.95 on planted near-duplicates), with Python's datasketch (MinHashLSH) on the same
//! corpus in the same run.
//!
//! `CARGO_TARGET_DIR=~/.cache/ifloom/target-bench cargo bench --bench minhash` (BENCHMARKS.md).
//!
//! Corpus (seeded): `IFLOOM_MINHASH_ROWS` (default 1,000,000) instruction-like texts of 15–40
//! words over a 5,000-word synthetic vocabulary; 5% of rows are copies of an earlier original
//! with 1–2 word edits (substitution, insertion or deletion). Stage: word 3-shingles,
//! 128 permutations, threshold 0.7 (bands × rows derived).
//!
//! * **speed**: rows ÷ the stage's own `duration_ms` (manifest), and the whole `ifloom run`
//!   wall time (which also reads the input and assigns `_id`s);
//! * **quality** against exact Jaccard of the same shingles: the truth is every planted pair
//!   whose exact Jaccard ≥ the threshold; recall = share of those pairs put in one cluster;
//!   precision = share of removed rows whose exact Jaccard with the row they were matched to
//!   is ≥ the threshold (and ≥ threshold − 0.1, to show how far off the rest are);
//! * **datasketch** (`benches/minhash_datasketch.py`, when `import datasketch` works): the same
//!   shingles, num_perm and threshold, `MinHash.bulk` + `MinHashLSH` insert/query, on the first
//!   `IFLOOM_DATASKETCH_ROWS` rows (default 100,000: datasketch is single-threaded Python and
//!   1M rows would take many minutes); reported as docs/s and as a ratio.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ifloom");
const SEED: u64 = 20_261_124;
const THRESHOLD: f64 = 0.7;
const TARGET_DOCS_S: f64 = 50_000.0;
const TARGET_RECALL: f64 = 0.95;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vocabulary(rng: &mut StdRng) -> Vec<String> {
    let (c, v) = (b"bcdfghjklmnprstvwz", b"aeiou");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < 5000 {
        let n = 2 + rng.random_range(0..3);
        let w: String = (0..n)
            .flat_map(|_| {
                [
                    c[rng.random_range(0..c.len())] as char,
                    v[rng.random_range(0..v.len())] as char,
                ]
            })
            .collect();
        if seen.insert(w.clone()) {
            out.push(w);
        }
    }
    out
}

/// Texts and the planted (original, copy) pairs.
fn corpus(rows: usize) -> (Vec<String>, Vec<(usize, usize)>) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let vocab = vocabulary(&mut rng);
    let mut texts: Vec<Vec<u32>> = Vec::with_capacity(rows);
    let mut originals: Vec<usize> = Vec::new();
    let mut planted = Vec::new();
    for i in 0..rows {
        if !originals.is_empty() && rng.random_bool(0.05) {
            let base = originals[rng.random_range(0..originals.len())];
            let mut w = texts[base].clone();
            for _ in 0..rng.random_range(1..=2) {
                let at = rng.random_range(0..w.len());
                match rng.random_range(0..10) {
                    0..6 => w[at] = rng.random_range(0..vocab.len() as u32),
                    6..8 => w.insert(at, rng.random_range(0..vocab.len() as u32)),
                    _ => {
                        w.remove(at);
                    }
                }
            }
            texts.push(w);
            planted.push((base, i));
        } else {
            let len = rng.random_range(15..=40);
            texts.push(
                (0..len)
                    .map(|_| rng.random_range(0..vocab.len() as u32))
                    .collect(),
            );
            originals.push(i);
        }
    }
    let texts = texts
        .into_iter()
        .map(|w| {
            w.iter()
                .map(|&i| vocab[i as usize].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    (texts, planted)
}

fn shingles(text: &str) -> HashSet<String> {
    let w: Vec<&str> = text.split_whitespace().collect();
    if w.len() < 3 {
        return HashSet::from([w.join(" ")]);
    }
    w.windows(3).map(|s| s.join(" ")).collect()
}

fn exact_jaccard(a: &str, b: &str) -> f64 {
    let (x, y) = (shingles(a), shingles(b));
    let inter = x.intersection(&y).count() as f64;
    let union = (x.len() + y.len()) as f64 - inter;
    if union == 0.0 { 1.0 } else { inter / union }
}

fn write_parquet(path: &Path, texts: &[String]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema.clone(), None).unwrap();
    for (start, chunk) in texts.chunks(65_536).enumerate() {
        let base = (start * 65_536) as u64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from_iter_values(
                base..base + chunk.len() as u64,
            )),
            Arc::new(StringArray::from_iter_values(chunk)),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

const PIPELINE: &str = r#"name: minhash_bench
inputs:
  corpus: corpus.parquet
stages:
  - id: near
    kind: minhash
    from: corpus
    column: text
    shingle: word
    shingle_size: 3
    num_perm: 128
    threshold: 0.7
"#;

fn main() {
    let rows = env_num("IFLOOM_MINHASH_ROWS", 1_000_000);
    let ds_rows = env_num("IFLOOM_DATASKETCH_ROWS", 100_000).min(rows);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    eprintln!("corpus: {rows} rows");
    let (texts, planted) = corpus(rows);
    write_parquet(&dir.join("corpus.parquet"), &texts);
    std::fs::write(dir.join("p.yaml"), PIPELINE).unwrap();

    let run = dir.join("run");
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["run", "p.yaml", "--run-dir"])
        .arg(&run)
        .current_dir(dir)
        .output()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stages/near/manifest.json")).unwrap(),
    )
    .unwrap();
    let stage_s = m["duration_ms"].as_f64().unwrap() / 1000.0;
    eprintln!(
        "ifloom: stage {stage_s:.2} s, run {wall:.2} s, counters {}",
        m["counters"]
    );

    // keeper[row] = the row kept for its cluster (itself when kept).
    let o = Command::new(BIN)
        .args(["sql", "--format", "csv", "--run"])
        .arg(&run)
        .arg("SELECT r.row AS removed, k.row AS kept FROM near__removed r JOIN near k ON k._id = r._duplicate_of")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut keeper: HashMap<usize, usize> = HashMap::new();
    for line in String::from_utf8(o.stdout).unwrap().lines().skip(1) {
        let (a, b) = line.split_once(',').unwrap();
        keeper.insert(a.parse().unwrap(), b.parse().unwrap());
    }
    let root = |r: usize| keeper.get(&r).copied().unwrap_or(r);
    let truth: Vec<&(usize, usize)> = planted
        .iter()
        .filter(|(a, b)| exact_jaccard(&texts[*a], &texts[*b]) >= THRESHOLD)
        .collect();
    let found = truth.iter().filter(|(a, b)| root(*a) == root(*b)).count();
    let recall = found as f64 / truth.len().max(1) as f64;
    let sims: Vec<f64> = keeper
        .iter()
        .map(|(r, k)| exact_jaccard(&texts[*r], &texts[*k]))
        .collect();
    let precision =
        sims.iter().filter(|s| **s >= THRESHOLD).count() as f64 / sims.len().max(1) as f64;
    let near =
        sims.iter().filter(|s| **s >= THRESHOLD - 0.1).count() as f64 / sims.len().max(1) as f64;

    // datasketch on a prefix of the same corpus.
    let ds = Command::new("python3")
        .args(["-c", "import datasketch"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut ds_line = String::from("datasketch not installed (pip install datasketch)");
    if ds {
        let small: Vec<String> = texts[..ds_rows].to_vec();
        let sdir = dir.join("small");
        std::fs::create_dir_all(&sdir).unwrap();
        write_parquet(&sdir.join("corpus.parquet"), &small);
        std::fs::write(sdir.join("p.yaml"), PIPELINE).unwrap();
        let o = Command::new(BIN)
            .args(["run", "p.yaml", "--run-dir", "run"])
            .current_dir(&sdir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let sm: Value = serde_json::from_str(
            &std::fs::read_to_string(sdir.join("run/stages/near/manifest.json")).unwrap(),
        )
        .unwrap();
        let small_s = sm["duration_ms"].as_f64().unwrap() / 1000.0;
        let small_removed = sm["counters"]["removed"].as_i64().unwrap_or(0);
        let txt = sdir.join("texts.txt");
        std::fs::write(&txt, small.join("\n")).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/minhash_datasketch.py");
        let o = Command::new("python3")
            .arg(script)
            .arg(&txt)
            .arg(THRESHOLD.to_string())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        eprintln!("datasketch: {v}");
        let ds_s = v["seconds"].as_f64().unwrap();
        let (is, removed) = (small_s, small_removed);
        ds_line = format!(
            "| {ds_rows} rows | ifloom minhash stage | {is:.2} | {:.0} | removed {removed} |\n\
             | {ds_rows} rows | datasketch {} (MinHash.bulk + MinHashLSH, 1 process) | {ds_s:.2} | {:.0} | removed {} |\n\n\
             ifloom is {:.1}× faster than datasketch on the same {ds_rows} rows.",
            ds_rows as f64 / is,
            v["version"].as_str().unwrap_or("?"),
            ds_rows as f64 / ds_s,
            v["removed"],
            ds_s / is,
        );
    }

    let mut md = String::new();
    let docs_s = rows as f64 / stage_s;
    let _ = writeln!(
        md,
        "### MinHash near-dup: {rows} rows, {} planted copies ({} with exact Jaccard ≥ {THRESHOLD})\n\n\
         | figure | value | target | |\n|---|---|---|---|\n\
         | stage time (manifest) | {stage_s:.2} s | | |\n\
         | whole `ifloom run` (read input, `_id`, stage) | {wall:.2} s | | |\n\
         | docs/s (stage) | {docs_s:.0} | ≥ {TARGET_DOCS_S:.0} | {} |\n\
         | recall on planted pairs ≥ threshold | {recall:.4} ({found}/{}) | ≥ {TARGET_RECALL} | {} |\n\
         | precision (removed rows with exact J ≥ {THRESHOLD} to their keeper) | {precision:.4} of {} | | |\n\
         | removed rows with exact J ≥ {:.1} | {near:.4} | | |\n\
         | counters | {} | | |\n\n\
         | corpus | tool | seconds | docs/s | |\n|---|---|---|---|---|\n{ds_line}",
        planted.len(),
        truth.len(),
        if docs_s >= TARGET_DOCS_S {
            "met"
        } else {
            "missed"
        },
        truth.len(),
        if recall >= TARGET_RECALL {
            "met"
        } else {
            "missed"
        },
        sims.len(),
        THRESHOLD - 0.1,
        m["counters"],
    );
    println!("{md}");
}
