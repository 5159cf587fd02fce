//! The interface between a device model and the transport that serves it.
//!
//! A [`Device`] speaks in VFIO terms (regions, interrupt indexes, DMA
//! ranges) and knows nothing of sockets or message framing. The vfio-user
//! session in the server drives it from one thread; a device that needs
//! background work (queue processing, DMA engines) owns its own worker
//! threads and shares state with them internally.
//!
//! Region and interrupt indexes follow VFIO's PCI layout (BAR0..BAR5 = 0..5,
//! ROM = 6, config space = 7, VGA = 8; INTx = 0, MSI = 1, MSI-X = 2, ERR = 3,
//! REQ = 4); see `vdevd_protocol::vfio`.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::Error;
use crate::dma::DmaRange;

/// What VFIO_USER_DEVICE_GET_INFO reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Number of regions (at least 9 for a PCI device).
    pub num_regions: u32,
    /// Number of interrupt indexes (5 for a PCI device).
    pub num_irqs: u32,
    /// The device supports VFIO_USER_DEVICE_RESET.
    pub reset: bool,
}

/// One area of a region the client may mmap, relative to the region start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Offset of the area in the region.
    pub offset: u64,
    /// Size of the area.
    pub size: u64,
}

/// How the client may map (part of) a region.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file the client mmaps; sent with the region info reply.
    pub fd: Arc<OwnedFd>,
    /// Offset in `fd` that corresponds to offset 0 of the region.
    pub offset: u64,
    /// The mappable areas. Empty means the whole region; otherwise the
    /// region info carries a sparse-mmap capability listing them.
    pub areas: Vec<MmapArea>,
}

/// A device-specific region type (VFIO_REGION_INFO_CAP_TYPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionType {
    /// Type, e.g. VFIO_REGION_TYPE_PCI_VENDOR_TYPE | vendor.
    pub kind: u32,
    /// Sub-type.
    pub subtype: u32,
}

/// What VFIO_USER_DEVICE_GET_REGION_INFO reports for one region.
#[derive(Clone, Debug, Default)]
pub struct RegionInfo {
    /// Size in bytes (0 for an absent region).
    pub size: u64,
    /// The client may read the region.
    pub read: bool,
    /// The client may write the region.
    pub write: bool,
    /// The region (or parts of it) can be mmapped.
    pub mmap: Option<RegionMmap>,
    /// Device-specific type, for regions beyond the PCI ones.
    pub region_type: Option<RegionType>,
}

/// What VFIO_USER_DEVICE_GET_IRQ_INFO reports for one interrupt index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors (0 if the index is not supported).
    pub count: u32,
    /// VFIO_IRQ_INFO_EVENTFD.
    pub eventfd: bool,
    /// VFIO_IRQ_INFO_MASKABLE.
    pub maskable: bool,
    /// VFIO_IRQ_INFO_AUTOMASKED.
    pub automasked: bool,
    /// VFIO_IRQ_INFO_NORESIZE.
    pub noresize: bool,
}

/// The action of a VFIO_USER_DEVICE_SET_IRQS request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// Mask the vectors.
    Mask,
    /// Unmask the vectors.
    Unmask,
    /// Trigger the vectors, or (with eventfds) set what triggering signals.
    Trigger,
}

/// The data of a VFIO_USER_DEVICE_SET_IRQS request.
#[derive(Debug)]
pub enum IrqData {
    /// Act on every vector in the range (DATA_NONE). With `count == 0` and
    /// action Trigger: disable the whole index.
    None,
    /// Act on the vectors whose flag is true (DATA_BOOL).
    Bool(Vec<bool>),
    /// Set (Some) or clear (None) the eventfd of each vector (DATA_EVENTFD).
    /// An empty vector with `count == 0` disables the index.
    Eventfds(Vec<Option<IrqFd>>),
}

/// A checked VFIO_USER_DEVICE_SET_IRQS request.
#[derive(Debug)]
pub struct IrqSet {
    /// Interrupt index (INTx, MSI, MSI-X, ...).
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// What to do.
    pub action: IrqAction,
    /// With what.
    pub data: IrqData,
}

/// An eventfd the client gave for signalling an interrupt (or a mask event).
///
/// The session checks that the descriptor is an eventfd and makes it
/// non-blocking before handing it over, so [`IrqFd::signal`] never blocks,
/// whatever the client does to the counter.
#[derive(Debug)]
pub struct IrqFd(File);

impl IrqFd {
    /// Wrap a descriptor already checked to be a non-blocking eventfd.
    pub fn new(fd: OwnedFd) -> Self {
        IrqFd(File::from(fd))
    }

    /// Signal the eventfd (add 1 to its counter). A full counter means the
    /// client has not consumed earlier signals; the interrupt is already
    /// pending on its side, so that case is not an error.
    pub fn signal(&self) -> io::Result<()> {
        match (&self.0).write(&1u64.to_ne_bytes()) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Duplicate the descriptor (e.g. to hand it to the kernel).
    pub fn try_clone(&self) -> io::Result<IrqFd> {
        Ok(IrqFd(self.0.try_clone()?))
    }
}

impl AsFd for IrqFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for IrqFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// One ioeventfd sub-region for VFIO_USER_DEVICE_GET_REGION_IO_FDS: a write
/// to `offset` (of `size` bytes, matching `datamatch` if set) signals `fd`.
#[derive(Clone, Debug)]
pub struct IoEventFd {
    /// Offset of the sub-region in the region.
    pub offset: u64,
    /// Access size (0: any).
    pub size: u64,
    /// The eventfd the device watches.
    pub fd: Arc<OwnedFd>,
    /// Only writes of this value signal, if set.
    pub datamatch: Option<u64>,
}

/// A device model, as a vfio-user (or any VFIO-like) transport drives it.
///
/// Every method is called from the session thread that owns the device;
/// none may block on the client (see [`crate::dma::DmaMessenger`]).
pub trait Device: Send {
    /// A short name for logs ("sample", "nvme", ...).
    fn name(&self) -> &str;

    /// Device flags and counts.
    fn info(&self) -> DeviceInfo;

    /// Description of region `index`.
    fn region_info(&self, index: u32) -> Result<RegionInfo, Error>;

    /// Read `data.len()` bytes at `offset` of region `index`. The caller
    /// has checked nothing but that the access fits in `u64`.
    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error>;

    /// Write `data` at `offset` of region `index`.
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error>;

    /// The ioeventfds the client may wire up for region `index` (empty if
    /// the device offers none).
    fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoEventFd>, Error>;

    /// Description of interrupt index `index`.
    fn irq_info(&self, index: u32) -> Result<IrqInfo, Error>;

    /// Apply a SET_IRQS request.
    fn set_irqs(&mut self, set: IrqSet) -> Result<(), Error>;

    /// Reset the device to its power-on state (keeps DMA mappings).
    fn reset(&mut self) -> Result<(), Error>;

    /// A range was added to the DMA address space the device was built with.
    fn dma_map(&mut self, range: &DmaRange) -> Result<(), Error>;

    /// A range is about to be removed from the DMA address space. When this
    /// returns, the device holds no view or cached pointer into it.
    fn dma_unmap(&mut self, range: &DmaRange);

    /// The first user (a client session, or an external reference) opened
    /// the device.
    fn open(&mut self) -> Result<(), Error>;

    /// The last user is gone: stop all activity, drop every client-supplied
    /// descriptor (interrupts, ioeventfds) and return to the power-on state.
    fn close(&mut self);

    /// The client session ended (cleanly or not) while the device stays
    /// open (an external reference holds it): drop the client's interrupt
    /// descriptors but keep device state.
    fn disconnect(&mut self);

    /// The device's migration interface, if it can be migrated.
    fn migration(&mut self) -> Option<&mut dyn Migratable>;

    /// The reset domain the device shares with other devices (a hot reset
    /// touches them all), if any: the server puts the devices of one
    /// domain in one device set. Emulated devices have none.
    fn reset_domain(&self) -> Option<String> {
        None
    }

    /// The device opens host devices and drives them with VFIO or iommufd
    /// ioctls on the thread that serves it (when its first user opens it,
    /// on region access, SET_IRQS and reset). The server's seccomp filter
    /// for that thread then also allows opening files and ioctls of the
    /// VFIO/iommufd type; for every other device it refuses both.
    fn uses_host_vfio(&self) -> bool {
        false
    }
}

/// A device whose state can be saved and restored (vfio-user migration v2).
pub trait Migratable {
    /// Stop the device: no DMA, no interrupts, state frozen.
    fn stop(&mut self) -> Result<(), Error>;
    /// Run the device again after [`Migratable::stop`].
    fn run(&mut self) -> Result<(), Error>;
    /// Serialise the (stopped) device's state.
    fn save(&mut self) -> Result<Vec<u8>, Error>;
    /// Load state saved by [`Migratable::save`] into a stopped device.
    fn load(&mut self, state: &[u8]) -> Result<(), Error>;
}
