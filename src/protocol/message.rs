//! Messages. A client opens with [`Hello`], the server answers [`Welcome`]; then the client sends
//! [`ClientMsg`]s and the server [`ServerMsg`]s. Requests carry ids and the server answers them in
//! order, so a client may pipeline as many as it likes; file content follows a `Put` request or a
//! `File` reply as `Data` blocks closed by `End` with the same id.

use serde::{Deserialize, Serialize};

use crate::delta::Block;
use crate::hash::ContentHash;
use crate::path::RelPath;

pub const MAGIC: [u8; 8] = *b"DLTASYNC";
/// 2: `Welcome::Accepted` carries the server's identity and the account's journal position.
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    /// `None` asks for a new account (only honoured with `--open-registration`).
    pub token: Option<String>,
    pub device: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Welcome {
    Accepted {
        account: String,
        new_token: Option<String>,
        /// 16 random bytes made when the server's data folder was created: another value than
        /// last time means another server (or a new data folder).
        server_id: [u8; 16],
        /// The account's journal sequence now: lower than a client last saw means the server
        /// was restored from an older backup.
        seq: u64,
    },
    Rejected {
        reason: Rejection,
        message: String,
        server_version: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    BadMagic,
    Version,
    Auth,
}

/// Permission bits and modification time, the metadata that travels with every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub mtime_ns: i64,
    pub mode: u32,
}

/// What is at a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    File { hash: ContentHash, size: u64, meta: Meta },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// A path's state on the server; `node: None` is a tombstone (deleted at `rev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub rev: u64,
    pub node: Option<Node>,
    pub device: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClientMsg {
    Req {
        id: u64,
        req: Request,
    },
    Data {
        id: u64,
        block: Block,
    },
    End {
        id: u64,
    },
    /// The last block of an upload: `Data` and `End` in one frame (saves a frame per small file).
    Last {
        id: u64,
        block: Block,
    },
}

/// Every mutating request carries `base_rev`, the revision the client last saw at the target
/// path (0 = never existed). The server refuses it as `Stale` if the path has moved on since, so
/// no update is ever lost silently.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Entries changed after journal sequence `since`, in pages.
    Changes {
        since: u64,
    },
    /// File content follows as `Data` blocks and `End`. With `base`, the blocks are a delta against
    /// the server's current version, which must have that hash.
    Put {
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
        base: Option<ContentHash>,
    },
    Mkdir {
        path: RelPath,
        base_rev: u64,
        mode: u32,
    },
    Symlink {
        path: RelPath,
        base_rev: u64,
        target: String,
    },
    Delete {
        path: RelPath,
        base_rev: u64,
    },
    /// A rename: no content crosses the wire.
    Move {
        from: RelPath,
        from_rev: u64,
        to: RelPath,
        to_base_rev: u64,
        meta: Meta,
    },
    /// A new path whose content the server already holds somewhere in the account.
    Copy {
        hash: ContentHash,
        size: u64,
        to: RelPath,
        to_base_rev: u64,
        meta: Meta,
    },
    SetMeta {
        path: RelPath,
        base_rev: u64,
        meta: Meta,
    },
    /// Download a file; `have` names the version the client holds, so the server can send a delta
    /// against its cached signature of it.
    Get {
        path: RelPath,
        have: Option<(ContentHash, u64)>,
    },
    /// The server's signature of its current version of `path` (rsync's fallback when the client's
    /// signature cache has lost it). Comes back as `Data` blocks.
    Signature {
        path: RelPath,
    },
    /// Ask to be sent `Notify` whenever the account changes (used by `watch`).
    Subscribe,
    Ping,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ServerMsg {
    Resp {
        id: u64,
        result: Result<Reply, Refusal>,
    },
    Data {
        id: u64,
        block: Block,
    },
    End {
        id: u64,
    },
    /// The account's journal reached `seq` (sent to subscribers).
    Notify {
        seq: u64,
    },
    /// The server is closing this connection, and why.
    Fatal {
        message: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// One page of changes; more pages follow for the same id while `more`.
    Changes {
        entries: Vec<Entry>,
        seq: u64,
        more: bool,
    },
    Committed {
        rev: u64,
    },
    /// File content follows as `Data` and `End`; `base` is what the delta is against, if any.
    File {
        entry: Entry,
        base: Option<ContentHash>,
    },
    /// Signature bytes follow as `Data` (literal blocks) and `End`.
    Signature {
        hash: ContentHash,
        size: u64,
    },
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    /// The path changed on the server since the client's `base_rev`.
    Stale,
    /// The request names something that does not exist (or is not a file).
    NotFound,
    /// The content did not hash to what was announced; resend whole.
    Corrupt,
    /// The request is invalid (bad path, non-empty directory, ...).
    Invalid,
    /// The server failed to store it (disk full, permissions): not the client's fault.
    Server,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal { kind, message: message.into() }
    }
}
