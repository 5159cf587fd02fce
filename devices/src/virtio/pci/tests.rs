//! The virtio-pci transport driven the way a guest driver drives it:
//! config space walk, common configuration, notifications, interrupts,
//! over guest memory mapped through a real [`DmaSpace`].

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::*;
use crate::block::{BlockBackend, BlockError, IoBufs, MemBackend};
use crate::device::{Device, IrqAction, IrqData, IrqSet};
use crate::dma::{MapRequest, Prot};
use crate::pci::regs::*;
use crate::pci::tests::{count, eventfd};
use crate::pci::{CONFIG_REGION, MSIX_IRQ};
use crate::virtio::blk::{Blk, BlkConfig, req, status as blk_status};
use crate::virtio::features as vf;
use crate::virtio::testing::{Driver, blk_header, r, w};

const RAM: u64 = 4 << 20;
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x21_0000;
const STATUS: u64 = 0x2f_0000;

fn ring_base(q: u16) -> u64 {
    0x1_0000 + u64::from(q) * 0x1_0000
}

fn sealed_memfd(size: u64) -> File {
    // SAFETY: valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vdevd-test-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS on our own descriptor with a valid mask.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    f
}

/// A backend whose writes take a while, to catch a reset mid-batch.
struct Slow(MemBackend, Duration);

impl BlockBackend for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, o: u64, b: &IoBufs<'_>) -> Result<(), BlockError> {
        self.0.read(o, b)
    }
    fn write(&self, o: u64, b: &IoBufs<'_>, fua: bool) -> Result<(), BlockError> {
        std::thread::sleep(self.1);
        self.0.write(o, b, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), BlockError> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), BlockError> {
        self.0.write_zeroes(o, l, u)
    }
    fn set_write_cache(&self, e: bool) {
        self.0.set_write_cache(e)
    }
    fn write_cache(&self) -> bool {
        self.0.write_cache()
    }
    fn describe(&self) -> String {
        "slow".into()
    }
}

struct Guest {
    dev: VirtioPciDevice<Blk>,
    dma: Arc<DmaSpace>,
    ram: File,
    irqs: Vec<File>,
    drivers: Vec<Driver>,
}

impl Guest {
    fn with_backend(backend: Arc<dyn BlockBackend>, queues: u16, kick: KickMode) -> Guest {
        let dma = Arc::new(DmaSpace::default());
        let ram = sealed_memfd(RAM);
        dma.map(MapRequest {
            iova: 0,
            size: RAM,
            prot: Prot::RW,
            file: Some((ram.try_clone().unwrap(), 0)),
        })
        .unwrap();
        let blk = Blk::new(
            backend,
            BlkConfig {
                num_queues: queues,
                queue_size: 16,
                serial: "t".into(),
            },
        )
        .unwrap();
        let dev = create(Arc::new(blk), dma.clone(), VirtioPciOptions { kick }).unwrap();
        Guest {
            dev,
            dma,
            ram,
            irqs: Vec::new(),
            drivers: Vec::new(),
        }
    }

    fn new(queues: u16) -> Guest {
        Self::with_backend(
            Arc::new(MemBackend::new(1 << 20, 512).unwrap()),
            queues,
            KickMode::Trap,
        )
    }

    fn cfg_read(&mut self, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev
            .region_read(CONFIG_REGION, off as u64, &mut b[..len])
            .unwrap();
        u32::from_le_bytes(b)
    }

    fn cfg_write(&mut self, off: usize, v: u32, len: usize) {
        self.dev
            .region_write(CONFIG_REGION, off as u64, &v.to_le_bytes()[..len])
            .unwrap();
    }

    fn read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev
            .region_read(u32::from(VIRTIO_BAR), off, &mut b[..len])
            .unwrap();
        u64::from_le_bytes(b)
    }

    fn write(&mut self, off: u64, v: u64, len: usize) {
        self.dev
            .region_write(u32::from(VIRTIO_BAR), off, &v.to_le_bytes()[..len])
            .unwrap();
    }

    fn status(&mut self) -> u8 {
        self.read(common::DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, s: u8) {
        self.write(common::DEVICE_STATUS, u64::from(s), 1);
    }

    /// Vendor capabilities as a driver finds them: (offset, cfg_type).
    fn virtio_caps(&mut self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut pos = self.cfg_read(CAPABILITY_LIST, 1) as usize;
        while pos != 0 {
            if self.cfg_read(pos, 1) as u8 == CAP_ID_VENDOR {
                out.push((pos, self.cfg_read(pos + 3, 1) as u8));
            }
            pos = self.cfg_read(pos + 1, 1) as usize;
        }
        out
    }

    fn wire_msix(&mut self) {
        let n = self.dev.irq_info(MSIX_IRQ).unwrap().count;
        let (fds, files): (Vec<_>, Vec<_>) = (0..n).map(|_| eventfd()).unzip();
        self.dev
            .set_irqs(IrqSet {
                index: MSIX_IRQ,
                start: 0,
                count: n,
                action: IrqAction::Trigger,
                data: IrqData::Eventfds(fds.into_iter().map(Some).collect()),
            })
            .unwrap();
        self.irqs = files;
        let mut pos = self.cfg_read(CAPABILITY_LIST, 1) as usize;
        while self.cfg_read(pos, 1) as u8 != CAP_ID_MSIX {
            pos = self.cfg_read(pos + 1, 1) as usize;
        }
        self.cfg_write(pos + MSIX_FLAGS, u32::from(MSIX_FLAGS_ENABLE), 2);
    }

    /// Negotiate `features`; returns whether FEATURES_OK stuck.
    fn negotiate(&mut self, features: u64) -> bool {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.write(common::DRIVER_FEATURE_SELECT, 0, 4);
        self.write(common::DRIVER_FEATURE, features & 0xffff_ffff, 4);
        self.write(common::DRIVER_FEATURE_SELECT, 1, 4);
        self.write(common::DRIVER_FEATURE, features >> 32, 4);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_status(s);
        self.status() & status::FEATURES_OK != 0
    }

    fn device_features(&mut self) -> u64 {
        self.write(common::DEVICE_FEATURE_SELECT, 0, 4);
        let lo = self.read(common::DEVICE_FEATURE, 4);
        self.write(common::DEVICE_FEATURE_SELECT, 1, 4);
        let hi = self.read(common::DEVICE_FEATURE, 4);
        lo | hi << 32
    }

    /// Probe like Linux: bus master, MSI-X (config vector 0, queue q on
    /// vector q + 1), features, queues, DRIVER_OK.
    fn init(&mut self, features: u64) {
        self.cfg_write(COMMAND, u32::from(COMMAND_MEMORY | COMMAND_MASTER), 2);
        self.wire_msix();
        assert!(self.negotiate(features));
        self.write(common::CONFIG_MSIX_VECTOR, 0, 2);
        let n = self.read(common::NUM_QUEUES, 2) as u16;
        let mem = self.dma.memory();
        self.drivers.clear();
        for q in 0..n {
            let d = Driver::new(&mem, ring_base(q), 16);
            self.write(common::QUEUE_SELECT, u64::from(q), 2);
            assert_eq!(self.read(common::QUEUE_SIZE, 2), 16);
            self.write(common::QUEUE_DESC, d.desc, 8);
            self.write(common::QUEUE_DRIVER, d.avail & 0xffff_ffff, 4);
            self.write(common::QUEUE_DRIVER + 4, d.avail >> 32, 4);
            self.write(common::QUEUE_DEVICE, d.used, 8);
            self.write(common::QUEUE_MSIX_VECTOR, u64::from(q) + 1, 2);
            assert_eq!(self.read(common::QUEUE_MSIX_VECTOR, 2), u64::from(q) + 1);
            self.write(common::QUEUE_ENABLE, 1, 2);
            self.drivers.push(d);
        }
        drop(mem);
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    fn kick(&mut self, q: u16) {
        let off = NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_MULTIPLIER);
        self.write(off, u64::from(q), 2);
    }

    /// Queue `bufs` on queue `q` (not kicked).
    fn submit(&mut self, q: u16, bufs: &[crate::virtio::testing::Buf]) -> u16 {
        let mem = self.dma.memory();
        let d = &mut self.drivers[usize::from(q)];
        let head = d.chain(&mem, bufs);
        d.publish(&mem, head);
        head
    }

    fn used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let mem = self.dma.memory();
        self.drivers[usize::from(q)].take_used(&mem)
    }

    fn ram_write(&self, at: u64, data: &[u8]) {
        self.ram.write_all_at(data, at).unwrap();
    }

    fn ram_read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.ram.read_exact_at(&mut v, at).unwrap();
        v
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        blk_header(&self.dma.memory(), at, kind, sector);
    }
}

/// Wait until the eventfd was signalled (true) or 5 s passed (false).
fn wait_signal(f: &File) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if count(f) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn until(mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn all_features(g: &mut Guest) -> u64 {
    g.device_features()
}

#[test]
fn identity_and_capabilities_as_a_driver_walks_them() {
    let mut g = Guest::new(2);
    assert_eq!(g.cfg_read(crate::pci::regs::VENDOR_ID, 2), 0x1af4);
    assert_eq!(g.cfg_read(DEVICE_ID, 2), 0x1042);
    assert_eq!(
        g.cfg_read(REVISION_ID, 1),
        1,
        "modern devices have revision >= 1"
    );
    assert_eq!(
        g.dev.region_info(u32::from(VIRTIO_BAR)).unwrap().size,
        VIRTIO_BAR_SIZE
    );
    assert_eq!(g.dev.irq_info(MSIX_IRQ).unwrap().count, 3);
    let caps = g.virtio_caps();
    let types: Vec<u8> = caps.iter().map(|c| c.1).collect();
    assert_eq!(
        types,
        [
            cap::COMMON_CFG,
            cap::ISR_CFG,
            cap::DEVICE_CFG,
            cap::NOTIFY_CFG,
            cap::PCI_CFG
        ]
    );
    let expect = [
        (COMMON_OFFSET, COMMON_SIZE, 16),
        (ISR_OFFSET, 1, 16),
        (DEVICE_OFFSET, 60, 16),
        (NOTIFY_OFFSET, 8, 20),
        (0, 0, 20),
    ];
    for (&(pos, t), (off, len, cap_len)) in caps.iter().zip(expect) {
        assert_eq!(g.cfg_read(pos + 2, 1), cap_len, "cap_len of type {t}");
        let bar = g.cfg_read(pos + 4, 1) as u8;
        if t != cap::PCI_CFG {
            assert_eq!(bar, VIRTIO_BAR, "type {t}");
        }
        assert_eq!(u64::from(g.cfg_read(pos + 8, 4)), off, "offset of type {t}");
        assert_eq!(
            u64::from(g.cfg_read(pos + 12, 4)),
            len,
            "length of type {t}"
        );
        // read-only fields stay put
        g.cfg_write(pos + 8, 0xdead, 4);
        if t != cap::PCI_CFG {
            assert_eq!(u64::from(g.cfg_read(pos + 8, 4)), off);
        }
    }
    let notify = caps[3].0;
    assert_eq!(g.cfg_read(notify + 16, 4), NOTIFY_MULTIPLIER);
    // common configuration at power-on
    assert_eq!(g.read(common::NUM_QUEUES, 2), 2);
    assert_eq!(g.read(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    g.write(common::QUEUE_SELECT, 1, 2);
    assert_eq!(g.read(common::QUEUE_SIZE, 2), 16);
    assert_eq!(g.read(common::QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(g.read(common::QUEUE_ENABLE, 2), 0);
    g.write(common::QUEUE_SELECT, 2, 2);
    assert_eq!(g.read(common::QUEUE_SIZE, 2), 0, "no queue 2");
    // the device configuration is readable through BAR4
    assert_eq!(g.read(DEVICE_OFFSET, 8), (1 << 20) / 512);
    assert_eq!(g.read(DEVICE_OFFSET + 34, 2), 2, "num_queues");
    // trapped (not mmapped) notify area in trap mode
    assert!(
        g.dev
            .region_info(u32::from(VIRTIO_BAR))
            .unwrap()
            .mmap
            .is_none()
    );
}

#[test]
fn feature_negotiation_is_checked() {
    let mut g = Guest::new(1);
    let offered = all_features(&mut g);
    assert_ne!(offered & vf::VERSION_1, 0);
    assert_ne!(offered & vf::RING_EVENT_IDX, 0);
    // a feature the device does not offer
    assert!(!g.negotiate(offered | 1 << 40));
    assert!(!g.negotiate(vf::VERSION_1 | 1 << 0));
    // a legacy driver (no VERSION_1)
    assert!(!g.negotiate(offered & !vf::VERSION_1));
    // what was offered, and any subset with VERSION_1
    assert!(g.negotiate(offered));
    assert!(g.negotiate(vf::VERSION_1));
    // driver features are frozen once FEATURES_OK is set
    g.write(common::DRIVER_FEATURE_SELECT, 0, 4);
    g.write(common::DRIVER_FEATURE, 0xffff_ffff, 4);
    assert_eq!(g.read(common::DRIVER_FEATURE, 4), 0);
    // the selector past the two words reads zero
    g.write(common::DEVICE_FEATURE_SELECT, 2, 4);
    assert_eq!(g.read(common::DEVICE_FEATURE, 4), 0);
}

#[test]
fn io_with_trapped_kicks_and_msix_per_queue() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    g.ram_write(DATA, &data);
    g.header(HDR, req::OUT, 16);
    g.submit(0, &[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]), "queue 0 interrupt on vector 1");
    assert_eq!(g.used(0).len(), 1);
    assert_eq!(g.ram_read(STATUS, 1), [blk_status::OK]);
    g.header(HDR, req::IN, 16);
    g.ram_write(DATA + 0x10000, &[0; 4096]);
    g.submit(0, &[r(HDR, 16), w(DATA + 0x10000, 4096), w(STATUS + 1, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]));
    assert_eq!(g.used(0), [(3, 4097)]);
    assert_eq!(g.ram_read(DATA + 0x10000, 4096), data);
    assert_eq!(count(&g.irqs[0]), 0, "no configuration interrupt");
    // ISR bit 0 is set too (and clears on read)
    assert_eq!(g.read(ISR_OFFSET, 1), 1);
    assert_eq!(g.read(ISR_OFFSET, 1), 0);
}

#[test]
fn nothing_runs_before_driver_ok_or_without_bus_master() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    g.cfg_write(COMMAND, u32::from(COMMAND_MEMORY), 2);
    g.header(HDR, req::FLUSH, 0);
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(g.used(0).is_empty(), "no DMA without bus mastering");
    // enabling bus mastering picks the queue up
    g.cfg_write(COMMAND, u32::from(COMMAND_MEMORY | COMMAND_MASTER), 2);
    assert!(wait_signal(&g.irqs[1]));
    assert_eq!(g.used(0).len(), 1);
}

#[test]
fn multiple_queues_complete_independently_on_their_vectors() {
    let mut g = Guest::new(4);
    let f = all_features(&mut g);
    g.init(f);
    for q in 0..4u16 {
        let hdr = HDR + u64::from(q) * 0x100;
        g.header(hdr, req::OUT, u64::from(q) * 8);
        g.ram_write(DATA + u64::from(q) * 0x1000, &[q as u8 + 1; 512]);
        g.submit(
            q,
            &[
                r(hdr, 16),
                r(DATA + u64::from(q) * 0x1000, 512),
                w(STATUS + u64::from(q), 1),
            ],
        );
    }
    for q in 0..4 {
        g.kick(q);
    }
    for q in 0..4u16 {
        assert!(wait_signal(&g.irqs[usize::from(q) + 1]), "queue {q}");
        assert_eq!(g.used(q).len(), 1, "queue {q}");
    }
    assert_eq!(g.ram_read(STATUS, 4), [0, 0, 0, 0]);
    // each wrote its own sectors
    for q in 0..4u16 {
        let hdr = HDR + u64::from(q) * 0x100;
        g.header(hdr, req::IN, u64::from(q) * 8);
        let buf = DATA + 0x10000 + u64::from(q) * 0x1000;
        g.submit(q, &[r(hdr, 16), w(buf, 512), w(STATUS + u64::from(q), 1)]);
        g.kick(q);
        assert!(wait_signal(&g.irqs[usize::from(q) + 1]));
        assert_eq!(g.ram_read(buf, 512), vec![q as u8 + 1; 512]);
    }
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    g.header(HDR, req::FLUSH, 0);
    // used_event = 1: no interrupt for the first completion, one for the second
    {
        let mem = g.dma.memory();
        g.drivers[0].set_used_event(&mem, 1);
    }
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    assert!(until(|| {
        let mem = g.dma.memory();
        g.drivers[0].used_idx(&mem) == 1
    }));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(count(&g.irqs[1]), 0, "suppressed by used_event");
    g.submit(0, &[r(HDR, 16), w(STATUS + 1, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]));
    let mem = g.dma.memory();
    assert_eq!(
        g.drivers[0].avail_event(&mem),
        2,
        "device asks for the next kick"
    );
}

#[test]
fn intx_when_msix_is_off_and_isr_clears_on_read() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    // turn MSI-X off again: INTx with the ISR
    let mut pos = g.cfg_read(CAPABILITY_LIST, 1) as usize;
    while g.cfg_read(pos, 1) as u8 != CAP_ID_MSIX {
        pos = g.cfg_read(pos + 1, 1) as usize;
    }
    g.cfg_write(pos + MSIX_FLAGS, 0, 2);
    g.cfg_write(COMMAND, u32::from(COMMAND_MEMORY | COMMAND_MASTER), 2);
    g.header(HDR, req::FLUSH, 0);
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    assert!(until(|| g.dev.interrupts().intx_asserted()));
    assert_eq!(g.read(ISR_OFFSET, 1), 1);
    assert!(
        !g.dev.interrupts().intx_asserted(),
        "reading the ISR deasserts"
    );
    assert_eq!(g.read(ISR_OFFSET, 1), 0);
}

#[test]
fn vectors_beyond_the_table_read_back_as_no_vector() {
    let mut g = Guest::new(1);
    g.write(common::CONFIG_MSIX_VECTOR, 2, 2);
    assert_eq!(g.read(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    g.write(common::CONFIG_MSIX_VECTOR, 1, 2);
    assert_eq!(g.read(common::CONFIG_MSIX_VECTOR, 2), 1);
    g.write(common::QUEUE_MSIX_VECTOR, 7, 2);
    assert_eq!(g.read(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // queue size: power of two up to the maximum only
    g.write(common::QUEUE_SIZE, 12, 2);
    assert_eq!(g.read(common::QUEUE_SIZE, 2), 16);
    g.write(common::QUEUE_SIZE, 32, 2);
    assert_eq!(g.read(common::QUEUE_SIZE, 2), 16);
    g.write(common::QUEUE_SIZE, 8, 2);
    assert_eq!(g.read(common::QUEUE_SIZE, 2), 8);
    // 64-bit fields written as halves and read whole
    g.write(common::QUEUE_DESC, 0x1234_5000, 4);
    g.write(common::QUEUE_DESC + 4, 0x1, 4);
    assert_eq!(g.read(common::QUEUE_DESC, 8), 0x1_1234_5000);
}

#[test]
fn a_malformed_chain_sets_needs_reset_until_reset() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    {
        let mem = g.dma.memory();
        let d = &mut g.drivers[0];
        d.write_desc(&mem, 0, HDR, 16, crate::virtio::testing::F_NEXT, 0);
        d.publish(&mem, 0);
    }
    g.kick(0);
    assert!(wait_signal(&g.irqs[0]), "configuration interrupt");
    assert_ne!(g.status() & status::DEVICE_NEEDS_RESET, 0);
    // further work is not taken
    g.header(HDR, req::FLUSH, 0);
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    std::thread::sleep(Duration::from_millis(30));
    assert!(g.used(0).is_empty());
    // writing other status bits keeps NEEDS_RESET; a reset clears it
    g.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    assert_ne!(g.status() & status::DEVICE_NEEDS_RESET, 0);
    g.init(f);
    assert_eq!(g.status() & status::DEVICE_NEEDS_RESET, 0);
    g.header(HDR, req::FLUSH, 0);
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]));
    assert_eq!(g.used(0).len(), 1);
}

#[test]
fn reset_while_requests_are_in_flight_waits_for_them() {
    let backend = Arc::new(Slow(
        MemBackend::new(1 << 20, 512).unwrap(),
        Duration::from_millis(20),
    ));
    let mut g = Guest::with_backend(backend, 1, KickMode::Trap);
    let f = all_features(&mut g);
    g.init(f);
    // five chains of three descriptors fill the 16-entry table
    for i in 0..5u64 {
        let hdr = HDR + i * 0x40;
        g.header(hdr, req::OUT, i);
        g.submit(0, &[r(hdr, 16), r(DATA, 512), w(STATUS + i, 1)]);
    }
    g.ram_write(STATUS, &[0xff; 5]);
    g.kick(0);
    assert!(until(|| g.ram_read(STATUS, 1) == [0]), "the batch started");
    g.set_status(0);
    // When the reset returns, nothing is in flight: the statuses and the used
    // ring no longer change.
    assert_eq!(g.status(), 0);
    let statuses = g.ram_read(STATUS, 5);
    let used = {
        let mem = g.dma.memory();
        g.drivers[0].used_idx(&mem)
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.ram_read(STATUS, 5), statuses);
    assert!(
        statuses.contains(&0xff),
        "the reset came before the end: {statuses:?}"
    );
    let mem = g.dma.memory();
    assert_eq!(g.drivers[0].used_idx(&mem), used);
    drop(mem);
    assert!(used >= 1);
    // the queue is back at its power-on state
    g.write(common::QUEUE_SELECT, 0, 2);
    assert_eq!(g.read(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(g.read(common::QUEUE_DESC, 8), 0);
    assert_eq!(g.read(common::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn ioeventfds_are_offered_per_queue_and_work() {
    let mut g = Guest::new(2);
    let fds = g.dev.region_io_fds(u32::from(VIRTIO_BAR)).unwrap();
    let offsets: Vec<(u64, u64)> = fds.iter().map(|f| (f.offset, f.size)).collect();
    assert_eq!(offsets, [(NOTIFY_OFFSET, 2), (NOTIFY_OFFSET + 4, 2)]);
    let f = all_features(&mut g);
    g.init(f);
    g.header(HDR, req::FLUSH, 0);
    g.submit(1, &[r(HDR, 16), w(STATUS, 1)]);
    // the client signals the eventfd instead of forwarding the write
    let kick = File::from(fds[1].fd.try_clone().unwrap());
    (&kick).write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(wait_signal(&g.irqs[2]));
    assert_eq!(g.used(1).len(), 1);
}

#[test]
fn poll_mode_takes_kicks_from_the_shared_notify_page() {
    let mut g = Guest::with_backend(
        Arc::new(MemBackend::new(1 << 20, 512).unwrap()),
        2,
        KickMode::Poll,
    );
    let info = g.dev.region_info(u32::from(VIRTIO_BAR)).unwrap();
    let m = info.mmap.expect("notify page is mappable");
    assert_eq!(
        m.areas,
        [MmapArea {
            offset: NOTIFY_OFFSET,
            size: 4096
        }]
    );
    let page = File::from(m.fd.try_clone().unwrap());
    let f = all_features(&mut g);
    g.init(f);
    for round in 0..3u64 {
        g.header(HDR, req::FLUSH, 0);
        g.submit(1, &[r(HDR, 16), w(STATUS + round, 1)]);
        // what the guest's 16-bit write to the mapped page does
        page.write_all_at(&1u16.to_le_bytes(), m.offset + NOTIFY_OFFSET + 4)
            .unwrap();
        assert!(wait_signal(&g.irqs[2]), "round {round}");
        assert_eq!(g.used(1).len(), 1);
    }
    // a trapped write still works in poll mode
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]));
}

#[test]
fn pci_cfg_window_reaches_the_virtio_bar() {
    let mut g = Guest::new(3);
    let (pos, _) = g.virtio_caps()[4];
    // point the window at num_queues (2 bytes at BAR4 + 18)
    g.cfg_write(pos + 4, u32::from(VIRTIO_BAR), 1);
    g.cfg_write(pos + 8, common::NUM_QUEUES as u32, 4);
    g.cfg_write(pos + 12, 2, 4);
    assert_eq!(g.cfg_read(pos + 16, 2), 3);
    // a write through the window: queue_select = 2
    g.cfg_write(pos + 8, common::QUEUE_SELECT as u32, 4);
    g.cfg_write(pos + 16, 2, 2);
    assert_eq!(g.read(common::QUEUE_SELECT, 2), 2);
    assert_eq!(g.cfg_read(pos + 16, 2), 2);
    // a 4-byte window on the device configuration: capacity
    g.cfg_write(pos + 8, DEVICE_OFFSET as u32, 4);
    g.cfg_write(pos + 12, 4, 4);
    assert_eq!(u64::from(g.cfg_read(pos + 16, 4)), (1 << 20) / 512);
    // misaligned or odd lengths are ignored (read as the stored bytes)
    g.cfg_write(pos + 8, common::NUM_QUEUES as u32 + 1, 4);
    g.cfg_write(pos + 12, 2, 4);
    g.cfg_write(pos + 16, 0, 4);
    assert_eq!(g.cfg_read(pos + 16, 2), 0);
    g.cfg_write(pos + 12, 3, 4);
    g.cfg_write(pos + 16, 0x77, 1);
    assert_eq!(g.cfg_read(pos + 16, 1), 0x77);
}

#[test]
fn function_level_reset_resets_the_transport() {
    let mut g = Guest::new(1);
    let f = all_features(&mut g);
    g.init(f);
    assert_ne!(g.status(), 0);
    g.dev.reset().unwrap();
    assert_eq!(g.status(), 0);
    assert_eq!(g.read(common::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    // and the device works again after a new probe
    g.init(f);
    g.header(HDR, req::FLUSH, 0);
    g.submit(0, &[r(HDR, 16), w(STATUS, 1)]);
    g.kick(0);
    assert!(wait_signal(&g.irqs[1]));
}

#[test]
fn accesses_of_odd_sizes_do_not_panic() {
    let mut g = Guest::new(1);
    for off in [
        0u64, 1, 3, 0x37, 0x38, 0xfff, 0x1000, 0x1fff, 0x2000, 0x2fff, 0x3000, 0x3ffd,
    ] {
        for len in [1usize, 2, 3, 4, 8] {
            let mut b = vec![0u8; len];
            let end = off + len as u64;
            let r = g.dev.region_read(u32::from(VIRTIO_BAR), off, &mut b);
            assert_eq!(r.is_ok(), end <= VIRTIO_BAR_SIZE, "read {off:#x}+{len}");
            let r = g.dev.region_write(u32::from(VIRTIO_BAR), off, &b);
            assert_eq!(r.is_ok(), end <= VIRTIO_BAR_SIZE, "write {off:#x}+{len}");
        }
    }
}
