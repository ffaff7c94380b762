//! Metadata on the wire: paths, entries and replies travel in compressed runs (protocol 5), so a
//! deep tree of small, unicode-named files costs about what `rsync -z` sends.

use crate::util::*;

/// Names in several scripts, deep under long common prefixes, as real trees have.
const PARTS: [&str; 12] = [
    "Équipe produit",
    "réunions d'été",
    "Документы",
    "отчёт за год",
    "照片",
    "会议记录",
    "プロジェクト",
    "보고서",
    "📷 album",
    "🚀 launch ✅",
    "naïve façade",
    "Übersicht",
];

fn unicode_path(i: usize) -> String {
    let depth = 3 + i % 5;
    let dirs: Vec<String> =
        (0..depth).map(|d| format!("{} {}", PARTS[(i / 7 + d * 5) % 12], (i / 40 + d) % 3)).collect();
    format!("Users/marie/Documents partagés/{}/{} fichier {i:04}.txt", dirs.join("/"), PARTS[i % 12])
}

fn text(i: usize, len: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut n = i;
    while s.len() < len {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s.push_str(&format!("{} line {} status ok value {}\n", PARTS[(n >> 33) % 12], i, (n >> 40) % 1000));
    }
    s.into_bytes()
}

/// A tree of unicode names pushed from one folder and pulled into another arrives byte for
/// byte, with small files (in runs), files past a run's message limit and a big random file
/// (plain frames between runs) in the same session.
#[test]
fn a_unicode_tree_round_trips_byte_for_byte() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-meta-a-");
    for i in 0..600 {
        let len = [100, 700, 2000, 4096, 30_000][i % 5];
        write(&a.path().join(unicode_path(i)), text(i, len));
    }
    write(&a.path().join("Документы/大きい 📦.bin"), random_bytes(3, 3 << 20));
    write(&a.path().join("Документы/mid été.bin"), random_bytes(4, 100_000));
    write(&a.path().join("Документы/mid text.txt"), text(9, 200_000));
    write(&a.path().join("vide ∅.txt"), b"");
    push(a.path(), &srv, &token);

    let b = temp_dir("ds-meta-b-");
    let into = b.path().join("pulled ここ");
    pull(&into, &srv, &token);
    assert_same_tree(a.path(), &into);
}

/// The bytes of a push of many small files with long common paths stay under half of what the
/// paths and contents weigh uncompressed: paths and entries compress like literal data.
#[test]
fn a_push_of_long_common_paths_costs_less_than_half_their_size() {
    let srv = start_server();
    let token = add_account(&srv.data, "alice");
    let a = temp_dir("ds-meta-c-");
    let mut plain = 0;
    for i in 0..2000 {
        let path = unicode_path(i);
        let content = text(i, 300);
        plain += path.len() + content.len();
        write(&a.path().join(&path), content);
    }
    let out = sync_cmd("push", a.path(), &srv, &token, &[]).ok("push");
    let wire = out.wire_bytes();
    eprintln!("{wire} bytes on the wire for {plain} bytes of paths and contents");
    assert!(
        (wire as usize) * 2 < plain,
        "{wire} bytes on the wire for {plain} bytes of paths and contents\n{}",
        out.dump()
    );
    let b = temp_dir("ds-meta-d-");
    pull(b.path(), &srv, &token);
    assert_same_tree(a.path(), b.path());
}
