//! The actions the control socket accepts, and the controller that carries them out.
//!
//! The wire format is one JSON object per line each way. A request names the protocol
//! version and an action; a response carries the same version and either a result or an error
//! that says what went wrong and, where one is at fault, which field:
//!
//! ```text
//! > {"version":1,"action":"configure","config":{...}}
//! < {"version":1,"ok":true,"result":{"state":"configured"}}
//! > {"version":1,"action":"describe"}
//! < {"version":1,"ok":true,"result":{"state":"running","boot_to_userspace_ms":412.3,...}}
//! > {"version":1,"action":"pause"}
//! < {"version":1,"ok":false,"error":{"field":null,"message":"the VM is not running"}}
//! ```
//!
//! Actions: `configure` (a `VmConfig`), `start`, `pause`, `resume`, `stop`, `describe`,
//! `snapshot` (`path`, `kind`: `full` or `diff`, `stop`: end the VM once it is written, as a
//! suspend does), `restore` (`path`, `overrides`, `paused`, `prefetch`: fault in the
//! snapshot's recorded working set first, default false; the working set's written pages are
//! copied ahead either way), which takes the place of `configure`
//! and `start`, and `record_working_set` (`path`: the snapshot directory the VM was restored
//! from):
//!
//! ```text
//! > {"version":1,"action":"snapshot","path":"/srv/snap/1","kind":"full"}
//! < {"version":1,"ok":true,"result":{"state":"running","snapshot":{"memory_bytes":...}}}
//! > {"version":1,"action":"restore","path":"/srv/snap/1","overrides":{"vsock_uds_path":"/run/c1.sock"}}
//! < {"version":1,"ok":true,"result":{"state":"running","restore_ms":4.1,...}}
//! > {"version":1,"action":"record_working_set","path":"/srv/snap/1"}
//! < {"version":1,"ok":true,"result":{"state":"running","working_set_bytes":9437184,"working_set_written_bytes":1048576}}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use std::path::{Path, PathBuf};

use crate::builder::{self, error_chain, MicroVm};
use crate::config::VmConfig;
use crate::persist::{self, PersistError, RestoreOverrides, SnapshotKind};
use crate::vstate::memory;
use crate::vstate::vcpu::GuestExit;

/// The control protocol version.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// An action on the VM.
#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    Configure {
        config: Value,
    },
    Start,
    Pause,
    Resume,
    Stop,
    Describe,
    Snapshot {
        path: PathBuf,
        #[serde(default = "full")]
        kind: SnapshotKind,
        #[serde(default)]
        stop: bool,
    },
    Restore {
        path: PathBuf,
        #[serde(default)]
        overrides: RestoreOverrides,
        #[serde(default)]
        paused: bool,
        #[serde(default)]
        prefetch: bool,
    },
    RecordWorkingSet {
        path: PathBuf,
    },
}

fn full() -> SnapshotKind {
    SnapshotKind::Full
}

#[derive(Debug, Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    rest: Value,
}

/// A failed action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct RpcError {
    pub field: Option<String>,
    pub message: String,
}

impl RpcError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }
}

/// The VM's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    NotConfigured,
    Configured,
    Running,
    Paused,
    Exited,
}

/// Owns the VM and carries out actions.
#[derive(Debug)]
pub struct Controller {
    config: Option<VmConfig>,
    vm: Option<MicroVm>,
    state: VmState,
    exit: Option<GuestExit>,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    /// Nothing configured yet.
    pub fn new() -> Self {
        Self {
            config: None,
            vm: None,
            state: VmState::NotConfigured,
            exit: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// How the guest ended, once it has.
    pub fn exit(&self) -> Option<&GuestExit> {
        self.exit.as_ref()
    }

    /// The running VM, if any.
    pub fn vm(&self) -> Option<&MicroVm> {
        self.vm.as_ref()
    }

    /// Handles one request line and returns the response line (without newline).
    pub fn handle_line(&mut self, line: &str) -> String {
        let result = parse_request(line).and_then(|action| self.handle(action));
        let response = match result {
            Ok(result) => json!({"version": PROTOCOL_VERSION, "ok": true, "result": result}),
            Err(error) => json!({"version": PROTOCOL_VERSION, "ok": false, "error": error}),
        };
        response.to_string()
    }

    /// Carries out one action.
    pub fn handle(&mut self, action: Action) -> Result<Value, RpcError> {
        match action {
            Action::Configure { config } => self.configure(&config.to_string()),
            Action::Start => self.start(),
            Action::Pause => self.pause(),
            Action::Resume => self.resume(),
            Action::Stop => self.stop(),
            Action::Describe => Ok(self.describe()),
            Action::Snapshot { path, kind, stop } => self.snapshot(&path, kind, stop),
            Action::Restore {
                path,
                overrides,
                paused,
                prefetch,
            } => self.restore(&path, &overrides, paused, prefetch),
            Action::RecordWorkingSet { path } => self.record_working_set(&path),
        }
    }

    /// Writes a snapshot into the new directory `dir`. A running VM is paused for it and runs
    /// on afterwards; with `stop`, the VM ends once the snapshot is on disk (a suspend).
    pub fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
        stop: bool,
    ) -> Result<Value, RpcError> {
        let was_running = match self.state {
            VmState::Running => true,
            VmState::Paused => false,
            _ => return Err(RpcError::new("the VM is not running")),
        };
        let vm = self
            .vm
            .as_mut()
            .ok_or_else(|| RpcError::new("the VM is not running"))?;
        let threads = vm
            .vcpus
            .as_ref()
            .ok_or_else(|| RpcError::new("the VM has no vCPUs"))?;
        let start = std::time::Instant::now();
        threads.pause().map_err(|e| RpcError::new(e.to_string()))?;
        let pause_ms = start.elapsed().as_secs_f64() * 1000.0;
        let result = persist::create_snapshot(vm, dir, kind);
        if result.is_ok() && stop {
            self.stop()?;
        } else {
            vm.devices.resume_after_snapshot();
            if was_running {
                if let Some(threads) = vm.vcpus.as_ref() {
                    threads.resume();
                }
            }
        }
        let report = result.map_err(persist_error)?;
        Ok(json!({"state": self.state, "pause_ms": pause_ms, "snapshot": report}))
    }

    /// Builds the VM from the snapshot in `dir` instead of a configuration.
    pub fn restore(
        &mut self,
        dir: &Path,
        overrides: &RestoreOverrides,
        paused: bool,
        prefetch: bool,
    ) -> Result<Value, RpcError> {
        if !matches!(self.state, VmState::NotConfigured | VmState::Configured) {
            return Err(RpcError::new("the VM has already started"));
        }
        let (vm, report) =
            persist::restore(dir, overrides, paused, prefetch).map_err(persist_error)?;
        let restore_ms = vm.restore_time.map(|d| d.as_secs_f64() * 1000.0);
        self.config = Some(vm.config.clone());
        self.vm = Some(vm);
        self.state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        Ok(json!({
            "state": self.state,
            "restore_ms": restore_ms,
            "copied_bytes": report.copied_bytes,
            "prefetched_bytes": report.prefetched_bytes,
            "prefetch_ms": report.prefetch_ms,
            "clock_pairing": report.clock_pairing,
        }))
    }

    /// Records the working set of this restored VM into the snapshot directory `dir`.
    pub fn record_working_set(&mut self, dir: &Path) -> Result<Value, RpcError> {
        let vm = match (&self.state, &self.vm) {
            (VmState::Running | VmState::Paused, Some(vm)) => vm,
            _ => return Err(RpcError::new("the VM is not running")),
        };
        let (bytes, written) = persist::record_working_set(vm, dir).map_err(persist_error)?;
        Ok(json!({
            "state": self.state,
            "working_set_bytes": bytes,
            "working_set_written_bytes": written,
        }))
    }

    /// Takes a configuration (JSON text); only before the VM starts.
    pub fn configure(&mut self, json: &str) -> Result<Value, RpcError> {
        if !matches!(self.state, VmState::NotConfigured | VmState::Configured) {
            return Err(RpcError::new("the VM has already started"));
        }
        let config = VmConfig::from_json(json).map_err(|e| RpcError {
            field: Some(e.field),
            message: e.message,
        })?;
        self.config = Some(config);
        self.state = VmState::Configured;
        Ok(json!({"state": self.state}))
    }

    /// Builds and boots the configured VM.
    pub fn start(&mut self) -> Result<Value, RpcError> {
        if self.state != VmState::Configured {
            return Err(RpcError::new(match self.state {
                VmState::NotConfigured => "configure the VM first",
                _ => "the VM has already started",
            }));
        }
        let config = self
            .config
            .as_ref()
            .ok_or_else(|| RpcError::new("configure the VM first"))?;
        let vm = builder::build_and_start(config).map_err(|e| match e {
            builder::BuildError::Device { field, message } => RpcError {
                field: Some(field),
                message,
            },
            other => RpcError::new(error_chain(&other)),
        })?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(json!({"state": self.state}))
    }

    /// Stops every vCPU at a consistent point.
    pub fn pause(&mut self) -> Result<Value, RpcError> {
        if self.state != VmState::Running {
            return Err(RpcError::new("the VM is not running"));
        }
        let threads = self
            .vm
            .as_ref()
            .and_then(|vm| vm.vcpus.as_ref())
            .ok_or_else(|| RpcError::new("the VM has no vCPUs"))?;
        threads.pause().map_err(|e| RpcError::new(e.to_string()))?;
        self.state = VmState::Paused;
        Ok(json!({"state": self.state}))
    }

    /// Lets a paused VM run again.
    pub fn resume(&mut self) -> Result<Value, RpcError> {
        if self.state != VmState::Paused {
            return Err(RpcError::new("the VM is not paused"));
        }
        if let Some(threads) = self.vm.as_ref().and_then(|vm| vm.vcpus.as_ref()) {
            threads.resume();
        }
        self.state = VmState::Running;
        Ok(json!({"state": self.state}))
    }

    /// Stops the VM for good; the VMM then exits.
    pub fn stop(&mut self) -> Result<Value, RpcError> {
        if let Some(threads) = self.vm.as_mut().and_then(|vm| vm.vcpus.take()) {
            threads.stop();
        }
        if self.exit.is_none() {
            self.exit = Some(GuestExit::Shutdown);
        }
        self.state = VmState::Exited;
        Ok(json!({"state": self.state}))
    }

    /// Records that the guest ended (the vCPUs said so) and stops the vCPUs.
    pub fn on_guest_exit(&mut self) -> GuestExit {
        let reported = self.vm.as_ref().and_then(|vm| {
            vm.shared
                .exit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        });
        let exit = reported.unwrap_or(GuestExit::Shutdown);
        let _ = self.stop();
        self.exit = Some(exit.clone());
        exit
    }

    /// State, boot time, exit counters and memory footprint.
    pub fn describe(&self) -> Value {
        let mut out = json!({"state": self.state});
        if let Some(c) = &self.config {
            out["vcpus"] = json!(c.machine.vcpus);
            out["memory_mib"] = json!(c.machine.memory_mib);
        }
        if let Some(exit) = &self.exit {
            out["exit"] = json!(match exit {
                GuestExit::Shutdown => "shutdown".to_owned(),
                GuestExit::Error(e) => format!("error: {e}"),
            });
        }
        let Some(vm) = &self.vm else {
            return out;
        };
        if let Some(d) = vm.restore_time {
            out["restore_ms"] = json!(d.as_secs_f64() * 1000.0);
        }
        out["boot_to_userspace_ms"] = json!(vm
            .boot_time
            .to_userspace()
            .map(|d| d.as_secs_f64() * 1000.0));
        let m = &vm.shared.metrics;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        out["metrics"] = json!({
            "io_exits": load(&m.io_exits),
            "mmio_exits": load(&m.mmio_exits),
            "unhandled_exits": load(&m.unhandled_exits),
        });
        let rss = process_rss_bytes().unwrap_or(0);
        let guest = memory::resident_bytes(&vm.mem);
        out["memory"] = json!({
            "vmm_rss_bytes": rss,
            "guest_resident_bytes": guest,
            "vmm_overhead_bytes": rss.saturating_sub(guest),
        });
        out
    }
}

/// The client side: sends one request (`{"action": ...}`; the version is added) to the control
/// socket at `sock` and returns the response's `result`, or its error as an `RpcError`.
pub fn call(sock: &Path, request: &Value) -> Result<Value, RpcError> {
    use std::io::{BufRead, BufReader, Write};
    let io = |e: std::io::Error| RpcError::new(format!("control socket {}: {e}", sock.display()));
    let mut line = request.clone();
    line["version"] = json!(PROTOCOL_VERSION);
    let mut stream = std::os::unix::net::UnixStream::connect(sock).map_err(io)?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io)?;
    let mut response = String::new();
    BufReader::new(stream)
        .read_line(&mut response)
        .map_err(io)?;
    let mut response: Value = serde_json::from_str(&response)
        .map_err(|e| RpcError::new(format!("bad response from {}: {e}", sock.display())))?;
    if response["ok"] == json!(true) {
        return Ok(response["result"].take());
    }
    Err(serde_json::from_value(response["error"].take())
        .unwrap_or_else(|_| RpcError::new(format!("bad error response: {response}"))))
}

fn persist_error(e: PersistError) -> RpcError {
    match e {
        PersistError::Request { field, message } => RpcError {
            field: Some(field),
            message,
        },
        other => RpcError::new(error_chain(&other)),
    }
}

fn parse_request(line: &str) -> Result<Action, RpcError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RpcError::new(format!(
            "request of {} bytes is over the {MAX_REQUEST_BYTES}-byte limit",
            line.len()
        )));
    }
    let envelope: Envelope = serde_json::from_str(line).map_err(|e| RpcError {
        field: None,
        message: format!("malformed request: {e}"),
    })?;
    if envelope.version != PROTOCOL_VERSION {
        return Err(RpcError {
            field: Some("version".to_owned()),
            message: format!(
                "protocol version {} is not supported (this VMM speaks {PROTOCOL_VERSION})",
                envelope.version
            ),
        });
    }
    serde_json::from_value(envelope.rest).map_err(|e| RpcError {
        field: Some("action".to_owned()),
        message: e.to_string(),
    })
}

/// This process's resident set size, from /proc/self/status.
pub fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(c: &mut Controller, line: &str) -> Value {
        serde_json::from_str(&c.handle_line(line)).expect("response is JSON")
    }

    #[test]
    fn test_describe_before_configure_reports_state() {
        let mut c = Controller::new();

        let r = response(&mut c, r#"{"version":1,"action":"describe"}"#);

        assert_eq!(r["ok"], true);
        assert_eq!(r["result"]["state"], "not_configured");
    }

    #[test]
    fn test_wrong_version_rejected_with_field() {
        let mut c = Controller::new();

        let r = response(&mut c, r#"{"version":9,"action":"describe"}"#);

        assert_eq!(r["ok"], false);
        assert_eq!(r["error"]["field"], "version");
    }

    #[test]
    fn test_unknown_action_rejected() {
        let mut c = Controller::new();

        let r = response(&mut c, r#"{"version":1,"action":"explode"}"#);

        assert_eq!(r["ok"], false);
        assert_eq!(r["error"]["field"], "action");
    }

    #[test]
    fn test_garbage_line_rejected() {
        let mut c = Controller::new();

        let r = response(&mut c, "\u{0}not json");

        assert_eq!(r["ok"], false);
    }

    #[test]
    fn test_configure_invalid_memory_names_field() {
        let mut c = Controller::new();
        let line = r#"{"version":1,"action":"configure","config":{"version":1,"machine":{"vcpus":1,"memory_mib":8},"boot":{"kernel":"/k"}}}"#;

        let r = response(&mut c, line);

        assert_eq!(r["error"]["field"], "machine.memory_mib");
        assert_eq!(c.state(), VmState::NotConfigured);
    }

    #[test]
    fn test_start_before_configure_fails() {
        let mut c = Controller::new();

        let r = response(&mut c, r#"{"version":1,"action":"start"}"#);

        assert_eq!(r["ok"], false);
    }

    #[test]
    fn test_pause_when_not_running_fails() {
        let mut c = Controller::new();

        assert!(c.pause().is_err());
        assert!(c.resume().is_err());
    }

    #[test]
    fn test_start_with_missing_kernel_reports_error_and_stays_configured() {
        let mut c = Controller::new();
        c.configure(r#"{"version":1,"machine":{"vcpus":1,"memory_mib":128},"boot":{"kernel":"/nonexistent/vmlinux"}}"#)
            .expect("configure");

        let err = c.start().expect_err("no kernel");

        assert!(
            err.to_string().contains("/nonexistent/vmlinux") || err.to_string().contains("kvm")
        );
        assert_eq!(c.state(), VmState::Configured);
    }
}
