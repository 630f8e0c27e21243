//! Key encodings. Big-endian so that byte order is numeric order, and a
//! queue's entries are contiguous and in sequence order.

use crate::{EntryMeta, MessageId, QueueId};

/// `queue id ‖ sequence`, 16 bytes big-endian.
pub fn queue_entry(queue: QueueId, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&queue.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Inverse of [`queue_entry`].
pub fn parse_queue_entry(k: &[u8]) -> Option<(QueueId, u64)> {
    if k.len() != 16 {
        return None;
    }
    let mut q = [0u8; 8];
    let mut s = [0u8; 8];
    q.copy_from_slice(&k[..8]);
    s.copy_from_slice(&k[8..]);
    Some((u64::from_be_bytes(q), u64::from_be_bytes(s)))
}

/// An index entry's value: the message id, then (since Warren records
/// them) the entry's [`EntryMeta`], 20 bytes big-endian.
pub fn entry_value(id: MessageId, meta: EntryMeta) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..8].copy_from_slice(&id.to_be_bytes());
    v[8..16].copy_from_slice(&meta.enqueued_at.to_be_bytes());
    v[16..].copy_from_slice(&meta.deliveries.to_be_bytes());
    v
}

/// Inverse of [`entry_value`]; also reads the 8-byte values (the id alone)
/// written before the meta was recorded.
pub fn parse_entry_value(v: &[u8]) -> Option<(MessageId, EntryMeta)> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(v.get(at..at + 8)?.try_into().ok()?))
    };
    match v.len() {
        8 => Some((u64_at(0)?, EntryMeta::default())),
        20 => Some((
            u64_at(0)?,
            EntryMeta {
                enqueued_at: u64_at(8)?,
                deliveries: u32::from_be_bytes(v[16..20].try_into().ok()?),
            },
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_values_round_trip_and_old_values_read() {
        let meta = EntryMeta {
            enqueued_at: 1_765_000_000_123,
            deliveries: 7,
        };
        assert_eq!(parse_entry_value(&entry_value(42, meta)), Some((42, meta)));
        assert_eq!(
            parse_entry_value(&42u64.to_be_bytes()),
            Some((42, EntryMeta::default()))
        );
        assert_eq!(parse_entry_value(&[0u8; 12]), None);
        assert_eq!(parse_entry_value(&[]), None);
    }

    #[test]
    fn byte_order_is_queue_then_sequence_order() {
        let mut keys = [
            queue_entry(2, 1),
            queue_entry(1, 256),
            queue_entry(1, 255),
            queue_entry(1, u64::MAX),
            queue_entry(0, 9),
        ];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_queue_entry(k).unwrap()).collect();
        assert_eq!(
            parsed,
            vec![(0, 9), (1, 255), (1, 256), (1, u64::MAX), (2, 1)]
        );
    }
}
