//! [`HostSys`]: the real [`VfioSys`], on Linux's VFIO and iommufd.
//!
//! This is the only code in vdevd that opens `/dev/vfio` or `/dev/iommu`.
//! Fixed-size kernel structures come from `vfio-bindings` and
//! `iommufd-bindings`; the iommufd ioctls go through `iommufd-ioctls`. The
//! VFIO ioctl request numbers (which `vfio-bindings` does not carry) and
//! the variable-size structures (region info capability chains, SET_IRQS
//! payloads, hot reset lists) are written here, each `unsafe` block with
//! the reason it is sound.
//!
//! `vfio-ioctls` is not used: its container and device types open the
//! group, set up the container and open the device in one constructor (so
//! there is no seam for device sets, explicit binding or a fake), its
//! region accessors and reset drop the kernel's error, and it has no hot
//! reset.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{ManuallyDrop, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use iommufd_bindings::iommufd::{
    iommu_ioas_alloc, iommu_ioas_map, iommu_ioas_map_file, iommu_ioas_unmap,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_info,
    vfio_irq_info,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

use super::sys::{
    Dependent, DeviceInfoRaw, HotResetInfo, IrqInfoRaw, PciAddress, RegionInfoRaw, SysfsDevice,
    VfioSys,
};
use crate::dma::Prot;

// VFIO's ioctls are _IO(';', 100 + n), all on one type and base.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;
vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE, VFIO_BASE + 1);
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE, VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_UNSET_CONTAINER, VFIO_TYPE, VFIO_BASE + 5);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE, VFIO_BASE + 9);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_TYPE,
    VFIO_BASE + 12
);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_PCI_HOT_RESET, VFIO_TYPE, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE, VFIO_BASE + 12);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE, VFIO_BASE + 14);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_DETACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 20);

/// Largest region info reply accepted (capability chains are small).
const MAX_REGION_INFO: usize = 64 << 10;
/// Most devices a hot reset list may name.
const MAX_HOT_RESET_DEVICES: u32 = 1024;
/// Capabilities walked at most in one chain (a loop in a chain ends here).
const MAX_CAPS: usize = 64;

/// The host's VFIO and iommufd. Stateless: every descriptor it opens is
/// returned to the caller.
#[derive(Debug, Default)]
pub struct HostSys;

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    // Rust opens with O_CLOEXEC: no descriptor leaks into children.
    Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
}

fn owned(fd: i32) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: the kernel just returned this new descriptor to us; nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Run `f` on an `IommuFd` that borrows `fd` (it is never closed here).
fn with_iommufd<T>(
    fd: BorrowedFd<'_>,
    f: impl FnOnce(&IommuFd) -> Result<T, IommufdError>,
) -> io::Result<T> {
    // SAFETY: the File is wrapped in ManuallyDrop and never dropped, so it
    // never closes `fd`, which the caller keeps open for the whole call.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    // The IommuFd takes the File; ManuallyDrop keeps it from closing it.
    let iommufd = ManuallyDrop::new(IommuFd::new_from_fd(ManuallyDrop::into_inner(file)));
    f(&iommufd).map_err(iommufd_error)
}

fn iommufd_error(e: IommufdError) -> io::Error {
    use std::error::Error as _;
    let errno = e
        .source()
        .and_then(|s| s.downcast_ref::<vmm_sys_util::errno::Error>())
        .map(|s| s.errno());
    match errno {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    }
}

fn ioas_flags(prot: Prot) -> u32 {
    let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    if prot.read {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if prot.write {
        flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    flags
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(b.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(b.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed {what} from the kernel"),
    )
}

/// Decode a VFIO_DEVICE_GET_REGION_INFO reply (header and capability
/// chain). Public to the crate for its tests.
pub(crate) fn parse_region_info(buf: &[u8]) -> io::Result<RegionInfoRaw> {
    let flags = u32_at(buf, 4).ok_or_else(|| malformed("region info"))?;
    let cap_offset = u32_at(buf, 12).ok_or_else(|| malformed("region info"))?;
    let size = u64_at(buf, 16).ok_or_else(|| malformed("region info"))?;
    let offset = u64_at(buf, 24).ok_or_else(|| malformed("region info"))?;
    let mut info = RegionInfoRaw {
        flags,
        size,
        offset,
        ..RegionInfoRaw::default()
    };
    if flags & VFIO_REGION_INFO_FLAG_CAPS == 0 {
        return Ok(info);
    }
    let mut at = cap_offset as usize;
    for _ in 0..MAX_CAPS {
        if at == 0 {
            return Ok(info);
        }
        let id = u16_at(buf, at).ok_or_else(|| malformed("capability"))?;
        let next = u32_at(buf, at + 4).ok_or_else(|| malformed("capability"))?;
        match u32::from(id) {
            VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                let n = u32_at(buf, at + 8).ok_or_else(|| malformed("sparse mmap"))?;
                let mut areas = Vec::new();
                for i in 0..n as usize {
                    let a = at + 16 + i * 16;
                    let off = u64_at(buf, a).ok_or_else(|| malformed("sparse mmap"))?;
                    let len = u64_at(buf, a + 8).ok_or_else(|| malformed("sparse mmap"))?;
                    areas.push((off, len));
                }
                info.sparse = Some(areas);
            }
            VFIO_REGION_INFO_CAP_TYPE => {
                let t = u32_at(buf, at + 8).ok_or_else(|| malformed("region type"))?;
                let s = u32_at(buf, at + 12).ok_or_else(|| malformed("region type"))?;
                info.region_type = Some((t, s));
            }
            _ => {} // MSIX_MAPPABLE and others: nothing vdevd relays
        }
        // A next pointer that does not move forward would loop.
        if next != 0 && (next as usize) <= at {
            return Err(malformed("capability chain"));
        }
        at = next as usize;
    }
    Err(malformed("capability chain (too long)"))
}

/// Decode a VFIO_DEVICE_GET_PCI_HOT_RESET_INFO reply.
pub(crate) fn parse_hot_reset_info(buf: &[u8]) -> io::Result<HotResetInfo> {
    let flags = u32_at(buf, 4).ok_or_else(|| malformed("hot reset info"))?;
    let count = u32_at(buf, 8).ok_or_else(|| malformed("hot reset info"))?;
    let mut devices = Vec::new();
    for i in 0..count as usize {
        let at = 12 + i * 8;
        let id = u32_at(buf, at).ok_or_else(|| malformed("hot reset info"))?;
        let segment = u16_at(buf, at + 4).ok_or_else(|| malformed("hot reset info"))?;
        let bus = *buf.get(at + 6).ok_or_else(|| malformed("hot reset info"))?;
        let devfn = *buf.get(at + 7).ok_or_else(|| malformed("hot reset info"))?;
        devices.push(Dependent {
            id,
            address: PciAddress::from_devfn(segment, bus, devfn),
        });
    }
    Ok(HotResetInfo { flags, devices })
}

/// An 8-byte aligned, zeroed buffer for variable-size ioctl arguments.
struct IoctlBuf(Vec<u64>);

impl IoctlBuf {
    fn new(bytes: usize) -> IoctlBuf {
        IoctlBuf(vec![0; bytes.div_ceil(8)])
    }

    fn bytes(&self) -> &[u8] {
        let len = self.0.len() * 8;
        // SAFETY: the Vec owns len bytes of initialised u64s, and u8 has no
        // alignment or validity requirement; the slice borrows self.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), len) }
    }

    fn put(&mut self, at: usize, data: &[u8]) {
        let len = self.0.len() * 8;
        // SAFETY: as in bytes(), for a mutable borrow of self.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) };
        if let Some(dst) = at
            .checked_add(data.len())
            .and_then(|end| bytes.get_mut(at..end))
        {
            dst.copy_from_slice(data);
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr().cast()
    }
}

impl VfioSys for HostSys {
    fn sysfs_device(&self, address: &PciAddress) -> io::Result<SysfsDevice> {
        let base = Path::new("/sys/bus/pci/devices").join(address.to_string());
        if !base.exists() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let name = |link: &Path| -> Option<String> {
            std::fs::read_link(link)
                .ok()?
                .file_name()?
                .to_str()
                .map(str::to_string)
        };
        let driver = name(&base.join("driver"));
        let iommu_group = name(&base.join("iommu_group")).and_then(|g| g.parse().ok());
        let cdev = std::fs::read_dir(base.join("vfio-dev")).ok().and_then(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .find(|n| n.starts_with("vfio"))
        });
        let upstream_bridge = std::fs::canonicalize(&base)
            .ok()
            .and_then(|p| p.parent()?.file_name()?.to_str()?.parse().ok());
        Ok(SysfsDevice {
            driver,
            iommu_group,
            cdev,
            upstream_bridge,
        })
    }

    fn open_container(&self) -> io::Result<OwnedFd> {
        open_rw(Path::new("/dev/vfio/vfio"))
    }

    fn api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32> {
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        check(unsafe { ioctl(&container, VFIO_GET_API_VERSION()) })
    }

    fn check_extension(&self, container: BorrowedFd<'_>, ext: u32) -> io::Result<bool> {
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
        let rc = check(unsafe {
            ioctl_with_val(&container, VFIO_CHECK_EXTENSION(), libc::c_ulong::from(ext))
        })?;
        Ok(rc > 0)
    }

    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        check(unsafe { ioctl_with_val(&container, VFIO_SET_IOMMU(), libc::c_ulong::from(kind)) })
            .map(drop)
    }

    fn iommu_pgsizes(&self, container: BorrowedFd<'_>) -> io::Result<u64> {
        let mut info = vfio_iommu_type1_info {
            argsz: size_of::<vfio_iommu_type1_info>() as u32,
            ..Default::default()
        };
        // SAFETY: info is a valid vfio_iommu_type1_info whose argsz is its
        // size; the kernel writes at most that much.
        check(unsafe { ioctl_with_mut_ref(&container, VFIO_IOMMU_GET_INFO(), &mut info) })?;
        if info.flags & VFIO_IOMMU_INFO_PGSIZES == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        Ok(info.iova_pgsizes)
    }

    fn container_map(
        &self,
        container: BorrowedFd<'_>,
        vaddr: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()> {
        let mut flags = 0;
        if prot.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if prot.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        let map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        // SAFETY: map is a valid vfio_iommu_type1_dma_map the kernel only
        // reads; the caller keeps vaddr..vaddr+size mapped while it is in
        // the IOMMU.
        check(unsafe { ioctl_with_ref(&container, VFIO_IOMMU_MAP_DMA(), &map) }).map(drop)
    }

    fn container_unmap(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        // struct vfio_iommu_type1_dma_unmap: argsz, flags, iova, size (no
        // bitmap: 24 bytes).
        let mut buf = IoctlBuf::new(24);
        buf.put(0, &24u32.to_ne_bytes());
        buf.put(8, &iova.to_ne_bytes());
        buf.put(16, &size.to_ne_bytes());
        let ptr = buf.ptr();
        // SAFETY: ptr points to 24 writable, aligned bytes laid out as the
        // kernel's vfio_iommu_type1_dma_unmap with argsz 24; the kernel
        // writes back the unmapped size within them.
        check(unsafe { ioctl_with_mut_ptr(&container, VFIO_IOMMU_UNMAP_DMA(), ptr) })?;
        let unmapped = u64_at(buf.bytes(), 16).unwrap_or(0);
        if unmapped != size {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the kernel unmapped {unmapped:#x} of {size:#x} bytes"),
            ));
        }
        Ok(())
    }

    fn open_group(&self, group: u32) -> io::Result<OwnedFd> {
        open_rw(&Path::new("/dev/vfio").join(group.to_string()))
    }

    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut status = vfio_group_status {
            argsz: size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: status is a valid vfio_group_status of argsz bytes.
        check(unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) })?;
        Ok(status.flags)
    }

    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let fd: i32 = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int, the container fd.
        check(unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &fd) }).map(drop)
    }

    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument.
        check(unsafe { ioctl(&group, VFIO_GROUP_UNSET_CONTAINER()) }).map(drop)
    }

    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
        let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the kernel reads a NUL-terminated string, which name is
        // and which lives through the call.
        let fd = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        owned(fd)
    }

    fn open_iommufd(&self) -> io::Result<OwnedFd> {
        open_rw(Path::new("/dev/iommu"))
    }

    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut alloc = iommu_ioas_alloc {
            size: size_of::<iommu_ioas_alloc>() as u32,
            flags: 0,
            out_ioas_id: 0,
        };
        with_iommufd(iommufd, |i| i.alloc_iommu_ioas(&mut alloc))?;
        Ok(alloc.out_ioas_id)
    }

    fn ioas_destroy(&self, iommufd: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        with_iommufd(iommufd, |i| i.destroy_iommu_object(ioas))
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
        let map = iommu_ioas_map_file {
            size: size_of::<iommu_ioas_map_file>() as u32,
            flags: ioas_flags(prot),
            ioas_id: ioas,
            fd: file.as_raw_fd(),
            start: offset,
            length: size,
            iova,
        };
        with_iommufd(iommufd, |i| i.map_iommu_ioas_file(&map))
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
        let map = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>() as u32,
            flags: ioas_flags(prot),
            ioas_id: ioas,
            __reserved: 0,
            user_va: vaddr,
            length: size,
            iova,
        };
        with_iommufd(iommufd, |i| i.map_iommu_ioas(&map))
    }

    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
    ) -> io::Result<()> {
        let mut unmap = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: ioas,
            iova,
            length: size,
        };
        with_iommufd(iommufd, |i| i.unmap_iommu_ioas(&mut unmap))?;
        if unmap.length != size {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the kernel unmapped {:#x} of {size:#x} bytes", unmap.length),
            ));
        }
        Ok(())
    }

    fn open_cdev(&self, name: &str) -> io::Result<OwnedFd> {
        if name.is_empty() || name.contains('/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        open_rw(&Path::new("/dev/vfio/devices").join(name))
    }

    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut bind = vfio_device_bind_iommufd {
            // Up to out_devid: what every kernel with the cdev accepts.
            argsz: 16,
            flags: 0,
            iommufd: iommufd.as_raw_fd(),
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        // SAFETY: bind is a valid vfio_device_bind_iommufd; argsz (16)
        // covers only fields it has, which the kernel reads and writes.
        check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_BIND_IOMMUFD(), &mut bind) })?;
        Ok(bind.out_devid)
    }

    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        let mut attach = vfio_device_attach_iommufd_pt {
            // Up to pt_id: no PASID.
            argsz: 12,
            flags: 0,
            pt_id: ioas,
            pasid: 0,
        };
        // SAFETY: attach is a valid vfio_device_attach_iommufd_pt; argsz 12
        // covers fields it has.
        check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut attach) })
            .map(drop)
    }

    fn detach_ioas(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        let detach = vfio_device_detach_iommufd_pt {
            argsz: 8,
            flags: 0,
            pasid: 0,
        };
        // SAFETY: detach is a valid vfio_device_detach_iommufd_pt; argsz 8
        // covers fields it has.
        check(unsafe { ioctl_with_ref(&device, VFIO_DEVICE_DETACH_IOMMUFD_PT(), &detach) })
            .map(drop)
    }

    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfoRaw> {
        let mut info = vfio_device_info {
            argsz: size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: info is a valid vfio_device_info of argsz bytes.
        check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
        Ok(DeviceInfoRaw {
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        })
    }

    fn region_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfoRaw> {
        let mut size = 256usize;
        loop {
            let mut buf = IoctlBuf::new(size);
            buf.put(0, &(size as u32).to_ne_bytes());
            buf.put(8, &index.to_ne_bytes());
            let ptr = buf.ptr();
            // SAFETY: ptr points to `size` writable, aligned bytes starting
            // with a vfio_region_info whose argsz is `size`; the kernel
            // writes at most argsz bytes.
            check(unsafe { ioctl_with_mut_ptr(&device, VFIO_DEVICE_GET_REGION_INFO(), ptr) })?;
            let want = u32_at(buf.bytes(), 0).unwrap_or(0) as usize;
            if want <= size {
                return parse_region_info(buf.bytes());
            }
            if want > MAX_REGION_INFO {
                return Err(malformed("region info size"));
            }
            size = want;
        }
    }

    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfoRaw> {
        let mut info = vfio_irq_info {
            argsz: size_of::<vfio_irq_info>() as u32,
            flags: 0,
            index,
            count: 0,
        };
        // SAFETY: info is a valid vfio_irq_info of argsz bytes.
        check(unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_IRQ_INFO(), &mut info) })?;
        Ok(IrqInfoRaw {
            flags: info.flags,
            count: info.count,
        })
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
        let argsz = 20usize
            .checked_add(data.len())
            .filter(|n| *n <= u32::MAX as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut buf = IoctlBuf::new(argsz);
        buf.put(0, &(argsz as u32).to_ne_bytes());
        buf.put(4, &flags.to_ne_bytes());
        buf.put(8, &index.to_ne_bytes());
        buf.put(12, &start.to_ne_bytes());
        buf.put(16, &count.to_ne_bytes());
        buf.put(20, data);
        let ptr = buf.ptr();
        // SAFETY: ptr points to argsz bytes laid out as vfio_irq_set with
        // its payload; the kernel only reads them. Descriptors in the
        // payload are the caller's and stay open through the call.
        check(unsafe { ioctl_with_ptr(&device, VFIO_DEVICE_SET_IRQS(), ptr.cast_const()) })
            .map(drop)
    }

    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        check(unsafe { ioctl(&device, VFIO_DEVICE_RESET()) }).map(drop)
    }

    fn hot_reset_info(&self, device: BorrowedFd<'_>) -> io::Result<HotResetInfo> {
        let mut count = 0u32;
        loop {
            let argsz = 12 + 8 * count as usize;
            let mut buf = IoctlBuf::new(argsz);
            buf.put(0, &(argsz as u32).to_ne_bytes());
            let ptr = buf.ptr();
            // SAFETY: ptr points to argsz writable, aligned bytes starting
            // with a vfio_pci_hot_reset_info whose argsz says how many
            // entries fit; the kernel writes at most argsz bytes.
            let rc =
                unsafe { ioctl_with_mut_ptr(&device, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(), ptr) };
            let needed = u32_at(buf.bytes(), 8).unwrap_or(0);
            match check(rc) {
                Ok(_) => return parse_hot_reset_info(buf.bytes()),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && needed > count => {
                    if needed > MAX_HOT_RESET_DEVICES {
                        return Err(malformed("hot reset device count"));
                    }
                    count = needed;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn hot_reset(&self, device: BorrowedFd<'_>, groups: &[BorrowedFd<'_>]) -> io::Result<()> {
        let argsz = 12 + 4 * groups.len();
        let mut buf = IoctlBuf::new(argsz);
        buf.put(0, &(argsz as u32).to_ne_bytes());
        buf.put(8, &(groups.len() as u32).to_ne_bytes());
        for (i, g) in groups.iter().enumerate() {
            buf.put(12 + 4 * i, &g.as_raw_fd().to_ne_bytes());
        }
        let ptr = buf.ptr();
        // SAFETY: ptr points to argsz bytes laid out as vfio_pci_hot_reset
        // with `groups.len()` group descriptors, which stay open through
        // the call; the kernel only reads them.
        check(unsafe { ioctl_with_ptr(&device, VFIO_DEVICE_PCI_HOT_RESET(), ptr.cast_const()) })
            .map(drop)
    }

    fn read(&self, device: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let rest = &mut buf[done..];
            // SAFETY: rest is a valid writable buffer of rest.len() bytes.
            let n = unsafe {
                libc::pread(
                    device.as_raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    pos,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write(&self, device: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let rest = &data[done..];
            // SAFETY: rest is a valid readable buffer of rest.len() bytes.
            let n =
                unsafe { libc::pwrite(device.as_raw_fd(), rest.as_ptr().cast(), rest.len(), pos) };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(buf: &mut Vec<u8>, at: usize, v: &[u8]) {
        if buf.len() < at + v.len() {
            buf.resize(at + v.len(), 0);
        }
        buf[at..at + v.len()].copy_from_slice(v);
    }

    #[test]
    fn region_info_capability_chain_is_decoded() {
        let mut b = Vec::new();
        put(&mut b, 0, &104u32.to_ne_bytes());
        put(&mut b, 4, &(VFIO_REGION_INFO_FLAG_CAPS | 7).to_ne_bytes());
        put(&mut b, 12, &32u32.to_ne_bytes());
        put(&mut b, 16, &0x1000u64.to_ne_bytes());
        put(&mut b, 24, &0x10_0000_0000u64.to_ne_bytes());
        // type cap at 32, next 48
        put(
            &mut b,
            32,
            &(VFIO_REGION_INFO_CAP_TYPE as u16).to_ne_bytes(),
        );
        put(&mut b, 36, &48u32.to_ne_bytes());
        put(&mut b, 40, &0x8086_0003u32.to_ne_bytes());
        put(&mut b, 44, &2u32.to_ne_bytes());
        // sparse cap at 48 with two areas, last
        put(
            &mut b,
            48,
            &(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16).to_ne_bytes(),
        );
        put(&mut b, 56, &2u32.to_ne_bytes());
        put(&mut b, 64, &0u64.to_ne_bytes());
        put(&mut b, 72, &0x800u64.to_ne_bytes());
        put(&mut b, 80, &0xc00u64.to_ne_bytes());
        put(&mut b, 88, &0x400u64.to_ne_bytes());
        let r = parse_region_info(&b).unwrap();
        assert_eq!(r.size, 0x1000);
        assert_eq!(r.offset, 0x10_0000_0000);
        assert_eq!(r.region_type, Some((0x8086_0003, 2)));
        assert_eq!(r.sparse, Some(vec![(0, 0x800), (0xc00, 0x400)]));
    }

    #[test]
    fn malformed_region_info_is_an_error_not_a_panic() {
        // too short
        assert!(parse_region_info(&[0u8; 20]).is_err());
        // a chain that points backwards (would loop)
        let mut b = vec![0u8; 64];
        put(&mut b, 4, &VFIO_REGION_INFO_FLAG_CAPS.to_ne_bytes());
        put(&mut b, 12, &32u32.to_ne_bytes());
        put(&mut b, 32, &99u16.to_ne_bytes());
        put(&mut b, 36, &32u32.to_ne_bytes());
        assert!(parse_region_info(&b).is_err());
        // a sparse cap claiming more areas than the buffer holds
        let mut b = vec![0u8; 64];
        put(&mut b, 4, &VFIO_REGION_INFO_FLAG_CAPS.to_ne_bytes());
        put(&mut b, 12, &32u32.to_ne_bytes());
        put(
            &mut b,
            32,
            &(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16).to_ne_bytes(),
        );
        put(&mut b, 40, &u32::MAX.to_ne_bytes());
        assert!(parse_region_info(&b).is_err());
        // a cap offset past the end
        let mut b = vec![0u8; 32];
        put(&mut b, 4, &VFIO_REGION_INFO_FLAG_CAPS.to_ne_bytes());
        put(&mut b, 12, &0xffff_fff0u32.to_ne_bytes());
        assert!(parse_region_info(&b).is_err());
        // no caps flag: the offset is ignored
        let mut b = vec![0u8; 32];
        put(&mut b, 12, &0xffff_fff0u32.to_ne_bytes());
        assert!(parse_region_info(&b).unwrap().sparse.is_none());
    }

    #[test]
    fn hot_reset_info_is_decoded() {
        let mut b = Vec::new();
        put(&mut b, 4, &0u32.to_ne_bytes());
        put(&mut b, 8, &2u32.to_ne_bytes());
        put(&mut b, 12, &7u32.to_ne_bytes());
        put(&mut b, 16, &0u16.to_ne_bytes());
        b.extend_from_slice(&[1, 0x08]);
        put(&mut b, 20, &7u32.to_ne_bytes());
        put(&mut b, 24, &0u16.to_ne_bytes());
        b.extend_from_slice(&[1, 0x10]);
        let h = parse_hot_reset_info(&b).unwrap();
        assert_eq!(h.devices.len(), 2);
        assert_eq!(h.devices[0].id, 7);
        assert_eq!(h.devices[0].address.to_string(), "0000:01:01.0");
        assert_eq!(h.devices[1].address.to_string(), "0000:01:02.0");
        let mut short = b.clone();
        short.truncate(22);
        assert!(parse_hot_reset_info(&short).is_err());
    }

    #[test]
    fn host_layer_reports_a_missing_device_as_enoent() {
        let a: PciAddress = "ffff:ff:1f.7".parse().unwrap();
        let e = HostSys.sysfs_device(&a).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
}
