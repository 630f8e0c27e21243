//! Writes that cancel out before they reach the disk.
//!
//! A persistent message that a consumer acknowledges while its store write
//! is still waiting for the writer needs no write at all: its
//! `PutMessage`, its `Enqueue` and the ack's `Remove` leave the store as it
//! was. RabbitMQ's message store does the same (a message consumed and
//! acked before it is written is never written). [`elide_consumed`] drops
//! such triples from a batch before it is applied; the batch's outcome is
//! the same as applying every operation in it.

use crate::{MessageId, MessageOp, QueueId};
use std::collections::HashMap;

/// Drop from `ops` every `Enqueue` whose `Remove` comes later in `ops`,
/// when the message's `PutMessage` is in `ops` too (before them), together
/// with the `SetMeta`s of that entry in between; the `PutMessage` loses one
/// reference per dropped entry and goes when it has none left. Returns the
/// number of operations dropped.
///
/// Entries of a queue that a `RemoveRange` or `DropQueue` reaches are left
/// alone (those read what is stored, so what comes before them stays).
pub fn elide_consumed(ops: &mut Vec<MessageOp>) -> usize {
    // Cheap exit for the common batches that hold no removal.
    if !ops.iter().any(|op| matches!(op, MessageOp::Remove { .. })) {
        return 0;
    }
    // PutMessage by id: its position.
    let mut puts: HashMap<MessageId, usize> = HashMap::new();
    // Live entries whose message's put is in the batch: the Enqueue's
    // position and the positions of the SetMetas over it since.
    let mut entries: HashMap<(QueueId, u64), (usize, Vec<usize>)> = HashMap::new();
    let mut dropped = vec![false; ops.len()];
    let mut n = 0;
    for i in 0..ops.len() {
        match &ops[i] {
            MessageOp::PutMessage { id, .. } => {
                puts.insert(*id, i);
            }
            MessageOp::Enqueue { queue, seq, id, .. } => {
                if puts.contains_key(id) {
                    entries.insert((*queue, *seq), (i, Vec::new()));
                } else {
                    entries.remove(&(*queue, *seq));
                }
            }
            MessageOp::SetMeta { queue, seq, .. } => {
                if let Some((_, metas)) = entries.get_mut(&(*queue, *seq)) {
                    metas.push(i);
                }
            }
            &MessageOp::Remove { queue, seq, id } => {
                let Some((e, metas)) = entries.remove(&(queue, seq)) else {
                    continue;
                };
                let same = matches!(&ops[e], MessageOp::Enqueue { id: eid, .. } if *eid == id);
                let Some(&p) = puts.get(&id) else { continue };
                if !same {
                    continue;
                }
                for k in std::iter::once(e).chain(metas).chain(std::iter::once(i)) {
                    dropped[k] = true;
                    n += 1;
                }
                if let MessageOp::PutMessage { refs, .. } = &mut ops[p] {
                    *refs = refs.saturating_sub(1);
                    if *refs == 0 {
                        dropped[p] = true;
                        n += 1;
                        puts.remove(&id);
                    }
                }
            }
            MessageOp::RemoveRange { queue, .. } | MessageOp::DropQueue { queue } => {
                let q = *queue;
                entries.retain(|(eq, _), _| *eq != q);
            }
            _ => {}
        }
    }
    if n > 0 {
        let mut k = 0;
        ops.retain(|_| {
            k += 1;
            !dropped[k - 1]
        });
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemStore;
    use crate::{EntryMeta, MessageStore};

    fn put(id: MessageId, refs: u32) -> MessageOp {
        MessageOp::PutMessage {
            id,
            refs,
            message: crate::contract::msg("body"),
        }
    }
    fn enq(queue: QueueId, seq: u64, id: MessageId) -> MessageOp {
        MessageOp::Enqueue {
            queue,
            seq,
            id,
            meta: EntryMeta::default(),
        }
    }
    fn rm(queue: QueueId, seq: u64, id: MessageId) -> MessageOp {
        MessageOp::Remove { queue, seq, id }
    }
    fn meta(queue: QueueId, seq: u64, id: MessageId) -> MessageOp {
        MessageOp::SetMeta {
            queue,
            seq,
            id,
            meta: EntryMeta {
                enqueued_at: 7,
                deliveries: 1,
            },
        }
    }

    /// Applying `ops` whole and elided leaves two stores the same; returns
    /// how many operations were dropped.
    fn same_outcome(before: &[MessageOp], ops: Vec<MessageOp>) -> usize {
        let (a, b) = (MemStore::new(), MemStore::new());
        a.apply(before).unwrap();
        b.apply(before).unwrap();
        let mut elided = ops.clone();
        let n = elide_consumed(&mut elided);
        assert_eq!(ops.len() - elided.len(), n);
        a.apply(&ops).unwrap();
        b.apply(&elided).unwrap();
        assert_eq!(a.state(), b.state(), "ops {ops:?}\nelided {elided:?}");
        n
    }

    #[test]
    fn a_message_acked_before_its_write_is_never_written() {
        let ops = vec![
            put(1, 1),
            enq(5, 0, 1),
            put(2, 1),
            enq(5, 1, 2),
            rm(5, 0, 1),
        ];
        let mut e = ops.clone();
        assert_eq!(elide_consumed(&mut e), 3);
        assert_eq!(e.len(), 2);
        assert!(matches!(e[0], MessageOp::PutMessage { id: 2, .. }));
        assert_eq!(same_outcome(&[], ops), 3);
    }

    #[test]
    fn a_message_in_two_queues_keeps_its_body_for_the_other() {
        let ops = vec![put(1, 2), enq(5, 0, 1), enq(6, 0, 1), rm(5, 0, 1)];
        let mut e = ops.clone();
        assert_eq!(elide_consumed(&mut e), 2);
        assert!(matches!(e[0], MessageOp::PutMessage { refs: 1, .. }));
        assert_eq!(same_outcome(&[], ops.clone()), 2);
        // Both acked: nothing is written.
        let mut both = ops;
        both.push(rm(6, 0, 1));
        assert_eq!(same_outcome(&[], both), 5);
    }

    #[test]
    fn writes_already_stored_or_reached_by_a_range_stay() {
        // The put went in an earlier batch: the removal must be written.
        assert_eq!(
            same_outcome(&[put(1, 1), enq(5, 0, 1)], vec![rm(5, 0, 1)]),
            0
        );
        // A purge in between reads the stored entries: nothing is dropped.
        let ops = vec![
            put(1, 1),
            enq(5, 0, 1),
            MessageOp::RemoveRange {
                queue: 5,
                from: 1,
                to: 9,
            },
            rm(5, 0, 1),
        ];
        assert_eq!(same_outcome(&[], ops), 0);
        // A requeue's SetMeta goes with the entry.
        let ops = vec![put(1, 1), enq(5, 0, 1), meta(5, 0, 1), rm(5, 0, 1)];
        assert_eq!(same_outcome(&[], ops), 4);
    }

    #[test]
    fn random_batches_keep_their_outcome() {
        // A small deterministic generator: enqueues into two queues, acks
        // of live entries (possibly of entries stored in an earlier batch),
        // requeues and purges.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut elided_total = 0;
        for _ in 0..200 {
            let mut live: Vec<(QueueId, u64, MessageId)> = Vec::new();
            let (mut id, mut seqs) = (1u64, [0u64; 2]);
            let mut batches: Vec<Vec<MessageOp>> = vec![Vec::new(), Vec::new()];
            for batch in batches.iter_mut() {
                for _ in 0..next(30) {
                    match next(10) {
                        0..=4 => {
                            let two = next(3) == 0;
                            let refs = if two { 2 } else { 1 };
                            batch.push(put(id, refs));
                            for (q, seq) in seqs.iter_mut().enumerate().take(refs as usize) {
                                batch.push(enq(q as u64, *seq, id));
                                live.push((q as u64, *seq, id));
                                *seq += 1;
                            }
                            id += 1;
                        }
                        5..=7 if !live.is_empty() => {
                            let (q, s, m) = live.swap_remove(next(live.len() as u64) as usize);
                            batch.push(rm(q, s, m));
                        }
                        8 if !live.is_empty() => {
                            let (q, s, m) = live[next(live.len() as u64) as usize];
                            batch.push(meta(q, s, m));
                        }
                        9 => {
                            let q = next(2);
                            let from = next(seqs[q as usize] + 1);
                            batch.push(MessageOp::RemoveRange {
                                queue: q,
                                from,
                                to: seqs[q as usize],
                            });
                            live.retain(|(lq, ls, _)| *lq != q || *ls < from);
                        }
                        _ => {}
                    }
                }
            }
            elided_total += same_outcome(&[], batches[0].clone());
            elided_total += same_outcome(&batches[0], batches[1].clone());
        }
        assert!(
            elided_total > 0,
            "the generator never made an elidable batch"
        );
    }
}
