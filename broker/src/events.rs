//! What queues tell connections: deliveries, confirms and consumer
//! cancellations travel as [`ConnEvent`]s on the connection's mailbox. This
//! module sits below both queues and connections, so a queue never imports
//! the connection layer.

use crate::message::MessageRef;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What queues (and confirm tickets) tell a connection.
pub enum ConnEvent {
    Deliver {
        chan_key: u64,
        channel: u16,
        tag: Arc<str>,
        msg: MessageRef,
        redelivered: bool,
        seq: u64,
        queue: u64,
        in_flight: Arc<AtomicU32>,
    },
    /// A publish is enqueued on every queue it was routed to (`nack`: a
    /// queue refused it, e.g. `x-overflow: reject-publish`).
    Confirm { chan_key: u64, seq: u64, nack: bool },
    /// The queue removed a consumer at the client's request.
    CancelOk { chan_key: u64, tag: Arc<str> },
    /// The queue went away under a consumer.
    Cancelled { chan_key: u64, tag: Arc<str> },
    /// A direct reply-to message for this connection's reply consumer.
    Reply {
        chan_key: u64,
        channel: u16,
        tag: Arc<str>,
        msg: MessageRef,
    },
}

/// A publisher confirm outstanding on one or more queues: when the last
/// queue drops its clone, the publishing connection hears about it.
pub struct ConfirmTicket {
    pub conn: mpsc::UnboundedSender<ConnEvent>,
    pub chan_key: u64,
    pub seq: u64,
    /// Set by a queue that refused the message (`x-overflow` reject-publish):
    /// the publisher then gets `basic.nack` instead of `basic.ack`.
    pub nacked: AtomicBool,
}

impl ConfirmTicket {
    /// Mark the publish refused: the confirm becomes a `basic.nack`.
    pub fn nack(&self) {
        self.nacked.store(true, Ordering::Relaxed);
    }
}

impl Drop for ConfirmTicket {
    fn drop(&mut self) {
        let _ = self.conn.send(ConnEvent::Confirm {
            chan_key: self.chan_key,
            seq: self.seq,
            nack: *self.nacked.get_mut(),
        });
    }
}

