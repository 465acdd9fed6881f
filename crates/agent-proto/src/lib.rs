//! The versioned protocol between the host and `hearth-agent`, spoken over virtio-vsock,
//! and the async host-side client that `hearthd` uses. `hearth-vmm` never needs it.
//!
//! Each request is its own vsock connection: the host sends `Hello`, the agent answers
//! `Welcome` (or an error naming the versions it speaks), the host sends one `Request`, and the
//! exchange for that request follows. Concurrent sessions are concurrent connections, each
//! with vsock's own flow control. `docs/AGENT-PROTOCOL.md` is the reference.
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
pub mod message;

pub use client::{
    AgentClient, ClientError, Endpoint, ExecEvent, ExecSession, GuestStream, LogEvent, Output,
};
pub use message::*;

/// The protocol version this crate speaks; the handshake rejects any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
