//! Where comparisons run: a few threads of their own, off the runtime's workers. Decoding,
//! JSON parsing and diffing a large answer takes milliseconds to a hundred or more; on a
//! worker it would hold up every client request queued behind it on that worker. Here it
//! runs on a thread with a lower scheduling priority (`nice` +10, Linux's per-thread nice),
//! so under load the kernel gives the workers the CPU first. The queue is bounded: past it a
//! comparison is counted `skipped` (reason `queue_full`), never queued without limit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tracing::debug;

/// Comparisons waiting for a thread; past it new ones are skipped. Each holds its answers'
/// bytes (already counted against the shadow byte budget) while it waits.
pub const MAX_QUEUED: usize = 64;
/// Comparison threads: half the cores (the workers keep the other half), 1 to 4.
const MAX_THREADS: usize = 4;
/// How much lower than the workers' priority a comparison thread runs (nice, 0..19).
const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

/// The comparison threads and their bounded queue. Dropping it (the last handle) lets the
/// threads finish what is queued and exit.
pub struct Judges {
    tx: SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
}

/// A comparison that could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds [`MAX_QUEUED`] comparisons already.
    QueueFull,
    /// The threads are gone (only while the process shuts down).
    Closed,
}

impl Judges {
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Judges::with_threads((cores / 2).clamp(1, MAX_THREADS))
    }

    fn with_threads(threads: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(MAX_QUEUED);
        let rx = Arc::new(Mutex::new(rx));
        let waiting = Arc::new(AtomicUsize::new(0));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("strangler-compare-{i}"))
                .spawn(move || work(&rx));
            if let Err(error) = spawned {
                debug!(%error, "could not start a comparison thread");
            }
        }
        Judges { tx, waiting }
    }

    /// Runs `f` on a comparison thread and returns its result; `Refused` at once when the
    /// queue is full. Never blocks the caller.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        let (tx, rx) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let done = Done(self.waiting.clone());
        let job: Job = Box::new(move || {
            let out = f();
            drop(done);
            let _ = tx.send(out);
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(e) => {
                return Err(match e {
                    TrySendError::Full(_) => Refused::QueueFull,
                    TrySendError::Disconnected(_) => Refused::Closed,
                });
            }
        }
        rx.await.map_err(|_| Refused::Closed)
    }

    /// Comparisons queued or running.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// Counts a comparison out of `waiting` when it ends (also by a panic, or unqueued).
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Judges {
    fn default() -> Self {
        Judges::new()
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        // The lock is held only to take one job; the comparison runs without it.
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        // A comparison that panics (a bug) loses its verdict, not the thread.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// Linux applies `setpriority(PRIO_PROCESS, 0)` to the calling thread only. Where it is
/// refused, the thread keeps the process's priority.
#[cfg(target_os = "linux")]
fn lower_priority() {
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    if let Err(error) = rustix::process::setpriority_process(None, (current + NICE).min(19)) {
        debug!(%error, "comparison thread keeps its priority");
    }
}

/// Elsewhere `PRIO_PROCESS` would lower the whole process: the thread keeps its priority.
#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_off_the_caller_and_refuses_past_the_queue() {
        let judges = Judges::with_threads(1);
        let here = std::thread::current().id();
        let there = judges.run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(here, there, "the comparison ran on the caller's thread");
        // Hold the one thread, then fill the queue: the next is refused at once.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let busy = judges.run(move || {
            started_tx.send(()).unwrap();
            hold_rx.recv().ok()
        });
        let mut busy = Box::pin(busy);
        assert!(futures_poll_once(&mut busy).await.is_none());
        started_rx.recv().unwrap();
        let mut queued = Vec::new();
        for i in 0..MAX_QUEUED {
            let mut f = Box::pin(judges.run(move || i));
            assert!(futures_poll_once(&mut f).await.is_none(), "job {i} refused");
            queued.push(f);
        }
        assert_eq!(judges.run(|| 0).await, Err(Refused::QueueFull));
        hold_tx.send(()).unwrap();
        assert_eq!(busy.await, Ok(Some(())));
        for (i, f) in queued.into_iter().enumerate() {
            assert_eq!(f.await, Ok(i));
        }
        assert_eq!(judges.waiting(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_comparison_thread_runs_at_a_lower_priority() {
        let judges = Judges::with_threads(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mine = rustix::process::getpriority_process(None).unwrap();
        let theirs = rt
            .block_on(judges.run(|| rustix::process::getpriority_process(None).unwrap()))
            .unwrap();
        assert_eq!(theirs, (mine + NICE).min(19));
    }

    /// Polls a future once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
