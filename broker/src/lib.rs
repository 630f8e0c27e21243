//! Warren, an AMQP 0-9-1 broker.
//!
//! Layout (one file per concern):
//! - [`server`] — listener, connection limit, shutdown, broker-wide state.
//! - [`connection`] — one task per connection: handshake, frame loop, channel
//!   methods, publish assembly, deliveries, confirms, heartbeats.
//! - [`channel`] — per-channel state owned by the connection task.
//! - [`vhost`] — exchanges, queues and bindings; routing with a moka cache.
//! - [`exchange`] — binding indexes and matching (direct, fanout, topic trie,
//!   headers).
//! - [`queue`] — queue handles and the per-queue actor that owns queue state,
//!   including paging: beyond a window, a queue keeps only the range of
//!   sequences it has on disk and reads them back in order.
//! - [`queue_args`] — queue arguments (TTL, expiry, limits, priorities):
//!   validation at declare, decoding for the actor.
//! - [`dead_letter`] — dead-lettered messages (`x-death`) and cycle checks.
//! - [`persist`] — the store service: the group-commit writer thread, the
//!   page reader thread, message ids, the moka cache of hot bodies.
//! - [`message`] — the shared message.
//! - [`error`] — errors shaped as channel.close / connection.close.
//! - [`alarm`] — resource alarms (memory high watermark, free disk limit)
//!   that block publishing connections, and the paging signal for queues.
//! - [`config`] — settings.
//!
//! A `basic.publish`: socket -> frame check -> method decode -> the channel
//! gathers header and body -> the vhost routes (cache, then trie/index) ->
//! each queue's handle gets the `Arc<Message>` over a bounded channel -> the
//! queue actor enqueues it and dispatches to a consumer with credit -> that
//! connection assigns a delivery tag and writes deliver + raw header + body.

pub mod alarm;
pub mod broker;
pub mod channel;
pub mod config;
pub mod connection;
pub mod dead_letter;
pub mod error;
pub mod events;
pub mod exchange;
pub mod message;
pub mod persist;
pub mod queue;
pub mod queue_args;
pub mod server;
pub mod vhost;

pub use config::Config;
pub use server::{RunningBroker, Server};
