//! Core tasks that must not end while ackgate runs: the accept loop, the UDP heartbeat
//! responder, every upstream node (and, apart, the spool writer thread:
//! [`crate::spool::SpoolWriter::died`]). If one ends before shutdown — a panic is a bug, but
//! it must not leave a process that answers /health while nothing flows — `ackgate run`
//! exits non-zero with the reason, so that systemd restarts it (invariant 9). Spooled records
//! are safe on disk across that restart.

use tokio::sync::mpsc;

/// Hands out [`Guard`]s; cheap to clone.
#[derive(Clone)]
pub struct Watchdog {
    deaths: mpsc::UnboundedSender<String>,
}

/// Receives the reason of the first core task that ended unexpectedly.
pub struct Deaths {
    deaths: mpsc::UnboundedReceiver<String>,
    /// Kept so that `next` waits forever, instead of returning, when no guard is alive.
    _keep: mpsc::UnboundedSender<String>,
}

/// Create a watchdog and the receiver of its reports.
pub fn watchdog() -> (Watchdog, Deaths) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Watchdog { deaths: tx.clone() },
        Deaths {
            deaths: rx,
            _keep: tx,
        },
    )
}

impl Watchdog {
    /// A guard for the task named `what`: hold it for the task's whole life, and
    /// [`Guard::disarm`] it when the task ends because it was told to.
    pub fn guard(&self, what: impl Into<String>) -> Guard {
        Guard {
            what: what.into(),
            deaths: self.deaths.clone(),
            armed: true,
        }
    }
}

impl Deaths {
    /// The next report: "<task> panicked" or "<task> stopped".
    pub async fn next(&mut self) -> String {
        match self.deaths.recv().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }
}

/// Reports its task's end when dropped armed: by a panic unwinding through the task, or by the
/// task returning on its own.
pub struct Guard {
    what: String,
    deaths: mpsc::UnboundedSender<String>,
    armed: bool,
}

impl Guard {
    /// The task ended as asked (shutdown): nothing to report.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            let how = if std::thread::panicking() {
                "panicked"
            } else {
                "stopped"
            };
            let _ = self.deaths.send(format!("{} {how}", self.what));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_reported_and_a_disarmed_one_is_not() {
        let (watchdog, mut deaths) = watchdog();
        let calm = watchdog.guard("calm task");
        calm.disarm();
        let guard = watchdog.guard("the accept loop");
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("boom");
        });
        assert!(task.await.is_err());
        let reason = tokio::time::timeout(Duration::from_secs(5), deaths.next())
            .await
            .unwrap();
        assert_eq!(reason, "the accept loop panicked");
        let quiet = tokio::time::timeout(Duration::from_millis(50), deaths.next()).await;
        assert!(quiet.is_err(), "nothing else was reported: {quiet:?}");
    }

    #[tokio::test]
    async fn a_task_that_returns_on_its_own_is_reported_as_stopped() {
        let (watchdog, mut deaths) = watchdog();
        let guard = watchdog.guard("upstream node agg");
        tokio::spawn(async move {
            let _guard = guard;
        })
        .await
        .unwrap();
        assert_eq!(deaths.next().await, "upstream node agg stopped");
    }
}
