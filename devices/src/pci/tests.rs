//! Tests of [`PciDevice`] through the [`Device`] trait, with a fake
//! function and real eventfds.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::regs::*;
use super::*;
use crate::Error;
use crate::device::{
    Device, IoEventFd, IrqAction, IrqData, IrqFd, IrqSet, Migratable, MmapArea, RegionMmap,
};

/// A new non-blocking eventfd: the device's end and the test's end.
pub(crate) fn eventfd() -> (IrqFd, File) {
    // SAFETY: eventfd takes no pointers; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let irq = IrqFd::new(owned.try_clone().unwrap());
    (irq, File::from(owned))
}

/// Read and reset an eventfd's counter (0 if it was not signalled).
pub(crate) fn count(f: &File) -> u64 {
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        r => panic!("eventfd read: {r:?}"),
    }
}

#[derive(Debug, Default)]
struct Log {
    reads: Vec<(u8, u64, usize)>,
    writes: Vec<(u8, u64, Vec<u8>)>,
    resets: u32,
    commands: Vec<u16>,
    vendor: Vec<(usize, std::ops::Range<usize>, Vec<u8>)>,
    vendor_reads: u32,
    opened: u32,
    closed: u32,
    disconnected: u32,
    stopped: bool,
}

/// A function whose BAR bytes read as their offset's low byte, and which
/// records what the core asks of it.
struct Fake {
    log: Arc<Mutex<Log>>,
    state: u32,
    mmap_fd: Arc<OwnedFd>,
    mmap_areas: Vec<MmapArea>,
    ioeventfd: Arc<OwnedFd>,
    fail_load: bool,
}

impl PciFunction for Fake {
    fn name(&self) -> &str {
        "fake"
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset + i as u64) as u8;
        }
        self.log
            .lock()
            .unwrap()
            .reads
            .push((bar, offset, data.len()));
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
        if bar == 0 && offset == 0 && data.len() == 4 {
            self.state = u32::from_le_bytes(data.try_into().unwrap());
        }
        self.log
            .lock()
            .unwrap()
            .writes
            .push((bar, offset, data.to_vec()));
        Ok(())
    }

    fn bar_mmap(&self, bar: u8) -> Option<RegionMmap> {
        (bar == 2).then(|| RegionMmap {
            fd: self.mmap_fd.clone(),
            offset: 0,
            areas: self.mmap_areas.clone(),
        })
    }

    fn ioeventfds(&mut self, bar: u8) -> Result<Vec<IoEventFd>, Error> {
        if bar != 0 {
            return Ok(Vec::new());
        }
        let at = |offset, size| IoEventFd {
            offset,
            size,
            fd: self.ioeventfd.clone(),
            datamatch: None,
        };
        // valid, outside the BAR, on the MSI-X table, wrapping
        Ok(vec![
            at(0x10, 4),
            at(0x1000, 4),
            at(0x800, 4),
            at(u64::MAX - 1, 4),
        ])
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.state = 0;
        self.log.lock().unwrap().resets += 1;
        Ok(())
    }

    fn command_changed(&mut self, command: u16) {
        self.log.lock().unwrap().commands.push(command);
    }

    fn vendor_capability_written(
        &mut self,
        index: usize,
        written: std::ops::Range<usize>,
        data: &[u8],
    ) {
        self.log
            .lock()
            .unwrap()
            .vendor
            .push((index, written, data.to_vec()));
    }

    fn vendor_capability_read(&mut self, index: usize, offset: usize, data: &mut [u8]) {
        // The last data byte reads live state: the number of reads so far.
        let mut log = self.log.lock().unwrap();
        log.vendor_reads += 1;
        if let Some(b) = (2usize.checked_sub(offset)).and_then(|i| data.get_mut(i)) {
            *b = log.vendor_reads as u8 + index as u8;
        }
    }

    fn open(&mut self) -> Result<(), Error> {
        self.log.lock().unwrap().opened += 1;
        Ok(())
    }

    fn close(&mut self) {
        self.log.lock().unwrap().closed += 1;
        self.state = 0;
    }

    fn disconnect(&mut self) {
        self.log.lock().unwrap().disconnected += 1;
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for Fake {
    fn stop(&mut self) -> Result<(), Error> {
        self.log.lock().unwrap().stopped = true;
        Ok(())
    }

    fn run(&mut self) -> Result<(), Error> {
        self.log.lock().unwrap().stopped = false;
        Ok(())
    }

    fn save(&mut self) -> Result<Vec<u8>, Error> {
        Ok(self.state.to_le_bytes().to_vec())
    }

    fn load(&mut self, state: &[u8]) -> Result<(), Error> {
        if self.fail_load {
            return Err(Error::InvalidArgument("fake refuses".into()));
        }
        let b: [u8; 4] = state
            .try_into()
            .map_err(|_| Error::InvalidArgument("fake state size".into()))?;
        self.state = u32::from_le_bytes(b);
        Ok(())
    }
}

fn ids() -> PciIds {
    PciIds {
        vendor_id: 0x1234,
        device_id: 0x11e5,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 0x0001,
        revision: 1,
        class_code: 0xff_00_00,
    }
}

fn layout() -> PciLayout {
    let mut l = PciLayout::new(ids());
    l.bars[0] = Some(Bar::memory32(0x1000));
    l.bars[2] = Some(Bar::memory64(0x10000).prefetchable());
    l.bars[4] = Some(Bar::io(0x20));
    l.rom = Some(vec![0x55, 0xaa, 0x01]);
    l.msi = Some(MsiSpec {
        vectors: 4,
        address64: true,
        per_vector_mask: true,
    });
    l.msix = Some(MsixSpec {
        vectors: 70,
        bar: 2,
        table_offset: 0x8000,
        pba_offset: 0x9000,
    });
    l.vendor_capabilities.push(VendorCapability {
        data: vec![0xaa, 0xbb, 0xcc],
        writable: vec![0, 0xff],
    });
    l
}

fn fake(log: &Arc<Mutex<Log>>) -> Fake {
    Fake {
        log: log.clone(),
        state: 0,
        mmap_fd: Arc::new(OwnedFd::from(eventfd().1)),
        mmap_areas: Vec::new(),
        ioeventfd: Arc::new(OwnedFd::from(eventfd().1)),
        fail_load: false,
    }
}

fn device_with(l: PciLayout) -> (PciDevice<Fake>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let f = fake(&log);
    (PciDevice::new(l, |_| Ok(f)).unwrap(), log)
}

fn device() -> (PciDevice<Fake>, Arc<Mutex<Log>>) {
    device_with(layout())
}

fn cfg_read(d: &mut PciDevice<Fake>, off: usize, len: usize) -> u32 {
    let mut b = [0u8; 4];
    d.region_read(CONFIG_REGION, off as u64, &mut b[..len])
        .unwrap();
    u32::from_le_bytes(b)
}

fn cfg_write(d: &mut PciDevice<Fake>, off: usize, v: u32, len: usize) {
    d.region_write(CONFIG_REGION, off as u64, &v.to_le_bytes()[..len])
        .unwrap();
}

fn set_irqs(
    d: &mut PciDevice<Fake>,
    index: u32,
    start: u32,
    count: u32,
    action: IrqAction,
    data: IrqData,
) -> Result<(), Error> {
    d.set_irqs(IrqSet {
        index,
        start,
        count,
        action,
        data,
    })
}

/// Wire eventfds to MSI-X vectors 0..n; returns the test ends.
fn wire(d: &mut PciDevice<Fake>, index: u32, n: u32) -> Vec<File> {
    let (irqs, files): (Vec<_>, Vec<_>) = (0..n).map(|_| eventfd()).unzip();
    set_irqs(
        d,
        index,
        0,
        n,
        IrqAction::Trigger,
        IrqData::Eventfds(irqs.into_iter().map(Some).collect()),
    )
    .unwrap();
    files
}

/// Find a capability the way a driver does: walk the list in config space.
fn find_cap(d: &mut PciDevice<Fake>, id: u8) -> usize {
    let mut pos = cfg_read(d, CAPABILITY_LIST, 1) as usize;
    while pos != 0 {
        if cfg_read(d, pos, 1) as u8 == id {
            return pos;
        }
        pos = cfg_read(d, pos + 1, 1) as usize;
    }
    panic!("no capability {id:#x}");
}

fn msix_cap(d: &mut PciDevice<Fake>) -> usize {
    find_cap(d, CAP_ID_MSIX)
}

fn msi_cap(d: &mut PciDevice<Fake>) -> usize {
    find_cap(d, CAP_ID_MSI)
}

fn enable_msix(d: &mut PciDevice<Fake>, function_mask: bool) {
    let x = msix_cap(d);
    let mut v = MSIX_FLAGS_ENABLE;
    if function_mask {
        v |= MSIX_FLAGS_MASKALL;
    }
    cfg_write(d, x + MSIX_FLAGS, u32::from(v), 2);
}

fn pba(d: &mut PciDevice<Fake>) -> u128 {
    let mut b = [0u8; 16];
    d.region_read(2, 0x9000, &mut b).unwrap();
    u128::from_le_bytes(b)
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::InvalidArgument(_)))
}

fn is_unsupported<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Unsupported(_)))
}

fn is_out_of_range<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::OutOfRange { .. }))
}

#[test]
fn device_and_region_info() {
    let (d, _) = device();
    let info = d.info();
    assert_eq!((info.num_regions, info.num_irqs, info.reset), (9, 5, true));
    let r = d.region_info(0).unwrap();
    assert_eq!((r.size, r.read, r.write), (0x1000, true, true));
    assert!(r.mmap.is_none());
    assert_eq!(d.region_info(1).unwrap().size, 0);
    assert_eq!(d.region_info(3).unwrap().size, 0, "upper half of BAR2");
    assert_eq!(d.region_info(4).unwrap().size, 0x20);
    let rom = d.region_info(ROM_REGION).unwrap();
    assert_eq!((rom.size, rom.read, rom.write), (2048, true, false));
    let c = d.region_info(CONFIG_REGION).unwrap();
    assert_eq!((c.size, c.read, c.write), (4096, true, true));
    assert_eq!(d.region_info(VGA_REGION).unwrap().size, 0);
    assert!(matches!(d.region_info(9), Err(Error::NoSuchRegion(9))));
}

#[test]
fn mmap_areas_exclude_msix_pages() {
    let (d, _) = device();
    let m = d.region_info(2).unwrap().mmap.unwrap();
    assert_eq!(
        m.areas,
        vec![
            MmapArea {
                offset: 0,
                size: 0x8000
            },
            MmapArea {
                offset: 0xa000,
                size: 0x6000
            },
        ]
    );
    // function-supplied areas: an unaligned one and one past the BAR are
    // dropped, one over the table is cut
    let (mut d, _) = device();
    d.function_mut().mmap_areas = vec![
        MmapArea {
            offset: 0x100,
            size: 0x1000,
        },
        MmapArea {
            offset: 0xf000,
            size: 0x2000,
        },
        MmapArea {
            offset: 0x7000,
            size: 0x2000,
        },
    ];
    let m = d.region_info(2).unwrap().mmap.unwrap();
    assert_eq!(
        m.areas,
        vec![MmapArea {
            offset: 0x7000,
            size: 0x1000
        }]
    );
    // nothing left: no mmap at all
    d.function_mut().mmap_areas = vec![MmapArea {
        offset: 0x8000,
        size: 0x1000,
    }];
    assert!(d.region_info(2).unwrap().mmap.is_none());
    // without MSI-X in the BAR, the whole BAR is one area (empty list)
    let mut l = layout();
    l.msix = Some(MsixSpec {
        bar: 0,
        table_offset: 0x800,
        pba_offset: 0xc00,
        vectors: 8,
    });
    let (d, _) = device_with(l);
    assert!(d.region_info(2).unwrap().mmap.unwrap().areas.is_empty());
}

#[test]
fn bar_accesses_are_bounds_checked() {
    let (mut d, log) = device();
    let mut b = [0u8; 8];
    d.region_read(0, 0xff8, &mut b).unwrap();
    assert_eq!(b, [0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff]);
    assert!(is_out_of_range(d.region_read(0, 0xffc, &mut b)));
    assert!(is_out_of_range(d.region_read(0, u64::MAX - 2, &mut b)));
    assert!(is_out_of_range(d.region_write(0, u64::MAX, &b)));
    assert!(is_out_of_range(d.region_read(1, 0, &mut b)), "absent BAR");
    assert!(is_out_of_range(d.region_write(3, 0, &b)), "upper half");
    assert!(is_out_of_range(d.region_write(4, 0x1c, &b)), "I/O BAR end");
    assert!(is_out_of_range(d.region_read(VGA_REGION, 0, &mut b)));
    assert!(matches!(
        d.region_read(9, 0, &mut b),
        Err(Error::NoSuchRegion(9))
    ));
    // empty accesses inside the region are fine and reach nobody
    let before = log.lock().unwrap().reads.len();
    d.region_read(0, 0x1000, &mut []).unwrap();
    assert_eq!(log.lock().unwrap().reads.len(), before);
    d.region_write(4, 0x10, &[1, 2]).unwrap();
    assert_eq!(
        log.lock().unwrap().writes.last().unwrap(),
        &(4, 0x10, vec![1, 2])
    );
}

#[test]
fn bar_access_across_msix_structures_is_split() {
    let (mut d, log) = device();
    // function bytes, the whole table, the gap, the PBA, function bytes
    let mut buf = vec![0u8; 0x2000];
    d.region_read(2, 0x7ff8, &mut buf).unwrap();
    let reads = std::mem::take(&mut log.lock().unwrap().reads);
    let table_end: u64 = 0x8000 + 70 * 16;
    let pba_end: u64 = 0x9000 + 16;
    assert_eq!(
        reads,
        vec![
            (2, 0x7ff8, 8),
            (2, table_end, 0x9000 - table_end as usize),
            (2, pba_end, 0x7ff8 + 0x2000 - pba_end as usize),
        ]
    );
    // table bytes: vector control of entry 0 is masked at reset
    assert_eq!(&buf[8 + 12..8 + 16], &[1, 0, 0, 0]);
    assert!(buf[8..8 + 12].iter().all(|&b| b == 0));
    // function bytes: offset low byte
    assert_eq!(buf[0], 0xf8);
    // a write over the table goes to the table, not the function
    d.region_write(2, 0x8010, &[0xff; 16]).unwrap();
    assert!(log.lock().unwrap().writes.is_empty());
    let mut e = [0u8; 16];
    d.region_read(2, 0x8010, &mut e).unwrap();
    assert_eq!(
        e,
        [
            0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0
        ],
        "address bits 1:0 and reserved control bits are read-only"
    );
    // PBA writes are ignored
    d.region_write(2, 0x9000, &[0xff; 8]).unwrap();
    assert_eq!(pba(&mut d), 0);
}

#[test]
fn config_accesses_of_any_size_and_alignment() {
    let (mut d, _) = device();
    let mut all = vec![0u8; 4096];
    d.region_read(CONFIG_REGION, 0, &mut all).unwrap();
    assert_eq!(&all[0..4], &[0x34, 0x12, 0xe5, 0x11]);
    for (off, len) in [
        (1usize, 1usize),
        (1, 2),
        (3, 4),
        (0x3f, 3),
        (0x41, 7),
        (4093, 3),
    ] {
        let mut b = vec![0u8; len];
        d.region_read(CONFIG_REGION, off as u64, &mut b).unwrap();
        assert_eq!(b, all[off..off + len], "read {len} at {off:#x}");
    }
    assert!(is_out_of_range(d.region_read(
        CONFIG_REGION,
        4093,
        &mut [0; 4]
    )));
    assert!(is_out_of_range(d.region_read(
        CONFIG_REGION,
        4096,
        &mut [0; 1]
    )));
    assert!(is_out_of_range(d.region_write(
        CONFIG_REGION,
        u64::MAX,
        &[0; 2]
    )));
    assert!(is_out_of_range(d.region_write(
        CONFIG_REGION,
        0,
        &vec![0; 4097]
    )));
    // an unaligned write spanning command and status
    d.region_write(CONFIG_REGION, 5, &[0xff, 0x20, 0x00])
        .unwrap();
    assert_eq!(cfg_read(&mut d, COMMAND, 2) & 0xff00, 0x0500);
    // a whole-space write of ones keeps the device sane
    d.region_write(CONFIG_REGION, 0, &[0xff; 4096]).unwrap();
    assert_eq!(cfg_read(&mut d, VENDOR_ID, 4), 0x11e5_1234);
    assert_eq!(cfg_read(&mut d, STATUS, 2), u32::from(STATUS_CAP_LIST));
}

#[test]
fn rom_is_read_only_and_padded() {
    let (mut d, _) = device();
    let mut b = [0u8; 4];
    d.region_read(ROM_REGION, 0, &mut b).unwrap();
    assert_eq!(b, [0x55, 0xaa, 0x01, 0xff]);
    d.region_read(ROM_REGION, 2044, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);
    assert!(is_out_of_range(d.region_read(ROM_REGION, 2045, &mut b)));
    assert!(matches!(
        d.region_write(ROM_REGION, 0, &b),
        Err(Error::AccessDenied { region: 6, .. })
    ));
    let mut l = layout();
    l.rom = None;
    let (mut d, _) = device_with(l);
    assert_eq!(d.region_info(ROM_REGION).unwrap().size, 0);
    assert!(is_out_of_range(d.region_read(ROM_REGION, 0, &mut b)));
}

#[test]
fn command_changes_reach_the_function() {
    let (mut d, log) = device();
    cfg_write(
        &mut d,
        COMMAND,
        u32::from(COMMAND_MEMORY | COMMAND_MASTER),
        2,
    );
    cfg_write(
        &mut d,
        COMMAND,
        u32::from(COMMAND_MEMORY | COMMAND_MASTER),
        2,
    );
    cfg_write(&mut d, COMMAND, u32::from(COMMAND_MEMORY), 2);
    assert_eq!(log.lock().unwrap().commands, vec![6, 2]);
}

#[test]
fn vendor_capability_writes_reach_the_function() {
    let (mut d, log) = device();
    let off = find_cap(&mut d, CAP_ID_VENDOR);
    d.region_write(CONFIG_REGION, off as u64 + 3, &[0x11, 0x22, 0x33])
        .unwrap();
    assert_eq!(
        log.lock().unwrap().vendor,
        vec![(0, 0..3, vec![0xaa, 0x22, 0xcc])]
    );
    // a write of the header only, and one that ends inside the data
    d.region_write(CONFIG_REGION, off as u64, &[0; 2]).unwrap();
    d.region_write(CONFIG_REGION, off as u64 + 2, &[0, 0x44, 0x55])
        .unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.vendor[1].1, 0..0);
    assert_eq!(log.vendor[2].1, 0..2);
}

#[test]
fn vendor_capability_reads_go_through_the_function() {
    let (mut d, log) = device();
    let off = find_cap(&mut d, CAP_ID_VENDOR) as u64;
    // data byte 2 (capability byte 5) is live; the others are stored
    let mut b = [0u8; 8];
    d.region_read(CONFIG_REGION, off, &mut b).unwrap();
    assert_eq!(b[5], 1);
    assert_eq!((b[0], b[2], b[3]), (CAP_ID_VENDOR, 6, 0xaa));
    d.region_read(CONFIG_REGION, off + 5, &mut b[..1]).unwrap();
    assert_eq!(b[0], 2);
    // a read of the header alone does not reach the function
    d.region_read(CONFIG_REGION, off, &mut b[..3]).unwrap();
    assert_eq!(log.lock().unwrap().vendor_reads, 2);
}

#[test]
fn ioeventfds_are_filtered() {
    let (mut d, _) = device();
    let fds = d.region_io_fds(0).unwrap();
    let offered: Vec<(u64, u64)> = fds.iter().map(|f| (f.offset, f.size)).collect();
    assert_eq!(offered, vec![(0x10, 4), (0x800, 4)]);
    assert!(d.region_io_fds(2).unwrap().is_empty());
    assert!(d.region_io_fds(CONFIG_REGION).unwrap().is_empty());
    assert!(matches!(d.region_io_fds(9), Err(Error::NoSuchRegion(9))));
    // on the MSI-X table when the table is in BAR0
    let mut l = layout();
    l.msix = Some(MsixSpec {
        bar: 0,
        table_offset: 0x800,
        pba_offset: 0xc00,
        vectors: 8,
    });
    let (mut d, _) = device_with(l);
    let fds = d.region_io_fds(0).unwrap();
    assert_eq!(fds.len(), 1);
    assert_eq!(fds[0].offset, 0x10);
}

#[test]
fn irq_info_flags() {
    let (d, _) = device();
    let intx = d.irq_info(INTX_IRQ).unwrap();
    assert_eq!(
        (
            intx.count,
            intx.eventfd,
            intx.maskable,
            intx.automasked,
            intx.noresize
        ),
        (1, true, true, true, false)
    );
    let msi = d.irq_info(MSI_IRQ).unwrap();
    assert_eq!(
        (msi.count, msi.eventfd, msi.maskable, msi.noresize),
        (4, true, false, false)
    );
    let msix = d.irq_info(MSIX_IRQ).unwrap();
    assert_eq!(
        (msix.count, msix.maskable, msix.noresize),
        (70, false, false)
    );
    assert_eq!(d.irq_info(ERR_IRQ).unwrap().count, 1);
    assert_eq!(d.irq_info(REQ_IRQ).unwrap().count, 1);
    assert!(matches!(d.irq_info(5), Err(Error::NoSuchIrq(5))));
    let mut l = layout();
    l.interrupt_pin = 0;
    l.pcie = None;
    l.msi = None;
    let (d, _) = device_with(l);
    assert_eq!(d.irq_info(INTX_IRQ).unwrap().count, 0);
    assert_eq!(d.irq_info(ERR_IRQ).unwrap().count, 0);
    assert_eq!(d.irq_info(MSI_IRQ).unwrap().count, 0);
}

#[test]
fn msix_delivery_function_mask_and_pending() {
    let (mut d, _) = device();
    let irq = d.interrupts().clone();
    let fds = wire(&mut d, MSIX_IRQ, 70);
    enable_msix(&mut d, false);
    assert_eq!(irq.mode(), IrqMode::Msix);
    // vector 65 (second PBA word), entry never written: delivered
    assert_eq!(irq.raise(65), Delivery::Signalled);
    assert_eq!(count(&fds[65]), 1);
    assert_eq!(count(&fds[0]), 0);
    // function mask: pending, PBA bit set, nothing signalled
    enable_msix(&mut d, true);
    assert_eq!(irq.raise(65), Delivery::Pending);
    assert_eq!(irq.raise(3), Delivery::Pending);
    assert_eq!(count(&fds[65]), 0);
    assert_eq!(pba(&mut d), (1 << 65) | (1 << 3));
    // unmask: both delivered once, PBA clear
    enable_msix(&mut d, false);
    assert_eq!((count(&fds[65]), count(&fds[3])), (1, 1));
    assert_eq!(pba(&mut d), 0);
    // out-of-range vector
    assert_eq!(irq.raise(70), Delivery::Dropped);
}

#[test]
fn msix_vector_mask_counts_once_the_entry_is_written() {
    let (mut d, _) = device();
    let irq = d.interrupts().clone();
    let fds = wire(&mut d, MSIX_IRQ, 2);
    enable_msix(&mut d, false);
    // masked at reset, but never written (QEMU's case): delivered
    assert_eq!(irq.raise(1), Delivery::Signalled);
    assert_eq!(count(&fds[1]), 1);
    // the client programs entry 1 and leaves it masked
    let entry = 0x8000 + 16;
    d.region_write(2, entry, &[0, 0, 0xe0, 0xfe, 0, 0, 0, 0, 0x41, 0, 0, 0])
        .unwrap();
    assert_eq!(irq.raise(1), Delivery::Pending);
    assert_eq!(count(&fds[1]), 0);
    assert_eq!(pba(&mut d), 1 << 1);
    // unmask with a DWORD write of vector control
    d.region_write(2, entry + 12, &0u32.to_le_bytes()).unwrap();
    assert_eq!(count(&fds[1]), 1);
    assert_eq!(pba(&mut d), 0);
    // unwired vector: nothing to signal, not pending either
    assert_eq!(irq.raise(5), Delivery::Unwired);
    // MSI-X disabled: raise goes to INTx
    let x = msix_cap(&mut d);
    cfg_write(&mut d, x + MSIX_FLAGS, 0, 2);
    assert_eq!(irq.raise(1), Delivery::IntxAsserted);
}

#[test]
fn msi_delivery_masking_and_vector_folding() {
    let (mut d, _) = device();
    let irq = d.interrupts().clone();
    let fds = wire(&mut d, MSI_IRQ, 4);
    let msi = msi_cap(&mut d);
    let flags = cfg_read(&mut d, msi + MSI_FLAGS, 2) as u16;
    // enable with 4 vectors
    cfg_write(
        &mut d,
        msi + MSI_FLAGS,
        u32::from(flags | MSI_FLAGS_ENABLE | (2 << 4)),
        2,
    );
    assert_eq!(irq.mode(), IrqMode::Msi);
    assert_eq!(irq.raise(3), Delivery::Signalled);
    assert_eq!(count(&fds[3]), 1);
    // mask vector 3: pending shows in config space
    let mask = msi + 0x10;
    let pending = msi + 0x14;
    cfg_write(&mut d, mask, 1 << 3, 4);
    assert_eq!(irq.raise(3), Delivery::Pending);
    assert_eq!(count(&fds[3]), 0);
    assert_eq!(cfg_read(&mut d, pending, 4), 1 << 3);
    cfg_write(&mut d, mask, 0, 4);
    assert_eq!(count(&fds[3]), 1);
    assert_eq!(cfg_read(&mut d, pending, 4), 0);
    // only one vector enabled: vector 3 folds to vector 0
    cfg_write(
        &mut d,
        msi + MSI_FLAGS,
        u32::from(flags | MSI_FLAGS_ENABLE),
        2,
    );
    assert_eq!(irq.raise(3), Delivery::Signalled);
    assert_eq!((count(&fds[0]), count(&fds[3])), (1, 0));
    // MSI-X wins over MSI
    enable_msix(&mut d, false);
    assert_eq!(irq.mode(), IrqMode::Msix);
}

#[test]
fn intx_automask_unmask_and_disable() {
    let (mut d, _) = device();
    let irq = d.interrupts().clone();
    let fd = wire(&mut d, INTX_IRQ, 1).remove(0);
    assert_eq!(irq.mode(), IrqMode::Intx);
    assert_eq!(irq.raise(0), Delivery::IntxAsserted);
    assert_eq!(count(&fd), 1);
    assert_ne!(cfg_read(&mut d, STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    // automasked: asserting again signals nothing
    irq.set_intx(true);
    assert_eq!(count(&fd), 0);
    // the client unmasks while the line is still asserted: signalled again
    set_irqs(&mut d, INTX_IRQ, 0, 1, IrqAction::Unmask, IrqData::None).unwrap();
    assert_eq!(count(&fd), 1);
    // the guest acknowledges: line low; unmask does not signal
    irq.set_intx(false);
    assert_eq!(cfg_read(&mut d, STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    set_irqs(&mut d, INTX_IRQ, 0, 1, IrqAction::Unmask, IrqData::None).unwrap();
    assert_eq!(count(&fd), 0);
    // explicit mask (DATA_BOOL true), assert, unmask (DATA_BOOL)
    set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        IrqAction::Mask,
        IrqData::Bool(vec![true]),
    )
    .unwrap();
    irq.set_intx(true);
    assert_eq!(count(&fd), 0);
    set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        IrqAction::Unmask,
        IrqData::Bool(vec![false]),
    )
    .unwrap();
    assert_eq!(count(&fd), 0, "DATA_BOOL false does nothing");
    set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        IrqAction::Unmask,
        IrqData::Bool(vec![true]),
    )
    .unwrap();
    assert_eq!(count(&fd), 1);
    irq.set_intx(false);
    set_irqs(&mut d, INTX_IRQ, 0, 1, IrqAction::Unmask, IrqData::None).unwrap();
    // Command.INTx-disable holds the interrupt back; status still shows it
    cfg_write(&mut d, COMMAND, u32::from(COMMAND_INTX_DISABLE), 2);
    irq.set_intx(true);
    assert_eq!(count(&fd), 0);
    assert_ne!(cfg_read(&mut d, STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    cfg_write(&mut d, COMMAND, 0, 2);
    assert_eq!(count(&fd), 1, "delivered once INTx is enabled again");
    // a line asserted before the eventfd is wired is delivered on wiring
    let (mut d, _) = device();
    d.interrupts().set_intx(true);
    let fd = wire(&mut d, INTX_IRQ, 1).remove(0);
    assert_eq!(count(&fd), 1);
    // no pin: nothing happens
    let mut l = layout();
    l.interrupt_pin = 0;
    let (d, _) = device_with(l);
    assert_eq!(d.interrupts().raise(0), Delivery::Dropped);
    assert_eq!(d.interrupts().mode(), IrqMode::None);
}

#[test]
fn set_irqs_trigger_combinations() {
    let (mut d, _) = device();
    // MSI-X: wire a partial range, replace one, de-assign one
    let (a, fa) = eventfd();
    let (b, fb) = eventfd();
    set_irqs(
        &mut d,
        MSIX_IRQ,
        2,
        2,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![Some(a), Some(b)]),
    )
    .unwrap();
    // loopback: DATA_NONE over a range, DATA_BOOL selectively
    set_irqs(&mut d, MSIX_IRQ, 0, 4, IrqAction::Trigger, IrqData::None).unwrap();
    assert_eq!((count(&fa), count(&fb)), (1, 1));
    set_irqs(
        &mut d,
        MSIX_IRQ,
        2,
        2,
        IrqAction::Trigger,
        IrqData::Bool(vec![false, true]),
    )
    .unwrap();
    assert_eq!((count(&fa), count(&fb)), (0, 1));
    let (c, fc) = eventfd();
    set_irqs(
        &mut d,
        MSIX_IRQ,
        3,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![Some(c)]),
    )
    .unwrap();
    set_irqs(
        &mut d,
        MSIX_IRQ,
        2,
        1,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![None]),
    )
    .unwrap();
    set_irqs(&mut d, MSIX_IRQ, 2, 2, IrqAction::Trigger, IrqData::None).unwrap();
    assert_eq!((count(&fa), count(&fb), count(&fc)), (0, 0, 1));
    // count 0 with DATA_NONE disables the whole index
    set_irqs(&mut d, MSIX_IRQ, 0, 0, IrqAction::Trigger, IrqData::None).unwrap();
    set_irqs(&mut d, MSIX_IRQ, 0, 70, IrqAction::Trigger, IrqData::None).unwrap();
    assert_eq!(count(&fc), 0);
    // ... and so does an empty eventfd list
    let fds = wire(&mut d, MSI_IRQ, 4);
    set_irqs(
        &mut d,
        MSI_IRQ,
        0,
        0,
        IrqAction::Trigger,
        IrqData::Eventfds(vec![]),
    )
    .unwrap();
    set_irqs(&mut d, MSI_IRQ, 0, 4, IrqAction::Trigger, IrqData::None).unwrap();
    assert!(fds.iter().all(|f| count(f) == 0));
    // DATA_BOOL with count 0 on MSI is a no-op
    set_irqs(
        &mut d,
        MSI_IRQ,
        0,
        0,
        IrqAction::Trigger,
        IrqData::Bool(vec![]),
    )
    .unwrap();

    // INTx loopback and disable
    let fd = wire(&mut d, INTX_IRQ, 1).remove(0);
    set_irqs(&mut d, INTX_IRQ, 0, 1, IrqAction::Trigger, IrqData::None).unwrap();
    set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Bool(vec![true]),
    )
    .unwrap();
    set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        IrqAction::Trigger,
        IrqData::Bool(vec![false]),
    )
    .unwrap();
    assert_eq!(count(&fd), 2);
    set_irqs(&mut d, INTX_IRQ, 0, 0, IrqAction::Trigger, IrqData::None).unwrap();
    d.interrupts().raise(0);
    assert_eq!(count(&fd), 0, "INTx disabled");

    // ERR and REQ: one vector, eventfd, loopback, disable
    for index in [ERR_IRQ, REQ_IRQ] {
        let fd = wire(&mut d, index, 1).remove(0);
        set_irqs(&mut d, index, 0, 1, IrqAction::Trigger, IrqData::None).unwrap();
        set_irqs(
            &mut d,
            index,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Bool(vec![true]),
        )
        .unwrap();
        assert_eq!(count(&fd), 2);
        if index == ERR_IRQ {
            assert!(d.interrupts().signal_error());
        } else {
            assert!(d.interrupts().request_release());
        }
        assert_eq!(count(&fd), 1);
        set_irqs(
            &mut d,
            index,
            0,
            1,
            IrqAction::Trigger,
            IrqData::Eventfds(vec![None]),
        )
        .unwrap();
        set_irqs(&mut d, index, 0, 1, IrqAction::Trigger, IrqData::None).unwrap();
        assert_eq!(count(&fd), 0);
        let fd = wire(&mut d, index, 1).remove(0);
        set_irqs(&mut d, index, 0, 0, IrqAction::Trigger, IrqData::None).unwrap();
        assert!(!d.interrupts().signal_error());
        assert!(!d.interrupts().request_release());
        assert_eq!(count(&fd), 0);
    }
}

#[test]
fn set_irqs_errors() {
    let (mut d, _) = device();
    let fds = |n: usize| IrqData::Eventfds((0..n).map(|_| Some(eventfd().0)).collect());
    use IrqAction::*;
    assert!(matches!(
        set_irqs(&mut d, 5, 0, 0, Trigger, IrqData::None),
        Err(Error::NoSuchIrq(5))
    ));
    // ranges
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        70,
        0,
        Trigger,
        IrqData::None
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        69,
        2,
        Trigger,
        IrqData::None
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        u32::MAX,
        2,
        Trigger,
        IrqData::None
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        1,
        u32::MAX,
        Trigger,
        IrqData::None
    )));
    assert!(is_invalid(set_irqs(&mut d, MSI_IRQ, 0, 5, Trigger, fds(5))));
    assert!(is_invalid(set_irqs(
        &mut d,
        INTX_IRQ,
        1,
        0,
        Trigger,
        IrqData::None
    )));
    // data length must match count
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        0,
        3,
        Trigger,
        fds(2)
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        MSIX_IRQ,
        0,
        1,
        Trigger,
        IrqData::Bool(vec![true, true])
    )));
    // unsupported action/index combinations
    for index in [MSI_IRQ, MSIX_IRQ, ERR_IRQ, REQ_IRQ] {
        for action in [Mask, Unmask] {
            assert!(is_unsupported(set_irqs(
                &mut d,
                index,
                0,
                1,
                action,
                IrqData::None
            )));
        }
    }
    assert!(is_unsupported(set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        Unmask,
        fds(1)
    )));
    assert!(is_unsupported(set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        1,
        Mask,
        fds(1)
    )));
    // INTx mask/unmask want exactly vector 0
    assert!(is_invalid(set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        0,
        Mask,
        IrqData::None
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        INTX_IRQ,
        0,
        0,
        Trigger,
        IrqData::Bool(vec![])
    )));
    assert!(is_invalid(set_irqs(
        &mut d,
        ERR_IRQ,
        0,
        0,
        Trigger,
        IrqData::Bool(vec![])
    )));
    // an index the function does not have
    let mut l = layout();
    l.msi = None;
    l.pcie = None;
    l.interrupt_pin = 0;
    let (mut d, _) = device_with(l);
    for index in [INTX_IRQ, MSI_IRQ, ERR_IRQ] {
        assert!(is_invalid(set_irqs(
            &mut d,
            index,
            0,
            0,
            Trigger,
            IrqData::None
        )));
    }
}

#[test]
fn function_level_reset() {
    let (mut d, log) = device();
    let irq = d.interrupts().clone();
    let fds = wire(&mut d, MSIX_IRQ, 1);
    cfg_write(&mut d, BAR0, 0xfebf_0000, 4);
    cfg_write(
        &mut d,
        COMMAND,
        u32::from(COMMAND_MEMORY | COMMAND_MASTER),
        2,
    );
    d.region_write(0, 0, &42u32.to_le_bytes()).unwrap();
    enable_msix(&mut d, true);
    irq.raise(0);
    assert_eq!(pba(&mut d), 1);
    let e = find_cap(&mut d, CAP_ID_EXP);
    cfg_write(&mut d, e + EXP_DEVCTL, u32::from(EXP_DEVCTL_BCR_FLR), 2);
    // config space is back to power-on, the function was reset
    assert_eq!(cfg_read(&mut d, BAR0, 4), 0);
    assert_eq!(cfg_read(&mut d, COMMAND, 2), 0);
    let x = msix_cap(&mut d);
    assert_eq!(cfg_read(&mut d, x + MSIX_FLAGS, 2), 69);
    assert_eq!(
        cfg_read(&mut d, e + EXP_DEVCTL, 2) & u32::from(EXP_DEVCTL_BCR_FLR),
        0
    );
    assert_eq!(pba(&mut d), 0);
    assert_eq!(d.function().state, 0);
    let l = log.lock().unwrap();
    assert_eq!(l.resets, 1);
    assert_eq!(l.commands, vec![6, 0], "bus master off after reset");
    drop(l);
    // the client's eventfds stay wired
    enable_msix(&mut d, false);
    irq.raise(0);
    assert_eq!(count(&fds[0]), 1);
}

#[test]
fn power_state_transitions() {
    let (mut d, log) = device();
    let pm = find_cap(&mut d, CAP_ID_PM);
    d.region_write(0, 0, &7u32.to_le_bytes()).unwrap();
    cfg_write(&mut d, pm + PM_CTRL, u32::from(PM_D3HOT), 2);
    cfg_write(&mut d, pm + PM_CTRL, u32::from(PM_D0), 2);
    assert_eq!(log.lock().unwrap().resets, 0, "No_Soft_Reset: state kept");
    assert_eq!(d.function().state, 7);

    let mut l = layout();
    l.pm.no_soft_reset = false;
    let (mut d, log) = device_with(l);
    d.region_write(0, 0, &7u32.to_le_bytes()).unwrap();
    cfg_write(&mut d, BAR0, 0xfebf_0000, 4);
    cfg_write(&mut d, pm + PM_CTRL, u32::from(PM_D3HOT), 2);
    assert_eq!(
        cfg_read(&mut d, pm + PM_CTRL, 2) as u16 & PM_CTRL_STATE_MASK,
        PM_D3HOT
    );
    cfg_write(&mut d, pm + PM_CTRL, u32::from(PM_D0), 2);
    assert_eq!(log.lock().unwrap().resets, 1, "soft reset on D3hot -> D0");
    assert_eq!(d.function().state, 0);
    assert_eq!(cfg_read(&mut d, BAR0, 4), 0);
    assert_eq!(
        cfg_read(&mut d, pm + PM_CTRL, 2) as u16 & PM_CTRL_STATE_MASK,
        PM_D0
    );
}

#[test]
fn device_reset_and_reset_support() {
    let (mut d, log) = device();
    cfg_write(&mut d, BAR0, 0xfebf_0000, 4);
    d.reset().unwrap();
    assert_eq!(cfg_read(&mut d, BAR0, 4), 0);
    assert_eq!(log.lock().unwrap().resets, 1);

    let mut l = layout();
    l.reset = false;
    let (mut d, log) = device_with(l);
    assert!(!d.info().reset);
    assert!(is_unsupported(d.reset()));
    // FLR is not advertised and a write of the bit does nothing
    let e = find_cap(&mut d, CAP_ID_EXP);
    assert_eq!(cfg_read(&mut d, e + EXP_DEVCAP, 4) & EXP_DEVCAP_FLR, 0);
    cfg_write(&mut d, BAR0, 0xfebf_0000, 4);
    cfg_write(&mut d, e + EXP_DEVCTL, u32::from(EXP_DEVCTL_BCR_FLR), 2);
    assert_eq!(cfg_read(&mut d, BAR0, 4), 0xfebf_0000);
    assert_eq!(log.lock().unwrap().resets, 0);
}

#[test]
fn open_close_disconnect() {
    let (mut d, log) = device();
    d.open().unwrap();
    let fds = wire(&mut d, MSIX_IRQ, 1);
    enable_msix(&mut d, false);
    d.region_write(0, 0, &9u32.to_le_bytes()).unwrap();
    // disconnect: eventfds dropped, state kept
    d.disconnect();
    assert_eq!(d.interrupts().raise(0), Delivery::Unwired);
    assert_eq!(count(&fds[0]), 0);
    assert_eq!(d.function().state, 9);
    assert_eq!(d.interrupts().mode(), IrqMode::Msix);
    // close: everything back to power-on
    let _fds = wire(&mut d, MSIX_IRQ, 1);
    d.close();
    assert_eq!(d.function().state, 0);
    assert_eq!(d.interrupts().mode(), IrqMode::Intx);
    let x = msix_cap(&mut d);
    assert_eq!(cfg_read(&mut d, x + MSIX_FLAGS, 2), 69);
    let l = log.lock().unwrap();
    assert_eq!((l.opened, l.closed, l.disconnected), (1, 1, 1));
}

/// Put a device in a state worth migrating; returns its config image.
fn busy_device() -> (PciDevice<Fake>, Vec<u8>) {
    let (mut d, _) = device();
    cfg_write(&mut d, BAR0, 0xfebf_0000, 4);
    cfg_write(
        &mut d,
        COMMAND,
        u32::from(COMMAND_MEMORY | COMMAND_MASTER),
        2,
    );
    d.region_write(0, 0, &0x1234_5678u32.to_le_bytes()).unwrap();
    d.region_write(
        2,
        0x8000 + 16 * 69,
        &[0x10, 0, 0xe0, 0xfe, 0, 0, 0, 0, 0x33, 0, 0, 0, 1, 0, 0, 0],
    )
    .unwrap();
    enable_msix(&mut d, true);
    d.interrupts().raise(69);
    d.interrupts().raise(4);
    let mut img = vec![0u8; 4096];
    d.region_read(CONFIG_REGION, 0, &mut img).unwrap();
    (d, img)
}

#[test]
fn migration_round_trip() {
    let (mut src, img) = busy_device();
    let m = src.migration().unwrap();
    m.stop().unwrap();
    let state = m.save().unwrap();

    let (mut dst, log) = device();
    let fds = wire(&mut dst, MSIX_IRQ, 70);
    let m = dst.migration().unwrap();
    m.stop().unwrap();
    assert!(log.lock().unwrap().stopped);
    m.load(&state).unwrap();
    // nothing signalled by loading
    assert!(fds.iter().all(|f| count(f) == 0));
    m.run().unwrap();
    assert!(!log.lock().unwrap().stopped);
    let mut got = vec![0u8; 4096];
    dst.region_read(CONFIG_REGION, 0, &mut got).unwrap();
    assert_eq!(got, img);
    assert_eq!(dst.function().state, 0x1234_5678);
    assert_eq!(pba(&mut dst), (1 << 69) | (1 << 4));
    let mut e = [0u8; 16];
    dst.region_read(2, 0x8000 + 16 * 69, &mut e).unwrap();
    assert_eq!(e[8], 0x33);
    assert_eq!(
        log.lock().unwrap().commands,
        vec![6],
        "function told of the command"
    );
    // the loaded function mask and vector mask still hold: unmask delivers
    enable_msix(&mut dst, false);
    assert_eq!((count(&fds[4]), count(&fds[69])), (1, 0));
    dst.region_write(2, 0x8000 + 16 * 69 + 12, &[0, 0, 0, 0])
        .unwrap();
    assert_eq!(count(&fds[69]), 1);
}

#[test]
fn migration_refuses_bad_state_and_changes_nothing() {
    let (mut src, _) = busy_device();
    let state = src.migration().unwrap().save().unwrap();
    let (mut dst, _) = device();
    let check_untouched = |d: &mut PciDevice<Fake>| {
        assert_eq!(cfg_read(d, BAR0, 4), 0);
        assert_eq!(d.function().state, 0);
        assert_eq!(pba(d), 0);
    };
    let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
    bad.push(("empty", Vec::new()));
    bad.push(("truncated", state[..state.len() - 1].to_vec()));
    bad.push(("trailing", [state.as_slice(), &[0]].concat()));
    let mut v = state.clone();
    v[0] ^= 0xff;
    bad.push(("magic", v));
    let mut v = state.clone();
    v[8] = 2;
    bad.push(("version", v));
    let mut v = state.clone();
    v[12 + DEVICE_ID] ^= 1;
    bad.push(("device id", v));
    let mut v = state.clone();
    v[12 + 4096] = 7; // INTx level not a bool
    bad.push(("bool", v));
    let mut v = state.clone();
    v[12 + 4096 + 6] = 71; // MSI-X vector count
    bad.push(("vector count", v));
    let mut v = state.clone();
    v[12 + 4096 + 10 + 12] = 0x80; // reserved vector control bit
    bad.push(("reserved bit", v));
    for (what, s) in &bad {
        let r = dst.migration().unwrap().load(s);
        assert!(is_invalid(r), "{what} accepted");
        check_untouched(&mut dst);
    }
    // the function refusing its part leaves the core untouched too
    dst.function_mut().fail_load = true;
    assert!(is_invalid(dst.migration().unwrap().load(&state)));
    check_untouched(&mut dst);
}

#[test]
fn no_migration_without_function_support() {
    struct Plain;
    impl PciFunction for Plain {
        fn name(&self) -> &str {
            "plain"
        }
        fn bar_read(&mut self, _: u8, _: u64, _: &mut [u8]) -> Result<(), Error> {
            Ok(())
        }
        fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) -> Result<(), Error> {
            Ok(())
        }
        fn reset(&mut self) -> Result<(), Error> {
            Ok(())
        }
    }
    let mut d = PciDevice::new(PciLayout::new(ids()), |_| Ok(Plain)).unwrap();
    assert!(d.migration().is_none());
    assert!(is_invalid(
        PciDevice::new(
            PciLayout {
                interrupt_pin: 9,
                ..PciLayout::new(ids())
            },
            |_| Ok(Plain)
        )
        .map(|_| ())
    ));
}
