//! The engine end to end: example pipelines on real data, incremental reruns, kill -9 and
//! resume, the run lock, SQL output formats and the introspection verbs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, ifloom, ok, s, sql_rows, stderr, tempdir};

/// Every file under `dir` with its inode.
fn inodes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.insert(p.clone(), std::fs::metadata(&p).unwrap().ino());
            }
        }
    }
    out
}

fn stage_inode(run: &Path, id: &str) -> u64 {
    std::fs::metadata(run.join("stages").join(id).join("part-00000.parquet"))
        .unwrap()
        .ino()
}

/// Distinct prompts of data/instructions.jsonl under a normalization, computed here
/// independently of ifloom's dedup code.
fn distinct_prompts(norm: &dyn Fn(&str) -> String) -> usize {
    let text = std::fs::read_to_string(common::root().join("data/instructions.jsonl")).unwrap();
    let set: HashSet<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            norm(v["prompt"].as_str().unwrap())
        })
        .collect();
    set.len()
}

#[test]
fn sample_dedup_pipeline_matches_independent_counts() {
    let root = common::root();
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &["run", "pipelines/sample_dedup.yaml", "--run-dir", s(&run)],
    );

    let exact = distinct_prompts(&|p| p.to_string());
    let punct = regex::Regex::new(r"\p{P}+").unwrap();
    let normalized = distinct_prompts(&|p| {
        let l = p.to_lowercase();
        let l = punct.replace_all(&l, "");
        l.split_whitespace().collect::<Vec<_>>().join(" ")
    });
    let count = |t: &str| -> usize {
        sql_rows(&root, &run, &format!("SELECT count(*) FROM {t}"))[0][0]
            .parse()
            .unwrap()
    };
    assert_eq!(count("instructions"), 200);
    assert_eq!(count("exact"), exact);
    assert_eq!(count("exact__removed"), 200 - exact);
    assert_eq!(count("normalized"), normalized);
    assert_eq!(count("final"), normalized);

    // The kept row of each duplicate group is the earliest in the input file.
    let order: HashMap<String, usize> = sql_rows(&root, &run, "SELECT _id FROM instructions")
        .into_iter()
        .enumerate()
        .map(|(i, r)| (r[0].clone(), i))
        .collect();
    for t in ["exact__removed", "normalized__removed"] {
        for r in sql_rows(&root, &run, &format!("SELECT _id, _duplicate_of FROM {t}")) {
            assert!(
                order[&r[1]] < order[&r[0]],
                "{t}: kept {} comes after removed {}",
                r[1],
                r[0]
            );
        }
    }

    // The output files exist, with renamed columns, and read back.
    let jsonl = std::fs::read_to_string(run.join("out/instructions_clean.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), normalized);
    let first: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert!(first.get("instruction").is_some() && first.get("prompt").is_none());
    assert!(run.join("out/instructions_clean.parquet").is_file());
    // The JSON array holds the same records as the lines.
    let array: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(run.join("out/instructions_clean.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(array.len(), normalized);
    assert_eq!(array[0], first);
}

#[test]
fn ifeval_pipeline_counts_match_the_raw_file() {
    let root = common::root();
    let raw = root.join("../shared/data/ifeval/input_data.jsonl");
    let text = std::fs::read_to_string(&raw).expect("shared IFEval data beside the project");
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    let mut prompts = 0;
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        prompts += 1;
        for t in v["instruction_id_list"].as_array().unwrap() {
            *expected.entry(t.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &[
            "run",
            "pipelines/ifeval_instruction_types.yaml",
            "--run-dir",
            s(&run),
        ],
    );
    let got: BTreeMap<String, u64> = sql_rows(
        &root,
        &run,
        "SELECT instruction_type, prompts FROM type_counts",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].parse().unwrap()))
    .collect();
    assert_eq!(got, expected);
    let total: u64 = sql_rows(&root, &run, "SELECT sum(prompts) FROM per_prompt")[0][0]
        .parse()
        .unwrap();
    assert_eq!(total, prompts);
}

/// A small pipeline in a temp folder: input → a → b, and input → c.
fn write_chain(dir: &Path, b_query: &str) -> PathBuf {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let data = dir.join("data/in.jsonl");
    if !data.exists() {
        let rows: String = (0..500)
            .map(|i| {
                format!(
                    "{{\"prompt\": \"prompt number {i} about {}\", \"n\": {i}}}\n",
                    i % 7
                )
            })
            .collect();
        std::fs::write(&data, rows).unwrap();
    }
    let p = dir.join("chain.yaml");
    std::fs::write(
        &p,
        format!(
            "name: chain\ninputs:\n  src: data/in.jsonl\nstages:\n  - id: a\n    kind: sql\n    from: src\n    query: SELECT _id, prompt, n FROM src WHERE n % 2 = 0\n  - id: b\n    kind: sql\n    from: a\n    query: {b_query}\n  - id: c\n    kind: transform\n    from: src\n    ops:\n      - filter: \"n < 100\"\n  - id: d\n    kind: dedup\n    from: b\n    columns: [prompt]\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn second_run_reuses_every_stage_and_keeps_files() {
    let tmp = tempdir();
    let p = write_chain(tmp.path(), "SELECT _id, prompt FROM a WHERE n > 10");
    let run = tmp.path().join("run");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    let before = inodes(&run);
    let o = ifloom(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    assert!(o.status.success());
    assert_eq!(inodes(&run), before, "a rerun rewrote files");
    assert!(
        stderr(&o).contains("(0 computed, 5 reused)"),
        "{}",
        stderr(&o)
    );

    // Rewriting the input with the same bytes (new mtime) changes nothing either.
    let data = tmp.path().join("data/in.jsonl");
    let bytes = std::fs::read(&data).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&data, &bytes).unwrap();
    let o = ifloom(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    assert!(
        stderr(&o).contains("(0 computed, 5 reused)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(inodes(&run), before);
}

#[test]
fn changed_stage_recomputes_only_itself_and_descendants() {
    let tmp = tempdir();
    let run = tmp.path().join("run");
    let p = write_chain(tmp.path(), "SELECT _id, prompt FROM a WHERE n > 10");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    let ino: HashMap<&str, u64> = ["src", "a", "b", "c", "d"]
        .iter()
        .map(|id| (*id, stage_inode(&run, id)))
        .collect();
    write_chain(tmp.path(), "SELECT _id, prompt FROM a WHERE n > 20");
    let o = ifloom(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for id in ["src", "a", "c"] {
        assert_eq!(stage_inode(&run, id), ino[id], "{id} was recomputed");
    }
    for id in ["b", "d"] {
        assert_ne!(stage_inode(&run, id), ino[id], "{id} was not recomputed");
    }
    let n: usize = sql_rows(tmp.path(), &run, "SELECT count(*) FROM d")[0][0]
        .parse()
        .unwrap();
    assert_eq!(n, (21..500).filter(|i| i % 2 == 0).count());

    // --force a: a, b and d again; src and c stay.
    let ino: HashMap<&str, u64> = ["src", "a", "b", "c", "d"]
        .iter()
        .map(|id| (*id, stage_inode(&run, id)))
        .collect();
    ok(
        tmp.path(),
        &["run", s(&p), "--run-dir", s(&run), "--force", "a"],
    );
    for id in ["src", "c"] {
        assert_eq!(
            stage_inode(&run, id),
            ino[id],
            "{id} was recomputed by --force a"
        );
    }
    for id in ["a", "b", "d"] {
        assert_ne!(
            stage_inode(&run, id),
            ino[id],
            "{id} was not recomputed by --force a"
        );
    }
    let o = ifloom(
        tmp.path(),
        &["run", s(&p), "--run-dir", s(&run), "--force", "aa"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("did you mean 'a'"), "{}", stderr(&o));
}

#[test]
fn a_locked_run_directory_fails_fast() {
    let tmp = tempdir();
    let p = write_chain(tmp.path(), "SELECT _id, prompt FROM a");
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let f = std::fs::File::create(run.join(".lock")).unwrap();
    f.try_lock().unwrap();
    let o = ifloom(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("in use by another ifloom process"),
        "{}",
        stderr(&o)
    );
    assert!(!run.join("stages/src").exists());
}

fn sorted_rows(cwd: &Path, run: &Path, q: &str) -> Vec<Vec<String>> {
    let mut r = sql_rows(cwd, run, q);
    r.sort();
    r
}

#[test]
fn killed_run_resumes_to_the_same_result() {
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    // Big enough that stages take a moment in a debug build.
    let rows: String = (0..200_000)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Write {} words about topic {}\", \"cat\": \"c{}\"}}\n",
                i % 300,
                i % 5000,
                i % 9
            )
        })
        .collect();
    std::fs::write(tmp.path().join("data/in.jsonl"), rows).unwrap();
    let p = tmp.path().join("big.yaml");
    std::fs::write(
        &p,
        "name: big\ninputs:\n  src: data/in.jsonl\nstages:\n  - id: a\n    kind: sql\n    from: src\n    query: SELECT _id, prompt, cat, length(prompt) AS n FROM src\n  - id: b\n    kind: transform\n    from: a\n    ops:\n      - filter: \"n > 10\"\n  - id: d\n    kind: dedup\n    from: b\n    columns: [prompt]\n    lowercase: true\n  - id: e\n    kind: sql\n    from: d\n    query: SELECT cat, count(*) AS n FROM d GROUP BY cat\n",
    )
    .unwrap();
    let clean = tmp.path().join("clean");
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&clean)]);

    // Kill at several moments; after each kill the run directory must hold only complete
    // tables, and a rerun must finish.
    let run = tmp.path().join("run");
    let mut killed_mid_stage = 0;
    for delay_ms in [0u64, 40, 150] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ifloom"))
            .args(["run", s(&p), "--run-dir", s(&run)])
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        // Wait until a stage is mid-write (its temporary folder exists), then a little more.
        while start.elapsed() < Duration::from_secs(30) {
            let busy = std::fs::read_dir(run.join("stages"))
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                })
                .unwrap_or(false);
            if busy {
                killed_mid_stage += 1;
                std::thread::sleep(Duration::from_millis(delay_ms));
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for e in std::fs::read_dir(run.join("stages")).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                assert!(
                    e.path().join("manifest.json").is_file(),
                    "{name} looks complete but has no manifest"
                );
            }
        }
    }
    assert!(
        killed_mid_stage >= 1,
        "no kill landed while a stage was being written"
    );
    ok(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    for q in [
        "SELECT cat, n FROM e",
        "SELECT _id, prompt FROM d",
        "SELECT _id FROM src",
    ] {
        assert_eq!(
            sorted_rows(tmp.path(), &run, q),
            sorted_rows(tmp.path(), &clean, q),
            "{q}"
        );
    }
    // No leftovers of the killed runs.
    assert!(
        std::fs::read_dir(run.join("stages"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
    );
}

#[test]
fn sql_writes_every_format_and_runs_canned_queries() {
    let root = common::root();
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &["run", "pipelines/sample_dedup.yaml", "--run-dir", s(&run)],
    );
    let q = "SELECT category, count(*) AS n FROM final GROUP BY category ORDER BY category";
    let csv = ok(&root, &["sql", "--run", s(&run), "--format", "csv", q]);
    assert!(csv.starts_with("category,n\n"));
    let json = ok(&root, &["sql", "--run", s(&run), "--format", "json", q]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let total: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["n"].as_u64().unwrap())
        .sum();
    assert_eq!(
        total as usize,
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse::<usize>().unwrap())
            .sum::<usize>()
    );
    let out = tmp.path().join("x.parquet");
    ok(
        &root,
        &[
            "sql",
            "--run",
            s(&run),
            "--format",
            "parquet",
            "--out",
            s(&out),
            q,
        ],
    );
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
    let jsonl = ok(&root, &["sql", "--run", s(&run), "--format", "jsonl", q]);
    assert_eq!(jsonl.lines().count(), csv.lines().count() - 1);
    // Table output cuts long text.
    let t = ok(
        &root,
        &[
            "sql",
            "--run",
            s(&run),
            "--max-width",
            "20",
            "SELECT instruction FROM final ORDER BY length(instruction) DESC LIMIT 1",
        ],
    );
    assert!(t.contains('…'), "{t}");
    // A bad query is a clear error, exit 1.
    let o = ifloom(&root, &["sql", "--run", s(&run), "SELECT nope FROM final"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    // A canned query without its parameter says which one is missing.
    let o = ifloom(
        &root,
        &[
            "sql",
            "--run",
            s(&run),
            "-f",
            "sql/text_length.sql",
            "--param",
            "table=final",
        ],
    );
    assert!(stderr(&o).contains("--param column="), "{}", stderr(&o));
}

#[test]
fn environment_values_never_reach_the_run_directory() {
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    std::fs::write(
        tmp.path().join("data/in.jsonl"),
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n",
    )
    .unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: envtest\nparams:\n  token: ${IFLOOM_TEST_TOKEN}\ninputs:\n  src: data/in.jsonl\nstages:\n  - id: a\n    kind: sql\n    from: src\n    query: SELECT _id, prompt FROM src WHERE prompt <> '${IFLOOM_TEST_TOKEN}' AND prompt <> '${params.token}'\n",
    )
    .unwrap();
    let run = tmp.path().join("run");
    let secret = "sk-test-7f3a9c-do-not-write";
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["run", s(&p), "--run-dir", s(&run)])
        .env("IFLOOM_TEST_TOKEN", secret)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut stack = vec![run.clone()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                let bytes = std::fs::read(e.path()).unwrap();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "secret in {}",
                    e.path().display()
                );
            }
        }
    }
    assert!(files >= 4);
    // Without the variable, validation says what to do.
    let o = Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(["validate", s(&p)])
        .env_remove("IFLOOM_TEST_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("environment variable `IFLOOM_TEST_TOKEN` is not set"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn introspection_verbs() {
    let root = common::root();
    let g = ok(&root, &["graph", "pipelines/sample_dedup.yaml"]);
    assert!(g.contains("exact (dedup) <- shaped"), "{g}");
    let dot = ok(&root, &["graph", "--dot", "pipelines/sample_dedup.yaml"]);
    assert!(
        dot.starts_with("digraph") && dot.contains("\"shaped\" -> \"exact\";"),
        "{dot}"
    );
    let schema: serde_json::Value = serde_json::from_str(&ok(&root, &["schema"])).unwrap();
    let kinds: Vec<&str> = schema["properties"]["stages"]["items"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["properties"]["kind"]["const"].as_str())
        .collect();
    for kind in [
        "sql",
        "transform",
        "dedup",
        "minhash",
        "decontaminate",
        "output",
        "export",
        "verdict",
        "llm",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let tmp = tempdir();
    ok(
        tmp.path(),
        &["run", s(&root.join("pipelines/sample_dedup.yaml"))],
    );
    let runs = ok(tmp.path(), &["runs"]);
    assert!(
        runs.contains("runs/sample_dedup [finished]") && runs.contains("normalized"),
        "{runs}"
    );
    // --set overrides a param; an unknown one is an error.
    let tmp2 = tempdir();
    let run = tmp2.path().join("r");
    ok(
        &root,
        &[
            "run",
            "pipelines/sample_dedup.yaml",
            "--run-dir",
            s(&run),
            "--set",
            "min_chars=100",
        ],
    );
    let n: usize = sql_rows(
        &root,
        &run,
        "SELECT count(*) FROM bounded WHERE n_chars < 100",
    )[0][0]
        .parse()
        .unwrap();
    assert_eq!(n, 0);
    let o = ifloom(
        &root,
        &[
            "validate",
            "pipelines/sample_dedup.yaml",
            "--set",
            "min_char=3",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("did you mean 'min_chars'"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn conversation_turns_pipeline_flattens_multi_turn_data() {
    let root = common::root();
    let text = std::fs::read_to_string(root.join("data/conversations.jsonl")).unwrap();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let humans = v["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["from"] == "human")
            .count();
        expected.insert(v["id"].as_str().unwrap().to_string(), humans as u64);
    }
    let strings = std::fs::read_to_string(root.join("data/strings.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &[
            "run",
            "pipelines/conversation_turns.yaml",
            "--run-dir",
            s(&run),
        ],
    );
    let got: BTreeMap<String, u64> = sql_rows(
        &root,
        &run,
        "SELECT id, human_turns FROM turns_per_conversation",
    )
    .into_iter()
    .map(|r| (r[0].clone(), r[1].parse().unwrap()))
    .collect();
    assert_eq!(got, expected);
    let out = std::fs::read_to_string(run.join("out/first_prompts.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), expected.len() + strings);
    // Every line carries both keys; bare-string prompts have no turn count.
    assert!(
        lines
            .iter()
            .all(|v| v.get("prompt").is_some() && v.get("human_turns").is_some())
    );
    assert_eq!(
        lines.iter().filter(|v| v["human_turns"].is_null()).count(),
        strings
    );
    // Sorted by prompt text.
    let prompts: Vec<&str> = lines
        .iter()
        .map(|v| v["prompt"].as_str().unwrap())
        .collect();
    let mut sorted = prompts.clone();
    sorted.sort();
    assert_eq!(prompts, sorted);
}

/// A full disk fails the stage with a clear error and leaves earlier stages intact. Needs a
/// small tmpfs, so it runs where the tests run as root (CI does); elsewhere it says so.
#[test]
fn full_disk_fails_the_stage_and_keeps_earlier_ones() {
    let tmp = tempdir();
    let mnt = tmp.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400k", "tmpfs", s(&mnt)])
        .status()
        .is_ok_and(|st| st.success());
    if !mounted {
        eprintln!("skipping full_disk test: cannot mount a tmpfs here (not root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    std::fs::create_dir_all(tmp.path().join("data")).unwrap();
    // The input table fits; 80k rows of SHA-256 hex (incompressible) do not.
    let rows: String = (0..2000u64)
        .map(|i| {
            format!(
                "{{\"t\": \"{:016x}{:016x}\"}}\n",
                i.wrapping_mul(0x9e3779b97f4a7c15),
                i.wrapping_mul(0xc2b2ae3d27d4eb4f)
            )
        })
        .collect();
    std::fs::write(tmp.path().join("data/in.jsonl"), rows).unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        "name: disk\ninputs:\n  src: data/in.jsonl\nstages:\n  - id: big\n    kind: sql\n    from: src\n    query: SELECT s._id, s.t, encode(sha256(concat(s.t, CAST(k.v AS VARCHAR))), 'hex') AS u, k.v FROM src s CROSS JOIN (SELECT unnest(generate_series(1, 40)) AS v) k\n",
    )
    .unwrap();
    let run = mnt.join("run");
    let o = ifloom(tmp.path(), &["run", s(&p), "--run-dir", s(&run)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("stage 'big' failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        run.join("stages/src/manifest.json").is_file(),
        "the finished input was lost"
    );
    assert!(
        !run.join("stages/big").exists(),
        "a failed stage looks complete"
    );
    let leftovers: Vec<_> = std::fs::read_dir(run.join("stages"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary folders left behind: {leftovers:?}"
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "failed");
}
