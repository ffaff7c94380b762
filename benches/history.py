#!/usr/bin/env python3
"""Figures of the versioned store (README "History, restore, undo"): whole-process numbers.

    benches/history.py [all|growth|bigedit|accounts|restore|resume]...

- growth: 100 pushes, each overwriting 64 KiB at a random offset of a 256 MiB random file:
  how much the server's data folder grows beyond the file (every version kept), and the bytes
  the server writes to its disk (/proc/PID/io write_bytes) for one such push.
- bigedit: a 1 MiB edit in the middle of a 4 GiB file, push end to end.
- accounts: the same 256 MiB file pushed by a second account: data folder growth.
- restore: restoring a 256 MiB version (`restore --to`) against a pull of the same file.
- resume: a 1 GiB push and a 1 GiB pull cut off halfway, then run again: bytes sent the second time.
Environment: DELTASYNC_BIN (default target/release/deltasync), DELTASYNC_BENCH_TMP (work folder
parent; ~10 GB for bigedit).
"""
import os, random, re, shutil, signal, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("DELTASYNC_BIN", os.path.join(ROOT, "target/release/deltasync"))
MiB = 1 << 20


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class Server:
    def __init__(self, work, keep=None):
        self.data = os.path.join(work, "data")
        self.log = open(os.path.join(work, "server.log"), "w")
        keep = ["--keep", keep] if keep else []
        self.p = subprocess.Popen([BIN, "serve", "--listen", "127.0.0.1:0", "--data", self.data, *keep],
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.p.stdout.readline()
        self.addr = re.search(r"listening on (\S+)", line).group(1)

    def account(self, name):
        out = subprocess.run([BIN, "account", "add", name, "--data", self.data], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def write_bytes(self):
        with open(f"/proc/{self.p.pid}/io") as f:
            for l in f:
                if l.startswith("write_bytes:"):
                    return int(l.split()[1])

    def peak_mib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for l in f:
                if l.startswith("VmHWM:"):
                    return int(l.split()[1]) / 1024

    def reset_peak(self):
        with open(f"/proc/{self.p.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        self.p.wait(timeout=60)


def sync(cmd, d, srv, token, *extra, check=True):
    t = time.monotonic()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", BIN, cmd, d, "--server", srv.addr, "--token", token,
                          "--no-progress", "--stats", *extra], capture_output=True, text=True)
    dt = time.monotonic() - t
    if check and out.returncode != 0:
        sys.exit(f"{cmd} failed: {out.stdout}\n{out.stderr}")
    m = re.search(r"MAXRSS (\d+)", out.stderr)
    out.maxrss_mib = int(m.group(1)) / 1024 if m else float("nan")
    return dt, out


def random_file(path, size, seed):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rnd.randbytes(n))
            left -= n


def overwrite(path, offset, n, seed):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(n))


def growth(work):
    srv = Server(work, os.environ.get("KEEP_ALL"))
    tok = srv.account("a")
    a = os.path.join(work, "a"); os.mkdir(a)
    f = os.path.join(a, "big.bin")
    random_file(f, 256 * MiB, 1)
    sync("push", a, srv, tok)
    base = du(srv.data)
    rnd = random.Random(7)
    wb = []
    for i in range(100):
        overwrite(f, rnd.randrange(0, 256 * MiB - 64 * 1024), 64 * 1024, 1000 + i)
        before = srv.write_bytes()
        sync("push", a, srv, tok)
        time.sleep(0.05)
        wb.append(srv.write_bytes() - before)
    grown = du(srv.data) - base
    wb.sort()
    print(f"growth: data folder {base / MiB:.1f} MiB after the first push (file 256 MiB); "
          f"+{grown / MiB:.1f} MiB after 100 pushes of a 64 KiB edit (every version kept)")
    print(f"growth: server write_bytes per 64 KiB edit push: median {wb[50] / MiB:.2f} MiB, max {wb[-1] / MiB:.2f} MiB")
    srv.stop()


def bigedit(work):
    srv = Server(work)
    tok = srv.account("a")
    a = os.path.join(work, "a"); os.mkdir(a)
    f = os.path.join(a, "huge.bin")
    random_file(f, 4096 * MiB, 2)
    t0, out = sync("push", a, srv, tok)
    print(f"bigedit: first push of 4 GiB {t0:.1f} s; client peak {out.maxrss_mib:.0f} MiB, server peak {srv.peak_mib():.0f} MiB")
    times = []
    for i in range(3):
        overwrite(f, 2048 * MiB + i * 7 * MiB, MiB, 50 + i)
        before = srv.write_bytes()
        srv.reset_peak()
        dt, out = sync("push", a, srv, tok)
        times.append(dt)
        print(f"bigedit: 1 MiB edit of 4 GiB: push {dt:.2f} s, server wrote {(srv.write_bytes() - before) / MiB:.1f} MiB; "
              f"client peak {out.maxrss_mib:.0f} MiB, server peak {srv.peak_mib():.0f} MiB")
    print(f"bigedit: 1 MiB edit median {sorted(times)[1]:.2f} s")
    b = os.path.join(work, "b"); os.mkdir(b)
    srv.reset_peak()
    dt, out = sync("pull", b, srv, tok)
    print(f"bigedit: 4 GiB pull into an empty folder {dt:.1f} s; client peak {out.maxrss_mib:.0f} MiB, server peak {srv.peak_mib():.0f} MiB")
    srv.stop()


def accounts(work):
    srv = Server(work)
    t1, t2 = srv.account("a"), srv.account("b")
    a = os.path.join(work, "a"); os.mkdir(a)
    b = os.path.join(work, "b"); os.mkdir(b)
    random_file(os.path.join(a, "big.bin"), 256 * MiB, 3)
    shutil.copy(os.path.join(a, "big.bin"), os.path.join(b, "same.bin"))
    sync("push", a, srv, t1)
    base = du(srv.data)
    sync("push", b, srv, t2)
    print(f"accounts: the same 256 MiB pushed by a second account grew the data folder by {(du(srv.data) - base) / MiB:.2f} MiB")
    srv.stop()


def main():
    what = sys.argv[1:] or ["all"]
    parent = os.environ.get("DELTASYNC_BENCH_TMP", tempfile.gettempdir())
    for name, fn in [("growth", growth), ("accounts", accounts), ("bigedit", bigedit)] + EXTRA:
        if "all" in what or name in what:
            work = tempfile.mkdtemp(prefix=f"ds-hist-{name}-", dir=parent)
            try:
                fn(work)
            finally:
                shutil.rmtree(work, ignore_errors=True)


def restore(work):
    srv = Server(work)
    tok = srv.account("a")
    a = os.path.join(work, "a"); os.mkdir(a)
    f = os.path.join(a, "big.bin")
    random_file(f, 256 * MiB, 4)
    sync("push", a, srv, tok)
    random_file(f, 256 * MiB, 5)
    sync("push", a, srv, tok)
    out = subprocess.run([BIN, "log", a, "big.bin", "--json"], capture_output=True, text=True, check=True)
    revs = [int(re.search(r'"rev":(\d+)', l).group(1)) for l in out.stdout.splitlines() if l.strip()]
    first = min(revs)
    pulls, restores = [], []
    for i in range(3):
        d = os.path.join(work, f"p{i}"); os.mkdir(d)
        dt, _ = sync("pull", d, srv, tok)
        pulls.append(dt)
        to = os.path.join(work, f"r{i}")
        t = time.monotonic()
        subprocess.run([BIN, "restore", a, "big.bin", "--rev", str(first), "--to", to, "--no-progress"],
                       capture_output=True, text=True, check=True)
        restores.append(time.monotonic() - t)
        shutil.rmtree(d); shutil.rmtree(to)
    p, r = sorted(pulls)[1], sorted(restores)[1]
    print(f"restore: a 256 MiB version with restore --to: {r:.2f} s; a pull of the current 256 MiB: {p:.2f} s (x{r / p:.2f}; medians of 3)")
    srv.stop()


EXTRA = [("restore", restore)]

if __name__ == "__main__":
    main()
