//! ackgate: a durable Fluentd Forward relay.
pub mod admin;
pub mod bench;
pub mod clock;
pub mod config;
pub mod console;
pub mod forward;
pub mod ingress;
pub mod inspect;
pub mod metrics;
pub mod spool;
pub mod supervise;
pub mod tls;
pub mod tools;
pub mod upstream;
pub mod view;
