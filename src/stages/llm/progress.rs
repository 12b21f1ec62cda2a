//! The llm stage's progress: a bar on a terminal, plain periodic lines otherwise (CI logs).

use super::*;

/// Counters reported in the manifest (and by `ifloom stats`).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) parse_failures: AtomicU64,
    /// Requests asked again with `max_tokens` clamped to the context left.
    pub(super) clamped: AtomicU64,
    pub(super) prompt_tokens: AtomicU64,
    pub(super) completion_tokens: AtomicU64,
    /// Usage of the answers in the finished table, cached ones included (see `complete`).
    pub(super) table_prompt_tokens: AtomicU64,
    pub(super) table_completion_tokens: AtomicU64,
    pub(super) done: AtomicU64,
}

/// Report a stage's progress until the sender of `stop` is dropped.
pub(super) fn progress(
    id: &str,
    total: u64,
    started: Instant,
    c: &Counters,
    pool: &Pool,
    stop: &std::sync::mpsc::Receiver<()>,
) {
    use std::io::IsTerminal;
    let line = || {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{:.1} req/s, {:.0} output tok/s, {} in flight, {} cached, {} retries, {} failed",
            c.requests.load(Ordering::Relaxed) as f64 / secs,
            c.completion_tokens.load(Ordering::Relaxed) as f64 / secs,
            pool.in_flight(),
            c.cache_hits.load(Ordering::Relaxed),
            pool.retries.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
        )
    };
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "  {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{id} (llm)"));
        let period = Duration::from_millis(200);
        loop {
            bar.set_position(c.done.load(Ordering::Relaxed));
            bar.set_message(line());
            if stop.recv_timeout(period) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                break;
            }
        }
        bar.finish_and_clear();
        return;
    }
    // Plain lines for logs (CI, nohup): every IFLOOM_PROGRESS_S seconds (default 10), and a
    // last one at the end when any was printed.
    let every = std::env::var("IFLOOM_PROGRESS_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .map_or(Duration::from_secs(10), |v| {
            Duration::from_secs_f64(v.clamp(0.05, 86400.0))
        });
    let print = || {
        let done = c.done.load(Ordering::Relaxed);
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            f64::NAN
        };
        eprintln!(
            "  {id} (llm): {done}/{total} done, {}, ETA {eta:.0} s",
            line()
        );
    };
    let mut last = Instant::now();
    let mut printed = false;
    while stop.recv_timeout(every.min(Duration::from_millis(100)))
        == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
    {
        if last.elapsed() >= every {
            last = Instant::now();
            print();
            printed = true;
        }
    }
    if printed {
        print();
    }
}
