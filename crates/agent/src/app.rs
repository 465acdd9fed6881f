//! The application: at most one at a time, started from `/etc/hearth/app.json` at boot or by
//! `StartApp`, its stdout and stderr captured into a bounded log ring, its state tracked for
//! `AppStatus`, and its log served to `AppLogs` readers (following it live if asked).
//!
//! The ring holds the last [`LOG_CAPACITY`] bytes of output as chunks tagged with their stream,
//! each at a global byte offset that only grows. A reader that asks for bytes the ring no
//! longer holds is told how many it lost (`LogDropped`), so the host's offsets stay exact.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_proto::frame::{self, write_frame, Frame, FrameError, Stream, CHUNK};
use agent_proto::{AgentError, AppSpec, AppStatus, ErrorCode, ExitStatus, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{oneshot, Notify};

use crate::exec::{self, FdStream, ProcessSpec};
use crate::server::Agent;
use crate::sys;

/// How many bytes of output the log ring holds.
pub const LOG_CAPACITY: usize = 1 << 20;

/// Why the app could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the app is already running (pid {0})")]
    Running(u32),
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
    #[error("cannot set the hostname to {name:?}")]
    Hostname {
        name: String,
        #[source]
        source: io::Error,
    },
}

impl From<AppError> for AgentError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Running(_) => AgentError::new(ErrorCode::AppRunning, e.to_string()),
            AppError::Exec(e) => e.into(),
            AppError::Hostname { ref source, .. } => {
                AgentError::new(ErrorCode::Io, format!("{e}: {source}"))
            }
        }
    }
}

#[derive(Debug)]
struct Chunk {
    stream: Stream,
    start: u64,
    data: Vec<u8>,
}

/// A bounded log of output chunks at global byte offsets.
#[derive(Debug)]
pub struct LogRing {
    chunks: VecDeque<Chunk>,
    oldest: u64,
    end: u64,
    held: usize,
    capacity: usize,
}

/// What a reader gets from the ring.
#[derive(Debug, PartialEq, Eq)]
pub struct LogRead {
    /// Bytes between the requested offset and the oldest one still held.
    pub dropped: u64,
    pub chunks: Vec<(Stream, Vec<u8>)>,
    /// The offset after the last byte returned.
    pub next: u64,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            oldest: 0,
            end: 0,
            held: 0,
            capacity,
        }
    }

    /// The offset of the oldest byte held.
    #[cfg(test)]
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// The offset the next byte written will get.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends output, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.chunks.push_back(Chunk {
            stream,
            start: self.end,
            data: data.to_vec(),
        });
        self.end += data.len() as u64;
        self.held += data.len();
        while self.held > self.capacity {
            let excess = self.held - self.capacity;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let cut = excess.min(front.data.len());
            if cut == front.data.len() {
                self.chunks.pop_front();
            } else {
                front.data.drain(..cut);
                front.start += cut as u64;
            }
            self.oldest += cut as u64;
            self.held -= cut;
        }
    }

    /// Everything held from `offset` on.
    pub fn read_from(&self, offset: u64) -> LogRead {
        let from = offset.max(self.oldest);
        let chunks = self
            .chunks
            .iter()
            .filter(|c| c.start + c.data.len() as u64 > from)
            .map(|c| {
                let skip = from.saturating_sub(c.start) as usize;
                (c.stream, c.data[skip..].to_vec())
            })
            .collect();
        LogRead {
            dropped: self.oldest.saturating_sub(offset),
            chunks,
            next: self.end.max(from),
        }
    }
}

#[derive(Debug)]
struct AppInner {
    state: AppStatus,
    ring: LogRing,
}

/// The application and its log.
#[derive(Debug)]
pub struct App {
    inner: Mutex<AppInner>,
    changed: Notify,
}

impl Default for App {
    fn default() -> Self {
        Self {
            inner: Mutex::new(AppInner {
                state: AppStatus::NotStarted,
                ring: LogRing::new(LOG_CAPACITY),
            }),
            changed: Notify::new(),
        }
    }
}

impl App {
    fn lock(&self) -> MutexGuard<'_, AppInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The app's state.
    pub fn status(&self) -> AppStatus {
        self.lock().state.clone()
    }

    fn push(&self, stream: Stream, data: &[u8]) {
        self.lock().ring.push(stream, data);
        self.changed.notify_waiters();
    }

    /// Starts the app; the pid on success.
    pub fn start(self: &Arc<Self>, agent: &Agent, spec: &AppSpec) -> Result<u32, AppError> {
        let mut inner = self.lock();
        if let AppStatus::Running { pid } = inner.state {
            return Err(AppError::Running(pid));
        }
        if let Some(name) = &spec.hostname {
            agent
                .set_hostname(name)
                .map_err(|source| AppError::Hostname {
                    name: name.clone(),
                    source,
                })?;
        }
        let process = ProcessSpec {
            argv: &spec.argv,
            env: &spec.env,
            cwd: spec.cwd.as_deref(),
            user: spec.user.as_deref(),
            pty: None,
        };
        let mut command = exec::prepare(&process)?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let program = spec.argv.first().cloned().unwrap_or_default();
        let spawn_err = |source| {
            AppError::Exec(exec::ExecError::Spawn {
                program: program.clone(),
                source,
            })
        };
        let (mut child, exit) = agent.reaper.spawn(&mut command).map_err(spawn_err)?;
        let pid = child.id();
        let streams = (|| -> io::Result<_> {
            let out = child.stdout.take().map(|p| FdStream::new(p.into()));
            let err = child.stderr.take().map(|p| FdStream::new(p.into()));
            Ok((out.transpose()?, err.transpose()?))
        })();
        let (stdout, stderr) = match streams {
            Ok(s) => s,
            Err(e) => {
                let _ = sys::kill(pid as i32, libc::SIGKILL);
                return Err(spawn_err(e));
            }
        };
        inner.state = AppStatus::Running { pid };
        drop(inner);
        self.changed.notify_waiters();
        log::info!("app started: {:?} (pid {pid})", spec.argv);
        tokio::spawn(Arc::clone(self).pump(pid, exit, stdout, stderr));
        Ok(pid)
    }

    /// Copies the app's output into the ring until it exits, then records the exit.
    async fn pump(
        self: Arc<Self>,
        pid: u32,
        mut exit: oneshot::Receiver<ExitStatus>,
        stdout: Option<FdStream>,
        stderr: Option<FdStream>,
    ) {
        let mut out_buf = vec![0u8; CHUNK];
        let mut err_buf = vec![0u8; CHUNK];
        let mut out_open = stdout.is_some();
        let mut err_open = stderr.is_some();
        let status = loop {
            tokio::select! {
                r = read(stdout.as_ref(), &mut out_buf), if out_open => match r {
                    Ok(n) if n > 0 => self.push(Stream::Stdout, &out_buf[..n]),
                    _ => out_open = false,
                },
                r = read(stderr.as_ref(), &mut err_buf), if err_open => match r {
                    Ok(n) if n > 0 => self.push(Stream::Stderr, &err_buf[..n]),
                    _ => err_open = false,
                },
                status = &mut exit => break status.unwrap_or(ExitStatus { code: None, signal: None }),
            }
        };
        for (stream, kind, buf) in [
            (stdout.as_ref(), Stream::Stdout, &mut out_buf),
            (stderr.as_ref(), Stream::Stderr, &mut err_buf),
        ] {
            let Some(stream) = stream else { continue };
            while let Ok(Some(n)) = stream.try_read(buf) {
                if n == 0 {
                    break;
                }
                self.push(kind, &buf[..n]);
            }
        }
        log::info!("app exited: pid {pid}, {status:?}");
        self.lock().state = AppStatus::Exited(status);
        self.changed.notify_waiters();
    }

    /// Sends `signal` to the app if it runs.
    pub fn signal(&self, signal: i32) {
        if let AppStatus::Running { pid } = self.status() {
            let _ = sys::kill(pid as i32, signal);
        }
    }

    /// Waits until the app is not running, at most `timeout`; whether it stopped.
    pub async fn wait_stopped(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !matches!(self.status(), AppStatus::Running { .. }) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Serves `AppLogs` on a connection.
    pub async fn serve_logs<S>(&self, offset: u64, follow: bool, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut rx, mut tx) = tokio::io::split(stream);
        if let Err(e) = self.stream_logs(offset, follow, &mut rx, &mut tx).await {
            log::debug!("app logs: {e}");
        }
    }

    async fn stream_logs<R, W>(
        &self,
        offset: u64,
        follow: bool,
        rx: &mut R,
        tx: &mut W,
    ) -> Result<(), FrameError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let end = self.lock().ring.end();
        if offset > end {
            let message = format!("log offset {offset} is past the end of the log ({end})");
            let error = AgentError::new(ErrorCode::BadRequest, message);
            return frame::send(tx, Message::Error(error)).await;
        }
        frame::send(tx, Message::LogStart { offset }).await?;
        let mut next = offset;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (read, state) = {
                let inner = self.lock();
                (inner.ring.read_from(next), inner.state.clone())
            };
            if read.dropped > 0 {
                let bytes = read.dropped;
                frame::send(tx, Message::LogDropped { bytes }).await?;
            }
            for (stream, data) in read.chunks {
                for piece in data.chunks(CHUNK) {
                    write_frame(tx, &Frame::Data(stream, piece.to_vec())).await?;
                }
            }
            next = read.next;
            match state {
                AppStatus::Exited(status) => {
                    frame::send(tx, Message::AppExited(status)).await?;
                    break;
                }
                AppStatus::Running { .. } if follow => {}
                _ => break,
            }
            let mut probe = [0u8; 1];
            tokio::select! {
                _ = &mut notified => {}
                // The host sends nothing during a log stream: a byte is out of turn and the end
                // of its stream means it is gone. Either way, stop.
                _ = rx.read(&mut probe) => return Ok(()),
            }
        }
        frame::send(tx, Message::Done).await
    }
}

async fn read(stream: Option<&FdStream>, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_ring_read_from_zero_returns_everything() {
        let mut ring = LogRing::new(100);
        ring.push(Stream::Stdout, b"hello ");
        ring.push(Stream::Stderr, b"world");

        let read = ring.read_from(0);

        assert_eq!(
            read,
            LogRead {
                dropped: 0,
                chunks: vec![
                    (Stream::Stdout, b"hello ".to_vec()),
                    (Stream::Stderr, b"world".to_vec())
                ],
                next: 11,
            }
        );
    }

    #[test]
    fn test_log_ring_offset_inside_chunk_splits_it() {
        let mut ring = LogRing::new(100);
        ring.push(Stream::Stdout, b"hello ");
        ring.push(Stream::Stderr, b"world");

        let read = ring.read_from(8);

        assert_eq!(read.chunks, vec![(Stream::Stderr, b"rld".to_vec())]);
    }

    #[test]
    fn test_log_ring_overflow_drops_oldest_bytes() {
        let mut ring = LogRing::new(10);
        ring.push(Stream::Stdout, b"0123456789");
        ring.push(Stream::Stdout, b"abcd");

        let read = ring.read_from(0);

        assert_eq!(
            read,
            LogRead {
                dropped: 4,
                chunks: vec![
                    (Stream::Stdout, b"456789".to_vec()),
                    (Stream::Stdout, b"abcd".to_vec())
                ],
                next: 14,
            }
        );
    }

    #[test]
    fn test_log_ring_offsets_stay_consistent_after_overflow() {
        let mut ring = LogRing::new(10);
        ring.push(Stream::Stdout, b"0123456789");
        ring.push(Stream::Stdout, b"abcd");

        let read = ring.read_from(2);
        let delivered: u64 = read.chunks.iter().map(|(_, d)| d.len() as u64).sum();

        assert_eq!(2 + read.dropped + delivered, read.next);
    }

    #[test]
    fn test_log_ring_chunk_bigger_than_capacity_keeps_its_tail() {
        let mut ring = LogRing::new(4);

        ring.push(Stream::Stderr, b"abcdefgh");

        assert_eq!(
            (ring.oldest(), ring.end(), ring.read_from(0).chunks),
            (4, 8, vec![(Stream::Stderr, b"efgh".to_vec())])
        );
    }

    #[test]
    fn test_log_ring_read_at_end_is_empty() {
        let mut ring = LogRing::new(10);
        ring.push(Stream::Stdout, b"abc");

        let read = ring.read_from(3);

        assert_eq!(
            read,
            LogRead {
                dropped: 0,
                chunks: vec![],
                next: 3
            }
        );
    }

    #[tokio::test]
    async fn test_app_logs_exited_app_streams_then_exit_then_done() {
        let app = App::default();
        app.push(Stream::Stdout, b"out");
        app.lock().state = AppStatus::Exited(ExitStatus {
            code: Some(7),
            signal: None,
        });
        let (mut host, agent) = tokio::io::duplex(1 << 16);

        app.serve_logs(0, true, agent).await;
        let mut frames = Vec::new();
        while let Some(f) = frame::read_frame(&mut host).await.unwrap() {
            frames.push(f);
        }

        assert_eq!(
            frames,
            vec![
                Frame::Message(Message::LogStart { offset: 0 }),
                Frame::Data(Stream::Stdout, b"out".to_vec()),
                Frame::Message(Message::AppExited(ExitStatus {
                    code: Some(7),
                    signal: None
                })),
                Frame::Message(Message::Done),
            ]
        );
    }
}
