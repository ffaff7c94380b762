//! What people see while deltasync works: indicatif bars on a terminal (with `-v`, one line per
//! file above them), one line per file with `-v` otherwise, nothing with `--no-progress` or
//! `-q`. The per-file results are kept for `--json` when asked. indicatif is used only here.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// Files at least this large get a bar of their own while in flight.
const OWN_BAR_FROM: u64 = 8 << 20;

/// The time constant of the smoothed rate behind the ETA: a sample `TAU` old weighs 1/e of a
/// new one. indicatif's own estimate looks at about the last second, so a slow start (scan,
/// handshake, the first small files) made it say 8 min for a job of 2 min; 15 s rides over such
/// dips and still follows a link that really got slower within half a minute.
const TAU: Duration = Duration::from_secs(15);

/// The longest path shown beside the bar (its end is kept: the file name matters most).
const MAX_NAME: usize = 40;

pub enum Mode {
    Bars,
    Log,
    Quiet,
}

/// How a command wants its progress shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// Bars, when stderr is a terminal (not with `quiet`).
    pub bars: bool,
    /// One line per file (`-v`; `watch` by default).
    pub verbose: bool,
    /// `-q`: no bars, no notes; only warnings and errors.
    pub quiet: bool,
    /// Keep every file's result for [`Progress::results`] (`--json`).
    pub record: bool,
}

pub struct Progress {
    mode: Mode,
    verbose: bool,
    quiet: bool,
    record: bool,
    multi: Option<MultiProgress>,
    overall: Mutex<Option<ProgressBar>>,
    files: Mutex<HashMap<String, ProgressBar>>,
    results: Mutex<Vec<(String, String)>>,
    done: AtomicU64,
    total_files: AtomicU64,
    /// Per-file lines (`Mode::Log`) not written yet: see [`Lines`].
    lines: Arc<Mutex<Lines>>,
}

/// Per-file log lines, written to stderr at once when the last write was at least
/// [`LINES_EVERY`] ago and otherwise gathered, then written together: by a thread that starts
/// with the gathering and ends once nothing is left to write (so an idle `watch` has none), or
/// earlier by [`Progress::flush`] (a round's end, any other message, the drop). One `write` per
/// line cost a `watch` uploading 100,000 files 100,000 system calls on the thread that takes
/// the server's replies.
#[derive(Default)]
struct Lines {
    buf: String,
    written: Option<std::time::Instant>,
    /// The thread that writes what waits is running.
    writer: bool,
    /// Where the lines go instead of stderr (the tests' own buffer).
    #[cfg(test)]
    to: Option<Arc<Mutex<Vec<u8>>>>,
}

/// How long per-file lines may wait to be written together.
const LINES_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Lines {
    fn write(&mut self) {
        use std::io::Write;
        if !self.buf.is_empty() {
            #[cfg(test)]
            if let Some(to) = &self.to {
                to.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(self.buf.as_bytes());
                self.buf.clear();
            }
            if !self.buf.is_empty() {
                let _ = std::io::stderr().lock().write_all(self.buf.as_bytes());
                self.buf.clear();
            }
        }
        self.written = Some(std::time::Instant::now());
    }
}

impl Progress {
    /// Bars when asked for and stderr is a terminal; log lines with `verbose`; else quiet.
    pub fn new(bars: bool, verbose: bool) -> Self {
        Progress::with(Settings { bars, verbose, ..Settings::default() })
    }

    pub fn with(s: Settings) -> Self {
        use std::io::IsTerminal;
        let mode = if s.quiet {
            Mode::Quiet
        } else if s.bars && std::io::stderr().is_terminal() {
            Mode::Bars
        } else if s.verbose {
            Mode::Log
        } else {
            Mode::Quiet
        };
        let multi =
            matches!(mode, Mode::Bars).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress {
            mode,
            verbose: s.verbose && !s.quiet,
            quiet: s.quiet,
            record: s.record,
            multi,
            overall: Mutex::default(),
            files: Mutex::default(),
            results: Mutex::default(),
            done: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
            lines: Arc::default(),
        }
    }

    /// Sets the size of the whole transfer (`files`: files only, not folders); shows the
    /// overall bar.
    pub fn start(&self, files: u64, bytes: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total_files.store(files, Ordering::Relaxed);
        if let Some(m) = &self.multi {
            if bytes == 0 {
                return;
            }
            let width = console::Term::stderr().size_checked().map_or(80, |(_, w)| usize::from(w));
            let pb = m.add(ProgressBar::new(bytes));
            pb.set_style(
                ProgressStyle::with_template(&template(layout(width)))
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key("smooth_eta", Smoothed::new(Shown::Eta))
                    .with_key("smooth_rate", Smoothed::new(Shown::Rate)),
            );
            pb.set_prefix(format!("0/{files} files"));
            *self.overall.lock().unwrap_or_else(|p| p.into_inner()) = Some(pb);
        }
    }

    pub fn file_started(&self, path: &str, size: u64) {
        let Some(m) = &self.multi else { return };
        // Every file in flight is named beside the overall bar, small ones too; big ones get a
        // bar of their own as well.
        if let Some(o) = &*self.overall.lock().unwrap_or_else(|p| p.into_inner()) {
            o.set_message(short_name(path, MAX_NAME));
        }
        if size >= OWN_BAR_FROM {
            let pb = m.add(ProgressBar::new(size));
            pb.set_style(
                ProgressStyle::with_template("  {wide_msg} {percent:>3}% {bytes}/{total_bytes}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(short_name(path, MAX_NAME));
            self.files.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_string(), pb);
        }
    }

    /// `bytes` more of `path` were processed.
    pub fn advance(&self, path: &str, bytes: u64) {
        if let Some(o) = &*self.overall.lock().unwrap_or_else(|p| p.into_inner()) {
            o.inc(bytes);
        }
        if let Some(pb) = self.files.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
            pb.inc(bytes);
        }
    }

    /// A path is done; `what` says what happened ("uploaded", "deleted", ...).
    pub fn file_done(&self, path: &str, what: &str) {
        if self.record {
            self.results.lock().unwrap_or_else(|p| p.into_inner()).push((path.to_string(), what.to_string()));
        }
        // The count is of files, as the total is (mkdir, link, meta and deletes are not).
        let n = if counts_as_file(what) {
            self.done.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.done.load(Ordering::Relaxed)
        };
        match self.mode {
            Mode::Log => {
                let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                lines.buf.push_str(what);
                lines.buf.push(' ');
                lines.buf.push_str(path);
                lines.buf.push('\n');
                if lines.written.is_none_or(|t| t.elapsed() >= LINES_EVERY) || lines.buf.len() >= 64 << 10 {
                    lines.write();
                } else if !lines.writer {
                    let waiting = Arc::downgrade(&self.lines);
                    lines.writer = std::thread::Builder::new()
                        .name("deltasync-lines".into())
                        .spawn(move || write_waiting_lines(waiting))
                        .is_ok();
                    if !lines.writer {
                        lines.write();
                    }
                }
            }
            Mode::Bars => {
                if let Some(pb) = self.files.lock().unwrap_or_else(|p| p.into_inner()).remove(path) {
                    pb.finish_and_clear();
                }
                if self.verbose
                    && let Some(m) = &self.multi
                {
                    let _ = m.println(format!("{what} {path}"));
                }
                if let Some(o) = &*self.overall.lock().unwrap_or_else(|p| p.into_inner()) {
                    let t = self.total_files.load(Ordering::Relaxed);
                    o.set_prefix(format!("{}/{t} files", n.min(t)));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// The files done so far, as `(path, what)`, when recording (`--json`).
    pub fn results(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.results.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A line that must be seen whatever the mode (conflicts, warnings). With `-q`, only
    /// warnings and errors (lines starting `warning`, `error` or `deltasync:`, as every caller
    /// writes them) are shown: notes are what a quiet run leaves out.
    pub fn say(&self, line: &str) {
        if self.quiet && !["warning", "error", "deltasync:"].iter().any(|p| line.starts_with(p)) {
            return;
        }
        self.flush();
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Writes the per-file lines gathered so far.
    pub fn flush(&self) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if !lines.buf.is_empty() {
            lines.write();
        }
    }

    pub fn finish(&self) {
        self.flush();
        if let Some(o) = self.overall.lock().unwrap_or_else(|p| p.into_inner()).take() {
            o.finish_and_clear();
        }
    }
}

/// The body of the thread of [`Lines`]: writes what waits every [`LINES_EVERY`] until nothing
/// does (or the [`Progress`] is gone).
fn write_waiting_lines(lines: std::sync::Weak<Mutex<Lines>>) {
    loop {
        std::thread::sleep(LINES_EVERY);
        let Some(lines) = lines.upgrade() else { return };
        let mut lines = lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.buf.is_empty() {
            lines.writer = false;
            return;
        }
        lines.write();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What the count of files done counts (the total counts the same: uploads, copies, moves and
/// downloads of files).
fn counts_as_file(what: &str) -> bool {
    matches!(what, "uploaded" | "downloaded" | "copied" | "moved")
}

/// `path`, cut to at most `max` characters by dropping its start (`…` marks the cut).
pub fn short_name(path: &str, max: usize) -> String {
    let n = path.chars().count();
    if n <= max {
        return path.to_string();
    }
    let keep: String = path.chars().skip(n - max.saturating_sub(1)).collect();
    format!("…{keep}")
}

/// Which parts of the overall bar fit a terminal `width` columns wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The bar's width, if it is shown.
    pub bar: Option<usize>,
    /// `12.3 MiB/1.2 GiB`.
    pub bytes: bool,
    /// `3.0 MiB/s`.
    pub rate: bool,
}

/// The widest each part renders: ` 100%`, `1023.9 MiB/1023.9 MiB`, `1023.9 MiB/s`, ` ETA 99h59m`,
/// the files count (`99999/99999 files`) and the spaces between them.
const W_PERCENT: usize = 4;
const W_BYTES: usize = 21;
const W_RATE: usize = 12;
const W_ETA: usize = 4 + ETA_WIDTH;
const W_COUNT: usize = 17;
/// Room left for the file name at least, when the bar can shrink for it.
const MIN_NAME: usize = 12;

impl Layout {
    /// The most columns the fixed parts take (the name after them is cut to what is left).
    pub fn fixed_width(&self) -> usize {
        let mut w = W_PERCENT + 1 + W_COUNT + 1 + W_ETA + 1;
        if let Some(b) = self.bar {
            w += b + 1;
        }
        if self.bytes {
            w += W_BYTES + 1;
        }
        if self.rate {
            w += W_RATE + 1;
        }
        w
    }
}

/// The richest layout whose fixed parts fit in `width - 1` columns (a line as wide as the
/// terminal wraps on some of them), the bar from 10 to 30 columns.
pub fn layout(width: usize) -> Layout {
    let room = width.saturating_sub(1);
    for (bytes, rate) in [(true, true), (false, true), (false, false)] {
        let l = Layout { bar: None, bytes, rate };
        let left = room.saturating_sub(l.fixed_width() + 1 + MIN_NAME);
        if left >= 10 {
            return Layout { bar: Some(left.min(30)), ..l };
        }
    }
    Layout { bar: None, bytes: false, rate: false }
}

/// The indicatif template of a layout.
pub fn template(l: Layout) -> String {
    let mut t = String::new();
    if let Some(b) = l.bar {
        let _ = write!(t, "{{bar:{b}.cyan/blue}} ");
    }
    t.push_str("{percent:>3}% ");
    if l.bytes {
        t.push_str("{bytes}/{total_bytes} ");
    }
    if l.rate {
        t.push_str("{smooth_rate} ");
    }
    t.push_str("ETA {smooth_eta} {prefix} {wide_msg}");
    t
}

/// A rate smoothed exponentially over about [`TAU`]: the ETA's base.
#[derive(Debug, Clone)]
pub struct Estimator {
    tau: f64,
    start: Option<Instant>,
    last: Option<(Instant, u64)>,
    rate: Option<f64>,
}

impl Estimator {
    pub fn new(tau: Duration) -> Self {
        Estimator { tau: tau.as_secs_f64(), start: None, last: None, rate: None }
    }

    /// `pos` bytes were done at `now`. Samples closer than 250 ms to the last one wait for the
    /// next (a burst of small files would otherwise be a burst of huge rates).
    pub fn record(&mut self, now: Instant, pos: u64) {
        let Some((t, p)) = self.last else {
            self.start = Some(now);
            self.last = Some((now, pos));
            return;
        };
        let dt = now.saturating_duration_since(t).as_secs_f64();
        if dt < 0.25 {
            return;
        }
        let sample = pos.saturating_sub(p) as f64 / dt;
        // While less than TAU has passed, the plain average since the start (weight dt / elapsed)
        // is the better estimate: the first sample alone would decide for far too long.
        let elapsed = self.start.map_or(dt, |s| now.saturating_duration_since(s).as_secs_f64());
        let alpha = (1.0 - (-dt / self.tau).exp()).max(dt / elapsed.max(dt));
        self.rate = Some(match self.rate {
            None => sample,
            Some(r) => r + alpha * (sample - r),
        });
        self.last = Some((now, pos));
    }

    /// Bytes per second, once known.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// The time left for `remaining` bytes at the smoothed rate.
    pub fn eta(&self, remaining: u64) -> Option<Duration> {
        match self.rate {
            _ if remaining == 0 => Some(Duration::ZERO),
            Some(r) if r > 0.0 => Duration::try_from_secs_f64(remaining as f64 / r).ok(),
            _ => None,
        }
    }
}

/// Columns an ETA takes at most: `99h59m`.
const ETA_WIDTH: usize = 6;

/// `42s`, `3m07s`, `2h05m`; `?` while unknown; at most [`ETA_WIDTH`] columns.
pub fn format_eta(d: Option<Duration>) -> String {
    let Some(d) = d else { return "?".into() };
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..360_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => ">99h".into(),
    }
}

#[derive(Clone, Copy)]
enum Shown {
    Eta,
    Rate,
}

/// An indicatif key (`{smooth_eta}`, `{smooth_rate}`) backed by an [`Estimator`].
#[derive(Clone)]
struct Smoothed {
    est: Estimator,
    shown: Shown,
}

impl Smoothed {
    fn new(shown: Shown) -> Self {
        Smoothed { est: Estimator::new(TAU), shown }
    }
}

impl indicatif::style::ProgressTracker for Smoothed {
    fn clone_box(&self) -> Box<dyn indicatif::style::ProgressTracker> {
        Box::new(self.clone())
    }

    fn tick(&mut self, state: &ProgressState, now: Instant) {
        self.est.record(now, state.pos());
    }

    fn reset(&mut self, _: &ProgressState, _: Instant) {
        self.est = Estimator::new(TAU);
    }

    fn write(&self, state: &ProgressState, w: &mut dyn std::fmt::Write) {
        let _ = match self.shown {
            Shown::Eta => {
                let left = state.len().unwrap_or(0).saturating_sub(state.pos());
                w.write_str(&format_eta(self.est.eta(left)))
            }
            Shown::Rate => match self.est.rate() {
                Some(r) => write!(w, "{}/s", crate::sync::report::human(r as u64)),
                None => w.write_str("?/s"),
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overall_bar_fits_every_width_and_is_richest_when_it_can_be() {
        // Below 35 columns even the bare percentage, ETA and count wrap.
        for width in 35..=300 {
            let l = layout(width);
            assert!(l.fixed_width() < width, "{width}: {l:?} takes {} columns", l.fixed_width());
            if let Some(b) = l.bar {
                assert!((10..=30).contains(&b), "{width}: {l:?}");
            }
            let t = template(l);
            assert!(t.contains("{percent:>3}%") && t.contains("{wide_msg}"), "{t}");
        }
        assert_eq!(layout(80), Layout { bar: Some(19), bytes: false, rate: true });
        assert_eq!(layout(200), Layout { bar: Some(30), bytes: true, rate: true });
        assert_eq!(layout(60), Layout { bar: Some(12), bytes: false, rate: false });
        assert_eq!(layout(30), Layout { bar: None, bytes: false, rate: false });
    }

    /// Lines that come fast are written together, and what waits is written within a moment
    /// without a flush (a `-v` push whose small files are done before a long upload).
    #[test]
    fn per_file_lines_that_wait_are_written_soon() {
        let p = Progress::with(Settings { verbose: true, ..Settings::default() });
        let out = Arc::new(Mutex::new(Vec::new()));
        p.lines.lock().unwrap().to = Some(out.clone());
        let written = || String::from_utf8(out.lock().unwrap().clone()).unwrap();
        p.file_done("a.txt", "uploaded");
        p.file_done("b.txt", "uploaded");
        p.file_done("c.txt", "uploaded");
        assert_eq!(written(), "uploaded a.txt\n", "the first line goes at once, the next ones wait");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while written().lines().count() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(written(), "uploaded a.txt\nuploaded b.txt\nuploaded c.txt\n");
    }

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(short_name("a/b.txt", 40), "a/b.txt");
        let long = format!("{}/photo.jpg", "deep/".repeat(20));
        let s = short_name(&long, 20);
        assert_eq!(s.chars().count(), 20);
        assert!(s.starts_with('…') && s.ends_with("/photo.jpg"), "{s}");
        assert_eq!(short_name("ééééé", 3).chars().count(), 3);
    }

    #[test]
    fn the_eta_of_a_steady_transfer_is_right() {
        let t0 = Instant::now();
        let mut e = Estimator::new(TAU);
        for i in 0..=20u64 {
            e.record(t0 + Duration::from_secs(i), i * 1_000_000);
        }
        let eta = e.eta(60_000_000).unwrap().as_secs_f64();
        assert!((eta - 60.0).abs() < 0.5, "{eta}");
        assert_eq!(format_eta(Some(Duration::from_secs(125))), "2m05s");
        assert_eq!(format_eta(Some(Duration::from_secs(7500))), "2h05m");
        assert_eq!(format_eta(None), "?");
    }

    /// The case from the issue: a slow first stretch (scanning, the handshake, small files),
    /// then the real rate. A 2-minute job must not say 8 minutes for long, and a jittery link
    /// must not make the ETA jump about.
    #[test]
    fn the_eta_rides_over_a_slow_start_and_jitter() {
        let t0 = Instant::now();
        let mut e = Estimator::new(TAU);
        let total = 120_000_000u64; // 2 min at 1 MB/s
        let mut pos = 0u64;
        let mut etas = Vec::new();
        for tenth in 0..=1200u64 {
            let now = t0 + Duration::from_millis(tenth * 100);
            // 5 s at a tenth of the rate, then 1 MB/s in bursts: 3 MB/s one second, nothing the next two.
            let rate = if tenth < 50 {
                100_000
            } else if (tenth / 10) % 3 == 0 {
                3_000_000
            } else {
                0
            };
            pos = (pos + rate / 10).min(total);
            e.record(now, pos);
            if tenth >= 300 && tenth % 10 == 0 && pos < total {
                let left = e.eta(total - pos).unwrap().as_secs_f64();
                let truth = (total - pos) as f64 / 1_000_000.0;
                etas.push((tenth, left, truth));
            }
        }
        for (tenth, left, truth) in &etas {
            // Within 30% (+3 s) of the truth from 30 s in; indicatif's short window swings far wider.
            assert!(
                (left - truth).abs() <= truth * 0.3 + 3.0,
                "at {} s: said {left:.0} s, truth {truth:.0} s",
                tenth / 10
            );
        }
        // A raw 1-second window would say 0 or 3x; the smoothed rate stays near 1 MB/s.
        let r = e.rate().unwrap();
        assert!((0.6e6..1.5e6).contains(&r), "{r}");
    }
}
