//! The contract of the storage interfaces, as tests every implementation runs: call
//! [`chunk_store`] with a fresh store, [`metadata`] with a fresh metadata store.

use std::io;

use super::{ChunkStore, PackId};
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{At, Meta, Node, RefusalKind};
use crate::server::content::{ChunkLoc, NewChunk, Sealed};
use crate::server::meta::{Change, Metadata, Step};

/// Packs: invisible until finished, immutable, readable by range, deletable; an interrupted
/// pack is removed by `clean_unfinished` and never listed.
pub fn chunk_store(s: &dyn ChunkStore) {
    assert!(s.list().unwrap().is_empty());
    let mut w = s.create().unwrap();
    let id = w.id();
    w.write(b"hello ").unwrap();
    w.write(b"world").unwrap();
    assert_eq!(w.len(), 11);
    assert_eq!(s.read(id, 0, 5).unwrap_err().kind(), io::ErrorKind::NotFound, "visible before finish");
    w.finish().unwrap();
    assert_eq!(s.read(id, 6, 5).unwrap(), b"world");
    assert_eq!(s.read(id, 0, 11).unwrap(), b"hello world");
    assert_eq!(s.read(id, 8, 5).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let listed = s.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0, listed[0].1), (id, 11));

    // A writer that never finishes (the process died): not listed, removed by the recovery.
    let mut lost = s.create().unwrap();
    lost.write(b"half a pack").unwrap();
    std::mem::forget(lost);
    assert_eq!(s.list().unwrap().len(), 1);
    assert_eq!(s.clean_unfinished().unwrap(), 1);
    assert_eq!(s.clean_unfinished().unwrap(), 0);

    s.delete(id).unwrap();
    s.delete(id).unwrap();
    assert_eq!(s.read(id, 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
    assert!(s.list().unwrap().is_empty());
    assert_eq!(s.read(PackId([7; 16]), 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
}

fn rel(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn file(content: &[u8]) -> Node {
    Node::File {
        hash: ContentHash::of(content),
        size: content.len() as u64,
        meta: Meta { mtime_ns: 1, mode: 0o644 },
    }
}

fn put(path: &str, base_rev: u64, content: &[u8], key: [u8; 32]) -> Step {
    Step {
        op: "write",
        changes: vec![Change {
            path: rel(path),
            base_rev,
            node: Some(file(content)),
            chunks: Some(vec![(key, content.len() as u32)]),
        }],
    }
}

/// Metadata: every rule of a commit is decided inside its transaction; a refused step changes
/// nothing; every version stays in history; a content refers only to stored chunks.
pub fn metadata(m: &Metadata) {
    let acct = m.add_account("alice", "token-a").unwrap().id;
    let other = m.add_account("bob", "token-b").unwrap().id;
    let key = [1u8; 32];
    // A content whose chunk is not stored is refused, and nothing is written.
    let r = m.commit(acct, "dev", &[put("a.txt", 0, b"v1", key)]).unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind, RefusalKind::NotFound);
    assert_eq!(m.seq(acct).unwrap(), 0);
    assert!(!m.chunk_exists(&key).unwrap());
    let pack = PackId([9; 16]);
    let loc = ChunkLoc { pack, offset: 45, stored: 2, raw: 2, zstd: false };
    m.add_pack(&Sealed { pack, size: 47, chunks: vec![NewChunk { key, loc }] }).unwrap();
    assert!(m.chunk_exists(&key).unwrap());

    let r = m.commit(acct, "dev", &[put("a.txt", 0, b"v1", key)]).unwrap();
    assert_eq!(r, vec![Ok(1)]);
    assert_eq!(m.content(acct, &ContentHash::of(b"v1")).unwrap(), Some((2, vec![loc])));
    // Accounts are apart: the other one does not hold this content, nor see the path.
    assert_eq!(m.content(other, &ContentHash::of(b"v1")).unwrap(), None);
    assert_eq!(m.get(other, &rel("a.txt")).unwrap(), None);

    // The base-revision rule, and one refused step leaves the others.
    let key2 = [2u8; 32];
    let loc2 = ChunkLoc { pack, offset: 92, stored: 2, raw: 2, zstd: false };
    m.add_pack(&Sealed { pack, size: 94, chunks: vec![NewChunk { key: key2, loc: loc2 }] }).unwrap();
    let r = m.commit(acct, "dev", &[put("a.txt", 0, b"v2", key2), put("a.txt", 1, b"v2", key2)]).unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind, RefusalKind::Stale);
    assert_eq!(r[1], Ok(2));

    // No path under a parent that is not a directory.
    let r = m.commit(acct, "dev", &[put("nodir/x", 0, b"v1", key)]).unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind, RefusalKind::Stale);
    // A step is all or nothing: a move whose target is stale leaves its source.
    let mv = Step {
        op: "move",
        changes: vec![
            Change { path: rel("a.txt"), base_rev: 2, node: None, chunks: None },
            Change { path: rel("b.txt"), base_rev: 5, node: Some(file(b"v2")), chunks: None },
        ],
    };
    let r = m.commit(acct, "dev", &[mv]).unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind, RefusalKind::Stale);
    assert!(m.get(acct, &rel("a.txt")).unwrap().unwrap().node.is_some());
    assert_eq!(m.seq(acct).unwrap(), 2);

    // A directory with something in it is not replaced or deleted.
    let mkdir = |p: &str, base| Step {
        op: "mkdir",
        changes: vec![Change {
            path: rel(p),
            base_rev: base,
            node: Some(Node::Dir { mode: 0o755 }),
            chunks: None,
        }],
    };
    assert_eq!(m.commit(acct, "dev", &[mkdir("d", 0)]).unwrap(), vec![Ok(3)]);
    assert_eq!(m.commit(acct, "dev", &[put("d/x", 0, b"v1", key)]).unwrap(), vec![Ok(4)]);
    let del = |p: &str, base| Step {
        op: "delete",
        changes: vec![Change { path: rel(p), base_rev: base, node: None, chunks: None }],
    };
    assert_eq!(
        m.commit(acct, "dev", &[del("d", 3)]).unwrap()[0].as_ref().unwrap_err().kind,
        RefusalKind::Stale
    );
    assert_eq!(m.commit(acct, "dev2", &[del("d/x", 4), del("d", 3)]).unwrap(), vec![Ok(5), Ok(6)]);

    // History keeps every version, with device and operation; snapshots see the past.
    let log = m.log(acct, Some(&rel("a.txt")), false, 10).unwrap();
    assert_eq!(log.iter().map(|v| v.rev).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(log[1].node, Some(file(b"v1")));
    let deleted = m.log(acct, None, true, 10).unwrap();
    assert_eq!(deleted.iter().map(|v| v.path.as_str()).collect::<Vec<_>>(), vec!["d/x"]);
    assert_eq!(deleted[0].device, "dev2");
    let at4: Vec<_> =
        m.snapshot(acct, None, 4, None, 100).unwrap().into_iter().map(|v| v.path.to_string()).collect();
    assert_eq!(at4, ["a.txt", "d", "d/x"]);
    let now: Vec<_> =
        m.snapshot(acct, None, 6, None, 100).unwrap().into_iter().map(|v| v.path.to_string()).collect();
    assert_eq!(now, ["a.txt"]);
    assert_eq!(m.rev_at(acct, At::Rev(3)).unwrap(), 3);
    assert_eq!(m.rev_at(acct, At::Time(0)).unwrap(), 0);
    assert_eq!(m.version(acct, &rel("a.txt"), 1).unwrap().unwrap().node, Some(file(b"v1")));
}

#[test]
fn local_chunk_store_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    chunk_store(&super::local::LocalChunks::open(d.path()).unwrap());
}

#[test]
fn sqlite_metadata_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    metadata(&super::sqlite::SqliteMeta::open(&d.path().join("db")).unwrap());
}
