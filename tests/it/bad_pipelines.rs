//! The bad-pipeline corpus: every file in `tests/bad_pipelines/` is a broken pipeline whose
//! header says, one `# expect: LINE:COL substring` line per mistake, which errors `ifloom
//! validate` must report and where. The headers are written by hand from reading each file,
//! never generated from ifloom's output, so a wrong position or a missed error shows up here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::common::{self, ifloom, stderr};

const CORPUS: &str = "tests/bad_pipelines";

/// The corpus files, sorted, as paths relative to the project root.
fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(common::root().join(CORPUS))
        .expect("read tests/bad_pipelines")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| Path::new(CORPUS).join(p.file_name().unwrap()))
        .collect();
    files.sort();
    files
}

/// One `# expect:` header line.
#[derive(Debug)]
struct Expect {
    line: usize,
    col: usize,
    text: String,
}

/// Parse the leading comment block's `# expect: LINE:COL substring` lines.
fn expectations(text: &str) -> Result<Vec<Expect>, String> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if !l.starts_with('#') {
            break;
        }
        let Some(rest) = l.strip_prefix("# expect:") else {
            continue;
        };
        let rest = rest.trim_start();
        let (pos, sub) = rest
            .split_once(' ')
            .ok_or_else(|| format!("header line {}: expected `LINE:COL substring`", i + 1))?;
        let (line, col) = pos
            .split_once(':')
            .and_then(|(l, c)| Some((l.parse().ok()?, c.parse().ok()?)))
            .ok_or_else(|| format!("header line {}: bad position `{pos}`", i + 1))?;
        let text = sub.trim().to_string();
        if text.is_empty() {
            return Err(format!("header line {}: empty substring", i + 1));
        }
        out.push(Expect { line, col, text });
    }
    Ok(out)
}

/// The reported diagnostics: each `error:` line joined with its `  hint:` line, if any.
fn diagnostics(stderr: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in stderr.lines() {
        if l.starts_with("error:") {
            out.push(l.to_string());
        } else if l.starts_with("  hint:")
            && let Some(last) = out.last_mut()
        {
            last.push('\n');
            last.push_str(l);
        }
    }
    out
}

#[test]
fn every_bad_pipeline_fails_with_its_expected_errors() {
    let root = common::root();
    let files = corpus();
    assert!(
        files.len() >= 28,
        "the corpus should hold at least 28 bad pipelines, found {}",
        files.len()
    );
    let mut report = String::new();
    let mut failed = 0;
    for file in &files {
        let name = file.to_str().unwrap();
        let mut problems: Vec<String> = Vec::new();
        let text = std::fs::read_to_string(root.join(file)).expect("read corpus file");
        let expects = match expectations(&text) {
            Ok(e) if e.is_empty() => {
                problems.push("no `# expect: LINE:COL substring` header".into());
                Vec::new()
            }
            Ok(e) => e,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        let out = ifloom(&root, &["validate", name]);
        let err = stderr(&out);
        if out.status.code() != Some(1) {
            problems.push(format!("exit code {:?}, expected 1", out.status.code()));
        }
        if err.contains("panicked") {
            problems.push("ifloom panicked".into());
        }
        let diags = diagnostics(&err);
        let mut matched = vec![false; diags.len()];
        for e in &expects {
            let at = format!("error: {name}:{}:{}: ", e.line, e.col);
            let hit = diags
                .iter()
                .position(|d| d.starts_with(&at) && d.contains(&e.text));
            match hit {
                Some(i) => matched[i] = true,
                None => {
                    let same_place = diags.iter().any(|d| d.starts_with(&at));
                    problems.push(format!(
                        "missing: {}:{} {:?}{}",
                        e.line,
                        e.col,
                        e.text,
                        if same_place {
                            " (an error is at that place, with other words)"
                        } else {
                            ""
                        }
                    ));
                }
            }
        }
        // One mistake, one error: anything reported beyond the expectations is a problem too.
        for (d, m) in diags.iter().zip(&matched) {
            if !m && !expects.is_empty() {
                problems.push(format!("unexpected: {}", d.lines().next().unwrap_or(d)));
            }
        }
        if !problems.is_empty() {
            failed += 1;
            let _ = writeln!(report, "\n== {name}");
            for p in &problems {
                let _ = writeln!(report, "  {p}");
            }
            let _ = writeln!(report, "  -- stderr:");
            for l in err.lines() {
                let _ = writeln!(report, "  | {l}");
            }
        }
    }
    assert!(
        failed == 0,
        "{failed} of {} bad pipelines did not fail as expected:{report}",
        files.len()
    );
}

/// Every file and folder under `dir` with its size and modification time.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            out.insert(p.clone(), (m.len(), m.modified().unwrap()));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn bad_pipeline_leaves_existing_run_untouched() {
    let root = common::root();
    let tmp = common::tempdir();
    let run = tmp.path().join("run");
    let run_s = run.to_str().unwrap();
    let first = ifloom(
        &root,
        &["run", "pipelines/sample_dedup.yaml", "--run-dir", run_s],
    );
    assert!(
        first.status.success(),
        "sample_dedup failed:\n{}",
        stderr(&first)
    );
    let before = listing(&run);
    assert!(!before.is_empty(), "the run wrote nothing");

    let bad = [
        "01_yaml_syntax.yaml",
        "05_unknown_from_near_name.yaml",
        "09_sql_syntax.yaml",
        "15_corrupt_parquet.yaml",
        "28_multi_compile_errors.yaml",
        // Its stage is deserialized with stand-ins for the bad values: nothing may run it.
        "49_multi_stage_value_types.yaml",
    ];
    for b in bad {
        let file = format!("{CORPUS}/{b}");
        let out = ifloom(&root, &["run", &file, "--run-dir", run_s]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "ifloom run {file}:\n{err}");
        assert!(
            !err.contains("panicked"),
            "ifloom run {file} panicked:\n{err}"
        );
        assert!(err.contains("nothing was run"), "ifloom run {file}:\n{err}");
        let after = listing(&run);
        if after != before {
            let mut diff = String::new();
            for (p, v) in &before {
                match after.get(p) {
                    None => {
                        let _ = writeln!(diff, "  removed: {}", p.display());
                    }
                    Some(w) if w != v => {
                        let _ = writeln!(diff, "  changed: {}", p.display());
                    }
                    _ => {}
                }
            }
            for p in after.keys().filter(|p| !before.contains_key(*p)) {
                let _ = writeln!(diff, "  added: {}", p.display());
            }
            panic!("ifloom run {file} changed the existing run directory:\n{diff}");
        }
    }
}
