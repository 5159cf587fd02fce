//! The listening socket of a device server.
//!
//! [`Listener::bind`] creates the socket file with mode 0600 from the start:
//! on Linux, `bind` gives the new file the mode of the socket's own inode
//! (less the umask), so the socket is `fchmod`ed before it is bound and no
//! other user can ever connect to a wider-open file. A leftover socket file
//! that nobody listens on (a server that crashed) is replaced; a socket on
//! which another server answers is refused, and so is a path that is not a
//! socket at all.
//!
//! [`Listener::from_fd`] adopts a listening socket inherited from the
//! parent (`--fd=N` in the vfio-user backend conventions).
//!
//! Dropping a bound listener unlinks its socket file, but only if the path
//! still names the socket this listener created.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Mode of the socket file: the owner only.
pub const SOCKET_MODE: u32 = 0o600;

/// Connections waiting in the backlog while a client is being served.
const BACKLOG: i32 = 16;

/// How [`Listener::bind_with`] creates the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    /// Permission bits of the socket file (0600 by default).
    pub mode: u32,
    /// listen(2) backlog.
    pub backlog: i32,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions {
            mode: SOCKET_MODE,
            backlog: BACKLOG,
        }
    }
}

impl From<&crate::options::ServerOptions> for BindOptions {
    fn from(o: &crate::options::ServerOptions) -> Self {
        BindOptions {
            mode: o.socket_mode & 0o777,
            backlog: i32::try_from(o.listen_backlog).unwrap_or(BACKLOG),
        }
    }
}

/// A listening Unix stream socket, non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Listener {
    sock: UnixListener,
    /// The path we bound and the (device, inode) of the file we created.
    bound: Option<(PathBuf, (u64, u64))>,
}

impl Listener {
    /// Create a listening socket at `path`, replacing a stale socket file
    /// but refusing one a server is listening on.
    pub fn bind(path: &Path) -> Result<Listener, Error> {
        Listener::bind_with(path, &BindOptions::default())
    }

    /// [`Listener::bind`] with a chosen file mode and backlog. The socket
    /// is created with mode 0600 whatever `options.mode` says and widened
    /// to it only once bound, so it is never more open than asked for.
    pub fn bind_with(path: &Path, options: &BindOptions) -> Result<Listener, Error> {
        let display = path.display().to_string();
        let bytes = path.as_os_str().as_bytes();
        // sun_path holds 108 bytes including the terminating NUL.
        if bytes.is_empty() || bytes.len() > 107 || bytes.contains(&0) {
            return Err(Error::PathTooLong(display));
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(Error::NotASocket(display)),
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(Error::SocketInUse(display)),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    log::info!("replacing stale socket {display}");
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io(format!("remove stale {display}"), e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("probe {display}"), e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("stat {display}"), e)),
        }

        let fd = socket()?;
        // SAFETY: fchmod on a descriptor we own; no pointers are involved.
        if unsafe { libc::fchmod(fd.as_raw_fd(), SOCKET_MODE) } != 0 {
            return Err(Error::io("fchmod socket", io::Error::last_os_error()));
        }
        bind_path(&fd, path.as_os_str()).map_err(|e| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                // Someone created the path between our probe and bind.
                Error::SocketInUse(display.clone())
            } else {
                Error::io(format!("bind {display}"), e)
            }
        })?;
        // From here on the file is ours: remove it if anything fails.
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(Error::io(format!("stat {display}"), e));
            }
        };
        let listener = Listener {
            sock: UnixListener::from(fd),
            bound: Some((path.to_path_buf(), (meta.dev(), meta.ino()))),
        };
        // A umask that takes the owner's bits away would make the socket
        // unusable even for its owner; set exactly the mode asked for.
        if meta.permissions().mode() & 0o777 != options.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))
                .map_err(|e| Error::io(format!("chmod {display}"), e))?;
        }
        // SAFETY: listen on a bound socket we own; no pointers.
        if unsafe { libc::listen(listener.sock.as_raw_fd(), options.backlog) } != 0 {
            return Err(Error::io(
                format!("listen on {display}"),
                io::Error::last_os_error(),
            ));
        }
        Ok(listener)
    }

    /// Adopt an inherited listening socket. It must be a Unix stream socket
    /// in the listening state; it is made non-blocking and close-on-exec.
    pub fn from_fd(fd: RawFd) -> Result<Listener, Error> {
        let bad = |reason| Error::BadListenFd { fd, reason };
        if fd < 0 {
            return Err(bad("negative descriptor"));
        }
        // SAFETY: F_GETFD only queries the descriptor table; no pointers.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad("not an open descriptor"));
        }
        // SAFETY: the descriptor is open (checked above); it was handed to
        // this process to own, and the caller passes it here only once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let domain = sockopt(&owned, libc::SO_DOMAIN).map_err(|_| bad("not a socket"))?;
        if domain != libc::AF_UNIX {
            return Err(bad("not a Unix socket"));
        }
        if sockopt(&owned, libc::SO_TYPE).map_err(|_| bad("not a socket"))? != libc::SOCK_STREAM {
            return Err(bad("not a stream socket"));
        }
        if sockopt(&owned, libc::SO_ACCEPTCONN).map_err(|_| bad("not a socket"))? == 0 {
            return Err(bad("not listening"));
        }
        set_cloexec(owned.as_fd()).map_err(|e| Error::io("set FD_CLOEXEC", e))?;
        let sock = UnixListener::from(owned);
        sock.set_nonblocking(true)
            .map_err(|e| Error::io("set O_NONBLOCK", e))?;
        Ok(Listener { sock, bound: None })
    }

    /// The path this listener bound, if it bound one.
    pub fn path(&self) -> Option<&Path> {
        self.bound.as_ref().map(|(p, _)| p.as_path())
    }

    /// Accept one waiting connection, made non-blocking and close-on-exec.
    /// `Ok(None)` when no connection is waiting.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        loop {
            // SAFETY: accept4 with null address pointers (we do not want the
            // peer address) on a listening socket we own.
            let fd = unsafe {
                libc::accept4(
                    self.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor that we own.
                return Ok(Some(unsafe { UnixStream::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                // The peer gave up before we accepted: try the next one.
                Some(libc::ECONNABORTED) | Some(libc::EPROTO) => continue,
                _ => return Err(e),
            }
        }
    }
}

/// The user id of the process at the other end of a connected Unix
/// socket, from SO_PEERCRED (what it was when it connected).
pub fn peer_uid(sock: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is
    // a valid ucred that outlives the call, and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let Some((path, id)) = self.bound.take() else {
            return;
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if (meta.dev(), meta.ino()) == id => {
                if let Err(e) = std::fs::remove_file(&path) {
                    log::warn!("cannot remove socket {}: {e}", path.display());
                }
            }
            // Replaced by someone else, or already gone: not ours to remove.
            _ => {}
        }
    }
}

fn socket() -> Result<OwnedFd, Error> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(Error::io("socket", io::Error::last_os_error()));
    }
    // SAFETY: socket() returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_path(fd: &OwnedFd, path: &OsStr) -> io::Result<()> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    let dst = addr
        .sun_path
        .get_mut(..bytes.len())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
    for (d, s) in dst.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un whose path is NUL-terminated
    // within `len` bytes (the array was zeroed and the path is shorter than
    // it); fd is a socket we own.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockopt(fd: &OwnedFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut val).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; no pointers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn socket_is_created_with_mode_0600_whatever_the_umask() {
        let dir = TempDir::new("listener-mode");
        let path = dir.path().join("s.sock");
        let l = Listener::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(l.path(), Some(path.as_path()));
        drop(l);
        assert!(!path.exists(), "the socket file is removed on drop");
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = TempDir::new("listener-stale");
        let path = dir.path().join("s.sock");
        // A socket file nobody listens on: bind, then close without unlink.
        let old = UnixListener::bind(&path).unwrap();
        drop(old);
        assert!(path.exists());
        let l = Listener::bind(&path).unwrap();
        // The new socket accepts connections.
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().unwrap().is_some());
    }

    #[test]
    fn live_socket_is_refused_and_left_alone() {
        let dir = TempDir::new("listener-live");
        let path = dir.path().join("s.sock");
        let first = Listener::bind(&path).unwrap();
        let err = Listener::bind(&path).unwrap_err();
        assert!(matches!(err, Error::SocketInUse(_)), "{err}");
        assert!(err.to_string().contains("in use"));
        // The first server still works.
        let _c = UnixStream::connect(&path).unwrap();
        assert!(first.accept().unwrap().is_some());
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = TempDir::new("listener-file");
        let path = dir.path().join("s.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = Listener::bind(&path).unwrap_err();
        assert!(matches!(err, Error::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn too_long_path_is_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(Listener::bind(&long), Err(Error::PathTooLong(_))));
    }

    #[test]
    fn drop_does_not_remove_a_socket_that_replaced_ours() {
        let dir = TempDir::new("listener-replaced");
        let path = dir.path().join("s.sock");
        let ours = Listener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let theirs = UnixListener::bind(&path).unwrap();
        drop(ours);
        assert!(path.exists(), "someone else's socket must survive");
        drop(theirs);
    }

    #[test]
    fn inherited_fd_must_be_a_listening_unix_stream_socket() {
        let dir = TempDir::new("listener-fd");
        let path = dir.path().join("s.sock");
        let std_listener = UnixListener::bind(&path).unwrap();
        let fd = OwnedFd::from(std_listener);
        let raw = fd.as_raw_fd();
        std::mem::forget(fd); // ownership passes to from_fd
        let l = Listener::from_fd(raw).unwrap();
        assert_eq!(l.path(), None);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().unwrap().is_some());
        drop(l);
        assert!(path.exists(), "an inherited socket's file is not ours");

        // A connected (not listening) socket is refused.
        let (a, _b) = UnixStream::pair().unwrap();
        let raw = OwnedFd::from(a);
        let n = raw.as_raw_fd();
        std::mem::forget(raw);
        assert!(matches!(
            Listener::from_fd(n),
            Err(Error::BadListenFd {
                reason: "not listening",
                ..
            })
        ));
        // A pipe is refused.
        let mut p = [0i32; 2];
        // SAFETY: p has room for two descriptors.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        assert!(matches!(
            Listener::from_fd(p[0]),
            Err(Error::BadListenFd {
                reason: "not a socket",
                ..
            })
        ));
        // SAFETY: p[1] is ours and open.
        unsafe { libc::close(p[1]) };
        // A descriptor that is not open is refused without being touched.
        assert!(matches!(
            Listener::from_fd(i32::MAX),
            Err(Error::BadListenFd {
                reason: "not an open descriptor",
                ..
            })
        ));
    }

    #[test]
    fn accept_without_waiting_client_returns_none() {
        let dir = TempDir::new("listener-none");
        let l = Listener::bind(&dir.path().join("s.sock")).unwrap();
        assert!(l.accept().unwrap().is_none());
    }
}
