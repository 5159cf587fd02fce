//! Tests of the passthrough backend against the fake kernel.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::fake::{FakeDevice, FakeVfio, region_offset};
use super::*;
use crate::device::{Device, IrqAction, IrqData, IrqFd, IrqSet};
use crate::dma::{DmaSpace, MapRequest, Prot};

const A: &str = "0000:00:04.0";
const B: &str = "0000:00:05.0";

struct Bed {
    fake: Arc<FakeVfio>,
    vfio: Arc<Vfio>,
}

impl Bed {
    fn new(devices: Vec<FakeDevice>) -> Bed {
        let fake = Arc::new(FakeVfio::new());
        for d in devices {
            fake.add_device(d);
        }
        let vfio = Vfio::new(fake.clone(), 4);
        Bed { fake, vfio }
    }

    fn device(
        &self,
        dma: &DmaSpace,
        address: &str,
        iommu: IommuKind,
    ) -> Result<Passthrough, Error> {
        Passthrough::new(
            &self.vfio,
            dma,
            PassthroughOptions {
                address: address.parse().unwrap(),
                iommu,
                mmap: true,
                address_space: "vm1".into(),
            },
        )
    }
}

fn memfd(size: u64) -> File {
    let name = CString::new("vdevd-pt-test").unwrap();
    // SAFETY: name is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

fn map(dma: &DmaSpace, iova: u64, size: u64, file: &File, offset: u64) {
    dma.map(MapRequest {
        iova,
        size,
        prot: Prot::RW,
        file: Some((file.try_clone().unwrap(), offset)),
    })
    .unwrap();
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn read_eventfd(fd: &OwnedFd) -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: v is 8 writable bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    if n == 8 { u64::from_ne_bytes(v) } else { 0 }
}

#[test]
fn group_path_open_probe_access_and_close() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mut dev = bed.device(&dma, A, IommuKind::Group).unwrap();
    // Nothing is opened before the first user.
    assert_eq!(bed.fake.device_stats(A).kernel_opens, 0);
    assert!(dev.region_info(0).is_err(), "no region info before open");
    dev.open().unwrap();
    let s = bed.fake.device_stats(A);
    assert_eq!((s.kernel_opens, s.open_fds), (1, 1));
    // The kernel refuses the VGA region of a device that is not VGA: it is
    // an empty region, not a failed open.
    assert_eq!(dev.region_info(8).unwrap().size, 0);
    assert_eq!(dev.irq_info(3).unwrap().count, 0);
    let calls = bed.fake.calls();
    let order: Vec<&str> = calls
        .iter()
        .map(|c| c.split(' ').next().unwrap())
        .filter(|c| {
            [
                "open_group",
                "group_status",
                "open_container",
                "check_extension",
                "group_set_container",
                "set_iommu",
                "group_device_fd",
            ]
            .contains(c)
        })
        .collect();
    assert_eq!(
        order,
        [
            "open_group",
            "group_status",
            "open_container",
            "check_extension",
            "group_set_container",
            "set_iommu",
            "group_device_fd"
        ],
        "the kernel's steps, in order"
    );
    assert_eq!(dev.info().num_regions, 9);
    assert!(!dev.info().reset, "edu on a root bus cannot be reset");
    // BAR0: mmappable through the device descriptor at the region offset.
    let bar = dev.region_info(0).unwrap();
    assert_eq!(bar.size, 0x1000);
    let m = bar.mmap.expect("BAR0 is mmappable");
    assert_eq!(m.offset, region_offset(0));
    assert!(m.areas.is_empty(), "the whole BAR");
    // region access reaches the device
    dev.region_write(0, 8, &10u32.to_le_bytes()).unwrap();
    let mut v = [0u8; 4];
    dev.region_read(0, 8, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 10);
    // and the client's mmap of the descriptor sees the same bytes
    let f = File::from(m.fd.try_clone().unwrap());
    let mut w = [0u8; 4];
    f.read_exact_at(&mut w, m.offset + 8).unwrap();
    assert_eq!(w, v);
    // config space relayed: vendor/device ID
    dev.region_read(7, 0, &mut v).unwrap();
    assert_eq!(v, [0x34, 0x12, 0xe8, 0x11]);
    // accesses outside a region are refused, not relayed
    assert!(matches!(
        dev.region_read(0, 0xffe, &mut v),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        dev.region_read(0, u64::MAX, &mut v),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        dev.region_read(6, 0, &mut v),
        Err(Error::AccessDenied { .. })
    ));
    assert!(matches!(
        dev.region_read(42, 0, &mut v),
        Err(Error::NoSuchRegion(42))
    ));
    drop(f);
    drop(m);

    dev.close();
    let s = bed.fake.device_stats(A);
    assert_eq!((s.kernel_opens, s.kernel_closes, s.open_fds), (1, 1, 0));
    assert_eq!(bed.fake.address_spaces(), 0, "container released");
    assert!(bed.vfio.open_group(5).is_none(), "group closed");
    assert_eq!(bed.vfio.address_spaces_in_use(), 0);
}

#[test]
fn set_irqs_hands_the_clients_eventfds_to_the_kernel() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mut dev = bed.device(&dma, A, IommuKind::Group).unwrap();
    dev.open().unwrap();
    let efd = eventfd();
    dev.set_irqs(IrqSet {
        index: 1,
        start: 0,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::Eventfds(vec![Some(IrqFd::new(efd.try_clone().unwrap()))]),
    })
    .unwrap();
    assert!(bed.fake.device_stats(A).armed.contains(&1));
    // The device's interrupt signals the client's eventfd directly.
    assert!(bed.fake.fire(A, 1, 0));
    assert_eq!(read_eventfd(&efd), 1);
    // Wrong payload sizes are refused before the kernel sees them.
    let e = dev.set_irqs(IrqSet {
        index: 1,
        start: 0,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::Bool(vec![true, true]),
    });
    assert!(matches!(e, Err(Error::InvalidArgument(_))));
    // The kernel's refusal comes back with its errno.
    let e = dev
        .set_irqs(IrqSet {
            index: 0,
            start: 0,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![None, None].into_iter().take(1).collect()),
        })
        .map(|_| ());
    assert!(e.is_ok(), "clearing an unarmed vector is fine: {e:?}");
    assert!(matches!(dev.irq_info(9), Err(Error::NoSuchIrq(9))));
    // A client that goes away: its eventfds are released, the device stays
    // open.
    dev.disconnect();
    let s = bed.fake.device_stats(A);
    assert!(s.armed.is_empty());
    assert_eq!(s.kernel_closes, 0);
    assert!(!bed.fake.fire(A, 1, 0));
    dev.close();
}

#[test]
fn client_memory_is_mapped_once_and_replayed_onto_a_new_container() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mem = memfd(0x10000);
    // A grant before the device exists, one after it is built but closed.
    map(&dma, 0x10_0000, 0x4000, &mem, 0);
    let mut dev = bed.device(&dma, A, IommuKind::Group).unwrap();
    map(&dma, 0x20_0000, 0x1000, &mem, 0x8000);
    // Message-backed: not reachable by a real device, not mapped.
    dma.map(MapRequest {
        iova: 0x30_0000,
        size: 0x1000,
        prot: Prot::RO,
        file: None,
    })
    .unwrap();
    assert!(bed.fake.iommu_mappings().is_empty(), "no container yet");
    dev.open().unwrap();
    assert_eq!(
        bed.fake.iommu_mappings(),
        vec![vec![(0x10_0000, 0x4000), (0x20_0000, 0x1000)]],
        "both file-backed grants replayed onto the new container"
    );
    let st = dev.iommu_space().stats();
    assert_eq!((st.replays, st.kernel_maps), (2, 2));
    // The device's DMA lands in the client's memory, both ways.
    bed.fake
        .dma_write(A, 0x10_0010, b"from the device")
        .unwrap();
    let mut got = [0u8; 15];
    mem.read_exact_at(&mut got, 0x10).unwrap();
    assert_eq!(&got, b"from the device");
    mem.write_all_at(b"to the device", 0x8000).unwrap();
    let mut got = [0u8; 13];
    bed.fake.dma_read(A, 0x20_0000, &mut got).unwrap();
    assert_eq!(&got, b"to the device");
    assert!(bed.fake.dma_read(A, 0x30_0000, &mut got).is_err());
    // unmap: out of the IOMMU at once
    dma.unmap(0x20_0000, 0x1000).unwrap();
    assert_eq!(bed.fake.iommu_mappings(), vec![vec![(0x10_0000, 0x4000)]]);
    // last device closes: every mapping unmapped by us exactly once
    dev.close();
    let st = dev.iommu_space().stats();
    assert_eq!(st.kernel_unmaps, 2);
    assert_eq!(st.windows, 1, "the grant itself lives on");
    assert_eq!(st.mapped, 0);
    assert_eq!(
        bed.fake.implicit_unmaps(),
        0,
        "the kernel never had to drop one"
    );
    // open again: replayed again
    dev.open().unwrap();
    assert_eq!(bed.fake.iommu_mappings(), vec![vec![(0x10_0000, 0x4000)]]);
    dev.close();
    dma.unmap_all();
    assert_eq!(dev.iommu_space().stats().windows, 0);
}

#[test]
fn two_devices_share_one_container_and_see_existing_mappings() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5), FakeDevice::edu(B, 6)]);
    let dma = DmaSpace::default();
    let mem = memfd(0x10000);
    let mut a = bed.device(&dma, A, IommuKind::Group).unwrap();
    let mut b = bed.device(&dma, B, IommuKind::Group).unwrap();
    assert!(Arc::ptr_eq(a.iommu_space(), b.iommu_space()));
    a.open().unwrap();
    map(&dma, 0x10_0000, 0x1000, &mem, 0);
    b.open().unwrap();
    assert_eq!(bed.fake.address_spaces(), 1, "one container for both");
    assert_eq!(a.iommu_space().stats().kernel_maps, 1, "mapped once");
    mem.write_all_at(b"shared", 0).unwrap();
    let mut got = [0u8; 6];
    bed.fake.dma_read(B, 0x10_0000, &mut got).unwrap();
    assert_eq!(
        &got, b"shared",
        "the second device sees the existing mapping"
    );
    a.close();
    assert_eq!(bed.fake.address_spaces(), 1, "still in use by B");
    assert_eq!(a.iommu_space().stats().kernel_unmaps, 0);
    b.close();
    assert_eq!(bed.fake.address_spaces(), 0);
    assert_eq!(
        a.iommu_space().stats().kernel_unmaps,
        1,
        "freed exactly once"
    );
    assert_eq!(bed.fake.implicit_unmaps(), 0);
}

#[test]
fn attach_rules_busy_incompatible_and_exhausted() {
    let bed = Bed::new(vec![
        FakeDevice::edu(A, 5),
        FakeDevice::edu(B, 6),
        FakeDevice::edu("0000:00:06.0", 7).with_cdev("vfio0"),
    ]);
    let dma = DmaSpace::default();
    let mut a = bed.device(&dma, A, IommuKind::Group).unwrap();
    a.open().unwrap();
    // The same PCI device twice: EBUSY.
    let e = bed.device(&dma, A, IommuKind::Group).unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    // The same group attached again to the same space: EBUSY.
    let group = bed.vfio.open_group(5).unwrap();
    let e = a.iommu_space().attach_group(&group).unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    // ... or to another space: EBUSY.
    let other = DmaSpace::default();
    let space2 = IommuSpace::for_dma(&bed.vfio, &other, "vm2", IommuKind::Group).unwrap();
    let e = group.attach(&space2).unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    drop(group);
    // Another IOMMU type in this space: EPERM.
    let e = bed
        .device(&dma, "0000:00:06.0", IommuKind::Iommufd)
        .unwrap_err();
    assert!(matches!(e, Error::IncompatibleAddressSpace(_)), "{e}");
    // A group whose IOMMU would change the page sizes: EPERM, and it is
    // left out of the container.
    bed.fake.set_group_pgsizes(6, 0x10000);
    let mut b = bed.device(&dma, B, IommuKind::Group).unwrap();
    let e = b.open().unwrap_err();
    assert!(matches!(e, Error::IncompatibleAddressSpace(_)), "{e}");
    assert!(bed.vfio.open_group(6).is_none(), "unwound: group closed");
    assert_eq!(a.iommu_space().stats().members, 1);
    a.close();
    b.close();
    assert_eq!(bed.vfio.address_spaces_in_use(), 0);
}

#[test]
fn address_spaces_exhausted_is_its_own_error() {
    let devs: Vec<FakeDevice> = (0..5)
        .map(|i| FakeDevice::edu(&format!("0000:00:{:02x}.0", 4 + i), 10 + i as u32))
        .collect();
    let bed = Bed::new(devs);
    let spaces: Vec<DmaSpace> = (0..5).map(|_| DmaSpace::default()).collect();
    let mut opened = Vec::new();
    for (i, space) in spaces.iter().enumerate() {
        let mut d = Passthrough::new(
            &bed.vfio,
            space,
            PassthroughOptions {
                address: format!("0000:00:{:02x}.0", 4 + i).parse().unwrap(),
                iommu: IommuKind::Group,
                mmap: true,
                address_space: format!("vm{i}"),
            },
        )
        .unwrap();
        let r = d.open();
        if i < 4 {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::AddressSpacesExhausted(_)), "{e}");
            assert!(bed.vfio.open_group(14).is_none(), "unwound");
        }
        opened.push(d);
    }
    for d in &mut opened {
        d.close();
    }
    assert_eq!(bed.fake.address_spaces(), 0);
}

#[test]
fn explicit_errors_for_each_missing_piece() {
    // no such device
    let bed = Bed::new(vec![]);
    let dma = DmaSpace::default();
    let e = bed.device(&dma, A, IommuKind::Group).unwrap_err();
    assert!(
        matches!(&e, Error::Vfio { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
        "{e}"
    );
    // bound to another driver
    let mut d = FakeDevice::edu(A, 5);
    d.driver = "edu".into();
    let bed = Bed::new(vec![d]);
    let e = bed.device(&dma, A, IommuKind::Group).unwrap_err();
    assert!(
        matches!(&e, Error::BadState(m) if m.contains("vfio-pci")),
        "{e}"
    );
    // group not viable
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    bed.fake.set_viable(5, false);
    let mut dev = bed.device(&dma, A, IommuKind::Group).unwrap();
    let e = dev.open().unwrap_err();
    assert!(
        matches!(&e, Error::BadState(m) if m.contains("viable")),
        "{e}"
    );
    // no TYPE1v2 IOMMU: unwound, the group released
    bed.fake.set_viable(5, true);
    bed.fake.set_features(false, true, true);
    let e = dev.open().unwrap_err();
    assert!(matches!(e, Error::NoIommu(_)), "{e}");
    assert!(bed.vfio.open_group(5).is_none());
    assert_eq!(bed.vfio.address_spaces_in_use(), 0);
    // no cdev: the iommufd path is refused at once
    let dma2 = DmaSpace::default();
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let e = bed.device(&dma2, A, IommuKind::Iommufd).unwrap_err();
    assert!(matches!(e, Error::NoIommu(_)), "{e}");
    // no /dev/iommu
    let bed = Bed::new(vec![FakeDevice::edu(A, 5).with_cdev("vfio0")]);
    bed.fake.set_features(true, false, true);
    let mut dev = bed.device(&dma2, A, IommuKind::Iommufd).unwrap();
    let e = dev.open().unwrap_err();
    assert!(matches!(e, Error::NoIommu(_)), "{e}");
    assert_eq!(bed.vfio.address_spaces_in_use(), 0);
}

#[test]
fn a_failure_part_way_through_open_unwinds_in_reverse() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mem = memfd(0x4000);
    map(&dma, 0x1000, 0x1000, &mem, 0);
    let mut dev = bed.device(&dma, A, IommuKind::Group).unwrap();
    for (step, errno) in [
        ("open_group", libc::EACCES),
        ("open_container", libc::EACCES),
        ("group_set_container", libc::EIO),
        ("set_iommu", libc::EIO),
        ("container_map", libc::ENOMEM),
        ("group_device_fd", libc::EIO),
        ("device_info", libc::EIO),
        ("region_info", libc::EIO),
        ("irq_info", libc::EIO),
    ] {
        bed.fake.fail_next(step, errno);
        let e = dev.open();
        assert!(e.is_err(), "{step}: open succeeded");
        let s = bed.fake.device_stats(A);
        assert_eq!(s.open_fds, 0, "{step}: device descriptor left open");
        assert_eq!(s.kernel_opens, s.kernel_closes, "{step}");
        assert!(bed.vfio.open_group(5).is_none(), "{step}: group left open");
        assert_eq!(bed.fake.address_spaces(), 0, "{step}: container left");
        assert_eq!(bed.vfio.address_spaces_in_use(), 0, "{step}");
        assert_eq!(bed.fake.implicit_unmaps(), 0, "{step}");
        assert!(!dev.is_open());
    }
    // and then it opens fine
    dev.open().unwrap();
    assert_eq!(bed.fake.iommu_mappings(), vec![vec![(0x1000, 0x1000)]]);
    dev.close();
    assert_eq!(bed.fake.implicit_unmaps(), 0);
}

#[test]
fn cdev_path_binds_attaches_and_maps_the_file_directly() {
    let bed = Bed::new(vec![
        FakeDevice::edu(A, 5).with_cdev("vfio0"),
        FakeDevice::edu(B, 6).with_cdev("vfio1"),
    ]);
    let dma = DmaSpace::default();
    let mem = memfd(0x10000);
    map(&dma, 0x10_0000, 0x2000, &mem, 0x1000);
    let mut a = bed.device(&dma, A, IommuKind::Iommufd).unwrap();
    let mut b = bed.device(&dma, B, IommuKind::Iommufd).unwrap();
    a.open().unwrap();
    let s = bed.fake.device_stats(A);
    assert!(s.bound);
    assert!(s.ioas.is_some());
    assert!(
        bed.fake
            .calls()
            .iter()
            .any(|c| c.starts_with("ioas_map_file")),
        "IOMMU_IOAS_MAP_FILE used"
    );
    b.open().unwrap();
    assert_eq!(bed.fake.device_stats(B).ioas, s.ioas, "one IOAS for both");
    mem.write_all_at(b"x", 0x1000).unwrap();
    let mut got = [0u8; 1];
    bed.fake.dma_read(B, 0x10_0000, &mut got).unwrap();
    assert_eq!(&got, b"x");
    let mut v = [0u8; 4];
    a.region_read(7, 0, &mut v).unwrap();
    assert_eq!(v, [0x34, 0x12, 0xe8, 0x11]);
    a.close();
    b.close();
    assert_eq!(bed.fake.address_spaces(), 0, "IOAS destroyed");
    assert!(!bed.fake.device_stats(A).bound);
    assert_eq!(a.iommu_space().stats().kernel_unmaps, 1);
    assert_eq!(bed.fake.implicit_unmaps(), 0);
}

#[test]
fn cdev_path_falls_back_to_a_host_mapping_without_map_file() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5).with_cdev("vfio0")]);
    bed.fake.set_features(true, true, false);
    let dma = DmaSpace::default();
    let mem = memfd(0x4000);
    map(&dma, 0x10_0000, 0x1000, &mem, 0);
    let mut a = bed.device(&dma, A, IommuKind::Iommufd).unwrap();
    a.open().unwrap();
    map(&dma, 0x20_0000, 0x1000, &mem, 0x1000);
    bed.fake.dma_write(A, 0x20_0004, b"vaddr").unwrap();
    let mut got = [0u8; 5];
    mem.read_exact_at(&mut got, 0x1004).unwrap();
    assert_eq!(&got, b"vaddr");
    let calls = bed.fake.calls();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("ioas_map_file"))
            .count(),
        1,
        "MAP_FILE tried once, then not again"
    );
    assert_eq!(
        calls.iter().filter(|c| c.starts_with("ioas_map ")).count(),
        2
    );
    a.close();
}

#[test]
fn group_and_cdev_paths_exclude_each_other() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5).with_cdev("vfio0")]);
    // vdevd itself refuses a second claim of the device
    let dma1 = DmaSpace::default();
    let mut g = bed.device(&dma1, A, IommuKind::Group).unwrap();
    g.open().unwrap();
    let dma2 = DmaSpace::default();
    let e = bed.device(&dma2, A, IommuKind::Iommufd).unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    // and the kernel does too (another process holding the group): bind
    // while the group is open is EBUSY, reported as such.
    let other = Vfio::new(bed.fake.clone(), 4);
    let mut c = Passthrough::new(
        &other,
        &dma2,
        PassthroughOptions {
            address: A.parse().unwrap(),
            iommu: IommuKind::Iommufd,
            mmap: true,
            address_space: "other".into(),
        },
    )
    .unwrap();
    let e = c.open().unwrap_err();
    assert!(
        matches!(&e, Error::Busy(m) if m.contains("BIND_IOMMUFD")),
        "{e}"
    );
    assert_eq!(
        other.address_spaces_in_use(),
        0,
        "the new IOAS was released"
    );
    g.close();
    c.open().unwrap();
    // ... and the other way round
    let dma3 = DmaSpace::default();
    let third = Vfio::new(bed.fake.clone(), 4);
    let mut g2 = Passthrough::new(
        &third,
        &dma3,
        PassthroughOptions {
            address: A.parse().unwrap(),
            iommu: IommuKind::Group,
            mmap: true,
            address_space: "third".into(),
        },
    )
    .unwrap();
    let e = g2.open().unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    c.close();
}

#[test]
fn reset_uses_the_function_reset_or_a_hot_reset_of_the_set() {
    // function reset
    let bed = Bed::new(vec![FakeDevice::edu(A, 5).with_function_reset()]);
    let dma = DmaSpace::default();
    let mut d = bed.device(&dma, A, IommuKind::Group).unwrap();
    d.open().unwrap();
    assert!(d.info().reset);
    d.reset().unwrap();
    assert_eq!(bed.fake.device_stats(A).resets, 1);
    d.close();

    // two devices behind one bridge (separate groups): a hot reset needs
    // both groups; the second is opened for the call if no device holds it
    const C: &str = "0000:01:00.0";
    const D: &str = "0000:01:01.0";
    let bed = Bed::new(vec![
        FakeDevice::edu(C, 7).behind("0000:00:1e.0"),
        FakeDevice::edu(D, 8).behind("0000:00:1e.0"),
    ]);
    let dma = DmaSpace::default();
    let mut c = bed.device(&dma, C, IommuKind::Group).unwrap();
    let mut dd = bed.device(&dma, D, IommuKind::Group).unwrap();
    assert_eq!(c.reset_domain().as_deref(), Some("pci-bus:0000:01"));
    assert_eq!(c.reset_domain(), dd.reset_domain());
    c.open().unwrap();
    assert!(c.info().reset, "hot reset available");
    c.reset().unwrap();
    assert_eq!(bed.fake.device_stats(C).hot_resets, 1);
    assert_eq!(bed.fake.device_stats(D).hot_resets, 1, "the whole set");
    assert!(
        bed.vfio.open_group(8).is_none(),
        "borrowed group closed again"
    );
    dd.open().unwrap();
    dd.reset().unwrap();
    assert_eq!(bed.fake.device_stats(C).hot_resets, 2);
    c.close();
    dd.close();

    // cdev path: ownership through the iommufd
    let bed = Bed::new(vec![
        FakeDevice::edu(C, 7)
            .behind("0000:00:1e.0")
            .with_cdev("vfio0"),
        FakeDevice::edu(D, 8)
            .behind("0000:00:1e.0")
            .with_cdev("vfio1"),
    ]);
    let dma = DmaSpace::default();
    let mut c = bed.device(&dma, C, IommuKind::Iommufd).unwrap();
    let mut dd = bed.device(&dma, D, IommuKind::Iommufd).unwrap();
    c.open().unwrap();
    dd.open().unwrap();
    c.reset().unwrap();
    assert_eq!(bed.fake.device_stats(D).hot_resets, 1);
    // a member opened by someone else (another iommufd): refused
    dd.close();
    let other = Vfio::new(bed.fake.clone(), 4);
    let dma2 = DmaSpace::default();
    let mut foreign = Passthrough::new(
        &other,
        &dma2,
        PassthroughOptions {
            address: D.parse().unwrap(),
            iommu: IommuKind::Iommufd,
            mmap: true,
            address_space: "other".into(),
        },
    )
    .unwrap();
    foreign.open().unwrap();
    let e = c.reset().unwrap_err();
    assert!(matches!(e, Error::Busy(_)), "{e}");
    foreign.close();
    c.close();

    // no reset at all
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mut d = bed.device(&dma, A, IommuKind::Group).unwrap();
    d.open().unwrap();
    assert!(matches!(d.reset(), Err(Error::Unsupported(_))));
    d.close();
}

#[test]
fn mmap_can_be_turned_off() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mut d = Passthrough::new(
        &bed.vfio,
        &dma,
        PassthroughOptions {
            address: A.parse().unwrap(),
            iommu: IommuKind::Group,
            mmap: false,
            address_space: "vm1".into(),
        },
    )
    .unwrap();
    d.open().unwrap();
    assert!(d.region_info(0).unwrap().mmap.is_none());
    d.close();
}

#[test]
fn a_grant_the_kernel_refuses_is_refused_to_the_client() {
    let bed = Bed::new(vec![FakeDevice::edu(A, 5)]);
    let dma = DmaSpace::default();
    let mem = memfd(0x4000);
    let mut d = bed.device(&dma, A, IommuKind::Group).unwrap();
    d.open().unwrap();
    bed.fake.fail_next("container_map", libc::ENOSPC);
    let e = dma
        .map(MapRequest {
            iova: 0x1000,
            size: 0x1000,
            prot: Prot::RW,
            file: Some((mem.try_clone().unwrap(), 0)),
        })
        .unwrap_err();
    assert!(
        matches!(&e, crate::dma::DmaError::Mirror { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{e}"
    );
    assert!(dma.is_empty());
    assert_eq!(d.iommu_space().stats().windows, 0);
    d.close();
}
