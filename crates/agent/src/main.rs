//! `hearth-agent`: the guest's PID 1. It mounts the guest's filesystems, switches to the root
//! disk, starts and supervises the application, reaps orphans, and serves the agent protocol
//! (exec, files, port forwarding, app logs, lifecycle hooks, restore, shutdown) over vsock.
//! It is built as a static binary (`-C target-feature=+crt-static`), so it uses no NSS and no
//! `dlopen`.
//!
//! As PID 1 it must never exit (the kernel would panic): every failure is logged to the
//! console and the agent keeps serving; if even that fails it sleeps forever. With
//! `--serve-unix <path>` it is a development server on a host instead: no boot sequence, a Unix
//! socket that speaks Firecracker's `CONNECT <port>` preamble, and `Shutdown` exits.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod app;
mod exec;
mod files;
mod forward;
mod hooks;
mod init;
mod logger;
mod reaper;
mod restore;
mod server;
mod sys;
mod users;
mod vsock_io;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reaper::Reaper;
use server::{Agent, Mode};

/// Where the image's app spec is, in the final root.
const APP_SPEC: &str = "/etc/hearth/app.json";

fn usage() -> ! {
    eprintln!("usage: hearth-agent              (as PID 1 of a guest)");
    eprintln!("       hearth-agent --serve-unix <path>");
    eprintln!("       hearth-agent --version");
    std::process::exit(2);
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Starts the app from the image's spec, if there is one.
fn start_image_app(agent: &Agent) {
    let text = match std::fs::read_to_string(APP_SPEC) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return log::error!("cannot read {APP_SPEC}: {e}"),
    };
    let spec: agent_proto::AppSpec = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => return log::error!("{APP_SPEC} is not a valid app spec: {e}"),
    };
    if let Err(e) = agent.app.start(agent, &spec) {
        let e: agent_proto::AgentError = e.into();
        log::error!("cannot start the app from {APP_SPEC}: {}", e.message);
    }
}

/// Logs SIGTERM and SIGINT, which PID 1 ignores.
fn ignore_termination() {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, name) in [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
    ] {
        match signal(kind) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        log::info!("{name} ignored: PID 1 stops only on a Shutdown request");
                    }
                });
            }
            Err(e) => log::warn!("cannot watch {name}: {e}"),
        }
    }
}

/// PID 1 after the boot sequence; returns only if the runtime could not start.
fn pid1() {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return log::error!("cannot start the async runtime: {e}"),
    };
    rt.block_on(async {
        let reaper = Arc::new(Reaper::default());
        if let Err(e) = reaper.start() {
            log::error!("{e}; zombies will pile up");
        }
        ignore_termination();
        let agent = Arc::new(Agent::new(Mode::Pid1, reaper));
        start_image_app(&agent);
        for attempt in 0u64.. {
            if let Err(e) = server::serve_vsock(Arc::clone(&agent)).await {
                // Once, then once a minute: a guest without vsock must not flood the console.
                if attempt % 60 == 0 {
                    log::error!("{e}: {}; retrying every second", source(&e));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
}

fn source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

fn serve_unix(path: PathBuf) {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async {
        let reaper = Arc::new(Reaper::default());
        reaper.start().map_err(|e| e.to_string())?;
        let agent = Arc::new(Agent::new(Mode::Dev, reaper));
        server::serve_unix(agent, &path)
            .await
            .map_err(|e| format!("{e}: {}", source(&e)))
    });
    if let Err(e) = result {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn main() {
    logger::init();
    // The agent must not die writing to a closed connection; children get the default back.
    sys::ignore_signal(libc::SIGPIPE);
    if sys::getpid() != 1 {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["--serve-unix", path] => return serve_unix(PathBuf::from(path)),
            ["--version"] => return println!("hearth-agent {}", env!("CARGO_PKG_VERSION")),
            _ => usage(),
        }
    }
    // PID 1: the kernel passes unknown command-line words as arguments; they are ignored.
    log::info!(
        "hearth-agent {} starting as PID 1",
        env!("CARGO_PKG_VERSION")
    );
    if std::panic::catch_unwind(init::boot).is_err() {
        log::error!("the boot sequence panicked; serving anyway");
    }
    loop {
        if std::panic::catch_unwind(AssertUnwindSafe(pid1)).is_err() {
            log::error!("the agent panicked; restarting it");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
