//! The protocol server: accepts connections (vsock in the guest, a Unix socket speaking
//! Firecracker's `CONNECT <port>` preamble in development), does the handshake, reads the one
//! request each connection carries and hands it to the module that serves it. A malformed or
//! out-of-turn frame gets `Error{bad_request}` and closes that connection only.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_proto::frame::{self, read_frame, Frame, FrameError};
use agent_proto::{AgentError, ErrorCode, Message, Request, AGENT_PORT, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::app::App;
use crate::reaper::Reaper;
use crate::{exec, files, forward, hooks, restore, sys};

/// How long a new connection may take to send its Hello and its request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest.
    Pid1,
    /// A development server on a host (`--serve-unix`): no boot, no hostname or clock changes,
    /// and `Shutdown` just exits.
    Dev,
}

/// Why the server could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on vsock port {AGENT_PORT}")]
    Vsock(#[source] io::Error),
    #[error("cannot listen on {0}")]
    Unix(PathBuf, #[source] io::Error),
}

/// The agent's shared state.
#[derive(Debug)]
pub struct Agent {
    pub mode: Mode,
    pub reaper: Arc<Reaper>,
    pub app: Arc<App>,
    pub boot_id: String,
    sessions: Mutex<HashSet<i32>>,
}

impl Agent {
    pub fn new(mode: Mode, reaper: Arc<Reaper>) -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Self {
            mode,
            reaper,
            app: Arc::new(App::default()),
            boot_id,
            sessions: Mutex::new(HashSet::new()),
        }
    }

    pub fn is_pid1(&self) -> bool {
        self.mode == Mode::Pid1
    }

    /// Sets the hostname; in development mode it only logs (it would rename the host).
    pub fn set_hostname(&self, name: &str) -> io::Result<()> {
        if !self.is_pid1() {
            log::info!("development mode: not setting the hostname to {name:?}");
            return Ok(());
        }
        sys::sethostname(name)
    }

    pub fn remember_session(&self, pid: i32) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid);
    }

    pub fn forget_session(&self, pid: i32) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    fn session_pids(&self) -> Vec<i32> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.iter().copied().collect()
    }
}

/// Logs connection errors at info level at most once every 10 s, at debug level otherwise, so
/// a misbehaving host cannot flood the console.
fn log_connection_error(message: &str) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
        *last = Some(now);
        log::info!("connection: {message}");
    } else {
        log::debug!("connection: {message}");
    }
}

fn bad_request(message: impl Into<String>) -> Message {
    Message::Error(AgentError::new(ErrorCode::BadRequest, message))
}

/// Reads the next frame, which must be a message; answers a bad frame with `bad_request`.
async fn expect_message<S>(stream: &mut S, what: &str) -> Option<Message>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(read) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(stream)).await else {
        log_connection_error(&format!("no {what} within {HANDSHAKE_TIMEOUT:?}"));
        return None;
    };
    match read {
        Ok(Some(Frame::Message(m))) => Some(m),
        Ok(Some(Frame::Data(s, _))) => {
            let _ = frame::send(
                stream,
                bad_request(format!("expected {what}, got {s:?} data")),
            )
            .await;
            None
        }
        Ok(None) => None,
        Err(e @ (FrameError::Io(_) | FrameError::Truncated)) => {
            log_connection_error(&format!("reading {what}: {e}"));
            None
        }
        Err(FrameError::Json(e)) => {
            let message = format!("malformed message where {what} was expected: {e}");
            let _ = frame::send(stream, bad_request(message)).await;
            None
        }
        Err(e) => {
            let message = format!("bad frame where {what} was expected: {e}");
            let _ = frame::send(stream, bad_request(message)).await;
            None
        }
    }
}

/// Serves one connection from the handshake to the end of its request.
pub async fn handle<S>(agent: Arc<Agent>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match expect_message(&mut stream, "Hello").await {
        Some(Message::Hello { version, .. }) if version == PROTOCOL_VERSION => {}
        Some(Message::Hello { version, .. }) => {
            let message =
                format!("host speaks version {version}, this agent speaks {PROTOCOL_VERSION}");
            let error = AgentError::new(ErrorCode::UnsupportedVersion, message);
            let _ = frame::send(&mut stream, Message::Error(error)).await;
            return;
        }
        Some(other) => {
            let _ = frame::send(
                &mut stream,
                bad_request(format!("expected Hello, got {}", name(&other))),
            )
            .await;
            return;
        }
        None => return,
    }
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        boot_id: agent.boot_id.clone(),
    };
    if frame::send(&mut stream, welcome).await.is_err() {
        return;
    }
    let request = match expect_message(&mut stream, "a Request").await {
        Some(Message::Request(r)) => r,
        Some(other) => {
            let _ = frame::send(
                &mut stream,
                bad_request(format!("expected a Request, got {}", name(&other))),
            )
            .await;
            return;
        }
        None => return,
    };
    dispatch(agent, request, stream).await;
}

/// A message's type, for error messages (without its possibly large contents).
fn name(m: &Message) -> String {
    let json = serde_json::to_value(m).unwrap_or_default();
    json.get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("an unknown message")
        .to_string()
}

async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, result: Result<Message, AgentError>) {
    let message = result.unwrap_or_else(Message::Error);
    if let Err(e) = frame::send(stream, message).await {
        log_connection_error(&format!("replying: {e}"));
    }
}

async fn dispatch<S>(agent: Arc<Agent>, request: Request, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match request {
        Request::Ping => reply(&mut stream, Ok(Message::Ok)).await,
        Request::Exec(req) => exec::run_session(agent, req, stream).await,
        Request::ReadFile { path } => {
            if let Err(e) = files::read_file(&path, &mut stream).await {
                log_connection_error(&format!("read {path}: {e}"));
            }
        }
        Request::WriteFile { path, mode } => {
            let (mut rx, mut tx) = tokio::io::split(stream);
            files::write_file(&path, mode, &mut rx, &mut tx).await;
        }
        Request::Stat { path } => {
            let r = files::stat(&path).await.map(Message::Stat);
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::List { path } => {
            let r = files::list(&path)
                .await
                .map(|entries| Message::Entries { entries });
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::Mkdir {
            path,
            mode,
            parents,
        } => {
            let r = files::mkdir(&path, mode, parents)
                .await
                .map(|()| Message::Ok);
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::Remove { path, recursive } => {
            let r = files::remove(&path, recursive).await.map(|()| Message::Ok);
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::Chmod { path, mode } => {
            let r = files::chmod(&path, mode).await.map(|()| Message::Ok);
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::Forward { port } => forward::serve(port, stream).await,
        Request::StartApp(spec) => {
            let app = Arc::clone(&agent.app);
            let r = app
                .start(&agent, &spec)
                .map(|pid| Message::AppStarted { pid });
            if let Err(e) = &r {
                log::warn!("app not started: {e}");
            }
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::AppStatus => reply(&mut stream, Ok(Message::App(agent.app.status()))).await,
        Request::AppLogs { offset, follow } => agent.app.serve_logs(offset, follow, stream).await,
        Request::Hook(req) => {
            let r = hooks::call(&req).await.map(Message::HookDone);
            reply(&mut stream, r).await;
        }
        Request::Restored(info) => {
            let r = restore::apply(&agent, &info).map(|()| Message::Ok);
            reply(&mut stream, r.map_err(Into::into)).await;
        }
        Request::Shutdown { grace_ms } => shutdown(agent, grace_ms, stream).await,
    }
}

/// `Shutdown`: `Ok` first, then SIGTERM to the app and the exec sessions, up to the grace
/// period for the app, SIGKILL to everything, sync, and a reboot request. The guest kernel
/// runs with `reboot=k`, so the reboot is an i8042 reset, which our VMM treats as power-off.
async fn shutdown<S>(agent: Arc<Agent>, grace_ms: Option<u64>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    log::info!("shutdown requested");
    reply(&mut stream, Ok(Message::Ok)).await;
    // Give the reply a moment to reach the host: wait for it to close the connection.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut sink)).await;
    if !agent.is_pid1() {
        log::info!("development mode: exiting");
        std::process::exit(0);
    }
    agent.app.signal(libc::SIGTERM);
    for pid in agent.session_pids() {
        let _ = sys::killpg(pid, libc::SIGTERM);
    }
    let grace = Duration::from_millis(grace_ms.unwrap_or(5000));
    if !agent.app.wait_stopped(grace).await {
        log::warn!("the app did not stop within {grace:?}; killing it");
    }
    let _ = sys::kill(-1, libc::SIGKILL);
    sys::sync();
    log::info!("powering off");
    let e = sys::reboot_restart();
    log::error!("reboot failed: {e}");
}

/// Accepts vsock connections forever.
pub async fn serve_vsock(agent: Arc<Agent>) -> Result<(), ServerError> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, AGENT_PORT);
    let listener = tokio_vsock::VsockListener::bind(addr).map_err(ServerError::Vsock)?;
    log::info!("serving on vsock port {AGENT_PORT}");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let stream = crate::vsock_io::RetryStream::new(stream);
                tokio::spawn(handle(Arc::clone(&agent), stream));
            }
            Err(e) => {
                log_connection_error(&format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Reads the `CONNECT <port>\n` preamble one byte at a time (so nothing after it is
/// consumed) and answers `OK <port>\n`.
async fn preamble<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "preamble too long",
            ));
        }
    }
    let line = String::from_utf8_lossy(&line);
    let port = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad preamble"))?;
    if port != AGENT_PORT {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "wrong port",
        ));
    }
    stream.write_all(format!("OK {port}\n").as_bytes()).await
}

/// Accepts connections on a Unix socket forever (development mode).
pub async fn serve_unix(agent: Arc<Agent>, path: &Path) -> Result<(), ServerError> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| ServerError::Unix(path.to_path_buf(), e))?;
    log::info!("serving on {}", path.display());
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let agent = Arc::clone(&agent);
                tokio::spawn(async move {
                    match preamble(&mut stream).await {
                        Ok(()) => handle(agent, stream).await,
                        Err(e) => log_connection_error(&format!("preamble: {e}")),
                    }
                });
            }
            Err(e) => {
                log_connection_error(&format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_proto::frame::send;

    fn agent() -> Arc<Agent> {
        Arc::new(Agent::new(Mode::Dev, Arc::new(Reaper::default())))
    }

    async fn exchange(messages: Vec<Message>) -> Vec<Frame> {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(agent(), guest));
        for m in messages {
            send(&mut host, m).await.unwrap();
        }
        server.await.unwrap();
        let mut frames = Vec::new();
        while let Ok(Some(f)) = read_frame(&mut host).await {
            frames.push(f);
        }
        frames
    }

    fn hello(version: u32) -> Message {
        Message::Hello {
            version,
            client: "test".into(),
        }
    }

    #[tokio::test]
    async fn test_handle_wrong_version_is_unsupported_version() {
        let frames = exchange(vec![hello(9)]).await;

        assert_eq!(
            frames,
            vec![Frame::Message(Message::Error(AgentError::new(
                ErrorCode::UnsupportedVersion,
                "host speaks version 9, this agent speaks 1"
            )))]
        );
    }

    #[tokio::test]
    async fn test_handle_ping_is_welcome_then_ok() {
        let frames = exchange(vec![hello(1), Message::Request(Request::Ping)]).await;

        assert_eq!(frames.last(), Some(&Frame::Message(Message::Ok)));
    }

    #[tokio::test]
    async fn test_handle_malformed_request_is_bad_request_and_closes() {
        let (mut host, guest) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(handle(agent(), guest));
        send(&mut host, hello(1)).await.unwrap();
        host.write_all(&[0, 2, 0, 0, 0, b'{', b'}']).await.unwrap();

        server.await.unwrap();
        let _welcome = read_frame(&mut host).await.unwrap();
        let reply = read_frame(&mut host).await.unwrap();

        assert!(
            matches!(
                reply,
                Some(Frame::Message(Message::Error(AgentError {
                    code: ErrorCode::BadRequest,
                    ..
                })))
            ),
            "{reply:?}"
        );
    }

    #[tokio::test]
    async fn test_handle_out_of_turn_message_is_bad_request() {
        let frames = exchange(vec![hello(1), Message::Done]).await;

        assert_eq!(
            frames.last(),
            Some(&Frame::Message(bad_request("expected a Request, got done")))
        );
    }
}
