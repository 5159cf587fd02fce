//! A fake host VFIO and iommufd for tests (`fake-vfio` feature).
//!
//! [`FakeVfio`] implements [`VfioSys`] with the kernel's rules that vdevd
//! relies on, so that every path and error of the backend can be tested
//! without a kernel:
//!
//! * a group opens once (EBUSY), joins one container (EBUSY), and leaves
//!   it only without open devices (EBUSY); the container needs a group
//!   before its IOMMU is set, and drops its mappings when its last group
//!   leaves (counted as *implicit unmaps*, which vdevd must never cause);
//! * a cdev refuses every access until it is bound; the bind is refused
//!   while the group is open, and the group open while a cdev is bound;
//! * an IOAS is destroyed only without devices; IOAS count limit (ENOSPC);
//!   IOMMU_IOAS_MAP_FILE can be made unknown (ENOTTY, as before 6.13);
//! * the kernel's `open_device`/`close_device` run on the first and last
//!   descriptor of a device (counted);
//! * SET_IRQS keeps its own reference to each eventfd (a duplicate), so a
//!   test can fire an interrupt the way the device would;
//! * a hot reset needs every affected group (group path) or every open
//!   affected device bound to the caller's iommufd (cdev path).
//!
//! Every descriptor handed out is a memfd named after its handle, so the
//! fake notices when vdevd closes one (by scanning `/proc/self/fd`), even
//! if the number is reused. A device descriptor's memfd holds the regions
//! (region `i` at `i << 20`), so reads, writes and client mmaps of it work.
//! Any call can be made to fail once with [`FakeVfio::fail_next`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_HOT_RESET_FLAG_DEV_ID, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE1v2_IOMMU,
};

use super::sys::{
    Dependent, DeviceInfoRaw, HotResetInfo, IrqInfoRaw, PciAddress, RegionInfoRaw, SysfsDevice,
    VfioSys,
};
use crate::dma::Prot;

/// Where region `i` lives in a fake device descriptor.
pub const fn region_offset(i: u32) -> u64 {
    (i as u64) << 20
}

/// One fake PCI device.
#[derive(Clone, Debug)]
pub struct FakeDevice {
    /// Its address.
    pub address: PciAddress,
    /// Its IOMMU group.
    pub group: u32,
    /// Its cdev name, if the fake kernel has VFIO_DEVICE_CDEV.
    pub cdev: Option<String>,
    /// Its driver.
    pub driver: String,
    /// The bridge above it (devices behind one bridge share a hot reset).
    pub upstream_bridge: Option<PciAddress>,
    /// VFIO_DEVICE_FLAGS_*.
    pub flags: u32,
    /// Regions (offsets are filled in by the fake).
    pub regions: Vec<RegionInfoRaw>,
    /// Interrupt indexes.
    pub irqs: Vec<IrqInfoRaw>,
    /// Config space contents at open.
    pub config: Vec<u8>,
}

/// The VGA region's index (VFIO_PCI_VGA_REGION_INDEX).
const VGA_REGION_INDEX: u32 = 8;
/// The error interrupt's index (VFIO_PCI_ERR_IRQ_INDEX).
const ERR_IRQ_INDEX: u32 = 3;

impl FakeDevice {
    /// An `edu`-like device: BAR0 of 4 KiB (mmappable), 256 bytes of config
    /// space, INTx and one MSI vector, no MSI-X; no function reset.
    pub fn edu(address: &str, group: u32) -> FakeDevice {
        let address: PciAddress = address.parse().unwrap_or(PciAddress {
            segment: 0,
            bus: 0,
            device: 0,
            function: 0,
        });
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mut regions = vec![RegionInfoRaw::default(); 9];
        regions[0] = RegionInfoRaw {
            flags: rw | VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x1000,
            ..RegionInfoRaw::default()
        };
        regions[7] = RegionInfoRaw {
            flags: rw,
            size: 256,
            ..RegionInfoRaw::default()
        };
        let irq = |count| IrqInfoRaw {
            flags: VFIO_IRQ_INFO_EVENTFD,
            count,
        };
        let mut config = vec![0u8; 256];
        config[..4].copy_from_slice(&[0x34, 0x12, 0xe8, 0x11]);
        FakeDevice {
            address,
            group,
            cdev: None,
            driver: "vfio-pci".into(),
            upstream_bridge: None,
            flags: VFIO_DEVICE_FLAGS_PCI,
            regions,
            irqs: vec![irq(1), irq(1), irq(0), irq(0), irq(1)],
            config,
        }
    }

    /// The same device with a VFIO cdev called `name`.
    pub fn with_cdev(mut self, name: &str) -> FakeDevice {
        self.cdev = Some(name.into());
        self
    }

    /// The same device behind `bridge` (sharing its bus reset).
    pub fn behind(mut self, bridge: &str) -> FakeDevice {
        self.upstream_bridge = bridge.parse().ok();
        self
    }

    /// The same device with a function reset.
    pub fn with_function_reset(mut self) -> FakeDevice {
        self.flags |= VFIO_DEVICE_FLAGS_RESET;
        self
    }
}

/// What the fake kernel did with one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeDeviceStats {
    /// The kernel's open_device ran (first descriptor).
    pub kernel_opens: u64,
    /// The kernel's close_device ran (last descriptor closed).
    pub kernel_closes: u64,
    /// Descriptors open now.
    pub open_fds: usize,
    /// Function resets.
    pub resets: u64,
    /// Hot resets that reset this device.
    pub hot_resets: u64,
    /// Bound to an iommufd now.
    pub bound: bool,
    /// The IOAS it is attached to now.
    pub ioas: Option<u32>,
    /// Interrupt indexes with an armed eventfd now.
    pub armed: BTreeSet<u32>,
}

#[derive(Default)]
struct DevState {
    cfg: Option<FakeDevice>,
    stats: FakeDeviceStats,
    /// Open descriptors (handle ids).
    fds: BTreeSet<u64>,
    /// (iommufd handle, device id) while bound.
    bound: Option<(u64, u32)>,
    ioas: Option<u32>,
    /// (index, vector) -> the kernel's reference to the eventfd.
    irqs: BTreeMap<(u32, u32), File>,
}

struct GroupState {
    viable: bool,
    pgsizes: u64,
    handle: Option<u64>,
    container: Option<u64>,
}

/// A range mapped in a fake IOMMU.
#[derive(Debug)]
struct Mapping {
    size: u64,
    prot: Prot,
    /// Where the memory is: this process's address, or a file.
    at: Backing,
}

#[derive(Debug)]
enum Backing {
    Vaddr(u64),
    File(File, u64),
}

enum Handle {
    Container {
        groups: Vec<u32>,
        iommu: bool,
        maps: BTreeMap<u64, Mapping>,
    },
    Group(u32),
    Iommufd {
        ioas: BTreeMap<u32, BTreeMap<u64, Mapping>>,
        next: u32,
    },
    Device {
        address: PciAddress,
        cdev: bool,
    },
}

struct State {
    handles: HashMap<u64, Handle>,
    devices: BTreeMap<PciAddress, DevState>,
    groups: BTreeMap<u32, GroupState>,
    failures: Vec<(String, i32)>,
    calls: Vec<String>,
    type1v2: bool,
    iommufd: bool,
    map_file: bool,
    max_ioas: usize,
    next_devid: u32,
    implicit_unmaps: u64,
}

/// The fake kernel. See the module docs.
pub struct FakeVfio {
    st: Mutex<State>,
}

impl std::fmt::Debug for FakeVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeVfio").finish_non_exhaustive()
    }
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);
const PREFIX: &str = "vdevd-fake-vfio-";

fn err(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

fn memfd(id: u64) -> io::Result<OwnedFd> {
    let name = CString::new(format!("{PREFIX}{id}")).map_err(|_| err(libc::EINVAL))?;
    // SAFETY: name is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The handle id of a descriptor the fake handed out.
fn handle_of(fd: BorrowedFd<'_>) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let s = link.to_str()?;
    let rest = s.strip_prefix("/memfd:")?.strip_prefix(PREFIX)?;
    rest.split(' ').next()?.parse().ok()
}

/// Handle ids with a descriptor open in this process.
fn live_handles() -> BTreeSet<u64> {
    let mut live = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return live;
    };
    for e in dir.flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        if let Some(id) = link
            .to_str()
            .and_then(|s| s.strip_prefix("/memfd:"))
            .and_then(|s| s.strip_prefix(PREFIX))
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
        {
            live.insert(id);
        }
    }
    live
}

fn overlaps(maps: &BTreeMap<u64, Mapping>, iova: u64, size: u64) -> bool {
    let end = iova.saturating_add(size);
    maps.iter()
        .any(|(&a, m)| a < end && iova < a.saturating_add(m.size))
}

impl Default for FakeVfio {
    fn default() -> Self {
        FakeVfio::new()
    }
}

impl FakeVfio {
    /// A kernel with TYPE1v2, iommufd and IOMMU_IOAS_MAP_FILE, no devices.
    pub fn new() -> FakeVfio {
        FakeVfio {
            st: Mutex::new(State {
                handles: HashMap::new(),
                devices: BTreeMap::new(),
                groups: BTreeMap::new(),
                failures: Vec::new(),
                calls: Vec::new(),
                type1v2: true,
                iommufd: true,
                map_file: true,
                max_ioas: 16,
                next_devid: 1,
                implicit_unmaps: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.sweep();
        st
    }

    /// Add a device (and its group, viable, with 4 KiB pages).
    pub fn add_device(&self, dev: FakeDevice) {
        let mut st = self.lock();
        st.groups.entry(dev.group).or_insert(GroupState {
            viable: true,
            pgsizes: 0x1000 | 0x20_0000,
            handle: None,
            container: None,
        });
        st.devices.insert(
            dev.address,
            DevState {
                cfg: Some(dev),
                ..DevState::default()
            },
        );
    }

    /// Make group `n` (not) viable.
    pub fn set_viable(&self, n: u32, viable: bool) {
        if let Some(g) = self.lock().groups.get_mut(&n) {
            g.viable = viable;
        }
    }

    /// The page sizes group `n`'s IOMMU supports.
    pub fn set_group_pgsizes(&self, n: u32, pgsizes: u64) {
        if let Some(g) = self.lock().groups.get_mut(&n) {
            g.pgsizes = pgsizes;
        }
    }

    /// Whether the kernel has the TYPE1v2 IOMMU, iommufd, MAP_FILE.
    pub fn set_features(&self, type1v2: bool, iommufd: bool, map_file: bool) {
        let mut st = self.lock();
        st.type1v2 = type1v2;
        st.iommufd = iommufd;
        st.map_file = map_file;
    }

    /// Most IOASes alive at once (ENOSPC beyond).
    pub fn set_max_ioas(&self, n: usize) {
        self.lock().max_ioas = n;
    }

    /// Make the next call of `op` (a [`VfioSys`] method name) fail with
    /// `errno`.
    pub fn fail_next(&self, op: &str, errno: i32) {
        self.lock().failures.push((op.to_string(), errno));
    }

    /// Every call so far, as "op args".
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// What the kernel did with the device at `address`.
    pub fn device_stats(&self, address: &str) -> FakeDeviceStats {
        let st = self.lock();
        let Ok(a) = address.parse::<PciAddress>() else {
            return FakeDeviceStats::default();
        };
        st.devices
            .get(&a)
            .map(|d| d.stats.clone())
            .unwrap_or_default()
    }

    /// Mappings (iova, size) of every live container and IOAS, in order.
    pub fn iommu_mappings(&self) -> Vec<Vec<(u64, u64)>> {
        let st = self.lock();
        let mut ids: Vec<&u64> = st.handles.keys().collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            match &st.handles[id] {
                Handle::Container { maps, .. } => {
                    out.push(maps.iter().map(|(a, m)| (*a, m.size)).collect());
                }
                Handle::Iommufd { ioas, .. } => {
                    for maps in ioas.values() {
                        out.push(maps.iter().map(|(a, m)| (*a, m.size)).collect());
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Live containers and IOASes.
    pub fn address_spaces(&self) -> usize {
        let st = self.lock();
        st.handles
            .values()
            .map(|h| match h {
                Handle::Container { .. } => 1,
                Handle::Iommufd { ioas, .. } => ioas.len(),
                _ => 0,
            })
            .sum()
    }

    /// Mappings dropped by the kernel itself when a container emptied.
    pub fn implicit_unmaps(&self) -> u64 {
        self.lock().implicit_unmaps
    }

    /// Signal the eventfd armed for `vector` of `index` of a device, as
    /// its interrupt would. False if none is armed.
    pub fn fire(&self, address: &str, index: u32, vector: u32) -> bool {
        let st = self.lock();
        let Ok(a) = address.parse::<PciAddress>() else {
            return false;
        };
        let Some(f) = st
            .devices
            .get(&a)
            .and_then(|d| d.irqs.get(&(index, vector)))
        else {
            return false;
        };
        use std::io::Write as _;
        (&*f).write(&1u64.to_ne_bytes()).is_ok()
    }

    /// The device at `address` writes `data` at `iova` through its IOMMU.
    pub fn dma_write(&self, address: &str, iova: u64, data: &[u8]) -> io::Result<()> {
        self.dma(address, iova, data.len(), true, |file, at| {
            file.write_all_at(data, at)
        })
    }

    /// The device at `address` reads `buf.len()` bytes at `iova`.
    pub fn dma_read(&self, address: &str, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.dma(address, iova, len, false, |file, at| {
            file.read_exact_at(buf, at)
        })
    }

    fn dma(
        &self,
        address: &str,
        iova: u64,
        len: usize,
        write: bool,
        f: impl FnOnce(&File, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let st = self.lock();
        let a: PciAddress = address.parse().map_err(|_| err(libc::EINVAL))?;
        let maps = st.device_maps(&a).ok_or_else(|| err(libc::EFAULT))?;
        let (base, m) = maps
            .range(..=iova)
            .next_back()
            .filter(|(b, m)| iova + len as u64 <= *b + m.size)
            .ok_or_else(|| err(libc::EFAULT))?;
        // An IOMMU fault, as the real one would raise.
        if (write && !m.prot.write) || (!write && !m.prot.read) {
            return Err(err(libc::EFAULT));
        }
        let rel = iova - base;
        match &m.at {
            Backing::Vaddr(v) => {
                // This process's own memory, where vdevd mapped the range.
                let mem = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/proc/self/mem")?;
                f(&mem, v + rel)
            }
            Backing::File(file, off) => f(file, off + rel),
        }
    }
}

impl State {
    /// Notice descriptors that were closed and apply what the kernel does.
    fn sweep(&mut self) {
        let live = live_handles();
        let dead: Vec<u64> = self
            .handles
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead {
            let Some(h) = self.handles.remove(&id) else {
                continue;
            };
            match h {
                Handle::Device { address, cdev } => {
                    if let Some(d) = self.devices.get_mut(&address) {
                        let was_open = d.fds.remove(&id);
                        if was_open && d.fds.is_empty() {
                            // close_device: interrupts go, the device is
                            // released.
                            d.stats.kernel_closes += 1;
                            d.irqs.clear();
                            d.stats.armed.clear();
                        }
                        d.stats.open_fds = d.fds.len();
                        if cdev && was_open {
                            d.bound = None;
                            d.ioas = None;
                            d.stats.bound = false;
                            d.stats.ioas = None;
                        }
                    }
                }
                Handle::Group(n) => {
                    if let Some(g) = self.groups.get_mut(&n) {
                        g.handle = None;
                        if let Some(c) = g.container.take() {
                            self.leave_container(c, n);
                        }
                    }
                }
                Handle::Container { groups, maps, .. } => {
                    // The groups keep the container alive in the kernel;
                    // here they simply lose it.
                    for n in groups {
                        if let Some(g) = self.groups.get_mut(&n) {
                            g.container = None;
                        }
                    }
                    self.implicit_unmaps += maps.len() as u64;
                }
                Handle::Iommufd { ioas, .. } => {
                    for maps in ioas.values() {
                        self.implicit_unmaps += maps.len() as u64;
                    }
                }
            }
        }
    }

    fn leave_container(&mut self, c: u64, n: u32) {
        let mut dropped = 0;
        if let Some(Handle::Container {
            groups,
            iommu,
            maps,
        }) = self.handles.get_mut(&c)
        {
            groups.retain(|g| *g != n);
            if groups.is_empty() {
                dropped = maps.len() as u64;
                maps.clear();
                *iommu = false;
            }
        }
        self.implicit_unmaps += dropped;
    }

    fn call(&mut self, op: &str, args: String) -> io::Result<()> {
        self.calls.push(format!("{op} {args}"));
        if let Some(i) = self.failures.iter().position(|(o, _)| o == op) {
            let (_, n) = self.failures.remove(i);
            return Err(err(n));
        }
        Ok(())
    }

    fn new_handle(&mut self, h: Handle, size: u64) -> io::Result<OwnedFd> {
        let id = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
        let fd = memfd(id)?;
        if size > 0 {
            File::from(fd.try_clone()?).set_len(size)?;
        }
        self.handles.insert(id, h);
        Ok(fd)
    }

    fn handle(&self, fd: BorrowedFd<'_>) -> io::Result<(u64, &Handle)> {
        let id = handle_of(fd).ok_or_else(|| err(libc::EBADF))?;
        let h = self.handles.get(&id).ok_or_else(|| err(libc::EBADF))?;
        Ok((id, h))
    }

    fn container(&mut self, fd: BorrowedFd<'_>) -> io::Result<(u64, &mut Handle)> {
        let id = handle_of(fd).ok_or_else(|| err(libc::EBADF))?;
        match self.handles.get_mut(&id) {
            Some(h @ Handle::Container { .. }) => Ok((id, h)),
            _ => Err(err(libc::EBADF)),
        }
    }

    fn group_no(&self, fd: BorrowedFd<'_>) -> io::Result<u32> {
        match self.handle(fd)? {
            (_, Handle::Group(n)) => Ok(*n),
            _ => Err(err(libc::EBADF)),
        }
    }

    /// The device behind a descriptor, refusing an unbound cdev.
    fn device(&self, fd: BorrowedFd<'_>) -> io::Result<PciAddress> {
        match self.handle(fd)? {
            (id, Handle::Device { address, cdev }) => {
                let d = self.devices.get(address).ok_or_else(|| err(libc::ENODEV))?;
                if *cdev && d.bound.is_none() {
                    return Err(err(libc::EINVAL));
                }
                if !d.fds.contains(&id) {
                    return Err(err(libc::EBADF));
                }
                Ok(*address)
            }
            _ => Err(err(libc::EBADF)),
        }
    }

    fn cfg(&self, a: &PciAddress) -> io::Result<&FakeDevice> {
        self.devices
            .get(a)
            .and_then(|d| d.cfg.as_ref())
            .ok_or_else(|| err(libc::ENODEV))
    }

    fn container_pgsizes(&self, groups: &[u32]) -> u64 {
        groups
            .iter()
            .filter_map(|g| self.groups.get(g))
            .fold(u64::MAX, |acc, g| acc & g.pgsizes)
    }

    /// The IOMMU mappings a device's DMA goes through.
    fn device_maps(&self, a: &PciAddress) -> Option<&BTreeMap<u64, Mapping>> {
        let d = self.devices.get(a)?;
        if let (Some((fd_id, _)), Some(ioas)) = (d.bound, d.ioas) {
            return match self.handles.get(&fd_id)? {
                Handle::Iommufd { ioas: all, .. } => all.get(&ioas),
                _ => None,
            };
        }
        let group = d.cfg.as_ref()?.group;
        let c = self.groups.get(&group)?.container?;
        match self.handles.get(&c)? {
            Handle::Container { maps, .. } => Some(maps),
            _ => None,
        }
    }

    /// A device descriptor is opened (group path, or a cdev bind).
    fn open_device(&mut self, a: &PciAddress, id: u64) {
        if let Some(d) = self.devices.get_mut(a) {
            if d.fds.is_empty() {
                d.stats.kernel_opens += 1;
            }
            d.fds.insert(id);
            d.stats.open_fds = d.fds.len();
        }
    }

    fn init_device_memory(&self, fd: &OwnedFd, a: &PciAddress) -> io::Result<()> {
        let cfg = self.cfg(a)?;
        let file = File::from(fd.try_clone()?);
        file.write_all_at(&cfg.config, region_offset(7))
    }

    fn ioas_maps(
        &mut self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
    ) -> io::Result<&mut BTreeMap<u64, Mapping>> {
        let id = handle_of(iommufd).ok_or_else(|| err(libc::EBADF))?;
        match self.handles.get_mut(&id) {
            Some(Handle::Iommufd { ioas: all, .. }) => {
                all.get_mut(&ioas).ok_or_else(|| err(libc::ENOENT))
            }
            _ => Err(err(libc::EBADF)),
        }
    }
}

impl VfioSys for FakeVfio {
    fn sysfs_device(&self, address: &PciAddress) -> io::Result<SysfsDevice> {
        let mut st = self.lock();
        st.call("sysfs_device", address.to_string())?;
        let cfg = st.cfg(address).map_err(|_| err(libc::ENOENT))?;
        Ok(SysfsDevice {
            driver: Some(cfg.driver.clone()),
            iommu_group: Some(cfg.group),
            cdev: cfg.cdev.clone(),
            upstream_bridge: cfg.upstream_bridge,
        })
    }

    fn open_container(&self) -> io::Result<OwnedFd> {
        let mut st = self.lock();
        st.call("open_container", String::new())?;
        st.new_handle(
            Handle::Container {
                groups: Vec::new(),
                iommu: false,
                maps: BTreeMap::new(),
            },
            0,
        )
    }

    fn api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32> {
        let mut st = self.lock();
        st.call("api_version", String::new())?;
        st.container(container)?;
        Ok(0)
    }

    fn check_extension(&self, container: BorrowedFd<'_>, ext: u32) -> io::Result<bool> {
        let mut st = self.lock();
        st.call("check_extension", ext.to_string())?;
        st.container(container)?;
        Ok(ext == VFIO_TYPE1v2_IOMMU && st.type1v2)
    }

    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        let mut st = self.lock();
        st.call("set_iommu", kind.to_string())?;
        let type1v2 = st.type1v2;
        let (_, h) = st.container(container)?;
        let Handle::Container { groups, iommu, .. } = h else {
            return Err(err(libc::EBADF));
        };
        if groups.is_empty() {
            return Err(err(libc::EINVAL));
        }
        if *iommu {
            return Err(err(libc::EBUSY));
        }
        if kind != VFIO_TYPE1v2_IOMMU || !type1v2 {
            return Err(err(libc::ENODEV));
        }
        *iommu = true;
        Ok(())
    }

    fn iommu_pgsizes(&self, container: BorrowedFd<'_>) -> io::Result<u64> {
        let mut st = self.lock();
        st.call("iommu_pgsizes", String::new())?;
        let (_, h) = st.container(container)?;
        let Handle::Container { groups, iommu, .. } = h else {
            return Err(err(libc::EBADF));
        };
        if !*iommu {
            return Err(err(libc::EINVAL));
        }
        let groups = groups.clone();
        Ok(st.container_pgsizes(&groups))
    }

    fn container_map(
        &self,
        container: BorrowedFd<'_>,
        vaddr: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut st = self.lock();
        st.call("container_map", format!("{iova:#x}+{size:#x}"))?;
        let (_, h) = st.container(container)?;
        let Handle::Container { iommu, maps, .. } = h else {
            return Err(err(libc::EBADF));
        };
        if !*iommu {
            return Err(err(libc::EINVAL));
        }
        if size == 0 || overlaps(maps, iova, size) {
            return Err(err(libc::EEXIST));
        }
        maps.insert(
            iova,
            Mapping {
                size,
                prot,
                at: Backing::Vaddr(vaddr),
            },
        );
        Ok(())
    }

    fn container_unmap(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.call("container_unmap", format!("{iova:#x}+{size:#x}"))?;
        let (_, h) = st.container(container)?;
        let Handle::Container { maps, .. } = h else {
            return Err(err(libc::EBADF));
        };
        match maps.get(&iova) {
            Some(m) if m.size == size => {
                maps.remove(&iova);
                Ok(())
            }
            _ => Err(err(libc::ENOENT)),
        }
    }

    fn open_group(&self, group: u32) -> io::Result<OwnedFd> {
        let mut st = self.lock();
        st.call("open_group", group.to_string())?;
        let g = st.groups.get(&group).ok_or_else(|| err(libc::ENOENT))?;
        if g.handle.is_some() {
            return Err(err(libc::EBUSY));
        }
        let cdev_bound = st
            .devices
            .values()
            .any(|d| d.cfg.as_ref().is_some_and(|c| c.group == group) && d.bound.is_some());
        if cdev_bound {
            return Err(err(libc::EBUSY));
        }
        let fd = st.new_handle(Handle::Group(group), 0)?;
        let id = handle_of(fd.as_fd()).ok_or_else(|| err(libc::EBADF))?;
        if let Some(g) = st.groups.get_mut(&group) {
            g.handle = Some(id);
        }
        Ok(fd)
    }

    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut st = self.lock();
        st.call("group_status", String::new())?;
        let n = st.group_no(group)?;
        let g = st.groups.get(&n).ok_or_else(|| err(libc::ENODEV))?;
        let mut flags = 0;
        if g.viable {
            flags |= VFIO_GROUP_FLAGS_VIABLE;
        }
        if g.container.is_some() {
            flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
        }
        Ok(flags)
    }

    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut st = self.lock();
        let n = st.group_no(group)?;
        st.call("group_set_container", n.to_string())?;
        if st.groups.get(&n).is_none_or(|g| g.container.is_some()) {
            return Err(err(libc::EBUSY));
        }
        if st.groups.get(&n).is_some_and(|g| !g.viable) {
            return Err(err(libc::EPERM));
        }
        let (c, h) = st.container(container)?;
        let Handle::Container { groups, .. } = h else {
            return Err(err(libc::EBADF));
        };
        groups.push(n);
        if let Some(g) = st.groups.get_mut(&n) {
            g.container = Some(c);
        }
        Ok(())
    }

    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.lock();
        let n = st.group_no(group)?;
        st.call("group_unset_container", n.to_string())?;
        let c = st
            .groups
            .get(&n)
            .and_then(|g| g.container)
            .ok_or_else(|| err(libc::EINVAL))?;
        let open_devices = st.devices.values().any(|d| {
            d.cfg.as_ref().is_some_and(|c| c.group == n) && !d.fds.is_empty() && d.bound.is_none()
        });
        if open_devices {
            return Err(err(libc::EBUSY));
        }
        if let Some(g) = st.groups.get_mut(&n) {
            g.container = None;
        }
        st.leave_container(c, n);
        Ok(())
    }

    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
        let mut st = self.lock();
        let n = st.group_no(group)?;
        st.call("group_device_fd", name.to_string())?;
        let c = st
            .groups
            .get(&n)
            .and_then(|g| g.container)
            .ok_or_else(|| err(libc::EINVAL))?;
        if !matches!(
            st.handles.get(&c),
            Some(Handle::Container { iommu: true, .. })
        ) {
            return Err(err(libc::EINVAL));
        }
        let a: PciAddress = name.parse().map_err(|_| err(libc::ENODEV))?;
        if st.cfg(&a)?.group != n {
            return Err(err(libc::ENODEV));
        }
        if st.devices.get(&a).is_some_and(|d| d.bound.is_some()) {
            return Err(err(libc::EBUSY));
        }
        let fd = st.new_handle(
            Handle::Device {
                address: a,
                cdev: false,
            },
            region_offset(9),
        )?;
        st.init_device_memory(&fd, &a)?;
        let id = handle_of(fd.as_fd()).ok_or_else(|| err(libc::EBADF))?;
        st.open_device(&a, id);
        Ok(fd)
    }

    fn open_iommufd(&self) -> io::Result<OwnedFd> {
        let mut st = self.lock();
        st.call("open_iommufd", String::new())?;
        if !st.iommufd {
            return Err(err(libc::ENOENT));
        }
        st.new_handle(
            Handle::Iommufd {
                ioas: BTreeMap::new(),
                next: 1,
            },
            0,
        )
    }

    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut st = self.lock();
        st.call("ioas_alloc", String::new())?;
        let live: usize = st
            .handles
            .values()
            .map(|h| match h {
                Handle::Iommufd { ioas, .. } => ioas.len(),
                _ => 0,
            })
            .sum();
        if live >= st.max_ioas {
            return Err(err(libc::ENOSPC));
        }
        let id = handle_of(iommufd).ok_or_else(|| err(libc::EBADF))?;
        match st.handles.get_mut(&id) {
            Some(Handle::Iommufd { ioas, next }) => {
                let n = *next;
                *next += 1;
                ioas.insert(n, BTreeMap::new());
                Ok(n)
            }
            _ => Err(err(libc::EBADF)),
        }
    }

    fn ioas_destroy(&self, iommufd: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        let mut st = self.lock();
        st.call("ioas_destroy", ioas.to_string())?;
        let id = handle_of(iommufd).ok_or_else(|| err(libc::EBADF))?;
        let attached = st
            .devices
            .values()
            .any(|d| d.bound.is_some_and(|(i, _)| i == id) && d.ioas == Some(ioas));
        if attached {
            return Err(err(libc::EBUSY));
        }
        let mut dropped = 0;
        match st.handles.get_mut(&id) {
            Some(Handle::Iommufd { ioas: all, .. }) => {
                let maps = all.remove(&ioas).ok_or_else(|| err(libc::ENOENT))?;
                dropped += maps.len() as u64;
            }
            _ => return Err(err(libc::EBADF)),
        }
        st.implicit_unmaps += dropped;
        Ok(())
    }

    fn ioas_map_file(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        file: BorrowedFd<'_>,
        offset: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut st = self.lock();
        st.call("ioas_map_file", format!("{iova:#x}+{size:#x}"))?;
        if !st.map_file {
            return Err(err(libc::ENOTTY));
        }
        let dup = File::from(file.try_clone_to_owned()?);
        let maps = st.ioas_maps(iommufd, ioas)?;
        if size == 0 || overlaps(maps, iova, size) {
            return Err(err(libc::EEXIST));
        }
        maps.insert(
            iova,
            Mapping {
                size,
                prot,
                at: Backing::File(dup, offset),
            },
        );
        Ok(())
    }

    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        vaddr: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut st = self.lock();
        st.call("ioas_map", format!("{iova:#x}+{size:#x}"))?;
        let maps = st.ioas_maps(iommufd, ioas)?;
        if size == 0 || overlaps(maps, iova, size) {
            return Err(err(libc::EEXIST));
        }
        maps.insert(
            iova,
            Mapping {
                size,
                prot,
                at: Backing::Vaddr(vaddr),
            },
        );
        Ok(())
    }

    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
    ) -> io::Result<()> {
        let mut st = self.lock();
        st.call("ioas_unmap", format!("{iova:#x}+{size:#x}"))?;
        let maps = st.ioas_maps(iommufd, ioas)?;
        match maps.get(&iova) {
            Some(m) if m.size == size => {
                maps.remove(&iova);
                Ok(())
            }
            _ => Err(err(libc::ENOENT)),
        }
    }

    fn open_cdev(&self, name: &str) -> io::Result<OwnedFd> {
        let mut st = self.lock();
        st.call("open_cdev", name.to_string())?;
        let a = st
            .devices
            .iter()
            .find(|(_, d)| d.cfg.as_ref().and_then(|c| c.cdev.as_deref()) == Some(name))
            .map(|(a, _)| *a)
            .ok_or_else(|| err(libc::ENOENT))?;
        let fd = st.new_handle(
            Handle::Device {
                address: a,
                cdev: true,
            },
            region_offset(9),
        )?;
        st.init_device_memory(&fd, &a)?;
        Ok(fd)
    }

    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut st = self.lock();
        st.call("bind_iommufd", String::new())?;
        let (id, a) = match st.handle(device)? {
            (
                id,
                Handle::Device {
                    address,
                    cdev: true,
                },
            ) => (id, *address),
            _ => return Err(err(libc::EBADF)),
        };
        let ictx = match st.handle(iommufd)? {
            (i, Handle::Iommufd { .. }) => i,
            _ => return Err(err(libc::EBADF)),
        };
        let group = st.cfg(&a)?.group;
        if st.groups.get(&group).is_some_and(|g| g.handle.is_some()) {
            return Err(err(libc::EBUSY));
        }
        if st.devices.get(&a).is_some_and(|d| d.bound.is_some()) {
            return Err(err(libc::EBUSY));
        }
        let devid = st.next_devid;
        st.next_devid += 1;
        if let Some(d) = st.devices.get_mut(&a) {
            d.bound = Some((ictx, devid));
            d.stats.bound = true;
        }
        st.open_device(&a, id);
        Ok(devid)
    }

    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        let mut st = self.lock();
        st.call("attach_ioas", ioas.to_string())?;
        let a = st.device(device)?;
        let (ictx, _) = st
            .devices
            .get(&a)
            .and_then(|d| d.bound)
            .ok_or_else(|| err(libc::EINVAL))?;
        match st.handles.get(&ictx) {
            Some(Handle::Iommufd { ioas: all, .. }) if all.contains_key(&ioas) => {}
            _ => return Err(err(libc::ENOENT)),
        }
        if let Some(d) = st.devices.get_mut(&a) {
            d.ioas = Some(ioas);
            d.stats.ioas = Some(ioas);
        }
        Ok(())
    }

    fn detach_ioas(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.lock();
        st.call("detach_ioas", String::new())?;
        let a = st.device(device)?;
        let d = st.devices.get_mut(&a).ok_or_else(|| err(libc::ENODEV))?;
        if d.ioas.take().is_none() {
            return Err(err(libc::EINVAL));
        }
        d.stats.ioas = None;
        Ok(())
    }

    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfoRaw> {
        let mut st = self.lock();
        st.call("device_info", String::new())?;
        let a = st.device(device)?;
        let c = st.cfg(&a)?;
        Ok(DeviceInfoRaw {
            flags: c.flags,
            num_regions: c.regions.len() as u32,
            num_irqs: c.irqs.len() as u32,
        })
    }

    fn region_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfoRaw> {
        let mut st = self.lock();
        st.call("region_info", index.to_string())?;
        let a = st.device(device)?;
        let mut r = st
            .cfg(&a)?
            .regions
            .get(index as usize)
            .cloned()
            .ok_or_else(|| err(libc::EINVAL))?;
        // vfio-pci refuses the VGA region of a device that is not VGA.
        if index == VGA_REGION_INDEX && r.flags == 0 && r.size == 0 {
            return Err(err(libc::EINVAL));
        }
        r.offset = region_offset(index);
        Ok(r)
    }

    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfoRaw> {
        let mut st = self.lock();
        st.call("irq_info", index.to_string())?;
        let a = st.device(device)?;
        let irq = st
            .cfg(&a)?
            .irqs
            .get(index as usize)
            .copied()
            .ok_or_else(|| err(libc::EINVAL))?;
        // vfio-pci refuses the error interrupt of a device that is not
        // PCI Express.
        if index == ERR_IRQ_INDEX && irq.count == 0 {
            return Err(err(libc::EINVAL));
        }
        Ok(irq)
    }

    fn set_irqs(
        &self,
        device: BorrowedFd<'_>,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut st = self.lock();
        st.call(
            "set_irqs",
            format!(
                "flags {flags:#x} index {index} {start}+{count} data {}",
                data.len()
            ),
        )?;
        let a = st.device(device)?;
        let irq = st
            .cfg(&a)?
            .irqs
            .get(index as usize)
            .copied()
            .ok_or_else(|| err(libc::EINVAL))?;
        let d = st.devices.get_mut(&a).ok_or_else(|| err(libc::ENODEV))?;
        let data_type = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        if count == 0 {
            if data_type != VFIO_IRQ_SET_DATA_NONE || flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
                return Err(err(libc::EINVAL));
            }
            d.irqs.retain(|(i, _), _| *i != index);
            d.stats.armed.remove(&index);
            return Ok(());
        }
        if start.checked_add(count).is_none_or(|e| e > irq.count) {
            return Err(err(libc::EINVAL));
        }
        if data_type == VFIO_IRQ_SET_DATA_EVENTFD {
            if data.len() != 4 * count as usize || flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
                return Err(err(libc::EINVAL));
            }
            let mut new = Vec::new();
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                let raw = i32::from_ne_bytes(chunk.try_into().map_err(|_| err(libc::EINVAL))?);
                let v = start + i as u32;
                if raw < 0 {
                    new.push((v, None));
                    continue;
                }
                // SAFETY: the caller keeps `raw` open through the call;
                // only borrowed here, to take the kernel's own reference.
                let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                new.push((v, Some(File::from(fd.try_clone_to_owned()?))));
            }
            for (v, f) in new {
                match f {
                    Some(f) => {
                        d.irqs.insert((index, v), f);
                    }
                    None => {
                        d.irqs.remove(&(index, v));
                    }
                }
            }
            if d.irqs.keys().any(|(i, _)| *i == index) {
                d.stats.armed.insert(index);
            } else {
                d.stats.armed.remove(&index);
            }
        }
        Ok(())
    }

    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        let mut st = self.lock();
        st.call("reset", String::new())?;
        let a = st.device(device)?;
        if st.cfg(&a)?.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Err(err(libc::EINVAL));
        }
        if let Some(d) = st.devices.get_mut(&a) {
            d.stats.resets += 1;
        }
        Ok(())
    }

    fn hot_reset_info(&self, device: BorrowedFd<'_>) -> io::Result<HotResetInfo> {
        let mut st = self.lock();
        st.call("hot_reset_info", String::new())?;
        let (_, h) = st.handle(device)?;
        let cdev = matches!(h, Handle::Device { cdev: true, .. });
        let a = st.device(device)?;
        let bridge = st
            .cfg(&a)?
            .upstream_bridge
            .ok_or_else(|| err(libc::ENODEV))?;
        let mut devices = Vec::new();
        for (addr, d) in &st.devices {
            let Some(c) = &d.cfg else { continue };
            if c.upstream_bridge != Some(bridge) {
                continue;
            }
            let id = if cdev {
                d.bound.map_or(u32::MAX, |(_, devid)| devid)
            } else {
                c.group
            };
            devices.push(Dependent { id, address: *addr });
        }
        Ok(HotResetInfo {
            flags: if cdev {
                VFIO_PCI_HOT_RESET_FLAG_DEV_ID
            } else {
                0
            },
            devices,
        })
    }

    fn hot_reset(&self, device: BorrowedFd<'_>, groups: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut st = self.lock();
        st.call("hot_reset", format!("{} groups", groups.len()))?;
        let a = st.device(device)?;
        let bridge = st
            .cfg(&a)?
            .upstream_bridge
            .ok_or_else(|| err(libc::ENODEV))?;
        let set: Vec<PciAddress> = st
            .devices
            .iter()
            .filter(|(_, d)| {
                d.cfg
                    .as_ref()
                    .is_some_and(|c| c.upstream_bridge == Some(bridge))
            })
            .map(|(a, _)| *a)
            .collect();
        if groups.is_empty() {
            let mine = st.devices.get(&a).and_then(|d| d.bound).map(|(i, _)| i);
            let Some(mine) = mine else {
                return Err(err(libc::EINVAL));
            };
            for x in &set {
                let d = &st.devices[x];
                if !d.fds.is_empty() && d.bound.map(|(i, _)| i) != Some(mine) {
                    return Err(err(libc::EPERM));
                }
            }
        } else {
            let mut given = BTreeSet::new();
            for g in groups {
                given.insert(st.group_no(*g)?);
            }
            for x in &set {
                if !given.contains(&st.cfg(x)?.group) {
                    return Err(err(libc::EINVAL));
                }
            }
        }
        for x in &set {
            if let Some(d) = st.devices.get_mut(x) {
                d.stats.hot_resets += 1;
            }
        }
        Ok(())
    }

    fn read(&self, device: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.lock();
        st.device(device)?;
        drop(st);
        let f = File::from(device.try_clone_to_owned()?);
        f.read_exact_at(buf, offset)
    }

    fn write(&self, device: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<()> {
        let st = self.lock();
        st.device(device)?;
        drop(st);
        let f = File::from(device.try_clone_to_owned()?);
        f.write_all_at(data, offset)
    }
}
