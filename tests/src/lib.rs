//! Wire-level vfio-user test client for black-box tests of vdevd.
//!
//! * [`Client`] speaks vfio-user over a Unix socket: VERSION with any
//!   proposal, every request (typed, or raw bytes for malformed input),
//!   descriptors in both directions, replies with their descriptors,
//!   a timeout on every wait (a hung server fails the test instead of
//!   hanging it), and the server's DMA_READ/DMA_WRITE requests answered
//!   from client memory ([`MessageMemory`]).
//! * [`SharedMemory`] is a memfd the client maps and passes with DMA_MAP.
//! * [`ServerProcess`] starts the `vdevd` binary on a socket in a temporary
//!   directory and reads its open descriptor count, CPU time and log.
//! * [`bench`] measures servers from outside (for `wirebench`).
//! * [`sample`] drives the sample device (config space, MSI-X, DMA engine)
//!   through a client.
//!
//! The black-box suite that uses this crate lives in `server/tests/`
//! (cargo builds the `vdevd` binary for it and passes its path); the
//! benchmark is `src/bin/wirebench.rs`.

pub mod bench;
pub mod client;
pub mod memory;
pub mod process;
pub mod sample;
pub mod sys;

use std::time::Duration;

pub use client::{Client, DmaStats, Message, Proposal};
pub use memory::{MessageMemory, SharedMemory};
pub use process::{ServerProcess, TempDir};
pub use sys::EventFd;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Nothing arrived in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// How long we waited.
        timeout: Duration,
        /// What we waited for.
        what: String,
    },
    /// The server closed the connection (EOF, or ECONNRESET when it closed
    /// with our bytes unread).
    #[error(
        "the server closed the connection ({unread} bytes of a message pending, reset: {reset})"
    )]
    Closed {
        /// Bytes of an incomplete message received before the close.
        unread: usize,
        /// The close came as ECONNRESET rather than EOF.
        reset: bool,
    },
    /// The server answered with an error reply.
    #[error("command {command}: error reply with errno {errno}")]
    Errno {
        /// The command of the request.
        command: u16,
        /// The errno in the reply.
        errno: u32,
    },
    /// A message from the server could not be parsed, or one of ours not
    /// encoded.
    #[error("protocol: {0}")]
    Protocol(#[from] vdevd_protocol::Error),
    /// The server did something a correct server does not.
    #[error("unexpected: {0}")]
    Unexpected(String),
}

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno of an error reply.
    pub fn errno(&self) -> Option<u32> {
        match self {
            Error::Errno { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the server closed the connection.
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. })
    }
}
