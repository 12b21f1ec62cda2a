//! Release-build benchmark of the `ifloom` binary on generated instruction data.
//!
//! `CARGO_TARGET_DIR=/work/target-bench cargo bench --bench engine` (see BENCHMARKS.md).
//!
//! Generates 1,000,000 seeded instruction-like rows (`prompt`, `category`; ~10% exact
//! duplicates, ~5% case/whitespace variants) as Parquet in a temporary folder, writes three
//! pipelines next to it and times the release `ifloom` binary as a subprocess:
//! * `full`: input -> sql (length filter + projection) -> transform -> exact dedup;
//! * `dedup_norm`: input -> dedup with `lowercase` + `collapse_whitespace`;
//! * `dedup_exact`: input -> dedup on the raw prompt;
//! * `ifloom sql` GROUP BY over the input table of a `dedup_norm` run.
//!
//! Every measurement is the best of 3 (each pipeline repetition gets a fresh run directory).
//! When `python3 -c "import duckdb"` works, `benches/duckdb_compare.py` runs the same GROUP
//! BY and equivalent dedups on the same Parquet. Progress goes to stderr; the Markdown
//! report goes to stdout.
//!
//! Environment: `IFLOOM_BENCH_ROWS` (default 1000000), `IFLOOM_BENCH_REPS` (default 3),
//! `IFLOOM_BENCH_KEEP=1` keeps the temporary folder and prints its path.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ifloom");
const SEED: u64 = 20_240_611;
const INPUT_ID: &str = "prompts";

const GROUP_BY: &str = "SELECT category, count(*) AS n, avg(length(prompt)) AS avg_len \
                        FROM prompts GROUP BY category ORDER BY category";

/// Targets, in seconds.
const TARGET_DEDUP_S: f64 = 2.0;
const TARGET_GROUP_BY_S: f64 = 1.0;

const CATEGORIES: [&str; 8] = [
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
];

const VERBS: [&str; 16] = [
    "Write",
    "Explain",
    "Summarize",
    "List",
    "Describe",
    "Translate",
    "Compare",
    "Classify",
    "Rewrite",
    "Generate",
    "Suggest",
    "Outline",
    "Draft",
    "Analyze",
    "Give",
    "Create",
];

const COMMON: [&str; 32] = [
    "the", "a", "of", "to", "and", "in", "for", "with", "about", "how", "what", "why", "short",
    "story", "poem", "list", "data", "python", "function", "recipe", "email", "summary", "three",
    "simple", "best", "way", "people", "time", "world", "code", "example", "words",
];

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// ~3,000 words: common English words first (picked most often), then made-up ones.
fn vocabulary(rng: &mut StdRng) -> Vec<String> {
    const ONSETS: [&str; 30] = [
        "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
        "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr",
    ];
    const VOWELS: [&str; 9] = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"];
    const CODAS: [&str; 10] = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"];
    let mut words: Vec<String> = COMMON.iter().map(|w| w.to_string()).collect();
    let mut seen: HashSet<String> = words.iter().cloned().collect();
    while words.len() < 3000 {
        let mut w = String::new();
        for _ in 0..rng.random_range(1..=3) {
            w.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
            w.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
            w.push_str(CODAS[rng.random_range(0..CODAS.len())]);
        }
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    words
}

/// 5-40 words: a capitalized verb, then words skewed towards the front of the vocabulary.
fn new_prompt(rng: &mut StdRng, vocab: &[String]) -> String {
    let n = rng.random_range(5..=40);
    let mut s = String::with_capacity(n * 7);
    s.push_str(VERBS[rng.random_range(0..VERBS.len())]);
    for _ in 1..n {
        let u: f64 = rng.random();
        s.push(' ');
        s.push_str(&vocab[((u * u * u) * vocab.len() as f64) as usize]);
    }
    s.push(if rng.random_bool(0.3) { '?' } else { '.' });
    s
}

/// A variant that differs from `s` only by case or whitespace (never equal to `s`).
fn variant(rng: &mut StdRng, s: &str) -> String {
    match rng.random_range(0..4) {
        0 => s.to_lowercase(), // the leading verb is capitalized, so this always changes it
        1 => s.to_uppercase(),
        2 => {
            let spaces: Vec<usize> = s.match_indices(' ').map(|(i, _)| i).collect();
            let at = spaces[rng.random_range(0..spaces.len())];
            let extra = if rng.random_bool(0.5) { "  " } else { "\t" };
            format!("{}{extra}{}", &s[..at], &s[at..])
        }
        _ => format!("  {s} \n"),
    }
}

struct DataStats {
    rows: usize,
    exact_dups: usize,
    variants: usize,
    bytes: u64,
    avg_chars: f64,
    secs: f64,
}

fn generate(path: &Path, rows: usize) -> DataStats {
    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(SEED);
    let vocab = vocabulary(&mut rng);
    let mut prompts: Vec<String> = Vec::with_capacity(rows);
    let mut cats: Vec<&'static str> = Vec::with_capacity(rows);
    let (mut exact_dups, mut variants) = (0, 0);
    for i in 0..rows {
        let r: f64 = rng.random();
        if i > 0 && r < 0.15 {
            let j = rng.random_range(0..i);
            let p = if r < 0.10 {
                exact_dups += 1;
                prompts[j].clone()
            } else {
                variants += 1;
                variant(&mut rng, &prompts[j])
            };
            prompts.push(p);
            cats.push(cats[j]);
        } else {
            prompts.push(new_prompt(&mut rng, &vocab));
            cats.push(CATEGORIES[rng.random_range(0..CATEGORIES.len())]);
        }
    }
    let avg_chars =
        prompts.iter().map(|p| p.chars().count()).sum::<usize>() as f64 / rows.max(1) as f64;

    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
    ]));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(Default::default()))
        .set_max_row_group_row_count(Some(128 * 1024))
        .build();
    let f = File::create(path).expect("create bench.parquet");
    let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).expect("parquet writer");
    for (ps, cs) in prompts.chunks(65_536).zip(cats.chunks(65_536)) {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(ps)),
            Arc::new(StringArray::from_iter_values(cs)),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols).expect("batch"))
            .expect("write batch");
    }
    w.close().expect("close parquet");
    DataStats {
        rows,
        exact_dups,
        variants,
        bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        avg_chars,
        secs: t.elapsed().as_secs_f64(),
    }
}

fn pipelines() -> Vec<(&'static str, String)> {
    let input = format!("inputs:\n  {INPUT_ID}: ../data/bench.parquet\n");
    vec![
        (
            "full",
            format!(
                "name: bench_full
description: length filter and projection (SQL), then Polars ops, then exact dedup.
params:
  min_chars: 32
  max_chars: 240
{input}stages:
  - id: bounded
    kind: sql
    from: {INPUT_ID}
    query: |
      SELECT _id, prompt, category, length(prompt) AS n_chars
      FROM {INPUT_ID}
      WHERE length(prompt) BETWEEN ${{params.min_chars}} AND ${{params.max_chars}}
  - id: shaped
    kind: transform
    from: bounded
    ops:
      - with_columns:
          category: upper(category)
      - filter: \"category <> 'CLASSIFICATION'\"
  - id: exact
    kind: dedup
    from: shaped
    columns: [prompt]
"
            ),
        ),
        (
            "dedup_norm",
            format!(
                "name: bench_dedup_norm
description: dedup alone, on lowercased prompts with collapsed whitespace.
{input}stages:
  - id: dedup
    kind: dedup
    from: {INPUT_ID}
    columns: [prompt]
    lowercase: true
    collapse_whitespace: true
"
            ),
        ),
        (
            "dedup_exact",
            format!(
                "name: bench_dedup_exact
description: dedup alone, on the raw prompt.
{input}stages:
  - id: dedup
    kind: dedup
    from: {INPUT_ID}
    columns: [prompt]
"
            ),
        ),
    ]
}

fn ifloom(args: &[&str], cwd: &Path) -> (f64, Output) {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("start the ifloom binary");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ifloom {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (secs, out)
}

#[derive(Clone)]
struct StageInfo {
    id: String,
    kind: String,
    rows: u64,
    counters: String,
    /// Best over the repetitions.
    ms: u64,
}

struct PipelineResult {
    name: &'static str,
    best_wall: f64,
    /// stderr of the fastest repetition.
    stderr: String,
    stages: Vec<StageInfo>,
    run_dirs: Vec<PathBuf>,
}

impl PipelineResult {
    fn stage(&self, id: &str) -> &StageInfo {
        self.stages
            .iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("pipeline {} has no stage {id}", self.name))
    }
}

fn read_json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn stage_infos(run: &Path) -> Vec<StageInfo> {
    let info = read_json(&run.join("run.json"));
    let order = info["stages"].as_array().cloned().unwrap_or_default();
    order
        .iter()
        .filter_map(Value::as_str)
        .map(|id| {
            let m = read_json(&run.join("stages").join(id).join("manifest.json"));
            let counters = m["counters"]
                .as_object()
                .map(|c| {
                    c.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            StageInfo {
                id: id.to_string(),
                kind: m["kind"].as_str().unwrap_or("?").to_string(),
                rows: m["rows"].as_u64().unwrap_or(0),
                counters,
                ms: m["duration_ms"].as_u64().unwrap_or(0),
            }
        })
        .collect()
}

fn bench_pipeline(tmp: &Path, name: &'static str, reps: usize) -> PipelineResult {
    let file = tmp.join("pipelines").join(format!("{name}.yaml"));
    let mut best_wall = f64::INFINITY;
    let mut stderr = String::new();
    let mut stages: Vec<StageInfo> = Vec::new();
    let mut run_dirs = Vec::new();
    for rep in 0..reps {
        let run = tmp.join("runs").join(format!("{name}-{rep}"));
        let (secs, out) = ifloom(
            &[
                "run",
                &file.to_string_lossy(),
                "--run-dir",
                &run.to_string_lossy(),
            ],
            tmp,
        );
        eprintln!("  {name} #{}: {secs:.2} s", rep + 1);
        if secs < best_wall {
            best_wall = secs;
            stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        let now = stage_infos(&run);
        if stages.is_empty() {
            stages = now;
        } else {
            for (s, n) in stages.iter_mut().zip(now) {
                s.ms = s.ms.min(n.ms);
            }
        }
        run_dirs.push(run);
    }
    PipelineResult {
        name,
        best_wall,
        stderr,
        stages,
        run_dirs,
    }
}

fn best_sql(run: &Path, query: &str, cwd: &Path, reps: usize) -> (f64, String) {
    let mut best = f64::INFINITY;
    let mut text = String::new();
    for _ in 0..reps {
        let (secs, out) = ifloom(
            &[
                "sql",
                "--run",
                &run.to_string_lossy(),
                "--format",
                "csv",
                query,
            ],
            cwd,
        );
        if secs < best {
            best = secs;
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    (best, text)
}

fn duckdb_available() -> bool {
    Command::new("python3")
        .args(["-c", "import duckdb"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_duckdb(input_glob: &Path, out_dir: &Path, reps: usize) -> Option<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/duckdb_compare.py");
    let out = Command::new("python3")
        .args([
            script,
            "--input",
            &input_glob.to_string_lossy(),
            "--out-dir",
            &out_dir.to_string_lossy(),
            "--reps",
            &reps.to_string(),
        ])
        .output()
        .expect("start python3");
    if !out.status.success() {
        eprintln!(
            "duckdb_compare.py failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn secs(s: f64) -> String {
    format!("{s:.2} s")
}

fn target(s: f64, t: f64) -> String {
    if s <= t {
        format!("≤ {t} s: met")
    } else {
        format!("≤ {t} s: **missed**")
    }
}

/// `category -> n` from `ifloom sql --format csv` output.
fn csv_counts(csv: &str) -> BTreeMap<String, u64> {
    csv.lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split(',');
            Some((it.next()?.to_string(), it.next()?.trim().parse().ok()?))
        })
        .collect()
}

fn main() {
    let rows = env_num("IFLOOM_BENCH_ROWS", 1_000_000);
    let reps = env_num("IFLOOM_BENCH_REPS", 3).max(1);
    let keep = std::env::var("IFLOOM_BENCH_KEEP").is_ok_and(|v| v == "1");
    let tmp_dir = tempfile::Builder::new()
        .prefix("ifloom-bench-")
        .tempdir()
        .expect("temp dir");
    let tmp = tmp_dir.path().to_path_buf();
    for d in ["data", "pipelines", "runs"] {
        std::fs::create_dir_all(tmp.join(d)).expect("create folder");
    }
    eprintln!("ifloom bench: {BIN}\n  folder {}", tmp.display());

    let data = generate(&tmp.join("data").join("bench.parquet"), rows);
    eprintln!(
        "  generated {} rows ({} exact duplicates, {} case/whitespace variants, {:.1} MiB) in {:.2} s",
        data.rows,
        data.exact_dups,
        data.variants,
        data.bytes as f64 / (1 << 20) as f64,
        data.secs
    );
    for (name, yaml) in pipelines() {
        std::fs::write(tmp.join("pipelines").join(format!("{name}.yaml")), yaml)
            .expect("write pipeline");
    }

    let results: Vec<PipelineResult> = ["full", "dedup_norm", "dedup_exact"]
        .into_iter()
        .map(|name| bench_pipeline(&tmp, name, reps))
        .collect();
    let [full, norm, exact] = &results[..] else {
        unreachable!()
    };

    let run_b = &norm.run_dirs[0];
    let (group_by_s, group_by_csv) = best_sql(run_b, GROUP_BY, &tmp, reps);
    let (select1_s, _) = best_sql(run_b, "SELECT 1", &tmp, reps);
    eprintln!("  sql GROUP BY: {group_by_s:.2} s (SELECT 1: {select1_s:.2} s)");

    let duck = if duckdb_available() {
        eprintln!("  running benches/duckdb_compare.py ...");
        let input = run_b.join("stages").join(INPUT_ID).join("part-*.parquet");
        run_duckdb(&input, &tmp.join("duckdb"), reps)
    } else {
        eprintln!("  python3 cannot import duckdb: skipping the comparison (pip install duckdb)");
        None
    };
    let dk = |k: &str| duck.as_ref().and_then(|d| d[k].as_f64());
    let dk_u = |k: &str| duck.as_ref().and_then(|d| d[k].as_u64());

    // The report.
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### ifloom benchmark: {} rows, best of {reps}\n\n\
         Data: {} rows ({} exact duplicates, {} case/whitespace variants), mean prompt {:.0} chars, \
         {:.1} MiB ZSTD Parquet; generated in {:.2} s.\n",
        data.rows,
        data.rows,
        data.exact_dups,
        data.variants,
        data.avg_chars,
        data.bytes as f64 / (1 << 20) as f64,
        data.secs
    );
    let _ = writeln!(
        md,
        "| Benchmark | ifloom | Target | DuckDB | ifloom / DuckDB |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|");
    let mut row = |label: &str, v: f64, tgt: Option<f64>, duck_s: Option<f64>| {
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            secs(v),
            tgt.map_or("—".into(), |t| target(v, t)),
            duck_s.map_or("—".into(), secs),
            duck_s.map_or("—".into(), |d| format!("{:.1}×", v / d)),
        );
    };
    let norm_ms = norm.stage("dedup").ms as f64 / 1000.0;
    let exact_ms = exact.stage("dedup").ms as f64 / 1000.0;
    row(
        "Dedup stage, lowercase + collapse_whitespace (`duration_ms`)",
        norm_ms,
        Some(TARGET_DEDUP_S),
        dk("dedup_normalized_s"),
    );
    row(
        "Dedup stage, raw prompt (`duration_ms`)",
        exact_ms,
        Some(TARGET_DEDUP_S),
        dk("dedup_exact_s"),
    );
    row(
        "`ifloom sql` GROUP BY category (whole process)",
        group_by_s,
        Some(TARGET_GROUP_BY_S),
        dk("groupby_s"),
    );
    row(
        "`ifloom sql \"SELECT 1\"` (process + session start-up)",
        select1_s,
        None,
        None,
    );
    row(
        "Pipeline `full` end to end (input → sql → transform → dedup)",
        full.best_wall,
        None,
        None,
    );
    row(
        "Pipeline `dedup_norm` end to end (input → dedup)",
        norm.best_wall,
        None,
        None,
    );
    row(
        "Pipeline `dedup_exact` end to end (input → dedup)",
        exact.best_wall,
        None,
        None,
    );

    let _ = writeln!(
        md,
        "\n| Pipeline | Table | Kind | Rows out | Counters | Best `duration_ms` |\n|---|---|---|---:|---|---:|"
    );
    for r in &results {
        for s in &r.stages {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.name, s.id, s.kind, s.rows, s.counters, s.ms
            );
        }
    }
    let _ = writeln!(
        md,
        "\nifloom's stderr (fastest repetition of each pipeline):\n\n```text"
    );
    for r in &results {
        let _ = write!(md, "$ ifloom run {}.yaml\n{}", r.name, r.stderr);
    }
    let _ = writeln!(md, "```");

    // Cross-checks against DuckDB: same kept counts and group sizes.
    if let Some(d) = &duck {
        let mut checks = Vec::new();
        for (label, key, ours) in [
            (
                "normalized dedup kept",
                "dedup_normalized_kept",
                norm.stage("dedup").rows,
            ),
            (
                "raw dedup kept",
                "dedup_exact_kept",
                exact.stage("dedup").rows,
            ),
        ] {
            let theirs = dk_u(key).unwrap_or(0);
            checks.push(format!(
                "{label}: ifloom {ours}, DuckDB {theirs}{}",
                if ours == theirs { "" } else { " **MISMATCH**" }
            ));
        }
        let ours = csv_counts(&group_by_csv);
        let theirs: BTreeMap<String, u64> = d["groupby_rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r[0].as_str()?.to_string(), r[1].as_u64()?)))
            .collect();
        checks.push(format!(
            "GROUP BY counts: {}",
            if ours == theirs && !ours.is_empty() {
                "identical"
            } else {
                "**MISMATCH**"
            }
        ));
        let _ = writeln!(
            md,
            "\nDuckDB {} ({} threads), in process, fresh connection per repetition. Checks: {}.",
            d["duckdb"].as_str().unwrap_or("?"),
            d["threads"],
            checks.join("; ")
        );
    }
    let _ = writeln!(
        md,
        "\nGROUP BY result (ifloom):\n\n```text\n{}```",
        group_by_csv
    );
    print!("{md}");

    if keep {
        let kept = tmp_dir.keep();
        eprintln!("ifloom bench: kept {}", kept.display());
    }
}
