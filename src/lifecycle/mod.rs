//! Invariant 10: ackgate's own restart, reload, upgrade or crash loses nothing that a sender
//! finished writing to it. The sockets outlive the process that reads them, and the process
//! that reads them says how it is doing to whoever manages it.
//!
//! - [`notify`]: READY / RELOADING / STOPPING (and stored descriptors) to the service manager,
//!   systemd or `ackgate run`'s own supervisor, through `NOTIFY_SOCKET`.
//! - [`reload`]: the config file read again and put in force in place, all or nothing;
//!   [`diff`]: what a new config changes, and what of it needs a restart.

pub mod diff;
pub mod notify;
pub mod reload;
