//! The sandbox's result cache: every compile result and call result, keyed by
//! [`super::call_key`] (interpreter version, limits, source, input), committed per finished
//! job. SQLite in WAL mode as the LLM response cache (a second ifloom process can share it);
//! bodies are small JSON, stored plain.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Call, Compiled};
use crate::error::{Error, Result};

pub struct ResultCache {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl ResultCache {
    pub fn open(path: &Path) -> Result<ResultCache> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|e| sql_err(path, e))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| sql_err(path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS results (key BLOB PRIMARY KEY, body BLOB NOT NULL)",
        )
        .map_err(|e| sql_err(path, e))?;
        Ok(ResultCache {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn get(&self, key: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.prepare_cached("SELECT body FROM results WHERE key = ?1")
            .and_then(|mut s| s.query_row(params![&key[..]], |r| r.get(0)).optional())
            .map_err(|e| sql_err(&self.path, e))
    }

    pub fn get_compile(&self, key: &[u8; 32]) -> Result<Option<Compiled>> {
        Ok(self.get(key)?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub fn get_call(&self, key: &[u8; 32]) -> Result<Option<Call>> {
        Ok(self.get(key)?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// One job's results in one transaction: after a `kill -9` a job is either all there or
    /// not at all.
    pub fn put(
        &self,
        compile_key: &[u8; 32],
        compiled: &Compiled,
        calls: &[([u8; 32], Call)],
    ) -> Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let e = |err| sql_err(&self.path, err);
        let tx = conn.transaction().map_err(e)?;
        {
            let mut ins = tx
                .prepare_cached("INSERT OR REPLACE INTO results (key, body) VALUES (?1, ?2)")
                .map_err(e)?;
            ins.execute(params![&compile_key[..], serde_json::to_vec(compiled)?])
                .map_err(e)?;
            for (k, c) in calls {
                ins.execute(params![&k[..], serde_json::to_vec(c)?])
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }
}

fn sql_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Internal(format!("sandbox cache {}: {e}", path.display()))
}
