//! Per-channel state, owned by its connection task (plain structs, no locks):
//! the publish being assembled, publisher-confirm sequence tracking, the
//! transaction buffer, consumers and unacked deliveries.

use crate::message::MessageRef;
use crate::queue::{ChannelCredit, QueueHandle};
use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::Publish;

/// A `basic.publish` waiting for its header and body frames.
pub struct Content {
    pub publish: Publish,
    pub header: Option<ContentHeader>,
    /// Single-frame bodies are kept as the frame's own bytes (no copy);
    /// multi-frame bodies are gathered here.
    pub body: Option<Bytes>,
    pub gathered: BytesMut,
    pub received: u64,
}

/// A consumer as its channel sees it.
pub struct ChanConsumer {
    pub queue: QueueHandle,
    pub no_ack: bool,
    /// `basic.cancel` sent to the queue; the reply is still to come.
    pub cancelling: bool,
    /// Whether the client asked for no cancel-ok.
    pub cancel_nowait: bool,
    pub in_flight: Arc<AtomicU32>,
}

/// A delivery awaiting the client's ack.
#[derive(Clone)]
pub struct Delivery {
    pub queue: QueueHandle,
    /// The message's sequence in its queue.
    pub seq: u64,
    /// Counted against the channel's global prefetch (consumer deliveries
    /// are; `basic.get` ones are not).
    pub counted: bool,
}

/// Deliveries taken off a channel's unacked set together (usually one).
pub type Deliveries = SmallVec<[(u64, Delivery); 1]>;

/// A channel's unacked deliveries, by delivery tag. Tags are handed out in
/// increasing order and clients mostly ack in order, so a sorted deque does
/// the work of a tree: a new delivery is a push at the back, an in-order ack
/// a pop at the front, anything else a binary search.
#[derive(Default)]
pub struct Unacked(VecDeque<(u64, Delivery)>);

impl Unacked {
    fn find(&self, tag: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&tag, |(t, _)| *t)
    }
    pub fn insert(&mut self, tag: u64, d: Delivery) {
        match self.0.back() {
            Some((last, _)) if *last >= tag => match self.find(tag) {
                Ok(i) => self.0[i].1 = d,
                Err(i) => self.0.insert(i, (tag, d)),
            },
            _ => self.0.push_back((tag, d)),
        }
    }
    pub fn contains(&self, tag: u64) -> bool {
        self.find(tag).is_ok()
    }
    pub fn remove(&mut self, tag: u64) -> Option<Delivery> {
        if self.0.front().is_some_and(|(t, _)| *t == tag) {
            return self.0.pop_front().map(|(_, d)| d);
        }
        let i = self.find(tag).ok()?;
        self.0.remove(i).map(|(_, d)| d)
    }
    /// Every delivery with a tag up to and including `tag`.
    pub fn take_through(&mut self, tag: u64) -> Deliveries {
        let n = self.0.partition_point(|(t, _)| *t <= tag);
        self.0.drain(..n).collect()
    }
    pub fn take_all(&mut self) -> Deliveries {
        self.0.drain(..).collect()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Publisher-confirm bookkeeping. Sequence numbers are assigned in order, so
/// outstanding ones form a window: a deque indexed by `seq - base`.
#[derive(Default)]
pub struct Confirms {
    /// Sequence number of `done[0]`.
    pub base: u64,
    /// Per outstanding sequence: confirmed yet?
    pub done: VecDeque<bool>,
    /// Confirms arrived since the last flush.
    pub dirty: bool,
    /// Outstanding sequences refused by a queue (basic.nack), ascending.
    pub nacked: VecDeque<u64>,
}

impl Confirms {
    pub fn new() -> Self {
        Confirms {
            base: 1,
            done: VecDeque::new(),
            dirty: false,
            nacked: VecDeque::new(),
        }
    }
    /// Assign the next sequence number.
    pub fn assign(&mut self) -> u64 {
        self.done.push_back(false);
        self.base + self.done.len() as u64 - 1
    }
    pub fn confirm(&mut self, seq: u64) {
        if let Some(d) = seq
            .checked_sub(self.base)
            .and_then(|i| self.done.get_mut(i as usize))
        {
            *d = true;
            self.dirty = true;
        }
    }
    /// Settle `seq` as refused: it will be nacked.
    pub fn nack(&mut self, seq: u64) {
        if seq >= self.base && seq < self.base + self.done.len() as u64 {
            let i = self.nacked.partition_point(|&s| s < seq);
            if self.nacked.get(i) != Some(&seq) {
                self.nacked.insert(i, seq);
            }
        }
        self.confirm(seq);
    }
    /// Pop the confirmed prefix as runs of acks and nacks, calling
    /// `emit(last_seq, multiple, nack)` once per run (everything before a run
    /// is settled, so `multiple` covers exactly the run).
    pub fn take_ready(&mut self, mut emit: impl FnMut(u64, bool, bool)) {
        self.dirty = false;
        let mut run: Option<(u64, bool)> = None; // (first seq, nack)
        while self.done.front() == Some(&true) {
            self.done.pop_front();
            let seq = self.base;
            self.base += 1;
            let nack = self.nacked.front() == Some(&seq);
            if nack {
                self.nacked.pop_front();
            }
            match run {
                Some((first, kind)) if kind != nack => {
                    emit(seq - 1, seq - 1 > first, kind);
                    run = Some((seq, nack));
                }
                Some(_) => {}
                None => run = Some((seq, nack)),
            }
        }
        if let Some((first, kind)) = run {
            let last = self.base - 1;
            emit(last, last > first, kind);
        }
    }
}

/// Settlements buffered by an open transaction.
pub enum Settle {
    Ack(Deliveries),
    Reject(Deliveries, bool),
}

#[derive(Default)]
pub struct Tx {
    pub publishes: Vec<(bool, MessageRef)>,
    pub settles: Vec<Settle>,
}

pub struct Channel {
    pub id: u16,
    /// Unique per channel incarnation; queues know the channel by it.
    pub key: u64,
    /// We sent channel.close and wait for close-ok; other frames are dropped.
    pub closing: bool,
    pub content: Option<Content>,
    pub confirms: Option<Confirms>,
    pub tx: Option<Tx>,
    pub consumers: FxHashMap<Arc<str>, ChanConsumer>,
    pub unacked: Unacked,
    pub next_tag: u64,
    /// Per-consumer prefetch for consumers created from now on.
    pub prefetch: u16,
    /// The channel-wide prefetch (`global=true`).
    pub credit: Arc<ChannelCredit>,
    /// The last queue declared on this channel (for empty queue names).
    pub last_queue: Option<String>,
    /// Queues holding consumers or unacked messages of this channel.
    pub touched: Vec<QueueHandle>,
    /// The direct reply-to consumer: its tag and its `amq.rabbitmq.reply-to.*` name.
    pub reply: Option<(Arc<str>, String)>,
}

impl Channel {
    pub fn new(id: u16, key: u64) -> Self {
        Channel {
            id,
            key,
            closing: false,
            content: None,
            confirms: None,
            tx: None,
            consumers: FxHashMap::default(),
            unacked: Unacked::default(),
            next_tag: 1,
            prefetch: 0,
            credit: Arc::new(ChannelCredit::default()),
            last_queue: None,
            touched: Vec::new(),
            reply: None,
        }
    }

    pub fn touch(&mut self, q: &QueueHandle) {
        if !self.touched.iter().any(|t| t == q) {
            self.touched.push(q.clone());
        }
    }
}
