//! `ackgate top`: a live terminal view of a running relay (ratatui), from `/api/status` once
//! a second: in and out rates with the last minute, queue depth and oldest age, one row per
//! node. `q`, Esc or Ctrl-C quits.
//!
//! Three parts that never wait on each other: a tokio task polls the admin API (each request
//! has the client's deadline), a plain thread reads keys (crossterm's reads block), and the
//! loop here redraws on either. A relay that stops answering therefore never delays `q`. The
//! terminal is restored on every way out: return, error, panic (ratatui's hook) or SIGTERM.
//! Drawing is [`view`], pure and unit-tested.

mod view;

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::{cursor, execute};
use ratatui::DefaultTerminal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::admin::client::{AdminClient, ClientError};
use crate::admin::status::Status;
use crate::clock::now_ms;
use crate::config::Config;
use view::Screen;

/// How often the relay is asked, and the screen redrawn.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the key thread waits for a key before it checks whether it is still wanted.
const KEY_POLL: Duration = Duration::from_millis(100);

/// Why `ackgate top` stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("`ackgate top` needs a terminal on stdout (scripts: `ackgate status`)")]
    NotATerminal,
    #[error("the terminal failed: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("cannot handle SIGTERM: {0}")]
    Signal(std::io::Error),
}

/// Run until `q`. The first poll must answer: a relay that is down is an error (exit 1),
/// not an empty screen.
pub async fn run(config: &Config, path: &Path) -> Result<(), TopError> {
    let client = AdminClient::from_config(config, path)?;
    let status = fetch(&client).await?;
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let mut screen = Screen::new(status, now_ms(), client.address().to_string());
    let mut terminate = signal(SignalKind::terminate()).map_err(TopError::Signal)?;
    // Declared before the terminal: dropped after it, once it has shown the cursor again.
    let _restore = Restore;
    let mut terminal = ratatui::try_init()?;
    let (poller, mut polls) = spawn_poller(client);
    let mut keys = spawn_key_reader();
    let result = tokio::select! {
        result = show(&mut terminal, &mut screen, &mut polls, &mut keys) => result,
        _ = terminate.recv() => Ok(()),
    };
    poller.abort();
    result
}

/// Redraw on every poll, key and second (ages on screen move while a poll hangs) until a
/// quit key.
async fn show(
    terminal: &mut DefaultTerminal,
    screen: &mut Screen,
    polls: &mut mpsc::Receiver<Result<Status, String>>,
    keys: &mut mpsc::Receiver<Input>,
) -> Result<(), TopError> {
    let mut redraw = tokio::time::interval(REFRESH);
    loop {
        screen.now_ms = now_ms();
        terminal.draw(|frame| view::draw(frame, screen))?;
        tokio::select! {
            key = keys.recv() => match key {
                Some(Input::Quit) | None => return Ok(()),
                Some(Input::Redraw) => {}
                Some(Input::Failed(e)) => return Err(e.into()),
            },
            Some(poll) = polls.recv() => match poll {
                Ok(status) => screen.update(status, now_ms()),
                Err(e) => screen.error = Some(e),
            },
            _ = redraw.tick() => {}
        }
    }
}

async fn fetch(client: &AdminClient) -> Result<Status, TopError> {
    Ok(client.status().await?)
}

/// Poll once a second, from one second on (`run` made the first poll); a failure is passed
/// on as its message and polling goes on. Ends when the receiver is gone.
fn spawn_poller(client: AdminClient) -> (JoinHandle<()>, mpsc::Receiver<Result<Status, String>>) {
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        let start = tokio::time::Instant::now() + REFRESH;
        let mut ticks = tokio::time::interval_at(start, REFRESH);
        // After a slow answer, wait a full second again instead of catching up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let poll = fetch(&client).await.map_err(|e| e.to_string());
            if tx.send(poll).await.is_err() {
                return;
            }
        }
    });
    (task, rx)
}

/// What the key thread reports.
enum Input {
    Quit,
    /// The terminal was resized (or something else worth a redraw).
    Redraw,
    Failed(std::io::Error),
}

/// crossterm's `poll`/`read` block, so they run on their own thread, never on the runtime.
/// The thread ends within [`KEY_POLL`] of the receiver being dropped.
fn spawn_key_reader() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        while !tx.is_closed() {
            let input = match read_input() {
                Ok(Some(input)) => input,
                Ok(None) => continue,
                Err(e) => Input::Failed(e),
            };
            let failed = matches!(input, Input::Failed(_));
            if tx.blocking_send(input).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// The next input worth reporting, or `None` after [`KEY_POLL`] without one.
fn read_input() -> std::io::Result<Option<Input>> {
    if !event::poll(KEY_POLL)? {
        return Ok(None);
    }
    Ok(match event::read()? {
        Event::Key(key) if is_quit(&key) => Some(Input::Quit),
        Event::Resize(..) => Some(Input::Redraw),
        _ => None,
    })
}

/// `q`, Esc, or Ctrl-C (raw mode turns Ctrl-C into a key instead of SIGINT).
fn is_quit(key: &KeyEvent) -> bool {
    if key.kind != KeyEventKind::Press {
        return false;
    }
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => true,
        KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// Leaves raw mode and the alternate screen and shows the cursor when dropped: on return and
/// on error. A panic is covered by the hook `ratatui::try_init` installs (and by this drop as
/// the stack unwinds; restoring twice is harmless).
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = execute!(std::io::stdout(), cursor::Show);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quit_keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!is_quit(&release));
    }
}
