//! ackgate: a durable Fluentd Forward relay.
//!
//! The data path, in the order a batch takes it, and the invariant of DESIGN.md each part
//! enforces (by number):
//!
//! ```text
//! sender ─TCP─▶ ingress ─request─▶ spool writer ─fsync─▶ redb ◀─read─ dispatcher ─▶ node ─▶ aggregator
//!   ▲             │ ack after the commit (1)                               ▲           │
//!   └─────────────┘                                                        └── ack ────┘ delete (2)
//! ```
//!
//! - [`forward`]: the wire format only: bytes in, frames out; no socket, no clock. Event bytes
//!   are sliced, never re-encoded (6); invalid input is an error, never a panic (4).
//! - [`ingress`]: the sender side: connections the supervisor hands over under a connection cap
//!   and the partial-request budget, handshake, acks in order only after the commit (1), bytes
//!   released from the socket only once stored (10), a bad request closes only its connection
//!   and is dead-lettered (4), no read while the spool is full (5). It must not touch redb: it
//!   only hands requests to the spool.
//! - [`spool`]: the redb file and its one writer thread: group commit with fsync (1), records
//!   removed only by an ack's delete or a dead letter (2, 8), chunk ids drawn once (3), the byte
//!   budget (5), recovery from I/O errors and a full disk without a restart (9).
//! - [`upstream`]: the dispatcher (every record has a place: 8), node connections (abort at
//!   once, resend with the same chunk id: 3, 7), weighted choice and health.
//! - [`admin`]: the operator's HTTP listener (metrics, health, the JSON API); reads state, and
//!   acts only through the spool's and dispatcher's own calls.
//! - [`relay`]: the worker's relay: everything above started together, stopped or handed over
//!   in order.
//! - [`supervise`]: core tasks that must not end while ackgate runs (9).
//! - [`lifecycle`]: sockets that outlive the process reading them (10): `ackgate run`'s
//!   supervisor (it imports nothing of the relay), the worker's side of its protocols, reload
//!   (the one owner of the settings in force) and upgrade.
//! - [`config`]: the TOML file, strict, every error naming its key.
//! - [`metrics`]: metric names and their text; reads nothing, owns no socket.
//! - [`middlebox`]: transparent mode's socket options (original destination, `SO_MARK`) and
//!   the registry of ackgate's own upstream sources by which ingress refuses a loop.
//! - [`inspect`], [`view`], [`console`]: `ackgate spool`, `ackgate status`, `ackgate top`.
//! - [`tools`] (`send`, `receive`) and [`bench`]: the Forward tools and the load benchmark
//!   that come with the relay; the relay itself never calls them.
//! - [`tls`], [`clock`]: rustls settings; wall-clock time in ms.
//! - [`limit`]: permit counts a reload can resize; [`logging`]: the tracing subscriber, its
//!   level reloadable.

pub mod admin;
pub mod bench;
pub mod clock;
pub mod config;
pub mod console;
pub mod forward;
pub mod ingress;
pub mod inspect;
pub mod lifecycle;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod middlebox;
pub mod relay;
pub mod spool;
pub mod supervise;
pub mod tls;
pub mod tools;
pub mod upstream;
pub mod view;
