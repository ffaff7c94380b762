//! What people see while deltasync works: indicatif bars on a terminal, one log line per file
//! with `-v` otherwise, nothing with `--no-progress`. indicatif is used only here.

use std::collections::HashMap;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Files at least this large get a bar of their own while in flight.
const OWN_BAR_FROM: u64 = 8 << 20;

pub enum Mode {
    Bars,
    Log,
    Quiet,
}

pub struct Progress {
    mode: Mode,
    multi: Option<MultiProgress>,
    overall: Mutex<Option<ProgressBar>>,
    files: Mutex<HashMap<String, ProgressBar>>,
    done: std::sync::atomic::AtomicU64,
    total_files: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// Bars when asked for and stderr is a terminal; log lines with `verbose`; else quiet.
    pub fn new(bars: bool, verbose: bool) -> Self {
        use std::io::IsTerminal;
        let mode = if bars && std::io::stderr().is_terminal() {
            Mode::Bars
        } else if verbose {
            Mode::Log
        } else {
            Mode::Quiet
        };
        let multi =
            matches!(mode, Mode::Bars).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress {
            mode,
            multi,
            overall: Mutex::default(),
            files: Mutex::default(),
            done: Default::default(),
            total_files: Default::default(),
        }
    }

    /// Sets the size of the whole transfer; shows the overall bar.
    pub fn start(&self, files: u64, bytes: u64) {
        self.done.store(0, std::sync::atomic::Ordering::Relaxed);
        self.total_files.store(files, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = &self.multi {
            if bytes == 0 {
                return;
            }
            let pb = m.add(ProgressBar::new(bytes));
            pb.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(format!("0/{files} files"));
            *self.overall.lock().unwrap_or_else(|p| p.into_inner()) = Some(pb);
        }
    }

    pub fn file_started(&self, path: &str, size: u64) {
        if let (Some(m), true) = (&self.multi, size >= OWN_BAR_FROM) {
            let pb = m.add(ProgressBar::new(size));
            pb.set_style(
                ProgressStyle::with_template("  {wide_msg} {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(path.to_string());
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
        let n = self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        match self.mode {
            Mode::Log => eprintln!("{what} {path}"),
            Mode::Bars => {
                if let Some(pb) = self.files.lock().unwrap_or_else(|p| p.into_inner()).remove(path) {
                    pb.finish_and_clear();
                }
                if let Some(o) = &*self.overall.lock().unwrap_or_else(|p| p.into_inner()) {
                    let t = self.total_files.load(std::sync::atomic::Ordering::Relaxed);
                    o.set_message(format!("{n}/{t} files"));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// A line that must be seen whatever the mode (conflicts, warnings).
    pub fn say(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(o) = self.overall.lock().unwrap_or_else(|p| p.into_inner()).take() {
            o.finish_and_clear();
        }
    }
}
