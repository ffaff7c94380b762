//! The real services the S3 and PostgreSQL tests run against, as `.ci/services.sh` starts them
//! and describes them in variables: `DELTASYNC_TEST_PG` (an admin URL) and
//! `DELTASYNC_TEST_S3_ENDPOINT` + `DELTASYNC_TEST_S3_BUCKET` (keys in `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`). Each call gives a target of its own (a new database, a new prefix),
//! so tests run in parallel without meeting.
//!
//! Without the variables a test says so and passes, so `cargo test` works on a machine without
//! the services; with `DELTASYNC_TEST_SERVICES=required` (as CI sets it) their absence fails.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

fn missing<T>(what: &str) -> Option<T> {
    if std::env::var("DELTASYNC_TEST_SERVICES").as_deref() == Ok("required") {
        panic!("{what} is not set, and DELTASYNC_TEST_SERVICES=required: start .ci/services.sh");
    }
    eprintln!("skipped: {what} is not set (start the services with .ci/services.sh)");
    None
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).expect("the OS random number generator");
    format!("{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), hex::encode(r))
}

/// A URL of a new, empty PostgreSQL database, or `None` when no test server is configured.
pub fn pg_url() -> Option<String> {
    let Ok(admin) = std::env::var("DELTASYNC_TEST_PG") else {
        return missing("DELTASYNC_TEST_PG");
    };
    let name = unique("t");
    let out = Command::new("psql")
        .args([admin.as_str(), "-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "CREATE DATABASE failed: {}", String::from_utf8_lossy(&out.stderr));
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

/// The S3 test server: (endpoint URL, bucket, a new prefix), or `None` when none is configured.
pub fn s3() -> Option<(String, String, String)> {
    let (Ok(endpoint), Ok(bucket)) =
        (std::env::var("DELTASYNC_TEST_S3_ENDPOINT"), std::env::var("DELTASYNC_TEST_S3_BUCKET"))
    else {
        return missing("DELTASYNC_TEST_S3_ENDPOINT / DELTASYNC_TEST_S3_BUCKET");
    };
    Some((endpoint, bucket, unique("p")))
}
