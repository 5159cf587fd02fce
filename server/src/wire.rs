//! Message framing on a client socket: reading messages and the file
//! descriptors that come with them, and writing replies in batches.
//!
//! # Reading
//!
//! [`Reader::fill`] makes one `recvmsg` into a buffer with room for several
//! messages and control space for `SCM_MAX_FD` (253) descriptors, the most
//! the kernel passes in one call, so a client that sends too many cannot
//! make us lose track of them. [`Reader::next_message`] then yields every complete
//! message in the buffer; a partial message stays for the next call.
//!
//! **Which message owns the descriptors of a `recvmsg`.** On a Unix stream
//! socket the kernel attaches the descriptors of a `sendmsg` to the first
//! bytes that call sent, and a `recvmsg` that picks descriptors up returns
//! right after the segment that carried them; it never continues into a
//! later segment once it holds descriptors. A vfio-user client sends each
//! message with one `sendmsg` (header, body and descriptors together). So
//! the descriptors returned by one `recvmsg` belong to the *last message
//! that starts in the bytes that call returned*, or, if no message starts
//! there (a client that split one message over several `sendmsg` calls), to
//! the message in progress. [`Reader`] records the owner by its offset in
//! the stream and hands the descriptors out with that message only.
//!
//! `MSG_CTRUNC` (descriptors dropped by the kernel) marks the owning
//! message as truncated; whatever arrived is closed.
//!
//! # Writing
//!
//! [`Writer`] queues encoded messages while a batch of requests is
//! processed and [`Writer::flush`] sends them: consecutive messages without
//! descriptors go out together in one `sendmsg`; a message that carries
//! descriptors is sent on its own, so that whatever way the peer reads (a
//! header at a time, like QEMU, or a large buffer, like this reader), the
//! descriptors arrive with that message. A peer that stops reading fills
//! the socket: [`Writer::flush`] then reports that it must wait for
//! `EPOLLOUT`, and [`Writer::push`] refuses to queue more than a bounded
//! number of bytes, so such a peer is dropped instead of growing our memory.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;

/// Size of the vfio-user message header.
pub const HEADER_SIZE: usize = 16;

/// The most descriptors Linux passes in one `sendmsg`/`recvmsg`.
pub const SCM_MAX_FD: usize = 253;

/// Size of the receive buffer when no large message is in progress: room
/// for many small messages.
const DEFAULT_BUF: usize = 64 * 1024;

/// Read at least this much per `recvmsg` when the buffer allows.
const MIN_READ: usize = 4096;

/// Most messages gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// Bytes of control buffer for `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    let len = (n * std::mem::size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    (unsafe { libc::CMSG_SPACE(len) }) as usize
}

/// A control buffer aligned for `cmsghdr`.
pub(crate) fn cmsg_buffer(n: usize) -> Vec<u64> {
    vec![0u64; cmsg_space(n).div_ceil(8)]
}

/// The size field of the header at the start of `bytes` (which holds at
/// least [`HEADER_SIZE`] bytes), also when it is below the header size.
fn frame_size(bytes: &[u8]) -> Option<u32> {
    match vdevd_protocol::Header::parse(bytes) {
        Ok(h) => Some(h.size),
        Err(vdevd_protocol::Error::MessageSize(size)) => Some(size),
        Err(_) => None,
    }
}

/// Counters of socket activity, shared with whoever wants to observe a
/// server (tests, benchmarks, logs).
#[derive(Debug, Default)]
pub struct Stats {
    /// `recvmsg` calls on client sockets.
    pub recvmsg_calls: AtomicU64,
    /// `sendmsg` calls on client sockets.
    pub sendmsg_calls: AtomicU64,
    /// Messages received (requests and replies).
    pub messages_received: AtomicU64,
    /// Messages sent (replies and server requests).
    pub messages_sent: AtomicU64,
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Client connections that completed VERSION.
    pub sessions: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Add one to a counter.
    pub fn bump(counter: &AtomicU64) {
        Stats::add(counter, 1);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Receive into `buf`, with descriptors. Returns the byte count, the
/// descriptors (close-on-exec) and whether the kernel truncated them.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    cmsg: &mut [u64],
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = (std::mem::size_of_val(cmsg)) as _;
    let n = loop {
        // SAFETY: msg points to one iovec covering `buf` and to a control
        // buffer of msg_controllen bytes, all valid for writes and alive for
        // the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    let mut fds = Vec::new();
    // SAFETY: msg was filled in by recvmsg; CMSG_FIRSTHDR/NXTHDR stay
    // within msg_control/msg_controllen and return null at the end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c is non-null and points to a cmsghdr inside the control
        // buffer (guaranteed by CMSG_FIRSTHDR/CMSG_NXTHDR).
        let hdr = unsafe { c.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // CMSG_LEN(0) is the offset of the data from the header.
            // SAFETY: CMSG_LEN is pure arithmetic.
            let data_off = (unsafe { libc::CMSG_LEN(0) }) as usize;
            let count =
                (hdr.cmsg_len as usize).saturating_sub(data_off) / std::mem::size_of::<RawFd>();
            // SAFETY: c points to a valid cmsghdr; CMSG_DATA gives the start
            // of its data.
            let data = unsafe { libc::CMSG_DATA(c) };
            // SAFETY: the kernel wrote `count` descriptors after the header,
            // within cmsg_len bytes of our control buffer, which outlives
            // this borrow.
            let bytes =
                unsafe { std::slice::from_raw_parts(data, count * std::mem::size_of::<RawFd>()) };
            for chunk in bytes.chunks_exact(std::mem::size_of::<RawFd>()) {
                let mut raw = [0u8; std::mem::size_of::<RawFd>()];
                raw.copy_from_slice(chunk);
                let raw = RawFd::from_ne_bytes(raw);
                if raw >= 0 {
                    // SAFETY: the kernel installed this descriptor in our
                    // table for us; nobody else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: msg and c are valid as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok((n, fds, truncated))
}

/// Send `iov` in one `sendmsg`, with `fds` attached. Returns bytes sent.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    fds: &[RawFd],
    cmsg: &mut [u64],
) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec.
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        let space = cmsg_space(fds.len());
        if space > std::mem::size_of_val(cmsg) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for a cmsghdr and the
        // descriptors (checked above); CMSG_FIRSTHDR returns its start.
        let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if c.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let payload: Vec<u8> = fds.iter().flat_map(|fd| fd.to_ne_bytes()).collect();
        // SAFETY: CMSG_LEN is pure arithmetic.
        let cmsg_len = unsafe { libc::CMSG_LEN(payload.len() as libc::c_uint) };
        let header = libc::cmsghdr {
            cmsg_len: cmsg_len as _,
            cmsg_level: libc::SOL_SOCKET,
            cmsg_type: libc::SCM_RIGHTS,
        };
        // SAFETY: c points to the start of our control buffer, aligned for
        // cmsghdr (it is a u64 array) and large enough (checked above).
        unsafe { c.write(header) };
        // SAFETY: CMSG_DATA of the valid header just written.
        let data = unsafe { libc::CMSG_DATA(c) };
        // SAFETY: the buffer holds CMSG_SPACE(payload.len()) bytes, so the
        // data area has room for the payload; the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), data, payload.len()) };
    }
    loop {
        // SAFETY: msg points to `iov` (valid IoSlices borrowed for the call)
        // and, if set, to our control buffer.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What one [`Reader::fill`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// This many bytes (with any descriptors) were received.
    Data(usize),
    /// The peer closed the connection.
    Eof,
    /// Nothing to read now.
    WouldBlock,
}

/// A framing error: the stream cannot be trusted after it.
#[derive(Debug)]
pub struct FrameError {
    /// The header of the offending message (for an error reply).
    pub header: [u8; HEADER_SIZE],
    /// What is wrong.
    pub error: Error,
}

/// One complete message from the peer.
#[derive(Debug)]
pub struct Incoming<'a> {
    /// The whole message, header included.
    pub bytes: &'a [u8],
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
    /// The kernel truncated its descriptors (MSG_CTRUNC).
    pub fds_truncated: bool,
}

#[derive(Debug)]
struct FdBatch {
    /// Stream offset of the message that owns the descriptors.
    owner: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// The receiving half of a connection. See the module documentation.
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`; `start` is a message start.
    start: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    fds: VecDeque<FdBatch>,
    max_message: usize,
    cmsg: Vec<u64>,
}

impl Reader {
    /// A reader that refuses messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> Reader {
        Reader {
            buf: vec![0; DEFAULT_BUF],
            start: 0,
            end: 0,
            base: 0,
            fds: VecDeque::new(),
            max_message: max_message.max(HEADER_SIZE),
            cmsg: cmsg_buffer(SCM_MAX_FD),
        }
    }

    /// Change the largest message accepted (after negotiation).
    pub fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message.max(HEADER_SIZE);
    }

    /// The largest message accepted.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Bytes received that do not form a complete message yet.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Size of the message at `start`, if its header is complete.
    fn size_at(&self, pos: usize) -> Option<usize> {
        let hdr = self.buf.get(pos..pos.checked_add(HEADER_SIZE)?)?;
        if pos + HEADER_SIZE > self.end {
            return None;
        }
        frame_size(hdr).map(|s| s as usize)
    }

    /// Make room for the next `recvmsg`.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.base += self.start as u64;
            self.start = 0;
            self.end = 0;
            if self.buf.len() > DEFAULT_BUF {
                // A large message is done: give its memory back.
                self.buf = vec![0; DEFAULT_BUF];
            }
            return;
        }
        let wanted = self
            .size_at(self.start)
            .filter(|s| *s <= self.max_message)
            .unwrap_or(0);
        let room = self.buf.len() - self.end;
        let message_fits = self.start + wanted <= self.buf.len();
        if room < MIN_READ || !message_fits {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
        if wanted > self.buf.len() {
            self.buf.resize(wanted, 0);
        }
    }

    /// One `recvmsg` from `sock`.
    pub fn fill(&mut self, sock: BorrowedFd<'_>, stats: &Stats) -> io::Result<Fill> {
        self.make_room();
        let old_end = self.end;
        let Some(space) = self.buf.get_mut(old_end..).filter(|s| !s.is_empty()) else {
            // Unreachable by construction (make_room leaves room); treat as
            // "nothing read" rather than spin.
            return Ok(Fill::WouldBlock);
        };
        Stats::add(&stats.recvmsg_calls, 1);
        let (n, fds, truncated) = match recv_with_fds(sock, space, &mut self.cmsg) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Descriptors cannot come without data on a stream socket; any
            // that did are closed here.
            return Ok(Fill::Eof);
        }
        self.end = old_end + n;
        if !fds.is_empty() || truncated {
            let owner = self.fd_owner(old_end);
            if truncated {
                log::warn!(
                    "descriptors truncated by the kernel (MSG_CTRUNC); closing {} received",
                    fds.len()
                );
            }
            match self.fds.back_mut() {
                Some(b) if b.owner == owner => {
                    b.fds.extend(fds);
                    b.truncated |= truncated;
                }
                _ => self.fds.push_back(FdBatch {
                    owner,
                    fds,
                    truncated,
                }),
            }
        }
        Ok(Fill::Data(n))
    }

    /// Stream offset of the message that owns descriptors received with
    /// the bytes `old_end..self.end` (see the module documentation).
    fn fd_owner(&self, old_end: usize) -> u64 {
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
                Some(size) if size >= HEADER_SIZE => match pos.checked_add(size) {
                    Some(next) => pos = next,
                    None => break,
                },
                // Incomplete header, or a size framing will refuse.
                _ => break,
            }
        }
        self.base + starting_here.unwrap_or(in_progress) as u64
    }

    /// The next complete message, if one is buffered. After an error the
    /// connection must be closed.
    pub fn next_message(&mut self) -> Result<Option<Incoming<'_>>, FrameError> {
        if self.end - self.start < HEADER_SIZE {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_SIZE];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
        let raw = frame_size(&header).unwrap_or(0);
        let size = raw as usize;
        if size < HEADER_SIZE {
            return Err(FrameError {
                header,
                error: Error::MessageTooSmall(raw),
            });
        }
        if size > self.max_message {
            return Err(FrameError {
                header,
                error: Error::MessageTooLarge {
                    size: raw,
                    max: self.max_message,
                },
            });
        }
        if self.end - self.start < size {
            return Ok(None);
        }
        let at = self.base + self.start as u64;
        let mut fds = Vec::new();
        let mut fds_truncated = false;
        while let Some(b) = self.fds.front() {
            if b.owner > at {
                break;
            }
            if let Some(b) = self.fds.pop_front() {
                if b.owner == at {
                    fds = b.fds;
                    fds_truncated = b.truncated;
                } else {
                    log::warn!("closing {} descriptors of no message", b.fds.len());
                }
            }
        }
        let range = self.start..self.start + size;
        self.start += size;
        Ok(Some(Incoming {
            bytes: &self.buf[range],
            fds,
            fds_truncated,
        }))
    }
}

/// An encoded message waiting to be sent.
#[derive(Debug, Default)]
pub struct OutMessage {
    /// Header and body.
    pub bytes: Vec<u8>,
    /// Descriptors sent with it (duplicated into the peer by the kernel).
    pub fds: Vec<Arc<OwnedFd>>,
}

/// The sending half of a connection. See the module documentation.
#[derive(Debug)]
pub struct Writer {
    queue: VecDeque<OutMessage>,
    /// Bytes of the front message already sent.
    head_sent: usize,
    queued_bytes: usize,
    limit: usize,
    cmsg: Vec<u64>,
}

impl Writer {
    /// A writer that holds at most `limit` bytes of unsent messages.
    pub fn new(limit: usize) -> Writer {
        Writer {
            queue: VecDeque::new(),
            head_sent: 0,
            queued_bytes: 0,
            limit,
            cmsg: cmsg_buffer(SCM_MAX_FD),
        }
    }

    /// Change the queue limit.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Whether nothing waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes waiting to be sent.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queue a message. Fails if the queue would exceed its limit (the peer
    /// does not read) or the message carries more descriptors than one
    /// `sendmsg` can pass.
    pub fn push(&mut self, msg: OutMessage) -> Result<(), Error> {
        if msg.fds.len() > SCM_MAX_FD {
            return Err(Error::TooManyFds {
                count: msg.fds.len(),
                max: SCM_MAX_FD,
            });
        }
        let total = self.queued_bytes.saturating_add(msg.bytes.len());
        if total > self.limit && !self.queue.is_empty() {
            return Err(Error::OutputOverflow(self.limit));
        }
        self.queued_bytes = total;
        self.queue.push_back(msg);
        Ok(())
    }

    /// Send what is queued. `Ok(true)`: everything was sent; `Ok(false)`:
    /// the socket is full, wait for EPOLLOUT and call again.
    pub fn flush(&mut self, sock: BorrowedFd<'_>, stats: &Stats) -> io::Result<bool> {
        while let Some(front) = self.queue.front() {
            // A message with descriptors goes alone, first in its sendmsg;
            // others are gathered up to the next one with descriptors.
            let with_fds = self.head_sent == 0 && !front.fds.is_empty();
            let n = {
                let mut iov: Vec<IoSlice<'_>> = Vec::new();
                let mut raw_fds: Vec<RawFd> = Vec::new();
                for (i, m) in self.queue.iter().enumerate() {
                    if i > 0 && (with_fds || !m.fds.is_empty() || iov.len() >= MAX_IOV) {
                        break;
                    }
                    let bytes = if i == 0 {
                        m.bytes.get(self.head_sent..).unwrap_or_default()
                    } else {
                        &m.bytes[..]
                    };
                    iov.push(IoSlice::new(bytes));
                }
                if with_fds {
                    raw_fds.extend(front.fds.iter().map(|f| f.as_raw_fd()));
                }
                Stats::add(&stats.sendmsg_calls, 1);
                match send_with_fds(sock, &iov, &raw_fds, &mut self.cmsg) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            };
            self.advance(n, stats);
        }
        Ok(true)
    }

    /// Account for `n` bytes sent from the front of the queue.
    fn advance(&mut self, mut n: usize, stats: &Stats) {
        self.queued_bytes = self.queued_bytes.saturating_sub(n);
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            // Descriptors went with the first byte of the message.
            front.fds.clear();
            let left = front.bytes.len() - self.head_sent;
            if n >= left {
                n -= left;
                self.head_sent = 0;
                self.queue.pop_front();
                Stats::add(&stats.messages_sent, 1);
            } else {
                self.head_sent += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// A test message: header with `id`, `command` and the size, then body.
    pub(crate) fn msg(id: u16, command: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_ne_bytes());
        m.extend_from_slice(&command.to_ne_bytes());
        m.extend_from_slice(&((HEADER_SIZE + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    fn id_of(bytes: &[u8]) -> u16 {
        u16::from_ne_bytes([bytes[0], bytes[1]])
    }

    /// Send `data` with `fds` in one sendmsg.
    pub(crate) fn send_raw(sock: &UnixStream, data: &[u8], fds: &[RawFd]) {
        let mut cmsg = cmsg_buffer(SCM_MAX_FD);
        let n = send_with_fds(sock.as_fd(), &[IoSlice::new(data)], fds, &mut cmsg).unwrap();
        assert_eq!(n, data.len());
    }

    pub(crate) fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: new descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    /// Read everything available and collect (id, body length, fd count).
    fn drain(r: &mut Reader, sock: &UnixStream, stats: &Stats) -> Vec<(u16, usize, usize)> {
        let mut out = Vec::new();
        while let Fill::Data(_) = r.fill(sock.as_fd(), stats).unwrap() {
            while let Some(m) = r.next_message().unwrap() {
                out.push((id_of(m.bytes), m.bytes.len() - HEADER_SIZE, m.fds.len()));
            }
        }
        out
    }

    #[test]
    fn several_messages_in_one_read() {
        let (mut client, server) = pair();
        let mut all = Vec::new();
        for id in 0..10u16 {
            all.extend(msg(id, 4, &[id as u8; 16]));
        }
        client.write_all(&all).unwrap();
        let stats = Stats::default();
        let mut r = Reader::new(1 << 20);
        assert_eq!(
            r.fill(server.as_fd(), &stats).unwrap(),
            Fill::Data(all.len())
        );
        let mut ids = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            assert_eq!(m.bytes.len(), 32);
            ids.push(id_of(m.bytes));
        }
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert_eq!(Stats::get(&stats.recvmsg_calls), 1);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn partial_messages_wait_for_their_rest() {
        let (mut client, server) = pair();
        let stats = Stats::default();
        let mut r = Reader::new(1 << 20);
        let m = msg(7, 10, &[0xab; 100]);
        // header in two pieces, then the body in two pieces
        for piece in [&m[..5], &m[5..16], &m[16..60]] {
            client.write_all(piece).unwrap();
            assert!(matches!(
                r.fill(server.as_fd(), &stats).unwrap(),
                Fill::Data(_)
            ));
            assert!(r.next_message().unwrap().is_none());
        }
        // the rest, together with the start of a second message
        let m2 = msg(8, 4, &[]);
        let mut tail = m[60..].to_vec();
        tail.extend_from_slice(&m2[..3]);
        client.write_all(&tail).unwrap();
        r.fill(server.as_fd(), &stats).unwrap();
        let got = r.next_message().unwrap().unwrap();
        assert_eq!(got.bytes, &m[..]);
        assert!(r.next_message().unwrap().is_none());
        client.write_all(&m2[3..]).unwrap();
        r.fill(server.as_fd(), &stats).unwrap();
        assert_eq!(r.next_message().unwrap().unwrap().bytes, &m2[..]);
    }

    #[test]
    fn message_larger_than_the_buffer_grows_it_and_shrinks_after() {
        let (client, server) = pair();
        client.set_nonblocking(false).unwrap();
        let big = msg(1, 10, &vec![0x5a; 3 * DEFAULT_BUF]);
        let writer = std::thread::spawn({
            let mut client = client.try_clone().unwrap();
            let big = big.clone();
            move || client.write_all(&big).unwrap()
        });
        let stats = Stats::default();
        let mut r = Reader::new(4 * DEFAULT_BUF);
        let mut got = None;
        while got.is_none() {
            r.fill(server.as_fd(), &stats).unwrap();
            if let Some(m) = r.next_message().unwrap() {
                got = Some(m.bytes.to_vec());
            }
        }
        writer.join().unwrap();
        assert_eq!(got.unwrap(), big);
        // next read starts with the default buffer again
        (&client).write_all(&msg(2, 4, &[])).unwrap();
        r.fill(server.as_fd(), &stats).unwrap();
        assert_eq!(r.buf.len(), DEFAULT_BUF);
        assert_eq!(id_of(r.next_message().unwrap().unwrap().bytes), 2);
    }

    #[test]
    fn undersized_and_oversized_messages_are_framing_errors() {
        let (mut client, server) = pair();
        let stats = Stats::default();
        let mut bad = msg(3, 4, &[]);
        bad[4..8].copy_from_slice(&8u32.to_ne_bytes());
        client.write_all(&bad).unwrap();
        let mut r = Reader::new(1024);
        r.fill(server.as_fd(), &stats).unwrap();
        let e = r.next_message().unwrap_err();
        assert!(matches!(e.error, Error::MessageTooSmall(8)));
        assert_eq!(id_of(&e.header), 3);

        let (mut client, server) = pair();
        let mut r = Reader::new(1024);
        // Only the header of a huge message is needed to refuse it.
        let mut hdr = msg(4, 10, &[]);
        hdr[4..8].copy_from_slice(&(1025u32).to_ne_bytes());
        client.write_all(&hdr).unwrap();
        r.fill(server.as_fd(), &stats).unwrap();
        let e = r.next_message().unwrap_err();
        assert!(matches!(
            e.error,
            Error::MessageTooLarge {
                size: 1025,
                max: 1024
            }
        ));
        // exactly at the limit is fine
        let (mut client, server) = pair();
        let mut r = Reader::new(1024);
        client.write_all(&msg(5, 10, &[0; 1024 - 16])).unwrap();
        r.fill(server.as_fd(), &stats).unwrap();
        assert_eq!(r.next_message().unwrap().unwrap().bytes.len(), 1024);
    }

    #[test]
    fn fds_belong_to_the_message_sent_with_them() {
        let (client, server) = pair();
        let stats = Stats::default();
        // Three messages, each its own sendmsg; the middle one carries two
        // descriptors, the last one one.
        let a = msg(1, 4, &[]);
        let b = msg(2, 2, &[0; 32]);
        let c = msg(3, 8, &[0; 24]);
        let (e1, e2, e3) = (eventfd(), eventfd(), eventfd());
        send_raw(&client, &a, &[]);
        send_raw(&client, &b, &[e1.as_raw_fd(), e2.as_raw_fd()]);
        send_raw(&client, &c, &[e3.as_raw_fd()]);
        let mut r = Reader::new(1 << 20);
        let got = drain(&mut r, &server, &stats);
        assert_eq!(got, vec![(1, 0, 0), (2, 32, 2), (3, 24, 1)]);
        // The kernel ends a recvmsg after the segment with descriptors:
        // a+b in one call, c in the next.
        assert_eq!(Stats::get(&stats.recvmsg_calls), 3);
    }

    #[test]
    fn fds_sent_with_a_later_piece_of_a_message_belong_to_it() {
        let (client, server) = pair();
        let stats = Stats::default();
        let m = msg(9, 8, &[0; 40]);
        let e = eventfd();
        let mut r = Reader::new(1 << 20);
        send_raw(&client, &m[..20], &[]);
        assert!(matches!(
            r.fill(server.as_fd(), &stats).unwrap(),
            Fill::Data(20)
        ));
        // The rest of the message, and the descriptor, in a second sendmsg
        // that also carries the start of the next message.
        let next = msg(10, 4, &[]);
        let mut rest = m[20..].to_vec();
        rest.extend_from_slice(&next[..10]);
        send_raw(&client, &rest, &[e.as_raw_fd()]);
        r.fill(server.as_fd(), &stats).unwrap();
        // The next message starts in these bytes: it owns the descriptor.
        let first = r.next_message().unwrap().unwrap();
        assert_eq!((id_of(first.bytes), first.fds.len()), (9, 0));
        assert!(r.next_message().unwrap().is_none());
        send_raw(&client, &next[10..], &[]);
        r.fill(server.as_fd(), &stats).unwrap();
        let second = r.next_message().unwrap().unwrap();
        assert_eq!((id_of(second.bytes), second.fds.len()), (10, 1));

        // No message starts in the bytes: the one in progress owns them.
        let m = msg(11, 8, &[0; 40]);
        send_raw(&client, &m[..30], &[]);
        r.fill(server.as_fd(), &stats).unwrap();
        send_raw(&client, &m[30..], &[e.as_raw_fd()]);
        r.fill(server.as_fd(), &stats).unwrap();
        let third = r.next_message().unwrap().unwrap();
        assert_eq!((id_of(third.bytes), third.fds.len()), (11, 1));
    }

    #[test]
    fn the_most_fds_the_kernel_passes_are_all_received() {
        let (client, server) = pair();
        let stats = Stats::default();
        let fds: Vec<OwnedFd> = (0..SCM_MAX_FD).map(|_| eventfd()).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_raw(&client, &msg(1, 8, &[0; 20]), &raw);
        let mut r = Reader::new(1 << 20);
        r.fill(server.as_fd(), &stats).unwrap();
        let m = r.next_message().unwrap().unwrap();
        assert_eq!(m.fds.len(), SCM_MAX_FD);
        assert!(!m.fds_truncated);
    }

    #[test]
    fn fds_of_an_unfinished_message_are_closed_with_the_reader() {
        let (client, server) = pair();
        let stats = Stats::default();
        let (mem, name) = crate::testutil::memfd("unfinished");
        let m = msg(1, 8, &[0; 40]);
        send_raw(&client, &m[..30], &[mem.as_raw_fd()]);
        drop(mem);
        let mut r = Reader::new(1 << 20);
        r.fill(server.as_fd(), &stats).unwrap();
        assert!(r.next_message().unwrap().is_none());
        assert_eq!(crate::testutil::open_fds_named(&name), 1);
        drop(r);
        assert_eq!(crate::testutil::open_fds_named(&name), 0);
    }

    #[test]
    fn truncated_fds_are_reported_with_their_message_and_closed() {
        let (client, server) = pair();
        let stats = Stats::default();
        let mut r = Reader::new(1 << 20);
        // Room for one descriptor only, so the kernel truncates.
        r.cmsg = cmsg_buffer(1);
        let (mem, name) = crate::testutil::memfd("ctrunc");
        send_raw(&client, &msg(1, 4, &[]), &[]);
        send_raw(&client, &msg(2, 8, &[0; 20]), &[mem.as_raw_fd(); 3]);
        drop(mem);
        let got = drain(&mut r, &server, &stats);
        assert_eq!(got.len(), 2);
        let (mem2, _) = crate::testutil::memfd("ctrunc2");
        send_raw(&client, &msg(3, 8, &[0; 20]), &[mem2.as_raw_fd(); 3]);
        r.fill(server.as_fd(), &stats).unwrap();
        let m = r.next_message().unwrap().unwrap();
        assert_eq!(id_of(m.bytes), 3);
        assert!(m.fds_truncated);
        drop(m);
        assert_eq!(crate::testutil::open_fds_named(&name), 0);
    }

    #[test]
    fn eof_is_reported() {
        let (client, server) = pair();
        drop(client);
        let mut r = Reader::new(1024);
        assert_eq!(
            r.fill(server.as_fd(), &Stats::default()).unwrap(),
            Fill::Eof
        );
    }

    #[test]
    fn fd_less_replies_are_batched_into_one_sendmsg() {
        let (client, server) = pair();
        let stats = Stats::default();
        let mut w = Writer::new(1 << 20);
        for id in 0..20u16 {
            w.push(OutMessage {
                bytes: msg(id, 9, &[1; 8]),
                fds: vec![],
            })
            .unwrap();
        }
        assert!(w.flush(server.as_fd(), &stats).unwrap());
        assert_eq!(Stats::get(&stats.sendmsg_calls), 1);
        assert_eq!(Stats::get(&stats.messages_sent), 20);
        let mut r = Reader::new(1 << 20);
        let got = drain(&mut r, &client, &Stats::default());
        assert_eq!(got.len(), 20);
    }

    #[test]
    fn a_reply_with_fds_is_sent_alone_and_the_peer_gets_them_with_it() {
        let (client, server) = pair();
        let stats = Stats::default();
        let mut w = Writer::new(1 << 20);
        let fd = Arc::new(eventfd());
        w.push(OutMessage {
            bytes: msg(1, 9, &[]),
            fds: vec![],
        })
        .unwrap();
        w.push(OutMessage {
            bytes: msg(2, 5, &[0; 32]),
            fds: vec![fd.clone()],
        })
        .unwrap();
        w.push(OutMessage {
            bytes: msg(3, 9, &[]),
            fds: vec![],
        })
        .unwrap();
        w.push(OutMessage {
            bytes: msg(4, 9, &[]),
            fds: vec![],
        })
        .unwrap();
        assert!(w.flush(server.as_fd(), &stats).unwrap());
        // [1] [2 + fd] [3 4]
        assert_eq!(Stats::get(&stats.sendmsg_calls), 3);
        let mut r = Reader::new(1 << 20);
        let got = drain(&mut r, &client, &Stats::default());
        assert_eq!(got, vec![(1, 0, 0), (2, 32, 1), (3, 0, 0), (4, 0, 0)]);

        // A peer reading one header at a time gets the fd with message 2.
        let (client, server) = pair();
        w.push(OutMessage {
            bytes: msg(1, 9, &[]),
            fds: vec![],
        })
        .unwrap();
        w.push(OutMessage {
            bytes: msg(2, 5, &[]),
            fds: vec![fd.clone()],
        })
        .unwrap();
        assert!(w.flush(server.as_fd(), &stats).unwrap());
        let mut cmsg = cmsg_buffer(4);
        let mut hdr = [0u8; HEADER_SIZE];
        let (n, fds, _) = recv_with_fds(client.as_fd(), &mut hdr, &mut cmsg).unwrap();
        assert_eq!((n, id_of(&hdr), fds.len()), (16, 1, 0));
        let (n, fds, _) = recv_with_fds(client.as_fd(), &mut hdr, &mut cmsg).unwrap();
        assert_eq!((n, id_of(&hdr), fds.len()), (16, 2, 1));
    }

    #[test]
    fn a_full_socket_waits_and_a_peer_that_never_reads_overflows_the_queue() {
        let (client, server) = pair();
        let stats = Stats::default();
        let mut w = Writer::new(4 << 20);
        let body = vec![0u8; 64 * 1024];
        let mut blocked = false;
        let mut overflow = None;
        for id in 0..1000u16 {
            if let Err(e) = w.push(OutMessage {
                bytes: msg(id, 9, &body),
                fds: vec![],
            }) {
                overflow = Some(e);
                break;
            }
            if !w.flush(server.as_fd(), &stats).unwrap() {
                blocked = true;
            }
        }
        assert!(blocked, "the socket buffer should have filled");
        assert!(matches!(overflow, Some(Error::OutputOverflow(_))));
        // Once the peer reads, everything queued is delivered in order.
        let mut r = Reader::new(1 << 20);
        let mut ids = Vec::new();
        let reader_stats = Stats::default();
        loop {
            let flushed = w.flush(server.as_fd(), &stats).unwrap();
            match r.fill(client.as_fd(), &reader_stats).unwrap() {
                Fill::Data(_) => {}
                _ if flushed => break,
                _ => {}
            }
            while let Some(m) = r.next_message().unwrap() {
                ids.push(id_of(m.bytes));
            }
        }
        assert!(w.is_empty());
        assert_eq!(w.queued_bytes(), 0);
        let n = ids.len() as u16;
        assert_eq!(ids, (0..n).collect::<Vec<_>>());
        assert!(n > 10);
    }
}
