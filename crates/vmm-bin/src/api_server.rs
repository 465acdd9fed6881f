//! The control socket: a Unix socket that takes one JSON request per line and answers each
//! with one JSON line (`vmm::rpc`). Each connection gets a thread; requests are carried out
//! one at a time under the controller's lock. A request line over the size limit, or bytes
//! that are not UTF-8, get an error response; they never take the VMM down.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use vmm::rpc::{self, VmState};

use crate::Shared;

/// Binds `path` (replacing a stale socket) and serves it on a thread. The socket is bound and
/// listening under a temporary name first and then renamed into place, so a client that waits
/// for `path` to exist never connects before the VMM listens (which would be refused).
pub fn spawn(path: &Path, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    if staging.exists() {
        std::fs::remove_file(&staging)?;
    }
    let listener = UnixListener::bind(&staging)?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    vmm::thread::spawn("api", move || {
        for stream in listener.incoming().flatten() {
            let shared = shared.clone();
            let spawned = vmm::thread::spawn("api-conn", move || serve(stream, &shared));
            if let Err(e) = spawned {
                log::warn!("cannot serve a control connection: {e}");
            }
        }
    })?;
    Ok(())
}

fn serve(stream: UnixStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(u64::MAX);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(rpc::MAX_REQUEST_BYTES as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (response, wake) = if line.len() > rpc::MAX_REQUEST_BYTES {
            if !line.ends_with(b"\n") && skip_line(&mut reader).is_err() {
                return;
            }
            (error_line("request over the size limit"), false)
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) => handle(shared, text.trim_end()),
                Err(_) => (error_line("request is not UTF-8"), false),
            }
        };
        let written = writer.write_all(format!("{response}\n").as_bytes());
        // Wake the main loop only once the answer is out: after `stop` it ends the process.
        if wake {
            let _ = shared.wake.write(1);
        }
        if written.is_err() {
            return;
        }
    }
}

/// Discards the rest of an oversized line, a bounded chunk at a time.
fn skip_line<R: BufRead>(reader: &mut std::io::Take<R>) -> std::io::Result<()> {
    let mut sink = Vec::new();
    loop {
        sink.clear();
        reader.set_limit(64 << 10);
        let n = reader.read_until(b'\n', &mut sink)?;
        if n == 0 || sink.ends_with(b"\n") {
            return Ok(());
        }
    }
}

fn error_line(message: &str) -> String {
    serde_json::json!({
        "version": rpc::PROTOCOL_VERSION,
        "ok": false,
        "error": {"field": null, "message": message},
    })
    .to_string()
}

/// Carries out one request; says whether the main loop must look at the new state.
fn handle(shared: &Shared, line: &str) -> (String, bool) {
    let mut controller = shared.controller.lock().unwrap_or_else(|e| e.into_inner());
    let before = controller.state();
    let response = controller.handle_line(line);
    let after = controller.state();
    let wake = before != after && matches!(after, VmState::Running | VmState::Exited);
    (response, wake)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm::rpc::Controller;
    use vmm_sys_util::eventfd::EventFd;

    fn shared() -> Shared {
        Shared {
            controller: Mutex::new(Controller::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    #[test]
    fn test_serve_oversized_line_gets_one_error_then_next_request_works() {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let shared = shared();
        let mut request = vec![b'x'; rpc::MAX_REQUEST_BYTES + 10];
        request.extend_from_slice(b"\n{\"version\":1,\"action\":\"describe\"}\n");
        let writer = std::thread::spawn({
            let mut client = client.try_clone().expect("clone");
            move || client.write_all(&request).expect("send")
        });
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(client).lines();
            let first = lines.next().expect("first").expect("read");
            let second = lines.next().expect("second").expect("read");
            (first, second)
        });

        serve(server, &shared);
        writer.join().expect("writer");
        let (first, second) = reader.join().expect("reader");

        assert!(first.contains("over the size limit"), "{first}");
        assert!(second.contains("\"ok\":true"), "{second}");
    }

    #[test]
    fn test_spawn_socket_appears_listening_and_replaces_a_stale_one() {
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("tempdir");
        let path = dir.as_path().join("api.sock");
        std::fs::write(&path, b"stale").expect("stale file");

        spawn(&path, Arc::new(shared())).expect("spawn");

        // Connectable as soon as it exists, and nothing else is left in the directory.
        let stream = UnixStream::connect(&path).expect("connect");
        let mut writer = stream.try_clone().expect("clone");
        writer
            .write_all(b"{\"version\":1,\"action\":\"describe\"}\n")
            .expect("send");
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).expect("read");
        assert!(line.contains("not_configured"), "{line}");
        let entries: Vec<_> = std::fs::read_dir(dir.as_path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("api.sock")]);
    }
}
