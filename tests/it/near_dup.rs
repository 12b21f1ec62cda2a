//! Near-duplicate removal (`minhash`) and benchmark decontamination (`decontaminate`),
//! through the real binary. MinHash is measured against exact Jaccard similarity computed
//! here, decontamination against the real IFEval prompts, and the example pipeline against
//! counts checked independently (data/README.md and a Python script computing exact Jaccard).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use crate::common::{self, ifloom, ok, s, sql_rows, stderr, tempdir};

/// The counters a stage stored in its manifest.
fn counters(run: &Path, stage: &str) -> BTreeMap<String, i64> {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stages").join(stage).join("manifest.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(m["counters"].clone()).unwrap()
}

fn count(run: &Path, table: &str) -> usize {
    sql_rows(
        &common::root(),
        run,
        &format!("SELECT count(*) FROM {table}"),
    )[0][0]
        .parse()
        .unwrap()
}

/// splitmix64: a small deterministic generator, so the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Exact Jaccard similarity of two sets.
fn jaccard<T: std::hash::Hash + Eq>(a: &HashSet<T>, b: &HashSet<T>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 0.0;
    }
    a.intersection(b).count() as f64 / union as f64
}

/// Word 3-shingles of text that is already lowercase words separated by single spaces.
fn word_shingles(text: &str) -> HashSet<String> {
    let w: Vec<&str> = text.split(' ').collect();
    w.windows(3).map(|g| g.join(" ")).collect()
}

/// Character 5-shingles after lowercasing and collapsing whitespace (what the example
/// pipeline configures), written here independently of ifloom.
fn char_shingles(text: &str) -> HashSet<String> {
    let norm = text
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let c: Vec<char> = norm.chars().collect();
    if c.len() <= 5 {
        return [norm].into_iter().collect();
    }
    c.windows(5).map(|g| g.iter().collect()).collect()
}

/// A synthetic corpus: 3,000 instructions of 15–40 words drawn from an 800-word
/// vocabulary, plus 300 near-duplicates (copies of distinct rows with 1–3 word edits),
/// shuffled. Returns the texts (row n = line n) and the planted pairs.
fn synthetic_corpus() -> (Vec<String>, Vec<(usize, usize)>) {
    let mut rng = Rng(20_240_601);
    let consonants = b"bcdfghjklmnprstvwz";
    let vowels = b"aeiou";
    let mut vocab: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    while vocab.len() < 800 {
        let syllables = 2 + rng.below(2);
        let w: String = (0..syllables)
            .flat_map(|_| {
                [
                    consonants[rng.below(consonants.len())] as char,
                    vowels[rng.below(vowels.len())] as char,
                ]
            })
            .collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    let word = |rng: &mut Rng| vocab[rng.below(vocab.len())].clone();
    let mut rows: Vec<(Vec<String>, Option<usize>)> = (0..3000)
        .map(|_| {
            let len = 15 + rng.below(26);
            ((0..len).map(|_| word(&mut rng)).collect(), None)
        })
        .collect();
    let mut bases: Vec<usize> = (0..3000).collect();
    rng.shuffle(&mut bases);
    for &b in &bases[..300] {
        let mut words = rows[b].0.clone();
        let edits = match rng.below(20) {
            0..10 => 1,
            10..17 => 2,
            _ => 3,
        };
        for _ in 0..edits {
            let at = rng.below(words.len());
            match rng.below(10) {
                0..7 => loop {
                    let w = word(&mut rng);
                    if w != words[at] {
                        words[at] = w;
                        break;
                    }
                },
                7..9 => words.insert(at, word(&mut rng)),
                _ => {
                    words.remove(at);
                }
            }
        }
        rows.push((words, Some(b)));
    }
    // Shuffle, remembering where every original row went.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    rng.shuffle(&mut order);
    let mut position = vec![0; rows.len()];
    for (pos, &orig) in order.iter().enumerate() {
        position[orig] = pos;
    }
    let texts: Vec<String> = order.iter().map(|&o| rows[o].0.join(" ")).collect();
    let planted: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, (_, base))| base.map(|b| (position[b], position[i])))
        .collect();
    (texts, planted)
}

/// Unordered pair.
fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// Recall and precision of one minhash stage of the synthetic run, against exact Jaccard.
struct Quality {
    truth: usize,
    reported: usize,
    recall: f64,
    precision: f64,
    mean_error: f64,
}

fn measure(
    run: &Path,
    stage: &str,
    threshold: f64,
    exact: &dyn Fn(usize, usize) -> f64,
    truth: &HashSet<(usize, usize)>,
) -> (Quality, Vec<(usize, usize, f64)>) {
    let reported: Vec<(usize, usize, f64)> = sql_rows(
        &common::root(),
        run,
        &format!(
            "SELECT r.n, k.n, r._similarity FROM {stage}__removed r \
             JOIN corpus k ON k._id = r._duplicate_of"
        ),
    )
    .into_iter()
    .map(|r| {
        (
            r[0].parse().unwrap(),
            r[1].parse().unwrap(),
            r[2].parse().unwrap(),
        )
    })
    .collect();
    let found: HashSet<(usize, usize)> = reported.iter().map(|&(a, b, _)| pair(a, b)).collect();
    let correct = reported
        .iter()
        .filter(|&&(a, b, _)| exact(a, b) >= threshold)
        .count();
    let q = Quality {
        truth: truth.len(),
        reported: reported.len(),
        recall: found.intersection(truth).count() as f64 / truth.len() as f64,
        precision: correct as f64 / reported.len() as f64,
        mean_error: reported
            .iter()
            .map(|&(a, b, est)| (est - exact(a, b)).abs())
            .sum::<f64>()
            / reported.len() as f64,
    };
    eprintln!(
        "{stage} at threshold {threshold}: {} pairs with exact Jaccard >= {threshold}, {} \
         reported; recall {:.3}, precision {:.3}, mean |_similarity - exact| {:.3}",
        q.truth, q.reported, q.recall, q.precision, q.mean_error
    );
    (q, reported)
}

/// MinHash against exact word 3-shingle Jaccard on planted near duplicates. The planted
/// pairs crowd around the threshold (one substituted word in a 20-word text is Jaccard
/// 0.71). Candidates are verified on the shingle sets, so every reported pair is a true one
/// and only LSH banding can miss a pair: measured here, recall 0.989 at 128 permutations and
/// 0.994 at 256, precision 1.0 (when candidates were verified on the signature estimate,
/// whose noise is 0.04 at 128, recall was about 0.92 and precision about 0.9).
#[test]
fn minhash_recall_and_precision_against_exact_jaccard() {
    const THRESHOLD: f64 = 0.7;
    let (texts, planted) = synthetic_corpus();
    let tmp = tempdir();
    let jsonl: String = texts
        .iter()
        .enumerate()
        .map(|(n, t)| format!("{}\n", serde_json::json!({"n": n, "text": t})))
        .collect();
    std::fs::write(tmp.path().join("corpus.jsonl"), jsonl).unwrap();
    let p = tmp.path().join("near.yaml");
    std::fs::write(
        &p,
        format!(
            "name: near\ninputs:\n  corpus: corpus.jsonl\nstages:\n  - id: near\n    kind: minhash\n    from: corpus\n    column: text\n    threshold: {THRESHOLD}\n  - id: near256\n    kind: minhash\n    from: corpus\n    column: text\n    threshold: {THRESHOLD}\n    num_perm: 256\n"
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);

    let shingles: Vec<HashSet<String>> = texts.iter().map(|t| word_shingles(t)).collect();
    let exact = |a: usize, b: usize| jaccard(&shingles[a], &shingles[b]);
    let planted_j: Vec<f64> = planted.iter().map(|&(a, b)| exact(a, b)).collect();
    let truth: HashSet<(usize, usize)> = planted
        .iter()
        .zip(&planted_j)
        .filter(|(_, j)| **j >= THRESHOLD)
        .map(|(&(a, b), _)| pair(a, b))
        .collect();
    let in_band = planted_j
        .iter()
        .filter(|j| (0.5..=0.9).contains(*j))
        .count();
    assert!(
        in_band * 10 >= planted.len() * 8,
        "the planted pairs should mostly have Jaccard in 0.5-0.9 ({in_band} of {})",
        planted.len()
    );
    assert!(truth.len() >= 100, "too few true pairs: {}", truth.len());

    let (q256, _) = measure(&run, "near256", THRESHOLD, &exact, &truth);
    assert!(q256.recall >= 0.97, "recall {:.3}", q256.recall);
    assert!(q256.precision >= 0.99, "precision {:.3}", q256.precision);
    let (q, reported) = measure(&run, "near", THRESHOLD, &exact, &truth);
    assert!(q.recall >= 0.95, "recall {:.3}", q.recall);
    assert!(q.precision >= 0.99, "precision {:.3}", q.precision);
    // `_similarity` is the exact Jaccard (of 32-bit shingle hashes: collisions are rare).
    assert!(
        q.mean_error < 0.001,
        "mean |_similarity - exact| {:.4}",
        q.mean_error
    );

    // The kept row of each pair is the one earlier in the input (row n is line n).
    for &(removed, kept, _) in &reported {
        assert!(kept < removed, "kept {kept} comes after removed {removed}");
    }
    let c = counters(&run, "near");
    assert_eq!(c["removed"], reported.len() as i64);
    assert_eq!(c["kept"], (texts.len() - reported.len()) as i64);
    assert_eq!(count(&run, "near"), texts.len() - reported.len());
    let kept_rows: BTreeSet<usize> = reported.iter().map(|r| r.1).collect();
    assert_eq!(c["clusters"], kept_rows.len() as i64);
    // `_cluster` is one id per kept row.
    let distinct = sql_rows(
        &common::root(),
        &run,
        "SELECT count(DISTINCT _cluster), count(*) FROM near",
    );
    assert_eq!(distinct[0][0], distinct[0][1]);

    // Deterministic: a fresh run directory gives the same tables.
    let run2 = tmp.path().join("run2");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run2)]);
    for q in [
        "SELECT _id, _duplicate_of, _similarity FROM near__removed ORDER BY _id",
        "SELECT _id, _cluster FROM near ORDER BY _id",
    ] {
        assert_eq!(
            sql_rows(&common::root(), &run, q),
            sql_rows(&common::root(), &run2, q)
        );
    }
}

/// Lowercase runs of letters and digits, as the decontaminate stage defines words.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

fn ifeval_path() -> std::path::PathBuf {
    common::root().join("../shared/data/ifeval/input_data.jsonl")
}

fn ifeval_prompts() -> Vec<String> {
    std::fs::read_to_string(ifeval_path())
        .expect("shared IFEval data beside the project")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn decontaminate_removes_exactly_the_rows_quoting_ifeval() {
    let ifeval = ifeval_prompts();
    // Five IFEval prompts (spread over the file) with a 16-token span copied from each.
    let mut spans: Vec<String> = Vec::new();
    for p in ifeval.iter().step_by(97) {
        let tokens: Vec<&str> = p.split_whitespace().collect();
        if tokens.len() < 20 {
            continue;
        }
        let span = tokens[2..18].join(" ");
        if words(&span).len() >= 14 {
            spans.push(span);
        }
        if spans.len() == 5 {
            break;
        }
    }
    assert_eq!(spans.len(), 5);
    // Fifteen unrelated rows: the longest hand-written sample prompts, plus one that copies
    // only 12 consecutive IFEval words (one short of an n-gram).
    let sample: Vec<String> =
        std::fs::read_to_string(common::root().join("data/instructions.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["prompt"].as_str().unwrap().to_string()
            })
            .collect();
    let mut longest = sample.clone();
    longest.sort_by_key(|p| std::cmp::Reverse(words(p).len()));
    let twelve = words(&ifeval[3])[..12].join(" ");
    let mut unrelated: Vec<String> = longest[..14].to_vec();
    unrelated.push(format!(
        "Zebra xylophone quokka: {twelve}; quokka xylophone zebra."
    ));

    // Interleave: contaminated rows at 1, 5, 9, 13, 17.
    let mut rows: Vec<String> = Vec::new();
    let mut contaminated: BTreeSet<usize> = BTreeSet::new();
    let (mut c, mut u) = (spans.iter(), unrelated.iter());
    for i in 0..20 {
        if i % 4 == 1 {
            contaminated.insert(i);
            rows.push(format!(
                "Hey there, quick one for you. {} Thanks a lot!",
                c.next().unwrap()
            ));
        } else {
            rows.push(u.next().unwrap().clone());
        }
    }
    let tmp = tempdir();
    let jsonl: String = rows
        .iter()
        .enumerate()
        .map(|(n, t)| format!("{}\n", serde_json::json!({"n": n, "instruction": t})))
        .collect();
    std::fs::write(tmp.path().join("rows.jsonl"), jsonl).unwrap();
    let p = tmp.path().join("decon.yaml");
    std::fs::write(
        &p,
        format!(
            "name: decon\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: clean\n    kind: decontaminate\n    from: rows\n    column: instruction\n    references:\n      - path: {}\n        column: prompt\n        name: ifeval\n",
            s(&ifeval_path())
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);

    let removed: Vec<Vec<String>> = sql_rows(
        &common::root(),
        &run,
        "SELECT n, _reference, _matched_ngram FROM clean__removed ORDER BY n",
    );
    let removed_n: BTreeSet<usize> = removed.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(removed_n, contaminated);
    for r in &removed {
        assert_eq!(r[1], "ifeval");
        let n: usize = r[0].parse().unwrap();
        let gram = &r[2];
        assert_eq!(gram.split(' ').count(), 13, "{gram}");
        assert!(
            words(&rows[n]).join(" ").contains(gram.as_str()),
            "{gram} not in row {n}"
        );
        assert!(
            ifeval
                .iter()
                .any(|p| words(p).join(" ").contains(gram.as_str())),
            "{gram} not in IFEval"
        );
    }
    let c = counters(&run, "clean");
    assert_eq!(c["removed"], 5);
    assert_eq!(c["hits_ifeval"], 5);
    assert_eq!(count(&run, "clean"), 15);
}

#[test]
fn decontaminate_counts_each_reference_set_and_redoes_when_one_changes() {
    let tmp = tempdir();
    let d = tmp.path();
    std::fs::write(
        d.join("rows.jsonl"),
        [
            "only alpha beta gamma delta here",
            "both alpha beta gamma delta and one two three four",
            "just one two three four",
            "nothing to see",
            "alpha beta gamma but not the fourth",
        ]
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({"t": t})))
        .collect::<String>(),
    )
    .unwrap();
    std::fs::write(d.join("a.jsonl"), "\"Alpha, beta; GAMMA delta!\"\n").unwrap();
    std::fs::write(d.join("b.csv"), "id,q\n1,\"One two three four five\"\n").unwrap();
    let p = d.join("p.yaml");
    std::fs::write(
        &p,
        "name: multi\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: clean\n    kind: decontaminate\n    from: rows\n    column: t\n    ngram: 4\n    references:\n      - {path: a.jsonl, column: text, name: a}\n      - {path: b.csv, column: q}\n",
    )
    .unwrap();
    let run = d.join("run");
    ok(d, &["run", s(&p), "--run-dir", s(&run)]);
    let c = counters(&run, "clean");
    assert_eq!(c["removed"], 3);
    assert_eq!(c["hits_a"], 2);
    assert_eq!(c["hits_b"], 2);
    let refs = sql_rows(
        &common::root(),
        &run,
        "SELECT t, _reference FROM clean__removed ORDER BY t",
    );
    assert_eq!(
        refs,
        [
            ["both alpha beta gamma delta and one two three four", "a"],
            ["just one two three four", "b"],
            ["only alpha beta gamma delta here", "a"],
        ]
    );

    // Unchanged: reused. A reference edited: the stage is redone with the new content.
    let o = ifloom(d, &["run", s(&p), "--run-dir", s(&run)]);
    assert!(
        stderr(&o).contains("(0 computed, 2 reused)"),
        "{}",
        stderr(&o)
    );
    std::fs::write(d.join("a.jsonl"), "\"nothing to see at all\"\n").unwrap();
    let o = ifloom(d, &["run", s(&p), "--run-dir", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(1 computed, 1 reused)"),
        "{}",
        stderr(&o)
    );
    let c = counters(&run, "clean");
    assert_eq!((c["removed"], c["hits_a"], c["hits_b"]), (2, 0, 2));

    // A missing reference file is a validation error at its `path`, with line:column.
    let bad = d.join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\ninputs:\n  rows: rows.jsonl\nstages:\n  - id: clean\n    kind: decontaminate\n    from: rows\n    column: t\n    references:\n      - path: a.jsonl\n        column: text\n      - path: nope.jsonl\n        column: text\n  - id: near\n    kind: minhash\n    from: rows\n    column: t\n    bands: 10\n    rows: 10\n",
    )
    .unwrap();
    let o = ifloom(d, &["validate", s(&bad)]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("bad.yaml:12:15: stage 'clean': reference file not found"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:18:12: stage 'near': bands × rows must equal num_perm"),
        "{err}"
    );
}

/// 1-based line numbers of data/instructions.jsonl: (near duplicate, the earlier row it
/// duplicates), the case/whitespace and punctuation near duplicates of data/README.md.
/// They are exactly the pairs of rows left after exact dedup whose character 5-shingle
/// Jaccard is at least 0.6 (checked with a Python script: these ten are 0.738–1.0, every
/// other pair at most 0.367); the test recomputes that below.
const NEAR_DUPLICATES: [(usize, usize); 10] = [
    (31, 9),
    (61, 49),
    (75, 44),
    (80, 28),
    (155, 60),
    (196, 187),
    (102, 59),
    (127, 78),
    (136, 43),
    (186, 133),
];

#[test]
fn near_dup_sample_pipeline_matches_independent_counts() {
    let root = common::root();
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &[
            "run",
            "pipelines/near_dup_sample.yaml",
            "--run-dir",
            s(&run),
        ],
    );
    // From data/README.md: 8 exact duplicates; 10 near duplicates; and the hand-written
    // sample shares no 13-word n-gram with IFEval (checked with a Python script).
    assert_eq!(count(&run, "instructions"), 200);
    assert_eq!(count(&run, "exact"), 192);
    assert_eq!(count(&run, "near"), 182);
    assert_eq!(count(&run, "near__removed"), 10);
    assert_eq!(count(&run, "clean"), 182);
    assert_eq!(count(&run, "clean__removed"), 0);
    let c = counters(&run, "near");
    assert_eq!((c["removed"], c["kept"], c["clusters"]), (10, 182, 10));
    let c = counters(&run, "clean");
    assert_eq!((c["removed"], c["hits_ifeval"]), (0, 0));

    let ids: Vec<String> = sql_rows(&root, &run, "SELECT _id FROM instructions")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let line: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i + 1))
        .collect();
    let got: BTreeSet<(usize, usize)> =
        sql_rows(&root, &run, "SELECT _id, _duplicate_of FROM near__removed")
            .into_iter()
            .map(|r| (line[r[0].as_str()], line[r[1].as_str()]))
            .collect();
    let expected: BTreeSet<(usize, usize)> = NEAR_DUPLICATES.into_iter().collect();
    assert_eq!(got, expected);

    // Recomputed here: among the rows left after exact dedup, exactly those pairs have a
    // character 5-shingle Jaccard of at least 0.6 (the pipeline's threshold).
    let prompts: Vec<String> = std::fs::read_to_string(root.join("data/instructions.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt"].as_str().unwrap().to_string()
        })
        .collect();
    let mut first: HashSet<&str> = HashSet::new();
    let distinct: Vec<usize> = (0..prompts.len())
        .filter(|&i| first.insert(prompts[i].as_str()))
        .collect();
    let sh: Vec<HashSet<String>> = prompts.iter().map(|p| char_shingles(p)).collect();
    let mut similar = BTreeSet::new();
    for (k, &a) in distinct.iter().enumerate() {
        for &b in &distinct[k + 1..] {
            if jaccard(&sh[a], &sh[b]) >= 0.6 {
                similar.insert((b + 1, a + 1));
            }
        }
    }
    assert_eq!(similar, expected);
}
