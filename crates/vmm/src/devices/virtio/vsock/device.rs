//! The vsock device's [`VirtioDevice`] face and its worker thread.
//!
//! While the device is active one worker thread owns the queues and the [`Muxer`] and waits on
//! the muxer's epoll instance, which holds the three queue eventfds, a stop eventfd, the
//! listener and every host stream. Each wake-up it dispatches the ready descriptors, resets
//! timed-out connections, hands guest tx packets to the muxer, fills guest rx buffers with
//! what the muxer has to say (the muxer reads host sockets only then, so host data waits in
//! the socket, not in the VMM), and interrupts the guest when the queues ask for it.
//!
//! Stopping the worker (reset, drop, [`Vsock::reset_connections`]) joins the thread and takes
//! the muxer back, so the listener survives and the device can be activated again.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::{
    device_type, features, ActivateContext, ActivateError, GuestMemoryMmap, IrqKind, IrqTrigger,
    QueuePosition, VirtioDevice,
};
use super::muxer::Muxer;
use super::packet::{read_tx_packet, write_event, Chain, RxBuffer, EVENT_TRANSPORT_RESET};
use super::{
    LogLimiter, VsockConfig, VsockError, EVQ, MAX_PKT_PAYLOAD, NUM_QUEUES, QUEUE_SIZE, RXQ, TXQ,
};

/// Epoll tokens of the worker's own descriptors (queue tokens are the queue indices).
const TOKEN_STOP: u64 = 3;
/// The queue sizes the device offers.
static QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// Rounds of tx-then-rx processing per wake-up before the worker polls its descriptors again.
const MAX_ROUNDS: usize = 16;
/// How long rx waits for the driver to acknowledge a transport reset before it flows anyway
/// (a driver that never posts another event buffer must not keep new connections out).
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the worker is with a transport reset. Until the driver has handled the event, nothing
/// goes to rx: Linux resets every connected socket when it handles the event, so a connection
/// the host opened just after a restore would otherwise be reset with the stale ones (its
/// client would see it close and have to retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransportReset {
    /// None owed.
    Done,
    /// Owed since `since`, waiting for an event buffer.
    Pending { since: Instant },
    /// Delivered. The driver refills the event buffer once it has handled the event, so the
    /// event queue's avail index moving past `avail` is its acknowledgement.
    Delivered {
        since: Instant,
        avail: Wrapping<u16>,
    },
}

impl TransportReset {
    fn pending() -> Self {
        Self::Pending {
            since: Instant::now(),
        }
    }
}

/// A virtio-vsock device backed by Unix sockets (see the module documentation of `vsock`).
///
/// The device manager creates it with [`Vsock::new`] (which binds `uds_path` at once, so host
/// programs may connect before the guest boots; they are served once the driver is up), puts
/// it behind an MMIO transport and wires the transport's [`IrqTrigger`] eventfd to KVM. The
/// device needs no other event loop: it runs its own worker thread while active.
#[derive(Debug)]
pub struct Vsock {
    config: VsockConfig,
    acked_features: u64,
    /// The backend while no worker runs (None while one runs, or if a worker panicked).
    muxer: Option<Muxer>,
    worker: Option<WorkerHandle>,
    limiter: LogLimiter,
}

#[derive(Debug)]
struct WorkerHandle {
    stop: EventFd,
    thread: JoinHandle<Option<Worker>>,
}

impl Vsock {
    /// Validates `config` and listens on its `uds_path`, which must not exist.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate()?;
        let muxer = Muxer::new(config.guest_cid, &config.uds_path).map_err(VsockError::Backend)?;
        Ok(Self {
            config: config.clone(),
            acked_features: 0,
            muxer: Some(muxer),
            worker: None,
            limiter: LogLimiter::default(),
        })
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// Whether the worker thread runs (the driver set DRIVER_OK and no reset followed).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// Resets every connection while keeping the listener: for snapshots, whose guest-side
    /// connection state cannot be restored. Each connection's host socket is closed (and
    /// pending `CONNECT` handshakes too); when the device is active, an RST per connection is
    /// queued for the guest, delivered as soon as it has rx buffers. The worker is stopped and
    /// restarted around the change, so queue state stays consistent. Host programs can connect
    /// again right away.
    ///
    /// Snapshot use: before saving, call this on the paused VM (the guest sees RSTs when it
    /// resumes); after restoring, call [`Vsock::send_transport_reset`] once the device is
    /// active so that the guest driver drops connections it still believes in and re-reads
    /// its CID.
    pub fn reset_connections(&mut self) -> Result<(), VsockError> {
        match self.stop_worker()? {
            Some(mut worker) => {
                worker.muxer.reset_connections(true);
                self.start_worker(worker)
            }
            None => {
                if let Some(muxer) = self.muxer.as_mut() {
                    muxer.reset_connections(false);
                }
                Ok(())
            }
        }
    }

    /// Queues a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (delivered once the
    /// driver has an event buffer). Returns false, doing nothing, when the device is not
    /// active.
    pub fn send_transport_reset(&mut self) -> Result<bool, VsockError> {
        match self.stop_worker()? {
            Some(mut worker) => {
                worker.transport_reset = TransportReset::pending();
                self.start_worker(worker).map(|()| true)
            }
            None => Ok(false),
        }
    }

    /// Starts the worker on `ctx`; with `transport_reset`, its first event tells the driver
    /// that every connection is gone.
    fn start(&mut self, ctx: ActivateContext, transport_reset: bool) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Backend(
                "the device is already active".to_owned(),
            ));
        }
        for found in [ctx.queues.len(), ctx.queue_evts.len()] {
            if found != NUM_QUEUES {
                return Err(ActivateError::QueueCount {
                    expected: NUM_QUEUES,
                    found,
                });
            }
        }
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let muxer = self.muxer.take().ok_or_else(|| {
            ActivateError::Backend("the backend was lost when the worker panicked".to_owned())
        })?;
        let mut worker = Worker::new(ctx, muxer, stop_evt);
        if transport_reset {
            worker.transport_reset = TransportReset::pending();
        }
        self.start_worker(worker).map_err(|e| match e {
            VsockError::Worker(e) => ActivateError::Worker(e),
            other => ActivateError::Backend(other.to_string()),
        })
    }

    /// Stops and joins the worker; returns it, detached from the epoll instance.
    fn stop_worker(&mut self) -> Result<Option<Worker>, VsockError> {
        let Some(handle) = self.worker.take() else {
            return Ok(None);
        };
        if let Err(e) = handle.stop.write(1) {
            // Cannot fail on a fresh counter; the join below would then block.
            log::error!("vsock: cannot signal the worker to stop: {e}");
        }
        match handle.thread.join() {
            Ok(Some(mut worker)) => {
                worker.detach();
                Ok(Some(worker))
            }
            Ok(None) | Err(_) => Err(VsockError::WorkerPanicked),
        }
    }

    /// Attaches `worker` to the epoll instance and runs it on a new thread. On failure the
    /// muxer is kept (the device stays inactive).
    fn start_worker(&mut self, mut worker: Worker) -> Result<(), VsockError> {
        let prepared = worker
            .stop_evt
            .try_clone()
            .and_then(|stop| worker.attach().map(|()| stop));
        let stop = match prepared {
            Ok(stop) => stop,
            Err(e) => {
                self.muxer = Some(worker.into_muxer());
                return Err(VsockError::Worker(e));
            }
        };
        // The worker travels through a channel so that a failed spawn does not lose it.
        let (sender, receiver) = mpsc::channel::<Worker>();
        let spawned = crate::thread::spawn("vsock", move || receiver.recv().ok().map(Worker::run));
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                worker.detach();
                self.muxer = Some(worker.into_muxer());
                return Err(VsockError::Worker(e));
            }
        };
        if let Err(mpsc::SendError(mut worker)) = sender.send(worker) {
            worker.detach();
            self.muxer = Some(worker.into_muxer());
            let _ = thread.join();
            return Err(VsockError::WorkerPanicked);
        }
        self.worker = Some(WorkerHandle { stop, thread });
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        let start = usize::try_from(offset).ok();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .and_then(|s| s.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        limited!(
            self.limiter,
            warn,
            "vsock: ignoring a {}-byte write at offset {offset} of the read-only configuration",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.start(ctx, false)
    }

    /// After a snapshot the host side of every connection is gone: the driver gets a
    /// TRANSPORT_RESET event and drops its connections; listeners survive on both sides.
    fn activate_restored(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.start(ctx, true)
    }

    fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError> {
        let worker = self
            .stop_worker()
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        let Some(worker) = worker else {
            return Ok(Vec::new());
        };
        let positions = worker
            .queues
            .iter()
            .map(|q| QueuePosition {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        let mut muxer = worker.into_muxer();
        muxer.reset_connections(false);
        self.muxer = Some(muxer);
        Ok(positions)
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        match self.stop_worker() {
            Ok(Some(worker)) => {
                let mut muxer = worker.into_muxer();
                muxer.reset_connections(false);
                self.muxer = Some(muxer);
                true
            }
            Ok(None) => {
                if let Some(muxer) = self.muxer.as_mut() {
                    muxer.reset_connections(false);
                }
                true
            }
            Err(e) => {
                log::error!("vsock: {e}");
                false
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let Err(e) = self.stop_worker() {
            log::error!("vsock: {e}");
        }
    }
}

/// Pops the next available chain, logging (rate-limited) a broken avail ring.
fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    limiter: &mut LogLimiter,
) -> Option<Chain<'a>> {
    match queue.iter(mem) {
        Ok(mut iter) => iter.next(),
        Err(e) => {
            limited!(limiter, warn, "vsock: cannot read the avail ring: {e}");
            None
        }
    }
}

/// Returns a chain to the driver (a head index out of range cannot be returned).
fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    limiter: &mut LogLimiter,
) {
    if head >= queue.size() {
        limited!(
            limiter,
            warn,
            "vsock: descriptor head {head} is out of range"
        );
        return;
    }
    if let Err(e) = queue.add_used(mem, head, len) {
        limited!(limiter, warn, "vsock: cannot add to the used ring: {e}");
    }
}

/// The state the worker thread owns while the device is active.
#[derive(Debug)]
struct Worker {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    irq: Arc<IrqTrigger>,
    stop_evt: EventFd,
    muxer: Muxer,
    transport_reset: TransportReset,
    /// The last wake-up ran out of rounds: poll without sleeping.
    more_work: bool,
    tx_payload: Vec<u8>,
    rx_payload: Vec<u8>,
    limiter: LogLimiter,
}

impl Worker {
    fn new(ctx: ActivateContext, muxer: Muxer, stop_evt: EventFd) -> Self {
        Self {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_evts: ctx.queue_evts,
            irq: ctx.irq,
            stop_evt,
            muxer,
            transport_reset: TransportReset::Done,
            more_work: false,
            tx_payload: Vec::with_capacity(MAX_PKT_PAYLOAD),
            rx_payload: vec![0; MAX_PKT_PAYLOAD],
            limiter: LogLimiter::default(),
        }
    }

    fn into_muxer(self) -> Muxer {
        self.muxer
    }

    /// Registers the queue and stop eventfds with the muxer's epoll instance.
    fn attach(&mut self) -> std::io::Result<()> {
        let mut fds: Vec<(i32, u64)> = self
            .queue_evts
            .iter()
            .zip(0u64..)
            .map(|(evt, token)| (std::os::fd::AsRawFd::as_raw_fd(evt), token))
            .collect();
        fds.push((std::os::fd::AsRawFd::as_raw_fd(&self.stop_evt), TOKEN_STOP));
        for (fd, token) in fds {
            if let Err(e) = self.muxer.register(fd, token) {
                self.detach();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes the queue and stop eventfds from the epoll instance.
    fn detach(&mut self) {
        for evt in self.queue_evts.iter().chain([&self.stop_evt]) {
            // Fails only for descriptors that were not registered.
            let _ = self.muxer.unregister(std::os::fd::AsRawFd::as_raw_fd(evt));
        }
    }

    fn run(mut self) -> Self {
        let mut events = vec![EpollEvent::default(); 64];
        // Work queued while the worker was stopped (RSTs, an event) goes out without waiting.
        self.more_work = true;
        loop {
            let timeout = self.timeout_ms();
            if !self.iterate(&mut events, timeout) {
                return self;
            }
        }
    }

    /// How long the next wait may sleep: until the earliest connection deadline, and while a
    /// transport reset awaits its acknowledgement, no later than its [`RESET_ACK_TIMEOUT`].
    /// The acknowledgement itself wakes the worker: the driver notifies the event queue after
    /// refilling it (the device offers no EVENT_IDX and never suppresses notifications).
    fn timeout_ms(&self) -> i32 {
        if self.more_work {
            return 0;
        }
        let ack_deadline = match self.transport_reset {
            TransportReset::Done => None,
            TransportReset::Pending { since } | TransportReset::Delivered { since, .. } => {
                since.checked_add(RESET_ACK_TIMEOUT)
            }
        };
        match [self.muxer.next_deadline(), ack_deadline]
            .into_iter()
            .flatten()
            .min()
        {
            None => -1,
            Some(deadline) => {
                let ms = deadline
                    .saturating_duration_since(Instant::now())
                    .as_millis();
                i32::try_from(ms.saturating_add(1)).unwrap_or(i32::MAX)
            }
        }
    }

    /// Whether rx may carry packets: no transport reset is owed, or the driver has handled
    /// it, or it has had [`RESET_ACK_TIMEOUT`] to do so.
    fn rx_open(&mut self) -> bool {
        let acked = match self.transport_reset {
            TransportReset::Done => return true,
            TransportReset::Pending { since } => since.elapsed() >= RESET_ACK_TIMEOUT,
            TransportReset::Delivered { since, avail } => {
                let moved = self
                    .queues
                    .get(EVQ)
                    .and_then(|q| q.avail_idx(&self.mem, Ordering::Acquire).ok())
                    .is_some_and(|now| now != avail);
                moved || since.elapsed() >= RESET_ACK_TIMEOUT
            }
        };
        if acked {
            if let TransportReset::Delivered { since, .. } = self.transport_reset {
                log::info!(
                    "vsock: the driver handled the transport reset {:.1} ms after it was owed",
                    since.elapsed().as_secs_f64() * 1000.0
                );
                self.transport_reset = TransportReset::Done;
            } else {
                log::debug!("vsock: no event buffer for the transport reset; rx flows anyway");
            }
        }
        acked
    }

    /// One wake-up: waits up to `timeout_ms`, then does the work. Returns false once stopped
    /// (or when waiting fails for good).
    fn iterate(&mut self, events: &mut [EpollEvent], timeout_ms: i32) -> bool {
        let ready = match self.muxer.wait(events, timeout_ms) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                log::error!("vsock: waiting for events failed, the device stops: {e}");
                return false;
            }
        };
        // Every event is dispatched before stopping: connection streams are edge-triggered,
        // and a readiness edge dropped here would never come back.
        let mut stop = false;
        for ev in events.iter().take(ready) {
            let token = ev.data();
            if token == TOKEN_STOP {
                let _ = self.stop_evt.read();
                stop = true;
                continue;
            }
            let queue_evt = usize::try_from(token)
                .ok()
                .and_then(|i| self.queue_evts.get(i));
            match queue_evt {
                // Reading resets the counter; the queues are processed below in any case.
                Some(evt) => {
                    let _ = evt.read();
                }
                None => self
                    .muxer
                    .handle_event(token, EventSet::from_bits_truncate(ev.events())),
            }
        }
        if stop {
            return false;
        }
        self.muxer.process_timeouts(Instant::now());
        self.process_queues();
        true
    }

    /// Delivers a pending transport reset, then moves packets both ways until neither queue
    /// makes progress, then interrupts.
    fn process_queues(&mut self) {
        let ev_used = self.process_evq();
        let mut tx_used = false;
        let mut rx_used = false;
        self.more_work = true;
        for _ in 0..MAX_ROUNDS {
            let tx = self.process_tx();
            let rx = if self.rx_open() { self.process_rx() } else { 0 };
            tx_used |= tx > 0;
            rx_used |= rx > 0;
            if tx == 0 && rx == 0 {
                self.more_work = false;
                break;
            }
        }
        for (used, index) in [(rx_used, RXQ), (tx_used, TXQ), (ev_used, EVQ)] {
            if used {
                self.signal(index);
            }
        }
    }

    /// Hands guest tx packets to the muxer; returns the chains consumed.
    fn process_tx(&mut self) -> usize {
        let mut count = 0;
        while count < usize::from(QUEUE_SIZE) && !self.muxer.rx_backlogged() {
            let Some(queue) = self.queues.get_mut(TXQ) else {
                break;
            };
            let Some(chain) = pop_chain(queue, &self.mem, &mut self.limiter) else {
                break;
            };
            let head = chain.head_index();
            let result = read_tx_packet(&self.mem, chain, &mut self.tx_payload);
            add_used(queue, &self.mem, head, 0, &mut self.limiter);
            count += 1;
            match result {
                Ok(header) => self.muxer.send_pkt(&header, &self.tx_payload),
                Err(e) => {
                    limited!(
                        self.limiter,
                        warn,
                        "vsock: dropping a malformed tx packet: {e}"
                    );
                    if let Some(header) = e.header() {
                        self.muxer.reject_pkt(header);
                    }
                }
            }
        }
        count
    }

    /// Fills guest rx buffers with the muxer's packets; returns the chains used.
    fn process_rx(&mut self) -> usize {
        let mut count = 0;
        while count < usize::from(QUEUE_SIZE) && self.muxer.has_pending_rx() {
            let Some(queue) = self.queues.get_mut(RXQ) else {
                break;
            };
            let Some(chain) = pop_chain(queue, &self.mem, &mut self.limiter) else {
                break;
            };
            let head = chain.head_index();
            let used_len = match RxBuffer::new(&self.mem, chain) {
                Err(e) => {
                    limited!(
                        self.limiter,
                        warn,
                        "vsock: dropping an unusable rx buffer: {e}"
                    );
                    0
                }
                Ok(buffer) => {
                    let capacity = buffer.payload_capacity().min(self.rx_payload.len());
                    let Some(header) = self.muxer.recv_pkt(&mut self.rx_payload[..capacity]) else {
                        // Nothing to say after all: leave the buffer to the driver.
                        queue.go_to_previous_position();
                        break;
                    };
                    let len = usize::try_from(header.len).map_or(capacity, |l| l.min(capacity));
                    match buffer.write_packet(header, &self.rx_payload[..len]) {
                        Ok(written) => written,
                        Err(e) => {
                            limited!(self.limiter, error, "vsock: cannot fill an rx buffer: {e}");
                            0
                        }
                    }
                }
            };
            add_used(queue, &self.mem, head, used_len, &mut self.limiter);
            count += 1;
        }
        count
    }

    /// Delivers a pending transport-reset event; returns whether a chain was used.
    fn process_evq(&mut self) -> bool {
        let mut used = false;
        while let TransportReset::Pending { since } = self.transport_reset {
            let Some(queue) = self.queues.get_mut(EVQ) else {
                break;
            };
            let Some(chain) = pop_chain(queue, &self.mem, &mut self.limiter) else {
                break;
            };
            let head = chain.head_index();
            let len = match write_event(&self.mem, chain, EVENT_TRANSPORT_RESET) {
                Ok(len) => {
                    let avail = queue
                        .avail_idx(&self.mem, Ordering::Acquire)
                        .unwrap_or(Wrapping(queue.next_avail()));
                    self.transport_reset = TransportReset::Delivered { since, avail };
                    log::debug!("vsock: transport reset delivered");
                    len
                }
                Err(e) => {
                    limited!(
                        self.limiter,
                        warn,
                        "vsock: dropping an unusable event buffer: {e}"
                    );
                    0
                }
            };
            add_used(queue, &self.mem, head, len, &mut self.limiter);
            used = true;
        }
        used
    }

    /// Interrupts the guest for queue `index` if the driver wants it.
    fn signal(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let needed = queue.needs_notification(&self.mem).unwrap_or_else(|e| {
            limited!(self.limiter, warn, "vsock: cannot read the used event: {e}");
            true
        });
        if needed {
            if let Err(e) = self.irq.trigger(IrqKind::Vring) {
                limited!(
                    self.limiter,
                    error,
                    "vsock: cannot interrupt the guest: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use vmm_sys_util::tempdir::TempDir;

    use super::super::muxer::port_path;
    use super::super::packet::{Op, PacketHeader, HDR_SIZE, SHUTDOWN_BOTH};
    use super::super::test_utils::{read_rx_packet, test_memory, Desc, TestQueue};
    use super::super::HOST_CID;
    use super::*;

    const GUEST_CID: u64 = 3;

    /// The driver's side of the three queues.
    struct Driver {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        ev: TestQueue,
    }

    impl Driver {
        fn new() -> Self {
            Self {
                mem: test_memory(),
                rx: TestQueue::new(0, QUEUE_SIZE),
                tx: TestQueue::new(1, QUEUE_SIZE),
                ev: TestQueue::new(2, QUEUE_SIZE),
            }
        }

        fn context(&self) -> ActivateContext {
            let evt = || EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            ActivateContext {
                mem: self.mem.clone(),
                queues: vec![self.rx.queue(), self.tx.queue(), self.ev.queue()],
                queue_evts: vec![evt(), evt(), evt()],
                irq: Arc::new(IrqTrigger::new().expect("irq")),
            }
        }

        fn add_rx_buffers(&mut self, count: usize) {
            for _ in 0..count {
                self.rx.add_rx_buffer(&self.mem, 4096);
            }
        }

        fn send(&mut self, header: &PacketHeader, payload: &[u8]) {
            self.tx.add_tx_packet(&self.mem, header, payload);
        }

        /// The next packet the device put in the rx queue, if any.
        fn try_recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
            let (head, len) = self.rx.next_used(&self.mem)?;
            let addr = self.rx.desc_addr(&self.mem, head);
            let (header, payload) = read_rx_packet(&self.mem, addr);
            assert_eq!(usize::try_from(len).expect("len"), HDR_SIZE + payload.len());
            Some((header, payload))
        }
    }

    struct Fixture {
        _dir: TempDir,
        uds: PathBuf,
        driver: Driver,
        worker: Worker,
    }

    fn fixture() -> Fixture {
        fixture_with_rx_buffers(16)
    }

    fn fixture_with_rx_buffers(count: usize) -> Fixture {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let uds = dir.as_path().join("v.sock");
        let muxer = Muxer::new(GUEST_CID, &uds).expect("muxer");
        let mut driver = Driver::new();
        driver.add_rx_buffers(count);
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut worker = Worker::new(driver.context(), muxer, stop);
        worker.attach().expect("attach");
        Fixture {
            _dir: dir,
            uds,
            driver,
            worker,
        }
    }

    /// Runs worker wake-ups until the driver sees an rx packet (at most 2 s).
    fn next_packet(f: &mut Fixture) -> (PacketHeader, Vec<u8>) {
        let mut events = vec![EpollEvent::default(); 16];
        for _ in 0..100 {
            if let Some(packet) = f.driver.try_recv() {
                return packet;
            }
            f.worker.iterate(&mut events, 20);
        }
        panic!("no rx packet");
    }

    /// Runs one worker wake-up that does not wait.
    fn turn(f: &mut Fixture) {
        let mut events = vec![EpollEvent::default(); 16];
        f.worker.iterate(&mut events, 0);
    }

    fn guest(op: Op, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            buf_alloc: 256 * 1024,
            ..PacketHeader::new((GUEST_CID, src_port), (HOST_CID, dst_port), op)
        }
    }

    fn host_connect(uds: &Path, line: &[u8]) -> UnixStream {
        let mut stream = UnixStream::connect(uds).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        stream.write_all(line).expect("write");
        stream
    }

    fn read_exactly(stream: &mut UnixStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).expect("read");
        buf
    }

    #[test]
    fn test_worker_host_connect_handshake_then_relays_both_ways() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"CONNECT 1234\n");

        let (request, _) = next_packet(&mut f);
        f.driver
            .send(&guest(Op::Response, 1234, request.src_port), &[]);
        turn(&mut f);
        let ok = read_exactly(&mut stream, 14);
        stream.write_all(b"from host").expect("write");
        let (data, payload) = next_packet(&mut f);
        f.driver
            .send(&guest(Op::Rw, 1234, request.src_port), b"from guest");
        turn(&mut f);
        let received = read_exactly(&mut stream, 10);

        assert_eq!(request.op(), Some(Op::Request));
        assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(request.dst_port, 1234);
        assert_eq!(ok, format!("OK {}\n", request.src_port).as_bytes());
        assert_eq!(
            (data.op(), payload.as_slice()),
            (Some(Op::Rw), &b"from host"[..])
        );
        assert_eq!(received, b"from guest");
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Plays a guest application reading a host-initiated connection until the host's
    /// SHUTDOWN: rx buffers are returned as packets arrive, credit only when the device asks.
    fn guest_read_all(f: &mut Fixture, guest_port: u32, host_port: u32, buf_alloc: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let mut events = vec![EpollEvent::default(); 16];
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            f.worker.iterate(&mut events, 20);
            while let Some((header, payload)) = f.driver.try_recv() {
                f.driver.add_rx_buffers(1);
                data.extend_from_slice(&payload);
                match header.op() {
                    Some(Op::Shutdown) => return data,
                    Some(Op::CreditRequest) => {
                        let update = PacketHeader {
                            buf_alloc,
                            fwd_cnt: u32::try_from(data.len()).expect("len"),
                            ..guest(Op::CreditUpdate, guest_port, host_port)
                        };
                        f.driver.send(&update, &[]);
                    }
                    _ => {}
                }
            }
        }
        panic!("no SHUTDOWN from the host");
    }

    /// Plays a guest application writing `data` on the connection the device accepted with
    /// `response`, within the device's credit, until `done`.
    fn guest_write_all(
        f: &mut Fixture,
        response: &PacketHeader,
        data: &[u8],
        done: &JoinHandle<Vec<u8>>,
    ) {
        let (guest_port, host_port) = (response.dst_port, response.src_port);
        let mut sent = 0usize;
        let mut host_fwd = usize::try_from(response.fwd_cnt).expect("fwd_cnt");
        let mut host_alloc = usize::try_from(response.buf_alloc).expect("buf_alloc");
        let mut events = vec![EpollEvent::default(); 16];
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            while sent < data.len() && sent - host_fwd < host_alloc {
                let n = (host_alloc - (sent - host_fwd))
                    .min(4096)
                    .min(data.len() - sent);
                let header = guest(Op::Rw, guest_port, host_port);
                f.driver.send(&header, &data[sent..sent + n]);
                sent += n;
            }
            f.worker.iterate(&mut events, 20);
            while let Some((header, _)) = f.driver.try_recv() {
                f.driver.add_rx_buffers(1);
                host_fwd = usize::try_from(header.fwd_cnt).expect("fwd_cnt");
                host_alloc = usize::try_from(header.buf_alloc).expect("buf_alloc");
            }
            if sent == data.len() && done.is_finished() {
                return;
            }
        }
        panic!("the host did not receive everything");
    }

    #[test]
    fn test_worker_host_connect_guest_rst_closes_unix_stream() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"CONNECT 1234\n");
        let (request, _) = next_packet(&mut f);

        f.driver.send(&guest(Op::Rst, 1234, request.src_port), &[]);
        turn(&mut f);

        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("EOF");
        assert!(rest.is_empty());
    }

    #[test]
    fn test_worker_guest_connect_to_port_socket_then_relays() {
        let mut f = fixture();
        let listener = UnixListener::bind(port_path(&f.uds, 5000)).expect("bind");

        f.driver.send(&guest(Op::Request, 40000, 5000), &[]);
        let (response, _) = next_packet(&mut f);
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        f.driver.send(&guest(Op::Rw, 40000, 5000), b"ping");
        turn(&mut f);
        let ping = read_exactly(&mut accepted, 4);
        accepted.write_all(b"pong").expect("write");
        let (_, pong) = next_packet(&mut f);

        assert_eq!(response.op(), Some(Op::Response));
        assert_eq!((response.src_port, response.dst_port), (5000, 40000));
        assert_eq!(ping, b"ping");
        assert_eq!(pong, b"pong");
    }

    #[test]
    fn test_worker_bulk_host_to_guest_respects_guest_credit() {
        let mut f = fixture();
        let data = pattern(300_000);
        let mut stream = host_connect(&f.uds, b"CONNECT 1234\n");
        let (request, _) = next_packet(&mut f);
        let response = PacketHeader {
            buf_alloc: 16 * 1024,
            ..guest(Op::Response, 1234, request.src_port)
        };
        f.driver.send(&response, &[]);
        turn(&mut f);
        read_exactly(&mut stream, format!("OK {}\n", request.src_port).len());
        let mut writer = stream.try_clone().expect("clone");
        let expected = data.clone();
        let host = std::thread::spawn(move || {
            writer.write_all(&data).expect("write");
            writer
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        });

        let received = guest_read_all(&mut f, 1234, request.src_port, 16 * 1024);

        host.join().expect("host writer");
        assert_eq!(received.len(), expected.len());
        assert!(received == expected);
    }

    #[test]
    fn test_worker_bulk_guest_to_host_respects_device_credit() {
        let mut f = fixture();
        let data = pattern(300_000);
        let listener = UnixListener::bind(port_path(&f.uds, 6000)).expect("bind");
        f.driver.send(&guest(Op::Request, 40000, 6000), &[]);
        let (response, _) = next_packet(&mut f);
        let len = data.len();
        let host = std::thread::spawn(move || {
            let (mut accepted, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(100));
            read_exactly(&mut accepted, len)
        });

        guest_write_all(&mut f, &response, &data, &host);

        let received = host.join().expect("host reader");
        assert_eq!(response.buf_alloc, super::super::CONN_BUF_SIZE);
        assert!(received == data);
    }

    #[test]
    fn test_worker_guest_connect_without_listener_gets_rst() {
        let mut f = fixture();

        f.driver.send(&guest(Op::Request, 40000, 5001), &[]);
        let (rst, _) = next_packet(&mut f);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!((rst.src_port, rst.dst_port), (5001, 40000));
    }

    #[test]
    fn test_worker_guest_close_gets_rst() {
        let mut f = fixture();
        let _listener = UnixListener::bind(port_path(&f.uds, 5000)).expect("bind");
        f.driver.send(&guest(Op::Request, 40000, 5000), &[]);
        next_packet(&mut f);
        let close = PacketHeader {
            flags: SHUTDOWN_BOTH,
            ..guest(Op::Shutdown, 40000, 5000)
        };

        f.driver.send(&close, &[]);
        let (rst, _) = next_packet(&mut f);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(f.worker.muxer.connection_count(), 0);
    }

    #[test]
    fn test_worker_short_tx_chain_is_returned_and_dropped() {
        let mut f = fixture();
        let addr = f.driver.tx.alloc(16);
        f.driver
            .tx
            .add_chain(&f.driver.mem, &[Desc::readable(addr, 16)]);

        turn(&mut f);

        assert_eq!(f.driver.tx.next_used(&f.driver.mem), Some((0, 0)));
        assert!(f.driver.try_recv().is_none());
    }

    #[test]
    fn test_worker_len_beyond_chain_gets_rst() {
        let mut f = fixture();
        let header = guest(Op::Rw, 40000, 7).to_bytes();
        let addr = f.driver.tx.alloc(HDR_SIZE);
        let mut lying = PacketHeader::from_bytes(&header);
        lying.len = 4096;
        vm_memory::Bytes::write_slice(
            &f.driver.mem,
            &lying.to_bytes(),
            vm_memory::GuestAddress(addr),
        )
        .expect("write");
        f.driver
            .tx
            .add_chain(&f.driver.mem, &[Desc::readable(addr, 44)]);

        let (rst, _) = next_packet(&mut f);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(rst.dst_port, 40000);
    }

    #[test]
    fn test_worker_out_of_range_head_is_not_returned() {
        let mut f = fixture();
        f.driver.tx.publish(&f.driver.mem, 0xFFFF);

        turn(&mut f);

        assert_eq!(f.driver.tx.next_used(&f.driver.mem), None);
    }

    #[test]
    fn test_worker_rx_buffers_kept_when_nothing_to_send() {
        let mut f = fixture();

        turn(&mut f);

        assert!(f.driver.try_recv().is_none());
    }

    #[test]
    fn test_worker_host_data_waits_for_rx_buffers() {
        let mut f = fixture_with_rx_buffers(0);
        let _stream = host_connect(&f.uds, b"CONNECT 1234\n");
        turn(&mut f);
        turn(&mut f);
        let pending_before = f.worker.muxer.has_pending_rx();

        f.driver.add_rx_buffers(1);
        let (request, _) = next_packet(&mut f);

        assert!(pending_before);
        assert_eq!(request.op(), Some(Op::Request));
    }

    #[test]
    fn test_worker_transport_reset_event_is_delivered() {
        let mut f = fixture();
        let addr = f.driver.ev.alloc(8);
        f.driver
            .ev
            .add_chain(&f.driver.mem, &[Desc::writable(addr, 8)]);
        f.worker.transport_reset = TransportReset::pending();

        turn(&mut f);

        assert_eq!(f.driver.ev.next_used(&f.driver.mem), Some((0, 4)));
        assert!(matches!(
            f.worker.transport_reset,
            TransportReset::Delivered { .. }
        ));
    }

    /// A fixture whose worker has just delivered a transport reset, as after a restore.
    fn fixture_after_reset() -> Fixture {
        let mut f = fixture();
        let addr = f.driver.ev.alloc(8);
        f.driver
            .ev
            .add_chain(&f.driver.mem, &[Desc::writable(addr, 8)]);
        f.worker.transport_reset = TransportReset::pending();
        turn(&mut f);
        f
    }

    #[test]
    fn test_worker_host_connect_after_reset_waits_for_the_driver_to_handle_it() {
        let mut f = fixture_after_reset();
        let _stream = host_connect(&f.uds, b"CONNECT 52\n");
        let mut events = vec![EpollEvent::default(); 16];
        for _ in 0..5 {
            f.worker.iterate(&mut events, 20);
        }
        let held = f.driver.try_recv();
        // The driver handles the event and posts its buffer again.
        let addr = f.driver.ev.alloc(8);
        f.driver
            .ev
            .add_chain(&f.driver.mem, &[Desc::writable(addr, 8)]);

        let (request, _) = next_packet(&mut f);

        assert!(
            held.is_none(),
            "a connection request went out before the reset was handled"
        );
        assert_eq!(request.op(), Some(Op::Request));
        assert_eq!(f.worker.transport_reset, TransportReset::Done);
    }

    #[test]
    fn test_worker_waiting_for_a_reset_ack_sleeps_no_longer_than_its_timeout() {
        let mut f = fixture_after_reset();
        f.worker.more_work = false;
        let waiting = f.worker.timeout_ms();
        f.worker.transport_reset = TransportReset::Done;

        // Just after the reset, nearly all of the timeout is left: no short polling.
        let limit = i32::try_from(RESET_ACK_TIMEOUT.as_millis()).expect("ms") + 1;
        assert!(
            (limit / 2..=limit).contains(&waiting),
            "slept {waiting} ms waiting for the acknowledgement"
        );
        assert_eq!(f.worker.timeout_ms(), -1, "idle with no reset owed");
    }

    #[test]
    fn test_worker_host_connect_after_unacknowledged_reset_flows_after_the_timeout() {
        let mut f = fixture_after_reset();
        if let TransportReset::Delivered { avail, .. } = f.worker.transport_reset {
            f.worker.transport_reset = TransportReset::Delivered {
                since: Instant::now() - RESET_ACK_TIMEOUT,
                avail,
            };
        }
        let _stream = host_connect(&f.uds, b"CONNECT 52\n");

        let (request, _) = next_packet(&mut f);

        assert_eq!(request.op(), Some(Op::Request));
    }

    #[test]
    fn test_worker_used_buffers_raise_interrupt() {
        let mut f = fixture();
        f.driver.send(&guest(Op::Rst, 40000, 7), &[]);

        turn(&mut f);

        assert_eq!(f.worker.irq.status(), IrqKind::Vring as u32);
    }

    fn vsock(dir: &TempDir) -> Vsock {
        Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.as_path().join("v.sock"),
        })
        .expect("vsock")
    }

    /// Waits (at most 2 s) for the worker thread to put a packet in the rx queue.
    fn wait_packet(driver: &mut Driver) -> (PacketHeader, Vec<u8>) {
        for _ in 0..200 {
            if let Some(packet) = driver.try_recv() {
                return packet;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no rx packet");
    }

    #[test]
    fn test_vsock_new_invalid_cid_fails() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let config = VsockConfig {
            guest_cid: 1,
            uds_path: dir.as_path().join("v.sock"),
        };

        let result = Vsock::new(&config);

        assert!(matches!(result, Err(VsockError::InvalidCid(1))));
    }

    #[test]
    fn test_vsock_read_config_returns_cid_le() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let device = vsock(&dir);
        let mut data = [0xAAu8; 12];

        device.read_config(0, &mut data);

        assert_eq!(data, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn test_vsock_read_config_past_cid_reads_zero() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let device = vsock(&dir);
        let mut high = [0xAAu8; 4];
        let mut far = [0xAAu8; 4];

        device.read_config(4, &mut high);
        device.read_config(u64::MAX, &mut far);

        assert_eq!(high, [0; 4]);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn test_vsock_identity_and_features_match_spec() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);

        device.set_acked_features(u64::MAX);

        assert_eq!(device.device_type(), 19);
        assert_eq!(device.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(device.avail_features(), features::VERSION_1);
        assert_eq!(device.acked_features, features::VERSION_1);
    }

    #[test]
    fn test_vsock_activate_with_two_queues_fails() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        let driver = Driver::new();
        let mut ctx = driver.context();
        ctx.queues.pop();

        let result = device.activate(ctx);

        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 3,
                found: 2
            })
        ));
        assert!(!device.is_active());
    }

    #[test]
    fn test_vsock_activate_then_reset_serves_and_joins() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        let mut driver = Driver::new();
        driver.add_rx_buffers(4);
        device.activate(driver.context()).expect("activate");
        let _stream = host_connect(&device.config().uds_path.clone(), b"CONNECT 99\n");

        let (request, _) = wait_packet(&mut driver);
        let reset = device.reset();

        assert_eq!(request.dst_port, 99);
        assert!(reset);
        assert!(!device.is_active());
    }

    #[test]
    fn test_vsock_host_connect_before_activate_is_served_after() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        let _stream = host_connect(&device.config().uds_path.clone(), b"CONNECT 42\n");
        let mut driver = Driver::new();
        driver.add_rx_buffers(4);

        device.activate(driver.context()).expect("activate");

        let (request, _) = wait_packet(&mut driver);
        assert_eq!(request.dst_port, 42);
    }

    #[test]
    fn test_vsock_reactivate_after_reset_keeps_listener() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        device.activate(Driver::new().context()).expect("activate");
        device.reset();
        let mut driver = Driver::new();
        driver.add_rx_buffers(4);

        device.activate(driver.context()).expect("reactivate");
        let _stream = host_connect(&device.config().uds_path.clone(), b"CONNECT 7\n");

        let (request, _) = wait_packet(&mut driver);
        assert_eq!(request.dst_port, 7);
    }

    #[test]
    fn test_vsock_reset_connections_sends_rst_and_closes_host_socket() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        let mut driver = Driver::new();
        driver.add_rx_buffers(4);
        device.activate(driver.context()).expect("activate");
        let mut stream = host_connect(&device.config().uds_path.clone(), b"CONNECT 99\n");
        let (request, _) = wait_packet(&mut driver);

        device.reset_connections().expect("reset connections");
        let (rst, _) = wait_packet(&mut driver);

        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("EOF");
        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(rst.src_port, request.src_port);
        assert!(device.is_active());
    }

    #[test]
    fn test_vsock_drop_stops_worker_and_removes_socket() {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let mut device = vsock(&dir);
        device.activate(Driver::new().context()).expect("activate");
        let uds = device.config().uds_path.clone();

        drop(device);

        assert!(!uds.exists());
    }
}
