//! The process's allocator and its statistics.
//!
//! With the `jemalloc` feature (the default) jemalloc is the allocator of
//! the whole process: Rust's global allocator here, and, because its
//! `malloc` is exported unprefixed, RocksDB's C++ allocations too. It is
//! configured (see [`MALLOC_CONF`]) to hand freed pages back to the system
//! after about a second, from its own background threads, so memory freed
//! by a drained queue leaves the process even when nothing else happens.
//!
//! [`used`] is the memory alarm's measure: jemalloc's `stats.resident`,
//! every page the allocator holds in memory (live allocations, its own
//! metadata, and freed pages not yet returned). It falls as soon as freed
//! pages are returned, unlike glibc's RSS, which stays high. Without the
//! feature it is the process's anonymous RSS, and [`release`] asks glibc
//! to trim.

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's configuration, read at its first allocation: background
/// threads purge freed ("dirty") pages after 1 s (jemalloc's default is
/// 10 s, which would hold a drained burst and its memory alarm that long).
#[cfg(feature = "jemalloc")]
#[export_name = "malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// What [`used`] measures, for logs and the README.
#[cfg(feature = "jemalloc")]
pub const MEASURE: &str = "allocator resident memory";
#[cfg(not(feature = "jemalloc"))]
pub const MEASURE: &str = "anonymous RSS";

/// The memory Warren uses, in bytes, as the memory alarm counts it.
#[cfg(feature = "jemalloc")]
pub fn used() -> Option<u64> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot refreshed by advancing the epoch.
    epoch::advance().ok()?;
    stats::resident::read().ok().map(|b| b as u64)
}

#[cfg(not(feature = "jemalloc"))]
pub fn used() -> Option<u64> {
    process_anon_rss()
}

/// Bytes in live allocations (jemalloc's `stats.allocated`), when known.
pub fn allocated() -> Option<u64> {
    #[cfg(feature = "jemalloc")]
    {
        use tikv_jemalloc_ctl::{epoch, stats};
        epoch::advance().ok()?;
        stats::allocated::read().ok().map(|b| b as u64)
    }
    #[cfg(not(feature = "jemalloc"))]
    None
}

/// Give freed memory back to the system now, where the allocator does not
/// do it on its own (glibc: `malloc_trim`). jemalloc's background threads
/// already do it, so this is a no-op with it.
pub fn release() {
    #[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in bytes (Linux: `/proc/self/statm`).
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

/// The anonymous part of the resident set (RSS minus file-backed and
/// shared pages: the heap, RocksDB's memory, thread stacks; not the
/// binary's code, which the kernel can drop and read back).
pub fn process_anon_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut f = statm.split_whitespace().skip(1);
    let resident: u64 = f.next()?.parse().ok()?;
    let shared: u64 = f.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared).saturating_mul(page_size()))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    /// One test (not two running side by side): other tests' large frees
    /// would blur what this one measures.
    #[test]
    fn used_grows_with_an_allocation_and_falls_after_it() {
        const BIG: u64 = 256 << 20;
        let before = super::used().expect("a measure");
        assert!(before > 0);
        let big: Vec<u8> = std::hint::black_box(vec![1; BIG as usize]);
        let during = super::used().expect("a measure");
        assert!(
            during >= before + BIG * 3 / 4,
            "256 MiB touched: {before} -> {during}"
        );
        drop(big);
        if cfg!(feature = "jemalloc") {
            // Freed pages go back to the system within the decay time.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let now = super::used().unwrap();
                if now + BIG / 2 <= during {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "256 MiB freed but resident memory stays at {now} (was {during})"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    #[test]
    fn rss_is_read() {
        let rss = super::process_rss().unwrap();
        let anon = super::process_anon_rss().unwrap();
        assert!(anon > 0 && anon < rss, "anon {anon} of rss {rss}");
    }
}
