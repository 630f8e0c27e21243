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
        let n = m.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        *n += 1;
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
