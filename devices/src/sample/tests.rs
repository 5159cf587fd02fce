//! The sample device driven through the [`Device`] trait, with memfd-backed
//! client memory, a fake message-backed client and real eventfds.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::regs::*;
use super::*;
use crate::device::{Device, IrqAction, IrqData, IrqSet};
use crate::dma::{DmaError, DmaMessenger, DmaSpace, MapRequest, Prot};
use crate::pci::regs::{
    CAP_ID_EXP, CAP_ID_MSIX, CAPABILITY_LIST, COMMAND, COMMAND_MASTER, COMMAND_MEMORY, EXP_DEVCTL,
    EXP_DEVCTL_BCR_FLR, MSIX_FLAGS, MSIX_FLAGS_ENABLE, STATUS as PCI_STATUS, STATUS_INTERRUPT,
};
use crate::pci::tests::{count, eventfd};
use crate::pci::{CONFIG_REGION, INTX_IRQ, MSIX_IRQ};

const RAM_IOVA: u64 = 0x10_0000;
const RAM_SIZE: u64 = 0x10_0000;
const MSG_IOVA: u64 = 0x4000_0000;
const MSG_SIZE: u64 = 0x2_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name and valid flags; checked below.
    let fd = unsafe { libc::memfd_create(c"sample-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS on our own descriptor with a valid mask.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    f
}

/// A client reached only through messages; it can be made to block on
/// each access until the test releases it.
struct FakeClient {
    mem: Mutex<Vec<u8>>,
    gate: Option<Mutex<mpsc::Receiver<()>>>,
    calls: AtomicUsize,
}

impl FakeClient {
    fn range(&self, iova: u64, len: usize) -> Result<std::ops::Range<usize>, DmaError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.lock()
                .unwrap()
                .recv()
                .map_err(|_| DmaError::Message("gate closed".into()))?;
        }
        let start = iova
            .checked_sub(MSG_IOVA)
            .ok_or(DmaError::Message("below".into()))? as usize;
        Ok(start..start + len)
    }
}

impl DmaMessenger for FakeClient {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let r = self.range(iova, buf.len())?;
        buf.copy_from_slice(&self.mem.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let r = self.range(iova, data.len())?;
        self.mem.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

struct Bed {
    dev: SampleDevice,
    dma: Arc<DmaSpace>,
    ram: File,
}

fn bed_with(config: SampleConfig) -> Bed {
    let dma = Arc::new(DmaSpace::default());
    let ram = memfd(RAM_SIZE);
    dma.map(MapRequest {
        iova: RAM_IOVA,
        size: RAM_SIZE,
        prot: Prot::RW,
        file: Some((ram.try_clone().unwrap(), 0)),
    })
    .unwrap();
    let dev = Sample::create(config, dma.clone()).unwrap();
    Bed { dev, dma, ram }
}

fn bed() -> Bed {
    bed_with(SampleConfig::default())
}

impl Bed {
    fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.region_read(0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.region_read(0, off, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.dev.region_write(0, off, &v.to_le_bytes()).unwrap();
    }

    fn w64(&mut self, off: u64, v: u64) {
        self.dev.region_write(0, off, &v.to_le_bytes()).unwrap();
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

    fn find_cap(&mut self, id: u8) -> usize {
        let mut pos = self.cfg_read(CAPABILITY_LIST, 1) as usize;
        while pos != 0 {
            if self.cfg_read(pos, 1) as u8 == id {
                return pos;
            }
            pos = self.cfg_read(pos + 1, 1) as usize;
        }
        panic!("no capability {id:#x}");
    }

    fn bus_master(&mut self) {
        self.cfg_write(COMMAND, u32::from(COMMAND_MEMORY | COMMAND_MASTER), 2);
    }

    /// Wire eventfds to every MSI-X vector and enable MSI-X.
    fn msix(&mut self) -> Vec<File> {
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
        let x = self.find_cap(CAP_ID_MSIX);
        self.cfg_write(x + MSIX_FLAGS, u32::from(MSIX_FLAGS_ENABLE), 2);
        files
    }

    fn dma_state(&mut self) -> (u32, u32) {
        let s = self.r32(DMA_STATUS);
        (s & 0xff, (s >> 8) & 0xff)
    }

    fn wait_dma(&mut self) -> (u32, u32) {
        let t0 = Instant::now();
        loop {
            let s = self.dma_state();
            if s.0 != DMA_BUSY {
                return s;
            }
            assert!(t0.elapsed() < TIMEOUT, "DMA did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn dma(&mut self, src: u64, dst: u64, count: u32, from_device: bool) -> (u32, u32) {
        self.w64(DMA_SRC, src);
        self.w64(DMA_DST, dst);
        self.w32(DMA_COUNT, count);
        let dir = if from_device { DMA_CMD_FROM_DEVICE } else { 0 };
        self.w32(DMA_CMD, DMA_CMD_START | dir);
        self.wait_dma()
    }

    fn buffer(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.dev.region_read(2, off, &mut b).unwrap();
        b
    }
}

/// Wait until an eventfd has been signalled; its count.
fn wait_signal(f: &File) -> u64 {
    let t0 = Instant::now();
    loop {
        let n = count(f);
        if n != 0 {
            return n;
        }
        assert!(t0.elapsed() < TIMEOUT, "interrupt not signalled");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn identity_and_liveness() {
    let mut b = bed();
    assert_eq!(b.cfg_read(0, 4), 0x5344_1234);
    assert_eq!(b.cfg_read(0x08, 4) >> 8, 0xff_00_00, "class");
    assert_eq!(b.cfg_read(0x2c, 4), 0x0001_1234, "subsystem");
    assert_eq!(b.r32(ID), ID_VALUE);
    assert_eq!(b.r32(LIVENESS), u32::MAX);
    b.w32(LIVENESS, 0x1234_5678);
    assert_eq!(b.r32(LIVENESS), !0x1234_5678);
    assert_eq!(b.r32(BUFFER_SIZE), 64 << 10);
    // read-only registers ignore writes
    b.w32(ID, 0);
    b.w32(BUFFER_SIZE, 0);
    assert_eq!((b.r32(ID), b.r32(BUFFER_SIZE)), (ID_VALUE, 64 << 10));
    // reads of any size/alignment; writes of odd sizes are ignored
    let mut two = [0u8; 2];
    b.dev.region_read(0, 1, &mut two).unwrap();
    assert_eq!(two, [0x01, 0x44]);
    b.dev.region_write(0, LIVENESS, &[1, 2]).unwrap();
    b.dev.region_write(0, LIVENESS + 1, &[1, 2, 3, 4]).unwrap();
    assert_eq!(b.r32(LIVENESS), !0x1234_5678);
    // past the register file: zero
    assert_eq!(b.r32(0x400), 0);
}

#[test]
fn regions_mmap_and_ioeventfd() {
    let b = bed_with(SampleConfig {
        msix_vectors: 8,
        buffer_size: 1 << 20,
    });
    let mut d = b.dev;
    let r0 = d.region_info(0).unwrap();
    assert_eq!((r0.size, r0.mmap.is_none()), (0x1000, true));
    let r2 = d.region_info(2).unwrap();
    assert_eq!(r2.size, 2 << 20);
    let m = r2.mmap.unwrap();
    assert_eq!(m.areas.len(), 1);
    assert_eq!((m.areas[0].offset, m.areas[0].size), (0, 1 << 20));
    assert_eq!(d.region_info(4).unwrap().size, 0);
    assert_eq!(d.irq_info(MSIX_IRQ).unwrap().count, 8);
    let io = d.region_io_fds(2).unwrap();
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].offset, io[0].size), (1 << 20, 4));
    assert!(d.region_io_fds(0).unwrap().is_empty());
    // the buffer the client maps is the buffer the device uses
    let f = File::from(m.fd.try_clone().unwrap());
    f.write_all_at(b"via the mapping", 0x100).unwrap();
    let mut got = [0u8; 15];
    d.region_read(2, 0x100, &mut got).unwrap();
    assert_eq!(&got, b"via the mapping");
    d.region_write(2, 0x200, b"trapped").unwrap();
    let mut got = [0u8; 7];
    f.read_exact_at(&mut got, 0x200).unwrap();
    assert_eq!(&got, b"trapped");
    // the sealed buffer cannot be shrunk by the client
    assert!(f.set_len(0).is_err());
}

#[test]
fn compute_with_and_without_interrupt() {
    let mut b = bed();
    let fds = b.msix();
    b.w32(IRQ_ENABLE, IRQ_ALL);
    b.w32(FACT_INPUT, 10);
    assert_eq!(wait_signal(&fds[0]), 1);
    assert_eq!(b.r32(STATUS) & STATUS_COMPUTE_BUSY, 0);
    assert_eq!(b.r64(FACT_RESULT), 3_628_800);
    assert_eq!(b.r32(FACT_INPUT), 10);
    assert_eq!(b.r32(IRQ_STATUS), IRQ_COMPUTE);
    b.w32(IRQ_ACK, IRQ_COMPUTE);
    assert_eq!(b.r32(IRQ_STATUS), 0);
    // without the enable bit: latched, not signalled
    b.w32(IRQ_ENABLE, 0);
    b.w32(FACT_INPUT, 20);
    let t0 = Instant::now();
    while b.r32(STATUS) & STATUS_COMPUTE_BUSY != 0 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.r64(FACT_RESULT), 2_432_902_008_176_640_000);
    assert_eq!(b.r32(IRQ_STATUS), IRQ_COMPUTE);
    assert_eq!(count(&fds[0]), 0);
    // enabling a latched cause interrupts at once
    b.w32(IRQ_ENABLE, IRQ_COMPUTE);
    assert_eq!(count(&fds[0]), 1);
    // software cause on vector 2
    b.w32(IRQ_ENABLE, IRQ_ALL);
    b.w32(IRQ_RAISE, IRQ_SOFTWARE | 0xff00);
    assert_eq!(count(&fds[2]), 1);
    assert_eq!(b.r32(IRQ_STATUS), IRQ_COMPUTE | IRQ_SOFTWARE);
}

#[test]
fn interrupts_fall_back_to_intx() {
    let mut b = bed();
    let (fd, file) = eventfd();
    b.dev
        .set_irqs(IrqSet {
            index: INTX_IRQ,
            start: 0,
            count: 1,
            action: IrqAction::Trigger,
            data: IrqData::Eventfds(vec![Some(fd)]),
        })
        .unwrap();
    let unmask = |d: &mut SampleDevice| {
        d.set_irqs(IrqSet {
            index: INTX_IRQ,
            start: 0,
            count: 1,
            action: IrqAction::Unmask,
            data: IrqData::None,
        })
        .unwrap()
    };
    b.w32(IRQ_ENABLE, IRQ_SOFTWARE);
    b.w32(IRQ_RAISE, IRQ_SOFTWARE);
    assert_eq!(count(&file), 1);
    assert_ne!(b.cfg_read(PCI_STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    // the guest acknowledges, the client unmasks: nothing more
    b.w32(IRQ_ACK, IRQ_SOFTWARE);
    assert_eq!(b.cfg_read(PCI_STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
    unmask(&mut b.dev);
    assert_eq!(count(&file), 0);
    // a factorial completion arrives on INTx too
    b.w32(IRQ_ENABLE, IRQ_COMPUTE);
    b.w32(FACT_INPUT, 3);
    assert_eq!(wait_signal(&file), 1);
    assert_eq!(b.r64(FACT_RESULT), 6);
}

#[test]
fn dma_both_ways_with_msix() {
    let mut b = bed_with(SampleConfig {
        msix_vectors: 4,
        buffer_size: 256 << 10,
    });
    let fds = b.msix();
    b.bus_master();
    b.w32(IRQ_ENABLE, IRQ_DMA);
    // more than one chunk, unaligned
    let len = 150_001usize;
    let data = pattern(len, 7);
    b.ram.write_all_at(&data, 0x1003).unwrap();
    assert_eq!(
        b.dma(RAM_IOVA + 0x1003, 0x10, len as u32, false),
        (DMA_DONE, 0)
    );
    assert_eq!(wait_signal(&fds[1]), 1);
    assert_eq!(b.buffer(0x10, len), data);
    assert_eq!(b.r32(IRQ_STATUS), IRQ_DMA);
    b.w32(IRQ_ACK, IRQ_DMA);
    // back out to another place in client memory
    assert_eq!(
        b.dma(0x10, RAM_IOVA + 0x8_0000, len as u32, true),
        (DMA_DONE, 0)
    );
    assert_eq!(wait_signal(&fds[1]), 1);
    let mut out = vec![0u8; len];
    b.ram.read_exact_at(&mut out, 0x8_0000).unwrap();
    assert_eq!(out, data);
    // a zero-length transfer completes
    assert_eq!(b.dma(0, RAM_IOVA, 0, true), (DMA_DONE, 0));
    assert_eq!(
        b.r32(DMA_CMD),
        DMA_CMD_FROM_DEVICE,
        "START clears when done"
    );
}

#[test]
fn dma_errors_set_status_and_interrupt() {
    let mut b = bed();
    let fds = b.msix();
    b.w32(IRQ_ENABLE, IRQ_DMA);
    // bus mastering off
    assert_eq!(
        b.dma(RAM_IOVA, 0, 16, false),
        (DMA_ERROR, DMA_ERR_NO_BUS_MASTER)
    );
    assert_eq!(wait_signal(&fds[1]), 1);
    b.bus_master();
    // unmapped client address, both ways
    assert_eq!(b.dma(0x10, 0, 16, false), (DMA_ERROR, DMA_ERR_UNMAPPED));
    assert_eq!(
        b.dma(0, RAM_IOVA + RAM_SIZE - 8, 16, true),
        (DMA_ERROR, DMA_ERR_UNMAPPED)
    );
    assert_eq!(
        b.dma(u64::MAX - 4, 0, 16, false),
        (DMA_ERROR, DMA_ERR_UNMAPPED)
    );
    // beyond the buffer
    assert_eq!(
        b.dma(RAM_IOVA, 0xfff0, 0x20, false),
        (DMA_ERROR, DMA_ERR_RANGE)
    );
    assert_eq!(
        b.dma(u64::MAX, RAM_IOVA, 1, true),
        (DMA_ERROR, DMA_ERR_RANGE)
    );
    assert_eq!(
        b.dma(RAM_IOVA, 0, u32::MAX, false),
        (DMA_ERROR, DMA_ERR_RANGE)
    );
    // a read-only mapping refuses device writes
    let ro = memfd(0x1000);
    b.dma
        .map(MapRequest {
            iova: 0x9000_0000,
            size: 0x1000,
            prot: Prot::RO,
            file: Some((ro, 0)),
        })
        .unwrap();
    assert_eq!(b.dma(0, 0x9000_0000, 16, true), (DMA_ERROR, DMA_ERR_ACCESS));
    assert_eq!(b.dma(0x9000_0000, 0, 16, false), (DMA_DONE, 0));
    assert!(count(&fds[1]) >= 1);
    // the device keeps working
    b.ram.write_all_at(b"still fine", 0).unwrap();
    assert_eq!(b.dma(RAM_IOVA, 0, 10, false), (DMA_DONE, 0));
    assert_eq!(b.buffer(0, 10), b"still fine");
}

fn message_bed(gated: bool) -> (Bed, Arc<FakeClient>, Option<mpsc::Sender<()>>) {
    let b = bed_with(SampleConfig {
        msix_vectors: 4,
        buffer_size: 256 << 10,
    });
    let (tx, rx) = mpsc::channel();
    let client = Arc::new(FakeClient {
        mem: Mutex::new(pattern(MSG_SIZE as usize, 3)),
        gate: gated.then(|| Mutex::new(rx)),
        calls: AtomicUsize::new(0),
    });
    // This test thread plays the session thread: DMA from it would be
    // refused, so the transfers below prove the worker does them.
    b.dma
        .set_messenger(Some(client.clone()), Some(std::thread::current().id()));
    b.dma
        .map(MapRequest {
            iova: MSG_IOVA,
            size: MSG_SIZE,
            prot: Prot::RW,
            file: None,
        })
        .unwrap();
    (b, client, gated.then_some(tx))
}

#[test]
fn message_backed_dma_runs_on_the_worker() {
    let (mut b, client, _) = message_bed(false);
    b.bus_master();
    let len = 0x1_8000usize;
    assert_eq!(b.dma(MSG_IOVA + 0x100, 0, len as u32, false), (DMA_DONE, 0));
    let expect = client.mem.lock().unwrap()[0x100..0x100 + len].to_vec();
    assert_eq!(b.buffer(0, len), expect);
    assert_eq!(b.dma(0, MSG_IOVA + 0x1_0000, 0x1000, true), (DMA_DONE, 0));
    assert_eq!(
        client.mem.lock().unwrap()[0x1_0000..0x1_1000],
        expect[..0x1000]
    );
    assert_eq!(
        client.calls.load(Ordering::SeqCst),
        3,
        "two chunks in, one out"
    );
}

#[test]
fn doorbell_through_ioeventfd_and_trapped_write() {
    let mut b = bed();
    b.bus_master();
    b.ram.write_all_at(b"doorbell data", 0x40).unwrap();
    b.w64(DMA_SRC, RAM_IOVA + 0x40);
    b.w64(DMA_DST, 0x800);
    b.w32(DMA_COUNT, 13);
    b.w32(DMA_CMD, 0); // direction only
    assert_eq!(b.dma_state(), (DMA_IDLE, 0));
    // what KVM does when the guest writes the doorbell: signal the fd
    let io = b.dev.region_io_fds(2).unwrap().remove(0);
    let mut ring = File::from(io.fd.try_clone().unwrap());
    ring.write_all(&1u64.to_ne_bytes()).unwrap();
    // the worker sees the ring asynchronously, as a device would
    let t0 = Instant::now();
    while b.r32(DOORBELL_COUNT) != 1 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.wait_dma(), (DMA_DONE, 0));
    assert_eq!(b.buffer(0x800, 13), b"doorbell data");
    assert_eq!(b.r32(DOORBELL_COUNT), 1);
    // the same register reached through a trapped write
    b.ram.write_all_at(b"second", 0x40).unwrap();
    b.dev
        .region_write(2, regs::doorbell(64 << 10), &1u32.to_le_bytes())
        .unwrap();
    let t0 = Instant::now();
    while b.r32(DOORBELL_COUNT) != 2 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.wait_dma(), (DMA_DONE, 0));
    assert_eq!(b.buffer(0x800, 6), b"second");
    // the rest of the trapped page reads zero and ignores writes
    b.dev
        .region_write(2, regs::doorbell(64 << 10) + 8, &[1; 4])
        .unwrap();
    assert_eq!(b.buffer(regs::doorbell(64 << 10), 16), vec![0; 16]);
}

#[test]
fn busy_registers_and_stop_without_waiting_for_the_client() {
    let (mut b, client, gate) = message_bed(true);
    let gate = gate.unwrap();
    let fds = b.msix();
    b.bus_master();
    b.w32(IRQ_ENABLE, IRQ_DMA);
    b.w64(DMA_SRC, MSG_IOVA);
    b.w64(DMA_DST, 0);
    b.w32(DMA_COUNT, 0x1_8000); // two chunks
    b.w32(DMA_CMD, DMA_CMD_START);
    // the worker is now waiting for the client
    let t0 = Instant::now();
    while client.calls.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.dma_state(), (DMA_BUSY, 0));
    assert_ne!(b.r32(STATUS) & STATUS_DMA_BUSY, 0);
    assert_eq!(b.r32(DMA_CMD) & DMA_CMD_START, DMA_CMD_START);
    // registers are locked while busy
    b.w32(DMA_COUNT, 1);
    b.w64(DMA_SRC, 0);
    assert_eq!((b.r32(DMA_COUNT), b.r64(DMA_SRC)), (0x1_8000, MSG_IOVA));
    // stop returns at once although the client has not answered
    let t0 = Instant::now();
    b.dev.migration().unwrap().stop().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    let before = b.buffer(0, 0x1_0000);
    // the client answers; the stopped device must not change
    gate.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        b.buffer(0, 0x1_0000),
        before,
        "buffer changed while stopped"
    );
    assert_eq!(b.dma_state(), (DMA_BUSY, 0));
    assert_eq!(count(&fds[1]), 0, "interrupt while stopped");
    // run: the interrupted chunk is redone, the rest follows
    for _ in 0..2 {
        gate.send(()).unwrap();
    }
    b.dev.migration().unwrap().run().unwrap();
    assert_eq!(b.wait_dma(), (DMA_DONE, 0));
    assert_eq!(wait_signal(&fds[1]), 1);
    let expect = client.mem.lock().unwrap()[..0x1_0000].to_vec();
    assert_eq!(b.buffer(0, 0x1_0000), expect);
    assert_eq!(client.calls.load(Ordering::SeqCst), 3);
}

#[test]
fn reset_and_flr_clear_state() {
    for flr in [false, true] {
        let mut b = bed();
        b.bus_master();
        b.w32(LIVENESS, 5);
        b.w32(IRQ_ENABLE, IRQ_ALL);
        b.w32(IRQ_RAISE, IRQ_SOFTWARE);
        b.w64(DMA_SRC, 0x1234);
        b.dev.region_write(2, 0, b"old contents").unwrap();
        b.w32(FACT_INPUT, 5);
        b.wait_dma();
        if flr {
            let e = b.find_cap(CAP_ID_EXP);
            b.cfg_write(e + EXP_DEVCTL, u32::from(EXP_DEVCTL_BCR_FLR), 2);
        } else {
            b.dev.reset().unwrap();
        }
        assert_eq!(b.r32(LIVENESS), u32::MAX);
        assert_eq!((b.r32(IRQ_ENABLE), b.r32(IRQ_STATUS)), (0, 0));
        assert_eq!(b.r64(DMA_SRC), 0);
        assert_eq!(b.buffer(0, 12), vec![0; 12]);
        assert_eq!(b.cfg_read(COMMAND, 2), 0);
        assert_eq!(b.cfg_read(PCI_STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
        // a factorial still running at reset never lands
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!((b.r64(FACT_RESULT), b.r32(STATUS)), (0, 0));
        // bus mastering went off with the reset
        assert_eq!(
            b.dma(RAM_IOVA, 0, 4, false),
            (DMA_ERROR, DMA_ERR_NO_BUS_MASTER)
        );
    }
}

fn stop(b: &mut Bed) {
    b.dev.migration().unwrap().stop().unwrap();
}

fn bar0(b: &mut Bed) -> Vec<u8> {
    let mut v = vec![0u8; REGS_SIZE as usize];
    b.dev.region_read(0, 0, &mut v).unwrap();
    v
}

#[test]
fn migration_round_trip() {
    let mut src = bed();
    src.bus_master();
    src.w32(LIVENESS, 0xabcd);
    src.w32(IRQ_ENABLE, IRQ_COMPUTE);
    src.w32(FACT_INPUT, 12);
    let t0 = Instant::now();
    while src.r32(STATUS) != 0 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    src.w64(DMA_DST, 0x77);
    let data = pattern(64 << 10, 9);
    src.dev.region_write(2, 0, &data).unwrap();
    stop(&mut src);
    let state = src.dev.migration().unwrap().save().unwrap();
    let regs = bar0(&mut src);

    let mut dst = bed();
    let fds = dst.msix();
    stop(&mut dst);
    dst.dev.migration().unwrap().load(&state).unwrap();
    dst.dev.migration().unwrap().run().unwrap();
    assert_eq!(bar0(&mut dst), regs);
    assert_eq!(dst.r64(FACT_RESULT), 479_001_600);
    assert_eq!(dst.buffer(0, 64 << 10), data);
    // the source's config space came along (MSI-X off there): INTx level
    // and no spurious MSI-X signal on the destination
    assert!(fds.iter().all(|f| count(f) == 0));
    assert_ne!(dst.cfg_read(PCI_STATUS, 2) as u16 & STATUS_INTERRUPT, 0);
}

#[test]
fn migration_resumes_a_pending_transfer() {
    let mut src = bed();
    src.bus_master();
    let data = pattern(0x3000, 1);
    src.dev.region_write(2, 0x1000, &data).unwrap();
    stop(&mut src);
    // started while stopped: accepted, but nothing runs
    src.w64(DMA_SRC, 0x1000);
    src.w64(DMA_DST, RAM_IOVA + 0x2000);
    src.w32(DMA_COUNT, 0x3000);
    src.w32(DMA_CMD, DMA_CMD_START | DMA_CMD_FROM_DEVICE);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(src.dma_state(), (DMA_BUSY, 0));
    let state = src.dev.migration().unwrap().save().unwrap();
    drop(src);

    let mut dst = bed();
    stop(&mut dst);
    dst.dev.migration().unwrap().load(&state).unwrap();
    dst.dev.migration().unwrap().run().unwrap();
    assert_eq!(dst.wait_dma(), (DMA_DONE, 0));
    let mut out = vec![0u8; 0x3000];
    dst.ram.read_exact_at(&mut out, 0x2000).unwrap();
    assert_eq!(out, data);
}

#[test]
fn migration_refuses_bad_state() {
    let mut src = bed();
    src.w32(LIVENESS, 1);
    // saving a running device is refused
    assert!(matches!(
        src.dev.migration().unwrap().save(),
        Err(Error::BadState(_))
    ));
    stop(&mut src);
    let state = src.dev.migration().unwrap().save().unwrap();
    // the function's blob is at the end: fields, then the buffer
    let f = state.len() - (86 + (64 << 10));
    assert_eq!(&state[f..f + 8], b"VDSAMPLE");

    let mut dst = bed();
    assert!(matches!(
        dst.dev.migration().unwrap().load(&state),
        Err(Error::BadState(_))
    ));
    stop(&mut dst);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut edit = |what: &'static str, at: usize, v: u8| {
        let mut s = state.clone();
        s[at] = v;
        cases.push((what, s));
    };
    edit("magic", f, b'X');
    edit("version", f + 8, 2);
    edit("buffer size", f + 12, 1);
    edit("compute busy", f + 36, 2);
    edit("irq status", f + 38, 1);
    edit("dma state", f + 66, 9);
    edit("dma error without error state", f + 70, 1);
    edit("progress without a transfer", f + 74, 1);
    cases.push(("truncated", state[..state.len() - 1].to_vec()));
    for (what, s) in cases {
        assert!(
            matches!(
                dst.dev.migration().unwrap().load(&s),
                Err(Error::InvalidArgument(_))
            ),
            "{what} accepted"
        );
        assert_eq!(dst.r32(LIVENESS), u32::MAX, "{what} changed the device");
    }
    // a device with another buffer size refuses too (its BAR2 differs)
    let mut other = bed_with(SampleConfig {
        msix_vectors: 4,
        buffer_size: 128 << 10,
    });
    stop(&mut other);
    assert!(other.dev.migration().unwrap().load(&state).is_err());
    dst.dev.migration().unwrap().load(&state).unwrap();
    assert_eq!(dst.r32(LIVENESS), !1);
}

#[test]
fn config_is_validated() {
    let dma = Arc::new(DmaSpace::default());
    for bad in [
        SampleConfig {
            msix_vectors: 0,
            ..SampleConfig::default()
        },
        SampleConfig {
            msix_vectors: 65,
            ..SampleConfig::default()
        },
        SampleConfig {
            buffer_size: 1000,
            ..SampleConfig::default()
        },
        SampleConfig {
            buffer_size: 2048,
            ..SampleConfig::default()
        },
        SampleConfig {
            buffer_size: 128 << 20,
            ..SampleConfig::default()
        },
    ] {
        assert!(
            matches!(
                Sample::create(bad, dma.clone()),
                Err(Error::InvalidArgument(_))
            ),
            "{bad:?}"
        );
    }
    let dev: Box<dyn Device> = Box::new(Sample::create(SampleConfig::default(), dma).unwrap());
    assert_eq!(dev.name(), "sample");
    // dropping the device stops its worker promptly
    let t0 = Instant::now();
    drop(dev);
    assert!(t0.elapsed() < Duration::from_secs(1));
}
