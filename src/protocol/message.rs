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
/// 3: history (`Log`, `Restore`, `Undo`, ...) and resumable transfers. 4: over TLS only;
/// `ServerMsg::Revoked`. 5: every message after the first each way travels in compressed runs
/// (see [`super::connection`]); no `Stream` blocks. 6: `Hello` names the account's folder
/// (several folders per account), `Welcome::Accepted` answers for it.
pub const PROTOCOL_VERSION: u32 = 6;

/// The folder a client syncs when it names none (`--folder`): an account's first tree.
pub const DEFAULT_FOLDER: &str = "default";

/// Checks a folder name (`--folder`, `Hello::folder`): 1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with `.`. The error says what is wrong and what is allowed.
pub fn check_folder(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid folder name `{}`: use 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.` (like `docs` or `photos-2024`)",
            name.escape_debug()
        ))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 8],
    pub version: u32,
    /// `None` asks for a new account (only honoured with `--open-registration`).
    pub token: Option<String>,
    pub device: String,
    /// Which of the account's folders this connection syncs ([`DEFAULT_FOLDER`] unless told);
    /// checked by [`check_folder`]. A `Hello` of protocol 5 ends before it: read as empty, so
    /// that client is told the versions differ (checked first), not that it is no client.
    #[serde(deserialize_with = "folder_or_empty")]
    pub folder: String,
}

/// [`Hello::folder`], or an empty name where the message ends before it (an older client).
fn folder_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(String::deserialize(d).unwrap_or_default())
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Welcome {
    Accepted {
        account: String,
        new_token: Option<String>,
        /// 16 random bytes made when the server's data folder was created: another value than
        /// last time means another server (or a new data folder).
        server_id: [u8; 16],
        /// The folder's journal sequence now: lower than a client last saw means the server
        /// was restored from an older backup.
        seq: u64,
        /// The folder the session works on (the `Hello`'s).
        folder: String,
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
    /// `Hello::folder` is not a valid folder name (protocol 6).
    Folder,
    /// The server cannot check the token now (its metadata database cannot be reached): try
    /// again later.
    Unavailable,
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
    /// How much of this content the server kept from an upload of `path` that was cut off:
    /// answered by [`Reply::Resume`]. Asked before uploading a big file.
    Resume {
        path: RelPath,
        hash: ContentHash,
        size: u64,
    },
    /// A [`Request::Put`] that continues a cut-off upload: its blocks cover the file from byte
    /// `from` (what [`Reply::Resume`] said) to its end; the server has the bytes before.
    PutRest {
        path: RelPath,
        base_rev: u64,
        hash: ContentHash,
        size: u64,
        meta: Meta,
        base: Option<ContentHash>,
        from: u64,
    },
    /// The rest of a download that was cut off: the current file at `path`, which must still be
    /// `hash` and `size`, sent whole from byte `from` (as [`Request::Get`], with `base: None`).
    GetRest {
        path: RelPath,
        hash: ContentHash,
        size: u64,
        from: u64,
    },
    /// History: `path`'s versions, newest first (or, without a path, the account's latest
    /// changes; with `deleted`, the paths whose current version is a delete and whose earlier
    /// content can be restored). At most `limit` entries (the server caps it at [`MAX_LOG`]).
    Log {
        path: Option<RelPath>,
        deleted: bool,
        limit: u32,
    },
    /// The state of `path` (a file, or a directory and everything under it; `None`: the whole
    /// folder) at a point in history: each path's version at or before it, deleted paths left
    /// out, in path order. Paged: `after` is the last path of the previous page.
    Snapshot {
        path: Option<RelPath>,
        at: At,
        after: Option<RelPath>,
    },
    /// The content of the version of `path` committed at revision `rev` (as [`Request::Get`],
    /// always whole).
    GetVersion {
        path: RelPath,
        rev: u64,
    },
    /// Makes `path` (a file or a subtree; `None`: the whole folder) as it was at `at`, as new
    /// changes: files and links come back, paths made since are deleted, directories are made.
    /// What it replaces stays in history.
    Restore {
        path: Option<RelPath>,
        at: At,
    },
    /// Reverts every change device `device` made at or after `since` (Unix seconds), as new
    /// changes; a path another device changed afterwards is skipped.
    Undo {
        device: String,
        since: i64,
    },
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
    /// The device's credential was revoked (or its account removed): the connection closes, and
    /// the client stops rather than retry.
    Revoked {
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
    /// The server holds the first `from` bytes of the content from a cut-off upload (0: none);
    /// `base` is the base that upload was a delta against, which a `PutRest` must use too.
    Resume {
        from: u64,
        base: Option<ContentHash>,
    },
    Log {
        versions: Vec<Version>,
        more: bool,
    },
    Snapshot {
        versions: Vec<Version>,
        more: bool,
    },
    /// A restore or an undo: the revision of its last change (0: nothing changed), the paths it
    /// changed and, for an undo, the paths it skipped because another device changed them later.
    Reverted {
        rev: u64,
        changed: Vec<RelPath>,
        skipped: Vec<RelPath>,
    },
}

/// Entries a `Log` or `Snapshot` reply holds at most.
pub const MAX_LOG: u32 = 2000;

/// A point in history: a revision of the account's journal, or a time (Unix seconds, UTC; the
/// state after every change committed at or before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    Rev(u64),
    Time(i64),
}

/// One version of a path: what a change committed at revision `rev` left there (`node: None`:
/// the path was deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub path: RelPath,
    pub rev: u64,
    /// Unix seconds, UTC.
    pub time: i64,
    pub device: String,
    /// `write`, `copy`, `move`, `delete`, `mkdir`, `symlink`, `meta`, `restore`, `undo`.
    pub op: String,
    pub node: Option<Node>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Hello` as protocol 5 had it.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct HelloV5 {
        magic: [u8; 8],
        version: u32,
        token: Option<String>,
        device: String,
    }

    /// Both ways across the folder field, the version is read, so each side can say the versions
    /// differ: a server of protocol 5 reads a new `Hello` (postcard leaves the folder unread), and
    /// a new server reads an old one (the folder empty).
    #[test]
    fn hellos_of_protocol_5_and_6_read_each_others_version() {
        let new = Hello { magic: MAGIC, version: 6, token: None, device: "d".into(), folder: "docs".into() };
        let old: HelloV5 = postcard::from_bytes(&postcard::to_allocvec(&new).unwrap()).unwrap();
        assert_eq!(old, HelloV5 { magic: MAGIC, version: 6, token: None, device: "d".into() });
        let back: Hello = postcard::from_bytes(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!((back.version, back.folder.as_str()), (6, ""));
        let same: Hello = postcard::from_bytes(&postcard::to_allocvec(&new).unwrap()).unwrap();
        assert_eq!(same.folder, "docs");
    }

    #[test]
    fn folder_names() {
        for ok in ["default", "docs", "Photos_2024-v1.0", "a", &"x".repeat(64)] {
            assert_eq!(check_folder(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".git", "a/b", "..", "a b", "é", &"x".repeat(65), "a\0"] {
            assert!(check_folder(bad).unwrap_err().contains("invalid folder name"), "{bad:?}");
        }
    }
}
