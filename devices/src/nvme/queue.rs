//! Submission and completion queue rings, and the doorbell page.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use super::guest::Guest;
use super::spec::{CQE_SIZE, Command, Completion, SQE_SIZE};
use crate::dma::DmaError;

/// A submission queue as the controller tracks it.
#[derive(Clone, Debug)]
pub(crate) struct Sq {
    pub qid: u16,
    pub base: u64,
    /// Number of entries.
    pub size: u32,
    /// Next entry the controller fetches.
    pub head: u32,
    /// Tail as last written by the host.
    pub tail: u32,
    /// Completion queue the entries complete to.
    pub cqid: u16,
    /// An invalid tail value already reported (not reported again).
    pub bad_tail: Option<u32>,
}

impl Sq {
    pub(crate) fn new(qid: u16, base: u64, size: u32, cqid: u16) -> Sq {
        Sq {
            qid,
            base,
            size,
            head: 0,
            tail: 0,
            cqid,
            bad_tail: None,
        }
    }

    /// Take a new tail value from the host. A value outside the queue is
    /// refused (the old tail is kept) with `Err(first)`, `first` being true
    /// the first time that value is seen, so the caller reports it once.
    pub(crate) fn set_tail(&mut self, tail: u32) -> Result<(), bool> {
        if tail >= self.size {
            let first = self.bad_tail != Some(tail);
            self.bad_tail = Some(tail);
            return Err(first);
        }
        self.bad_tail = None;
        self.tail = tail;
        Ok(())
    }

    pub(crate) fn has_work(&self) -> bool {
        self.head != self.tail
    }

    /// Read the entry at the head and advance the head.
    pub(crate) fn fetch(&mut self, g: &mut Guest<'_>) -> Result<Command, DmaError> {
        let mut b = [0u8; SQE_SIZE];
        let at = self
            .base
            .checked_add(u64::from(self.head) * SQE_SIZE as u64)
            .ok_or(DmaError::InvalidRange {
                iova: self.base,
                size: SQE_SIZE as u64,
            })?;
        g.read(at, &mut b)?;
        self.head = (self.head + 1) % self.size;
        Ok(Command::parse(&b))
    }
}

/// A completion queue as the controller tracks it.
#[derive(Clone, Debug)]
pub(crate) struct Cq {
    pub qid: u16,
    pub base: u64,
    /// Number of entries.
    pub size: u32,
    /// Head as last written by the host.
    pub head: u32,
    /// Next entry the controller writes.
    pub tail: u32,
    /// Phase tag of the current pass.
    pub phase: bool,
    /// MSI-X vector.
    pub vector: u16,
    /// Interrupts enabled.
    pub ien: bool,
    /// Entries posted since the last interrupt.
    pub notify: bool,
    /// An invalid head value already reported.
    pub bad_head: Option<u32>,
    /// The host's head when the last interrupt was raised, while the host
    /// has not moved it since (it has not run its handler yet).
    pub irq_unacked: Option<u32>,
}

impl Cq {
    pub(crate) fn new(qid: u16, base: u64, size: u32, vector: u16, ien: bool) -> Cq {
        Cq {
            qid,
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            vector,
            ien,
            notify: false,
            bad_head: None,
            irq_unacked: None,
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// Entries posted and not yet consumed by the host.
    pub(crate) fn used(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Take a new head value from the host: it must lie within the entries
    /// posted. `Err(first_time)` if not (the head is kept).
    pub(crate) fn set_head(&mut self, head: u32) -> Result<(), bool> {
        let advance = (head.wrapping_add(self.size).wrapping_sub(self.head)) % self.size.max(1);
        if head >= self.size || advance > self.used() {
            let first = self.bad_head != Some(head);
            self.bad_head = Some(head);
            return Err(first);
        }
        self.bad_head = None;
        self.head = head;
        Ok(())
    }

    /// Write a completion at the tail. The caller checked the queue is not
    /// full.
    pub(crate) fn post(&mut self, g: &mut Guest<'_>, c: &Completion) -> Result<(), DmaError> {
        let at = self
            .base
            .checked_add(u64::from(self.tail) * CQE_SIZE as u64)
            .ok_or(DmaError::InvalidRange {
                iova: self.base,
                size: CQE_SIZE as u64,
            })?;
        let (head, dw3) = c.encode(self.phase);
        g.write(at, &head)?;
        g.store_u32(at + 12, dw3)?;
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase = !self.phase;
        }
        self.notify = true;
        Ok(())
    }
}

/// Size of the doorbell page: 512 queue pairs at a stride of 4 bytes.
pub(crate) const DOORBELL_PAGE: usize = 4096;

/// The doorbell registers: SQ y tail at dword 2y, CQ y head at dword 2y+1.
/// In mmap mode the page is part of a sealed memfd the client maps, so guest
/// doorbell writes land here without a message; in trap mode it is private
/// memory written by region writes.
pub(crate) struct Doorbells {
    region: MmapRegion<()>,
    /// Offset of the doorbell page in `region`.
    base: usize,
    fd: Option<Arc<OwnedFd>>,
}

/// Offset of the doorbell page in the shared memfd: the file mirrors BAR0
/// from offset 0, so the client maps BAR0 offset 0x1000 at file offset
/// 0x1000. The register page before it is never mapped.
pub(crate) const DOORBELL_FILE_OFFSET: u64 = 0x1000;

impl std::fmt::Debug for Doorbells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbells")
            .field("shared", &self.fd.is_some())
            .finish()
    }
}

fn sealed_memfd(size: usize) -> io::Result<std::fs::File> {
    // SAFETY: the name is a valid C string and the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"vdevd-nvme-doorbells".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size as u64)?;
    // The client cannot shrink or grow the file under our mapping.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with a valid seal mask.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl Doorbells {
    pub(crate) fn new(shared: bool) -> io::Result<Doorbells> {
        if !shared {
            let region = MmapRegion::new(DOORBELL_PAGE).map_err(io::Error::other)?;
            return Ok(Doorbells {
                region,
                base: 0,
                fd: None,
            });
        }
        let base = DOORBELL_FILE_OFFSET as usize;
        let file = sealed_memfd(base + DOORBELL_PAGE)?;
        let fd = Arc::new(OwnedFd::from(file.try_clone()?));
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            base + DOORBELL_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(io::Error::other)?;
        Ok(Doorbells {
            region,
            base,
            fd: Some(fd),
        })
    }

    fn cell(&self, idx: usize) -> Option<&AtomicU32> {
        if idx >= DOORBELL_PAGE / 4 {
            return None;
        }
        self.region
            .get_atomic_ref::<AtomicU32>(self.base + idx * 4)
            .ok()
    }

    /// Dword `idx` (0 outside the page).
    pub(crate) fn get(&self, idx: usize) -> u32 {
        self.cell(idx)
            .map(|c| u32::from_le(c.load(Ordering::Acquire)))
            .unwrap_or(0)
    }

    /// Set dword `idx` (ignored outside the page).
    pub(crate) fn set(&self, idx: usize, v: u32) {
        if let Some(c) = self.cell(idx) {
            c.store(v.to_le(), Ordering::SeqCst);
        }
    }

    /// SQ `qid` tail.
    pub(crate) fn sq_tail(&self, qid: u16) -> u32 {
        self.get(2 * usize::from(qid))
    }

    /// CQ `qid` head.
    pub(crate) fn cq_head(&self, qid: u16) -> u32 {
        self.get(2 * usize::from(qid) + 1)
    }

    /// Zero the doorbells of queue pair `qid`.
    pub(crate) fn clear_pair(&self, qid: u16) {
        self.set(2 * usize::from(qid), 0);
        self.set(2 * usize::from(qid) + 1, 0);
    }

    /// Zero every doorbell.
    pub(crate) fn clear_all(&self) {
        for i in 0..DOORBELL_PAGE / 4 {
            self.set(i, 0);
        }
    }

    /// The memfd behind the page (mmap mode); the page is at
    /// [`DOORBELL_FILE_OFFSET`].
    pub(crate) fn fd(&self) -> Option<&Arc<OwnedFd>> {
        self.fd.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cq_head_must_stay_within_posted_entries() {
        let mut cq = Cq::new(1, 0, 4, 0, true);
        cq.tail = 2;
        assert_eq!(cq.used(), 2);
        assert_eq!(cq.set_head(3), Err(true));
        assert_eq!(cq.set_head(3), Err(false));
        assert_eq!(cq.set_head(4), Err(true));
        cq.set_head(1).unwrap();
        cq.set_head(2).unwrap();
        assert_eq!(cq.used(), 0);
        cq.tail = 1; // wrapped: 3 entries posted (2, 3, 0)
        assert!(cq.is_full());
        assert_eq!(cq.used(), 3);
        cq.set_head(0).unwrap();
        assert_eq!(cq.used(), 1);
    }

    #[test]
    fn sq_tail_must_be_inside_the_queue() {
        let mut sq = Sq::new(1, 0, 8, 1);
        assert_eq!(sq.set_tail(8), Err(true));
        assert_eq!(sq.set_tail(8), Err(false));
        sq.set_tail(7).unwrap();
        assert!(sq.has_work());
    }

    #[test]
    fn shared_doorbell_page_is_a_sealed_memfd() {
        let db = Doorbells::new(true).unwrap();
        let fd = db.fd().unwrap().clone();
        let file = std::fs::File::from(fd.try_clone().unwrap());
        // The client cannot truncate the page under us.
        assert!(file.set_len(0).is_err());
        // A write through another mapping of the file (the client's) is seen.
        use std::os::unix::fs::FileExt;
        file.write_all_at(&7u32.to_le_bytes(), DOORBELL_FILE_OFFSET + 8)
            .unwrap();
        assert_eq!(db.sq_tail(1), 7);
        db.set(3, 9);
        assert_eq!(db.cq_head(1), 9);
        db.clear_pair(1);
        assert_eq!(db.sq_tail(1), 0);
        assert_eq!(db.get(100_000), 0);
        let private = Doorbells::new(false).unwrap();
        assert!(private.fd().is_none());
    }
}
