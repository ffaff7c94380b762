//! The command line (clap is used only here). See README.md for the contract scripts rely on.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use deltasync::protocol::{BwLimit, MAX_LOG};
use deltasync::server::retention::{DEFAULT_POLICY, Keep};
use deltasync::transport::Fingerprint;
use deltasync::when;

#[derive(Parser, Debug)]
#[command(name = "deltasync", version, about = "Self-hosted file sync that sends rsync-style deltas")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve {
        /// Address to listen on (port 0 picks a free port; the real one is printed).
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: String,
        #[command(flatten)]
        storage: StorageArgs,
        /// Let a client without a token create a new account (at most 3 per source address,
        /// then one per 20 minutes).
        #[arg(long)]
        open_registration: bool,
        /// Serve this certificate (PEM; chain allowed) instead of the data folder's own
        /// self-signed one: clients then check it against their CA roots, no pinning needed.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Which versions history keeps: `all`, `current`, or rules like the default (kinds all,
        /// hourly, daily, weekly, monthly, deleted; ages like 90m, 36h, 30d, 2w, 1y).
        #[arg(long, value_name = "POLICY", default_value = DEFAULT_POLICY, value_parser = parse_keep)]
        keep: Keep,
        /// Limit each connection's bandwidth: SEND:RECEIVE from the server's side (what it sends
        /// to a client, i.e. its downloads : what it receives, its uploads), or one RATE for
        /// both; like 500K, 2M, 1M:4M (per second; K/M/G binary, a bare number is KiB), 0 or
        /// off for none.
        #[arg(long, value_name = "RATE[:RATE]", default_value = "off", value_parser = parse_bwlimit)]
        bwlimit: BwLimit,
        /// Log at debug (the same as --log-level debug).
        #[arg(short, long, conflicts_with = "log_level")]
        verbose: bool,
        /// Which events to log on stderr (default: RUST_LOG if set, else info).
        #[arg(long, value_name = "LEVEL", value_enum)]
        log_level: Option<LogLevel>,
        /// `text` (one line per event) or `json` (one JSON object per line).
        #[arg(long, value_name = "FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Manage accounts (works while the server runs).
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Upload local changes in one round, then exit.
    Push(SyncArgs),
    /// Download remote changes in one round, then exit.
    Pull(SyncArgs),
    /// Sync continuously: upload every change at once, download what other computers change.
    Watch {
        #[command(flatten)]
        args: SyncArgs,
        /// Seconds between full rescans that catch anything the file watcher missed.
        #[arg(long, default_value_t = 300)]
        rescan: u64,
    },
    /// Show the folder's server, account, device, last sync, pending changes and conflicts.
    Status {
        /// The synced folder.
        dir: PathBuf,
        /// Check that DIR is linked to this folder of the account (exit 2 if it is not).
        #[arg(long, value_name = "NAME", env = "DELTASYNC_FOLDER", value_parser = parse_folder)]
        folder: Option<String>,
    },
    /// Show a path's versions (newest first), or the folder's recent changes, from the server.
    Log {
        /// The synced folder.
        dir: PathBuf,
        /// A path in the folder (relative to it, or absolute inside it); without it, every path.
        path: Option<PathBuf>,
        /// List deleted paths whose earlier versions can be restored.
        #[arg(long)]
        deleted: bool,
        /// One JSON object per line (rev, time, device, op, path, kind, size, hash, ...).
        #[arg(long)]
        json: bool,
        /// Show at most N versions.
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LOG)))]
        limit: u32,
    },
    /// Bring files or folders back as they were at a revision or a time.
    #[command(group(ArgGroup::new("point").args(["rev", "at"]).required(true)))]
    Restore {
        /// The synced folder.
        dir: PathBuf,
        /// Paths in the folder (relative to it, or absolute inside it); `.` is the whole folder.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// The revision to go back to (see `deltasync log`).
        #[arg(long, value_name = "N")]
        rev: Option<u64>,
        /// The time to go back to: RFC 3339 (2026-11-30T14:05:00Z) or an age (90m, 2h, 3d).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<i64>,
        /// Write the old versions under DEST (as DEST/PATH) and leave the synced folder alone.
        #[arg(long, value_name = "DEST")]
        to: Option<PathBuf>,
        /// No progress bars.
        #[arg(long)]
        no_progress: bool,
        /// Print nothing on success; failures still go to stderr.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Revert every change one device made (since a time), then pull the result here.
    Undo {
        /// The synced folder.
        dir: PathBuf,
        /// The device whose changes to revert (as `deltasync log` shows it).
        #[arg(long, value_name = "NAME")]
        device: String,
        /// Only its changes at or after TIME: RFC 3339 or an age (90m, 2h, 3d); default: all.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<i64>,
        /// No progress bars.
        #[arg(long)]
        no_progress: bool,
        /// Print nothing on success; failures still go to stderr.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write an account's files as plain files (as they are now, or at a time), from the data
    /// folder (works while the server runs).
    Export {
        #[command(flatten)]
        storage: StorageArgs,
        /// The account to export.
        #[arg(long, value_name = "NAME")]
        account: String,
        /// Which of the account's folders (`deltasync account list` shows them).
        #[arg(long, value_name = "NAME", default_value = deltasync::protocol::DEFAULT_FOLDER, value_parser = parse_folder)]
        folder: String,
        /// Where to write them (made if missing; must be empty).
        dest: PathBuf,
        /// The time to export: RFC 3339 or an age (90m, 2h, 3d); default: now.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        at: Option<i64>,
    },
    /// Forget the versions the retention policy does not keep and free their space (works while
    /// the server runs).
    Prune {
        #[command(flatten)]
        storage: StorageArgs,
        /// Which versions to keep (as `serve --keep`).
        #[arg(long, value_name = "POLICY", default_value = DEFAULT_POLICY, value_parser = parse_keep)]
        keep: Keep,
        /// Leave leftovers of interrupted uploads younger than AGE alone.
        #[arg(long, value_name = "AGE", default_value = "1d", value_parser = parse_grace)]
        grace: Duration,
    },
    /// Print a shell completion script on stdout (e.g. `deltasync completions bash >
    /// ~/.local/share/bash-completion/completions/deltasync`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (e.g. `deltasync man > deltasync.1; man ./deltasync.1`).
    Man,
}

/// `--server`: checked and given its default port here, so a URL or a typo is a usage error.
fn parse_server(s: &str) -> Result<String, String> {
    deltasync::address::parse(s)
}

/// `serve --log-level`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for tracing::Level {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

/// `serve --log-format`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for deltasync::logging::Format {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => deltasync::logging::Format::Text,
            LogFormat::Json => deltasync::logging::Format::Json,
        }
    }
}

/// A point in time, as Unix seconds (`--at`, `--since`).
fn parse_time(s: &str) -> Result<i64, String> {
    when::parse_point(s, when::now_secs())
}

fn parse_folder(s: &str) -> Result<String, String> {
    deltasync::protocol::check_folder(s).map(|()| s.to_string())
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, String> {
    s.parse()
}

fn parse_bwlimit(s: &str) -> Result<BwLimit, String> {
    s.parse()
}

fn parse_keep(s: &str) -> Result<Keep, String> {
    s.parse()
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    when::parse_age(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is not an age: give one like 90m, 12h, 1d, 2w"))
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Create an account and a token for its first device; the token is the last line printed.
    Add {
        name: String,
        /// The first device's name (see `account devices`).
        #[arg(long, value_name = "DEVICE", default_value = "first")]
        device: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Issue a token for another device of an account; the token is the last line printed.
    Token {
        name: String,
        #[arg(long, value_name = "DEVICE")]
        device: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// List an account's devices: created, last seen and from which address, revoked.
    Devices {
        name: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Revoke a device's token; its connections (a running watch too) are closed at once.
    Revoke {
        name: String,
        device: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Delete an account, its devices and all its files and history (asks first).
    Remove {
        name: String,
        /// Do not ask (for scripts).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// List accounts, with their changes, bytes used and quota.
    List {
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Limit the bytes an account's files may take (works while the server runs).
    Quota {
        name: String,
        /// Like 500M, 10G, 1.5T (binary units), or `none` for no limit.
        size: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
}

/// Where the server's data is: the data folder (the embedded default: SQLite and packs), or
/// PostgreSQL and an S3-compatible bucket that many `serve` processes share.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    /// Folder for the server's TLS identity and, without --metadata, the database and the
    /// accounts' files.
    #[arg(long, env = "DELTASYNC_DATA", default_value = "./deltasync-data")]
    pub data: PathBuf,
    /// Keep accounts, devices and history in PostgreSQL (shared by every `serve` process given
    /// the same URL): postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (what it leaves out, from
    /// PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
    #[arg(long, env = "DELTASYNC_METADATA", value_name = "URL", value_parser = parse_metadata)]
    pub metadata: Option<String>,
    /// Keep file content in an S3-compatible bucket: s3://BUCKET[/PREFIX] (needs --metadata;
    /// keys from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "DELTASYNC_STORE", value_name = "s3://BUCKET[/PREFIX]", value_parser = parse_store, requires = "metadata")]
    pub store: Option<(String, String)>,
    /// The S3 server's URL (for anything but AWS itself), like http://127.0.0.1:3900.
    #[arg(long, env = "DELTASYNC_S3_ENDPOINT", value_name = "URL", requires = "store")]
    pub s3_endpoint: Option<String>,
    /// The bucket's region (default: AWS_REGION, else us-east-1).
    #[arg(long, env = "DELTASYNC_S3_REGION", value_name = "REGION", requires = "store")]
    pub s3_region: Option<String>,
}

impl StorageArgs {
    pub fn storage(&self) -> deltasync::server::Storage {
        use deltasync::server::store::s3::S3Config;
        deltasync::server::Storage {
            data_dir: self.data.clone(),
            metadata: self.metadata.clone(),
            s3: self.store.as_ref().map(|(bucket, prefix)| S3Config {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
            }),
        }
    }
}

fn parse_metadata(s: &str) -> Result<String, String> {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a PostgreSQL URL: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        ))
    }
}

fn parse_store(s: &str) -> Result<(String, String), String> {
    deltasync::server::parse_store_url(s)
}

#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    /// The synced folder.
    pub dir: PathBuf,
    /// Server address, HOST[:PORT] (port 7700 by default; remembered in DIR/.deltasync after the
    /// first successful run).
    #[arg(long, env = "DELTASYNC_SERVER", value_name = "HOST[:PORT]", value_parser = parse_server)]
    pub server: Option<String>,
    /// Device token (remembered after the first successful run). Visible in `ps`: prefer
    /// --token-file or DELTASYNC_TOKEN.
    #[arg(long, env = "DELTASYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the token from FILE (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The server's certificate fingerprint, as `deltasync serve` prints it: the connection is
    /// refused unless it matches. Without it, the first connection trusts the server and pins it.
    #[arg(long, value_name = "FP", env = "DELTASYNC_FINGERPRINT", value_parser = parse_fingerprint)]
    pub fingerprint: Option<Fingerprint>,
    /// Seconds to connect and complete the handshakes before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
    /// Limit the bandwidth: UPLOAD:DOWNLOAD, or one RATE for both; like 500K, 2M, 1M:4M (per
    /// second; K/M/G binary, a bare number is KiB as in rsync), 0 or off (or nothing beside the
    /// colon) for no limit that way.
    #[arg(long, value_name = "RATE[:RATE]", default_value = "off", value_parser = parse_bwlimit)]
    pub bwlimit: BwLimit,
    /// Name of this computer in conflict copies and the journal (default: host name).
    #[arg(long)]
    pub device: Option<String>,
    /// Which of the account's folders DIR syncs with (made on the server on first use; one
    /// token serves them all): 1-64 of A-Z a-z 0-9 . _ -. Default: the one DIR is linked to,
    /// else `default`.
    #[arg(long, value_name = "NAME", env = "DELTASYNC_FOLDER", value_parser = parse_folder)]
    pub folder: Option<String>,
    /// Sync DIR with the account, --folder or server given even though it is linked to another
    /// one (refused otherwise, exit 2): the two trees are merged, nothing is deleted.
    #[arg(long)]
    pub relink: bool,
    /// Print rsync-style transfer statistics.
    #[arg(long)]
    pub stats: bool,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// One line per file.
    #[arg(short, long, conflicts_with = "quiet")]
    pub verbose: bool,
    /// Print nothing on success (for cron): no summary, notes or bars; errors still go to stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// push/pull: print one JSON object per file, then one summary object, on stdout (no bars).
    #[arg(long)]
    pub json: bool,
    /// Show what would be done, change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Let a round delete this many files on the server (N, or N% of the folder) past the
    /// mass-delete guard, which otherwise holds back deleting more than half of the folder.
    #[arg(long, value_name = "N|N%")]
    pub max_delete: Option<deltasync::sync::guard::Limit>,
    /// pull: download the files deleted here that the server still has, instead of leaving
    /// their deletes for the next push (the way back from a mass delete held by the guard).
    #[arg(long)]
    pub restore_deleted: bool,
}
