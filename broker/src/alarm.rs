//! Resource alarms, as RabbitMQ's memory high watermark and free disk limit.
//!
//! A monitor thread samples the memory Warren uses every 100 ms: the
//! allocator's resident memory ([`crate::heap::used`]) plus the anonymous
//! memory the process holds outside the allocator (thread stacks, other
//! mappings: anonymous RSS minus the allocator's memory, re-measured every
//! second). The binary's own code pages are not counted: they are
//! file-backed, and the kernel drops and re-reads them as it needs. The
//! measure falls as soon as freed pages go back to the system; without
//! jemalloc it is the anonymous RSS. Memory is also sampled at once whenever connections
//! have read more bytes since the last sample than a quarter of the room
//! left below the limit ([`Alarms::note_ingress`]), so a fast publisher
//! cannot overshoot the limit by 100 ms worth of input before it is
//! blocked. The free space of the data directory (`statvfs`) is sampled
//! every second. While the memory used is at or above the memory limit, or
//! the free space is below the disk free limit, an alarm is on and
//! connections that publish are blocked (see `connection.rs`): they get
//! `connection.blocked` with RabbitMQ's reason text ("low on memory",
//! "low on disk") and stop reading their sockets until every alarm clears.
//!
//! Hysteresis: an alarm is set as soon as its threshold is crossed, but is
//! cleared only with a margin of 2% of the limit (memory: below 98% of the
//! limit; disk: free space at or above 102% of the limit), so a process
//! that hovers around its limit does not flap between blocked and unblocked
//! every sample.
//!
//! [`Alarms::paging`] is true while memory used is at or above half the limit
//! (RabbitMQ's paging ratio): queues may use it to move transient messages
//! out of memory. It is an atomic load, cheap enough for every enqueue.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often memory is sampled (more often under fast input).
pub const MEMORY_INTERVAL: Duration = Duration::from_millis(100);
/// Free disk space is sampled every this many memory samples (1 s).
const DISK_EVERY: u32 = 10;
/// RabbitMQ's default `vm_memory_high_watermark.relative`.
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.4;
/// RabbitMQ's default `disk_free_limit.absolute` (50 MB).
pub const DEFAULT_DISK_FREE_LIMIT: u64 = 50_000_000;
/// RabbitMQ's `vm_memory_high_watermark_paging_ratio`.
pub const PAGING_RATIO: f64 = 0.5;
/// The least input between two input-triggered memory samples.
const MIN_INGRESS_BUDGET: u64 = 256 << 10;

/// Which alarms are on. Connections watch this through [`Alarms::subscribe`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Blocked {
    /// Memory used reached the memory limit.
    pub memory: bool,
    /// Free disk space fell below the disk free limit.
    pub disk: bool,
}

impl Blocked {
    /// Whether any alarm is on (publishers must be blocked).
    pub fn any(&self) -> bool {
        self.memory || self.disk
    }

    /// The `connection.blocked` reason, as RabbitMQ words it: "low on memory",
    /// "low on disk" or "low on memory & disk". `None` when no alarm is on.
    pub fn reason(&self) -> Option<&'static str> {
        match (self.memory, self.disk) {
            (true, true) => Some("low on memory & disk"),
            (true, false) => Some("low on memory"),
            (false, true) => Some("low on disk"),
            (false, false) => None,
        }
    }
}

/// The broker's resource alarms. Shared as `Arc<Alarms>`; the monitor thread
/// stops on its own once the last `Arc` is dropped.
pub struct Alarms {
    data_dir: PathBuf,
    memory_limit: AtomicU64,
    disk_free_limit: AtomicU64,
    paging: AtomicBool,
    /// Whether any alarm is on: the state's `any()`, readable without the
    /// watch channel's lock (connections check it for every publish).
    on: AtomicBool,
    /// Last samples (`u64::MAX`: unknown).
    rss: AtomicU64,
    /// Anonymous resident memory the allocator does not manage (thread
    /// stacks, other mappings): anonymous RSS minus the allocator's resident
    /// memory, sampled every second and added to every memory sample.
    overhead: AtomicU64,
    /// Bytes read by connections since the last memory sample, and how many
    /// may be read before the next one is taken at once.
    ingress: AtomicU64,
    ingress_budget: AtomicU64,
    /// An input-triggered sample was asked for and not yet taken.
    wake_pending: AtomicBool,
    /// The monitor thread, to wake it early.
    monitor: OnceLock<std::thread::Thread>,
    /// The monitor's regular sampling interval ([`MEMORY_INTERVAL`]).
    interval: Duration,
    disk_free: AtomicU64,
    state: watch::Sender<Blocked>,
    /// Serialises evaluation (monitor thread and setters), so that state
    /// changes are logged once and in order.
    eval: Mutex<()>,
    /// The disk could not be read; warned once.
    disk_warned: AtomicBool,
}

impl Alarms {
    /// Take first samples and start the monitor thread.
    pub fn start(data_dir: &Path, memory_limit: u64, disk_free_limit: u64) -> Arc<Alarms> {
        Alarms::start_every(data_dir, memory_limit, disk_free_limit, MEMORY_INTERVAL)
    }

    fn start_every(
        data_dir: &Path,
        memory_limit: u64,
        disk_free_limit: u64,
        interval: Duration,
    ) -> Arc<Alarms> {
        let mut alarms = Alarms::new(data_dir, memory_limit, disk_free_limit);
        alarms.interval = interval;
        let alarms = Arc::new(alarms);
        alarms.refresh();
        tracing::info!(
            memory_limit,
            disk_free_limit,
            memory_used = alarms.rss(),
            disk_free = alarms.disk_free(),
            "resource limits: memory high watermark {} bytes (measured as {}), disk free limit {} bytes",
            memory_limit,
            crate::heap::MEASURE,
            disk_free_limit
        );
        let weak = Arc::downgrade(&alarms);
        let spawned = std::thread::Builder::new()
            .name("warren-alarms".into())
            .spawn(move || monitor(weak));
        match spawned {
            Ok(handle) => {
                let _ = alarms.monitor.set(handle.thread().clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the resource monitor; alarms stay as first sampled");
            }
        }
        alarms
    }

    /// Alarms without a monitor thread (unit tests feed samples by hand).
    fn new(data_dir: &Path, memory_limit: u64, disk_free_limit: u64) -> Alarms {
        Alarms {
            data_dir: data_dir.to_owned(),
            memory_limit: AtomicU64::new(memory_limit),
            disk_free_limit: AtomicU64::new(disk_free_limit),
            paging: AtomicBool::new(false),
            on: AtomicBool::new(false),
            rss: AtomicU64::new(u64::MAX),
            overhead: AtomicU64::new(0),
            ingress: AtomicU64::new(0),
            ingress_budget: AtomicU64::new(MIN_INGRESS_BUDGET),
            wake_pending: AtomicBool::new(false),
            monitor: OnceLock::new(),
            interval: MEMORY_INTERVAL,
            disk_free: AtomicU64::new(u64::MAX),
            state: watch::channel(Blocked::default()).0,
            eval: Mutex::new(()),
            disk_warned: AtomicBool::new(false),
        }
    }

    /// True while memory used is at or above half the limit: queues should
    /// page transient messages out of memory.
    pub fn paging(&self) -> bool {
        self.paging.load(Ordering::Relaxed)
    }

    /// Whether any alarm is on (one atomic load: cheap on the publish path).
    pub fn any(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// The current alarm state, and every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<Blocked> {
        self.state.subscribe()
    }

    /// The current alarm state.
    pub fn state(&self) -> Blocked {
        *self.state.borrow()
    }

    /// The memory high watermark in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit.load(Ordering::Relaxed)
    }

    /// The disk free limit in bytes.
    pub fn disk_free_limit(&self) -> u64 {
        self.disk_free_limit.load(Ordering::Relaxed)
    }

    /// Last sampled memory use in bytes, as the alarm counts it
    /// ([`crate::heap::used`]; `None` if it cannot be read).
    pub fn rss(&self) -> Option<u64> {
        known(self.rss.load(Ordering::Relaxed))
    }

    /// Last sampled free space of the data directory in bytes.
    pub fn disk_free(&self) -> Option<u64> {
        known(self.disk_free.load(Ordering::Relaxed))
    }

    /// Change the memory high watermark; re-evaluated at once.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.memory_limit.store(bytes, Ordering::Relaxed);
        self.refresh();
    }

    /// Change the disk free limit; re-evaluated at once.
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_free_limit.store(bytes, Ordering::Relaxed);
        self.refresh();
    }

    /// Count `bytes` read from a client socket. Once the input since the
    /// last sample exceeds a quarter of the room left below the memory
    /// limit, the monitor samples memory at once (one relaxed atomic add
    /// per read otherwise).
    pub fn note_ingress(&self, bytes: usize) {
        let total = self.ingress.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        if total >= self.ingress_budget.load(Ordering::Relaxed)
            && !self.wake_pending.swap(true, Ordering::AcqRel)
        {
            if let Some(t) = self.monitor.get() {
                t.unpark();
            }
        }
    }

    /// Sample the disk now (the store's writer calls this as it writes, so
    /// that publishers are blocked before the disk is full, not up to a
    /// second later).
    pub fn refresh_disk(&self) {
        let free = self.sample_disk();
        self.apply(self.rss(), free);
    }

    /// Sample memory and disk now and update the alarms.
    pub fn refresh(&self) {
        let free = self.sample_disk();
        self.sample_overhead();
        self.apply(self.sample_memory(), free);
    }

    /// The memory used now: the allocator's resident memory plus the last
    /// sampled overhead (RSS itself without jemalloc).
    fn sample_memory(&self) -> Option<u64> {
        crate::heap::used().map(|u| u + self.overhead.load(Ordering::Relaxed))
    }

    /// Re-measure what anonymous RSS holds beyond the allocator's memory.
    fn sample_overhead(&self) {
        if !cfg!(feature = "jemalloc") {
            return; // the measure is anonymous RSS itself
        }
        if let (Some(rss), Some(heap)) = (crate::heap::process_anon_rss(), crate::heap::used()) {
            self.overhead
                .store(rss.saturating_sub(heap), Ordering::Relaxed);
        }
    }

    fn sample_disk(&self) -> Option<u64> {
        match disk_free(&self.data_dir) {
            Ok(free) => {
                self.disk_warned.store(false, Ordering::Relaxed);
                Some(free)
            }
            Err(e) => {
                if !self.disk_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.data_dir.display(), error = %e, "cannot read free disk space; the disk alarm is off until it can");
                }
                None
            }
        }
    }

    /// Update the alarms from samples (`None`: unknown, keep the previous
    /// sample for the disk; no memory alarm when memory cannot be read).
    fn apply(&self, rss: Option<u64>, free: Option<u64>) {
        let _guard = self.eval.lock().unwrap_or_else(|e| e.into_inner());
        let rss = rss.unwrap_or(u64::MAX);
        self.rss.store(rss, Ordering::Relaxed);
        // The next input-triggered sample: after a quarter of the room left.
        let room = self.memory_limit().saturating_sub(rss);
        self.ingress_budget
            .store((room / 4).max(MIN_INGRESS_BUDGET), Ordering::Relaxed);
        self.ingress.store(0, Ordering::Relaxed);
        self.wake_pending.store(false, Ordering::Release);
        if let Some(f) = free {
            self.disk_free.store(f, Ordering::Relaxed);
        }
        let free = self.disk_free.load(Ordering::Relaxed);
        let mem_limit = self.memory_limit();
        let disk_limit = self.disk_free_limit();
        let prev = self.state();
        let rss_known = rss != u64::MAX;
        let free_known = free != u64::MAX;
        let margin = |limit: u64| limit / 50;

        self.paging.store(
            rss_known && rss as f64 >= mem_limit as f64 * PAGING_RATIO,
            Ordering::Relaxed,
        );
        let memory = rss_known
            && if prev.memory {
                rss >= mem_limit.saturating_sub(margin(mem_limit))
            } else {
                rss >= mem_limit
            };
        let disk = free_known
            && if prev.disk {
                free < disk_limit.saturating_add(margin(disk_limit))
            } else {
                free < disk_limit
            };
        let next = Blocked { memory, disk };
        if next == prev {
            return;
        }
        if memory && !prev.memory {
            tracing::warn!(
                rss,
                limit = mem_limit,
                "memory resource limit alarm set: {} {} >= limit {}; publishers are blocked",
                crate::heap::MEASURE,
                rss,
                mem_limit
            );
        } else if !memory && prev.memory {
            tracing::info!(
                rss,
                limit = mem_limit,
                "memory resource limit alarm cleared: {} {} < limit {}",
                crate::heap::MEASURE,
                rss,
                mem_limit
            );
        }
        if disk && !prev.disk {
            tracing::warn!(
                free,
                limit = disk_limit,
                dir = %self.data_dir.display(),
                "disk resource limit alarm set: free space {} < limit {}; publishers are blocked",
                free,
                disk_limit
            );
        } else if !disk && prev.disk {
            tracing::info!(
                free,
                limit = disk_limit,
                dir = %self.data_dir.display(),
                "disk resource limit alarm cleared: free space {} >= limit {}",
                free,
                disk_limit
            );
        }
        self.on.store(next.any(), Ordering::Release);
        self.state.send_replace(next);
    }
}

fn known(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

/// The monitor loop: runs until the `Alarms` is dropped. It wakes every
/// [`MEMORY_INTERVAL`], or early when input asks for a sample.
fn monitor(weak: Weak<Alarms>) {
    let Some(interval) = weak.upgrade().map(|a| a.interval) else {
        return;
    };
    let mut next_tick = Instant::now() + interval;
    let mut until_disk = DISK_EVERY;
    let mut released = Instant::now();
    loop {
        let now = Instant::now();
        if now < next_tick {
            std::thread::park_timeout(next_tick - now);
        }
        let Some(alarms) = weak.upgrade() else {
            return;
        };
        let ticked = Instant::now() >= next_tick;
        if !ticked && !alarms.wake_pending.load(Ordering::Acquire) {
            continue; // a spurious wake-up
        }
        let mut free = None;
        if ticked {
            next_tick = Instant::now() + interval;
            // Above half the limit, give freed memory back to the system (at
            // most once a second) where the allocator does not on its own.
            if alarms.paging() && released.elapsed() >= RELEASE_EVERY {
                crate::heap::release();
                released = Instant::now();
            }
            until_disk -= 1;
            if until_disk == 0 {
                until_disk = DISK_EVERY;
                free = alarms.sample_disk();
                alarms.sample_overhead();
            }
        }
        alarms.apply(alarms.sample_memory(), free);
    }
}

/// How often, at most, freed heap memory is handed back to the system.
const RELEASE_EVERY: Duration = Duration::from_secs(1);

// ------------------------------------------------------------ system probes

/// Bytes available to unprivileged users on the file system holding `dir`.
pub fn disk_free(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a valid NUL-terminated string and `st` a properly
    // sized, writable statvfs that the call fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field types differ between targets (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (st.f_bavail as u64, st.f_frsize as u64);
    Ok(avail.saturating_mul(frsize))
}

/// The memory this process may use: MemTotal from `/proc/meminfo`, or a
/// lower cgroup limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) of the
/// process's cgroup or any of its ancestors.
pub fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let total = meminfo.as_deref().and_then(parse_meminfo_total);
    match (total, cgroup_memory_limit()) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | Some("KB") | Some("kb") => Some(n.saturating_mul(1024)),
        None => Some(n),
        Some(_) => None,
    }
}

/// The lowest cgroup memory limit on the way from this process's cgroup to
/// the root of the (possibly namespaced) hierarchy.
fn cgroup_memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (base, file) = if id == "0" && controllers.is_empty() {
            (PathBuf::from("/sys/fs/cgroup"), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                PathBuf::from("/sys/fs/cgroup/memory"),
                "memory.limit_in_bytes",
            )
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            candidates.push(dir.join(file));
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    // Inside a container the process's cgroup is usually the mount's root.
    candidates.push(PathBuf::from("/sys/fs/cgroup/memory.max"));
    candidates.push(PathBuf::from("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| parse_cgroup_limit(&s))
        .min()
}

/// "max" (v2) and v1's huge page-rounded i64::MAX mean no limit.
fn parse_cgroup_limit(s: &str) -> Option<u64> {
    let n: u64 = s.trim().parse().ok()?;
    (n < (1 << 62)).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarms(mem: u64, disk: u64) -> Alarms {
        Alarms::new(Path::new("."), mem, disk)
    }

    #[test]
    fn reasons_as_rabbitmq() {
        let b = |memory, disk| Blocked { memory, disk };
        assert_eq!(b(false, false).reason(), None);
        assert_eq!(b(true, false).reason(), Some("low on memory"));
        assert_eq!(b(false, true).reason(), Some("low on disk"));
        assert_eq!(b(true, true).reason(), Some("low on memory & disk"));
        assert!(!b(false, false).any());
        assert!(b(false, true).any());
    }

    #[test]
    fn memory_alarm_sets_at_limit_and_clears_below_margin() {
        let a = alarms(1000, 0);
        let mut rx = a.subscribe();
        a.apply(Some(999), Some(10));
        assert!(!a.state().memory);
        assert!(a.paging(), "999 >= 50% of 1000");
        a.apply(Some(1000), None);
        assert!(a.state().memory);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().reason(), Some("low on memory"));
        // Within the 2% margin: still on.
        a.apply(Some(985), None);
        assert!(a.state().memory);
        a.apply(Some(979), None);
        assert!(!a.state().memory);
        a.apply(Some(499), None);
        assert!(!a.paging());
    }

    #[test]
    fn disk_alarm_sets_below_limit_and_clears_above_margin() {
        let a = alarms(u64::MAX, 1000);
        a.apply(Some(1), Some(1000));
        assert!(!a.state().disk);
        a.apply(Some(1), Some(999));
        assert_eq!(a.state().reason(), Some("low on disk"));
        // A memory sample without a disk sample keeps the last disk sample.
        a.apply(Some(1), None);
        assert!(a.state().disk);
        a.apply(Some(1), Some(1010));
        assert!(a.state().disk);
        a.apply(Some(1), Some(1020));
        assert!(!a.state().disk);
        // Zero disables the disk alarm.
        a.disk_free_limit.store(0, Ordering::Relaxed);
        a.apply(Some(1), Some(0));
        assert!(!a.state().disk);
    }

    #[test]
    fn unknown_rss_raises_no_memory_alarm() {
        let a = alarms(0, 0);
        a.apply(None, None);
        assert!(!a.state().any());
        assert!(!a.paging());
        assert_eq!(a.rss(), None);
    }

    #[test]
    fn setters_take_effect_at_once() {
        let a = Alarms::start(Path::new("."), u64::MAX >> 2, 0);
        assert!(!a.state().any());
        assert!(a.rss().is_some_and(|r| r > 0));
        a.set_memory_limit(1);
        assert_eq!(a.state().reason(), Some("low on memory"));
        assert!(a.paging());
        a.set_disk_free_limit(u64::MAX >> 2);
        assert_eq!(a.state().reason(), Some("low on memory & disk"));
        a.set_memory_limit(u64::MAX >> 2);
        a.set_disk_free_limit(0);
        assert!(!a.state().any());
        assert!(!a.paging());
    }

    #[test]
    fn fast_input_triggers_a_sample_before_the_tick() {
        // A limit far above use: the budget is a quarter of the room. The
        // monitor's tick is an hour away: only input can wake it.
        let a = Alarms::start_every(Path::new("."), 1 << 40, 0, Duration::from_secs(3600));
        let budget = a.ingress_budget.load(Ordering::Relaxed);
        assert!(budget >= (1 << 40) / 5, "budget {budget}");
        // Within the budget: no early sample asked for.
        a.note_ingress(1000);
        assert!(!a.wake_pending.load(Ordering::Relaxed));
        // Over it: a sample is asked for, and the monitor takes it (which
        // resets the count).
        a.note_ingress(budget as usize);
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.wake_pending.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the monitor did not wake");
            std::thread::yield_now();
        }
        assert_eq!(a.ingress.load(Ordering::Relaxed), 0);
        // Near the limit the budget shrinks to its floor.
        a.set_memory_limit(a.rss().unwrap() + 1);
        assert_eq!(a.ingress_budget.load(Ordering::Relaxed), MIN_INGRESS_BUDGET);
    }

    #[test]
    fn probes_read_this_machine() {
        assert!(disk_free(Path::new(".")).is_ok());
        assert!(disk_free(Path::new("/definitely/not/here")).is_err());
        assert!(total_memory().is_some_and(|t| t > 0));
    }

    #[test]
    fn parses_meminfo_and_cgroup_files() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24683656 kB\nMemFree: 1 kB\n"),
            Some(24683656 * 1024)
        );
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("536870912\n"), Some(536870912));
    }
}
