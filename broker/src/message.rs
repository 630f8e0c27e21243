//! One message, shared (`Arc`) by every queue it was routed to. The body and
//! names are slices of the publisher's read buffer; the content header is the
//! publisher's raw bytes, sent to consumers verbatim.

use bytes::Bytes;
use std::sync::Arc;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;

#[derive(Debug)]
pub struct Message {
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub header: ContentHeader,
    pub body: Bytes,
}

pub type MessageRef = Arc<Message>;

impl Message {
    /// delivery-mode 2.
    pub fn persistent(&self) -> bool {
        self.header.is_persistent()
    }
}
