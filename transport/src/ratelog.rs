//! Log lines about bad peers, rate-limited: a flood of bad connections must not flood the log
//! (one line each let a flood write ~90,000 lines in 25 s). A limiter lets a few lines through
//! per window and counts the rest, reported with the next line that goes out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets at most `per_window` lines through per `window`; see the module doc.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    state: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter (const: for a `static`).
    pub const fn new(per_window: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            per_window,
            window,
            state: Mutex::new(Window {
                start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may go out now; Some(n): yes, and n earlier ones were suppressed.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines >= self.per_window {
            w.suppressed += 1;
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.suppressed))
    }

    /// Logs `msg` at WARN if the limiter admits it, with the count of lines suppressed since
    /// the last one that went out.
    pub fn warn(&self, msg: impl std::fmt::Display) {
        match self.admit() {
            Some(0) => log::warn!("{msg}"),
            Some(n) => log::warn!("{msg} ({n} similar lines suppressed)"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gets_a_few_lines_and_a_count() {
        let l = LogLimiter::new(3, Duration::from_millis(200));
        let admitted: Vec<_> = (0..1000).filter_map(|_| l.admit()).collect();
        assert_eq!(admitted, vec![0, 0, 0]);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            l.admit(),
            Some(997),
            "the next window reports what was suppressed"
        );
    }
}
