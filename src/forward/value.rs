//! msgpack ⇄ JSON for the tools (`send`, `receive`, `spool show`). Not on the relay path.
