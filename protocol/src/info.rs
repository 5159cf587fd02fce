//! The information queries: VFIO_USER_DEVICE_GET_INFO,
//! VFIO_USER_DEVICE_GET_REGION_INFO (with its capability chain),
//! VFIO_USER_DEVICE_GET_REGION_IO_FDS and VFIO_USER_DEVICE_GET_IRQ_INFO.
//!
//! Requests carry `argsz`, the largest reply payload the client accepts;
//! replies carry in `argsz` the size of their full payload. Reply encoders
//! whose payload can grow take the client's argsz and fall back to the
//! fixed part (with argsz saying what is needed) when it is too small.

use crate::vfio::{
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_SPARSE_MMAP_VERSION,
    VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_CAP_TYPE_VERSION, VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAGS_ALL,
};
use crate::wire::{
    self, RawCapHeader, RawFourU32, RawRegionInfo, RawRegionType, RawSparseMmap, RawSubRegion,
    RawTwoU64, len32, size32,
};
use crate::{Error, Fit};

/// Size of the DEVICE_GET_INFO payload (request and reply).
pub const DEVICE_INFO_SIZE: usize = size_of::<RawFourU32>();
/// Size of `struct vfio_region_info` (request, and the reply's fixed part).
pub const REGION_INFO_SIZE: usize = size_of::<RawRegionInfo>();
/// Size of the GET_IRQ_INFO payload (request and reply).
pub const IRQ_INFO_SIZE: usize = size_of::<RawFourU32>();
/// Size of the GET_REGION_IO_FDS request, and of the reply's fixed part.
pub const REGION_IO_FDS_SIZE: usize = size_of::<RawFourU32>();
/// Size of one sub-region entry of a GET_REGION_IO_FDS reply.
pub const SUB_REGION_SIZE: usize = size_of::<RawSubRegion>();
/// Size of `struct vfio_info_cap_header`.
pub const CAP_HEADER_SIZE: usize = size_of::<RawCapHeader>();

/// Parse one of the four-`u32` info requests (argsz, flags, index, count):
/// exactly 16 bytes and argsz at least `min`. The flags and the fourth
/// field, which the specification wants zero, are ignored as the kernel
/// ignores them.
fn parse_query(body: &[u8], what: &'static str, min: usize) -> Result<(u32, u32), Error> {
    let raw: RawFourU32 = wire::read_exact(body, what)?;
    if (raw.argsz as usize) < min {
        return Err(Error::Argsz {
            what,
            argsz: raw.argsz,
            min: min as u64,
        });
    }
    Ok((raw.argsz, raw.a))
}

/// A VFIO_USER_DEVICE_GET_INFO request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfoRequest {
    /// Largest reply payload the client accepts (at least 16).
    pub argsz: u32,
}

impl DeviceInfoRequest {
    /// Parse the request: 16 bytes, argsz at least 16 (other fields
    /// ignored).
    pub fn parse(body: &[u8]) -> Result<DeviceInfoRequest, Error> {
        let raw: RawFourU32 = wire::read_exact(body, "DEVICE_GET_INFO")?;
        if (raw.argsz as usize) < DEVICE_INFO_SIZE {
            return Err(Error::Argsz {
                what: "DEVICE_GET_INFO",
                argsz: raw.argsz,
                min: DEVICE_INFO_SIZE as u64,
            });
        }
        Ok(DeviceInfoRequest { argsz: raw.argsz })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawFourU32 {
                argsz: self.argsz,
                ..Default::default()
            },
        );
    }
}

/// The VFIO_USER_DEVICE_GET_INFO reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// VFIO_DEVICE_FLAGS_RESET / VFIO_DEVICE_FLAGS_PCI.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Append the reply body (16 bytes, argsz 16).
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawFourU32 {
                argsz: size32::<RawFourU32>(),
                flags: self.flags,
                a: self.num_regions,
                b: self.num_irqs,
            },
        );
    }

    /// Parse a reply (exactly 16 bytes).
    pub fn parse(body: &[u8]) -> Result<DeviceInfo, Error> {
        let raw: RawFourU32 = wire::read_exact(body, "DEVICE_GET_INFO reply")?;
        Ok(DeviceInfo {
            flags: raw.flags,
            num_regions: raw.a,
            num_irqs: raw.b,
        })
    }
}

/// A VFIO_USER_DEVICE_GET_REGION_INFO request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionInfoRequest {
    /// Largest reply payload the client accepts (at least 32).
    pub argsz: u32,
    /// Region index.
    pub index: u32,
}

impl RegionInfoRequest {
    /// Parse the request: 32 bytes, argsz at least 32; only `index` is
    /// used (the other fields are ignored, as the kernel does).
    pub fn parse(body: &[u8]) -> Result<RegionInfoRequest, Error> {
        let raw: RawRegionInfo = wire::read_exact(body, "DEVICE_GET_REGION_INFO")?;
        if (raw.argsz as usize) < REGION_INFO_SIZE {
            return Err(Error::Argsz {
                what: "DEVICE_GET_REGION_INFO",
                argsz: raw.argsz,
                min: REGION_INFO_SIZE as u64,
            });
        }
        Ok(RegionInfoRequest {
            argsz: raw.argsz,
            index: raw.index,
        })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawRegionInfo {
                argsz: self.argsz,
                index: self.index,
                ..Default::default()
            },
        );
    }

    /// Append the reply with `info`, fitted to this request's argsz (see
    /// [`RegionInfo::encode`]).
    pub fn encode_reply(&self, info: &RegionInfo, out: &mut Vec<u8>) -> Result<Fit, Error> {
        info.encode(self.argsz, out)
    }
}

/// One mmappable area of a region, relative to the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SparseArea {
    /// Offset of the area in the region (added to the region's mmap
    /// offset).
    pub offset: u64,
    /// Size of the area.
    pub size: u64,
}

/// A region info capability.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RegionCap {
    /// VFIO_REGION_INFO_CAP_SPARSE_MMAP: only these areas may be mmapped.
    SparseMmap(Vec<SparseArea>),
    /// VFIO_REGION_INFO_CAP_TYPE: a device-specific region's type.
    Type {
        /// Region type.
        kind: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// A capability (id and version) this crate does not know; found when
    /// parsing, skipped over. Cannot be encoded.
    Unknown {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

impl RegionCap {
    /// Encoded size, header included.
    fn size(&self) -> Result<usize, Error> {
        match self {
            RegionCap::SparseMmap(areas) => areas
                .len()
                .checked_mul(size_of::<RawTwoU64>())
                .and_then(|n| n.checked_add(CAP_HEADER_SIZE + size_of::<RawSparseMmap>()))
                .ok_or(Error::Overflow {
                    what: "sparse mmap capability size",
                }),
            RegionCap::Type { .. } => Ok(CAP_HEADER_SIZE + size_of::<RawRegionType>()),
            RegionCap::Unknown { id, version } => Err(Error::UnsupportedCap {
                id: *id,
                version: *version,
            }),
        }
    }

    /// Append this capability with its `next` pointer.
    fn encode(&self, next: u32, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            RegionCap::SparseMmap(areas) => {
                wire::put(
                    out,
                    &RawCapHeader {
                        id: VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                        version: VFIO_REGION_INFO_CAP_SPARSE_MMAP_VERSION,
                        next,
                    },
                );
                wire::put(
                    out,
                    &RawSparseMmap {
                        nr_areas: len32(areas.len(), "sparse mmap areas")?,
                        reserved: 0,
                    },
                );
                for area in areas {
                    wire::put(
                        out,
                        &RawTwoU64 {
                            a: area.offset,
                            b: area.size,
                        },
                    );
                }
                Ok(())
            }
            RegionCap::Type { kind, subtype } => {
                wire::put(
                    out,
                    &RawCapHeader {
                        id: VFIO_REGION_INFO_CAP_TYPE,
                        version: VFIO_REGION_INFO_CAP_TYPE_VERSION,
                        next,
                    },
                );
                wire::put(
                    out,
                    &RawRegionType {
                        kind: *kind,
                        subtype: *subtype,
                    },
                );
                Ok(())
            }
            RegionCap::Unknown { id, version } => Err(Error::UnsupportedCap {
                id: *id,
                version: *version,
            }),
        }
    }
}

/// The VFIO_USER_DEVICE_GET_REGION_INFO reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// READ / WRITE / MMAP flags. CAPS is not kept here: the encoder sets
    /// it when it writes `caps`, the parser removes it.
    pub flags: u32,
    /// Region size.
    pub size: u64,
    /// Offset to pass to mmap (with the reply's file descriptor).
    pub offset: u64,
    /// The capability chain.
    pub caps: Vec<RegionCap>,
}

/// A parsed region info reply (client side).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionInfoReply {
    /// Size of the full reply payload.
    pub argsz: u32,
    /// The region info; `caps` is empty when the reply was truncated.
    pub info: RegionInfo,
}

impl RegionInfoReply {
    /// The reply held only the fixed part; retry with this argsz.
    pub fn needed(&self) -> Option<u32> {
        (self.info.caps.is_empty() && self.argsz as usize > REGION_INFO_SIZE).then_some(self.argsz)
    }
}

impl RegionInfo {
    /// Append the reply body for a client that sent `client_argsz`.
    ///
    /// Without capabilities: the 32-byte struct. With capabilities that fit
    /// `client_argsz`: the struct with VFIO_REGION_INFO_FLAG_CAPS and
    /// `cap_offset` 32, then the chain (each `next` relative to the start
    /// of the struct, the last 0). If they do not fit: the struct alone,
    /// without the CAPS flag and with `cap_offset` 0 (QEMU rejects a reply
    /// that has CAPS set and a `cap_offset` outside what it received),
    /// argsz saying the size needed, and [`Fit::Truncated`].
    pub fn encode(&self, client_argsz: u32, out: &mut Vec<u8>) -> Result<Fit, Error> {
        let flags = self.flags & !VFIO_REGION_INFO_FLAG_CAPS;
        if flags & !VFIO_REGION_INFO_FLAGS_ALL != 0 {
            return Err(Error::Flags {
                what: "region info",
                flags: flags & !VFIO_REGION_INFO_FLAGS_ALL,
            });
        }
        let mut total = REGION_INFO_SIZE;
        for cap in &self.caps {
            total = total.checked_add(cap.size()?).ok_or(Error::Overflow {
                what: "region info size",
            })?;
        }
        let argsz = len32(total, "region info size")?;
        let mut raw = RawRegionInfo {
            argsz,
            flags,
            index: self.index,
            cap_offset: 0,
            size: self.size,
            offset: self.offset,
        };
        if self.caps.is_empty() || client_argsz < argsz {
            wire::put(out, &raw);
            return Ok(if self.caps.is_empty() {
                Fit::Full
            } else {
                Fit::Truncated { needed: argsz }
            });
        }
        raw.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        raw.cap_offset = size32::<RawRegionInfo>();
        wire::put(out, &raw);
        let mut offset = REGION_INFO_SIZE;
        for (i, cap) in self.caps.iter().enumerate() {
            offset = offset.checked_add(cap.size()?).ok_or(Error::Overflow {
                what: "region info size",
            })?;
            let next = if i + 1 == self.caps.len() {
                0
            } else {
                len32(offset, "region info size")?
            };
            cap.encode(next, out)?;
        }
        Ok(Fit::Full)
    }

    /// Parse a reply. A reply shorter than its argsz must be exactly the
    /// fixed part (a truncated reply); otherwise the body must be argsz
    /// bytes and, with the CAPS flag, hold a capability chain that starts
    /// at or after byte 32, stays inside the body, and moves strictly
    /// forward without overlapping (so it cannot loop).
    pub fn parse(body: &[u8]) -> Result<RegionInfoReply, Error> {
        let (raw, rest) = wire::read::<RawRegionInfo>(body, "DEVICE_GET_REGION_INFO reply")?;
        let mut info = RegionInfo {
            index: raw.index,
            flags: raw.flags & !VFIO_REGION_INFO_FLAG_CAPS,
            size: raw.size,
            offset: raw.offset,
            caps: Vec::new(),
        };
        let truncated = body.len() == REGION_INFO_SIZE && raw.argsz as usize > REGION_INFO_SIZE;
        if !truncated {
            if body.len() != raw.argsz as usize {
                return Err(Error::Length {
                    what: "DEVICE_GET_REGION_INFO reply",
                    expected: raw.argsz as usize,
                    got: body.len(),
                });
            }
            if raw.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
                info.caps = parse_cap_chain(body, raw.cap_offset)?;
            } else {
                wire::empty(rest, "DEVICE_GET_REGION_INFO reply")?;
            }
        }
        Ok(RegionInfoReply {
            argsz: raw.argsz,
            info,
        })
    }
}

/// Walk a capability chain in `body` (which starts with the region info
/// struct) from `first`.
fn parse_cap_chain(body: &[u8], first: u32) -> Result<Vec<RegionCap>, Error> {
    let mut caps = Vec::new();
    let mut offset = first;
    // The earliest offset the next capability may start at.
    let mut floor = REGION_INFO_SIZE;
    loop {
        let start = offset as usize;
        if start < floor {
            return Err(Error::CapChain {
                offset,
                reason: if caps.is_empty() {
                    "starts inside the region info struct"
                } else {
                    "next points backwards or into the previous capability"
                },
            });
        }
        let bytes = body.get(start..).ok_or(Error::CapChain {
            offset,
            reason: "beyond the end of the reply",
        })?;
        let (header, rest) =
            wire::read::<RawCapHeader>(bytes, "region info capability").map_err(|_| {
                Error::CapChain {
                    offset,
                    reason: "header beyond the end of the reply",
                }
            })?;
        let (cap, size) = match (header.id, header.version) {
            (VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_SPARSE_MMAP_VERSION) => {
                let (sparse, mut rest) =
                    wire::read::<RawSparseMmap>(rest, "sparse mmap").map_err(|_| {
                        Error::CapChain {
                            offset,
                            reason: "sparse mmap capability beyond the end of the reply",
                        }
                    })?;
                let n = sparse.nr_areas as usize;
                let need = n
                    .checked_mul(size_of::<RawTwoU64>())
                    .ok_or(Error::CapChain {
                        offset,
                        reason: "too many sparse mmap areas",
                    })?;
                if need > rest.len() {
                    return Err(Error::CapChain {
                        offset,
                        reason: "sparse mmap areas beyond the end of the reply",
                    });
                }
                let mut areas = Vec::with_capacity(n);
                for _ in 0..n {
                    let (area, tail) = wire::read::<RawTwoU64>(rest, "sparse mmap area")?;
                    areas.push(SparseArea {
                        offset: area.a,
                        size: area.b,
                    });
                    rest = tail;
                }
                (
                    RegionCap::SparseMmap(areas),
                    CAP_HEADER_SIZE + size_of::<RawSparseMmap>() + need,
                )
            }
            (VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_CAP_TYPE_VERSION) => {
                let (ty, _) = wire::read::<RawRegionType>(rest, "region type").map_err(|_| {
                    Error::CapChain {
                        offset,
                        reason: "region type capability beyond the end of the reply",
                    }
                })?;
                (
                    RegionCap::Type {
                        kind: ty.kind,
                        subtype: ty.subtype,
                    },
                    CAP_HEADER_SIZE + size_of::<RawRegionType>(),
                )
            }
            (id, version) => (RegionCap::Unknown { id, version }, CAP_HEADER_SIZE),
        };
        caps.push(cap);
        if header.next == 0 {
            return Ok(caps);
        }
        // `start + size` is within `body`, checked above.
        floor = start + size;
        offset = header.next;
    }
}

/// A VFIO_USER_DEVICE_GET_IRQ_INFO request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IrqInfoRequest {
    /// Largest reply payload the client accepts (at least 16).
    pub argsz: u32,
    /// Interrupt index.
    pub index: u32,
}

impl IrqInfoRequest {
    /// Parse the request: 16 bytes, argsz at least 16 (flags and count
    /// ignored).
    pub fn parse(body: &[u8]) -> Result<IrqInfoRequest, Error> {
        let (argsz, index) = parse_query(body, "DEVICE_GET_IRQ_INFO", IRQ_INFO_SIZE)?;
        Ok(IrqInfoRequest { argsz, index })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawFourU32 {
                argsz: self.argsz,
                flags: 0,
                a: self.index,
                b: 0,
            },
        );
    }
}

/// The VFIO_USER_DEVICE_GET_IRQ_INFO reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IrqInfo {
    /// VFIO_IRQ_INFO_* flags.
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

impl IrqInfo {
    /// Append the reply body (16 bytes, argsz 16).
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawFourU32 {
                argsz: size32::<RawFourU32>(),
                flags: self.flags,
                a: self.index,
                b: self.count,
            },
        );
    }

    /// Parse a reply (exactly 16 bytes).
    pub fn parse(body: &[u8]) -> Result<IrqInfo, Error> {
        let raw: RawFourU32 = wire::read_exact(body, "DEVICE_GET_IRQ_INFO reply")?;
        Ok(IrqInfo {
            flags: raw.flags,
            index: raw.a,
            count: raw.b,
        })
    }
}

/// A VFIO_USER_DEVICE_GET_REGION_IO_FDS request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionIoFdsRequest {
    /// Largest reply payload the client accepts (at least 16).
    pub argsz: u32,
    /// Region index.
    pub index: u32,
}

impl RegionIoFdsRequest {
    /// Parse the request: 16 bytes, argsz at least 16 (flags and count
    /// ignored).
    pub fn parse(body: &[u8]) -> Result<RegionIoFdsRequest, Error> {
        let (argsz, index) = parse_query(body, "DEVICE_GET_REGION_IO_FDS", REGION_IO_FDS_SIZE)?;
        Ok(RegionIoFdsRequest { argsz, index })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawFourU32 {
                argsz: self.argsz,
                flags: 0,
                a: self.index,
                b: 0,
            },
        );
    }

    /// Append the reply with `io_fds`, fitted to this request's argsz (see
    /// [`RegionIoFds::encode`]).
    pub fn encode_reply(&self, io_fds: &RegionIoFds, out: &mut Vec<u8>) -> Result<Fit, Error> {
        io_fds.encode(self.argsz, out)
    }
}

/// One sub-region of a GET_REGION_IO_FDS reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubRegion {
    /// Offset of the sub-region in the region.
    pub offset: u64,
    /// Access size (0: any).
    pub size: u64,
    /// Index of the file descriptor in the reply's descriptors.
    pub fd_index: u32,
    /// VFIO_USER_IO_FD_TYPE_*.
    pub kind: u32,
    /// KVM_IOEVENTFD_FLAG_* or KVM_IOREGION_* flags.
    pub flags: u32,
    /// `datamatch` (ioeventfd) or `user_data` (ioregionfd).
    pub data: u64,
}

/// The VFIO_USER_DEVICE_GET_REGION_IO_FDS reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionIoFds {
    /// Region index.
    pub index: u32,
    /// The sub-regions.
    pub sub_regions: Vec<SubRegion>,
}

/// A parsed GET_REGION_IO_FDS reply (client side).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionIoFdsReply {
    /// Size of the full reply payload.
    pub argsz: u32,
    /// Number of sub-regions the region has (even when not included).
    pub count: u32,
    /// The sub-regions (empty in a truncated reply).
    pub io_fds: RegionIoFds,
}

impl RegionIoFdsReply {
    /// The reply held only the fixed part; retry with this argsz.
    pub fn needed(&self) -> Option<u32> {
        (self.io_fds.sub_regions.len() != self.count as usize).then_some(self.argsz)
    }
}

impl RegionIoFds {
    /// Append the reply for a client that sent `client_argsz`: the fixed
    /// part and the array of 40-byte entries, or (if they do not fit) the
    /// fixed part alone, with `count` and `argsz` saying what is needed, as
    /// libvfio-user does; then [`Fit::Truncated`].
    pub fn encode(&self, client_argsz: u32, out: &mut Vec<u8>) -> Result<Fit, Error> {
        let count = len32(self.sub_regions.len(), "sub-region count")?;
        let total = self
            .sub_regions
            .len()
            .checked_mul(SUB_REGION_SIZE)
            .and_then(|n| n.checked_add(REGION_IO_FDS_SIZE))
            .ok_or(Error::Overflow {
                what: "region IO fds reply size",
            })?;
        let argsz = len32(total, "region IO fds reply size")?;
        wire::put(
            out,
            &RawFourU32 {
                argsz,
                flags: 0,
                a: self.index,
                b: count,
            },
        );
        if client_argsz < argsz {
            return Ok(Fit::Truncated { needed: argsz });
        }
        for sub in &self.sub_regions {
            wire::put(
                out,
                &RawSubRegion {
                    offset: sub.offset,
                    size: sub.size,
                    fd_index: sub.fd_index,
                    kind: sub.kind,
                    flags: sub.flags,
                    padding: 0,
                    data: sub.data,
                },
            );
        }
        Ok(Fit::Full)
    }

    /// Parse a reply: the fixed part alone (truncated, or no sub-regions)
    /// or followed by exactly `count` 40-byte entries, the body being
    /// `argsz` bytes.
    pub fn parse(body: &[u8]) -> Result<RegionIoFdsReply, Error> {
        let (raw, mut rest) = wire::read::<RawFourU32>(body, "DEVICE_GET_REGION_IO_FDS reply")?;
        let mut io_fds = RegionIoFds {
            index: raw.a,
            sub_regions: Vec::new(),
        };
        let truncated = rest.is_empty() && raw.argsz as usize > REGION_IO_FDS_SIZE;
        if !truncated {
            let expected = (raw.b as usize)
                .checked_mul(SUB_REGION_SIZE)
                .and_then(|n| n.checked_add(REGION_IO_FDS_SIZE))
                .ok_or(Error::Overflow {
                    what: "region IO fds count",
                })?;
            if body.len() != expected || raw.argsz as usize != expected {
                return Err(Error::Length {
                    what: "DEVICE_GET_REGION_IO_FDS reply",
                    expected,
                    got: body.len(),
                });
            }
            io_fds.sub_regions.reserve_exact(raw.b as usize);
            while !rest.is_empty() {
                let (sub, tail) = wire::read::<RawSubRegion>(rest, "sub-region")?;
                io_fds.sub_regions.push(SubRegion {
                    offset: sub.offset,
                    size: sub.size,
                    fd_index: sub.fd_index,
                    kind: sub.kind,
                    flags: sub.flags,
                    data: sub.data,
                });
                rest = tail;
            }
        }
        Ok(RegionIoFdsReply {
            argsz: raw.argsz,
            count: raw.b,
            io_fds,
        })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use crate::vfio::*;

    #[test]
    fn device_info_request_from_qemu_and_the_vfio_user_crate() {
        let qemu = [
            0x10, 0x00, 0x00, 0x00, // argsz = 16
            0x00, 0x00, 0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x00, // num_regions
            0x00, 0x00, 0x00, 0x00, // num_irqs
        ];
        assert_eq!(
            DeviceInfoRequest::parse(&qemu),
            Ok(DeviceInfoRequest { argsz: 16 })
        );
        let mut out = Vec::new();
        DeviceInfoRequest { argsz: 16 }.encode(&mut out);
        assert_eq!(out, qemu);
        // The vfio_user crate counts the header in argsz.
        let crate_client = [
            0x20, 0x00, 0x00, 0x00, // argsz = 32
            0x00, 0x00, 0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x00, // num_regions
            0x00, 0x00, 0x00, 0x00, // num_irqs
        ];
        assert_eq!(
            DeviceInfoRequest::parse(&crate_client),
            Ok(DeviceInfoRequest { argsz: 32 })
        );
    }

    #[test]
    fn device_info_request_rejects_bad_input() {
        let small = [
            0x0f, 0x00, 0x00, 0x00, // argsz = 15
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(
            DeviceInfoRequest::parse(&small),
            Err(Error::Argsz {
                what: "DEVICE_GET_INFO",
                argsz: 15,
                min: 16
            })
        );
        assert!(matches!(
            DeviceInfoRequest::parse(&[0x10, 0, 0, 0]),
            Err(Error::Short {
                need: 16,
                got: 4,
                ..
            })
        ));
        assert!(matches!(
            DeviceInfoRequest::parse(&[0x10; 17]),
            Err(Error::Length {
                expected: 16,
                got: 17,
                ..
            })
        ));
    }

    #[test]
    fn device_info_reply() {
        let info = DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: 5,
        };
        let mut out = Vec::new();
        info.encode(&mut out);
        assert_eq!(
            out,
            [
                0x10, 0x00, 0x00, 0x00, // argsz = 16
                0x03, 0x00, 0x00, 0x00, // flags = RESET | PCI
                0x09, 0x00, 0x00, 0x00, // num_regions = 9
                0x05, 0x00, 0x00, 0x00, // num_irqs = 5
            ]
        );
        assert_eq!(DeviceInfo::parse(&out), Ok(info));
        assert!(DeviceInfo::parse(&out[..12]).is_err());
    }

    /// GET_REGION_INFO for the config space as QEMU sends it first.
    const QEMU_REGION_INFO_REQUEST: [u8; 32] = [
        0x20, 0x00, 0x00, 0x00, // argsz = sizeof(vfio_region_info) = 32
        0x00, 0x00, 0x00, 0x00, // flags
        0x07, 0x00, 0x00, 0x00, // index = CONFIG
        0x00, 0x00, 0x00, 0x00, // cap_offset
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset
    ];

    #[test]
    fn region_info_request() {
        let r = RegionInfoRequest::parse(&QEMU_REGION_INFO_REQUEST).unwrap();
        assert_eq!(
            r,
            RegionInfoRequest {
                argsz: 32,
                index: 7
            }
        );
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, QEMU_REGION_INFO_REQUEST);
        let mut b = QEMU_REGION_INFO_REQUEST;
        b[0] = 16;
        assert_eq!(
            RegionInfoRequest::parse(&b),
            Err(Error::Argsz {
                what: "DEVICE_GET_REGION_INFO",
                argsz: 16,
                min: 32
            })
        );
        assert!(RegionInfoRequest::parse(&b[..16]).is_err());
    }

    #[test]
    fn region_info_reply_without_caps() {
        let info = RegionInfo {
            index: VFIO_PCI_CONFIG_REGION_INDEX,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            size: 0x1000,
            offset: 0,
            caps: vec![],
        };
        let mut out = Vec::new();
        // A client offering more room still gets the 32 bytes needed.
        assert_eq!(info.encode(4096, &mut out), Ok(Fit::Full));
        assert_eq!(
            out,
            [
                0x20, 0x00, 0x00, 0x00, // argsz = 32
                0x03, 0x00, 0x00, 0x00, // flags = READ | WRITE
                0x07, 0x00, 0x00, 0x00, // index = 7
                0x00, 0x00, 0x00, 0x00, // cap_offset = 0
                0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x1000
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0
            ]
        );
        let reply = RegionInfo::parse(&out).unwrap();
        assert_eq!(reply.argsz, 32);
        assert_eq!(reply.info, info);
        assert_eq!(reply.needed(), None);
    }

    fn nvme_bar0() -> RegionInfo {
        RegionInfo {
            index: VFIO_PCI_BAR0_REGION_INDEX,
            flags: VFIO_REGION_INFO_FLAG_READ
                | VFIO_REGION_INFO_FLAG_WRITE
                | VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x4000,
            offset: 0,
            caps: vec![RegionCap::SparseMmap(vec![SparseArea {
                offset: 0x1000,
                size: 0x3000,
            }])],
        }
    }

    /// BAR0 with its doorbell page mappable: the full reply.
    const SPARSE_REPLY: [u8; 64] = [
        0x40, 0x00, 0x00, 0x00, // argsz = 64
        0x0f, 0x00, 0x00, 0x00, // flags = READ | WRITE | MMAP | CAPS
        0x00, 0x00, 0x00, 0x00, // index = BAR0
        0x20, 0x00, 0x00, 0x00, // cap_offset = 32
        0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x4000
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0
        0x01, 0x00, // cap id = SPARSE_MMAP
        0x01, 0x00, // cap version = 1
        0x00, 0x00, 0x00, 0x00, // next = 0 (last)
        0x01, 0x00, 0x00, 0x00, // nr_areas = 1
        0x00, 0x00, 0x00, 0x00, // reserved
        0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // area offset = 0x1000
        0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // area size = 0x3000
    ];

    #[test]
    fn region_info_reply_with_sparse_mmap() {
        let info = nvme_bar0();
        let mut out = Vec::new();
        assert_eq!(info.encode(64, &mut out), Ok(Fit::Full));
        assert_eq!(out, SPARSE_REPLY);
        let reply = RegionInfo::parse(&out).unwrap();
        assert_eq!(reply.argsz, 64);
        assert_eq!(reply.info, info);
        assert_eq!(reply.needed(), None);
    }

    #[test]
    fn region_info_reply_truncated_to_argsz() {
        let mut out = Vec::new();
        assert_eq!(
            nvme_bar0().encode(32, &mut out),
            Ok(Fit::Truncated { needed: 64 })
        );
        assert_eq!(
            out,
            [
                0x40, 0x00, 0x00, 0x00, // argsz = 64 needed
                0x07, 0x00, 0x00, 0x00, // flags = READ | WRITE | MMAP, no CAPS
                0x00, 0x00, 0x00, 0x00, // index = BAR0
                0x00, 0x00, 0x00, 0x00, // cap_offset = 0
                0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x4000
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0
            ]
        );
        let reply = RegionInfo::parse(&out).unwrap();
        assert_eq!(reply.needed(), Some(64));
        assert!(reply.info.caps.is_empty());
        // One byte short is still truncated.
        out.clear();
        let request = RegionInfoRequest {
            argsz: 63,
            index: 0,
        };
        assert_eq!(
            request.encode_reply(&nvme_bar0(), &mut out),
            Ok(Fit::Truncated { needed: 64 })
        );
    }

    #[test]
    fn truncated_replies_from_other_servers() {
        // Linux sets CAPS with cap_offset 0 when the caps do not fit; the
        // vfio_user crate's server sets CAPS with cap_offset 32. Either way
        // the reply is the fixed part with a larger argsz.
        for cap_offset in [0u8, 32] {
            let b = [
                0x40, 0x00, 0x00, 0x00, // argsz = 64 needed
                0x0f, 0x00, 0x00, 0x00, // flags = READ | WRITE | MMAP | CAPS
                0x00, 0x00, 0x00, 0x00, // index = BAR0
                cap_offset, 0x00, 0x00, 0x00, // cap_offset
                0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset
            ];
            let reply = RegionInfo::parse(&b).unwrap();
            assert_eq!(reply.needed(), Some(64));
            assert_eq!(reply.info.flags, 0x07);
            assert!(reply.info.caps.is_empty());
        }
    }

    #[test]
    fn region_info_reply_with_a_chain_of_two() {
        let info = RegionInfo {
            index: 9,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x2000,
            offset: 0x9000,
            caps: vec![
                RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0,
                    size: 0x1000,
                }]),
                RegionCap::Type {
                    kind: VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x8086,
                    subtype: 1,
                },
            ],
        };
        let mut out = Vec::new();
        assert_eq!(info.encode(80, &mut out), Ok(Fit::Full));
        assert_eq!(
            out,
            [
                0x50, 0x00, 0x00, 0x00, // argsz = 80
                0x0d, 0x00, 0x00, 0x00, // flags = READ | MMAP | CAPS
                0x09, 0x00, 0x00, 0x00, // index = 9
                0x20, 0x00, 0x00, 0x00, // cap_offset = 32
                0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 0x2000
                0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x9000
                0x01, 0x00, 0x01, 0x00, // SPARSE_MMAP, version 1
                0x40, 0x00, 0x00, 0x00, // next = 64
                0x01, 0x00, 0x00, 0x00, // nr_areas = 1
                0x00, 0x00, 0x00, 0x00, // reserved
                0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // area offset = 0
                0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // area size = 0x1000
                0x02, 0x00, 0x01, 0x00, // TYPE, version 1
                0x00, 0x00, 0x00, 0x00, // next = 0
                0x86, 0x80, 0x00, 0x80, // type = VENDOR_TYPE | 0x8086
                0x01, 0x00, 0x00, 0x00, // subtype = 1
            ]
        );
        assert_eq!(RegionInfo::parse(&out).unwrap().info, info);
    }

    #[test]
    fn region_info_encode_rejects_what_it_cannot_write() {
        let mut out = Vec::new();
        let bad_flags = RegionInfo {
            flags: 0x10,
            ..nvme_bar0()
        };
        assert_eq!(
            bad_flags.encode(64, &mut out),
            Err(Error::Flags {
                what: "region info",
                flags: 0x10
            })
        );
        let unknown = RegionInfo {
            caps: vec![RegionCap::Unknown { id: 9, version: 1 }],
            ..nvme_bar0()
        };
        assert_eq!(
            unknown.encode(64, &mut out),
            Err(Error::UnsupportedCap { id: 9, version: 1 })
        );
        assert!(out.is_empty());
        // The caller's CAPS flag is ignored: the encoder decides.
        let with_caps_flag = RegionInfo {
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_CAPS,
            caps: vec![],
            ..nvme_bar0()
        };
        assert_eq!(with_caps_flag.encode(32, &mut out), Ok(Fit::Full));
        assert_eq!(out[4], 0x01);
    }

    fn set_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn cap_chain_must_not_loop_or_escape() {
        // next points at the capability itself.
        let mut b = SPARSE_REPLY;
        set_u32(&mut b, 36, 32);
        assert_eq!(
            RegionInfo::parse(&b),
            Err(Error::CapChain {
                offset: 32,
                reason: "next points backwards or into the previous capability"
            })
        );
        // next points into the region info struct.
        set_u32(&mut b, 36, 8);
        assert!(matches!(
            RegionInfo::parse(&b),
            Err(Error::CapChain { offset: 8, .. })
        ));
        // next points at the end, or past it.
        set_u32(&mut b, 36, 64);
        assert_eq!(
            RegionInfo::parse(&b),
            Err(Error::CapChain {
                offset: 64,
                reason: "header beyond the end of the reply"
            })
        );
        set_u32(&mut b, 36, u32::MAX);
        assert_eq!(
            RegionInfo::parse(&b),
            Err(Error::CapChain {
                offset: u32::MAX,
                reason: "beyond the end of the reply"
            })
        );
        // cap_offset inside the struct, or beyond the end.
        let mut b = SPARSE_REPLY;
        set_u32(&mut b, 12, 16);
        assert_eq!(
            RegionInfo::parse(&b),
            Err(Error::CapChain {
                offset: 16,
                reason: "starts inside the region info struct"
            })
        );
        set_u32(&mut b, 12, 60);
        assert_eq!(
            RegionInfo::parse(&b),
            Err(Error::CapChain {
                offset: 60,
                reason: "header beyond the end of the reply"
            })
        );
        // More areas than the reply holds.
        let mut b = SPARSE_REPLY;
        set_u32(&mut b, 40, 2);
        assert!(matches!(
            RegionInfo::parse(&b),
            Err(Error::CapChain { offset: 32, .. })
        ));
        set_u32(&mut b, 40, u32::MAX);
        assert!(matches!(
            RegionInfo::parse(&b),
            Err(Error::CapChain { offset: 32, .. })
        ));
    }

    #[test]
    fn cap_chain_skips_unknown_caps() {
        let mut b = SPARSE_REPLY.to_vec();
        // First capability becomes an unknown id 0x77 pointing to a sparse
        // capability appended at 64.
        b[32] = 0x77;
        set_u32(&mut b, 36, 64);
        b.extend_from_slice(&SPARSE_REPLY[32..]);
        set_u32(&mut b, 68, 0);
        set_u32(&mut b, 0, 96); // argsz
        let reply = RegionInfo::parse(&b).unwrap();
        assert_eq!(
            reply.info.caps,
            [
                RegionCap::Unknown {
                    id: 0x77,
                    version: 1
                },
                RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0x1000,
                    size: 0x3000
                }])
            ]
        );
        // A sparse capability of another version is unknown too.
        let mut b = SPARSE_REPLY;
        b[34] = 2;
        assert_eq!(
            RegionInfo::parse(&b).unwrap().info.caps,
            [RegionCap::Unknown {
                id: VFIO_REGION_INFO_CAP_SPARSE_MMAP,
                version: 2
            }]
        );
    }

    #[test]
    fn region_info_reply_length_must_match_argsz() {
        let mut b = SPARSE_REPLY.to_vec();
        b.push(0);
        assert!(matches!(
            RegionInfo::parse(&b),
            Err(Error::Length {
                expected: 64,
                got: 65,
                ..
            })
        ));
        // Without CAPS, nothing may follow the struct.
        let mut b = SPARSE_REPLY;
        b[4] = 0x07;
        assert!(matches!(RegionInfo::parse(&b), Err(Error::Length { .. })));
        // argsz below 32 with a 32-byte body.
        let mut b = [0u8; 32];
        set_u32(&mut b, 0, 8);
        assert!(matches!(
            RegionInfo::parse(&b),
            Err(Error::Length {
                expected: 8,
                got: 32,
                ..
            })
        ));
        assert!(matches!(
            RegionInfo::parse(&SPARSE_REPLY[..31]),
            Err(Error::Short { .. })
        ));
    }

    #[test]
    fn irq_info() {
        // QEMU's GET_IRQ_INFO for MSI-X.
        let request = [
            0x10, 0x00, 0x00, 0x00, // argsz = 16
            0x00, 0x00, 0x00, 0x00, // flags
            0x02, 0x00, 0x00, 0x00, // index = MSIX
            0x00, 0x00, 0x00, 0x00, // count
        ];
        let r = IrqInfoRequest::parse(&request).unwrap();
        assert_eq!(
            r,
            IrqInfoRequest {
                argsz: 16,
                index: 2
            }
        );
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, request);
        let info = IrqInfo {
            flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            index: 2,
            count: 65,
        };
        let mut out = Vec::new();
        info.encode(&mut out);
        assert_eq!(
            out,
            [
                0x10, 0x00, 0x00, 0x00, // argsz = 16
                0x09, 0x00, 0x00, 0x00, // flags = EVENTFD | NORESIZE
                0x02, 0x00, 0x00, 0x00, // index = MSIX
                0x41, 0x00, 0x00, 0x00, // count = 65
            ]
        );
        assert_eq!(IrqInfo::parse(&out), Ok(info));
        let mut small = request;
        small[0] = 12;
        assert_eq!(
            IrqInfoRequest::parse(&small),
            Err(Error::Argsz {
                what: "DEVICE_GET_IRQ_INFO",
                argsz: 12,
                min: 16
            })
        );
        assert!(IrqInfoRequest::parse(&request[..15]).is_err());
    }

    #[test]
    fn region_io_fds() {
        let request = [
            0x00, 0x10, 0x00, 0x00, // argsz = 4096
            0x00, 0x00, 0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x00, // index = BAR0
            0x00, 0x00, 0x00, 0x00, // count
        ];
        let r = RegionIoFdsRequest::parse(&request).unwrap();
        assert_eq!(
            r,
            RegionIoFdsRequest {
                argsz: 4096,
                index: 0
            }
        );
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, request);

        let io = RegionIoFds {
            index: 0,
            sub_regions: vec![SubRegion {
                offset: 0x1000,
                size: 4,
                fd_index: 0,
                kind: VFIO_USER_IO_FD_TYPE_IOEVENTFD,
                flags: KVM_IOEVENTFD_FLAG_DATAMATCH,
                data: 0x1234,
            }],
        };
        let mut out = Vec::new();
        assert_eq!(r.encode_reply(&io, &mut out), Ok(Fit::Full));
        let full = [
            0x38, 0x00, 0x00, 0x00, // argsz = 16 + 40
            0x00, 0x00, 0x00, 0x00, // flags
            0x00, 0x00, 0x00, 0x00, // index
            0x01, 0x00, 0x00, 0x00, // count = 1
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 0x1000
            0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // size = 4
            0x00, 0x00, 0x00, 0x00, // fd_index = 0
            0x00, 0x00, 0x00, 0x00, // type = IOEVENTFD
            0x01, 0x00, 0x00, 0x00, // flags = DATAMATCH
            0x00, 0x00, 0x00, 0x00, // padding
            0x34, 0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // datamatch = 0x1234
        ];
        assert_eq!(out, full);
        let reply = RegionIoFds::parse(&out).unwrap();
        assert_eq!(reply.io_fds, io);
        assert_eq!((reply.argsz, reply.count, reply.needed()), (56, 1, None));

        // Too small: the fixed part with the count and argsz needed.
        out.clear();
        assert_eq!(io.encode(16, &mut out), Ok(Fit::Truncated { needed: 56 }));
        assert_eq!(out, full[..16]);
        let reply = RegionIoFds::parse(&out).unwrap();
        assert_eq!((reply.count, reply.needed()), (1, Some(56)));

        // Parse errors: count disagreeing with the body or argsz.
        let mut bad = full;
        bad[12] = 2;
        assert!(matches!(
            RegionIoFds::parse(&bad),
            Err(Error::Length { .. })
        ));
        let mut bad = full;
        bad[0] = 0x39;
        assert!(matches!(
            RegionIoFds::parse(&bad),
            Err(Error::Length { .. })
        ));
        let mut bad = full;
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RegionIoFds::parse(&bad).is_err());
    }
}
