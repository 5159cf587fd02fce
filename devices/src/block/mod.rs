//! Block backends: where the data of a virtual disk lives.
//!
//! One trait, [`BlockBackend`], serves every block device model (the NVMe
//! controller's namespace, virtio-blk). Requests name a byte offset on the
//! disk and a list of memory buffers ([`IoBufs`]) that usually point straight
//! into guest memory, so data moves between the backing store and the guest
//! without an intermediate copy. Backends are shared by all the worker
//! threads of a device: every method takes `&self` and none takes a lock on
//! the data path.
//!
//! * [`MemBackend`]: a sparse in-memory disk (anonymous memory, allocated on
//!   first write, released again by discard).
//! * [`FileBackend`]: a raw image file or block device, through the page
//!   cache or with `O_DIRECT` (bouncing through an aligned buffer when the
//!   guest's buffers do not meet the alignment the kernel asks for).
//!
//! Durability: [`BlockBackend::flush`] makes every completed write durable
//! (`fdatasync`). With the volatile write cache switched off
//! ([`BlockBackend::set_write_cache`]), or for a write with `fua`, each write
//! is durable when it completes (`RWF_DSYNC`).

mod file;
mod iobuf;
mod mem;

pub use file::{FileBackend, FileOptions};
pub use iobuf::{IoBufs, IoVecStorage};
pub use mem::MemBackend;

#[cfg(test)]
pub(crate) use file::tests::TempFile;

use std::io;

/// Why a block request failed. Device models map these to their own status
/// codes (NVMe status, virtio-blk status).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the disk.
    #[error("request {offset:#x}+{len:#x} reaches past the end of the disk ({size:#x} bytes)")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// Offset or length is not a multiple of the logical block size.
    #[error("request {offset:#x}+{len:#x} is not aligned to the block size ({block_size})")]
    Unaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The disk is read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The backing store has no space left for the write.
    #[error("no space left on the backing store")]
    NoSpace,
    /// The host failed the I/O.
    #[error("I/O error on the backing store: {0}")]
    Io(#[source] io::Error),
}

impl BlockError {
    /// Classify a host I/O error.
    pub fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockError::NoSpace,
            Some(libc::EROFS) => BlockError::ReadOnly,
            _ => BlockError::Io(e),
        }
    }
}

/// A virtual disk's backing store. See the module documentation.
pub trait BlockBackend: Send + Sync {
    /// Size of the disk in bytes (a multiple of [`BlockBackend::block_size`]).
    fn size(&self) -> u64;

    /// Logical block size in bytes: a power of two, 512 or more. Every
    /// request's offset and length are multiples of it.
    fn block_size(&self) -> u32;

    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;

    /// Read `bufs.len()` bytes at `offset` into `bufs`.
    fn read(&self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), BlockError>;

    /// Write `bufs` at `offset`. With `fua` (or the write cache off) the data
    /// is durable when this returns.
    fn write(&self, offset: u64, bufs: &IoBufs<'_>, fua: bool) -> Result<(), BlockError>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<(), BlockError>;

    /// Deallocate `[offset, offset + len)`. Afterwards the range reads as
    /// zeroes (the backend writes zeroes where it cannot deallocate).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Make `[offset, offset + len)` read as zeroes, deallocating it if
    /// `unmap` allows and the store can.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError>;

    /// Switch the volatile write cache on (writes are durable after a flush)
    /// or off (every write is durable when it completes).
    fn set_write_cache(&self, enabled: bool);

    /// Whether the volatile write cache is on.
    fn write_cache(&self) -> bool;

    /// A short description for logs ("memory, 1 GiB", "file /x (O_DIRECT)").
    fn describe(&self) -> String;
}

/// A block of zeroes, aligned for `O_DIRECT`, for writing zeroes where the
/// store cannot deallocate.
#[repr(C, align(4096))]
pub(crate) struct Zeroes(pub(crate) [u8; ZEROES_LEN]);

/// Size of [`ZEROES`].
pub(crate) const ZEROES_LEN: usize = 64 * 1024;

/// See [`Zeroes`].
pub(crate) static ZEROES: Zeroes = Zeroes([0; ZEROES_LEN]);

/// Fill a slice with zeroes.
pub(crate) fn zero_fill(slice: &vm_memory::VolatileSlice<'_>) {
    let mut at = 0;
    while at < slice.len() {
        let n = (slice.len() - at).min(ZEROES_LEN);
        if let Ok(part) = slice.subslice(at, n) {
            part.copy_from(&ZEROES.0[..n]);
        }
        at += n;
    }
}

/// Check that `[offset, offset + len)` is block aligned and inside a disk of
/// `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64, block_size: u32) -> Result<(), BlockError> {
    let bs = u64::from(block_size);
    if bs == 0 || offset % bs != 0 || len % bs != 0 {
        return Err(BlockError::Unaligned {
            offset,
            len,
            block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        assert!(check_range(0, 4096, 4096, 512).is_ok());
        assert!(check_range(512, 512, 4096, 512).is_ok());
        assert!(matches!(
            check_range(4096, 512, 4096, 512),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX - 511, 1024, u64::MAX, 512),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(1, 512, 4096, 512),
            Err(BlockError::Unaligned { .. })
        ));
        assert!(matches!(
            check_range(0, 100, 4096, 512),
            Err(BlockError::Unaligned { .. })
        ));
    }

    #[test]
    fn io_errors_are_classified() {
        assert!(matches!(
            BlockError::from_io(io::Error::from_raw_os_error(libc::ENOSPC)),
            BlockError::NoSpace
        ));
        assert!(matches!(
            BlockError::from_io(io::Error::from_raw_os_error(libc::EIO)),
            BlockError::Io(_)
        ));
    }
}
