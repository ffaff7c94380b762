//! The contract of the storage interfaces, as tests every implementation runs: call
//! [`chunk_store`] with a fresh store, [`metadata`] with a fresh metadata store.

use std::io;

use super::{ChunkStore, PackId};
use crate::hash::ContentHash;
use crate::path::RelPath;
use crate::protocol::{At, Meta, Node, RefusalKind};
use crate::server::content::{ChunkLoc, NewChunk, Sealed};
use crate::server::meta::{Change, MetaError, Metadata, Step};

/// Packs: invisible until finished, immutable, readable by range (from many threads at once),
/// deletable; an interrupted pack is never listed nor readable, and `clean_unfinished` leaves
/// none behind (how many it finds is the backend's: the local store counts its temp files, S3
/// keeps nothing of one in sight). A pack big enough for an object store's multipart path reads
/// back exactly.
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
    assert_eq!(s.read(id, 11, 1).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(s.read(id, 40, 5).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let listed = s.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0, listed[0].1), (id, 11));

    // A writer that never finishes (the process died): not listed, not readable, and nothing
    // of it left once the recovery ran.
    let mut lost = s.create().unwrap();
    let lost_id = lost.id();
    lost.write(b"half a pack").unwrap();
    std::mem::forget(lost);
    assert_eq!(s.list().unwrap().len(), 1);
    assert_eq!(s.read(lost_id, 0, 4).unwrap_err().kind(), io::ErrorKind::NotFound);
    s.clean_unfinished().unwrap();
    assert_eq!(s.clean_unfinished().unwrap(), 0, "an unfinished pack survived the recovery");
    assert_eq!(s.list().unwrap().len(), 1);

    big_pack(s);

    s.delete(id).unwrap();
    s.delete(id).unwrap();
    assert_eq!(s.read(id, 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
    assert!(s.list().unwrap().is_empty());
    assert_eq!(s.read(PackId([7; 16]), 0, 1).unwrap_err().kind(), io::ErrorKind::NotFound);
}

/// The byte at `i` of the big pack: no period a misplaced part or range could hide in.
fn pattern(i: u64) -> u8 {
    let x = (i / 7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ i as u8
}

/// 20 MiB written in 1 MiB writes (an object store's multipart path, parts of 5 MiB and more):
/// listed with its size, and read back exactly, whole and by ranges at the start, across the
/// 5, 8 and 16 MiB marks, at the end, and from 8 threads at once; a range past its end is short.
fn big_pack(s: &dyn ChunkStore) {
    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 20 * MIB;
    let mut w = s.create().unwrap();
    let id = w.id();
    for m in 0..SIZE / MIB {
        let piece: Vec<u8> = (m * MIB..(m + 1) * MIB).map(pattern).collect();
        w.write(&piece).unwrap();
    }
    assert_eq!(w.len(), SIZE);
    w.finish().unwrap();
    let expect = |off: u64, len: u32| (off..off + u64::from(len)).map(pattern).collect::<Vec<u8>>();
    assert!(s.read(id, 0, SIZE as u32).unwrap() == expect(0, SIZE as u32), "the big pack read whole differs");
    for (off, len) in [
        (0, 4096),
        (5 * MIB - 100, 200),
        (8 * MIB - 1000, 2000),
        (16 * MIB - 1, 2),
        (10 * MIB + 12_345, 3 * MIB as u32),
        (SIZE - 3000, 3000),
        (SIZE - 1, 1),
    ] {
        assert!(
            s.read(id, off, len).unwrap() == expect(off, len),
            "range {off}+{len} of the big pack differs"
        );
    }
    assert_eq!(s.read(id, SIZE - 10, 11).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    let mut listed = s.list().unwrap();
    listed.retain(|p| p.0 == id);
    assert_eq!(listed.iter().map(|p| p.1).collect::<Vec<_>>(), [SIZE]);

    std::thread::scope(|t| {
        for th in 0..8u64 {
            t.spawn(move || {
                for k in 0..12u64 {
                    let off = (th * 2_654_435_761 + k * 1_234_567_891) % (SIZE - 70_000);
                    let len = 1 + ((th * 31 + k * 17) * 997 % 65_536) as u32;
                    assert!(
                        s.read(id, off, len).unwrap() == expect(off, len),
                        "parallel range {off}+{len} differs"
                    );
                }
            });
        }
    });
    s.delete(id).unwrap();
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
    let acct = m.add_account("alice", "laptop", "token-a").unwrap().id;
    let other = m.add_account("bob", "phone", "token-b").unwrap().id;
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

    // A run of downloads' lookups says what `get` and `content` say, path by path: a file (twice),
    // a deleted file and folder, a path never seen; and nothing of another account's.
    let paths = [rel("a.txt"), rel("d/x"), rel("never"), rel("a.txt"), rel("d")];
    let run = m.files_to_send(acct, &paths).unwrap();
    assert_eq!(run.len(), paths.len());
    for (p, got) in paths.iter().zip(run) {
        assert_eq!(got.unwrap(), crate::server::meta::file_to_send(m, acct, p).unwrap(), "{p}");
    }
    let (entry, content) = m.files_to_send(acct, &[rel("a.txt")]).unwrap().remove(0).unwrap();
    assert_eq!(entry.unwrap().node, Some(file(b"v2")));
    assert_eq!(content, Some((2, vec![loc2])));
    assert_eq!(m.files_to_send(other, &[rel("a.txt")]).unwrap().remove(0).unwrap(), (None, None));

    // What one commit did to a folder counts for its next changes: a file put into a folder the
    // same commit deleted is refused (it was a directory at the commit's first put).
    let grace = m.add_account("grace", "laptop", "token-grace").unwrap().id;
    assert_eq!(m.commit(grace, "dev", &[mkdir("e", 0)]).unwrap(), vec![Ok(1)]);
    let r = m.commit(
        grace,
        "dev",
        &[put("e/x", 0, b"v1", key), del("e/x", 2), del("e", 1), put("e/y", 0, b"v1", key)],
    );
    let r = r.unwrap();
    assert_eq!(r[..3], [Ok(2), Ok(3), Ok(4)]);
    assert_eq!(r[3].as_ref().unwrap_err().kind, RefusalKind::Stale, "{r:?}");
    assert_eq!(m.get(grace, &rel("e/y")).unwrap(), None);
    assert_eq!(m.seq(grace).unwrap(), 4);

    forgets_contents(m);
    repacks(m);
    devices(m);
    folders(m, key);
}

/// An account's folders: `default` is the account's own space, another folder gets a space of
/// its own on first use (the same one after), with its own paths and journal; the quota is the
/// account's over all of them; the spaces are not accounts, and go with their account.
fn folders(m: &Metadata, key: [u8; 32]) {
    let acct = m.add_account("folders", "laptop", "token-folders").unwrap().id;
    assert_eq!(m.space(acct, crate::protocol::DEFAULT_FOLDER).unwrap(), Some(acct));
    let docs = m.space(acct, "docs").unwrap().unwrap();
    assert_ne!(docs, acct);
    assert_eq!(m.space(acct, "docs").unwrap(), Some(docs));
    let pics = m.space(acct, "pics").unwrap().unwrap();
    assert!(pics != docs && pics != acct);
    // A space is no account: it has no space of its own, and is not listed.
    assert_eq!(m.space(docs, "x").unwrap(), None);
    assert!(m.list_accounts().unwrap().iter().all(|a| a.account.id != docs && a.account.id != pics));

    assert_eq!(m.commit(docs, "dev", &[put("a.txt", 0, b"v1", key)]).unwrap(), vec![Ok(1)]);
    assert_eq!(m.seq(docs).unwrap(), 1);
    assert_eq!((m.seq(acct).unwrap(), m.seq(pics).unwrap()), (0, 0));
    assert!(m.get(acct, &rel("a.txt")).unwrap().is_none() && m.get(pics, &rel("a.txt")).unwrap().is_none());
    assert!(m.content(pics, &ContentHash::of(b"v1")).unwrap().is_none());
    assert_eq!(m.changes(docs, 0).unwrap().0.len(), 1);
    assert!(m.changes(pics, 0).unwrap().0.is_empty());

    // The quota: 3 bytes for the account, 2 used in docs; 2 more in pics are refused.
    assert!(m.set_quota("folders", Some(3)).unwrap());
    assert_eq!(m.usage(pics).unwrap(), (2, Some(3)));
    let r = m.commit(pics, "dev", &[put("b.txt", 0, b"v1", key)]).unwrap();
    assert_eq!(r[0].as_ref().unwrap_err().kind, RefusalKind::Server, "{r:?}");
    let listed = m.list_accounts().unwrap().into_iter().find(|a| a.account.id == acct).unwrap();
    assert_eq!(listed.used, 2);
    let names: Vec<String> = m.folders(acct).unwrap().into_iter().map(|f| f.0).collect();
    assert_eq!(names, ["default", "docs", "pics"]);

    assert!(m.remove_account("folders").unwrap());
    assert_eq!(m.space(acct, "docs").unwrap(), None);
    assert!(m.get(docs, &rel("a.txt")).unwrap().is_none());
}

/// A prune forgets the contents only forgotten versions used, in that account only.
fn forgets_contents(m: &Metadata) {
    let dave = m.add_account("pruned-a", "laptop", "tok-pruned-a").unwrap().id;
    let erin = m.add_account("pruned-b", "laptop", "tok-pruned-b").unwrap().id;
    let (k1, k2) = ([31u8; 32], [32u8; 32]);
    let pack = PackId([31; 16]);
    let (l1, l2) = (
        ChunkLoc { pack, offset: 45, stored: 3, raw: 3, zstd: false },
        ChunkLoc { pack, offset: 93, stored: 3, raw: 3, zstd: false },
    );
    m.add_pack(&Sealed {
        pack,
        size: 96,
        chunks: vec![NewChunk { key: k1, loc: l1 }, NewChunk { key: k2, loc: l2 }],
    })
    .unwrap();
    assert_eq!(m.commit(dave, "dev", &[put("p", 0, b"old", k1)]).unwrap(), vec![Ok(1)]);
    assert_eq!(m.commit(dave, "dev", &[put("p", 1, b"new", k2)]).unwrap(), vec![Ok(2)]);
    assert_eq!(m.commit(erin, "dev", &[put("q", 0, b"old", k1)]).unwrap(), vec![Ok(1)]);
    let keep: crate::server::retention::Keep = "current".parse().unwrap();
    m.prune(&keep, i64::MAX / 2, 0).unwrap();
    assert_eq!(
        m.content(dave, &ContentHash::of(b"old")).unwrap(),
        None,
        "a forgotten version's content stays"
    );
    assert!(m.content(dave, &ContentHash::of(b"new")).unwrap().is_some());
    assert!(m.content(erin, &ContentHash::of(b"old")).unwrap().is_some(), "another account's content went");
}

/// A repack moves the live chunks of several packs into one and forgets those packs, except a
/// pack with a chunk in use that was not copied; a prune offers small packs for merging.
fn repacks(m: &Metadata) {
    let acct = m.add_account("repacked", "laptop", "tok-repacked").unwrap().id;
    let (p1, p2, p3, new) = (PackId([41; 16]), PackId([42; 16]), PackId([43; 16]), PackId([44; 16]));
    let chunk = |k: u8, pack| NewChunk {
        key: [k; 32],
        loc: ChunkLoc { pack, offset: 45, stored: 2, raw: 2, zstd: false },
    };
    m.add_pack(&Sealed { pack: p1, size: 47, chunks: vec![chunk(41, p1)] }).unwrap();
    m.add_pack(&Sealed { pack: p2, size: 94, chunks: vec![chunk(42, p2), chunk(43, p2)] }).unwrap();
    m.add_pack(&Sealed { pack: p3, size: 94, chunks: vec![chunk(45, p3), chunk(46, p3)] }).unwrap();
    assert_eq!(m.commit(acct, "dev", &[put("one", 0, b"r1", [41; 32])]).unwrap(), vec![Ok(1)]);
    assert_eq!(m.commit(acct, "dev", &[put("two", 0, b"r2", [42; 32])]).unwrap(), vec![Ok(2)]);
    let both = Step {
        op: "write",
        changes: vec![Change {
            path: rel("three"),
            base_rev: 0,
            node: Some(file(b"r3r4")),
            chunks: Some(vec![([45; 32], 2), ([46; 32], 2)]),
        }],
    };
    assert_eq!(m.commit(acct, "dev", &[both]).unwrap(), vec![Ok(3)]);
    // Every pack here is small: a prune offers each, with its live chunks.
    let pruned = m.prune(&crate::server::retention::Keep::All, i64::MAX / 2, 0).unwrap();
    for (pack, live) in [(p1, 1), (p2, 1), (p3, 2)] {
        let found = pruned.to_repack.iter().find(|s| s.0 == pack);
        assert_eq!(found.map(|s| s.2.len()), Some(live), "pack {pack:?} offered as {found:?}");
    }

    // Chunk 46 of p3 is in use and not copied: p3 stays whole.
    let moved = |k: u8, offset| NewChunk {
        key: [k; 32],
        loc: ChunkLoc { pack: new, offset, stored: 2, raw: 2, zstd: false },
    };
    let sealed = Sealed { pack: new, size: 141, chunks: vec![moved(41, 45), moved(42, 92), moved(45, 139)] };
    let mut forgotten = m.repacked(&[p1, p2, p3], &sealed).unwrap();
    forgotten.sort();
    assert_eq!(forgotten, [p1, p2]);
    assert!(m.pack_known(new).unwrap() && m.pack_known(p3).unwrap());
    assert!(!m.pack_known(p1).unwrap() && !m.pack_known(p2).unwrap());
    assert_eq!(m.content(acct, &ContentHash::of(b"r1")).unwrap(), Some((2, vec![moved(41, 45).loc])));
    assert_eq!(m.content(acct, &ContentHash::of(b"r2")).unwrap(), Some((2, vec![moved(42, 92).loc])));
    assert!(!m.chunk_exists(&[43; 32]).unwrap(), "an unused chunk of a forgotten pack is still recorded");
    let three = m.content(acct, &ContentHash::of(b"r3r4")).unwrap().unwrap().1;
    assert!(three.iter().all(|l| l.pack == p3), "a chunk of the pack left moved: {three:?}");
    // Nothing left to move: nothing changes.
    assert_eq!(m.repacked(&[p3], &Sealed { pack: PackId([45; 16]), size: 0, chunks: vec![] }).unwrap(), []);
    assert!(!m.pack_known(PackId([45; 16])).unwrap());
}

/// Devices: each has its own token, revoked alone; a removed account leaves nothing usable.
fn devices(m: &Metadata) {
    let alice = m.add_account("carol", "laptop", "tok-laptop").unwrap();
    assert!(
        matches!(m.add_account("carol", "x", "tok-other"), Err(MetaError::AccountExists(n)) if n == "carol")
    );
    assert!(m.authenticate("tok-other").unwrap().is_none(), "a refused account made a device");
    let phone = m.add_device("carol", "phone", "tok-phone").unwrap().unwrap();
    assert_eq!(m.add_device("nobody", "phone", "tok-x").unwrap(), None);
    let (a1, d1) = m.authenticate("tok-laptop").unwrap().unwrap();
    let (a2, d2) = m.authenticate("tok-phone").unwrap().unwrap();
    assert_eq!((a1.id, a1.name.as_str(), d1.name.as_str()), (alice.id, "carol", "laptop"));
    assert_eq!((a2.id, d2.id, d2.name.as_str()), (alice.id, phone, "phone"));
    assert_ne!(d1.id, d2.id);
    assert!(m.authenticate("tok-unknown").unwrap().is_none());
    assert!(m.authenticate("").unwrap().is_none());
    // A live name is taken; the same name on another account is not.
    assert!(
        matches!(m.add_device("carol", "phone", "tok-phone2"), Err(MetaError::DeviceExists(n)) if n == "phone")
    );
    assert!(m.authenticate("tok-phone2").unwrap().is_none());
    let dave = m.add_account("dave", "phone", "tok-dave").unwrap();
    assert_eq!(m.live_devices(&[d1.id, d2.id]).unwrap(), [d1.id, d2.id]);

    // Seen: time and address.
    m.device_seen(d2.id, "198.51.100.7:5000", 1_700_000_000).unwrap();
    let list = m.list_devices("carol").unwrap().unwrap();
    assert_eq!(list.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["laptop", "phone"]);
    assert_eq!((list[0].last_seen, list[0].last_addr.as_deref()), (None, None));
    assert_eq!(
        (list[1].last_seen, list[1].last_addr.as_deref()),
        (Some(1_700_000_000), Some("198.51.100.7:5000"))
    );
    assert!(list.iter().all(|d| d.revoked.is_none() && d.created > 0));
    assert_eq!(m.list_devices("nobody").unwrap().map(|l| l.len()), None);

    // Revoking one device stops its token only.
    assert!(m.revoke_device("carol", "phone").unwrap());
    assert!(!m.revoke_device("carol", "phone").unwrap(), "revoked twice");
    assert!(!m.revoke_device("carol", "tablet").unwrap());
    assert!(!m.revoke_device("nobody", "phone").unwrap());
    assert!(m.authenticate("tok-phone").unwrap().is_none(), "a revoked token still works");
    assert_eq!(m.authenticate("tok-laptop").unwrap().unwrap().1.id, d1.id);
    assert_eq!(m.authenticate("tok-dave").unwrap().unwrap().0.id, dave.id, "another account's `phone`");
    assert_eq!(m.live_devices(&[d2.id, d1.id, 987_654]).unwrap(), [d1.id]);
    let list = m.list_devices("carol").unwrap().unwrap();
    assert!(list[1].revoked.is_some() && list[0].revoked.is_none(), "{list:?}");

    // A revoked name may be issued again, with a new token and a new id.
    let again = m.add_device("carol", "phone", "tok-phone2").unwrap().unwrap();
    assert!(again != d2.id);
    assert_eq!(
        m.authenticate("tok-phone2").unwrap().unwrap().1,
        crate::server::meta::Device { id: again, name: "phone".into() }
    );
    assert!(m.authenticate("tok-phone").unwrap().is_none());
    assert_eq!(m.list_devices("carol").unwrap().unwrap().len(), 3);

    // Removing the account: every token of it fails, its names are free, others are untouched.
    let key = [3u8; 32];
    let pack = PackId([8; 16]);
    let loc = ChunkLoc { pack, offset: 45, stored: 2, raw: 2, zstd: false };
    m.add_pack(&Sealed { pack, size: 47, chunks: vec![NewChunk { key, loc }] }).unwrap();
    assert_eq!(m.commit(alice.id, "laptop", &[put("c.txt", 0, b"c1", key)]).unwrap(), vec![Ok(1)]);
    assert_eq!(m.commit(dave.id, "phone", &[put("d.txt", 0, b"c1", key)]).unwrap(), vec![Ok(1)]);
    assert!(m.remove_account("carol").unwrap());
    assert!(!m.remove_account("carol").unwrap());
    assert!(!m.remove_account("nobody").unwrap());
    for t in ["tok-laptop", "tok-phone", "tok-phone2"] {
        assert!(m.authenticate(t).unwrap().is_none(), "{t} works after the account was removed");
    }
    assert!(m.live_devices(&[d1.id, again]).unwrap().is_empty());
    assert_eq!(m.list_devices("carol").unwrap().map(|l| l.len()), None);
    assert!(m.list_accounts().unwrap().iter().all(|a| a.account.name != "carol"));
    assert_eq!(m.content(alice.id, &ContentHash::of(b"c1")).unwrap(), None);
    assert!(m.log(alice.id, None, false, 10).unwrap().is_empty());
    assert!(!m.set_quota("carol", Some(1)).unwrap());
    let dave_dev = m.authenticate("tok-dave").unwrap().unwrap().1.id;
    assert_eq!(m.live_devices(&[dave_dev]).unwrap(), [dave_dev]);
    assert_eq!(m.content(dave.id, &ContentHash::of(b"c1")).unwrap(), Some((2, vec![loc])));
    assert!(m.get(dave.id, &rel("d.txt")).unwrap().unwrap().node.is_some());
    // The name is free: a new account of that name has a new id and nothing of the old one.
    let back = m.add_account("carol", "laptop", "tok-back").unwrap();
    assert!(back.id != alice.id);
    assert_eq!(m.seq(back.id).unwrap(), 0);
    assert!(m.get(back.id, &rel("c.txt")).unwrap().is_none());
    assert!(m.authenticate("tok-laptop").unwrap().is_none());
    assert_eq!(m.list_devices("carol").unwrap().unwrap().len(), 1);

    // Ids are never reused, not even the newest's: a session of a removed account, still
    // running until the server polls `live_devices`, must not become a newcomer's.
    let gone = m.add_account("erin", "pc", "tok-erin").unwrap();
    let gone_dev = m.authenticate("tok-erin").unwrap().unwrap().1.id;
    assert!(m.remove_account("erin").unwrap());
    let next = m.add_account("frank", "pc", "tok-frank").unwrap();
    let next_dev = m.authenticate("tok-frank").unwrap().unwrap().1.id;
    assert!(next.id != gone.id && next_dev != gone_dev, "ids reused");
    assert!(m.live_devices(&[gone_dev]).unwrap().is_empty());
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
