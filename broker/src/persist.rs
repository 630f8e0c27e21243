//! Group commit: one writer thread applies every queued storage job in one
//! atomic batch and one WAL sync, then tells each job's owner. Jobs that
//! arrive while a sync is running go into the next batch, so many publishes
//! from many connections share one fsync.
//!
//! One FIFO for everyone: a queue's `Remove` for a message is always applied
//! after the publisher's `PutMessage`/`Enqueue` for it (the publisher submits
//! before handing the message to queues), so an acked message can never be
//! written back.
//!
//! Publishers submit with a permit (they wait when too many jobs are queued:
//! back-pressure); queue actors, which must never wait, submit without.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use warren_storage::{MessageOp, MessageStore};

/// Called with `true` once the job is durable, `false` if the write failed.
pub type Done = Box<dyn FnOnce(bool) + Send>;

struct Job {
    ops: Vec<MessageOp>,
    done: Option<Done>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Publisher jobs that may wait for the writer.
const JOB_PERMITS: usize = 8192;
/// Operations merged into one write at most.
const MAX_BATCH_OPS: usize = 64 * 1024;

#[derive(Clone)]
pub struct Persister {
    tx: mpsc::UnboundedSender<Job>,
    permits: Arc<Semaphore>,
    /// Failed batches so far (a barrier reports failures since it began).
    failures: Arc<AtomicU64>,
}

impl Persister {
    /// Start the writer thread; it stops when the last handle is dropped.
    pub fn start(store: Arc<dyn MessageStore>) -> std::io::Result<Persister> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let failures = Arc::new(AtomicU64::new(0));
        let failed = failures.clone();
        std::thread::Builder::new().name("warren-store".into()).spawn(move || {
            let mut ops = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut jobs = vec![first];
                let mut n = jobs[0].ops.len();
                while n < MAX_BATCH_OPS {
                    match rx.try_recv() {
                        Ok(j) => {
                            n += j.ops.len();
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
                ops.clear();
                for j in &mut jobs {
                    ops.append(&mut j.ops);
                }
                let ok = match store.apply(&ops) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, ops = ops.len(), "message store write failed; confirms will be nacked");
                        failed.fetch_add(1, Ordering::AcqRel);
                        false
                    }
                };
                for j in jobs {
                    if let Some(done) = j.done {
                        done(ok);
                    }
                }
            }
        })?;
        Ok(Persister {
            tx,
            permits: Arc::new(Semaphore::new(JOB_PERMITS)),
            failures,
        })
    }

    /// Submit a publisher's job; waits while the writer is far behind.
    pub async fn submit(&self, ops: Vec<MessageOp>, done: Done) {
        let permit = self.permits.clone().acquire_owned().await.ok();
        if let Err(e) = self.tx.send(Job {
            ops,
            done: Some(done),
            _permit: permit,
        }) {
            // The writer is gone (shutting down): never claim durability.
            if let Some(done) = e.0.done {
                done(false);
            }
        }
    }

    /// Wait until everything submitted before this call is durable; false if
    /// any write failed meanwhile (`tx.commit-ok` waits on this).
    pub async fn barrier(&self) -> bool {
        let before = self.failures.load(Ordering::Acquire);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            Vec::new(),
            Box::new(move |ok| {
                let _ = tx.send(ok);
            }),
        )
        .await;
        rx.await.unwrap_or(false) && self.failures.load(Ordering::Acquire) == before
    }

    /// Submit without waiting (queue actors: removals).
    pub fn submit_nowait(&self, ops: Vec<MessageOp>) {
        let _ = self.tx.send(Job {
            ops,
            done: None,
            _permit: None,
        });
    }
}
