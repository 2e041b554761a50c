//! Logging setup: `--log-level`, else `RUST_LOG`, else `info`. One line per
//! event, colours only on a terminal, so the output suits journald.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How the daemon hands its log filter to the workers it starts.
pub const FILTER_ENV: &str = "GASPARD_WORKER_LOG";

/// Initialises logging; returns the filter in effect, for the workers.
pub fn init(level: Option<log::LevelFilter>) -> String {
    let filter = match level {
        Some(level) => level.to_string().to_lowercase(),
        None => std::env::var("RUST_LOG")
            .ok()
            .filter(|f| !f.trim().is_empty())
            .unwrap_or_else(|| "info".to_string()),
    };
    init_with(&filter);
    filter
}

/// Initialises a worker's logging from the daemon's filter.
pub fn init_worker() {
    let filter = std::env::var(FILTER_ENV).unwrap_or_else(|_| "info".to_string());
    init_with(&filter);
}

fn init_with(filter: &str) {
    let style = if std::io::stderr().is_terminal() {
        env_logger::WriteStyle::Auto
    } else {
        env_logger::WriteStyle::Never
    };
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(filter)
        .write_style(style)
        .format_target(false);
    // Under systemd, journald stamps each line itself and reads the level
    // from a syslog priority prefix.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| {
            use std::io::Write;
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        });
    }
    builder.init();
}

/// Keeps a flood of one kind of warning (one per refused client under
/// overload, say) to one line a second. The lines held back are not lost:
/// once the second is over, the last of them is logged with their count,
/// "MESSAGE (N more like it in the last S s)". That count is only honest
/// if the lines are alike, so a Throttle is for one kind of message; a
/// caller with several kinds keeps one Throttle each.
///
/// Time is passed in, so that an event loop can use the instant it already
/// has, and tests a fake clock. The loop calls [`Throttle::flush`] when
/// [`Throttle::next_flush`] comes, so the count is logged even if no
/// further warning does.
#[derive(Debug, Default)]
pub struct Throttle {
    /// When the last line, plain or summary, was logged.
    last_line: Option<Instant>,
    held: Option<Held>,
}

/// The lines held back since the last one logged.
#[derive(Debug)]
struct Held {
    /// The latest of them, the one a summary shows.
    message: String,
    count: u64,
    /// When the latest of them came.
    latest: Instant,
}

impl Throttle {
    /// At most one line per window.
    pub const WINDOW: Duration = Duration::from_secs(1);

    /// Logs `message` as a warning, or holds it back to be counted.
    pub fn warn(&mut self, now: Instant, message: std::fmt::Arguments<'_>) {
        for line in self.lines_for(now, message) {
            log::warn!("{line}");
        }
    }

    /// Logs the summary of the lines held back, if the window is over.
    pub fn flush(&mut self, now: Instant) {
        if let Some(line) = self.summary_due(now) {
            log::warn!("{line}");
        }
    }

    /// When [`Throttle::flush`] has a summary to log; `None` when nothing
    /// is held back.
    pub fn next_flush(&self) -> Option<Instant> {
        let last_line = self.last_line?;
        self.held.as_ref().map(|_| last_line + Self::WINDOW)
    }

    /// What [`Throttle::warn`] logs for `message` (none, one or two lines).
    fn lines_for(&mut self, now: Instant, message: std::fmt::Arguments<'_>) -> Vec<String> {
        // A summary still due goes first (the loop was late to flush); the
        // new message then falls in the window that summary opened.
        let mut lines: Vec<String> = self.summary_due(now).into_iter().collect();
        if self.in_window(now) {
            let held = self.held.get_or_insert(Held {
                message: String::new(),
                count: 0,
                latest: now,
            });
            // Under a flood this runs for every line held back: the text
            // goes into the same buffer each time.
            held.message.clear();
            let _ = std::fmt::Write::write_fmt(&mut held.message, message);
            held.count += 1;
            held.latest = now;
        } else {
            lines.push(message.to_string());
            self.last_line = Some(now);
        }
        lines
    }

    /// The summary of the lines held back, once the window is over; taking
    /// it opens the next window.
    fn summary_due(&mut self, now: Instant) -> Option<String> {
        if self.held.is_none() || self.in_window(now) {
            return None;
        }
        let held = self.held.take()?;
        // From the line before them to the latest of them (not to now: a
        // late flush must not stretch the span), rounded up, so that every
        // line counted came within the seconds named.
        let span = self.last_line.map_or(Duration::ZERO, |last| {
            held.latest.saturating_duration_since(last)
        });
        let seconds = span.as_millis().div_ceil(1000).max(1);
        self.last_line = Some(now);
        Some(format!(
            "{} ({} more like it in the last {seconds} s)",
            held.message, held.count
        ))
    }

    /// Whether a line logged now would be within a window of the last.
    fn in_window(&self, now: Instant) -> bool {
        self.last_line
            .is_some_and(|last| now.saturating_duration_since(last) < Self::WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn held_back_lines_are_counted_with_the_last_of_them_once_the_window_is_over() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        assert_eq!(
            throttle.lines_for(start, format_args!("refused client 1")),
            ["refused client 1"]
        );
        assert_eq!(throttle.next_flush(), None, "nothing held back yet");
        for n in 2..=5 {
            let none = throttle.lines_for(at(start, 100 * n), format_args!("refused client {n}"));
            assert!(none.is_empty(), "{none:?}");
        }
        assert_eq!(throttle.next_flush(), Some(at(start, 1000)));
        assert_eq!(throttle.summary_due(at(start, 999)), None, "too early");
        assert_eq!(
            throttle.summary_due(at(start, 1000)).as_deref(),
            Some("refused client 5 (4 more like it in the last 1 s)")
        );
        assert_eq!(throttle.summary_due(at(start, 5000)), None, "reported once");
        assert_eq!(throttle.next_flush(), None);
    }

    #[test]
    fn a_quiet_spell_lets_the_next_line_through_unchanged() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        assert_eq!(throttle.lines_for(start, format_args!("a")).len(), 1);
        assert_eq!(
            throttle.lines_for(at(start, 1000), format_args!("b")),
            ["b"],
            "nothing was held back, so no count"
        );
        assert_eq!(throttle.next_flush(), None);
    }

    #[test]
    fn a_flush_a_moment_late_still_names_the_second_the_lines_came_in() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        throttle.lines_for(start, format_args!("first"));
        throttle.lines_for(at(start, 999), format_args!("held"));
        assert_eq!(
            throttle.summary_due(at(start, 1001)).as_deref(),
            Some("held (1 more like it in the last 1 s)")
        );
    }

    #[test]
    fn a_late_flush_comes_before_the_next_line_and_names_its_own_message() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        throttle.lines_for(start, format_args!("first"));
        throttle.lines_for(at(start, 10), format_args!("held"));
        // No flush at 1 s; the next warning comes at 2.5 s.
        assert_eq!(
            throttle.lines_for(at(start, 2500), format_args!("later")),
            ["held (1 more like it in the last 1 s)"],
            "the count goes with the message held back, not the new one"
        );
        // The new one is held in the window that the summary opened.
        assert_eq!(throttle.next_flush(), Some(at(start, 3500)));
        assert_eq!(
            throttle.summary_due(at(start, 3500)).as_deref(),
            Some("later (1 more like it in the last 1 s)")
        );
    }

    #[test]
    fn a_steady_flood_gives_one_line_per_window() {
        let start = Instant::now();
        let mut throttle = Throttle::default();
        let mut logged = Vec::new();
        for ms in (0..3000).step_by(10) {
            let now = at(start, ms);
            if throttle.next_flush().is_some_and(|due| due <= now) {
                logged.extend(throttle.summary_due(now));
            }
            logged.extend(throttle.lines_for(now, format_args!("at {ms}")));
        }
        logged.extend(throttle.summary_due(at(start, 3000)));
        // 300 warnings: 1 logged as it came, 99 + 100 + 100 counted.
        assert_eq!(
            logged,
            [
                "at 0",
                "at 990 (99 more like it in the last 1 s)",
                "at 1990 (100 more like it in the last 1 s)",
                "at 2990 (100 more like it in the last 1 s)",
            ]
        );
    }
}
