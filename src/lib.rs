//! ackgate: a durable Fluentd Forward relay.
pub mod config;
pub mod forward;
pub mod ingress;
pub mod spool;
pub mod tools;
pub mod upstream;
