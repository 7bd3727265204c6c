//! What a worker shows of its own lifecycle (`/api/status`'s `lifecycle`, `ackgate status`):
//! which processes serve, whether reading is crash-safe on this kernel, and what the
//! supervisor last told operators (an upgrade that failed, and why).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Shared by the relay (which records notices) and the admin API (which shows them).
#[derive(Debug)]
pub struct WorkerState {
    pub supervisor_pid: Option<u32>,
    pub worker_pid: u32,
    pub started_ms: u64,
    pub crash_safe_reading: bool,
    notice: Mutex<Option<Notice>>,
}

/// A message from the supervisor, with when it came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub at_ms: u64,
    pub text: String,
}

impl WorkerState {
    pub fn new(supervisor_pid: Option<u32>, crash_safe_reading: bool) -> WorkerState {
        WorkerState {
            supervisor_pid,
            worker_pid: std::process::id(),
            started_ms: crate::clock::now_ms(),
            crash_safe_reading,
            notice: Mutex::new(None),
        }
    }

    pub fn record_notice(&self, text: String) {
        if let Ok(mut notice) = self.notice.lock() {
            *notice = Some(Notice {
                at_ms: crate::clock::now_ms(),
                text,
            });
        }
    }

    pub fn last_notice(&self) -> Option<Notice> {
        self.notice.lock().ok().and_then(|n| n.clone())
    }
}
