//! `hearth-agent` as PID 1 in a real guest on KVM (run by `cargo xtask test` in the test bed),
//! driven through `hearth-vmm`'s vsock socket by the host client of `agent-proto`.
//!
//! Each test boots the project's kernel with the agent's initramfs and the Debian test image
//! as a read-only root disk, does its work over the protocol, then asks the agent to power the
//! guest off and checks that the VMM exits 0.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_proto::{
    AgentClient, AppSpec, AppStatus, ExecEvent, ExecRequest, HookName, HookRequest, LogEvent,
    PtySize,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The longest the 100 MiB stream may take (15-25 s in the test bed).
const STREAM_TIMEOUT: Duration = Duration::from_secs(180);

fn asset(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(var).unwrap_or_else(|| panic!("{var} is not set: run `cargo xtask test`")),
    )
}

/// A booted guest whose agent answered the handshake.
struct AgentVm {
    dir: PathBuf,
    vmm: Child,
    client: AgentClient,
}

impl AgentVm {
    async fn boot(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("hearth-kvm-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let uds = dir.join("vsock.sock");
        let config = serde_json::json!({
            "version": 1,
            "machine": {"vcpus": 1, "memory_mib": 512},
            "boot": {
                "kernel": asset("HEARTH_TEST_KERNEL"),
                "initrd": asset("HEARTH_TEST_AGENT_INITRD"),
                "cmdline": "console=ttyS0 reboot=k panic=-1 quiet hearth.hostname=agent-test",
            },
            "drives": [{
                "id": "root", "path": asset("HEARTH_TEST_ROOTFS_DEBIAN"),
                "read_only": true, "root": true
            }],
            "vsock": {"guest_cid": 3, "uds_path": uds},
            "rng": true,
            "serial": {"output": "file", "path": dir.join("console.log")},
        });
        let config_path = dir.join("vm.json");
        std::fs::write(&config_path, config.to_string()).expect("config");
        let vmm = Command::new(asset("HEARTH_TEST_VMM"))
            .arg("--config")
            .arg(&config_path)
            .arg("--api-sock")
            .arg(dir.join("api.sock"))
            .args(["--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hearth-vmm");
        let client = AgentClient::new(&uds);
        let vm = Self { dir, vmm, client };
        if let Err(e) = vm.client.wait_ready(BOOT_TIMEOUT).await {
            panic!("the agent never answered: {e}\nconsole:\n{}", vm.console());
        }
        vm
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// What the VMM is doing, for a failure report: its exit counters, and per thread its
    /// state, where it sleeps and the CPU ticks it used over two seconds.
    fn vmm_report(&self) -> String {
        let pid = self.vmm.id();
        let threads = || -> Vec<(String, String, u64)> {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return Vec::new();
            };
            let mut out: Vec<_> = tasks
                .flatten()
                .filter_map(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                    let (head, rest) = stat.rsplit_once(") ")?;
                    let name = head.split_once(" (")?.1.to_owned();
                    let fields: Vec<&str> = rest.split(' ').collect();
                    let ticks = fields.get(11)?.parse::<u64>().ok()?
                        + fields.get(12)?.parse::<u64>().ok()?;
                    let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                    Some((format!("{name} {}", fields.first()?), wchan, ticks))
                })
                .collect();
            out.sort();
            out
        };
        let describe = || {
            let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.join("api.sock"))
            else {
                return "(no control socket)".to_owned();
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            use std::io::{BufRead, Write};
            let _ = s.write_all(b"{\"version\":1,\"action\":\"describe\"}\n");
            let mut line = String::new();
            let _ = std::io::BufReader::new(s).read_line(&mut line);
            line
        };
        let (before, describe_before) = (threads(), describe());
        std::thread::sleep(Duration::from_secs(2));
        let (after, describe_after) = (threads(), describe());
        let mut report = format!("describe: {describe_before}then: {describe_after}threads:\n");
        for (name, wchan, ticks) in &after {
            let used = before
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(0, |(_, _, t)| ticks.saturating_sub(*t));
            report.push_str(&format!("  {name} wchan={wchan} ticks_in_2s={used}\n"));
        }
        report
    }

    async fn sh(&self, script: &str) -> agent_proto::Output {
        match self.client.run(&["/bin/sh", "-c", script]).await {
            Ok(out) => out,
            Err(e) => panic!("exec: {e}\nconsole:\n{}", self.console()),
        }
    }

    /// Each guest process with its state and where it sleeps, over a fresh connection (for
    /// a failure report; it gives up after a minute).
    async fn processes(&self) -> String {
        let script = "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(cat $p/comm) \
                      $(cut -d' ' -f3 $p/stat) $(cat $p/wchan)\"; done";
        match tokio::time::timeout(Duration::from_secs(60), self.sh(script)).await {
            Ok(out) => text(&out.stdout),
            Err(_) => "(the agent did not answer a new exec either)".to_owned(),
        }
    }

    /// Powers the guest off through the agent and checks that the VMM exits 0.
    async fn shutdown(mut self) {
        self.client.shutdown(None).await.expect("shutdown request");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.vmm.try_wait().expect("wait") {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the VMM did not exit after the shutdown request\nconsole:\n{}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "VMM exit: {status}\n{}", self.console());
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_exec_echo_round_trip() {
    let vm = AgentVm::boot("echo").await;

    let out = vm
        .client
        .run(&["echo", "hello from the guest"])
        .await
        .expect("exec");
    let hostname = vm.client.run(&["hostname"]).await.expect("exec");
    let pid1 = vm.sh("cat /proc/1/comm; cat /proc/mounts").await;

    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "hello from the guest\n");
    assert_eq!(text(&hostname.stdout), "agent-test\n");
    let pid1 = text(&pid1.stdout);
    assert!(pid1.starts_with("init\n"), "{pid1}");
    for mount in [
        " /proc proc ",
        " /dev/pts devpts ",
        " /tmp tmpfs ",
        " /sys/fs/cgroup cgroup2 ",
    ] {
        assert!(pid1.contains(mount), "{mount} missing in:\n{pid1}");
    }
    vm.shutdown().await;
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_exec_exit_code_and_signal_are_reported() {
    let vm = AgentVm::boot("status").await;

    let exit3 = vm.sh("echo oops >&2; exit 3").await;
    let mut sleeper = vm
        .client
        .exec(ExecRequest {
            argv: vec!["sleep".into(), "600".into()],
            ..Default::default()
        })
        .await
        .expect("exec sleep");
    sleeper.signal(libc::SIGTERM).await.expect("signal");
    let killed = sleeper.wait_with_output().await.expect("wait");
    let missing = vm.client.run(&["no-such-program"]).await;

    assert_eq!(exit3.status.code, Some(3));
    assert_eq!(text(&exit3.stderr), "oops\n");
    assert_eq!(killed.status.signal, Some(libc::SIGTERM));
    let err = missing.expect_err("a missing binary must fail");
    assert!(err.to_string().contains("no-such-program"), "{err}");
    vm.shutdown().await;
}

/// `seq 1 N` truncated to `len` bytes: what the guest streams, regenerated on the host.
fn seq_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 1u64;
    while out.len() < len {
        out.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_exec_streams_100_mib_of_stdout_intact() {
    let vm = AgentVm::boot("stdout").await;
    let len = 100 << 20;

    let start = Instant::now();
    let script = format!("seq 1 20000000 | head -c {len}");
    // Bounded, so a stalled stream fails with what the guest was doing instead of hanging.
    let Ok(out) = tokio::time::timeout(STREAM_TIMEOUT, vm.sh(&script)).await else {
        panic!(
            "the stream did not finish in {STREAM_TIMEOUT:?}\nVMM:\n{}\nguest processes:\n{}\nconsole:\n{}",
            vm.vmm_report(),
            vm.processes().await,
            vm.console()
        );
    };
    let elapsed = start.elapsed();

    eprintln!(
        "stdout throughput: {:.1} MiB/s ({len} bytes in {:.2} s)",
        len as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    assert!(out.status.success(), "{:?}", out.status);
    assert_eq!(out.stdout.len(), len);
    assert_eq!(sha256(&out.stdout), sha256(&seq_bytes(len)));
    vm.shutdown().await;
}

/// Reads the session's output until it contains `needle`; returns everything read.
async fn read_until(session: &mut agent_proto::ExecSession, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, session.next_event()).await {
            Ok(Ok(ExecEvent::Stdout(b))) => seen.push_str(&text(&b)),
            other => panic!("waiting for {needle:?}: {other:?}; so far {seen:?}"),
        }
    }
    seen
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_pty_session_has_tty_and_follows_resize() {
    let vm = AgentVm::boot("pty").await;
    let mut shell = vm
        .client
        .exec(ExecRequest {
            argv: vec!["/bin/sh".into()],
            pty: Some(PtySize { rows: 24, cols: 80 }),
            stdin: true,
            ..Default::default()
        })
        .await
        .expect("exec sh on a pty");

    // The terminal echoes what is typed: wait for a marker only the shell's output contains.
    shell
        .write_stdin(b"tty; echo tty-$((40 + 2))\n")
        .await
        .expect("stdin");
    let tty = read_until(&mut shell, "tty-42\r\n").await;
    shell.resize(42, 123).await.expect("resize");
    shell
        .write_stdin(b"stty size; exit 5\n")
        .await
        .expect("stdin");
    let mut rest = String::new();
    let status = loop {
        match shell.next_event().await.expect("event") {
            ExecEvent::Stdout(b) => rest.push_str(&text(&b)),
            ExecEvent::Stderr(_) => panic!("a PTY session has no stderr"),
            ExecEvent::Exited(status) => break status,
        }
    };

    assert!(tty.contains("/dev/pts/"), "{tty:?}");
    assert!(rest.contains("42 123"), "{rest:?}");
    assert_eq!(status.code, Some(5));
    vm.shutdown().await;
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_files_10_mib_written_and_read_back_intact() {
    let vm = AgentVm::boot("files").await;
    let mut data = vec![0u8; 10 << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for b in data.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }

    vm.client
        .mkdir("/tmp/a/b", None, true)
        .await
        .expect("mkdir");
    let written = vm
        .client
        .write_file("/tmp/a/b/blob", Some(0o600), &data)
        .await
        .expect("write");
    let back = vm.client.read_file("/tmp/a/b/blob").await.expect("read");
    let guest_sum = vm.sh("sha256sum /tmp/a/b/blob").await;
    let stat = vm.client.stat("/tmp/a/b/blob").await.expect("stat");
    let listing = vm.client.list("/tmp/a/b").await.expect("list");
    let missing_dir = vm.client.write_file("/tmp/nope/x", None, b"x").await;
    vm.client.remove("/tmp/a", true).await.expect("remove");
    let gone = vm.client.stat("/tmp/a").await;

    assert_eq!(written, data.len() as u64);
    assert!(back == data, "read back differs");
    assert!(text(&guest_sum.stdout).starts_with(&sha256(&data)));
    assert_eq!((stat.size, stat.mode), (data.len() as u64, 0o600));
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].name, "blob");
    assert!(missing_dir.is_err());
    assert!(gone.is_err());
    vm.shutdown().await;
}

/// A guest HTTP server: python3's, serving /tmp/www on 127.0.0.1:`port`.
fn http_server(port: u16) -> ExecRequest {
    ExecRequest {
        argv: [
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ]
        .map(String::from)
        .to_vec(),
        cwd: Some("/tmp/www".into()),
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_forward_reaches_guest_http_server() {
    let vm = AgentVm::boot("forward").await;
    vm.client
        .mkdir("/tmp/www", None, true)
        .await
        .expect("mkdir");
    vm.client
        .write_file("/tmp/www/hello.txt", None, b"hello through vsock\n")
        .await
        .expect("write");
    let server = vm.client.exec(http_server(8080)).await.expect("server");

    // python3 starts slowly under nested emulation: give it minutes, not seconds.
    let deadline = Instant::now() + Duration::from_secs(240);
    let response = loop {
        match vm.client.forward(8080).await {
            Ok(mut stream) => {
                stream
                    .write_all(b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    .await
                    .expect("request");
                let mut response = Vec::new();
                stream.read_to_end(&mut response).await.expect("response");
                break text(&response);
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("forward not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the guest server never answered: {e}"),
        }
    };
    drop(server);

    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(response.ends_with("hello through vsock\n"), "{response}");
    vm.shutdown().await;
}

/// An app with a ready hook that answers 503 for its first three calls, then 200.
const READY_APP: &str = r#"
import http.server
calls = 0
class Hooks(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global calls
        calls += 1
        ok = self.path == "/aws/lambda-microvms/runtime/v1/ready" and calls > 3
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
        print("hook", self.path, calls, flush=True)
http.server.HTTPServer(("127.0.0.1", 9000), Hooks).serve_forever()
"#;

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_ready_hook_polled_until_app_returns_200() {
    let vm = AgentVm::boot("hook").await;
    vm.client
        .write_file("/tmp/app.py", None, READY_APP.as_bytes())
        .await
        .expect("write app");
    vm.client
        .start_app(AppSpec {
            argv: ["python3", "/tmp/app.py"].map(String::from).to_vec(),
            ..Default::default()
        })
        .await
        .expect("start app");

    let outcome = vm
        .client
        .hook(HookRequest {
            hook: HookName::Ready,
            port: 9000,
            timeout_ms: 120_000,
            body: None,
        })
        .await
        .expect("ready hook");
    let status = vm.client.app_status().await.expect("status");

    assert!(outcome.attempts >= 4, "{outcome:?}");
    assert!(matches!(status, AppStatus::Running { .. }), "{status:?}");
    vm.shutdown().await;
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_reaper_leaves_no_zombies_after_100_orphans() {
    let vm = AgentVm::boot("zombies").await;

    // The subshells outlive their parent, so the kernel hands them to PID 1 to reap.
    let spawn = vm
        .sh("for i in $(seq 1 100); do (sleep 0.2; exit 0) & done; echo spawned")
        .await;
    let count_zombies = "for f in /proc/[0-9]*/stat; do cut -d' ' -f3 $f 2>/dev/null; done \
                         | grep -c Z || true";
    let deadline = Instant::now() + Duration::from_secs(60);
    let zombies = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let zombies = text(&vm.sh(count_zombies).await.stdout).trim().to_owned();
        if zombies == "0" || Instant::now() > deadline {
            break zombies;
        }
    };
    let sleepers = vm.sh("grep -l '^sleep$' /proc/[0-9]*/comm | wc -l").await;

    assert_eq!(text(&spawn.stdout), "spawned\n");
    assert_eq!(zombies, "0");
    assert_eq!(text(&sleepers.stdout).trim(), "0");
    vm.shutdown().await;
}

#[tokio::test]
#[ignore = "needs hardware KVM: `cargo xtask test` runs it in the test bed"]
async fn test_app_crash_is_reported_and_agent_stays_up() {
    let vm = AgentVm::boot("crash").await;

    vm.client
        .start_app(AppSpec {
            argv: [
                "/bin/sh",
                "-c",
                "echo starting; echo failing >&2; kill -SEGV $$",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        })
        .await
        .expect("start app");
    let mut logs = vm.client.app_logs(0, true).await.expect("logs");
    let mut stdout = String::new();
    let mut stderr = String::new();
    let exit = loop {
        match logs.next().await.expect("log event") {
            Some(LogEvent::Stdout(b)) => stdout.push_str(&text(&b)),
            Some(LogEvent::Stderr(b)) => stderr.push_str(&text(&b)),
            Some(LogEvent::Exited(status)) => break status,
            Some(LogEvent::Dropped(n)) => panic!("dropped {n} bytes of a tiny log"),
            None => panic!("log ended without the exit"),
        }
    };
    let status = vm.client.app_status().await.expect("status");
    let after = vm.client.run(&["echo", "still here"]).await.expect("exec");

    assert_eq!(stdout, "starting\n");
    assert_eq!(stderr, "failing\n");
    assert_eq!(exit.signal, Some(libc::SIGSEGV));
    assert!(matches!(status, AppStatus::Exited(s) if s.signal == Some(libc::SIGSEGV)));
    assert_eq!(text(&after.stdout), "still here\n");
    vm.shutdown().await;
}
