//! `hearth-agent --serve-unix` on the host, driven by the unchanged `agent_proto::AgentClient`:
//! the protocol end to end without a VM. Each test starts its own agent (the app is one per
//! agent) in its own scratch directory.
// The helpers unwrap too: a panic there is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_proto::{
    AgentClient, AppSpec, AppStatus, ClientError, ErrorCode, ExecEvent, ExecRequest, FileKind,
    HookName, HookRequest, LogEvent, PtySize,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct HostAgent {
    dir: PathBuf,
    child: Child,
    client: AgentClient,
}

impl HostAgent {
    async fn start(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("hearth-host-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_hearth-agent"))
            .arg("--serve-unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let client = AgentClient::new(&sock);
        client.wait_ready(Duration::from_secs(20)).await.unwrap();
        Self { dir, child, client }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    async fn wait_app_exit(&self) -> AppStatus {
        for _ in 0..500 {
            let status = self.client.app_status().await.unwrap();
            if matches!(status, AppStatus::Exited(_)) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the app did not exit");
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn agent_error(result: Result<impl std::fmt::Debug, ClientError>) -> agent_proto::AgentError {
    match result {
        Err(ClientError::Agent(e)) => e,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

#[tokio::test]
async fn test_exec_echo_round_trip_returns_output() {
    let agent = HostAgent::start("echo").await;

    let out = agent.client.run(&["echo", "hello"]).await.unwrap();

    assert_eq!(
        (out.status.code, out.stdout, out.stderr),
        (Some(0), b"hello\n".to_vec(), vec![])
    );
}

#[tokio::test]
async fn test_exec_exit_code_3_is_reported() {
    let agent = HostAgent::start("exit3").await;

    let out = agent
        .client
        .run(&["/bin/sh", "-c", "echo oops >&2; exit 3"])
        .await
        .unwrap();

    assert_eq!((out.status.code, out.stderr), (Some(3), b"oops\n".to_vec()));
}

#[tokio::test]
async fn test_exec_sigterm_to_sleep_reports_signal_15() {
    let agent = HostAgent::start("sigterm").await;
    let mut session = agent
        .client
        .exec(ExecRequest {
            argv: argv(&["sleep", "600"]),
            ..Default::default()
        })
        .await
        .unwrap();

    session.signal(libc::SIGTERM).await.unwrap();
    let out = session.wait_with_output().await.unwrap();

    assert_eq!((out.status.code, out.status.signal), (None, Some(15)));
}

#[tokio::test]
async fn test_exec_stdin_streamed_to_cat_comes_back() {
    let agent = HostAgent::start("cat").await;
    let mut session = agent
        .client
        .exec(ExecRequest {
            argv: argv(&["cat"]),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    session.write_stdin(&input).await.unwrap();
    session.close_stdin().await.unwrap();
    let out = session.wait_with_output().await.unwrap();

    assert_eq!((out.status.code, out.stdout == input), (Some(0), true));
}

async fn read_until(session: &mut agent_proto::ExecSession, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let event = tokio::time::timeout(Duration::from_secs(20), session.next_event()).await;
        match event {
            Ok(Ok(ExecEvent::Stdout(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("waiting for {needle:?}: {other:?}; so far {seen:?}"),
        }
    }
    seen
}

#[tokio::test]
async fn test_exec_pty_has_tty_and_follows_resize() {
    let agent = HostAgent::start("pty").await;
    let mut shell = agent
        .client
        .exec(ExecRequest {
            argv: argv(&["/bin/sh"]),
            pty: Some(PtySize { rows: 24, cols: 80 }),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();

    // The terminal echoes the typed line, so the marker is computed: only the output has it.
    shell
        .write_stdin(b"tty; echo tty-$((40 + 2))\n")
        .await
        .unwrap();
    let tty = read_until(&mut shell, "tty-42\r\n").await;
    shell.resize(42, 123).await.unwrap();
    shell.write_stdin(b"stty size; exit 5\n").await.unwrap();
    let out = shell.wait_with_output().await.unwrap();
    let rest = String::from_utf8_lossy(&out.stdout);

    assert!(tty.contains("/dev/pts/"), "{tty:?}");
    assert!(rest.contains("42 123"), "{rest:?}");
    assert_eq!((out.status.code, out.stderr), (Some(5), vec![]));
}

#[tokio::test]
async fn test_exec_missing_binary_is_exec_failed() {
    let agent = HostAgent::start("nobin").await;

    let error = agent_error(agent.client.run(&["no-such-program-xyz"]).await);

    assert_eq!(error.code, ErrorCode::ExecFailed);
    assert!(
        error
            .message
            .starts_with("executable not found: no-such-program-xyz"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn test_exec_unknown_user_is_bad_user() {
    let agent = HostAgent::start("baduser").await;

    let result = agent
        .client
        .exec(ExecRequest {
            argv: argv(&["true"]),
            user: Some("no-such-user-xyz".into()),
            ..Default::default()
        })
        .await;
    let error = agent_error(result);

    assert_eq!(error.code, ErrorCode::BadUser);
    assert!(
        error.message.contains("no-such-user-xyz"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn test_exec_missing_cwd_is_not_found() {
    let agent = HostAgent::start("nocwd").await;

    let result = agent
        .client
        .exec(ExecRequest {
            argv: argv(&["true"]),
            cwd: Some("/no/such/dir".into()),
            ..Default::default()
        })
        .await;

    assert_eq!(
        agent_error(result),
        agent_proto::AgentError::new(
            ErrorCode::NotFound,
            "working directory /no/such/dir does not exist"
        )
    );
}

#[tokio::test]
async fn test_files_10_mib_write_then_read_back_is_identical() {
    let agent = HostAgent::start("bigfile").await;
    let mut data = vec![0u8; 10 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for b in data.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    let path = agent.path("blob");

    let written = agent
        .client
        .write_file(&path, Some(0o600), &data)
        .await
        .unwrap();
    let back = agent.client.read_file(&path).await.unwrap();

    assert_eq!(written, data.len() as u64);
    assert!(back == data, "read back differs");
}

#[tokio::test]
async fn test_files_stat_reports_kind_size_and_mode() {
    let agent = HostAgent::start("stat").await;
    let path = agent.path("f");
    agent
        .client
        .write_file(&path, Some(0o640), b"12345")
        .await
        .unwrap();

    let stat = agent.client.stat(&path).await.unwrap();

    assert_eq!(
        (stat.kind, stat.size, stat.mode),
        (FileKind::File, 5, 0o640)
    );
}

#[tokio::test]
async fn test_files_list_is_sorted_and_shows_symlinks() {
    let agent = HostAgent::start("list").await;
    let dir = agent.path("d");
    agent.client.mkdir(&dir, None, false).await.unwrap();
    agent
        .client
        .write_file(&format!("{dir}/b"), None, b"b")
        .await
        .unwrap();
    agent
        .client
        .mkdir(&format!("{dir}/a"), None, false)
        .await
        .unwrap();
    std::os::unix::fs::symlink("b", format!("{dir}/c")).unwrap();

    let entries = agent.client.list(&dir).await.unwrap();

    let summary: Vec<_> = entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(
        summary,
        vec![
            ("a", FileKind::Dir),
            ("b", FileKind::File),
            ("c", FileKind::Symlink)
        ]
    );
}

#[tokio::test]
async fn test_files_mkdir_parents_creates_the_chain() {
    let agent = HostAgent::start("mkdir").await;
    let path = agent.path("x/y/z");

    agent.client.mkdir(&path, Some(0o700), true).await.unwrap();
    let stat = agent.client.stat(&path).await.unwrap();

    assert_eq!((stat.kind, stat.mode), (FileKind::Dir, 0o700));
}

#[tokio::test]
async fn test_files_mkdir_existing_without_parents_is_already_exists() {
    let agent = HostAgent::start("mkdirexists").await;
    let path = agent.path("x");
    agent.client.mkdir(&path, None, false).await.unwrap();

    let error = agent_error(agent.client.mkdir(&path, None, false).await);

    assert_eq!(error.code, ErrorCode::AlreadyExists);
}

#[tokio::test]
async fn test_files_remove_recursive_deletes_the_tree() {
    let agent = HostAgent::start("remove").await;
    let top = agent.path("t");
    agent
        .client
        .mkdir(&format!("{top}/a/b"), None, true)
        .await
        .unwrap();
    agent
        .client
        .write_file(&format!("{top}/a/b/f"), None, b"x")
        .await
        .unwrap();

    agent.client.remove(&top, true).await.unwrap();
    let error = agent_error(agent.client.stat(&top).await);

    assert_eq!(error.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn test_files_remove_non_empty_dir_without_recursive_fails() {
    let agent = HostAgent::start("removenonempty").await;
    let top = agent.path("t");
    agent.client.mkdir(&top, None, false).await.unwrap();
    agent
        .client
        .write_file(&format!("{top}/f"), None, b"x")
        .await
        .unwrap();

    let error = agent_error(agent.client.remove(&top, false).await);

    assert_eq!(error.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn test_files_chmod_changes_mode() {
    let agent = HostAgent::start("chmod").await;
    let path = agent.path("f");
    agent.client.write_file(&path, None, b"x").await.unwrap();

    agent.client.chmod(&path, 0o751).await.unwrap();
    let stat = agent.client.stat(&path).await.unwrap();

    assert_eq!(stat.mode, 0o751);
}

#[tokio::test]
async fn test_files_write_into_missing_dir_is_not_found_and_leaves_nothing() {
    let agent = HostAgent::start("nodir").await;
    let path = agent.path("missing/f");

    let error = agent_error(agent.client.write_file(&path, None, b"x").await);
    let left: Vec<_> = std::fs::read_dir(&agent.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "agent.sock")
        .collect();

    assert_eq!(error.code, ErrorCode::NotFound);
    assert!(error.message.contains("missing"), "{}", error.message);
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn test_files_read_missing_file_is_not_found_naming_path() {
    let agent = HostAgent::start("readmissing").await;
    let path = agent.path("nope");

    let error = agent_error(agent.client.read_file(&path).await);

    assert_eq!(error.code, ErrorCode::NotFound);
    assert!(error.message.contains(&path), "{}", error.message);
}

#[tokio::test]
async fn test_forward_relays_to_echo_server_with_half_close() {
    let agent = HostAgent::start("forward").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).await.unwrap();
        conn.write_all(&buf).await.unwrap();
    });

    let mut stream = agent.client.forward(port).await.unwrap();
    stream.write_all(b"ping through the agent").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();

    assert_eq!(back, b"ping through the agent");
}

#[tokio::test]
async fn test_forward_closed_port_is_connect_failed() {
    let agent = HostAgent::start("forwardclosed").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);

    let error = agent_error(agent.client.forward(port).await);

    assert_eq!(error.code, ErrorCode::ConnectFailed);
}

#[tokio::test]
async fn test_app_output_and_exit_code_7_are_in_the_logs() {
    let agent = HostAgent::start("app").await;
    agent
        .client
        .start_app(AppSpec {
            argv: argv(&["sh", "-c", "echo hello; echo err >&2; exit 7"]),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut logs = agent.client.app_logs(0, true).await.unwrap();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(event) = logs.next().await.unwrap() {
        match event {
            LogEvent::Stdout(b) => stdout.extend(b),
            LogEvent::Stderr(b) => stderr.extend(b),
            LogEvent::Exited(s) => exit = Some(s),
            LogEvent::Dropped(n) => panic!("dropped {n}"),
        }
    }

    assert_eq!(
        (stdout, stderr, exit.and_then(|s| s.code)),
        (b"hello\n".to_vec(), b"err\n".to_vec(), Some(7))
    );
}

#[tokio::test]
async fn test_app_second_start_while_running_is_app_running() {
    let agent = HostAgent::start("apptwice").await;
    let spec = AppSpec {
        argv: argv(&["sleep", "600"]),
        ..Default::default()
    };
    agent.client.start_app(spec.clone()).await.unwrap();

    let error = agent_error(agent.client.start_app(spec).await);

    assert_eq!(error.code, ErrorCode::AppRunning);
}

#[tokio::test]
async fn test_app_logs_from_too_old_offset_report_dropped_bytes() {
    let agent = HostAgent::start("applogs").await;
    let total = 3 << 20;
    let script = format!("head -c {total} /dev/zero | tr '\\0' a");
    agent
        .client
        .start_app(AppSpec {
            argv: argv(&["sh", "-c", &script]),
            ..Default::default()
        })
        .await
        .unwrap();
    agent.wait_app_exit().await;

    let mut logs = agent.client.app_logs(10, false).await.unwrap();
    let (mut dropped, mut data, mut exited) = (0, 0, false);
    while let Some(event) = logs.next().await.unwrap() {
        match event {
            LogEvent::Dropped(n) => dropped += n,
            LogEvent::Stdout(b) | LogEvent::Stderr(b) => data += b.len() as u64,
            LogEvent::Exited(_) => exited = true,
        }
    }

    assert_eq!(
        (dropped, data, logs.offset(), exited),
        (total - 10 - (1 << 20), 1 << 20, total, true)
    );
}

#[tokio::test]
async fn test_hook_ready_503_then_200_is_done_after_two_attempts() {
    let agent = HostAgent::start("hook").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        for status in ["503 Service Unavailable", "200 OK"] {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await.unwrap();
            let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            conn.write_all(response.as_bytes()).await.unwrap();
        }
    });

    let outcome = agent
        .client
        .hook(HookRequest {
            hook: HookName::Ready,
            port,
            timeout_ms: 5000,
            body: None,
        })
        .await
        .unwrap();

    assert_eq!(outcome.attempts, 2);
}
