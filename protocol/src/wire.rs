//! Plain-data layouts of the fixed parts of messages, and the checked
//! helpers that read and write them. Private: the public types in the
//! other modules are what callers see.
//!
//! Every struct is `#[repr(C)]` without padding (the derives check it), in
//! host byte order as the specification says.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::Error;

/// Read a `T` from the start of `bytes`; returns it and the rest.
pub(crate) fn read<'a, T: FromBytes>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), Error> {
    T::read_from_prefix(bytes).map_err(|_| Error::Short {
        what,
        need: size_of::<T>(),
        got: bytes.len(),
    })
}

/// Read a `T` that must make up all of `bytes`.
pub(crate) fn read_exact<T: FromBytes>(bytes: &[u8], what: &'static str) -> Result<T, Error> {
    let (value, rest) = read::<T>(bytes, what)?;
    if !rest.is_empty() {
        return Err(Error::Length {
            what,
            expected: size_of::<T>(),
            got: bytes.len(),
        });
    }
    Ok(value)
}

/// Require `bytes` to be empty (a message without a body).
pub(crate) fn empty(bytes: &[u8], what: &'static str) -> Result<(), Error> {
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected: 0,
            got: bytes.len(),
        })
    }
}

/// Append the bytes of `value` to `out`.
pub(crate) fn put<T: IntoBytes + Immutable>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(value.as_bytes());
}

/// `size_of::<T>()` as the `u32` that `argsz` fields hold (all fixed parts
/// are a few dozen bytes).
pub(crate) const fn size32<T>() -> u32 {
    size_of::<T>() as u32
}

/// A length in a message as `u32`, or an error naming `what`.
pub(crate) fn len32(len: usize, what: &'static str) -> Result<u32, Error> {
    u32::try_from(len).map_err(|_| Error::TooLarge {
        what,
        value: len as u64,
        max: u64::from(u32::MAX),
    })
}

/// `struct vfio_user_header`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawHeader {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

/// The fixed part of VFIO_USER_VERSION.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawVersion {
    pub major: u16,
    pub minor: u16,
}

/// `struct vfio_user_dma_map`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawDmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

/// `struct vfio_user_dma_unmap` without its bitmap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawDmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// `struct vfio_user_bitmap` without its data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawBitmap {
    pub pgsize: u64,
    pub size: u64,
}

/// `struct vfio_user_device_info` (also `vfio_irq_info` and the region IO
/// fds request: four `u32`s, argsz and flags first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawFourU32 {
    pub argsz: u32,
    pub flags: u32,
    pub a: u32,
    pub b: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_info_cap_header`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawCapHeader {
    pub id: u16,
    pub version: u16,
    pub next: u32,
}

/// The fixed part of `struct vfio_region_info_cap_sparse_mmap` after its
/// header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawSparseMmap {
    pub nr_areas: u32,
    pub reserved: u32,
}

/// `struct vfio_region_sparse_mmap_area` (also a DMA logging range: two
/// `u64`s).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawTwoU64 {
    pub a: u64,
    pub b: u64,
}

/// `struct vfio_region_info_cap_type` after its header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawRegionType {
    pub kind: u32,
    pub subtype: u32,
}

/// One sub-region of a VFIO_USER_DEVICE_GET_REGION_IO_FDS reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawSubRegion {
    pub offset: u64,
    pub size: u64,
    pub fd_index: u32,
    pub kind: u32,
    pub flags: u32,
    pub padding: u32,
    pub data: u64,
}

/// `struct vfio_irq_set` without its data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawIrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// `struct vfio_user_region_access` without its data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawRegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// One entry of VFIO_USER_REGION_WRITE_MULTI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawWriteOne {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; 8],
}
/// `argsz` and `flags`/`size`: the fixed part of DEVICE_FEATURE and of the
/// migration data messages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawTwoU32 {
    pub a: u32,
    pub b: u32,
}

/// `struct vfio_device_feature_dma_logging_control` (ranges follow inline).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawLoggingControl {
    pub page_size: u64,
    pub num_ranges: u32,
    pub reserved: u32,
}

/// `struct vfio_device_feature_dma_logging_report` (bitmap follows inline
/// in the reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct RawLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
}
