//! sqllogictest files (`tests/slt/*.slt`) run through the real `ifloom sql` binary against a
//! run of the sample pipeline.

use std::path::{Path, PathBuf};

use sqllogictest::{DBOutput, DefaultColumnType};

use crate::common::{self, ok, tempdir};

struct IfloomSql {
    root: PathBuf,
    run: PathBuf,
}

#[derive(Debug)]
struct SqlError(String);

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SqlError {}

/// Split one CSV line as arrow's writer quotes it.
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

impl sqllogictest::DB for IfloomSql {
    type Error = SqlError;
    type ColumnType = DefaultColumnType;

    fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SqlError> {
        let mut args: Vec<String> = vec![
            "sql".into(),
            "--run".into(),
            self.run.display().to_string(),
            "--format".into(),
            "csv".into(),
        ];
        if let Some(rest) = sql.trim().strip_prefix("@file ") {
            let (head, outer) = rest
                .split_once('|')
                .ok_or_else(|| SqlError("@file needs `| SQL`".into()))?;
            let mut words = head.split_whitespace();
            let file = words
                .next()
                .ok_or_else(|| SqlError("@file needs a path".into()))?;
            let mut text = std::fs::read_to_string(self.root.join(file))
                .map_err(|e| SqlError(e.to_string()))?;
            for kv in words {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| SqlError(format!("bad param {kv}")))?;
                text = text.replace(&format!("${{{k}}}"), v);
            }
            let body = text.trim().trim_end_matches(';');
            args.push(format!("WITH canned AS ({body}) {outer}"));
        } else {
            args.push(sql.to_string());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = common::ifloom(&self.root, &argv);
        if !o.status.success() {
            return Err(SqlError(common::stderr(&o)));
        }
        let out = common::stdout(&o);
        let mut lines = out.lines();
        let ncols = lines.next().map(|h| split_csv(h).len()).unwrap_or(0);
        let rows: Vec<Vec<String>> = lines.map(split_csv).collect();
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; ncols],
            rows,
        })
    }
}

fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    v.sort();
    v
}

#[test]
fn canned_queries_sqllogictest() {
    let root = common::root();
    let tmp = tempdir();
    let run = tmp.path().join("run");
    ok(
        &root,
        &[
            "run",
            "pipelines/sample_dedup.yaml",
            "--run-dir",
            run.to_str().unwrap(),
        ],
    );
    // `ultraif_*.slt` run over a run of pipelines/ultraif.yaml against the simulator rules of
    // tests/it/ultraif.rs; `judged_*.slt` over the hand-written tables of tests/slt/judged/;
    // the others over the sample dedup run.
    let uf = crate::ultraif::fixture();
    let ultraif_run = crate::ultraif::run_ultraif(&uf, "run", &[]);
    let judged_run = tmp.path().join("judged");
    ok(
        &root,
        &[
            "run",
            "tests/slt/judged/pipeline.yaml",
            "--run-dir",
            judged_run.to_str().unwrap(),
        ],
    );
    // `followbench_*.slt` over the model run of tests/it/followbench.rs.
    let fb = crate::followbench::model_run();
    let files = slt_files(&root.join("tests/slt"));
    assert!(files.len() >= 4);
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let run = if name.starts_with("ultraif_") {
            ultraif_run.clone()
        } else if name.starts_with("judged_") {
            judged_run.clone()
        } else if name.starts_with("followbench_") {
            fb.run.clone()
        } else {
            run.clone()
        };
        let (r, rr) = (root.clone(), run.clone());
        let mut runner = sqllogictest::Runner::new(move || {
            let db = IfloomSql {
                root: r.clone(),
                run: rr.clone(),
            };
            async move { Ok::<_, SqlError>(db) }
        });
        runner
            .run_file(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}
