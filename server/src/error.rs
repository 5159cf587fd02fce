//! The server's error type and the one place where an error becomes the
//! errno of a reply.
//!
//! Every error reply the server sends goes through [`Error::errno`]; no
//! other code picks errno values. The choices follow what Linux VFIO
//! returns for the same condition where there is one, and what QEMU's
//! vfio-user client does with the value (it hands it to its callers as the
//! return code of the VFIO operation).

use std::io;

use vdevd_devices::dma::DmaError;

/// Why a request failed, a session ended or a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- the session and its framing -----------------------------------
    /// The first message of a connection was not VERSION.
    #[error("the first message must be VERSION, got command {0}")]
    VersionFirst(u16),
    /// VERSION after the handshake completed.
    #[error("VERSION was already negotiated")]
    SecondVersion,
    /// The client proposed a protocol version this server cannot speak.
    #[error("unsupported protocol version {major}.{minor} (this server speaks 0.0)")]
    VersionUnsupported {
        /// Proposed major version.
        major: u16,
        /// Proposed minor version.
        minor: u16,
    },
    /// A capability the client proposed is out of the range the server
    /// accepts.
    #[error("capability {name} = {value} is not acceptable ({reason})")]
    CapabilityRefused {
        /// Capability name.
        name: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A command number the protocol does not define. Linux answers an
    /// unknown ioctl with ENOTTY; vfio-user has no ioctl, and QEMU's own
    /// client answers an unknown server request with ENOSYS, so vdevd does
    /// the same.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A command only the server sends (DMA_READ, DMA_WRITE) came from the
    /// client.
    #[error("command {0} is sent by the server, not the client")]
    ServerOnlyCommand(u16),
    /// A reply whose id matches no request of ours.
    #[error("unexpected reply (id {id}, command {command})")]
    UnexpectedReply {
        /// Message id of the reply.
        id: u16,
        /// Command of the reply.
        command: u16,
    },
    /// The header flags are invalid for a request (reply or error bits on a
    /// request, unknown bits).
    #[error("invalid header flags {0:#x}")]
    BadFlags(u32),
    /// File descriptors came with a command that takes none.
    #[error("command {command} takes no file descriptors, got {count}")]
    UnexpectedFds {
        /// Command number.
        command: u16,
        /// Descriptors received (and closed).
        count: usize,
    },
    /// More descriptors than the command or the negotiated `max_msg_fds`
    /// allow.
    #[error("{count} file descriptors exceed the limit of {max}")]
    TooManyFds {
        /// Descriptors received (and closed).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The kernel truncated the descriptors of a message (MSG_CTRUNC).
    #[error("file descriptors were truncated by the kernel")]
    FdsTruncated,
    /// A descriptor for an interrupt is not an eventfd.
    #[error("file descriptor {0} is not an eventfd")]
    NotEventfd(i32),
    /// A message whose size field is below the 16-byte header.
    #[error("message size {0} is smaller than the header")]
    MessageTooSmall(u32),
    /// A message larger than any valid message under the negotiated limits.
    #[error("message size {size} exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// The size field.
        size: u32,
        /// The limit.
        max: usize,
    },
    /// A count or size above the negotiated `max_data_xfer_size` (or
    /// another limit of the server).
    #[error("{what} of {value} bytes exceeds the limit of {max}")]
    TransferTooLarge {
        /// What was too large.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// An argument the server refuses (beyond what the wire format checks).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is valid but this device or server does not support it.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The request is not valid in the current state (migration state,
    /// dirty logging not started, ...).
    #[error("invalid in the current state: {0}")]
    InvalidState(String),
    /// The client did not complete VERSION in time.
    #[error("no VERSION within {0} ms")]
    HandshakeTimeout(u128),
    /// The client does not read its replies; its output queue is full.
    #[error("output queue over {0} bytes: the client does not read its replies")]
    OutputOverflow(usize),
    /// The client closed the connection.
    #[error("the client closed the connection")]
    Disconnected,

    /// A DEVICE_FEATURE the device does not have (Linux answers ENOTTY).
    #[error("device feature {0} is not supported")]
    FeatureNotSupported(u16),

    // --- errors from the layers below ----------------------------------
    /// A malformed message.
    #[error("malformed message: {0}")]
    Protocol(#[from] vdevd_protocol::Error),
    /// An error from the device model.
    #[error(transparent)]
    Device(#[from] vdevd_devices::Error),
    /// An error from the DMA address space.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },

    /// No device of that name (control socket).
    #[error("no device named {0:?}")]
    NoSuchDevice(String),

    // --- starting a server ---------------------------------------------
    /// Another server is listening on the socket path.
    #[error("{0} is in use by a running server; stop it or choose another socket path")]
    SocketInUse(String),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    /// The path does not fit in a Unix socket address.
    #[error("socket path {0} is too long (at most 107 bytes)")]
    PathTooLong(String),
    /// An inherited descriptor is not a listening Unix stream socket.
    #[error("file descriptor {fd} is not a listening Unix stream socket: {reason}")]
    BadListenFd {
        /// The descriptor.
        fd: i32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Invalid configuration (command line or file).
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno sent to the client for this error: the single place where
    /// that choice is made.
    pub fn errno(&self) -> i32 {
        match self {
            Error::VersionFirst(_)
            | Error::SecondVersion
            | Error::BadFlags(_)
            | Error::UnexpectedFds { .. }
            | Error::TooManyFds { .. }
            | Error::FdsTruncated
            | Error::NotEventfd(_)
            | Error::MessageTooSmall(_)
            | Error::UnexpectedReply { .. }
            | Error::CapabilityRefused { .. }
            | Error::InvalidArgument(_)
            | Error::InvalidState(_) => libc::EINVAL,
            Error::VersionUnsupported { .. } => libc::ENOTSUP,
            Error::UnknownCommand(_) | Error::ServerOnlyCommand(_) => libc::ENOSYS,
            Error::MessageTooLarge { .. } | Error::TransferTooLarge { .. } => libc::E2BIG,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::HandshakeTimeout(_) => libc::ETIMEDOUT,
            Error::OutputOverflow(_) => libc::ENOBUFS,
            Error::Disconnected => libc::ECONNRESET,
            Error::FeatureNotSupported(_) => libc::ENOTTY,
            Error::Protocol(e) => protocol_errno(e),
            Error::Device(e) => device_errno(e),
            Error::Dma(e) => dma_errno(e),
            Error::Io { source, .. } => io_errno(source),
            Error::SocketInUse(_) => libc::EADDRINUSE,
            Error::NotASocket(_) => libc::ENOTSOCK,
            Error::PathTooLong(_) => libc::ENAMETOOLONG,
            Error::BadListenFd { .. } => libc::ENOTSOCK,
            Error::Config(_) => libc::EINVAL,
            Error::NoSuchDevice(_) => libc::ENOENT,
        }
    }
}

/// Malformed messages are EINVAL, with three exceptions: a command or
/// direction that does not exist (ENOSYS, see [`Error::UnknownCommand`]), a
/// feature that does not exist (ENOTTY, as Linux), and a value above a
/// limit (E2BIG).
fn protocol_errno(e: &vdevd_protocol::Error) -> i32 {
    use vdevd_protocol::Error as P;
    match e {
        P::UnknownCommand(_) | P::WrongDirection(_) => libc::ENOSYS,
        P::UnknownFeature(_) => libc::ENOTTY,
        P::TooLarge { .. } | P::MessageTooLarge(_) => libc::E2BIG,
        P::Short { .. }
        | P::Length { .. }
        | P::MessageSize(_)
        | P::MessageType(_)
        | P::Flags { .. }
        | P::Argsz { .. }
        | P::DataLength { .. }
        | P::Overflow { .. }
        | P::NonZero { .. }
        | P::Json(_)
        | P::Capability { .. }
        | P::IrqFlags(_)
        | P::FeatureOp(_)
        | P::Value { .. }
        | P::CapChain { .. }
        | P::UnsupportedCap { .. } => libc::EINVAL,
    }
}

fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().filter(|n| *n > 0).unwrap_or(libc::EIO)
}

/// Errors of the device model. Region and interrupt indexes that do not
/// exist, and accesses outside a region, are EINVAL as in Linux VFIO.
///
/// Binding a device to an address space fails with one errno per cause,
/// the ones Linux VFIO gives for the same conditions: no IOMMU for the
/// device (ENODEV: no IOMMU driver or type), address spaces exhausted
/// (ENOSPC), an address space of another IOMMU type or page sizes (EPERM,
/// as VFIO_GROUP_SET_CONTAINER), a device or group already attached
/// (EBUSY), a device in a bad state such as a group that is not viable
/// (EIO). A failed host VFIO call passes the kernel's errno through.
fn device_errno(e: &vdevd_devices::Error) -> i32 {
    use vdevd_devices::Error as D;
    match e {
        D::NoSuchRegion(_) | D::NoSuchIrq(_) | D::OutOfRange { .. } | D::InvalidArgument(_) => {
            libc::EINVAL
        }
        D::AccessDenied { .. } => libc::EACCES,
        D::Unsupported(_) => libc::ENOTSUP,
        D::Busy(_) => libc::EBUSY,
        D::BadState(_) => libc::EIO,
        D::NoIommu(_) => libc::ENODEV,
        D::AddressSpacesExhausted(_) => libc::ENOSPC,
        D::IncompatibleAddressSpace(_) => libc::EPERM,
        D::Vfio { source, .. } => io_errno(source),
        D::Dma(e) => dma_errno(e),
        D::Io(e) => io_errno(e),
    }
}

/// Errors of the DMA address space.
fn dma_errno(e: &DmaError) -> i32 {
    match e {
        DmaError::Overlap { .. } => libc::EEXIST,
        DmaError::TooManyMappings { .. } | DmaError::TooManyBytes { .. } => libc::ENOSPC,
        DmaError::NotFound { .. } => libc::ENOENT,
        DmaError::InvalidRange { .. }
        | DmaError::Unaligned { .. }
        | DmaError::BeyondFile { .. }
        | DmaError::Logging(_) => libc::EINVAL,
        DmaError::Permission { .. } => libc::EPERM,
        DmaError::Unmapped { .. } => libc::EFAULT,
        DmaError::Mmap(e) => e.raw_os_error().filter(|n| *n > 0).unwrap_or(libc::ENOMEM),
        DmaError::Io(e) => io_errno(e),
        DmaError::Message(_) => libc::EIO,
        DmaError::WouldDeadlock { .. } => libc::EDEADLK,
        DmaError::Mirror { source, .. } => io_errno(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdevd_devices::dma::Prot;

    #[test]
    fn dma_errors_map_to_the_documented_errnos() {
        let cases: Vec<(DmaError, i32)> = vec![
            (DmaError::Overlap { iova: 0, size: 1 }, libc::EEXIST),
            (DmaError::TooManyMappings { limit: 1 }, libc::ENOSPC),
            (DmaError::TooManyBytes { limit: 1 }, libc::ENOSPC),
            (DmaError::NotFound { iova: 0, size: 1 }, libc::ENOENT),
            (DmaError::InvalidRange { iova: 0, size: 0 }, libc::EINVAL),
            (
                DmaError::Unaligned {
                    iova: 1,
                    size: 1,
                    offset: 0,
                    page_size: 4096,
                },
                libc::EINVAL,
            ),
            (
                DmaError::BeyondFile {
                    offset: 0,
                    size: 1,
                    file_size: 0,
                },
                libc::EINVAL,
            ),
            (
                DmaError::Permission {
                    iova: 0,
                    access: "write",
                    prot: Prot::RO,
                },
                libc::EPERM,
            ),
            (DmaError::Unmapped { iova: 0, len: 1 }, libc::EFAULT),
            (DmaError::WouldDeadlock { iova: 0 }, libc::EDEADLK),
            (DmaError::Logging("not started"), libc::EINVAL),
            (
                DmaError::Io(io::Error::from_raw_os_error(libc::ENXIO)),
                libc::ENXIO,
            ),
            (DmaError::Io(io::Error::other("short")), libc::EIO),
            (
                DmaError::Mmap(io::Error::from_raw_os_error(libc::EACCES)),
                libc::EACCES,
            ),
            (
                DmaError::Mirror {
                    iova: 0,
                    size: 1,
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                },
                libc::ENOSPC,
            ),
        ];
        for (e, errno) in cases {
            let text = e.to_string();
            assert_eq!(Error::Dma(e).errno(), errno, "{text}");
        }
    }

    #[test]
    fn device_errors_map_to_the_documented_errnos() {
        use vdevd_devices::Error as D;
        let cases: Vec<(D, i32)> = vec![
            (D::NoSuchRegion(9), libc::EINVAL),
            (D::NoSuchIrq(9), libc::EINVAL),
            (
                D::OutOfRange {
                    region: 0,
                    offset: 0,
                    len: 8,
                    size: 4,
                },
                libc::EINVAL,
            ),
            (
                D::AccessDenied {
                    region: 0,
                    access: "write",
                },
                libc::EACCES,
            ),
            (D::InvalidArgument("x".into()), libc::EINVAL),
            (D::Unsupported("x".into()), libc::ENOTSUP),
            (D::Busy("x".into()), libc::EBUSY),
            (D::BadState("x".into()), libc::EIO),
            (D::NoIommu("x".into()), libc::ENODEV),
            (D::AddressSpacesExhausted("x".into()), libc::ENOSPC),
            (D::IncompatibleAddressSpace("x".into()), libc::EPERM),
            (
                D::Vfio {
                    what: "x".into(),
                    source: io::Error::from_raw_os_error(libc::ENXIO),
                },
                libc::ENXIO,
            ),
            (D::Dma(DmaError::Overlap { iova: 0, size: 1 }), libc::EEXIST),
            (
                D::Io(io::Error::from_raw_os_error(libc::ENOSPC)),
                libc::ENOSPC,
            ),
        ];
        for (e, errno) in cases {
            let text = e.to_string();
            assert_eq!(Error::Device(e).errno(), errno, "{text}");
        }
    }

    #[test]
    fn session_errors_map_to_the_documented_errnos() {
        assert_eq!(Error::UnknownCommand(99).errno(), libc::ENOSYS);
        assert_eq!(Error::ServerOnlyCommand(11).errno(), libc::ENOSYS);
        assert_eq!(Error::VersionFirst(4).errno(), libc::EINVAL);
        assert_eq!(Error::SecondVersion.errno(), libc::EINVAL);
        assert_eq!(Error::TooManyFds { count: 3, max: 1 }.errno(), libc::EINVAL);
        assert_eq!(
            Error::MessageTooLarge { size: 1, max: 0 }.errno(),
            libc::E2BIG
        );
        assert_eq!(
            Error::VersionUnsupported { major: 1, minor: 0 }.errno(),
            libc::ENOTSUP
        );
        assert_eq!(
            Error::Protocol(vdevd_protocol::Error::UnknownFeature(3)).errno(),
            libc::ENOTTY
        );
        assert_eq!(Error::FeatureNotSupported(1).errno(), libc::ENOTTY);
        assert_eq!(
            Error::Protocol(vdevd_protocol::Error::Json("x".into())).errno(),
            libc::EINVAL
        );
        assert_eq!(
            Error::Protocol(vdevd_protocol::Error::TooLarge {
                what: "x",
                value: 2,
                max: 1
            })
            .errno(),
            libc::E2BIG
        );
        // an I/O error without an OS errno still yields a real errno
        assert_eq!(
            Error::io("x", io::Error::other("no errno")).errno(),
            libc::EIO
        );
    }
}
