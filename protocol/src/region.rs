//! Region accesses: VFIO_USER_REGION_READ, VFIO_USER_REGION_WRITE and
//! VFIO_USER_REGION_WRITE_MULTI.
//!
//! The `count` of a READ or WRITE must equal the data carried exactly, and
//! `offset + count` must fit in 64 bits. Whether `count` is within the
//! negotiated `max_data_xfer_size` is for the receiver to check (the
//! parsers borrow the data and allocate nothing based on `count`).

use crate::Error;
use crate::wire::{self, RawRegionAccess, RawWriteOne, len32};

/// Size of `struct vfio_user_region_access` without data.
pub const REGION_ACCESS_SIZE: usize = size_of::<RawRegionAccess>();
/// Size of one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_ENTRY_SIZE: usize = size_of::<RawWriteOne>();
/// Most data bytes one REGION_WRITE_MULTI entry carries.
pub const WRITE_MULTI_MAX_DATA: usize = 8;
/// Most entries accepted in one REGION_WRITE_MULTI (QEMU sends at most
/// 200).
pub const WRITE_MULTI_MAX_ENTRIES: u64 = 200;

fn check_end(offset: u64, count: u64, what: &'static str) -> Result<(), Error> {
    offset
        .checked_add(count)
        .map(|_| ())
        .ok_or(Error::Overflow { what })
}

/// A region access without data: the REGION_READ request and the
/// REGION_WRITE reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Parse: exactly 16 bytes; `offset + count` fits in 64 bits.
    pub fn parse(body: &[u8], what: &'static str) -> Result<RegionAccess, Error> {
        let raw: RawRegionAccess = wire::read_exact(body, what)?;
        check_end(raw.offset, u64::from(raw.count), what)?;
        Ok(RegionAccess {
            offset: raw.offset,
            region: raw.region,
            count: raw.count,
        })
    }

    /// The 16 bytes of the body.
    pub fn to_bytes(&self) -> [u8; REGION_ACCESS_SIZE] {
        let mut out = [0u8; REGION_ACCESS_SIZE];
        let raw = RawRegionAccess {
            offset: self.offset,
            region: self.region,
            count: self.count,
        };
        out.copy_from_slice(zerocopy::IntoBytes::as_bytes(&raw));
        out
    }

    /// Append the body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

/// A region access with data: the REGION_WRITE request and the
/// REGION_READ reply. The data is borrowed from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionData<'a> {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The data (its length is the `count` field).
    pub data: &'a [u8],
}

impl<'a> RegionData<'a> {
    /// Parse: 16 bytes then exactly `count` data bytes; `offset + count`
    /// fits in 64 bits.
    pub fn parse(body: &'a [u8], what: &'static str) -> Result<RegionData<'a>, Error> {
        let (raw, data) = wire::read::<RawRegionAccess>(body, what)?;
        if data.len() != raw.count as usize {
            return Err(Error::DataLength {
                what,
                count: u64::from(raw.count),
                got: data.len(),
            });
        }
        check_end(raw.offset, u64::from(raw.count), what)?;
        Ok(RegionData {
            offset: raw.offset,
            region: raw.region,
            data,
        })
    }

    /// The fixed 16 bytes that precede the data (for a vectored write that
    /// sends the data from where it lies).
    pub fn prefix(&self) -> Result<[u8; REGION_ACCESS_SIZE], Error> {
        Ok(RegionAccess {
            offset: self.offset,
            region: self.region,
            count: len32(self.data.len(), "region access count")?,
        }
        .to_bytes())
    }

    /// Append the body (prefix and data).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.extend_from_slice(&self.prefix()?);
        out.extend_from_slice(self.data);
        Ok(())
    }
}

/// A VFIO_USER_REGION_WRITE_MULTI request: up to
/// [`WRITE_MULTI_MAX_ENTRIES`] writes of at most 8 bytes each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WriteMulti<'a> {
    /// The writes, in order; their data is borrowed from the message.
    pub writes: Vec<RegionData<'a>>,
}

impl<'a> WriteMulti<'a> {
    /// Parse: `wr_cnt` (u64), at most [`WRITE_MULTI_MAX_ENTRIES`], then
    /// exactly that many 24-byte entries, each with `count` at most 8 and
    /// `offset + count` within 64 bits.
    pub fn parse(body: &'a [u8]) -> Result<WriteMulti<'a>, Error> {
        let (wr_cnt, entries) = wire::read::<u64>(body, "REGION_WRITE_MULTI")?;
        if wr_cnt > WRITE_MULTI_MAX_ENTRIES {
            return Err(Error::TooLarge {
                what: "REGION_WRITE_MULTI wr_cnt",
                value: wr_cnt,
                max: WRITE_MULTI_MAX_ENTRIES,
            });
        }
        // At most 200 entries: no overflow.
        let expected = wr_cnt as usize * WRITE_MULTI_ENTRY_SIZE;
        if entries.len() != expected {
            return Err(Error::Length {
                what: "REGION_WRITE_MULTI",
                expected: expected + size_of::<u64>(),
                got: body.len(),
            });
        }
        let mut writes = Vec::with_capacity(wr_cnt as usize);
        for entry in entries.chunks_exact(WRITE_MULTI_ENTRY_SIZE) {
            let (raw, _) = wire::read::<RawWriteOne>(entry, "REGION_WRITE_MULTI entry")?;
            if raw.count as usize > WRITE_MULTI_MAX_DATA {
                return Err(Error::TooLarge {
                    what: "REGION_WRITE_MULTI entry count",
                    value: u64::from(raw.count),
                    max: WRITE_MULTI_MAX_DATA as u64,
                });
            }
            check_end(
                raw.offset,
                u64::from(raw.count),
                "REGION_WRITE_MULTI entry offset + count",
            )?;
            // The entry's data array follows its 16-byte access header.
            let data = entry
                .get(REGION_ACCESS_SIZE..REGION_ACCESS_SIZE + raw.count as usize)
                .ok_or(Error::Short {
                    what: "REGION_WRITE_MULTI entry",
                    need: WRITE_MULTI_ENTRY_SIZE,
                    got: entry.len(),
                })?;
            writes.push(RegionData {
                offset: raw.offset,
                region: raw.region,
                data,
            });
        }
        Ok(WriteMulti { writes })
    }

    /// Append the request body. Fails if there are too many writes or one
    /// carries more than 8 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        let n = self.writes.len() as u64;
        if n > WRITE_MULTI_MAX_ENTRIES {
            return Err(Error::TooLarge {
                what: "REGION_WRITE_MULTI wr_cnt",
                value: n,
                max: WRITE_MULTI_MAX_ENTRIES,
            });
        }
        wire::put(out, &n);
        for write in &self.writes {
            let mut data = [0u8; WRITE_MULTI_MAX_DATA];
            data.get_mut(..write.data.len())
                .ok_or(Error::TooLarge {
                    what: "REGION_WRITE_MULTI entry count",
                    value: write.data.len() as u64,
                    max: WRITE_MULTI_MAX_DATA as u64,
                })?
                .copy_from_slice(write.data);
            wire::put(
                out,
                &RawWriteOne {
                    offset: write.offset,
                    region: write.region,
                    count: write.data.len() as u32,
                    data,
                },
            );
        }
        Ok(())
    }
}

/// The VFIO_USER_REGION_WRITE_MULTI reply: the number of writes done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteMultiReply {
    /// Writes completed.
    pub wr_cnt: u64,
}

impl WriteMultiReply {
    /// Append the reply body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(out, &self.wr_cnt);
    }

    /// Parse a reply (exactly 8 bytes).
    pub fn parse(body: &[u8]) -> Result<WriteMultiReply, Error> {
        Ok(WriteMultiReply {
            wr_cnt: wire::read_exact(body, "REGION_WRITE_MULTI reply")?,
        })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// A 4-byte config-space read at 0x10, as QEMU sends it.
    const QEMU_READ: [u8; 16] = [
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x10
        0x07, 0x00, 0x00, 0x00, // region = CONFIG
        0x04, 0x00, 0x00, 0x00, // count = 4
    ];

    #[test]
    fn region_read_request_and_reply() {
        let a = RegionAccess::parse(&QEMU_READ, "REGION_READ").unwrap();
        assert_eq!(
            a,
            RegionAccess {
                offset: 0x10,
                region: 7,
                count: 4
            }
        );
        let mut out = Vec::new();
        a.encode(&mut out);
        assert_eq!(out, QEMU_READ);
        let reply = RegionData {
            offset: 0x10,
            region: 7,
            data: &[0x0c, 0x00, 0x00, 0xfe],
        };
        let mut out = Vec::new();
        reply.encode(&mut out).unwrap();
        let mut expected = QEMU_READ.to_vec();
        expected.extend_from_slice(&[0x0c, 0x00, 0x00, 0xfe]); // data
        assert_eq!(out, expected);
        assert_eq!(reply.prefix().unwrap(), QEMU_READ);
        assert_eq!(RegionData::parse(&out, "REGION_READ reply"), Ok(reply));
    }

    #[test]
    fn region_write_request_and_reply() {
        let bytes = [
            0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 4
            0x00, 0x00, 0x00, 0x00, // region = BAR0
            0x02, 0x00, 0x00, 0x00, // count = 2
            0xef, 0xbe, // data
        ];
        let w = RegionData::parse(&bytes, "REGION_WRITE").unwrap();
        assert_eq!((w.offset, w.region, w.data), (4, 0, &[0xef, 0xbe][..]));
        let mut out = Vec::new();
        w.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        // The reply echoes offset, region and count, without data.
        let ack = RegionAccess {
            offset: 4,
            region: 0,
            count: 2,
        };
        assert_eq!(ack.to_bytes(), bytes[..16]);
        assert_eq!(
            RegionAccess::parse(&bytes[..16], "REGION_WRITE reply"),
            Ok(ack)
        );
    }

    #[test]
    fn count_must_match_the_data() {
        let mut bytes = QEMU_READ.to_vec();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            RegionData::parse(&bytes, "REGION_WRITE"),
            Err(Error::DataLength {
                what: "REGION_WRITE",
                count: 4,
                got: 3
            })
        );
        bytes.extend_from_slice(&[4, 5]);
        assert!(matches!(
            RegionData::parse(&bytes, "REGION_WRITE"),
            Err(Error::DataLength {
                count: 4,
                got: 5,
                ..
            })
        ));
        // A read request carries no data.
        assert!(matches!(
            RegionAccess::parse(&bytes[..17], "REGION_READ"),
            Err(Error::Length {
                expected: 16,
                got: 17,
                ..
            })
        ));
        assert!(matches!(
            RegionAccess::parse(&bytes[..15], "REGION_READ"),
            Err(Error::Short { .. })
        ));
    }

    #[test]
    fn offset_plus_count_must_fit() {
        let mut b = QEMU_READ;
        b[..8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert_eq!(
            RegionAccess::parse(&b, "REGION_READ"),
            Err(Error::Overflow {
                what: "REGION_READ"
            })
        );
        b[..8].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        assert!(RegionAccess::parse(&b, "REGION_READ").is_ok());
        let mut w = b.to_vec();
        w[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        w.extend_from_slice(&[0; 4]);
        assert_eq!(
            RegionData::parse(&w, "REGION_WRITE"),
            Err(Error::Overflow {
                what: "REGION_WRITE"
            })
        );
    }

    /// Two posted writes coalesced by QEMU's `vfio_user_add_multi`.
    const QEMU_MULTI: [u8; 56] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // wr_cnt = 2
        // write 0
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x1000
        0x00, 0x00, 0x00, 0x00, // region = BAR0
        0x04, 0x00, 0x00, 0x00, // count = 4
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // data (4 used)
        // write 1
        0x08, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x1008
        0x00, 0x00, 0x00, 0x00, // region = BAR0
        0x08, 0x00, 0x00, 0x00, // count = 8
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, // data
    ];

    #[test]
    fn write_multi() {
        let m = WriteMulti::parse(&QEMU_MULTI).unwrap();
        assert_eq!(
            m.writes,
            [
                RegionData {
                    offset: 0x1000,
                    region: 0,
                    data: &[1, 0, 0, 0]
                },
                RegionData {
                    offset: 0x1008,
                    region: 0,
                    data: &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
                },
            ]
        );
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(out, QEMU_MULTI);
        let reply = WriteMultiReply { wr_cnt: 2 };
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(out, [0x02, 0, 0, 0, 0, 0, 0, 0]); // wr_cnt = 2
        assert_eq!(WriteMultiReply::parse(&out), Ok(reply));
        assert!(WriteMultiReply::parse(&out[..7]).is_err());
    }

    #[test]
    fn write_multi_limits() {
        // Empty is fine.
        assert_eq!(
            WriteMulti::parse(&[0; 8]).unwrap().writes,
            Vec::<RegionData<'_>>::new()
        );
        // 200 entries is the most.
        let mut big = 200u64.to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 200 * 24]);
        assert_eq!(WriteMulti::parse(&big).unwrap().writes.len(), 200);
        let mut too_many = 201u64.to_le_bytes().to_vec();
        too_many.extend_from_slice(&[0; 201 * 24]);
        assert_eq!(
            WriteMulti::parse(&too_many),
            Err(Error::TooLarge {
                what: "REGION_WRITE_MULTI wr_cnt",
                value: 201,
                max: 200
            })
        );
        let mut huge = QEMU_MULTI;
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            WriteMulti::parse(&huge),
            Err(Error::TooLarge { .. })
        ));
        // Body length must match wr_cnt exactly.
        assert!(matches!(
            WriteMulti::parse(&QEMU_MULTI[..55]),
            Err(Error::Length {
                expected: 56,
                got: 55,
                ..
            })
        ));
        let mut long = QEMU_MULTI.to_vec();
        long.extend_from_slice(&[0; 24]);
        assert!(matches!(
            WriteMulti::parse(&long),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            WriteMulti::parse(&[0; 7]),
            Err(Error::Short { .. })
        ));
        // An entry with more than 8 bytes.
        let mut b = QEMU_MULTI;
        b[20] = 9;
        assert_eq!(
            WriteMulti::parse(&b),
            Err(Error::TooLarge {
                what: "REGION_WRITE_MULTI entry count",
                value: 9,
                max: 8
            })
        );
        // An entry whose offset + count overflows.
        let mut b = QEMU_MULTI;
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(WriteMulti::parse(&b), Err(Error::Overflow { .. })));
    }

    #[test]
    fn write_multi_encode_limits() {
        let nine = [0u8; 9];
        let m = WriteMulti {
            writes: vec![RegionData {
                offset: 0,
                region: 0,
                data: &nine,
            }],
        };
        assert!(matches!(
            m.encode(&mut Vec::new()),
            Err(Error::TooLarge { .. })
        ));
        let m = WriteMulti {
            writes: vec![
                RegionData {
                    offset: 0,
                    region: 0,
                    data: &[]
                };
                201
            ],
        };
        assert!(matches!(
            m.encode(&mut Vec::new()),
            Err(Error::TooLarge { value: 201, .. })
        ));
    }
}
