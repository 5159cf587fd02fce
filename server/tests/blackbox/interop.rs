//! The `vfio_user` crate's client (0.1.7, cloud-hypervisor's) against
//! `vdevd sample`: connect, device and region info, map a memfd, program
//! the device's DMA engine, and receive its MSI-X interrupt on an eventfd.
//!
//! That client has no timeouts and ignores error replies (DESIGN.md), so
//! it runs on a thread of its own and the test checks results, not return
//! codes: the data the DMA engine moved and the interrupt it raised.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use vdevd_protocol::vfio::*;
use vdevd_tests::sample::{BAR0, BAR2, CONFIG, DEFAULT_BUFFER_SIZE, pci, regs};
use vdevd_tests::{EventFd, SharedMemory};

use crate::common::{EVENT_TIMEOUT, start};

const RAM: u64 = 0x8000_0000;
const RAM_SIZE: u64 = 1 << 20;

fn read32(c: &mut vfio_user::Client, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b).expect("region_read");
    u32::from_le_bytes(b)
}

fn write32(c: &mut vfio_user::Client, region: u32, offset: u64, v: u32) {
    c.region_write(region, offset, &v.to_le_bytes())
        .expect("region_write");
}

fn write64(c: &mut vfio_user::Client, region: u32, offset: u64, v: u64) {
    c.region_write(region, offset, &v.to_le_bytes())
        .expect("region_write");
}

fn config_u16(c: &mut vfio_user::Client, offset: u64) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(CONFIG, offset, &mut b).expect("config read");
    u16::from_le_bytes(b)
}

fn scenario(socket: &Path) {
    // VERSION, DEVICE_GET_INFO and region info of every region (with the
    // argsz retry for BAR2's sparse-mmap capability) happen in new().
    let mut c = vfio_user::Client::new(socket).expect("connect");
    // The crate reads VFIO_DEVICE_FLAGS_RESET inverted: vdevd offers
    // reset, so it says "not resettable".
    assert!(!c.resettable());
    let bar0 = c.region(BAR0).expect("BAR0");
    assert_eq!(bar0.size, 0x1000);
    assert!(bar0.file_offset.is_none());
    let bar2 = c.region(BAR2).expect("BAR2");
    assert_eq!(bar2.size, 2 * DEFAULT_BUFFER_SIZE);
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(bar2.file_offset.is_some(), "BAR2 came with its memfd");
    assert_eq!(bar2.sparse_areas.len(), 1);
    assert_eq!(
        (bar2.sparse_areas[0].offset, bar2.sparse_areas[0].size),
        (0, DEFAULT_BUFFER_SIZE)
    );
    assert_eq!(c.region(CONFIG).expect("config").size, 4096);
    let msix = c.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).expect("irq info");
    assert_eq!(msix.count, 4);

    // guest RAM: a sealed memfd
    let mem = SharedMemory::new("vfio-user-crate-ram", RAM_SIZE).expect("memfd");
    c.dma_map(0, RAM, RAM_SIZE, mem.as_raw_fd())
        .expect("DMA_MAP");

    // the driver's part: bus mastering, MSI-X with eventfds, the DMA
    // interrupt enabled
    let cmd = config_u16(&mut c, pci::COMMAND as u64);
    let cmd = cmd | pci::COMMAND_MEMORY | pci::COMMAND_MASTER;
    c.region_write(CONFIG, pci::COMMAND as u64, &cmd.to_le_bytes())
        .expect("COMMAND");
    let irqs: Vec<EventFd> = (0..4).map(|_| EventFd::new().expect("eventfd")).collect();
    let raw: Vec<i32> = irqs.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        4,
        &raw,
    )
    .expect("SET_IRQS");
    let mut cap = u64::from(config_u16(&mut c, pci::CAPABILITY_LIST as u64) & 0xfc);
    while cap != 0 && config_u16(&mut c, cap) & 0xff != u16::from(pci::CAP_ID_MSIX) {
        cap = u64::from((config_u16(&mut c, cap) >> 8) & 0xfc);
    }
    assert_ne!(cap, 0, "MSI-X capability");
    let flags = config_u16(&mut c, cap + pci::MSIX_FLAGS as u64) | pci::MSIX_FLAGS_ENABLE;
    c.region_write(CONFIG, cap + pci::MSIX_FLAGS as u64, &flags.to_le_bytes())
        .expect("MSI-X enable");
    write32(&mut c, BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA);

    // RAM -> device buffer
    let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 7 + 1) as u8).collect();
    mem.write(0x300, &data).expect("fill RAM");
    write64(&mut c, BAR0, regs::DMA_SRC, RAM + 0x300);
    write64(&mut c, BAR0, regs::DMA_DST, 0x40);
    write32(&mut c, BAR0, regs::DMA_COUNT, data.len() as u32);
    write32(&mut c, BAR0, regs::DMA_CMD, regs::DMA_CMD_START);
    assert_eq!(
        irqs[1].wait(EVENT_TIMEOUT).expect("eventfd"),
        1,
        "MSI-X vector 1"
    );
    assert_eq!(
        read32(&mut c, BAR0, regs::DMA_STATUS) & 0xff,
        regs::DMA_DONE
    );
    let mut got = vec![0u8; data.len()];
    c.region_read(BAR2, 0x40, &mut got).expect("read buffer");
    assert_eq!(got, data);
    write32(&mut c, BAR0, regs::IRQ_ACK, regs::IRQ_DMA);

    // device buffer -> RAM
    write64(&mut c, BAR0, regs::DMA_SRC, 0x40);
    write64(&mut c, BAR0, regs::DMA_DST, RAM + 0x9_0000);
    write32(
        &mut c,
        BAR0,
        regs::DMA_CMD,
        regs::DMA_CMD_START | regs::DMA_CMD_FROM_DEVICE,
    );
    assert_eq!(
        irqs[1].wait(EVENT_TIMEOUT).expect("eventfd"),
        1,
        "MSI-X vector 1"
    );
    assert_eq!(mem.read(0x9_0000, data.len()).expect("read RAM"), data);
    for i in [0, 2, 3] {
        assert_eq!(irqs[i].take().expect("eventfd"), 0, "vector {i}");
    }

    c.dma_unmap(RAM, RAM_SIZE).expect("DMA_UNMAP");
    c.shutdown().expect("shutdown");
}

#[test]
fn the_vfio_user_crates_client_maps_memory_runs_dma_and_gets_msix() {
    let mut s = start(&[]);
    let socket = s.socket().to_path_buf();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        scenario(&socket);
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().expect("scenario"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // the scenario panicked: show its message
            if let Err(p) = worker.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("the vfio_user client hung; server log:\n{}", s.log())
        }
    }
    assert!(s.is_running());
    assert!(s.stop().expect("stop").success());
}
