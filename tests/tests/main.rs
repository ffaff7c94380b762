//! Integration tests for deltasync, driven the way users drive it: the built `deltasync` binary
//! (`serve`, `account add`, `push`, `pull`) plus raw sockets for the security tests.
//!
//! One test binary (ripgrep style), so the crate and the binary are linked once. It lives in
//! `tests/tests/` (Cargo builds `tests/NAME/main.rs` as the test target `NAME` and leaves the
//! modules beside it alone); plain `tests/util.rs` etc. would each become a test binary too,
//! unless Cargo.toml set `autotests = false`.
//!
//! Run with `cargo test --release --test tests` (the big-file tests are much faster in release).

mod bwlimit;
mod client_safety;
#[cfg(feature = "failpoints")]
mod crash;
mod devices;
mod folders;
mod history;
mod metadata;
mod migration;
mod model;
mod output;
mod priority;
mod push_pull;
mod regression;
mod resume;
mod retention;
mod security;
mod server_faults;
mod server_ops;
mod shared;
mod tls;
mod util;
mod watch;
