//! The log on stderr: which events (`serve --log-level`, `-v`, `RUST_LOG`), in which form (text or
//! one JSON object per line), with colour only on a terminal.
//!
//! Precedence: `--log-level` (or `serve -v`, which is `--log-level debug`) on the command line,
//! then `RUST_LOG` (tracing's `EnvFilter` syntax, e.g. `info` or `deltasync=debug,rustls=warn`),
//! then `info`. The command line wins because it is the most specific thing an operator typed; a
//! `RUST_LOG` left in an environment must not undo it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How events are written (`serve --log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `TIME LEVEL message key=value…`, one event per line.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `message` and the event's fields.
    Json,
}

/// Where the filter came from, for [`filter`]'s caller to report a bad `RUST_LOG`.
#[derive(Debug)]
pub struct Choice {
    pub filter: EnvFilter,
    /// Set when `RUST_LOG` was given but could not be used (its text and why).
    pub ignored_env: Option<String>,
}

/// What is logged when neither the command line nor `RUST_LOG` says: `info`, but the file
/// watcher's library only from `warn` (it says at INFO that it could not drop the watch of a
/// folder the kernel had already dropped: a line per deleted folder, even under `watch -q`).
const DEFAULT: &str = "info,notify=warn";

/// The filter: `level` from the command line if given, else `env` (the text of `RUST_LOG`),
/// else [`DEFAULT`].
pub fn filter(level: Option<tracing::Level>, env: Option<&str>) -> Choice {
    if let Some(l) = level {
        return Choice { filter: EnvFilter::new(l.as_str()), ignored_env: None };
    }
    match env.map(str::trim).filter(|s| !s.is_empty()) {
        Some(text) => match EnvFilter::builder().parse(text) {
            Ok(f) => Choice { filter: f, ignored_env: None },
            Err(e) => Choice {
                filter: EnvFilter::new(DEFAULT),
                ignored_env: Some(format!("RUST_LOG={text:?}: {e}")),
            },
        },
        None => Choice { filter: EnvFilter::new(DEFAULT), ignored_env: None },
    }
}

/// Colour codes only when stderr is a terminal and `NO_COLOR` is not set (<https://no-color.org>):
/// a log file or the journal gets plain text.
pub fn use_colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the process's log subscriber, writing to stderr. Call once, first thing.
pub fn init(level: Option<tracing::Level>, format: Format) {
    let env = std::env::var("RUST_LOG").ok();
    let Choice { filter, ignored_env } = self::filter(level, env.as_deref());
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_target(false);
    match format {
        Format::Text => builder.with_ansi(use_colour()).init(),
        // Flattened: the event's fields sit beside `message`, so `jq 'select(.account == "alice")'` works.
        Format::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
    if let Some(bad) = ignored_env {
        tracing::warn!("ignoring {bad}; logging at info (give a level like `info` or `deltasync=debug`)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(c: &Choice) -> String {
        c.filter.to_string()
    }

    #[test]
    fn the_command_line_wins_over_rust_log() {
        let c = filter(Some(tracing::Level::WARN), Some("debug"));
        assert_eq!(shown(&c), "warn");
        assert!(c.ignored_env.is_none());
    }

    #[test]
    fn rust_log_wins_over_the_default() {
        assert_eq!(shown(&filter(None, Some("deltasync=debug"))), "deltasync=debug");
        assert_eq!(shown(&filter(None, None)), "notify=warn,info");
        assert_eq!(shown(&filter(None, Some("  "))), "notify=warn,info");
    }

    #[test]
    fn a_bad_rust_log_is_reported_and_info_used() {
        let c = filter(None, Some("deltasync=loud"));
        assert_eq!(shown(&c), "notify=warn,info");
        assert!(c.ignored_env.is_some_and(|t| t.contains("deltasync=loud")), "not reported");
    }
}
