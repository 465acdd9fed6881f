//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).
//!
//! [`MmioTransport`] owns everything the driver programs through the register window: feature
//! negotiation, the device status state machine, the queue configuration and the interrupt
//! status. When the driver sets DRIVER_OK it validates the queues the driver configured, builds
//! [`virtio_queue::Queue`]s from them and hands them to the device ([`VirtioDevice::activate`]);
//! from then on the device serves them on its own thread. An invalid setup or a failed
//! activation sets DEVICE_NEEDS_RESET instead. Writing 0 to Status resets the transport and the
//! device.
//!
//! The device manager puts the transport on the MMIO bus ([`MMIO_LEN`] bytes), registers
//! [`MmioTransport::irq`]'s eventfd as the irqfd of the device's GSI, and registers each of
//! [`MmioTransport::queue_evts`] as an ioeventfd at `base + NOTIFY_OFFSET` with the queue index
//! as datamatch, so that queue notifications never leave the kernel. Notifications that do reach
//! the transport (no ioeventfd, or a value without a match) signal the same eventfds.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    features, ActivateContext, ActivateError, GuestMemoryMmap, IrqKind, IrqTrigger, QueuePosition,
    VirtioDevice,
};
use crate::devices::bus::BusDevice;

/// Length of a transport's register window on the MMIO bus.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify in the window: register the queue eventfds as ioeventfds at
/// `base + NOTIFY_OFFSET`, with the queue index as datamatch.
pub const NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;
/// MagicValue: "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version: 2 is the modern (virtio 1.x) MMIO layout.
pub const MMIO_VERSION: u32 = 2;
/// VendorID: "HRTH" in little endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"HRTH");

/// Register offsets (virtio 1.2, section 4.2.2).
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for the device.
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
}

/// Why a transport could not be built or its device could not start.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The interrupt eventfd could not be created.
    #[error("cannot create the interrupt eventfd")]
    IrqEventFd(#[source] io::Error),
    /// A queue notification eventfd could not be created or duplicated.
    #[error("cannot set up the notification eventfd of queue {index}")]
    QueueEventFd {
        /// The queue.
        index: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The device declares a queue maximum size that is not a power of two in 1..=32768.
    #[error("queue {index} has an invalid maximum size {max_size}")]
    QueueMaxSize {
        /// The queue.
        index: usize,
        /// The size the device declared.
        max_size: u16,
    },
    /// The driver set a queue size that is zero, not a power of two or above the maximum.
    #[error("queue {index} has an invalid size {size}")]
    QueueSize {
        /// The queue.
        index: usize,
        /// The size the driver wrote.
        size: u32,
    },
    /// The driver made a queue ready after one it left unready.
    #[error("queue {index} is ready but queue {missing} before it is not")]
    QueueGap {
        /// The ready queue.
        index: usize,
        /// The first queue the driver did not make ready.
        missing: usize,
    },
    /// A ring address breaks the alignment the split ring requires.
    #[error("queue {index} has a misaligned ring")]
    QueueAlignment {
        /// The queue.
        index: usize,
        /// The cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// A ring does not lie entirely in guest memory.
    #[error("queue {index} has a ring outside guest memory")]
    QueueMemory {
        /// The queue.
        index: usize,
    },
    /// The device refused to start.
    #[error("device activation failed")]
    Activate(#[source] ActivateError),
    /// The device could not stop for a snapshot.
    #[error("the device cannot stop for a snapshot")]
    Quiesce(#[source] ActivateError),
    /// A saved transport state does not fit this device.
    #[error("the saved state does not fit the device: {0}")]
    State(String),
}

/// The transport's registers and each queue's configuration and position, as a snapshot
/// records them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    acked_unknown_page: bool,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    interrupt_status: u32,
    queues: Vec<QueueConfig>,
    /// Where the device left each active queue.
    positions: Vec<QueuePosition>,
}

/// A guest-triggerable log line passes at most once per interval; the rest are counted.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting one line through per `interval`.
    pub(crate) const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were dropped since the
    /// last one that passed.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How often a device may log a line its guest can cause.
pub(crate) const GUEST_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// `error: cause: cause of the cause`, for log lines.
pub(crate) fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A queue as the driver configures it through the registers; turned into a
/// [`virtio_queue::Queue`] on activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Validates the driver's setup against guest memory and builds the queue.
    fn build(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, MmioError> {
        let size_error = || MmioError::QueueSize {
            index,
            size: self.size,
        };
        let mut queue = Queue::new(self.max_size).map_err(|_| MmioError::QueueMaxSize {
            index,
            max_size: self.max_size,
        })?;
        let size = u16::try_from(self.size).map_err(|_| size_error())?;
        queue.try_set_size(size).map_err(|_| size_error())?;
        let alignment = |source| MmioError::QueueAlignment { index, source };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(alignment)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(alignment)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(alignment)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueMemory { index });
        }
        Ok(queue)
    }
}

fn set_low(value: &mut u64, low: u32) {
    *value = (*value & !0xffff_ffff) | u64::from(low);
}

fn set_high(value: &mut u64, high: u32) {
    *value = (*value & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device behind a virtio-mmio (version 2) register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver wrote a non-zero value to a feature page past the two that exist.
    acked_unknown_page: bool,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// Where the device left its queues when it was quiesced for a snapshot.
    positions: Vec<QueuePosition>,
    /// The device is stopped for a snapshot.
    quiesced: bool,
    log: LogLimiter,
}

impl fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("queues", &self.queues)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a fresh register window. Creates the interrupt line and one
    /// notification eventfd per queue of the device.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                Queue::new(max_size)
                    .map(|_| QueueConfig::new(max_size))
                    .map_err(|_| MmioError::QueueMaxSize { index, max_size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|index| {
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let irq = Arc::new(IrqTrigger::new().map_err(MmioError::IrqEventFd)?);
        Ok(Self {
            device,
            mem,
            irq,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_page: false,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            positions: Vec::new(),
            quiesced: false,
            log: LogLimiter::new(GUEST_LOG_INTERVAL),
        })
    }

    /// Stops the device between two requests (the vCPUs are paused) and returns the state a
    /// snapshot records. [`MmioTransport::resume_after_snapshot`] starts it again.
    pub fn quiesce(&mut self) -> Result<TransportState, MmioError> {
        if self.activated && !self.quiesced {
            self.positions = self.device.quiesce().map_err(MmioError::Quiesce)?;
            self.quiesced = true;
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_unknown_page: self.acked_unknown_page,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.irq.status(),
            queues: self.queues.clone(),
            positions: self.positions.clone(),
        })
    }

    /// Serves the queues again after [`MmioTransport::quiesce`], from where they stood.
    pub fn resume_after_snapshot(&mut self) {
        if !std::mem::take(&mut self.quiesced) || !self.activated {
            return;
        }
        if let Err(e) = self.activate_at_positions() {
            self.activated = false;
            self.set_needs_reset(&e);
        }
    }

    /// Puts `device` behind a window whose registers and queues come from a snapshot, and
    /// activates it if the driver had.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        state: &TransportState,
    ) -> Result<Self, MmioError> {
        let mut transport = Self::new(device, mem)?;
        let found = transport.device.device_type();
        if state.device_type != found {
            return Err(MmioError::State(format!(
                "the snapshot has device type {}, the configuration gives type {found}",
                state.device_type
            )));
        }
        if state.queues.len() != transport.queues.len()
            || state
                .queues
                .iter()
                .zip(&transport.queues)
                .any(|(saved, own)| saved.max_size != own.max_size)
        {
            return Err(MmioError::State("the queues differ".to_owned()));
        }
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.acked_features = state.acked_features;
        transport.acked_unknown_page = state.acked_unknown_page;
        transport.queue_sel = state.queue_sel;
        transport.status = state.status;
        transport.config_generation = state.config_generation;
        transport.queues = state.queues.clone();
        transport.positions = state.positions.clone();
        if state.acked_features != 0 {
            transport.device.set_acked_features(state.acked_features);
        }
        transport
            .irq
            .status
            .store(state.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        if state.activated {
            transport.activate_at_positions()?;
            transport.activated = true;
        }
        Ok(transport)
    }

    /// Activates the device with its queues starting at the recorded positions.
    fn activate_at_positions(&mut self) -> Result<(), MmioError> {
        let mut ctx = self.activation_context()?;
        if ctx.queues.len() != self.positions.len() {
            return Err(MmioError::State(format!(
                "{} queues are ready, {} positions were saved",
                ctx.queues.len(),
                self.positions.len()
            )));
        }
        for (queue, position) in ctx.queues.iter_mut().zip(&self.positions) {
            queue.set_next_avail(position.next_avail);
            queue.set_next_used(position.next_used);
        }
        self.device
            .activate_restored(ctx)
            .map_err(MmioError::Activate)?;
        // Buffers the driver made available while the device was stopped.
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                error!("virtio-mmio: cannot kick a queue after a restore: {e}");
            }
        }
        Ok(())
    }

    /// The device's interrupt line; register `irq().eventfd()` as KVM's irqfd for the GSI the
    /// device manager assigned to this transport.
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// One eventfd per queue, in queue order; register each (or a `try_clone` of it) as an
    /// ioeventfd at `base + NOTIFY_OFFSET` with its index as a 4-byte datamatch.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The virtio device type behind the transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get(index))
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.max_size)),
            reg::QUEUE_READY => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.ready)),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as all ones (section 4.2.2.1).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.update_queue(|queue| queue.size = value),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.irq.ack(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self.update_queue(|queue| set_low(&mut queue.desc, value)),
            reg::QUEUE_DESC_HIGH => self.update_queue(|queue| set_high(&mut queue.desc, value)),
            reg::QUEUE_DRIVER_LOW => self.update_queue(|queue| set_low(&mut queue.driver, value)),
            reg::QUEUE_DRIVER_HIGH => self.update_queue(|queue| set_high(&mut queue.driver, value)),
            reg::QUEUE_DEVICE_LOW => self.update_queue(|queue| set_low(&mut queue.device, value)),
            reg::QUEUE_DEVICE_HIGH => self.update_queue(|queue| set_high(&mut queue.device, value)),
            _ => self.guest_error(format_args!(
                "write to read-only or unknown register {offset:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = status::ACKNOWLEDGE | status::DRIVER;
        let current = self.status;
        if current != negotiating {
            self.guest_error(format_args!(
                "driver features written in status {current:#x}"
            ));
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.acked_features, value),
            1 => set_high(&mut self.acked_features, value),
            _ => self.acked_unknown_page |= value != 0,
        }
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn update_queue(&mut self, update: impl FnOnce(&mut QueueConfig)) {
        let configuring = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        let current = self.status;
        if current != configuring {
            self.guest_error(format_args!(
                "queue register written in status {current:#x}"
            ));
            return;
        }
        let selected = self.queue_sel;
        let index = usize::try_from(selected).ok();
        match index.and_then(|index| self.queues.get_mut(index)) {
            Some(queue) => update(queue),
            None => self.guest_error(format_args!(
                "queue register written for missing queue {selected}"
            )),
        }
    }

    /// Drivers clear QueueReady when they tear a queue down, which Linux does after the reset:
    /// taking a queue out of service is harmless in any state but DRIVER_OK.
    fn write_queue_ready(&mut self, value: u32) {
        let tearing_down = value == 0 && self.status & status::DRIVER_OK == 0;
        if !tearing_down {
            self.update_queue(|queue| queue.ready = value == 1);
            return;
        }
        let index = usize::try_from(self.queue_sel).ok();
        if let Some(queue) = index.and_then(|index| self.queues.get_mut(index)) {
            queue.ready = false;
        }
    }

    fn notify(&mut self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|index| self.queue_evts.get(index));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => self.guest_error(format_args!("notification for missing queue {value}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let current = self.status;
        if value & current != current {
            self.guest_error(format_args!(
                "status {value:#x} clears bits of {current:#x} without a reset"
            ));
            return;
        }
        let added = value & !current;
        let ack_driver = status::ACKNOWLEDGE | status::DRIVER;
        match added {
            0 => {}
            status::FAILED => self.status = value,
            status::ACKNOWLEDGE if current == 0 => self.status = value,
            status::DRIVER if current == status::ACKNOWLEDGE => self.status = value,
            status::FEATURES_OK if current == ack_driver => {
                if self.accept_features() {
                    self.status = value;
                }
            }
            status::DRIVER_OK if current == ack_driver | status::FEATURES_OK => {
                self.status = value;
                self.activate();
            }
            _ => self.guest_error(format_args!(
                "invalid status transition from {current:#x} to {value:#x}"
            )),
        }
    }

    /// FEATURES_OK: the driver may only accept what the device offers, and must accept
    /// VERSION_1 (this transport is modern only). Otherwise FEATURES_OK stays clear.
    fn accept_features(&mut self) -> bool {
        let offered = self.device.avail_features();
        let unoffered = self.acked_features & !offered;
        if unoffered != 0 || self.acked_unknown_page {
            self.guest_error(format_args!(
                "driver accepted features {unoffered:#x} the device does not offer"
            ));
            return false;
        }
        if self.acked_features & features::VERSION_1 == 0 {
            self.guest_error(format_args!("driver did not accept VIRTIO_F_VERSION_1"));
            return false;
        }
        self.device.set_acked_features(self.acked_features);
        true
    }

    fn activate(&mut self) {
        let started = self
            .activation_context()
            .and_then(|ctx| self.device.activate(ctx).map_err(MmioError::Activate));
        match started {
            Ok(()) => {
                self.activated = true;
                // The driver may have made buffers available before DRIVER_OK without
                // notifying; a spurious wake-up makes the device look.
                for evt in &self.queue_evts {
                    if let Err(e) = evt.write(1) {
                        error!("virtio-mmio: cannot kick a queue after activation: {e}");
                    }
                }
            }
            Err(e) => self.set_needs_reset(&e),
        }
    }

    /// The ready queues, in order, validated against guest memory.
    fn activation_context(&self) -> Result<ActivateContext, MmioError> {
        let ready = self.queues.iter().take_while(|q| q.ready).count();
        if let Some(gap) = self.queues.iter().skip(ready).position(|q| q.ready) {
            return Err(MmioError::QueueGap {
                index: ready + gap,
                missing: ready,
            });
        }
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .take(ready)
            .enumerate()
            .map(|(index, config)| config.build(index, &self.mem, event_idx))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = self
            .queue_evts
            .iter()
            .take(ready)
            .enumerate()
            .map(|(index, evt)| {
                evt.try_clone()
                    .map_err(|source| MmioError::QueueEventFd { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            irq: Arc::clone(&self.irq),
        })
    }

    fn set_needs_reset(&mut self, e: &MmioError) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Some(dropped) = self.log.allow() {
            error!(
                "virtio-mmio device type {}: {}; the device needs a reset \
                 ({dropped} similar messages suppressed)",
                self.device.device_type(),
                error_chain(e)
            );
        }
        // Section 2.1.2: setting DEVICE_NEEDS_RESET after DRIVER_OK comes with a
        // configuration change notification.
        if self.status & status::DRIVER_OK != 0 {
            if let Err(e) = self.irq.trigger(IrqKind::Config) {
                error!("virtio-mmio: cannot signal a configuration change: {e}");
            }
        }
    }

    fn reset(&mut self) {
        let device_stopped = !self.activated || self.device.reset();
        self.activated = !device_stopped;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_page = false;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
        self.irq.ack(u32::MAX);
        for evt in &self.queue_evts {
            // Drains a pending count; an empty counter reports EAGAIN, which is fine.
            let _ = evt.read();
        }
        self.status = 0;
        if !device_stopped {
            // The device keeps its queues; the driver must not think it starts afresh.
            self.status = status::DEVICE_NEEDS_RESET;
            error!(
                "virtio-mmio device type {}: the device cannot be reset",
                self.device.device_type()
            );
        }
    }

    fn guest_error(&mut self, what: fmt::Arguments<'_>) {
        if let Some(dropped) = self.log.allow() {
            warn!(
                "virtio-mmio device type {}: {what} ({dropped} similar messages suppressed)",
                self.device.device_type()
            );
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) => *bytes = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                data.fill(0);
                self.guest_error(format_args!(
                    "{}-byte register read at {offset:#x}",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) => self.write_register(offset, u32::from_le_bytes(bytes)),
            Err(_) => self.guest_error(format_args!(
                "{}-byte register write at {offset:#x}",
                data.len()
            )),
        }
    }
}

/// Test helpers: guest memory and split virtqueues laid out by hand, the way a driver would.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::{reg, MmioTransport};
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::GuestMemoryMmap;

    /// Size of the test guest's memory, starting at address 0.
    pub(crate) const MEM_SIZE: usize = 0x40_0000;
    /// Where tests may put buffers: past the rings.
    pub(crate) const DATA_ADDR: u64 = 0x1_0000;

    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x2000;
    const USED_RING: u64 = 0x3000;

    /// Guest memory of [`MEM_SIZE`] bytes at address 0.
    pub(crate) fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
    }

    /// A descriptor to put in a chain.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct TestDesc {
        pub(crate) addr: u64,
        pub(crate) len: u32,
        pub(crate) write: bool,
    }

    /// A device-readable buffer.
    pub(crate) fn readable(addr: u64, len: u32) -> TestDesc {
        TestDesc {
            addr,
            len,
            write: false,
        }
    }

    /// A device-writable buffer.
    pub(crate) fn writable(addr: u64, len: u32) -> TestDesc {
        TestDesc {
            addr,
            len,
            write: true,
        }
    }

    /// A deterministic pseudo-random sequence (xorshift64) for hostile-input tests.
    #[derive(Debug)]
    pub(crate) struct XorShift(u64);

    impl XorShift {
        /// A sequence from a non-zero seed.
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed | 1)
        }

        /// The next value.
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// A random descriptor (address, length, flags, next) for a table of 16 entries: addresses
    /// near `near`, anywhere in or just past guest memory, or at the top of the address space;
    /// any mix of NEXT, WRITE and INDIRECT; `next` sometimes past the table.
    pub(crate) fn random_desc(rng: &mut XorShift, near: u64) -> (u64, u32, u16, u16) {
        let r = rng.next();
        let addrs = [
            near + (r % 64) * 16,
            (r >> 8) % (MEM_SIZE as u64 + 0x1000),
            DATA_ADDR + (r >> 8) % 0x1_0000,
            u64::MAX - (r >> 8) % 0x1000,
        ];
        let lens = [16, 1, 512, 1024, 0, (r >> 20) as u32 % 0x3000];
        (
            addrs[(r >> 60) as usize % addrs.len()],
            lens[(r >> 40) as usize % lens.len()],
            (r >> 50) as u16 % 8,
            (r >> 32) as u16 % 18,
        )
    }

    /// A split virtqueue of up to 256 entries: descriptor table at 0x1000, available ring at
    /// 0x2000, used ring at 0x3000.
    #[derive(Debug)]
    pub(crate) struct TestQueue {
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl TestQueue {
        /// An empty queue of `size` entries (a power of two, at most 256) in `mem`.
        pub(crate) fn new(mem: &GuestMemoryMmap, size: u16) -> Self {
            assert!(size.is_power_of_two() && size <= 256);
            let zeros = vec![0u8; 0x3000];
            mem.write_slice(&zeros, GuestAddress(DESC_TABLE))
                .expect("clear rings");
            Self {
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// A device-side queue over these rings, as the transport would build it.
        pub(crate) fn queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
            let mut queue = Queue::new(256).expect("queue");
            queue.try_set_size(self.size).expect("size");
            queue
                .try_set_desc_table_address(GuestAddress(DESC_TABLE))
                .expect("desc");
            queue
                .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
                .expect("avail");
            queue
                .try_set_used_ring_address(GuestAddress(USED_RING))
                .expect("used");
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            assert!(queue.is_valid(mem));
            queue
        }

        /// Programs queue `index` of `transport` with these rings and makes it ready.
        pub(crate) fn configure(&self, transport: &mut MmioTransport, index: u32) {
            let mut write = |offset: u64, value: u32| {
                transport.write(offset, &value.to_le_bytes());
            };
            write(reg::QUEUE_SEL, index);
            write(reg::QUEUE_NUM, u32::from(self.size));
            write(reg::QUEUE_DESC_LOW, DESC_TABLE as u32);
            write(reg::QUEUE_DESC_HIGH, 0);
            write(reg::QUEUE_DRIVER_LOW, AVAIL_RING as u32);
            write(reg::QUEUE_DRIVER_HIGH, 0);
            write(reg::QUEUE_DEVICE_LOW, USED_RING as u32);
            write(reg::QUEUE_DEVICE_HIGH, 0);
            write(reg::QUEUE_READY, 1);
        }

        /// Writes descriptor `index` of the table as is.
        pub(crate) fn set_desc(
            &self,
            mem: &GuestMemoryMmap,
            index: u16,
            desc: TestDesc,
            next: Option<u16>,
        ) {
            let mut flags = 0;
            if desc.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let raw = RawDescriptor::from(Descriptor::new(
                desc.addr,
                desc.len,
                flags,
                next.unwrap_or(0),
            ));
            let addr = GuestAddress(DESC_TABLE + u64::from(index) * 16);
            mem.write_obj(raw, addr).expect("write descriptor");
        }

        /// Writes descriptor `index` of the table with raw fields, flags included.
        pub(crate) fn set_raw_desc(
            &self,
            mem: &GuestMemoryMmap,
            index: u16,
            (addr, len, flags, next): (u64, u32, u16, u16),
        ) {
            let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            let addr = GuestAddress(DESC_TABLE + u64::from(index) * 16);
            mem.write_obj(raw, addr).expect("write descriptor");
        }

        /// Writes `descs` as a chain into free table entries and makes it available; returns
        /// the head index.
        pub(crate) fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[TestDesc]) -> u16 {
            let head = self.next_desc;
            for (i, desc) in descs.iter().enumerate() {
                let index = head + i as u16;
                let next = (i + 1 < descs.len()).then_some(index + 1);
                self.set_desc(mem, index, *desc, next);
            }
            self.next_desc += descs.len() as u16;
            self.push_avail(mem, head);
            head
        }

        /// Hostile-driver round: fills the 16-entry table with [`random_desc`]s near `near`
        /// and makes zero to three random heads (some past the table) available.
        pub(crate) fn scramble(&mut self, mem: &GuestMemoryMmap, rng: &mut XorShift, near: u64) {
            for index in 0..16 {
                self.set_raw_desc(mem, index, random_desc(rng, near));
            }
            for _ in 0..rng.next() % 4 {
                self.push_avail(mem, (rng.next() % 20) as u16);
            }
        }

        /// Puts `head` in the available ring and publishes it.
        pub(crate) fn push_avail(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + slot * 2))
                .expect("avail entry");
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
                .expect("avail idx");
        }

        /// Writes the avail ring's `used_event` (the EVENT_IDX interrupt threshold).
        pub(crate) fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
            let addr = GuestAddress(AVAIL_RING + 4 + u64::from(self.size) * 2);
            mem.write_obj(value, addr).expect("used_event");
        }

        /// The used ring's index.
        pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            mem.read_obj(GuestAddress(USED_RING + 2)).expect("used idx")
        }

        /// Used ring entry `i`: (descriptor head, bytes written).
        pub(crate) fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
            let addr = USED_RING + 4 + u64::from(i % self.size) * 8;
            let id: u32 = mem.read_obj(GuestAddress(addr)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(addr + 4)).expect("used len");
            (id, len)
        }

        /// Waits until the used index reaches `count`; false on timeout.
        pub(crate) fn wait_used(&self, mem: &GuestMemoryMmap, count: u16) -> bool {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if self.used_idx(mem) >= count {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestAddress};

    use super::testing::{guest_memory, TestQueue};
    use super::*;

    const FAKE_TYPE: u32 = 42;
    const FAKE_FEATURE: u64 = 1 << 3;
    const FAKE_CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[derive(Debug, Default)]
    struct FakeState {
        acked: Option<u64>,
        activations: Vec<(usize, usize, bool)>,
        resets: usize,
        fail_activation: bool,
        config_writes: Vec<(u64, Vec<u8>)>,
        /// What `quiesce` reports.
        positions: Vec<QueuePosition>,
        /// The first queue's next_avail at each activation.
        started_at: Vec<u16>,
    }

    struct FakeDevice {
        state: Arc<Mutex<FakeState>>,
        max_sizes: Vec<u16>,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            FAKE_TYPE
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            features::VERSION_1 | features::RING_EVENT_IDX | FAKE_FEATURE
        }
        fn set_acked_features(&mut self, features: u64) {
            self.state.lock().expect("state").acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(0);
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let config = FAKE_CONFIG.get(start..).unwrap_or(&[]);
            let n = config.len().min(data.len());
            data[..n].copy_from_slice(&config[..n]);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut state = self.state.lock().expect("state");
            state.config_writes.push((offset, data.to_vec()));
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            let mut state = self.state.lock().expect("state");
            if state.fail_activation {
                return Err(ActivateError::Backend("refused".into()));
            }
            let event_idx = ctx.queues.iter().all(|q| q.event_idx_enabled());
            state
                .activations
                .push((ctx.queues.len(), ctx.queue_evts.len(), event_idx));
            let first = ctx.queues.first().map_or(0, |q| q.next_avail());
            state.started_at.push(first);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.state.lock().expect("state").resets += 1;
            true
        }
        fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError> {
            Ok(self.state.lock().expect("state").positions.clone())
        }
    }

    fn transport(max_sizes: &[u16]) -> (MmioTransport, Arc<Mutex<FakeState>>, GuestMemoryMmap) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let device = FakeDevice {
            state: Arc::clone(&state),
            max_sizes: max_sizes.to_vec(),
        };
        let mem = guest_memory();
        let t = MmioTransport::new(Box::new(device), mem.clone()).expect("transport");
        (t, state, mem)
    }

    fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn write_features(t: &mut MmioTransport, features: u64) {
        write_reg(t, reg::DRIVER_FEATURES_SEL, 0);
        write_reg(t, reg::DRIVER_FEATURES, features as u32);
        write_reg(t, reg::DRIVER_FEATURES_SEL, 1);
        write_reg(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, the features, FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        write_reg(t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write_features(t, features);
        write_reg(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn set_driver_ok(t: &mut MmioTransport) {
        write_reg(t, reg::STATUS, ALL_OK);
    }

    #[test]
    fn test_mmio_read_identity_registers_returns_spec_values() {
        let (mut t, _, _) = transport(&[16]);

        let values = [
            read_reg(&mut t, reg::MAGIC_VALUE),
            read_reg(&mut t, reg::VERSION),
            read_reg(&mut t, reg::DEVICE_ID),
            read_reg(&mut t, reg::VENDOR_ID),
        ];

        assert_eq!(values, [0x7472_6976, 2, FAKE_TYPE, VENDOR_ID]);
    }

    #[test]
    fn test_mmio_read_device_features_pages_returns_low_high_then_zero() {
        let (mut t, _, _) = transport(&[16]);

        let pages: Vec<u32> = (0..3)
            .map(|page| {
                write_reg(&mut t, reg::DEVICE_FEATURES_SEL, page);
                read_reg(&mut t, reg::DEVICE_FEATURES)
            })
            .collect();

        let low = (features::RING_EVENT_IDX | FAKE_FEATURE) as u32;
        assert_eq!(pages, vec![low, 1, 0]);
    }

    #[test]
    fn test_mmio_read_narrow_register_access_returns_zeros() {
        let (mut t, _, _) = transport(&[16]);
        let mut data = [0xffu8; 2];

        t.read(reg::MAGIC_VALUE, &mut data);

        assert_eq!(data, [0, 0]);
    }

    #[test]
    fn test_mmio_write_narrow_status_access_is_ignored() {
        let (mut t, _, _) = transport(&[16]);

        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);

        assert_eq!(t.status(), 0);
    }

    #[test]
    fn test_mmio_access_every_offset_and_length_does_not_panic() {
        let (mut t, _, _) = transport(&[16]);
        let offsets = (0..0x120).chain([u64::MAX - 3, u64::MAX, 0x7fff_ffff_ffff_ffff]);

        for offset in offsets {
            for len in [0usize, 1, 2, 3, 4, 5, 8] {
                let mut data = vec![0xaa; len];
                t.read(offset, &mut data);
                t.write(offset, &data);
            }
        }

        assert!(!t.is_activated());
    }

    #[test]
    fn test_mmio_status_in_order_reaches_driver_ok() {
        let (mut t, state, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);

        set_driver_ok(&mut t);

        assert_eq!(read_reg(&mut t, reg::STATUS), ALL_OK);
        assert_eq!(
            state.lock().expect("state").acked,
            Some(features::VERSION_1)
        );
    }

    #[test]
    fn test_mmio_status_skipping_driver_is_ignored() {
        let (mut t, _, _) = transport(&[16]);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);

        write_reg(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );

        assert_eq!(t.status(), status::ACKNOWLEDGE);
    }

    #[test]
    fn test_mmio_status_clearing_a_bit_is_ignored() {
        let (mut t, _, _) = transport(&[16]);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);

        write_reg(&mut t, reg::STATUS, status::DRIVER);

        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn test_mmio_features_ok_without_version_1_is_rejected() {
        let (mut t, state, _) = transport(&[16]);

        negotiate(&mut t, FAKE_FEATURE);

        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(state.lock().expect("state").acked, None);
    }

    #[test]
    fn test_mmio_features_ok_with_unoffered_feature_is_rejected() {
        let (mut t, state, _) = transport(&[16]);

        negotiate(&mut t, features::VERSION_1 | 1 << 7);

        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(state.lock().expect("state").acked, None);
    }

    #[test]
    fn test_mmio_features_ok_with_bits_on_a_third_page_is_rejected() {
        let (mut t, _, _) = transport(&[16]);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write_features(&mut t, features::VERSION_1);
        write_reg(&mut t, reg::DRIVER_FEATURES_SEL, 2);
        write_reg(&mut t, reg::DRIVER_FEATURES, 1);

        write_reg(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );

        assert_eq!(t.status(), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn test_mmio_driver_ok_activates_device_with_ready_queues() {
        let (mut t, state, mem) = transport(&[16, 16]);
        negotiate(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        TestQueue::new(&mem, 8).configure(&mut t, 1);

        set_driver_ok(&mut t);

        assert!(t.is_activated());
        assert_eq!(state.lock().expect("state").activations, vec![(2, 2, true)]);
    }

    #[test]
    fn test_mmio_driver_ok_kicks_every_queue_eventfd() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);

        set_driver_ok(&mut t);

        assert_eq!(t.queue_evts()[0].read().expect("kick"), 1);
    }

    #[test]
    fn test_mmio_driver_ok_with_queue_size_not_power_of_two_sets_needs_reset() {
        let (mut t, state, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 12);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
        assert!(!t.is_activated());
        assert!(state.lock().expect("state").activations.is_empty());
    }

    #[test]
    fn test_mmio_driver_ok_with_queue_above_max_sets_needs_reset() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 32);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn test_mmio_driver_ok_with_ring_outside_memory_sets_needs_reset() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        write_reg(&mut t, reg::QUEUE_DEVICE_HIGH, 0x10);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(t.irq().status(), IrqKind::Config as u32);
    }

    #[test]
    fn test_mmio_driver_ok_with_misaligned_ring_sets_needs_reset() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        write_reg(&mut t, reg::QUEUE_DESC_LOW, 0x1008);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn test_mmio_driver_ok_with_ready_queue_after_unready_one_sets_needs_reset() {
        let (mut t, _, mem) = transport(&[16, 16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 1);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn test_mmio_driver_ok_when_activation_fails_sets_needs_reset() {
        let (mut t, state, mem) = transport(&[16]);
        state.lock().expect("state").fail_activation = true;
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);

        set_driver_ok(&mut t);

        assert_eq!(t.status(), ALL_OK | status::DEVICE_NEEDS_RESET);
        assert!(!t.is_activated());
    }

    fn active_transport() -> (MmioTransport, Arc<Mutex<FakeState>>, GuestMemoryMmap) {
        let (mut t, state, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        set_driver_ok(&mut t);
        state.lock().expect("state").positions = vec![QueuePosition {
            next_avail: 7,
            next_used: 7,
        }];
        (t, state, mem)
    }

    #[test]
    fn test_mmio_quiesce_then_resume_restarts_device_at_its_position() {
        let (mut t, state, _) = active_transport();

        let saved = t.quiesce().expect("quiesce");
        t.resume_after_snapshot();

        assert!(saved.activated);
        assert_eq!(state.lock().expect("state").started_at, vec![0, 7]);
    }

    #[test]
    fn test_mmio_resume_without_quiesce_does_not_activate_twice() {
        let (mut t, state, _) = active_transport();

        t.resume_after_snapshot();

        assert_eq!(state.lock().expect("state").activations.len(), 1);
    }

    #[test]
    fn test_mmio_restore_from_state_activates_with_saved_registers() {
        let (mut t, _, mem) = active_transport();
        let saved = t.quiesce().expect("quiesce");
        let state = Arc::new(Mutex::new(FakeState {
            positions: saved.positions.clone(),
            ..FakeState::default()
        }));
        let device = FakeDevice {
            state: Arc::clone(&state),
            max_sizes: vec![16],
        };

        let mut restored = MmioTransport::restore(Box::new(device), mem, &saved).expect("restore");

        assert!(restored.is_activated());
        assert_eq!(read_reg(&mut restored, reg::STATUS), t.status());
        assert_eq!(state.lock().expect("state").started_at, vec![7]);
        assert_eq!(restored.quiesce().expect("quiesce again"), saved);
    }

    #[test]
    fn test_mmio_restore_into_other_device_type_is_rejected() {
        let (mut t, _, mem) = active_transport();
        let mut saved = t.quiesce().expect("quiesce");
        saved.device_type = 99;
        let device = FakeDevice {
            state: Arc::default(),
            max_sizes: vec![16],
        };

        let result = MmioTransport::restore(Box::new(device), mem, &saved);

        assert!(matches!(result, Err(MmioError::State(_))));
    }

    #[test]
    fn test_mmio_queue_write_before_features_ok_is_ignored() {
        let (mut t, _, _) = transport(&[16]);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);

        write_reg(&mut t, reg::QUEUE_READY, 1);

        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn test_mmio_queue_ready_zero_after_reset_is_accepted() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        write_reg(&mut t, reg::STATUS, 0);

        write_reg(&mut t, reg::QUEUE_SEL, 0);
        write_reg(&mut t, reg::QUEUE_READY, 0);

        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn test_mmio_queue_ready_after_driver_ok_is_ignored() {
        let (mut t, _, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        set_driver_ok(&mut t);

        write_reg(&mut t, reg::QUEUE_READY, 0);

        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn test_mmio_queue_num_max_of_missing_queue_reads_zero() {
        let (mut t, _, _) = transport(&[16]);

        write_reg(&mut t, reg::QUEUE_SEL, 1);

        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn test_mmio_queue_num_max_reads_device_maximum() {
        let (mut t, _, _) = transport(&[16, 64]);

        write_reg(&mut t, reg::QUEUE_SEL, 1);

        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 64);
    }

    #[test]
    fn test_mmio_status_zero_resets_transport_and_device() {
        let (mut t, state, mem) = transport(&[16]);
        negotiate(&mut t, features::VERSION_1);
        TestQueue::new(&mem, 16).configure(&mut t, 0);
        set_driver_ok(&mut t);
        t.irq().trigger(IrqKind::Vring).expect("trigger");

        write_reg(&mut t, reg::STATUS, 0);

        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
        assert!(!t.is_activated());
        assert_eq!(state.lock().expect("state").resets, 1);
    }

    #[test]
    fn test_mmio_reset_then_renegotiate_activates_again() {
        let (mut t, state, mem) = transport(&[16]);
        let queue = TestQueue::new(&mem, 16);
        negotiate(&mut t, features::VERSION_1);
        queue.configure(&mut t, 0);
        set_driver_ok(&mut t);
        write_reg(&mut t, reg::STATUS, 0);

        negotiate(&mut t, features::VERSION_1);
        queue.configure(&mut t, 0);
        set_driver_ok(&mut t);

        assert!(t.is_activated());
        assert_eq!(state.lock().expect("state").activations.len(), 2);
    }

    #[test]
    fn test_mmio_reset_before_activation_does_not_reset_device() {
        let (mut t, state, _) = transport(&[16]);
        write_reg(&mut t, reg::STATUS, status::ACKNOWLEDGE);

        write_reg(&mut t, reg::STATUS, 0);

        assert_eq!(t.status(), 0);
        assert_eq!(state.lock().expect("state").resets, 0);
    }

    #[test]
    fn test_mmio_queue_notify_signals_that_queue_eventfd() {
        let (mut t, _, _) = transport(&[16, 16]);

        write_reg(&mut t, reg::QUEUE_NOTIFY, 1);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 7);

        assert!(t.queue_evts()[0].read().is_err());
        assert_eq!(t.queue_evts()[1].read().expect("notified"), 1);
    }

    #[test]
    fn test_mmio_interrupt_ack_clears_acknowledged_bits() {
        let (mut t, _, _) = transport(&[16]);
        t.irq().trigger(IrqKind::Vring).expect("trigger");
        t.irq().trigger(IrqKind::Config).expect("trigger");

        write_reg(&mut t, reg::INTERRUPT_ACK, IrqKind::Vring as u32);

        assert_eq!(
            read_reg(&mut t, reg::INTERRUPT_STATUS),
            IrqKind::Config as u32
        );
    }

    #[test]
    fn test_mmio_config_read_delegates_with_offset() {
        let (mut t, _, _) = transport(&[16]);
        let mut data = [0u8; 2];

        t.read(reg::CONFIG + 6, &mut data);

        assert_eq!(data, [7, 8]);
    }

    #[test]
    fn test_mmio_config_write_delegates_with_offset() {
        let (mut t, state, _) = transport(&[16]);

        t.write(reg::CONFIG + 1, &[9]);

        assert_eq!(
            state.lock().expect("state").config_writes,
            vec![(1, vec![9])]
        );
    }

    #[test]
    fn test_mmio_shared_memory_length_reads_all_ones() {
        let (mut t, _, _) = transport(&[16]);

        let len = [
            read_reg(&mut t, reg::SHM_LEN_LOW),
            read_reg(&mut t, reg::SHM_LEN_HIGH),
        ];

        assert_eq!(len, [u32::MAX, u32::MAX]);
    }

    #[test]
    fn test_mmio_new_with_invalid_max_size_fails() {
        let device = FakeDevice {
            state: Arc::default(),
            max_sizes: vec![12],
        };

        let result = MmioTransport::new(Box::new(device), guest_memory());

        assert!(matches!(
            result,
            Err(MmioError::QueueMaxSize {
                index: 0,
                max_size: 12
            })
        ));
    }

    #[test]
    fn test_testing_queue_chain_is_visible_to_virtio_queue() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 16);
        mem.write_slice(&[1, 2, 3], GuestAddress(testing::DATA_ADDR))
            .expect("data");
        let head = tq.add_chain(&mem, &[testing::readable(testing::DATA_ADDR, 3)]);
        let mut queue = tq.queue(&mem, false);

        let chain = queue.pop_descriptor_chain(&mem).expect("chain");
        queue.add_used(&mem, chain.head_index(), 5).expect("used");

        assert_eq!(tq.used_elem(&mem, 0), (u32::from(head), 5));
        assert_eq!(tq.used_idx(&mem), 1);
    }

    #[test]
    fn test_log_limiter_second_line_within_interval_is_suppressed() {
        let mut log = LogLimiter::new(Duration::from_secs(3600));

        let first = log.allow();
        let second = log.allow();

        assert_eq!((first, second), (Some(0), None));
    }
}
