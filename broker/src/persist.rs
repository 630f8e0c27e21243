//! The store service: one writer thread that group-commits, one reader
//! thread that pages queue contents back in, the message id allocator and
//! the moka cache of hot message bodies.
//!
//! Group commit: the writer applies every queued job in one atomic batch and
//! one WAL sync, then tells each job's owner. Jobs that arrive while a sync
//! is running go into the next batch, so many publishes from many
//! connections share one fsync. A message acked before its batch is written
//! is not written at all (its writes cancel out: `elide_consumed`), and a
//! small batch may wait a moment for such acks first (`CommitWait`).
//! A batch nobody waits for (acks, page-outs) is written without a sync;
//! the next sync covers it, at most UNSYNCED_FOR later.
//!
//! One FIFO for everyone: a queue's `Remove` for a message is always applied
//! after the publisher's `PutMessage`/`Enqueue` for it (the publisher submits
//! before handing the message to queues), so an acked message can never be
//! written back. Page reads wait until every job submitted before them has
//! been applied, so a queue never reads past a write it has been told about.
//!
//! Publishers submit with a permit (they wait when too many jobs are queued:
//! back-pressure); queue actors, which must never wait, submit without.

use crate::alarm::Alarms;
use crate::message::{Message, MessageRef};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use warren_storage::{EntryMeta, MessageId, MessageOp, MessageStore, QueueId};

/// Called with `true` once the job is durable, `false` if the write failed.
pub type Done = Box<dyn FnOnce(bool) + Send>;

struct Job {
    ops: Vec<MessageOp>,
    done: Option<Done>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Messages read back for a queue, in sequence order, and the sequence the
/// next read starts from.
pub struct Page {
    pub entries: Vec<(u64, MessageRef, EntryMeta)>,
    pub next: u64,
}

/// Called on the reader thread with the page (or the error text).
pub type PageDone = Box<dyn FnOnce(Result<Page, String>) + Send>;

/// A read run on the reader thread.
pub type ReadFn = Box<dyn FnOnce(&dyn MessageStore) + Send>;

/// A read on the reader thread: a queue's page, or any other read.
enum Read {
    Page(ReadJob),
    With { after: u64, run: ReadFn },
}

struct ReadJob {
    queue: QueueId,
    from: u64,
    to: u64,
    limit: usize,
    /// Jobs that must be applied before reading.
    after: u64,
    done: PageDone,
}

/// Publisher jobs that may wait for the writer.
const JOB_PERMITS: usize = 8192;
/// Operations merged into one write at most.
const MAX_BATCH_OPS: usize = 64 * 1024;

/// Writes nobody waits for (acks, requeue counts, page-outs) are made
/// without a WAL sync: the next synced write covers them, or a sync at most
/// this long after the first of them. A crash can lose only the last of
/// them, so an acked message may come back after a crash, marked
/// redelivered; no confirmed message can be lost.
const UNSYNCED_FOR: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a batch with a few messages to store may wait for more
/// (`CommitWait`; `--commit-wait`) by default, in µs: less than one WAL
/// sync on a virtual disk, and longer than a consumer on the same host
/// takes to ack a message delivered at once.
pub const COMMIT_WAIT_US: u64 = 200;
/// A batch that already stores this many messages is written at once.
const COMMIT_WAIT_MAX_PUTS: usize = 64;
/// Without a recent wait that paid off, one batch in this many waits (to
/// find out whether waiting pays off again).
const COMMIT_WAIT_PROBE: u64 = 32;

/// When the writer waits before a write.
///
/// A message that is consumed and acked before it is written needs no write
/// at all (`elide_consumed`): its write, its ack and the WAL sync they
/// would cost all go. So a batch with a few messages to store waits a
/// moment, for those acks and for more publishers to share the sync;
/// deliveries never wait for it, only the confirms. Waiting only pays off
/// where consumers keep up: a publisher whose messages stay queued would
/// just see its confirms later. So the writer waits while recent waits
/// paid off (most of the messages stored in the batches that waited were
/// consumed meanwhile), and otherwise waits in one batch out of
/// COMMIT_WAIT_PROBE only, to notice when consumers catch up. A busy writer
/// (batches of COMMIT_WAIT_MAX_PUTS or more) never waits: its syncs are
/// shared already.
struct CommitWait {
    wait: std::time::Duration,
    /// Share of stored messages elided in the recent batches that waited
    /// (a moving average).
    paid: f64,
    batches: u64,
}

impl CommitWait {
    fn new(wait: std::time::Duration) -> CommitWait {
        CommitWait {
            wait,
            // Waiting is tried first: a few batches tell if it pays off.
            paid: 1.0,
            batches: 0,
        }
    }

    fn should_wait(&mut self, puts: usize) -> bool {
        if self.wait.is_zero() || puts == 0 || puts >= COMMIT_WAIT_MAX_PUTS {
            return false;
        }
        self.batches += 1;
        self.paid >= 0.5 || self.batches.is_multiple_of(COMMIT_WAIT_PROBE)
    }

    /// A batch that waited stored `puts` messages, of which `elided` were
    /// acked meanwhile.
    fn observe(&mut self, puts: usize, elided: usize) {
        if puts > 0 {
            self.paid = 0.75 * self.paid + 0.25 * (elided as f64 / puts as f64);
        }
    }
}

fn count_puts<'a>(ops: impl IntoIterator<Item = &'a MessageOp>) -> usize {
    ops.into_iter()
        .filter(|op| matches!(op, MessageOp::PutMessage { .. }))
        .count()
}

/// Write a batch, with its WAL sync when `sync`. An empty batch (everything
/// in it cancelled out, or a barrier alone) writes nothing, but syncs the
/// earlier unsynced writes (`pending`) when a sync is due.
fn commit(
    store: &dyn MessageStore,
    ops: &[MessageOp],
    sync: bool,
    pending: bool,
    stats: &crate::metrics::StoreStats,
) -> warren_storage::Result<()> {
    if ops.is_empty() {
        return match sync && pending {
            true => store.sync(),
            false => Ok(()),
        };
    }
    let started = std::time::Instant::now();
    let applied = if sync {
        store.apply(ops)
    } else {
        stats.unsynced_writes.fetch_add(1, Ordering::Relaxed);
        store.apply_unsynced(ops)
    };
    stats.batch_ops.observe(ops.len() as f64);
    stats.write_seconds.observe(started.elapsed().as_secs_f64());
    applied
}

/// Jobs handed to the writer and jobs it has applied.
#[derive(Default)]
struct Progress {
    submitted: AtomicU64,
    applied: Mutex<u64>,
    changed: Condvar,
}

impl Progress {
    fn wait_applied(&self, n: u64) {
        let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        while *a < n {
            a = self.changed.wait(a).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn add_applied(&self, n: u64) {
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.changed.notify_all();
    }
}

/// Hits and misses of the body cache (page reads) so far.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

/// The store's writer and reader threads. They end once every
/// [`Persister`] is gone; the last of them to hold the store closes it.
/// The daemon waits for them before it exits: RocksDB must be closed, not
/// torn down by the process's exit handlers under its own background
/// threads.
#[derive(Clone, Default)]
pub struct StoreThreads(Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>);

impl StoreThreads {
    fn add(&self, h: std::thread::JoinHandle<()>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    }
    /// Wait up to `limit` for the threads to end; false if one has not.
    pub fn join(&self, limit: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        let mut hs = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::thread::current().id();
        if hs.iter().any(|h| h.thread().id() == me) {
            // Called on one of the threads themselves: it cannot wait for
            // its own end (the process-level join still does).
            return false;
        }
        while hs.iter().any(|h| !h.is_finished()) {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for h in hs.drain(..) {
            let _ = h.join();
        }
        true
    }
}

/// Held by every [`Persister`] clone, dropped with the last one (after its
/// senders, so the threads are already on their way out): waits for the
/// threads, so that the store is closed by the time the last handle is
/// gone. (A test process, or a runtime that is dropped, then never exits
/// under a RocksDB that is still open.)
struct Joiner(StoreThreads);

impl Drop for Joiner {
    fn drop(&mut self) {
        if !self.0.join(std::time::Duration::from_secs(60)) {
            tracing::warn!("message store threads did not stop");
        }
    }
}

#[derive(Clone)]
pub struct Persister {
    pub threads: StoreThreads,
    tx: std::sync::mpsc::Sender<Job>,
    reads: std::sync::mpsc::Sender<Read>,
    permits: Arc<Semaphore>,
    /// Failed batches so far (a barrier reports failures since it began).
    failures: Arc<AtomicU64>,
    progress: Arc<Progress>,
    next_id: Arc<AtomicU64>,
    /// Hot bodies of messages that live on disk, by message id.
    bodies: moka::sync::Cache<MessageId, MessageRef>,
    pub body_stats: Arc<CacheStats>,
    /// Batch sizes, write latency, page reads.
    pub store_stats: Arc<crate::metrics::StoreStats>,
    /// Memory pressure: queues then page transient messages out too.
    alarms: Arc<Alarms>,
    /// For reads at start-up (deduplication keys).
    store: Arc<dyn MessageStore>,
    /// Last: dropped after the senders above (fields drop in order).
    _joiner: Arc<Joiner>,
}

/// The store writer checks free disk space after writing this much ...
const DISK_CHECK_BYTES: u64 = 1 << 20;
/// ... or this long after its last check.
const DISK_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Persister {
    /// Start the writer and reader threads; they stop when the last handle
    /// is dropped. Message ids continue after `max_id`; the body cache holds
    /// up to `cache_bytes`.
    pub fn start(
        store: Arc<dyn MessageStore>,
        max_id: MessageId,
        cache_bytes: u64,
        alarms: Arc<Alarms>,
        commit_wait: std::time::Duration,
    ) -> std::io::Result<Persister> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let mut waits = CommitWait::new(commit_wait);
        let failures = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(Progress::default());
        let failed = failures.clone();
        let writer_store = store.clone();
        let writer_progress = progress.clone();
        let threads = StoreThreads::default();
        let writer_alarms = alarms.clone();
        let store_stats = Arc::new(crate::metrics::StoreStats::default());
        let writer_stats = store_stats.clone();
        let writer = std::thread::Builder::new().name("warren-store".into()).spawn(move || {
            let mut ops = Vec::new();
            // Free disk space is checked as writes are made (not only by the
            // alarm monitor, once a second): after every DISK_CHECK_BYTES
            // written, or DISK_CHECK_EVERY, whichever comes first.
            let mut unchecked: u64 = 0;
            let mut checked = std::time::Instant::now();
            let gather = |jobs: &mut Vec<Job>, n: &mut usize| {
                while *n < MAX_BATCH_OPS {
                    match rx.try_recv() {
                        Ok(j) => {
                            *n += j.ops.len();
                            jobs.push(j);
                        }
                        Err(_) => break,
                    }
                }
            };
            // Since when writes nobody waited for are not synced.
            let mut unsynced: Option<std::time::Instant> = None;
            let check = |r: warren_storage::Result<()>| match r {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, "message store write or sync failed; confirms will be nacked");
                    failed.fetch_add(1, Ordering::AcqRel);
                    false
                }
            };
            loop {
                let first = match unsynced {
                    None => match rx.recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    },
                    Some(since) => match rx.recv_timeout(UNSYNCED_FOR.saturating_sub(since.elapsed())) {
                        Ok(j) => j,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            writer_stats.deferred_syncs.fetch_add(1, Ordering::Relaxed);
                            check(writer_store.sync());
                            unsynced = None;
                            continue;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    },
                };
                let mut jobs = vec![first];
                let mut n = jobs[0].ops.len();
                gather(&mut jobs, &mut n);
                // A few messages to store: maybe wait a moment (CommitWait).
                let puts = count_puts(jobs.iter().flat_map(|j| &j.ops));
                let waited = n < MAX_BATCH_OPS && waits.should_wait(puts);
                if waited {
                    std::thread::sleep(waits.wait);
                    gather(&mut jobs, &mut n);
                }
                ops.clear();
                for j in &mut jobs {
                    ops.append(&mut j.ops);
                }
                let puts = count_puts(&ops);
                let elided = warren_storage::elide::elide_consumed(&mut ops);
                if elided > 0 {
                    writer_stats
                        .elided_ops
                        .fetch_add(elided as u64, Ordering::Relaxed);
                }
                if waited {
                    waits.observe(puts, puts - count_puts(&ops));
                }
                // Sync when somebody waits for this batch, or when earlier
                // unsynced writes are due.
                let sync = jobs.iter().any(|j| j.done.is_some())
                    || unsynced.is_some_and(|t| t.elapsed() >= UNSYNCED_FOR);
                let ok = check(commit(&*writer_store, &ops, sync, unsynced.is_some(), &writer_stats));
                if !ops.is_empty() {
                    unchecked += ops
                        .iter()
                        .map(|op| match op {
                            MessageOp::PutMessage { message, .. } => {
                                (message.body.len() + message.header.len() + 64) as u64
                            }
                            MessageOp::StreamChunk { records, .. } => records.len() as u64,
                            _ => 32,
                        })
                        .sum::<u64>();
                    if unchecked >= DISK_CHECK_BYTES || checked.elapsed() >= DISK_CHECK_EVERY {
                        writer_alarms.refresh_disk();
                        unchecked = 0;
                        checked = std::time::Instant::now();
                    }
                }
                if sync {
                    unsynced = None;
                } else if !ops.is_empty() && unsynced.is_none() {
                    unsynced = Some(std::time::Instant::now());
                }
                writer_progress.add_applied(jobs.len() as u64);
                for j in jobs {
                    if let Some(done) = j.done {
                        done(ok);
                    }
                }
            }
            if unsynced.is_some() {
                check(writer_store.sync());
            }
        })?;
        let bodies = moka::sync::Cache::builder()
            .max_capacity(cache_bytes)
            .weigher(|_, m: &MessageRef| (m.body.len() + 256).min(u32::MAX as usize) as u32)
            .build();
        let body_stats = Arc::new(CacheStats::default());
        let (reads, read_rx) = std::sync::mpsc::channel::<Read>();
        {
            let store = store.clone();
            let progress = progress.clone();
            let bodies = bodies.clone();
            let stats = body_stats.clone();
            let reader_stats = store_stats.clone();
            let pager = std::thread::Builder::new()
                .name("warren-pager".into())
                .spawn(move || {
                    while let Ok(job) = read_rx.recv() {
                        let job = match job {
                            Read::Page(job) => job,
                            Read::With { after, run } => {
                                progress.wait_applied(after);
                                run(&*store);
                                continue;
                            }
                        };
                        progress.wait_applied(job.after);
                        let page = read_page(&*store, &bodies, &stats, &job);
                        reader_stats.page_reads.fetch_add(1, Ordering::Relaxed);
                        if let Ok(p) = &page {
                            reader_stats
                                .paged_messages
                                .fetch_add(p.entries.len() as u64, Ordering::Relaxed);
                        }
                        (job.done)(page);
                    }
                })?;
            threads.add(writer);
            threads.add(pager);
        }
        Ok(Persister {
            _joiner: Arc::new(Joiner(threads.clone())),
            threads,
            tx,
            reads,
            permits: Arc::new(Semaphore::new(JOB_PERMITS)),
            failures,
            progress,
            next_id: Arc::new(AtomicU64::new(max_id + 1)),
            bodies,
            body_stats,
            store_stats,
            alarms,
            store,
        })
    }

    /// How many jobs have been submitted so far (a read that must see them
    /// waits for this many: [`Persister::read_delayed`]).
    pub fn submitted(&self) -> u64 {
        self.progress.submitted.load(Ordering::Acquire)
    }

    /// Up to `limit` delayed messages after `after`, in due order, with
    /// their messages, once the first `since` jobs are applied. Blocks:
    /// for `spawn_blocking`.
    pub fn read_delayed(
        &self,
        after: Option<(u64, MessageId)>,
        limit: usize,
        since: u64,
    ) -> Result<Vec<(warren_storage::DelayedEntry, Option<Message>)>, String> {
        self.progress.wait_applied(since);
        let entries = self
            .store
            .read_delayed(after, limit)
            .map_err(|e| e.to_string())?;
        let ids: Vec<MessageId> = entries.iter().map(|e| e.1).collect();
        let bodies = self.store.get_messages(&ids).map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .zip(bodies)
            .map(|(e, m)| {
                let id = e.1;
                (e, m.and_then(|m| Message::from_stored(id, m)))
            })
            .collect())
    }

    /// The deduplication keys stored for `scope` (read at start-up).
    pub fn load_dedup(&self, scope: &[u8]) -> Result<Vec<(bytes::Bytes, u64)>, String> {
        self.store.load_dedup(scope).map_err(|e| e.to_string())
    }

    /// A fresh message id.
    pub fn next_id(&self) -> MessageId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, job: Job) {
        self.progress.submitted.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.tx.send(job) {
            // The writer is gone (shutting down): never claim durability.
            if let Some(done) = e.0.done {
                done(false);
            }
        }
    }

    /// A slot without waiting: `None` while the writer is far behind,
    /// `Some(None)` once it has stopped.
    pub fn try_reserve(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(Some(p)),
            Err(TryAcquireError::Closed) => Some(None),
            Err(TryAcquireError::NoPermits) => None,
        }
    }

    /// A slot for one publisher job; waits while the writer is far behind.
    pub async fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Submit a publisher's job in a slot from [`Persister::reserve`].
    pub fn submit_reserved(
        &self,
        permit: Option<OwnedSemaphorePermit>,
        ops: Vec<MessageOp>,
        done: Done,
    ) {
        self.send(Job {
            ops,
            done: Some(done),
            _permit: permit,
        });
    }

    /// Submit a publisher's job; waits while the writer is far behind.
    pub async fn submit(&self, ops: Vec<MessageOp>, done: Done) {
        let permit = self.reserve().await;
        self.submit_reserved(permit, ops, done);
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

    /// Submit without waiting, and hear when the job is durable (a
    /// stream's appends: the stream bounds what it has outstanding).
    pub fn submit_then(&self, ops: Vec<MessageOp>, done: Done) {
        self.send(Job {
            ops,
            done: Some(done),
            _permit: None,
        });
    }

    /// Submit without waiting (queue actors: removals, page-outs).
    pub fn submit_nowait(&self, ops: Vec<MessageOp>) {
        self.send(Job {
            ops,
            done: None,
            _permit: None,
        });
    }

    /// Read up to `limit` entries of `queue` with `from <= seq < to`, after
    /// every job submitted so far is applied; `done` runs on the reader.
    pub fn read_page(&self, queue: QueueId, from: u64, to: u64, limit: usize, done: PageDone) {
        let job = ReadJob {
            queue,
            from,
            to,
            limit,
            after: self.progress.submitted.load(Ordering::Acquire),
            done,
        };
        if let Err(std::sync::mpsc::SendError(Read::Page(job))) = self.reads.send(Read::Page(job)) {
            (job.done)(Err("the store reader has stopped".into()));
        }
    }

    /// Run `run` on the reader thread once every job submitted so far is
    /// applied (streams read their records this way). If the reader has
    /// stopped, `run` is dropped unrun.
    pub fn read_with(&self, run: ReadFn) {
        let after = self.progress.submitted.load(Ordering::Acquire);
        let _ = self.reads.send(Read::With { after, run });
    }

    /// Read the store now, on the calling thread (start-up and rare
    /// commands: a stream's bounds, a timestamp seek).
    pub fn read_now<T>(&self, f: impl FnOnce(&dyn MessageStore) -> T) -> T {
        f(&*self.store)
    }

    /// Keep a message that was just written and will be read back soon.
    pub fn cache_body(&self, id: MessageId, msg: &MessageRef) {
        self.bodies.insert(id, msg.clone());
    }

    /// Whether queues should page transient messages out (memory pressure).
    pub fn paging(&self) -> bool {
        self.alarms.paging()
    }
}

fn read_page(
    store: &dyn MessageStore,
    bodies: &moka::sync::Cache<MessageId, MessageRef>,
    stats: &CacheStats,
    job: &ReadJob,
) -> Result<Page, String> {
    let index = store
        .read_index(job.queue, job.from, job.to, job.limit)
        .map_err(|e| e.to_string())?;
    let next = match index.last() {
        Some(&(seq, _, _)) if index.len() >= job.limit => seq + 1,
        _ => job.to,
    };
    let mut found: Vec<Option<MessageRef>> =
        index.iter().map(|&(_, id, _)| bodies.get(&id)).collect();
    let missing: Vec<MessageId> = index
        .iter()
        .zip(&found)
        .filter(|(_, m)| m.is_none())
        .map(|(&(_, id, _), _)| id)
        .collect();
    stats
        .hits
        .fetch_add((index.len() - missing.len()) as u64, Ordering::Relaxed);
    stats
        .misses
        .fetch_add(missing.len() as u64, Ordering::Relaxed);
    if !missing.is_empty() {
        let mut read = store
            .get_messages(&missing)
            .map_err(|e| e.to_string())?
            .into_iter();
        for (slot, &(seq, id, _)) in found.iter_mut().zip(&index) {
            if slot.is_some() {
                continue;
            }
            match read.next().flatten() {
                Some(m) => match Message::from_stored(id, m) {
                    Some(m) => *slot = Some(Arc::new(m)),
                    None => tracing::error!(
                        queue = job.queue,
                        seq,
                        id,
                        "stored message is unreadable; skipped"
                    ),
                },
                None => tracing::error!(
                    queue = job.queue,
                    seq,
                    id,
                    "queue entry refers to a missing message; skipped"
                ),
            }
        }
    }
    let entries = index
        .into_iter()
        .zip(found)
        .filter_map(|((seq, _, meta), m)| m.map(|m| (seq, m, meta)))
        .collect();
    Ok(Page { entries, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits_in(w: &mut CommitWait, batches: u64, puts: usize) -> u64 {
        (0..batches).filter(|_| w.should_wait(puts)).count() as u64
    }

    #[test]
    fn the_writer_waits_only_while_waiting_pays_off() {
        let mut w = CommitWait::new(std::time::Duration::from_micros(200));
        // Nothing to store, or a batch big enough: never.
        assert!(!w.should_wait(0));
        assert!(!w.should_wait(COMMIT_WAIT_MAX_PUTS));
        // At first it tries waiting.
        assert_eq!(waits_in(&mut w, 10, 3), 10);
        // Nothing elided (no consumer kept up): one batch in
        // COMMIT_WAIT_PROBE waits, to notice a change.
        for _ in 0..3 {
            w.observe(3, 0);
        }
        assert_eq!(waits_in(&mut w, 10 * COMMIT_WAIT_PROBE, 3), 10);
        // Probes whose messages were all acked meanwhile: every batch waits.
        for _ in 0..3 {
            w.observe(3, 3);
        }
        assert_eq!(waits_in(&mut w, 100, 3), 100);
        // Off: never.
        let mut off = CommitWait::new(std::time::Duration::ZERO);
        assert_eq!(waits_in(&mut off, 100, 3), 0);
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;
    use warren_storage::mem::MemStore;

    fn put_ops(id: MessageId) -> Vec<MessageOp> {
        vec![
            MessageOp::PutMessage {
                id,
                refs: 1,
                message: warren_storage::StoredMessage {
                    exchange: bytes::Bytes::new(),
                    routing_key: bytes::Bytes::from_static(b"q"),
                    header: bytes::Bytes::new(),
                    body: bytes::Bytes::from_static(b"payment"),
                },
            },
            MessageOp::Enqueue {
                queue: 1,
                seq: id,
                id,
                meta: EntryMeta::default(),
            },
        ]
    }

    #[test]
    fn a_message_acked_while_its_write_waits_is_never_written() {
        let store = Arc::new(MemStore::new());
        let dir = tempfile::tempdir().unwrap();
        let alarms = Alarms::start(dir.path(), u64::MAX, 0);
        let p = Persister::start(
            store.clone(),
            0,
            1 << 20,
            alarms,
            std::time::Duration::from_millis(50),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let confirmed = move |tx: std::sync::mpsc::Sender<bool>| -> Done {
            Box::new(move |ok| tx.send(ok).unwrap())
        };
        // Acked within the wait: confirmed, and nothing is stored.
        p.submit_then(put_ops(1), confirmed(tx.clone()));
        p.submit_nowait(vec![MessageOp::Remove {
            queue: 1,
            seq: 1,
            id: 1,
        }]);
        assert!(rx.recv().unwrap());
        assert_eq!(p.store_stats.elided_ops.load(Ordering::Relaxed), 3);
        assert_eq!(store.get_messages(&[1]).unwrap(), vec![None]);
        // Not acked: stored as ever, and confirmed once it is.
        p.submit_then(put_ops(2), confirmed(tx));
        assert!(rx.recv().unwrap());
        assert!(store.get_messages(&[2]).unwrap()[0].is_some());
        assert_eq!(store.read_index(1, 0, u64::MAX, 10).unwrap().len(), 1);
        assert_eq!(p.store_stats.elided_ops.load(Ordering::Relaxed), 3);
    }

    /// A store that remembers what a crash would keep: the writes made up
    /// to its last sync.
    struct Durable {
        live: MemStore,
        durable: MemStore,
        unsynced: std::sync::Mutex<Vec<Vec<MessageOp>>>,
    }

    impl Durable {
        fn sync_now(&self) -> warren_storage::Result<()> {
            for ops in self.unsynced.lock().unwrap().drain(..) {
                self.durable.apply(&ops)?;
            }
            Ok(())
        }
    }

    impl MessageStore for Durable {
        fn apply(&self, ops: &[MessageOp]) -> warren_storage::Result<()> {
            self.live.apply(ops)?;
            self.unsynced.lock().unwrap().push(ops.to_vec());
            self.sync_now()
        }
        fn apply_unsynced(&self, ops: &[MessageOp]) -> warren_storage::Result<()> {
            self.live.apply(ops)?;
            self.unsynced.lock().unwrap().push(ops.to_vec());
            Ok(())
        }
        fn sync(&self) -> warren_storage::Result<()> {
            self.sync_now()
        }
        fn read_index(
            &self,
            queue: QueueId,
            from: u64,
            to: u64,
            limit: usize,
        ) -> warren_storage::Result<Vec<(u64, MessageId, EntryMeta)>> {
            self.live.read_index(queue, from, to, limit)
        }
        fn get_messages(
            &self,
            ids: &[MessageId],
        ) -> warren_storage::Result<Vec<Option<warren_storage::StoredMessage>>> {
            self.live.get_messages(ids)
        }
        fn bounds(
            &self,
            queue: QueueId,
        ) -> warren_storage::Result<Option<warren_storage::QueueBounds>> {
            self.live.bounds(queue)
        }
        fn max_message_id(&self) -> warren_storage::Result<MessageId> {
            self.live.max_message_id()
        }
        fn queue_ids(&self) -> warren_storage::Result<Vec<QueueId>> {
            self.live.queue_ids()
        }
        fn load_dedup(&self, scope: &[u8]) -> warren_storage::Result<Vec<(bytes::Bytes, u64)>> {
            self.live.load_dedup(scope)
        }
        fn read_stream(
            &self,
            stream: QueueId,
            from: u64,
            limit: usize,
        ) -> warren_storage::Result<Vec<warren_storage::StreamRecord>> {
            self.live.read_stream(stream, from, limit)
        }
        fn stream_ids(&self) -> warren_storage::Result<Vec<QueueId>> {
            self.live.stream_ids()
        }
        fn stream_bounds(&self, stream: QueueId) -> warren_storage::Result<Option<(u64, u64)>> {
            self.live.stream_bounds(stream)
        }
        fn stream_seek_time(
            &self,
            stream: QueueId,
            timestamp: u64,
        ) -> warren_storage::Result<Option<u64>> {
            self.live.stream_seek_time(stream, timestamp)
        }
        fn read_delayed(
            &self,
            after: Option<(u64, MessageId)>,
            limit: usize,
        ) -> warren_storage::Result<Vec<warren_storage::DelayedEntry>> {
            self.live.read_delayed(after, limit)
        }
    }

    fn remove(id: MessageId) -> Vec<MessageOp> {
        vec![MessageOp::Remove {
            queue: 1,
            seq: id,
            id,
        }]
    }

    #[test]
    fn acks_are_written_without_a_sync_and_synced_soon_after() {
        let store = Arc::new(Durable {
            live: MemStore::new(),
            durable: MemStore::new(),
            unsynced: Default::default(),
        });
        let dir = tempfile::tempdir().unwrap();
        let alarms = Alarms::start(dir.path(), u64::MAX, 0);
        let p =
            Persister::start(store.clone(), 0, 1 << 20, alarms, std::time::Duration::ZERO).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let confirmed = move |tx: std::sync::mpsc::Sender<bool>| -> Done {
            Box::new(move |ok| tx.send(ok).unwrap())
        };
        let stored = |s: &MemStore, id| s.get_messages(&[id]).unwrap()[0].is_some();
        for id in [1, 2] {
            p.submit_then(put_ops(id), confirmed(tx.clone()));
            assert!(rx.recv().unwrap());
            assert!(stored(&store.durable, id), "a confirm waits for the sync");
        }
        // An ack: applied at once, durable only later.
        p.submit_nowait(remove(1));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while stored(&store.live, 1) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let durable_then = stored(&store.durable, 1);
        if p.store_stats.deferred_syncs.load(Ordering::Relaxed) == 0 {
            assert!(durable_then, "no sync was due yet");
        }
        assert_eq!(p.store_stats.unsynced_writes.load(Ordering::Relaxed), 1);
        // ... synced within UNSYNCED_FOR, with no other write to carry it.
        while stored(&store.durable, 1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the ack was never synced"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(p.store_stats.deferred_syncs.load(Ordering::Relaxed), 1);
        // An ack followed by a write somebody waits for: that sync covers it.
        p.submit_nowait(remove(2));
        p.submit_then(put_ops(3), confirmed(tx));
        assert!(rx.recv().unwrap());
        assert!(!stored(&store.durable, 2) && stored(&store.durable, 3));
        // A barrier (tx.commit) makes earlier acks durable too.
        p.submit_nowait(remove(3));
        assert!(tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(p.barrier()));
        assert!(!stored(&store.durable, 3));
    }
}
