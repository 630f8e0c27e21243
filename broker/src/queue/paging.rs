//! Paging: a queue whose in-memory window is full keeps of each new message
//! only the fact that it arrived (a [`Tail`]: a range of sequences whose
//! messages are in the store), and reads them back in order, a page at a
//! time, as consumers drain the window. See the module comment of
//! `queue` for when a queue pages.

use super::actor::Actor;
use super::handle::{Publish, QueueCmd};
use super::ready::Entry;
use super::{PAGE_READ, PAGE_WINDOW, PAGE_WINDOW_BYTES};
use crate::persist::Page;
use std::collections::BTreeSet;
use warren_storage::{EntryMeta, MessageOp};

/// The part of a queue that lives only on disk: every message with a
/// sequence from `start` on that has arrived since paging began, in index
/// entries `queue ‖ seq`. Sequences are dense (publishers take them just
/// before sending), so "arrived" is a contiguous range plus a few that came
/// early; later arrivals below `start` are stragglers and stay in memory.
pub(super) struct Tail {
    pub start: u64,
    /// Next sequence to read back.
    pub cursor: u64,
    /// Every sequence below `end` has arrived.
    pub end: u64,
    /// Sequences at or above `end + 1` that arrived early.
    pub ahead: BTreeSet<u64>,
    /// Messages in the tail.
    pub len: u64,
    /// A read is under way.
    pub reading: bool,
    /// Unique per tail and purge: a read started before either is stale.
    pub generation: u64,
}

impl Tail {
    pub(super) fn new(first: u64, end: u64, len: u64, generation: u64) -> Tail {
        Tail {
            start: first,
            cursor: first,
            end,
            ahead: BTreeSet::new(),
            len,
            reading: false,
            generation,
        }
    }
    pub(super) fn arrived(&mut self, seq: u64) {
        if seq == self.end {
            self.end += 1;
            while self.ahead.remove(&self.end) {
                self.end += 1;
            }
        } else if seq > self.end {
            self.ahead.insert(seq);
        }
    }
    /// Nothing left on disk and nothing under way.
    pub(super) fn drained(&self) -> bool {
        self.cursor >= self.end && self.ahead.is_empty() && !self.reading
    }
}

impl Actor {
    /// Whether the queue should start paging: its window is full, and the
    /// message is on disk anyway, the queue is lazy, or memory is under
    /// pressure.
    pub(super) fn should_page(&self, on_disk: bool) -> bool {
        let Some(p) = &self.persister else {
            return false;
        };
        self.pageable
            && (self.ready.len() >= PAGE_WINDOW || self.ready.bytes >= PAGE_WINDOW_BYTES)
            && (on_disk || self.args.lazy || p.paging())
    }

    /// A message for the tail: keep only its place. A message not stored yet
    /// (transient, or a queue that does not persist) is written now, under a
    /// fresh id; a stored one stays in the body cache for its read-back.
    /// Gives back the publish's confirm ticket for the caller to settle.
    pub(super) fn page_out(
        &mut self,
        p: Publish,
        on_disk: bool,
    ) -> Option<std::sync::Arc<crate::events::ConfirmTicket>> {
        let (Some(persister), Some(t)) = (&self.persister, self.tail.as_mut()) else {
            return p.confirm;
        };
        match p.msg.stored {
            Some(id) if on_disk => persister.cache_body(id, &p.msg),
            _ => {
                let id = persister.next_id();
                self.pending.push(MessageOp::PutMessage {
                    id,
                    refs: 1,
                    message: p.msg.to_stored(),
                });
                self.pending.push(MessageOp::Enqueue {
                    queue: self.info.id,
                    seq: p.seq,
                    id,
                    meta: EntryMeta {
                        enqueued_at: self.wall_epoch + self.now,
                        deliveries: 0,
                    },
                });
            }
        }
        t.arrived(p.seq);
        t.len += 1;
        p.confirm
    }

    /// Ask for the next page when the in-memory window runs low.
    pub(super) fn page_in(&mut self) {
        let (Some(persister), Some(t)) = (&self.persister, self.tail.as_mut()) else {
            return;
        };
        // A queue that does not page (priorities, TTL, length limits) only
        // has a tail after a restart: it reads it all back at once, so the
        // recovered messages go first.
        let low = !self.pageable
            || (self.ready.len() < PAGE_WINDOW / 2 && self.ready.bytes < PAGE_WINDOW_BYTES / 2);
        if t.drained() {
            if low {
                // Back to memory until the window fills again.
                self.tail = None;
                self.answer_parked_gets();
            }
            return;
        }
        if t.reading || t.cursor >= t.end || !low {
            return;
        }
        let Some(me) = self.myself.upgrade() else {
            return;
        };
        t.reading = true;
        let generation = t.generation;
        let limit = PAGE_WINDOW
            .saturating_sub(self.ready.len())
            .clamp(1, PAGE_READ);
        persister.read_page(
            self.info.id,
            t.cursor,
            t.end,
            limit,
            Box::new(move |page| {
                let _ = me.send(QueueCmd::Paged { generation, page });
            }),
        );
    }

    /// Messages read back from disk join the in-memory window.
    pub(super) fn paged(&mut self, generation: u64, page: Result<Page, String>) {
        let Some(t) = self.tail.as_mut() else { return };
        if t.generation != generation {
            return; // purged meanwhile
        }
        t.reading = false;
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "reading the queue back from disk failed");
                return;
            }
        };
        t.cursor = t.cursor.max(page.next);
        t.len = t.len.saturating_sub(page.entries.len() as u64);
        if t.cursor >= t.end && t.ahead.is_empty() {
            t.len = 0;
        }
        let counting = self.args.counts_deliveries();
        for (seq, msg, meta) in page.entries {
            let old = seq < self.recovered_below;
            if old && !msg.persistent() {
                // A transient message paged out before a restart: gone.
                if let Some(id) = msg.stored {
                    self.pending.push(MessageOp::Remove {
                        queue: self.info.id,
                        seq,
                        id,
                    });
                }
                continue;
            }
            // Entries written before Warren stored enqueue times count
            // from now.
            let enqueued_at = match meta.enqueued_at {
                0 => self.wall_now(),
                t => t,
            };
            let expires = self.expiry_for(&msg, enqueued_at);
            let entry = Entry {
                seq,
                msg,
                redelivered: old || meta.deliveries > 0,
                expires,
                on_disk: true,
                enqueued_at,
                deliveries: meta.deliveries,
            };
            if counting && meta.deliveries > 0 {
                // Out to a consumer when the broker stopped: that delivery
                // counted, and may have been its last.
                if self
                    .args
                    .delivery_limit
                    .is_some_and(|limit| u64::from(meta.deliveries) > limit)
                {
                    self.dead_letter(&entry.msg, super::dead_letter::Reason::DeliveryLimit);
                    self.unstore(&entry);
                    continue;
                }
                let msg = self.counted(entry.msg, meta.deliveries);
                self.ready.insert(Entry { msg, ..entry });
                continue;
            }
            self.ready.insert(entry);
        }
        if self.args.overflow == super::args::Overflow::DropHead {
            // A length limit set by a policy while the queue paged.
            self.drop_heads_over_limit();
        }
        self.answer_parked_gets();
    }

    /// Answer `basic.get`s that waited for a page, while there is something
    /// to give or nothing left to wait for.
    pub(super) fn answer_parked_gets(&mut self) {
        while !self.parked_gets.is_empty() {
            let waiting = self.tail.as_ref().is_some_and(|t| !t.drained());
            if !self.has_live() && waiting {
                return;
            }
            if let Some((chan_key, no_ack, conn, reply)) = self.parked_gets.pop_front() {
                self.get(chan_key, no_ack, conn, reply);
            }
        }
    }
}
