//! Packs as objects in an S3-compatible bucket, shared by any number of server processes (issue 13):
//! `PREFIX/packs/<first two hex digits>/<id>.pack`, the local store's names under a prefix.
//!
//! Packs are immutable: each is written once (a retry writes the same bytes again) and only ever
//! deleted afterwards, so no S3 operation is relied upon for locking or ordering; the metadata
//! store decides which packs are used. A pack of up to [`SINGLE_PUT`] bytes is one PUT when it is
//! finished; a bigger one is a multipart upload of [`PART`]-byte parts streamed as it is written
//! (at most one part in flight and one filling), the last one up to [`SLACK`] bigger, completed
//! by `finish`: parts + 2 requests, so a full pack (32 MiB and the chunk that crossed the mark)
//! costs 6: 4 parts, the start and the completion. A pack is visible only once its PUT or its
//! completion returned, so a crash leaves nothing a listing shows; the parts of an interrupted
//! multipart upload stay invisible in the bucket until a lifecycle rule "abort incomplete
//! multipart uploads after N days" removes them (set one on the bucket: `clean_unfinished`
//! cannot, as the client library lists no pending uploads). A dropped writer aborts its upload
//! in the background.
//!
//! The [`ChunkStore`] traits are blocking and may be called from the server's blocking pool,
//! plain threads or an async task: [`S3Chunks`] owns a small tokio runtime of its own, runs
//! every request as a task there and waits for it on a channel, never entering the caller's
//! runtime. Requests are retried by `object_store` (3 times, within 30 s), so a dead store is
//! reported, not waited for.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::{ChunkStore, PackId, PackWriter};

/// Where the packs live. Keys come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Folder of the bucket the packs go under (`PREFIX/packs/…`); empty for the bucket's root.
    pub prefix: String,
    /// `http(s)://host:port` of an S3-compatible server; none for AWS itself.
    pub endpoint: Option<String>,
    /// None: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
}

/// A pack up to this size is sent in one PUT when it is finished.
pub const SINGLE_PUT: usize = PART + SLACK;
/// The part size of a bigger pack's multipart upload (S3 wants at least 5 MiB but for the last).
pub const PART: usize = 8 << 20;
/// What the last part may hold beyond [`PART`]: a pack finished just past a multiple of the part
/// size (they stop at the chunk that crosses 32 MiB) sends no tiny extra part.
pub const SLACK: usize = 1 << 20;

/// The runtime every request runs on; shut down in the background when its last user goes, so
/// dropping the store inside an async context does not panic.
struct Rt(Option<tokio::runtime::Runtime>);

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// What every pack writer of the store shares with it.
struct Shared {
    store: Arc<AmazonS3>,
    /// `PREFIX/packs`.
    packs: ObjPath,
    /// "S3 bucket `B` at ENDPOINT", for messages.
    label: String,
    /// The background aborts of dropped writers' multipart uploads.
    aborts: tokio_util::task::TaskTracker,
    rt: Rt,
    /// Requests made: writes (PUT, multipart start, part, completion), reads (GET, HEAD),
    /// others (LIST, DELETE); logged when the store closes (what an S3 bill counts).
    requests: [std::sync::atomic::AtomicU64; 3],
    /// See [`S3Chunks::read`].
    blocks: std::sync::Mutex<Blocks>,
}

const WRITES: usize = 0;
const READS: usize = 1;
const OTHERS: usize = 2;

impl Drop for Shared {
    /// Gives the aborts of dropped writers up to 5 s before the runtime goes (and them with it).
    fn drop(&mut self) {
        let n = |i: usize| self.requests[i].load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "{}: {} write requests (PUT, multipart parts), {} reads (GET, HEAD), {} others (LIST, DELETE)",
            self.label,
            n(WRITES),
            n(READS),
            n(OTHERS)
        );
        if self.aborts.is_empty() {
            return;
        }
        self.aborts.close();
        let aborts = self.aborts.clone();
        let _ = self.run(async move { tokio::time::timeout(Duration::from_secs(5), aborts.wait()).await });
    }
}

impl Shared {
    fn count(&self, kind: usize, n: u64) {
        self.requests[kind].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn handle(&self) -> io::Result<&tokio::runtime::Handle> {
        self.rt
            .0
            .as_ref()
            .map(|r| r.handle())
            .ok_or_else(|| io::Error::other("the S3 client's runtime is gone"))
    }

    /// Runs `fut` on the store's runtime and waits for its output on this thread.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle()?.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            io::Error::other(format!(
                "{}: the request's task ended without an answer (the runtime stopped)",
                self.label
            ))
        })
    }

    fn path(&self, id: PackId) -> ObjPath {
        let h = id.hex();
        self.packs.clone().join(&h[..2]).join(format!("{h}.pack"))
    }

    /// An `object_store` error as an `io::Error` naming the store, what was being done and
    /// the cause, with a hint for the causes a user can fix.
    fn err(&self, what: &str, e: object_store::Error) -> io::Error {
        to_io(&self.label, what, e)
    }
}

fn to_io(label: &str, what: &str, e: object_store::Error) -> io::Error {
    let chain = error_chain(&e);
    let refused = chain.contains("onnection refused") || has_io_kind(&e, io::ErrorKind::ConnectionRefused);
    // ("retry_timeout: 30s" is in every retried error's text: not a sign of one.)
    let timed_out =
        chain.contains("timed out") || chain.contains("Timeout") || has_io_kind(&e, io::ErrorKind::TimedOut);
    // Some requests (LIST) keep the HTTP status in a generic error: its text has it.
    let denied =
        ["403 Forbidden", "401 Unauthorized", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"]
            .iter()
            .any(|t| chain.contains(t));
    let (kind, hint) = match &e {
        object_store::Error::NotFound { .. } => (io::ErrorKind::NotFound, ""),
        _ if chain.contains("NoSuchBucket") => {
            (io::ErrorKind::NotFound, "; no such bucket: create it or fix the bucket name")
        }
        object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. } => (
            io::ErrorKind::PermissionDenied,
            "; the store refused the keys: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may use this bucket",
        ),
        _ if denied => (
            io::ErrorKind::PermissionDenied,
            "; the store refused the keys: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and that they may use this bucket",
        ),
        _ if refused => (
            io::ErrorKind::ConnectionRefused,
            "; nothing accepts connections there: check the endpoint and that the S3 server runs",
        ),
        _ if timed_out => (
            io::ErrorKind::TimedOut,
            "; the store did not answer in time: check the endpoint and the network",
        ),
        _ => (io::ErrorKind::Other, ""),
    };
    io::Error::new(kind, format!("{label}: {what} failed: {chain}{hint}"))
}

/// The error's message followed by each cause's that says something new.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !m.is_empty() && !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

fn has_io_kind(e: &(dyn std::error::Error + 'static), kind: io::ErrorKind) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = cur {
        if s.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == kind) {
            return true;
        }
        cur = s.source();
    }
    false
}

/// Packs in an S3 bucket. See the module's documentation.
pub struct S3Chunks {
    shared: Arc<Shared>,
}

impl S3Chunks {
    /// Connects to the bucket and checks it answers (one LIST): a wrong endpoint, a missing
    /// bucket or refused keys are reported here, naming the endpoint and the bucket.
    pub fn open(cfg: &S3Config) -> io::Result<S3Chunks> {
        Self::open_with(cfg, AmazonS3Builder::from_env())
    }

    /// [`Self::open`] with the settings of `builder` (the environment's, or a test's).
    fn open_with(cfg: &S3Config, builder: AmazonS3Builder) -> io::Result<S3Chunks> {
        let endpoint = cfg.endpoint.as_deref().map(|e| e.trim_end_matches('/').to_string());
        let label = match &endpoint {
            Some(e) => format!("S3 bucket `{}` at {e}", cfg.bucket),
            None => format!("S3 bucket `{}`", cfg.bucket),
        };
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{label}: {m}"));
        if cfg.bucket.is_empty() {
            return Err(bad("no bucket name given".into()));
        }
        let prefix = cfg.prefix.trim_matches('/');
        let packs = if prefix.is_empty() {
            ObjPath::from("packs")
        } else {
            ObjPath::parse(format!("{prefix}/packs")).map_err(|e| {
                bad(format!(
                    "the prefix `{}` is not a valid object path ({e}): use names joined by single `/`",
                    cfg.prefix
                ))
            })?
        };
        let mut b = builder.with_bucket_name(&cfg.bucket).with_virtual_hosted_style_request(false);
        if b.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_none()
            || b.get_config_value(&AmazonS3ConfigKey::SecretAccessKey).is_none()
        {
            return Err(bad("no keys: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()));
        }
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(r) = &cfg.region {
            b = b.with_region(r);
        }
        let b = b.with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        });
        // Timeouts: object_store's (connect 5 s, request 30 s), or the environment's
        // (`AWS_CONNECT_TIMEOUT`, `AWS_TIMEOUT`).
        let store = Arc::new(
            b.build().map_err(|e| bad(format!("the settings are not usable: {}", error_chain(&e))))?,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-chunks")
            .enable_all()
            .build()
            .map_err(|e| {
                io::Error::other(format!("{label}: could not start the S3 client's threads: {e}"))
            })?;
        let shared = Arc::new(Shared {
            store,
            packs,
            label,
            aborts: Default::default(),
            rt: Rt(Some(rt)),
            requests: Default::default(),
            blocks: Default::default(),
        });

        // Reachable, the bucket there, the keys accepted: one LIST of at most 256 names.
        let (store, at) = (shared.store.clone(), shared.packs.clone());
        match shared.run(async move { store.list_with_delimiter(Some(&at)).await })? {
            Ok(_) => Ok(S3Chunks { shared }),
            Err(e @ object_store::Error::NotFound { .. }) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{}: no such bucket ({}); create it or fix the bucket name",
                    shared.label,
                    error_chain(&e)
                ),
            )),
            Err(e) => Err(shared.err("opening the bucket (a LIST)", e)),
        }
    }
}

impl ChunkStore for S3Chunks {
    fn create(&self) -> io::Result<Box<dyn PackWriter>> {
        Ok(Box::new(S3Pack {
            id: PackId::random()?,
            shared: self.shared.clone(),
            buf: Vec::new(),
            len: 0,
            upload: None,
            failed: false,
        }))
    }

    /// Small reads (a small file's chunk) go through a cache of 1 MiB blocks of packs: the
    /// chunks of a batch of small files lie side by side, so 1,000 of them cost a few GETs, not
    /// 1,000 (packs never change, so a cached block is never stale). Bigger reads go straight.
    fn read(&self, pack: PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if len == 0 || u64::from(len) > BLOCK / 2 {
            return self.fetch(pack, offset, len);
        }
        let end = offset.checked_add(u64::from(len)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: no range {offset}+{len}", self.shared.label),
            )
        })?;
        let mut out = Vec::with_capacity(len as usize);
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            let block = self.block(pack, b)?;
            let start = b * BLOCK;
            let (from, to) =
                ((offset.max(start) - start) as usize, (end.min(start + BLOCK) - start) as usize);
            if to > block.len() {
                let path = self.shared.path(pack);
                return Err(short(&self.shared.label, &path, offset, len, start + block.len() as u64));
            }
            out.extend_from_slice(&block[from..to]);
        }
        Ok(out)
    }

    fn delete(&self, pack: PackId) -> io::Result<()> {
        self.shared.blocks.lock().unwrap_or_else(|p| p.into_inner()).forget(pack);
        self.remove(pack)
    }

    fn list(&self) -> io::Result<Vec<(PackId, u64, u64)>> {
        let s = &self.shared;
        let (store, at) = (s.store.clone(), s.packs.clone());
        s.count(OTHERS, 1);
        let all = s
            .run(async move { store.list(Some(&at)).try_collect::<Vec<_>>().await })?
            .map_err(|e| s.err(&format!("listing {}", s.packs), e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut out = Vec::with_capacity(all.len());
        for m in all {
            let Some(id) =
                m.location.filename().and_then(|n| n.strip_suffix(".pack")).and_then(PackId::from_hex)
            else {
                continue;
            };
            if m.location != s.path(id) {
                continue;
            }
            let age = now.saturating_sub(m.last_modified.timestamp()).max(0) as u64;
            out.push((id, m.size, age));
        }
        Ok(out)
    }

    /// Nothing to do: an unfinished pack is a multipart upload, which S3 keeps out of sight
    /// until it is completed, and which `object_store` cannot list. A bucket lifecycle rule
    /// "abort incomplete multipart uploads after N days" removes their parts.
    fn clean_unfinished(&self) -> io::Result<usize> {
        Ok(0)
    }

    fn free_bytes(&self) -> Option<u64> {
        None
    }

    /// Every read is a GET: a download fetches the chunks that follow in its pack 4 MiB at a time.
    fn read_ahead(&self) -> u64 {
        4 << 20
    }
}

impl S3Chunks {
    /// `len` bytes at `offset`: one GET.
    fn fetch(&self, pack: PackId, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let s = &self.shared;
        let path = s.path(pack);
        let end = offset.checked_add(u64::from(len)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: no range {offset}+{len} in {path}", s.label),
            )
        })?;
        let (store, p) = (s.store.clone(), path.clone());
        if len == 0 {
            // An empty range is no HTTP range: ask for the size.
            s.count(READS, 1);
            let meta = s
                .run(async move { store.head(&p).await })?
                .map_err(|e| s.err(&format!("reading {path}"), e))?;
            return match meta.size < offset {
                true => Err(short(&s.label, &path, offset, len, meta.size)),
                false => Ok(Vec::new()),
            };
        }
        s.count(READS, 1);
        let got = s.run(async move { store.get_range(&p, offset..end).await })?;
        match got {
            Ok(b) if b.len() == len as usize => Ok(b.into()),
            Ok(b) => Err(short(&s.label, &path, offset, len, offset + b.len() as u64)),
            Err(e @ object_store::Error::NotFound { .. }) => Err(s.err(&format!("reading {path}"), e)),
            Err(e) => {
                // A range past the end is refused (416) by some servers: a short pack.
                let (store, p) = (s.store.clone(), path.clone());
                s.count(READS, 1);
                match s.run(async move { store.head(&p).await })? {
                    Ok(meta) if meta.size < end => Err(short(&s.label, &path, offset, len, meta.size)),
                    _ => Err(s.err(&format!("reading {len} bytes at {offset} of {path}"), e)),
                }
            }
        }
    }

    /// Block `b` of a pack, from the cache or one GET (shorter than [`BLOCK`] at the pack's end).
    fn block(&self, pack: PackId, b: u64) -> io::Result<Arc<Vec<u8>>> {
        let s = &self.shared;
        if let Some(hit) = s.blocks.lock().unwrap_or_else(|p| p.into_inner()).get(pack, b) {
            return Ok(hit);
        }
        let path = s.path(pack);
        let (store, p) = (s.store.clone(), path.clone());
        let start = b * BLOCK;
        s.count(READS, 1);
        let bytes = match s.run(async move { store.get_range(&p, start..start + BLOCK).await })? {
            Ok(bytes) => Arc::new(Vec::from(bytes)),
            Err(e @ object_store::Error::NotFound { .. }) => return Err(s.err(&format!("reading {path}"), e)),
            Err(e) => {
                // A block starting at or past the end is refused (416) by some servers.
                let (store, p) = (s.store.clone(), path.clone());
                s.count(READS, 1);
                return match s.run(async move { store.head(&p).await })? {
                    Ok(meta) if meta.size <= start => Err(short(&s.label, &path, start, 1, meta.size)),
                    _ => Err(s.err(&format!("reading {BLOCK} bytes at {start} of {path}"), e)),
                };
            }
        };
        s.blocks.lock().unwrap_or_else(|p| p.into_inner()).put(pack, b, bytes.clone());
        Ok(bytes)
    }

    fn remove(&self, pack: PackId) -> io::Result<()> {
        let s = &self.shared;
        let path = s.path(pack);
        let (store, p) = (s.store.clone(), path.clone());
        s.count(OTHERS, 1);
        match s.run(async move { store.delete(&p).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s.err(&format!("deleting {path}"), e)),
        }
    }
}

/// The block size of [`S3Chunks::read`]'s cache.
const BLOCK: u64 = 1 << 20;
/// Blocks the cache keeps (64 MiB).
const CACHED_BLOCKS: usize = 64;

/// Recently read blocks of packs, the oldest dropped first.
#[derive(Default)]
struct Blocks {
    map: std::collections::HashMap<(PackId, u64), Arc<Vec<u8>>>,
    order: std::collections::VecDeque<(PackId, u64)>,
}

impl Blocks {
    fn get(&self, pack: PackId, b: u64) -> Option<Arc<Vec<u8>>> {
        self.map.get(&(pack, b)).cloned()
    }

    fn put(&mut self, pack: PackId, b: u64, bytes: Arc<Vec<u8>>) {
        if self.map.insert((pack, b), bytes).is_none() {
            self.order.push_back((pack, b));
        }
        while self.order.len() > CACHED_BLOCKS {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn forget(&mut self, pack: PackId) {
        self.map.retain(|(p, _), _| *p != pack);
        self.order.retain(|(p, _)| *p != pack);
    }
}

fn short(label: &str, path: &ObjPath, offset: u64, len: u32, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "{label}: {path} holds {size} bytes, fewer than the {len} asked at {offset}: the pack is short"
        ),
    )
}

/// A pack's multipart upload under way.
struct Upload {
    upload: Box<dyn MultipartUpload>,
    /// The part being sent: its result arrives here.
    sending: Option<(mpsc::Receiver<object_store::Result<()>>, tokio::task::JoinHandle<()>)>,
}

struct S3Pack {
    id: PackId,
    shared: Arc<Shared>,
    /// Bytes not sent yet: at most [`PART`] + [`SLACK`].
    buf: Vec<u8>,
    len: u64,
    upload: Option<Upload>,
    /// A part failed: the pack cannot be finished.
    failed: bool,
}

impl S3Pack {
    /// Waits for the part being sent, if any.
    fn wait_part(&mut self) -> io::Result<()> {
        let Some(up) = &mut self.upload else { return Ok(()) };
        let Some((rx, _)) = up.sending.take() else { return Ok(()) };
        let s = &self.shared;
        let what = format!("uploading a part of {}", s.path(self.id));
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(s.err(&what, e)),
            Err(_) => Err(io::Error::other(format!("{}: {what}: the task ended without an answer", s.label))),
        }
    }

    /// Sends the first [`PART`] bytes of `buf` as the next part, after the one before it arrived; starts the multipart
    /// upload first if this is the first part.
    fn send_part(&mut self) -> io::Result<()> {
        self.wait_part()?;
        if self.upload.is_none() {
            let path = self.shared.path(self.id);
            let (store, p) = (self.shared.store.clone(), path.clone());
            self.shared.count(WRITES, 1);
            let upload = self
                .shared
                .run(async move { store.put_multipart(&p).await })?
                .map_err(|e| self.shared.err(&format!("starting the multipart upload of {path}"), e))?;
            self.upload = Some(Upload { upload, sending: None });
        }
        let Some(up) = &mut self.upload else { unreachable!("just set") };
        // The first PART bytes go; what is beyond them starts the next part.
        let mut next = Vec::with_capacity(PART + SLACK);
        next.extend_from_slice(&self.buf[PART.min(self.buf.len())..]);
        self.buf.truncate(PART);
        let data = std::mem::replace(&mut self.buf, next);
        self.shared.count(WRITES, 1);
        let part = up.upload.put_part(PutPayload::from(data));
        let (tx, rx) = mpsc::sync_channel(1);
        let task = self.shared.handle()?.spawn(async move {
            let _ = tx.send(part.await);
        });
        up.sending = Some((rx, task));
        Ok(())
    }
}

impl PackWriter for S3Pack {
    fn id(&self) -> PackId {
        self.id
    }

    fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(format!(
                "{}: an earlier part of {} failed",
                self.shared.label,
                self.shared.path(self.id)
            )));
        }
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.buf.len() == PART + SLACK {
                // Full, and more comes: this part goes.
                if let Err(e) = self.send_part() {
                    self.failed = true;
                    return Err(e);
                }
            }
            let n = bytes.len().min(PART + SLACK - self.buf.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn finish(mut self: Box<Self>) -> io::Result<()> {
        let path = self.shared.path(self.id);
        if self.failed {
            return Err(io::Error::other(format!("{}: an earlier part of {path} failed", self.shared.label)));
        }
        self.wait_part()?;
        let shared = self.shared.clone();
        let data = PutPayload::from(std::mem::take(&mut self.buf));
        match self.upload.take() {
            None => {
                let (store, p) = (shared.store.clone(), path.clone());
                shared.count(WRITES, 1);
                shared
                    .run(async move { store.put(&p, data).await })?
                    .map_err(|e| shared.err(&format!("writing {path}"), e))?;
            }
            Some(Upload { mut upload, .. }) => {
                let aborts = shared.aborts.clone();
                shared.count(WRITES, 2);
                let done = shared.run(async move {
                    let r = match upload.put_part(data).await {
                        Ok(()) => upload.complete().await.map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if r.is_err() {
                        // Leave no parts behind if we can help it.
                        aborts.spawn(async move {
                            let _ = upload.abort().await;
                        });
                    }
                    r
                })?;
                done.map_err(|e| shared.err(&format!("completing the multipart upload of {path}"), e))?;
            }
        }
        Ok(())
    }
}

impl Drop for S3Pack {
    /// An unfinished multipart upload is aborted in the background (best effort: a lifecycle
    /// rule catches what a crash leaves).
    fn drop(&mut self) {
        let Some(Upload { mut upload, sending }) = self.upload.take() else { return };
        let Ok(h) = self.shared.handle() else { return };
        self.shared.aborts.spawn_on(
            async move {
                if let Some((_, task)) = sending {
                    let _ = task.await;
                }
                let _ = upload.abort().await;
            },
            h,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::store::{conformance, testenv};

    fn config() -> Option<S3Config> {
        let (endpoint, bucket, prefix) = testenv::s3()?;
        Some(S3Config { bucket, prefix, endpoint: Some(endpoint), region: None })
    }

    #[test]
    fn small_reads_side_by_side_cost_a_few_gets() {
        let Some(cfg) = config() else { return };
        let s = S3Chunks::open(&cfg).unwrap();
        let data = crate::delta::pseudo_random(3 << 20, 5);
        let mut w = s.create().unwrap();
        let id = w.id();
        w.write(&data).unwrap();
        w.finish().unwrap();
        let reads = || s.shared.requests[READS].load(std::sync::atomic::Ordering::Relaxed);
        let before = reads();
        // 768 reads of 4 KiB, front to back, some across a block boundary.
        for i in 0..768u64 {
            let at = i * 4096 + (i % 3) * 1000;
            let n = 4096.min(data.len() as u64 - at) as u32;
            assert!(
                s.read(id, at, n).unwrap() == data[at as usize..(at + u64::from(n)) as usize],
                "read {i}"
            );
        }
        let gets = reads() - before;
        assert!(gets <= 4, "{gets} GETs for 768 small reads of a 3 MiB pack");
        // The end of the pack and past it, through the cache too.
        assert_eq!(s.read(id, (3 << 20) - 10, 10).unwrap(), &data[(3 << 20) - 10..]);
        assert_eq!(s.read(id, (3 << 20) - 10, 11).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(s.read(id, 3 << 20, 1).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A deleted pack is gone for the cache too.
        s.delete(id).unwrap();
        assert_eq!(s.read(id, 0, 10).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn s3_chunk_store_keeps_the_contract() {
        let Some(cfg) = config() else { return };
        let s = S3Chunks::open(&cfg).unwrap();
        conformance::chunk_store(&s);

        // A writer dropped in its multipart upload leaves nothing in sight.
        let mut w = s.create().unwrap();
        let id = w.id();
        for _ in 0..10 {
            w.write(&[7u8; 1 << 20]).unwrap();
        }
        drop(w);
        assert_eq!(s.read(id, 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(s.list().unwrap().is_empty());

        // Another prefix of the same bucket is another store.
        let mut w = s.create().unwrap();
        w.write(b"mine").unwrap();
        w.finish().unwrap();
        let other = S3Chunks::open(&S3Config { prefix: format!("{}/other", cfg.prefix), ..cfg }).unwrap();
        assert!(other.list().unwrap().is_empty());
    }

    /// Called straight from an async task (not the blocking pool), and dropped there: works.
    #[tokio::test]
    async fn works_from_an_async_task() {
        let Some(cfg) = config() else { return };
        let s = S3Chunks::open(&cfg).unwrap();
        let mut w = s.create().unwrap();
        let id = w.id();
        w.write(b"from a task").unwrap();
        w.finish().unwrap();
        assert_eq!(s.read(id, 5, 6).unwrap(), b"a task");
        assert_eq!(s.list().unwrap().len(), 1);
        s.delete(id).unwrap();
    }

    /// Dropped inside an async context (a failed open drops its runtime there): no panic.
    #[tokio::test]
    async fn a_closed_port_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let cfg = S3Config {
            bucket: "packs".into(),
            prefix: "p".into(),
            endpoint: Some(endpoint.clone()),
            region: None,
        };
        let keys = AmazonS3Builder::new().with_access_key_id("k").with_secret_access_key("s");
        let e = S3Chunks::open_with(&cfg, keys).err().expect("open succeeded on a closed port");
        let m = e.to_string();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{m}");
        assert!(m.contains(&endpoint) && m.contains("`packs`") && m.contains("refused"), "{m}");
    }

    /// Settings that cannot work are refused before any request: no keys, a broken prefix.
    #[test]
    fn unusable_settings_are_clear_errors() {
        let cfg = S3Config {
            bucket: "packs".into(),
            prefix: "p".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
        };
        let e = S3Chunks::open_with(&cfg, AmazonS3Builder::new()).err().expect("open succeeded without keys");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("AWS_ACCESS_KEY_ID") && e.to_string().contains("`packs`"), "{e}");

        let keys = AmazonS3Builder::new().with_access_key_id("k").with_secret_access_key("s");
        let bad = S3Config { prefix: "a//b".into(), ..cfg };
        let e = S3Chunks::open_with(&bad, keys).err().expect("open took the prefix a//b");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("`a//b`"), "{e}");
    }

    /// A server that takes the connection and never answers: reported once the request's
    /// timeout (here 1 s) and the retries ran out, not waited on for ever.
    #[test]
    fn a_store_that_never_answers_is_a_clear_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        // Never accepted: the kernel completes the handshakes, nothing reads the requests.
        let cfg = S3Config {
            bucket: "packs".into(),
            prefix: String::new(),
            endpoint: Some(endpoint.clone()),
            region: None,
        };
        let b = AmazonS3Builder::new()
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_config(AmazonS3ConfigKey::Client(object_store::ClientConfigKey::Timeout), "1s");
        let e = S3Chunks::open_with(&cfg, b).err().expect("open succeeded on a silent server");
        let m = e.to_string();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{m}");
        assert!(m.contains(&endpoint) && m.contains("did not answer in time"), "{m}");
        drop(listener);
    }

    #[test]
    fn wrong_keys_and_a_missing_bucket_are_clear_errors() {
        let Some(cfg) = config() else { return };
        let endpoint = cfg.endpoint.clone().unwrap_or_default();
        let wrong = AmazonS3Builder::from_env().with_secret_access_key("not-the-secret");
        let e = S3Chunks::open_with(&cfg, wrong).err().expect("open succeeded with a wrong secret key");
        let m = e.to_string();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{m}");
        assert!(
            m.contains(&endpoint) && m.contains(&cfg.bucket) && m.contains("AWS_SECRET_ACCESS_KEY"),
            "{m}"
        );

        let missing = S3Config { bucket: "no-such-bucket-here".into(), ..cfg };
        let e = S3Chunks::open(&missing).err().expect("open succeeded on a missing bucket");
        let m = e.to_string();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{m}");
        assert!(
            m.contains(&endpoint) && m.contains("no-such-bucket-here") && m.contains("no such bucket"),
            "{m}"
        );
    }
}
