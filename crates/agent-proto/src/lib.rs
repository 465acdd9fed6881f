//! The versioned protocol between the host and `hearth-agent`, spoken over virtio-vsock,
//! and the async host-side client that `hearthd` uses. `hearth-vmm` never needs it.
#![forbid(unsafe_code)]

/// The protocol version this crate speaks; the handshake rejects any other.
pub const PROTOCOL_VERSION: u32 = 1;
