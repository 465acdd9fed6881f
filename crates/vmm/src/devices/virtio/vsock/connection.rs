//! One vsock stream connection between a guest port and a host stream: its state machine, the
//! credit accounting of both directions, and the bounded buffer for guest data the host stream
//! cannot take yet. Generic over the host stream ([`HostStream`]) so it can be tested without
//! sockets; the muxer plugs in non-blocking Unix streams registered edge-triggered.
//!
//! Credit (virtio 1.2, 5.10.6.3): the guest may have at most our `buf_alloc` bytes sent and not
//! yet forwarded (`fwd_cnt`) to the host stream, so the buffer for a host stream that would block
//! never needs more than [`CONN_BUF_SIZE`] bytes; a guest that sends more is reset. In the other
//! direction the host stream is read only up to the guest's advertised free space.
//!
//! Closing: a guest SHUTDOWN(SEND) half-closes the host stream once the buffered data is
//! written; SHUTDOWN(RCV|SEND) is answered with RST and the stream is closed, also once the
//! buffered data is written, unless the host stream takes none of it for
//! [`CONN_SHUTDOWN_TIMEOUT`]. Host EOF is reported as SHUTDOWN(SEND), or SHUTDOWN(RCV|SEND) when
//! the host stream hung up entirely, and the guest is then expected to answer RST within
//! [`CONN_SHUTDOWN_TIMEOUT`].

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::num::Wrapping;
use std::time::Instant;

use super::packet::{Op, PacketHeader, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::{
    CONN_BUF_SIZE, CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT, CREDIT_UPDATE_THRESHOLD, HOST_CID,
};

/// The host side of a connection: a non-blocking byte stream.
pub trait HostStream: Read + Write {
    /// Shuts the write half down (the host program reads EOF).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

/// A connection's identity: the host-side port (the packet's `dst_port` from the guest) and the
/// guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The port on the host (CID 2) side.
    pub local_port: u32,
    /// The port on the guest side.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host stream is connected, RESPONSE queued.
    PeerInit,
    /// Data flows, possibly one way only after a SHUTDOWN.
    Established,
    /// Reset: an RST for the guest is pending; the connection ends once it is sent.
    Killed,
    /// Finished: nothing left to send; the owner drops the connection.
    Closed,
}

/// Control packets waiting to be sent to the guest.
const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 1 << 1;
const PENDING_SHUTDOWN: u8 = 1 << 2;
const PENDING_CREDIT_UPDATE: u8 = 1 << 3;

/// One guest port connected to one host stream.
#[derive(Debug)]
pub struct Connection<S> {
    key: ConnKey,
    guest_cid: u64,
    state: ConnState,
    stream: S,
    pending: u8,
    deadline: Option<Instant>,
    kill_reason: Option<&'static str>,

    // Host to guest.
    /// The guest's receive buffer for this connection.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed, as it last told us.
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out and the guest's credit has not changed since.
    credit_requested: bool,
    /// The host stream may have data (or EOF) to read: set on readiness, cleared on WouldBlock.
    host_readable: bool,
    /// The host stream returned EOF.
    host_eof: bool,
    /// The host stream hung up: nothing can flow on it either way any more.
    host_hup: bool,
    /// The SHUTDOWN flags sent to the guest.
    shutdown_sent: u32,

    // Guest to host.
    /// Guest data the host stream would not take yet.
    tx_buf: VecDeque<u8>,
    /// Payload bytes received from the guest.
    recv_cnt: Wrapping<u32>,
    /// Of those, bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last saw.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The SHUTDOWN flags the guest sent.
    guest_shutdown: u32,
    /// The host stream's write half is shut.
    host_write_shut: bool,
}

/// `n` (at most a packet's size) as a wrapping counter increment.
fn wrapping(n: usize) -> Wrapping<u32> {
    // Counters wrap by design (virtio 1.2, 5.10.6.3); truncation is the intended arithmetic.
    Wrapping(n as u32)
}

/// Writes as much of `data` as the non-blocking stream takes.
fn write_some<S: Write>(stream: &mut S, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Reads once from the non-blocking stream, retrying on EINTR.
fn read_once<S: Read>(stream: &mut S, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

impl<S: HostStream> Connection<S> {
    /// A host-initiated connection to guest port `key.peer_port`; its first packet is REQUEST.
    pub fn new_local_init(key: ConnKey, guest_cid: u64, stream: S) -> Self {
        Self::new(
            key,
            guest_cid,
            stream,
            ConnState::LocalInit,
            PENDING_REQUEST,
        )
    }

    /// A guest-initiated connection whose host stream is connected; its first packet is
    /// RESPONSE. `request` is the guest's REQUEST, for its credit.
    pub fn new_peer_init(key: ConnKey, guest_cid: u64, stream: S, request: &PacketHeader) -> Self {
        let mut conn = Self::new(
            key,
            guest_cid,
            stream,
            ConnState::PeerInit,
            PENDING_RESPONSE,
        );
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    fn new(key: ConnKey, guest_cid: u64, stream: S, state: ConnState, pending: u8) -> Self {
        Self {
            key,
            guest_cid,
            state,
            stream,
            pending,
            deadline: None,
            kill_reason: None,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            shutdown_sent: 0,
            tx_buf: VecDeque::new(),
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// When [`Self::on_deadline`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Why the connection was reset, when it was not a clean close.
    pub fn kill_reason(&self) -> Option<&'static str> {
        self.kill_reason
    }

    /// Resets the connection: an RST goes to the guest next, buffered data is dropped.
    pub fn kill(&mut self, reason: &'static str) {
        self.reset(Some(reason));
    }

    fn reset(&mut self, reason: Option<&'static str>) {
        if matches!(self.state, ConnState::Killed | ConnState::Closed) {
            return;
        }
        self.state = ConnState::Killed;
        self.kill_reason = reason;
        self.pending = 0;
        self.deadline = None;
        self.tx_buf = VecDeque::new();
    }

    /// Handles a packet the guest sent on this connection.
    pub fn send_pkt(&mut self, header: &PacketHeader, payload: &[u8], now: Instant) {
        if matches!(self.state, ConnState::Killed | ConnState::Closed) {
            return;
        }
        let Some(op) = header.op() else {
            self.kill("unknown operation");
            return;
        };
        if op == Op::Rst {
            self.state = ConnState::Closed;
            self.pending = 0;
            self.deadline = None;
            return;
        }
        self.update_peer_credit(header);
        match (self.state, op) {
            (ConnState::LocalInit, Op::Response) => self.establish(),
            (ConnState::Established, Op::Rw) => self.forward_to_host(payload),
            (ConnState::Established, Op::Shutdown) => {
                self.guest_shutdown |= header.flags & SHUTDOWN_BOTH;
                self.settle_guest_shutdown(now);
            }
            (ConnState::PeerInit | ConnState::Established, Op::CreditUpdate) => {}
            (ConnState::PeerInit | ConnState::Established, Op::CreditRequest) => {
                self.pending |= PENDING_CREDIT_UPDATE;
            }
            _ => self.kill("unexpected operation for the connection state"),
        }
    }

    fn update_peer_credit(&mut self, header: &PacketHeader) {
        if header.buf_alloc != self.peer_buf_alloc || header.fwd_cnt != self.peer_fwd_cnt.0 {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// The guest accepted a host-initiated connection: tell the host program its port.
    fn establish(&mut self) {
        self.deadline = None;
        self.state = ConnState::Established;
        let ack = format!("OK {}\n", self.key.local_port);
        match write_some(&mut self.stream, ack.as_bytes()) {
            Ok(n) if n == ack.len() => {}
            _ => self.kill("cannot write the OK line to the host stream"),
        }
    }

    fn forward_to_host(&mut self, payload: &[u8]) {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            self.kill("data after the guest's SHUTDOWN(SEND)");
            return;
        }
        if payload.is_empty() {
            return;
        }
        self.recv_cnt += wrapping(payload.len());
        let mut rest = payload;
        if self.tx_buf.is_empty() {
            match write_some(&mut self.stream, payload) {
                Ok(n) => {
                    self.fwd_cnt += wrapping(n);
                    rest = &payload[n..];
                }
                Err(_) => {
                    self.kill("host stream write failed");
                    return;
                }
            }
        }
        if rest.is_empty() {
            return;
        }
        if self.tx_buf.len() + rest.len() > CONN_BUF_SIZE as usize {
            self.kill("guest sent more than its credit");
            return;
        }
        self.tx_buf.extend(rest);
    }

    /// Applies the guest's SHUTDOWN flags once the buffered data is written.
    fn settle_guest_shutdown(&mut self, now: Instant) {
        if !self.tx_buf.is_empty() {
            if self.guest_shutdown == SHUTDOWN_BOTH && self.deadline.is_none() {
                self.deadline = Some(now + CONN_SHUTDOWN_TIMEOUT);
            }
            return;
        }
        if self.guest_shutdown == SHUTDOWN_BOTH {
            // A clean close: the guest expects our RST.
            self.reset(None);
            return;
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // Fails only when the host program has gone, which the next read reports.
            let _ = self.stream.shutdown_write();
        }
    }

    /// The host stream became readable.
    pub fn notify_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host stream hung up (or failed): read what is left, then report EOF.
    pub fn notify_hup(&mut self) {
        self.host_readable = true;
        self.host_hup = true;
        if self.host_eof && self.shutdown_sent & SHUTDOWN_RCV == 0 {
            self.pending |= PENDING_SHUTDOWN;
        }
    }

    /// The host stream became writable: flush buffered guest data.
    pub fn notify_writable(&mut self, now: Instant) {
        if self.state != ConnState::Established || self.tx_buf.is_empty() {
            return;
        }
        let mut flushed = false;
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.kill("host stream write failed");
                    return;
                }
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += wrapping(n);
                    flushed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.kill("host stream write failed");
                    return;
                }
            }
        }
        if flushed && self.guest_shutdown == SHUTDOWN_BOTH {
            // The guest has closed and the host is still reading what it sent before: the
            // timeout is for a host that stopped reading, so progress restarts it. Killing a
            // slow reader instead would drop the end of a stream the guest closed cleanly.
            self.deadline = Some(now + CONN_SHUTDOWN_TIMEOUT);
        }
        self.settle_guest_shutdown(now);
    }

    /// Resets the connection if its deadline (request or shutdown timeout) has passed.
    pub fn on_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            let reason = if self.state == ConnState::LocalInit {
                "the guest did not answer the connection request"
            } else {
                "the connection did not close in time"
            };
            self.kill(reason);
        }
    }

    /// The free space the guest advertised that we have not filled yet.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the guest believes our buffer is nearly full while we have freed space.
    fn needs_credit_update(&self) -> bool {
        if self.fwd_cnt == self.last_fwd_cnt_sent {
            return false;
        }
        let unacked = (self.recv_cnt - self.last_fwd_cnt_sent).0;
        CONN_BUF_SIZE.saturating_sub(unacked) < CREDIT_UPDATE_THRESHOLD
    }

    fn can_read_host(&self) -> bool {
        self.host_readable && !self.host_eof && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Closed => false,
            ConnState::Killed => true,
            ConnState::LocalInit => self.pending & PENDING_REQUEST != 0,
            ConnState::PeerInit => self.pending & PENDING_RESPONSE != 0,
            ConnState::Established => {
                self.pending & (PENDING_SHUTDOWN | PENDING_CREDIT_UPDATE) != 0
                    || self.needs_credit_update()
                    || (self.can_read_host() && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    /// The next packet for the guest, with up to `buf.len()` payload bytes read from the host
    /// stream into `buf` (the header's `len`).
    pub fn recv_pkt(&mut self, buf: &mut [u8], now: Instant) -> Option<PacketHeader> {
        match self.state {
            ConnState::Closed => None,
            ConnState::Killed => {
                self.state = ConnState::Closed;
                Some(self.header(Op::Rst))
            }
            ConnState::LocalInit => self.take(PENDING_REQUEST).then(|| {
                self.deadline = Some(now + CONN_REQUEST_TIMEOUT);
                self.header(Op::Request)
            }),
            ConnState::PeerInit => self.take(PENDING_RESPONSE).then(|| {
                self.state = ConnState::Established;
                self.header(Op::Response)
            }),
            ConnState::Established => self.recv_established(buf, now),
        }
    }

    fn recv_established(&mut self, buf: &mut [u8], now: Instant) -> Option<PacketHeader> {
        if self.can_read_host() {
            let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
            if credit == 0 && !self.credit_requested {
                self.credit_requested = true;
                return Some(self.header(Op::CreditRequest));
            }
            let max = buf.len().min(credit);
            if max > 0 {
                match read_once(&mut self.stream, &mut buf[..max]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                        return Some(self.host_shutdown(now));
                    }
                    Ok(n) => {
                        self.rx_cnt += wrapping(n);
                        let mut header = self.header(Op::Rw);
                        header.len = u32::try_from(n).unwrap_or(u32::MAX);
                        return Some(header);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_readable = false,
                    Err(_) => {
                        self.kill("host stream read failed");
                        self.state = ConnState::Closed;
                        return Some(self.header(Op::Rst));
                    }
                }
            }
        }
        if self.take(PENDING_SHUTDOWN) {
            return Some(self.host_shutdown(now));
        }
        if self.take(PENDING_CREDIT_UPDATE) || self.needs_credit_update() {
            return Some(self.header(Op::CreditUpdate));
        }
        None
    }

    /// The SHUTDOWN telling the guest the host side has finished sending.
    fn host_shutdown(&mut self, now: Instant) -> PacketHeader {
        let mut flags = SHUTDOWN_SEND;
        if self.host_hup || self.guest_shutdown & SHUTDOWN_SEND != 0 {
            flags |= SHUTDOWN_RCV;
        }
        self.shutdown_sent |= flags;
        if self.shutdown_sent == SHUTDOWN_BOTH {
            self.deadline = Some(now + CONN_SHUTDOWN_TIMEOUT);
        }
        let mut header = self.header(Op::Shutdown);
        header.flags = flags;
        header
    }

    fn take(&mut self, bit: u8) -> bool {
        let set = self.pending & bit != 0;
        self.pending &= !bit;
        set
    }

    /// A header from this connection; every packet carries our credit, so it also counts as
    /// a credit update.
    fn header(&mut self, op: Op) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !PENDING_CREDIT_UPDATE;
        PacketHeader {
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
            ..PacketHeader::new(
                (HOST_CID, self.key.local_port),
                (self.guest_cid, self.key.peer_port),
                op,
            )
        }
    }

    #[cfg(test)]
    fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::vsock::MAX_PKT_PAYLOAD;

    const GUEST_CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 1234,
    };

    /// A host stream in memory: `incoming` is what the host program wrote, `written` what it
    /// received; `write_room` bytes are accepted before WouldBlock.
    #[derive(Debug, Default)]
    struct MockStream {
        incoming: VecDeque<u8>,
        eof: bool,
        read_error: bool,
        written: Vec<u8>,
        write_room: usize,
        write_error: bool,
        shut_write: bool,
    }

    impl MockStream {
        fn open() -> Self {
            Self {
                write_room: usize::MAX,
                ..Self::default()
            }
        }
    }

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.read_error {
                return Err(ErrorKind::ConnectionReset.into());
            }
            if self.incoming.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.incoming.len());
            for (dst, src) in buf.iter_mut().zip(self.incoming.drain(..n)) {
                *dst = src;
            }
            Ok(n)
        }
    }

    impl Write for MockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.write_error {
                return Err(ErrorKind::BrokenPipe.into());
            }
            if self.write_room == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_room);
            self.write_room -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HostStream for MockStream {
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut_write = true;
            Ok(())
        }
    }

    fn guest_header(op: Op) -> PacketHeader {
        PacketHeader {
            buf_alloc: 256 * 1024,
            ..PacketHeader::new((GUEST_CID, KEY.peer_port), (HOST_CID, KEY.local_port), op)
        }
    }

    fn rw(len: usize) -> PacketHeader {
        PacketHeader {
            len: u32::try_from(len).expect("len"),
            ..guest_header(Op::Rw)
        }
    }

    fn shutdown(flags: u32) -> PacketHeader {
        PacketHeader {
            flags,
            ..guest_header(Op::Shutdown)
        }
    }

    /// An established guest-initiated connection whose RESPONSE has been sent.
    fn established(stream: MockStream, now: Instant) -> Connection<MockStream> {
        let mut conn =
            Connection::new_peer_init(KEY, GUEST_CID, stream, &guest_header(Op::Request));
        let mut buf = [0u8; 16];
        conn.recv_pkt(&mut buf, now).expect("response");
        conn
    }

    fn recv(conn: &mut Connection<MockStream>, now: Instant) -> Option<PacketHeader> {
        let mut buf = vec![0u8; MAX_PKT_PAYLOAD];
        conn.recv_pkt(&mut buf, now)
    }

    #[test]
    fn test_connection_local_init_first_packet_is_request() {
        let now = Instant::now();
        let mut conn = Connection::new_local_init(KEY, GUEST_CID, MockStream::open());

        let pkt = recv(&mut conn, now).expect("packet");

        assert_eq!(pkt.op(), Some(Op::Request));
        assert_eq!((pkt.src_cid, pkt.src_port), (HOST_CID, KEY.local_port));
        assert_eq!((pkt.dst_cid, pkt.dst_port), (GUEST_CID, KEY.peer_port));
        assert_eq!(pkt.buf_alloc, CONN_BUF_SIZE);
        assert_eq!(conn.deadline(), Some(now + CONN_REQUEST_TIMEOUT));
    }

    #[test]
    fn test_connection_local_init_response_writes_ok_line() {
        let now = Instant::now();
        let mut conn = Connection::new_local_init(KEY, GUEST_CID, MockStream::open());
        recv(&mut conn, now).expect("request");

        conn.send_pkt(&guest_header(Op::Response), &[], now);

        assert_eq!(conn.state(), ConnState::Established);
        assert_eq!(conn.stream().written, b"OK 1073741824\n");
        assert_eq!(conn.deadline(), None);
    }

    #[test]
    fn test_connection_local_init_rst_closes_without_reply() {
        let now = Instant::now();
        let mut conn = Connection::new_local_init(KEY, GUEST_CID, MockStream::open());
        recv(&mut conn, now).expect("request");

        conn.send_pkt(&guest_header(Op::Rst), &[], now);

        assert_eq!(conn.state(), ConnState::Closed);
        assert!(!conn.has_pending_rx());
        assert!(conn.stream().written.is_empty());
    }

    #[test]
    fn test_connection_local_init_unanswered_request_times_out_with_rst() {
        let now = Instant::now();
        let mut conn = Connection::new_local_init(KEY, GUEST_CID, MockStream::open());
        recv(&mut conn, now).expect("request");

        conn.on_deadline(now + Duration::from_secs(3));

        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(recv(&mut conn, now).and_then(|p| p.op()), Some(Op::Rst));
        assert_eq!(conn.state(), ConnState::Closed);
    }

    #[test]
    fn test_connection_local_init_deadline_not_reached_keeps_connection() {
        let now = Instant::now();
        let mut conn = Connection::new_local_init(KEY, GUEST_CID, MockStream::open());
        recv(&mut conn, now).expect("request");

        conn.on_deadline(now + Duration::from_millis(100));

        assert_eq!(conn.state(), ConnState::LocalInit);
    }

    #[test]
    fn test_connection_peer_init_response_establishes() {
        let now = Instant::now();
        let mut conn = Connection::new_peer_init(
            KEY,
            GUEST_CID,
            MockStream::open(),
            &guest_header(Op::Request),
        );

        let pkt = recv(&mut conn, now).expect("packet");

        assert_eq!(pkt.op(), Some(Op::Response));
        assert_eq!(conn.state(), ConnState::Established);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn test_connection_peer_init_rw_before_response_is_reset() {
        let now = Instant::now();
        let mut conn = Connection::new_peer_init(
            KEY,
            GUEST_CID,
            MockStream::open(),
            &guest_header(Op::Request),
        );

        conn.send_pkt(&rw(3), b"abc", now);

        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_guest_rw_is_written_to_host() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);

        conn.send_pkt(&rw(5), b"hello", now);

        assert_eq!(conn.stream().written, b"hello");
        assert_eq!(conn.fwd_cnt.0, 5);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn test_connection_host_data_becomes_rw_within_credit() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(
            &PacketHeader {
                buf_alloc: 4,
                ..guest_header(Op::CreditUpdate)
            },
            &[],
            now,
        );
        conn.stream_mut().incoming.extend(b"0123456789");
        conn.notify_readable();
        let mut buf = [0u8; 64];

        let pkt = conn.recv_pkt(&mut buf, now).expect("rw");

        assert_eq!(pkt.op(), Some(Op::Rw));
        assert_eq!(pkt.len, 4);
        assert_eq!(&buf[..4], b"0123");
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn test_connection_no_credit_sends_one_credit_request() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(
            &PacketHeader {
                buf_alloc: 0,
                ..guest_header(Op::CreditUpdate)
            },
            &[],
            now,
        );
        conn.stream_mut().incoming.extend(b"data");
        conn.notify_readable();

        let first = recv(&mut conn, now);
        let second = recv(&mut conn, now);

        assert_eq!(first.and_then(|p| p.op()), Some(Op::CreditRequest));
        assert_eq!(second, None);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn test_connection_credit_update_from_guest_resumes_reading() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(
            &PacketHeader {
                buf_alloc: 2,
                ..guest_header(Op::CreditUpdate)
            },
            &[],
            now,
        );
        conn.stream_mut().incoming.extend(b"abcd");
        conn.notify_readable();
        recv(&mut conn, now).expect("first two bytes");

        conn.send_pkt(
            &PacketHeader {
                buf_alloc: 2,
                fwd_cnt: 2,
                ..guest_header(Op::CreditUpdate)
            },
            &[],
            now,
        );

        assert!(conn.has_pending_rx());
        assert_eq!(recv(&mut conn, now).map(|p| p.len), Some(2));
    }

    #[test]
    fn test_connection_peer_credit_wraps_around_u32() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.rx_cnt = Wrapping(5);
        conn.peer_fwd_cnt = Wrapping(u32::MAX - 4);
        conn.peer_buf_alloc = 100;

        let credit = conn.peer_credit();

        assert_eq!(credit, 90);
    }

    #[test]
    fn test_connection_hostile_fwd_cnt_gives_no_credit() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.rx_cnt = Wrapping(0);
        conn.peer_fwd_cnt = Wrapping(1000);
        conn.peer_buf_alloc = 100;

        let credit = conn.peer_credit();

        assert_eq!(credit, 0);
    }

    #[test]
    fn test_connection_host_would_block_buffers_then_flushes() {
        let now = Instant::now();
        let stream = MockStream {
            write_room: 3,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);
        conn.send_pkt(&rw(8), b"abcdefgh", now);
        conn.stream_mut().write_room = usize::MAX;

        conn.notify_writable(now);

        assert_eq!(conn.stream().written, b"abcdefgh");
        assert_eq!(conn.fwd_cnt.0, 8);
        assert!(conn.tx_buf.is_empty());
    }

    #[test]
    fn test_connection_guest_overrunning_credit_is_reset() {
        let now = Instant::now();
        let stream = MockStream {
            write_room: 0,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);
        let chunk = vec![7u8; MAX_PKT_PAYLOAD];
        conn.send_pkt(&rw(chunk.len()), &chunk, now);

        conn.send_pkt(&rw(1), b"x", now);

        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(conn.kill_reason(), Some("guest sent more than its credit"));
        assert!(conn.tx_buf.is_empty());
    }

    #[test]
    fn test_connection_host_write_error_is_reset() {
        let now = Instant::now();
        let stream = MockStream {
            write_error: true,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);

        conn.send_pkt(&rw(1), b"x", now);

        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_credit_update_sent_when_guest_view_is_low() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        let chunk = vec![1u8; 16 * 1024];
        for _ in 0..3 {
            conn.send_pkt(&rw(chunk.len()), &chunk, now);
        }
        let before = conn.has_pending_rx();
        conn.send_pkt(&rw(chunk.len()), &chunk, now);

        let pkt = recv(&mut conn, now).expect("credit update");

        assert!(!before);
        assert_eq!(pkt.op(), Some(Op::CreditUpdate));
        assert_eq!(pkt.fwd_cnt, 64 * 1024);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn test_connection_credit_request_is_answered_with_update() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(&rw(3), b"abc", now);

        conn.send_pkt(&guest_header(Op::CreditRequest), &[], now);

        let pkt = recv(&mut conn, now).expect("credit update");
        assert_eq!(pkt.op(), Some(Op::CreditUpdate));
        assert_eq!((pkt.buf_alloc, pkt.fwd_cnt), (CONN_BUF_SIZE, 3));
    }

    #[test]
    fn test_connection_guest_shutdown_both_is_answered_with_rst() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);

        conn.send_pkt(&shutdown(SHUTDOWN_BOTH), &[], now);

        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(conn.kill_reason(), None);
        assert_eq!(recv(&mut conn, now).and_then(|p| p.op()), Some(Op::Rst));
    }

    #[test]
    fn test_connection_guest_shutdown_both_waits_for_flush() {
        let now = Instant::now();
        let stream = MockStream {
            write_room: 0,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);
        conn.send_pkt(&rw(4), b"last", now);
        conn.send_pkt(&shutdown(SHUTDOWN_BOTH), &[], now);
        let state_before_flush = conn.state();
        conn.stream_mut().write_room = usize::MAX;

        conn.notify_writable(now);

        assert_eq!(state_before_flush, ConnState::Established);
        assert_eq!(conn.stream().written, b"last");
        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_guest_shutdown_both_unflushed_times_out() {
        let now = Instant::now();
        let stream = MockStream {
            write_room: 0,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);
        conn.send_pkt(&rw(4), b"last", now);
        conn.send_pkt(&shutdown(SHUTDOWN_BOTH), &[], now);

        conn.on_deadline(now + CONN_SHUTDOWN_TIMEOUT);

        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_guest_shutdown_both_waits_while_host_drains() {
        let now = Instant::now();
        let stream = MockStream {
            write_room: 0,
            ..MockStream::default()
        };
        let mut conn = established(stream, now);
        conn.send_pkt(&rw(8), b"last one", now);
        conn.send_pkt(&shutdown(SHUTDOWN_BOTH), &[], now);
        let later = now + CONN_SHUTDOWN_TIMEOUT - Duration::from_millis(500);
        conn.stream_mut().write_room = 4;
        conn.notify_writable(later);

        conn.on_deadline(now + CONN_SHUTDOWN_TIMEOUT + Duration::from_millis(500));
        let state_while_draining = conn.state();
        conn.stream_mut().write_room = usize::MAX;
        conn.notify_writable(now + CONN_SHUTDOWN_TIMEOUT + Duration::from_millis(600));

        assert_eq!(state_while_draining, ConnState::Established);
        assert_eq!(conn.stream().written, b"last one");
        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(conn.kill_reason(), None);
    }

    #[test]
    fn test_connection_guest_shutdown_send_half_closes_host() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);

        conn.send_pkt(&shutdown(SHUTDOWN_SEND), &[], now);

        assert!(conn.stream().shut_write);
        assert_eq!(conn.state(), ConnState::Established);
    }

    #[test]
    fn test_connection_rw_after_guest_shutdown_send_is_reset() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(&shutdown(SHUTDOWN_SEND), &[], now);

        conn.send_pkt(&rw(1), b"x", now);

        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_guest_shutdown_rcv_stops_host_reads() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.send_pkt(&shutdown(SHUTDOWN_RCV), &[], now);
        conn.stream_mut().incoming.extend(b"unwanted");

        conn.notify_readable();

        assert!(!conn.has_pending_rx());
        assert_eq!(recv(&mut conn, now), None);
    }

    #[test]
    fn test_connection_host_eof_sends_shutdown_send() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.stream_mut().eof = true;
        conn.notify_readable();

        let pkt = recv(&mut conn, now).expect("shutdown");

        assert_eq!(pkt.op(), Some(Op::Shutdown));
        assert_eq!(pkt.flags, SHUTDOWN_SEND);
        assert_eq!(conn.deadline(), None);
        assert!(!conn.has_pending_rx());
    }

    #[test]
    fn test_connection_host_hangup_drains_data_then_shutdown_both() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.stream_mut().incoming.extend(b"bye");
        conn.stream_mut().eof = true;
        conn.notify_hup();

        let data = recv(&mut conn, now).expect("data");
        let close = recv(&mut conn, now).expect("shutdown");

        assert_eq!((data.op(), data.len), (Some(Op::Rw), 3));
        assert_eq!(close.op(), Some(Op::Shutdown));
        assert_eq!(close.flags, SHUTDOWN_BOTH);
        assert_eq!(conn.deadline(), Some(now + CONN_SHUTDOWN_TIMEOUT));
    }

    #[test]
    fn test_connection_hangup_after_half_close_sends_shutdown_both() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.stream_mut().eof = true;
        conn.notify_readable();
        recv(&mut conn, now).expect("shutdown send");

        conn.notify_hup();

        let pkt = recv(&mut conn, now).expect("shutdown both");
        assert_eq!(pkt.flags, SHUTDOWN_BOTH);
    }

    #[test]
    fn test_connection_shutdown_both_sent_and_guest_rst_closes() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.stream_mut().eof = true;
        conn.notify_hup();
        recv(&mut conn, now).expect("shutdown");

        conn.send_pkt(&guest_header(Op::Rst), &[], now);

        assert_eq!(conn.state(), ConnState::Closed);
    }

    #[test]
    fn test_connection_host_read_error_sends_rst() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.stream_mut().read_error = true;
        conn.notify_readable();

        let pkt = recv(&mut conn, now).expect("rst");

        assert_eq!(pkt.op(), Some(Op::Rst));
        assert_eq!(conn.state(), ConnState::Closed);
    }

    #[test]
    fn test_connection_unknown_op_is_reset() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        let header = PacketHeader {
            op: 42,
            ..guest_header(Op::Rw)
        };

        conn.send_pkt(&header, &[], now);

        assert_eq!(conn.state(), ConnState::Killed);
        assert_eq!(conn.kill_reason(), Some("unknown operation"));
    }

    #[test]
    fn test_connection_request_on_established_is_reset() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);

        conn.send_pkt(&guest_header(Op::Request), &[], now);

        assert_eq!(conn.state(), ConnState::Killed);
    }

    #[test]
    fn test_connection_host_would_block_on_read_clears_readable() {
        let now = Instant::now();
        let mut conn = established(MockStream::open(), now);
        conn.notify_readable();

        let pkt = recv(&mut conn, now);

        assert_eq!(pkt, None);
        assert!(!conn.has_pending_rx());
    }
}
