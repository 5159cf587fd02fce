//! [`Passthrough`]: a host PCI device behind VFIO as a [`Device`].

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_HOT_RESET_FLAG_DEV_ID, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use super::iommu::{self, Group, IommuKind, IommuSpace};
use super::sys::{DeviceInfoRaw, IrqInfoRaw, PciAddress, RegionInfoRaw, SysfsDevice};
use super::{Claim, Vfio};
use crate::Error;
use crate::device::{
    Device, DeviceInfo, IoEventFd, IrqAction, IrqData, IrqInfo, IrqSet, Migratable, MmapArea,
    RegionInfo, RegionMmap, RegionType,
};
use crate::dma::{DmaRange, DmaSpace};

/// Most regions and interrupt indexes accepted from a device.
const MAX_REGIONS: u32 = 64;
const MAX_IRQS: u32 = 32;

/// How to serve one host device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassthroughOptions {
    /// The device's PCI address.
    pub address: PciAddress,
    /// Group/container path or cdev/iommufd path.
    pub iommu: IommuKind,
    /// Offer mmappable regions to the client (the device descriptor is
    /// then sent to it). Off: every BAR access is relayed.
    pub mmap: bool,
    /// Name of the DMA address space the device joins (for logs).
    pub address_space: String,
}

/// How the device is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetKind {
    /// VFIO_DEVICE_RESET.
    Function,
    /// VFIO_DEVICE_PCI_HOT_RESET of the reset domain (`n` devices).
    Hot(usize),
    /// Neither.
    None,
}

/// What the device told us when it was opened.
#[derive(Clone, Debug)]
struct Probe {
    info: DeviceInfoRaw,
    regions: Vec<RegionInfoRaw>,
    irqs: Vec<IrqInfoRaw>,
    reset: ResetKind,
}

/// An open device descriptor and how it was attached.
struct Opened {
    fd: Arc<OwnedFd>,
    /// Group path: the group (attached to the space while we hold it).
    group: Option<Arc<Group>>,
    /// cdev path: the iommufd device id.
    devid: Option<u32>,
}

/// A host PCI device bound to vfio-pci, served as a [`Device`]. See the
/// [module docs](super).
pub struct Passthrough {
    vfio: Arc<Vfio>,
    space: Arc<IommuSpace>,
    options: PassthroughOptions,
    name: String,
    sysfs: SysfsDevice,
    open: Option<Opened>,
    probe: Option<Probe>,
    /// Interrupt indexes the client armed with eventfds.
    armed: BTreeSet<u32>,
    _claim: Claim,
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("options", &self.options)
            .field("open", &self.open.is_some())
            .finish_non_exhaustive()
    }
}

impl Passthrough {
    /// Check that the device can be served (it exists, is bound to
    /// vfio-pci, has an IOMMU group, and a cdev for the iommufd path) and
    /// join the IOMMU space of `dma`. Nothing is opened yet: that is
    /// [`Device::open`], when the first user comes.
    pub fn new(
        vfio: &Arc<Vfio>,
        dma: &DmaSpace,
        options: PassthroughOptions,
    ) -> Result<Passthrough, Error> {
        let a = options.address;
        let sysfs = vfio.sys().sysfs_device(&a).map_err(|e| Error::Vfio {
            what: format!("{a}: no such PCI device in sysfs"),
            source: e,
        })?;
        match sysfs.driver.as_deref() {
            Some("vfio-pci") => {}
            Some(d) => {
                return Err(Error::BadState(format!(
                    "{a} is bound to {d}, not vfio-pci (echo vfio-pci > \
                     /sys/bus/pci/devices/{a}/driver_override; echo {a} > \
                     /sys/bus/pci/devices/{a}/driver/unbind; echo {a} > \
                     /sys/bus/pci/drivers_probe)"
                )));
            }
            None => {
                return Err(Error::BadState(format!(
                    "{a} is bound to no driver; bind it to vfio-pci"
                )));
            }
        }
        if sysfs.iommu_group.is_none() {
            return Err(Error::NoIommu(format!(
                "{a} has no IOMMU group: is the IOMMU on (intel_iommu=on / amd_iommu)?"
            )));
        }
        if options.iommu == IommuKind::Iommufd && sysfs.cdev.is_none() {
            return Err(Error::NoIommu(format!(
                "{a} has no VFIO device cdev: the host kernel lacks VFIO_DEVICE_CDEV (use the \
                 group path)"
            )));
        }
        let claim = vfio.claim(a, &options.address_space)?;
        let space = IommuSpace::for_dma(vfio, dma, &options.address_space, options.iommu)?;
        Ok(Passthrough {
            vfio: vfio.clone(),
            space,
            name: format!("vfio-{a}"),
            options,
            sysfs,
            open: None,
            probe: None,
            armed: BTreeSet::new(),
            _claim: claim,
        })
    }

    /// The IOMMU space the device attaches to.
    pub fn iommu_space(&self) -> &Arc<IommuSpace> {
        &self.space
    }

    /// The reset domain the device shares with others, if any: devices
    /// behind one bridge share its secondary bus reset. `None` for a device
    /// on a root bus, which the kernel keeps in a set of its own.
    pub fn bus_reset_domain(&self) -> Option<String> {
        let a = self.options.address;
        self.sysfs
            .upstream_bridge
            .map(|_| format!("pci-bus:{:04x}:{:02x}", a.segment, a.bus))
    }

    /// Whether the device is open.
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    fn sys(&self) -> &dyn super::VfioSys {
        self.vfio.sys()
    }

    fn opened(&self) -> Result<(&Opened, &Probe), Error> {
        match (&self.open, &self.probe) {
            (Some(o), Some(p)) => Ok((o, p)),
            _ => Err(Error::BadState(format!("{} is not open", self.name))),
        }
    }

    fn region(&self, index: u32) -> Result<(&Opened, &RegionInfoRaw), Error> {
        let (o, p) = self.opened()?;
        let r = p
            .regions
            .get(index as usize)
            .ok_or(Error::NoSuchRegion(index))?;
        Ok((o, r))
    }

    /// Attach (group or cdev path) and return the device descriptor.
    fn attach(&self) -> Result<Opened, Error> {
        let a = self.options.address;
        match self.options.iommu {
            IommuKind::Group => {
                let n = self
                    .sysfs
                    .iommu_group
                    .ok_or_else(|| Error::NoIommu(format!("{a} has no IOMMU group")))?;
                let group = iommu::group(&self.vfio, n)?;
                group.attach(&self.space)?;
                let fd = group.fd().and_then(|g| {
                    self.sys().group_device_fd(g, &a.to_string()).map_err(|e| {
                        match e.raw_os_error() {
                            Some(libc::EBUSY) => Error::Busy(format!(
                                "{a}: VFIO_GROUP_GET_DEVICE_FD refused: the device is open \
                                     through its cdev"
                            )),
                            _ => Error::Vfio {
                                what: format!("{a}: VFIO_GROUP_GET_DEVICE_FD"),
                                source: e,
                            },
                        }
                    })
                });
                match fd {
                    Ok(fd) => Ok(Opened {
                        fd: Arc::new(fd),
                        group: Some(group),
                        devid: None,
                    }),
                    Err(e) => {
                        group.detach();
                        Err(e)
                    }
                }
            }
            IommuKind::Iommufd => {
                let cdev = self
                    .sysfs
                    .cdev
                    .as_deref()
                    .ok_or_else(|| Error::NoIommu(format!("{a} has no VFIO device cdev")))?;
                let fd = self.sys().open_cdev(cdev).map_err(|e| Error::Vfio {
                    what: format!("{a}: open /dev/vfio/devices/{cdev}"),
                    source: e,
                })?;
                // Until the bind, the kernel refuses every access to fd.
                let devid = self.space.attach_device(&a, fd.as_fd())?;
                Ok(Opened {
                    fd: Arc::new(fd),
                    group: None,
                    devid: Some(devid),
                })
            }
        }
    }

    /// Undo [`Passthrough::attach`].
    fn detach(&self, opened: Opened) {
        let Opened { fd, group, devid } = opened;
        if devid.is_some() {
            self.space.detach_device(&self.options.address, fd.as_fd());
        }
        // The kernel's close_device runs when the last descriptor closes;
        // the client may hold a copy (its BAR mmaps) until it goes.
        drop(fd);
        if let Some(g) = group {
            // A group leaves its container only without open devices.
            g.detach();
        }
    }

    fn probe(&self, fd: BorrowedFd<'_>) -> Result<Probe, Error> {
        let a = self.options.address;
        let info = self.sys().device_info(fd).map_err(|e| Error::Vfio {
            what: format!("{a}: VFIO_DEVICE_GET_INFO"),
            source: e,
        })?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::BadState(format!(
                "{a}: VFIO reports a device that is not PCI (flags {:#x})",
                info.flags
            )));
        }
        if info.num_regions < crate::pci::NUM_REGIONS
            || info.num_regions > MAX_REGIONS
            || info.num_irqs > MAX_IRQS
        {
            return Err(Error::BadState(format!(
                "{a}: {} regions and {} interrupt indexes",
                info.num_regions, info.num_irqs
            )));
        }
        let mut regions = Vec::with_capacity(info.num_regions as usize);
        for i in 0..info.num_regions {
            match self.sys().region_info(fd, i) {
                Ok(r) => regions.push(r),
                // vfio-pci answers EINVAL for a region the device does not
                // have (the VGA region of a device that is not VGA): it is
                // reported to the client as an empty region.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::debug!("{a}: region {i} absent ({e})");
                    regions.push(RegionInfoRaw::default());
                }
                Err(e) => {
                    return Err(Error::Vfio {
                        what: format!("{a}: VFIO_DEVICE_GET_REGION_INFO({i})"),
                        source: e,
                    });
                }
            }
        }
        let mut irqs = Vec::with_capacity(info.num_irqs as usize);
        for i in 0..info.num_irqs {
            match self.sys().irq_info(fd, i) {
                Ok(irq) => irqs.push(irq),
                // EINVAL: an index the device does not have (the error
                // interrupt of a device that is not PCI Express): no vectors.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::debug!("{a}: interrupt index {i} absent ({e})");
                    irqs.push(IrqInfoRaw::default());
                }
                Err(e) => {
                    return Err(Error::Vfio {
                        what: format!("{a}: VFIO_DEVICE_GET_IRQ_INFO({i})"),
                        source: e,
                    });
                }
            }
        }
        let reset = if info.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
            ResetKind::Function
        } else {
            match self.sys().hot_reset_info(fd) {
                Ok(h) if !h.devices.is_empty() => ResetKind::Hot(h.devices.len()),
                _ => ResetKind::None,
            }
        };
        Ok(Probe {
            info,
            regions,
            irqs,
            reset,
        })
    }

    fn hot_reset(&self, opened: &Opened) -> Result<(), Error> {
        let a = self.options.address;
        let fd = opened.fd.as_fd();
        let info = self.sys().hot_reset_info(fd).map_err(|e| Error::Vfio {
            what: format!("{a}: VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"),
            source: e,
        })?;
        let others: Vec<String> = info
            .devices
            .iter()
            .filter(|d| d.address != a)
            .map(|d| d.address.to_string())
            .collect();
        let result = if opened.group.is_some() && info.flags & VFIO_PCI_HOT_RESET_FLAG_DEV_ID == 0 {
            // Group path: the kernel wants a descriptor of every affected
            // group. Groups no device of ours holds are opened for the call.
            let mut numbers: Vec<u32> = info.devices.iter().map(|d| d.id).collect();
            numbers.sort_unstable();
            numbers.dedup();
            let mut groups = Vec::with_capacity(numbers.len());
            for n in numbers {
                groups.push(iommu::group(&self.vfio, n)?);
            }
            let fds = groups
                .iter()
                .map(|g| g.fd())
                .collect::<Result<Vec<_>, Error>>()?;
            self.sys().hot_reset(fd, &fds)
        } else {
            // cdev path: ownership is proven by the iommufd every affected
            // open device is bound to.
            self.sys().hot_reset(fd, &[])
        };
        result.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) | Some(libc::EPERM) | Some(libc::EINVAL) => Error::Busy(format!(
                "{a}: hot reset refused ({e}): a device of its reset domain ({}) is in use \
                 elsewhere or not owned by vdevd",
                others.join(", ")
            )),
            _ => Error::Vfio {
                what: format!("{a}: VFIO_DEVICE_PCI_HOT_RESET"),
                source: e,
            },
        })?;
        log::info!(
            "{}: hot reset of its reset domain{}",
            self.name,
            if others.is_empty() {
                String::new()
            } else {
                format!(" (also reset: {})", others.join(", "))
            }
        );
        Ok(())
    }

    /// Disarm every interrupt index the client armed.
    fn disarm(&mut self) {
        let Some(o) = &self.open else {
            self.armed.clear();
            return;
        };
        for index in std::mem::take(&mut self.armed) {
            if let Err(e) = self.vfio.sys().set_irqs(
                o.fd.as_fd(),
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                0,
                0,
                &[],
            ) {
                log::warn!("{}: disarming interrupt index {index}: {e}", self.name);
            }
        }
    }
}

impl Device for Passthrough {
    fn name(&self) -> &str {
        &self.name
    }

    fn reset_domain(&self) -> Option<String> {
        self.bus_reset_domain()
    }

    fn uses_host_vfio(&self) -> bool {
        true
    }

    fn info(&self) -> DeviceInfo {
        match &self.probe {
            Some(p) => DeviceInfo {
                num_regions: p.info.num_regions,
                num_irqs: p.info.num_irqs,
                reset: p.reset != ResetKind::None,
            },
            None => DeviceInfo {
                num_regions: crate::pci::NUM_REGIONS,
                num_irqs: crate::pci::NUM_IRQS,
                reset: false,
            },
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        let (o, r) = self.region(index)?;
        let mmap =
            (self.options.mmap && r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0).then(|| RegionMmap {
                fd: o.fd.clone(),
                offset: r.offset,
                areas: r
                    .sparse
                    .iter()
                    .flatten()
                    .map(|&(offset, size)| MmapArea { offset, size })
                    .collect(),
            });
        // A sparse capability with no area means "nothing mappable".
        let mmap = mmap.filter(|m| !(r.sparse.is_some() && m.areas.is_empty()));
        Ok(RegionInfo {
            size: r.size,
            read: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
            region_type: r
                .region_type
                .map(|(kind, subtype)| RegionType { kind, subtype }),
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let (o, r) = self.region(index)?;
        check_access(
            index,
            r,
            offset,
            data.len(),
            VFIO_REGION_INFO_FLAG_READ,
            "read",
        )?;
        // offset + len <= size was checked; r.offset + that fits when the
        // kernel's offsets do, which checked_add confirms.
        let at = r.offset.checked_add(offset).ok_or(Error::OutOfRange {
            region: index,
            offset,
            len: data.len() as u64,
            size: r.size,
        })?;
        self.sys()
            .read(o.fd.as_fd(), at, data)
            .map_err(|e| Error::Vfio {
                what: format!("{}: read of region {index} at {offset:#x}", self.name),
                source: e,
            })
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let (o, r) = self.region(index)?;
        check_access(
            index,
            r,
            offset,
            data.len(),
            VFIO_REGION_INFO_FLAG_WRITE,
            "write",
        )?;
        let at = r.offset.checked_add(offset).ok_or(Error::OutOfRange {
            region: index,
            offset,
            len: data.len() as u64,
            size: r.size,
        })?;
        self.sys()
            .write(o.fd.as_fd(), at, data)
            .map_err(|e| Error::Vfio {
                what: format!("{}: write of region {index} at {offset:#x}", self.name),
                source: e,
            })
    }

    fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoEventFd>, Error> {
        self.region(index)?;
        // BARs the client maps need none; the rest go through messages.
        Ok(Vec::new())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, Error> {
        let (_, p) = self.opened()?;
        let i = p.irqs.get(index as usize).ok_or(Error::NoSuchIrq(index))?;
        Ok(IrqInfo {
            count: i.count,
            eventfd: i.flags & VFIO_IRQ_INFO_EVENTFD != 0,
            maskable: i.flags & VFIO_IRQ_INFO_MASKABLE != 0,
            automasked: i.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
            noresize: i.flags & VFIO_IRQ_INFO_NORESIZE != 0,
        })
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), Error> {
        let (o, p) = self.opened()?;
        if p.irqs.get(set.index as usize).is_none() {
            return Err(Error::NoSuchIrq(set.index));
        }
        let action = match set.action {
            IrqAction::Mask => VFIO_IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => VFIO_IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => VFIO_IRQ_SET_ACTION_TRIGGER,
        };
        let count = set.count as usize;
        let mut arm = None;
        let (kind, data): (u32, Vec<u8>) = match &set.data {
            _ if set.count == 0 => (VFIO_IRQ_SET_DATA_NONE, Vec::new()),
            IrqData::None => (VFIO_IRQ_SET_DATA_NONE, Vec::new()),
            IrqData::Bool(v) if v.len() == count => (
                VFIO_IRQ_SET_DATA_BOOL,
                v.iter().map(|b| u8::from(*b)).collect(),
            ),
            IrqData::Eventfds(v) if v.len() == count => {
                arm = Some(v.iter().any(Option::is_some));
                let mut bytes = Vec::with_capacity(count * 4);
                for fd in v {
                    let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
                    bytes.extend_from_slice(&raw.to_ne_bytes());
                }
                (VFIO_IRQ_SET_DATA_EVENTFD, bytes)
            }
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "SET_IRQS data does not have {count} entries"
                )));
            }
        };
        // The kernel takes its own reference to each eventfd: the client's
        // descriptors (in `set`) can be closed once this returns.
        self.sys()
            .set_irqs(
                o.fd.as_fd(),
                kind | action,
                set.index,
                set.start,
                set.count,
                &data,
            )
            .map_err(|e| Error::Vfio {
                what: format!(
                    "{}: VFIO_DEVICE_SET_IRQS(index {}, {}+{})",
                    self.name, set.index, set.start, set.count
                ),
                source: e,
            })?;
        if set.action == IrqAction::Trigger {
            match arm {
                Some(true) => {
                    self.armed.insert(set.index);
                }
                _ if set.count == 0 => {
                    self.armed.remove(&set.index);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Error> {
        let (o, p) = self.opened()?;
        match p.reset {
            ResetKind::Function => self.sys().reset(o.fd.as_fd()).map_err(|e| Error::Vfio {
                what: format!("{}: VFIO_DEVICE_RESET", self.name),
                source: e,
            }),
            ResetKind::Hot(_) => self.hot_reset(o),
            ResetKind::None => Err(Error::Unsupported(format!(
                "{} has neither a function reset nor a reset domain vdevd can reset",
                self.name
            ))),
        }
    }

    fn dma_map(&mut self, _range: &DmaRange) -> Result<(), Error> {
        // The address space's IOMMU mirror maps the range for every
        // device attached to it (see iommu.rs).
        Ok(())
    }

    fn dma_unmap(&mut self, _range: &DmaRange) {}

    fn open(&mut self) -> Result<(), Error> {
        if self.open.is_some() {
            return Ok(());
        }
        let opened = self.attach()?;
        match self.probe(opened.fd.as_fd()) {
            Ok(p) => {
                log::info!(
                    "{}: opened ({} path, address space {}): {} regions, {} interrupt indexes, \
                     reset: {}",
                    self.name,
                    self.options.iommu.name(),
                    self.space.name(),
                    p.info.num_regions,
                    p.info.num_irqs,
                    match p.reset {
                        ResetKind::Function => "function".to_string(),
                        ResetKind::Hot(n) => format!("hot reset of {n} device(s)"),
                        ResetKind::None => "none".to_string(),
                    }
                );
                self.probe = Some(p);
                self.open = Some(opened);
                Ok(())
            }
            Err(e) => {
                self.detach(opened);
                Err(e)
            }
        }
    }

    fn close(&mut self) {
        self.armed.clear();
        if let Some(o) = self.open.take() {
            // Closing the descriptor disarms the interrupts and lets the
            // kernel reset the device (close_device).
            self.detach(o);
            log::info!("{}: closed", self.name);
        }
    }

    fn disconnect(&mut self) {
        self.disarm();
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        None
    }
}

fn check_access(
    index: u32,
    r: &RegionInfoRaw,
    offset: u64,
    len: usize,
    flag: u32,
    access: &'static str,
) -> Result<(), Error> {
    if r.flags & flag == 0 {
        return Err(Error::AccessDenied {
            region: index,
            access,
        });
    }
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|e| e > r.size) {
        return Err(Error::OutOfRange {
            region: index,
            offset,
            len: len as u64,
            size: r.size,
        });
    }
    Ok(())
}
