//! The system calls the passthrough backend makes, behind a trait.
//!
//! [`VfioSys`] is the whole surface between vdevd and the host kernel's
//! VFIO and iommufd: sysfs look-ups, `open` of the character devices, the
//! ioctls, and positioned reads and writes of device regions. The real
//! implementation is [`super::host::HostSys`]; unit tests use a fake (the
//! `fake-vfio` feature), so every path and every error of the backend is
//! tested without a kernel.
//!
//! Methods take and return plain descriptors and decoded values; the
//! variable-size kernel structures (region info capability chains, SET_IRQS
//! payloads, hot reset lists) are built and parsed by the real
//! implementation only.

use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::str::FromStr;

use crate::dma::Prot;

/// A PCI device address, `SSSS:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// The address of the function `devfn` (device << 3 | function) on a bus.
    pub fn from_devfn(segment: u16, bus: u8, devfn: u8) -> PciAddress {
        PciAddress {
            segment,
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = String;

    /// `SSSS:BB:DD.F`, or `BB:DD.F` in segment 0 (hexadecimal, as `lspci`
    /// prints them).
    fn from_str(s: &str) -> Result<PciAddress, String> {
        let bad = || format!("{s:?} is not a PCI address (SSSS:BB:DD.F or BB:DD.F)");
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (segment, bus, device) = match parts.as_slice() {
            [b, d] => ("0", *b, *d),
            [s, b, d] => (*s, *b, *d),
            _ => return Err(bad()),
        };
        let hex = |v: &str, max: u32| {
            (!v.is_empty() && v.len() <= 4)
                .then(|| u32::from_str_radix(v, 16).ok())
                .flatten()
                .filter(|n| *n <= max)
                .ok_or_else(bad)
        };
        Ok(PciAddress {
            segment: hex(segment, 0xffff)? as u16,
            bus: hex(bus, 0xff)? as u8,
            device: hex(device, 31)? as u8,
            function: hex(function, 7)? as u8,
        })
    }
}

/// What sysfs says about a PCI device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SysfsDevice {
    /// The driver bound to it (`vfio-pci` for a device vdevd can serve).
    pub driver: Option<String>,
    /// Its IOMMU group number (none without an IOMMU).
    pub iommu_group: Option<u32>,
    /// Its VFIO character device (`vfioN` under `/dev/vfio/devices`), when
    /// the kernel has VFIO_DEVICE_CDEV.
    pub cdev: Option<String>,
    /// The bridge above it, when it is not on a root bus: devices behind
    /// one bridge share a secondary bus reset.
    pub upstream_bridge: Option<PciAddress>,
}

/// VFIO_DEVICE_GET_INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfoRaw {
    /// VFIO_DEVICE_FLAGS_*.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
}

/// VFIO_DEVICE_GET_REGION_INFO, with the capabilities vdevd uses decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfoRaw {
    /// VFIO_REGION_INFO_FLAG_*.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device descriptor.
    pub offset: u64,
    /// VFIO_REGION_INFO_CAP_SPARSE_MMAP: (offset, size) of each area.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// VFIO_REGION_INFO_CAP_TYPE: (type, subtype).
    pub region_type: Option<(u32, u32)>,
}

/// VFIO_DEVICE_GET_IRQ_INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfoRaw {
    /// VFIO_IRQ_INFO_*.
    pub flags: u32,
    /// Number of vectors.
    pub count: u32,
}

/// One device a hot reset would affect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dependent {
    /// Its IOMMU group (group path) or iommufd device id (cdev path).
    pub id: u32,
    /// Its address.
    pub address: PciAddress,
}

/// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HotResetInfo {
    /// VFIO_PCI_HOT_RESET_FLAG_*: with DEV_ID the ids are iommufd device
    /// ids, else group numbers.
    pub flags: u32,
    /// Every affected device, the caller's included.
    pub devices: Vec<Dependent>,
}

/// The host kernel's VFIO and iommufd interfaces. See the module docs.
///
/// Every method returns the kernel's error as an `io::Error` carrying the
/// errno; the caller adds what it was doing.
pub trait VfioSys: Send + Sync {
    /// Read sysfs for the device at `address` (ENOENT: no such device).
    fn sysfs_device(&self, address: &PciAddress) -> io::Result<SysfsDevice>;

    // --- the legacy path: container, group, device ---
    /// Open `/dev/vfio/vfio`.
    fn open_container(&self) -> io::Result<OwnedFd>;
    /// VFIO_GET_API_VERSION.
    fn api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32>;
    /// VFIO_CHECK_EXTENSION: whether the IOMMU type `ext` is supported.
    fn check_extension(&self, container: BorrowedFd<'_>, ext: u32) -> io::Result<bool>;
    /// VFIO_SET_IOMMU.
    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()>;
    /// VFIO_IOMMU_GET_INFO: the supported page sizes.
    fn iommu_pgsizes(&self, container: BorrowedFd<'_>) -> io::Result<u64>;
    /// VFIO_IOMMU_MAP_DMA of `size` bytes of this process at `vaddr`.
    fn container_map(
        &self,
        container: BorrowedFd<'_>,
        vaddr: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()>;
    /// VFIO_IOMMU_UNMAP_DMA.
    fn container_unmap(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()>;
    /// Open `/dev/vfio/GROUP`.
    fn open_group(&self, group: u32) -> io::Result<OwnedFd>;
    /// VFIO_GROUP_GET_STATUS: VFIO_GROUP_FLAGS_*.
    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32>;
    /// VFIO_GROUP_SET_CONTAINER.
    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()>;
    /// VFIO_GROUP_UNSET_CONTAINER.
    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()>;
    /// VFIO_GROUP_GET_DEVICE_FD.
    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd>;

    // --- the device-centric path: iommufd, IOAS, VFIO cdev ---
    /// Open `/dev/iommu`.
    fn open_iommufd(&self) -> io::Result<OwnedFd>;
    /// IOMMU_IOAS_ALLOC: the new IOAS id.
    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32>;
    /// IOMMU_DESTROY of an IOAS.
    fn ioas_destroy(&self, iommufd: BorrowedFd<'_>, ioas: u32) -> io::Result<()>;
    /// IOMMU_IOAS_MAP_FILE (Linux 6.13 and later): map `size` bytes of
    /// `file` from `offset` at `iova`.
    #[allow(clippy::too_many_arguments)]
    fn ioas_map_file(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        file: BorrowedFd<'_>,
        offset: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()>;
    /// IOMMU_IOAS_MAP of `size` bytes of this process at `vaddr`.
    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        vaddr: u64,
        iova: u64,
        size: u64,
        prot: Prot,
    ) -> io::Result<()>;
    /// IOMMU_IOAS_UNMAP.
    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
    ) -> io::Result<()>;
    /// Open `/dev/vfio/devices/NAME`.
    fn open_cdev(&self, name: &str) -> io::Result<OwnedFd>;
    /// VFIO_DEVICE_BIND_IOMMUFD: the device's id in the iommufd.
    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32>;
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT to an IOAS.
    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()>;
    /// VFIO_DEVICE_DETACH_IOMMUFD_PT.
    fn detach_ioas(&self, device: BorrowedFd<'_>) -> io::Result<()>;

    // --- the device ---
    /// VFIO_DEVICE_GET_INFO.
    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfoRaw>;
    /// VFIO_DEVICE_GET_REGION_INFO (with its capability chain).
    fn region_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfoRaw>;
    /// VFIO_DEVICE_GET_IRQ_INFO.
    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfoRaw>;
    /// VFIO_DEVICE_SET_IRQS; `data` is the payload (bytes for DATA_BOOL,
    /// native-endian `i32` descriptors for DATA_EVENTFD, empty for NONE).
    fn set_irqs(
        &self,
        device: BorrowedFd<'_>,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
    ) -> io::Result<()>;
    /// VFIO_DEVICE_RESET (function reset).
    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()>;
    /// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO.
    fn hot_reset_info(&self, device: BorrowedFd<'_>) -> io::Result<HotResetInfo>;
    /// VFIO_DEVICE_PCI_HOT_RESET with these group descriptors (none on the
    /// cdev path: the kernel then checks iommufd ownership).
    fn hot_reset(&self, device: BorrowedFd<'_>, groups: &[BorrowedFd<'_>]) -> io::Result<()>;
    /// Read `buf.len()` bytes at `offset` of the device descriptor.
    fn read(&self, device: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset` of the device descriptor.
    fn write(&self, device: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_parse_and_print() {
        let a: PciAddress = "0000:00:04.0".parse().unwrap();
        assert_eq!(
            a,
            PciAddress {
                segment: 0,
                bus: 0,
                device: 4,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:00:04.0");
        let b: PciAddress = "1f:1d.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:1f:1d.7");
        let c: PciAddress = "abcd:ff:1f.7".parse().unwrap();
        assert_eq!(
            (c.segment, c.bus, c.device, c.function),
            (0xabcd, 0xff, 31, 7)
        );
        assert_eq!(
            PciAddress::from_devfn(0, 1, 0x0a),
            "01:01.2".parse().unwrap()
        );
        for bad in [
            "",
            "00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0000:100:04.0",
            "x:00:04.0",
            "0:0:0:0.0",
            "00:04.",
            "12345:00:04.0",
            ":00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} accepted");
        }
    }
}
