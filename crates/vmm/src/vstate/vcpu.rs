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

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::x86_64::boot::Entry;
use crate::arch::x86_64::{cpuid, lapic, msr, regs};
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
        Ok(Self { fd, index })
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

    /// Called by a vCPU thread between KVM_RUNs: parks while paused; false means stop.
    fn may_run(&self) -> bool {
        let mut state = self.lock();
        if state.requested == Requested::Pause {
            state.parked += 1;
            self.cond.notify_all();
            while state.requested == Requested::Pause {
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
    /// Starts one thread per vCPU, running.
    pub fn start(vcpus: Vec<Vcpu>, shared: Arc<VcpuShared>) -> Result<Self, VcpuError> {
        install_kick_handler();
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                requested: Requested::Run,
                parked: 0,
                exited: 0,
            }),
            cond: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let index = vcpu.index;
            let control = control.clone();
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(256 << 10)
                .spawn(move || {
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
    while control.may_run() {
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
