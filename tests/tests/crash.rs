//! Crash points that are really tested: the server is stopped dead (an abort at a failpoint,
//! built only with `--features failpoints`) at each phase of a group commit, restarted, and
//! nothing may be lost or torn: every path reads back verified, as the old version or the new
//! one; no unfinished pack is left once the server serves again (the start's recovery removes
//! them), and no version refers to a chunk that is gone.

use std::time::Duration;

use super::util::*;

/// (failpoint, whether the crashed batch's uploads must be on the server after the restart).
/// Uploads of later batches never reached a commit, so they are the old version either way.
const PHASES: [(&str, bool); 3] = [
    ("commit-before-seal", false), // chunks written into an unfinished pack: recovery removes it
    ("commit-sealed", false),      // pack durable and recorded, versions not: the client re-sends
    ("commit-recorded", true),     // all done, replies not sent
];

fn content(version: &str, name: &str, len: usize) -> String {
    let mut v = format!("{version} {name} ");
    v.extend(std::iter::repeat_n('.', len - v.len()));
    v
}

#[test]
fn a_server_killed_at_each_phase_of_a_commit_loses_nothing_and_tears_nothing() {
    let files = [("small.txt", 3_000usize), ("dir/medium.bin", 300_000), ("big.bin", 3 << 20)];
    for (phase, kept) in PHASES {
        let mut first = start_server();
        let token = add_account(&first.data, "alice");
        let a = temp_dir("a");
        for (name, len) in files {
            write(&a.path().join(name), content("v0", name, len));
        }
        push(a.path(), &first, &token);
        first.kill_hard();

        let mut armed = start_server_with(Some(&first.data), &[("DELTASYNC_FAILPOINT", phase)]);
        for (name, len) in files {
            write(&a.path().join(name), content("v1", name, len));
        }
        let cut = sync_cmd("push", a.path(), &armed, &token, &[]);
        assert!(!cut.success(), "{phase}: the push should have lost its server:\n{}", cut.dump());
        assert!(armed.wait_exited(Duration::from_secs(30)), "{phase}: the failpoint did not stop the server");
        assert!(armed.log().contains(&format!("failpoint {phase}")), "{phase}: {}", armed.log());

        let again = start_server_with(Some(&first.data), &[]);
        let d = temp_dir("d");
        let out = sync_cmd("pull", d.path(), &again, &token, &[]);
        assert!(
            out.success(),
            "{phase}: a torn server: a fresh pull failed\n{}\n{}",
            out.dump(),
            again.log()
        );
        // Serving, so past recovery and the start's clean-up.
        assert!(again.temp_files().is_empty(), "{phase}: temp files left: {:?}", again.temp_files());
        let mut new = 0;
        for (name, len) in files {
            let got = read_string(&d.path().join(name));
            assert!(
                got == content("v0", name, len) || got == content("v1", name, len),
                "{phase}: {name} torn"
            );
            new += (got == content("v1", name, len)) as usize;
        }
        assert_eq!(new > 0, kept, "{phase}: {new} of the files are the new version after the restart");
        push(a.path(), &again, &token);
        pull(d.path(), &again, &token);
        assert_same_tree(a.path(), d.path());
        // Leftovers are collected, and no version refers to a chunk that went with them.
        run(command().args(["prune", "--keep", "all", "--grace", "0s", "--data"]).arg(&again.data))
            .ok("prune");
        let e = temp_dir("e");
        sync_cmd("pull", e.path(), &again, &token, &[]).ok("pull after the prune");
        assert_same_tree(a.path(), e.path());
    }
}
