//! deltasync: a self-hosted file sync service that sends rsync-style deltas.
//!
//! # Layout
//! - [`address`]: `--server HOST[:PORT]` checked, port 7700 by default.
//! - [`path`]: `RelPath`, the validated path type every path from outside becomes.
//! - [`hash`]: xxh3-128 content identity.
//! - [`fsutil`]: durable writes (temp, fsync, rename), metadata, no-follow checks.
//! - [`delta`]: fast_rsync wrapped for huge files: block-size rule, signature cache, windowed diff,
//!   streaming apply.
//! - [`protocol`]: frames, messages and the counted connection.
//! - [`transport`]: TLS 1.3 for every connection: the server's certificate, the client's pinning.
//! - [`server`]: `deltasync serve`: accounts and devices, metadata (SQLite), content store (packs).
//! - [`sync`]: the client's engine: index, scan, plan (pure decisions), execute.
//! - [`progress`]: progress bars.
//! - [`status`]: `deltasync status`.
//! - [`watch`]: continuous sync: file-system events and server notices start rounds.
//! - [`history`]: `deltasync log`, `restore` and `undo`: the client's side of the server's history.
//! - [`logging`]: the log on stderr: level (`--log-level`, `RUST_LOG`), text or JSON, colour only on a terminal.
//! - [`when`]: RFC 3339 times and ages (`2h`, `3d`) as people write them.

pub mod address;
pub mod client;
pub mod delta;
pub mod fsutil;
pub mod hash;
pub mod history;
pub mod logging;
pub mod path;
pub mod progress;
pub mod protocol;
pub mod server;
pub mod status;
pub mod sync;
pub mod transport;
pub mod watch;
pub mod when;
