//! Key encodings. Big-endian so that byte order is numeric order, and a
//! queue's entries are contiguous and in sequence order.

use crate::QueueId;

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

#[cfg(test)]
mod tests {
    use super::*;

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
