//! The worker thread of a single-queue device (virtio-blk, virtio-rng). [`QueueWorker`] waits
//! (epoll) on the queue's eventfd and on a stop eventfd; on a notification it hands every
//! available chain to the device's [`ChainHandler`], returns each to the used ring with the
//! length the handler reports, and interrupts the driver when the queue says the driver wants
//! it (EVENT_IDX aware). [`WorkerSlot`] is the device's side: it starts a worker on activation
//! and stops it on reset.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{error_chain, LogLimiter, GUEST_LOG_INTERVAL};
use super::{ActivateContext, ActivateError, GuestMemoryMmap, IrqKind, IrqTrigger, QueuePosition};

const QUEUE_TOKEN: u64 = 0;
const STOP_TOKEN: u64 = 1;
/// Chains served before the worker looks at its stop eventfd again.
const BATCH: usize = 256;

/// What a device does with each chain the driver makes available.
pub(super) trait ChainHandler: Send + 'static {
    /// The device's short name: log lines start with `virtio-<NAME>:`, the thread is
    /// `hearth-<NAME>`.
    const NAME: &'static str;

    /// Serves one chain and returns the length to put in the used ring. Errors the guest
    /// caused go to `log`; they never panic.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        log: &mut GuestLog,
    ) -> u32;
}

/// Rate-limited warnings about what the guest did, prefixed with the device's name.
#[derive(Debug)]
pub(super) struct GuestLog {
    device: &'static str,
    limiter: LogLimiter,
}

impl GuestLog {
    fn new(device: &'static str) -> Self {
        Self {
            device,
            limiter: LogLimiter::new(GUEST_LOG_INTERVAL),
        }
    }

    /// Logs `e` with its causes, unless a line went out too recently.
    pub(super) fn report(&mut self, e: &dyn std::error::Error) {
        if let Some(dropped) = self.limiter.allow() {
            warn!(
                "virtio-{}: {} ({dropped} similar messages suppressed)",
                self.device,
                error_chain(e)
            );
        }
    }
}

/// A running worker thread; it ends with its queue's position.
#[derive(Debug)]
pub(super) struct WorkerHandle {
    device: &'static str,
    stop_evt: EventFd,
    thread: Option<JoinHandle<QueuePosition>>,
}

impl WorkerHandle {
    /// Stops the thread and waits for it; false if it could not be told to stop.
    pub(super) fn shutdown(&mut self) -> bool {
        self.stop().is_ok()
    }

    /// Stops the thread and waits for it; returns where it left its queue (None if the
    /// thread panicked or had already been stopped).
    fn stop(&mut self) -> Result<Option<QueuePosition>, ()> {
        let Some(thread) = self.thread.take() else {
            return Ok(None);
        };
        if let Err(e) = self.stop_evt.write(1) {
            error!("virtio-{}: cannot stop the worker: {e}", self.device);
            self.thread = Some(thread);
            return Err(());
        }
        match thread.join() {
            Ok(position) => Ok(Some(position)),
            Err(_) => {
                error!("virtio-{}: the worker panicked", self.device);
                Ok(None)
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A device's worker, if one runs.
#[derive(Debug, Default)]
pub(super) struct WorkerSlot(Option<WorkerHandle>);

impl WorkerSlot {
    /// Stops the worker, if any; false if it could not be stopped.
    pub(super) fn stop(&mut self) -> bool {
        if let Some(worker) = &mut self.0 {
            if !worker.shutdown() {
                return false;
            }
        }
        self.0 = None;
        true
    }

    /// Stops the worker for a snapshot and returns its queue's position, which the transport
    /// records; a later activation carries on from there.
    pub(super) fn quiesce(&mut self) -> Result<Vec<QueuePosition>, ActivateError> {
        let Some(worker) = &mut self.0 else {
            return Ok(Vec::new());
        };
        let position = worker
            .stop()
            .map_err(|()| ActivateError::Backend("the worker cannot be stopped".into()))?
            .ok_or_else(|| ActivateError::Backend("the worker had failed".into()))?;
        self.0 = None;
        Ok(vec![position])
    }

    /// Stops the previous worker, if any, and starts `worker` in its place.
    pub(super) fn start<H: ChainHandler>(
        &mut self,
        worker: QueueWorker<H>,
    ) -> Result<(), ActivateError> {
        if !self.stop() {
            return Err(ActivateError::Backend(
                "the previous worker is still running".into(),
            ));
        }
        self.0 = Some(worker.spawn().map_err(ActivateError::Worker)?);
        Ok(())
    }
}

/// Serves the one queue of one activation with `H`.
#[derive(Debug)]
pub(super) struct QueueWorker<H> {
    queue: Queue,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    queue_evt: EventFd,
    log: GuestLog,
    handler: H,
}

impl<H: ChainHandler> QueueWorker<H> {
    pub(super) fn new(
        queue: Queue,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        queue_evt: EventFd,
        handler: H,
    ) -> Self {
        Self {
            queue,
            mem,
            irq,
            queue_evt,
            log: GuestLog::new(H::NAME),
            handler,
        }
    }

    /// A worker for the single queue of `ctx`; fails unless the driver set up exactly one.
    pub(super) fn from_context(ctx: ActivateContext, handler: H) -> Result<Self, ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            irq,
        } = ctx;
        let found = queues.len();
        let (Ok([queue]), Ok([queue_evt])) = (
            <[Queue; 1]>::try_from(queues),
            <[EventFd; 1]>::try_from(queue_evts),
        ) else {
            return Err(ActivateError::QueueCount { expected: 1, found });
        };
        Ok(Self::new(queue, mem, irq, queue_evt, handler))
    }

    /// The eventfd the driver's notifications arrive on.
    #[cfg(test)]
    pub(super) fn queue_evt(&self) -> &EventFd {
        &self.queue_evt
    }

    /// Starts the thread.
    pub(super) fn spawn(self) -> io::Result<WorkerHandle> {
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.queue_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, QUEUE_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let thread = crate::thread::spawn(format!("hearth-{}", H::NAME), move || self.run(&epoll))?;
        Ok(WorkerHandle {
            device: H::NAME,
            stop_evt,
            thread: Some(thread),
        })
    }

    fn position(&self) -> QueuePosition {
        QueuePosition {
            next_avail: self.queue.next_avail(),
            next_used: self.queue.next_used(),
        }
    }

    fn run(mut self, epoll: &Epoll) -> QueuePosition {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let count = match epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("virtio-{}: the worker cannot wait for events: {e}", H::NAME);
                    return self.position();
                }
            };
            for event in events.iter().take(count) {
                match event.data() {
                    STOP_TOKEN => return self.position(),
                    QUEUE_TOKEN => {
                        // EAGAIN means another wake-up already consumed the count.
                        let _ = self.queue_evt.read();
                        self.handle_queue_event();
                    }
                    _ => {}
                }
            }
        }
    }

    /// Serves the available chains and interrupts the driver if it asked for it.
    pub(super) fn handle_queue_event(&mut self) {
        if self.process_queue() {
            self.signal_used();
        }
    }

    /// Serves up to [`BATCH`] chains; returns whether any was returned to the used ring.
    fn process_queue(&mut self) -> bool {
        let Self {
            queue,
            mem,
            queue_evt,
            log,
            handler,
            ..
        } = self;
        let mut served = 0usize;
        loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                log.report(&e);
            }
            loop {
                if served == BATCH {
                    // Come back after looking at the stop eventfd.
                    if let Err(e) = queue_evt.write(1) {
                        error!("virtio-{}: cannot requeue the queue event: {e}", H::NAME);
                    }
                    return true;
                }
                let chain = match queue.iter(&*mem) {
                    Ok(mut available) => available.next(),
                    Err(e) => {
                        // A driver that published a bogus index; wait for its next kick.
                        log.report(&e);
                        let _ = queue.enable_notification(&*mem);
                        return served > 0;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let len = handler.serve(mem, chain, log);
                if let Err(e) = queue.add_used(&*mem, head, len) {
                    log.report(&e);
                }
                served += 1;
            }
            match queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log.report(&e);
                    break;
                }
            }
        }
        served > 0
    }

    fn signal_used(&mut self) {
        let notify = match self.queue.needs_notification(&self.mem) {
            Ok(notify) => notify,
            Err(e) => {
                self.log.report(&e);
                true
            }
        };
        if notify {
            if let Err(e) = self.irq.trigger(IrqKind::Vring) {
                error!("virtio-{}: cannot interrupt the driver: {e}", H::NAME);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::testing::{guest_memory, writable, TestQueue, DATA_ADDR};

    /// Uses every chain with a fixed length.
    struct FixedLen(u32);

    impl ChainHandler for FixedLen {
        const NAME: &'static str = "test";

        fn serve(
            &mut self,
            _mem: &GuestMemoryMmap,
            _chain: DescriptorChain<&GuestMemoryMmap>,
            _log: &mut GuestLog,
        ) -> u32 {
            self.0
        }
    }

    fn context(mem: &GuestMemoryMmap, tq: &TestQueue, irq: &Arc<IrqTrigger>) -> ActivateContext {
        ActivateContext {
            mem: mem.clone(),
            queues: vec![tq.queue(mem, false)],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
            irq: Arc::clone(irq),
        }
    }

    #[test]
    fn test_queue_worker_uses_chains_with_handler_length_and_interrupts() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 16);
        let irq = Arc::new(IrqTrigger::new().expect("irq"));
        let head = tq.add_chain(&mem, &[writable(DATA_ADDR, 64)]);
        tq.add_chain(&mem, &[writable(DATA_ADDR, 64)]);
        let mut worker =
            QueueWorker::from_context(context(&mem, &tq, &irq), FixedLen(7)).expect("worker");

        worker.handle_queue_event();

        assert_eq!(tq.used_idx(&mem), 2);
        assert_eq!(tq.used_elem(&mem, 0), (u32::from(head), 7));
        assert_eq!(irq.status(), IrqKind::Vring as u32);
    }

    #[test]
    fn test_worker_slot_restart_serves_then_stops() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 16);
        let irq = Arc::new(IrqTrigger::new().expect("irq"));
        let mut slot = WorkerSlot::default();
        let first = QueueWorker::from_context(context(&mem, &tq, &irq), FixedLen(1)).expect("w");
        slot.start(first).expect("start");
        let second = QueueWorker::from_context(context(&mem, &tq, &irq), FixedLen(1)).expect("w");
        let kick = second.queue_evt().try_clone().expect("clone");
        slot.start(second).expect("restart");
        tq.add_chain(&mem, &[writable(DATA_ADDR, 8)]);

        kick.write(1).expect("kick");
        let served = tq.wait_used(&mem, 1);
        let stopped = slot.stop();

        assert!(served);
        assert!(stopped);
        assert!(slot.0.is_none());
    }
}
