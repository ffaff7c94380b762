//! Shared helpers: a `deltasync serve` child process, accounts, running push/pull, comparing
//! folders, parsing `--stats`, deterministic pseudo-random bytes, and TLS for the tests' own
//! raw clients and fake servers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use deltasync::protocol::{FrameReader, FrameWriter};
use deltasync::transport::{self, Fingerprint, Trust};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_deltasync");

/// A `deltasync` command that does not inherit settings from the environment.
pub fn command() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("DELTASYNC_SERVER")
        .env_remove("DELTASYNC_TOKEN")
        .env_remove("DELTASYNC_FINGERPRINT")
        .env_remove("DELTASYNC_DATA")
        .env("NO_COLOR", "1");
    c
}

/// Longest any single `deltasync` invocation may run before the test calls it hung.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Server

/// A `deltasync serve` child process on a port chosen by the OS. Killed on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The `--data` folder.
    pub data: PathBuf,
    /// The temp folder holding `data/` and `server.log`; nothing else is written here.
    pub root: PathBuf,
    /// Its certificate's fingerprint, from the `fingerprint:` line it printed (for
    /// `--fingerprint`).
    pub fingerprint: String,
    tmp: Option<TempDir>,
    /// With `DELTASYNC_TEST_BACKEND=shared`: a second `serve` process on the same PostgreSQL
    /// database and S3 prefix (and the same data folder, so the same TLS identity).
    twin: Option<(Child, SocketAddr)>,
    /// Which of the two [`Server::address`] gives next.
    turn: std::sync::atomic::AtomicBool,
}

// ---------------------------------------------------------------------------------------------
// The suites' second run: two server processes on PostgreSQL and S3

/// With `DELTASYNC_TEST_BACKEND=shared` (and `.ci/services.sh`'s variables), [`start_server`]
/// starts two `serve` processes sharing one new PostgreSQL database and one new S3 prefix, and
/// [`Server::address`] alternates between them, so a test's clients are spread over both.
pub fn shared_backend() -> bool {
    std::env::var("DELTASYNC_TEST_BACKEND").as_deref() == Ok("shared")
}

/// The `--metadata`/`--store` settings (as variables) of the server on data folder `data`; none
/// for a server on its data folder alone.
fn backend_env(data: &Path) -> Vec<(String, String)> {
    backend_registry().lock().unwrap_or_else(|p| p.into_inner()).get(data).cloned().unwrap_or_default()
}

/// Gives the server on `data` a new database and S3 prefix (shared mode only).
fn make_backend(data: &Path) {
    make_backend_via(data, &|a| a)
}

/// [`make_backend`], the servers reaching PostgreSQL and S3 at `via(real address)` (a
/// [`Cuttable`] forwarder, say).
fn make_backend_via(data: &Path, via: &dyn Fn(SocketAddr) -> SocketAddr) {
    let var = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("DELTASYNC_TEST_BACKEND=shared needs {k}: run .ci/services.sh"))
    };
    let admin = var("DELTASYNC_TEST_PG");
    let endpoint = var("DELTASYNC_TEST_S3_ENDPOINT");
    let bucket = var("DELTASYNC_TEST_S3_BUCKET");
    let name = format!("it_{}_{}", std::process::id(), random_suffix());
    let out = Command::new("psql")
        .args([admin.as_str(), "-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .expect("run psql");
    assert!(out.status.success(), "CREATE DATABASE: {}", String::from_utf8_lossy(&out.stderr));
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let (base, endpoint) = (redirect(base, via), redirect(&endpoint, via));
    let env = vec![
        ("DELTASYNC_METADATA".to_string(), format!("{base}/{name}")),
        ("DELTASYNC_STORE".to_string(), format!("s3://{bucket}/{name}")),
        ("DELTASYNC_S3_ENDPOINT".to_string(), endpoint),
    ];
    backend_registry().lock().unwrap_or_else(|p| p.into_inner()).insert(data.to_path_buf(), env);
}

/// `scheme://[user@]127.0.0.1:PORT` with the address replaced by `via(address)`.
fn redirect(url: &str, via: &dyn Fn(SocketAddr) -> SocketAddr) -> String {
    let (head, hostport) = match url.rsplit_once('@') {
        Some((h, rest)) => (format!("{h}@"), rest),
        None => {
            let (scheme, rest) = url.split_once("://").expect("a URL");
            (format!("{scheme}://"), rest)
        }
    };
    let addr: SocketAddr = hostport.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    format!("{head}{}", via(addr))
}

/// Whether `.ci/services.sh`'s variables are set; if not, says the test is skipped (and fails
/// it with `DELTASYNC_TEST_SERVICES=required`, as CI sets).
pub fn services_configured() -> bool {
    if std::env::var("DELTASYNC_TEST_PG").is_ok() && std::env::var("DELTASYNC_TEST_S3_ENDPOINT").is_ok() {
        return true;
    }
    assert!(
        std::env::var("DELTASYNC_TEST_SERVICES").as_deref() != Ok("required"),
        "DELTASYNC_TEST_SERVICES=required but the services' variables are not set: run .ci/services.sh"
    );
    eprintln!("skipped: no S3 and PostgreSQL test services (start them with .ci/services.sh)");
    false
}

/// The real addresses of the test services: (PostgreSQL, S3).
pub fn service_addrs() -> (SocketAddr, SocketAddr) {
    let pg = std::env::var("DELTASYNC_TEST_PG").expect("DELTASYNC_TEST_PG");
    let s3 = std::env::var("DELTASYNC_TEST_S3_ENDPOINT").expect("DELTASYNC_TEST_S3_ENDPOINT");
    let pg = pg.rsplit_once('@').map(|(_, r)| r).unwrap_or(&pg);
    let pg = pg.split_once('/').map_or(pg, |(a, _)| a);
    let s3 = s3.split_once("://").map_or(s3.as_str(), |(_, r)| r);
    (pg.parse().expect("PostgreSQL address"), s3.parse().expect("S3 address"))
}

/// Per data folder, its server's `--metadata`/`--store` settings as variables.
type Backends = std::sync::Mutex<BTreeMap<PathBuf, Vec<(String, String)>>>;

fn backend_registry() -> &'static Backends {
    static MAP: OnceLock<Backends> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Two `serve` processes on one new PostgreSQL database and S3 prefix, whatever
/// `DELTASYNC_TEST_BACKEND` says; `None` (the test is skipped) without `.ci/services.sh`'s
/// variables, unless `DELTASYNC_TEST_SERVICES=required` (CI), where that fails.
pub fn start_shared_pair() -> Option<Server> {
    start_shared_pair_via(&|a| a)
}

/// [`start_shared_pair`] with the servers reaching the services at `via(real address)`.
pub fn start_shared_pair_via(via: &dyn Fn(SocketAddr) -> SocketAddr) -> Option<Server> {
    if !services_configured() {
        return None;
    }
    let tmp = tempfile::Builder::new().prefix("deltasync-srv-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    make_backend_via(&root.join("data"), via);
    let mut s = Server::spawn(&root, &root.join("data"));
    s.tmp = Some(tmp);
    Some(s)
}

/// A `deltasync` command for the server on data folder `data`: its `--metadata`/`--store`
/// settings in the environment (none for a data folder alone).
pub fn data_command(data: &Path) -> Command {
    let mut c = command();
    c.envs(backend_env(data));
    c
}

/// The storage of the server on `data`, for the tests' direct looks at it.
pub fn storage_of(data: &Path) -> deltasync::server::Storage {
    let env = backend_env(data);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut st = deltasync::server::Storage::local(data);
    st.metadata = get("DELTASYNC_METADATA");
    st.s3 = get("DELTASYNC_STORE").map(|url| {
        let (bucket, prefix) = deltasync::server::parse_store_url(&url).expect("a store URL made here");
        deltasync::server::store::s3::S3Config {
            bucket,
            prefix,
            endpoint: get("DELTASYNC_S3_ENDPOINT"),
            region: None,
        }
    });
    st
}

/// Starts a server on a fresh, empty data folder.
pub fn start_server() -> Server {
    let tmp = tempfile::Builder::new().prefix("deltasync-srv-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    if shared_backend() {
        return start_shared_pair().expect("DELTASYNC_TEST_BACKEND=shared needs the services");
    }
    let mut s = Server::spawn(&root, &root.join("data"));
    s.tmp = Some(tmp);
    s
}

/// Starts a server on a fresh, empty data folder listening on `listen` (`IP:PORT`); `None` if it
/// could not listen there (the port is taken).
pub fn start_server_at(listen: &str) -> Option<Server> {
    let tmp = tempfile::Builder::new().prefix("deltasync-srv-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    let mut s = Server::try_spawn(&root, &root.join("data"), listen).ok()?;
    s.tmp = Some(tmp);
    Some(s)
}

impl Server {
    fn spawn(root: &Path, data: &Path) -> Server {
        let mut s = Server::try_spawn(root, data, "127.0.0.1:0").unwrap_or_else(|st| {
            panic!("server exited early ({st}); log:\n{}", read_log(root));
        });
        s.spawn_twin("127.0.0.1:0");
        s
    }

    /// In shared mode, the second process (on `listen`).
    fn spawn_twin(&mut self, listen: &str) {
        if backend_env(&self.data).is_empty() {
            return;
        }
        let mut twin = Server::try_spawn(&self.root, &self.data, listen).unwrap_or_else(|st| {
            panic!("the second server exited early ({st}); log:\n{}", read_log(&self.root));
        });
        assert_eq!(twin.fingerprint, self.fingerprint, "two processes on one data folder, two identities");
        let child = twin.child.take().expect("just started");
        self.twin = Some((child, twin.addr));
    }

    /// Starts `deltasync serve --listen LISTEN`; `Err` if it exited before printing its address
    /// (e.g. the port is taken). Other failures panic.
    fn try_spawn(root: &Path, data: &Path, listen: &str) -> Result<Server, ExitStatus> {
        Server::try_spawn_with(root, data, listen, &[])
    }

    /// [`Server::try_spawn`] with extra environment variables for the server.
    fn try_spawn_with(
        root: &Path,
        data: &Path,
        listen: &str,
        envs: &[(&str, &str)],
    ) -> Result<Server, ExitStatus> {
        Server::try_spawn_full(root, data, listen, envs, &[])
    }

    /// [`Server::try_spawn_with`] with extra `serve` arguments.
    fn try_spawn_full(
        root: &Path,
        data: &Path,
        listen: &str,
        envs: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Server, ExitStatus> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("server.log"))
            .expect("open server log");
        let mut child = command()
            .envs(backend_env(data))
            .args(["serve", "--listen", listen, "--data"])
            .arg(data)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn deltasync serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Reads stdout to its end, so the server never blocks on a full pipe. The address comes
        // first, then the `fingerprint:` line.
        std::thread::spawn(move || {
            let mut addr = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, rest)) = line.split_once("listening on ") {
                    addr = Some(rest.trim().to_string());
                } else if let Some(fp) = line.strip_prefix("fingerprint: ")
                    && let Some(a) = addr.take()
                {
                    let _ = tx.send((a, fp.trim().to_string()));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (addr, fingerprint) = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((a, fp)) => {
                    let addr = a.parse::<SocketAddr>().unwrap_or_else(|e| panic!("bad address {a:?}: {e}"));
                    if let Err(e) = fp.parse::<Fingerprint>() {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("the server printed a bad fingerprint: {e}");
                    }
                    break (addr, fp);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(st);
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "server did not print its address and fingerprint within 30 s; log:\n{}",
                            read_log(root)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "server closed stdout without an address and fingerprint; log:\n{}",
                        read_log(root)
                    );
                }
            }
        };
        Ok(Server {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
            root: root.to_path_buf(),
            fingerprint,
            tmp: None,
            twin: None,
            turn: Default::default(),
        })
    }

    /// Kills the server (SIGKILL, like a crash or a power cut) and leaves it down until
    /// [`Server::start_again`].
    pub fn kill_hard(&mut self) {
        self.kill();
    }

    /// Starts a server that was stopped with [`Server::kill_hard`] again, on the same data folder
    /// and the SAME address, so clients that remember it find it. Retries for a few seconds while
    /// the port is not free yet.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again on a running server");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listen = self.addr.to_string();
        loop {
            match Server::try_spawn(&self.root, &self.data, &listen) {
                Ok(mut s) => {
                    assert_eq!(s.addr, self.addr, "the server came back on another address");
                    assert_eq!(
                        s.fingerprint, self.fingerprint,
                        "the server came back on its data folder with another certificate"
                    );
                    self.child = s.child.take();
                    if let Some((_, addr)) = self.twin.take() {
                        self.spawn_twin(&addr.to_string());
                    }
                    return;
                }
                Err(st) if Instant::now() < deadline => {
                    let _ = st;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(st) => panic!(
                    "server could not listen on {listen} again within 10 s ({st}); log:\n{}",
                    read_log(&self.root)
                ),
            }
        }
    }

    /// Panics with the server's log if its process has exited (it should be serving).
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.child = None;
            panic!("the server exited unexpectedly ({st}); log:\n{}", read_log(&self.root));
        }
    }

    /// `IP:PORT` for `--server`. With two processes (shared mode), each call gives the other one.
    pub fn address(&self) -> String {
        match &self.twin {
            Some((_, twin)) if self.turn.fetch_xor(true, std::sync::atomic::Ordering::Relaxed) => {
                twin.to_string()
            }
            _ => self.addr.to_string(),
        }
    }

    /// Where this server keeps its data (the data folder, or PostgreSQL and S3).
    pub fn storage(&self) -> deltasync::server::Storage {
        storage_of(&self.data)
    }

    /// The addresses of both processes (shared mode): the first, then the second.
    pub fn addresses(&self) -> (String, String) {
        let twin = self.twin.as_ref().expect("a pair of server processes");
        (self.addr.to_string(), twin.1.to_string())
    }

    /// Kills the first process only (SIGKILL); the second keeps serving.
    pub fn kill_first(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Address and certificate, for the tests' own TLS clients.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr,
            fingerprint: self.fingerprint.parse().expect("checked when the server started"),
        }
    }

    /// A blocking TLS connection to this server (handshake done, certificate checked).
    pub fn tls(&self) -> TlsStream {
        self.endpoint().tls()
    }

    /// Kills this server and starts a new one on the same data folder (a new port).
    pub fn restart(mut self) -> Server {
        self.kill();
        let mut s = Server::spawn(&self.root, &self.data);
        s.tmp = self.tmp.take();
        s
    }

    /// [`Server::restart`], running `between` while it is stopped.
    pub fn restart_with(mut self, between: impl FnOnce()) -> Server {
        self.kill();
        between();
        let mut s = Server::spawn(&self.root, &self.data);
        s.tmp = self.tmp.take();
        s
    }

    /// What the server wrote to stderr so far (for failure messages).
    pub fn log(&self) -> String {
        read_log(&self.root)
    }

    /// What the server holds now for its first account, as plain files: the server keeps
    /// chunks in packs, not a mirror, so this exports them (as `deltasync export` does) into
    /// `ROOT/server-view`, replaced on each call. Empty while there is no account.
    pub fn files(&self) -> PathBuf {
        let view = self.root.join("server-view");
        if view.exists() {
            fs::remove_dir_all(&view).expect("remove the last server view");
        }
        let storage = self.storage();
        let meta = deltasync::server::open_metadata(&storage).expect("open the database");
        let first = meta.list_accounts().expect("list accounts").into_iter().min_by_key(|a| a.account.id);
        drop(meta);
        match first {
            Some(a) => {
                deltasync::server::history::export(&storage, &a.account.name, "default", &view, None)
                    .unwrap_or_else(|e| panic!("export of the server's files failed: {e}\n{}", self.log()));
            }
            None => fs::create_dir_all(&view).expect("make the view"),
        }
        view
    }

    /// The server process's peak resident memory so far (Linux `VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Unfinished packs in the server's temp area (`data/packs/tmp`).
    pub fn temp_files(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(self.data.join("packs").join("tmp")) {
            for e in rd.flatten() {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((e.path(), len));
            }
        }
        out
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((c, _)) = self.twin.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_log(root: &Path) -> String {
    fs::read_to_string(root.join("server.log")).unwrap_or_default()
}

/// Creates an account with `deltasync account add NAME --data DIR` and returns its token.
pub fn add_account(data_dir: &Path, name: &str) -> String {
    let out =
        run(data_command(data_dir).args(["account", "add", name, "--data"]).arg(data_dir)).ok("account add");
    let token = out.stdout.lines().rev().find(|l| !l.trim().is_empty()).expect("token line").trim();
    assert!(
        token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "unexpected token line {token:?} in:\n{}",
        out.stdout
    );
    token.to_string()
}

/// The account's journal position (its number of changes) from `deltasync account list --data DIR`,
/// which prints `NAME\tN changes` per account.
pub fn account_changes(data_dir: &Path, name: &str) -> u64 {
    let out =
        run(data_command(data_dir).args(["account", "list", "--data"]).arg(data_dir)).ok("account list");
    out.stdout
        .lines()
        .find_map(|l| {
            let (n, rest) = l.split_once('\t')?;
            if n != name {
                return None;
            }
            rest.strip_suffix(" changes")?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no line for account `{name}` in `account list`:\n{}", out.dump()))
}

// ---------------------------------------------------------------------------------------------
// Running the binary

/// What a finished `deltasync` run left.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    what: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with everything the run printed unless it succeeded.
    pub fn ok(self, context: &str) -> Output {
        assert!(self.success(), "{context}: `{}` failed: {}\n{}", self.what, self.status, self.dump());
        self
    }

    pub fn dump(&self) -> String {
        format!("--- stdout ---\n{}--- stderr ---\n{}", self.stdout, self.stderr)
    }

    /// Transfer statistics printed by `--stats`.
    pub fn stats(&self) -> (u64, u64) {
        parse_stats(&self.stdout)
    }

    /// `sent + received`.
    pub fn wire_bytes(&self) -> u64 {
        let (s, r) = self.stats();
        s + r
    }

    pub fn stat(&self, label: &str) -> u64 {
        stat_line(&self.stdout, label).unwrap_or_else(|| {
            panic!("no `{label}:` line in the output of `{}`:\n{}", self.what, self.dump())
        })
    }
}

/// Runs a command to completion, capturing its output. If it has not closed its output after
/// [`RUN_DEADLINE`] it is killed, so a hung run fails the test instead of hanging the suite.
pub fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let t = tx.clone();
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        let _ = t.send((true, b));
    });
    std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        let _ = tx.send((false, b));
    });
    let deadline = Instant::now() + RUN_DEADLINE;
    let (mut out, mut err) = (None, None);
    let mut timed_out = false;
    while out.is_none() || err.is_none() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((true, b)) => out = Some(b),
            Ok((false, b)) => err = Some(b),
            Err(_) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().unwrap_or_else(|e| panic!("wait {what}: {e}"));
    let o = Output {
        status,
        stdout: String::from_utf8_lossy(&out.unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&err.unwrap_or_default()).into_owned(),
        what,
    };
    assert!(!timed_out, "`{}` ran longer than {RUN_DEADLINE:?} and was killed\n{}", o.what, o.dump());
    o
}

/// `deltasync push|pull DIR --server ADDR --token TOK --no-progress --stats EXTRA...`, not checked.
pub fn sync_cmd(cmd: &str, dir: &Path, server: &Server, token: &str, extra: &[&str]) -> Output {
    run(&mut sync_command(cmd, dir, &server.address(), token, extra))
}

/// The command [`sync_cmd`] runs, for tests that need to spawn it themselves.
pub fn sync_command(cmd: &str, dir: &Path, addr: &str, token: &str, extra: &[&str]) -> Command {
    let mut c = command();
    c.arg(cmd)
        .arg(dir)
        .args(["--server", addr, "--token", token, "--no-progress", "--stats"])
        .args(extra.iter().map(OsStr::new));
    c
}

/// A push that must succeed; returns its output (with `--stats`).
pub fn push(dir: &Path, server: &Server, token: &str) -> Output {
    sync_cmd("push", dir, server, token, &[]).ok("push")
}

/// A pull that must succeed; returns its output (with `--stats`).
pub fn pull(dir: &Path, server: &Server, token: &str) -> Output {
    sync_cmd("pull", dir, server, token, &[]).ok("pull")
}

/// A push as a named device (the name appears in conflict copies).
pub fn push_as(dir: &Path, server: &Server, token: &str, device: &str) -> Output {
    sync_cmd("push", dir, server, token, &["--device", device]).ok("push")
}

/// A pull as a named device.
pub fn pull_as(dir: &Path, server: &Server, token: &str, device: &str) -> Output {
    sync_cmd("pull", dir, server, token, &["--device", device]).ok("pull")
}

// ---------------------------------------------------------------------------------------------
// --stats

/// `(Total bytes sent, Total bytes received)` from `--stats` output.
pub fn parse_stats(stdout: &str) -> (u64, u64) {
    let get = |label| {
        stat_line(stdout, label).unwrap_or_else(|| panic!("no `{label}:` line in stats output:\n{stdout}"))
    };
    (get("Total bytes sent"), get("Total bytes received"))
}

/// The number on the line `LABEL: N` or `LABEL: N bytes`.
pub fn stat_line(stdout: &str, label: &str) -> Option<u64> {
    stdout.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(label)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Folders

/// What a tree entry is, for comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { size: u64, mtime_ns: i64, exec: bool },
    Symlink(PathBuf),
}

/// Every path under `root` except the root's `.deltasync/`, `/`-separated and relative.
fn tree(root: &Path) -> BTreeMap<String, (Kind, PathBuf)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Kind, PathBuf)>) {
        let rd = fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for e in rd {
            let e = e.expect("dir entry");
            let full = e.path();
            if dir == root && e.file_name() == ".deltasync" {
                continue;
            }
            let rel = full.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
            let md = fs::symlink_metadata(&full).expect("stat");
            let ft = md.file_type();
            let kind = if ft.is_symlink() {
                Kind::Symlink(fs::read_link(&full).expect("readlink"))
            } else if ft.is_dir() {
                Kind::Dir
            } else {
                Kind::File {
                    size: md.len(),
                    mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                    exec: md.permissions().mode() & 0o111 != 0,
                }
            };
            let is_dir = kind == Kind::Dir;
            out.insert(rel, (kind, full.clone()));
            if is_dir {
                walk(root, &full, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Relative paths under `root` (without `.deltasync/`), sorted.
pub fn list_tree(root: &Path) -> Vec<String> {
    tree(root).into_keys().collect()
}

/// Asserts that two folders hold the same tree, ignoring each root's `.deltasync/`: the same
/// relative paths, kinds, symlink targets, file contents, exec bits and file mtimes (to the
/// nanosecond: deltasync preserves them). Panics with a list of every difference.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let ta = tree(a);
    let tb = tree(b);
    let mut diffs = Vec::new();
    for p in ta.keys().filter(|p| !tb.contains_key(*p)) {
        diffs.push(format!("only in A: {p}"));
    }
    for p in tb.keys().filter(|p| !ta.contains_key(*p)) {
        diffs.push(format!("only in B: {p}"));
    }
    for (p, (ka, fa)) in &ta {
        let Some((kb, fb)) = tb.get(p) else { continue };
        match (ka, kb) {
            (
                Kind::File { size: sa, mtime_ns: ma, exec: ea },
                Kind::File { size: sb, mtime_ns: mb, exec: eb },
            ) => {
                if sa != sb {
                    diffs.push(format!("size differs: {p}: A {sa} bytes, B {sb} bytes"));
                } else if fs::read(fa).expect("read") != fs::read(fb).expect("read") {
                    diffs.push(format!("content differs: {p}"));
                }
                if ea != eb {
                    diffs.push(format!("exec bit differs: {p}: A {ea}, B {eb}"));
                }
                if ma != mb {
                    diffs.push(format!("mtime differs: {p}: A {ma} ns, B {mb} ns"));
                }
            }
            (x, y) if x != y => diffs.push(format!("kind differs: {p}: A {x:?}, B {y:?}")),
            _ => {}
        }
    }
    assert!(
        diffs.is_empty(),
        "trees differ\n  A = {}\n  B = {}\n{}\nA has: {:?}\nB has: {:?}",
        a.display(),
        b.display(),
        diffs.join("\n"),
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>()
    );
}

/// Writes a file, creating its parent folders.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("create parent");
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn read_string(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A new temp folder for one "computer".
pub fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("temp dir")
}

// ---------------------------------------------------------------------------------------------
// Snapshots: a tree read without panicking while watchers write into it (or as it is)

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Dir,
    File { len: u64, hash: u64, exec: bool, mtime_ns: i64 },
    Link(PathBuf),
}

pub type Snap = BTreeMap<String, Item>;

pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Every path under `root` except the root's `.deltasync/`; an error if something vanished or
/// changed kind while it was read (then the caller just looks again).
pub fn snapshot(root: &Path) -> std::io::Result<Snap> {
    fn walk(root: &Path, dir: &Path, out: &mut Snap) -> std::io::Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let full = e.path();
            if dir == root && e.file_name() == ".deltasync" {
                continue;
            }
            let rel = full.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
            let md = fs::symlink_metadata(&full)?;
            let item = if md.file_type().is_symlink() {
                Item::Link(fs::read_link(&full)?)
            } else if md.is_dir() {
                walk(root, &full, out)?;
                Item::Dir
            } else {
                let bytes = fs::read(&full)?;
                Item::File {
                    len: bytes.len() as u64,
                    hash: content_hash(&bytes),
                    exec: md.permissions().mode() & 0o111 != 0,
                    mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                }
            };
            out.insert(rel, item);
        }
        Ok(())
    }
    let mut out = Snap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// The same snapshot without mtimes, for comparing with a model of content.
pub fn without_mtimes(s: &Snap) -> Snap {
    s.iter()
        .map(|(p, i)| {
            let i = match i {
                Item::File { len, hash, exec, .. } => {
                    Item::File { len: *len, hash: *hash, exec: *exec, mtime_ns: 0 }
                }
                other => other.clone(),
            };
            (p.clone(), i)
        })
        .collect()
}

pub fn snap_diffs(a: &Snap, b: &Snap, an: &str, bn: &str) -> Vec<String> {
    let mut d = Vec::new();
    for (p, x) in a {
        match b.get(p) {
            None => d.push(format!("only on {an}: {p}")),
            Some(y) if x != y => d.push(format!("differs: {p}: {an} {x:?}, {bn} {y:?}")),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        d.push(format!("only on {bn}: {p}"));
    }
    d
}

/// `parent/name`, or `name` at the root ("").
pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() { name.to_string() } else { format!("{parent}/{name}") }
}

/// The parent of a relative `/`-separated path ("" at the root).
pub fn parent_of(p: &str) -> &str {
    p.rsplit_once('/').map_or("", |(a, _)| a)
}

// ---------------------------------------------------------------------------------------------
// Deterministic pseudo-random bytes

/// xorshift64: deterministic, fast, no `rand` needed.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds and never start at zero (a fixed point of xorshift).
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    v
}

/// Visits every entry under `dir` (recursively, symlinks not followed) with its metadata.
fn walk(dir: &Path, mut visit: impl FnMut(&Path, &fs::DirEntry, &fs::Metadata)) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            visit(&p, &e, &md);
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
}

/// Does any file under `dir` (recursively) contain `needle`?
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    walk(dir, |p, _, md| {
        if md.is_file()
            && let Ok(bytes) = fs::read(p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(p.to_path_buf());
        }
    });
    hits
}

/// Every path under `dir` (recursively, symlinks not followed) whose file name is in `names`.
pub fn find_named(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    walk(dir, |p, e, _| {
        if names.iter().any(|n| e.file_name() == **n) {
            hits.push(p.to_path_buf());
        }
    });
    hits
}

/// The helpers themselves: a comparison that cannot fail would make every test above pass.
mod self_tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree_diff(setup: impl Fn(&Path)) -> String {
        let a = temp_dir("ds-self-a-");
        let b = temp_dir("ds-self-b-");
        for d in [a.path(), b.path()] {
            write(&d.join("x/f.txt"), "same\n");
            filetime::set_file_mtime(d.join("x/f.txt"), filetime::FileTime::from_unix_time(1_000, 5))
                .unwrap();
            symlink("x/f.txt", d.join("l")).unwrap();
            write(&d.join(".deltasync/index.db"), d.to_string_lossy().as_bytes());
        }
        setup(b.path());
        let r = std::panic::catch_unwind(|| assert_same_tree(a.path(), b.path()));
        match r {
            Ok(()) => String::new(),
            Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn assert_same_tree_sees_every_difference() {
        assert_eq!(tree_diff(|_| {}), "", "identical trees (apart from .deltasync/) must compare equal");
        let f = |b: &Path| b.join("x/f.txt");
        let keep_mtime = |p: &Path| {
            filetime::set_file_mtime(p, filetime::FileTime::from_unix_time(1_000, 5)).unwrap();
        };
        type Case = (&'static str, Box<dyn Fn(&Path)>);
        let cases: Vec<Case> = vec![
            ("only in B: x/new", Box::new(|b| write(&b.join("x/new"), ""))),
            ("only in A: l", Box::new(|b| fs::remove_file(b.join("l")).unwrap())),
            (
                "content differs: x/f.txt",
                Box::new(move |b| {
                    write(&f(b), "diff\n");
                    keep_mtime(&f(b));
                }),
            ),
            ("size differs: x/f.txt", Box::new(move |b| write(&f(b), "different size\n"))),
            ("exec bit differs: x/f.txt", Box::new(move |b| set_mode(&f(b), 0o755))),
            (
                "mtime differs: x/f.txt",
                Box::new(move |b| {
                    filetime::set_file_mtime(f(b), filetime::FileTime::from_unix_time(1_000, 6)).unwrap()
                }),
            ),
            (
                "kind differs: l",
                Box::new(|b| {
                    fs::remove_file(b.join("l")).unwrap();
                    symlink("elsewhere", b.join("l")).unwrap();
                }),
            ),
        ];
        for (want, setup) in cases {
            let msg = tree_diff(setup);
            assert!(msg.contains(want), "expected {want:?} in:\n{msg}");
        }
    }

    #[test]
    fn stats_are_parsed() {
        let out = "1 uploaded; 1 KiB sent\nLiteral data: 17 bytes\nTotal bytes sent: 1234\nTotal bytes received: 56\n\nsent 1234 bytes  received 56 bytes\n";
        assert_eq!(parse_stats(out), (1234, 56));
        assert_eq!(stat_line(out, "Literal data"), Some(17));
        assert_eq!(stat_line(out, "Matched data"), None);
    }

    #[test]
    fn xorshift_is_deterministic_and_not_constant() {
        assert_eq!(random_bytes(1, 1000), random_bytes(1, 1000));
        assert_ne!(random_bytes(1, 1000), random_bytes(2, 1000));
        let v = random_bytes(3, 1 << 16);
        let zeros = v.iter().filter(|b| **b == 0).count();
        assert!(zeros < 1000, "{zeros} zero bytes in 64 KiB");
        assert_eq!(random_bytes(4, 13).len(), 13);
    }
}

// ---------------------------------------------------------------------------------------------
// Servers with a chosen data folder or environment (server_faults.rs)

/// Starts a server on a fresh data folder with extra `serve` arguments.
pub fn start_server_args(args: &[&str]) -> Server {
    let tmp = tempfile::Builder::new().prefix("deltasync-srv-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    let mut s = Server::try_spawn_full(&root, &root.join("data"), "127.0.0.1:0", &[], args)
        .unwrap_or_else(|st| panic!("server exited early ({st}); log:\n{}", read_log(&root)));
    s.tmp = Some(tmp);
    s
}

/// Starts `deltasync serve` on `data` (any folder, e.g. a small mounted file system) with extra
/// environment variables; its log and temp root are a fresh temp folder.
pub fn start_server_with(data: Option<&Path>, envs: &[(&str, &str)]) -> Server {
    let tmp = tempfile::Builder::new().prefix("deltasync-srv-").tempdir().expect("temp dir");
    let root = tmp.path().to_path_buf();
    let data = data.map_or_else(|| root.join("data"), Path::to_path_buf);
    let mut s = Server::try_spawn_with(&root, &data, "127.0.0.1:0", envs)
        .unwrap_or_else(|st| panic!("server exited early ({st}); log:\n{}", read_log(&root)));
    s.tmp = Some(tmp);
    s
}

impl Server {
    /// Sends SIGINT (Ctrl-C) to the server and waits up to `deadline` for it to exit; its exit
    /// status, or `None` if it was still running (then it is killed).
    pub fn interrupt(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.signal("INT", deadline)
    }

    /// [`Server::interrupt`] with another signal (`TERM`: what `systemctl stop` sends).
    pub fn signal(&mut self, signal: &str, deadline: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args([&format!("-{signal}"), &c.id().to_string()]).status();
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Server {
    /// Waits until the server process exits by itself (a crash point); false if it still runs.
    pub fn wait_exited(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None | Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Root-only fixtures

/// The effective user id, from `id -u` instead of libc, so the tests need no unsafe code.
pub fn euid() -> u32 {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// A tmpfs mounted for the test, unmounted on drop.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

impl Mount {
    /// Changes the size of the mounted tmpfs (frees space without touching its files).
    pub fn resize(&self, size: &str) {
        let st = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).status();
        assert!(st.is_ok_and(|s| s.success()), "remount {} with size {size}", self.0.display());
    }
}

/// Mounts a tmpfs of `size` (as `mount -o size=` takes it) in a new temp folder: root only.
pub fn mount_tmpfs(size: &str) -> (TempDir, Mount) {
    let holder = temp_dir("ds-tmpfs-");
    let mnt = holder.path().join("mnt");
    fs::create_dir(&mnt).expect("mount point");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status();
    assert!(st.is_ok_and(|s| s.success()), "mount -t tmpfs failed although we are root");
    (holder, Mount(mnt))
}

// ---------------------------------------------------------------------------------------------
// TLS for the tests' own peers: raw clients of a real server, and fake servers for the real client

/// A blocking TLS client connection (to a real `deltasync serve`).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;
/// A blocking TLS server connection (a fake server's end).
pub type FakeServerStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a real server listens and the certificate it must present.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

impl Endpoint {
    /// What a client that pinned this server trusts.
    pub fn trust(&self) -> Trust {
        Trust::Pinned(self.fingerprint)
    }

    /// A blocking TLS connection: TCP, then the whole TLS handshake (the certificate must have
    /// the server's fingerprint, the server must agree to ALPN `deltasync`). Nothing of the
    /// deltasync protocol is sent yet.
    pub fn tls(&self) -> TlsStream {
        let mut sock = TcpStream::connect(self.addr).unwrap_or_else(|e| panic!("connect {}: {e}", self.addr));
        sock.set_nodelay(true).expect("nodelay");
        let name = ServerName::IpAddress(self.addr.ip().into());
        let mut conn =
            rustls::ClientConnection::new(client_config(self.fingerprint), name).expect("a TLS client");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).unwrap_or_else(|e| panic!("TLS handshake with {}: {e}", self.addr));
        }
        assert_eq!(conn.alpn_protocol(), Some(transport::ALPN), "the server did not agree to ALPN deltasync");
        rustls::StreamOwned::new(conn, sock)
    }

    /// [`Endpoint::tls`] through deltasync's own client transport (tokio), split into frames;
    /// the deltasync handshake is the caller's.
    pub async fn frames(&self) -> (FrameReader, FrameWriter) {
        let counters = Arc::new(deltasync::protocol::Counters::default());
        let (stream, seen) = transport::connect(
            &self.addr.to_string(),
            &self.trust(),
            Duration::from_secs(10),
            counters.clone(),
            &deltasync::protocol::Shaper::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS connection to {}: {e:?}", self.addr));
        assert_eq!(seen.fingerprint, Some(self.fingerprint));
        deltasync::protocol::split(stream, counters)
    }
}

/// TLS 1.3, ALPN `deltasync`, and only the certificate with fingerprint `want` (the client's
/// own pinning configuration).
fn client_config(want: Fingerprint) -> Arc<rustls::ClientConfig> {
    transport::client_config(&Trust::Pinned(want)).expect("a TLS client configuration").0
}

/// The fake servers' identity: one self-signed certificate per test process, and its
/// fingerprint.
fn fake_identity() -> &'static (Arc<rustls::ServerConfig>, String) {
    static ID: OnceLock<(Arc<rustls::ServerConfig>, String)> = OnceLock::new();
    ID.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
        let cert: CertificateDer<'static> = made.cert.der().clone();
        let fingerprint = Fingerprint::of(&cert).to_string();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("a TLS server config");
        config.alpn_protocols = vec![transport::ALPN.to_vec()];
        // As the real server: no session tickets (clients never resume).
        config.send_tls13_tickets = 0;
        (Arc::new(config), fingerprint)
    })
}

/// The fingerprint of the fake servers' certificate (for `--fingerprint`).
pub fn fake_fingerprint() -> String {
    fake_identity().1.clone()
}

/// Accepts one client on `l` and completes the TLS handshake as a fake deltasync server would;
/// `Err` if the client went away or refused the certificate.
pub fn fake_accept(l: &TcpListener) -> std::io::Result<FakeServerStream> {
    let (mut sock, _) = l.accept()?;
    sock.set_nodelay(true)?;
    let mut conn = rustls::ServerConnection::new(fake_identity().0.clone()).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// A blocking connection the tests read and write by hand: plain TCP, or TLS over it.
pub trait Socket: Read + Write {
    /// The TCP socket under it (timeouts, shutdown).
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for TlsStream {
    fn tcp(&self) -> &TcpStream {
        self.get_ref()
    }
}

/// Writes `m` as one frame (4-byte big-endian length, then postcard) and flushes it.
pub fn send_frame<M: serde::Serialize>(s: &mut impl Write, m: &M) -> std::io::Result<()> {
    let body = postcard::to_allocvec(m).expect("encode");
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    s.write_all(&v)?;
    s.flush()
}

/// The next frame as `M`; `None` when the peer closed the connection (or it broke).
pub fn recv_frame<M: serde::de::DeserializeOwned>(s: &mut impl Read) -> Option<M> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(postcard::from_bytes(&body).expect("a well-formed message"))
}

/// A child process (a `watch`, a push in flight) killed when the test ends, passed or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP forwarder in front of a real service (PostgreSQL, S3) that a test can cut and restore,
/// as a lost network or a restarting database would: while cut, live connections are closed and
/// new ones are closed as soon as they arrive.
pub struct Cuttable {
    pub addr: SocketAddr,
    state: Arc<CutState>,
}

#[derive(Default)]
struct CutState {
    cut: std::sync::atomic::AtomicBool,
    /// Bumped by every cut: a forwarding thread that sees another generation closes its pair.
    generation: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

impl Cuttable {
    /// Forwards 127.0.0.1:PORT (`addr`) to `target`.
    pub fn new(target: SocketAddr) -> Cuttable {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        let addr = listener.local_addr().expect("its address");
        listener.set_nonblocking(true).expect("nonblocking accept");
        let state = Arc::new(CutState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(SeqCst) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if st.cut.load(SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = client.set_nonblocking(false);
                let born = st.generation.load(SeqCst);
                for (mut from, mut to) in [
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone")),
                    (server, client),
                ] {
                    let st = st.clone();
                    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            if st.generation.load(SeqCst) != born || st.stop.load(SeqCst) {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cuttable { addr, state }
    }

    /// Closes every connection through it and refuses new ones until [`Cuttable::restore`].
    pub fn cut(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.cut.store(true, SeqCst);
        self.state.generation.fetch_add(1, SeqCst);
    }

    pub fn restore(&self) {
        self.state.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.state.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
