//! The `deltasync` binary: parses the command line and maps errors to one line and an exit code.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use deltasync::client::ClientError;
use deltasync::history::{self, HistoryError};
use deltasync::progress::Progress;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = matches!(&cli.command, Command::Serve { verbose: true, .. });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(if verbose { tracing::Level::DEBUG } else { tracing::Level::INFO })
        .with_target(false)
        .init();
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
        Command::Serve { listen, data, open_registration, keep, tls_cert, tls_key, bwlimit, .. } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (in use? try --listen 127.0.0.1:0)"))?;
            let addr = listener.local_addr()?;
            // The database exists (in WAL mode) before we say we listen, so a script may run
            // `account add` the moment it reads the line.
            drop(server::open_metadata(&data).with_context(|| format!("cannot open {}", data.display()))?);
            let tls_files = tls_cert.zip(tls_key);
            let config = ServerConfig { data_dir: data.clone(), tls_files, open_registration, keep, bwlimit };
            let identity = server::identity(&config).context("cannot set up TLS")?;
            server::record_fingerprint(&data, &identity.fingerprint)
                .with_context(|| format!("cannot write to {}", data.display()))?;
            println!("deltasync: data in {}, listening on {addr}", data.display());
            println!("fingerprint: {}", identity.fingerprint);
            if identity.from_ca {
                println!("(a certificate from --tls-cert: clients check it against their CA roots)");
            }
            server::run(listener, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            eprintln!("deltasync: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Add { name, device, data } } => {
            check_names(&name, &device)?;
            let meta = server::open_metadata(&data)?;
            let fp = server::serving_fingerprint(&data).context("cannot set up the server's TLS identity")?;
            let (acct, token) = server::add_account(meta.as_ref(), &name, &device)
                .with_context(|| format!("cannot add account `{name}`"))?;
            println!("Created account `{}` with device `{device}`.", acct.name);
            print_token(&fp, &token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Token { name, device, data } } => {
            check_names(&name, &device)?;
            let meta = server::open_metadata(&data)?;
            let fp = server::serving_fingerprint(&data).context("cannot set up the server's TLS identity")?;
            let token = server::new_token();
            match meta.add_device(&name, &device, &token) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(no_account(&name, &data)),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot add device `{device}`"))),
            }
            println!("Added device `{device}` to account `{name}`.");
            print_token(&fp, &token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Devices { name, data } } => {
            let meta = server::open_metadata(&data)?;
            let Some(devices) = meta.list_devices(&name)? else { return Err(no_account(&name, &data)) };
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
        Command::Account { command: AccountCommand::Revoke { name, device, data } } => {
            let meta = server::open_metadata(&data)?;
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
        Command::Account { command: AccountCommand::Remove { name, yes, data } } => {
            let meta = server::open_metadata(&data)?;
            let Some(info) = meta.list_accounts()?.into_iter().find(|a| a.account.name == name) else {
                return Err(no_account(&name, &data));
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
                return Err(no_account(&name, &data));
            }
            println!(
                "Removed account `{name}`. The space its files took is freed by the next prune (hourly in a running server, or `deltasync prune`)."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::List { data } } => {
            let meta = server::open_metadata(&data)?;
            for a in meta.list_accounts()? {
                // The first line's format is relied on by scripts; usage goes on its own line.
                println!("{}\t{} changes", a.account.name, a.seq);
                let quota =
                    a.quota.map_or("no quota".to_string(), |q| format!("quota {}", server::human_size(q)));
                println!("  {} used ({} bytes), {quota}", server::human_size(a.used), a.used);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Quota { name, size, data } } => {
            let quota = server::parse_size(&size).map_err(anyhow::Error::msg)?;
            let meta = server::open_metadata(&data)?;
            if !meta.set_quota(&name, quota)? {
                anyhow::bail!(
                    "no account named `{name}` in {}; see `deltasync account list --data {}`",
                    data.display(),
                    data.display()
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
            let opts = Options { upload: true, download: true, ..connect_options(&args)? };
            let progress = Arc::new(Progress::new(!args.no_progress, args.verbose));
            let wopts = WatchOptions { rescan: std::time::Duration::from_secs(rescan.max(1)) };
            eprintln!("deltasync: watching {} (Ctrl-C to stop)", args.dir.display());
            deltasync::watch::watch(&args.dir, opts, wopts, progress, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            eprintln!("deltasync: stopped watching");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { dir } => {
            print!("{}", deltasync::status::status(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { dir, path, deleted, json, limit } => {
            log(&dir, path.as_deref(), deleted, json, limit).await
        }
        Command::Restore { dir, paths, rev, at, to, no_progress } => {
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
                Some(dest) => restore_to(&dir, &targets, at, &dest).await,
                None => restore(&dir, &targets, at, no_progress).await,
            }
        }
        Command::Undo { dir, device, since, no_progress } => undo(&dir, &device, since, no_progress).await,
        Command::Export { data, account, dest, at } => {
            let (d, a, to) = (data.clone(), account.clone(), dest.clone());
            let summary = tokio::task::spawn_blocking(move || server::history::export(&d, &a, &to, at))
                .await
                .context("the export stopped unexpectedly")?
                .with_context(|| format!("cannot export account `{account}` from {}", data.display()))?;
            let when = at.map_or_else(
                || "as it is now".to_string(),
                |t| format!("as of {}", deltasync::when::format_rfc3339(t)),
            );
            println!(
                "Exported account `{account}` {when} to {}: {} ({}), {}, {}.",
                dest.display(),
                count(summary.files, "file"),
                server::human_size(summary.bytes),
                count(summary.dirs, "folder"),
                count(summary.links, "link")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { data, keep, grace } => {
            let d = data.clone();
            let summary = tokio::task::spawn_blocking(move || server::history::prune(&d, &keep, grace))
                .await
                .context("the prune stopped unexpectedly")?
                .with_context(|| format!("cannot prune {}", data.display()))?;
            println!(
                "Pruned {}: forgot {}, deleted {} ({} freed).",
                data.display(),
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
) -> anyhow::Result<ExitCode> {
    history::check_dest(dir, dest)?;
    let (mut client, note) = history::connect(dir).await?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let point = history::describe_point(at);
    let w = history::restore_to(&mut client, dir, targets, at, dest)
        .await
        .with_context(|| format!("cannot restore into {}", dest.display()))?;
    for e in &w.errors {
        eprintln!("error: {e}");
    }
    println!(
        "Wrote {} ({}), {} and {} as of {point} to {}.",
        count(w.files, "file"),
        server::human_size(w.bytes),
        count(w.dirs, "folder"),
        count(w.links, "link"),
        dest.display()
    );
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
) -> anyhow::Result<(Folder, deltasync::client::Client, Options, String, Progress)> {
    history::require_synced(dir)?;
    let opts = Options { upload: false, download: true, ..Options::default() };
    let mut folder = Folder::open(dir, false)?;
    let settings = folder.settings(&opts)?;
    let progress = Progress::new(!no_progress, false);
    let client = folder.connect(&settings, &progress).await?;
    Ok((folder, client, opts, settings.device, progress))
}

/// `deltasync restore` (without `--to`): the server commits the old state, then a pull brings it.
async fn restore(
    dir: &std::path::Path,
    targets: &[Option<deltasync::path::RelPath>],
    at: At,
    no_progress: bool,
) -> anyhow::Result<ExitCode> {
    let (mut folder, mut client, opts, device, progress) = open_for_pull(dir, no_progress).await?;
    let point = history::describe_point(at);
    for t in targets {
        let what = history::describe_target(t);
        let r = history::restore(&mut client, t.clone(), at)
            .await
            .with_context(|| format!("cannot restore {what} as of {point}"))?;
        if r.changed.is_empty() && r.skipped.is_empty() {
            println!("{what} is already as it was at {point}; nothing to restore");
        }
        for p in &r.changed {
            println!("restored {p}");
        }
        for p in &r.skipped {
            println!(
                "skipped {p}: could not be restored (its old content was pruned, or it changed meanwhile)"
            );
        }
    }
    let report = folder.round(&mut client, &opts, &device, &Arc::new(progress)).await?;
    Ok(report_round(dir, &report, false, false, false, false))
}

/// `deltasync undo`: the server reverts a device's changes, then a pull brings the result.
async fn undo(
    dir: &std::path::Path,
    device: &str,
    since: Option<i64>,
    no_progress: bool,
) -> anyhow::Result<ExitCode> {
    let (mut folder, mut client, opts, me, progress) = open_for_pull(dir, no_progress).await?;
    let since_text =
        since.map_or_else(|| "ever".to_string(), |t| format!("since {}", deltasync::when::format_rfc3339(t)));
    let r = history::undo(&mut client, device, since.unwrap_or(0))
        .await
        .with_context(|| format!("cannot undo the changes of device `{device}`"))?;
    if r.changed.is_empty() && r.skipped.is_empty() {
        println!(
            "nothing to undo: device `{device}` made no changes {since_text} that are not undone already"
        );
    }
    for p in &r.changed {
        println!("reverted {p}");
    }
    for p in &r.skipped {
        println!("skipped {p}: changed later by another device");
    }
    let report = folder.round(&mut client, &opts, &me, &Arc::new(progress)).await?;
    Ok(report_round(dir, &report, false, false, false, false))
}

fn check_names(account: &str, device: &str) -> anyhow::Result<()> {
    server::auth::check_name("account name", account).map_err(anyhow::Error::msg)?;
    server::auth::check_name("device name", device).map_err(anyhow::Error::msg)
}

fn no_account(name: &str, data: &std::path::Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no account named `{name}` in {}; see `deltasync account list --data {}`",
        data.display(),
        data.display()
    )
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
    let progress = Progress::new(!args.no_progress, args.verbose);
    let mut client = folder.connect(&settings, &progress).await?;
    let report = folder.round(&mut client, &opts, &settings.device, &Arc::new(progress)).await?;
    Ok(report_round(&args.dir, &report, upload, args.verbose, args.dry_run, args.stats))
}

/// What a push, pull (or the pull after a restore or an undo) prints, and its exit code.
fn report_round(
    dir: &std::path::Path,
    report: &Report,
    upload: bool,
    verbose: bool,
    dry_run: bool,
    stats: bool,
) -> ExitCode {
    if verbose {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if !dry_run {
        println!("{}", report.summary());
    }
    if stats {
        println!("{}", report.stats());
    }
    if report.pending_other_way > 0 && !dry_run {
        let other = if upload { "pull" } else { "push" };
        eprintln!("note: {} changes wait for `deltasync {other}`", report.pending_other_way);
    }
    if !report.unresolved.is_empty() {
        eprintln!(
            "deltasync: {} changes were refused because the server's copy moved on meanwhile ({}); run again to resolve them",
            report.unresolved.len(),
            report.unresolved[0]
        );
        return ExitCode::from(code::UNRESOLVED);
    }
    if !report.errors.is_empty() {
        eprintln!("deltasync: {} paths failed (see above)", report.errors.len());
        return ExitCode::from(if report.local_disk_full { code::DISK } else { code::FAILED });
    }
    if let Some(h) = &report.held {
        eprintln!("deltasync: {}", h.message(dir));
        return ExitCode::from(code::HELD);
    }
    ExitCode::SUCCESS
}
