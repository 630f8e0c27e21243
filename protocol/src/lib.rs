//! Warren's AMQP 0-9-1 wire format. No tokio, no storage: bytes in, values out.
//!
//! Layout:
//! - [`frame`] — the 7-byte frame header, parsed with nom and checked against
//!   `frame_max` *before* a frame is buffered; frame encoding helpers.
//! - [`table`] — a structural validator for field tables (depth and size limits)
//!   run before any table reaches amq-protocol's recursive parser.
//! - [`method`] — inbound method decoding (hand-written for the per-message
//!   methods, guarded amq-protocol for the rest) and outbound encoding.
//! - [`content`] — the content header kept as raw bytes with lazy getters.
//! - [`reply`] — reply codes.
//! - [`client`] — client-side encoding for Warren's load generator and tests
//!   (never used by the broker), and an incremental frame parser.
//!
//! The broker talks to this crate only; amq-protocol types appear in the API
//! solely as the decoded form of rare (non hot-path) methods.

pub mod client;
pub mod content;
pub mod frame;
pub mod method;
pub mod reply;
pub mod table;

pub use amq_protocol::protocol as amqp;
pub use amq_protocol::types;
