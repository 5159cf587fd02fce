//! The vfio-user wire format: every message of the protocol, request and
//! reply, parsed and encoded with checked sizes.
//!
//! The specification is `docs/interop/vfio-user.rst` in QEMU. Each message
//! is a 16-byte [`Header`] and a command-specific body; file descriptors
//! travel out of band (SCM_RIGHTS) and are not seen here. Integers are in
//! host byte order, as the specification says.
//!
//! * The server reads a header with [`Header::parse`], reads
//!   [`Header::body_len`] more bytes (after capping it), and calls
//!   [`parse_request`] to get a checked [`Request`] whose data borrows the
//!   body. Each reply type has an `encode` that appends the reply body;
//!   replies whose size depends on the client's `argsz` take it and say,
//!   with [`Fit`], whether the full payload fitted.
//! * A client encodes requests with [`Request::encode`] and parses replies
//!   with [`parse_reply`].
//! * Server-to-client requests (DMA_READ, DMA_WRITE) are
//!   [`ServerRequest`]s; the client parses them with
//!   [`parse_server_request`], the server parses the replies with
//!   [`parse_dma_reply`].
//!
//! No I/O, no `unsafe`, no panics on any input: every length from the peer
//! is checked, nothing is allocated based on a count the peer sent beyond
//! what the message itself holds, and every malformed message yields a
//! precise [`Error`]. Policy (limits such as `max_data_xfer_size`, valid
//! region indexes) belongs to the receiver.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod dma;
mod error;
pub mod feature;
pub mod header;
pub mod info;
pub mod irq;
pub mod region;
mod request;
pub mod version;
pub mod vfio;
mod wire;

pub use dma::{
    DmaAccess, DmaData, DmaMap, DmaReply, DmaUnmap, DmaUnmapReply, ServerRequest, UnmapKind,
    parse_dma_reply, parse_server_request,
};
pub use error::Error;
pub use feature::{
    DeviceFeature, DeviceFeatureReply, DmaLoggingRange, DmaLoggingReport, DmaLoggingStart,
    FeatureReply, FeatureRequest, MigDataRead, MigDataReadReply, MigDataWrite, MigDeviceState,
    MigState,
};
pub use header::{
    Command, Direction, HEADER_SIZE, Header, MessageKind, command_message, reply_message,
};
pub use info::{
    DeviceInfo, DeviceInfoRequest, IrqInfo, IrqInfoRequest, RegionCap, RegionInfo, RegionInfoReply,
    RegionInfoRequest, RegionIoFds, RegionIoFdsReply, RegionIoFdsRequest, SparseArea, SubRegion,
};
pub use irq::{IrqAction, IrqData, SetIrqs};
pub use region::{RegionAccess, RegionData, WriteMulti, WriteMultiReply};
pub use request::{Reply, Request, parse_reply, parse_request};
pub use version::{Capabilities, MigrationCaps, TwinSocket, Version};

/// Whether a reply with a variable part fitted the client's `argsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fit {
    /// The full payload was written.
    Full,
    /// Only the fixed part was written; its `argsz` field tells the client
    /// to retry with `needed` bytes. File descriptors that belong to the
    /// variable part should not be sent with such a reply.
    Truncated {
        /// The argsz the full payload needs.
        needed: u32,
    },
}
