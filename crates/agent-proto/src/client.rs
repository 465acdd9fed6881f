//! The async host-side client. It reaches the agent at an [`Endpoint`]: the VMM's vsock Unix
//! socket (`hearth-vmm`, and Firecracker's convention: send `CONNECT <port>\n`, read
//! `OK <host port>\n`), or the guest's context ID over the host kernel's `AF_VSOCK` (a VMM
//! using vhost-vsock, such as QEMU's `vhost-vsock-device`). It opens one connection per
//! request, does the handshake, and speaks the request's exchange; both endpoints carry the
//! same protocol.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

use crate::frame::{read_frame, send, write_frame, Frame, FrameError, Stream, CHUNK};
use crate::message::{
    AgentError, AppSpec, AppStatus, DirEntry, ExecRequest, ExitStatus, FileStat, HookOutcome,
    HookRequest, Message, Request, RestoreInfo,
};
use crate::{AGENT_PORT, PROTOCOL_VERSION};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent through {endpoint}")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM's vsock socket refused the connection to port {port}: {reply:?}")]
    VsockRefused { port: u32, reply: String },
    /// The agent's own error, with its code and message.
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("protocol error")]
    Frame(#[from] FrameError),
    #[error("the agent sent {0} where the protocol does not allow it")]
    Unexpected(String),
    #[error("the agent closed the connection early")]
    Closed,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Frame(FrameError::Io(e))
    }
}

fn unexpected(m: &Message) -> ClientError {
    let json = serde_json::to_string(m).unwrap_or_default();
    ClientError::Unexpected(json.chars().take(200).collect())
}

/// What the agent said in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub version: u32,
    pub agent_version: String,
    pub boot_id: String,
}

/// Where the host reaches the guest's vsock ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The VMM's vsock Unix socket, which relays `CONNECT <port>` to the guest (`hearth-vmm`,
    /// Firecracker).
    Uds(PathBuf),
    /// The guest's context ID, over `AF_VSOCK` on the host (vhost-vsock).
    Cid(u32),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uds(path) => write!(f, "the vsock socket {}", path.display()),
            Self::Cid(cid) => write!(f, "vsock CID {cid}"),
        }
    }
}

/// A byte stream to a port in the guest, through either kind of [`Endpoint`].
#[derive(Debug)]
pub struct GuestStream(GuestStreamInner);

#[derive(Debug)]
enum GuestStreamInner {
    Uds(UnixStream),
    Vsock(VsockStream),
}

impl AsyncRead for GuestStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            GuestStreamInner::Uds(s) => Pin::new(s).poll_read(cx, buf),
            GuestStreamInner::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().0 {
            GuestStreamInner::Uds(s) => Pin::new(s).poll_write(cx, buf),
            GuestStreamInner::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            GuestStreamInner::Uds(s) => Pin::new(s).poll_flush(cx),
            GuestStreamInner::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Shuts down the write direction: the guest reads end-of-file.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            GuestStreamInner::Uds(s) => Pin::new(s).poll_shutdown(cx),
            GuestStreamInner::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A handle on one VM's agent; cheap to clone, each call opens its own connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: Endpoint,
    port: u32,
}

/// One request's connection, after the handshake: reads are buffered, writes go straight to
/// the stream.
#[derive(Debug)]
struct Conn {
    stream: BufReader<GuestStream>,
}

impl Conn {
    fn tx(&mut self) -> &mut GuestStream {
        self.stream.get_mut()
    }

    async fn recv(&mut self) -> Result<Frame, ClientError> {
        read_frame(&mut self.stream)
            .await?
            .ok_or(ClientError::Closed)
    }

    /// The next control message; data frames are a protocol error here.
    async fn recv_message(&mut self) -> Result<Message, ClientError> {
        match self.recv().await? {
            Frame::Message(Message::Error(e)) => Err(e.into()),
            Frame::Message(m) => Ok(m),
            Frame::Data(stream, _) => Err(ClientError::Unexpected(format!("{stream:?} data"))),
        }
    }

    async fn send(&mut self, m: Message) -> Result<(), ClientError> {
        Ok(send(self.tx(), m).await?)
    }
}

/// The next control message read straight off `stream`.
async fn read_message(stream: &mut GuestStream) -> Result<Message, ClientError> {
    match read_frame(stream).await?.ok_or(ClientError::Closed)? {
        Frame::Message(Message::Error(e)) => Err(e.into()),
        Frame::Message(m) => Ok(m),
        Frame::Data(stream, _) => Err(ClientError::Unexpected(format!("{stream:?} data"))),
    }
}

impl AgentClient {
    /// A client for the agent behind the VMM's vsock socket `uds`, on the standard port.
    pub fn new(uds: impl Into<PathBuf>) -> Self {
        Self::with_port(uds, AGENT_PORT)
    }

    /// A client for an agent listening on another vsock port, behind the VMM's vsock socket.
    pub fn with_port(uds: impl Into<PathBuf>, port: u32) -> Self {
        Self::at(Endpoint::Uds(uds.into()), port)
    }

    /// A client for the agent of the guest with context ID `cid`, over the host's `AF_VSOCK`,
    /// on the standard port.
    pub fn vsock(cid: u32) -> Self {
        Self::at(Endpoint::Cid(cid), AGENT_PORT)
    }

    /// A client for an agent listening on `port`, reached through `endpoint`.
    pub fn at(endpoint: Endpoint, port: u32) -> Self {
        Self { endpoint, port }
    }

    /// Where this client connects.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The VMM's vsock socket this client connects through, if it uses one.
    pub fn uds(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Uds(path) => Some(path),
            Endpoint::Cid(_) => None,
        }
    }

    /// Opens a vsock stream to `port` in the guest: the raw byte stream, before any handshake.
    pub async fn connect_raw(&self, port: u32) -> Result<GuestStream, ClientError> {
        let connect_error = |source| ClientError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        };
        match &self.endpoint {
            Endpoint::Uds(path) => {
                let stream = UnixStream::connect(path).await.map_err(connect_error)?;
                let stream = Self::relay_connect(stream, port).await?;
                Ok(GuestStream(GuestStreamInner::Uds(stream)))
            }
            Endpoint::Cid(cid) => {
                let stream = VsockStream::connect(VsockAddr::new(*cid, port))
                    .await
                    .map_err(connect_error)?;
                Ok(GuestStream(GuestStreamInner::Vsock(stream)))
            }
        }
    }

    /// Asks the VMM's vsock socket for a connection to `port` in the guest.
    async fn relay_connect(stream: UnixStream, port: u32) -> Result<UnixStream, ClientError> {
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        let mut reply = String::new();
        stream.read_line(&mut reply).await?;
        if !reply.starts_with("OK ") {
            return Err(ClientError::VsockRefused { port, reply });
        }
        // The VMM sends nothing after its reply until the guest writes, so nothing is buffered.
        if !stream.buffer().is_empty() {
            return Err(ClientError::Unexpected(
                "bytes after the vsock reply".into(),
            ));
        }
        Ok(stream.into_inner())
    }

    /// Connects and does the handshake. Frames are read unbuffered here, so that nothing past
    /// them is consumed: after a `Forward`, the stream turns raw.
    async fn handshake(&self) -> Result<(GuestStream, AgentInfo), ClientError> {
        let mut stream = self.connect_raw(self.port).await?;
        send(
            &mut stream,
            Message::Hello {
                version: PROTOCOL_VERSION,
                client: format!("agent-proto {}", env!("CARGO_PKG_VERSION")),
            },
        )
        .await?;
        match read_message(&mut stream).await? {
            Message::Welcome {
                version,
                agent_version,
                boot_id,
            } => Ok((
                stream,
                AgentInfo {
                    version,
                    agent_version,
                    boot_id,
                },
            )),
            other => Err(unexpected(&other)),
        }
    }

    /// A connection that has sent `request`, still unbuffered.
    async fn open(&self, request: Request) -> Result<GuestStream, ClientError> {
        let (mut stream, _) = self.handshake().await?;
        send(&mut stream, Message::Request(request)).await?;
        Ok(stream)
    }

    async fn request(&self, request: Request) -> Result<Conn, ClientError> {
        let stream = self.open(request).await?;
        Ok(Conn {
            stream: BufReader::with_capacity(CHUNK * 2, stream),
        })
    }

    /// Sends `request` and expects a bare `Ok`.
    async fn simple(&self, request: Request) -> Result<(), ClientError> {
        let mut conn = self.request(request).await?;
        match conn.recv_message().await? {
            Message::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The handshake alone: who the agent is.
    pub async fn hello(&self) -> Result<AgentInfo, ClientError> {
        Ok(self.handshake().await?.1)
    }

    /// Retries the handshake until the agent answers or `timeout` passes (the guest may still
    /// be booting, or the VMM not yet listening), giving each attempt 5 s.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<AgentInfo, ClientError> {
        self.wait_ready_with(timeout, Duration::from_secs(5)).await
    }

    /// [`AgentClient::wait_ready`], giving up on each attempt after `attempt`: a connection
    /// the guest never answers (a request lost across a restore) costs that long.
    pub async fn wait_ready_with(
        &self,
        timeout: Duration,
        attempt: Duration,
    ) -> Result<AgentInfo, ClientError> {
        let start = Instant::now();
        loop {
            let attempt = tokio::time::timeout(attempt, self.hello()).await;
            match attempt {
                Ok(Ok(info)) => return Ok(info),
                Ok(Err(e)) if start.elapsed() >= timeout => return Err(e),
                _ if start.elapsed() >= timeout => return Err(ClientError::Timeout(timeout)),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A liveness round trip.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.simple(Request::Ping).await
    }

    /// Starts a process; drive it through the returned session.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        let mut conn = self.request(Request::Exec(request)).await?;
        match conn.recv_message().await? {
            Message::Started { pid } => Ok(ExecSession { conn, pid }),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs `argv` to completion with no stdin and collects its output.
    pub async fn run(&self, argv: &[&str]) -> Result<Output, ClientError> {
        let request = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.exec(request).await?.wait_with_output().await
    }

    /// Streams a guest file into `out`; returns its size.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        out: &mut W,
    ) -> Result<u64, ClientError> {
        let mut conn = self
            .request(Request::ReadFile { path: path.into() })
            .await?;
        match conn.recv_message().await? {
            Message::FileInfo { .. } => {}
            other => return Err(unexpected(&other)),
        }
        let mut total = 0u64;
        loop {
            match conn.recv().await? {
                Frame::Data(Stream::File, chunk) if chunk.is_empty() => break,
                Frame::Data(Stream::File, chunk) => {
                    total += chunk.len() as u64;
                    out.write_all(&chunk).await?;
                }
                Frame::Message(Message::Error(e)) => return Err(e.into()),
                Frame::Message(m) => return Err(unexpected(&m)),
                Frame::Data(s, _) => return Err(ClientError::Unexpected(format!("{s:?} data"))),
            }
        }
        match conn.recv_message().await? {
            Message::Done => Ok(total),
            other => Err(unexpected(&other)),
        }
    }

    /// A guest file's whole contents.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out).await?;
        Ok(out)
    }

    /// Replaces the guest file `path` with everything `input` yields; returns the bytes
    /// written. On any failure the old file is left as it was.
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: Option<u32>,
        input: &mut R,
    ) -> Result<u64, ClientError> {
        let mut conn = self
            .request(Request::WriteFile {
                path: path.into(),
                mode,
            })
            .await?;
        match conn.recv_message().await? {
            Message::Ready => {}
            other => return Err(unexpected(&other)),
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = input.read(&mut buf).await?;
            let chunk = Frame::Data(Stream::File, buf[..n].to_vec());
            if let Err(e) = write_frame(conn.tx(), &chunk).await {
                // The agent may have stopped reading because the write failed: its error
                // explains more than the broken pipe does.
                return Err(match conn.recv_message().await {
                    Err(ClientError::Agent(agent)) => agent.into(),
                    _ => e.into(),
                });
            }
            if n == 0 {
                break;
            }
        }
        match conn.recv_message().await? {
            Message::Written { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Replaces the guest file `path` with `data`.
    pub async fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        self.write_file_from(path, mode, &mut &*data).await
    }

    /// `lstat` of a guest path.
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        let mut conn = self.request(Request::Stat { path: path.into() }).await?;
        match conn.recv_message().await? {
            Message::Stat(stat) => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }

    /// A guest directory's entries, sorted by name.
    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let mut conn = self.request(Request::List { path: path.into() }).await?;
        match conn.recv_message().await? {
            Message::Entries { entries } => Ok(entries),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a guest directory (`parents`: like `mkdir -p`).
    pub async fn mkdir(
        &self,
        path: &str,
        mode: Option<u32>,
        parents: bool,
    ) -> Result<(), ClientError> {
        self.simple(Request::Mkdir {
            path: path.into(),
            mode,
            parents,
        })
        .await
    }

    /// Removes a guest file or directory.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.simple(Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
    }

    /// Changes a guest path's permission bits.
    pub async fn chmod(&self, path: &str, mode: u32) -> Result<(), ClientError> {
        self.simple(Request::Chmod {
            path: path.into(),
            mode,
        })
        .await
    }

    /// A byte stream to TCP `127.0.0.1:<port>` inside the guest.
    pub async fn forward(&self, port: u16) -> Result<GuestStream, ClientError> {
        let mut stream = self.open(Request::Forward { port }).await?;
        match read_message(&mut stream).await? {
            Message::Ok => Ok(stream),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts the application.
    pub async fn start_app(&self, spec: AppSpec) -> Result<u32, ClientError> {
        let mut conn = self.request(Request::StartApp(spec)).await?;
        match conn.recv_message().await? {
            Message::AppStarted { pid } => Ok(pid),
            other => Err(unexpected(&other)),
        }
    }

    /// The application's state.
    pub async fn app_status(&self) -> Result<AppStatus, ClientError> {
        let mut conn = self.request(Request::AppStatus).await?;
        match conn.recv_message().await? {
            Message::App(status) => Ok(status),
            other => Err(unexpected(&other)),
        }
    }

    /// The application's log from byte `offset`: what the agent still holds, and with
    /// `follow` everything after it until the app exits.
    pub async fn app_logs(&self, offset: u64, follow: bool) -> Result<AppLogs, ClientError> {
        let mut conn = self.request(Request::AppLogs { offset, follow }).await?;
        let offset = match conn.recv_message().await? {
            Message::LogStart { offset } => offset,
            other => return Err(unexpected(&other)),
        };
        Ok(AppLogs { conn, offset })
    }

    /// Calls a lifecycle hook and waits for its outcome.
    pub async fn hook(&self, request: HookRequest) -> Result<HookOutcome, ClientError> {
        let mut conn = self.request(Request::Hook(request)).await?;
        match conn.recv_message().await? {
            Message::HookDone(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells a restored guest the time and gives it fresh entropy.
    pub async fn restored(&self, info: RestoreInfo) -> Result<(), ClientError> {
        self.simple(Request::Restored(info)).await
    }

    /// Asks the guest to stop its app, sync and power off.
    pub async fn shutdown(&self, grace: Option<Duration>) -> Result<(), ClientError> {
        self.simple(Request::Shutdown {
            grace_ms: grace.map(|g| g.as_millis() as u64),
        })
        .await
    }
}

/// What an exec produces, one piece at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The process ended; the session is over.
    Exited(ExitStatus),
}

/// A collected exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A running exec.
#[derive(Debug)]
pub struct ExecSession {
    conn: Conn,
    pid: u32,
}

impl ExecSession {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends bytes to the process's stdin (the request must have asked for stdin).
    pub async fn write_stdin(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(CHUNK) {
            write_frame(self.conn.tx(), &Frame::Data(Stream::Stdin, chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        Ok(write_frame(self.conn.tx(), &Frame::Data(Stream::Stdin, Vec::new())).await?)
    }

    /// Sends a signal (to the process group on a PTY).
    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.conn.send(Message::Signal { signal }).await
    }

    /// Resizes the PTY.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.conn.send(Message::Resize { rows, cols }).await
    }

    /// The next piece of output, or the exit.
    pub async fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        loop {
            match self.conn.recv().await? {
                Frame::Data(_, chunk) if chunk.is_empty() => continue,
                Frame::Data(Stream::Stdout, chunk) => return Ok(ExecEvent::Stdout(chunk)),
                Frame::Data(Stream::Stderr, chunk) => return Ok(ExecEvent::Stderr(chunk)),
                Frame::Message(Message::Exited(status)) => return Ok(ExecEvent::Exited(status)),
                Frame::Message(Message::Error(e)) => return Err(e.into()),
                Frame::Message(m) => return Err(unexpected(&m)),
                Frame::Data(s, _) => return Err(ClientError::Unexpected(format!("{s:?} data"))),
            }
        }
    }

    /// Reads output until the process exits.
    pub async fn wait_with_output(mut self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event().await? {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exited(status) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    })
                }
            }
        }
    }
}

/// A piece of the application's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The agent's buffer overflowed: this many bytes of output are gone.
    Dropped(u64),
    /// The app exited.
    Exited(ExitStatus),
}

/// A stream of the application's log.
#[derive(Debug)]
pub struct AppLogs {
    conn: Conn,
    offset: u64,
}

impl AppLogs {
    /// The byte offset of the next output this stream yields.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next piece, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<LogEvent>, ClientError> {
        let event = match self.conn.recv().await? {
            Frame::Data(Stream::Stdout, b) => {
                self.offset += b.len() as u64;
                LogEvent::Stdout(b)
            }
            Frame::Data(Stream::Stderr, b) => {
                self.offset += b.len() as u64;
                LogEvent::Stderr(b)
            }
            Frame::Message(Message::LogDropped { bytes }) => {
                self.offset += bytes;
                LogEvent::Dropped(bytes)
            }
            Frame::Message(Message::AppExited(status)) => LogEvent::Exited(status),
            Frame::Message(Message::Done) => return Ok(None),
            Frame::Message(Message::Error(e)) => return Err(e.into()),
            Frame::Message(m) => return Err(unexpected(&m)),
            Frame::Data(s, _) => return Err(ClientError::Unexpected(format!("{s:?} data"))),
        };
        Ok(Some(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_endpoint_display_names_socket_and_cid() {
        let uds = Endpoint::Uds(PathBuf::from("/run/vm/vsock.sock"));
        let cid = Endpoint::Cid(7);

        assert_eq!(uds.to_string(), "the vsock socket /run/vm/vsock.sock");
        assert_eq!(cid.to_string(), "vsock CID 7");
    }

    #[test]
    fn test_vsock_client_has_cid_endpoint_and_no_uds() {
        let client = AgentClient::vsock(7);

        assert_eq!(client.endpoint(), &Endpoint::Cid(7));
        assert_eq!(client.uds(), None);
    }

    #[tokio::test]
    async fn test_connect_raw_to_absent_cid_is_connect_error() {
        // No guest has this context ID: the host either has no vsock at all, finds no VM with
        // it, or (as a guest itself) never hears back; each is a failed connect, within the
        // kernel's 2 s connect timeout.
        let client = AgentClient::vsock(0xffff_fff0);

        let result = tokio::time::timeout(Duration::from_secs(10), client.connect_raw(AGENT_PORT))
            .await
            .expect("connect returns");

        assert!(matches!(
            result,
            Err(ClientError::Connect {
                endpoint: Endpoint::Cid(0xffff_fff0),
                ..
            })
        ));
    }
}
