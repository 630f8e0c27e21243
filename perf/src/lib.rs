//! warren-perf: a load generator for AMQP 0-9-1 brokers, in the spirit of
//! RabbitMQ's PerfTest and lavinmqperf.
//!
//! - [`client`]: URI parsing, handshake and synchronous setup methods.
//! - [`idle`]: hold idle connections, channels and queues (RSS measurement).
//! - [`run`]: producers, consumers, per-second report and summary.
//! - [`sink`]: a fake broker that discards publishes, to measure the client alone.
//! - [`stream`]: plain TCP or TLS (rustls), split for the hot loops.
//!
//! Frames are encoded and parsed with [`warren_protocol::client`] (a whole
//! publish batch into one buffer; an incremental, borrowing parser).

pub mod client;
pub mod idle;
pub mod run;
pub mod sink;
pub mod stream;
