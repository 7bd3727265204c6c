//! ackgate: a durable Fluentd Forward relay.
pub mod forward;
