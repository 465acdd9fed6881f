//! virtio-vsock (virtio 1.2, section 5.10): stream sockets between the guest and host programs,
//! with a host side that speaks Firecracker's Unix-socket protocol.
//!
//! The device ([`Vsock`]) has three queues (rx, tx, event) and a configuration space holding
//! the guest CID (u64, little endian). Its backend listens on a Unix socket, `uds_path`:
//!
//! - **Host-initiated connections.** A host program connects to `uds_path` and writes
//!   `CONNECT <port>\n`. The device allocates a host port `P` (in `[2^30, 2^31)`) and sends the
//!   guest a REQUEST from CID 2, port `P`, to the guest's `<port>`. When the guest answers
//!   RESPONSE, the device writes `OK <P>\n` to the Unix connection and relays bytes both ways;
//!   when the guest answers RST (nobody listens) or does not answer within 2 s, the device
//!   closes the Unix connection.
//! - **Guest-initiated connections.** A guest connection to CID 2, port `P` makes the device
//!   connect to the Unix socket `<uds_path>_<P>`: RESPONSE on success, RST on failure.
//!
//! Files: `packet` parses and serialises packets in descriptor chains, `connection` is the
//! per-connection state machine and its credit accounting, `muxer` owns the Unix sockets and the
//! epoll instance and routes packets to connections, `device` implements [`VirtioDevice`] and
//! runs the worker thread.
//!
//! Limits: [`MAX_CONNECTIONS`] connections, [`MAX_PENDING_HANDSHAKES`] host connections that have
//! not sent their `CONNECT` line yet, and [`CONN_BUF_SIZE`] bytes of guest data buffered per
//! connection while its host socket would block (a guest that sends more than its credit
//! allows is reset). Host-to-guest data is never buffered by the device: a host socket is read
//! only into an rx buffer the guest supplied, and only as much as the guest's credit allows.
//!
//! Snapshots: [`Vsock::reset_connections`] closes every connection (RST to the guest, host
//! sockets closed) and keeps the listener; [`Vsock::send_transport_reset`] sends the guest
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
//!
//! [`VirtioDevice`]: super::VirtioDevice

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Logs through `log::$level!` when `$limiter` (a [`LogLimiter`]) allows it: for every line
/// the guest can trigger.
macro_rules! limited {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        if $limiter.allow() {
            log::$level!($($arg)+);
        }
    };
}

mod connection;
mod device;
mod muxer;
mod packet;
#[cfg(test)]
mod test_utils;

pub use device::Vsock;
pub use muxer::MuxerError;

/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// The size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// The most connections the device keeps open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The most accepted host connections still waiting for their `CONNECT <port>\n` line.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// The receive buffer each connection advertises to the guest (`buf_alloc`), which is also the
/// cap on guest data buffered for a host socket that would block.
pub const CONN_BUF_SIZE: u32 = 64 * 1024;
/// The device sends a CREDIT_UPDATE when the free space the guest believes we have falls under
/// this many bytes.
pub(crate) const CREDIT_UPDATE_THRESHOLD: u32 = 16 * 1024;
/// The largest payload of one packet, either direction (Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub(crate) const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// How long the guest has to answer a host-initiated REQUEST.
pub(crate) const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection waits for the guest's RST, or for the host stream to take more
/// of the data the guest sent before closing.
pub(crate) const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Queue indices.
pub(crate) const RXQ: usize = 0;
pub(crate) const TXQ: usize = 1;
pub(crate) const EVQ: usize = 2;
pub(crate) const NUM_QUEUES: usize = 3;

/// A vsock device's configuration, as the API gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID: at least 3 (0-2 are reserved) and below 2^32 - 1.
    pub guest_cid: u64,
    /// The Unix socket the device listens on; guest connections to host port `P` go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// The longest `sun_path` (without its terminating NUL).
const MAX_UDS_PATH_LEN: usize = 107;

impl VsockConfig {
    /// Checks the CID range and that `uds_path` fits a Unix socket address.
    pub fn validate(&self) -> Result<(), VsockError> {
        if self.guest_cid < 3 || self.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH_LEN {
            return Err(VsockError::InvalidPath(self.uds_path.clone()));
        }
        Ok(())
    }
}

/// Why the vsock device could not be created or could not change state.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or does not fit 32 bits.
    #[error("guest CID {0} is invalid: it must be at least 3 and below 2^32 - 1")]
    InvalidCid(u64),
    /// The Unix socket path is empty or too long for a socket address.
    #[error("Unix socket path {0:?} is empty or longer than 107 bytes")]
    InvalidPath(PathBuf),
    /// The Unix socket backend could not be set up.
    #[error("cannot set up the vsock backend")]
    Backend(#[source] MuxerError),
    /// The worker thread could not be started.
    #[error("cannot start the vsock worker thread")]
    Worker(#[source] io::Error),
    /// The worker thread panicked; the backend (and its listener) is gone.
    #[error("the vsock worker thread panicked")]
    WorkerPanicked,
}

/// Rate limit for log lines the guest or a host program can trigger: a burst of
/// [`LogLimiter::BURST`] lines per [`LogLimiter::WINDOW`], then one summary line.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(5);

    /// Whether the next line may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let window_over = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if window_over {
            if self.suppressed > 0 {
                log::warn!("vsock: {} log lines suppressed", self.suppressed);
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(guest_cid: u64, uds_path: &str) -> VsockConfig {
        VsockConfig {
            guest_cid,
            uds_path: PathBuf::from(uds_path),
        }
    }

    #[test]
    fn test_config_validate_good_config_is_accepted() {
        let cfg = config(3, "/tmp/v.sock");

        let result = cfg.validate();

        assert!(result.is_ok());
    }

    #[test]
    fn test_config_validate_reserved_cid_is_rejected() {
        let cfg = config(2, "/tmp/v.sock");

        let result = cfg.validate();

        assert!(matches!(result, Err(VsockError::InvalidCid(2))));
    }

    #[test]
    fn test_config_validate_cid_any_is_rejected() {
        let cfg = config(u64::from(u32::MAX), "/tmp/v.sock");

        let result = cfg.validate();

        assert!(matches!(result, Err(VsockError::InvalidCid(_))));
    }

    #[test]
    fn test_config_validate_long_path_is_rejected() {
        let cfg = config(3, &"x".repeat(108));

        let result = cfg.validate();

        assert!(matches!(result, Err(VsockError::InvalidPath(_))));
    }

    #[test]
    fn test_config_validate_empty_path_is_rejected() {
        let cfg = config(3, "");

        let result = cfg.validate();

        assert!(matches!(result, Err(VsockError::InvalidPath(_))));
    }

    #[test]
    fn test_log_limiter_burst_then_suppressed() {
        let mut limiter = LogLimiter::default();

        let allowed = (0..LogLimiter::BURST + 5)
            .filter(|_| limiter.allow())
            .count();

        assert_eq!(allowed, LogLimiter::BURST as usize);
    }
}
