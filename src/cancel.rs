//! Stopping a run: one handle, made by the command line and passed to every stage through its
//! run context ([`crate::stages::RunCtx::cancel`]), in the manner of mini-redis's `shutdown.rs`.
//!
//! Three things stop work, in increasing order of haste:
//! - a stage fails, or part of one (a cache that cannot be written): that stage sends nothing
//!   more ([`Cancel::for_stage`] gives it a handle of its own to [`Cancel::stop`]);
//! - Ctrl-C ([`Cancel::interrupt`]): no stage sends anything more; work on the wire finishes
//!   (its answers are cached) and the run ends after the stages that are running;
//! - the grace period after Ctrl-C ends ([`Cancel::abandon`]): work still on the wire is
//!   dropped; resuming does it again.
//!
//! Any stage kind can poll [`Cancel::is_stopped`] between units of work, and sleepers (a retry
//! backoff, a `Retry-After`) wait on [`Cancel::woken`] so a stop does not wait for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// What an interrupted stage says.
pub const INTERRUPTED_MSG: &str =
    "interrupted: the answers that arrived are cached; run the same command again to resume";

/// A handle on the run's (and, from [`Cancel::for_stage`], one stage's) stop signals. Cheap to
/// clone; every clone sees the same signals.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    run: Arc<RunSignals>,
    /// Set when this stage stopped (`None` on the run's own handle).
    stage: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Default)]
struct RunSignals {
    interrupted: AtomicBool,
    abandoned: AtomicBool,
    abandon: Notify,
    /// Wakes whoever sleeps out a delay when anything stopped; each checks whether its own
    /// stage did (stops are rare: one Notify for the run is enough).
    wake: Notify,
}

impl Cancel {
    pub fn new() -> Self {
        Cancel::default()
    }

    /// A handle for one stage: [`stop`](Cancel::stop) on it stops that stage only; it still
    /// sees the run's Ctrl-C and grace period.
    pub fn for_stage(&self) -> Cancel {
        Cancel {
            run: Arc::clone(&self.run),
            stage: Some(Arc::new(AtomicBool::new(false))),
        }
    }

    /// Ctrl-C: start nothing more; what is on the wire finishes (for the grace period).
    pub fn interrupt(&self) {
        self.run.interrupted.store(true, Ordering::SeqCst);
        self.run.wake.notify_waiters();
    }

    pub fn is_interrupted(&self) -> bool {
        self.run.interrupted.load(Ordering::SeqCst)
    }

    /// The grace period is over: drop the work still on the wire.
    pub fn abandon(&self) {
        self.run.abandoned.store(true, Ordering::SeqCst);
        self.run.abandon.notify_waiters();
    }

    pub fn is_abandoned(&self) -> bool {
        self.run.abandoned.load(Ordering::SeqCst)
    }

    /// Completes on [`abandon`](Cancel::abandon). Enable it (`Notified::enable`) before
    /// reading [`is_abandoned`](Cancel::is_abandoned) so an abandon between the two is not
    /// missed.
    pub fn abandoned(&self) -> tokio::sync::futures::Notified<'_> {
        self.run.abandon.notified()
    }

    /// Stop this handle's stage (on the run's handle: nothing to stop but the sleepers' naps).
    pub fn stop(&self) {
        if let Some(s) = &self.stage {
            s.store(true, Ordering::SeqCst);
        }
        self.wake();
    }

    /// Has this stage stopped, or the whole run (Ctrl-C)?
    pub fn is_stopped(&self) -> bool {
        self.is_interrupted()
            || self
                .stage
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Something stopped (a stage, part of one): wake every sleeper to look.
    pub fn wake(&self) {
        self.run.wake.notify_waiters();
    }

    /// Completes on the next [`wake`](Cancel::wake), [`stop`](Cancel::stop) or
    /// [`interrupt`](Cancel::interrupt). Enable it before checking [`is_stopped`]
    /// (Cancel::is_stopped), as with [`abandoned`](Cancel::abandoned).
    pub fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.run.wake.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_stop_stays_in_its_stage_and_ctrl_c_reaches_all() {
        let run = Cancel::new();
        let (a, b) = (run.for_stage(), run.for_stage());
        a.stop();
        assert!(a.is_stopped());
        assert!(!b.is_stopped());
        assert!(!run.is_stopped());
        run.interrupt();
        assert!(b.is_stopped() && run.is_stopped() && a.is_interrupted());
        assert!(!b.is_abandoned());
        b.abandon();
        assert!(run.is_abandoned());
    }

    #[tokio::test]
    async fn sleepers_wake_on_a_stop_elsewhere() {
        let run = Cancel::new();
        let stage = run.for_stage();
        let other = run.for_stage();
        let woken = other.woken();
        tokio::pin!(woken);
        woken.as_mut().enable();
        stage.stop();
        tokio::time::timeout(std::time::Duration::from_secs(5), woken)
            .await
            .expect("a stop wakes sleepers of every stage");
        assert!(!other.is_stopped());
    }
}
