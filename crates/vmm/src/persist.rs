//! Snapshots of a whole microVM and restores from them.
//!
//! [`create_snapshot`] writes a snapshot directory from a paused VM; [`restore`] builds a fresh
//! VM from one. A snapshot directory holds:
//!
//! - `vmstate`: the [`MicrovmState`] in the container of [`crate::snapshot`];
//! - `memory`: for a full snapshot, the whole guest memory (a sparse file); for a diff
//!   snapshot, only the pages that differ from the full memory file it names (same layout);
//! - `drive-<id>`: the frozen state of each writable drive: a copy-on-write overlay over the
//!   drive's base image, or a sparse copy of a raw image.
//!
//! Restoring maps the memory file MAP_PRIVATE (lazy, shared page cache) and the diff over it,
//! gives every writable drive a private overlay copied from the frozen one, and tells the
//! guest's vsock driver that its connections are gone. The format is in `docs/SNAPSHOTS.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_clock_data, KVM_CLOCK_HOST_TSC};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::{msr, tsc};
use crate::builder::{self, error_chain, BuildError, MemoryBase, MicroVm};
use crate::config::{DriveConfig, SerialConfig, VmConfig};
use crate::device_manager::MmioDeviceManager;
use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::block::overlay;
use crate::devices::virtio::mmio::TransportState;
use crate::fsutil;
use crate::snapshot::{self, SnapshotError};
use crate::vstate::memory::{self, GuestMemoryMmap, PageRuns};
use crate::vstate::vcpu::{TscRead, Vcpu, VcpuState, VcpuThreads};
use crate::vstate::vm::{Vm, VmState};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// The memory (or diff) file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The recorded working set's file name in a snapshot directory (optional).
pub const WORKING_SET_FILE: &str = "workingset";
/// The file of the working set's pages the VM had written (optional, a [`WorkingSet`] too):
/// every restore gives each its private copy ahead of the guest.
pub const WORKING_SET_WRITTEN_FILE: &str = "workingset-written";

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The request is wrong; `field` names the part at fault.
    #[error("{field}: {message}")]
    Request { field: String, message: String },
    /// The state file could not be written or read.
    #[error(transparent)]
    State(#[from] SnapshotError),
    /// Something else failed.
    #[error("{0}")]
    Failed(String),
}

fn failed(what: &str, e: &dyn std::error::Error) -> PersistError {
    PersistError::Failed(format!("{what}: {}", error_chain(e)))
}

fn request(field: impl Into<String>, message: impl Into<String>) -> PersistError {
    PersistError::Request {
        field: field.into(),
        message: message.into(),
    }
}

/// Everything a snapshot records besides memory and disks.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM ran with.
    pub config: VmConfig,
    pub memory: MemoryState,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: Option<SerialState>,
    /// One per virtio device, in attachment order.
    pub devices: Vec<TransportState>,
    /// One per drive, in configuration order.
    pub drives: Vec<DriveState>,
}

/// Where the guest memory of a snapshot is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryState {
    pub mib: u64,
    /// The full memory file: `memory` in the snapshot directory, or for a diff snapshot the
    /// absolute path of the full snapshot's.
    pub base: PathBuf,
    /// For a diff snapshot: the page runs the snapshot's `memory` file holds.
    pub diff: Option<PageRuns>,
}

/// A drive as a snapshot records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriveState {
    pub id: String,
    /// The read-only base image (absolute; for a raw writable drive, its frozen copy in the
    /// snapshot directory, relative).
    pub base: PathBuf,
    /// The frozen copy-on-write layer in the snapshot directory, if the drive had one.
    pub layer: Option<PathBuf>,
    pub read_only: bool,
}

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// Only the pages written since the last snapshot or restore.
    Diff,
}

/// What a snapshot took, for the caller to report.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    pub kind: SnapshotKind,
    pub memory_bytes: u64,
    pub devices_ms: f64,
    pub memory_ms: f64,
    pub disks_ms: f64,
    pub total_ms: f64,
}

/// The pages a VM restored from a snapshot touched first, recorded into the snapshot's
/// directory so later restores can fault them in ahead of the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkingSet {
    /// The guest memory size the runs are for.
    pub mib: u64,
    /// Page runs in the memory file layout: (first page, pages).
    pub runs: PageRuns,
}

/// What a restore did beyond building the VM, for the caller to report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// Bytes of the recorded working set's written pages given their copies before the vCPUs
    /// ran.
    pub copied_bytes: u64,
    /// Bytes of the recorded working set faulted in before the vCPUs ran (with `prefetch`).
    pub prefetched_bytes: u64,
    /// The time both took.
    pub prefetch_ms: f64,
    /// How the TSCs were loaded in step with kvmclock.
    pub clock_pairing: ClockPairing,
}

/// How a restore loaded the vCPUs' TSCs in step with kvmclock (see [`tsc`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockPairing {
    /// Exactly, through the host TSC KVM read kvmclock with, and the vCPUs' TSC offsets.
    HostTsc,
    /// By the VMM's timing of its own ioctls: the host has no KVM master clock, or KVM
    /// cannot set TSC offsets (before Linux 5.16).
    #[default]
    Timed,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn absolute(path: &Path) -> Result<PathBuf, PersistError> {
    std::path::absolute(path).map_err(|e| failed("cannot resolve a path", &e))
}

/// Writes a snapshot of `vm`, whose vCPUs must be paused, into the directory `dir` (created;
/// it must be empty or new). The devices are stopped while it is taken; the caller restarts
/// them with `vm.devices.resume_after_snapshot()` if the VM goes on.
pub fn create_snapshot(
    vm: &mut MicroVm,
    dir: &Path,
    kind: SnapshotKind,
) -> Result<SnapshotReport, PersistError> {
    let start = Instant::now();
    prepare_dir(dir)?;
    let dir = absolute(dir)?;
    let threads = vm
        .vcpus
        .as_ref()
        .ok_or_else(|| PersistError::Failed("the VM has no vCPUs".into()))?;

    let devices = vm
        .devices
        .quiesce()
        .map_err(|e| failed("cannot stop the devices", &e))?;
    let msr_indices = vm
        .kvm
        .get_msr_index_list()
        .map_err(|e| failed("cannot list the MSRs", &e))?
        .as_slice()
        .to_vec();
    let vcpus = threads
        .save_states(msr_indices)
        .map_err(|e| failed("cannot save the vCPUs", &e))?;
    let vm_state = vm
        .vm
        .save_state()
        .map_err(|e| failed("cannot save the VM", &e))?;
    let vcpus = tscs_as_of_clock(vcpus, &vm_state.clock, Instant::now());
    let serial = vm
        .serial
        .as_ref()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).state());
    let devices_done = start.elapsed();

    let memory_path = dir.join(MEMORY_FILE);
    let (memory_state, memory_bytes) = save_memory(vm, kind, &memory_path)?;
    let memory_done = start.elapsed();

    let drives = save_drives(&vm.config, &dir)?;
    let disks_done = start.elapsed();

    let state = MicrovmState {
        config: vm.config.clone(),
        memory: memory_state,
        vm: vm_state,
        vcpus,
        serial,
        devices,
        drives,
    };
    snapshot::write(&dir.join(STATE_FILE), &state)?;
    Ok(SnapshotReport {
        kind,
        memory_bytes,
        devices_ms: ms(devices_done),
        memory_ms: ms(memory_done - devices_done),
        disks_ms: ms(disks_done - memory_done),
        total_ms: ms(start.elapsed()),
    })
}

fn prepare_dir(dir: &Path) -> Result<(), PersistError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| request("path", format!("cannot create {}: {e}", dir.display())))?;
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| request("path", format!("cannot read {}: {e}", dir.display())))?;
    if entries.next().is_some() {
        return Err(request(
            "path",
            format!(
                "{} is not empty; a snapshot needs a new directory",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Saved vCPU states with each TSC as of `clock`, the kvmclock read after them (at
/// `clock_read`), so that a restore finds the two as far apart as the guest left them (see
/// [`tsc`]). With KVM's host TSC of that read, each TSC is exactly the host TSC plus its
/// offset; otherwise it is advanced by the time between the two reads.
fn tscs_as_of_clock(
    vcpus: Vec<(VcpuState, TscRead)>,
    clock: &kvm_clock_data,
    clock_read: Instant,
) -> Vec<VcpuState> {
    let host_tsc = (clock.flags & KVM_CLOCK_HOST_TSC != 0).then_some(clock.host_tsc);
    if host_tsc.is_none() {
        log::debug!("snapshot: no host TSC from KVM; each TSC is advanced by the VMM's timing");
    }
    vcpus
        .into_iter()
        .map(|(mut state, read)| {
            let paired = match (host_tsc, read.offset) {
                (Some(host_tsc), Some(offset)) => Some(tsc::tsc_at(host_tsc, offset)),
                _ => msr::tsc(&state.msrs)
                    .zip(state.tsc_khz)
                    .map(|(saved, khz)| {
                        tsc::advance(saved, khz, clock_read.saturating_duration_since(read.at))
                    }),
            };
            if let Some(value) = paired {
                msr::set_tsc(&mut state.msrs, value);
            }
            state
        })
        .collect()
}

/// Loads kvmclock and sets each restored vCPU's TSC as far past its saved value as kvmclock
/// is past its own (see [`tsc`]). The TSCs were loaded at `first_tsc`, with their MSRs; KVM
/// keeps later vCPUs' in step with the first one's.
fn restore_clocks(
    vm: &Vm,
    state: &MicrovmState,
    vcpus: &[Vcpu],
    first_tsc: Option<Instant>,
) -> Result<ClockPairing, PersistError> {
    let what = "cannot restore kvmclock and the TSCs";
    // Exact when KVM sets offsets on this host and reads kvmclock with its host TSC.
    let offsets_settable = vcpus.iter().all(|v| v.tsc_offset().is_some());
    if !offsets_settable {
        log::debug!(
            "restore: KVM sets no TSC offsets; kvmclock follows the TSCs by the VMM's timing"
        );
    } else {
        vm.restore_clock(&state.vm, Duration::ZERO)
            .map_err(|e| failed(what, &e))?;
        let now = vm.clock().map_err(|e| failed(what, &e))?;
        if now.flags & KVM_CLOCK_HOST_TSC != 0 {
            let since = Duration::from_nanos(now.clock.saturating_sub(state.vm.clock.clock));
            log::debug!(
                "restore: TSCs set from kvmclock's host TSC, {since:?} past the saved clock"
            );
            for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
                if let Some((tsc, khz)) = msr::tsc(&saved.msrs).zip(saved.tsc_khz) {
                    vcpu.set_tsc_offset(tsc::offset_for(tsc, khz, since, now.host_tsc))
                        .map_err(|e| failed(what, &e))?;
                }
            }
            return Ok(ClockPairing::HostTsc);
        }
        log::debug!(
            "restore: KVM read kvmclock without its host TSC (no master clock); kvmclock \
             follows the TSCs by the VMM's timing"
        );
    }
    let since_tsc = first_tsc.map(|t| t.elapsed()).unwrap_or_default();
    vm.restore_clock(&state.vm, since_tsc)
        .map_err(|e| failed(what, &e))?;
    Ok(ClockPairing::Timed)
}

/// Writes the memory file and moves the VM's memory base forward.
fn save_memory(
    vm: &mut MicroVm,
    kind: SnapshotKind,
    path: &Path,
) -> Result<(MemoryState, u64), PersistError> {
    let mib = vm.memory_mib;
    let kvm_log = if vm.vm.logs_dirty_pages() {
        Some(
            vm.vm
                .take_dirty_log(&vm.mem)
                .map_err(|e| failed("cannot read the dirty log", &e))?,
        )
    } else {
        None
    };
    let mem_err = |e: memory::MemoryError| failed("cannot write guest memory", &e);
    match kind {
        SnapshotKind::Diff => {
            let (Some(base), Some(kvm_log)) = (vm.memory_base.as_mut(), kvm_log) else {
                return Err(request(
                    "kind",
                    "a diff snapshot needs a full snapshot (or a restore) before it and \
                     dirty page tracking (machine.track_dirty_pages)",
                ));
            };
            memory::merge_dirty(&vm.mem, &mut base.differing, &kvm_log);
            let runs = memory::write_diff(&vm.mem, &base.differing, path, true).map_err(mem_err)?;
            let bytes = runs.iter().map(|(_, n)| n * memory::PAGE_SIZE).sum();
            Ok((
                MemoryState {
                    mib,
                    base: base.path.clone(),
                    diff: Some(runs),
                },
                bytes,
            ))
        }
        SnapshotKind::Full => {
            let bytes = match vm.memory_base.as_mut() {
                // Mapped from a file: the untouched pages are the file's, so start from a copy
                // of it and write the differing pages over.
                Some(base) if base.mapped => {
                    if let Some(kvm_log) = &kvm_log {
                        memory::merge_dirty(&vm.mem, &mut base.differing, kvm_log);
                    }
                    fsutil::copy_sparse(&base.path, path)
                        .map_err(|e| failed("cannot copy the base memory file", &e))?;
                    let runs = memory::write_diff(&vm.mem, &base.differing, path, false)
                        .map_err(mem_err)?;
                    runs.iter().map(|(_, n)| n * memory::PAGE_SIZE).sum()
                }
                _ => memory::write_full(&vm.mem, path).map_err(mem_err)?,
            };
            // Pages the VMM wrote before now are in the new file.
            memory::clear_vmm_dirty(&vm.mem);
            // A mapped VM stays mapped from the old file; the new file holds exactly what the
            // mapping shows, so later snapshots compare against it all the same.
            let mapped = vm.memory_base.as_ref().is_some_and(|b| b.mapped);
            vm.memory_base = Some(MemoryBase {
                path: path.to_owned(),
                differing: memory::empty_bitmap(&vm.mem),
                mapped,
            });
            Ok((
                MemoryState {
                    mib,
                    base: PathBuf::from(MEMORY_FILE),
                    diff: None,
                },
                bytes,
            ))
        }
    }
}

/// Freezes each writable drive into the snapshot directory.
fn save_drives(config: &VmConfig, dir: &Path) -> Result<Vec<DriveState>, PersistError> {
    config
        .drives
        .iter()
        .map(|d| {
            let base = absolute(&d.path)?;
            if d.read_only {
                return Ok(DriveState {
                    id: d.id.clone(),
                    base,
                    layer: None,
                    read_only: true,
                });
            }
            let name = PathBuf::from(format!("drive-{}", d.id));
            let frozen = dir.join(&name);
            match &d.overlay {
                Some(overlay_path) => {
                    overlay::copy(overlay_path, &frozen)
                        .map_err(|e| failed(&format!("cannot freeze drive {}", d.id), &e))?;
                    Ok(DriveState {
                        id: d.id.clone(),
                        base,
                        layer: Some(name),
                        read_only: false,
                    })
                }
                None => {
                    fsutil::copy_sparse(&d.path, &frozen)
                        .map_err(|e| failed(&format!("cannot freeze drive {}", d.id), &e))?;
                    Ok(DriveState {
                        id: d.id.clone(),
                        base: name,
                        layer: None,
                        read_only: false,
                    })
                }
            }
        })
        .collect()
}

/// Records the working set of `vm`, which must have been restored from a snapshot, into
/// `dir` (that snapshot's directory): the pages the VM has touched since its restore, and
/// apart those of them it wrote. Record it once the guest has done what later restores should
/// be quick to do (the agent answered, the app listens). Returns the recorded bytes, all and
/// written.
pub fn record_working_set(vm: &MicroVm, dir: &Path) -> Result<(u64, u64), PersistError> {
    if vm.memory_base.as_ref().is_none_or(|b| !b.mapped) {
        return Err(request(
            "action",
            "only a VM restored from a snapshot has a working set",
        ));
    }
    let state: MicrovmState = snapshot::read(&dir.join(STATE_FILE))?;
    if state.memory.mib != vm.memory_mib {
        return Err(request(
            "path",
            format!(
                "the snapshot has {} MiB of memory, this VM {} MiB",
                state.memory.mib, vm.memory_mib
            ),
        ));
    }
    let (runs, written) =
        memory::working_set(&vm.mem).map_err(|e| failed("cannot read the working set", &e))?;
    let bytes = |runs: &PageRuns| -> u64 {
        runs.iter()
            .map(|&(_, pages)| pages * memory::PAGE_SIZE)
            .sum()
    };
    let recorded = (bytes(&runs), bytes(&written));
    // The written runs first: a reader pairing a new working set with an older written file
    // only copies some pages early, which changes none of their bytes.
    for (file, runs) in [
        (WORKING_SET_WRITTEN_FILE, written),
        (WORKING_SET_FILE, runs),
    ] {
        snapshot::write(
            &dir.join(file),
            &WorkingSet {
                mib: vm.memory_mib,
                runs,
            },
        )?;
    }
    Ok(recorded)
}

/// Gets the memory of a VM restored from `dir` ready from the working set recorded there, if
/// any: the pages the recording session wrote get their private copies (always: it is cheap,
/// and saves the guest a second exit on each), and with `prefetch` every page of the working
/// set is faulted in (see [`memory::prefetch`]).
fn prepare_memory(
    dir: &Path,
    mem: &GuestMemoryMmap,
    mib: u64,
    prefetch: bool,
) -> Result<RestoreReport, PersistError> {
    let start = Instant::now();
    let load = |file: &str| -> Result<PageRuns, PersistError> {
        let path = dir.join(file);
        // Both files are optional; snapshots recorded before 2026-12-03 have no written one.
        if path.exists() {
            Ok(read_working_set(&path, mib)?.runs)
        } else {
            Ok(PageRuns::new())
        }
    };
    let written = load(WORKING_SET_WRITTEN_FILE)?;
    let read = if prefetch {
        load(WORKING_SET_FILE)?
    } else {
        PageRuns::new()
    };
    if written.is_empty() && read.is_empty() {
        return Ok(RestoreReport::default());
    }
    let done = memory::prefetch(mem, &read, &written)
        .map_err(|e| failed(&dir.join(WORKING_SET_FILE).display().to_string(), &e))?;
    Ok(RestoreReport {
        copied_bytes: done.copied,
        prefetched_bytes: done.read,
        prefetch_ms: ms(start.elapsed()),
        ..RestoreReport::default()
    })
}

/// The working set file at `path`, checked against the snapshot's `mib` of memory.
fn read_working_set(path: &Path, mib: u64) -> Result<WorkingSet, PersistError> {
    let set: WorkingSet = snapshot::read(path)?;
    if set.mib != mib {
        return Err(request(
            "path",
            format!(
                "{}: the working set is for {} MiB of memory, the snapshot has {mib} MiB",
                path.display(),
                set.mib
            ),
        ));
    }
    Ok(set)
}

/// What a restore may change from the snapshot's configuration: each clone needs its own
/// vsock socket, its own writable disks and its own console.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreOverrides {
    /// The host socket of the vsock device (required when the snapshot has one and its socket
    /// path is taken).
    #[serde(default)]
    pub vsock_uds_path: Option<PathBuf>,
    /// Per drive id: the new private overlay of a writable drive (required for each; it must
    /// not exist), or another path for a read-only one.
    #[serde(default)]
    pub drives: BTreeMap<String, DriveOverride>,
    /// The console; the snapshot's when absent.
    #[serde(default)]
    pub serial: Option<SerialConfig>,
}

/// A drive's override.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

fn resolve(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        dir.join(path)
    }
}

/// Builds a fresh VM from the snapshot in `dir`, with its vCPUs parked if `paused`. The pages
/// of the snapshot's recorded working set (if any) that its session wrote get their copies
/// first; with `prefetch`, the rest of the working set is faulted in too.
pub fn restore(
    dir: &Path,
    overrides: &RestoreOverrides,
    paused: bool,
    prefetch: bool,
) -> Result<(MicroVm, RestoreReport), PersistError> {
    let start = Instant::now();
    let dir = absolute(dir)?;
    let state: MicrovmState = snapshot::read(&dir.join(STATE_FILE))?;
    let read = start.elapsed();
    if state.vcpus.len() != usize::from(state.config.machine.vcpus) {
        return Err(request(
            "path",
            format!(
                "the snapshot has {} vCPU states for {} vCPUs",
                state.vcpus.len(),
                state.config.machine.vcpus
            ),
        ));
    }
    let config = restored_config(&state, &dir, overrides)?;
    config
        .validate()
        .map_err(|e| request(format!("restored configuration: {}", e.field), e.message))?;
    log::debug!("restore: preparing the drives");
    prepare_drives(&state, &dir, &config)?;

    let build = |e: BuildError| match e {
        BuildError::Device { field, message } => request(field, message),
        other => failed("cannot restore the VM", &other),
    };
    log::debug!("restore: mapping memory");
    let kvm = Kvm::new().map_err(|e| failed("cannot open /dev/kvm", &e))?;
    let base = resolve(&dir, &state.memory.base);
    let diff_path = dir.join(MEMORY_FILE);
    let diff = state
        .memory
        .diff
        .as_ref()
        .map(|runs| (diff_path.as_path(), runs));
    let mem = memory::restore(state.memory.mib, &base, diff)
        .map_err(|e| failed("cannot map the snapshot memory", &e))?;
    let report = prepare_memory(&dir, &mem, state.memory.mib, prefetch)?;
    let mapped = start.elapsed();
    log::debug!("restore: creating the VM");
    let mut vm = Vm::new(&kvm).map_err(|e| build(e.into()))?;
    vm.register_memory(&mem, true)
        .map_err(|e| build(e.into()))?;
    // The irqchip and every vCPU (its LAPIC above all) are restored before any device can
    // raise an interrupt: a restored device signals at once (vsock's transport reset), and an
    // interrupt that reached a LAPIC before KVM_SET_LAPIC would be overwritten. The driver
    // would then never see those used buffers, and with EVENT_IDX the device does not signal
    // that queue again until the driver catches up: the queue would stall for good.
    vm.restore_state(&state.vm)
        .map_err(|e| failed("cannot restore the irqchip or the PIT", &e))?;
    // Every vCPU exists before any TSC is loaded. KVM writes 0 to a new vCPU's TSC, and it
    // gives a TSC written within a second of the last write's expected value the same offset
    // (matching). Created in between, a vCPU's 0 would come between the saved TSCs, and the
    // next vCPU's write would no longer match: the vCPUs' TSCs would differ by the time
    // between their writes, and KVM would run no master clock (so no exact pairing, below).
    let mut vcpus = (0..state.vcpus.len())
        .map(|index| Vcpu::new(&vm, index as u8))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| build(e.into()))?;
    let mut first_tsc = None;
    for (vcpu, saved) in vcpus.iter_mut().zip(&state.vcpus) {
        let tsc_loaded = vcpu
            .restore_state(saved)
            .map_err(|e| failed("cannot restore a vCPU", &e))?;
        first_tsc.get_or_insert(tsc_loaded);
    }
    let clock_pairing = restore_clocks(&vm, &state, &vcpus, first_tsc)?;
    let report = RestoreReport {
        clock_pairing,
        ..report
    };
    let cpus = start.elapsed();
    let mut legacy = builder::legacy_devices(&config, &vm, state.serial.as_ref()).map_err(build)?;

    let mut devices = MmioDeviceManager::new();
    log::debug!("restore: restoring the devices");
    let virtio = builder::virtio_devices(&config).map_err(build)?;
    if virtio.len() != state.devices.len() {
        return Err(request(
            "path",
            format!(
                "the snapshot has {} virtio devices, its configuration gives {}",
                state.devices.len(),
                virtio.len()
            ),
        ));
    }
    for (device, saved) in virtio.into_iter().zip(&state.devices) {
        devices
            .attach(&vm, &mut legacy.mmio, &mem, device, Some(saved))
            .map_err(|e| failed("cannot restore a virtio device", &e))?;
    }

    let (shared, serial, boot_time) = legacy.into_shared();
    let attached = start.elapsed();
    // Logged before the vCPUs start: from then on the guest competes for the CPU with
    // everything left of the request, which a client waits for.
    log::info!(
        "restore: state read at {:.1} ms, memory mapped (and prefetched) at {:.1} ms, VM and vCPUs at {:.1} ms, \
         devices at {:.1} ms, starting the vCPUs",
        ms(read),
        ms(mapped),
        ms(cpus),
        ms(attached)
    );
    let threads = VcpuThreads::start(vcpus, shared.clone(), paused).map_err(|e| build(e.into()))?;
    let mut differing = memory::empty_bitmap(&mem);
    if let Some(runs) = &state.memory.diff {
        memory::mark_runs(&mem, &mut differing, runs);
    }
    let vm = MicroVm {
        mem,
        shared,
        boot_time,
        vcpus: Some(threads),
        devices,
        vcpu_count: config.machine.vcpus,
        memory_mib: config.machine.memory_mib,
        serial,
        memory_base: Some(MemoryBase {
            path: base,
            differing,
            mapped: true,
        }),
        restore_time: Some(start.elapsed()),
        config,
        kvm,
        vm,
    };
    Ok((vm, report))
}

/// The snapshot's configuration with the overrides applied and the drives pointed at their
/// restored backing.
fn restored_config(
    state: &MicrovmState,
    dir: &Path,
    overrides: &RestoreOverrides,
) -> Result<VmConfig, PersistError> {
    let mut config = state.config.clone();
    for id in overrides.drives.keys() {
        if !state.drives.iter().any(|d| &d.id == id) {
            return Err(request(
                format!("drives.{id}"),
                "the snapshot has no drive with this id",
            ));
        }
    }
    if state.drives.len() != config.drives.len() {
        return Err(request(
            "path",
            "the snapshot's drives do not match its configuration",
        ));
    }
    for (drive, saved) in config.drives.iter_mut().zip(&state.drives) {
        let o = overrides.drives.get(&saved.id).cloned().unwrap_or_default();
        let field = format!("drives.{}", saved.id);
        if saved.read_only {
            if o.overlay.is_some() {
                return Err(request(
                    format!("{field}.overlay"),
                    "the drive is read-only",
                ));
            }
            *drive = DriveConfig {
                path: o.path.unwrap_or_else(|| saved.base.clone()),
                overlay: None,
                ..drive.clone()
            };
        } else {
            if o.path.is_some() {
                return Err(request(
                    format!("{field}.path"),
                    "a writable drive restores over its snapshot base; give only an overlay",
                ));
            }
            let overlay = o.overlay.ok_or_else(|| {
                request(
                    format!("{field}.overlay"),
                    "a restored writable drive needs its own overlay file",
                )
            })?;
            if overlay.exists() {
                return Err(request(
                    format!("{field}.overlay"),
                    format!("{} exists; give a new path", overlay.display()),
                ));
            }
            *drive = DriveConfig {
                path: resolve(dir, &saved.base),
                overlay: Some(overlay),
                ..drive.clone()
            };
        }
    }
    if let Some(vsock) = config.vsock.as_mut() {
        if let Some(path) = &overrides.vsock_uds_path {
            vsock.uds_path = path.clone();
        }
    }
    if let Some(serial) = &overrides.serial {
        config.serial = serial.clone();
    }
    Ok(config)
}

/// Copies each writable drive's frozen layer to the new overlay.
fn prepare_drives(state: &MicrovmState, dir: &Path, config: &VmConfig) -> Result<(), PersistError> {
    for (saved, drive) in state.drives.iter().zip(&config.drives) {
        if let (Some(layer), Some(overlay_path)) = (&saved.layer, &drive.overlay) {
            overlay::copy(&resolve(dir, layer), overlay_path)
                .map_err(|e| failed(&format!("cannot set up drive {}", saved.id), &e))?;
        }
    }
    Ok(())
}
