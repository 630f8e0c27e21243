//! Settlement: `basic.ack`, `basic.nack` and `basic.reject`. A channel keeps
//! its unacked deliveries by delivery tag; settling one tells its queue
//! (acks batched per queue per read, rejects at once) and gives the channel's
//! prefetch credit back. Inside a transaction settlements wait for commit.

use super::{Channel, Ctx};
use crate::error::{precondition, AmqpResult};
use crate::queue::{QueueCmd, QueueHandle, Seqs};
use smallvec::SmallVec;
use std::collections::VecDeque;

/// A delivery awaiting the client's ack.
#[derive(Clone)]
pub struct Delivery {
    pub queue: QueueHandle,
    /// The message's sequence in its queue.
    pub seq: u64,
    /// Whether it holds a unit of the channel's global prefetch (consumer
    /// deliveries do; `basic.get` ones do not).
    pub holds_credit: bool,
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
    /// Take out every delivery `f` picks (rare: a consumer timed out).
    pub fn remove_where(&mut self, f: impl Fn(&Delivery) -> bool) -> Vec<Delivery> {
        let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(_, d)| f(d));
        self.0 = kept;
        gone.into_iter().map(|(_, d)| d).collect()
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

/// A settlement, applied at once or buffered by an open transaction.
pub enum Settle {
    Ack(Deliveries),
    /// Reject (nack) with `requeue`.
    Reject(Deliveries, bool),
}

/// Acks gathered during one batch of input, per (queue, channel): sent as
/// one queue command each instead of one per ack.
#[derive(Default)]
pub struct PendingAcks(Vec<(QueueHandle, u64, Seqs)>);

impl PendingAcks {
    fn push(&mut self, queue: QueueHandle, chan_key: u64, seq: u64) {
        match self
            .0
            .iter_mut()
            .find(|(q, k, _)| *k == chan_key && q == &queue)
        {
            Some((_, _, seqs)) => seqs.push(seq),
            None => self.0.push((queue, chan_key, smallvec::smallvec![seq])),
        }
    }

    /// Send the acks gathered so far to their queues. Called before anything
    /// else the connection tells a queue (which must come after them: a
    /// channel close would otherwise requeue what was acked) and at the end
    /// of each batch of input.
    pub fn flush(&mut self) {
        for (q, chan_key, seqs) in self.0.drain(..) {
            q.tell(QueueCmd::Ack { chan_key, seqs });
        }
    }
}

impl Channel {
    pub(super) fn ack(&mut self, cx: &mut Ctx<'_>, tag: u64, multiple: bool) -> AmqpResult<()> {
        let ds = self.take_deliveries(tag, multiple)?;
        self.settle(cx, Settle::Ack(ds));
        Ok(())
    }

    pub(super) fn reject(
        &mut self,
        cx: &mut Ctx<'_>,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> AmqpResult<()> {
        let ds = self.take_deliveries(tag, multiple)?;
        if let Some((_, d)) = ds.iter().find(|(_, d)| d.queue.is_stream()) {
            return Err(crate::queue::stream::not_supported(
                "basic.nack and basic.reject",
                &d.queue,
            ));
        }
        self.settle(cx, Settle::Reject(ds, requeue));
        Ok(())
    }

    /// The deliveries a settlement names: one tag, every tag up to it
    /// (`multiple`), or all (`multiple` with tag 0). An unknown tag is 406.
    fn take_deliveries(&mut self, tag: u64, multiple: bool) -> AmqpResult<Deliveries> {
        if multiple && tag == 0 {
            return Ok(self.unacked.take_all());
        }
        if !multiple {
            return match self.unacked.remove(tag) {
                Some(d) => Ok(smallvec::smallvec![(tag, d)]),
                None => Err(precondition(format!("unknown delivery tag {tag}"))),
            };
        }
        if !self.unacked.contains(tag) {
            return Err(precondition(format!("unknown delivery tag {tag}")));
        }
        Ok(self.unacked.take_through(tag))
    }

    fn settle(&mut self, cx: &mut Ctx<'_>, s: Settle) {
        match self.tx.as_mut() {
            Some(t) => t.settles.push(s),
            None => self.apply_settle(cx, s),
        }
    }

    /// Tell queues about acks and rejects, grouped per queue, and give the
    /// channel's prefetch credit back.
    pub(super) fn apply_settle(&mut self, cx: &mut Ctx<'_>, s: Settle) {
        let (ds, reject) = match s {
            Settle::Ack(ds) => (ds, None),
            Settle::Reject(ds, requeue) => (ds, Some(requeue)),
        };
        let credit = ds.iter().filter(|(_, d)| d.holds_credit).count() as u32;
        match reject {
            // Acks wait in the connection's batch until the input at hand
            // is handled: one message per queue per read instead of one per ack.
            None => {
                cx.shared.stats.acknowledged += ds.len() as u64;
                for (_, d) in ds {
                    cx.shared.acks.push(d.queue, self.key, d.seq);
                }
            }
            Some(requeue) => {
                cx.shared.acks.flush();
                let mut groups: SmallVec<[(QueueHandle, Seqs); 2]> = SmallVec::new();
                for (_, d) in ds {
                    match groups.iter_mut().find(|(q, _)| q == &d.queue) {
                        Some((_, seqs)) => seqs.push(d.seq),
                        None => groups.push((d.queue, smallvec::smallvec![d.seq])),
                    }
                }
                for (q, seqs) in groups {
                    q.tell(QueueCmd::Reject {
                        chan_key: self.key,
                        seqs,
                        requeue,
                    });
                }
            }
        }
        if self.credit.release(credit) {
            self.wake_consumers();
        }
    }

    /// Credit came back: the queues of this channel's consumers try again.
    pub(super) fn wake_consumers(&self) {
        for cons in self.consumers.values() {
            cons.queue.tell(QueueCmd::Wake);
        }
    }
}
