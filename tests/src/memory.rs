//! Client memory the server reaches by DMA.
//!
//! * [`SharedMemory`]: a memfd the test maps itself and hands to the
//!   server with DMA_MAP (like QEMU's `memory-backend-memfd,share=on`
//!   guest RAM). Sealed against shrinking by default, so the server maps it
//!   (zero-copy); [`SharedMemory::unsealed`] gives one the server must
//!   reach with pread/pwrite.
//! * [`MessageMemory`]: ranges mapped without a descriptor, held in plain
//!   buffers; the [`crate::Client`] answers the server's DMA_READ and
//!   DMA_WRITE requests from them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::Error;

/// A memfd mapped into the test process.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    map: MmapRegion,
    name: String,
}

impl SharedMemory {
    /// `size` bytes, sealed against shrinking. `name` tags the memfd so a
    /// test can find it in the server's `/proc/PID/fd`.
    pub fn new(name: &str, size: u64) -> Result<SharedMemory, Error> {
        SharedMemory::create(name, size, true)
    }

    /// `size` bytes, not sealed: the server must not mmap it.
    pub fn unsealed(name: &str, size: u64) -> Result<SharedMemory, Error> {
        SharedMemory::create(name, size, false)
    }

    fn create(name: &str, size: u64, seal: bool) -> Result<SharedMemory, Error> {
        let file = crate::sys::memfd(name, size, seal).map_err(|e| Error::io("memfd", e))?;
        let len = usize::try_from(size).map_err(|_| Error::Unexpected("memfd size".into()))?;
        let clone = file.try_clone().map_err(|e| Error::io("dup", e))?;
        let map = MmapRegion::from_file(FileOffset::new(clone, 0), len)
            .map_err(|e| Error::Unexpected(format!("mmap: {e}")))?;
        Ok(SharedMemory {
            file,
            map,
            name: name.to_string(),
        })
    }

    /// Map `len` bytes of `file` from `offset` (e.g. a region's descriptor
    /// from the server).
    pub fn map_file(file: File, offset: u64, len: u64) -> Result<SharedMemory, Error> {
        let len = usize::try_from(len).map_err(|_| Error::Unexpected("mapping size".into()))?;
        let clone = file.try_clone().map_err(|e| Error::io("dup", e))?;
        let map = MmapRegion::from_file(FileOffset::new(clone, offset), len)
            .map_err(|e| Error::Unexpected(format!("mmap: {e}")))?;
        Ok(SharedMemory {
            file,
            map,
            name: String::new(),
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether the size is zero.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The text `/proc/PID/fd/N` links to for this memfd.
    pub fn proc_link(&self) -> String {
        format!("/memfd:{} (deleted)", self.name)
    }

    /// The file (to pass with DMA_MAP, or to truncate in a test).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn range(&self, offset: u64, len: usize) -> Result<(usize, usize), Error> {
        let start = usize::try_from(offset).map_err(|_| Error::Unexpected("offset".into()))?;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.map.len())
            .ok_or_else(|| {
                Error::Unexpected(format!(
                    "{len} bytes at {offset:#x} are outside the {:#x}-byte memory",
                    self.map.len()
                ))
            })?;
        Ok((start, end - start))
    }

    /// Copy `len` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let (start, len) = self.range(offset, len)?;
        let mut out = vec![0u8; len];
        self.map
            .get_slice(start, len)
            .and_then(|s| s.read_slice(&mut out, 0))
            .map_err(|e| Error::Unexpected(format!("read mapping: {e}")))?;
        Ok(out)
    }

    /// Copy `data` into the mapping at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let (start, len) = self.range(offset, data.len())?;
        self.map
            .get_slice(start, len)
            .and_then(|s| s.write_slice(data, 0))
            .map_err(|e| Error::Unexpected(format!("write mapping: {e}")))
    }
}

impl AsFd for SharedMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for SharedMemory {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// One range mapped without a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MessageRange {
    data: Vec<u8>,
    write: bool,
}

/// Client memory reached by DMA_READ/DMA_WRITE messages: the ranges the
/// client mapped without a descriptor, keyed by IOVA.
#[derive(Clone, Debug, Default)]
pub struct MessageMemory {
    ranges: BTreeMap<u64, MessageRange>,
}

impl MessageMemory {
    /// Add a zero-filled range of `size` bytes at `iova`. `write` says
    /// whether the server may write it (the DMA_MAP WRITE flag).
    pub fn add(&mut self, iova: u64, size: u64, write: bool) -> Result<(), Error> {
        let len = usize::try_from(size)
            .ok()
            .filter(|l| *l <= 1 << 30)
            .ok_or_else(|| Error::Unexpected(format!("message-backed range of {size:#x} bytes")))?;
        self.ranges.insert(
            iova,
            MessageRange {
                data: vec![0; len],
                write,
            },
        );
        Ok(())
    }

    /// Remove the range that starts at `iova`.
    pub fn remove(&mut self, iova: u64) -> bool {
        self.ranges.remove(&iova).is_some()
    }

    /// Remove every range.
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The range holding `[iova, iova + len)` and the offset in it.
    fn locate(&self, iova: u64, len: u64) -> Option<(u64, usize)> {
        let (&start, r) = self.ranges.range(..=iova).next_back()?;
        let offset = iova - start;
        let end = offset.checked_add(len)?;
        (end <= r.data.len() as u64).then_some((start, offset as usize))
    }

    /// Copy `len` bytes at `iova` out of client memory; `None` if any byte
    /// is not mapped.
    pub fn read(&self, iova: u64, len: u64) -> Option<Vec<u8>> {
        let (start, offset) = self.locate(iova, len)?;
        let r = self.ranges.get(&start)?;
        r.data
            .get(offset..offset.checked_add(usize::try_from(len).ok()?)?)
            .map(<[u8]>::to_vec)
    }

    /// Copy `data` into client memory at `iova`; false if any byte is not
    /// mapped or the range is read-only.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> bool {
        let Some((start, offset)) = self.locate(iova, data.len() as u64) else {
            return false;
        };
        let Some(r) = self.ranges.get_mut(&start) else {
            return false;
        };
        if !r.write {
            return false;
        }
        match r.data.get_mut(offset..offset + data.len()) {
            Some(dst) => {
                dst.copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// Fill client memory from the test (regardless of the WRITE flag).
    pub fn fill(&mut self, iova: u64, data: &[u8]) -> Result<(), Error> {
        let (start, offset) = self
            .locate(iova, data.len() as u64)
            .ok_or_else(|| Error::Unexpected(format!("{iova:#x} is not message-backed memory")))?;
        let r = self
            .ranges
            .get_mut(&start)
            .ok_or_else(|| Error::Unexpected("range vanished".into()))?;
        r.data[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_is_the_file() {
        let m = SharedMemory::new("memory-test", 8192).unwrap();
        assert_eq!(m.len(), 8192);
        m.write(4090, b"across").unwrap();
        let mut got = [0u8; 6];
        std::os::unix::fs::FileExt::read_exact_at(m.file(), &mut got, 4090).unwrap();
        assert_eq!(&got, b"across");
        std::os::unix::fs::FileExt::write_all_at(m.file(), b"back", 100).unwrap();
        assert_eq!(m.read(100, 4).unwrap(), b"back");
        assert!(m.read(8190, 4).is_err());
        assert!(m.write(u64::MAX, b"x").is_err());
        assert_eq!(m.proc_link(), "/memfd:memory-test (deleted)");
    }

    #[test]
    fn message_memory_bounds_and_permissions() {
        let mut m = MessageMemory::default();
        m.add(0x1000, 0x100, true).unwrap();
        m.add(0x2000, 0x10, false).unwrap();
        assert!(m.write(0x10f0, &[7; 16]));
        assert_eq!(m.read(0x10f0, 16).unwrap(), vec![7; 16]);
        // crossing the end, before the start, in a hole
        assert!(m.read(0x10f1, 16).is_none());
        assert!(!m.write(0x10f1, &[0; 16]));
        assert!(m.read(0xfff, 1).is_none());
        assert!(m.read(0x1100, 1).is_none());
        assert!(m.read(u64::MAX, 2).is_none());
        // read-only to the server, writable by the test
        assert!(!m.write(0x2000, &[1]));
        m.fill(0x2000, &[1, 2]).unwrap();
        assert_eq!(m.read(0x2000, 2).unwrap(), [1, 2]);
        assert!(m.remove(0x1000));
        assert!(m.read(0x1000, 1).is_none());
    }
}
