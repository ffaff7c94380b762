//! The `deltasync` binary: parses the command line and maps errors to one line and an exit code.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use deltasync::client::ClientError;
use deltasync::history::{self, HistoryError};
use deltasync::progress::{Progress, Settings};
use deltasync::protocol::At;
use deltasync::server::{self, ServerConfig};
use deltasync::sync::report::Report;
use deltasync::sync::{Folder, Options, SyncError};
use deltasync::watch::WatchOptions;

use cli::{AccountCommand, Cli, Command, SyncArgs};

/// Exit codes, documented in README.md.
mod code {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const AUTH: u8 = 4;
    pub const VERSION: u8 = 5;
    pub const UNRESOLVED: u8 = 6;
    pub const DISK: u8 = 7;
    pub const IDENTITY: u8 = 8;
    pub const HELD: u8 = 9;
    /// Partial: some paths were skipped (unreadable here, vanished while read, refused by the
    /// server), each listed; the rest was synced. rsync's code for a partial transfer.
    pub const PARTIAL: u8 = 23;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Client commands log at info (RUST_LOG may say otherwise); `serve` takes --log-level, -v and
    // --log-format (see `deltasync::logging` for which wins).
    let (level, format) = match &cli.command {
        Command::Serve { verbose, log_level, log_format, .. } => {
            let level = log_level.map(tracing::Level::from).or(verbose.then_some(tracing::Level::DEBUG));
            (level, (*log_format).into())
        }
        _ => (None, deltasync::logging::Format::Text),
    };
    deltasync::logging::init(level, format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deltasync: cannot start the async runtime: {e}");
            return ExitCode::from(code::FAILED);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => c,
        Err(e) => {
            let c = exit_code(&e);
            eprintln!("deltasync: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(c)
        }
    }
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM (what `systemctl stop`, `docker stop` and `kill`
/// send), so both stop `serve` and `watch` cleanly. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that comes early is not lost (nor
/// fatal: SIGTERM's default action kills the process).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT (Ctrl-C)")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<SyncError>() {
            return sync_code(s);
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return client_code(c);
        }
        if let Some(h) = cause.downcast_ref::<HistoryError>() {
            return match h {
                HistoryError::Usage(_) => code::USAGE,
                HistoryError::Client(c) => client_code(c),
                HistoryError::Sync(s) => sync_code(s),
                HistoryError::Io { .. } | HistoryError::Index(_) => code::DISK,
                HistoryError::Other(_) => code::FAILED,
            };
        }
    }
    code::FAILED
}

fn sync_code(s: &SyncError) -> u8 {
    match s {
        SyncError::Client(c) => client_code(c),
        SyncError::Io { .. } | SyncError::Index(_) => code::DISK,
        SyncError::Linked(_) => code::USAGE,
        _ => code::FAILED,
    }
}

fn client_code(c: &ClientError) -> u8 {
    match c {
        ClientError::Unreachable { .. } | ClientError::NotDeltasync(_) => code::UNREACHABLE,
        ClientError::IdentityChanged { .. } => code::IDENTITY,
        ClientError::Auth(_) => code::AUTH,
        ClientError::Version(_) => code::VERSION,
        _ => code::FAILED,
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { listen, storage, open_registration, keep, tls_cert, tls_key, bwlimit, .. } => {
            let storage = storage.storage();
            let data = storage.data_dir.clone();
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (in use? try --listen 127.0.0.1:0)"))?;
            let addr = listener.local_addr()?;
            // The database exists (in WAL mode) before we say we listen, so a script may run
            // `account add` the moment it reads the line.
            drop(
                server::open_metadata(&storage)
                    .with_context(|| format!("cannot open {}", storage.describe()))?,
            );
            // Caught from here on: a SIGTERM right after the `listening` line still stops cleanly.
            let stop = shutdown_signal()?;
            let tls_files = tls_cert.zip(tls_key);
            let config = ServerConfig { storage, tls_files, open_registration, keep, bwlimit };
            let identity = server::identity(&config).context("cannot set up TLS")?;
            server::record_fingerprint(&data, &identity.fingerprint)
                .with_context(|| format!("cannot write to {}", data.display()))?;
            println!("deltasync: data in {}, listening on {addr}", data.display());
            println!("fingerprint: {}", identity.fingerprint);
            if let Some(shared) = config.storage.shared() {
                println!("{shared}");
            }
            if identity.from_ca {
                println!("(a certificate from --tls-cert: clients check it against their CA roots)");
            }
            server::run(listener, config, stop).await?;
            eprintln!("deltasync: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Add { name, device, storage } } => {
            let (store, data) = (storage.storage(), storage.data);
            check_names(&name, &device)?;
            let fresh = store.is_local() && !data.join("deltasync.db").exists();
            let meta = server::open_metadata(&store)?;
            if store.is_local() {
                warn_unserved(&data, fresh);
            }
            let fp = server::serving_fingerprint(&data).context("cannot set up the server's TLS identity")?;
            let (acct, token) = server::add_account(meta.as_ref(), &name, &device)
                .with_context(|| format!("cannot add account `{name}`"))?;
            println!("Created account `{}` with device `{device}`.", acct.name);
            print_token(&fp, &token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Token { name, device, storage } } => {
            let (store, data) = (storage.storage(), storage.data);
            check_names(&name, &device)?;
            if store.is_local() && !data.join("deltasync.db").exists() {
                // Nothing to add a device to: say so instead of making an empty data folder.
                anyhow::bail!(
                    "{} is not a deltasync data folder (it has no deltasync.db); give the folder your server runs with, as --data or DELTASYNC_DATA (its `serve` prints `data in DIR`)",
                    data.display()
                );
            }
            let meta = server::open_metadata(&store)?;
            if store.is_local() {
                warn_unserved(&data, false);
            }
            let fp = server::serving_fingerprint(&data).context("cannot set up the server's TLS identity")?;
            let token = server::new_token();
            match meta.add_device(&name, &device, &token) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(no_account(&name, &store)),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot add device `{device}`"))),
            }
            println!("Added device `{device}` to account `{name}`.");
            print_token(&fp, &token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Devices { name, storage } } => {
            let store = storage.storage();
            let meta = server::open_metadata(&store)?;
            let Some(devices) = meta.list_devices(&name)? else { return Err(no_account(&name, &store)) };
            for d in devices {
                let seen = match (d.last_seen, &d.last_addr) {
                    (Some(t), Some(a)) => {
                        format!("last seen {} from {a}", deltasync::when::format_rfc3339(t))
                    }
                    (Some(t), None) => format!("last seen {}", deltasync::when::format_rfc3339(t)),
                    _ => "never seen".to_string(),
                };
                let state = match d.revoked {
                    Some(t) => format!("revoked {}", deltasync::when::format_rfc3339(t)),
                    None => "active".to_string(),
                };
                println!(
                    "{}\t{state}\t{seen}\tcreated {}",
                    d.name,
                    deltasync::when::format_rfc3339(d.created)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Revoke { name, device, storage } } => {
            let (store, data) = (storage.storage(), storage.data);
            let meta = server::open_metadata(&store)?;
            if !meta.revoke_device(&name, &device)? {
                anyhow::bail!(
                    "account `{name}` has no active device `{device}`; see `deltasync account devices {name} --data {}`",
                    data.display()
                );
            }
            println!(
                "Revoked device `{device}` of account `{name}`: its token no longer works, and a running server closes its connections within a second."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Remove { name, yes, storage } } => {
            let store = storage.storage();
            let meta = server::open_metadata(&store)?;
            let Some(info) = meta.list_accounts()?.into_iter().find(|a| a.account.name == name) else {
                return Err(no_account(&name, &store));
            };
            if !yes {
                use std::io::IsTerminal;
                if !std::io::stdin().is_terminal() {
                    eprintln!(
                        "deltasync: refusing to remove account `{name}` without confirmation: pass --yes (stdin is not a terminal)"
                    );
                    return Ok(ExitCode::from(code::USAGE));
                }
                eprint!(
                    "Remove account `{name}`: its devices, its files ({}) and all their history? This cannot be undone. Type the account's name to confirm: ",
                    server::human_size(info.used)
                );
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer).context("cannot read the confirmation")?;
                if answer.trim() != name {
                    eprintln!("deltasync: not confirmed; nothing was removed");
                    return Ok(ExitCode::from(code::FAILED));
                }
            }
            if !meta.remove_account(&name)? {
                return Err(no_account(&name, &store));
            }
            println!(
                "Removed account `{name}`. The space its files took is freed by the next prune (hourly in a running server, or `deltasync prune`)."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::List { storage } } => {
            let store = storage.storage();
            let meta = server::open_metadata(&store)?;
            for a in meta.list_accounts()? {
                // The first line's format is relied on by scripts; usage goes on its own line.
                println!("{}\t{} changes", a.account.name, a.seq);
                let quota =
                    a.quota.map_or("no quota".to_string(), |q| format!("quota {}", server::human_size(q)));
                println!("  {} used ({} bytes), {quota}", server::human_size(a.used), a.used);
                // Its folders, when it has more than `default` (the usage above is theirs together).
                let folders = meta.folders(a.account.id)?;
                for (name, seq, used) in folders.iter().filter(|_| folders.len() > 1) {
                    println!("  folder {name}: {seq} changes, {} used", server::human_size(*used));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Quota { name, size, storage } } => {
            let store = storage.storage();
            let quota = server::parse_size(&size).map_err(anyhow::Error::msg)?;
            let meta = server::open_metadata(&store)?;
            if !meta.set_quota(&name, quota)? {
                anyhow::bail!(
                    "no account named `{name}` in {}; see `deltasync account list`",
                    store.describe()
                );
            }
            match quota {
                Some(q) => println!("Account `{name}` may now hold {} ({q} bytes).", server::human_size(q)),
                None => println!("Account `{name}` has no quota now."),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => sync(args, true, false).await,
        Command::Pull(args) => sync(args, false, true).await,
        Command::Watch { args, rescan } => {
            if args.dry_run {
                eprintln!(
                    "deltasync: watch has no dry run (it would have to stop before every change it sends); \
                     use `deltasync push --dry-run {dir}` and `deltasync pull --dry-run {dir}` to see what a round \
                     would do",
                    dir = args.dir.display()
                );
                return Ok(ExitCode::from(code::USAGE));
            }
            if args.json || args.stats {
                eprintln!(
                    "deltasync: --json and --stats are for push and pull; watch prints one line per change \
                     on stderr (-q for none)"
                );
                return Ok(ExitCode::from(code::USAGE));
            }
            let opts = Options { upload: true, download: true, ..connect_options(&args)? };
            // One line per change it sends or receives, by default, so a user sees it working.
            let progress = Arc::new(Progress::with(Settings {
                bars: !args.no_progress,
                verbose: true,
                quiet: args.quiet,
                record: false,
            }));
            let wopts = WatchOptions { rescan: std::time::Duration::from_secs(rescan.max(1)) };
            if !args.quiet {
                eprintln!("deltasync: watching {} (Ctrl-C to stop)", args.dir.display());
            }
            deltasync::watch::watch(&args.dir, opts, wopts, progress, shutdown_signal()?).await?;
            if !args.quiet {
                eprintln!("deltasync: stopped watching");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { dir, folder } => {
            print!("{}", deltasync::status::status(&dir, folder.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { dir, path, deleted, json, limit } => {
            log(&dir, path.as_deref(), deleted, json, limit).await
        }
        Command::Restore { dir, paths, rev, at, to, no_progress, quiet } => {
            let at = match (rev, at) {
                (Some(r), None) => At::Rev(r),
                (None, Some(t)) => At::Time(t),
                _ => {
                    return Err(HistoryError::Usage(
                        "give exactly one of --rev N and --at TIME (see `deltasync log DIR PATH`)".into(),
                    )
                    .into());
                }
            };
            let targets = history::targets(&dir, &paths)?;
            history::require_synced(&dir)?;
            match to {
                Some(dest) => restore_to(&dir, &targets, at, &dest, quiet).await,
                None => restore(&dir, &targets, at, no_progress, quiet).await,
            }
        }
        Command::Undo { dir, device, since, no_progress, quiet } => {
            undo(&dir, &device, since, no_progress, quiet).await
        }
        Command::Export { storage, account, folder, dest, at } => {
            let (d, a, f, to) = (storage.storage(), account.clone(), folder.clone(), dest.clone());
            let data = d.describe();
            let summary = tokio::task::spawn_blocking(move || server::history::export(&d, &a, &f, &to, at))
                .await
                .context("the export stopped unexpectedly")?
                .with_context(|| format!("cannot export account `{account}` from {data}"))?;
            let what = if folder == deltasync::protocol::DEFAULT_FOLDER {
                format!("account `{account}`")
            } else {
                format!("folder `{folder}` of account `{account}`")
            };
            let when = at.map_or_else(
                || "as it is now".to_string(),
                |t| format!("as of {}", deltasync::when::format_rfc3339(t)),
            );
            println!(
                "Exported {what} {when} to {}: {} ({}), {}, {}.",
                dest.display(),
                count(summary.files, "file"),
                server::human_size(summary.bytes),
                count(summary.dirs, "folder"),
                count(summary.links, "link")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "deltasync", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out).context("cannot render the man page")?;
            use std::io::Write;
            std::io::stdout().write_all(&out).context("cannot write the man page to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { storage, keep, grace } => {
            let d = storage.storage();
            let data = d.describe();
            let summary = tokio::task::spawn_blocking(move || server::history::prune(&d, &keep, grace))
                .await
                .context("the prune stopped unexpectedly")?
                .with_context(|| format!("cannot prune {data}"))?;
            println!(
                "Pruned {data}: forgot {}, deleted {} ({} freed).",
                count(summary.versions, "version"),
                count(summary.packs, "pack"),
                server::human_size(summary.bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `1 file`, `2 files`.
fn count(n: u64, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// `deltasync log`: a table, or one JSON object per line.
async fn log(
    dir: &std::path::Path,
    path: Option<&std::path::Path>,
    deleted: bool,
    json: bool,
    limit: u32,
) -> anyhow::Result<ExitCode> {
    let target = match path {
        Some(p) => history::target(dir, p)?,
        None => None,
    };
    let (mut client, note) = history::connect(dir).await?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let what = match (&target, deleted) {
        (Some(p), false) => format!("the history of `{p}`"),
        (Some(p), true) => format!("the deleted paths under `{p}`"),
        (None, false) => "the folder's history".to_string(),
        (None, true) => "the folder's deleted paths".to_string(),
    };
    let (versions, more) = history::log(&mut client, target.clone(), deleted, limit)
        .await
        .with_context(|| format!("cannot list {what}"))?;
    if json {
        let mut out = String::new();
        for v in &versions {
            out.push_str(&history::json_line(v));
            out.push('\n');
        }
        print!("{out}");
    } else if versions.is_empty() {
        println!(
            "{}",
            match (&target, deleted) {
                (Some(p), false) => format!("`{p}` has no history on the server"),
                (_, true) => "no deleted paths to restore".to_string(),
                (None, false) => "no changes on the server yet".to_string(),
            }
        );
    } else {
        print!("{}", history::table(&versions));
        if deleted {
            eprintln!(
                "note: to bring a path back, run `deltasync restore {} PATH --rev N` with N one less than the \
                 revision of its delete",
                dir.display()
            );
        }
    }
    if more {
        eprintln!(
            "note: showing the newest {}; there may be more (--limit N shows up to {})",
            versions.len(),
            deltasync::protocol::MAX_LOG
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `deltasync restore --to DEST`: the synced folder is left alone.
async fn restore_to(
    dir: &std::path::Path,
    targets: &[Option<deltasync::path::RelPath>],
    at: At,
    dest: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    history::check_dest(dir, dest)?;
    let (mut client, note) = history::connect(dir).await?;
    if let Some(n) = note.filter(|_| !quiet) {
        eprintln!("{n}");
    }
    let point = history::describe_point(at);
    let w = history::restore_to(&mut client, dir, targets, at, dest)
        .await
        .with_context(|| format!("cannot restore into {}", dest.display()))?;
    for e in &w.errors {
        eprintln!("error: {e}");
    }
    if !quiet {
        println!(
            "Wrote {} ({}), {} and {} as of {point} to {}.",
            count(w.files, "file"),
            server::human_size(w.bytes),
            count(w.dirs, "folder"),
            count(w.links, "link"),
            dest.display()
        );
    }
    if !w.errors.is_empty() {
        eprintln!("deltasync: {} paths could not be restored (see above)", w.errors.len());
        return Ok(ExitCode::from(code::FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder opened for the pull round that follows a restore or an undo: its lock is taken
/// before the server changes anything, so the round cannot be refused afterwards.
async fn open_for_pull(
    dir: &std::path::Path,
    no_progress: bool,
    quiet: bool,
) -> anyhow::Result<(Folder, deltasync::client::Client, Options, String, Progress)> {
    history::require_synced(dir)?;
    let opts = Options { upload: false, download: true, ..Options::default() };
    let mut folder = Folder::open(dir, false)?;
    let settings = folder.settings(&opts)?;
    let progress = Progress::with(Settings { bars: !no_progress, quiet, ..Settings::default() });
    let client = folder.connect(&settings, &progress).await?;
    Ok((folder, client, opts, settings.device, progress))
}

/// `deltasync restore` (without `--to`): the server commits the old state, then a pull brings it.
async fn restore(
    dir: &std::path::Path,
    targets: &[Option<deltasync::path::RelPath>],
    at: At,
    no_progress: bool,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let (mut folder, mut client, opts, device, progress) = open_for_pull(dir, no_progress, quiet).await?;
    let point = history::describe_point(at);
    for t in targets {
        let what = history::describe_target(t);
        let r = history::restore(&mut client, t.clone(), at)
            .await
            .with_context(|| format!("cannot restore {what} as of {point}"))?;
        if r.changed.is_empty() && r.skipped.is_empty() && !quiet {
            println!("{what} is already as it was at {point}; nothing to restore");
        }
        for p in r.changed.iter().filter(|_| !quiet) {
            println!("restored {p}");
        }
        for p in &r.skipped {
            let line = format!(
                "skipped {p}: could not be restored (its old content was pruned, or it changed meanwhile)"
            );
            if quiet { eprintln!("{line}") } else { println!("{line}") }
        }
    }
    let report = folder.round(&mut client, &opts, &device, &Arc::new(progress)).await?;
    Ok(report_round(dir, &report, &Shown { upload: false, quiet, ..Shown::default() }))
}

/// `deltasync undo`: the server reverts a device's changes, then a pull brings the result.
async fn undo(
    dir: &std::path::Path,
    device: &str,
    since: Option<i64>,
    no_progress: bool,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let (mut folder, mut client, opts, me, progress) = open_for_pull(dir, no_progress, quiet).await?;
    let since_text =
        since.map_or_else(|| "ever".to_string(), |t| format!("since {}", deltasync::when::format_rfc3339(t)));
    let r = history::undo(&mut client, device, since.unwrap_or(0))
        .await
        .with_context(|| format!("cannot undo the changes of device `{device}`"))?;
    if r.changed.is_empty() && r.skipped.is_empty() && !quiet {
        println!(
            "nothing to undo: device `{device}` made no changes {since_text} that are not undone already"
        );
    }
    for p in r.changed.iter().filter(|_| !quiet) {
        println!("reverted {p}");
    }
    for p in &r.skipped {
        let line = format!("skipped {p}: changed later by another device");
        if quiet { eprintln!("{line}") } else { println!("{line}") }
    }
    let report = folder.round(&mut client, &opts, &me, &Arc::new(progress)).await?;
    Ok(report_round(dir, &report, &Shown { upload: false, quiet, ..Shown::default() }))
}

fn check_names(account: &str, device: &str) -> anyhow::Result<()> {
    server::auth::check_name("account name", account).map_err(anyhow::Error::msg)?;
    server::auth::check_name("device name", device).map_err(anyhow::Error::msg)
}

fn no_account(name: &str, store: &server::Storage) -> anyhow::Error {
    anyhow::anyhow!("no account named `{name}` in {}; see `deltasync account list`", store.describe())
}

/// Warns (on stderr) when no server has opened `data` yet: a token made in a folder other than
/// the server's is rejected by that server. `created`: the folder (or its database) was just made.
/// `serve` records its fingerprint in `DATA/tls/fingerprint` at every start, so a folder without
/// one has never been served (by this version).
fn warn_unserved(data: &std::path::Path, created: bool) {
    if deltasync::transport::tls_dir(data).join("fingerprint").exists() {
        return;
    }
    let shown = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    let what = if created {
        format!("{} did not exist: created a new, empty data folder", shown.display())
    } else {
        format!("no server has opened {} yet", shown.display())
    };
    eprintln!(
        "warning: {what}. If your server runs with another --data (or DELTASYNC_DATA), this token will not work there; run `deltasync account` with the server's --data. If this is a new server, start it with `deltasync serve --data {}`.",
        shown.display()
    );
}

/// What a new device needs: the server's fingerprint, and its token as the last line.
fn print_token(fp: &deltasync::transport::Fingerprint, token: &str) {
    println!(
        "The server's fingerprint (give it to the device's --fingerprint, or compare it at the first connection):"
    );
    println!("fingerprint: {fp}");
    println!("The device's token (shown only now; only a hash is stored):");
    println!("{token}");
}

/// The options every push, pull and watch shares: server, credentials, trust, timeout.
fn connect_options(args: &SyncArgs) -> anyhow::Result<Options> {
    let token = match &args.token_file {
        Some(path) => Some(read_token_file(path)?),
        None => args.token.clone(),
    };
    Ok(Options {
        server: args.server.clone(),
        token,
        device: args.device.clone(),
        fingerprint: args.fingerprint,
        timeout: Some(std::time::Duration::from_secs(args.timeout)),
        max_delete: args.max_delete,
        bwlimit: args.bwlimit,
        folder: args.folder.clone(),
        relink: args.relink,
        ..Options::default()
    })
}

/// `--token-file`: the token is the file's first line.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {} (--token-file)", path.display()))?;
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(t) => Ok(t.to_string()),
        None => anyhow::bail!(
            "the token file {} is empty; put the token `deltasync account add` printed in it",
            path.display()
        ),
    }
}

async fn sync(args: SyncArgs, upload: bool, download: bool) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    if args.json && args.dry_run {
        eprintln!(
            "deltasync: --json does not describe a dry run; use --dry-run alone (its `would ...` lines)"
        );
        return Ok(ExitCode::from(code::USAGE));
    }
    if upload && !args.dir.exists() {
        anyhow::bail!("{} does not exist; push uploads an existing folder", args.dir.display());
    }
    let opts = Options {
        upload,
        download,
        dry_run: args.dry_run,
        restore_deleted: args.restore_deleted && download,
        ..connect_options(&args)?
    };
    let mut folder = Folder::open(&args.dir, download)?;
    let settings = folder.settings(&opts)?;
    let progress = Arc::new(Progress::with(Settings {
        // --json keeps stdout for JSON and stderr for errors: no bars, no per-file lines.
        bars: !args.no_progress && !args.json,
        verbose: args.verbose && !args.json,
        quiet: args.quiet || args.json,
        record: args.json,
    }));
    let mut client = folder.connect(&settings, &progress).await?;
    let report = folder.round(&mut client, &opts, &settings.device, &progress).await?;
    let shown = Shown {
        upload,
        verbose: args.verbose,
        quiet: args.quiet,
        dry_run: args.dry_run,
        stats: args.stats,
        json: args.json.then(|| progress.results()),
        elapsed: Some(started.elapsed()),
    };
    Ok(report_round(&args.dir, &report, &shown))
}

/// How a round's outcome is shown.
#[derive(Default)]
struct Shown {
    upload: bool,
    verbose: bool,
    /// `-q`: nothing on success; failures still on stderr.
    quiet: bool,
    dry_run: bool,
    stats: bool,
    /// `--json`: the files done (path, what), printed as JSON lines with the summary.
    json: Option<Vec<(String, String)>>,
    /// From the start of the command, for the summary's time and average rate.
    elapsed: Option<std::time::Duration>,
}

/// The exit code of a round. Precedence, most specific first: 6 (unresolved: run again), 7 (this
/// computer's disk is full), 9 (deletes held by the guard), 23 (paths skipped, the rest synced),
/// 1 (paths failed).
fn round_code(report: &Report) -> u8 {
    if !report.unresolved.is_empty() {
        code::UNRESOLVED
    } else if report.local_disk_full {
        code::DISK
    } else if report.held.is_some() {
        code::HELD
    } else if !report.skipped.is_empty() {
        code::PARTIAL
    } else if !report.errors.is_empty() {
        code::FAILED
    } else {
        0
    }
}

/// What a push, pull (or the pull after a restore or an undo) prints, and its exit code.
fn report_round(dir: &std::path::Path, report: &Report, shown: &Shown) -> ExitCode {
    let code = round_code(report);
    if let Some(files) = &shown.json {
        print!("{}", json_lines(report, files, code, shown.elapsed));
    }
    if shown.verbose && !shown.quiet {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
    }
    for s in &report.skipped {
        eprintln!("skipped {s}");
    }
    for e in report.error_lines() {
        eprintln!("error: {e}");
    }
    if !shown.dry_run && !shown.quiet && shown.json.is_none() {
        println!("{}", report.summary_in(shown.elapsed));
    }
    if shown.stats && shown.json.is_none() {
        println!("{}", report.stats());
    }
    if report.pending_other_way > 0 && !shown.dry_run && !shown.quiet {
        let other = if shown.upload { "pull" } else { "push" };
        eprintln!("note: {} changes wait for `deltasync {other}`", report.pending_other_way);
    }
    if !report.unresolved.is_empty() {
        eprintln!(
            "deltasync: {} changes were refused because the server's copy moved on meanwhile ({}); run again to resolve them",
            report.unresolved.len(),
            report.unresolved[0]
        );
    }
    if !report.errors.is_empty() {
        eprintln!("deltasync: {} paths failed (see above)", report.failures());
    }
    if let Some(h) = &report.held {
        eprintln!("deltasync: {}", h.message(dir));
    }
    if !report.skipped.is_empty() {
        eprintln!(
            "deltasync: {} skipped (listed above), the rest was synced; exit code 23 (partial)",
            count(report.skipped.len() as u64, "path")
        );
    }
    ExitCode::from(code)
}

/// `--json`: one object per file (`path`, `action`, and `cause` for skipped and failed ones),
/// then one summary object (`"type":"summary"`: counts, bytes, elapsed seconds, exit code).
fn json_lines(
    report: &Report,
    files: &[(String, String)],
    code: u8,
    elapsed: Option<std::time::Duration>,
) -> String {
    use serde_json::json;
    let mut out = String::new();
    let mut line = |v: serde_json::Value| {
        out.push_str(&v.to_string());
        out.push('\n');
    };
    for (path, what) in files {
        line(json!({"type": "file", "path": path, "action": what}));
    }
    for c in &report.conflicts {
        line(json!({"type": "file", "path": null, "action": "conflict", "cause": c}));
    }
    for s in &report.skipped {
        line(json!({"type": "file", "path": s.path, "action": "skipped", "cause": s.cause}));
    }
    for f in &report.failed {
        line(json!({"type": "file", "path": f.path, "action": "failed", "cause": f.cause}));
    }
    // Failures whose path is not known apart.
    let known: std::collections::HashSet<String> = report.failed.iter().map(ToString::to_string).collect();
    for e in report.errors.iter().filter(|e| !known.contains(*e)) {
        line(json!({"type": "file", "path": null, "action": "failed", "cause": e}));
    }
    for u in &report.unresolved {
        line(json!({"type": "file", "path": null, "action": "unresolved", "cause": u}));
    }
    line(json!({
        "type": "summary",
        "uploaded": report.files_sent + report.files_copied_remote,
        "downloaded": report.files_received + report.files_copied_locally,
        "moved": report.moved,
        "deleted": report.deleted_remote + report.deleted_local,
        "conflicts": report.conflicts.len(),
        "skipped": report.skipped.len(),
        "failed": report.failures(),
        "unresolved": report.unresolved.len(),
        "held_deletes": report.held.as_ref().map(|h| h.deletes),
        "pending_other_way": report.pending_other_way,
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
        "elapsed_secs": elapsed.map(|d| d.as_secs_f64()),
        "up_to_date": report.summary().starts_with("up to date"),
        "exit_code": code,
    }));
    out
}
