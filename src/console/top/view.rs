//! The pure half of `ackgate top`: one [`Screen`] (the last status read, the last poll's
//! error) drawn into a ratatui frame. No terminal, clock or socket here, so the unit tests
//! render a known status into a `TestBackend` and read the text back.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

use crate::admin::rates::Rate;
use crate::admin::status::{NodeStatus, Status};
use crate::console::status::{bytes, count, duration, rate};

/// Attention lines shown; the table keeps the rest of the screen (`ackgate status` lists all).
const MAX_ATTENTION: usize = 4;
/// Seconds of history the API keeps, so the widest useful sparkline.
const HISTORY: u16 = 60;
/// A status older than this many seconds, with no error to explain it, means the relay has
/// stopped answering (polls go out every second; the client's deadline is 10 s).
const STALE_SECONDS: f64 = 3.0;

/// What is on the screen.
#[derive(Debug, Clone)]
pub struct Screen {
    /// The last status read.
    pub status: Status,
    /// When `status` was read (this host's clock, ms since the epoch).
    pub status_ms: u64,
    /// Why the last poll failed, if it did; `status` is then the last good one.
    pub error: Option<String>,
    /// Now (this host's clock), for the ages of `status_ms` and the last commit.
    pub now_ms: u64,
    /// The admin listener polled, for the status line.
    pub admin: String,
}

impl Screen {
    pub fn new(status: Status, now_ms: u64, admin: String) -> Screen {
        Screen {
            status,
            status_ms: now_ms,
            error: None,
            now_ms,
            admin,
        }
    }

    /// A poll answered.
    pub fn update(&mut self, status: Status, now_ms: u64) {
        self.status = status;
        self.status_ms = now_ms;
        self.error = None;
    }

    fn age_seconds(&self, then_ms: u64) -> f64 {
        self.now_ms.saturating_sub(then_ms) as f64 / 1000.0
    }
}

/// Draw the whole screen into `frame`.
pub fn draw(frame: &mut Frame, screen: &Screen) {
    let header = header_lines(&screen.status);
    let table = screen.status.nodes.len().saturating_add(1);
    let heights = [header.len(), 2, 4, 1, table, 1].map(|h| u16::try_from(h).unwrap_or(u16::MAX));
    // A blank line between sections, unless that would hide node rows.
    let needed = heights
        .iter()
        .fold(heights.len() as u16 - 1, |sum, h| sum.saturating_add(*h));
    let mut constraints = heights.map(Constraint::Length);
    // The table takes what is left, the status line stays at the bottom.
    constraints[4] = Constraint::Min(3);
    let [head, spool, rates, queue, nodes, foot] = Layout::vertical(constraints)
        .spacing(u16::from(frame.area().height >= needed))
        .areas(frame.area());
    frame.render_widget(Paragraph::new(header), head);
    frame.render_widget(Paragraph::new(spool_lines(screen)), spool);
    draw_rates(frame, &screen.status, rates);
    frame.render_widget(Paragraph::new(queue_line(&screen.status)), queue);
    frame.render_widget(node_table(&screen.status.nodes), nodes);
    frame.render_widget(Paragraph::new(footer_line(screen)), foot);
}

fn header_lines(status: &Status) -> Vec<Line<'static>> {
    let verdict = if status.healthy {
        Span::styled("healthy", Style::new().fg(Color::Green).bold())
    } else {
        Span::styled("NEEDS ATTENTION", Style::new().fg(Color::Red).bold())
    };
    let mut lines = vec![Line::from(vec![
        Span::raw(format!(
            "ackgate {} on {}, up {}: ",
            status.version,
            status.ingress.listen,
            duration(status.uptime_seconds)
        )),
        verdict,
    ])];
    let warn = Style::new().fg(Color::Yellow);
    for text in status.attention.iter().take(MAX_ATTENTION) {
        lines.push(Line::styled(format!("  ! {text}"), warn));
    }
    if status.attention.len() > MAX_ATTENTION {
        let more = status.attention.len() - MAX_ATTENTION;
        lines.push(Line::styled(
            format!("  ! … and {more} more (`ackgate status` lists them all)"),
            warn,
        ));
    }
    lines
}

fn spool_lines(screen: &Screen) -> Vec<Line<'static>> {
    let spool = &screen.status.spool;
    let oldest = spool
        .oldest_record_age_seconds
        .map(|s| format!("oldest {} ago", duration(s)))
        .unwrap_or_else(|| "nothing queued".into());
    let commit = match (spool.last_commit_ms, spool.last_commit_duration_seconds) {
        (Some(at), Some(took)) => format!(
            "last commit {} ago ({:.1} ms)",
            duration(screen.age_seconds(at)),
            took * 1000.0
        ),
        _ => "no commit since start".into(),
    };
    let disk = match (spool.available, spool.disk_full) {
        (false, _) => Span::styled("UNAVAILABLE", Style::new().fg(Color::Red).bold()),
        (true, true) => Span::styled("disk FULL", Style::new().fg(Color::Red).bold()),
        (true, false) => Span::raw("disk ok"),
    };
    let dead = format!(
        "{} dead letter(s) ({})",
        count(spool.dead_letters),
        bytes(spool.dead_letter_bytes)
    );
    let dead = if spool.dead_letters > 0 {
        Span::styled(dead, Style::new().fg(Color::Yellow))
    } else {
        Span::raw(dead)
    };
    vec![
        Line::from(format!(
            "spool    {} records, {} of {} ({:.1} %), {oldest}",
            count(spool.records),
            bytes(spool.bytes),
            bytes(spool.max_bytes),
            spool.used_ratio * 100.0
        )),
        Line::from(vec![
            Span::raw(format!("         {commit}, ")),
            dead,
            Span::raw(", "),
            disk,
        ]),
    ]
}

/// In and out: rates as text on the left, the last minute as a sparkline on the right.
fn draw_rates(frame: &mut Frame, status: &Status, area: Rect) {
    let (out_rate, out_history) = outgoing(&status.nodes);
    let [inbound, outbound] =
        Layout::vertical([Constraint::Length(2), Constraint::Length(2)]).areas(area);
    let ingress = &status.ingress;
    draw_direction(
        frame,
        inbound,
        "in",
        &ingress.events_per_second,
        &ingress.events_history,
        Color::Cyan,
    );
    draw_direction(
        frame,
        outbound,
        "out",
        &out_rate,
        &out_history,
        Color::Magenta,
    );
}

fn draw_direction(
    frame: &mut Frame,
    area: Rect,
    label: &str,
    per_second: &Rate,
    history: &[u64],
    color: Color,
) {
    let [text, chart] =
        Layout::horizontal([Constraint::Length(48), Constraint::Max(HISTORY)]).areas(area);
    let peak = history.iter().copied().max().unwrap_or(0);
    let lines = vec![
        Line::from(vec![
            Span::styled(format!("{label:<4}"), Style::new().fg(color).bold()),
            Span::raw(format!(
                "ev/s  1s {}  10s {}  60s {}",
                rate(per_second.last_1s),
                rate(per_second.last_10s),
                rate(per_second.last_60s)
            )),
        ]),
        Line::from(format!(
            "     last {} s, peak {}/s",
            history.len(),
            count(peak)
        )),
    ];
    frame.render_widget(Paragraph::new(lines), text);
    // The newest seconds: the sparkline draws from the left and stops at its width.
    let shown = history.len().saturating_sub(usize::from(chart.width));
    frame.render_widget(
        Sparkline::default()
            .data(&history[shown..])
            .max(peak.max(1))
            .style(Style::new().fg(color)),
        chart,
    );
}

/// The sum of the nodes' rates and histories. Histories are aligned on their newest second:
/// a node added later has a shorter one.
fn outgoing(nodes: &[NodeStatus]) -> (Rate, Vec<u64>) {
    let mut total = Rate::default();
    let len = nodes
        .iter()
        .map(|n| n.events_history.len())
        .max()
        .unwrap_or(0);
    let mut history = vec![0u64; len];
    for node in nodes {
        total.last_1s += node.events_per_second.last_1s;
        total.last_10s += node.events_per_second.last_10s;
        total.last_60s += node.events_per_second.last_60s;
        let offset = len - node.events_history.len();
        for (sum, n) in history[offset..].iter_mut().zip(&node.events_history) {
            *sum = sum.saturating_add(*n);
        }
    }
    (total, history)
}

fn queue_line(status: &Status) -> Line<'static> {
    let q = &status.queue;
    Line::from(format!(
        "queue    {} in flight, {} waiting for a retry, {} read ahead",
        count(q.in_flight),
        count(q.waiting_retry),
        count(q.buffered)
    ))
}

/// Column titles and widths; the last error takes what is left.
const COLUMNS: [(&str, u16); 10] = [
    ("node", 14),
    ("address", 21),
    ("state", 7),
    ("since", 7),
    ("in flight", 9),
    ("acked ev", 11),
    ("ev/s 10s", 8),
    ("retries", 7),
    ("last ack", 9),
    ("last error", 0),
];

fn node_table(nodes: &[NodeStatus]) -> Table<'static> {
    let header = Row::new(COLUMNS.iter().enumerate().map(|(i, (title, _))| {
        if (4..9).contains(&i) {
            Cell::from(Line::from(*title).right_aligned())
        } else {
            Cell::from(*title)
        }
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let widths = COLUMNS.iter().map(|&(_, width)| match width {
        0 => Constraint::Fill(1),
        w => Constraint::Length(w),
    });
    Table::new(nodes.iter().map(node_row), widths).header(header)
}

fn node_row(n: &NodeStatus) -> Row<'static> {
    let state = match (n.available, n.standby) {
        (true, false) => Span::styled("up", Style::new().fg(Color::Green)),
        (true, true) => Span::styled("standby", Style::new().fg(Color::Yellow)),
        (false, _) => Span::styled("DOWN", Style::new().fg(Color::Red).bold()),
    };
    let number = |s: String| Cell::from(Line::from(s).right_aligned());
    Row::new(vec![
        Cell::from(n.name.clone()),
        Cell::from(n.address.clone()),
        Cell::from(state),
        Cell::from(duration(n.since_seconds)),
        number(n.in_flight.to_string()),
        number(count(n.acked_events)),
        number(rate(n.events_per_second.last_10s)),
        number(count(n.retries)),
        number(
            n.last_ack_age_seconds
                .map(|s| format!("{} ago", duration(s)))
                .unwrap_or_else(|| "never".into()),
        ),
        Cell::from(n.last_error.clone().unwrap_or_else(|| "-".into())),
    ])
}

fn footer_line(screen: &Screen) -> Line<'static> {
    let age = screen.age_seconds(screen.status_ms);
    if let Some(error) = &screen.error {
        return Line::styled(
            format!(
                "poll failed: {error} (showing the status of {} ago; still polling)  q quit",
                duration(age)
            ),
            Style::new().fg(Color::Red).bold(),
        );
    }
    if age > STALE_SECONDS {
        return Line::styled(
            format!(
                "no fresh status from {} for {} (still waiting)  q quit",
                screen.admin,
                duration(age)
            ),
            Style::new().fg(Color::Yellow).bold(),
        );
    }
    Line::from(format!("q quit  polling {} every second", screen.admin)).dim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::status::{IngressStatus, QueueStatus, SpoolStatus};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    const NOW: u64 = 1_700_000_100_000;

    fn node(name: &str, address: &str, available: bool) -> NodeStatus {
        NodeStatus {
            name: name.into(),
            address: address.into(),
            weight: 1,
            standby: false,
            available,
            since_ms: NOW - 90_000,
            since_seconds: 90.0,
            down_reason: (!available).then(|| "connection refused".into()),
            last_error: (!available).then(|| "connection refused".into()),
            connected: available,
            in_flight: if available { 3 } else { 0 },
            acked_chunks: if available { 12 } else { 0 },
            acked_events: if available { 1_234_567 } else { 0 },
            retries: if available { 0 } else { 17 },
            ack_timeouts: 0,
            events_per_second: Rate {
                last_1s: if available { 250.0 } else { 0.0 },
                last_10s: if available { 240.0 } else { 0.0 },
                last_60s: if available { 200.0 } else { 0.0 },
                sampled_seconds: 60,
            },
            events_history: if available {
                vec![100, 200, 300]
            } else {
                vec![0, 0, 0]
            },
            last_ack_ms: available.then_some(NOW - 400),
            last_ack_age_seconds: available.then_some(0.4),
        }
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            now_ms: NOW,
            uptime_seconds: 3725.0,
            healthy: false,
            attention: vec!["node b (127.0.0.1:1) is down since 90 s: connection refused".into()],
            spool: SpoolStatus {
                path: "/var/lib/ackgate/spool.redb".into(),
                records: 42,
                bytes: 3 << 20,
                max_bytes: 1 << 30,
                used_ratio: 3.0 / 1024.0,
                oldest_record_ms: Some(NOW - 5_000),
                oldest_record_age_seconds: Some(5.0),
                dead_letters: 0,
                dead_letter_bytes: 0,
                disk_full: false,
                available: true,
                last_commit_ms: Some(NOW - 200),
                last_commit_age_seconds: Some(0.2),
                last_commit_duration_seconds: Some(0.0021),
                commits: 99,
                reopens: 0,
            },
            queue: QueueStatus {
                in_flight: 3,
                waiting_retry: 2,
                buffered: 7,
            },
            ingress: IngressStatus {
                listen: "127.0.0.1:24224".into(),
                connections_open: 2,
                connections_total: 5,
                requests_accepted: 100,
                events_accepted: 1_234_600,
                bytes_accepted: 99_000,
                acks_sent: 100,
                rejected: Vec::new(),
                events_per_second: Rate {
                    last_1s: 260.0,
                    last_10s: 245.5,
                    last_60s: 7.25,
                    sampled_seconds: 60,
                },
                events_history: vec![5, 10, 400],
                destinations: Vec::new(),
            },
            nodes: vec![
                node("a", "127.0.0.1:24225", true),
                node("b", "127.0.0.1:1", false),
            ],
            lifecycle: Default::default(),
            reload: None,
        }
    }

    fn render(screen: &Screen, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test backend");
        terminal
            .draw(|frame| draw(frame, screen))
            .expect("draw into a test backend");
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect()
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{}", lines.join("\n")))
    }

    fn screen() -> Screen {
        Screen::new(status(), NOW, "127.0.0.1:24231".into())
    }

    #[test]
    fn one_row_per_node_with_its_state_and_counters() {
        let lines = render(&screen(), 120, 30);
        let a = line_with(&lines, "127.0.0.1:24225");
        assert!(a.starts_with("a "), "{a}");
        assert!(a.contains(" up "), "{a}");
        assert!(a.contains("1,234,567"), "{a}");
        assert!(a.contains("240"), "{a}");
        assert!(a.contains("0.4s ago"), "{a}");
        let b = line_with(&lines, "127.0.0.1:1 ");
        assert!(b.contains("DOWN"), "{b}");
        assert!(b.contains("never"), "{b}");
        assert!(b.contains(" 17 "), "{b}");
        assert!(b.contains("connection refused"), "{b}");
        line_with(&lines, "acked ev");
    }

    #[test]
    fn header_spool_rates_and_queue() {
        let lines = render(&screen(), 120, 30);
        let head = line_with(&lines, "ackgate 0.1.0 on 127.0.0.1:24224");
        assert!(head.contains("up 62m 5s: NEEDS ATTENTION"), "{head}");
        line_with(&lines, "! node b (127.0.0.1:1) is down since 90 s");
        line_with(
            &lines,
            "spool    42 records, 3.0 MiB of 1.0 GiB (0.3 %), oldest 5.0s ago",
        );
        line_with(
            &lines,
            "last commit 0.2s ago (2.1 ms), 0 dead letter(s) (0 B), disk ok",
        );
        let inbound = line_with(&lines, "in  ev/s");
        assert!(inbound.contains("1s 260  10s 246  60s 7.2"), "{inbound}");
        // Out is the sum of the nodes.
        let out = line_with(&lines, "out ev/s");
        assert!(out.contains("1s 250  10s 240  60s 200"), "{out}");
        line_with(&lines, "last 3 s, peak 400/s");
        line_with(&lines, "last 3 s, peak 300/s");
        line_with(
            &lines,
            "queue    3 in flight, 2 waiting for a retry, 7 read ahead",
        );
        line_with(&lines, "q quit  polling 127.0.0.1:24231 every second");
    }

    #[test]
    fn a_failed_poll_keeps_the_last_status_and_says_why() {
        let mut screen = screen();
        screen.error = Some("cannot reach ackgate's admin listener".into());
        screen.now_ms = NOW + 12_000;
        let lines = render(&screen, 120, 30);
        line_with(&lines, "1,234,567");
        let foot = line_with(&lines, "poll failed: cannot reach");
        assert!(foot.contains("showing the status of 12s ago"), "{foot}");
        screen.update(status(), NOW + 13_000);
        let lines = render(&screen, 120, 30);
        assert!(!lines.iter().any(|l| l.contains("poll failed")));
    }

    #[test]
    fn a_relay_that_stops_answering_shows_as_stale() {
        let mut screen = screen();
        screen.now_ms = NOW + 4_500;
        let lines = render(&screen, 120, 30);
        line_with(&lines, "no fresh status from 127.0.0.1:24231 for 4.5s");
    }

    #[test]
    fn outgoing_sums_histories_aligned_on_the_newest_second() {
        let mut a = node("a", "x", true);
        a.events_history = vec![1, 2, 3, 4];
        let mut b = node("b", "y", true);
        b.events_history = vec![10, 20];
        let (total, history) = outgoing(&[a, b]);
        assert_eq!(history, vec![1, 2, 13, 24]);
        assert_eq!(total.last_1s, 500.0);
        assert_eq!(outgoing(&[]), (Rate::default(), Vec::new()));
    }

    #[test]
    fn many_attention_lines_leave_room_for_the_nodes() {
        let mut screen = screen();
        screen.status.attention = (0..9).map(|i| format!("problem {i}")).collect();
        let lines = render(&screen, 120, 30);
        line_with(&lines, "! problem 3");
        assert!(!lines.iter().any(|l| l.contains("problem 4")));
        line_with(&lines, "… and 5 more");
        line_with(&lines, "127.0.0.1:1 ");
    }

    #[test]
    fn a_short_terminal_drops_the_blank_lines_before_node_rows() {
        let lines = render(&screen(), 120, 16);
        line_with(&lines, "127.0.0.1:1 ");
        line_with(&lines, "q quit");
    }

    #[test]
    fn a_small_terminal_does_not_panic() {
        for (w, h) in [(20, 5), (1, 1), (80, 10)] {
            render(&screen(), w, h);
        }
    }
}
