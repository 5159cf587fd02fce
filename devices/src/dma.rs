//! Client memory as devices see it: the DMA address space.
//!
//! A vfio-user client grants the server access to its memory with DMA_MAP
//! messages. Each grant is an IOVA range backed in one of three ways:
//!
//! * **Mapped**: the client passed a file descriptor sealed against
//!   shrinking (QEMU's memfd guest RAM). vdevd maps the file `MAP_SHARED` and
//!   devices copy to and from it directly. Sealing matters: a client that
//!   truncated an unsealed file under a live mapping would make the server
//!   fault (SIGBUS) on its next access.
//! * **File**: the client passed a descriptor that is not sealed. Accesses use
//!   positioned reads and writes on it, so a truncated file yields a short
//!   read (an I/O error for the device), never a fault.
//! * **Message**: no descriptor. Accesses become VFIO_USER_DMA_READ/WRITE
//!   messages to the client, sent by the session that owns the socket (see
//!   [`DmaMessenger`]).
//!
//! Readers never lock: the table is an immutable snapshot behind an
//! [`ArcSwap`], and the ordered map inside it is persistent, so a map or
//! unmap publishes a new snapshot in O(log n). Device code either calls
//! [`DmaSpace::read`]/[`DmaSpace::write`], or takes a [`DmaMemory`] view
//! (which implements vm-memory's IOVA-level [`GuestMemory`], the interface
//! `virtio-queue` consumes) for the duration of one batch of work.
//!
//! Unmapping removes the range from the published table, then waits until no
//! view still references it before the mapping is released, so that the
//! reply to DMA_UNMAP is sent only once no device can touch the memory.
//!
//! A [`DmaMirror`] (the IOMMU of a real device, see `crate::passthrough`)
//! can be attached to a space: it is told about every file-backed range
//! exactly once when the range is added and once when it is removed, in the
//! order the space applies them, so that a real device's DMA reaches the
//! same client memory as the emulated devices' accesses do.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::iter::FusedIterator;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use imbl::OrdMap;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::volatile_memory::VolatileMemory;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, MmapRegion,
    Permissions, VolatileSlice,
};

/// Access rights of a DMA mapping, as granted by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// The device may read the range.
    pub read: bool,
    /// The device may write the range.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
    /// Read only.
    pub const RO: Prot = Prot {
        read: true,
        write: false,
    };

    fn allows(self, access: Permissions) -> bool {
        match access {
            Permissions::No => true,
            Permissions::Read => self.read,
            Permissions::Write => self.write,
            Permissions::ReadWrite => self.read && self.write,
        }
    }

    fn mmap_prot(self) -> i32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        p
    }
}

impl fmt::Display for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.read { "r" } else { "-" };
        let w = if self.write { "w" } else { "-" };
        write!(f, "{r}{w}")
    }
}

/// Why a DMA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// Part of the range is not covered by any mapping.
    #[error("no DMA mapping covers IOVA {iova:#x} (access of {len} bytes)")]
    Unmapped {
        /// First address not covered.
        iova: u64,
        /// Length of the access that failed.
        len: u64,
    },
    /// The mapping does not allow this kind of access.
    #[error("DMA {access} at IOVA {iova:#x} is not allowed by the mapping ({prot})")]
    Permission {
        /// Address of the refused access.
        iova: u64,
        /// "read" or "write".
        access: &'static str,
        /// What the mapping allows.
        prot: Prot,
    },
    /// A new mapping overlaps an existing one.
    #[error("DMA range {iova:#x}+{size:#x} overlaps an existing mapping")]
    Overlap {
        /// Start of the refused range.
        iova: u64,
        /// Size of the refused range.
        size: u64,
    },
    /// Zero size, or the range wraps past the end of the address space.
    #[error("invalid DMA range {iova:#x}+{size:#x}")]
    InvalidRange {
        /// Start of the refused range.
        iova: u64,
        /// Size of the refused range.
        size: u64,
    },
    /// An fd-backed range is not aligned to the page size.
    #[error(
        "DMA range {iova:#x}+{size:#x} (file offset {offset:#x}) is not aligned to {page_size:#x}"
    )]
    Unaligned {
        /// Start of the refused range.
        iova: u64,
        /// Size of the refused range.
        size: u64,
        /// File offset of the refused range.
        offset: u64,
        /// Required alignment.
        page_size: u64,
    },
    /// The range extends past the end of the client's file.
    #[error("file offset {offset:#x}+{size:#x} is past the end of the file ({file_size:#x} bytes)")]
    BeyondFile {
        /// Requested offset.
        offset: u64,
        /// Requested size.
        size: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// The number of mappings would exceed the negotiated limit.
    #[error("too many DMA mappings (limit {limit})")]
    TooManyMappings {
        /// The limit.
        limit: u32,
    },
    /// The total mapped size would exceed the configured limit.
    #[error("too many bytes mapped for DMA (limit {limit:#x})")]
    TooManyBytes {
        /// The limit, in bytes.
        limit: u64,
    },
    /// No mapping has exactly this range.
    #[error("no DMA mapping is exactly {iova:#x}+{size:#x}")]
    NotFound {
        /// Start of the requested range.
        iova: u64,
        /// Size of the requested range.
        size: u64,
    },
    /// Mapping the client's file failed.
    #[error("cannot map the client's file: {0}")]
    Mmap(#[source] io::Error),
    /// Reading or writing the client's file failed (or it was truncated).
    #[error("I/O on the client's memory file failed: {0}")]
    Io(#[source] io::Error),
    /// A DMA_READ/DMA_WRITE exchange with the client failed.
    #[error("DMA through the client failed: {0}")]
    Message(String),
    /// Message-backed DMA was attempted on the thread that serves the
    /// client's socket; waiting there for the client's reply would deadlock.
    #[error("message-backed DMA at IOVA {iova:#x} attempted from the session thread")]
    WouldDeadlock {
        /// Address of the refused access.
        iova: u64,
    },
    /// Dirty-page logging was asked for while it is not running, or with
    /// invalid parameters.
    #[error("dirty page logging: {0}")]
    Logging(&'static str),
    /// The address space's mirror (a real IOMMU) refused the range.
    #[error("IOMMU mapping of {iova:#x}+{size:#x} failed: {source}")]
    Mirror {
        /// Start of the refused range.
        iova: u64,
        /// Size of the refused range.
        size: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// A consumer that must see every file-backed range of a [`DmaSpace`]
/// exactly once: the IOMMU address space a real device's DMA goes through.
///
/// Calls are made with the space's writer lock held, in the order ranges
/// are added and removed. Ranges without a file are never mirrored (a real
/// device cannot reach memory the server only sees through messages).
pub trait DmaMirror: Send + Sync {
    /// `range` was added, backed by `file` from `offset`. An error refuses
    /// the range: it is not added to the space either.
    fn map(&self, range: &DmaRange, file: &Arc<File>, offset: u64) -> Result<(), DmaError>;
    /// `range` (added earlier through [`DmaMirror::map`]) was removed.
    fn unmap(&self, range: &DmaRange);
    /// The mirror as `Any`, so that its owner can find its own type again.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// Moves data between the server and client memory that was granted without
/// a file descriptor, using VFIO_USER_DMA_READ and VFIO_USER_DMA_WRITE.
///
/// Implemented by the server's session. Callers may block until the client
/// replies; they must not hold a [`DmaMemory`] view while doing so.
pub trait DmaMessenger: Send + Sync {
    /// Read `buf.len()` bytes at `iova` from the client.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Write `data` at `iova` in the client.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
}

/// Limits applied to a client's mappings.
#[derive(Clone, Copy, Debug)]
pub struct DmaLimits {
    /// Most mappings alive at once (`max_dma_maps`).
    pub max_maps: u32,
    /// Most bytes mapped at once, summed over all mappings.
    pub max_bytes: u64,
    /// Page size fd-backed mappings must be aligned to.
    pub page_size: u64,
}

impl Default for DmaLimits {
    fn default() -> Self {
        DmaLimits {
            max_maps: 65535,
            max_bytes: 1 << 40,
            page_size: 4096,
        }
    }
}

/// A DMA_MAP as the device layer sees it, once the wire message was checked.
#[derive(Debug)]
pub struct MapRequest {
    /// Start of the IOVA range.
    pub iova: u64,
    /// Size of the range in bytes.
    pub size: u64,
    /// Access rights.
    pub prot: Prot,
    /// The client's file and the offset of the range in it, if any.
    pub file: Option<(File, u64)>,
}

/// One mapping, as reported to devices and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRange {
    /// Start of the IOVA range.
    pub iova: u64,
    /// Size of the range in bytes.
    pub size: u64,
    /// Access rights.
    pub prot: Prot,
    /// How the range is backed.
    pub kind: BackingKind,
}

/// How a mapping reaches the client's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// Directly mapped (sealed file).
    Mapped,
    /// Positioned I/O on the client's file (unsealed file).
    File,
    /// DMA_READ/DMA_WRITE messages (no file).
    Message,
}

/// A whole client file mapped once and shared by every DMA range that
/// points into it (QEMU maps many ranges of one memfd).
struct FileMapping {
    region: MmapRegion<()>,
}

enum Backing {
    Mapped {
        mapping: Arc<FileMapping>,
        /// Offset of the range's first byte in `mapping`.
        offset: usize,
    },
    File {
        file: Arc<File>,
        offset: u64,
    },
    Message,
}

struct Region {
    iova: u64,
    size: u64,
    prot: Prot,
    backing: Backing,
}

impl Region {
    /// The client's file behind the range and the range's offset in it.
    fn file(&self) -> Option<(&Arc<File>, u64)> {
        match &self.backing {
            Backing::Mapped { mapping, offset } => mapping
                .region
                .file_offset()
                .map(|f| (f.arc(), f.start() + *offset as u64)),
            Backing::File { file, offset } => Some((file, *offset)),
            Backing::Message => None,
        }
    }

    fn end(&self) -> u64 {
        // Checked on insertion: iova + size never wraps.
        self.iova + self.size
    }

    fn range(&self) -> DmaRange {
        let kind = match self.backing {
            Backing::Mapped { .. } => BackingKind::Mapped,
            Backing::File { .. } => BackingKind::File,
            Backing::Message => BackingKind::Message,
        };
        DmaRange {
            iova: self.iova,
            size: self.size,
            prot: self.prot,
            kind,
        }
    }
}

/// Dirty-page log: one bit per page of each logged range.
struct DirtyLog {
    page_size: u64,
    ranges: Vec<DirtyRange>,
}

struct DirtyRange {
    iova: u64,
    len: u64,
    bits: Vec<AtomicU64>,
}

impl DirtyLog {
    fn mark(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let last = iova.saturating_add(len - 1);
        for r in &self.ranges {
            let r_last = r.iova + (r.len - 1);
            if last < r.iova || iova > r_last {
                continue;
            }
            let first_page = (iova.max(r.iova) - r.iova) / self.page_size;
            let last_page = (last.min(r_last) - r.iova) / self.page_size;
            for page in first_page..=last_page {
                if let Some(word) = r.bits.get((page / 64) as usize) {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            }
        }
    }
}

#[derive(Clone, Default)]
struct Snapshot {
    regions: OrdMap<u64, Arc<Region>>,
    bytes: u64,
    messenger: Option<Arc<dyn DmaMessenger>>,
    dirty: Option<Arc<DirtyLog>>,
}

impl Snapshot {
    /// The region that contains `iova`, if any.
    fn find(&self, iova: u64) -> Option<&Arc<Region>> {
        let (_, region) = self.regions.get_prev(&iova)?;
        (iova < region.end()).then_some(region)
    }

    fn overlaps(&self, iova: u64, end: u64) -> bool {
        if let Some((_, r)) = self.regions.get_prev(&iova) {
            if r.end() > iova {
                return true;
            }
        }
        self.regions
            .range(iova..end)
            .next()
            .is_some_and(|(start, _)| *start < end)
    }
}

/// State only writers touch, serialised by a mutex.
#[derive(Default)]
struct WriterState {
    /// Whole-file mappings by (device, inode, prot), shared across ranges.
    mappings: HashMap<(u64, u64, Prot), Weak<FileMapping>>,
}

/// A client's DMA address space. See the module documentation.
pub struct DmaSpace {
    current: ArcSwap<Snapshot>,
    writer: Mutex<WriterState>,
    mirror: Mutex<Option<Arc<dyn DmaMirror>>>,
    label: Mutex<String>,
    limits: Mutex<DmaLimits>,
    session_thread: Mutex<Option<std::thread::ThreadId>>,
}

impl Default for DmaSpace {
    fn default() -> Self {
        DmaSpace::new(DmaLimits::default())
    }
}

impl fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snap = self.current.load();
        f.debug_struct("DmaSpace")
            .field("mappings", &snap.regions.len())
            .field("bytes", &snap.bytes)
            .finish()
    }
}

/// How long an unmap waits for devices to drop their views of the range
/// before it gives up waiting (the memory stays mapped until they do).
const UNMAP_QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

fn file_is_sealed_against_shrinking(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of the open file description
    // behind a descriptor we own; it takes no pointer argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && (seals & libc::F_SEAL_SHRINK) != 0
}

impl DmaSpace {
    /// An empty address space with the given limits.
    pub fn new(limits: DmaLimits) -> Self {
        DmaSpace {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(WriterState::default()),
            mirror: Mutex::new(None),
            label: Mutex::new(String::new()),
            limits: Mutex::new(limits),
            session_thread: Mutex::new(None),
        }
    }

    /// Change the limits (after VERSION negotiation). Existing mappings stay.
    pub fn set_limits(&self, limits: DmaLimits) {
        *lock(&self.limits) = limits;
    }

    /// The limits in force.
    pub fn limits(&self) -> DmaLimits {
        *lock(&self.limits)
    }

    /// Name the space (for logs, e.g. the address space name of the
    /// configuration).
    pub fn set_label(&self, label: &str) {
        *lock(&self.label) = label.to_string();
    }

    /// The space's name, empty if it has none.
    pub fn label(&self) -> String {
        lock(&self.label).clone()
    }

    /// Attach `mirror`, which is first told about every file-backed range
    /// already mapped. Fails (and attaches nothing) if a mirror is already
    /// attached or refuses one of the existing ranges, which it is then told
    /// to forget again.
    pub fn set_mirror(&self, mirror: Arc<dyn DmaMirror>) -> Result<(), DmaError> {
        let _w = lock(&self.writer);
        let mut slot = lock(&self.mirror);
        if slot.is_some() {
            return Err(DmaError::Mirror {
                iova: 0,
                size: 0,
                source: io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let snap = self.current.load_full();
        let mut done: Vec<DmaRange> = Vec::new();
        for region in snap.regions.values() {
            let Some((file, offset)) = region.file() else {
                continue;
            };
            if let Err(e) = mirror.map(&region.range(), file, offset) {
                for r in done.iter().rev() {
                    mirror.unmap(r);
                }
                return Err(e);
            }
            done.push(region.range());
        }
        *slot = Some(mirror);
        Ok(())
    }

    /// The attached mirror, if any.
    pub fn mirror(&self) -> Option<Arc<dyn DmaMirror>> {
        lock(&self.mirror).clone()
    }

    /// Install (or remove) the messenger used for ranges mapped without a
    /// file, and record which thread serves the socket: message-backed DMA
    /// from that thread is refused instead of deadlocking.
    pub fn set_messenger(
        &self,
        messenger: Option<Arc<dyn DmaMessenger>>,
        session_thread: Option<std::thread::ThreadId>,
    ) {
        let _w = lock(&self.writer);
        *lock(&self.session_thread) = session_thread;
        let mut snap = Snapshot::clone(&self.current.load());
        snap.messenger = messenger;
        self.current.store(Arc::new(snap));
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.current.load().regions.len()
    }

    /// Whether no mapping is live.
    pub fn is_empty(&self) -> bool {
        self.current.load().regions.is_empty()
    }

    /// Every live mapping, in IOVA order.
    pub fn ranges(&self) -> Vec<DmaRange> {
        self.current
            .load()
            .regions
            .values()
            .map(|r| r.range())
            .collect()
    }

    /// The mapping that is exactly `iova`+`size`, if there is one (what
    /// [`DmaSpace::unmap`] would remove). O(log n).
    pub fn find(&self, iova: u64, size: u64) -> Option<DmaRange> {
        self.current
            .load()
            .regions
            .get(&iova)
            .filter(|r| r.size == size)
            .map(|r| r.range())
    }

    /// Add a mapping. Fails with [`DmaError::Overlap`] if any byte of the
    /// range is already mapped.
    pub fn map(&self, req: MapRequest) -> Result<DmaRange, DmaError> {
        let MapRequest {
            iova,
            size,
            prot,
            file,
        } = req;
        let end = iova
            .checked_add(size)
            .filter(|_| size != 0)
            .ok_or(DmaError::InvalidRange { iova, size })?;
        let limits = self.limits();
        let mut w = lock(&self.writer);
        let snap = self.current.load_full();
        if snap.overlaps(iova, end) {
            return Err(DmaError::Overlap { iova, size });
        }
        if snap.regions.len() >= limits.max_maps as usize {
            return Err(DmaError::TooManyMappings {
                limit: limits.max_maps,
            });
        }
        let bytes = snap
            .bytes
            .checked_add(size)
            .filter(|b| *b <= limits.max_bytes)
            .ok_or(DmaError::TooManyBytes {
                limit: limits.max_bytes,
            })?;
        let backing = match file {
            None => Backing::Message,
            Some((file, offset)) => {
                Self::file_backing(&mut w, &limits, iova, size, prot, file, offset)?
            }
        };
        let region = Arc::new(Region {
            iova,
            size,
            prot,
            backing,
        });
        let range = region.range();
        if let (Some(m), Some((file, offset))) = (lock(&self.mirror).as_ref(), region.file()) {
            m.map(&range, file, offset)?;
        }
        let mut next = Snapshot::clone(&snap);
        next.regions.insert(iova, region);
        next.bytes = bytes;
        self.current.store(Arc::new(next));
        Ok(range)
    }

    fn file_backing(
        w: &mut WriterState,
        limits: &DmaLimits,
        iova: u64,
        size: u64,
        prot: Prot,
        file: File,
        offset: u64,
    ) -> Result<Backing, DmaError> {
        let page = limits.page_size.max(1);
        if iova % page != 0 || size % page != 0 || offset % page != 0 {
            return Err(DmaError::Unaligned {
                iova,
                size,
                offset,
                page_size: page,
            });
        }
        let meta = file.metadata().map_err(DmaError::Io)?;
        let file_size = meta.len();
        if offset.checked_add(size).is_none_or(|e| e > file_size) {
            return Err(DmaError::BeyondFile {
                offset,
                size,
                file_size,
            });
        }
        if !file_is_sealed_against_shrinking(&file) {
            return Ok(Backing::File {
                file: Arc::new(file),
                offset,
            });
        }
        let key = (meta.dev(), meta.ino(), prot);
        let cached = w
            .mappings
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|m| m.region.size() as u64 >= offset + size);
        let mapping = match cached {
            Some(m) => m,
            None => {
                let len = usize::try_from(file_size)
                    .map_err(|_| DmaError::Mmap(io::Error::from_raw_os_error(libc::EFBIG)))?;
                let region = MmapRegion::build(
                    Some(FileOffset::new(file, 0)),
                    len,
                    prot.mmap_prot(),
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
                .map_err(|e| DmaError::Mmap(io::Error::other(e)))?;
                let m = Arc::new(FileMapping { region });
                w.mappings.retain(|_, v| v.strong_count() > 0);
                w.mappings.insert(key, Arc::downgrade(&m));
                m
            }
        };
        Ok(Backing::Mapped {
            mapping,
            // offset + size <= file_size, which fits in usize (checked above).
            offset: offset as usize,
        })
    }

    /// Remove the mapping that is exactly `iova`+`size`, and wait until no
    /// device view still references it.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<DmaRange, DmaError> {
        let removed = {
            let _w = lock(&self.writer);
            let snap = self.current.load_full();
            match snap.regions.get(&iova) {
                Some(r) if r.size == size => {}
                _ => return Err(DmaError::NotFound { iova, size }),
            }
            let mut next = Snapshot::clone(&snap);
            let removed = next
                .regions
                .remove(&iova)
                .ok_or(DmaError::NotFound { iova, size })?;
            next.bytes -= removed.size;
            self.current.store(Arc::new(next));
            self.unmirror(&removed);
            removed
        };
        let range = removed.range();
        wait_unreferenced(vec![removed]);
        Ok(range)
    }

    /// Remove every mapping, waiting until no device view references them.
    pub fn unmap_all(&self) -> Vec<DmaRange> {
        let removed: Vec<Arc<Region>> = {
            let _w = lock(&self.writer);
            let snap = self.current.load_full();
            let mut next = Snapshot::clone(&snap);
            let removed: Vec<Arc<Region>> = next.regions.values().cloned().collect();
            next.regions = OrdMap::new();
            next.bytes = 0;
            self.current.store(Arc::new(next));
            for r in &removed {
                self.unmirror(r);
            }
            removed
        };
        let ranges = removed.iter().map(|r| r.range()).collect();
        wait_unreferenced(removed);
        ranges
    }

    /// Tell the mirror (if any) that a file-backed range is gone. Called
    /// with the writer lock held.
    fn unmirror(&self, region: &Region) {
        if region.file().is_some() {
            if let Some(m) = lock(&self.mirror).as_ref() {
                m.unmap(&region.range());
            }
        }
    }

    /// A view of the address space for one batch of device work. Hold it
    /// only briefly: unmaps of ranges it covers wait for it to be dropped.
    pub fn memory(&self) -> DmaMemory {
        DmaMemory {
            snap: self.current.load_full(),
        }
    }

    /// Read `buf.len()` bytes at `iova`, across mappings if contiguous.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.access(iova, buf.len(), |snap, region, pos, done, len| {
            let dst = &mut buf[done..done + len];
            copy_region(snap, region, pos, Dir::Read(dst))
        })
    }

    /// Write `data` at `iova`, across mappings if contiguous.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.access(iova, data.len(), |snap, region, pos, done, len| {
            let src = &data[done..done + len];
            copy_region(snap, region, pos, Dir::Write(src))
        })
    }

    /// Walk `[iova, iova+len)` one region at a time, loading a fresh
    /// snapshot for each so that no snapshot is held across a message
    /// exchange with the client.
    fn access(
        &self,
        iova: u64,
        len: usize,
        mut f: impl FnMut(&Snapshot, &Region, u64, usize, usize) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let total = len as u64;
        iova.checked_add(total)
            .ok_or(DmaError::InvalidRange { iova, size: total })?;
        let mut done = 0usize;
        while done < len {
            let pos = iova + done as u64;
            let snap = self.current.load_full();
            let region = snap.find(pos).cloned().ok_or(DmaError::Unmapped {
                iova: pos,
                len: total,
            })?;
            let chunk = (region.end() - pos).min((len - done) as u64) as usize;
            if matches!(region.backing, Backing::Message) {
                if *lock(&self.session_thread) == Some(std::thread::current().id()) {
                    return Err(DmaError::WouldDeadlock { iova: pos });
                }
                // Do not hold the snapshot (and every region in it) while
                // waiting for the client.
                let dirty = snap.dirty.clone();
                let messenger = snap.messenger.clone();
                drop(snap);
                let shell = Snapshot {
                    messenger,
                    dirty,
                    ..Snapshot::default()
                };
                f(&shell, &region, pos, done, chunk)?;
            } else {
                f(&snap, &region, pos, done, chunk)?;
            }
            done += chunk;
        }
        Ok(())
    }

    /// Start logging the pages that devices write. `ranges` empty means
    /// every range mapped now.
    pub fn start_dirty_logging(
        &self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<(), DmaError> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(DmaError::Logging("page size must be a power of two"));
        }
        let _w = lock(&self.writer);
        let snap = self.current.load_full();
        if snap.dirty.is_some() {
            return Err(DmaError::Logging("already started"));
        }
        let wanted: Vec<(u64, u64)> = if ranges.is_empty() {
            snap.regions.values().map(|r| (r.iova, r.size)).collect()
        } else {
            ranges.to_vec()
        };
        let mut log = DirtyLog {
            page_size,
            ranges: Vec::with_capacity(wanted.len()),
        };
        for (iova, len) in wanted {
            if len == 0 || iova.checked_add(len).is_none() {
                return Err(DmaError::Logging("invalid range"));
            }
            let pages = len.div_ceil(page_size);
            let words = usize::try_from(pages.div_ceil(64))
                .map_err(|_| DmaError::Logging("range too large"))?;
            log.ranges.push(DirtyRange {
                iova,
                len,
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        let mut next = Snapshot::clone(&snap);
        next.dirty = Some(Arc::new(log));
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Stop logging dirty pages.
    pub fn stop_dirty_logging(&self) -> Result<(), DmaError> {
        let _w = lock(&self.writer);
        let snap = self.current.load_full();
        if snap.dirty.is_none() {
            return Err(DmaError::Logging("not started"));
        }
        let mut next = Snapshot::clone(&snap);
        next.dirty = None;
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Whether dirty logging is running.
    pub fn dirty_logging(&self) -> bool {
        self.current.load().dirty.is_some()
    }

    /// The dirty bitmap of `[iova, iova+len)` at `page_size` granularity
    /// (one bit per page, LSB first), clearing what it reports.
    pub fn take_dirty_bitmap(
        &self,
        iova: u64,
        len: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, DmaError> {
        let snap = self.current.load_full();
        let log = snap
            .dirty
            .as_ref()
            .ok_or(DmaError::Logging("not started"))?;
        if page_size == 0 || !page_size.is_power_of_two() || len == 0 {
            return Err(DmaError::Logging("invalid report parameters"));
        }
        iova.checked_add(len)
            .ok_or(DmaError::Logging("report range wraps"))?;
        let pages = len.div_ceil(page_size);
        let words = usize::try_from(pages.div_ceil(64))
            .map_err(|_| DmaError::Logging("range too large"))?;
        let mut out = vec![0u64; words];
        for r in &log.ranges {
            for (w, word) in r.bits.iter().enumerate() {
                let mut bits = word.load(Ordering::Relaxed);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page_iova = r.iova + (w as u64 * 64 + b) * log.page_size;
                    let page_end = page_iova.saturating_add(log.page_size);
                    if page_end <= iova || page_iova >= iova + len {
                        continue;
                    }
                    // Clear the bit now that it is reported.
                    word.fetch_and(!(1 << b), Ordering::Relaxed);
                    let from = (page_iova.max(iova) - iova) / page_size;
                    let to = (page_end.min(iova + len) - 1 - iova) / page_size;
                    for p in from..=to {
                        out[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind,
    // never a broken invariant worth aborting for.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_unreferenced(regions: Vec<Arc<Region>>) {
    let deadline = Instant::now() + UNMAP_QUIESCE_TIMEOUT;
    let mut backoff = Duration::from_micros(10);
    for r in regions {
        while Arc::strong_count(&r) > 1 {
            if Instant::now() >= deadline {
                log::warn!(
                    "DMA range {:#x}+{:#x} is still referenced by a device {} s after unmap; \
                     it stays mapped until released",
                    r.iova,
                    r.size,
                    UNMAP_QUIESCE_TIMEOUT.as_secs()
                );
                return;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }
}

enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

fn copy_region(snap: &Snapshot, region: &Region, pos: u64, dir: Dir<'_>) -> Result<(), DmaError> {
    let (access, name) = match dir {
        Dir::Read(_) => (Permissions::Read, "read"),
        Dir::Write(_) => (Permissions::Write, "write"),
    };
    if !region.prot.allows(access) {
        return Err(DmaError::Permission {
            iova: pos,
            access: name,
            prot: region.prot,
        });
    }
    let rel = pos - region.iova;
    match (&region.backing, dir) {
        (Backing::Mapped { mapping, offset }, dir) => {
            let len = match &dir {
                Dir::Read(b) => b.len(),
                Dir::Write(b) => b.len(),
            };
            let slice = mapping
                .region
                .get_slice(offset + rel as usize, len)
                .map_err(|e| DmaError::Io(io::Error::other(e)))?;
            match dir {
                Dir::Read(buf) => slice.copy_to(buf),
                Dir::Write(data) => {
                    slice.copy_from(data);
                    if let Some(d) = &snap.dirty {
                        d.mark(pos, data.len() as u64);
                    }
                    data.len()
                }
            };
            Ok(())
        }
        (Backing::File { file, offset }, Dir::Read(buf)) => {
            file.read_exact_at(buf, offset + rel).map_err(DmaError::Io)
        }
        (Backing::File { file, offset }, Dir::Write(data)) => {
            file.write_all_at(data, offset + rel)
                .map_err(DmaError::Io)?;
            if let Some(d) = &snap.dirty {
                d.mark(pos, data.len() as u64);
            }
            Ok(())
        }
        (Backing::Message, Dir::Read(buf)) => match &snap.messenger {
            Some(m) => m.read(pos, buf),
            None => Err(DmaError::Message("no client to relay DMA through".into())),
        },
        (Backing::Message, Dir::Write(data)) => match &snap.messenger {
            Some(m) => {
                m.write(pos, data)?;
                if let Some(d) = &snap.dirty {
                    d.mark(pos, data.len() as u64);
                }
                Ok(())
            }
            None => Err(DmaError::Message("no client to relay DMA through".into())),
        },
    }
}

/// A consistent view of the address space, for one batch of device work.
///
/// Implements vm-memory's [`GuestMemory`] (and so `Bytes<GuestAddress>`)
/// over the directly mapped ranges; ranges reached through positioned I/O
/// or messages have no host address and report
/// [`GuestMemoryError::HostAddressNotAvailable`] there. Use
/// [`DmaMemory::read`]/[`DmaMemory::write`] to reach every kind.
#[derive(Clone)]
pub struct DmaMemory {
    snap: Arc<Snapshot>,
}

impl fmt::Debug for DmaMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaMemory")
            .field("mappings", &self.snap.regions.len())
            .finish()
    }
}

impl DmaMemory {
    /// Read `buf.len()` bytes at `iova` from directly mapped or file-backed
    /// ranges (message-backed ranges need [`DmaSpace::read`]).
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.walk(iova, buf.len(), |region, pos, done, len| {
            copy_region(
                &self.snap,
                region,
                pos,
                Dir::Read(&mut buf[done..done + len]),
            )
        })
    }

    /// Write `data` at `iova` to directly mapped or file-backed ranges.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.walk(iova, data.len(), |region, pos, done, len| {
            copy_region(&self.snap, region, pos, Dir::Write(&data[done..done + len]))
        })
    }

    fn walk(
        &self,
        iova: u64,
        len: usize,
        mut f: impl FnMut(&Region, u64, usize, usize) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let total = len as u64;
        iova.checked_add(total)
            .ok_or(DmaError::InvalidRange { iova, size: total })?;
        let mut done = 0usize;
        while done < len {
            let pos = iova + done as u64;
            let region = self.snap.find(pos).ok_or(DmaError::Unmapped {
                iova: pos,
                len: total,
            })?;
            if matches!(region.backing, Backing::Message) {
                return Err(DmaError::Message(
                    "message-backed range reached through a memory view".into(),
                ));
            }
            let chunk = (region.end() - pos).min((len - done) as u64) as usize;
            f(region, pos, done, chunk)?;
            done += chunk;
        }
        Ok(())
    }
}

/// Iterator over the host slices that make up an IOVA range.
pub struct DmaSlices<'a> {
    snap: &'a Snapshot,
    pos: u64,
    remaining: usize,
    access: Permissions,
    failed: bool,
}

impl<'a> Iterator for DmaSlices<'a> {
    type Item = Result<VolatileSlice<'a, BS<'a, ()>>, GuestMemoryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.remaining == 0 {
            return None;
        }
        let item = self.next_slice();
        match &item {
            Ok(slice) => {
                self.pos += slice.len() as u64;
                self.remaining -= slice.len();
            }
            Err(_) => self.failed = true,
        }
        Some(item)
    }
}

impl<'a> DmaSlices<'a> {
    fn next_slice(&self) -> Result<VolatileSlice<'a, BS<'a, ()>>, GuestMemoryError> {
        let snap: &'a Snapshot = self.snap;
        let region = snap
            .find(self.pos)
            .ok_or(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                self.pos,
            )))?;
        if !region.prot.allows(self.access) {
            return Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                self.pos,
            )));
        }
        let Backing::Mapped { mapping, offset } = &region.backing else {
            return Err(GuestMemoryError::HostAddressNotAvailable);
        };
        let rel = (self.pos - region.iova) as usize;
        let len = ((region.end() - self.pos) as usize).min(self.remaining);
        let slice = mapping.region.get_slice(offset + rel, len)?;
        if matches!(self.access, Permissions::Write | Permissions::ReadWrite) {
            if let Some(d) = &snap.dirty {
                d.mark(self.pos, len as u64);
            }
        }
        Ok(slice)
    }
}

impl FusedIterator for DmaSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for DmaSlices<'a> {}

impl GuestMemory for DmaMemory {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        match self.get_slices(addr, count, access) {
            Ok(mut it) => it.all(|s| s.is_ok()),
            Err(_) => false,
        }
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>, GuestMemoryError> {
        addr.0
            .checked_add(count as u64)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        Ok(DmaSlices {
            snap: &self.snap,
            pos: addr.0,
            remaining: count,
            access,
            failed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::FromRawFd;
    use vm_memory::Bytes;

    /// A memfd of `size` bytes, sealed against shrinking when `seal`.
    pub(crate) fn memfd(size: u64, seal: bool) -> File {
        let name = CString::new("vdevd-test").unwrap();
        // SAFETY: name is a valid NUL-terminated string; flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        if seal {
            // SAFETY: F_ADD_SEALS on our own descriptor with a valid seal mask.
            let rc =
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(rc, 0);
        }
        file
    }

    fn map_fd(
        space: &DmaSpace,
        iova: u64,
        size: u64,
        file: &File,
        off: u64,
    ) -> Result<DmaRange, DmaError> {
        space.map(MapRequest {
            iova,
            size,
            prot: Prot::RW,
            file: Some((file.try_clone().unwrap(), off)),
        })
    }

    #[test]
    fn sealed_memfd_is_mapped_and_shared_with_client() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, true);
        let r = map_fd(&space, 0x10000, 0x2000, &f, 0x1000).unwrap();
        assert_eq!(r.kind, BackingKind::Mapped);
        space.write(0x10010, b"hello").unwrap();
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 0x1010).unwrap();
        assert_eq!(&buf, b"hello");
        // and through the vm-memory view
        let mem = space.memory();
        let v: u32 = mem.read_obj(GuestAddress(0x10010)).unwrap();
        assert_eq!(v, u32::from_le_bytes(*b"hell"));
    }

    #[test]
    fn unsealed_fd_uses_positioned_io_and_survives_truncation() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, false);
        let r = map_fd(&space, 0, 0x4000, &f, 0).unwrap();
        assert_eq!(r.kind, BackingKind::File);
        space.write(0x3000, &[7u8; 16]).unwrap();
        f.set_len(0x1000).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(space.read(0x3000, &mut buf), Err(DmaError::Io(_))));
        // no host address for the vm-memory view
        assert!(space.memory().read_obj::<u32>(GuestAddress(0)).is_err());
    }

    #[test]
    fn refuses_bad_maps() {
        let space = DmaSpace::new(DmaLimits {
            max_maps: 2,
            ..DmaLimits::default()
        });
        let f = memfd(0x4000, true);
        assert!(matches!(
            map_fd(&space, 0, 0, &f, 0),
            Err(DmaError::InvalidRange { .. })
        ));
        assert!(matches!(
            map_fd(&space, u64::MAX - 0xfff, 0x2000, &f, 0),
            Err(DmaError::InvalidRange { .. })
        ));
        assert!(matches!(
            map_fd(&space, 0x100, 0x1000, &f, 0),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            map_fd(&space, 0, 0x1000, &f, 0x800),
            Err(DmaError::Unaligned { .. })
        ));
        assert!(matches!(
            map_fd(&space, 0, 0x2000, &f, 0x3000),
            Err(DmaError::BeyondFile { .. })
        ));
        map_fd(&space, 0x2000, 0x2000, &f, 0).unwrap();
        assert!(matches!(
            map_fd(&space, 0x3000, 0x1000, &f, 0),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            map_fd(&space, 0x1000, 0x2000, &f, 0),
            Err(DmaError::Overlap { .. })
        ));
        assert!(matches!(
            map_fd(&space, 0x10000, 0x10000, &f, 0),
            Err(DmaError::BeyondFile { .. })
        ));
        map_fd(&space, 0x1000, 0x1000, &f, 0).unwrap();
        assert!(matches!(
            map_fd(&space, 0x8000, 0x1000, &f, 0),
            Err(DmaError::TooManyMappings { limit: 2 })
        ));
        assert_eq!(space.len(), 2);
    }

    #[test]
    fn unmap_exact_only_and_access_after_unmap_fails() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, true);
        map_fd(&space, 0x1000, 0x2000, &f, 0).unwrap();
        assert!(matches!(
            space.unmap(0x1000, 0x1000),
            Err(DmaError::NotFound { .. })
        ));
        assert!(matches!(
            space.unmap(0x2000, 0x1000),
            Err(DmaError::NotFound { .. })
        ));
        assert_eq!(space.find(0x1000, 0x1000), None);
        assert_eq!(space.find(0x2000, 0x1000), None);
        let found = space.find(0x1000, 0x2000).unwrap();
        assert_eq!(
            (found.iova, found.size, found.kind),
            (0x1000, 0x2000, BackingKind::Mapped)
        );
        space.unmap(0x1000, 0x2000).unwrap();
        assert_eq!(space.find(0x1000, 0x2000), None);
        let mut b = [0u8; 1];
        assert!(matches!(
            space.read(0x1000, &mut b),
            Err(DmaError::Unmapped { .. })
        ));
        assert!(space.is_empty());
    }

    #[test]
    fn access_spans_contiguous_mappings_but_not_holes() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, true);
        map_fd(&space, 0x0, 0x1000, &f, 0).unwrap();
        map_fd(&space, 0x1000, 0x1000, &f, 0x2000).unwrap();
        map_fd(&space, 0x3000, 0x1000, &f, 0x3000).unwrap();
        space.write(0xffe, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, 0xffe).unwrap();
        assert_eq!(b, [1, 2]);
        f.read_exact_at(&mut b, 0x2000).unwrap();
        assert_eq!(b, [3, 4]);
        let mut big = [0u8; 0x1002];
        assert!(matches!(
            space.read(0x1fff, &mut big),
            Err(DmaError::Unmapped { iova: 0x2000, .. })
        ));
    }

    #[test]
    fn read_only_mapping_refuses_writes() {
        let space = DmaSpace::default();
        let f = memfd(0x1000, true);
        space
            .map(MapRequest {
                iova: 0,
                size: 0x1000,
                prot: Prot::RO,
                file: Some((f, 0)),
            })
            .unwrap();
        assert!(matches!(
            space.write(0, &[1]),
            Err(DmaError::Permission { .. })
        ));
        assert!(space.memory().write_obj(1u8, GuestAddress(0)).is_err());
        let mut b = [0u8; 1];
        space.read(0, &mut b).unwrap();
    }

    struct FakeClient(Mutex<Vec<u8>>);
    impl DmaMessenger for FakeClient {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = self.0.lock().unwrap();
            buf.copy_from_slice(&m[iova as usize..iova as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            let mut m = self.0.lock().unwrap();
            m[iova as usize..iova as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn message_backed_ranges_go_through_the_messenger_off_the_session_thread() {
        let space = Arc::new(DmaSpace::default());
        let client = Arc::new(FakeClient(Mutex::new(vec![0; 0x2000])));
        space.set_messenger(Some(client.clone()), Some(std::thread::current().id()));
        space
            .map(MapRequest {
                iova: 0,
                size: 0x2000,
                prot: Prot::RW,
                file: None,
            })
            .unwrap();
        // on the session thread: refused, not deadlocked
        assert!(matches!(
            space.write(0x10, b"x"),
            Err(DmaError::WouldDeadlock { .. })
        ));
        let s = space.clone();
        std::thread::spawn(move || s.write(0x10, b"abc").unwrap())
            .join()
            .unwrap();
        assert_eq!(&client.0.lock().unwrap()[0x10..0x13], b"abc");
    }

    #[test]
    fn one_mmap_per_file_shared_by_ranges() {
        let space = DmaSpace::default();
        let f = memfd(0x100000, true);
        for i in 0..64u64 {
            map_fd(&space, i * 0x4000, 0x1000, &f, i * 0x1000).unwrap();
        }
        let w = lock(&space.writer);
        assert_eq!(w.mappings.len(), 1);
    }

    #[test]
    fn unmap_waits_for_views() {
        let space = Arc::new(DmaSpace::default());
        let f = memfd(0x1000, true);
        map_fd(&space, 0, 0x1000, &f, 0).unwrap();
        let view = space.memory();
        let s = space.clone();
        let t0 = Instant::now();
        let h = std::thread::spawn(move || {
            s.unmap(0, 0x1000).unwrap();
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        // the view still works: the mapping is alive until it is dropped
        view.write(0, b"z").unwrap();
        drop(view);
        let waited = h.join().unwrap();
        assert!(
            waited >= Duration::from_millis(100),
            "unmap returned before the view was dropped"
        );
    }

    #[test]
    fn dirty_log_reports_written_pages_once() {
        let space = DmaSpace::default();
        let f = memfd(0x10000, true);
        map_fd(&space, 0x10000, 0x10000, &f, 0).unwrap();
        assert!(space.take_dirty_bitmap(0x10000, 0x10000, 0x1000).is_err());
        space.start_dirty_logging(0x1000, &[]).unwrap();
        space.write(0x10000 + 0x3ffe, &[1, 2, 3]).unwrap(); // pages 3 and 4
        space
            .memory()
            .write_obj(7u8, GuestAddress(0x1f000))
            .unwrap(); // page 15
        let bm = space.take_dirty_bitmap(0x10000, 0x10000, 0x1000).unwrap();
        assert_eq!(bm, vec![(1 << 3) | (1 << 4) | (1 << 15)]);
        let bm = space.take_dirty_bitmap(0x10000, 0x10000, 0x1000).unwrap();
        assert_eq!(bm, vec![0]);
        space.stop_dirty_logging().unwrap();
        assert!(space.stop_dirty_logging().is_err());
    }

    /// Records what it is told; refuses ranges at `refuse_iova`.
    #[derive(Default)]
    struct RecordingMirror {
        log: Mutex<Vec<(&'static str, u64, u64, u64)>>,
        refuse_iova: Option<u64>,
    }

    impl DmaMirror for RecordingMirror {
        fn map(&self, range: &DmaRange, file: &Arc<File>, offset: u64) -> Result<(), DmaError> {
            if Some(range.iova) == self.refuse_iova {
                return Err(DmaError::Mirror {
                    iova: range.iova,
                    size: range.size,
                    source: io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            assert!(file.metadata().unwrap().len() >= offset + range.size);
            lock(&self.log).push(("map", range.iova, range.size, offset));
            Ok(())
        }
        fn unmap(&self, range: &DmaRange) {
            lock(&self.log).push(("unmap", range.iova, range.size, 0));
        }
        fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
            self
        }
    }

    #[test]
    fn mirror_sees_each_file_backed_range_once_in_order() {
        let space = DmaSpace::default();
        let sealed = memfd(0x4000, true);
        let plain = memfd(0x4000, false);
        // mapped before the mirror: replayed when it is attached
        map_fd(&space, 0x1000, 0x1000, &sealed, 0x2000).unwrap();
        space
            .map(MapRequest {
                iova: 0x8000,
                size: 0x1000,
                prot: Prot::RO,
                file: None,
            })
            .unwrap();
        let m = Arc::new(RecordingMirror::default());
        space.set_mirror(m.clone()).unwrap();
        assert_eq!(*lock(&m.log), vec![("map", 0x1000, 0x1000, 0x2000)]);
        // a second mirror is refused
        let other = Arc::new(RecordingMirror::default());
        assert!(matches!(
            space.set_mirror(other),
            Err(DmaError::Mirror { .. })
        ));
        map_fd(&space, 0x2000, 0x2000, &plain, 0x1000).unwrap();
        space.unmap(0x1000, 0x1000).unwrap();
        // message-backed ranges are never mirrored
        space.unmap(0x8000, 0x1000).unwrap();
        space.unmap_all();
        assert_eq!(
            *lock(&m.log),
            vec![
                ("map", 0x1000, 0x1000, 0x2000),
                ("map", 0x2000, 0x2000, 0x1000),
                ("unmap", 0x1000, 0x1000, 0),
                ("unmap", 0x2000, 0x2000, 0),
            ]
        );
        // the owner finds its own type again
        let any = space.mirror().unwrap().as_any();
        assert!(any.downcast::<RecordingMirror>().is_ok());
    }

    #[test]
    fn a_range_the_mirror_refuses_is_not_mapped() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, true);
        let m = Arc::new(RecordingMirror {
            refuse_iova: Some(0x3000),
            ..RecordingMirror::default()
        });
        space.set_mirror(m.clone()).unwrap();
        map_fd(&space, 0x1000, 0x1000, &f, 0).unwrap();
        let e = map_fd(&space, 0x3000, 0x1000, &f, 0x1000).unwrap_err();
        assert!(matches!(e, DmaError::Mirror { iova: 0x3000, .. }), "{e}");
        assert_eq!(space.len(), 1);
        assert!(space.find(0x3000, 0x1000).is_none());
        assert_eq!(lock(&m.log).len(), 1);
    }

    #[test]
    fn attaching_a_mirror_that_refuses_an_existing_range_unwinds() {
        let space = DmaSpace::default();
        let f = memfd(0x4000, true);
        map_fd(&space, 0x1000, 0x1000, &f, 0).unwrap();
        map_fd(&space, 0x2000, 0x1000, &f, 0x1000).unwrap();
        map_fd(&space, 0x3000, 0x1000, &f, 0x2000).unwrap();
        let m = Arc::new(RecordingMirror {
            refuse_iova: Some(0x3000),
            ..RecordingMirror::default()
        });
        assert!(space.set_mirror(m.clone()).is_err());
        assert!(space.mirror().is_none());
        assert_eq!(
            *lock(&m.log),
            vec![
                ("map", 0x1000, 0x1000, 0),
                ("map", 0x2000, 0x1000, 0x1000),
                ("unmap", 0x2000, 0x1000, 0),
                ("unmap", 0x1000, 0x1000, 0),
            ]
        );
        assert_eq!(space.len(), 3, "the space itself is untouched");
    }
}
