//! Wire bytes and wall time of one real sync per scenario, deltasync against `rsync -az`.
//!
//! `cargo bench --bench delta_sizes [-- SCENARIO...]` runs, for each scenario of
//! `common/fixtures.rs` (all, or those whose name contains one of the arguments):
//! 1. generate `base` and `new`; copy `base` into a client folder;
//! 2. start the real `deltasync serve` on 127.0.0.1:0, add an account, push the client folder;
//! 3. if `rsync` is on PATH, start `rsync --daemon` on a free 127.0.0.1 port and seed its module
//!    with the same folder;
//! 4. turn the client folder into `new` in place (unchanged files untouched, moves renamed);
//! 5. time `deltasync push --stats` and `rsync -az --delete --stats`, and read their wire bytes;
//! 6. check both servers now hold exactly `new` (a `deltasync pull` into a fresh folder, and the
//!    rsync module folder).
//!
//! Prints a markdown table on stdout (progress goes to stderr).
//!
//! Environment: `DELTASYNC_BENCH_SCALE` (default 1.0; 0.05 is a quick run), `DELTASYNC_BENCH_TMP`
//! (where the ~1.5 GB per scenario go; default the system temp folder), `DELTASYNC_BIN` (the
//! binary to run; default the one cargo built for this bench, `target/release/deltasync`).
//!
//! `delta_sizes --generate-only DIR SCENARIO [SCALE]` only writes `DIR/base` and `DIR/new` (used by
//! `benches/slow_link.sh`).
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.

#[path = "common/fixtures.rs"]
mod fixtures;

use deltasync::sync::report::human;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use fixtures::Scenario;

const STATE_DIR: &str = ".deltasync";

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let bench_mode = raw.iter().any(|a| a == "--bench");
    let args: Vec<&str> =
        raw.iter().map(String::as_str).filter(|a| !a.starts_with("--") || *a == "--generate-only").collect();
    if args.first() == Some(&"--generate-only") {
        return match generate_only(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("delta_sizes: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !bench_mode {
        println!("delta_sizes: not run outside `cargo bench --bench delta_sizes`");
        return ExitCode::SUCCESS;
    }
    let scenarios: Vec<Scenario> = Scenario::all()
        .into_iter()
        .filter(|s| args.is_empty() || args.iter().any(|a| s.name().contains(a)))
        .collect();
    if scenarios.is_empty() {
        println!("delta_sizes: no scenario matches {args:?}");
        return ExitCode::SUCCESS;
    }
    match run(&scenarios) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delta_sizes: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate_only(args: &[&str]) -> Res<()> {
    let [dir, name, rest @ ..] = args else {
        return Err("usage: --generate-only DIR SCENARIO [SCALE]".into());
    };
    let sc = Scenario::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Scenario::all().iter().map(|s| s.name()).collect();
        format!("unknown scenario {name}; one of {}", names.join(", "))
    })?;
    let scale = match rest.first() {
        Some(s) => s.parse().map_err(|_| format!("bad scale {s}"))?,
        None => fixtures::scale_from_env(),
    };
    let (base, new) = sc.try_generate(Path::new(dir), scale).map_err(|e| e.to_string())?;
    println!("{}\n{}", base.display(), new.display());
    Ok(())
}

/// One timed transfer.
#[derive(Clone, Debug)]
struct Transfer {
    sent: u64,
    received: u64,
    literal: Option<u64>,
    matched: Option<u64>,
    secs: f64,
    verified: Res<()>,
}

impl Transfer {
    fn wire(&self) -> u64 {
        self.sent + self.received
    }
}

struct Outcome {
    scenario: Scenario,
    changed: u64,
    total: u64,
    deltasync: Res<Transfer>,
    rsync: Option<Res<Transfer>>,
}

fn run(scenarios: &[Scenario]) -> Res<()> {
    let scale = fixtures::scale_from_env();
    let bin = PathBuf::from(
        std::env::var_os("DELTASYNC_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_deltasync").into()),
    );
    if !bin.exists() {
        return Err(format!("{} is missing: run `cargo build --release`", bin.display()));
    }
    let rsync = rsync_version();
    let tmp_root =
        std::env::var_os("DELTASYNC_BENCH_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    eprintln!(
        "delta_sizes: scale {scale}, binary {}, {}, temp in {}",
        bin.display(),
        rsync.as_deref().unwrap_or("rsync not found: rsync columns skipped"),
        tmp_root.display()
    );
    let mut outcomes = Vec::new();
    for &sc in scenarios {
        let work = tempfile::Builder::new()
            .prefix(&format!("deltasync-bench-{}-", sc.name()))
            .tempdir_in(&tmp_root)
            .map_err(|e| format!("temp folder in {}: {e}", tmp_root.display()))?;
        let o = run_scenario(sc, scale, &bin, rsync.is_some(), work.path());
        eprintln!("[{}] done", sc.name());
        match o {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                eprintln!("[{}] FAILED: {e}", sc.name());
                outcomes.push(Outcome {
                    scenario: sc,
                    changed: sc.changed_bytes(scale),
                    total: 0,
                    deltasync: Err(e),
                    rsync: None,
                });
            }
        }
    }
    print_tables(scale, rsync.as_deref(), &outcomes);
    if outcomes.iter().any(|o| {
        o.deltasync.as_ref().map_or(true, |t| t.verified.is_err()) || matches!(&o.rsync, Some(Err(_)))
    }) {
        return Err("some scenarios failed (see above)".into());
    }
    Ok(())
}

fn run_scenario(sc: Scenario, scale: f64, bin: &Path, with_rsync: bool, work: &Path) -> Res<Outcome> {
    let name = sc.name();
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    eprintln!("[{name}] generating in {}", work.display());
    let t = Instant::now();
    let (base, new) = sc.try_generate(work, scale).map_err(io("generate"))?;
    let total = fixtures::tree_size(&new, &[]).map_err(io("size of new"))?;
    eprintln!("[{name}] generated in {:.1} s", t.elapsed().as_secs_f64());
    let client = work.join("client");
    fixtures::copy_tree(&base, &client).map_err(io("copy base"))?;

    // deltasync: account, server, first push of `base`.
    let data = work.join("server-data");
    let token = add_account(bin, &data)?;
    let server = DeltasyncServer::start(bin, &data, &work.join("server.log"))?;
    eprintln!("[{name}] deltasync server on {}", server.addr);
    let first = push(bin, &client, &server.addr, &token)?;
    eprintln!("[{name}] base pushed: {} wire bytes in {:.2} s", first.wire(), first.secs);

    // rsync: daemon, seeded with `base`.
    let daemon = if with_rsync {
        let d = RsyncDaemon::start(work)?;
        let seed = rsync_push(&client, &d.url)?;
        eprintln!(
            "[{name}] rsync daemon on {}, seeded: {} wire bytes in {:.2} s",
            d.url,
            seed.wire(),
            seed.secs
        );
        Some(d)
    } else {
        None
    };

    // The change, made in place.
    let m = fixtures::mirror_into(&new, &client, &[STATE_DIR]).map_err(io("apply new"))?;
    eprintln!("[{name}] applied: {m:?}");

    let mut ds = push(bin, &client, &server.addr, &token)?;
    eprintln!("[{name}] deltasync push: {} wire bytes in {:.2} s", ds.wire(), ds.secs);
    ds.verified = verify_deltasync(bin, work, &new, &server.addr, &token);
    if let Err(e) = &ds.verified {
        eprintln!("[{name}] deltasync result WRONG: {e}");
    }
    drop(server);

    let rs = daemon.map(|d| {
        let mut r = rsync_push(&client, &d.url)?;
        eprintln!("[{name}] rsync push: {} wire bytes in {:.2} s", r.wire(), r.secs);
        r.verified = same_tree(&new, &d.dest);
        if let Err(e) = &r.verified {
            eprintln!("[{name}] rsync result WRONG: {e}");
        }
        Ok(r)
    });

    Ok(Outcome { scenario: sc, changed: sc.changed_bytes(scale), total, deltasync: Ok(ds), rsync: rs })
}

/// Pulls the account into a fresh folder and compares it with `new`.
fn verify_deltasync(bin: &Path, work: &Path, new: &Path, addr: &str, token: &str) -> Res<()> {
    let check = work.join("check");
    let out = Command::new(bin)
        .arg("pull")
        .arg(&check)
        .args(["--server", addr, "--token", token, "--no-progress"])
        .args(["--device", "bench-check"])
        .output()
        .map_err(|e| format!("running pull: {e}"))?;
    ok_or_report("deltasync pull", &out)?;
    let r = same_tree(new, &check);
    let _ = std::fs::remove_dir_all(&check);
    r
}

/// Same relative paths with the same bytes (ignoring `.deltasync`).
fn same_tree(want: &Path, got: &Path) -> Res<()> {
    use std::collections::BTreeSet;
    fn files(root: &Path) -> Res<BTreeSet<PathBuf>> {
        let mut out = BTreeSet::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let rd = std::fs::read_dir(root.join(&rel))
                .map_err(|e| format!("{}: {e}", root.join(&rel).display()))?;
            for e in rd {
                let e = e.map_err(|e| e.to_string())?;
                if rel.as_os_str().is_empty() && e.file_name() == STATE_DIR {
                    continue;
                }
                let r = rel.join(e.file_name());
                let ft = e.file_type().map_err(|e| e.to_string())?;
                if ft.is_dir() {
                    stack.push(r);
                } else {
                    out.insert(r);
                }
            }
        }
        Ok(out)
    }
    let (a, b) = (files(want)?, files(got)?);
    if a != b {
        let missing: Vec<_> = a.difference(&b).take(3).collect();
        let extra: Vec<_> = b.difference(&a).take(3).collect();
        return Err(format!("file lists differ: missing {missing:?}, extra {extra:?}"));
    }
    for rel in &a {
        let x = std::fs::read(want.join(rel)).map_err(|e| e.to_string())?;
        let y = std::fs::read(got.join(rel)).map_err(|e| e.to_string())?;
        if x != y {
            return Err(format!("{} differs", rel.display()));
        }
    }
    Ok(())
}

fn ok_or_report(what: &str, out: &Output) -> Res<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn add_account(bin: &Path, data: &Path) -> Res<String> {
    let out = Command::new(bin)
        .args(["account", "add", "bench", "--data"])
        .arg(data)
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    ok_or_report("deltasync account add", &out)?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| "account add printed no token".into())
}

/// A running `deltasync serve`, killed on drop.
struct DeltasyncServer {
    child: Child,
    addr: String,
}

impl DeltasyncServer {
    fn start(bin: &Path, data: &Path, log: &Path) -> Res<Self> {
        let log = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            if let Some(i) = line.find("listening on ") {
                addr = Some(line[i + "listening on ".len()..].trim().to_string());
                break;
            }
        }
        // Keep draining stdout so the server never writes into a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let mut s = DeltasyncServer { child, addr: String::new() };
        s.addr = addr.ok_or("the server exited before printing `listening on`")?;
        Ok(s)
    }
}

impl Drop for DeltasyncServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(bin: &Path, dir: &Path, addr: &str, token: &str) -> Res<Transfer> {
    let mut cmd = Command::new(bin);
    cmd.arg("push").arg(dir).args(["--server", addr, "--token", token]).args([
        "--no-progress",
        "--stats",
        "--device",
        "bench",
    ]);
    let (out, secs) = timed(&mut cmd)?;
    ok_or_report("deltasync push", &out)?;
    parse_stats(&String::from_utf8_lossy(&out.stdout), secs)
}

fn timed(cmd: &mut Command) -> Res<(Output, f64)> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    Ok((out, t.elapsed().as_secs_f64()))
}

/// Reads rsync-style `--stats` (deltasync prints the same labels).
fn parse_stats(text: &str, secs: f64) -> Res<Transfer> {
    let get = |label: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.trim().strip_prefix(label)?;
            let num = rest.split_whitespace().next()?;
            num.replace(',', "").parse().ok()
        })
    };
    let need = |label: &str| get(label).ok_or_else(|| format!("no `{label}` in:\n{text}"));
    Ok(Transfer {
        sent: need("Total bytes sent:")?,
        received: need("Total bytes received:")?,
        literal: get("Literal data:"),
        matched: get("Matched data:"),
        secs,
        verified: Ok(()),
    })
}

fn rsync_version() -> Option<String> {
    let out = Command::new("rsync").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A running `rsync --daemon` on 127.0.0.1 with one writable module, killed on drop.
struct RsyncDaemon {
    child: Child,
    url: String,
    dest: PathBuf,
}

impl RsyncDaemon {
    fn start(work: &Path) -> Res<Self> {
        let dest = work.join("rsync-dest");
        std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
        let conf = work.join("rsyncd.conf");
        // As root the daemon would switch to `nobody`; stay root so the module is writable.
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        let ids = if root { "uid = 0\ngid = 0\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "use chroot = no\nlog file = {}\npid file = {}\n\n[bench]\npath = {}\nread only = no\n{ids}",
                work.join("rsyncd.log").display(),
                work.join("rsyncd.pid").display(),
                dest.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let port = free_port()?;
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", conf.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting rsync --daemon: {e}"))?;
        let d = RsyncDaemon { child, url: format!("rsync://127.0.0.1:{port}/bench/"), dest };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("rsync --daemon did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn rsync_push(src: &Path, url: &str) -> Res<Transfer> {
    let mut src = src.as_os_str().to_owned();
    src.push("/");
    let mut cmd = Command::new("rsync");
    cmd.args(["-az", "--delete", "--stats"]).arg(format!("--exclude=/{STATE_DIR}/")).arg(&src).arg(url);
    let (out, secs) = timed(&mut cmd)?;
    ok_or_report("rsync", &out)?;
    parse_stats(&String::from_utf8_lossy(&out.stdout), secs)
}

fn commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt(n: Option<u64>) -> String {
    n.map_or("?".into(), commas)
}

fn print_tables(scale: f64, rsync: Option<&str>, outcomes: &[Outcome]) {
    println!();
    println!(
        "deltasync vs `rsync -az` over 127.0.0.1, one run each, scale {scale} ({})",
        rsync.unwrap_or("rsync not installed")
    );
    println!();
    println!(
        "| scenario | changed bytes | deltasync wire bytes | rsync -z wire bytes | ratio | deltasync time | rsync time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let mark = |t: &Transfer| if t.verified.is_ok() { "" } else { " (WRONG)" };
        let (dw, dt) = match &o.deltasync {
            Ok(t) => (format!("{}{}", commas(t.wire()), mark(t)), format!("{:.2} s", t.secs)),
            Err(_) => ("failed".into(), "-".into()),
        };
        let (rw, rt, ratio) = match (&o.rsync, &o.deltasync) {
            (Some(Ok(r)), Ok(d)) => (
                format!("{}{}", commas(r.wire()), mark(r)),
                format!("{:.2} s", r.secs),
                if r.wire() > 0 { format!("{:.2}", d.wire() as f64 / r.wire() as f64) } else { "-".into() },
            ),
            (Some(Ok(r)), Err(_)) => (commas(r.wire()), format!("{:.2} s", r.secs), "-".into()),
            (Some(Err(_)), _) => ("failed".into(), "-".into(), "-".into()),
            (None, _) => ("-".into(), "-".into(), "-".into()),
        };
        println!("| {} | {} | {dw} | {rw} | {ratio} | {dt} | {rt} |", o.scenario.name(), human(o.changed));
    }
    println!();
    println!("ratio = deltasync wire bytes / rsync wire bytes (lower is better for deltasync).");
    println!();
    println!(
        "| scenario | tree size | deltasync sent / received | deltasync literal | rsync sent / received | rsync literal | rsync matched |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let d = match &o.deltasync {
            Ok(t) => [format!("{} / {}", commas(t.sent), commas(t.received)), opt(t.literal)],
            Err(e) => [format!("failed: {}", e.lines().next().unwrap_or("")), "-".into()],
        };
        let r = match &o.rsync {
            Some(Ok(t)) => {
                [format!("{} / {}", commas(t.sent), commas(t.received)), opt(t.literal), opt(t.matched)]
            }
            Some(Err(e)) => [format!("failed: {}", e.lines().next().unwrap_or("")), "-".into(), "-".into()],
            None => ["-".into(), "-".into(), "-".into()],
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            o.scenario.name(),
            human(o.total),
            d[0],
            d[1],
            r[0],
            r[1],
            r[2]
        );
    }
}
