//! A quorum queue's replicated state: the messages it holds, by sequence,
//! with what must outlive a failover about each (when it entered the
//! queue, how often it went out). Every member applies the same commands
//! in the same order; the leader's queue actor is built from it when the
//! member takes over.
//!
//! Commands and snapshots use the storage layer's explicit encoding
//! (`warren_storage::codec`): a tag byte, then big-endian integers and
//! length-prefixed byte strings.

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Mutex;
use warren_storage::codec::{Reader, Writer};
use warren_storage::StoredMessage;

const ENQUEUE: u8 = 1;
const SETTLE: u8 = 2;
const COUNT: u8 = 3;
const SETTLE_RANGE: u8 = 4;
const NOOP: u8 = 5;

/// A message the queue holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub msg: StoredMessage,
    /// Unix milliseconds (TTLs count from it).
    pub enqueued_at: u64,
    /// The delivery count it has if it comes back (`x-delivery-count`).
    pub deliveries: u32,
}

/// A command of the queue's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Messages published, in order; each gets the next sequence. The
    /// answer is the first one's.
    Enqueue { at: u64, msgs: Vec<StoredMessage> },
    /// Messages that left the queue (acked, dead-lettered, expired, purged).
    Settle(Vec<u64>),
    /// Messages that went out: the count each has if it comes back.
    Count(Vec<(u64, u32)>),
    /// Every message with `from <= seq < to` left.
    SettleRange { from: u64, to: u64 },
    /// Nothing: a new leader writes one to know it has applied everything
    /// committed before it took over.
    Noop,
}

fn msg_into(w: &mut Writer, m: &StoredMessage) {
    w.bytes(&m.exchange)
        .bytes(&m.routing_key)
        .bytes(&m.header)
        .bytes(&m.body);
}

/// A message whose fields share `buf` (one allocation per command).
fn msg_from(r: &mut Reader<'_>, buf: &Bytes) -> Result<StoredMessage, String> {
    let mut field = || -> Result<Bytes, String> {
        let s = r.bytes().map_err(|e| e.to_string())?;
        Ok(buf.slice_ref(s))
    };
    Ok(StoredMessage {
        exchange: field()?,
        routing_key: field()?,
        header: field()?,
        body: field()?,
    })
}

fn n(r: &mut Reader<'_>) -> Result<usize, String> {
    let n = r.u64().map_err(|e| e.to_string())?;
    // Each item takes at least 8 bytes: a count past that is corrupt.
    if n > r.0.len() as u64 {
        return Err(format!(
            "a count of {n} items in a command of {} bytes",
            r.0.len()
        ));
    }
    Ok(n as usize)
}

impl Command {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Command::Enqueue { at, msgs } => {
                let size: usize = msgs
                    .iter()
                    .map(|m| 16 + m.body.len() + m.header.len())
                    .sum();
                w.0.reserve(size + 24);
                w.u8(ENQUEUE).u64(*at).u64(msgs.len() as u64);
                for m in msgs {
                    msg_into(&mut w, m);
                }
            }
            Command::Settle(seqs) => {
                w.u8(SETTLE).u64(seqs.len() as u64);
                for s in seqs {
                    w.u64(*s);
                }
            }
            Command::Count(c) => {
                w.u8(COUNT).u64(c.len() as u64);
                for (s, d) in c {
                    w.u64(*s).u64(u64::from(*d));
                }
            }
            Command::SettleRange { from, to } => {
                w.u8(SETTLE_RANGE).u64(*from).u64(*to);
            }
            Command::Noop => {
                w.u8(NOOP);
            }
        }
        w.0
    }

    pub(crate) fn decode(raw: &[u8]) -> Result<Command, String> {
        let buf = Bytes::copy_from_slice(raw);
        let mut r = Reader(&buf);
        let e = |e: warren_storage::StoreError| e.to_string();
        let c = match r.u8().map_err(e)? {
            ENQUEUE => {
                let at = r.u64().map_err(e)?;
                let count = n(&mut r)?;
                let mut msgs = Vec::with_capacity(count);
                for _ in 0..count {
                    msgs.push(msg_from(&mut r, &buf)?);
                }
                Command::Enqueue { at, msgs }
            }
            SETTLE => {
                let count = n(&mut r)?;
                let mut seqs = Vec::with_capacity(count);
                for _ in 0..count {
                    seqs.push(r.u64().map_err(e)?);
                }
                Command::Settle(seqs)
            }
            COUNT => {
                let count = n(&mut r)?;
                let mut c = Vec::with_capacity(count);
                for _ in 0..count {
                    let s = r.u64().map_err(e)?;
                    let d = r.u64().map_err(e)?;
                    c.push((s, u32::try_from(d).unwrap_or(u32::MAX)));
                }
                Command::Count(c)
            }
            SETTLE_RANGE => Command::SettleRange {
                from: r.u64().map_err(e)?,
                to: r.u64().map_err(e)?,
            },
            NOOP => Command::Noop,
            t => return Err(format!("unknown quorum queue command {t}")),
        };
        Ok(c)
    }
}

#[derive(Default)]
struct State {
    /// The sequence the next message gets (sequences start at 1).
    next_seq: u64,
    msgs: BTreeMap<u64, Held>,
    bytes: u64,
}

/// The replicated state of one quorum queue on one member.
#[derive(Default)]
pub(crate) struct QueueMachine {
    state: Mutex<State>,
}

impl QueueMachine {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every message held, in sequence order.
    pub(crate) fn messages(&self) -> Vec<(u64, Held)> {
        self.lock()
            .msgs
            .iter()
            .map(|(s, h)| (*s, h.clone()))
            .collect()
    }

    /// Messages held and their body bytes.
    #[cfg(test)]
    pub(crate) fn len(&self) -> (u64, u64) {
        let s = self.lock();
        (s.msgs.len() as u64, s.bytes)
    }

    fn apply_command(&self, c: Command) -> Vec<u8> {
        let mut s = self.lock();
        let s = &mut *s;
        s.next_seq = s.next_seq.max(1);
        match c {
            Command::Enqueue { at, msgs } => {
                let first = s.next_seq;
                for msg in msgs {
                    s.bytes += msg.body.len() as u64;
                    s.msgs.insert(
                        s.next_seq,
                        Held {
                            msg,
                            enqueued_at: at,
                            deliveries: 0,
                        },
                    );
                    s.next_seq += 1;
                }
                return first.to_be_bytes().to_vec();
            }
            Command::Settle(seqs) => {
                for seq in seqs {
                    if let Some(h) = s.msgs.remove(&seq) {
                        s.bytes -= h.msg.body.len() as u64;
                    }
                }
            }
            Command::Count(c) => {
                for (seq, d) in c {
                    if let Some(h) = s.msgs.get_mut(&seq) {
                        h.deliveries = d;
                    }
                }
            }
            Command::SettleRange { from, to } => {
                let gone: Vec<u64> = s.msgs.range(from..to).map(|(k, _)| *k).collect();
                for seq in gone {
                    if let Some(h) = s.msgs.remove(&seq) {
                        s.bytes -= h.msg.body.len() as u64;
                    }
                }
            }
            Command::Noop => {}
        }
        Vec::new()
    }
}

impl warren_cluster::GroupMachine for QueueMachine {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        match Command::decode(command) {
            Ok(c) => self.apply_command(c),
            Err(e) => {
                // Every member refuses it alike: the state stays the same everywhere.
                tracing::error!(index, error = %e, "a quorum queue's log holds a command this node cannot read");
                Vec::new()
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let s = self.lock();
        let mut w = Writer::default();
        w.u64(s.next_seq).u64(s.msgs.len() as u64);
        for (seq, h) in &s.msgs {
            w.u64(*seq).u64(h.enqueued_at).u64(u64::from(h.deliveries));
            msg_into(&mut w, &h.msg);
        }
        w.0
    }

    fn restore(&self, state: &[u8]) -> Result<(), String> {
        let mut fresh = State::default();
        if !state.is_empty() {
            let buf = Bytes::copy_from_slice(state);
            let mut r = Reader(&buf);
            let e = |e: warren_storage::StoreError| e.to_string();
            fresh.next_seq = r.u64().map_err(e)?;
            for _ in 0..n(&mut r)? {
                let seq = r.u64().map_err(e)?;
                let enqueued_at = r.u64().map_err(e)?;
                let deliveries = u32::try_from(r.u64().map_err(e)?).unwrap_or(u32::MAX);
                let msg = msg_from(&mut r, &buf)?;
                fresh.bytes += msg.body.len() as u64;
                fresh.msgs.insert(
                    seq,
                    Held {
                        msg,
                        enqueued_at,
                        deliveries,
                    },
                );
            }
        }
        *self.lock() = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_cluster::GroupMachine;

    fn m(body: &str) -> StoredMessage {
        StoredMessage {
            exchange: Bytes::from_static(b"x"),
            routing_key: Bytes::from_static(b"k"),
            header: Bytes::from_static(b"h"),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    #[test]
    fn commands_round_trip() {
        for c in [
            Command::Enqueue {
                at: 7,
                msgs: vec![m("a"), m("")],
            },
            Command::Settle(vec![1, 5]),
            Command::Count(vec![(3, 2)]),
            Command::SettleRange { from: 2, to: 9 },
            Command::Noop,
        ] {
            assert_eq!(Command::decode(&c.encode()).expect("decode"), c);
        }
        assert!(Command::decode(&[9]).is_err());
        assert!(Command::decode(&[]).is_err());
        // A count larger than the command: corrupt, not an allocation.
        let mut bad = vec![SETTLE];
        bad.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(Command::decode(&bad).is_err());
    }

    #[test]
    fn the_state_follows_the_log_and_survives_a_snapshot() {
        let q = QueueMachine::default();
        let enq = |msgs| Command::Enqueue { at: 100, msgs }.encode();
        assert_eq!(
            q.apply(1, &enq(vec![m("a"), m("bb"), m("ccc")])),
            1u64.to_be_bytes()
        );
        assert_eq!(q.apply(2, &enq(vec![m("d")])), 4u64.to_be_bytes());
        q.apply(3, &Command::Settle(vec![2, 42]).encode());
        q.apply(4, &Command::Count(vec![(3, 2), (2, 1)]).encode());
        assert_eq!(q.len(), (3, 5));
        let seqs: Vec<(u64, u32)> = q
            .messages()
            .iter()
            .map(|(s, h)| (*s, h.deliveries))
            .collect();
        assert_eq!(seqs, vec![(1, 0), (3, 2), (4, 0)]);

        let copy = QueueMachine::default();
        copy.restore(&q.snapshot()).expect("restore");
        assert_eq!(copy.messages(), q.messages());
        // Sequences go on from where they were.
        assert_eq!(copy.apply(5, &enq(vec![m("e")])), 5u64.to_be_bytes());
        copy.apply(6, &Command::SettleRange { from: 0, to: 4 }.encode());
        assert_eq!(copy.len(), (2, 2));
        copy.restore(&[]).expect("empty");
        assert_eq!(copy.len(), (0, 0));
        assert!(copy.restore(&[1, 2]).is_err());
    }
}
