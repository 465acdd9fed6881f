//! vCPUs: their setup (CPUID, MSRs, FPU, LAPIC, boot registers), the thread each one runs in,
//! and the control every VMM action goes through: run, pause at a consistent point, resume,
//! stop.
//!
//! A vCPU thread loops on KVM_RUN and routes port-I/O and MMIO exits to the buses. To take a
//! vCPU out of KVM_RUN the controller sends it a signal (`SIGRTMIN`), whose empty handler makes
//! KVM_RUN return EINTR; the thread then looks at the requested state. A signal that lands just
//! before KVM_RUN would be missed, so the controller repeats it until every vCPU acknowledges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::x86_64::boot::Entry;
use crate::arch::x86_64::{cpuid, lapic, msr, regs, tsc};
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMemoryMmap;

/// Why a vCPU could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("cannot {what} for vCPU {index}")]
    Kvm {
        what: &'static str,
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Register setup failed.
    #[error("cannot set up the registers of vCPU {index}")]
    Regs {
        index: u8,
        #[source]
        source: regs::RegsError,
    },
    /// MSR setup failed.
    #[error("cannot set up the MSRs of vCPU {index}")]
    Msr {
        index: u8,
        #[source]
        source: msr::MsrError,
    },
    /// LAPIC setup failed.
    #[error("cannot set up the local APIC of vCPU {index}")]
    Lapic {
        index: u8,
        #[source]
        source: lapic::LapicError,
    },
    /// The vCPU thread could not start.
    #[error("cannot start the thread of vCPU {index}")]
    Thread {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    /// The vCPUs did not stop in time.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// A state request needs the vCPUs paused.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// Saving a vCPU's state failed.
    #[error("cannot save the state of vCPU {index}: {message}")]
    Save { index: u8, message: String },
}

/// Everything KVM holds for one vCPU, as a snapshot records it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    /// The guest TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// How the guest ended, as the vCPUs saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off or reset the machine (i8042 reset, triple fault, system event).
    Shutdown,
    /// KVM failed to run the guest.
    Error(String),
}

/// Exit counters, for `describe`.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub unhandled_exits: AtomicU64,
}

/// What every vCPU thread shares.
#[derive(Debug)]
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    /// Signalled when the guest ends; `exit` says how.
    pub exit_evt: EventFd,
    pub exit: Mutex<Option<GuestExit>>,
    pub metrics: VcpuMetrics,
}

impl VcpuShared {
    /// Records how the guest ended (the first report wins) and signals the exit event.
    pub fn report_exit(&self, exit: GuestExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
        }
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("cannot signal the VM exit: {e}");
        }
    }
}

/// One vCPU before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    /// Whether KVM scales this vCPU's TSC: a snapshot restored on a host of another TSC
    /// frequency. Its TSC is then no longer the host's plus an offset.
    tsc_scaled: bool,
}

/// How a vCPU's TSC was read for a snapshot, to pair it with kvmclock (see
/// [`crate::arch::x86_64::tsc`]).
#[derive(Debug, Clone, Copy)]
pub struct TscRead {
    /// Just after KVM_GET_MSRS read it.
    pub at: Instant,
    /// The vCPU's TSC offset, unless the host cannot report it or the TSC is scaled.
    pub offset: Option<u64>,
}

/// The error of a failed KVM call `what` on vCPU `index`.
fn kvm_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        what,
        index,
        source,
    }
}

impl Vcpu {
    /// Creates vCPU `index`.
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                what: "create",
                index,
                source,
            })?;
        Ok(Self {
            fd,
            index,
            tsc_scaled: false,
        })
    }

    /// Reads the vCPU's whole state, and how its TSC was read. Call it only
    /// between two KVM_RUNs: it first lets KVM finish an instruction whose port or MMIO access
    /// the VMM has just served (an `immediate_exit` run), so the saved registers hold its
    /// result.
    pub fn save_state(&mut self, msr_indices: &[u32]) -> Result<(VcpuState, TscRead), VcpuError> {
        let index = self.index;
        let kvm = |what| kvm_err(index, what);
        self.fd.set_kvm_immediate_exit(1);
        let flushed = match self.fd.run() {
            Err(e) if e.errno() != libc::EINTR => Err(e),
            _ => Ok(()),
        };
        self.fd.set_kvm_immediate_exit(0);
        flushed.map_err(kvm("finish the pending exit"))?;
        let fd = &self.fd;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read CPUID"))?
            .as_slice()
            .to_vec();
        let msrs =
            msr::save_msrs(fd, msr_indices).map_err(|source| VcpuError::Msr { index, source })?;
        let tsc_read = TscRead {
            at: Instant::now(),
            offset: self.tsc_offset(),
        };
        let state = VcpuState {
            cpuid,
            msrs,
            mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
            regs: fd.get_regs().map_err(kvm("read the registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read the special registers"))?,
            xsave: fd.get_xsave().map_err(kvm("read the XSAVE area"))?,
            xcrs: fd.get_xcrs().map_err(kvm("read the XCRs"))?,
            debug_regs: fd
                .get_debug_regs()
                .map_err(kvm("read the debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("read the local APIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm("read the pending events"))?,
            tsc_khz: fd.get_tsc_khz().ok(),
        };
        Ok((state, tsc_read))
    }

    /// Loads a state saved by [`Vcpu::save_state`], in the order KVM needs: CPUID first, the
    /// LAPIC before the MSRs (the TSC deadline timer), the pending events last. Returns when
    /// the TSC took its saved value (see [`crate::arch::x86_64::tsc`]).
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<Instant, VcpuError> {
        let index = self.index;
        let kvm = |what| kvm_err(index, what);
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                match self.fd.set_tsc_khz(khz) {
                    Ok(()) => self.tsc_scaled = true,
                    Err(e) => log::warn!("vCPU {index}: cannot set the TSC to {khz} kHz: {e}"),
                }
            }
        }
        let fd = &self.fd;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::Save {
            index,
            message: format!("{} CPUID entries are too many", state.cpuid.len()),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_regs(&state.regs).map_err(kvm("set the registers"))?;
        fd.set_sregs(&state.sregs)
            .map_err(kvm("set the special registers"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave`, the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("set the XSAVE area"))?;
        fd.set_xcrs(&state.xcrs).map_err(kvm("set the XCRs"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(kvm("set the debug registers"))?;
        fd.set_lapic(&state.lapic)
            .map_err(kvm("set the local APIC"))?;
        msr::restore_msrs(fd, &state.msrs).map_err(|source| VcpuError::Msr { index, source })?;
        let tsc_loaded = Instant::now();
        fd.set_vcpu_events(&state.events)
            .map_err(kvm("set the pending events"))?;
        Ok(tsc_loaded)
    }

    /// The vCPU's TSC offset: `None` if KVM cannot report it (before Linux 5.16) or scales
    /// the TSC, when the guest TSC is not the host's plus the offset.
    pub fn tsc_offset(&self) -> Option<u64> {
        if self.tsc_scaled {
            return None;
        }
        tsc::offset(&self.fd)
    }

    /// Sets the vCPU's TSC offset (see [`crate::arch::x86_64::tsc`]).
    pub fn set_tsc_offset(&self, offset: u64) -> Result<(), VcpuError> {
        tsc::set_offset(&self.fd, offset).map_err(kvm_err(self.index, "set the TSC offset"))
    }

    /// Sets CPUID, MSRs, FPU, XCR0 and LAPIC; on the boot vCPU also the entry registers.
    pub fn configure(
        &self,
        supported: &CpuId,
        count: u8,
        mem: &GuestMemoryMmap,
        entry: Option<&Entry>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let guest_cpuid = cpuid::for_vcpu(supported, index, count);
        self.fd
            .set_cpuid2(&guest_cpuid)
            .map_err(|source| VcpuError::Kvm {
                what: "set CPUID",
                index,
                source,
            })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msr { index, source })?;
        regs::setup_fpu(&self.fd).map_err(|source| VcpuError::Regs { index, source })?;
        regs::setup_xcr0(&self.fd, cpuid::xcr0_supported(&guest_cpuid))
            .map_err(|source| VcpuError::Regs { index, source })?;
        lapic::setup_lint(&self.fd).map_err(|source| VcpuError::Lapic { index, source })?;
        if let Some(entry) = entry {
            regs::setup_boot_vcpu(&self.fd, mem, entry)
                .map_err(|source| VcpuError::Regs { index, source })?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requested {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct ControlState {
    requested: Requested,
    parked: usize,
    exited: usize,
    /// A state save in progress: every parked vCPU fills its slot.
    save: Option<SaveRequest>,
}

#[derive(Debug)]
struct SaveRequest {
    msr_indices: Arc<Vec<u32>>,
    results: Vec<Option<Result<(VcpuState, TscRead), VcpuError>>>,
}

/// The run/pause/stop state all vCPU threads follow.
#[derive(Debug)]
struct Control {
    state: Mutex<ControlState>,
    cond: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread between KVM_RUNs: parks while paused, saving its state when
    /// asked to; false means stop.
    fn may_run(&self, vcpu: &mut Vcpu) -> bool {
        let mut state = self.lock();
        if state.requested == Requested::Pause {
            state.parked += 1;
            self.cond.notify_all();
            while state.requested == Requested::Pause {
                let index = usize::from(vcpu.index);
                let wanted = state.save.as_ref().and_then(|save| {
                    matches!(save.results.get(index), Some(None)).then(|| save.msr_indices.clone())
                });
                if let Some(msr_indices) = wanted {
                    drop(state);
                    let result = vcpu.save_state(&msr_indices);
                    state = self.lock();
                    if let Some(slot) = state.save.as_mut().and_then(|s| s.results.get_mut(index)) {
                        *slot = Some(result);
                    }
                    self.cond.notify_all();
                    continue;
                }
                state = self.cond.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.parked -= 1;
        }
        state.requested == Requested::Run
    }

    fn thread_exited(&self) {
        let mut state = self.lock();
        state.exited += 1;
        self.cond.notify_all();
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// The running vCPU threads.
#[derive(Debug)]
pub struct VcpuThreads {
    threads: Vec<JoinHandle<()>>,
    control: Arc<Control>,
}

/// How long `pause` waits for every vCPU.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
const KICK_INTERVAL: Duration = Duration::from_millis(1);

impl VcpuThreads {
    /// Starts one thread per vCPU, running, or parked with `paused` (then
    /// [`VcpuThreads::resume`] lets them run).
    pub fn start(
        vcpus: Vec<Vcpu>,
        shared: Arc<VcpuShared>,
        paused: bool,
    ) -> Result<Self, VcpuError> {
        install_kick_handler();
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                requested: if paused {
                    Requested::Pause
                } else {
                    Requested::Run
                },
                parked: 0,
                exited: 0,
                save: None,
            }),
            cond: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let index = vcpu.index;
            let control = control.clone();
            let shared = shared.clone();
            let handle = crate::thread::spawn(format!("vcpu{index}"), move || {
                run_loop(vcpu, &control, &shared);
                control.thread_exited();
            })
            .map_err(|source| VcpuError::Thread { index, source })?;
            threads.push(handle);
        }
        Ok(Self { threads, control })
    }

    fn kick_all(&self) {
        for t in &self.threads {
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops every vCPU between two KVM_RUNs and waits until all are parked (or gone).
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.control.lock().requested = Requested::Pause;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            {
                let state = self.control.lock();
                if state.parked + state.exited >= self.threads.len() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout(PAUSE_TIMEOUT));
            }
            self.kick_all();
            std::thread::sleep(KICK_INTERVAL);
        }
    }

    /// Saves every vCPU's state, with how its TSC was read; the vCPUs must be paused. Each
    /// vCPU thread saves its own.
    pub fn save_states(
        &self,
        msr_indices: Vec<u32>,
    ) -> Result<Vec<(VcpuState, TscRead)>, VcpuError> {
        let count = self.threads.len();
        let mut state = self.control.lock();
        if state.requested != Requested::Pause || state.parked < count {
            return Err(VcpuError::NotPaused);
        }
        state.save = Some(SaveRequest {
            msr_indices: Arc::new(msr_indices),
            results: (0..count).map(|_| None).collect(),
        });
        self.control.cond.notify_all();
        loop {
            let done = state
                .save
                .as_ref()
                .is_some_and(|s| s.results.iter().all(Option::is_some));
            if done {
                break;
            }
            state = self
                .control
                .cond
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let results = state.save.take().map(|s| s.results).unwrap_or_default();
        results
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                r.unwrap_or_else(|| {
                    Err(VcpuError::Save {
                        index: index as u8,
                        message: "no state".to_owned(),
                    })
                })
            })
            .collect()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut state = self.control.lock();
        if state.requested == Requested::Pause {
            state.requested = Requested::Run;
            self.control.cond.notify_all();
        }
    }

    /// Stops every vCPU thread and waits for them.
    pub fn stop(self) {
        self.control.lock().requested = Requested::Stop;
        self.control.cond.notify_all();
        while self.control.lock().exited < self.threads.len() {
            self.kick_all();
            std::thread::sleep(KICK_INTERVAL);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_loop(mut vcpu: Vcpu, control: &Control, shared: &VcpuShared) {
    let index = vcpu.index;
    while control.may_run(&mut vcpu) {
        match vcpu.fd.run() {
            Ok(exit) => {
                if let Some(end) = handle_exit(exit, shared) {
                    log::info!("vCPU {index}: guest ended: {end:?}");
                    shared.report_exit(end);
                    return;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                shared.report_exit(GuestExit::Error(format!("vCPU {index}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

/// Routes one exit; returns how the guest ended, if it did.
fn handle_exit(exit: VcpuExit<'_>, shared: &VcpuShared) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            shared.metrics.io_exits.fetch_add(1, Ordering::Relaxed);
            if !shared.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            shared.metrics.io_exits.fetch_add(1, Ordering::Relaxed);
            shared.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
            if !shared.mmio.read(addr, data) {
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
            shared.mmio.write(addr, data);
        }
        VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => return Some(GuestExit::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(GuestExit::Error(format!(
                "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => return Some(GuestExit::Error("KVM internal error".to_owned())),
        VcpuExit::Hlt | VcpuExit::Intr => {}
        other => {
            shared
                .metrics
                .unhandled_exits
                .fetch_add(1, Ordering::Relaxed);
            log::debug!("unhandled vCPU exit {other:?}");
        }
    }
    None
}
