//! The llm stage's scheduler: rows read in growing chunks, each chunk's samples rendered,
//! looked up in the cache and sent as a round (overlapping the next chunks', so the servers
//! never drain), parse failures asked again in further rounds, and the chunk written in input
//! order once every sample resolved.

use super::progress::{Counters, progress};
use super::templates::{Renderer, context_rows};
use super::*;

/// Rows rendered, sent and written together: 64 × the in-flight capacity, within these bounds
/// on memory. Chunks overlap (see [`PIPELINE_DEPTH`]), so their size no longer decides how
/// long the servers wait between chunks.
pub(super) const MIN_CHUNK_ROWS: usize = 4096;
pub(super) const MAX_CHUNK_ROWS: usize = 65536;

/// Full chunks between "requests handed to the runtime" and "written". With 2, the next
/// chunk's worth of rows is rendered, looked up and on the wire while the oldest chunk's last
/// requests (and their retries) finish and its rows are parsed and written: the servers never
/// drain between chunks, and the per-row CPU work overlaps the sending instead of adding to it.
pub(super) const PIPELINE_DEPTH: usize = 2;

/// Rows rendered before the first requests go out (later chunks double up to the chunk size).
pub(super) const FIRST_CHUNK_ROWS: usize = 64;

/// Responses (or errors) of one round of sends, by request id.
pub(super) type Sent = HashMap<String, std::result::Result<CachedResponse, CallError>>;

/// What the send tasks share.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) pool: Arc<Pool>,
    pub(super) cache: Arc<Cache>,
    pub(super) counters: Arc<Counters>,
    pub(super) model: Arc<str>,
    /// When the stage started (for its debug log).
    pub(super) started: Instant,
    /// The stage's stop signals: stopped when the stage fails (chunks still queued send
    /// nothing more), and by Ctrl-C.
    pub(super) cancel: Cancel,
    /// `clamp_max_tokens`.
    pub(super) clamp: bool,
    /// Requests on the wire, by id, with where their answer will appear: a later round (the
    /// next chunk, or a parse retry) with the same request waits for it instead of sending
    /// it again.
    pub(super) inflight: Arc<std::sync::Mutex<HashMap<u128, Answer>>>,
    /// Wakes the rounds waiting for such answers (rare: one Notify for the stage is enough).
    pub(super) answered: Arc<tokio::sync::Notify>,
    /// Request tasks alive at once, across rounds (see [`send_units`]).
    pub(super) window: Arc<tokio::sync::Semaphore>,
    /// Held by a round while it starts its requests, so rounds start theirs in the order the
    /// rounds began (the lock is fair): requests reach the servers in input order.
    pub(super) admission: Arc<tokio::sync::Mutex<()>>,
}

/// The endpoint check (`/models` on every endpoint), started with the stage and awaited before
/// its first request; dropped (aborted) unawaited when every answer was cached.
pub(super) struct EndpointCheck {
    pub(super) task: Option<tokio::task::JoinHandle<std::result::Result<(), String>>>,
}

impl EndpointCheck {
    pub(super) fn wait(&mut self, ctx: &RunCtx) -> Result<()> {
        if let Some(t) = self.task.take() {
            ctx.engine
                .block_on(t)
                .map_err(|e| Error::Internal(format!("endpoint check: {e}")))?
                .map_err(|e| Error::stage(ctx.id, format!("endpoint check failed: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for EndpointCheck {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Where a work unit's answers appear once it finishes: set once, to the answers when a later
/// round waits for them, else to `None` (that round then sends the request itself). A small
/// allocation per request on the wire (a watch channel, with its nine Notifys, was ~25 MB of
/// peak RSS at 100k rows).
pub(super) type Answer = Arc<std::sync::OnceLock<Option<Arc<UnitResult>>>>;
/// A round's work units: the samples' ids, the request, where to announce the answers, how
/// many samples it answers for the first time (the progress count), and the retries its row
/// has left.
pub(super) type Unit = (Vec<String>, Canonical, Answer, u64, Budget);

/// The retries a row has left (`max_retries`), shared by every request made for the row in
/// a round: the K requests of a row sent one per sample (a server that ignores `n`) draw on
/// one budget, like the single `n: K` request they stand for.
pub(super) type Budget = Arc<std::sync::atomic::AtomicU32>;

/// A fresh budget: the pool's `max_retries`.
pub(super) fn budget(pool: &Pool) -> Budget {
    Budget::new(pool.max_retries().into())
}

/// One pass over a chunk's pending samples: rendered, looked up in the cache, and the misses
/// being sent by a task on the runtime.
pub(super) struct Round {
    pub(super) ids: Vec<(usize, usize, u32, std::result::Result<String, String>)>,
    pub(super) hits: HashMap<String, CachedResponse>,
    pub(super) sending: Option<tokio::task::JoinHandle<Sent>>,
    /// Ids this round sends (registered in [`Shared::inflight`] until the round finishes).
    pub(super) leaders: Vec<u128>,
}

/// A chunk between its first send and its write.
pub(super) struct InFlight {
    pub(super) chunk: RecordBatch,
    pub(super) rows: Vec<serde_json::Value>,
    pub(super) outcomes: Vec<Vec<Option<Outcome>>>,
    pub(super) round: Round,
}

/// How one sample of a round resolved.
// Short-lived: each value moves once from the pool to the writer. Boxing the big variant
// would add an allocation per answer to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
pub(super) enum Resolved {
    Done(usize, usize, Outcome),
    Retry(usize, usize, u32),
    Abort(String),
}

/// What became of one (row, sample).
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    pub(super) request_id: String,
    pub(super) response:
        std::result::Result<(CachedResponse, bool), (String, Option<bytes::Bytes>)>,
    pub(super) parsed: Option<std::result::Result<parse::Parsed, String>>,
}

impl LlmStage {
    pub(super) fn run_rounds(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let started = Instant::now();
        let group = self.group()?.clone();
        // Stopped when the stage fails; Ctrl-C stops every stage.
        let cancel = ctx.cancel.for_stage();
        let pool =
            Arc::new(Pool::new(&group, cancel.clone()).map_err(|e| Error::stage(ctx.id, e))?);
        let total_rows = crate::engine::count_rows(&ctx.parent().files)?;
        let failed_dir = ctx.side_dir("failed");
        std::fs::create_dir_all(&failed_dir).map_err(|e| Error::io(&failed_dir, e))?;
        if total_rows == 0 {
            // Nothing to send; the dead-letter table still exists (empty) so SQL over it plans.
            crate::engine::write_empty(
                &failed_dir.join("part-00000.parquet"),
                &self.failed_schema(&ctx.parent().schema),
            )?;
            return Ok(RunOutput::default());
        }
        // Checked while the cache opens and the first rows render; awaited before the first
        // request is sent (`start_round`), never when every answer is cached.
        let mut healthy = EndpointCheck {
            task: Some({
                let (p, model) = (pool.clone(), self.model.clone());
                ctx.engine
                    .rt
                    .spawn(async move { p.health_check(&model).await })
            }),
        };
        // The cache opens (~3 ms for a new one: its file, WAL and table) while the first rows
        // are read.
        let opening = {
            let (path, cancel) = (cache_path(ctx.engine), cancel.clone());
            std::thread::spawn(move || Cache::open_watched(&path, Some(cancel)))
        };
        let env = self.env().map_err(|e| Error::stage(ctx.id, e))?;
        let renderer = self.renderer(&env).map_err(|e| Error::stage(ctx.id, e))?;
        let counters = Arc::new(Counters::default());

        let new_schema = Arc::new(Schema::new(self.new_fields()));
        let mut main_w: Option<ArrowWriter<File>> = None;
        let mut failed_w: Option<ArrowWriter<File>> = None;

        let chunk_rows = (pool.capacity() * 64).clamp(MIN_CHUNK_ROWS, MAX_CHUNK_ROWS);
        let k = self.samples as usize;
        let context = self.context_columns(&env);
        let mut queue: std::collections::VecDeque<InFlight> = Default::default();
        // Chunks in input order; `None` at the end drains the queue.
        // The first chunk is `FIRST_CHUNK_ROWS` and each next one twice the last, up to
        // `chunk_rows`: requests start after rendering a few dozen rows, not tens of
        // thousands (measured: ~0.5 s before the first request of a 10k-row stage; 6 ms with
        // a first chunk of one in-flight window, 512 rows).
        // Towards the end they halve again: the last chunk's responses are parsed and written
        // after the servers finished, so a small last chunk keeps that tail short (measured:
        // 0.4 s for a last chunk of 32768 rows).
        let floor = pool.capacity().clamp(1, chunk_rows);
        let mut size = floor.min(FIRST_CHUNK_ROWS);
        let mut remaining = total_rows as usize;
        let mut chunks = read_input(&ctx.parent().files, size).flat_map(move |b| {
            let mut pieces: Vec<Result<RecordBatch>> = Vec::new();
            match b {
                Ok(b) => {
                    let mut start = 0;
                    while start < b.num_rows() {
                        let want = size.min(remaining.div_ceil(2).max(floor));
                        let len = want.min(b.num_rows() - start);
                        pieces.push(Ok(b.slice(start, len)));
                        start += len;
                        remaining = remaining.saturating_sub(len);
                        size = (size * 2).min(chunk_rows);
                    }
                }
                Err(e) => pieces.push(Err(e)),
            }
            pieces
        });
        let mut first = Some(chunks.next().transpose()?);
        let cache = Arc::new(
            opening
                .join()
                .map_err(|_| Error::Internal("opening the cache panicked".into()))??,
        );
        tracing::debug!(
            "{}: client and cache ready at {:.3} s",
            ctx.id,
            started.elapsed().as_secs_f64()
        );
        // Progress: a bar on a terminal, plain periodic lines otherwise (CI logs).
        // Dropping `stop` ends the ticker at once (it used to sleep out its period: up to
        // 100 ms added to every stage).
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let ticker = {
            let (c, stop, pool, id) = (counters.clone(), stop_rx, pool.clone(), ctx.id.to_string());
            let total = total_rows * self.samples as u64;
            std::thread::spawn(move || progress(&id, total, started, &c, &pool, &stop))
        };

        let shared = Shared {
            pool: pool.clone(),
            cache: cache.clone(),
            counters: counters.clone(),
            model: self.model.as_str().into(),
            started,
            cancel,
            clamp: self.clamp_max_tokens,
            inflight: Default::default(),
            answered: Default::default(),
            // Four times the pool's capacity: a request sleeping out a retry backoff (a 429's
            // Retry-After is often a whole second) holds no in-flight permit but does hold a
            // place here; with room for exactly the capacity, 1% faults left ~20% of the
            // permits unused.
            window: Arc::new(tokio::sync::Semaphore::new(pool.capacity().max(1) * 4)),
            admission: Default::default(),
        };
        let result = (|| -> Result<()> {
            loop {
                let next = match first.take() {
                    Some(c) => c,
                    None => chunks.next().transpose()?,
                };
                let end = next.is_none();
                if let Some(chunk) = next {
                    let rows = context_rows(&chunk, &context)?;
                    let pending: Vec<(usize, usize, u32)> = (0..rows.len())
                        .flat_map(|r| (0..k).map(move |s| (r, s, 0u32)))
                        .collect();
                    let round =
                        self.start_round(ctx, &renderer, &rows, &pending, &shared, &mut healthy)?;
                    queue.push_back(InFlight {
                        chunk,
                        outcomes: vec![vec![None; k]; rows.len()],
                        rows,
                        round,
                    });
                }
                // Complete (wait for, then write) the oldest chunk only when the chunks behind
                // it hold a full chunk of work for the servers meanwhile: with small first
                // chunks, one request sleeping out a 1 s Retry-After must not hold up the next
                // thousands (measured: a 10k-row stage with 1% faults took 4.3 s, not 3.7 s).
                while let Some(front) = queue.front() {
                    let behind: usize =
                        queue.iter().map(|c| c.rows.len()).sum::<usize>() - front.rows.len();
                    if !end && behind < chunk_rows * (PIPELINE_DEPTH - 1) {
                        break;
                    }
                    let c = queue.pop_front().expect("non-empty");
                    tracing::debug!(
                        "{}: completing a chunk of {} rows at {:.3} s",
                        ctx.id,
                        c.rows.len(),
                        started.elapsed().as_secs_f64()
                    );
                    self.complete(
                        ctx,
                        &renderer,
                        c,
                        &shared,
                        &mut healthy,
                        &new_schema,
                        &mut main_w,
                        &mut failed_w,
                    )?;
                }
                if end {
                    tracing::debug!(
                        "{}: every chunk written at {:.3} s",
                        ctx.id,
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
            }
        })();
        if result.is_err() {
            // Chunks still queued send nothing more and retry nothing; what is on the wire
            // finishes and is cached (the server did the work: the rerun must not pay again).
            shared.cancel.stop();
            for c in queue.drain(..) {
                if let Some(h) = c.round.sending {
                    let _ = ctx.engine.block_on(h);
                }
            }
        }
        drop(shared);
        drop(stop);
        let _ = ticker.join();
        // Flush the cache even when the stage failed: finished responses must survive. The
        // tables close meanwhile: both are left for after the last response.
        let cache =
            Arc::try_unwrap(cache).map_err(|_| Error::Internal("cache still shared".into()))?;
        let ok = result.is_ok();
        let (closed, tables) = std::thread::scope(|s| {
            let closing = s.spawn(move || cache.close());
            let tables = (|| -> Result<()> {
                if !ok {
                    return Ok(());
                }
                if let Some(w) = main_w {
                    w.close()?;
                }
                match failed_w {
                    Some(w) => {
                        w.close()?;
                    }
                    None => crate::engine::write_empty(
                        &failed_dir.join("part-00000.parquet"),
                        &self.failed_schema(&ctx.parent().schema),
                    )?,
                }
                Ok(())
            })();
            (closing.join(), tables)
        });
        let closed = closed
            .map_err(|_| Error::Internal("cache writer panicked".into()))?
            .map_err(|e| Error::stage(ctx.id, cache_failed(&e.to_string())));
        result?;
        closed?;
        tables?;
        tracing::debug!(
            "{}: tables closed at {:.3} s",
            ctx.id,
            started.elapsed().as_secs_f64()
        );
        let mut out = RunOutput::default();
        let c = &counters;
        for (k, v) in [
            ("requests", c.requests.load(Ordering::Relaxed)),
            ("cache_hits", c.cache_hits.load(Ordering::Relaxed)),
            ("failures", c.failures.load(Ordering::Relaxed)),
            ("parse_failures", c.parse_failures.load(Ordering::Relaxed)),
            ("clamped", c.clamped.load(Ordering::Relaxed)),
            ("retries", pool.retries.load(Ordering::Relaxed) as u64),
            ("prompt_tokens", c.prompt_tokens.load(Ordering::Relaxed)),
            (
                "completion_tokens",
                c.completion_tokens.load(Ordering::Relaxed),
            ),
            (
                "table_prompt_tokens",
                c.table_prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "table_completion_tokens",
                c.table_completion_tokens.load(Ordering::Relaxed),
            ),
        ] {
            out.counters.insert(k.into(), v as i64);
        }
        Ok(out)
    }

    /// Render `pending` samples (in parallel), look them up in the cache and hand the misses
    /// to a task on the runtime; the caller collects them with [`Self::finish_round`].
    pub(super) fn start_round(
        &self,
        ctx: &RunCtx,
        renderer: &Renderer,
        rows: &[serde_json::Value],
        pending: &[(usize, usize, u32)],
        sh: &Shared,
        healthy: &mut EndpointCheck,
    ) -> Result<Round> {
        use rayon::prelude::*;
        // A row's samples are adjacent in `pending`: render its messages once for all.
        let by_row: Vec<&[(usize, usize, u32)]> = pending.chunk_by(|a, b| a.0 == b.0).collect();
        let rendered: Vec<_> = by_row
            .par_iter()
            .flat_map_iter(|same_row| {
                let row = &rows[same_row[0].0];
                let messages = self.render(renderer, row);
                same_row.iter().map(move |&(r, s, attempt)| {
                    let c = messages
                        .clone()
                        .map(|m| self.canonical(m, row, s as u32, attempt));
                    (r, s, attempt, c.map(|c| (c.id(), c)))
                })
            })
            .collect();
        // Identical requests (same id) are sent once. Each request carries how many samples
        // it answers for the first time (its weight in the progress count; re-asks after a
        // parse failure add none).
        let mut reqs: HashMap<String, (Canonical, u64, usize)> = HashMap::new();
        let mut ids = Vec::with_capacity(rendered.len());
        let counters = &sh.counters;
        for (r, s, attempt, c) in rendered {
            let first = u64::from(attempt == 0);
            match c {
                Ok((id, c)) => {
                    reqs.entry(id.clone()).or_insert((c, 0, r)).1 += first;
                    ids.push((r, s, attempt, Ok(id)));
                }
                Err(e) => {
                    counters.done.fetch_add(first, Ordering::Relaxed);
                    ids.push((r, s, attempt, Err(e)))
                }
            }
        }
        if let Some(e) = sh.cache.failure() {
            return Err(Error::stage(ctx.id, cache_failed(e)));
        }
        let all: Vec<String> = reqs.keys().cloned().collect();
        let mut hits = sh.cache.get_many(&all)?;
        if self.wants_logprobs() {
            // Cached by an ifloom that did not keep logprobs (before 2026-11-28): ask again.
            hits.retain(|_, r| r.logprobs.is_some());
        }
        counters
            .cache_hits
            .fetch_add(hits.len() as u64, Ordering::Relaxed);
        let mut misses: HashMap<String, (Canonical, u64, usize)> = HashMap::new();
        let mut hit_weight = 0;
        for (id, (c, w, r)) in reqs {
            if hits.contains_key(&id) {
                hit_weight += w;
            } else {
                misses.insert(id, (c, w, r));
            }
        }
        counters.done.fetch_add(hit_weight, Ordering::Relaxed);
        if !misses.is_empty() {
            healthy.wait(ctx)?;
        }
        // Requests an earlier round is still sending (the previous chunk, or the first ask
        // before a parse retry) are not sent again: they wait for that answer.
        let mut follow: Vec<(String, Canonical, Answer, u64)> = Vec::new();
        if let Ok(map) = sh.inflight.lock()
            && !map.is_empty()
        {
            misses.retain(|id, (c, w, _)| match map.get(&id_key(id)) {
                Some(rx) => {
                    follow.push((id.clone(), c.clone(), rx.clone(), *w));
                    false
                }
                None => true,
            });
        }
        let profile = sh.pool.profile();
        // Work units: the K samples of a row as one request with `n: K` where the server
        // honours `n` (vLLM, OpenAI) and none of them is cached; otherwise one request per
        // sample, each with its own seed. Every choice is cached under its sample's id.
        let mut units: Vec<(Vec<String>, Canonical, u64, Budget)> = Vec::new();
        if profile.honours_n() && self.samples > 1 {
            let mut by_row: BTreeMap<(usize, u32), Vec<(usize, String)>> = BTreeMap::new();
            for (r, s, attempt, id) in &ids {
                if let Ok(id) = id {
                    by_row
                        .entry((*r, *attempt))
                        .or_default()
                        .push((*s, id.clone()));
                }
            }
            for (_, mut sample_ids) in by_row {
                sample_ids.sort();
                let all_missing = sample_ids.len() == self.samples as usize
                    && sample_ids.iter().all(|(_, id)| misses.contains_key(id));
                let distinct: HashSet<&String> = sample_ids.iter().map(|(_, id)| id).collect();
                if all_missing && distinct.len() == sample_ids.len() {
                    let group: Vec<String> = sample_ids.into_iter().map(|(_, id)| id).collect();
                    let (base, mut weight, _) = misses.remove(&group[0]).expect("checked missing");
                    for id in &group[1..] {
                        weight += misses.remove(id).map_or(0, |(_, w, _)| w);
                    }
                    units.push((group, base, weight, budget(&sh.pool)));
                }
            }
        }
        // One budget per row (a request shared by several rows, deduplicated, uses its first
        // row's).
        let mut row_budgets: HashMap<usize, Budget> = HashMap::new();
        units.extend(misses.into_iter().map(|(id, (c, w, r))| {
            let b = row_budgets
                .entry(r)
                .or_insert_with(|| budget(&sh.pool))
                .clone();
            (vec![id], c, w, b)
        }));
        tracing::debug!(
            "{}: {} requests handed to the runtime at {:.3} s",
            ctx.id,
            units.len(),
            sh.started.elapsed().as_secs_f64()
        );
        // Registered before the next round is built (on this thread), so it sees them.
        let mut leaders = Vec::new();
        let units: Vec<Unit> = match sh.inflight.lock() {
            Ok(mut map) => units
                .into_iter()
                .map(|(ids, c, w, b)| {
                    let slot = Answer::default();
                    for id in &ids {
                        map.insert(id_key(id), slot.clone());
                        leaders.push(id_key(id));
                    }
                    (ids, c, slot, w, b)
                })
                .collect(),
            Err(_) => return Err(Error::Internal("in-flight map poisoned".into())),
        };
        let sending = (!units.is_empty() || !follow.is_empty()).then(|| {
            ctx.engine
                .rt
                .spawn(send_units(units, follow, profile, sh.clone()))
        });
        Ok(Round {
            ids,
            hits,
            sending,
            leaders,
        })
    }

    /// Resolve a round whose sends finished: parse (in parallel), apply the error policies,
    /// fill `outcomes`; returns the samples to ask again (`retry_on_parse_error`).
    pub(super) fn finish_round(
        &self,
        ctx: &RunCtx,
        round: Round,
        sent: Sent,
        outcomes: &mut [Vec<Option<Outcome>>],
        sh: &Shared,
    ) -> Result<Vec<(usize, usize, u32)>> {
        use rayon::prelude::*;
        let counters = &sh.counters;
        let Round {
            ids, hits, leaders, ..
        } = round;
        if !leaders.is_empty()
            && let Ok(mut map) = sh.inflight.lock()
        {
            for id in &leaders {
                map.remove(id);
            }
        }
        let resolved: Vec<Resolved> = ids
            .into_par_iter()
            .map(|(r, s, attempt, id)| {
                let id = match id {
                    Err(e) => {
                        return Resolved::Done(
                            r,
                            s,
                            Outcome {
                                request_id: String::new(),
                                response: Err((e, None)),
                                parsed: None,
                            },
                        );
                    }
                    Ok(id) => id,
                };
                let response = match (hits.get(&id), sent.get(&id)) {
                    (Some(h), _) => Ok((h.clone(), true)),
                    (None, Some(Ok(x))) => Ok((x.clone(), false)),
                    (None, Some(Err(CallError::Abort(m)))) => return Resolved::Abort(m.clone()),
                    (None, Some(Err(CallError::Row { message, raw, .. }))) => {
                        Err((message.clone(), raw.clone()))
                    }
                    (None, None) => Err(("no response".to_string(), None)),
                };
                let response = response.map(|(mut resp, cached)| {
                    if self.reasoning == Reasoning::Strip {
                        let (answer, thought) = parse::strip_reasoning(&resp.text);
                        if let Some(t) = thought {
                            resp.text = answer;
                            // A server may send both (`reasoning_content` and a `<think>`
                            // block in the text): keep both.
                            resp.reasoning = Some(match resp.reasoning.take() {
                                Some(r) if !r.is_empty() => format!("{r}\n\n{t}"),
                                _ => t,
                            });
                        }
                    }
                    (resp, cached)
                });
                let parsed = match (&self.parse, &response) {
                    (Some(spec), Ok((resp, _))) => {
                        Some(parse::parse(spec, &resp.text).map_err(|e| e.to_string()))
                    }
                    _ => None,
                };
                if matches!(parsed, Some(Err(_))) && attempt < self.retry_on_parse_error {
                    return Resolved::Retry(r, s, attempt + 1);
                }
                Resolved::Done(
                    r,
                    s,
                    Outcome {
                        request_id: id,
                        response,
                        parsed,
                    },
                )
            })
            .collect();
        let mut next = Vec::new();
        for res in resolved {
            let (r, s, outcome) = match res {
                Resolved::Abort(m) => return Err(Error::stage(ctx.id, m)),
                Resolved::Retry(r, s, attempt) => {
                    next.push((r, s, attempt));
                    continue;
                }
                Resolved::Done(r, s, o) => (r, s, o),
            };
            if outcome.response.is_err() {
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(Err(msg)) = &outcome.parsed {
                counters.parse_failures.fetch_add(1, Ordering::Relaxed);
                if self.on_parse_error == OnParseError::Fail {
                    return Err(Error::stage(
                        ctx.id,
                        format!("response does not parse (on_parse_error: fail): {msg}"),
                    ));
                }
            }
            if self.on_error == OnError::Fail
                && let Err((m, _)) = &outcome.response
            {
                return Err(Error::stage(
                    ctx.id,
                    format!("request failed (on_error: fail): {m}"),
                ));
            }
            outcomes[r][s] = Some(outcome);
        }
        Ok(next)
    }

    /// Wait for a chunk's sends, resolve them (re-asking parse failures as configured) and
    /// write its rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn complete(
        &self,
        ctx: &RunCtx,
        renderer: &Renderer,
        c: InFlight,
        sh: &Shared,
        healthy: &mut EndpointCheck,
        new_schema: &SchemaRef,
        main_w: &mut Option<ArrowWriter<File>>,
        failed_w: &mut Option<ArrowWriter<File>>,
    ) -> Result<()> {
        let InFlight {
            chunk,
            rows,
            mut outcomes,
            mut round,
        } = c;
        loop {
            let sent = match round.sending.take() {
                Some(h) => ctx
                    .engine
                    .block_on(h)
                    .map_err(|e| Error::Internal(format!("send task: {e}")))?,
                None => Sent::new(),
            };
            tracing::debug!(
                "{}: a chunk's sends done at {:.3} s",
                ctx.id,
                sh.started.elapsed().as_secs_f64()
            );
            let next = self.finish_round(ctx, round, sent, &mut outcomes, sh)?;
            if next.is_empty() {
                break;
            }
            round = self.start_round(ctx, renderer, &rows, &next, sh, healthy)?;
        }
        let outcomes: Vec<Vec<Outcome>> = outcomes
            .into_iter()
            .map(|v| {
                v.into_iter()
                    .map(|o| o.expect("every sample resolved"))
                    .collect()
            })
            .collect();
        // What the finished table's answers cost, whether sent now or by an earlier run (the
        // cache keeps each answer's usage): completion tokens of every answer; the prompt once
        // per row where the server reads it once for n: K, else once per sample (K requests).
        let once_per_row = sh.pool.profile().honours_n();
        let (mut prompt, mut completion) = (0u64, 0u64);
        for samples in &outcomes {
            let answers = samples.iter().filter_map(|o| o.response.as_ref().ok());
            for (i, (r, _)) in answers.enumerate() {
                if i == 0 || !once_per_row {
                    prompt += r.prompt_tokens.max(0) as u64;
                }
                completion += r.completion_tokens.max(0) as u64;
            }
        }
        let c = &sh.counters;
        c.table_prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        c.table_completion_tokens
            .fetch_add(completion, Ordering::Relaxed);
        self.write_chunk(ctx, &chunk, &outcomes, new_schema, main_w, failed_w)
    }
}

/// The input's batches in order, its first `first` rows as a batch of their own: they are
/// the first chunk, and decoding a whole 64k-row batch before the first request took ~4 ms
/// (of a 2 s stage).
pub(super) fn read_input(
    files: &[std::path::PathBuf],
    first: usize,
) -> impl Iterator<Item = Result<RecordBatch>> + '_ {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    files.iter().enumerate().flat_map(move |(i, p)| {
        // (offset, limit, batch size) of each reader over this file.
        let reads = if i == 0 {
            vec![(0, Some(first), first.max(1)), (first, None, 65536)]
        } else {
            vec![(0, None, 65536)]
        };
        reads.into_iter().flat_map(move |(offset, limit, batch)| {
            let reader = File::open(p).map_err(|e| Error::io(p, e)).and_then(|f| {
                let mut b = ParquetRecordBatchReaderBuilder::try_new(f)?
                    .with_batch_size(batch)
                    .with_offset(offset);
                if let Some(l) = limit {
                    b = b.with_limit(l);
                }
                Ok(b.build()?)
            });
            let it: Box<dyn Iterator<Item = Result<RecordBatch>>> = match reader {
                Ok(r) => Box::new(r.map(|b| b.map_err(Error::from))),
                Err(e) => Box::new(std::iter::once(Err(e))),
            };
            it
        })
    })
}

/// Send one round's work units (a bounded number at once; the pool's own in-flight limits
/// decide what is on the wire) and cache every choice the moment it arrives.
///
/// Each request is its own task: driven from one task (a plain `buffer_unordered`), a chunk's
/// body serialization, response parsing and cache hand-off all ran on one worker thread at a
/// time, and a response that arrived while that task was busy held its in-flight permit until
/// the task came round to it (measured: the simulator's slots idle ~10% of a 100k-row run).
///
/// Rounds start their tasks one round after the other ([`Shared::admission`]) under one window
/// for the stage ([`Shared::window`]). With a window per round, a later (smaller) chunk's
/// requests overtook the rest of a big one, so the big chunk finished last and was parsed and
/// written after the servers were done, with every chunk behind it (measured: 33 ms of a
/// 2.05 s 10k-row stage after its last response).
pub(super) async fn send_units(
    units: Vec<Unit>,
    follow: Vec<(String, Canonical, Answer, u64)>,
    profile: Profile,
    sh: Shared,
) -> Sent {
    let leaders = {
        let sh = sh.clone();
        async move {
            let mut tasks = Vec::with_capacity(units.len());
            let admitted = sh.admission.clone().lock_owned().await;
            for (ids, c, slot, weight, budget) in units {
                let Ok(permit) = sh.window.clone().acquire_owned().await else {
                    break; // never closed
                };
                let sh = sh.clone();
                let keep = ids.clone();
                tasks.push((
                    keep,
                    tokio::spawn(async move {
                        let done = std::panic::AssertUnwindSafe(send_unit(
                            ids.clone(),
                            c,
                            profile,
                            sh.clone(),
                            budget,
                        ))
                        .catch_unwind()
                        .await
                        // A panic in a request task (a bug): its samples fail like a lost
                        // request, and a round waiting for them is told.
                        .unwrap_or_else(|_| {
                            fail(ids, CallError::Abort("request task panicked".into()))
                        });
                        drop(permit);
                        // The in-flight map holds the slot once per id, and this task once;
                        // more means a later round waits for this answer (copied only then).
                        // A round that takes the slot after this look finds `None` and sends
                        // the request itself.
                        let waited_for = Arc::strong_count(&slot) > done.len() + 1;
                        let _ = slot.set(waited_for.then(|| Arc::new(done.clone())));
                        if waited_for {
                            sh.answered.notify_waiters();
                        }
                        sh.counters.done.fetch_add(weight, Ordering::Relaxed);
                        done
                    }),
                ));
            }
            drop(admitted);
            let mut out = Vec::with_capacity(tasks.len());
            for (ids, task) in tasks {
                out.push(match task.await {
                    Ok(done) => done,
                    // Cancelled (the runtime is shutting down).
                    Err(e) => fail(ids, CallError::Abort(format!("request task failed: {e}"))),
                });
            }
            out
        }
    };
    let followers = futures::future::join_all(follow.into_iter().map(|(id, c, slot, w)| {
        let sh = sh.clone();
        async move {
            let answers = loop {
                // Registered before the look, so an answer set in between is not missed.
                let wake = sh.answered.notified();
                tokio::pin!(wake);
                wake.as_mut().enable();
                if let Some(a) = slot.get() {
                    break a.clone();
                }
                wake.await;
            };
            let answer =
                answers.and_then(|a| a.iter().find(|(i, _)| *i == id).map(|(_, r)| r.clone()));
            let counters = sh.counters.clone();
            // The sender finished before this round registered (and found the map entry
            // still there): its answer is in the cache (queued or committed), unless it
            // failed; only then is the request sent after all.
            let answer = answer.or_else(|| {
                let hit = sh.cache.get_many(std::slice::from_ref(&id)).ok()?;
                let r = hit.into_values().next()?;
                (c.sampling.logprobs != Some(true) || r.logprobs.is_some()).then_some(Ok(r))
            });
            let got = match answer {
                Some(r) => vec![(id, r)],
                None => {
                    let b = budget(&sh.pool);
                    send_unit(vec![id], c, profile, sh, b).await
                }
            };
            counters.done.fetch_add(w, Ordering::Relaxed);
            got
        }
    }));
    let (leaders, followers) = futures::join!(leaders, followers);
    leaders.into_iter().chain(followers).flatten().collect()
}

pub(super) type UnitResult = Vec<(String, std::result::Result<CachedResponse, CallError>)>;

/// What a stage says when the cache writer gave up.
pub(super) fn cache_failed(e: &str) -> String {
    format!(
        "the response cache cannot be written ({e}): stopped sending, since answers would be lost; \
         when the cache is writable again (another process holding its write lock? disk full?), \
         run the same command to resume"
    )
}

/// Every sample of a unit gets the same error.
pub(super) fn fail(ids: Vec<String>, e: CallError) -> UnitResult {
    ids.into_iter().map(|id| (id, Err(e.clone()))).collect()
}

/// Why the stage sends nothing more, if it does not: Ctrl-C or a failure elsewhere in the
/// stage, or a cache that cannot be written (answers would be paid for and lost).
pub(super) fn stop_reason(sh: &Shared) -> Option<String> {
    if sh.cancel.is_stopped() {
        return Some(INTERRUPTED_MSG.into());
    }
    sh.cache.failure().map(cache_failed)
}

/// Send one work unit (one request for `ids.len()` samples) and cache its choices.
pub(super) async fn send_unit(
    ids: Vec<String>,
    c: Canonical,
    profile: Profile,
    sh: Shared,
    budget: Budget,
) -> UnitResult {
    if let Some(m) = stop_reason(&sh) {
        return fail(ids, CallError::Abort(m));
    }
    let n = ids.len() as u32;
    let body = bytes::Bytes::from(c.to_body(profile, n));
    sh.counters.requests.fetch_add(1, Ordering::Relaxed);
    let stopped = || stop_reason(&sh).is_some();
    let mut r = sh
        .pool
        .call(c.api, body, &ids[0], n, &budget, stopped)
        .await;
    if let Err(CallError::Row {
        message,
        raw: Some(raw),
        ..
    }) = &mut r
        && let Some(limit) = std::str::from_utf8(raw)
            .ok()
            .and_then(response::context_limit)
    {
        let room = limit.room();
        let asked = c.max_tokens();
        if room < 1 {
            message.push_str(&format!(
                " (the prompt alone is {} tokens and the model's context {}: shorten the prompt)",
                limit.prompt, limit.context
            ));
        } else if !sh.clamp {
            message.push_str(&format!(
                " ({} tokens are left after the {}-token prompt: `clamp_max_tokens: true` on the stage asks again with max_tokens {room})",
                room, limit.prompt
            ));
        } else if asked.is_none_or(|m| room < m) {
            // The response is cached under the request as written: the rerun (same prompt,
            // same server) would be clamped the same way, so it sends nothing.
            let clamped = c.with_max_tokens(room);
            sh.counters.clamped.fetch_add(1, Ordering::Relaxed);
            sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            let body = bytes::Bytes::from(clamped.to_body(profile, n));
            r = sh
                .pool
                .call(c.api, body, &ids[0], n, &budget, stopped)
                .await;
        }
    }
    // Stopped because the cache cannot be written: say so (the pool only knows it stopped).
    if matches!(r, Err(CallError::Abort(_)))
        && let Some(e) = sh.cache.failure()
    {
        r = Err(CallError::Abort(cache_failed(e)));
    }
    let comp = match r {
        Ok(c) => c,
        Err(e) => return fail(ids, e),
    };
    sh.counters
        .prompt_tokens
        .fetch_add(comp.prompt_tokens.max(0) as u64, Ordering::Relaxed);
    sh.counters
        .completion_tokens
        .fetch_add(comp.completion_tokens.max(0) as u64, Ordering::Relaxed);
    // OpenAI-compatible servers report usage for all choices together: each sample gets a
    // share in proportion to its text, and the shares add up to the request's total.
    let lengths: Vec<usize> = comp
        .choices
        .iter()
        .map(|c| c.text.len() + c.reasoning.as_ref().map_or(0, String::len))
        .collect();
    let shares = apportion(comp.completion_tokens, &lengths);
    let asked_logprobs = c.sampling.logprobs == Some(true);
    ids.into_iter()
        .zip(comp.choices)
        .zip(shares)
        .map(|((id, ch), tokens)| {
            let resp = CachedResponse {
                text: ch.text,
                reasoning: ch.reasoning,
                finish_reason: ch.finish_reason,
                logprobs: kept_logprobs(asked_logprobs, ch.logprobs),
                prompt_tokens: comp.prompt_tokens,
                completion_tokens: tokens,
                latency_ms: comp.latency_ms,
            };
            // Persisted the moment it arrives: a crash after this loses nothing.
            sh.cache.put(id.clone(), sh.model.clone(), resp.clone());
            (id, Ok(resp))
        })
        .collect()
}

/// Split `total` into integer shares proportional to `weights` (equal shares when they are all
/// zero) that add up to `total`: the largest remainders get the leftover units.
pub(super) fn apportion(total: i64, weights: &[usize]) -> Vec<i64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let sum: u128 = weights.iter().map(|&w| w as u128).sum();
    let (weights, sum): (Vec<u128>, u128) = if sum == 0 {
        (vec![1; weights.len()], weights.len() as u128)
    } else {
        (weights.iter().map(|&w| w as u128).collect(), sum)
    };
    let t = total.max(0) as u128;
    let mut shares: Vec<i64> = weights.iter().map(|w| (t * w / sum) as i64).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest remainder first; ties to the earlier choice, so the split is deterministic.
    order.sort_by_key(|&i| (std::cmp::Reverse(t * weights[i] % sum), i));
    let left = total.max(0) - shares.iter().sum::<i64>();
    for &i in order.iter().take(left as usize) {
        shares[i] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn token_shares_follow_the_text_and_add_up() {
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(100, &[30, 10]), [75, 25]);
        assert_eq!(apportion(7, &[0, 0]), [4, 3]);
        assert_eq!(apportion(0, &[5, 5]), [0, 0]);
        assert_eq!(apportion(5, &[]), Vec::<i64>::new());
        for (total, w) in [(1001, vec![3usize, 7, 11, 0]), (3, vec![1, 1, 1, 1, 1])] {
            assert_eq!(apportion(total, &w).iter().sum::<i64>(), total);
        }
    }
}
