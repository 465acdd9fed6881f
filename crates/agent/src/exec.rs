//! Running processes: turning an exec request or app spec into a ready `Command` (user, working
//! directory, environment, `PATH` lookup, PTY), and the exec session that streams a process's
//! output to the host, feeds it stdin, signals and resizes it, and reports its exit.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use agent_proto::frame::{self, read_frame, write_frame, Frame, FrameError, Stream, CHUNK};
use agent_proto::{AgentError, ErrorCode, ExecRequest, ExitStatus, Message, PtySize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::server::Agent;
use crate::sys;
use crate::users::{self, UsersError};

/// The `PATH` a process gets when its environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty: there is no program to run")]
    EmptyArgv,
    #[error("bad user")]
    User(#[from] UsersError),
    #[error("working directory {0} does not exist")]
    NoCwd(String),
    #[error("working directory {0} is not a directory")]
    CwdNotDir(String),
    #[error("executable not found: {0} (searched PATH={1})")]
    NotFound(String, String),
    #[error("permission denied: {0} is not executable")]
    NotExecutable(String),
    #[error("cannot open a PTY")]
    Pty(#[source] io::Error),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

impl From<ExecError> for AgentError {
    fn from(e: ExecError) -> Self {
        let code = match &e {
            ExecError::EmptyArgv => ErrorCode::BadRequest,
            ExecError::User(_) => ErrorCode::BadUser,
            ExecError::NoCwd(_) | ExecError::CwdNotDir(_) => ErrorCode::NotFound,
            _ => ErrorCode::ExecFailed,
        };
        let message = match &e {
            ExecError::User(u) => u.to_string(),
            ExecError::Pty(source) => format!("cannot open a PTY: {source}"),
            ExecError::Spawn { program, source } => spawn_message(program, source),
            other => other.to_string(),
        };
        AgentError::new(code, message)
    }
}

fn spawn_message(program: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => format!("executable not found: {program}"),
        Some(libc::EACCES) => format!("permission denied: cannot execute {program}"),
        Some(libc::ENOEXEC) => format!("cannot execute {program}: exec format error"),
        Some(libc::EPERM) => format!("cannot start {program}: operation not permitted"),
        _ => format!("cannot start {program}: {e}"),
    }
}

/// What to run, common to exec and the app.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a str>,
    pub user: Option<&'a str>,
    pub pty: Option<PtySize>,
}

/// Finds `name` in `path` (a `PATH` value) the way `execvp` would; names with a `/` are used
/// as they are.
pub fn find_program(name: &str, path: &str, cwd: &Path) -> Result<PathBuf, ExecError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let mut not_executable = None;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = cwd.join(dir).join(name);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 != 0 {
            return Ok(candidate);
        }
        not_executable.get_or_insert(candidate);
    }
    match not_executable {
        Some(p) => Err(ExecError::NotExecutable(p.display().to_string())),
        None => Err(ExecError::NotFound(name.to_string(), path.to_string())),
    }
}

/// The environment a process gets: `env` plus defaults for `PATH`, `HOME`, `HOSTNAME` and (on
/// a PTY) `TERM`.
pub fn environment(
    env: &BTreeMap<String, String>,
    home: &str,
    hostname: &str,
    pty: bool,
) -> BTreeMap<String, String> {
    let mut out = env.clone();
    out.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    out.entry("HOME".into()).or_insert_with(|| home.into());
    out.entry("HOSTNAME".into())
        .or_insert_with(|| hostname.into());
    if pty {
        out.entry("TERM".into()).or_insert_with(|| "xterm".into());
    }
    out
}

/// Builds the command for `spec`, with every check that gives a clear error done up front.
/// Stdio is left for the caller to set.
pub fn prepare(spec: &ProcessSpec<'_>) -> Result<Command, ExecError> {
    let argv0 = spec.argv.first().ok_or(ExecError::EmptyArgv)?;
    let user = users::resolve_in(Path::new("/"), spec.user)?;
    // With no `user` the process keeps the agent's own identity (root, as PID 1).
    let identity = spec.user.map(|_| sys::ChildIdentity {
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.clone(),
    });
    let cwd = spec.cwd.filter(|c| !c.is_empty()).unwrap_or("/");
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ExecError::CwdNotDir(cwd.to_string())),
        Err(_) => return Err(ExecError::NoCwd(cwd.to_string())),
    }
    let env = environment(spec.env, &user.home, &sys::hostname(), spec.pty.is_some());
    let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    let program = find_program(argv0, path, Path::new(cwd))?;

    let mut command = Command::new(program);
    command
        .arg0(argv0)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(cwd);
    let pty = spec.pty.is_some();
    // SAFETY: the hook runs in the forked child; `child_setup` only makes async-signal-safe
    // system calls and does not allocate (the identity was built before the fork).
    unsafe {
        command.pre_exec(move || sys::child_setup(pty, identity.as_ref()));
    }
    Ok(command)
}

/// A non-blocking descriptor (a pipe end or a PTY master) driven by tokio.
#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        sys::set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is dropped,
        // and the `AsyncFd` owns it from here on.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Self { fd })
    }

    /// Reads some bytes; 0 at the end. A PTY master's EIO (the slave side is gone) is the end.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| sys::read(fd.as_raw_fd(), buf)) {
                Ok(result) => return eio_is_eof(result),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads what is available now: `None` if nothing is (EAGAIN).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match eio_is_eof(sys::read(self.fd.as_raw_fd(), buf)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.fd.writable().await?;
            if let Ok(result) = guard.try_io(|fd| sys::write(fd.as_raw_fd(), buf)) {
                buf = &buf[result?..];
            }
        }
        Ok(())
    }
}

fn eio_is_eof(result: io::Result<usize>) -> io::Result<usize> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
        other => other,
    }
}

/// Reads from an optional stream; pends forever when there is none.
async fn read_opt(stream: Option<&FdStream>, buf: &mut [u8]) -> io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Sends everything `stream` holds right now as `kind` data frames, stopping at EAGAIN or the
/// end: a daemonised grandchild may keep the pipe open forever.
pub async fn drain<W: AsyncWrite + Unpin>(
    stream: Option<&FdStream>,
    kind: Stream,
    tx: &mut W,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    let Some(stream) = stream else {
        return Ok(());
    };
    while let Ok(Some(n)) = stream.try_read(buf) {
        if n == 0 {
            break;
        }
        write_frame(tx, &Frame::Data(kind, buf[..n].to_vec())).await?;
    }
    Ok(())
}

/// A started process and its ends of its stdio.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    pub exit: oneshot::Receiver<ExitStatus>,
    pub stdout: Option<FdStream>,
    pub stderr: Option<FdStream>,
    /// Where host stdin goes: the stdin pipe, or the PTY master.
    pub stdin: Option<Arc<FdStream>>,
    /// The PTY master (output is read from `stdout`, which shares it).
    pub pty: Option<Arc<FdStream>>,
}

fn into_stream(fd: Option<impl Into<OwnedFd>>) -> io::Result<Option<FdStream>> {
    fd.map(|fd| FdStream::new(fd.into())).transpose()
}

/// Starts `req` with piped (or PTY) stdio.
pub fn start(agent: &Agent, req: &ExecRequest) -> Result<Started, ExecError> {
    let spec = ProcessSpec {
        argv: &req.argv,
        env: &req.env,
        cwd: req.cwd.as_deref(),
        user: req.user.as_deref(),
        pty: req.pty,
    };
    let mut command = prepare(&spec)?;
    let program = req.argv.first().cloned().unwrap_or_default();
    let spawn_err = |source| ExecError::Spawn {
        program: program.clone(),
        source,
    };
    if let Some(size) = req.pty {
        let pty = sys::open_pty(size.rows, size.cols).map_err(ExecError::Pty)?;
        let clone = |fd: &OwnedFd| fd.try_clone().map_err(ExecError::Pty);
        command
            .stdin(Stdio::from(clone(&pty.slave)?))
            .stdout(Stdio::from(clone(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        let (child, exit) = agent.reaper.spawn(&mut command).map_err(spawn_err)?;
        drop(command);
        let master = match FdStream::new(pty.master) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let _ = sys::killpg(child.id() as i32, libc::SIGKILL);
                return Err(ExecError::Pty(e));
            }
        };
        return Ok(Started {
            pid: child.id() as i32,
            exit,
            stdout: None,
            stderr: None,
            stdin: Some(Arc::clone(&master)),
            pty: Some(master),
        });
    }
    command
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exit) = agent.reaper.spawn(&mut command).map_err(spawn_err)?;
    let pid = child.id() as i32;
    let streams = (|| -> io::Result<_> {
        Ok((
            into_stream(child.stdout.take())?,
            into_stream(child.stderr.take())?,
            into_stream(child.stdin.take())?.map(Arc::new),
        ))
    })();
    match streams {
        Ok((stdout, stderr, stdin)) => Ok(Started {
            pid,
            exit,
            stdout,
            stderr,
            stdin,
            pty: None,
        }),
        Err(e) => {
            let _ = sys::killpg(pid, libc::SIGKILL);
            Err(ExecError::Spawn { program, source: e })
        }
    }
}

/// What the host sent during a session, besides stdin.
#[derive(Debug)]
enum Control {
    Signal(i32),
    Resize(u16, u16),
    BadFrame(String),
    HostGone,
}

/// Reads the host's frames: stdin to the stdin writer, the rest to the session.
async fn read_host<R: AsyncRead + Unpin>(
    mut rx: R,
    stdin: mpsc::Sender<Vec<u8>>,
    control: mpsc::Sender<Control>,
) {
    loop {
        let event = match read_frame(&mut rx).await {
            Ok(Some(Frame::Data(Stream::Stdin, bytes))) => {
                let _ = stdin.send(bytes).await;
                continue;
            }
            Ok(Some(Frame::Message(Message::Signal { signal }))) => Control::Signal(signal),
            Ok(Some(Frame::Message(Message::Resize { rows, cols }))) => Control::Resize(rows, cols),
            Ok(Some(Frame::Message(m))) => {
                Control::BadFrame(format!("unexpected message during exec: {m:?}"))
            }
            Ok(Some(Frame::Data(s, _))) => {
                Control::BadFrame(format!("unexpected {s:?} data during exec"))
            }
            Ok(None) => Control::HostGone,
            Err(FrameError::Io(_)) | Err(FrameError::Truncated) => Control::HostGone,
            Err(e) => Control::BadFrame(format!("malformed frame: {e}")),
        };
        let end = matches!(event, Control::HostGone | Control::BadFrame(_));
        if control.send(event).await.is_err() || end {
            return;
        }
    }
}

/// Writes host stdin into the process; an empty chunk closes stdin (on a PTY, it types the
/// EOF character, ^D).
async fn write_stdin(target: Arc<FdStream>, pty: bool, mut chunks: mpsc::Receiver<Vec<u8>>) {
    let mut target = Some(target);
    while let Some(chunk) = chunks.recv().await {
        let Some(t) = target.as_ref() else {
            continue;
        };
        let result = if chunk.is_empty() && pty {
            t.write_all(&[4]).await
        } else if chunk.is_empty() {
            target = None;
            Ok(())
        } else {
            t.write_all(&chunk).await
        };
        if let Err(e) = result {
            log::debug!("exec stdin: {e}");
            target = None;
        }
    }
}

/// One thing that happened during a session.
enum Event {
    Output(Stream, io::Result<usize>),
    Control(Control),
    Exit(ExitStatus),
}

/// Removes a session's pid from the agent's list when the session ends.
struct SessionGuard<'a> {
    agent: &'a Agent,
    pid: i32,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.agent.forget_session(self.pid);
    }
}

/// Kills the process (its whole group: every exec has its own session) and waits for it.
async fn kill_and_reap(pid: i32, exit: oneshot::Receiver<ExitStatus>) {
    let _ = sys::killpg(pid, libc::SIGKILL);
    let _ = sys::kill(pid, libc::SIGKILL);
    let _ = exit.await;
}

/// Runs one exec session on a connection whose request was `req`.
pub async fn run_session<S>(agent: Arc<Agent>, req: ExecRequest, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rx, mut tx) = tokio::io::split(stream);
    let started = match start(&agent, &req) {
        Ok(s) => s,
        Err(e) => {
            let _ = frame::send(&mut tx, Message::Error(e.into())).await;
            return;
        }
    };
    let Started {
        pid,
        mut exit,
        stdout,
        stderr,
        stdin,
        pty,
    } = started;
    agent.remember_session(pid);
    let _guard = SessionGuard { agent: &agent, pid };
    let stdout: Option<Arc<FdStream>> = stdout.map(Arc::new).or_else(|| pty.clone());
    let (stdin_tx, stdin_rx) = mpsc::channel(8);
    let (ctl_tx, mut ctl_rx) = mpsc::channel(8);
    let reader = tokio::spawn(read_host(rx, stdin_tx, ctl_tx));
    let writer = stdin.map(|s| tokio::spawn(write_stdin(s, pty.is_some(), stdin_rx)));
    let _tasks = AbortOnDrop(reader, writer);

    if frame::send(&mut tx, Message::Started { pid: pid as u32 })
        .await
        .is_err()
    {
        kill_and_reap(pid, exit).await;
        return;
    }
    let mut out_buf = vec![0u8; CHUNK];
    let mut err_buf = vec![0u8; CHUNK];
    let mut out_open = stdout.is_some();
    let mut err_open = stderr.is_some();
    let status = loop {
        let event = tokio::select! {
            r = read_opt(stdout.as_deref(), &mut out_buf), if out_open => Event::Output(Stream::Stdout, r),
            r = read_opt(stderr.as_ref(), &mut err_buf), if err_open => Event::Output(Stream::Stderr, r),
            ctl = ctl_rx.recv() => Event::Control(ctl.unwrap_or(Control::HostGone)),
            status = &mut exit => Event::Exit(status.unwrap_or(ExitStatus { code: None, signal: None })),
        };
        match event {
            Event::Output(kind, Ok(n)) if n > 0 => {
                let buf = if kind == Stream::Stdout {
                    &out_buf
                } else {
                    &err_buf
                };
                let f = Frame::Data(kind, buf[..n].to_vec());
                if let Err(e) = write_frame(&mut tx, &f).await {
                    log::warn!("exec {pid}: cannot send output to the host, ending: {e}");
                    return kill_and_reap(pid, exit).await;
                }
            }
            Event::Output(Stream::Stdout, _) => out_open = false,
            Event::Output(_, _) => err_open = false,
            Event::Control(Control::Signal(signal)) => {
                let result = if pty.is_some() {
                    sys::killpg(pid, signal)
                } else {
                    sys::kill(pid, signal)
                };
                if let Err(e) = result {
                    log::debug!("exec {pid}: signal {signal}: {e}");
                }
            }
            Event::Control(Control::Resize(rows, cols)) => {
                if let Some(master) = &pty {
                    if let Err(e) = sys::set_winsize(master.fd.as_raw_fd(), rows, cols) {
                        log::debug!("exec {pid}: resize: {e}");
                    }
                }
            }
            Event::Control(Control::BadFrame(message)) => {
                let error = AgentError::new(ErrorCode::BadRequest, message);
                let _ = frame::send(&mut tx, Message::Error(error)).await;
                return kill_and_reap(pid, exit).await;
            }
            Event::Control(Control::HostGone) => return kill_and_reap(pid, exit).await,
            Event::Exit(status) => break status,
        }
    };
    let result: Result<(), FrameError> = async {
        if out_open {
            drain(stdout.as_deref(), Stream::Stdout, &mut tx, &mut out_buf).await?;
        }
        if err_open {
            drain(stderr.as_ref(), Stream::Stderr, &mut tx, &mut err_buf).await?;
        }
        write_frame(&mut tx, &Frame::Data(Stream::Stdout, Vec::new())).await?;
        write_frame(&mut tx, &Frame::Data(Stream::Stderr, Vec::new())).await?;
        frame::send(&mut tx, Message::Exited(status)).await
    }
    .await;
    if let Err(e) = result {
        log::debug!("exec {pid}: the host went away before the exit was sent: {e}");
    }
}

/// Aborts the session's helper tasks when it ends.
struct AbortOnDrop(
    tokio::task::JoinHandle<()>,
    Option<tokio::task::JoinHandle<()>>,
);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
        if let Some(w) = &self.1 {
            w.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_find_program_in_path_finds_sh() {
        let result = find_program("sh", "/nonexistent:/bin:/usr/bin", Path::new("/"));

        assert!(result.unwrap().ends_with("sh"));
    }

    #[test]
    fn test_find_program_missing_is_not_found() {
        let result = find_program("no-such-program-xyz", "/bin", Path::new("/"));

        assert!(matches!(result, Err(ExecError::NotFound(..))));
    }

    #[test]
    fn test_find_program_with_slash_is_used_as_is() {
        let result = find_program("./x/y", "/bin", Path::new("/"));

        assert_eq!(result.unwrap(), PathBuf::from("./x/y"));
    }

    #[test]
    fn test_environment_request_values_win_over_defaults() {
        let env = BTreeMap::from([("PATH".to_string(), "/opt/bin".to_string())]);

        let out = environment(&env, "/home/a", "box", true);

        assert_eq!(
            out,
            BTreeMap::from([
                ("HOME".to_string(), "/home/a".to_string()),
                ("HOSTNAME".to_string(), "box".to_string()),
                ("PATH".to_string(), "/opt/bin".to_string()),
                ("TERM".to_string(), "xterm".to_string()),
            ])
        );
    }

    #[test]
    fn test_exec_error_missing_cwd_maps_to_not_found() {
        let error: AgentError = ExecError::NoCwd("/x".into()).into();

        assert_eq!(
            error,
            AgentError::new(ErrorCode::NotFound, "working directory /x does not exist")
        );
    }

    #[test]
    fn test_exec_error_unknown_user_maps_to_bad_user() {
        let error: AgentError = ExecError::User(UsersError::UnknownUser("bob".into())).into();

        assert_eq!(error.code, ErrorCode::BadUser);
    }
}
