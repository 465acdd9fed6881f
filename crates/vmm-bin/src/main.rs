//! `hearth-vmm`: one process per microVM.
//!
//! `hearth-vmm --config vm.json` boots the VM at once; `hearth-vmm --api-sock ctl.sock` waits
//! for `configure` and `start` on its control socket (both may be given). The control socket
//! takes the line-delimited JSON requests of `vmm::rpc`. The process exits 0 when the guest
//! powers off (or a `stop` request ends it) and 1 when the guest fails or the VM cannot start.

mod api_server;
mod logger;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm::rpc::{Controller, VmState};
use vmm::vstate::vcpu::GuestExit;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const USAGE: &str = "\
The Hearth microVM monitor

Usage: hearth-vmm [--config <FILE>] [--api-sock <PATH>] [--log-level <LEVEL>]

Options:
      --config <FILE>      A VM configuration file (JSON, see `vmm::config`); the VM boots at once
      --api-sock <PATH>    The control socket to serve
      --log-level <LEVEL>  Log level: error, warn, info, debug or trace [env: HEARTH_LOG] [default: warn]
  -h, --help               Print help
  -V, --version            Print version
";

/// The command line. Parsed with `lexopt` rather than a declarative parser: every restore
/// spawns a VMM, and a parser's code runs for the first time in each fresh process (see
/// `docs/VMM.md`).
#[derive(Debug, PartialEq, Eq)]
struct Args {
    config: Option<PathBuf>,
    api_sock: Option<PathBuf>,
    log_level: log::LevelFilter,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Run(Args),
    Help,
    Version,
}

/// Parses `args` (without the program name); `env_level` is `HEARTH_LOG`, which
/// `--log-level` overrides.
fn parse_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env_level: Option<std::ffi::OsString>,
) -> Result<Command, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut config = None;
    let mut api_sock = None;
    let mut level = env_level;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("config") => config = Some(PathBuf::from(parser.value()?)),
            Long("api-sock") => api_sock = Some(PathBuf::from(parser.value()?)),
            Long("log-level") => level = Some(parser.value()?),
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            other => return Err(other.unexpected()),
        }
    }
    let log_level = match level {
        None => log::LevelFilter::Warn,
        Some(text) => parse_level(&text.to_string_lossy())
            .map_err(|e| format!("invalid value for --log-level: {e}"))?,
    };
    Ok(Command::Run(Args {
        config,
        api_sock,
        log_level,
    }))
}

/// Wakes the main loop: the VM started or stopped through the control socket.
#[derive(Debug)]
pub struct Shared {
    pub controller: Mutex<Controller>,
    pub wake: EventFd,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("unknown log level {s:?}"))
}

const WAKE: u64 = 1;
const GUEST_EXIT: u64 = 2;

fn main() {
    let parsed = parse_args(std::env::args_os().skip(1), std::env::var_os("HEARTH_LOG"));
    let args = match parsed {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return;
        }
        Ok(Command::Version) => {
            println!("hearth-vmm {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("hearth-vmm: {e}\nFor more information, try '--help'.");
            std::process::exit(2);
        }
    };
    logger::init(args.log_level);
    match run(&args) {
        Ok(GuestExit::Shutdown) => std::process::exit(0),
        Ok(GuestExit::Error(e)) => {
            eprintln!("hearth-vmm: the guest failed: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("hearth-vmm: {e}");
            std::process::exit(1);
        }
    }
}

/// Raises the open-file limit to its hard maximum: every vsock connection holds a host socket.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the `rlimit` we pass, which lives on
    // this stack frame for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::warn!("cannot raise the open-file limit");
            }
        }
    }
}

fn run(args: &Args) -> Result<GuestExit, String> {
    if args.config.is_none() && args.api_sock.is_none() {
        return Err("give --config, --api-sock, or both".to_owned());
    }
    raise_nofile_limit();
    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let shared = Arc::new(Shared {
        controller: Mutex::new(Controller::new()),
        wake,
    });
    if let Some(path) = &args.api_sock {
        api_server::spawn(path, shared.clone())
            .map_err(|e| format!("cannot serve {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut controller = lock(&shared);
        controller.configure(&text).map_err(|e| e.to_string())?;
        controller.start().map_err(|e| e.to_string())?;
    }
    wait_for_exit(&shared)
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Controller> {
    shared.controller.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sleeps until the guest ends or a `stop` request ends the VM.
fn wait_for_exit(shared: &Shared) -> Result<GuestExit, String> {
    let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
    let add = |fd: i32, data: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
            .map_err(|e| format!("epoll: {e}"))
    };
    add(std::os::fd::AsRawFd::as_raw_fd(&shared.wake), WAKE)?;
    let mut watching_guest = false;
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        {
            let controller = lock(shared);
            if controller.state() == VmState::Exited {
                return Ok(controller.exit().cloned().unwrap_or(GuestExit::Shutdown));
            }
            if let (false, Some(vm)) = (watching_guest, controller.vm()) {
                add(
                    std::os::fd::AsRawFd::as_raw_fd(&vm.shared.exit_evt),
                    GUEST_EXIT,
                )?;
                watching_guest = true;
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll: {e}")),
        };
        for event in &events[..n] {
            match event.data() {
                WAKE => {
                    let _ = shared.wake.read();
                }
                GUEST_EXIT => {
                    let exit = lock(shared).on_guest_exit();
                    log::info!("guest ended: {exit:?}");
                    return Ok(exit);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn parse(args: &[&str], env: Option<&str>) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from), env.map(OsString::from))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn test_parse_args_takes_both_value_forms() {
        let parsed = parse(
            &[
                "--config",
                "vm.json",
                "--api-sock=ctl.sock",
                "--log-level",
                "debug",
            ],
            None,
        );

        assert_eq!(
            parsed,
            Ok(Command::Run(Args {
                config: Some(PathBuf::from("vm.json")),
                api_sock: Some(PathBuf::from("ctl.sock")),
                log_level: log::LevelFilter::Debug,
            }))
        );
    }

    #[test]
    fn test_parse_args_level_defaults_to_warn_and_the_flag_beats_the_environment() {
        let level = |args: &[&str], env| match parse(args, env) {
            Ok(Command::Run(args)) => args.log_level,
            other => panic!("{other:?}"),
        };

        assert_eq!(level(&[], None), log::LevelFilter::Warn);
        assert_eq!(level(&[], Some("info")), log::LevelFilter::Info);
        assert_eq!(
            level(&["--log-level", "trace"], Some("info")),
            log::LevelFilter::Trace
        );
    }

    #[test]
    fn test_parse_args_help_and_version() {
        assert_eq!(parse(&["--help"], None), Ok(Command::Help));
        assert_eq!(parse(&["-V"], None), Ok(Command::Version));
    }

    #[test]
    fn test_parse_args_rejects_unknown_options_missing_values_and_bad_levels() {
        let error = |args: &[&str], env| parse(args, env).expect_err("must fail");

        assert!(error(&["--bogus"], None).contains("--bogus"));
        assert!(error(&["stray"], None).contains("stray"));
        assert!(error(&["--config"], None).contains("--config"));
        assert!(error(&["--log-level", "loud"], None).contains("loud"));
        assert!(error(&[], Some("loud")).contains("loud"));
    }
}
