//! Admission: who may start a handshake. The open connections' limit
//! (`max_connections`) is taken at connection.open (see `handshake`); before
//! that, a connection counts against a separate, smaller handshake budget,
//! in all and per source address, so that sockets that never authenticate
//! cannot lock real clients out.

use crate::config::Config;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Who may start a handshake: at most `max_handshakes` connections are
/// unauthenticated at once, and `max_handshakes_per_source` from one
/// address, apart from the open connections' own limit. Sockets that send
/// nothing (or only a protocol header) until the handshake timeout cannot
/// lock real clients out, and one source cannot take the whole budget.
pub struct Admission {
    slots: Arc<Semaphore>,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_source: usize,
    /// When a refusal was last logged, and how many went unlogged since.
    last_log: Mutex<(Option<std::time::Instant>, u64)>,
}

/// A connection's place in the handshake budget, given back when it is
/// dropped (the handshake ended, either way).
pub struct HandshakeSlot {
    _slot: tokio::sync::OwnedSemaphorePermit,
    source: IpAddr,
    per_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

impl Admission {
    pub fn new(c: &Config) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(c.max_handshakes.max(1))),
            per_source: Default::default(),
            max_per_source: c.max_handshakes_per_source.max(1),
            last_log: Mutex::new((None, 0)),
        }
    }

    pub fn admit(&self, source: IpAddr) -> Option<HandshakeSlot> {
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&source).is_some_and(|&n| n >= self.max_per_source) {
            return None;
        }
        // The global slot first: a refused source leaves no entry behind
        // (sources that never got in cannot grow the map).
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        *m.entry(source).or_insert(0) += 1;
        Some(HandshakeSlot {
            _slot: slot,
            source,
            per_source: self.per_source.clone(),
        })
    }

    pub fn refused(&self, peer: SocketAddr) {
        let mut l = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        l.1 += 1;
        if l.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(
                %peer,
                refused = l.1,
                "too many connections in the handshake (in all or from one address): closed at once"
            );
            *l = (Some(std::time::Instant::now()), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_in_all_and_per_source_and_nothing_kept_for_the_refused() {
        let c = Config {
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            ..Config::default()
        };
        let a = Admission::new(&c);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let s1 = a.admit(ip(1)).expect("first from 1");
        let s2 = a.admit(ip(1)).expect("second from 1");
        assert!(a.admit(ip(1)).is_none(), "per-source budget");
        let s3 = a.admit(ip(2)).expect("first from 2");
        assert!(a.admit(ip(3)).is_none(), "global budget");
        assert_eq!(a.per_source.lock().unwrap().len(), 2, "no entry for 3");
        drop((s1, s2, s3));
        assert!(a.per_source.lock().unwrap().is_empty());
        assert!(a.admit(ip(3)).is_some());
    }
}
