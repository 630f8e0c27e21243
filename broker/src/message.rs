//! One message, shared (`Arc`) by every queue it was routed to. The body and
//! names are slices of the publisher's read buffer; the content header is the
//! publisher's raw bytes, sent to consumers verbatim.

use bytes::Bytes;
use std::sync::Arc;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;
use warren_storage::StoredMessage;

#[derive(Debug)]
pub struct Message {
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub header: ContentHeader,
    pub body: Bytes,
    /// The store id of a persistent message (delivery-mode 2); durable
    /// queues keep it as `queue id ‖ this id` and remove it when it leaves.
    pub stored: Option<u64>,
}

pub type MessageRef = Arc<Message>;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a counter of ids that other nodes hold on to (channel keys,
/// forwarded consumers) starts: past every id the previous run of this
/// node handed out (it would have needed over 1,000 ids a millisecond to
/// get there), so a node that restarted is never taken for its previous
/// run. Below 2^53, so the ids stay exact as JSON numbers anywhere.
pub fn fresh_ids_from() -> u64 {
    unix_ms() << 10
}

impl Message {
    /// delivery-mode 2.
    pub fn persistent(&self) -> bool {
        self.header.is_persistent()
    }

    /// The record written to the store (bytes shared, not copied).
    pub fn to_stored(&self) -> StoredMessage {
        StoredMessage {
            exchange: self.exchange.bytes(),
            routing_key: self.routing_key.bytes(),
            header: self.header.raw().clone(),
            body: self.body.clone(),
        }
    }

    /// Rebuild a stored message; None if the record is not a valid message.
    pub fn from_stored(id: u64, m: StoredMessage) -> Option<Message> {
        Some(Message {
            exchange: ShortStr::from_bytes(m.exchange)?,
            routing_key: ShortStr::from_bytes(m.routing_key)?,
            header: ContentHeader::parse(m.header).ok()?,
            body: m.body,
            stored: Some(id),
        })
    }
}
