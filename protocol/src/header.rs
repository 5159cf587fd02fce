//! The 16-byte message header and the command numbers.

use zerocopy::IntoBytes;

use crate::Error;
use crate::wire::{self, RawHeader};

/// Size of the header that starts every message.
pub const HEADER_SIZE: usize = 16;

/// Header flags: mask of the message type bits.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: a command (request).
pub const FLAG_TYPE_COMMAND: u32 = 0x0;
/// Message type: a reply.
pub const FLAG_TYPE_REPLY: u32 = 0x1;
/// Header flag: the sender wants no reply (commands only).
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: the reply reports an error in the error field.
pub const FLAG_ERROR: u32 = 1 << 5;

/// Which side sends a command (the reply goes the other way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The client (the VMM) sends the command, the server replies.
    ClientToServer,
    /// The server sends the command, the client replies.
    ServerToClient,
}

/// A vfio-user command, as carried in the header's command field.
///
/// Number 14 (the old VFIO_USER_DIRTY_PAGES) was removed from the
/// specification and is an unknown command here.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// VFIO_USER_VERSION: version and capability negotiation.
    Version = 1,
    /// VFIO_USER_DMA_MAP: make client memory available for DMA.
    DmaMap = 2,
    /// VFIO_USER_DMA_UNMAP: withdraw client memory.
    DmaUnmap = 3,
    /// VFIO_USER_DEVICE_GET_INFO.
    DeviceGetInfo = 4,
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo = 5,
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS.
    DeviceGetRegionIoFds = 6,
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo = 7,
    /// VFIO_USER_DEVICE_SET_IRQS.
    DeviceSetIrqs = 8,
    /// VFIO_USER_REGION_READ.
    RegionRead = 9,
    /// VFIO_USER_REGION_WRITE.
    RegionWrite = 10,
    /// VFIO_USER_DMA_READ (server to client).
    DmaRead = 11,
    /// VFIO_USER_DMA_WRITE (server to client).
    DmaWrite = 12,
    /// VFIO_USER_DEVICE_RESET.
    DeviceReset = 13,
    /// VFIO_USER_REGION_WRITE_MULTI.
    RegionWriteMulti = 15,
    /// VFIO_USER_DEVICE_FEATURE.
    DeviceFeature = 16,
    /// VFIO_USER_MIG_DATA_READ.
    MigDataRead = 17,
    /// VFIO_USER_MIG_DATA_WRITE.
    MigDataWrite = 18,
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 17] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    /// Who sends this command.
    pub fn direction(self) -> Direction {
        match self {
            Command::DmaRead | Command::DmaWrite => Direction::ServerToClient,
            _ => Direction::ClientToServer,
        }
    }

    /// The specification's name, e.g. `VFIO_USER_DMA_MAP`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VFIO_USER_VERSION",
            Command::DmaMap => "VFIO_USER_DMA_MAP",
            Command::DmaUnmap => "VFIO_USER_DMA_UNMAP",
            Command::DeviceGetInfo => "VFIO_USER_DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "VFIO_USER_DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "VFIO_USER_DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "VFIO_USER_DEVICE_SET_IRQS",
            Command::RegionRead => "VFIO_USER_REGION_READ",
            Command::RegionWrite => "VFIO_USER_REGION_WRITE",
            Command::DmaRead => "VFIO_USER_DMA_READ",
            Command::DmaWrite => "VFIO_USER_DMA_WRITE",
            Command::DeviceReset => "VFIO_USER_DEVICE_RESET",
            Command::RegionWriteMulti => "VFIO_USER_REGION_WRITE_MULTI",
            Command::DeviceFeature => "VFIO_USER_DEVICE_FEATURE",
            Command::MigDataRead => "VFIO_USER_MIG_DATA_READ",
            Command::MigDataWrite => "VFIO_USER_MIG_DATA_WRITE",
        }
    }
}

impl TryFrom<u16> for Command {
    type Error = Error;

    /// Fails with [`Error::UnknownCommand`] carrying the raw number.
    fn try_from(raw: u16) -> Result<Self, Error> {
        Ok(match raw {
            1 => Command::Version,
            2 => Command::DmaMap,
            3 => Command::DmaUnmap,
            4 => Command::DeviceGetInfo,
            5 => Command::DeviceGetRegionInfo,
            6 => Command::DeviceGetRegionIoFds,
            7 => Command::DeviceGetIrqInfo,
            8 => Command::DeviceSetIrqs,
            9 => Command::RegionRead,
            10 => Command::RegionWrite,
            11 => Command::DmaRead,
            12 => Command::DmaWrite,
            13 => Command::DeviceReset,
            15 => Command::RegionWriteMulti,
            16 => Command::DeviceFeature,
            17 => Command::MigDataRead,
            18 => Command::MigDataWrite,
            _ => return Err(Error::UnknownCommand(raw)),
        })
    }
}

impl From<Command> for u16 {
    fn from(command: Command) -> u16 {
        command as u16
    }
}

/// Whether a message is a command or a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A command (request); `no_reply` says whether it wants a reply.
    Command {
        /// The sender wants no reply.
        no_reply: bool,
    },
    /// A reply; `error` says whether it reports an error.
    Reply {
        /// The reply carries an error (in [`Header::error`]).
        error: bool,
    },
}

/// The header of a message, fields as on the wire.
///
/// [`Header::parse`] checks only what framing needs (the size covers the
/// header). Use [`Header::kind`] to validate the flags and
/// [`Header::command`] to decode the command; both leave the header usable
/// for an error reply and for skipping the body when they fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Header {
    /// Message id, chosen by the sender of a command, echoed in its reply.
    pub msg_id: u16,
    /// Command number (see [`Command`]); kept raw so an unknown command can
    /// still be answered.
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Type, no-reply and error flags.
    pub flags: u32,
    /// Errno of an error reply (reserved in commands).
    pub error: u32,
}

impl Header {
    /// Parse the header at the start of `bytes` (which may hold more).
    /// Fails if fewer than [`HEADER_SIZE`] bytes are given or if the
    /// message size is below [`HEADER_SIZE`]; after such an error the
    /// stream cannot be framed any more.
    pub fn parse(bytes: &[u8]) -> Result<Header, Error> {
        let (raw, _) = wire::read::<RawHeader>(bytes, "header")?;
        if (raw.size as usize) < HEADER_SIZE {
            return Err(Error::MessageSize(raw.size));
        }
        Ok(Header {
            msg_id: raw.id,
            command: raw.command,
            size: raw.size,
            flags: raw.flags,
            error: raw.error,
        })
    }

    /// The header's 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let raw = RawHeader {
            id: self.msg_id,
            command: self.command,
            size: self.size,
            flags: self.flags,
            error: self.error,
        };
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// A command header for a body of `body_len` bytes.
    pub fn command_message(
        msg_id: u16,
        command: Command,
        body_len: usize,
        no_reply: bool,
    ) -> Result<Header, Error> {
        Ok(Header {
            msg_id,
            command: command.into(),
            size: message_size(body_len)?,
            flags: FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 },
            error: 0,
        })
    }

    /// The header of a successful reply to this command, for a body of
    /// `body_len` bytes.
    pub fn reply(&self, body_len: usize) -> Result<Header, Error> {
        Ok(Header {
            msg_id: self.msg_id,
            command: self.command,
            size: message_size(body_len)?,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        })
    }

    /// The header of an error reply to this command: no body, the error
    /// flag and `errno` set.
    pub fn error_reply(&self, errno: u32) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno,
        }
    }

    /// Number of body bytes that follow the header.
    pub fn body_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Decode the command number.
    pub fn command(&self) -> Result<Command, Error> {
        Command::try_from(self.command)
    }

    /// Validate the flags: the type must be command or reply, no undefined
    /// bit may be set, NO_REPLY only on commands and ERROR only on replies.
    pub fn kind(&self) -> Result<MessageKind, Error> {
        let known = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;
        if self.flags & !known != 0 {
            return Err(Error::Flags {
                what: "header",
                flags: self.flags & !known,
            });
        }
        let no_reply = self.flags & FLAG_NO_REPLY != 0;
        let error = self.flags & FLAG_ERROR != 0;
        match self.flags & FLAG_TYPE_MASK {
            FLAG_TYPE_COMMAND if !error => Ok(MessageKind::Command { no_reply }),
            FLAG_TYPE_REPLY if !no_reply => Ok(MessageKind::Reply { error }),
            FLAG_TYPE_COMMAND => Err(Error::Flags {
                what: "header of a command",
                flags: FLAG_ERROR,
            }),
            FLAG_TYPE_REPLY => Err(Error::Flags {
                what: "header of a reply",
                flags: FLAG_NO_REPLY,
            }),
            other => Err(Error::MessageType(other)),
        }
    }

    /// The type bits say reply (other flags unchecked).
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY
    }

    /// The NO_REPLY bit is set.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// The ERROR bit is set.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// The header size field for a body of `body_len` bytes.
fn message_size(body_len: usize) -> Result<u32, Error> {
    body_len
        .checked_add(HEADER_SIZE)
        .and_then(|size| u32::try_from(size).ok())
        .ok_or(Error::MessageTooLarge(body_len))
}

/// A whole command message: header and `body`.
pub fn command_message(
    msg_id: u16,
    command: Command,
    no_reply: bool,
    body: &[u8],
) -> Result<Vec<u8>, Error> {
    let header = Header::command_message(msg_id, command, body.len(), no_reply)?;
    Ok(join(&header, body))
}

/// A whole successful reply to the command with header `request`: header
/// and `body`.
pub fn reply_message(request: &Header, body: &[u8]) -> Result<Vec<u8>, Error> {
    let header = request.reply(body.len())?;
    Ok(join(&header, body))
}

fn join(header: &Header, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE.saturating_add(body.len()));
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
    out
}

// Byte vectors are little-endian, as on the x86 and arm64 hosts QEMU runs
// on (the wire format is host-endian).
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// The header of QEMU's first message: VERSION, id 0, 199 bytes (16 +
    /// 4 + 178 bytes of JSON + NUL).
    const QEMU_VERSION_HEADER: [u8; 16] = [
        0x00, 0x00, // msg_id = 0
        0x01, 0x00, // command = VERSION
        0xc7, 0x00, 0x00, 0x00, // size = 199
        0x00, 0x00, 0x00, 0x00, // flags = command
        0x00, 0x00, 0x00, 0x00, // error = 0
    ];

    #[test]
    fn parses_a_command_header() {
        let h = Header::parse(&QEMU_VERSION_HEADER).unwrap();
        assert_eq!(
            h,
            Header {
                msg_id: 0,
                command: 1,
                size: 199,
                flags: 0,
                error: 0
            }
        );
        assert_eq!(h.body_len(), 183);
        assert_eq!(h.command(), Ok(Command::Version));
        assert_eq!(h.kind(), Ok(MessageKind::Command { no_reply: false }));
        assert_eq!(h.encode(), QEMU_VERSION_HEADER);
    }

    #[test]
    fn parse_reads_only_the_first_16_bytes() {
        let mut bytes = QEMU_VERSION_HEADER.to_vec();
        bytes.extend_from_slice(&[0xff; 8]);
        assert_eq!(Header::parse(&bytes).unwrap().size, 199);
    }

    #[test]
    fn rejects_a_short_header() {
        assert_eq!(
            Header::parse(&QEMU_VERSION_HEADER[..15]),
            Err(Error::Short {
                what: "header",
                need: 16,
                got: 15
            })
        );
        assert!(matches!(
            Header::parse(&[]),
            Err(Error::Short { got: 0, .. })
        ));
    }

    #[test]
    fn rejects_a_size_below_the_header() {
        let mut bytes = QEMU_VERSION_HEADER;
        bytes[4] = 15;
        assert_eq!(Header::parse(&bytes), Err(Error::MessageSize(15)));
        bytes[4] = 0;
        assert_eq!(Header::parse(&bytes), Err(Error::MessageSize(0)));
        bytes[4] = 16;
        assert_eq!(Header::parse(&bytes).unwrap().body_len(), 0);
    }

    #[test]
    fn posted_write_header_has_no_reply() {
        let bytes = [
            0x07, 0x01, // msg_id = 0x107
            0x0a, 0x00, // command = REGION_WRITE
            0x24, 0x00, 0x00, 0x00, // size = 36
            0x10, 0x00, 0x00, 0x00, // flags = NO_REPLY
            0x00, 0x00, 0x00, 0x00, // error
        ];
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.msg_id, 0x107);
        assert_eq!(h.command(), Ok(Command::RegionWrite));
        assert!(h.no_reply());
        assert!(!h.is_reply());
        assert_eq!(h.kind(), Ok(MessageKind::Command { no_reply: true }));
    }

    #[test]
    fn reply_headers() {
        let request = Header::parse(&QEMU_VERSION_HEADER).unwrap();
        let reply = request.reply(124).unwrap();
        assert_eq!(
            reply.encode(),
            [
                0x00, 0x00, // msg_id echoed
                0x01, 0x00, // command echoed
                0x8c, 0x00, 0x00, 0x00, // size = 16 + 124
                0x01, 0x00, 0x00, 0x00, // flags = reply
                0x00, 0x00, 0x00, 0x00, // error = 0
            ]
        );
        assert_eq!(reply.kind(), Ok(MessageKind::Reply { error: false }));
        let error = request.error_reply(22);
        assert_eq!(
            error.encode(),
            [
                0x00, 0x00, // msg_id echoed
                0x01, 0x00, // command echoed
                0x10, 0x00, 0x00, 0x00, // size = 16
                0x21, 0x00, 0x00, 0x00, // flags = reply | error
                0x16, 0x00, 0x00, 0x00, // error = EINVAL
            ]
        );
        assert_eq!(error.kind(), Ok(MessageKind::Reply { error: true }));
        assert!(error.is_error() && error.is_reply());
    }

    #[test]
    fn kind_rejects_bad_flags() {
        let h = |flags| Header {
            flags,
            size: 16,
            ..Default::default()
        };
        assert_eq!(h(0x2).kind(), Err(Error::MessageType(2)));
        assert_eq!(h(0xf).kind(), Err(Error::MessageType(0xf)));
        assert_eq!(
            h(0x40).kind(),
            Err(Error::Flags {
                what: "header",
                flags: 0x40
            })
        );
        assert_eq!(
            h(0x8000_0001).kind(),
            Err(Error::Flags {
                what: "header",
                flags: 0x8000_0000
            })
        );
        assert_eq!(
            h(FLAG_ERROR).kind(),
            Err(Error::Flags {
                what: "header of a command",
                flags: FLAG_ERROR
            })
        );
        assert_eq!(
            h(FLAG_TYPE_REPLY | FLAG_NO_REPLY).kind(),
            Err(Error::Flags {
                what: "header of a reply",
                flags: FLAG_NO_REPLY
            })
        );
    }

    #[test]
    fn command_numbers() {
        for (raw, command) in [
            (1, Command::Version),
            (2, Command::DmaMap),
            (3, Command::DmaUnmap),
            (4, Command::DeviceGetInfo),
            (5, Command::DeviceGetRegionInfo),
            (6, Command::DeviceGetRegionIoFds),
            (7, Command::DeviceGetIrqInfo),
            (8, Command::DeviceSetIrqs),
            (9, Command::RegionRead),
            (10, Command::RegionWrite),
            (11, Command::DmaRead),
            (12, Command::DmaWrite),
            (13, Command::DeviceReset),
            (15, Command::RegionWriteMulti),
            (16, Command::DeviceFeature),
            (17, Command::MigDataRead),
            (18, Command::MigDataWrite),
        ] {
            assert_eq!(Command::try_from(raw), Ok(command));
            assert_eq!(u16::from(command), raw);
            assert!(command.name().starts_with("VFIO_USER_"));
        }
        for raw in [0, 14, 19, 0x8000, 0xffff] {
            assert_eq!(Command::try_from(raw), Err(Error::UnknownCommand(raw)));
        }
    }

    #[test]
    fn unknown_command_keeps_the_header_usable() {
        let bytes = [
            0x05, 0x00, // msg_id = 5
            0x0e, 0x00, // command = 14 (the removed DIRTY_PAGES)
            0x18, 0x00, 0x00, 0x00, // size = 24
            0x00, 0x00, 0x00, 0x00, // flags = command
            0x00, 0x00, 0x00, 0x00, // error
        ];
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(h.command(), Err(Error::UnknownCommand(14)));
        assert_eq!(h.body_len(), 8);
        assert_eq!(h.error_reply(38).command, 14);
    }

    #[test]
    fn directions() {
        for command in Command::ALL {
            let expected = match command {
                Command::DmaRead | Command::DmaWrite => Direction::ServerToClient,
                _ => Direction::ClientToServer,
            };
            assert_eq!(command.direction(), expected, "{command:?}");
        }
    }

    #[test]
    fn whole_messages() {
        let msg = command_message(3, Command::DeviceReset, false, &[]).unwrap();
        assert_eq!(
            msg,
            [
                0x03, 0x00, // msg_id = 3
                0x0d, 0x00, // command = DEVICE_RESET
                0x10, 0x00, 0x00, 0x00, // size = 16
                0x00, 0x00, 0x00, 0x00, // flags = command
                0x00, 0x00, 0x00, 0x00, // error
            ]
        );
        let request = Header::parse(&msg).unwrap();
        let reply = reply_message(&request, &[0xaa, 0xbb]).unwrap();
        assert_eq!(
            reply,
            [
                0x03, 0x00, // msg_id = 3
                0x0d, 0x00, // command = DEVICE_RESET
                0x12, 0x00, 0x00, 0x00, // size = 18
                0x01, 0x00, 0x00, 0x00, // flags = reply
                0x00, 0x00, 0x00, 0x00, // error
                0xaa, 0xbb, // body
            ]
        );
    }

    #[test]
    fn message_size_must_fit_u32() {
        assert_eq!(
            Header::command_message(0, Command::RegionWrite, usize::MAX, false),
            Err(Error::MessageTooLarge(usize::MAX))
        );
        let limit = u32::MAX as usize - HEADER_SIZE;
        assert_eq!(
            Header::command_message(0, Command::RegionWrite, limit, true)
                .unwrap()
                .size,
            u32::MAX
        );
        assert_eq!(
            Header::default().reply(limit + 1),
            Err(Error::MessageTooLarge(limit + 1))
        );
    }
}
