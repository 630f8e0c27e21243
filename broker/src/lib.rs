//! Warren, an AMQP 0-9-1 broker.
//!
//! Layers, top to bottom; a module uses only those below it:
//! - [`server`] — the listener, the connection limit, shutdown; builds the
//!   broker at start-up (store, recovery, definitions imported at boot).
//! - [`management`] — the management HTTP API (RabbitMQ's paths, fields
//!   and errors): users, vhosts, permissions, policies, limits,
//!   definitions, queues, exchanges, bindings, connections.
//! - [`prometheus`] — RabbitMQ's Prometheus metrics (names, types, labels)
//!   and Warren's own, read from the broker when scraped.
//! - [`definitions`] — RabbitMQ's definitions JSON: import (all or
//!   nothing, never overwriting) and export.
//! - [`connection`] — one task per connection: admission (the handshake
//!   budget), handshake, the `select!` loop over socket, mailbox, heartbeat
//!   and shutdown, the writer.
//! - [`channel`] — channel state and every method's behaviour, one file per
//!   method family (topology, publish, consume, ack, confirm, tx, direct
//!   reply-to), over a narrow context the connection gives it.
//! - [`broker`] — the broker handle shared by every connection: config,
//!   vhosts, the store service, alarms, the direct reply-to registry.
//! - [`vhost`] — exchanges, queues and bindings; definition changes on one
//!   thread, never holding the topology lock across a store write; routing
//!   with a moka cache.
//! - [`exchange`] — binding indexes and matching per exchange type.
//! - [`queue`] — queue handles and the per-queue actor that owns queue state
//!   (ready messages, consumers, paging, TTL, limits, dead-lettering).
//! - [`events`] — what queues tell connections (deliveries, confirms,
//!   cancellations): below both, so neither imports the other.
//! - [`persist`] — the store service: the group-commit writer thread, the
//!   page reader thread, message ids, the moka cache of hot bodies.
//! - [`access`] — users (RabbitMQ's password hashes), vhosts, permissions
//!   and topic permissions, stored as records; checked at login,
//!   `connection.open` and every guarded channel method.
//! - [`replicate`] — a clustered node's sharing of those records (and
//!   policies, limits) through the cluster's metadata Raft group
//!   (`warren-cluster`): changes go through the group, every node mirrors it.
//! - [`policy`] — policies and operator policies: validation with
//!   RabbitMQ's messages, matching, which one applies to a queue or exchange.
//! - [`alarm`] — resource alarms (memory high watermark, free disk limit)
//!   that block publishing connections, and the paging signal for queues.
//! - [`tls`] — rustls for the AMQPS listener: certificates, client
//!   verification, reload, the user a client certificate names.
//! - [`config_file`] — the daemon's settings from a TOML file and `WARREN_*`
//!   variables, under its flags.
//! - [`metrics`] — message counters (RabbitMQ's global ones), counted per
//!   connection and added to the broker's totals once per wake-up.
//! - [`message`], [`error`], [`config`], [`fields`], [`logins`], [`heap`] —
//!   the shared message, errors shaped as channel.close / connection.close,
//!   settings, field values compared as RabbitMQ does, failed-login
//!   accounting, the allocator and its statistics.
//!
//! A `basic.publish`: socket -> frame check -> method decode (connection)
//! -> the channel gathers header and body (`channel/publish.rs`) -> the
//! vhost routes (cache, then the exchanges' indexes) -> each queue's handle
//! gets the `Arc<Message>` over a bounded mailbox -> the queue actor
//! enqueues it and dispatches to a consumer with credit -> that
//! connection's channel assigns a delivery tag and the writer sends deliver
//! + raw header + body (`channel/consume.rs`).

pub mod access;
pub mod alarm;
pub mod broker;
pub mod channel;
pub mod config;
pub mod config_file;
pub mod connection;
pub mod dedup;
pub mod definitions;
pub mod delayed;
pub mod error;
pub mod events;
pub mod exchange;
pub mod fields;
pub mod heap;
pub mod logins;
pub mod management;
pub mod message;
pub mod metrics;
pub mod persist;
pub mod policy;
pub mod prometheus;
pub mod queue;
pub mod replicate;
pub mod server;
pub mod tls;
pub mod vhost;

pub use config::Config;
pub use server::{RunningBroker, Server};
