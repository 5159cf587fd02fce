//! `vdevd nvme` from outside: the quick start (no image file) serves a
//! controller that a host driver can find, enable and query, with its
//! doorbells either trapped or in the page the client maps.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use vdevd_devices::nvme::{CLASS_CODE, VENDOR_ID};
use vdevd_protocol::RegionCap;
use vdevd_tests::sample::{BAR0, config_read, enable_bus_master, enable_msix, wait_irq};
use vdevd_tests::{Client, EventFd, ServerProcess, SharedMemory};

use crate::common::{EVENT_TIMEOUT, ready, vdevd};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 1 << 20;
// Offsets in RAM: admin SQ, admin CQ, Identify buffer.
const ASQ: u64 = 0;
const ACQ: u64 = 0x1000;
const DATA: u64 = 0x2000;
// BAR0 registers (NVMe 1.4, 3.1).
const CAP: u64 = 0x00;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ_REG: u64 = 0x28;
const ACQ_REG: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

fn start(args: &[&str]) -> ServerProcess {
    ServerProcess::start(vdevd(), "nvme", args, "debug")
        .unwrap_or_else(|e| panic!("cannot start vdevd nvme {args:?}: {e}"))
}

/// A client with RAM mapped, bus mastering and MSI-X on, and the
/// controller enabled with a 16-entry admin queue pair.
fn enabled(s: &ServerProcess) -> (Client, SharedMemory, Vec<EventFd>) {
    let mut c = ready(s);
    let mem = SharedMemory::new("nvme-ram", RAM_SIZE).expect("memfd");
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true)
        .expect("DMA_MAP");
    enable_bus_master(&mut c).expect("bus master");
    let irqs = enable_msix(&mut c, 1).expect("MSI-X");
    c.write32(BAR0, AQA, (15 << 16) | 15).expect("AQA");
    c.write64(BAR0, ASQ_REG, RAM + ASQ).expect("ASQ");
    c.write64(BAR0, ACQ_REG, RAM + ACQ).expect("ACQ");
    // EN, 64-byte SQ entries, 16-byte CQ entries, 4 KiB pages, NVM.
    c.write32(BAR0, CC, 1 | (6 << 16) | (4 << 20)).expect("CC");
    let t0 = Instant::now();
    while c.read32(BAR0, CSTS).expect("CSTS") & 3 != 1 {
        assert!(
            t0.elapsed() < EVENT_TIMEOUT,
            "CSTS.RDY never set; log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    (c, mem, irqs)
}

/// Admin command `n` (0-based, so its SQ slot and the new tail): Identify
/// with CNS `cns`; returns (status field, the 4 KiB it returned).
fn identify(
    c: &mut Client,
    mem: &SharedMemory,
    irq: &EventFd,
    n: u64,
    cns: u32,
    nsid: u32,
    ring: &mut dyn FnMut(&mut Client, u32),
) -> (u16, Vec<u8>) {
    let cid = 0x40 + n as u16;
    let mut sqe = [0u8; 64];
    sqe[0] = 0x06;
    sqe[2..4].copy_from_slice(&cid.to_le_bytes());
    sqe[4..8].copy_from_slice(&nsid.to_le_bytes());
    sqe[24..32].copy_from_slice(&(RAM + DATA).to_le_bytes());
    sqe[40..44].copy_from_slice(&cns.to_le_bytes());
    mem.write(ASQ + n * 64, &sqe).expect("write SQE");
    ring(c, n as u32 + 1);
    wait_irq(c, irq, EVENT_TIMEOUT).expect("admin completion interrupt");
    let cqe = mem.read(ACQ + n * 16, 16).expect("read CQE");
    let dw3 = u32::from_le_bytes(cqe[12..16].try_into().expect("4 bytes"));
    assert_eq!(dw3 as u16, cid, "completion for the command sent");
    assert_eq!((dw3 >> 16) & 1, 1, "phase tag of the first pass");
    (
        (dw3 >> 17) as u16,
        mem.read(DATA, 4096).expect("read Identify data"),
    )
}

fn check_identify(
    c: &mut Client,
    mem: &SharedMemory,
    irq: &EventFd,
    ring: &mut dyn FnMut(&mut Client, u32),
) {
    let (status, ctrl) = identify(c, mem, irq, 0, 1, 0, ring);
    assert_eq!(status, 0, "Identify Controller");
    assert_eq!(u16::from_le_bytes([ctrl[0], ctrl[1]]), VENDOR_ID);
    assert!(ctrl[24..64].starts_with(b"vdevd NVMe controller"));
    let (status, ns) = identify(c, mem, irq, 1, 0, 1, ring);
    assert_eq!(status, 0, "Identify Namespace");
    let nsze = u64::from_le_bytes(ns[0..8].try_into().expect("8 bytes"));
    assert_eq!(nsze, (64 << 20) / 512, "--size 64M in 512-byte blocks");
    // A namespace that does not exist: Invalid Namespace or Format (0x0b),
    // with Do Not Retry (bit 14 of the status field).
    let (status, _) = identify(c, mem, irq, 2, 0, 7, ring);
    assert_eq!(status & 0x7ff, 0x0b);
    assert_ne!(status & (1 << 14), 0, "DNR");
}

#[test]
fn quick_start_serves_an_nvme_controller_that_identifies() {
    let s = start(&["--size", "64M"]);
    let mut c = ready(&s);
    let class = sample_config(&mut c, 0x08) >> 8;
    assert_eq!(class, CLASS_CODE);
    let cap = c.read64(BAR0, CAP).expect("CAP");
    assert!(cap & 0xffff >= 1, "MQES");
    assert_ne!(cap & (1 << 37), 0, "CAP.CSS: NVM command set");
    drop(c);
    let (mut c, mem, irqs) = enabled(&s);
    check_identify(&mut c, &mem, &irqs[0], &mut |c, tail| {
        c.write32(BAR0, DOORBELLS, tail)
            .expect("SQ 0 tail doorbell");
    });
}

#[test]
fn mmapped_doorbell_page_reaches_the_controller() {
    let s = start(&["--size", "64M", "--doorbells", "mmap"]);
    let mut c = ready(&s);
    let (info, fd) = c.region_info(BAR0).expect("BAR0 info");
    let area = info
        .caps
        .iter()
        .find_map(|cap| match cap {
            RegionCap::SparseMmap(areas) => areas.first().copied(),
            _ => None,
        })
        .expect("BAR0 reports a sparse-mmap area");
    assert_eq!((area.offset, area.size), (DOORBELLS, 0x1000));
    let fd = fd.expect("BAR0 info comes with the doorbell page's descriptor");
    let page = SharedMemory::map_file(File::from(fd), info.offset + area.offset, area.size)
        .expect("mmap the doorbell page");
    drop(c);
    let (mut c, mem, irqs) = enabled(&s);
    check_identify(&mut c, &mem, &irqs[0], &mut |_, tail| {
        page.write(0, &tail.to_le_bytes())
            .expect("SQ 0 tail in the mapped page");
    });
}

fn sample_config(c: &mut Client, offset: u64) -> u32 {
    config_read(c, offset, 4).expect("config read")
}
