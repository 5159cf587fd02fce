//! The crate's error type.
//!
//! Every way a message can be malformed has its own variant, so the server
//! can pick the errno for the reply (in one place, at its protocol edge) and
//! log a precise reason. This crate never picks errno values.

use crate::header::Command;

/// Why a message (or a part of it) could not be parsed or encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the fixed part of a structure needs.
    #[error("{what}: too short: need {need} bytes, got {got}")]
    Short {
        /// The structure being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A body whose length is fixed (or follows from its fields) has a
    /// different length.
    #[error("{what}: wrong length: expected {expected} bytes, got {got}")]
    Length {
        /// The message or structure.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },
    /// The header's message size is below the header's own size.
    #[error("header: message size {0} is smaller than the 16-byte header")]
    MessageSize(u32),
    /// A message larger than `u32::MAX` bytes was to be encoded.
    #[error("message of {0} bytes does not fit the header's 32-bit size")]
    MessageTooLarge(usize),
    /// The command number is not one the protocol defines. The header is
    /// intact, so the receiver can skip the body and answer with an error.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A known command sent in the wrong direction (e.g. a client sending
    /// DMA_READ, which only the server sends).
    #[error("{0:?} is not sent in this direction")]
    WrongDirection(Command),
    /// The header's type bits are neither command (0) nor reply (1).
    #[error("header: unknown message type {0}")]
    MessageType(u32),
    /// Flags with undefined bits set, or bits that are not allowed in this
    /// kind of message.
    #[error("{what}: unknown or misplaced flags {flags:#x}")]
    Flags {
        /// The message or field.
        what: &'static str,
        /// The offending flag bits.
        flags: u32,
    },
    /// An `argsz` below what the message requires.
    #[error("{what}: argsz {argsz} is below the minimum of {min}")]
    Argsz {
        /// The message.
        what: &'static str,
        /// The argsz sent.
        argsz: u32,
        /// The smallest acceptable argsz.
        min: u64,
    },
    /// The data carried does not match the `count` (or `size`) field.
    #[error("{what}: count {count} does not match the {got} data bytes carried")]
    DataLength {
        /// The message.
        what: &'static str,
        /// The count field.
        count: u64,
        /// Data bytes in the message.
        got: usize,
    },
    /// A sum of fields overflows its type.
    #[error("{what}: arithmetic overflow")]
    Overflow {
        /// The fields involved.
        what: &'static str,
    },
    /// A field above a limit this crate enforces.
    #[error("{what}: {value} exceeds the limit of {max}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A field that must be zero (in this form of the message) is not.
    #[error("{what}: {field} must be zero, got {value:#x}")]
    NonZero {
        /// The message.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// VERSION data is not NUL-terminated UTF-8 JSON, or is not an object.
    #[error("version data: {0}")]
    Json(String),
    /// A capability in the VERSION JSON has the wrong type or an
    /// out-of-range value.
    #[error("capability {key}: expected {expected}")]
    Capability {
        /// Dotted path of the key, e.g. `capabilities.max_msg_fds`.
        key: String,
        /// What the value should have been.
        expected: &'static str,
    },
    /// SET_IRQS flags without exactly one DATA and one ACTION flag.
    #[error("SET_IRQS: flags {0:#x} need exactly one DATA and one ACTION flag")]
    IrqFlags(u32),
    /// DEVICE_FEATURE flags with an invalid GET/SET/PROBE combination, or
    /// an operation the feature does not have (e.g. SET of MIGRATION).
    #[error("DEVICE_FEATURE: invalid operation in flags {0:#x}")]
    FeatureOp(u32),
    /// DEVICE_FEATURE for a feature index the protocol does not define.
    #[error("DEVICE_FEATURE: unknown feature {0}")]
    UnknownFeature(u16),
    /// A field whose value the protocol does not define (e.g. an unknown
    /// migration state, a page size that is not a power of two).
    #[error("{what}: invalid value {value:#x}")]
    Value {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A malformed region capability chain.
    #[error("region info capability at offset {offset}: {reason}")]
    CapChain {
        /// Offset of the capability (from the start of the region info).
        offset: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A region capability whose id or version this crate cannot encode.
    #[error("region capability {id} version {version} is not supported")]
    UnsupportedCap {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}
