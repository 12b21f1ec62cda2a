//! The run directory: one folder per table with Parquet parts and a manifest, a `run.json`,
//! and a lock so two processes never write the same run.
//!
//! ```text
//! runs/<pipeline>/
//!   run.json                 status, params, timings
//!   .lock                    held (flock) while a run writes
//!   stages/<id>/part-00000.parquet, manifest.json
//!   stages/<id>/<side>/part-00000.parquet   side tables, e.g. dedup's `removed`
//! ```
//! A table is complete exactly when its folder has `manifest.json`: stages are written into a
//! temporary folder and renamed into place, so a killed run never leaves a half table that
//! looks finished.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::table::Table;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideTable {
    pub name: String,
    pub rows: u64,
    pub parts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub kind: String,
    pub fingerprint: String,
    pub parents: Vec<String>,
    pub parent_fingerprints: Vec<String>,
    pub schema: Vec<ColumnInfo>,
    pub rows: u64,
    pub bytes: u64,
    pub parts: Vec<String>,
    #[serde(default)]
    pub side_tables: Vec<SideTable>,
    #[serde(default)]
    pub counters: BTreeMap<String, i64>,
    pub duration_ms: u64,
    pub finished_at: String,
}

pub fn schema_info(schema: &SchemaRef) -> Vec<ColumnInfo> {
    schema
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunInfo {
    pub pipeline: String,
    pub pipeline_file: String,
    pub status: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub stages: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

/// Holds the run directory's lock until dropped (the OS releases it if the process dies).
pub struct RunLock {
    _file: File,
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RunDir { path: path.into() }
    }

    pub fn stages(&self) -> PathBuf {
        self.path.join("stages")
    }

    pub fn stage_dir(&self, id: &str) -> PathBuf {
        self.stages().join(id)
    }

    pub fn lock(&self) -> Result<RunLock> {
        std::fs::create_dir_all(self.stages()).map_err(|e| Error::io(self.stages(), e))?;
        let p = self.path.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        match f.try_lock() {
            Ok(()) => Ok(RunLock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
                path: self.path.clone(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&p, e)),
        }
    }

    pub fn manifest(&self, id: &str) -> Option<Manifest> {
        let p = self.stage_dir(id).join("manifest.json");
        let text = std::fs::read_to_string(p).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every finished table of the run (main and side tables), for SQL.
    pub fn tables(&self) -> Result<Vec<(Table, Manifest)>> {
        let mut out = Vec::new();
        let dir = self.stages();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            let Some(m) = self.manifest(&n) else { continue };
            let sd = self.stage_dir(&n);
            let files: Vec<PathBuf> = m.parts.iter().map(|p| sd.join(p)).collect();
            let schema = crate::engine::parquet_schema(&files[0])?;
            out.push((
                Table {
                    id: n.clone(),
                    files,
                    schema,
                },
                m.clone(),
            ));
            for side in &m.side_tables {
                let files: Vec<PathBuf> = side
                    .parts
                    .iter()
                    .map(|p| sd.join(&side.name).join(p))
                    .collect();
                let schema = crate::engine::parquet_schema(&files[0])?;
                out.push((
                    Table {
                        id: format!("{n}__{}", side.name),
                        files,
                        schema,
                    },
                    m.clone(),
                ));
            }
        }
        Ok(out)
    }

    pub fn read_info(&self) -> Option<RunInfo> {
        let text = std::fs::read_to_string(self.path.join("run.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write_info(&self, info: &RunInfo) -> Result<()> {
        write_atomic(
            &self.path.join("run.json"),
            serde_json::to_string_pretty(info)?.as_bytes(),
        )
    }

    /// Put a finished temporary stage folder in place of the old one.
    pub fn commit_stage(&self, id: &str, tmp: &Path) -> Result<()> {
        let dest = self.stage_dir(id);
        if dest.exists() {
            let trash = self
                .stages()
                .join(format!(".trash-{id}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&trash);
            std::fs::rename(&dest, &trash).map_err(|e| Error::io(&dest, e))?;
            std::fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            std::fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        Ok(())
    }

    /// Leftovers of killed runs: temporary and trash folders.
    pub fn clean_temporaries(&self) {
        if let Ok(rd) = std::fs::read_dir(self.stages()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".tmp-") || n.starts_with(".trash-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
