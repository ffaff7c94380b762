//! The command line (clap is used only here). See README.md for the contract scripts rely on.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
        /// Folder for the database and the accounts' files.
        #[arg(long, default_value = "./deltasync-data")]
        data: PathBuf,
        /// Let a client without a token create a new account.
        #[arg(long)]
        open_registration: bool,
        #[arg(short, long)]
        verbose: bool,
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
    },
}

#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Create an account; its token is the last line printed.
    Add {
        name: String,
        #[arg(long, default_value = "./deltasync-data")]
        data: PathBuf,
    },
    /// List accounts, with their changes, bytes used and quota.
    List {
        #[arg(long, default_value = "./deltasync-data")]
        data: PathBuf,
    },
    /// Limit the bytes an account's files may take (works while the server runs).
    Quota {
        name: String,
        /// Like 500M, 10G, 1.5T (binary units), or `none` for no limit.
        size: String,
        #[arg(long, default_value = "./deltasync-data")]
        data: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct SyncArgs {
    /// The synced folder.
    pub dir: PathBuf,
    /// Server address (remembered in DIR/.deltasync after the first successful run).
    #[arg(long, env = "DELTASYNC_SERVER")]
    pub server: Option<String>,
    /// Account token (remembered after the first successful run).
    #[arg(long, env = "DELTASYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Name of this computer in conflict copies and the journal (default: host name).
    #[arg(long)]
    pub device: Option<String>,
    /// Print rsync-style transfer statistics.
    #[arg(long)]
    pub stats: bool,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// One line per file.
    #[arg(short, long)]
    pub verbose: bool,
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
