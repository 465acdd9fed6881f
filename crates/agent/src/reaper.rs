//! The one place that waits for children. PID 1 inherits every orphan of the guest, so a
//! SIGCHLD-driven loop reaps with `waitpid(-1, WNOHANG)` and hands each exit status to whoever
//! registered that pid (an exec session, the app); unknown pids are orphans and are simply
//! reaped. Spawning and registering happen under the same lock as reaping, so a child that
//! exits at once cannot be reaped before its pid is known, and std's own `waitpid` on a child
//! whose exec failed cannot race with ours. Nothing else in the agent may wait for children
//! (so no `tokio::process`, no `Command::status`/`output`).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use agent_proto::ExitStatus;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::sys;

/// Why the reaper could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("cannot install the SIGCHLD handler")]
    Signal(#[source] io::Error),
}

/// Dispatches exit statuses to their waiters.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<ExitStatus>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `command` and registers its pid; the receiver yields its exit status.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.lock();
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reaps every child that has exited and dispatches their statuses.
    pub fn reap(&self) {
        let mut waiters = self.lock();
        while let Some((pid, status)) = sys::reap_any() {
            match waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => log::debug!("reaped orphan {pid} ({status:?})"),
            }
        }
    }

    /// Starts the SIGCHLD loop on the current tokio runtime.
    pub fn start(self: &Arc<Self>) -> Result<(), ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
        let reaper = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                reaper.reap();
                if sigchld.recv().await.is_none() {
                    log::error!("the SIGCHLD stream ended; children will no longer be reaped");
                    return;
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::*;

    /// One reaper for the whole test process: two would steal each other's children.
    fn reaper() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(Reaper::default)
    }

    async fn wait(mut rx: oneshot::Receiver<ExitStatus>) -> ExitStatus {
        loop {
            reaper().reap();
            if let Ok(status) = rx.try_recv() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn test_reaper_spawned_child_gets_its_status() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 5"]);

        let (_child, rx) = reaper().spawn(&mut cmd).unwrap();
        let status = wait(rx).await;

        assert_eq!(status.code, Some(5));
    }

    #[tokio::test]
    async fn test_reaper_missing_program_is_spawn_error() {
        let mut cmd = Command::new("/nonexistent/program");

        let result = reaper().spawn(&mut cmd);

        assert_eq!(
            result.err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
    }
}
