//! Handing messages out and taking them back: dispatch to consumers with
//! credit (priority levels, round robin within one), `basic.get`, and
//! settlement (ack, reject, requeue, a channel's unacked on close).

use super::actor::{Actor, ConnTx};
use super::dead_letter::{self, Reason};
use super::handle::Got;
use super::ready::{Entry, Unacked};
use super::FLOW_WINDOW;
use crate::message::MessageRef;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use warren_storage::{EntryMeta, MessageOp};

impl Actor {
    /// Hand ready messages to consumers with credit, round robin.
    pub(super) fn dispatch(&mut self) {
        // A run of deliveries to one consumer goes out as one event.
        let mut run: Option<(usize, Vec<Entry>)> = None;
        while !self.consumers.is_empty() && self.has_live() {
            let Some(i) = self.pick() else { break };
            if let Some((j, entries)) = run.take_if(|(j, _)| *j != i) {
                if !self.hand_out(j, entries) {
                    // j is gone (see `hand_out`): the credit `pick` took
                    // for i goes back, and the others are picked again.
                    self.unpick(i);
                    self.drop_gone_consumers();
                    continue;
                }
            }
            let Some(entry) = self.ready.pop_front() else {
                break;
            };
            // Counted at once: the consumer's credit checks see it.
            let c = &mut self.consumers[i];
            c.in_flight.fetch_add(1, Ordering::AcqRel);
            if !c.no_ack {
                c.unacked += 1;
            }
            run.get_or_insert_with(|| (i, Vec::new())).1.push(entry);
        }
        if let Some((i, entries)) = run {
            if !self.hand_out(i, entries) {
                self.drop_gone_consumers();
                self.dispatch();
            }
        }
    }

    /// Give back the channel credit [`Actor::pick`] took for consumer `i`.
    fn unpick(&mut self, i: usize) {
        let c = &self.consumers[i];
        if !c.no_ack {
            c.channel_credit.release(1);
        }
    }

    /// Send consumer `i` the `entries` picked for it (their flow and prefetch
    /// counts taken already), then account for them. False when its
    /// connection is gone: they go back to the head of the queue, in order.
    fn hand_out(&mut self, i: usize, entries: Vec<Entry>) -> bool {
        let n = entries.len();
        let c = &mut self.consumers[i];
        let ev = c.deliveries(
            self.info.id,
            entries
                .iter()
                .map(|e| (e.msg.clone(), e.redelivered, e.seq)),
        );
        if c.conn.send(ev).is_err() {
            // The connection is gone (its ChannelClosed is on the way), or
            // a consumer of another node ended there: the caller drops it
            // (`drop_gone_consumers`), so that nothing more is handed to it.
            c.in_flight.fetch_sub(n as u32, Ordering::AcqRel);
            if !c.no_ack {
                c.unacked -= n as u32;
            }
            for e in entries.into_iter().rev() {
                self.ready.push_front(e);
            }
            return false;
        }
        let (no_ack, chan_key, tag, order) = (c.no_ack, c.chan_key, c.tag.clone(), c.order);
        self.last_delivery = self.now;
        for entry in entries {
            self.counts.delivered += 1;
            self.counts.redelivered += entry.redelivered as u64;
            if no_ack {
                self.unstore(&entry);
            } else {
                let u = Unacked {
                    entry,
                    chan_key,
                    tag: Some(tag.clone()),
                    consumer: order,
                    delivered_at: self.now,
                    get_conn: None,
                };
                self.note_out(&u.entry);
                self.unacked.insert(u.entry.seq, u);
            }
        }
        true
    }

    /// The consumer to deliver to next: the highest priority level that has
    /// a consumer with credit, round robin within it. Takes the channel
    /// prefetch unit for the chosen consumer.
    pub(super) fn pick(&mut self) -> Option<usize> {
        if self.args.single_active {
            // Only the active consumer, when it has credit.
            let (k, t) = self.active.as_ref()?;
            let i = self
                .consumers
                .iter()
                .position(|c| c.chan_key == *k && c.tag == *t)?;
            let c = &self.consumers[i];
            let window_ok = c.in_flight.load(Ordering::Acquire) < FLOW_WINDOW;
            let prefetch_ok = c.no_ack || c.prefetch == 0 || c.unacked < c.prefetch;
            return (window_ok && prefetch_ok && (c.no_ack || c.channel_credit.try_acquire()))
                .then_some(i);
        }
        let n = self.consumers.len();
        let mut start = 0;
        while start < n {
            let p = self.consumers[start].priority;
            let len = self.consumers[start..]
                .iter()
                .take_while(|c| c.priority == p)
                .count();
            for k in 0..len {
                let i = start + (self.next_consumer + k) % len;
                let c = &self.consumers[i];
                let window_ok = c.in_flight.load(Ordering::Acquire) < FLOW_WINDOW;
                let prefetch_ok = c.no_ack || c.prefetch == 0 || c.unacked < c.prefetch;
                if window_ok && prefetch_ok && (c.no_ack || c.channel_credit.try_acquire()) {
                    self.next_consumer = self.next_consumer.wrapping_add(k + 1);
                    return Some(i);
                }
            }
            start += len;
        }
        None
    }

    /// Messages that came back from consumers (reject or nack with
    /// requeue, `basic.recover`, their channel or connection closed, a
    /// consumer timeout): put back in sequence order (within their priority
    /// level), marked redelivered, keeping their expiry. A queue that
    /// counts deliveries counts this one (the store has the count since the
    /// delivery, see `note_out`) and dead-letters (reason `delivery_limit`)
    /// a message that came back more often than its limit.
    pub(super) fn requeue(&mut self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| e.seq);
        let counting = self.args.counts_deliveries();
        for mut e in entries.into_iter().rev() {
            e.redelivered = true;
            if counting {
                e.deliveries = e.deliveries.saturating_add(1);
                if self
                    .args
                    .delivery_limit
                    .is_some_and(|limit| u64::from(e.deliveries) > limit)
                {
                    tracing::debug!(
                        seq = e.seq,
                        deliveries = e.deliveries,
                        "a message came back more often than its delivery limit: dead-lettered"
                    );
                    self.dead_letter(&e.msg, Reason::DeliveryLimit);
                    self.unstore(&e);
                    continue;
                }
                // (Its store entry has had this count since it went out.)
                e.msg = self.counted(e.msg, e.deliveries);
            }
            self.ready.insert(e);
        }
    }

    /// A message goes out to be acknowledged. A queue that counts
    /// deliveries stores, with its entry, the count it will have if it
    /// comes back, so that a delivery still unacked when the broker stops
    /// (crash or not) counts as one, as RabbitMQ's quorum queues count it.
    fn note_out(&mut self, e: &Entry) {
        if self.args.counts_deliveries() {
            self.store_count(e, e.deliveries.saturating_add(1));
        }
    }

    /// Write `deliveries` as the delivery count of `e`'s stored entry (in
    /// this wake-up's batch), if it has one.
    fn store_count(&mut self, e: &Entry, deliveries: u32) {
        if let (true, Some(id), true) = (e.on_disk, e.msg.stored, self.keeps()) {
            self.pending.push(MessageOp::SetMeta {
                queue: self.info.id,
                seq: e.seq,
                id,
                meta: EntryMeta {
                    enqueued_at: e.enqueued_at,
                    deliveries,
                },
            });
        }
    }

    /// The message with its `x-delivery-count` header set to `count`.
    pub(super) fn counted(&self, msg: MessageRef, count: u32) -> MessageRef {
        match dead_letter::with_delivery_count(&msg, count) {
            Some(m) => Arc::new(m),
            None => {
                // Its header was valid on arrival; never expected.
                tracing::warn!("x-delivery-count could not be added to a redelivery");
                msg
            }
        }
    }

    pub(super) fn settle(&mut self, chan_key: u64, seq: u64) -> Option<Entry> {
        match self.unacked.get(&seq) {
            Some(u) if u.chan_key == chan_key => {}
            _ => return None,
        }
        let u = self.unacked.remove(&seq)?;
        if u.consumer != 0 {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.order == u.consumer) {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
        Some(u.entry)
    }

    /// Deliveries that never reached a client (`QueueCmd::Undelivered`):
    /// back in sequence order, not counted: a queue that counts deliveries
    /// takes back the count stored when they went out (see `note_out`).
    /// They are marked redelivered, as RabbitMQ marks every message that
    /// went out to a consumer: later messages may have gone out meanwhile,
    /// and a first-hand delivery never comes after a later one.
    pub(super) fn put_back(&mut self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| e.seq);
        let counting = self.args.counts_deliveries();
        for mut e in entries.into_iter().rev() {
            e.redelivered = true;
            if counting {
                self.store_count(&e, e.deliveries);
            }
            self.ready.insert(e);
        }
    }

    /// Remove the consumers whose events channel closed: a connection that
    /// is gone (its ChannelClosed follows), or the relay of a consumer of
    /// another node that no longer has it. Without this, the queue would
    /// keep handing such a consumer messages that only come back.
    pub(super) fn drop_gone_consumers(&mut self) {
        let before = self.consumers.len();
        self.consumers.retain(|c| !c.conn.is_closed());
        if self.consumers.len() != before {
            tracing::debug!(
                gone = before - self.consumers.len(),
                "consumers whose connection or relay ended left the queue"
            );
            self.ensure_active();
            self.consumer_left();
        }
    }

    pub(super) fn take_channel_unacked(&mut self, chan_key: u64) -> Vec<Entry> {
        let seqs: Vec<u64> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.chan_key == chan_key)
            .map(|(s, _)| *s)
            .collect();
        seqs.into_iter()
            .filter_map(|s| self.settle(chan_key, s))
            .collect()
    }

    /// A consumer left: the `x-expires` countdown starts when the last one goes.
    pub(super) fn consumer_left(&mut self) {
        if self.consumers.is_empty() {
            self.last_used = self.now;
        }
    }

    /// `basic.get`: the next live message, or None; parked while the queue
    /// has messages only on disk.
    pub(super) fn get(
        &mut self,
        chan_key: u64,
        no_ack: bool,
        conn: Option<ConnTx>,
        reply: oneshot::Sender<Option<Got>>,
    ) {
        self.last_used = self.now;
        let Some(e) = self.pop_live() else {
            if self.tail.as_ref().is_some_and(|t| !t.drained()) {
                self.parked_gets.push_back((chan_key, no_ack, conn, reply));
            } else {
                let _ = reply.send(None);
            }
            return;
        };
        let g = Got {
            msg: e.msg.clone(),
            seq: e.seq,
            redelivered: e.redelivered,
            remaining: self.ready_count().min(u32::MAX as u64) as u32,
        };
        if reply.send(Some(g)).is_err() {
            // The asker went away: put the message back untouched.
            self.ready.push_front(e);
            return;
        }
        self.counts.delivered += 1;
        self.counts.redelivered += e.redelivered as u64;
        if no_ack {
            self.unstore(&e);
        } else {
            self.note_out(&e);
            self.unacked.insert(
                e.seq,
                Unacked {
                    entry: e,
                    chan_key,
                    tag: None,
                    consumer: 0,
                    delivered_at: self.now,
                    get_conn: conn,
                },
            );
        }
    }
}
