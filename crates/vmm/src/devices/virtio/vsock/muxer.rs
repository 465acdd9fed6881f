//! The Unix-socket backend, compatible with Firecracker's: the listener on `uds_path`, the
//! `CONNECT <port>\n` handshake of host-initiated connections, connections to
//! `<uds_path>_<port>` for guest-initiated ones, and the routing of packets between the device
//! and its [`Connection`]s.
//!
//! The muxer owns the epoll instance the device's worker waits on: the worker registers its
//! queue and stop eventfds with tokens below [`FIRST_MUXER_TOKEN`]; the listener and the
//! pending handshakes are registered level-triggered, connection streams edge-triggered. Every
//! ready token that is not the worker's goes to [`Muxer::handle_event`].
//!
//! Packets for the guest come from two places: RSTs the muxer answers on its own (the control
//! queue, bounded: the worker stops reading the tx queue while it is full) and connections that
//! have something to say (a queue of connection keys, each connection at most once).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, ConnState, Connection, HostStream};
use super::packet::{Op, PacketHeader, TYPE_STREAM};
use super::{LogLimiter, HOST_CID, MAX_CONNECTIONS, MAX_PENDING_HANDSHAKES};

/// Epoll tokens below this value belong to the device's worker.
pub const FIRST_MUXER_TOKEN: u64 = 8;
const LISTENER_TOKEN: u64 = FIRST_MUXER_TOKEN;
const FIRST_DYNAMIC_TOKEN: u64 = 16;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE_LINE: usize = 32;
/// The most RSTs the muxer queues on its own before the worker stops reading the tx queue.
const MAX_PENDING_CONTROL: usize = 256;
/// The most host connections accepted per listener wake-up.
const ACCEPT_BATCH: usize = 32;
/// How long the listener stays paused after accept ran out of resources.
const LISTENER_PAUSE: Duration = Duration::from_secs(1);
/// Host ports of host-initiated connections are allocated round robin in `[2^30, 2^31)`, as
/// Firecracker does.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Why the Unix socket backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The listening socket could not be bound (for instance, the path exists).
    #[error("cannot listen on the Unix socket {0:?}")]
    Bind(PathBuf, #[source] io::Error),
    /// The epoll instance could not be created.
    #[error("cannot create the vsock epoll instance")]
    Epoll(#[source] io::Error),
    /// A descriptor could not be registered with the epoll instance.
    #[error("cannot register the listener with the vsock epoll instance")]
    Register(#[source] io::Error),
}

/// The events a connection stream is registered for.
fn conn_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

/// An accepted host connection that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

impl Handshake {
    /// Reads the line one byte at a time, so that nothing after the newline is consumed: the
    /// host program may send data right behind it. `Ok(None)` means the line is incomplete.
    fn read_line(&mut self) -> Result<Option<u32>, &'static str> {
        loop {
            if self.line.len() >= MAX_HANDSHAKE_LINE {
                return Err("the CONNECT line is too long");
            }
            let mut byte = [0u8; 1];
            match self.stream.read(&mut byte) {
                Ok(0) => return Err("the host program closed before sending CONNECT"),
                Ok(_) => {
                    self.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        return parse_connect(&self.line)
                            .map(Some)
                            .ok_or("malformed CONNECT line");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err("cannot read the CONNECT line"),
            }
        }
    }
}

/// Parses `CONNECT <port>\n` (the verb in any case, as Firecracker accepts it).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// The socket guest connections to host port `port` go to: `<uds_path>_<port>`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects a non-blocking Unix stream: fails with WouldBlock instead of waiting when the
/// listener's backlog is full, so a slow host program cannot stall the device.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::sa_family_t::try_from(libc::AF_UNIX)
            .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = libc::socklen_t::try_from(
        std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1,
    )
    .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;

    // SAFETY: socket() takes no pointers; its result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor socket() just returned; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, `len` covers its
    // family and the NUL-terminated path and no more than its size, and `socket` is open.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// A connection's host stream. Writes use MSG_NOSIGNAL: a host program that went away gives
/// EPIPE (and an RST for the guest), never a SIGPIPE, whatever the embedding process does
/// with that signal.
#[derive(Debug)]
pub struct HostSocket(UnixStream);

impl Read for HostSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for HostSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, which outlives the call, and the
        // descriptor is the open socket `self.0` owns.
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        usize::try_from(sent).map_err(|_| io::Error::last_os_error())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HostStream for HostSocket {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Write)
    }
}

impl AsRawFd for HostSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[derive(Debug)]
struct ConnEntry {
    conn: Connection<HostSocket>,
    token: u64,
    /// The key is in `rx_conns`.
    queued: bool,
}

/// The vsock backend: host Unix sockets on one side, guest packets on the other.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The (device, inode) of the socket file we bound, to remove only our own on drop.
    listener_inode: Option<(u64, u64)>,
    /// The listener is out of the epoll set after accept failed for lack of resources (so
    /// that its readiness does not spin the worker) until this time or until a stream closes.
    listener_paused_until: Option<Instant>,
    epoll: Epoll,
    conns: HashMap<ConnKey, ConnEntry>,
    /// Connection streams by epoll token.
    tokens: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    /// RSTs for the guest that belong to no connection.
    rx_control: VecDeque<PacketHeader>,
    /// Connections with a packet for the guest.
    rx_conns: VecDeque<ConnKey>,
    local_port_last: u32,
    limiter: LogLimiter,
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist) for a guest with CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let listener =
            UnixListener::bind(uds_path).map_err(|e| MuxerError::Bind(uds_path.to_owned(), e))?;
        let listener_inode = fs::metadata(uds_path).ok().map(|m| (m.dev(), m.ino()));
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        let muxer = Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            listener_inode,
            listener_paused_until: None,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: FIRST_DYNAMIC_TOKEN,
            rx_control: VecDeque::new(),
            rx_conns: VecDeque::new(),
            local_port_last: LOCAL_PORT_BASE - 1,
            limiter: LogLimiter::default(),
        };
        muxer
            .listener
            .set_nonblocking(true)
            .map_err(|e| MuxerError::Bind(uds_path.to_owned(), e))?;
        muxer
            .epoll
            .ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(MuxerError::Register)?;
        Ok(muxer)
    }

    /// The number of open connections.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Registers one of the worker's descriptors (level-triggered, readable) under `token`,
    /// which must be below [`FIRST_MUXER_TOKEN`].
    pub fn register(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert!(token < FIRST_MUXER_TOKEN);
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    /// Removes one of the worker's descriptors.
    pub fn unregister(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits for ready descriptors (`timeout_ms` as for epoll_wait).
    pub fn wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        self.epoll.wait(timeout_ms, events)
    }

    fn alloc_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_DYNAMIC_TOKEN);
        token
    }

    /// Handles a ready descriptor of the muxer's.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_host_connections();
        } else if self.handshakes.contains_key(&token) {
            self.read_handshake(token);
        } else if let Some(&key) = self.tokens.get(&token) {
            if let Some(entry) = self.conns.get_mut(&key) {
                if events.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                    entry.conn.notify_readable();
                }
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    entry.conn.notify_hup();
                }
                if events.contains(EventSet::OUT) {
                    entry.conn.notify_writable(Instant::now());
                }
            }
            self.after_change(key);
        }
    }

    fn accept_host_connections(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_handshake(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    limited!(
                        self.limiter,
                        warn,
                        "vsock: cannot accept a host connection, pausing the listener: {e}"
                    );
                    self.pause_listener();
                    return;
                }
            }
        }
    }

    /// Takes the level-triggered listener out of the epoll set for [`LISTENER_PAUSE`]: a
    /// pending connection accept cannot take (out of descriptors, say) would wake the worker
    /// in a loop.
    fn pause_listener(&mut self) {
        if self.listener_paused_until.is_none() {
            // Fails only if the listener is not registered.
            let _ = self.unregister(self.listener.as_raw_fd());
        }
        self.listener_paused_until = Some(Instant::now() + LISTENER_PAUSE);
    }

    fn resume_listener(&mut self) {
        if self.listener_paused_until.is_none() {
            return;
        }
        let event = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
        match self
            .epoll
            .ctl(ControlOperation::Add, self.listener.as_raw_fd(), event)
        {
            Ok(()) => self.listener_paused_until = None,
            Err(e) => {
                limited!(self.limiter, warn, "vsock: cannot watch the listener: {e}");
                self.listener_paused_until = Some(Instant::now() + LISTENER_PAUSE);
            }
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) {
        if self.handshakes.len() >= MAX_PENDING_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
            limited!(
                self.limiter,
                warn,
                "vsock: connection limit reached, refusing a host connection"
            );
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            limited!(
                self.limiter,
                warn,
                "vsock: cannot set up a host connection: {e}"
            );
            return;
        }
        let token = self.alloc_token();
        let event = EpollEvent::new(EventSet::IN, token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), event)
        {
            limited!(
                self.limiter,
                warn,
                "vsock: cannot watch a host connection: {e}"
            );
            return;
        }
        let line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
        self.handshakes.insert(token, Handshake { stream, line });
    }

    fn remove_handshake(&mut self, token: u64) -> Option<UnixStream> {
        let handshake = self.handshakes.remove(&token)?;
        // Fails only if the descriptor was never registered.
        let _ = self.unregister(handshake.stream.as_raw_fd());
        self.resume_listener();
        Some(handshake.stream)
    }

    fn read_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        match handshake.read_line() {
            Ok(None) => {}
            Ok(Some(port)) => {
                if let Some(stream) = self.handshakes.remove(&token).map(|h| h.stream) {
                    self.start_host_connection(token, stream, port);
                }
            }
            Err(reason) => {
                limited!(
                    self.limiter,
                    info,
                    "vsock: closing a host connection: {reason}"
                );
                self.remove_handshake(token);
            }
        }
    }

    /// Turns a completed handshake into a connection whose REQUEST goes to the guest.
    fn start_host_connection(&mut self, token: u64, stream: UnixStream, peer_port: u32) {
        if self.conns.len() >= MAX_CONNECTIONS {
            limited!(
                self.limiter,
                warn,
                "vsock: connection limit reached, refusing a host connection"
            );
            let _ = self.unregister(stream.as_raw_fd());
            return;
        }
        let local_port = self.alloc_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        // The handshake was level-triggered; the connection is edge-triggered. Modifying
        // reports data the host program sent behind its CONNECT line.
        let event = EpollEvent::new(conn_events(), token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Modify, stream.as_raw_fd(), event)
        {
            limited!(
                self.limiter,
                warn,
                "vsock: cannot watch a host connection: {e}"
            );
            let _ = self.unregister(stream.as_raw_fd());
            return;
        }
        let conn = Connection::new_local_init(key, self.guest_cid, HostSocket(stream));
        self.insert_conn(key, token, conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            self.local_port_last = (self.local_port_last.wrapping_add(1) & !(1 << 31)) | (1 << 30);
            let key = ConnKey {
                local_port: self.local_port_last,
                peer_port,
            };
            // At most MAX_CONNECTIONS of the 2^30 ports are taken.
            if !self.conns.contains_key(&key) {
                return self.local_port_last;
            }
        }
    }

    fn insert_conn(&mut self, key: ConnKey, token: u64, conn: Connection<HostSocket>) {
        let entry = ConnEntry {
            conn,
            token,
            queued: false,
        };
        self.tokens.insert(token, key);
        self.conns.insert(key, entry);
        self.after_change(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(entry) = self.conns.remove(&key) {
            self.tokens.remove(&entry.token);
            // Fails only if the descriptor was never registered; closing it would remove it.
            let _ = self.unregister(entry.conn.stream().as_raw_fd());
            drop(entry);
            self.resume_listener();
        }
    }

    /// Routes the outcome of a change to a connection: removal, an RST, or a place in the rx
    /// queue.
    fn after_change(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        match entry.conn.state() {
            ConnState::Killed => {
                if let Some(reason) = entry.conn.kill_reason() {
                    limited!(
                        self.limiter,
                        info,
                        "vsock: resetting connection (host port {}, guest port {}): {reason}",
                        key.local_port,
                        key.peer_port
                    );
                }
                self.remove_conn(key);
                self.push_rst(key, true);
            }
            ConnState::Closed => self.remove_conn(key),
            _ => {
                if !entry.queued && entry.conn.has_pending_rx() {
                    entry.queued = true;
                    self.rx_conns.push_back(key);
                }
            }
        }
    }

    /// Queues an RST for the guest. `force` bypasses the cap: each connection sends one RST at
    /// most, so those are bounded by the connection limit.
    fn push_rst(&mut self, key: ConnKey, force: bool) {
        if !force && self.rx_control.len() >= MAX_PENDING_CONTROL {
            limited!(
                self.limiter,
                warn,
                "vsock: too many RSTs pending, dropping one"
            );
            return;
        }
        self.rx_control.push_back(PacketHeader::new(
            (HOST_CID, key.local_port),
            (self.guest_cid, key.peer_port),
            Op::Rst,
        ));
    }

    /// Whether so many RSTs wait for rx buffers that the tx queue must not be read.
    pub fn rx_backlogged(&self) -> bool {
        self.rx_control.len() >= MAX_PENDING_CONTROL
    }

    /// Whether the guest's checks let the packet in: sent by our guest, to the host.
    fn addressed_to_host(&mut self, header: &PacketHeader) -> bool {
        if header.dst_cid != HOST_CID || header.src_cid != self.guest_cid {
            limited!(
                self.limiter,
                info,
                "vsock: dropping a guest packet from CID {} to CID {}",
                header.src_cid,
                header.dst_cid
            );
            return false;
        }
        true
    }

    /// Handles a packet the guest sent.
    pub fn send_pkt(&mut self, header: &PacketHeader, payload: &[u8]) {
        if !self.addressed_to_host(header) {
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.type_ != TYPE_STREAM {
            limited!(
                self.limiter,
                info,
                "vsock: resetting a guest packet of unsupported type {}",
                header.type_
            );
            self.reset_key(key, header.op());
            return;
        }
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.send_pkt(header, payload, Instant::now());
            self.after_change(key);
            return;
        }
        match header.op() {
            Some(Op::Request) => self.connect_to_host(key, header),
            Some(Op::Rst) => {}
            _ => {
                limited!(
                    self.limiter,
                    debug,
                    "vsock: resetting a packet for no connection (host port {}, guest port {})",
                    key.local_port,
                    key.peer_port
                );
                self.push_rst(key, false);
            }
        }
    }

    /// Answers a malformed packet whose header could be read: the connection (if any) is reset.
    pub fn reject_pkt(&mut self, header: &PacketHeader) {
        if !self.addressed_to_host(header) {
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        self.reset_key(key, header.op());
    }

    fn reset_key(&mut self, key: ConnKey, op: Option<Op>) {
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.kill("malformed or unsupported packet");
            self.after_change(key);
        } else if op != Some(Op::Rst) {
            self.push_rst(key, false);
        }
    }

    /// A guest REQUEST for host port `key.local_port`: connect to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: ConnKey, request: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            limited!(
                self.limiter,
                warn,
                "vsock: connection limit reached, refusing a guest connection"
            );
            self.push_rst(key, false);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                limited!(
                    self.limiter,
                    debug,
                    "vsock: guest connection to {} refused: {e}",
                    path.display()
                );
                self.push_rst(key, false);
                return;
            }
        };
        let token = self.alloc_token();
        let event = EpollEvent::new(conn_events(), token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), event)
        {
            limited!(
                self.limiter,
                warn,
                "vsock: cannot watch a host connection: {e}"
            );
            self.push_rst(key, false);
            return;
        }
        let conn = Connection::new_peer_init(key, self.guest_cid, HostSocket(stream), request);
        self.insert_conn(key, token, conn);
    }

    /// Whether a packet waits for an rx buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.rx_control.is_empty() || !self.rx_conns.is_empty()
    }

    /// The next packet for the guest, with its payload (the header's `len` bytes) in `buf`.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<PacketHeader> {
        if let Some(header) = self.rx_control.pop_front() {
            return Some(header);
        }
        let now = Instant::now();
        for _ in 0..self.rx_conns.len() {
            let key = self.rx_conns.pop_front()?;
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            entry.queued = false;
            let packet = entry.conn.recv_pkt(buf, now);
            self.after_change(key);
            if packet.is_some() {
                return packet;
            }
        }
        self.rx_control.pop_front()
    }

    /// The earliest deadline: a connection's request or shutdown timeout, or the end of a
    /// listener pause.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|e| e.conn.deadline())
            .chain(self.listener_paused_until)
            .min()
    }

    /// Resets the connections whose deadline has passed; resumes a paused listener.
    pub fn process_timeouts(&mut self, now: Instant) {
        if self.listener_paused_until.is_some_and(|t| t <= now) {
            self.resume_listener();
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in expired {
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.on_deadline(now);
            }
            self.after_change(key);
        }
    }

    /// Closes every connection and pending handshake, keeping the listener. With
    /// `notify_guest`, an RST per connection is queued for the guest; without, packets still
    /// queued for the guest are dropped too (its driver is gone).
    pub fn reset_connections(&mut self, notify_guest: bool) {
        if !notify_guest {
            self.rx_control.clear();
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
            if notify_guest {
                self.push_rst(key, true);
            }
        }
        self.rx_conns.clear();
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for token in tokens {
            self.remove_handshake(token);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one we bound.
        let ours = fs::metadata(&self.uds_path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.listener_inode);
        if ours {
            let _ = fs::remove_file(&self.uds_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::vsock::packet::SHUTDOWN_BOTH;
    use crate::devices::virtio::vsock::{CONN_BUF_SIZE, MAX_PKT_PAYLOAD};

    const GUEST_CID: u64 = 3;

    struct Fixture {
        _dir: TempDir,
        uds: PathBuf,
        muxer: Muxer,
    }

    fn fixture() -> Fixture {
        let dir = TempDir::new_with_prefix("/tmp/hearth-vsock-").expect("tempdir");
        let uds = dir.as_path().join("v.sock");
        let muxer = Muxer::new(GUEST_CID, &uds).expect("muxer");
        Fixture {
            _dir: dir,
            uds,
            muxer,
        }
    }

    /// Dispatches whatever is ready within 20 ms.
    fn pump(muxer: &mut Muxer) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = muxer.wait(&mut events, 20).expect("epoll wait");
        for ev in &events[..n] {
            muxer.handle_event(ev.data(), EventSet::from_bits_truncate(ev.events()));
        }
    }

    /// Pumps until the muxer has a packet for the guest (at most 2 s).
    fn next_packet(muxer: &mut Muxer) -> (PacketHeader, Vec<u8>) {
        let mut buf = vec![0u8; MAX_PKT_PAYLOAD];
        for _ in 0..100 {
            if let Some(header) = muxer.recv_pkt(&mut buf) {
                let len = usize::try_from(header.len).expect("len");
                return (header, buf[..len].to_vec());
            }
            pump(muxer);
        }
        panic!("no packet for the guest");
    }

    /// Pumps long enough for accepts and handshakes to be handled.
    fn settle(muxer: &mut Muxer) {
        for _ in 0..5 {
            pump(muxer);
        }
    }

    fn no_packet(muxer: &mut Muxer) -> bool {
        settle(muxer);
        let mut buf = vec![0u8; MAX_PKT_PAYLOAD];
        muxer.recv_pkt(&mut buf).is_none()
    }

    fn guest(op: Op, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            buf_alloc: 256 * 1024,
            ..PacketHeader::new((GUEST_CID, src_port), (HOST_CID, dst_port), op)
        }
    }

    fn rw(src_port: u32, dst_port: u32, len: usize) -> PacketHeader {
        PacketHeader {
            len: u32::try_from(len).expect("len"),
            ..guest(Op::Rw, src_port, dst_port)
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

    /// Reads until EOF (an error, such as a timeout, fails the test).
    fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).expect("read to EOF");
        buf
    }

    /// Whether the device closed the stream: EOF, or a reset when it dropped unread data.
    fn closed_by_device(stream: &mut UnixStream) -> bool {
        let mut buf = Vec::new();
        match stream.read_to_end(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        }
    }

    /// A host-initiated connection the guest accepted: returns the host stream and host port.
    fn established_host_conn(f: &mut Fixture, guest_port: u32) -> (UnixStream, u32) {
        let mut stream = host_connect(&f.uds, format!("CONNECT {guest_port}\n").as_bytes());
        let (request, _) = next_packet(&mut f.muxer);
        f.muxer
            .send_pkt(&guest(Op::Response, guest_port, request.src_port), &[]);
        let expected = format!("OK {}\n", request.src_port);
        let ok = read_exactly(&mut stream, expected.len());
        assert_eq!(ok, expected.as_bytes());
        (stream, request.src_port)
    }

    #[test]
    fn test_parse_connect_upper_case_ok() {
        let port = parse_connect(b"CONNECT 1234\n");

        assert_eq!(port, Some(1234));
    }

    #[test]
    fn test_parse_connect_lower_case_ok() {
        let port = parse_connect(b"connect 52\n");

        assert_eq!(port, Some(52));
    }

    #[test]
    fn test_parse_connect_missing_port_is_none() {
        let port = parse_connect(b"CONNECT\n");

        assert_eq!(port, None);
    }

    #[test]
    fn test_parse_connect_port_overflow_is_none() {
        let port = parse_connect(b"CONNECT 4294967296\n");

        assert_eq!(port, None);
    }

    #[test]
    fn test_parse_connect_other_verb_is_none() {
        let port = parse_connect(b"LISTEN 1234\n");

        assert_eq!(port, None);
    }

    #[test]
    fn test_parse_connect_invalid_utf8_is_none() {
        let port = parse_connect(b"CONNECT \xff\n");

        assert_eq!(port, None);
    }

    #[test]
    fn test_port_path_appends_port() {
        let path = port_path(Path::new("/run/v.sock"), 5000);

        assert_eq!(path, PathBuf::from("/run/v.sock_5000"));
    }

    #[test]
    fn test_muxer_bind_existing_path_fails() {
        let f = fixture();

        let result = Muxer::new(GUEST_CID, &f.uds);

        assert!(matches!(result, Err(MuxerError::Bind(..))));
    }

    #[test]
    fn test_muxer_drop_removes_socket_file() {
        let f = fixture();
        let uds = f.uds.clone();

        drop(f.muxer);

        assert!(!uds.exists());
    }

    #[test]
    fn test_muxer_host_connect_produces_request() {
        let mut f = fixture();
        let _stream = host_connect(&f.uds, b"CONNECT 1234\n");

        let (request, _) = next_packet(&mut f.muxer);

        assert_eq!(request.op(), Some(Op::Request));
        assert_eq!(
            (request.src_cid, request.src_port),
            (HOST_CID, LOCAL_PORT_BASE)
        );
        assert_eq!((request.dst_cid, request.dst_port), (GUEST_CID, 1234));
        assert_eq!(request.type_, TYPE_STREAM);
        assert_eq!(request.buf_alloc, CONN_BUF_SIZE);
    }

    #[test]
    fn test_muxer_host_connect_split_line_produces_request() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"CONN");
        pump(&mut f.muxer);
        stream.write_all(b"ECT 77\n").expect("write");

        let (request, _) = next_packet(&mut f.muxer);

        assert_eq!(request.dst_port, 77);
    }

    #[test]
    fn test_muxer_host_connect_response_writes_ok_and_relays() {
        let mut f = fixture();
        let (mut stream, host_port) = established_host_conn(&mut f, 1234);

        stream.write_all(b"ping").expect("write");
        let (data, payload) = next_packet(&mut f.muxer);
        f.muxer.send_pkt(&rw(1234, host_port, 4), b"pong");
        let echoed = read_exactly(&mut stream, 4);

        assert_eq!(data.op(), Some(Op::Rw));
        assert_eq!(payload, b"ping");
        assert_eq!(echoed, b"pong");
    }

    #[test]
    fn test_muxer_host_data_behind_connect_line_is_relayed() {
        let mut f = fixture();
        let _stream = host_connect(&f.uds, b"CONNECT 9\nearly");
        let (request, _) = next_packet(&mut f.muxer);

        f.muxer
            .send_pkt(&guest(Op::Response, 9, request.src_port), &[]);
        let (data, payload) = next_packet(&mut f.muxer);

        assert_eq!(data.op(), Some(Op::Rw));
        assert_eq!(payload, b"early");
    }

    #[test]
    fn test_muxer_host_connect_guest_rst_closes_unix_stream() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"CONNECT 1234\n");
        let (request, _) = next_packet(&mut f.muxer);

        f.muxer
            .send_pkt(&guest(Op::Rst, 1234, request.src_port), &[]);

        assert_eq!(read_to_eof(&mut stream), b"");
        assert_eq!(f.muxer.connection_count(), 0);
    }

    #[test]
    fn test_muxer_malformed_connect_line_closes_stream() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"HELLO 1234\n");

        settle(&mut f.muxer);

        assert_eq!(read_to_eof(&mut stream), b"");
        assert!(no_packet(&mut f.muxer));
    }

    #[test]
    fn test_muxer_overlong_connect_line_closes_stream() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, &[b'7'; 64]);

        settle(&mut f.muxer);

        assert!(closed_by_device(&mut stream));
    }

    #[test]
    fn test_muxer_host_close_is_reported_as_shutdown() {
        let mut f = fixture();
        let (stream, host_port) = established_host_conn(&mut f, 1234);

        drop(stream);
        let (shutdown, _) = next_packet(&mut f.muxer);
        f.muxer.send_pkt(&guest(Op::Rst, 1234, host_port), &[]);

        assert_eq!(shutdown.op(), Some(Op::Shutdown));
        assert_eq!(shutdown.flags, SHUTDOWN_BOTH);
        assert_eq!(f.muxer.connection_count(), 0);
    }

    #[test]
    fn test_muxer_guest_close_is_answered_with_rst_and_host_eof() {
        let mut f = fixture();
        let (mut stream, host_port) = established_host_conn(&mut f, 1234);
        let close = PacketHeader {
            flags: SHUTDOWN_BOTH,
            ..guest(Op::Shutdown, 1234, host_port)
        };

        f.muxer.send_pkt(&close, &[]);
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(read_to_eof(&mut stream), b"");
    }

    #[test]
    fn test_muxer_guest_request_connects_to_port_socket_and_relays() {
        let mut f = fixture();
        let listener = UnixListener::bind(port_path(&f.uds, 5000)).expect("bind");

        f.muxer.send_pkt(&guest(Op::Request, 40000, 5000), &[]);
        let (response, _) = next_packet(&mut f.muxer);
        let (mut accepted, _) = listener.accept().expect("accept");
        f.muxer.send_pkt(&rw(40000, 5000, 5), b"hello");
        let hello = read_exactly(&mut accepted, 5);
        accepted.write_all(b"world").expect("write");
        let (_, world) = next_packet(&mut f.muxer);

        assert_eq!(response.op(), Some(Op::Response));
        assert_eq!((response.src_port, response.dst_port), (5000, 40000));
        assert_eq!(hello, b"hello");
        assert_eq!(world, b"world");
    }

    #[test]
    fn test_muxer_guest_request_without_listener_gets_rst() {
        let mut f = fixture();

        f.muxer.send_pkt(&guest(Op::Request, 40000, 5001), &[]);
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!((rst.src_port, rst.dst_port), (5001, 40000));
        assert_eq!(f.muxer.connection_count(), 0);
    }

    #[test]
    fn test_muxer_packet_for_unknown_connection_gets_rst() {
        let mut f = fixture();

        f.muxer.send_pkt(&rw(40000, 7, 3), b"abc");
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!((rst.dst_cid, rst.dst_port), (GUEST_CID, 40000));
    }

    #[test]
    fn test_muxer_rst_for_unknown_connection_is_ignored() {
        let mut f = fixture();

        f.muxer.send_pkt(&guest(Op::Rst, 40000, 7), &[]);

        assert!(no_packet(&mut f.muxer));
    }

    #[test]
    fn test_muxer_unsupported_type_gets_rst() {
        let mut f = fixture();
        let header = PacketHeader {
            type_: 2,
            ..guest(Op::Request, 40000, 7)
        };

        f.muxer.send_pkt(&header, &[]);
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
    }

    #[test]
    fn test_muxer_packet_to_other_cid_is_dropped() {
        let mut f = fixture();
        let header = PacketHeader {
            dst_cid: 7,
            ..guest(Op::Rw, 40000, 7)
        };

        f.muxer.send_pkt(&header, &[]);

        assert!(no_packet(&mut f.muxer));
    }

    #[test]
    fn test_muxer_spoofed_source_cid_is_dropped() {
        let mut f = fixture();
        let header = PacketHeader {
            src_cid: 9,
            ..guest(Op::Rw, 40000, 7)
        };

        f.muxer.send_pkt(&header, &[]);

        assert!(no_packet(&mut f.muxer));
    }

    #[test]
    fn test_muxer_unknown_op_on_connection_resets_it() {
        let mut f = fixture();
        let (mut stream, host_port) = established_host_conn(&mut f, 1234);
        let header = PacketHeader {
            op: 99,
            ..guest(Op::Rw, 1234, host_port)
        };

        f.muxer.send_pkt(&header, &[]);
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(read_to_eof(&mut stream), b"");
    }

    #[test]
    fn test_muxer_unanswered_request_times_out() {
        let mut f = fixture();
        let mut stream = host_connect(&f.uds, b"CONNECT 1234\n");
        next_packet(&mut f.muxer);

        f.muxer
            .process_timeouts(Instant::now() + Duration::from_secs(3));
        let (rst, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(read_to_eof(&mut stream), b"");
    }

    #[test]
    fn test_muxer_reset_connections_sends_rst_and_keeps_listener() {
        let mut f = fixture();
        let (mut stream, host_port) = established_host_conn(&mut f, 1234);

        f.muxer.reset_connections(true);
        let (rst, _) = next_packet(&mut f.muxer);
        let _second = host_connect(&f.uds, b"CONNECT 4321\n");
        let (request, _) = next_packet(&mut f.muxer);

        assert_eq!(rst.op(), Some(Op::Rst));
        assert_eq!(rst.src_port, host_port);
        assert_eq!(read_to_eof(&mut stream), b"");
        assert_eq!(request.dst_port, 4321);
    }

    #[test]
    fn test_muxer_paused_listener_resumes_after_pause() {
        let mut f = fixture();
        f.muxer.pause_listener();
        let _stream = host_connect(&f.uds, b"CONNECT 1234\n");
        let served_while_paused = !no_packet(&mut f.muxer);

        f.muxer
            .process_timeouts(Instant::now() + LISTENER_PAUSE + Duration::from_millis(1));
        let (request, _) = next_packet(&mut f.muxer);

        assert!(!served_while_paused);
        assert_eq!(request.dst_port, 1234);
    }

    #[test]
    fn test_muxer_handshake_limit_refuses_extra_host_connections() {
        let mut f = fixture();
        let _idle: Vec<UnixStream> = (0..MAX_PENDING_HANDSHAKES)
            .map(|_| host_connect(&f.uds, b""))
            .collect();
        settle(&mut f.muxer);
        let mut extra = host_connect(&f.uds, b"");

        settle(&mut f.muxer);

        assert_eq!(read_to_eof(&mut extra), b"");
    }
}
