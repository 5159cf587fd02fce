//! Client memory: VFIO_USER_DMA_MAP and VFIO_USER_DMA_UNMAP (with the
//! dirty-bitmap form) from the client, VFIO_USER_DMA_READ and
//! VFIO_USER_DMA_WRITE from the server.
//!
//! DMA_READ and DMA_WRITE use the specification's layout: `address` (u64),
//! `count` (u64), then the data. QEMU 11.1's client was checked on the wire
//! to read and write this layout (it writes the data at byte 16 of the
//! DMA_READ reply, and answers DMA_WRITE with address and a 64-bit count,
//! 16 bytes, where the specification's table shows a 32-bit count).

use crate::header::Command;
use crate::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
};
use crate::wire::{self, RawBitmap, RawDmaMap, RawDmaUnmap, RawTwoU64, size32};
use crate::{Error, Fit};

/// Size of the DMA_MAP body (`struct vfio_user_dma_map`).
pub const DMA_MAP_SIZE: usize = size_of::<RawDmaMap>();
/// Size of the DMA_UNMAP body without a bitmap.
pub const DMA_UNMAP_SIZE: usize = size_of::<RawDmaUnmap>();
/// Size of `struct vfio_user_bitmap` (pgsize, size) that follows the
/// DMA_UNMAP body in the dirty-bitmap form.
pub const DMA_BITMAP_SIZE: usize = size_of::<RawBitmap>();

/// Size of the DMA_READ / DMA_WRITE fixed part (address, count).
pub const DMA_ACCESS_SIZE: usize = size_of::<RawTwoU64>();

/// True when `[start, start + len)` fits in the 64-bit space (a range may
/// end exactly at 2^64).
pub(crate) fn range_fits(start: u64, len: u64) -> bool {
    len == 0 || start.checked_add(len - 1).is_some()
}

/// A VFIO_USER_DMA_MAP request. The file descriptor, if any, travels out
/// of band; without one the range is reached with DMA_READ/DMA_WRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaMap {
    /// `argsz` as sent (at least [`DMA_MAP_SIZE`]).
    pub argsz: u32,
    /// The server may read the range.
    pub read: bool,
    /// The server may write the range.
    pub write: bool,
    /// Offset of the range in the file descriptor (0 without one).
    pub offset: u64,
    /// Client (IOVA) address of the range.
    pub address: u64,
    /// Size of the range.
    pub size: u64,
}

impl DmaMap {
    /// Parse the body: exactly 32 bytes, argsz at least 32, only the READ
    /// and WRITE flags, and neither `address + size` nor `offset + size`
    /// beyond 2^64.
    pub fn parse(body: &[u8]) -> Result<DmaMap, Error> {
        let raw: RawDmaMap = wire::read_exact(body, "DMA_MAP")?;
        if raw.argsz < size32::<RawDmaMap>() {
            return Err(Error::Argsz {
                what: "DMA_MAP",
                argsz: raw.argsz,
                min: DMA_MAP_SIZE as u64,
            });
        }
        let known = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
        if raw.flags & !known != 0 {
            return Err(Error::Flags {
                what: "DMA_MAP",
                flags: raw.flags & !known,
            });
        }
        if !range_fits(raw.address, raw.size) {
            return Err(Error::Overflow {
                what: "DMA_MAP address + size",
            });
        }
        if !range_fits(raw.offset, raw.size) {
            return Err(Error::Overflow {
                what: "DMA_MAP offset + size",
            });
        }
        Ok(DmaMap {
            argsz: raw.argsz,
            read: raw.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            write: raw.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
            offset: raw.offset,
            address: raw.address,
            size: raw.size,
        })
    }

    /// Append the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if self.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        wire::put(
            out,
            &RawDmaMap {
                argsz: self.argsz,
                flags,
                offset: self.offset,
                address: self.address,
                size: self.size,
            },
        );
    }
}

/// What a DMA_UNMAP request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnmapKind {
    /// Unmap the mapping at `address`/`size` (flags 0).
    Range,
    /// Unmap every mapping (VFIO_DMA_UNMAP_FLAG_ALL; address and size 0).
    All,
    /// Unmap the range and return its dirty bitmap
    /// (VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP).
    DirtyBitmap {
        /// Page size each bit stands for.
        pgsize: u64,
        /// Size in bytes of the bitmap the client expects.
        size: u64,
    },
}

/// A VFIO_USER_DMA_UNMAP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaUnmap {
    /// `argsz`: the largest reply payload the client accepts.
    pub argsz: u32,
    /// Client address of the mapping (0 for [`UnmapKind::All`]).
    pub address: u64,
    /// Size of the mapping (0 for [`UnmapKind::All`]).
    pub size: u64,
    /// Plain, all, or with dirty bitmap.
    pub kind: UnmapKind,
}

impl DmaUnmap {
    /// Parse the body: 24 bytes (40 with the bitmap header for the
    /// dirty-bitmap form), argsz at least 24, flags 0, ALL or
    /// GET_DIRTY_BITMAP alone; ALL needs address and size 0.
    pub fn parse(body: &[u8]) -> Result<DmaUnmap, Error> {
        let (raw, rest) = wire::read::<RawDmaUnmap>(body, "DMA_UNMAP")?;
        if raw.argsz < size32::<RawDmaUnmap>() {
            return Err(Error::Argsz {
                what: "DMA_UNMAP",
                argsz: raw.argsz,
                min: DMA_UNMAP_SIZE as u64,
            });
        }
        let kind = match raw.flags {
            0 => {
                wire::empty(rest, "DMA_UNMAP trailing bytes")?;
                UnmapKind::Range
            }
            VFIO_DMA_UNMAP_FLAG_ALL => {
                wire::empty(rest, "DMA_UNMAP trailing bytes")?;
                if raw.address != 0 {
                    return Err(Error::NonZero {
                        what: "DMA_UNMAP with UNMAP_ALL",
                        field: "address",
                        value: raw.address,
                    });
                }
                if raw.size != 0 {
                    return Err(Error::NonZero {
                        what: "DMA_UNMAP with UNMAP_ALL",
                        field: "size",
                        value: raw.size,
                    });
                }
                UnmapKind::All
            }
            VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP => {
                let bitmap: RawBitmap = wire::read_exact(rest, "DMA_UNMAP bitmap")?;
                UnmapKind::DirtyBitmap {
                    pgsize: bitmap.pgsize,
                    size: bitmap.size,
                }
            }
            flags => {
                return Err(Error::Flags {
                    what: "DMA_UNMAP",
                    flags,
                });
            }
        };
        if !range_fits(raw.address, raw.size) {
            return Err(Error::Overflow {
                what: "DMA_UNMAP address + size",
            });
        }
        Ok(DmaUnmap {
            argsz: raw.argsz,
            address: raw.address,
            size: raw.size,
            kind,
        })
    }

    fn raw(&self, argsz: u32) -> RawDmaUnmap {
        RawDmaUnmap {
            argsz,
            flags: match self.kind {
                UnmapKind::Range => 0,
                UnmapKind::All => VFIO_DMA_UNMAP_FLAG_ALL,
                UnmapKind::DirtyBitmap { .. } => VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            },
            address: self.address,
            size: self.size,
        }
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(out, &self.raw(self.argsz));
        if let UnmapKind::DirtyBitmap { pgsize, size } = self.kind {
            wire::put(out, &RawBitmap { pgsize, size });
        }
    }

    /// Size of the full reply payload: 24 bytes, plus the bitmap header and
    /// the bitmap in the dirty-bitmap form.
    pub fn reply_size(&self) -> Result<u64, Error> {
        match self.kind {
            UnmapKind::DirtyBitmap { size, .. } => ((DMA_UNMAP_SIZE + DMA_BITMAP_SIZE) as u64)
                .checked_add(size)
                .ok_or(Error::Overflow {
                    what: "DMA_UNMAP reply size",
                }),
            _ => Ok(DMA_UNMAP_SIZE as u64),
        }
    }

    /// Append the reply body: the request's entry, with argsz the full
    /// reply size. In the dirty-bitmap form `bitmap` must hold exactly the
    /// `size` bytes the client asked for; when the client's argsz is too
    /// small for them, only the 24-byte entry is written (argsz saying
    /// what is needed) and [`Fit::Truncated`] returned. Other forms take no
    /// bitmap.
    pub fn encode_reply(&self, bitmap: Option<&[u8]>, out: &mut Vec<u8>) -> Result<Fit, Error> {
        let needed = self.reply_size()?;
        let needed32 = u32::try_from(needed).map_err(|_| Error::TooLarge {
            what: "DMA_UNMAP reply size",
            value: needed,
            max: u64::from(u32::MAX),
        })?;
        match (self.kind, bitmap) {
            (UnmapKind::DirtyBitmap { pgsize, size }, Some(bitmap)) => {
                if bitmap.len() as u64 != size {
                    return Err(Error::DataLength {
                        what: "DMA_UNMAP reply bitmap",
                        count: size,
                        got: bitmap.len(),
                    });
                }
                wire::put(out, &self.raw(needed32));
                if self.argsz < needed32 {
                    return Ok(Fit::Truncated { needed: needed32 });
                }
                wire::put(out, &RawBitmap { pgsize, size });
                out.extend_from_slice(bitmap);
                Ok(Fit::Full)
            }
            (UnmapKind::DirtyBitmap { size, .. }, None) => Err(Error::DataLength {
                what: "DMA_UNMAP reply bitmap",
                count: size,
                got: 0,
            }),
            (_, Some(bitmap)) => Err(Error::DataLength {
                what: "DMA_UNMAP reply without bitmap",
                count: 0,
                got: bitmap.len(),
            }),
            (_, None) => {
                wire::put(out, &self.raw(needed32));
                Ok(Fit::Full)
            }
        }
    }
}

/// A parsed VFIO_USER_DMA_UNMAP reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaUnmapReply<'a> {
    /// The size of the full reply payload.
    pub argsz: u32,
    /// The flags echoed.
    pub flags: u32,
    /// Address echoed.
    pub address: u64,
    /// Size echoed.
    pub size: u64,
    /// Page size and bitmap bytes, in a complete dirty-bitmap reply.
    pub bitmap: Option<(u64, &'a [u8])>,
}

impl<'a> DmaUnmapReply<'a> {
    /// Parse a reply: the 24-byte entry, and in the dirty-bitmap form the
    /// bitmap header and exactly `size` bitmap bytes, unless the reply is
    /// truncated (only the entry, argsz larger than 24).
    pub fn parse(body: &'a [u8]) -> Result<DmaUnmapReply<'a>, Error> {
        let (raw, rest) = wire::read::<RawDmaUnmap>(body, "DMA_UNMAP reply")?;
        let bitmap = if raw.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 && !rest.is_empty() {
            let (bitmap, data) = wire::read::<RawBitmap>(rest, "DMA_UNMAP reply bitmap")?;
            if data.len() as u64 != bitmap.size {
                return Err(Error::DataLength {
                    what: "DMA_UNMAP reply bitmap",
                    count: bitmap.size,
                    got: data.len(),
                });
            }
            Some((bitmap.pgsize, data))
        } else {
            wire::empty(rest, "DMA_UNMAP reply trailing bytes")?;
            None
        };
        Ok(DmaUnmapReply {
            argsz: raw.argsz,
            flags: raw.flags,
            address: raw.address,
            size: raw.size,
            bitmap,
        })
    }

    /// The reply holds less than the full payload; retry with this argsz.
    pub fn needed(&self) -> Option<u32> {
        let got = match self.bitmap {
            Some((_, data)) => DMA_UNMAP_SIZE + DMA_BITMAP_SIZE + data.len(),
            None => DMA_UNMAP_SIZE,
        };
        (self.argsz as usize > got).then_some(self.argsz)
    }
}

/// A DMA access without data: the DMA_READ request (server to client)
/// and the DMA_WRITE reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaAccess {
    /// Client (IOVA) address.
    pub address: u64,
    /// Number of bytes.
    pub count: u64,
}

impl DmaAccess {
    /// Parse: exactly 16 bytes; `address + count` within 64 bits.
    pub fn parse(body: &[u8], what: &'static str) -> Result<DmaAccess, Error> {
        let raw: RawTwoU64 = wire::read_exact(body, what)?;
        if !range_fits(raw.a, raw.b) {
            return Err(Error::Overflow { what });
        }
        Ok(DmaAccess {
            address: raw.a,
            count: raw.b,
        })
    }

    /// Parse a DMA_WRITE reply: the 16-byte access as the specification
    /// means it (what QEMU 11.1 and libvfio-user use), the 12-byte form of
    /// the specification's table (32-bit count), or no payload at all (as
    /// older QEMU clients replied). `None` for the empty form.
    pub fn parse_write_reply(body: &[u8]) -> Result<Option<DmaAccess>, Error> {
        match body.len() {
            0 => Ok(None),
            12 => {
                let (address, rest) = wire::read::<u64>(body, "DMA_WRITE reply")?;
                let count: u32 = wire::read_exact(rest, "DMA_WRITE reply")?;
                Ok(Some(DmaAccess {
                    address,
                    count: u64::from(count),
                }))
            }
            _ => DmaAccess::parse(body, "DMA_WRITE reply").map(Some),
        }
    }

    /// Append the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawTwoU64 {
                a: self.address,
                b: self.count,
            },
        );
    }
}

/// A DMA access with data: the DMA_WRITE request (server to client) and
/// the DMA_READ reply. The data is borrowed from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaData<'a> {
    /// Client (IOVA) address.
    pub address: u64,
    /// The data (its length is the `count` field).
    pub data: &'a [u8],
}

impl<'a> DmaData<'a> {
    /// Parse: 16 bytes, then exactly `count` data bytes; `address + count`
    /// within 64 bits.
    pub fn parse(body: &'a [u8], what: &'static str) -> Result<DmaData<'a>, Error> {
        let (raw, data) = wire::read::<RawTwoU64>(body, what)?;
        if data.len() as u64 != raw.b {
            return Err(Error::DataLength {
                what,
                count: raw.b,
                got: data.len(),
            });
        }
        if !range_fits(raw.a, raw.b) {
            return Err(Error::Overflow { what });
        }
        Ok(DmaData {
            address: raw.a,
            data,
        })
    }

    /// The 16 bytes that precede the data (for a vectored write).
    pub fn prefix(&self) -> [u8; DMA_ACCESS_SIZE] {
        let mut out = [0u8; DMA_ACCESS_SIZE];
        let raw = RawTwoU64 {
            a: self.address,
            b: self.data.len() as u64,
        };
        out.copy_from_slice(zerocopy::IntoBytes::as_bytes(&raw));
        out
    }

    /// Append the body (prefix and data).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix());
        out.extend_from_slice(self.data);
    }
}

/// A request from the server to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServerRequest<'a> {
    /// VFIO_USER_DMA_READ: send me `count` bytes at `address`.
    DmaRead(DmaAccess),
    /// VFIO_USER_DMA_WRITE: write this data at `address`.
    DmaWrite(DmaData<'a>),
}

impl ServerRequest<'_> {
    /// The command.
    pub fn command(&self) -> Command {
        match self {
            ServerRequest::DmaRead(_) => Command::DmaRead,
            ServerRequest::DmaWrite(_) => Command::DmaWrite,
        }
    }

    /// Append the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ServerRequest::DmaRead(access) => access.encode(out),
            ServerRequest::DmaWrite(data) => data.encode(out),
        }
    }
}

/// Parse a server-to-client request (client side). Client-to-server
/// commands are [`Error::WrongDirection`].
pub fn parse_server_request(command: Command, body: &[u8]) -> Result<ServerRequest<'_>, Error> {
    match command {
        Command::DmaRead => Ok(ServerRequest::DmaRead(DmaAccess::parse(body, "DMA_READ")?)),
        Command::DmaWrite => Ok(ServerRequest::DmaWrite(DmaData::parse(body, "DMA_WRITE")?)),
        other => Err(Error::WrongDirection(other)),
    }
}

/// A client's reply to a server-to-client request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DmaReply<'a> {
    /// DMA_READ reply: the data read.
    Read(DmaData<'a>),
    /// DMA_WRITE reply: the access echoed, if the client sent it.
    Write(Option<DmaAccess>),
}

/// Parse the client's reply to a DMA_READ or DMA_WRITE (server side);
/// other commands are [`Error::WrongDirection`]. The server compares the
/// address and count with what it asked.
pub fn parse_dma_reply(command: Command, body: &[u8]) -> Result<DmaReply<'_>, Error> {
    match command {
        Command::DmaRead => Ok(DmaReply::Read(DmaData::parse(body, "DMA_READ reply")?)),
        Command::DmaWrite => Ok(DmaReply::Write(DmaAccess::parse_write_reply(body)?)),
        other => Err(Error::WrongDirection(other)),
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// DMA_MAP as QEMU's `vfio_user_dma_map` lays it out for RAM at
    /// 0x100000 (1 MiB) backed by a memfd at file offset 0x100000.
    const QEMU_MAP: [u8; 32] = [
        0x20, 0x00, 0x00, 0x00, // argsz = sizeof(vfio_iommu_type1_dma_map) = 32
        0x03, 0x00, 0x00, 0x00, // flags = READ | WRITE
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x100000
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0x100000
        0x00, 0x00, 0xf0, 0x1f, 0x00, 0x00, 0x00, 0x00, // size = 0x1ff00000
    ];

    #[test]
    fn parses_qemus_map() {
        let m = DmaMap::parse(&QEMU_MAP).unwrap();
        assert_eq!(
            m,
            DmaMap {
                argsz: 32,
                read: true,
                write: true,
                offset: 0x10_0000,
                address: 0x10_0000,
                size: 0x1ff0_0000
            }
        );
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out, QEMU_MAP);
    }

    #[test]
    fn parses_a_read_only_map_without_fd() {
        // QEMU maps ROM read-only, without an fd (offset 0).
        let bytes = [
            0x20, 0x00, 0x00, 0x00, // argsz = 32
            0x01, 0x00, 0x00, 0x00, // flags = READ
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0
            0x00, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0xc0000
            0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x20000
        ];
        let m = DmaMap::parse(&bytes).unwrap();
        assert!(m.read && !m.write);
        assert_eq!((m.address, m.size, m.offset), (0xc0000, 0x20000, 0));
    }

    #[test]
    fn map_rejects_bad_input() {
        let mut b = QEMU_MAP;
        b[0] = 31; // argsz = 31
        assert_eq!(
            DmaMap::parse(&b),
            Err(Error::Argsz {
                what: "DMA_MAP",
                argsz: 31,
                min: 32
            })
        );
        let mut b = QEMU_MAP;
        b[4] = 0x07; // flags = READ | WRITE | bit 2
        assert_eq!(
            DmaMap::parse(&b),
            Err(Error::Flags {
                what: "DMA_MAP",
                flags: 4
            })
        );
        assert!(matches!(
            DmaMap::parse(&QEMU_MAP[..31]),
            Err(Error::Short {
                need: 32,
                got: 31,
                ..
            })
        ));
        let mut long = QEMU_MAP.to_vec();
        long.push(0);
        assert_eq!(
            DmaMap::parse(&long),
            Err(Error::Length {
                what: "DMA_MAP",
                expected: 32,
                got: 33
            })
        );
        // address + size beyond 2^64.
        let mut b = QEMU_MAP;
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            DmaMap::parse(&b),
            Err(Error::Overflow {
                what: "DMA_MAP address + size"
            })
        );
        // offset + size beyond 2^64.
        let mut b = QEMU_MAP;
        b[8..16].copy_from_slice(&(u64::MAX - 0x1000).to_le_bytes());
        assert_eq!(
            DmaMap::parse(&b),
            Err(Error::Overflow {
                what: "DMA_MAP offset + size"
            })
        );
    }

    #[test]
    fn map_may_end_at_the_top_of_the_address_space() {
        let mut b = QEMU_MAP;
        b[8..16].copy_from_slice(&0u64.to_le_bytes());
        b[16..24].copy_from_slice(&0xffff_ffff_ffff_f000u64.to_le_bytes());
        b[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(DmaMap::parse(&b).unwrap().address, 0xffff_ffff_ffff_f000);
    }

    /// DMA_UNMAP as QEMU sends it.
    const QEMU_UNMAP: [u8; 24] = [
        0x18, 0x00, 0x00, 0x00, // argsz = sizeof(vfio_iommu_type1_dma_unmap) = 24
        0x00, 0x00, 0x00, 0x00, // flags = 0
        0x00, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0xc0000
        0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x20000
    ];

    #[test]
    fn parses_qemus_unmap_and_encodes_the_reply() {
        let u = DmaUnmap::parse(&QEMU_UNMAP).unwrap();
        assert_eq!(
            u,
            DmaUnmap {
                argsz: 24,
                address: 0xc0000,
                size: 0x20000,
                kind: UnmapKind::Range
            }
        );
        let mut out = Vec::new();
        u.encode(&mut out);
        assert_eq!(out, QEMU_UNMAP);
        // The reply echoes the entry; the vfio_user crate reads exactly
        // these 24 bytes.
        let mut reply = Vec::new();
        assert_eq!(u.encode_reply(None, &mut reply), Ok(Fit::Full));
        assert_eq!(reply, QEMU_UNMAP);
        let parsed = DmaUnmapReply::parse(&reply).unwrap();
        assert_eq!(
            (parsed.address, parsed.size, parsed.bitmap),
            (0xc0000, 0x20000, None)
        );
        assert_eq!(parsed.needed(), None);
    }

    #[test]
    fn parses_unmap_all() {
        let bytes = [
            0x18, 0x00, 0x00, 0x00, // argsz = 24
            0x02, 0x00, 0x00, 0x00, // flags = UNMAP_ALL
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0
        ];
        let u = DmaUnmap::parse(&bytes).unwrap();
        assert_eq!(u.kind, UnmapKind::All);
        let mut reply = Vec::new();
        assert_eq!(u.encode_reply(None, &mut reply), Ok(Fit::Full));
        assert_eq!(reply, bytes);
        let mut b = bytes;
        b[8] = 1; // iova = 1
        assert_eq!(
            DmaUnmap::parse(&b),
            Err(Error::NonZero {
                what: "DMA_UNMAP with UNMAP_ALL",
                field: "address",
                value: 1
            })
        );
        let mut b = bytes;
        b[23] = 0x80; // size = 1 << 63
        assert_eq!(
            DmaUnmap::parse(&b),
            Err(Error::NonZero {
                what: "DMA_UNMAP with UNMAP_ALL",
                field: "size",
                value: 1 << 63
            })
        );
    }

    /// DMA_UNMAP in the dirty-bitmap form, as libvfio-user's
    /// `struct vfio_user_dma_unmap` with one `struct vfio_user_bitmap`.
    const DIRTY_UNMAP: [u8; 40] = [
        0x30, 0x00, 0x00, 0x00, // argsz = 24 + 16 + 8
        0x01, 0x00, 0x00, 0x00, // flags = GET_DIRTY_BITMAP
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0x100000
        0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x40000 (64 pages)
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // bitmap.pgsize = 4096
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // bitmap.size = 8
    ];

    #[test]
    fn dirty_bitmap_unmap() {
        let u = DmaUnmap::parse(&DIRTY_UNMAP).unwrap();
        assert_eq!(
            u,
            DmaUnmap {
                argsz: 48,
                address: 0x10_0000,
                size: 0x4_0000,
                kind: UnmapKind::DirtyBitmap {
                    pgsize: 4096,
                    size: 8
                }
            }
        );
        let mut out = Vec::new();
        u.encode(&mut out);
        assert_eq!(out, DIRTY_UNMAP);
        assert_eq!(u.reply_size(), Ok(48));

        let bitmap = [0x05, 0, 0, 0, 0, 0, 0, 0x80];
        let mut reply = Vec::new();
        assert_eq!(u.encode_reply(Some(&bitmap), &mut reply), Ok(Fit::Full));
        let mut expected = DIRTY_UNMAP.to_vec();
        expected.extend_from_slice(&bitmap);
        assert_eq!(reply, expected);
        let parsed = DmaUnmapReply::parse(&reply).unwrap();
        assert_eq!(parsed.bitmap, Some((4096, &bitmap[..])));
        assert_eq!(parsed.needed(), None);
    }

    #[test]
    fn dirty_bitmap_reply_truncated_to_argsz() {
        let mut b = DIRTY_UNMAP;
        b[0] = 24; // argsz = 24: room for the entry only
        let u = DmaUnmap::parse(&b).unwrap();
        let mut reply = Vec::new();
        assert_eq!(
            u.encode_reply(Some(&[0xff; 8]), &mut reply),
            Ok(Fit::Truncated { needed: 48 })
        );
        assert_eq!(
            reply,
            [
                0x30, 0x00, 0x00, 0x00, // argsz = 48 needed
                0x01, 0x00, 0x00, 0x00, // flags = GET_DIRTY_BITMAP
                0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // iova
                0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, // size
            ]
        );
        let parsed = DmaUnmapReply::parse(&reply).unwrap();
        assert_eq!(parsed.bitmap, None);
        assert_eq!(parsed.needed(), Some(48));
    }

    #[test]
    fn unmap_rejects_bad_input() {
        let mut b = QEMU_UNMAP;
        b[0] = 23;
        assert_eq!(
            DmaUnmap::parse(&b),
            Err(Error::Argsz {
                what: "DMA_UNMAP",
                argsz: 23,
                min: 24
            })
        );
        for flags in [3u8, 4, 0x80] {
            let mut b = QEMU_UNMAP;
            b[4] = flags;
            assert_eq!(
                DmaUnmap::parse(&b),
                Err(Error::Flags {
                    what: "DMA_UNMAP",
                    flags: u32::from(flags)
                })
            );
        }
        // Dirty-bitmap form without the bitmap struct, or with a short one.
        let mut b = QEMU_UNMAP;
        b[4] = 1;
        assert!(matches!(
            DmaUnmap::parse(&b),
            Err(Error::Short {
                need: 16,
                got: 0,
                ..
            })
        ));
        assert!(matches!(
            DmaUnmap::parse(&DIRTY_UNMAP[..39]),
            Err(Error::Short {
                need: 16,
                got: 15,
                ..
            })
        ));
        // Trailing bytes.
        let mut long = DIRTY_UNMAP.to_vec();
        long.push(0);
        assert!(matches!(DmaUnmap::parse(&long), Err(Error::Length { .. })));
        let mut long = QEMU_UNMAP.to_vec();
        long.extend_from_slice(&[0; 16]);
        assert!(matches!(DmaUnmap::parse(&long), Err(Error::Length { .. })));
        // address + size beyond 2^64.
        let mut b = QEMU_UNMAP;
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            DmaUnmap::parse(&b),
            Err(Error::Overflow {
                what: "DMA_UNMAP address + size"
            })
        );
    }

    #[test]
    fn unmap_reply_needs_the_right_bitmap() {
        let dirty = DmaUnmap::parse(&DIRTY_UNMAP).unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            dirty.encode_reply(Some(&[0; 7]), &mut out),
            Err(Error::DataLength {
                count: 8,
                got: 7,
                ..
            })
        ));
        assert!(matches!(
            dirty.encode_reply(None, &mut out),
            Err(Error::DataLength {
                count: 8,
                got: 0,
                ..
            })
        ));
        let plain = DmaUnmap::parse(&QEMU_UNMAP).unwrap();
        assert!(matches!(
            plain.encode_reply(Some(&[0; 8]), &mut out),
            Err(Error::DataLength {
                count: 0,
                got: 8,
                ..
            })
        ));
        assert!(out.is_empty());
        // A bitmap size that overflows the reply size.
        let huge = DmaUnmap {
            kind: UnmapKind::DirtyBitmap {
                pgsize: 4096,
                size: u64::MAX,
            },
            ..dirty
        };
        assert!(matches!(huge.reply_size(), Err(Error::Overflow { .. })));
        let big = DmaUnmap {
            kind: UnmapKind::DirtyBitmap {
                pgsize: 4096,
                size: u64::from(u32::MAX),
            },
            ..dirty
        };
        assert!(matches!(
            big.encode_reply(None, &mut out),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn unmap_reply_parse_rejects_bad_input() {
        let mut reply = DIRTY_UNMAP.to_vec();
        reply.extend_from_slice(&[0; 7]); // one byte short of bitmap.size
        assert!(matches!(
            DmaUnmapReply::parse(&reply),
            Err(Error::DataLength {
                count: 8,
                got: 7,
                ..
            })
        ));
        let mut reply = QEMU_UNMAP.to_vec();
        reply.push(0);
        assert!(matches!(
            DmaUnmapReply::parse(&reply),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            DmaUnmapReply::parse(&QEMU_UNMAP[..20]),
            Err(Error::Short { .. })
        ));
    }

    // DMA_READ / DMA_WRITE, server to client. The replies below are the
    // bytes QEMU 11.1.3's client sent back to a probe server (a guest
    // with the vfio-user device's bus mastering on).

    /// DMA_WRITE of 16 bytes at guest address 0x1000.
    const DMA_WRITE: [u8; 32] = [
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // address = 0x1000
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count = 16
        0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // data
        0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, // data
    ];

    #[test]
    fn dma_write_request_and_qemus_reply() {
        let req = parse_server_request(Command::DmaWrite, &DMA_WRITE).unwrap();
        let ServerRequest::DmaWrite(write) = req else {
            panic!("{req:?}");
        };
        assert_eq!(write.address, 0x1000);
        assert_eq!(write.data, &DMA_WRITE[16..]);
        assert_eq!(write.prefix(), DMA_WRITE[..16]);
        let mut out = Vec::new();
        req.encode(&mut out);
        assert_eq!(out, DMA_WRITE);
        assert_eq!(req.command(), Command::DmaWrite);

        let qemu_reply = [
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // address = 0x1000
            0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count = 16 (64-bit)
        ];
        let expected = DmaAccess {
            address: 0x1000,
            count: 16,
        };
        assert_eq!(
            parse_dma_reply(Command::DmaWrite, &qemu_reply),
            Ok(DmaReply::Write(Some(expected)))
        );
        let mut out = Vec::new();
        expected.encode(&mut out);
        assert_eq!(out, qemu_reply);
        // The specification table's 12-byte form and an empty reply.
        assert_eq!(
            parse_dma_reply(Command::DmaWrite, &qemu_reply[..12]),
            Ok(DmaReply::Write(Some(expected)))
        );
        assert_eq!(
            parse_dma_reply(Command::DmaWrite, &[]),
            Ok(DmaReply::Write(None))
        );
        assert!(parse_dma_reply(Command::DmaWrite, &qemu_reply[..8]).is_err());
        assert!(parse_dma_reply(Command::DmaWrite, &[0; 17]).is_err());
    }

    #[test]
    fn dma_read_request_and_qemus_reply() {
        let request = [
            0xf0, 0xff, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, // address = 0xffff0
            0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count = 16
        ];
        let req = ServerRequest::DmaRead(DmaAccess {
            address: 0xffff0,
            count: 16,
        });
        let mut out = Vec::new();
        req.encode(&mut out);
        assert_eq!(out, request);
        assert_eq!(parse_server_request(Command::DmaRead, &request), Ok(req));

        let qemu_reply = [
            0xf0, 0xff, 0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, // address = 0xffff0
            0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // count = 16
            0xea, 0x5b, 0xe0, 0x00, 0xf0, 0x30, 0x36, 0x2f, // data: the BIOS
            0x32, 0x33, 0x2f, 0x39, 0x39, 0x00, 0xfc, 0xd5, // reset vector
        ];
        let Ok(DmaReply::Read(data)) = parse_dma_reply(Command::DmaRead, &qemu_reply) else {
            panic!("reply did not parse");
        };
        assert_eq!(data.address, 0xffff0);
        assert_eq!(data.data, &qemu_reply[16..]);
        let mut out = Vec::new();
        data.encode(&mut out);
        assert_eq!(out, qemu_reply);
    }

    #[test]
    fn dma_read_write_reject_bad_input() {
        // count must match the data.
        assert!(matches!(
            parse_server_request(Command::DmaWrite, &DMA_WRITE[..31]),
            Err(Error::DataLength {
                count: 16,
                got: 15,
                ..
            })
        ));
        let mut long = DMA_WRITE.to_vec();
        long.push(0);
        assert!(matches!(
            parse_dma_reply(Command::DmaRead, &long),
            Err(Error::DataLength {
                count: 16,
                got: 17,
                ..
            })
        ));
        // A DMA_READ request carries no data.
        assert!(matches!(
            parse_server_request(Command::DmaRead, &DMA_WRITE),
            Err(Error::Length { .. })
        ));
        // address + count beyond 2^64, and a count larger than any body.
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b[8] = 2;
        assert_eq!(
            parse_server_request(Command::DmaRead, &b),
            Err(Error::Overflow { what: "DMA_READ" })
        );
        let mut b = [0u8; 16];
        b[8..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_dma_reply(Command::DmaRead, &b),
            Err(Error::DataLength { .. })
        ));
        // Client-to-server commands are not server requests.
        assert_eq!(
            parse_server_request(Command::RegionRead, &[0; 16]),
            Err(Error::WrongDirection(Command::RegionRead))
        );
        assert_eq!(
            parse_dma_reply(Command::DmaMap, &[]),
            Err(Error::WrongDirection(Command::DmaMap))
        );
    }
}
