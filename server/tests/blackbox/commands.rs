//! Every command's happy path against `vdevd sample`, observed the way a
//! VMM and its guest would observe it.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use vdevd_protocol::vfio::*;
use vdevd_protocol::{self as proto, Command, MigState, RegionCap, Request, SparseArea};
use vdevd_tests::sample::{
    self, BAR0, BAR2, DEFAULT_BUFFER_SIZE, enable_bus_master, enable_msix, regs,
};
use vdevd_tests::{Client, EventFd, Proposal, ServerProcess, SharedMemory};

use crate::common::{EVENT_TIMEOUT, ready, start};

/// Where the tests map client memory.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 1 << 20;
/// Where they map message-backed memory.
const MSG: u64 = 0x4000_0000;
const MSG_SIZE: u64 = 0x2_0000;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A negotiated client with bus mastering on, MSI-X armed with four
/// eventfds and the DMA-finished interrupt enabled.
fn dma_ready(s: &ServerProcess) -> (Client, Vec<EventFd>) {
    let mut c = ready(s);
    enable_bus_master(&mut c).expect("bus master");
    let irqs = enable_msix(&mut c, 4).expect("MSI-X");
    c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA)
        .expect("IRQ_ENABLE");
    (c, irqs)
}

/// Run one DMA transfer to completion: its interrupt (vector 1) arrives
/// while the client answers the server's DMA requests. Returns
/// (state, error code) from DMA_STATUS.
fn run_dma(
    c: &mut Client,
    irqs: &[EventFd],
    src: u64,
    dst: u64,
    count: u32,
    from_device: bool,
) -> (u32, u32) {
    sample::start_dma(c, src, dst, count, from_device).expect("start DMA");
    let n = sample::wait_irq(c, &irqs[1], EVENT_TIMEOUT).expect("DMA interrupt");
    assert!(n >= 1);
    c.write32(BAR0, regs::IRQ_ACK, regs::IRQ_DMA).expect("ack");
    sample::dma_status(c).expect("DMA_STATUS")
}

fn open_fds_named(s: &ServerProcess, link: &str) -> usize {
    s.fds()
        .expect("server fds")
        .iter()
        .filter(|(_, l)| l == link)
        .count()
}

#[test]
fn version_negotiates_the_offered_capabilities() {
    let s = start(&[]);
    // QEMU's proposal, and the reply it can take: QEMU receives the reply
    // into its request's buffer, so it must not be longer.
    let mut c = s.connect().unwrap();
    let sent = Proposal::qemu().body();
    let m = c.call_raw(Command::Version.into(), &sent, &[]).unwrap();
    assert!(
        m.body.len() <= sent.len(),
        "{} > {}",
        m.body.len(),
        sent.len()
    );
    assert_eq!(m.body.last(), Some(&0), "JSON is NUL-terminated");
    let v = proto::Version::parse(&m.body).unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
    let caps = v.capabilities;
    assert_eq!(caps.max_msg_fds, 16);
    assert_eq!(caps.max_data_xfer_size, 1 << 20);
    assert_eq!(caps.pgsizes, 4096);
    assert_eq!(caps.max_dma_maps, 65535);
    assert!(caps.write_multiple);
    assert_eq!(
        caps.migration,
        Some(proto::MigrationCaps {
            pgsize: 4096,
            max_bitmap_size: 256 << 20
        })
    );
    assert_eq!(caps.twin_socket, None);
    assert!(caps.unknown_keys.is_empty(), "{:?}", caps.unknown_keys);
    drop(c);

    // A bare proposal: no REGION_WRITE_MULTI, no migration capability.
    let mut c = s.connect().unwrap();
    let v = c.negotiate(&Proposal::json("{}")).unwrap();
    assert!(!v.capabilities.write_multiple);
    assert_eq!(v.capabilities.migration, None);
    assert_eq!(v.capabilities.max_msg_fds, 16);
    drop(c);

    // No JSON at all, a later minor version, the vfio_user crate's
    // proposal, unknown keys: all accepted, the answer is always 0.0.
    for p in [
        Proposal::raw(0, 0, b""),
        Proposal::raw(0, 7, b"{}\0"),
        Proposal::raw(
            0,
            1,
            b"{\"capabilities\":{\"max_msg_fds\":1,\"max_data_xfer_size\":1048576,\
              \"migration\":{\"pgsize\":4096}}}\0",
        ),
        Proposal::json("{\"capabilities\":{\"shiny\":[1,2],\"max_msg_fds\":4},\"extra\":null}"),
    ] {
        let mut c = s.connect().unwrap();
        let v = c.negotiate(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!((v.major, v.minor), (0, 0), "{p:?}");
        assert_eq!(c.read32(BAR0, regs::ID).unwrap(), sample::ID_VALUE);
    }
}

#[test]
fn version_reflects_the_server_options() {
    let s = start(&[
        "--max-msg-fds",
        "4",
        "--max-data-xfer-size",
        "65536",
        "--max-dma-maps",
        "100",
        "--pgsizes",
        "0x201000",
    ]);
    let mut c = s.connect().unwrap();
    let v = c.version().unwrap();
    let caps = &v.capabilities;
    assert_eq!(caps.max_msg_fds, 4);
    assert_eq!(caps.max_data_xfer_size, 65536);
    assert_eq!(caps.max_dma_maps, 100);
    // the page sizes both sides support
    assert_eq!(caps.pgsizes, 0x1000);
    // the negotiated limits hold
    assert_eq!(c.region_read(BAR2, 0, 65536).unwrap().len(), 65536);
    let e = c.region_read(BAR2, 0, 65537).unwrap_err();
    assert_eq!(e.errno(), Some(libc::E2BIG as u32));
    drop(c);
    let mut c = s.connect().unwrap();
    let v = c
        .negotiate(&Proposal::json(
            "{\"capabilities\":{\"pgsizes\":2101248}}", // 0x201000
        ))
        .unwrap();
    assert_eq!(v.capabilities.pgsizes, 0x201000);
}

#[test]
fn device_info() {
    let s = start(&[]);
    let mut c = ready(&s);
    let info = c.device_info().unwrap();
    assert_eq!(
        info,
        proto::DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: 9,
            num_irqs: 5,
        }
    );
    // argsz 32, as the vfio_user crate sends it
    let m = c
        .call(
            &Request::DeviceGetInfo(proto::DeviceInfoRequest { argsz: 32 }),
            &[],
        )
        .unwrap();
    assert_eq!(proto::DeviceInfo::parse(&m.body).unwrap(), info);
}

#[test]
fn region_info_of_every_region_and_the_bar2_mapping() {
    let s = start(&[]);
    let mut c = ready(&s);
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let buffer = DEFAULT_BUFFER_SIZE;
    // (index, size, flags)
    let expected = [
        (0, 0x1000, rw),
        (1, 0, 0),
        (2, 2 * buffer, rw | VFIO_REGION_INFO_FLAG_MMAP),
        (3, 0, 0),
        (4, 0, 0),
        (5, 0, 0),
        (6, 0, 0),
        (7, 4096, rw),
        (8, 0, 0),
    ];
    let mut bar2_fd = None;
    for (index, size, flags) in expected {
        let (info, fd) = c.region_info(index).unwrap();
        assert_eq!(
            (info.index, info.size, info.flags),
            (index, size, flags),
            "region {index}"
        );
        if index == 2 {
            assert_eq!(
                info.caps,
                vec![RegionCap::SparseMmap(vec![SparseArea {
                    offset: 0,
                    size: buffer
                }])]
            );
            assert!(fd.is_some(), "BAR2 comes with its memfd");
            bar2_fd = fd.map(|f| (f, info.offset));
        } else {
            assert!(info.caps.is_empty(), "region {index}: {:?}", info.caps);
            assert!(fd.is_none(), "region {index} has no descriptor");
        }
    }
    // QEMU's first try (argsz 32) gets the fixed part only, no CAPS flag,
    // the size needed, and no descriptor
    let m = c
        .call(
            &Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
                argsz: 32,
                index: 2,
            }),
            &[],
        )
        .unwrap();
    assert_eq!(m.body.len(), 32);
    assert!(m.fds.is_empty());
    let r = proto::RegionInfo::parse(&m.body).unwrap();
    assert_eq!(r.needed(), Some(32 + 8 + 8 + 16));
    assert_eq!(r.info.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);

    // The mapping is the device buffer, both ways.
    let (fd, offset) = bar2_fd.unwrap();
    let file = File::from(fd);
    assert!(file.set_len(0).is_err(), "the buffer is sealed");
    let map = SharedMemory::map_file(file, offset, buffer).unwrap();
    c.region_write(BAR2, 0x100, b"trapped write").unwrap();
    assert_eq!(map.read(0x100, 13).unwrap(), b"trapped write");
    map.write(0x2000, b"through the mapping").unwrap();
    assert_eq!(
        c.region_read(BAR2, 0x2000, 19).unwrap(),
        b"through the mapping"
    );
}

#[test]
fn irq_info_of_every_index() {
    let s = start(&[]);
    let mut c = ready(&s);
    let intx = c.irq_info(VFIO_PCI_INTX_IRQ_INDEX).unwrap();
    assert_eq!(intx.count, 1);
    assert_eq!(
        intx.flags,
        VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
    );
    let msi = c.irq_info(VFIO_PCI_MSI_IRQ_INDEX).unwrap();
    assert_eq!(msi.count, 4);
    assert_ne!(msi.flags & VFIO_IRQ_INFO_EVENTFD, 0);
    let msix = c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!((msix.index, msix.count), (VFIO_PCI_MSIX_IRQ_INDEX, 4));
    assert_ne!(msix.flags & VFIO_IRQ_INFO_EVENTFD, 0);
    assert_eq!(msix.flags & VFIO_IRQ_INFO_MASKABLE, 0);
    // as Linux vfio-pci: one error vector for a PCI Express function, one
    // request vector
    for index in [VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX] {
        let info = c.irq_info(index).unwrap();
        assert_eq!(
            (info.count, info.flags),
            (1, VFIO_IRQ_INFO_EVENTFD),
            "index {index}"
        );
    }
    // the table size follows the device option
    let s = start(&["--msix-vectors", "9"]);
    let mut c = ready(&s);
    assert_eq!(c.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap().count, 9);
}

#[test]
fn set_irqs_arms_msix_and_the_device_interrupts() {
    let s = start(&[]);
    let mut c = ready(&s);
    let irqs = enable_msix(&mut c, 4).unwrap();
    c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_SOFTWARE)
        .unwrap();
    // the software cause uses vector 2
    c.write32(BAR0, regs::IRQ_RAISE, regs::IRQ_SOFTWARE)
        .unwrap();
    assert_eq!(irqs[2].wait(EVENT_TIMEOUT).unwrap(), 1);
    for i in [0, 1, 3] {
        assert_eq!(irqs[i].take().unwrap(), 0, "vector {i}");
    }
    assert_eq!(
        c.read32(BAR0, regs::IRQ_STATUS).unwrap(),
        regs::IRQ_SOFTWARE
    );
    c.write32(BAR0, regs::IRQ_ACK, regs::IRQ_SOFTWARE).unwrap();
    assert_eq!(c.read32(BAR0, regs::IRQ_STATUS).unwrap(), 0);
    c.write32(BAR0, regs::IRQ_RAISE, regs::IRQ_SOFTWARE)
        .unwrap();
    assert_eq!(irqs[2].wait(EVENT_TIMEOUT).unwrap(), 1);
    c.write32(BAR0, regs::IRQ_ACK, regs::IRQ_SOFTWARE).unwrap();

    // a new eventfd for vector 2 replaces the old one
    let other = EventFd::new().unwrap();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 2, &[&other])
        .unwrap();
    c.write32(BAR0, regs::IRQ_RAISE, regs::IRQ_SOFTWARE)
        .unwrap();
    assert_eq!(other.wait(EVENT_TIMEOUT).unwrap(), 1);
    assert_eq!(irqs[2].take().unwrap(), 0);
    c.write32(BAR0, regs::IRQ_ACK, regs::IRQ_SOFTWARE).unwrap();

    // TRIGGER with DATA_BOOL fires the vectors whose flag is set
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        0,
        2,
        proto::IrqAction::Trigger,
        proto::IrqData::Bool(&[0, 1]),
        &[],
    )
    .unwrap();
    assert_eq!(irqs[1].wait(EVENT_TIMEOUT).unwrap(), 1);
    assert_eq!(irqs[0].take().unwrap(), 0);

    // TRIGGER | DATA_NONE with count 0 disarms the index: the device's
    // interrupt (signalled before the write is answered) reaches no one
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        0,
        0,
        proto::IrqAction::Trigger,
        proto::IrqData::None,
        &[],
    )
    .unwrap();
    c.write32(BAR0, regs::IRQ_RAISE, regs::IRQ_SOFTWARE)
        .unwrap();
    assert_eq!(
        c.read32(BAR0, regs::IRQ_STATUS).unwrap(),
        regs::IRQ_SOFTWARE
    );
    for (i, fd) in irqs.iter().chain([&other]).enumerate() {
        assert_eq!(fd.take().unwrap(), 0, "eventfd {i} after disarming");
    }
}

#[test]
fn region_read_and_write() {
    let s = start(&[]);
    let mut c = ready(&s);
    // config space: IDs, class
    assert_eq!(
        sample::config_read(&mut c, 0, 4).unwrap(),
        u32::from(sample::DEVICE_ID) << 16 | u32::from(sample::VENDOR_ID)
    );
    assert_eq!(sample::config_read(&mut c, 8, 4).unwrap() >> 8, 0xff_00_00);
    // registers
    assert_eq!(c.read32(BAR0, regs::ID).unwrap(), sample::ID_VALUE);
    assert_eq!(c.region_read(BAR0, regs::ID, 1).unwrap(), [0x00]);
    assert_eq!(c.region_read(BAR0, regs::ID + 2, 2).unwrap(), [0x44, 0x53]);
    assert_eq!(
        c.read32(BAR0, regs::BUFFER_SIZE).unwrap() as u64,
        DEFAULT_BUFFER_SIZE
    );
    c.write32(BAR0, regs::LIVENESS, 0x1234_5678).unwrap();
    assert_eq!(c.read32(BAR0, regs::LIVENESS).unwrap(), !0x1234_5678);
    // a posted write is applied before the next request is answered
    c.region_write_posted(BAR0, regs::LIVENESS, &7u32.to_le_bytes())
        .unwrap();
    assert_eq!(c.read32(BAR0, regs::LIVENESS).unwrap(), !7);
    // the whole buffer through BAR2, in one message each way
    let data = pattern(DEFAULT_BUFFER_SIZE as usize, 3);
    c.region_write(BAR2, 0, &data).unwrap();
    assert_eq!(c.region_read(BAR2, 0, data.len() as u32).unwrap(), data);
    // the doorbell page past the buffer reads as zero
    assert_eq!(
        c.region_read(BAR2, DEFAULT_BUFFER_SIZE + 0x100, 8).unwrap(),
        [0; 8]
    );
}

#[test]
fn write_multi_applies_every_write_in_order() {
    let s = start(&[]);
    let mut c = ready(&s);
    let n = c
        .write_multi(&[
            (BAR0, regs::LIVENESS, &1u32.to_le_bytes()),
            (BAR0, regs::IRQ_ENABLE, &regs::IRQ_ALL.to_le_bytes()),
            (BAR2, 0x10, b"8 bytes!"),
            (BAR0, regs::LIVENESS, &2u32.to_le_bytes()),
        ])
        .unwrap();
    assert_eq!(n, 4);
    assert_eq!(c.read32(BAR0, regs::LIVENESS).unwrap(), !2);
    assert_eq!(c.read32(BAR0, regs::IRQ_ENABLE).unwrap(), regs::IRQ_ALL);
    assert_eq!(c.region_read(BAR2, 0x10, 8).unwrap(), b"8 bytes!");
    // as QEMU sends it: without a reply
    c.send_request(
        &Request::RegionWriteMulti(proto::WriteMulti {
            writes: vec![proto::RegionData {
                offset: regs::LIVENESS,
                region: BAR0,
                data: &9u32.to_le_bytes(),
            }],
        }),
        &[],
        true,
    )
    .unwrap();
    assert_eq!(c.read32(BAR0, regs::LIVENESS).unwrap(), !9);
}

#[test]
fn reset_restores_power_on_state_and_keeps_mappings() {
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let mem = SharedMemory::new("reset-ram", RAM_SIZE).unwrap();
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    c.write32(BAR0, regs::LIVENESS, 5).unwrap();
    c.region_write(BAR2, 0, b"before reset").unwrap();
    c.reset().unwrap();
    assert_eq!(c.read32(BAR0, regs::LIVENESS).unwrap(), u32::MAX);
    assert_eq!(c.read32(BAR0, regs::IRQ_ENABLE).unwrap(), 0);
    let cmd = sample::config_read(&mut c, sample::pci::COMMAND as u64, 2).unwrap();
    assert_eq!(
        cmd & u32::from(sample::pci::COMMAND_MASTER),
        0,
        "bus mastering is off after reset"
    );
    // the mapping survived: set the device up again and DMA from it
    enable_bus_master(&mut c).unwrap();
    let irqs2 = enable_msix(&mut c, 4).unwrap();
    drop(irqs);
    c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA).unwrap();
    mem.write(0x40, b"after reset").unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs2, RAM + 0x40, 0, 11, false),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(c.region_read(BAR2, 0, 11).unwrap(), b"after reset");
}

#[test]
fn dma_through_a_shared_memfd_both_ways() {
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let mem = SharedMemory::new("dma-ram", RAM_SIZE).unwrap();
    let link = mem.proc_link();
    assert_eq!(open_fds_named(&s, &link), 0);
    c.dma_map_fd(RAM, RAM_SIZE / 2, mem.as_fd(), 0, true)
        .unwrap();
    c.dma_map_fd(
        RAM + RAM_SIZE / 2,
        RAM_SIZE / 2,
        mem.as_fd(),
        RAM_SIZE / 2,
        true,
    )
    .unwrap();
    // zero-copy: the sealed file is mapped once for both ranges
    assert_eq!(open_fds_named(&s, &link), 1);

    // client memory to the device, across the two ranges
    let data = pattern(0x3000, 1);
    let at = RAM_SIZE / 2 - 0x1000;
    mem.write(at, &data).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, RAM + at, 0x100, 0x3000, false),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(c.region_read(BAR2, 0x100, 0x3000).unwrap(), data);

    // device to client memory
    let back = pattern(0x2000, 77);
    c.region_write(BAR2, 0x8000, &back).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, 0x8000, RAM + 0x1_0000, 0x2000, true),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(mem.read(0x1_0000, 0x2000).unwrap(), back);
    // no DMA message went through the client
    assert_eq!(c.dma_stats(), vdevd_tests::DmaStats::default());

    c.dma_unmap(RAM, RAM_SIZE / 2).unwrap();
    assert_eq!(open_fds_named(&s, &link), 1, "one range still uses it");
    c.dma_unmap(RAM + RAM_SIZE / 2, RAM_SIZE / 2).unwrap();
    assert_eq!(open_fds_named(&s, &link), 0, "released with its last range");
}

#[test]
fn dma_through_an_unsealed_memfd() {
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let mem = SharedMemory::unsealed("dma-unsealed", RAM_SIZE).unwrap();
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    let data = pattern(0x1800, 9);
    mem.write(0x3000, &data).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, RAM + 0x3000, 0, 0x1800, false),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(c.region_read(BAR2, 0, 0x1800).unwrap(), data);
    c.region_write(BAR2, 0x4000, b"pwrite path").unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, 0x4000, RAM + 0x10, 11, true),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(mem.read(0x10, 11).unwrap(), b"pwrite path");
    // the client shrinks its file: the device gets an error, the server
    // lives on
    mem.file().set_len(0x1000).unwrap();
    let (state, error) = run_dma(&mut c, &irqs, RAM + 0x8000, 0, 0x100, false);
    assert_eq!(state, regs::DMA_ERROR);
    assert_ne!(error, 0);
    assert_eq!(c.read32(BAR0, regs::ID).unwrap(), sample::ID_VALUE);
}

#[test]
fn dma_through_message_backed_memory_both_ways() {
    let s = start(&[]);
    // A client that takes at most 4 KiB per message: the server must split
    // its DMA requests.
    let mut c = s.connect().unwrap();
    c.negotiate(&Proposal::json(
        "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":4096}}",
    ))
    .unwrap();
    enable_bus_master(&mut c).unwrap();
    let irqs = enable_msix(&mut c, 4).unwrap();
    c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA).unwrap();
    c.dma_map_msg(MSG, MSG_SIZE, true).unwrap();
    let data = pattern(0xc000, 5);
    c.memory_mut().fill(MSG + 0x1000, &data).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, MSG + 0x1000, 0, 0xc000, false),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(c.region_read(BAR2, 0, 0xc000).unwrap(), data);
    let st = c.dma_stats();
    assert!(st.reads >= 12, "split into 4 KiB requests: {st:?}");
    assert_eq!(st.bytes_read, 0xc000);

    let back = pattern(0x4000, 99);
    c.region_write(BAR2, 0x2000, &back).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, 0x2000, MSG + 0x100, 0x4000, true),
        (regs::DMA_DONE, 0)
    );
    assert_eq!(c.memory().read(MSG + 0x100, 0x4000).unwrap(), back);
    let st = c.dma_stats();
    assert!(st.writes >= 4, "{st:?}");
    assert_eq!(st.bytes_written, 0x4000);
    assert_eq!((st.failed, st.oversized), (0, 0), "{st:?}");

    // read-only memory: the device's write fails, nothing is written
    c.dma_map_msg(MSG + MSG_SIZE, 0x1000, false).unwrap();
    let (state, error) = run_dma(&mut c, &irqs, 0, MSG + MSG_SIZE, 0x10, true);
    assert_eq!((state, error), (regs::DMA_ERROR, regs::DMA_ERR_ACCESS));
    assert_eq!(
        c.memory().read(MSG + MSG_SIZE, 0x10).unwrap(),
        vec![0; 0x10]
    );
}

#[test]
fn unmap_and_unmap_all_withdraw_memory() {
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let mem = SharedMemory::new("unmap-ram", RAM_SIZE).unwrap();
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    c.dma_map_msg(MSG, MSG_SIZE, true).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, RAM, 0, 0x100, false),
        (regs::DMA_DONE, 0)
    );
    c.dma_unmap(RAM, RAM_SIZE).unwrap();
    assert_eq!(
        run_dma(&mut c, &irqs, RAM, 0, 0x100, false),
        (regs::DMA_ERROR, regs::DMA_ERR_UNMAPPED)
    );
    // the message-backed range still works
    assert_eq!(
        run_dma(&mut c, &irqs, MSG, 0, 0x100, false),
        (regs::DMA_DONE, 0)
    );
    // the range can be mapped again, then everything goes at once
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    c.dma_unmap_all().unwrap();
    for iova in [RAM, MSG] {
        assert_eq!(
            run_dma(&mut c, &irqs, iova, 0, 0x100, false),
            (regs::DMA_ERROR, regs::DMA_ERR_UNMAPPED),
            "{iova:#x}"
        );
    }
    assert_eq!(open_fds_named(&s, &mem.proc_link()), 0);
    // unmapping nothing at all is fine
    c.dma_unmap_all().unwrap();
}

/// Bits set in a dirty bitmap (u64 words, bit n for page n).
fn dirty_pages(bitmap: &[u8]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, word) in bitmap.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        b[..word.len()].copy_from_slice(word);
        let v = u64::from_ne_bytes(b);
        for bit in 0..64 {
            if v & (1 << bit) != 0 {
                pages.push(w as u64 * 64 + bit);
            }
        }
    }
    pages
}

#[test]
fn dirty_logging_reports_device_writes() {
    use proto::{DmaLoggingRange, DmaLoggingReport, DmaLoggingStart, FeatureRequest};
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let mem = SharedMemory::new("dirty-ram", RAM_SIZE).unwrap();
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    c.feature(
        FeatureRequest::Probe {
            feature: VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            get: false,
            set: true,
        },
        16,
    )
    .unwrap();
    c.feature(
        FeatureRequest::DmaLoggingStart(DmaLoggingStart {
            page_size: 4096,
            ranges: vec![DmaLoggingRange {
                iova: RAM,
                length: RAM_SIZE,
            }],
        }),
        64,
    )
    .unwrap();
    // the device writes pages 3 and 4 (0x1800 bytes from 0x3800)
    assert_eq!(
        run_dma(&mut c, &irqs, 0, RAM + 0x3800, 0x1800, true),
        (regs::DMA_DONE, 0)
    );
    // reading client memory dirties nothing
    assert_eq!(
        run_dma(&mut c, &irqs, RAM + 0x9000, 0, 0x1000, false),
        (regs::DMA_DONE, 0)
    );
    let report = DmaLoggingReport {
        iova: RAM,
        length: RAM_SIZE,
        page_size: 4096,
    };
    let bitmap_size = report.bitmap_size().unwrap();
    let argsz = (8 + 24 + bitmap_size) as u32;
    let body = c
        .feature(FeatureRequest::DmaLoggingReport(report), argsz)
        .unwrap();
    let r = proto::DeviceFeatureReply::parse(&body).unwrap();
    let Some(proto::FeatureReply::DmaLoggingReport { bitmap, .. }) = r.reply else {
        panic!("{r:?}");
    };
    assert_eq!(bitmap.len() as u64, bitmap_size);
    assert_eq!(dirty_pages(bitmap), [3, 4]);
    // reported pages are clean again
    let body = c
        .feature(FeatureRequest::DmaLoggingReport(report), argsz)
        .unwrap();
    let r = proto::DeviceFeatureReply::parse(&body).unwrap();
    let Some(proto::FeatureReply::DmaLoggingReport { bitmap, .. }) = r.reply else {
        panic!("{r:?}");
    };
    assert!(dirty_pages(bitmap).is_empty());
    // the dirty-bitmap form of DMA_UNMAP
    assert_eq!(
        run_dma(&mut c, &irqs, 0, RAM + 0xa_0000, 0x10, true),
        (regs::DMA_DONE, 0)
    );
    let bits = c.dma_unmap_dirty(RAM, RAM_SIZE, 4096, 32).unwrap();
    assert_eq!(bits.len(), 32);
    assert_eq!(dirty_pages(&bits), [0xa0]);
    c.feature(FeatureRequest::DmaLoggingStop, 16).unwrap();
}

fn register_state(c: &mut Client) -> Vec<u64> {
    vec![
        u64::from(c.read32(BAR0, regs::LIVENESS).unwrap()),
        u64::from(c.read32(BAR0, regs::IRQ_ENABLE).unwrap()),
        c.read64(BAR0, regs::DMA_SRC).unwrap(),
        c.read64(BAR0, regs::DMA_DST).unwrap(),
        u64::from(c.read32(BAR0, regs::DMA_COUNT).unwrap()),
        u64::from(c.read32(BAR0, regs::FACT_INPUT).unwrap()),
    ]
}

#[test]
fn migration_moves_the_device_state_to_a_second_server() {
    let src = start(&[]);
    let mut a = ready(&src);
    let body = a.feature(proto::FeatureRequest::GetMigration, 16).unwrap();
    let r = proto::DeviceFeatureReply::parse(&body).unwrap();
    assert_eq!(
        r.reply,
        Some(proto::FeatureReply::Migration {
            flags: VFIO_MIGRATION_STOP_COPY
        })
    );
    assert_eq!(a.mig_state().unwrap(), MigState::Running);
    a.write32(BAR0, regs::LIVENESS, 0xdead_beef).unwrap();
    a.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA).unwrap();
    sample::program_dma(&mut a, 0x1234_5000, 0x40, 0x300, false).unwrap();
    let buffer = pattern(0x2000, 42);
    a.region_write(BAR2, 0x1000, &buffer).unwrap();
    let before = register_state(&mut a);

    // RUNNING -> STOP_COPY (through STOP), read the state out
    a.set_mig_state(MigState::StopCopy).unwrap();
    assert_eq!(a.mig_state().unwrap(), MigState::StopCopy);
    let saved = a.mig_save(1000).unwrap();
    assert!(!saved.is_empty());
    a.set_mig_state(MigState::Stop).unwrap();

    let dst = start(&[]);
    let mut b = ready(&dst);
    assert_ne!(register_state(&mut b), before);
    b.set_mig_state(MigState::Resuming).unwrap();
    b.mig_load(&saved, 4096).unwrap();
    b.set_mig_state(MigState::Running).unwrap();
    assert_eq!(b.mig_state().unwrap(), MigState::Running);
    assert_eq!(register_state(&mut b), before);
    assert_eq!(b.region_read(BAR2, 0x1000, 0x2000).unwrap(), buffer);

    // the source runs again unchanged
    a.set_mig_state(MigState::Running).unwrap();
    assert_eq!(register_state(&mut a), before);
}

#[test]
fn region_io_fds_offer_the_doorbell_as_an_ioeventfd() {
    let s = start(&[]);
    let (mut c, irqs) = dma_ready(&s);
    let (io, fds) = c.region_io_fds(BAR2).unwrap();
    assert_eq!(io.index, BAR2);
    assert_eq!(io.sub_regions.len(), 1);
    let sub = io.sub_regions[0];
    assert_eq!(
        (sub.offset, sub.size, sub.fd_index, sub.kind, sub.flags),
        (
            regs::doorbell(DEFAULT_BUFFER_SIZE),
            4,
            0,
            VFIO_USER_IO_FD_TYPE_IOEVENTFD,
            0
        )
    );
    assert_eq!(fds.len(), 1);
    let doorbell = EventFd::from_owned(fds.into_iter().next().unwrap());
    // BAR0 has none
    let (io0, fds0) = c.region_io_fds(BAR0).unwrap();
    assert!(io0.sub_regions.is_empty() && fds0.is_empty());

    // program a transfer, ring the doorbell through the eventfd (as KVM
    // would on a guest write), and see it run
    let mem = SharedMemory::new("doorbell-ram", RAM_SIZE).unwrap();
    c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    mem.write(0x500, b"rung by ioeventfd").unwrap();
    sample::program_dma(&mut c, RAM + 0x500, 0x20, 17, false).unwrap();
    doorbell.signal(1).unwrap();
    sample::wait_irq(&mut c, &irqs[1], EVENT_TIMEOUT).unwrap();
    assert_eq!(sample::dma_status(&mut c).unwrap(), (regs::DMA_DONE, 0));
    assert_eq!(c.region_read(BAR2, 0x20, 17).unwrap(), b"rung by ioeventfd");
    assert_eq!(c.read32(BAR0, regs::DOORBELL_COUNT).unwrap(), 1);
    // a trapped write to the doorbell does the same
    c.write32(BAR0, regs::IRQ_ACK, regs::IRQ_DMA).unwrap();
    c.region_write(BAR2, regs::doorbell(DEFAULT_BUFFER_SIZE), &[1, 0, 0, 0])
        .unwrap();
    sample::wait_irq(&mut c, &irqs[1], EVENT_TIMEOUT).unwrap();
    assert_eq!(c.read32(BAR0, regs::DOORBELL_COUNT).unwrap(), 2);
}

#[test]
fn one_client_at_a_time_and_the_next_starts_clean() {
    let s = start(&[]);
    let (mut a, irqs) = dma_ready(&s);
    let mem = SharedMemory::new("first-client", RAM_SIZE).unwrap();
    a.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true).unwrap();
    a.write32(BAR0, regs::LIVENESS, 1).unwrap();
    assert_eq!(open_fds_named(&s, &mem.proc_link()), 1);

    // B waits in the backlog while A is served
    let mut b = s.connect().unwrap();
    let id = b
        .send(Command::Version.into(), 0, &Proposal::qemu().body(), &[])
        .unwrap();
    b.set_timeout(Duration::from_millis(200)).unwrap();
    assert!(matches!(b.recv(), Err(vdevd_tests::Error::Timeout { .. })));
    assert_eq!(a.read32(BAR0, regs::LIVENESS).unwrap(), !1);
    drop(a);
    drop(irqs);
    b.set_timeout(EVENT_TIMEOUT).unwrap();
    let m = b.wait_reply(id).unwrap();
    assert_eq!(m.errno(), None);
    // A's mappings and interrupts are gone, the device is back to its
    // power-on state
    assert_eq!(open_fds_named(&s, &mem.proc_link()), 0);
    assert_eq!(b.read32(BAR0, regs::LIVENESS).unwrap(), u32::MAX);
    enable_bus_master(&mut b).unwrap();
    let irqs = enable_msix(&mut b, 4).unwrap();
    b.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA).unwrap();
    assert_eq!(
        run_dma(&mut b, &irqs, RAM, 0, 16, false),
        (regs::DMA_ERROR, regs::DMA_ERR_UNMAPPED)
    );
}

#[test]
fn sigterm_disconnects_the_client_and_removes_the_socket() {
    let mut s = start(&[]);
    let mut c = ready(&s);
    let socket = s.socket().to_path_buf();
    assert!(socket.exists());
    let status = s.stop().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(c.expect_close().unwrap().is_empty());
    assert!(s.dir().is_dir());
    assert!(!socket.exists(), "vdevd removed its socket");
}
