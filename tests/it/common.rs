use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project root (where Cargo.toml is).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run the ifloom binary with `args` in `cwd`.
pub fn ifloom(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ifloom"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn ifloom")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and insist on success, returning stdout.
pub fn ok(cwd: &Path, args: &[&str]) -> String {
    let o = ifloom(cwd, args);
    assert!(
        o.status.success(),
        "ifloom {args:?} failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// `ifloom sql --format csv` and return the rows (without header) as vectors of strings.
pub fn sql_rows(cwd: &Path, run: &Path, query: &str) -> Vec<Vec<String>> {
    let out = ok(
        cwd,
        &[
            "sql",
            "--run",
            run.to_str().unwrap(),
            "--format",
            "csv",
            query,
        ],
    );
    out.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
