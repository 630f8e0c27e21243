//! Handing messages out and taking them back: dispatch to consumers with
//! credit (priority levels, round robin within one), `basic.get`, and
//! settlement (ack, reject, requeue, a channel's unacked on close).

use super::actor::Actor;
use super::handle::Got;
use super::ready::{Entry, Unacked};
use super::FLOW_WINDOW;
use crate::events::ConnEvent;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

impl Actor {
    /// Hand ready messages to consumers with credit, round robin.
    pub(super) fn dispatch(&mut self) {
        while !self.consumers.is_empty() && self.has_live() {
            let Some(i) = self.pick() else { break };
            let Some(entry) = self.ready.pop_front() else {
                break;
            };
            let c = &mut self.consumers[i];
            c.in_flight.fetch_add(1, Ordering::AcqRel);
            let ev = ConnEvent::Deliver {
                chan_key: c.chan_key,
                channel: c.channel,
                tag: c.tag.clone(),
                msg: entry.msg.clone(),
                redelivered: entry.redelivered,
                seq: entry.seq,
                queue: self.info.id,
                in_flight: c.in_flight.clone(),
            };
            if c.conn.send(ev).is_err() {
                // The connection is gone; its ChannelClosed is on the way.
                self.ready.push_front(entry);
                break;
            }
            self.last_delivery = self.now;
            self.counts.delivered += 1;
            self.counts.redelivered += entry.redelivered as u64;
            if c.no_ack {
                self.unstore(&entry);
            } else {
                c.unacked += 1;
                let u = Unacked {
                    entry,
                    chan_key: c.chan_key,
                    tag: Some(c.tag.clone()),
                };
                self.unacked.insert(u.entry.seq, u);
            }
        }
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

    /// Put messages back in sequence order (within their priority level),
    /// marked redelivered. They keep their expiry.
    pub(super) fn requeue(&mut self, mut entries: Vec<Entry>) {
        entries.sort_by_key(|e| e.seq);
        for mut e in entries.into_iter().rev() {
            e.redelivered = true;
            self.ready.insert(e);
        }
    }

    pub(super) fn settle(&mut self, chan_key: u64, seq: u64) -> Option<Entry> {
        match self.unacked.get(&seq) {
            Some(u) if u.chan_key == chan_key => {}
            _ => return None,
        }
        let u = self.unacked.remove(&seq)?;
        if let Some(tag) = &u.tag {
            if let Some(c) = self
                .consumers
                .iter_mut()
                .find(|c| c.chan_key == chan_key && &c.tag == tag)
            {
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
        Some(u.entry)
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
    pub(super) fn get(&mut self, chan_key: u64, no_ack: bool, reply: oneshot::Sender<Option<Got>>) {
        self.last_used = self.now;
        let Some(e) = self.pop_live() else {
            if self.tail.as_ref().is_some_and(|t| !t.drained()) {
                self.parked_gets.push_back((chan_key, no_ack, reply));
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
            self.unacked.insert(
                e.seq,
                Unacked {
                    entry: e,
                    chan_key,
                    tag: None,
                },
            );
        }
    }
}
