use std::path::PathBuf;

use crate::error::Result;
use crate::store::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder holding run directories.
    #[arg(long, default_value = "runs")]
    pub root: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&a.root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    if dirs.is_empty() {
        println!("no runs under {}", a.root.display());
    }
    for d in dirs {
        let dir = RunDir::new(&d);
        let info = dir.read_info();
        let status = info.as_ref().map_or("unknown", |i| i.status.as_str());
        let started = info.as_ref().map_or("", |i| i.started_at.as_str());
        println!("{} [{status}] {started}", d.display());
        let order = info.map(|i| i.stages).unwrap_or_default();
        for id in order {
            match dir.manifest(&id) {
                Some(m) => println!(
                    "  {id:<24} {:<10} {:>10} rows  {} ms",
                    m.kind, m.rows, m.duration_ms
                ),
                None => println!("  {id:<24} (not finished)"),
            }
        }
    }
    Ok(())
}
