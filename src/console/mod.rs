//! What an operator runs against a running relay, through its admin API ([`crate::admin`]):
//! `ackgate status` ([`status`]), one screen and an exit code for scripts, and `ackgate top`
//! ([`top`]), a live terminal view; `ackgate reload` ([`reload`]) makes it re-read its config;
//! `ackgate upgrade` ([`upgrade`]) asks for an upgrade and waits for its outcome.

pub mod reload;
pub mod status;
pub mod top;
pub mod upgrade;
