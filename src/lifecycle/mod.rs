//! Invariant 10: ackgate's own restart, reload, upgrade or crash loses nothing that a sender
//! finished writing to it. The sockets outlive the process that reads them, and the process
//! that reads them says how it is doing to whoever manages it.
//!
//! - [`notify`]: READY / RELOADING / STOPPING (and stored descriptors) to the service manager,
//!   systemd or `ackgate run`'s own supervisor, through `NOTIFY_SOCKET`.

pub mod notify;
