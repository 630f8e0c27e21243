//! A queue's messages in memory: [`Ready`], one FIFO per priority level,
//! and the [`Entry`] each message is kept as (ready or unacked).

use crate::message::MessageRef;
use std::collections::VecDeque;
use std::sync::Arc;

/// "Never" on the actor's millisecond clock.
pub(super) const NEVER: u64 = u64::MAX;

pub(super) struct Entry {
    pub seq: u64,
    pub msg: MessageRef,
    pub redelivered: bool,
    /// Actor-clock millisecond after which the message is expired ([`NEVER`]
    /// without a TTL). Kept across requeues.
    pub expires: u64,
    /// The store holds an index entry `queue ‖ seq` for it (removed when the
    /// message leaves the queue).
    pub on_disk: bool,
    /// When it entered the queue, Unix milliseconds (kept in the store's
    /// entry, so TTLs count from it across restarts).
    pub enqueued_at: u64,
    /// How often it was delivered and came back (queues that count them).
    pub deliveries: u32,
}

pub(super) struct Unacked {
    pub entry: Entry,
    pub chan_key: u64,
    /// None for `basic.get` deliveries.
    pub tag: Option<Arc<str>>,
    /// The registration it went to (`Consumer::order`; 0 for `basic.get`):
    /// a channel may hold two registrations with one tag for a moment (a
    /// consumer of another node registered again before its old
    /// registration is known gone), and an ack must free the prefetch slot
    /// of the one that has the message.
    pub consumer: u64,
    /// When it was delivered (the actor's clock), for consumer timeouts.
    pub delivered_at: u64,
    /// The connection that took it with `basic.get` (told if it times out).
    pub get_conn: Option<tokio::sync::mpsc::UnboundedSender<crate::events::ConnEvent>>,
}

/// Ready messages: one FIFO per priority level (a single level without
/// `x-max-priority`), each in sequence order; the highest level goes first.
pub(super) struct Ready {
    /// Indexed by priority level.
    pub levels: Vec<VecDeque<Entry>>,
    /// Messages in all levels.
    len: usize,
    /// Body bytes in all levels (`x-max-length-bytes`).
    pub bytes: u64,
}

impl Ready {
    pub fn new(max_priority: Option<u8>) -> Ready {
        let n = max_priority.map_or(1, |p| p as usize + 1);
        Ready {
            levels: (0..n).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    /// The level a message belongs to: its priority, capped; 0 without one.
    fn level_of(&self, e: &Entry) -> usize {
        let top = self.levels.len() - 1;
        if top == 0 {
            return 0;
        }
        e.msg.header.priority().map_or(0, |p| (p as usize).min(top))
    }
    /// The highest non-empty level.
    pub fn top(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        self.levels.iter().rposition(|l| !l.is_empty())
    }
    pub fn front_of(&self, level: usize) -> Option<&Entry> {
        self.levels.get(level)?.front()
    }
    pub fn pop_level(&mut self, level: usize) -> Option<Entry> {
        let e = self.levels.get_mut(level)?.pop_front()?;
        self.len -= 1;
        self.bytes -= e.msg.body.len() as u64;
        Some(e)
    }
    pub fn pop_front(&mut self) -> Option<Entry> {
        let top = self.top()?;
        self.pop_level(top)
    }
    pub fn push_back(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        self.levels[l].push_back(e);
    }
    pub fn push_front(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        self.levels[l].push_front(e);
    }
    /// Put a message back at its place in sequence order within its level.
    pub fn insert(&mut self, e: Entry) {
        let l = self.level_of(&e);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        let level = &mut self.levels[l];
        let pos = level.partition_point(|r| r.seq < e.seq);
        level.insert(pos, e);
    }
    /// The earliest expiry among the level heads.
    pub fn next_expiry(&self) -> u64 {
        self.levels
            .iter()
            .filter_map(|l| l.front())
            .map(|e| e.expires)
            .min()
            .unwrap_or(NEVER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::{BufMut, Bytes};
    use warren_protocol::amqp::basic::{gen_properties, AMQPProperties};
    use warren_protocol::content::ContentHeader;
    use warren_protocol::method::ShortStr;

    fn entry(seq: u64, priority: Option<u8>, body: &'static str) -> Entry {
        let props = match priority {
            Some(p) => AMQPProperties::default().with_priority(p),
            None => AMQPProperties::default(),
        };
        let mut raw = Vec::new();
        raw.put_u16(60);
        raw.put_u16(0);
        raw.put_u64(body.len() as u64);
        let raw = cookie_factory::gen_simple(gen_properties(&props), raw).unwrap();
        Entry {
            seq,
            msg: Arc::new(Message {
                exchange: ShortStr::truncating(""),
                routing_key: ShortStr::truncating("q"),
                header: ContentHeader::parse(Bytes::from(raw)).unwrap(),
                body: Bytes::from_static(body.as_bytes()),
                stored: None,
            }),
            redelivered: false,
            expires: NEVER,
            on_disk: false,
            enqueued_at: 0,
            deliveries: 0,
        }
    }

    fn order(r: &mut Ready) -> Vec<u64> {
        std::iter::from_fn(|| r.pop_front().map(|e| e.seq)).collect()
    }

    #[test]
    fn without_priorities_ready_is_fifo() {
        let mut r = Ready::new(None);
        r.push_back(entry(1, Some(9), "a"));
        r.push_back(entry(2, None, "bb"));
        r.push_back(entry(3, Some(1), "ccc"));
        assert_eq!((r.len(), r.bytes), (3, 6));
        assert_eq!(order(&mut r), vec![1, 2, 3]);
        assert_eq!((r.len(), r.bytes), (0, 0));
    }

    #[test]
    fn priorities_go_first_fifo_within_a_level() {
        let mut r = Ready::new(Some(3));
        for (seq, p) in [
            (1, Some(1)),
            (2, None),
            (3, Some(200)),
            (4, Some(3)),
            (5, Some(1)),
        ] {
            r.push_back(entry(seq, p, "x"));
        }
        assert_eq!(order(&mut r), vec![3, 4, 1, 5, 2]);
    }

    #[test]
    fn requeue_inserts_by_sequence_within_its_level() {
        let mut r = Ready::new(Some(2));
        r.push_back(entry(2, Some(1), "x"));
        r.push_back(entry(5, Some(1), "x"));
        r.push_back(entry(4, Some(2), "x"));
        r.insert(entry(3, Some(1), "x"));
        r.insert(entry(1, Some(2), "x"));
        r.push_front(entry(0, None, "x"));
        assert_eq!(r.len(), 6);
        assert_eq!(order(&mut r), vec![1, 4, 2, 3, 5, 0]);
    }

    #[test]
    fn next_expiry_is_the_earliest_head() {
        let mut r = Ready::new(Some(1));
        assert_eq!(r.next_expiry(), NEVER);
        let mut a = entry(1, Some(1), "x");
        a.expires = 50;
        let mut b = entry(2, None, "x");
        b.expires = 20;
        let mut c = entry(3, None, "x");
        c.expires = 5; // behind b: not a head
        r.push_back(a);
        r.push_back(b);
        r.push_back(c);
        assert_eq!(r.next_expiry(), 20);
        let mut n = 0;
        while r.pop_front().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert_eq!((r.len(), r.bytes, r.next_expiry()), (0, 0, NEVER));
    }
}
