//! Failed logins: a source address that keeps failing is answered more and
//! more slowly (a password guesser gets a few tries a second at most, from
//! the handshake budget it holds meanwhile), and refusals are logged at most
//! once a second with a count of those not logged, so a flood of bad logins
//! is not a flood of log lines. No I/O here: the handshake sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures a source may have (within `FORGET`) before it is slowed.
const FREE_FAILURES: u32 = 3;
/// Added to the answer's delay per failure past the free ones.
const STEP: Duration = Duration::from_millis(500);
/// The longest delay.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// A source whose last failure is older than this starts afresh.
const FORGET: Duration = Duration::from_secs(60);
/// Sources remembered at most (the oldest are forgotten first).
const MAX_SOURCES: usize = 10_000;

#[derive(Default)]
pub struct LoginFailures {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Failures by source, with the time of the last one.
    sources: HashMap<IpAddr, (u32, Instant)>,
    /// When a refusal was last logged.
    last_log: Option<Instant>,
    /// Refusals not logged since then.
    unlogged: u64,
}

/// What to do about one refused login.
pub struct Refusal {
    /// Wait this long before answering.
    pub delay: Duration,
    /// Log it, mentioning this many refusals that were not logged.
    pub log: Option<u64>,
}

impl LoginFailures {
    /// A login from `source` was refused.
    pub fn failed(&self, source: IpAddr) -> Refusal {
        self.failed_at(source, Instant::now())
    }

    fn failed_at(&self, source: IpAddr, now: Instant) -> Refusal {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.sources.len() >= MAX_SOURCES && !g.sources.contains_key(&source) {
            g.sources
                .retain(|_, (_, last)| now.duration_since(*last) < FORGET);
            if g.sources.len() >= MAX_SOURCES {
                if let Some(oldest) = g.sources.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) {
                    g.sources.remove(&oldest);
                }
            }
        }
        let e = g.sources.entry(source).or_insert((0, now));
        if now.duration_since(e.1) >= FORGET {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        let over = e.0.saturating_sub(FREE_FAILURES);
        let delay = STEP.saturating_mul(over).min(MAX_DELAY);
        let log = if g
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            g.last_log = Some(now);
            Some(std::mem::take(&mut g.unlogged))
        } else {
            g.unlogged += 1;
            None
        };
        Refusal { delay, log }
    }

    /// A login from `source` succeeded: it starts afresh.
    pub fn succeeded(&self, source: IpAddr) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sources.remove(&source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_keeps_failing_is_slowed_and_logged_sparingly() {
        let f = LoginFailures::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..6)
            .map(|i| {
                f.failed_at(a, t0 + Duration::from_millis(i))
                    .delay
                    .as_millis()
            })
            .collect();
        assert_eq!(delays, vec![0, 0, 0, 500, 1000, 1500]);
        // Another source is not slowed by the first one's failures.
        assert_eq!(f.failed_at(b, t0).delay, Duration::ZERO);
        // Logged once in the first second; the next log line counts the rest.
        let later = f.failed_at(b, t0 + Duration::from_secs(1));
        assert_eq!(later.log, Some(6));
        // A minute later, or after a success, a source starts afresh.
        assert_eq!(f.failed_at(a, t0 + FORGET * 2).delay, Duration::ZERO);
        for _ in 0..5 {
            f.failed_at(b, t0 + Duration::from_secs(2));
        }
        f.succeeded(b);
        assert_eq!(
            f.failed_at(b, t0 + Duration::from_secs(3)).delay,
            Duration::ZERO
        );
        // Capped.
        for i in 0..100 {
            f.failed_at(a, t0 + FORGET * 2 + Duration::from_millis(i));
        }
        assert_eq!(f.failed_at(a, t0 + FORGET * 2).delay, MAX_DELAY);
    }
}
