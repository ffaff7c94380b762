//! The `deltasync` binary: parses the command line and maps errors to one line and an exit code.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use deltasync::client::ClientError;
use deltasync::progress::Progress;
use deltasync::server::{self, ServerConfig};
use deltasync::sync::{Folder, Options, SyncError};
use deltasync::watch::WatchOptions;

use cli::{AccountCommand, Cli, Command, SyncArgs};

/// Exit codes, documented in README.md.
mod code {
    pub const FAILED: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const AUTH: u8 = 4;
    pub const VERSION: u8 = 5;
    pub const UNRESOLVED: u8 = 6;
    pub const DISK: u8 = 7;
    pub const HELD: u8 = 8;
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
            return match s {
                SyncError::Client(c) => client_code(c),
                SyncError::Io { .. } | SyncError::Index(_) => code::DISK,
                _ => code::FAILED,
            };
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return client_code(c);
        }
    }
    code::FAILED
}

fn client_code(c: &ClientError) -> u8 {
    match c {
        ClientError::Unreachable { .. } => code::UNREACHABLE,
        ClientError::Auth(_) => code::AUTH,
        ClientError::Version(_) => code::VERSION,
        _ => code::FAILED,
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { listen, data, open_registration, .. } => {
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (in use? try --listen 127.0.0.1:0)"))?;
            let addr = listener.local_addr()?;
            // The database exists (in WAL mode) before we say we listen, so a script may run
            // `account add` the moment it reads the line.
            drop(server::open_metadata(&data).with_context(|| format!("cannot open {}", data.display()))?);
            let config = ServerConfig { data_dir: data.clone(), open_registration, keep: Default::default() };
            println!("deltasync: data in {}, listening on {addr}", data.display());
            server::run(listener, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            eprintln!("deltasync: stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Account { command: AccountCommand::Add { name, data } } => {
            let meta = server::open_metadata(&data)?;
            let (acct, token) = server::add_account(meta.as_ref(), &name)
                .with_context(|| format!("cannot add account `{name}`"))?;
            println!("Created account `{}`. Its token (shown only now; only a hash is stored):", acct.name);
            println!("{token}");
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
            let opts = Options {
                upload: true,
                download: true,
                dry_run: false,
                server: args.server.clone(),
                token: args.token.clone(),
                device: args.device.clone(),
                max_delete: args.max_delete,
                restore_deleted: false,
                defer_deletes: false,
            };
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
        server: args.server.clone(),
        token: args.token.clone(),
        device: args.device.clone(),
        max_delete: args.max_delete,
        restore_deleted: args.restore_deleted && download,
        defer_deletes: false,
    };
    let mut folder = Folder::open(&args.dir, download)?;
    let settings = folder.settings(&opts)?;
    let progress = Progress::new(!args.no_progress, args.verbose);
    let mut client = folder.connect(&settings, &progress).await?;
    let report = folder.round(&mut client, &opts, &settings.device, &Arc::new(progress)).await?;
    if args.verbose {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if !args.dry_run {
        println!("{}", report.summary());
    }
    if args.stats {
        println!("{}", report.stats());
    }
    if report.pending_other_way > 0 && !args.dry_run {
        let other = if upload { "pull" } else { "push" };
        eprintln!("note: {} changes wait for `deltasync {other}`", report.pending_other_way);
    }
    if !report.unresolved.is_empty() {
        eprintln!(
            "deltasync: {} changes were refused because the server's copy moved on meanwhile ({}); run again to resolve them",
            report.unresolved.len(),
            report.unresolved[0]
        );
        return Ok(ExitCode::from(code::UNRESOLVED));
    }
    if !report.errors.is_empty() {
        eprintln!("deltasync: {} paths failed (see above)", report.errors.len());
        return Ok(ExitCode::from(if report.local_disk_full { code::DISK } else { code::FAILED }));
    }
    if let Some(h) = report.held {
        eprintln!("deltasync: {}", h.message(&args.dir));
        return Ok(ExitCode::from(code::HELD));
    }
    Ok(ExitCode::SUCCESS)
}
