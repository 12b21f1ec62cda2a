//! The response cache: every finished LLM response, keyed by the request id (a hash of the
//! canonical request), persisted as soon as it arrives. This is what makes resume exact: after
//! a crash the rerun finds every finished response and sends only the rest.
//!
//! SQLite in WAL mode: readers never block the writer and a second ifloom process can use the
//! same file at once (an embedded store that locks out other processes would not do). Bodies
//! are zstd-compressed JSON (below 512 bytes plain JSON, where zstd saves little and costs
//! more than the request); big runs hold tens of GB of responses otherwise. An ifloom from
//! before plain bodies (2026-11-27) reads them as misses and asks again: nothing is lost. One writer thread
//! commits small batches (at most 50 ms apart), so a `kill -9` loses at most the responses of
//! the last 50 ms, which the rerun asks for again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What is stored per request: one choice of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedResponse {
    pub text: String,
    #[serde(default)]
    pub reasoning: Option<String>,
    pub finish_reason: String,
    /// The choice's `logprobs` (JSON text) when the request asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: i64,
}

/// Where the cache lives unless told: `$IFLOOM_CACHE`, else `~/.cache/ifloom/llm-cache.sqlite`.
pub fn default_path() -> PathBuf {
    if let Ok(p) = std::env::var("IFLOOM_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|_| PathBuf::from(".cache"));
    base.join("ifloom").join("llm-cache.sqlite")
}

/// The cache a run uses: the one named on the command line (`--cache`, kept in
/// [`crate::engine::Engine::cache_path`]), else [`default_path`]. The Python sandbox keeps its
/// results beside it.
pub fn path(named: Option<&Path>) -> PathBuf {
    named.map_or_else(default_path, Path::to_path_buf)
}

/// How long a statement waits for another process's write lock: 30 s, or
/// `IFLOOM_CACHE_BUSY_MS` (tests shorten it).
fn busy_timeout() -> Duration {
    std::env::var("IFLOOM_CACHE_BUSY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis)
}

/// Attempts at committing one batch (each waiting up to [`busy_timeout`]) before the writer
/// gives up and the stage stops.
const WRITE_ATTEMPTS: u32 = 3;

fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let sql = |e: rusqlite::Error| Error::Internal(format!("cache {}: {e}", path.display()));
    let mut conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(busy_timeout()).map_err(sql)?;
    // NORMAL first: switching a new file to WAL then syncs less.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    busy_retry(|| conn.pragma_update(None, "journal_mode", "WAL")).map_err(sql)?;
    // The last connection to close would copy the whole WAL into the file and sync it: ~10 ms
    // at the end of every stage, after its last response. The WAL is as durable as the file
    // (the next open reads it) and commits keep it short (SQLite's auto-checkpoint at 1000
    // pages), so closing leaves it as it is.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .map_err(sql)?;
    // An existing cache is opened without a write (a read-only file works). A new one gets
    // its table in a write transaction from the start: as a plain statement CREATE begins as
    // a read, and when another process creates the table first (two runs starting on a new
    // cache file), the upgrade to a write fails at once with SQLITE_BUSY (seen in CI).
    let exists = busy_retry(|| {
        conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'responses'",
            [],
            |r| r.get::<_, i64>(0),
        )
    })
    .map_err(sql)?
        > 0;
    if !exists {
        busy_retry(|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS responses (
                     id TEXT PRIMARY KEY,
                     model TEXT NOT NULL,
                     body BLOB NOT NULL,
                     created_at INTEGER NOT NULL
                 );",
            )?;
            tx.commit()
        })
        .map_err(sql)?;
    }
    Ok(conn)
}

/// Run `f` again while it fails with SQLITE_BUSY or SQLITE_LOCKED, up to ~2 s more. Only for
/// the set-up statements of `open`: switching a new file to WAL while another connection
/// does the same, or a stale snapshot, returns BUSY without calling the busy handler.
fn busy_retry<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if tries < 100
                    && matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How the cache file is chosen, for messages about it.
pub const LOCATION_RULE: &str = "--cache PATH if given, else $IFLOOM_CACHE, else \
    ~/.cache/ifloom/llm-cache.sqlite ($XDG_CACHE_HOME/ifloom/llm-cache.sqlite when XDG_CACHE_HOME is set)";

/// Open a cache that must already exist (`ifloom cache stats` / `gc`): a path with no cache
/// is an error naming it, and nothing is created, neither the file nor its folder.
fn open_existing(path: &Path) -> Result<Connection> {
    use rusqlite::OpenFlags;
    let env = match std::env::var_os("IFLOOM_CACHE") {
        Some(v) => format!("$IFLOOM_CACHE is {}", v.to_string_lossy()),
        None => "$IFLOOM_CACHE is not set".into(),
    };
    if !path.is_file() {
        let what = if path.exists() {
            "is not a file"
        } else {
            "does not exist: nothing was ever cached there"
        };
        return Err(Error::usage(format!(
            "no LLM cache at {}: it {what}\n  hint: the cache is {LOCATION_RULE}; {env}. Point \
             --cache (or $IFLOOM_CACHE) at the file your runs used",
            path.display()
        )));
    }
    let sql = |e: rusqlite::Error| Error::Internal(format!("cache {}: {e}", path.display()));
    // No SQLITE_OPEN_CREATE: a file removed since the check is an error, not a new cache.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'responses'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| {
            Error::usage(format!(
                "{} is not an ifloom LLM cache ({e})\n  hint: the cache is {LOCATION_RULE}",
                path.display()
            ))
        })?;
    if tables == 0 {
        return Err(Error::usage(format!(
            "{} is not an ifloom LLM cache (it has no `responses` table)\n  hint: the cache is {LOCATION_RULE}",
            path.display()
        )));
    }
    Ok(conn)
}

/// Bodies shorter than this are stored as plain JSON: zstd's per-call cost (entropy tables
/// built for every frame) was 8% of a zero-latency run's CPU for ~230-byte bodies, which it
/// shrank by a few dozen bytes. Longer ones (real answers: KBs) are compressed.
const PLAIN_BELOW: usize = 512;

/// Compress with a context made once per writer: creating a zstd context per response (what
/// `zstd::encode_all` does) took 18% of a zero-latency run's CPU, mostly zeroing its tables.
fn compress(z: &mut zstd::bulk::Compressor<'static>, r: &CachedResponse) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(r)?;
    if json.len() < PLAIN_BELOW {
        return Ok(json);
    }
    z.compress(&json)
        .map_err(|e| Error::Internal(format!("zstd: {e}")))
}

thread_local! {
    /// One decompression context per thread, for the same reason (24% of a cached rerun).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn decompress(b: &[u8]) -> Option<CachedResponse> {
    // Plain JSON (see `PLAIN_BELOW`): an object starts with `{`, a zstd frame with its magic
    // number (28 b5 2f fd).
    if b.first() == Some(&b'{') {
        return serde_json::from_slice(b).ok();
    }
    // Bodies written by `compress` record their size; older ones (stream-encoded) may not.
    let json = match zstd::zstd_safe::get_frame_content_size(b) {
        Ok(Some(n)) if n <= 1 << 30 => DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = zstd::bulk::Decompressor::new().ok();
            }
            d.as_mut()?.decompress(b, n as usize).ok()
        })?,
        _ => zstd::decode_all(b).ok()?,
    };
    serde_json::from_slice(&json).ok()
}

/// A response queued for the writer: its id, its model and the response.
type Queued = (String, Arc<str>, Arc<CachedResponse>);

/// A handle for lookups plus a background writer.
pub struct Cache {
    reader: std::sync::Mutex<Connection>,
    tx: Option<mpsc::Sender<Queued>>,
    /// Responses handed to [`Cache::put`] and not yet committed (by the id's 128-bit value, as
    /// the in-flight map keys them: no string copy per response), so lookups find them in the
    /// ~50 ms before the writer's commit (the same request asked again in that window, by the
    /// next chunk or a parse retry, would otherwise be sent twice).
    unsaved: Arc<std::sync::Mutex<HashMap<u128, Arc<CachedResponse>>>>,
    writer: Option<JoinHandle<Result<u64>>>,
    /// Set by the writer when it gave up: responses can no longer be kept.
    failed: Arc<std::sync::OnceLock<String>>,
}

impl Cache {
    pub fn open(path: &Path) -> Result<Cache> {
        Cache::open_watched(path, None)
    }

    /// Open the cache for a stage: when its writer gives up, `stop` wakes the stage's
    /// requests sleeping out a backoff, so they see the failure and stop.
    pub fn open_watched(path: &Path, stop: Option<crate::cancel::Cancel>) -> Result<Cache> {
        let reader = open(path)?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let wpath = path.to_path_buf();
        let failed = Arc::new(std::sync::OnceLock::new());
        let wfailed = failed.clone();
        let unsaved = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let wunsaved = Arc::clone(&unsaved);
        // The writer opens its own connection on its thread: the stage's first requests do
        // not wait for it (a failure stops the stage like any failed commit).
        let writer = std::thread::spawn(move || {
            let r = open(&wpath).and_then(|wconn| write_loop(wconn, rx, &wpath, &wunsaved));
            if let Err(e) = &r {
                let _ = wfailed.set(e.to_string());
                // Requests sleeping out a backoff check again and stop.
                if let Some(stop) = &stop {
                    stop.wake();
                }
            }
            r
        });
        Ok(Cache {
            reader: std::sync::Mutex::new(reader),
            tx: Some(tx),
            unsaved,
            writer: Some(writer),
            failed,
        })
    }

    /// Why responses can no longer be stored, once the writer gave up (the stage must stop
    /// sending: what it received would be lost).
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Look up many ids at once (bodies read in one pass, then decoded in parallel), including
    /// responses queued for the writer and not yet committed.
    pub fn get_many(&self, ids: &[String]) -> Result<HashMap<String, CachedResponse>> {
        use rayon::prelude::*;
        // Queued responses first: the writer removes them from the queue only after their
        // commit, so an id missing here is either not answered or already in the file (which
        // the read transaction below, started after this look, then sees).
        let mut queued = HashMap::new();
        if let Ok(unsaved) = self.unsaved.lock()
            && !unsaved.is_empty()
        {
            for id in ids {
                if let Some(r) = unsaved.get(&super::request::id_key(id)) {
                    queued.insert(id.clone(), CachedResponse::clone(r));
                }
            }
        }
        let conn = self
            .reader
            .lock()
            .map_err(|_| Error::Internal("cache lock poisoned".into()))?;
        let sql = |e: rusqlite::Error| Error::Internal(format!("cache read: {e}"));
        let mut bodies: Vec<(&String, Vec<u8>)> = Vec::new();
        // One read transaction for the whole batch: in autocommit mode every lookup takes
        // and drops its own WAL read lock (shared-memory traffic per row).
        let txn = conn.unchecked_transaction().map_err(sql)?;
        let mut stmt = txn
            .prepare_cached("SELECT body FROM responses WHERE id = ?1")
            .map_err(sql)?;
        for id in ids.iter().filter(|id| !queued.contains_key(*id)) {
            let body: Option<Vec<u8>> = stmt
                .query_row(params![id], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            if let Some(b) = body {
                bodies.push((id, b));
            }
        }
        drop(stmt);
        txn.commit().map_err(sql)?;
        let mut found: HashMap<String, CachedResponse> = bodies
            .into_par_iter()
            .filter_map(|(id, b)| decompress(&b).map(|r| (id.clone(), r)))
            .collect();
        found.extend(queued);
        Ok(found)
    }

    /// Queue a response for the writer (committed within ~50 ms; found by lookups at once).
    pub fn put(&self, id: String, model: Arc<str>, r: CachedResponse) {
        if let Some(tx) = &self.tx {
            let r = Arc::new(r);
            if let Ok(mut unsaved) = self.unsaved.lock() {
                unsaved.insert(super::request::id_key(&id), Arc::clone(&r));
            }
            let _ = tx.send((id, model, r));
        }
    }

    /// Flush everything queued and stop the writer; returns how many responses it stored.
    pub fn close(mut self) -> Result<u64> {
        self.tx.take();
        // Woken from its poll at once: the stage waits for this commit.
        if let Some(h) = &self.writer {
            h.thread().unpark();
        }
        match self.writer.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::Internal("cache writer panicked".into()))?,
            None => Ok(0),
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.writer.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn write_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Queued>,
    path: &Path,
    unsaved: &std::sync::Mutex<HashMap<u128, Arc<CachedResponse>>>,
) -> Result<u64> {
    let sql = |e: rusqlite::Error| Error::Internal(format!("cache {}: {e}", path.display()));
    let mut written = 0u64;
    let mut z =
        zstd::bulk::Compressor::new(3).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
    // Block for the first item, then gather for up to 50 ms, polling the channel every few
    // milliseconds: a receiver blocked in `recv_timeout` is woken (a futex call on each side)
    // for every single item, ~8% of a sending run's CPU at 7k responses/s.
    // After the last sender is gone, the final batch is written and `recv` ends the loop.
    //
    // Each item is compressed and inserted as it is taken, into a transaction that the end
    // of the batch commits: at the end of a stage only that commit is left (inserting the
    // last 50 ms of responses then was half of the ~4 ms after the last response).
    while let Ok(item) = rx.recv() {
        let mut bodies: Vec<(String, Arc<str>, Vec<u8>)> = Vec::new();
        let mut pending = vec![item];
        // `Some` while the batch's transaction is open and holds every body so far; `None`
        // after a failure, when the batch is committed again as a whole below.
        let mut live = begin(&conn).ok().map(|()| 0usize);
        let deadline = Instant::now() + Duration::from_millis(50);
        let mut open = true;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(item) => pending.push(item),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            for (id, model, r) in pending.drain(..) {
                bodies.push((id, model, compress(&mut z, &r)?));
            }
            if let Some(done) = live {
                live = insert(&conn, &bodies[done..]).ok().map(|()| bodies.len());
                if live.is_none() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !open || left.is_zero() || bodies.len() >= 4096 {
                break;
            }
            // `Cache::close` unparks it: the last batch is committed at once, not after
            // the rest of this nap.
            std::thread::park_timeout(left.min(Duration::from_millis(5)));
        }
        let committed = live.is_some() && conn.execute_batch("COMMIT").is_ok();
        if !committed {
            if live.is_some() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            // Another process may hold the write lock (each attempt waits `busy_timeout` for
            // it): the batch is kept and tried again before the writer gives up.
            let mut attempt = 1;
            loop {
                match commit(&mut conn, &bodies) {
                    Ok(()) => break,
                    Err(e) if attempt < WRITE_ATTEMPTS => {
                        tracing::debug!("cache {}: commit failed ({e}); again", path.display());
                        attempt += 1;
                    }
                    Err(e) => return Err(sql(e)),
                }
            }
        }
        // Committed: lookups find these in the file from now on. (An id put again since, by
        // a second identical request, is dropped here too; the file has one of the two.)
        if let Ok(mut unsaved) = unsaved.lock() {
            for (id, ..) in &bodies {
                unsaved.remove(&super::request::id_key(id));
            }
        }
        written += bodies.len() as u64;
    }
    Ok(written)
}

/// Open a batch's write transaction. IMMEDIATE takes the write lock at BEGIN (waiting for it
/// under the busy timeout), so no statement fails half-way on a lock upgrade.
fn begin(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")
}

const INSERT: &str =
    "INSERT OR REPLACE INTO responses (id, model, body, created_at) VALUES (?1, ?2, ?3, ?4)";

/// Insert bodies into the open transaction.
fn insert(conn: &Connection, bodies: &[(String, Arc<str>, Vec<u8>)]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(INSERT)?;
    let now = chrono::Utc::now().timestamp();
    for (id, model, body) in bodies {
        stmt.execute(params![id, &**model, body, now])?;
    }
    Ok(())
}

/// Store one batch in one transaction. IMMEDIATE takes the write lock at BEGIN (waiting for
/// it under the busy timeout), so no statement fails half-way on a lock upgrade.
fn commit(conn: &mut Connection, bodies: &[(String, Arc<str>, Vec<u8>)]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    insert(&tx, bodies)?;
    tx.commit()
}

/// Figures for `ifloom cache stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub path: String,
    pub responses: i64,
    pub compressed_bytes: i64,
    pub file_bytes: u64,
    pub models: Vec<(String, i64)>,
}

/// Figures of the cache at `path`; an error if there is none (nothing is created).
pub fn stats(path: &Path) -> Result<Stats> {
    let conn = open_existing(path)?;
    let sql = |e: rusqlite::Error| Error::Internal(format!("cache {}: {e}", path.display()));
    let (responses, bytes): (i64, i64) = conn
        .query_row(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM responses",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql)?;
    let mut stmt = conn
        .prepare("SELECT model, count(*) FROM responses GROUP BY model ORDER BY 2 DESC")
        .map_err(sql)?;
    let models = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(sql)?;
    Ok(Stats {
        path: path.display().to_string(),
        responses,
        compressed_bytes: bytes,
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        models,
    })
}

/// Delete responses older than `days` (all with `days = 0`) and compact the file; an error
/// if there is no cache at `path` (nothing is created).
pub fn gc(path: &Path, older_than_days: u64) -> Result<usize> {
    let conn = open_existing(path)?;
    let sql = |e: rusqlite::Error| Error::Internal(format!("cache {}: {e}", path.display()));
    let cutoff = chrono::Utc::now().timestamp() - (older_than_days as i64) * 86_400;
    let n = conn
        .execute(
            "DELETE FROM responses WHERE created_at <= ?1",
            params![cutoff],
        )
        .map_err(sql)?;
    conn.execute_batch("VACUUM").map_err(sql)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(t: &str) -> CachedResponse {
        CachedResponse {
            text: t.into(),
            reasoning: None,
            finish_reason: "stop".into(),
            logprobs: None,
            prompt_tokens: 3,
            completion_tokens: 1,
            latency_ms: 5,
        }
    }

    #[test]
    fn put_then_get_across_two_handles() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let a = Cache::open(&p).unwrap();
        // A second process-like handle on the same file works at the same time.
        let b = Cache::open(&p).unwrap();
        a.put("x".into(), "m".into(), resp("hello"));
        assert_eq!(a.close().unwrap(), 1);
        let got = b.get_many(&["x".into(), "y".into()]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["x"], resp("hello"));
        let s = stats(&p).unwrap();
        assert_eq!(s.responses, 1);
        drop(b);
        assert_eq!(gc(&p, 0).unwrap(), 1);
        assert_eq!(stats(&p).unwrap().responses, 0);
    }

    #[test]
    fn connections_opening_one_new_file_at_once_all_succeed() {
        // Two runs starting on a new cache file (CI saw "database is locked" from one):
        // 6 connections at a time, 15 new files.
        let dir = tempfile::tempdir().unwrap();
        for round in 0..15 {
            let p = dir.path().join(format!("c{round}.sqlite"));
            let start = std::sync::Barrier::new(6);
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            open(&p).map(|_| ())
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap().unwrap();
                }
            });
        }
    }

    #[test]
    fn a_held_write_lock_delays_the_commits_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        Cache::open(&p).unwrap().close().unwrap();
        // Another process holds the write lock while 5,000 answers arrive (more than one
        // batch): the writer waits for it (busy timeout) instead of dropping them.
        let holder = Connection::open(&p).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let c = Cache::open(&p).unwrap();
        for i in 0..5000 {
            c.put(
                format!("{i:032x}"),
                "m".into(),
                resp(&format!("answer {i}")),
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        holder.execute_batch("ROLLBACK").unwrap();
        drop(holder);
        assert_eq!(c.close().unwrap(), 5000);
        // Closing leaves the newest answers in the WAL beside the file; a new connection
        // (another process) reads them there.
        assert!(dir.path().join("c.sqlite-wal").exists());
        let other = Connection::open(&p).unwrap();
        let n: i64 = other
            .query_row("SELECT count(*) FROM responses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 5000);
        drop(other);
        let again = Cache::open(&p).unwrap();
        let got = again
            .get_many(&[format!("{:032x}", 4999), format!("{:032x}", 5000)])
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[&format!("{:032x}", 4999)], resp("answer 4999"));
    }

    #[test]
    fn queued_responses_are_found_before_their_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let a = Cache::open(&p).unwrap();
        // Another process holds the write lock: the writer cannot commit for now.
        let mut other = open(&p).unwrap();
        let lock = other
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        a.put("x".into(), "m".into(), resp("queued"));
        std::thread::sleep(Duration::from_millis(120));
        let in_file: i64 = open(&p)
            .unwrap()
            .query_row("SELECT count(*) FROM responses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_file, 0, "the writer committed through the lock");
        let got = a.get_many(&["x".into(), "y".into()]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["x"], resp("queued"));
        lock.commit().unwrap();
        assert_eq!(a.close().unwrap(), 1);
        let b = Cache::open(&p).unwrap();
        assert_eq!(b.get_many(&["x".into()]).unwrap()["x"], resp("queued"));
        assert!(b.unsaved.lock().unwrap().is_empty());
    }

    #[test]
    fn short_bodies_plain_long_ones_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.sqlite");
        let a = Cache::open(&p).unwrap();
        let long = "the same sentence again. ".repeat(200);
        a.put("short".into(), "m".into(), resp("YES"));
        a.put("long".into(), "m".into(), resp(&long));
        a.close().unwrap();
        let conn = open(&p).unwrap();
        let body = |id: &str| -> Vec<u8> {
            conn.query_row("SELECT body FROM responses WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        assert_eq!(body("short")[0], b'{');
        let compressed = body("long");
        assert_eq!(&compressed[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert!(compressed.len() < long.len() / 10, "{}", compressed.len());
        let b = Cache::open(&p).unwrap();
        let got = b.get_many(&["short".into(), "long".into()]).unwrap();
        assert_eq!(got["short"], resp("YES"));
        assert_eq!(got["long"], resp(&long));
    }

    #[test]
    fn stats_and_gc_of_a_missing_cache_fail_and_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("none.sqlite");
        let e = stats(&p).unwrap_err().to_string();
        assert!(
            e.contains(&p.display().to_string()) && e.contains("IFLOOM_CACHE"),
            "{e}"
        );
        assert!(gc(&p, 0).is_err());
        assert!(!dir.path().join("sub").exists());
        // Some other SQLite file is not taken for a cache, and is left as it was.
        let other = dir.path().join("other.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER)")
            .unwrap();
        let e = stats(&other).unwrap_err().to_string();
        assert!(e.contains("not an ifloom LLM cache"), "{e}");
    }
}
