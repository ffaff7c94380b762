//! Watch latency and idle cost: `cargo bench --bench latency [-- --files N]`.
//!
//! 1. Propagation latency: a server and two `deltasync watch` processes (computers A and B) on
//!    loopback; 100 times, a 1 KiB file is written on A and the clock runs until B has it whole.
//!    Prints p50, p95 and max.
//! 2. Idle cost: a watcher on a folder of N small files (default 100,000) after its first round:
//!    CPU time used over 10 s of idleness and resident memory, read from /proc. `--files 0` skips
//!    this part.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it does nothing.

#[path = "common/fixtures.rs"]
mod fixtures;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("latency: not run outside `cargo bench --bench latency`");
        return;
    }
    let files = args
        .iter()
        .position(|a| a == "--files")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000usize);
    if let Err(e) = run(files) {
        eprintln!("latency: {e}");
        std::process::exit(1);
    }
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_deltasync"))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(data: &Path) -> Res<(Proc, String)> {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut out = BufReader::new(out);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let addr = line.rsplit("listening on ").next().ok_or("no address")?.trim().to_string();
    // The server prints more (its `fingerprint:` line): keep reading, so it never writes into a
    // closed pipe (which would kill it).
    std::thread::spawn(move || out.lines().for_each(drop));
    Ok((Proc(child), addr))
}

fn add_account(data: &Path) -> Res<String> {
    let out = Command::new(bin())
        .args(["account", "add", "bench", "--data"])
        .arg(data)
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().last().map(|s| s.trim().to_string()).ok_or_else(|| "no token".into())
}

fn watch(dir: &Path, addr: &str, token: &str, device: &str) -> Res<Proc> {
    Command::new(bin())
        .args(["watch"])
        .arg(dir)
        .args(["--server", addr, "--token", token, "--no-progress", "--device", device])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Proc)
        .map_err(|e| e.to_string())
}

fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) -> Res<()> {
    let t = Instant::now();
    while t.elapsed() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("timed out waiting for {what}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn run(files: usize) -> Res<()> {
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let data = work.path().join("data");
    let (_server, addr) = start_server(&data)?;
    let token = add_account(&data)?;
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(a.join("lat")).map_err(|e| e.to_string())?;
    let _wa = watch(&a, &addr, &token, "A")?;
    let _wb = watch(&b, &addr, &token, "B")?;
    wait_for("the first round", Duration::from_secs(30), || b.join("lat").is_dir())?;

    let mut lat = Vec::new();
    for i in 0..100u64 {
        let content = fixtures::Rng::new(i + 1).bytes(1024);
        let name = format!("lat/{i}.bin");
        let t = Instant::now();
        std::fs::write(a.join(&name), &content).map_err(|e| e.to_string())?;
        wait_for(&name, Duration::from_secs(30), || {
            std::fs::read(b.join(&name)).is_ok_and(|c| c == content)
        })?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    lat.sort_by(|x, y| x.total_cmp(y));
    println!(
        "propagation latency, 1 KiB file, A -> B on loopback ({} runs): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
        lat[lat.len() - 1]
    );

    if files == 0 {
        return Ok(());
    }
    // Idle cost of a watch on a big folder.
    let big = work.path().join("big");
    for i in 0..files {
        let d = big.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        }
        std::fs::write(d.join(format!("f{i}.txt")), format!("file {i}\n")).map_err(|e| e.to_string())?;
    }
    let data2 = work.path().join("data2");
    let (_server2, addr2) = start_server(&data2)?;
    let token2 = add_account(&data2)?;
    let t = Instant::now();
    let w = watch(&big, &addr2, &token2, "idle")?;
    let pid = w.0.id();
    // The first round is over when the account's journal stops growing.
    let mut last = (0u64, Instant::now());
    wait_for("the first round of the big folder", Duration::from_secs(1800), || {
        let n = changes(&data2);
        if n != last.0 {
            last = (n, Instant::now());
        }
        n >= files as u64 && last.1.elapsed() > Duration::from_secs(3)
    })?;
    let first = t.elapsed().as_secs_f64() - 3.0;
    let cpu0 = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(10));
    let cpu1 = cpu_ticks(pid)?;
    println!(
        "idle watch of {files} files: first round {first:.1} s; CPU over 10 s idle: {} ticks ({:.2} s); RSS {} MiB",
        cpu1 - cpu0,
        (cpu1 - cpu0) as f64 / 100.0,
        rss_kib(pid)? / 1024
    );
    Ok(())
}

/// Journal length of the bench account, as `account list` prints it.
fn changes(data: &Path) -> u64 {
    let out = Command::new(bin()).args(["account", "list", "--data"]).arg(data).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split('\t').nth(1))
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after = stat.rsplit(')').next().ok_or("bad stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).ok_or("bad stat");
    Ok(t(11)? + t(12)?)
}

fn rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}
