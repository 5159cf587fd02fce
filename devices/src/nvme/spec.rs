//! NVMe definitions (NVM Express Base Specification 1.4): register offsets,
//! opcodes, status codes, and the submission / completion entry formats.

/// Controller register offsets in BAR0.
pub mod reg {
    /// Controller Capabilities (64 bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// NVM Subsystem Reset.
    pub const NSSR: u64 = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue Base Address (64 bit).
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue Base Address (64 bit).
    pub const ACQ: u64 = 0x30;
    /// Start of the doorbell registers.
    pub const DOORBELLS: u64 = 0x1000;
}

/// CC fields.
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O command set selected (bits 6:4).
    pub fn css(cc: u32) -> u32 {
        (cc >> 4) & 7
    }
    /// Memory page size (bits 10:7): page = 2^(12 + MPS).
    pub fn mps(cc: u32) -> u32 {
        (cc >> 7) & 0xf
    }
    /// Arbitration mechanism (bits 13:11).
    pub fn ams(cc: u32) -> u32 {
        (cc >> 11) & 7
    }
    /// Shutdown notification (bits 15:14).
    pub fn shn(cc: u32) -> u32 {
        (cc >> 14) & 3
    }
    /// I/O submission queue entry size, log2 (bits 19:16).
    pub fn iosqes(cc: u32) -> u32 {
        (cc >> 16) & 0xf
    }
    /// I/O completion queue entry size, log2 (bits 23:20).
    pub fn iocqes(cc: u32) -> u32 {
        (cc >> 20) & 0xf
    }
}

/// CSTS fields.
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown status mask (bits 3:2).
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing occurring.
    pub const SHST_OCCURRING: u32 = 1 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Doorbell Buffer Config.
    pub const DBBUF_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Feature identifiers.
pub mod feat {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MGMT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMP_THRESH: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WC: u8 = 0x06;
    /// Number of Queues.
    pub const NUM_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const IRQ_COALESCE: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const IRQ_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT: u8 = 0x0b;
    /// Keep Alive Timer.
    pub const KATO: u8 = 0x0f;
}

/// Log page identifiers.
pub mod log_page {
    /// Error Information.
    pub const ERROR: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FW_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const CMD_EFFECTS: u8 = 0x05;
}

/// Asynchronous event types (completion dword 0, bits 2:0).
pub mod aer {
    /// Error status.
    pub const TYPE_ERROR: u8 = 0;
    /// SMART / health status.
    pub const TYPE_SMART: u8 = 1;
    /// Notice.
    pub const TYPE_NOTICE: u8 = 2;
    /// Error info: write to an invalid doorbell register.
    pub const ERR_INVALID_DB_REGISTER: u8 = 0x00;
    /// Error info: invalid doorbell write value.
    pub const ERR_INVALID_DB_VALUE: u8 = 0x01;
    /// SMART info: temperature threshold.
    pub const SMART_TEMPERATURE: u8 = 0x01;
    /// Notice info: namespace attribute changed.
    pub const NOTICE_NS_CHANGED: u8 = 0x00;
}

/// A completion status field (15 bits: SC, SCT, CRD, M, DNR), as it appears
/// in bits 31:17 of completion dword 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Status(pub u16);

impl Status {
    const DNR: u16 = 1 << 14;

    const fn generic(sc: u16) -> Status {
        Status(sc | Self::DNR)
    }
    const fn specific(sc: u16) -> Status {
        Status((1 << 8) | sc | Self::DNR)
    }
    const fn media(sc: u16) -> Status {
        Status((2 << 8) | sc)
    }

    /// Successful completion.
    pub const SUCCESS: Status = Status(0);
    /// Invalid command opcode.
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    /// Invalid field in command.
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    /// Internal error (may succeed if retried).
    pub const INTERNAL: Status = Status(0x06);
    /// Command abort requested.
    pub const ABORT_REQUESTED: Status = Status(0x07);
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: Status = Status(0x08);
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
    /// Command sequence error.
    pub const COMMAND_SEQUENCE: Status = Status::generic(0x0c);
    /// Invalid SGL segment descriptor.
    pub const SGL_INVALID_SEGMENT: Status = Status::generic(0x0d);
    /// Invalid number of SGL descriptors.
    pub const SGL_INVALID_COUNT: Status = Status::generic(0x0e);
    /// Data SGL length invalid.
    pub const SGL_INVALID_DATA_LENGTH: Status = Status::generic(0x0f);
    /// SGL descriptor type invalid.
    pub const SGL_INVALID_TYPE: Status = Status::generic(0x11);
    /// PRP offset invalid.
    pub const INVALID_PRP_OFFSET: Status = Status::generic(0x13);
    /// Namespace is write protected.
    pub const NS_WRITE_PROTECTED: Status = Status::generic(0x20);
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    /// Capacity exceeded.
    pub const CAPACITY_EXCEEDED: Status = Status::generic(0x81);

    /// Completion queue invalid.
    pub const CQ_INVALID: Status = Status::specific(0x00);
    /// Invalid queue identifier.
    pub const INVALID_QID: Status = Status::specific(0x01);
    /// Invalid queue size.
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02);
    /// Asynchronous event request limit exceeded.
    pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
    /// Invalid interrupt vector.
    pub const INVALID_VECTOR: Status = Status::specific(0x08);
    /// Invalid log page.
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    /// Invalid queue deletion.
    pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);
    /// Feature identifier not saveable.
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);

    /// Write fault (host I/O error on write; may succeed if retried).
    pub const WRITE_FAULT: Status = Status::media(0x80);
    /// Unrecovered read error (host I/O error on read).
    pub const UNRECOVERED_READ: Status = Status::media(0x81);

    /// Whether this is a success.
    pub fn is_success(self) -> bool {
        self.0 & 0x7ff == 0
    }

    /// Status code (bits 7:0).
    pub fn code(self) -> u8 {
        self.0 as u8
    }

    /// Status code type (bits 10:8).
    pub fn code_type(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & Self::DNR != 0
    }
}

/// Size of a submission queue entry.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry.
pub const CQE_SIZE: usize = 16;
/// log2 of the submission queue entry size.
pub const SQES_LOG2: u32 = 6;
/// log2 of the completion queue entry size.
pub const CQES_LOG2: u32 = 4;

/// PSDT: PRPs.
pub const PSDT_PRP: u8 = 0;

fn le32(b: &[u8; SQE_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8; SQE_SIZE], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// A submission queue entry, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation (bits 9:8 of dword 0).
    pub fuse: u8,
    /// PRP or SGL for data transfer (bits 15:14 of dword 0).
    pub psdt: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer, first half (PRP entry 1, or SGL bytes 0-7).
    pub dptr1: u64,
    /// Data pointer, second half (PRP entry 2, or SGL bytes 8-15).
    pub dptr2: u64,
    /// Command dwords 10 to 15.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

impl Command {
    /// Decode a 64-byte submission queue entry.
    pub fn parse(b: &[u8; SQE_SIZE]) -> Command {
        let dw0 = le32(b, 0);
        Command {
            opcode: dw0 as u8,
            fuse: ((dw0 >> 8) & 3) as u8,
            psdt: ((dw0 >> 14) & 3) as u8,
            cid: (dw0 >> 16) as u16,
            nsid: le32(b, 4),
            mptr: le64(b, 16),
            dptr1: le64(b, 24),
            dptr2: le64(b, 32),
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }

    /// Encode as a 64-byte submission queue entry (for host-side tools and
    /// tests).
    pub fn to_bytes(&self) -> [u8; SQE_SIZE] {
        let mut b = [0u8; SQE_SIZE];
        let dw0 = u32::from(self.opcode)
            | (u32::from(self.fuse & 3) << 8)
            | (u32::from(self.psdt & 3) << 14)
            | (u32::from(self.cid) << 16);
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dptr1.to_le_bytes());
        b[32..40].copy_from_slice(&self.dptr2.to_le_bytes());
        for (i, v) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            b[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The 16-byte data pointer as raw bytes (an SGL descriptor).
    pub fn dptr_bytes(&self) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&self.dptr1.to_le_bytes());
        d[8..].copy_from_slice(&self.dptr2.to_le_bytes());
        d
    }
}

/// A completion queue entry, before the phase tag is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// SQ head pointer.
    pub sqhd: u16,
    /// SQ identifier.
    pub sqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status.
    pub status: Status,
}

impl Completion {
    /// Encode with the given phase tag: bytes 0-11 and dword 3 (which holds
    /// the phase tag and must reach memory last).
    pub fn encode(&self, phase: bool) -> ([u8; 12], u32) {
        let mut head = [0u8; 12];
        head[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        head[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        head[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        head[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        let dw3 = u32::from(self.cid) | (u32::from(phase) << 16) | (u32::from(self.status.0) << 17);
        (head, dw3)
    }

    /// Decode a 16-byte completion entry: the completion and its phase tag.
    pub fn decode(b: &[u8; CQE_SIZE]) -> (Completion, bool) {
        let u = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let dw3 = u(12);
        (
            Completion {
                dw0: u(0),
                dw1: u(4),
                sqhd: u(8) as u16,
                sqid: (u(8) >> 16) as u16,
                cid: dw3 as u16,
                status: Status((dw3 >> 17) as u16),
            },
            dw3 & (1 << 16) != 0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_roundtrip() {
        let c = Command {
            opcode: 0x02,
            fuse: 0,
            psdt: 1,
            cid: 0xbeef,
            nsid: 1,
            mptr: 0x1122,
            dptr1: 0xdead_0000,
            dptr2: 0xfeed_1000,
            cdw10: 10,
            cdw11: 11,
            cdw12: 12,
            cdw13: 13,
            cdw14: 14,
            cdw15: 15,
        };
        assert_eq!(Command::parse(&c.to_bytes()), c);
        assert_eq!(c.to_bytes()[2..4], [0xef, 0xbe]);
    }

    #[test]
    fn completion_layout_matches_the_spec() {
        let c = Completion {
            dw0: 1,
            dw1: 2,
            sqhd: 3,
            sqid: 4,
            cid: 5,
            status: Status::INVALID_QID,
        };
        let (head, dw3) = c.encode(true);
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(&head);
        b[12..].copy_from_slice(&dw3.to_le_bytes());
        // Linux reads the status as le16 at byte 14, shifted right by one.
        let status = u16::from_le_bytes([b[14], b[15]]) >> 1;
        assert_eq!(status, 0x4101);
        assert_eq!(b[14] & 1, 1);
        assert_eq!(Completion::decode(&b), (c, true));
        assert!(Status::LBA_OUT_OF_RANGE.dnr());
        assert!(!Status::WRITE_FAULT.dnr());
        assert_eq!(Status::WRITE_FAULT.code_type(), 2);
        assert!(!Status::INVALID_OPCODE.is_success());
        assert!(Status::SUCCESS.is_success());
    }
}
