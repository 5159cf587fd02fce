//! A sparse in-memory disk.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{MmapRegion, VolatileMemory};

use super::{BlockBackend, BlockError, IoBufs, check_range, zero_fill};

/// Granularity at which discarded memory is given back to the host.
const PAGE: u64 = 4096;

/// A disk held in anonymous memory reserved without backing
/// (`MAP_NORESERVE`): pages are allocated on first write, so a large disk
/// costs nothing until the guest writes to it, and discard / write-zeroes
/// give whole pages back (`MADV_DONTNEED`). Contents are lost when the
/// process exits.
pub struct MemBackend {
    region: MmapRegion<()>,
    size: u64,
    block_size: u32,
    write_cache: AtomicBool,
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBackend")
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl MemBackend {
    /// A zero-filled disk of `size` bytes with `block_size`-byte blocks
    /// (512 or 4096). `size` must be a non-zero multiple of `block_size`.
    pub fn new(size: u64, block_size: u32) -> std::io::Result<Self> {
        if !(block_size == 512 || block_size == 4096) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("block size {block_size} is not 512 or 4096"),
            ));
        }
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("disk size {size} is not a non-zero multiple of {block_size}"),
            ));
        }
        let len = usize::try_from(size).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "disk size too large")
        })?;
        let region = MmapRegion::new(len).map_err(std::io::Error::other)?;
        Ok(MemBackend {
            region,
            size,
            block_size,
            write_cache: AtomicBool::new(true),
        })
    }

    fn slice(&self, offset: u64, len: u64) -> Result<vm_memory::VolatileSlice<'_>, BlockError> {
        check_range(offset, len, self.size, self.block_size)?;
        // In range (checked above) and the region is `size` bytes long.
        self.region
            .get_slice(offset as usize, len as usize)
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))
    }

    /// Zero `[offset, offset + len)`, giving whole pages back to the host.
    fn zero(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let whole = self.slice(offset, len)?;
        let first_page = offset.div_ceil(PAGE) * PAGE;
        let end = offset + len;
        let last_page = end / PAGE * PAGE;
        if first_page >= last_page {
            zero_fill(&whole);
            return Ok(());
        }
        if first_page > offset {
            zero_fill(
                &whole
                    .subslice(0, (first_page - offset) as usize)
                    .map_err(|e| BlockError::Io(std::io::Error::other(e)))?,
            );
        }
        if end > last_page {
            zero_fill(
                &whole
                    .subslice((last_page - offset) as usize, (end - last_page) as usize)
                    .map_err(|e| BlockError::Io(std::io::Error::other(e)))?,
            );
        }
        let pages = whole
            .subslice(
                (first_page - offset) as usize,
                (last_page - first_page) as usize,
            )
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        let addr = pages.ptr_guard_mut().as_ptr();
        // SAFETY: `addr .. addr + len` is a page-aligned part of our own
        // private anonymous mapping (offset and the mapping start are page
        // aligned); MADV_DONTNEED makes it read as zeroes and frees the
        // pages. Concurrent accesses of it are volatile copies, which see
        // either the old data or zeroes.
        let rc = unsafe { libc::madvise(addr.cast(), pages.len(), libc::MADV_DONTNEED) };
        if rc != 0 {
            // Not fatal: zero the memory by hand instead.
            zero_fill(&pages);
        }
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), BlockError> {
        let src = self.slice(offset, bufs.len() as u64)?;
        let mut at = 0usize;
        for dst in bufs.slices() {
            let part = src
                .subslice(at, dst.len())
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
            part.copy_to_volatile_slice(dst);
            at += dst.len();
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &IoBufs<'_>, _fua: bool) -> Result<(), BlockError> {
        let dst = self.slice(offset, bufs.len() as u64)?;
        let mut at = 0usize;
        for src in bufs.slices() {
            let part = dst
                .subslice(at, src.len())
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
            src.copy_to_volatile_slice(part);
            at += src.len();
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        self.zero(offset, len)
    }

    fn set_write_cache(&self, enabled: bool) {
        self.write_cache.store(enabled, Ordering::Relaxed);
    }

    fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        format!("memory, {} bytes", self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::IoVecStorage;

    fn resident_pages(b: &MemBackend) -> usize {
        let pages = (b.size / PAGE) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is our own mapping of `size` bytes and `vec`
        // has one byte per page of it.
        let rc = unsafe {
            libc::mincore(
                b.region.as_ptr().cast(),
                b.size as usize,
                vec.as_mut_ptr().cast(),
            )
        };
        assert_eq!(rc, 0);
        vec.iter().filter(|v| **v & 1 != 0).count()
    }

    #[test]
    fn large_disk_costs_nothing_until_written() {
        let b = MemBackend::new(1 << 30, 512).unwrap();
        assert_eq!(resident_pages(&b), 0);
        let mut st = IoVecStorage::new();
        let mut data = vec![0x5au8; 8192];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        b.write(1 << 20, &bufs, false).unwrap();
        assert_eq!(resident_pages(&b), 2);
        b.discard(1 << 20, 8192).unwrap();
        assert_eq!(resident_pages(&b), 0);
    }

    #[test]
    fn write_read_roundtrip_and_partial_zeroing() {
        let b = MemBackend::new(64 * 1024, 512).unwrap();
        let mut st = IoVecStorage::new();
        let mut data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let mut bufs = st.bufs();
        let (x, y) = data.split_at_mut(1000);
        bufs.push_bytes(x);
        bufs.push_bytes(y);
        b.write(4096, &bufs, true).unwrap();
        // zero a range that starts and ends inside pages
        b.write_zeroes(4096 + 512, 8192, false).unwrap();
        let mut back = vec![0xffu8; 16384];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut back);
        b.read(4096, &bufs).unwrap();
        let expect: Vec<u8> = (0..16384u32)
            .map(|i| {
                if (512..512 + 8192).contains(&i) {
                    0
                } else {
                    (i % 251) as u8
                }
            })
            .collect();
        assert_eq!(back, expect);
    }

    #[test]
    fn refuses_bad_requests() {
        assert!(MemBackend::new(1000, 512).is_err());
        assert!(MemBackend::new(0, 512).is_err());
        assert!(MemBackend::new(4096, 1024).is_err());
        let b = MemBackend::new(4096, 512).unwrap();
        let mut st = IoVecStorage::new();
        let mut data = vec![0u8; 1024];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        assert!(matches!(
            b.read(3584, &bufs),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            b.write(100, &bufs, false),
            Err(BlockError::Unaligned { .. })
        ));
        assert!(matches!(
            b.discard(0, 8192),
            Err(BlockError::OutOfRange { .. })
        ));
        b.set_write_cache(false);
        assert!(!b.write_cache());
    }
}
