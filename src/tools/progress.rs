//! `send`'s progress line: events sent and acked and the rate, redrawn in place on stderr with
//! `\r` at most [`REFRESH`] apart, erased when the send ends (also on an error, from `Drop`, so
//! the error message starts on a clean line). Shown only when stderr is a terminal and the input
//! is large; otherwise every call is a no-op, and nothing reaches a pipe or a test's log.

use std::io::Write;
use std::time::{Duration, Instant};

use super::SendReport;

/// Shortest time between two redraws (5 per second at most).
pub(super) const REFRESH: Duration = Duration::from_millis(200);
/// ANSI "erase to end of line", after `\r`: a shorter line leaves no tail of the previous one.
const ERASE: &str = "\r\x1b[K";

/// The line and when it was last drawn. Disabled when `out` is `None`.
pub(super) struct ProgressLine<W: Write> {
    out: Option<W>,
    started: Instant,
    drawn: Option<Instant>,
}

impl ProgressLine<std::io::Stderr> {
    /// On stderr if `enabled` (the caller checks the terminal and the input size).
    pub(super) fn stderr(enabled: bool) -> Self {
        ProgressLine::new(enabled.then(std::io::stderr), Instant::now())
    }
}

impl<W: Write> ProgressLine<W> {
    fn new(out: Option<W>, started: Instant) -> Self {
        ProgressLine {
            out,
            started,
            drawn: None,
        }
    }

    /// Redraw if the last redraw is at least [`REFRESH`] old.
    pub(super) fn update(&mut self, report: &SendReport) {
        self.update_at(report, Instant::now());
    }

    fn update_at(&mut self, report: &SendReport, now: Instant) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        if self
            .drawn
            .is_some_and(|at| now.saturating_duration_since(at) < REFRESH)
        {
            return;
        }
        let line = render(report, now.saturating_duration_since(self.started));
        // A terminal that cannot be written to only loses the progress line.
        let _ = write!(out, "{ERASE}{line}").and_then(|()| out.flush());
        self.drawn = Some(now);
    }

    /// Erase the line, if one was drawn; later calls do nothing.
    pub(super) fn finish(&mut self) {
        if let (Some(out), Some(_)) = (self.out.as_mut(), self.drawn) {
            let _ = write!(out, "{ERASE}").and_then(|()| out.flush());
        }
        self.out = None;
    }
}

impl<W: Write> Drop for ProgressLine<W> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `12345 events sent, 12000 acked, 4115 events/s`; the rate is over the whole run.
fn render(report: &SendReport, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        report.events as f64 / secs
    } else {
        0.0
    };
    format!(
        "{} events sent, {} acked, {rate:.0} events/s",
        report.events, report.acked_events
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(events: u64, acked_events: u64) -> SendReport {
        SendReport {
            events,
            acked_events,
            ..SendReport::default()
        }
    }

    #[test]
    fn redraws_at_most_five_times_a_second_and_erases_at_the_end() {
        let t0 = Instant::now();
        let mut line = ProgressLine::new(Some(Vec::new()), t0);
        line.update_at(&report(0, 0), t0);
        line.update_at(&report(100, 0), t0 + Duration::from_millis(100));
        line.update_at(&report(400, 200), t0 + Duration::from_secs(2));
        line.update_at(&report(500, 300), t0 + Duration::from_millis(2100));
        let text = String::from_utf8(line.out.clone().unwrap_or_default()).unwrap();
        assert_eq!(
            text,
            "\r\x1b[K0 events sent, 0 acked, 0 events/s\
             \r\x1b[K400 events sent, 200 acked, 200 events/s"
        );
        let mut out = Vec::new();
        {
            let mut line = ProgressLine::new(Some(&mut out), t0);
            line.update_at(&report(1, 1), t0 + Duration::from_secs(1));
            // Dropped without finish (an error path): still erased.
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\r\x1b[K1 events sent, 1 acked, 1 events/s\r\x1b[K"
        );
    }

    #[test]
    fn disabled_or_never_drawn_writes_nothing() {
        let mut line: ProgressLine<Vec<u8>> = ProgressLine::new(None, Instant::now());
        line.update(&report(1, 1));
        line.finish();
        let mut out = Vec::new();
        ProgressLine::new(Some(&mut out), Instant::now()).finish();
        assert!(out.is_empty());
    }
}
