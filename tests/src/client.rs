//! The wire-level client.
//!
//! One [`Client`] is one connection. Requests go out with one `sendmsg`
//! each (header, body and descriptors together, as QEMU sends them).
//! Replies are read with `recvmsg` into a buffer that may hold several
//! messages; the descriptors of a `recvmsg` belong to the last message that
//! starts in the bytes it returned (the kernel ends a `recvmsg` right after
//! the segment that carried descriptors, and a server sends a message with
//! descriptors in a `sendmsg` of its own), or to the message in progress if
//! none starts there.
//!
//! Every wait has a deadline ([`Client::set_timeout`], 10 s by default):
//! a hung server fails the test with [`Error::Timeout`].
//!
//! While waiting for a reply the client answers the server's DMA_READ and
//! DMA_WRITE requests from its [`MessageMemory`] (the ranges it mapped
//! without a descriptor), unless [`Client::set_answer_dma`] turned that off;
//! then they are held for the test ([`Client::take_server_requests`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vdevd_protocol as proto;
use vdevd_protocol::header::{FLAG_NO_REPLY, FLAG_TYPE_COMMAND};
use vdevd_protocol::{Command, HEADER_SIZE, Header, Request, ServerRequest};

use crate::Error;
use crate::memory::MessageMemory;
use crate::sys::{self, Received};

/// How long a client waits for anything unless told otherwise: a failure
/// guard, generous for loaded CI machines.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message accepted from a server: its data is capped by our
/// `max_data_xfer_size` (at most 64 MiB in any proposal a test makes).
pub const MAX_INBOUND: usize = (64 << 20) + 4096;

const BUF: usize = 64 << 10;
const MIN_READ: usize = 4096;

/// QEMU 11.1's VERSION proposal, byte for byte (see DESIGN.md).
pub const QEMU_VERSION_JSON: &str = "{\"capabilities\":{\"pgsizes\":4096,\"max_msg_fds\":16,\
\"max_dma_maps\":65535,\"max_data_xfer_size\":1048576,\"migration\":{\"max_bitmap_size\":\
268435456,\"pgsize\":4096},\"write_multiple\":true}}";

/// One message from the server.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Everything after the header.
    pub body: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped some of its descriptors (MSG_CTRUNC).
    pub fds_truncated: bool,
}

impl Message {
    /// The errno of an error reply.
    pub fn errno(&self) -> Option<u32> {
        (self.header.is_reply() && self.header.is_error()).then_some(self.header.error)
    }

    /// Whether it is a command the server sends (DMA_READ/DMA_WRITE).
    pub fn is_server_request(&self) -> bool {
        !self.header.is_reply()
    }
}

/// A VERSION proposal: the versions and the bytes after them, exactly as
/// sent (so tests can leave out the NUL or send broken JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The version data: JSON and its terminating NUL, or anything else.
    pub data: Vec<u8>,
}

impl Proposal {
    /// What QEMU 11.1 proposes.
    pub fn qemu() -> Proposal {
        Proposal::json(QEMU_VERSION_JSON)
    }

    /// Version 0.0 with this JSON, NUL-terminated.
    pub fn json(json: &str) -> Proposal {
        let mut data = json.as_bytes().to_vec();
        data.push(0);
        Proposal {
            major: 0,
            minor: 0,
            data,
        }
    }

    /// Version 0.0 with `caps`.
    pub fn caps(caps: &proto::Capabilities) -> Proposal {
        Proposal::json(&caps.to_json())
    }

    /// Any versions and data.
    pub fn raw(major: u16, minor: u16, data: &[u8]) -> Proposal {
        Proposal {
            major,
            minor,
            data: data.to_vec(),
        }
    }

    /// The message body.
    pub fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + self.data.len());
        b.extend_from_slice(&self.major.to_ne_bytes());
        b.extend_from_slice(&self.minor.to_ne_bytes());
        b.extend_from_slice(&self.data);
        b
    }
}

/// What the client did for the server's DMA requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// DMA_READ requests answered with data.
    pub reads: u64,
    /// DMA_WRITE requests answered with success.
    pub writes: u64,
    /// Bytes sent in DMA_READ replies.
    pub bytes_read: u64,
    /// Bytes received in DMA_WRITE requests.
    pub bytes_written: u64,
    /// Requests answered with an error (unmapped, read-only, malformed).
    pub failed: u64,
    /// Requests larger than the `max_data_xfer_size` the client proposed.
    pub oversized: u64,
}

/// The receive buffer and the descriptors waiting for their message.
#[derive(Debug)]
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// (stream offset of the owning message, descriptors, truncated).
    fds: VecDeque<(u64, Vec<OwnedFd>, bool)>,
    /// Descriptors that belonged to no message (a server bug).
    stray_fds: usize,
}

enum Fill {
    Data,
    WouldBlock,
    Eof,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            base: 0,
            fds: VecDeque::new(),
            stray_fds: 0,
        }
    }

    fn pending(&self) -> usize {
        self.end - self.start
    }

    /// The size field of the header at `pos`, if complete.
    fn size_at(&self, pos: usize) -> Option<usize> {
        let end = pos.checked_add(HEADER_SIZE)?;
        if end > self.end {
            return None;
        }
        let b = self.buf.get(pos + 4..pos + 8)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn make_room(&mut self) -> Result<(), Error> {
        if self.start == self.end {
            self.base += self.start as u64;
            self.start = 0;
            self.end = 0;
            if self.buf.len() > BUF {
                self.buf = vec![0; BUF];
            }
            return Ok(());
        }
        let want = self.size_at(self.start).unwrap_or(HEADER_SIZE);
        if want > MAX_INBOUND {
            return Err(Error::Unexpected(format!(
                "the server announced a {want}-byte message"
            )));
        }
        if self.buf.len() - self.end < MIN_READ || self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        if want > self.buf.len() {
            self.buf.resize(want, 0);
        }
        Ok(())
    }

    /// The stream offset of the message that owns descriptors received
    /// with the bytes from `old_end` on.
    fn owner(&self, old_end: usize) -> u64 {
        let mut pos = self.start;
        let mut starting_here = None;
        let mut in_progress = self.start;
        while pos < self.end {
            if pos >= old_end {
                starting_here = Some(pos);
            } else {
                in_progress = pos;
            }
            match self.size_at(pos) {
                Some(size) if size >= HEADER_SIZE => pos += size,
                _ => break,
            }
        }
        self.base + starting_here.unwrap_or(in_progress) as u64
    }

    fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<Fill, Error> {
        self.make_room()?;
        let old_end = self.end;
        let r = match sys::recv_with_fds(sock, &mut self.buf[old_end..]) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                return Err(Error::Closed {
                    unread: self.pending(),
                    reset: true,
                });
            }
            Err(e) => return Err(Error::io("recvmsg", e)),
        };
        let Received {
            len,
            fds,
            truncated,
        } = r;
        if len == 0 {
            return Ok(Fill::Eof);
        }
        self.end += len;
        if !fds.is_empty() || truncated {
            let owner = self.owner(old_end);
            match self.fds.back_mut() {
                Some(b) if b.0 == owner => {
                    b.1.extend(fds);
                    b.2 |= truncated;
                }
                _ => self.fds.push_back((owner, fds, truncated)),
            }
        }
        Ok(Fill::Data)
    }

    /// The next complete message.
    fn pop(&mut self) -> Result<Option<Message>, Error> {
        let Some(size) = self.size_at(self.start) else {
            return Ok(None);
        };
        if size < HEADER_SIZE {
            return Err(Error::Unexpected(format!(
                "the server sent a message of size {size}"
            )));
        }
        if size > MAX_INBOUND {
            return Err(Error::Unexpected(format!(
                "the server announced a {size}-byte message"
            )));
        }
        if self.pending() < size {
            return Ok(None);
        }
        let header = Header::parse(&self.buf[self.start..self.end])?;
        let at = self.base + self.start as u64;
        let mut fds = Vec::new();
        let mut fds_truncated = false;
        while let Some(front) = self.fds.front() {
            if front.0 > at {
                break;
            }
            if let Some((owner, f, t)) = self.fds.pop_front() {
                if owner == at {
                    fds = f;
                    fds_truncated = t;
                } else {
                    self.stray_fds += f.len();
                }
            }
        }
        let body = self.buf[self.start + HEADER_SIZE..self.start + size].to_vec();
        self.start += size;
        Ok(Some(Message {
            header,
            body,
            fds,
            fds_truncated,
        }))
    }
}

/// A vfio-user connection. See the module documentation.
#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    inbox: Inbox,
    next_id: u16,
    timeout: Duration,
    memory: MessageMemory,
    answer_dma: bool,
    held: VecDeque<Message>,
    stats: DmaStats,
    server: Option<proto::Version>,
    max_xfer: u64,
}

impl Client {
    /// Connect to a server listening on `path`. The server may be serving
    /// another client; VERSION then waits until it accepts this one.
    pub fn connect(path: &Path) -> Result<Client, Error> {
        let sock = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connect {}", path.display()), e))?;
        Client::from_stream(sock)
    }

    /// Use an already connected socket.
    pub fn from_stream(sock: UnixStream) -> Result<Client, Error> {
        let mut c = Client {
            sock,
            inbox: Inbox::new(),
            next_id: 0,
            timeout: DEFAULT_TIMEOUT,
            memory: MessageMemory::default(),
            answer_dma: true,
            held: VecDeque::new(),
            stats: DmaStats::default(),
            server: None,
            max_xfer: proto::version::DEFAULT_MAX_DATA_XFER_SIZE,
        };
        c.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(c)
    }

    /// Change how long each wait (and a blocked send) may take.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), Error> {
        self.timeout = timeout;
        self.sock
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("SO_SNDTIMEO", e))
    }

    /// The current timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Answer the server's DMA requests while waiting (the default), or
    /// hold them for [`Client::take_server_requests`].
    pub fn set_answer_dma(&mut self, on: bool) {
        self.answer_dma = on;
    }

    /// The server requests held while answering was off.
    pub fn take_server_requests(&mut self) -> Vec<Message> {
        self.held.drain(..).collect()
    }

    /// The client's message-backed memory.
    pub fn memory(&self) -> &MessageMemory {
        &self.memory
    }

    /// The client's message-backed memory, to fill or inspect.
    pub fn memory_mut(&mut self) -> &mut MessageMemory {
        &mut self.memory
    }

    /// What the client did for the server's DMA requests so far.
    pub fn dma_stats(&self) -> DmaStats {
        self.stats
    }

    /// Descriptors the server sent that belonged to no message.
    pub fn stray_fds(&self) -> usize {
        self.inbox.stray_fds
    }

    /// The server's VERSION reply, once negotiated.
    pub fn server_version(&self) -> Option<&proto::Version> {
        self.server.as_ref()
    }

    /// The socket (e.g. to shut down one direction).
    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }

    /// A fresh message id.
    pub fn alloc_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    // --- sending ----------------------------------------------------------

    /// Send `bytes` (one or more messages, or a fragment) with `fds`
    /// attached to the first byte, completing partial sends.
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let mut sent = 0;
        while sent < bytes.len() || (sent == 0 && bytes.is_empty()) {
            let attach: &[RawFd] = if sent == 0 { fds } else { &[] };
            let n = match sys::send_with_fds(
                self.sock.as_fd(),
                &[IoSlice::new(&bytes[sent..])],
                attach,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(Error::Timeout {
                        timeout: self.timeout,
                        what: "the server to take our bytes".into(),
                    });
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                    return Err(Error::Closed {
                        unread: 0,
                        reset: true,
                    });
                }
                Err(e) => return Err(Error::io("sendmsg", e)),
            };
            if bytes.is_empty() {
                break;
            }
            sent += n;
        }
        Ok(())
    }

    /// Send a message with a fresh id: `command` (raw, so unknown numbers
    /// can be sent), header `flags`, `body`, `fds`. Returns the id.
    pub fn send(
        &mut self,
        command: u16,
        flags: u32,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<u16, Error> {
        let id = self.alloc_id();
        let size = body
            .len()
            .checked_add(HEADER_SIZE)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or(proto::Error::MessageTooLarge(body.len()))?;
        let header = Header {
            msg_id: id,
            command,
            size,
            flags,
            error: 0,
        };
        let mut bytes = Vec::with_capacity(HEADER_SIZE + body.len());
        bytes.extend_from_slice(&header.encode());
        bytes.extend_from_slice(body);
        self.send_raw(&bytes, fds)?;
        Ok(id)
    }

    /// Send a typed request. Returns its id.
    pub fn send_request(
        &mut self,
        request: &Request<'_>,
        fds: &[RawFd],
        no_reply: bool,
    ) -> Result<u16, Error> {
        let body = request.to_body()?;
        let flags = FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 };
        self.send(request.command().into(), flags, &body, fds)
    }

    // --- receiving --------------------------------------------------------

    /// The next message, whatever it is, by `deadline`. Server requests
    /// are returned too (not answered).
    pub fn recv_until(&mut self, deadline: Instant) -> Result<Message, Error> {
        loop {
            if let Some(m) = self.inbox.pop()? {
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ready =
                sys::poll_readable(&[self.sock.as_fd()], left).map_err(|e| Error::io("poll", e))?;
            if !ready.first().copied().unwrap_or(false) {
                return Err(Error::Timeout {
                    timeout: self.timeout,
                    what: format!(
                        "a message from the server ({} bytes of one received)",
                        self.inbox.pending()
                    ),
                });
            }
            match self.inbox.fill(self.sock.as_fd())? {
                Fill::Data | Fill::WouldBlock => {}
                Fill::Eof => {
                    return Err(Error::Closed {
                        unread: self.inbox.pending(),
                        reset: false,
                    });
                }
            }
        }
    }

    /// The next message within the timeout (server requests included).
    pub fn recv(&mut self) -> Result<Message, Error> {
        self.recv_until(Instant::now() + self.timeout)
    }

    /// The next reply within the timeout, answering (or holding) server
    /// requests that come first.
    pub fn recv_reply(&mut self) -> Result<Message, Error> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.recv_until(deadline)?;
            if !m.is_server_request() {
                return Ok(m);
            }
            self.server_request(m)?;
        }
    }

    /// Wait for the reply to request `id`. Any other reply is an error.
    pub fn wait_reply(&mut self, id: u16) -> Result<Message, Error> {
        let m = self.recv_reply()?;
        if m.header.msg_id != id {
            return Err(Error::Unexpected(format!(
                "reply id {} (command {}) while waiting for id {id}",
                m.header.msg_id, m.header.command
            )));
        }
        Ok(m)
    }

    /// Answer (or hold) one server request.
    fn server_request(&mut self, m: Message) -> Result<(), Error> {
        if self.answer_dma {
            self.answer(&m)
        } else {
            self.held.push_back(m);
            Ok(())
        }
    }

    /// Answer a DMA_READ or DMA_WRITE from client memory. Requests for
    /// memory the client does not have get EFAULT, malformed ones EINVAL.
    pub fn answer(&mut self, m: &Message) -> Result<(), Error> {
        let command = Command::try_from(m.header.command);
        let parsed = command.and_then(|c| proto::parse_server_request(c, &m.body));
        let mut body = Vec::new();
        let errno = match parsed {
            Err(_) => Some(libc::EINVAL as u32),
            Ok(ServerRequest::DmaRead(a)) => {
                if a.count > self.max_xfer {
                    self.stats.oversized += 1;
                }
                match self.memory.read(a.address, a.count) {
                    Some(data) => {
                        proto::DmaData {
                            address: a.address,
                            data: &data,
                        }
                        .encode(&mut body);
                        self.stats.reads += 1;
                        self.stats.bytes_read += a.count;
                        None
                    }
                    None => Some(libc::EFAULT as u32),
                }
            }
            Ok(ServerRequest::DmaWrite(d)) => {
                let len = d.data.len() as u64;
                if len > self.max_xfer {
                    self.stats.oversized += 1;
                }
                if self.memory.write(d.address, d.data) {
                    proto::DmaAccess {
                        address: d.address,
                        count: len,
                    }
                    .encode(&mut body);
                    self.stats.writes += 1;
                    self.stats.bytes_written += len;
                    None
                } else {
                    Some(libc::EFAULT as u32)
                }
            }
        };
        let bytes = match errno {
            Some(e) => {
                self.stats.failed += 1;
                m.header.error_reply(e).encode().to_vec()
            }
            None => proto::reply_message(&m.header, &body)?,
        };
        self.send_raw(&bytes, &[])
    }

    /// Serve the server's DMA requests until one of `fds` is readable or
    /// `timeout` passes; returns which fds are readable (all false on
    /// timeout). Replies that arrive meanwhile are an error.
    pub fn serve_until(
        &mut self,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Vec<bool>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(m) = self.inbox.pop()? {
                if !m.is_server_request() {
                    return Err(Error::Unexpected(format!(
                        "reply id {} with no request outstanding",
                        m.header.msg_id
                    )));
                }
                self.server_request(m)?;
            }
            let mut all: Vec<BorrowedFd<'_>> = fds.to_vec();
            all.push(self.sock.as_fd());
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = sys::poll_readable(&all, left).map_err(|e| Error::io("poll", e))?;
            let (theirs, ours) = ready.split_at(fds.len());
            if theirs.iter().any(|r| *r) {
                return Ok(theirs.to_vec());
            }
            if !ours.first().copied().unwrap_or(false) {
                if Instant::now() >= deadline {
                    return Ok(theirs.to_vec());
                }
                continue;
            }
            match self.inbox.fill(self.sock.as_fd())? {
                Fill::Data | Fill::WouldBlock => {}
                Fill::Eof => {
                    return Err(Error::Closed {
                        unread: self.inbox.pending(),
                        reset: false,
                    });
                }
            }
        }
    }

    /// Wait for the server to close the connection; returns the messages
    /// that came before the close (e.g. an error reply). Server requests
    /// are not answered.
    pub fn expect_close(&mut self) -> Result<Vec<Message>, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut got = Vec::new();
        loop {
            match self.recv_until(deadline) {
                Ok(m) => got.push(m),
                Err(Error::Closed { .. }) => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    }

    // --- requests ---------------------------------------------------------

    /// Send `body` as `command` with `fds` and wait for the reply. An error
    /// reply is [`Error::Errno`].
    pub fn call_raw(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> Result<Message, Error> {
        let id = self.send(command, FLAG_TYPE_COMMAND, body, fds)?;
        let m = self.wait_reply(id)?;
        if m.header.command != command {
            return Err(Error::Unexpected(format!(
                "reply to command {command} carries command {}",
                m.header.command
            )));
        }
        if let Some(errno) = m.errno() {
            return Err(Error::Errno { command, errno });
        }
        Ok(m)
    }

    /// Send a typed request and wait for its reply.
    pub fn call(&mut self, request: &Request<'_>, fds: &[RawFd]) -> Result<Message, Error> {
        let body = request.to_body()?;
        self.call_raw(request.command().into(), &body, fds)
    }

    /// Negotiate with `proposal`; returns the server's reply.
    pub fn negotiate(&mut self, proposal: &Proposal) -> Result<proto::Version, Error> {
        let m = self.call_raw(Command::Version.into(), &proposal.body(), &[])?;
        let v = proto::Version::parse(&m.body)?;
        if let Some(text) = proposal.data.strip_suffix(&[0]) {
            if let Ok(c) = std::str::from_utf8(text)
                .map_err(|_| ())
                .and_then(|t| proto::Capabilities::from_json(t).map_err(|_| ()))
            {
                self.max_xfer = c.max_data_xfer_size;
            }
        }
        self.server = Some(v.clone());
        Ok(v)
    }

    /// Negotiate with QEMU's proposal.
    pub fn version(&mut self) -> Result<proto::Version, Error> {
        self.negotiate(&Proposal::qemu())
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<proto::DeviceInfo, Error> {
        let m = self.call(
            &Request::DeviceGetInfo(proto::DeviceInfoRequest { argsz: 16 }),
            &[],
        )?;
        Ok(proto::DeviceInfo::parse(&m.body)?)
    }

    /// DEVICE_GET_REGION_INFO with the argsz retry QEMU does; returns the
    /// info and the descriptor of the full reply.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(proto::RegionInfo, Option<OwnedFd>), Error> {
        let mut argsz = proto::info::REGION_INFO_SIZE as u32;
        for _ in 0..4 {
            let mut m = self.call(
                &Request::DeviceGetRegionInfo(proto::RegionInfoRequest { argsz, index }),
                &[],
            )?;
            let r = proto::RegionInfo::parse(&m.body)?;
            match r.needed() {
                Some(n) if n > argsz => {
                    argsz = n;
                    continue;
                }
                Some(n) => {
                    return Err(Error::Unexpected(format!(
                        "truncated region info asks for argsz {n} after {argsz}"
                    )));
                }
                None => {}
            }
            if m.fds.len() > 1 {
                return Err(Error::Unexpected(format!(
                    "region info came with {} descriptors",
                    m.fds.len()
                )));
            }
            return Ok((r.info, m.fds.pop()));
        }
        Err(Error::Unexpected("region info keeps growing".into()))
    }

    /// DEVICE_GET_REGION_IO_FDS with the argsz retry.
    pub fn region_io_fds(
        &mut self,
        index: u32,
    ) -> Result<(proto::RegionIoFds, Vec<OwnedFd>), Error> {
        let mut argsz = proto::info::REGION_IO_FDS_SIZE as u32;
        for _ in 0..4 {
            let m = self.call(
                &Request::DeviceGetRegionIoFds(proto::RegionIoFdsRequest { argsz, index }),
                &[],
            )?;
            let r = proto::RegionIoFds::parse(&m.body)?;
            match r.needed() {
                Some(n) if n > argsz => argsz = n,
                Some(n) => {
                    return Err(Error::Unexpected(format!(
                        "truncated region io fds reply asks for argsz {n} after {argsz}"
                    )));
                }
                None => return Ok((r.io_fds, m.fds)),
            }
        }
        Err(Error::Unexpected(
            "region io fds reply keeps growing".into(),
        ))
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<proto::IrqInfo, Error> {
        let m = self.call(
            &Request::DeviceGetIrqInfo(proto::IrqInfoRequest { argsz: 16, index }),
            &[],
        )?;
        Ok(proto::IrqInfo::parse(&m.body)?)
    }

    /// DEVICE_SET_IRQS with any action and data.
    pub fn set_irqs(
        &mut self,
        index: u32,
        start: u32,
        count: u32,
        action: proto::IrqAction,
        data: proto::IrqData<'_>,
        fds: &[RawFd],
    ) -> Result<(), Error> {
        let argsz = proto::SetIrqs::argsz_for(&data)?;
        self.call(
            &Request::DeviceSetIrqs(proto::SetIrqs {
                argsz,
                index,
                start,
                count,
                action,
                data,
            }),
            fds,
        )?;
        Ok(())
    }

    /// Arm vectors `start..` of `index` with these eventfds (TRIGGER |
    /// DATA_EVENTFD, as QEMU does).
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[&crate::EventFd],
    ) -> Result<(), Error> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let count = u32::try_from(raw.len()).map_err(|_| Error::Unexpected("fd count".into()))?;
        self.set_irqs(
            index,
            start,
            count,
            proto::IrqAction::Trigger,
            proto::IrqData::Eventfd,
            &raw,
        )
    }

    /// REGION_READ of `count` bytes.
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, Error> {
        let m = self.call(
            &Request::RegionRead(proto::RegionAccess {
                offset,
                region,
                count,
            }),
            &[],
        )?;
        let d = proto::RegionData::parse(&m.body, "REGION_READ reply")?;
        if d.data.len() != count as usize || d.offset != offset || d.region != region {
            return Err(Error::Unexpected(format!(
                "REGION_READ reply for region {} offset {:#x} with {} bytes, asked {region} {offset:#x} {count}",
                d.region,
                d.offset,
                d.data.len()
            )));
        }
        Ok(d.data.to_vec())
    }

    /// REGION_WRITE, waiting for the reply.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let m = self.call(
            &Request::RegionWrite(proto::RegionData {
                offset,
                region,
                data,
            }),
            &[],
        )?;
        let a = proto::RegionAccess::parse(&m.body, "REGION_WRITE reply")?;
        if a.count as usize != data.len() {
            return Err(Error::Unexpected(format!(
                "REGION_WRITE reply count {} for {} bytes",
                a.count,
                data.len()
            )));
        }
        Ok(())
    }

    /// REGION_WRITE with NO_REPLY (a posted write, as QEMU sends them when
    /// no region is mmapped).
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        self.send_request(
            &Request::RegionWrite(proto::RegionData {
                offset,
                region,
                data,
            }),
            &[],
            true,
        )?;
        Ok(())
    }

    /// A 32-bit little-endian register read.
    pub fn read32(&mut self, region: u32, offset: u64) -> Result<u32, Error> {
        let b = self.region_read(region, offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 64-bit little-endian register read.
    pub fn read64(&mut self, region: u32, offset: u64) -> Result<u64, Error> {
        let b = self.region_read(region, offset, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    /// A 32-bit little-endian register write.
    pub fn write32(&mut self, region: u32, offset: u64, value: u32) -> Result<(), Error> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    /// A 64-bit little-endian register write.
    pub fn write64(&mut self, region: u32, offset: u64, value: u64) -> Result<(), Error> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    /// REGION_WRITE_MULTI of (region, offset, data) entries; returns the
    /// server's write count.
    pub fn write_multi(&mut self, writes: &[(u32, u64, &[u8])]) -> Result<u64, Error> {
        let writes = writes
            .iter()
            .map(|&(region, offset, data)| proto::RegionData {
                offset,
                region,
                data,
            })
            .collect();
        let m = self.call(
            &Request::RegionWriteMulti(proto::WriteMulti { writes }),
            &[],
        )?;
        Ok(proto::WriteMultiReply::parse(&m.body)?.wr_cnt)
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), Error> {
        self.call(&Request::DeviceReset, &[])?;
        Ok(())
    }

    /// DMA_MAP of `size` bytes at `iova`, backed by `fd` at `offset`.
    pub fn dma_map_fd(
        &mut self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        write: bool,
    ) -> Result<(), Error> {
        self.call(
            &Request::DmaMap(proto::DmaMap {
                argsz: proto::dma::DMA_MAP_SIZE as u32,
                read: true,
                write,
                offset,
                address: iova,
                size,
            }),
            &[fd.as_raw_fd()],
        )?;
        Ok(())
    }

    /// DMA_MAP of `size` bytes at `iova` without a descriptor; the client
    /// holds the memory (zero-filled) and serves the server's DMA requests
    /// from it.
    pub fn dma_map_msg(&mut self, iova: u64, size: u64, write: bool) -> Result<(), Error> {
        self.call(
            &Request::DmaMap(proto::DmaMap {
                argsz: proto::dma::DMA_MAP_SIZE as u32,
                read: true,
                write,
                offset: 0,
                address: iova,
                size,
            }),
            &[],
        )?;
        self.memory.add(iova, size, write)
    }

    /// DMA_UNMAP of the mapping `iova`+`size`.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Error> {
        let u = proto::DmaUnmap {
            argsz: proto::dma::DMA_UNMAP_SIZE as u32,
            address: iova,
            size,
            kind: proto::UnmapKind::Range,
        };
        let m = self.call(&Request::DmaUnmap(u), &[])?;
        let r = proto::DmaUnmapReply::parse(&m.body)?;
        if (r.address, r.size) != (iova, size) {
            return Err(Error::Unexpected(format!("DMA_UNMAP reply {r:?}")));
        }
        self.memory.remove(iova);
        Ok(())
    }

    /// DMA_UNMAP with UNMAP_ALL.
    pub fn dma_unmap_all(&mut self) -> Result<(), Error> {
        let u = proto::DmaUnmap {
            argsz: proto::dma::DMA_UNMAP_SIZE as u32,
            address: 0,
            size: 0,
            kind: proto::UnmapKind::All,
        };
        self.call(&Request::DmaUnmap(u), &[])?;
        self.memory.clear();
        Ok(())
    }

    /// DMA_UNMAP with GET_DIRTY_BITMAP; returns the bitmap.
    pub fn dma_unmap_dirty(
        &mut self,
        iova: u64,
        size: u64,
        pgsize: u64,
        bitmap_size: u64,
    ) -> Result<Vec<u8>, Error> {
        let full = (proto::dma::DMA_UNMAP_SIZE + proto::dma::DMA_BITMAP_SIZE) as u64 + bitmap_size;
        let u = proto::DmaUnmap {
            argsz: u32::try_from(full).map_err(|_| Error::Unexpected("bitmap size".into()))?,
            address: iova,
            size,
            kind: proto::UnmapKind::DirtyBitmap {
                pgsize,
                size: bitmap_size,
            },
        };
        let m = self.call(&Request::DmaUnmap(u), &[])?;
        let r = proto::DmaUnmapReply::parse(&m.body)?;
        let (pg, bits) = r
            .bitmap
            .ok_or_else(|| Error::Unexpected(format!("DMA_UNMAP reply without bitmap: {r:?}")))?;
        if pg != pgsize {
            return Err(Error::Unexpected(format!("bitmap page size {pg}")));
        }
        self.memory.remove(iova);
        Ok(bits.to_vec())
    }

    /// DEVICE_FEATURE; returns the reply body (parse it with
    /// [`proto::DeviceFeatureReply::parse`]).
    pub fn feature(
        &mut self,
        request: proto::FeatureRequest,
        argsz: u32,
    ) -> Result<Vec<u8>, Error> {
        let m = self.call(
            &Request::DeviceFeature(proto::DeviceFeature { argsz, request }),
            &[],
        )?;
        Ok(m.body)
    }

    /// SET of MIG_DEVICE_STATE.
    pub fn set_mig_state(&mut self, state: proto::MigState) -> Result<(), Error> {
        let body = self.feature(
            proto::FeatureRequest::SetMigDeviceState(proto::MigDeviceState { state, data_fd: 0 }),
            16,
        )?;
        match proto::DeviceFeatureReply::parse(&body)?.reply {
            Some(proto::FeatureReply::MigDeviceState(s)) if s.state == state => Ok(()),
            other => Err(Error::Unexpected(format!(
                "reply to SET MIG_DEVICE_STATE {state:?}: {other:?}"
            ))),
        }
    }

    /// GET of MIG_DEVICE_STATE.
    pub fn mig_state(&mut self) -> Result<proto::MigState, Error> {
        let body = self.feature(proto::FeatureRequest::GetMigDeviceState, 16)?;
        match proto::DeviceFeatureReply::parse(&body)?.reply {
            Some(proto::FeatureReply::MigDeviceState(s)) => Ok(s.state),
            other => Err(Error::Unexpected(format!(
                "reply to GET MIG_DEVICE_STATE: {other:?}"
            ))),
        }
    }

    /// Read the device state in STOP_COPY with MIG_DATA_READ requests of
    /// `chunk` bytes, until a short reply.
    pub fn mig_save(&mut self, chunk: u32) -> Result<Vec<u8>, Error> {
        let mut saved = Vec::new();
        for _ in 0..(1 << 20) {
            let m = self.call(
                &Request::MigDataRead(proto::MigDataRead {
                    argsz: chunk.saturating_add(8),
                    size: chunk,
                }),
                &[],
            )?;
            let r = proto::MigDataReadReply::parse(&m.body)?;
            if r.needed().is_some() {
                return Err(Error::Unexpected("truncated MIG_DATA_READ reply".into()));
            }
            saved.extend_from_slice(r.data);
            if r.size < chunk {
                return Ok(saved);
            }
        }
        Err(Error::Unexpected("migration data does not end".into()))
    }

    /// Write device state in RESUMING with MIG_DATA_WRITE requests of at
    /// most `chunk` bytes.
    pub fn mig_load(&mut self, data: &[u8], chunk: usize) -> Result<(), Error> {
        for part in data.chunks(chunk.max(1)) {
            self.call(
                &Request::MigDataWrite(proto::MigDataWrite {
                    argsz: 8,
                    data: part,
                }),
                &[],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventFd;
    use vdevd_protocol::header::{FLAG_ERROR, FLAG_TYPE_REPLY};

    /// A connected client and the socket the test plays the server on.
    fn pair() -> (Client, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::from_stream(a).unwrap();
        c.set_timeout(Duration::from_secs(5)).unwrap();
        (c, b)
    }

    fn message(id: u16, command: u16, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Header {
            msg_id: id,
            command,
            size: (HEADER_SIZE + body.len()) as u32,
            flags,
            error: 0,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(body);
        m
    }

    fn server_send(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let n = sys::send_with_fds(s.as_fd(), &[IoSlice::new(bytes)], fds).unwrap();
        assert_eq!(n, bytes.len());
    }

    fn server_recv(s: &UnixStream) -> (Header, Vec<u8>) {
        let mut c = Client::from_stream(s.try_clone().unwrap()).unwrap();
        let m = c.recv().unwrap();
        (m.header, m.body)
    }

    #[test]
    fn descriptors_go_to_the_message_they_came_with() {
        let (mut c, s) = pair();
        let e = EventFd::new().unwrap();
        // three replies; the second carries a descriptor and is sent on its
        // own, as a server must; all arrive before the client reads
        server_send(&s, &message(1, 4, FLAG_TYPE_REPLY, &[1; 8]), &[]);
        server_send(
            &s,
            &message(2, 5, FLAG_TYPE_REPLY, &[2; 4]),
            &[e.as_raw_fd()],
        );
        server_send(&s, &message(3, 4, FLAG_TYPE_REPLY, &[]), &[]);
        let got: Vec<(u16, usize, usize)> = (0..3)
            .map(|_| {
                let m = c.recv().unwrap();
                (m.header.msg_id, m.body.len(), m.fds.len())
            })
            .collect();
        assert_eq!(got, [(1, 8, 0), (2, 4, 1), (3, 0, 0)]);
        assert_eq!(c.stray_fds(), 0);
    }

    #[test]
    fn a_message_split_over_sends_keeps_its_descriptor() {
        let (mut c, s) = pair();
        let e = EventFd::new().unwrap();
        let m = message(9, 5, FLAG_TYPE_REPLY, &[7; 40]);
        server_send(&s, &m[..10], &[e.as_raw_fd()]);
        server_send(&s, &m[10..], &[]);
        let r = c.recv().unwrap();
        assert_eq!((r.header.msg_id, r.body, r.fds.len()), (9, vec![7; 40], 1));
    }

    #[test]
    fn a_silent_server_times_out_and_a_closed_one_is_reported() {
        let (mut c, s) = pair();
        c.set_timeout(Duration::from_millis(50)).unwrap();
        let t0 = Instant::now();
        let e = c.recv().unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(50));
        server_send(&s, &message(1, 4, FLAG_TYPE_REPLY, &[0; 3])[..12], &[]);
        drop(s);
        match c.recv().unwrap_err() {
            Error::Closed { unread, reset } => assert_eq!((unread, reset), (12, false)),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn error_replies_become_errno_and_ids_are_checked() {
        let (mut c, s) = pair();
        let id = c.send(Command::DeviceReset.into(), 0, &[], &[]).unwrap();
        let (h, _) = server_recv(&s);
        assert_eq!((h.msg_id, h.command), (id, 13));
        server_send(&s, &h.error_reply(libc::EBUSY as u32).encode(), &[]);
        let m = c.wait_reply(id).unwrap();
        assert_eq!(m.errno(), Some(libc::EBUSY as u32));
        // a reply to an id we did not send
        let id = c.send(Command::DeviceReset.into(), 0, &[], &[]).unwrap();
        server_send(
            &s,
            &message(id.wrapping_add(5), 13, FLAG_TYPE_REPLY | FLAG_ERROR, &[]),
            &[],
        );
        assert!(matches!(c.wait_reply(id), Err(Error::Unexpected(_))));
    }

    #[test]
    fn server_dma_requests_are_answered_from_client_memory() {
        let (mut c, s) = pair();
        c.memory_mut().add(0x1000, 0x100, true).unwrap();
        c.memory_mut().fill(0x1010, b"guest data").unwrap();
        let server = std::thread::spawn(move || {
            // the request the client will wait on, answered at the end
            let (request, _) = server_recv(&s);
            let mut body = Vec::new();
            ServerRequest::DmaRead(proto::DmaAccess {
                address: 0x1010,
                count: 10,
            })
            .encode(&mut body);
            server_send(&s, &message(100, 11, FLAG_TYPE_COMMAND, &body), &[]);
            let (h, b) = server_recv(&s);
            assert_eq!((h.msg_id, h.command, h.is_reply()), (100, 11, true));
            let d = proto::DmaData::parse(&b, "reply").unwrap();
            assert_eq!((d.address, d.data), (0x1010, &b"guest data"[..]));
            // a write, then a read of unmapped memory
            let mut body = Vec::new();
            ServerRequest::DmaWrite(proto::DmaData {
                address: 0x10f0,
                data: b"device",
            })
            .encode(&mut body);
            server_send(&s, &message(101, 12, FLAG_TYPE_COMMAND, &body), &[]);
            let (h, b) = server_recv(&s);
            assert_eq!((h.msg_id, h.is_error()), (101, false));
            assert_eq!(
                proto::DmaAccess::parse_write_reply(&b).unwrap(),
                Some(proto::DmaAccess {
                    address: 0x10f0,
                    count: 6
                })
            );
            let mut body = Vec::new();
            ServerRequest::DmaRead(proto::DmaAccess {
                address: 0x10f8,
                count: 16,
            })
            .encode(&mut body);
            server_send(&s, &message(102, 11, FLAG_TYPE_COMMAND, &body), &[]);
            let (h, _) = server_recv(&s);
            assert_eq!((h.msg_id, h.error), (102, libc::EFAULT as u32));
            // now the reply the client waits for
            server_send(&s, &request.reply(0).unwrap().encode(), &[]);
        });
        c.call(&Request::DeviceReset, &[]).unwrap();
        server.join().unwrap();
        assert_eq!(c.memory().read(0x10f0, 6).unwrap(), b"device");
        let st = c.dma_stats();
        assert_eq!((st.reads, st.writes, st.failed), (1, 1, 1));
        assert_eq!((st.bytes_read, st.bytes_written), (10, 6));
    }

    #[test]
    fn expect_close_collects_what_came_first() {
        let (mut c, s) = pair();
        server_send(&s, &message(4, 1, FLAG_TYPE_REPLY | FLAG_ERROR, &[]), &[]);
        drop(s);
        let got = c.expect_close().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header.msg_id, 4);
    }

    #[test]
    fn proposals() {
        let q = Proposal::qemu().body();
        assert_eq!(q.len(), 183, "QEMU's VERSION body is 183 bytes");
        let v = proto::Version::parse(&q).unwrap();
        assert_eq!(v.capabilities.max_msg_fds, 16);
        assert!(v.capabilities.write_multiple);
        let r = Proposal::raw(1, 2, b"{}").body();
        assert_eq!(r, [1, 0, 2, 0, b'{', b'}']);
    }
}
