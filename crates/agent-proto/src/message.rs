//! The protocol's control messages: the handshake, the one request each connection carries,
//! and the replies and events that follow it. They travel as JSON in `Frame::Message`
//! (see `frame`); bulk bytes travel in `Frame::Data`. `docs/AGENT-PROTOCOL.md` describes the
//! exchange for each request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every control message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    // The handshake.
    /// Host -> agent, first on every connection.
    Hello { version: u32, client: String },
    /// Agent -> host: the handshake succeeded.
    Welcome {
        version: u32,
        agent_version: String,
        /// The kernel's boot id: it changes on every boot, not on restore.
        boot_id: String,
    },

    /// Host -> agent, right after `Welcome`: what this connection is for.
    Request(Request),

    // Replies and events, agent -> host.
    /// The request failed; nothing more follows on the connection.
    Error(AgentError),
    /// The request succeeded and carries no result.
    Ok,
    /// Exec: the process started.
    Started { pid: u32 },
    /// Exec: the process ended and its output is fully sent.
    Exited(ExitStatus),
    /// ReadFile: the file opened; its bytes follow as `Data::File` frames.
    FileInfo { size: u64, mode: u32 },
    /// WriteFile: the agent is ready for the bytes.
    Ready,
    /// WriteFile: the file is complete and in place.
    Written { bytes: u64 },
    /// Stat.
    Stat(FileStat),
    /// List.
    Entries { entries: Vec<DirEntry> },
    /// StartApp.
    AppStarted { pid: u32 },
    /// AppStatus.
    App(AppStatus),
    /// AppLogs: the log buffer no longer holds `bytes` bytes the host asked for.
    LogDropped { bytes: u64 },
    /// AppLogs: the log stream starts at this byte offset (of all app output ever written).
    LogStart { offset: u64 },
    /// AppLogs: the app exited; a stream that does not follow ends after this.
    AppExited(ExitStatus),
    /// Hook: the app answered the hook with success.
    HookDone(HookOutcome),
    /// The end of a stream of replies (ReadFile, AppLogs).
    Done,

    // Host -> agent, during an exec.
    /// Deliver a signal to the process (its process group for a PTY session).
    Signal { signal: i32 },
    /// Resize the exec's PTY.
    Resize { rows: u16, cols: u16 },
}

/// What a connection asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Answer `Ok`: a liveness check.
    Ping,
    /// Run a process.
    Exec(ExecRequest),
    /// Stream a file's contents to the host.
    ReadFile { path: String },
    /// Replace (or create) a file with the bytes the host streams. The agent writes a temporary
    /// file beside it and renames it into place, so a failed write leaves the old file intact.
    WriteFile {
        path: String,
        /// Permission bits for the file; 0o644 when absent.
        #[serde(default)]
        mode: Option<u32>,
    },
    /// File metadata (`lstat`).
    Stat { path: String },
    /// A directory's entries, sorted by name.
    List { path: String },
    /// Create a directory.
    Mkdir {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
        /// Create missing parents too, and succeed if it exists (`mkdir -p`).
        #[serde(default)]
        parents: bool,
    },
    /// Remove a file, or a directory (which must be empty unless `recursive`).
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Change permission bits.
    Chmod { path: String, mode: u32 },
    /// Relay this connection to TCP `127.0.0.1:<port>` in the guest. After `Ok` the connection
    /// carries raw bytes both ways, with no framing.
    Forward { port: u16 },
    /// Start the application (at most one at a time).
    StartApp(AppSpec),
    /// The application's state.
    AppStatus,
    /// The application's output log, from byte `offset` (0: the oldest still held).
    AppLogs {
        #[serde(default)]
        offset: u64,
        /// Keep streaming new output until the app exits.
        #[serde(default)]
        follow: bool,
    },
    /// Call one of the app's lifecycle hooks.
    Hook(HookRequest),
    /// The VM was restored from a snapshot: set the clock, reseed the RNG, refresh identity.
    Restored(RestoreInfo),
    /// Stop the app, sync the filesystems and power the VM off. `Ok` is sent first.
    Shutdown {
        /// How long the app gets after SIGTERM before SIGKILL.
        #[serde(default)]
        grace_ms: Option<u64>,
    },
}

/// A process to run. Its environment is exactly `env` (plus `PATH`, `HOME` and `HOSTNAME`
/// defaults when `env` lacks them), as in `docker exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in `PATH` unless it has a `/`.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory; `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The user, as Dockerfile's `USER`: `name`, `uid`, `name:group` or `uid:gid`; root when
    /// absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Run on a PTY of this size; stdout then carries the terminal's output and there is no
    /// stderr.
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// The host will stream stdin. When false, stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The application, as a Dockerfile describes it: `argv` is `ENTRYPOINT` followed by `CMD`
/// (exec form; the shell form is `["/bin/sh", "-c", "<line>"]`), with `ENV`, `WORKDIR` and
/// `USER`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// The guest's hostname, set before the app starts.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// The application's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AppStatus {
    NotStarted,
    Running { pid: u32 },
    Exited(ExitStatus),
}

/// The lifecycle hooks of Lambda MicroVMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookName {
    Ready,
    Validate,
    Run,
    Resume,
    Suspend,
    Terminate,
}

impl HookName {
    /// The hook's name in its URL path.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Validate => "validate",
            Self::Run => "run",
            Self::Resume => "resume",
            Self::Suspend => "suspend",
            Self::Terminate => "terminate",
        }
    }

    /// Whether the platform polls this hook: a 503 (or no listener yet) means "not yet, ask
    /// again" until the timeout, rather than failure.
    pub fn polls(self) -> bool {
        matches!(self, Self::Ready | Self::Validate)
    }
}

/// `POST http://localhost:<port>/aws/lambda-microvms/runtime/v1/<hook>` inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRequest {
    pub hook: HookName,
    pub port: u16,
    /// The whole budget, retries included.
    pub timeout_ms: u64,
    /// A JSON request body (the `run` hook's `{"microvmId", "runHookPayload"}`); none sends an
    /// empty body.
    #[serde(default)]
    pub body: Option<String>,
}

/// A hook that returned 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookOutcome {
    /// Requests made, the successful one included.
    pub attempts: u32,
    pub elapsed_ms: u64,
}

/// What the host tells a restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInfo {
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
    /// Fresh randomness from the host, mixed into the kernel's RNG (at least 32 bytes).
    pub entropy: Vec<u8>,
    /// A new hostname for this clone, if it should change.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// File metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (the low 12 bits of `st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
}

/// A file's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// An error the agent reports: a stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code:?})")]
pub struct AgentError {
    pub code: ErrorCode,
    pub message: String,
}

impl AgentError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The kinds of failure, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The handshake's version is not one the agent speaks.
    UnsupportedVersion,
    /// The request is malformed or arrived out of turn.
    BadRequest,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    /// The disk (or the guest's memory, for tmpfs) is full.
    NoSpace,
    /// The user in `user` does not exist or cannot be parsed.
    BadUser,
    /// The program could not be started.
    ExecFailed,
    /// An app is already running.
    AppRunning,
    /// Nothing listens on the forwarded port, or the connection failed.
    ConnectFailed,
    /// The hook answered with a status other than 200 (or 503 while polling).
    HookFailed,
    /// The hook did not succeed within its timeout.
    HookTimeout,
    /// Any other I/O error.
    Io,
}
