//! ackgate: a durable Fluentd Forward relay.
pub mod bench;
pub mod clock;
pub mod config;
pub mod forward;
pub mod ingress;
pub mod inspect;
pub mod metrics;
pub mod spool;
pub mod supervise;
pub mod tls;
pub mod tools;
pub mod upstream;
