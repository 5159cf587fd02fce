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

//!
//! # What the clients really do
//!
//! Checked against QEMU 11.1 (sources and, where noted, its wire traffic)
//! and the `vfio_user` crate 0.1.7 (tests in `tests/vfio_user_crate.rs`):
//!
//! * VERSION: QEMU sends 0.0 with `max_msg_fds`, `max_data_xfer_size`,
//!   `pgsizes`, `max_dma_maps`, `migration` and `write_multiple`; the
//!   `vfio_user` crate sends 0.1 with `max_msg_fds`, `max_data_xfer_size`
//!   and `migration.pgsize`, and needs a `capabilities` object in the
//!   reply. QEMU receives the reply into its request's buffer, so the
//!   reply must not be longer than the request ([`Version::encode`] stays
//!   well below).
//! * DMA_MAP: argsz 32, flags READ or READ|WRITE, offset 0 without an fd.
//!   DMA_UNMAP: argsz 24; UNMAP_ALL with address and size 0. The
//!   `vfio_user` crate's client reads a 24-byte DMA_UNMAP reply and would
//!   hang on a shorter one ([`DmaUnmap::encode_reply`] writes it).
//! * DEVICE_GET_INFO: QEMU's argsz is 16, the `vfio_user` crate's 32.
//! * GET_REGION_INFO: both start with argsz 32 and retry with the argsz of
//!   a truncated reply. QEMU fails (EINVAL) a reply with the CAPS flag and
//!   a `cap_offset` outside what it received, so a truncated reply clears
//!   CAPS ([`RegionInfo::encode`]); it accepts at most one fd per reply.
//! * SET_IRQS: argsz 20 and no data bytes for DATA_EVENTFD, `count` the
//!   number of fds sent (none to disarm); QEMU splits the vectors over
//!   several messages when they exceed the server's `max_msg_fds`.
//! * REGION_WRITE_MULTI entries are 24 bytes (offset, region, count, 8
//!   data bytes), at most 200 per message, always NO_REPLY from QEMU.
//! * DMA_READ/DMA_WRITE: QEMU 11.1.3 was checked on the wire (a probe
//!   server, a guest with bus mastering on): it uses the specification's
//!   layout with a 64-bit count and data at byte 16, and answers DMA_WRITE
//!   with 16 bytes (address and 64-bit count). It returns ENODEV while the
//!   guest has not enabled bus mastering.

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
    /// to retry with `needed` bytes. The clients retry and take file
    /// descriptors from the full reply (QEMU closes any that came with the
    /// truncated one), so the server may leave them out here.
    Truncated {
        /// The argsz the full payload needs.
        needed: u32,
    },
}
