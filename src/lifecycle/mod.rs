//! Invariant 10: ackgate's own restart, reload, upgrade or crash loses nothing that a sender
//! finished writing to it. The sockets outlive the process that reads them, and the process
//! that reads them says how it is doing to whoever manages it.
//!
//! - [`notify`]: READY / RELOADING / STOPPING (and stored descriptors) to the service manager,
//!   systemd or `ackgate run`'s own supervisor, through `NOTIFY_SOCKET`.
//! - [`supervisor`]: `ackgate run`, which holds the sockets, starts and restarts the worker,
//!   and runs upgrades; it imports nothing of the relay, only [`names`], [`protocol`] and
//!   [`socket`], which import nothing of it either.
//! - [`reload`]: the config file read again and put in force in place, all or nothing;
//!   [`diff`]: what a new config changes, and what of it needs a restart.

pub mod diff;
pub mod link;
pub mod names;
pub mod notify;
pub mod protocol;
pub mod reload;
pub mod signals;
pub mod socket;
pub mod sockets;
pub mod state;
pub mod supervisor;
pub mod worker;
