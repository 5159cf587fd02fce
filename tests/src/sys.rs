//! The few system calls the test client needs beyond `std`: descriptor
//! passing (`sendmsg`/`recvmsg` with SCM_RIGHTS), `poll` with a timeout,
//! eventfds and memfds.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// The most descriptors Linux passes in one `sendmsg`/`recvmsg`.
pub const SCM_MAX_FD: usize = 253;

fn cmsg_space(n: usize) -> usize {
    let len = n.saturating_mul(size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    (unsafe { libc::CMSG_SPACE(len) }) as usize
}

/// A control buffer for `n` descriptors, aligned for `cmsghdr`.
fn cmsg_buffer(n: usize) -> Vec<u64> {
    vec![0u64; cmsg_space(n).div_ceil(8)]
}

/// One `sendmsg` of `iov` with `fds` attached (SCM_RIGHTS); returns the
/// bytes sent. Retries on EINTR; other errors (EAGAIN after the socket's
/// send timeout, EPIPE) are returned.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    iov: &[IoSlice<'_>],
    fds: &[RawFd],
) -> io::Result<usize> {
    if fds.len() > SCM_MAX_FD {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut cmsg = cmsg_buffer(fds.len());
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec; sendmsg only reads through it.
    msg.msg_iov = iov.as_ptr().cast_mut().cast();
    msg.msg_iovlen = iov.len() as _;
    if !fds.is_empty() {
        let payload_len = std::mem::size_of_val(fds);
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: msg_control points to a buffer of msg_controllen bytes,
        // which holds at least one cmsghdr; the macro only reads msg.
        let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if c.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        let len = unsafe { libc::CMSG_LEN(payload_len as libc::c_uint) };
        let header = libc::cmsghdr {
            cmsg_len: len as _,
            cmsg_level: libc::SOL_SOCKET,
            cmsg_type: libc::SCM_RIGHTS,
        };
        // SAFETY: c points to the start of our control buffer, which is
        // aligned for cmsghdr (a u64 array) and large enough for it.
        unsafe { c.write(header) };
        // SAFETY: c is the valid header written above.
        let data = unsafe { libc::CMSG_DATA(c) };
        // SAFETY: the buffer holds CMSG_SPACE(payload_len) bytes, so the
        // data area after the header has room for the descriptors; the
        // source is a separate slice.
        unsafe { std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), data, payload_len) };
    }
    loop {
        // SAFETY: msg points to `iov` (borrowed for the call) and, when set,
        // to the control buffer built above; both outlive the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What one [`recv_with_fds`] got.
#[derive(Debug)]
pub struct Received {
    /// Bytes received (0: the peer closed the connection).
    pub len: usize,
    /// Descriptors that came with them (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors that did not fit (MSG_CTRUNC).
    pub truncated: bool,
}

/// One non-blocking `recvmsg` into `buf`, with room for [`SCM_MAX_FD`]
/// descriptors.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = cmsg_buffer(SCM_MAX_FD);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(cmsg.as_slice()) as _;
    let len = loop {
        // SAFETY: msg points to one iovec over `buf` and to the control
        // buffer, both writable and alive for the call.
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
    // SAFETY: msg was filled in by recvmsg; the macro stays inside
    // msg_control/msg_controllen and returns null when there is nothing.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c is non-null and points to a cmsghdr inside the control
        // buffer; read_unaligned makes no alignment assumption.
        let hdr = unsafe { c.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is arithmetic on its argument.
            let data_offset = (unsafe { libc::CMSG_LEN(0) }) as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(data_offset) / size_of::<RawFd>();
            // SAFETY: c points to a valid cmsghdr; CMSG_DATA is its data.
            let data = unsafe { libc::CMSG_DATA(c) };
            // SAFETY: the kernel wrote `count` descriptors after the
            // header, within cmsg_len bytes of our control buffer, which
            // outlives this borrow.
            let bytes = unsafe { std::slice::from_raw_parts(data, count * size_of::<RawFd>()) };
            for chunk in bytes.chunks_exact(size_of::<RawFd>()) {
                let mut b = [0u8; size_of::<RawFd>()];
                b.copy_from_slice(chunk);
                let raw = RawFd::from_ne_bytes(b);
                if raw >= 0 {
                    // SAFETY: the kernel installed this descriptor for us;
                    // nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: msg and c are valid as above.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(Received {
        len,
        fds,
        truncated,
    })
}

/// Wait until one of `fds` is readable (or hung up), for at most
/// `timeout`. Returns which are ready; all false means the time ran out.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let deadline = Instant::now() + timeout;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
        // SAFETY: pfds is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// An eventfd the test owns (an interrupt the server signals, or a
/// doorbell the test rings).
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(EventFd(unsafe { File::from_raw_fd(fd) }))
    }

    /// Wrap a descriptor received from the server (e.g. an ioeventfd).
    pub fn from_owned(fd: OwnedFd) -> EventFd {
        EventFd(File::from(fd))
    }

    /// Read and reset the counter; 0 if it was not signalled.
    pub fn take(&self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        match io::Read::read(&mut &self.0, &mut b) {
            Ok(8) => Ok(u64::from_ne_bytes(b)),
            Ok(n) => Err(io::Error::other(format!("eventfd read {n} bytes"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Add `n` to the counter.
    pub fn signal(&self, n: u64) -> io::Result<()> {
        io::Write::write_all(&mut &self.0, &n.to_ne_bytes())
    }

    /// Wait at most `timeout` for a signal; returns the counter (0 if the
    /// time ran out).
    pub fn wait(&self, timeout: Duration) -> io::Result<u64> {
        poll_readable(&[self.as_fd()], timeout)?;
        self.take()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A memfd of `size` bytes named `name` (visible in `/proc/PID/fd` as
/// `/memfd:NAME (deleted)`), sealed against shrinking if `seal` (as QEMU's
/// guest RAM is when the server may mmap it).
pub fn memfd(name: &str, size: u64, seal: bool) -> io::Result<File> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated name and valid flags; checked below.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if seal {
        // SAFETY: F_ADD_SEALS on our own descriptor with a valid mask.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// Create a FIFO at `path` (mode 0600).
pub fn mkfifo(path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = EventFd::new().unwrap();
        let n = send_with_fds(a.as_fd(), &[IoSlice::new(b"abc")], &[e.as_raw_fd()]).unwrap();
        assert_eq!(n, 3);
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((r.len, r.fds.len(), r.truncated), (3, 1, false));
        assert_eq!(&buf[..3], b"abc");
        // the received descriptor is the same eventfd
        let got = EventFd::from_owned(r.fds.into_iter().next().unwrap());
        got.signal(5).unwrap();
        assert_eq!(e.take().unwrap(), 5);
        assert_eq!(e.take().unwrap(), 0);
    }

    #[test]
    fn recv_would_block_and_eof() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 4];
        let e = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().len, 0);
    }

    #[test]
    fn poll_times_out_and_sees_data() {
        let (a, b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        let r = poll_readable(&[b.as_fd()], Duration::from_millis(20)).unwrap();
        assert_eq!(r, vec![false]);
        assert!(t0.elapsed() >= Duration::from_millis(20));
        send_with_fds(a.as_fd(), &[IoSlice::new(b"x")], &[]).unwrap();
        let r = poll_readable(&[b.as_fd()], Duration::from_secs(10)).unwrap();
        assert_eq!(r, vec![true]);
    }

    #[test]
    fn sealed_memfd_cannot_shrink() {
        let f = memfd("sys-test", 8192, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        assert!(f.set_len(4096).is_err());
        let g = memfd("sys-test", 8192, false).unwrap();
        g.set_len(4096).unwrap();
    }
}
