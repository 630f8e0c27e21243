//! Queue-level deduplication (`x-message-deduplication: true` on a queue,
//! see `crate::dedup`): a message whose key is held by a message still in
//! the queue (ready, on disk or unacked) is dropped; the key is free again
//! once that message leaves (acked, dead-lettered, expired, purged).
//!
//! A durable queue's keys are stored as `key → sequence` under the queue's
//! scope: the publisher writes a persistent message's key in the batch that
//! enqueues it, the queue deletes it (only while it still names that
//! message) when the message leaves, and reads them back at start-up. So
//! the keys survive a crash, unlike the plugin's.

use super::actor::Actor;
use super::ready::Entry;
use crate::dedup::{key_of, queue_scope};
use bytes::Bytes;
use rustc_hash::FxHashMap;
use warren_storage::MessageOp;

/// A queue's keys, by the sequence of the message that holds each.
pub(super) struct QueueDedup {
    pub header: String,
    pub keys: FxHashMap<Bytes, u64>,
    pub scope: Bytes,
    /// Duplicates dropped so far.
    pub duplicates: u64,
}

impl QueueDedup {
    pub(super) fn new(header: String, queue: u64) -> QueueDedup {
        QueueDedup {
            header,
            keys: FxHashMap::default(),
            scope: queue_scope(queue),
            duplicates: 0,
        }
    }
}

impl Actor {
    /// Whether a message arriving with sequence `seq` is a duplicate; if
    /// not, its key (if any) is now held by it.
    pub(super) fn is_duplicate(
        &mut self,
        msg: &crate::message::Message,
        seq: u64,
        on_disk: bool,
    ) -> bool {
        let persisted = self.persisted;
        let Some(d) = self.dedup.as_mut() else {
            return false;
        };
        let Some(key) = key_of(&msg.header, &d.header) else {
            return false;
        };
        match d.keys.get(&key) {
            Some(&holder) if holder != seq => {
                d.duplicates += 1;
                crate::dedup::DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if persisted && on_disk {
                    // The publisher's batch wrote this key naming the
                    // duplicate: name the holder again.
                    let op = MessageOp::DedupPut {
                        scope: d.scope.clone(),
                        key,
                        value: holder,
                    };
                    self.pending.push(op);
                }
                true
            }
            _ => {
                d.keys.insert(key, seq);
                false
            }
        }
    }

    /// A message left the queue: its key is free again.
    pub(super) fn release_key(&mut self, e: &Entry) {
        let persisted = self.persisted;
        let Some(d) = self.dedup.as_mut() else {
            return;
        };
        let Some(key) = key_of(&e.msg.header, &d.header) else {
            return;
        };
        if d.keys.get(&key) == Some(&e.seq) {
            d.keys.remove(&key);
            if persisted && e.on_disk {
                self.pending.push(MessageOp::DedupDelete {
                    scope: d.scope.clone(),
                    key,
                    if_value: Some(e.seq),
                });
            }
        }
    }

    /// After a purge only unacked messages are left: the other keys go.
    pub(super) fn release_purged_keys(&mut self) {
        let persisted = self.persisted;
        let Some(d) = self.dedup.as_mut() else {
            return;
        };
        let unacked = &self.unacked;
        let gone: Vec<(Bytes, u64)> = d
            .keys
            .iter()
            .filter(|(_, s)| !unacked.contains_key(s))
            .map(|(k, s)| (k.clone(), *s))
            .collect();
        for (k, s) in gone {
            d.keys.remove(&k);
            if persisted {
                self.pending.push(MessageOp::DedupDelete {
                    scope: d.scope.clone(),
                    key: k,
                    if_value: Some(s),
                });
            }
        }
    }

    /// At start-up: the stored keys of the messages recovered (`first..end`).
    pub(super) fn restore_keys(&mut self, first: u64, end: u64) {
        let (Some(d), Some(p)) = (self.dedup.as_mut(), &self.persister) else {
            return;
        };
        match p.load_dedup(&d.scope) {
            Ok(keys) => {
                for (k, seq) in keys {
                    if seq >= first && seq < end {
                        d.keys.insert(k, seq);
                    } else {
                        // Left over from a crash between two writes.
                        self.pending.push(MessageOp::DedupDelete {
                            scope: d.scope.clone(),
                            key: k,
                            if_value: Some(seq),
                        });
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the queue's deduplication keys failed"),
        }
    }
}
