//! The first start on a data folder made by the plain-mirror release converts it to the
//! versioned store, losing nothing: the fixture `tests/fixtures/v1-data` was made by that
//! release's binary (commit 9269d24; see `tests/fixtures/v1-tokens.txt`).

use std::path::Path;

use super::util::*;

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            copy_tree(&src, &dst);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn token(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-tokens.txt");
    let text = std::fs::read_to_string(root).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no token for {name} in the fixture"))
}

#[test]
fn a_data_folder_of_the_plain_mirror_release_is_converted_on_first_start_losing_nothing() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-data");
    let tmp = temp_dir("ds-v1-");
    let data = tmp.path().join("data");
    copy_tree(&fixture, &data);
    assert!(data.join("accounts/1/files/docs/a.txt").is_file(), "the fixture is not the old layout");

    let srv = start_server_with(Some(&data), &[]);
    let (alice, bob) = (token("alice"), token("bob"));
    let a = temp_dir("ds-v1-alice-");
    pull(a.path(), &srv, &alice);
    assert_eq!(
        list_tree(a.path()),
        ["docs", "docs/a.txt", "docs/copy.txt", "docs/sub", "docs/sub/big.txt", "empty", "link"]
    );
    assert_eq!(read_string(&a.path().join("docs/a.txt")), "hello v2\n");
    assert_eq!(read_string(&a.path().join("docs/copy.txt")), "hello v2\n");
    assert_eq!(read(&a.path().join("docs/sub/big.txt")), vec![b'x'; 5000]);
    assert_eq!(std::fs::read_link(a.path().join("link")).unwrap().to_str(), Some("docs/a.txt"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.path().join("docs/a.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "the recorded mode was lost");
    let b = temp_dir("ds-v1-bob-");
    pull(b.path(), &srv, &bob);
    assert_eq!(list_tree(b.path()), ["bob.txt"]);
    assert_eq!(read_string(&b.path().join("bob.txt")), "bob's file\n");
    // The old mirror is gone; the content lives in packs now.
    assert!(!data.join("accounts").exists(), "the old mirror was left behind");
    assert!(data.join("packs").is_dir());

    // The converted paths have history, and the folder keeps working: an edit is a new version.
    std::fs::write(a.path().join("docs/a.txt"), "hello v3\n").unwrap();
    push(a.path(), &srv, &alice);
    let c = temp_dir("ds-v1-check-");
    pull(c.path(), &srv, &alice);
    assert_eq!(read_string(&c.path().join("docs/a.txt")), "hello v3\n");

    // A second start finds nothing to convert.
    let again = srv.restart();
    let d = temp_dir("ds-v1-again-");
    pull(d.path(), &again, &alice);
    assert_same_tree(c.path(), d.path());
}
