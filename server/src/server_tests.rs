//! Tests of a whole device server over real sockets, with a fake device
//! and a wire-level client.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vdevd_devices::device::IrqAction;
use vdevd_devices::dma::{BackingKind, DmaSpace};
use vdevd_protocol::{self as proto, Command, Request, vfio};

use super::*;
use crate::testutil::{Client, FakeDevice, FakeLog, TempDir, memfd, open_fds_named};
use crate::wire::Stats;

struct Fixture {
    server: Option<DeviceServer>,
    log: Arc<Mutex<FakeLog>>,
    dma: Arc<DmaSpace>,
    path: PathBuf,
    _dir: TempDir,
}

impl Fixture {
    fn new(options: ServerOptions, migratable: bool) -> Fixture {
        let dir = TempDir::new("server");
        let path = dir.path().join("dev.sock");
        let mut log = None;
        let mut dma = None;
        let server = DeviceServer::serve(&path, options, |d| {
            let (dev, l) = FakeDevice::new(migratable);
            log = Some(l);
            dma = Some(d);
            Ok(Box::new(dev))
        })
        .unwrap();
        Fixture {
            server: Some(server),
            log: log.unwrap(),
            dma: dma.unwrap(),
            path,
            _dir: dir,
        }
    }

    fn default() -> Fixture {
        Fixture::new(ServerOptions::default(), true)
    }

    fn client(&self) -> Client {
        Client::connect(&self.path)
    }

    fn ready(&self) -> Client {
        let mut c = self.client();
        c.version();
        c
    }

    fn stats(&self) -> Arc<Stats> {
        self.server.as_ref().unwrap().stats().clone()
    }

    /// Wait until `f` holds (the server thread works asynchronously).
    fn wait(&self, what: &str, f: impl Fn(&FakeLog) -> bool) {
        let t0 = Instant::now();
        while !f(&self.log.lock().unwrap()) {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn region_read(c: &mut Client, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, u32> {
    let body = c.call(&Request::RegionRead(proto::RegionAccess {
        offset,
        region,
        count,
    }))?;
    Ok(body[16..].to_vec())
}

fn region_write(c: &mut Client, region: u32, offset: u64, data: &[u8]) -> Result<(), u32> {
    c.call(&Request::RegionWrite(proto::RegionData {
        offset,
        region,
        data,
    }))
    .map(|_| ())
}

fn map(
    c: &mut Client,
    address: u64,
    size: u64,
    fd: Option<&OwnedFd>,
    offset: u64,
) -> Result<(), u32> {
    let req = Request::DmaMap(proto::DmaMap {
        argsz: 32,
        read: true,
        write: true,
        offset,
        address,
        size,
    });
    let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    c.call_with(&req, &fds).map(|_| ())
}

fn unmap(c: &mut Client, address: u64, size: u64) -> Result<(), u32> {
    c.call(&Request::DmaUnmap(proto::DmaUnmap {
        argsz: 24,
        address,
        size,
        kind: proto::UnmapKind::Range,
    }))
    .map(|_| ())
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn eventfd_count(fd: &OwnedFd) -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: v is 8 writable bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
    if n == 8 { u64::from_ne_bytes(v) } else { 0 }
}

fn sized_memfd(tag: &str, size: u64, seal: bool) -> (OwnedFd, String) {
    let (fd, name) = memfd(tag);
    let f = std::fs::File::from(fd.try_clone().unwrap());
    f.set_len(size).unwrap();
    if seal {
        // SAFETY: F_ADD_SEALS with a valid seal on our own descriptor.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
    }
    (fd, name)
}

#[test]
fn version_reply_offers_the_configured_capabilities() {
    let options = ServerOptions {
        max_msg_fds: 8,
        max_data_xfer_size: 65536,
        max_dma_maps: 1000,
        pgsizes: 4096 | (2 << 20),
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, true);
    let mut c = f.client();
    let caps = c.version();
    assert_eq!(caps.max_msg_fds, 8);
    assert_eq!(caps.max_data_xfer_size, 65536);
    assert_eq!(caps.max_dma_maps, 1000);
    // what the client also supports
    assert_eq!(caps.pgsizes, 4096);
    assert!(caps.write_multiple, "the client proposed it");
    assert!(caps.migration.is_some(), "the device is migratable");
    assert!(caps.twin_socket.is_none());
    f.wait("open", |l| l.opens == 1);
    assert_eq!(f.dma.limits().max_maps, 1000);
}

#[test]
fn version_without_json_gets_the_defaults_and_no_extras() {
    let f = Fixture::new(ServerOptions::default(), false);
    let mut c = f.client();
    let body = c
        .call(&Request::Version(proto::Version {
            major: 0,
            minor: 3,
            capabilities: proto::Capabilities::default(),
        }))
        .unwrap();
    let v = proto::Version::parse(&body).unwrap();
    assert_eq!((v.major, v.minor), (0, 0), "minor at most the proposed one");
    assert!(!v.capabilities.write_multiple);
    assert!(v.capabilities.migration.is_none());
}

#[test]
fn anything_before_version_is_refused_and_the_server_keeps_serving() {
    let f = Fixture::default();
    let mut c = f.client();
    let err = c
        .call(&Request::DeviceGetInfo(proto::DeviceInfoRequest {
            argsz: 16,
        }))
        .unwrap_err();
    assert_eq!(err, libc::EINVAL as u32);
    assert!(c.closed());
    // the next client is served
    let mut c = f.ready();
    assert!(
        c.call(&Request::DeviceGetInfo(proto::DeviceInfoRequest {
            argsz: 16
        }))
        .is_ok()
    );
}

#[test]
fn bad_versions_close_the_connection() {
    let f = Fixture::default();
    let mut c = f.client();
    let err = c
        .call(&Request::Version(proto::Version {
            major: 1,
            minor: 0,
            capabilities: proto::Capabilities::default(),
        }))
        .unwrap_err();
    assert_eq!(err, libc::ENOTSUP as u32);
    assert!(c.closed());

    let mut c = f.client();
    let caps = proto::Capabilities {
        pgsizes: 0x800,
        ..proto::Capabilities::default()
    };
    let err = c
        .call(&Request::Version(proto::Version {
            major: 0,
            minor: 0,
            capabilities: caps,
        }))
        .unwrap_err();
    assert_eq!(err, libc::EINVAL as u32);
    assert!(c.closed());
    assert_eq!(f.log.lock().unwrap().opens, 0, "no session, no open");
}

#[test]
fn second_version_is_an_error_but_not_fatal() {
    let f = Fixture::default();
    let mut c = f.ready();
    let err = c
        .call(&Request::Version(proto::Version {
            major: 0,
            minor: 0,
            capabilities: proto::Capabilities::default(),
        }))
        .unwrap_err();
    assert_eq!(err, libc::EINVAL as u32);
    assert!(region_read(&mut c, 7, 0, 4).is_ok());
}

#[test]
fn handshake_timeout_frees_the_device_for_the_next_client() {
    let options = ServerOptions {
        handshake_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut idle = f.client();
    let t0 = Instant::now();
    // A second client waits in the backlog meanwhile.
    let mut next = f.client();
    assert!(idle.closed());
    assert!(t0.elapsed() >= Duration::from_millis(150));
    next.version();
}

#[test]
fn one_client_at_a_time_and_the_next_is_served_after() {
    let f = Fixture::default();
    let mut first = f.ready();
    let mut second = f.client();
    let id = second.send(
        Command::Version,
        &Request::Version(proto::Version {
            major: 0,
            minor: 0,
            capabilities: proto::Capabilities::default(),
        })
        .to_body()
        .unwrap(),
        &[],
        false,
    );
    // The second is not served while the first is connected.
    second
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(std::io::Read::read(&mut second.sock, &mut b).is_err());
    assert!(region_read(&mut first, 7, 0, 4).is_ok());
    drop(first);
    second
        .sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let m = second.recv().unwrap();
    assert_eq!(m.header.msg_id, id);
    assert!(!m.header.is_error());
    f.wait("close then open", |l| l.opens == 2 && l.closes == 1);
}

#[test]
fn device_info_regions_and_irqs() {
    let f = Fixture::default();
    let mut c = f.ready();
    let body = c
        .call(&Request::DeviceGetInfo(proto::DeviceInfoRequest {
            argsz: 16,
        }))
        .unwrap();
    let info = proto::DeviceInfo::parse(&body).unwrap();
    assert_eq!(info.num_regions, 9);
    assert_eq!(info.num_irqs, 5);
    assert_eq!(
        info.flags,
        vfio::VFIO_DEVICE_FLAGS_PCI | vfio::VFIO_DEVICE_FLAGS_RESET
    );

    // Config space: no mmap, no fd.
    let (body, fds) = c
        .call_with(
            &Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
                argsz: 32,
                index: 7,
            }),
            &[],
        )
        .unwrap();
    let ri = proto::RegionInfo::parse(&body).unwrap();
    assert_eq!(ri.info.size, 256);
    assert_eq!(
        ri.info.flags,
        vfio::VFIO_REGION_INFO_FLAG_READ | vfio::VFIO_REGION_INFO_FLAG_WRITE
    );
    assert!(fds.is_empty());

    // BAR0 with a sparse mmap area: too small an argsz gets the size needed
    // and no descriptor; the full reply carries the capability and the fd.
    let (body, fds) = c
        .call_with(
            &Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
                argsz: 32,
                index: 0,
            }),
            &[],
        )
        .unwrap();
    let ri = proto::RegionInfo::parse(&body).unwrap();
    let needed = ri.needed().expect("truncated");
    assert!(needed > 32);
    assert!(fds.is_empty());
    let (body, fds) = c
        .call_with(
            &Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
                argsz: needed,
                index: 0,
            }),
            &[],
        )
        .unwrap();
    let ri = proto::RegionInfo::parse(&body).unwrap();
    assert!(ri.info.flags & vfio::VFIO_REGION_INFO_FLAG_MMAP != 0);
    assert_eq!(
        ri.info.caps,
        vec![proto::RegionCap::SparseMmap(vec![proto::SparseArea {
            offset: 0x800,
            size: 0x800
        }])]
    );
    assert_eq!(fds.len(), 1);
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
    assert!(link.to_string_lossy().contains("memfd:"), "{link:?}");

    // Bad indexes.
    let err = c
        .call(&Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
            argsz: 32,
            index: 9,
        }))
        .unwrap_err();
    assert_eq!(err, libc::EINVAL as u32);
    let err = c
        .call(&Request::DeviceGetIrqInfo(proto::IrqInfoRequest {
            argsz: 16,
            index: 5,
        }))
        .unwrap_err();
    assert_eq!(err, libc::EINVAL as u32);

    let body = c
        .call(&Request::DeviceGetIrqInfo(proto::IrqInfoRequest {
            argsz: 16,
            index: 2,
        }))
        .unwrap();
    let irq = proto::IrqInfo::parse(&body).unwrap();
    assert_eq!(irq.count, 4);
    assert_eq!(
        irq.flags,
        vfio::VFIO_IRQ_INFO_EVENTFD | vfio::VFIO_IRQ_INFO_MASKABLE | vfio::VFIO_IRQ_INFO_NORESIZE
    );
}

#[test]
fn region_io_fds_share_one_descriptor() {
    let f = Fixture::default();
    let mut c = f.ready();
    let (body, fds) = c
        .call_with(
            &Request::DeviceGetRegionIoFds(proto::RegionIoFdsRequest {
                argsz: 1024,
                index: 0,
            }),
            &[],
        )
        .unwrap();
    let r = proto::RegionIoFds::parse(&body).unwrap();
    assert_eq!(r.io_fds.sub_regions.len(), 2);
    assert_eq!(fds.len(), 1);
    assert!(r.io_fds.sub_regions.iter().all(|s| s.fd_index == 0));
    assert_eq!(
        r.io_fds.sub_regions[0].flags,
        vfio::KVM_IOEVENTFD_FLAG_DATAMATCH
    );
    assert_eq!(r.io_fds.sub_regions[0].data, 7);
    // too small: the size needed, no descriptors
    let (body, fds) = c
        .call_with(
            &Request::DeviceGetRegionIoFds(proto::RegionIoFdsRequest {
                argsz: 16,
                index: 0,
            }),
            &[],
        )
        .unwrap();
    let r = proto::RegionIoFds::parse(&body).unwrap();
    assert_eq!(r.needed(), Some(16 + 2 * 40));
    assert!(fds.is_empty());
}

#[test]
fn region_access_is_checked() {
    let options = ServerOptions {
        max_data_xfer_size: 4096,
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    region_write(&mut c, 0, 0x10, b"abcd").unwrap();
    assert_eq!(region_read(&mut c, 0, 0x10, 4).unwrap(), b"abcd");
    assert_eq!(region_read(&mut c, 1, 4, 4).unwrap(), [4, 5, 6, 7]);
    // read-only region
    assert_eq!(region_write(&mut c, 1, 0, b"x"), Err(libc::EACCES as u32));
    // outside the region, and wrapping offsets
    assert_eq!(region_read(&mut c, 7, 254, 4), Err(libc::EINVAL as u32));
    assert_eq!(
        region_read(&mut c, 7, u64::MAX - 1, 1),
        Err(libc::EINVAL as u32)
    );
    // no such region
    assert_eq!(region_read(&mut c, 42, 0, 4), Err(libc::EINVAL as u32));
    // count above max_data_xfer_size
    assert_eq!(region_read(&mut c, 0, 0, 4097), Err(libc::E2BIG as u32));
    // the session goes on
    assert_eq!(region_read(&mut c, 0, 0x10, 2).unwrap(), b"ab");
}

#[test]
fn write_multi_needs_the_capability() {
    let f = Fixture::default();
    let mut c = f.ready();
    let w = Request::RegionWriteMulti(proto::WriteMulti {
        writes: vec![
            proto::RegionData {
                offset: 0,
                region: 0,
                data: &[1, 2],
            },
            proto::RegionData {
                offset: 8,
                region: 0,
                data: &[3; 8],
            },
        ],
    });
    let body = c.call(&w).unwrap();
    assert_eq!(proto::WriteMultiReply::parse(&body).unwrap().wr_cnt, 2);
    assert_eq!(
        region_read(&mut c, 0, 0, 10).unwrap(),
        [1, 2, 0, 0, 0, 0, 0, 0, 3, 3]
    );

    // A client that did not propose write_multiple.
    drop(c);
    let mut c = f.client();
    c.call(&Request::Version(proto::Version {
        major: 0,
        minor: 0,
        capabilities: proto::Capabilities::default(),
    }))
    .unwrap();
    assert_eq!(c.call(&w), Err(libc::ENOTSUP as u32));
}

#[test]
fn unknown_and_server_only_commands_get_enosys_and_their_body_is_skipped() {
    let f = Fixture::default();
    let mut c = f.ready();
    let id = c.send_raw_command(99, &[0xee; 40]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (id, libc::ENOSYS as u32));
    let id = c.send_raw_command(Command::DmaRead as u16, &[0; 16]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (id, libc::ENOSYS as u32));
    // the reply flag on a request
    let body = Request::RegionRead(proto::RegionAccess {
        offset: 0,
        region: 7,
        count: 4,
    })
    .to_body()
    .unwrap();
    let mut msg = proto::command_message(77, Command::RegionRead, false, &body).unwrap();
    msg[8..12].copy_from_slice(&vdevd_protocol::header::FLAG_TYPE_REPLY.to_ne_bytes());
    c.send_raw(&msg, &[]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (77, libc::EINVAL as u32));
    assert!(m.header.is_reply() && m.header.is_error());
    // an unexpected DMA reply is ignored (logged)
    let mut msg = proto::command_message(78, Command::DmaRead, false, &[0; 16]).unwrap();
    msg[8..12].copy_from_slice(&vdevd_protocol::header::FLAG_TYPE_REPLY.to_ne_bytes());
    c.send_raw(&msg, &[]);
    // the error flag on a request
    let mut msg = proto::command_message(79, Command::DeviceReset, false, &[]).unwrap();
    msg[8..12].copy_from_slice(&vdevd_protocol::header::FLAG_ERROR.to_ne_bytes());
    c.send_raw(&msg, &[]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (79, libc::EINVAL as u32));
    assert!(region_read(&mut c, 7, 0, 4).is_ok());
}

#[test]
fn oversized_and_undersized_messages_close_the_connection() {
    let options = ServerOptions {
        max_data_xfer_size: 4096,
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    let big = vec![0u8; 16 + 4096 + 1];
    let body = Request::RegionWrite(proto::RegionData {
        offset: 0,
        region: 0,
        data: &big[16..],
    })
    .to_body()
    .unwrap();
    let mut msg = proto::command_message(5, Command::RegionWrite, false, &body).unwrap();
    // Pad past the limit (16 + max(16 + 4096, 8192)).
    msg.resize(16 + 8192 + 1, 0);
    let size = msg.len() as u32;
    msg[4..8].copy_from_slice(&size.to_ne_bytes());
    c.send_raw(&msg[..16], &[]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (5, libc::E2BIG as u32));
    assert!(c.closed());

    let mut c = f.ready();
    let mut msg = proto::command_message(6, Command::DeviceReset, false, &[]).unwrap();
    msg[4..8].copy_from_slice(&8u32.to_ne_bytes());
    c.send_raw(&msg, &[]);
    let m = c.recv().unwrap();
    assert_eq!((m.header.msg_id, m.header.error), (6, libc::EINVAL as u32));
    assert!(c.closed());
}

#[test]
fn no_reply_requests_are_executed_silently() {
    let f = Fixture::default();
    let mut c = f.ready();
    let body = Request::RegionWrite(proto::RegionData {
        offset: 0,
        region: 0,
        data: b"zz",
    })
    .to_body()
    .unwrap();
    c.send(Command::RegionWrite, &body, &[], true);
    // an error with NO_REPLY is not answered either
    let bad = Request::RegionWrite(proto::RegionData {
        offset: 0,
        region: 1,
        data: b"zz",
    })
    .to_body()
    .unwrap();
    c.send(Command::RegionWrite, &bad, &[], true);
    // the next reply is the read's
    assert_eq!(region_read(&mut c, 0, 0, 2).unwrap(), b"zz");
}

#[test]
fn dma_map_and_unmap_tell_the_device_and_refuse_bad_ranges() {
    let options = ServerOptions {
        max_dma_maps: 3,
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    let (mem, _) = sized_memfd("map", 0x10000, true);
    map(&mut c, 0x100000, 0x4000, Some(&mem), 0x1000).unwrap();
    {
        let l = f.log.lock().unwrap();
        assert_eq!(l.maps.len(), 1);
        assert_eq!(l.maps[0].kind, BackingKind::Mapped);
    }
    // the device can reach the memory
    f.dma.write(0x100010, b"hi").unwrap();
    let mut b = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::from(mem.try_clone().unwrap()),
        &mut b,
        0x1010,
    )
    .unwrap();
    assert_eq!(&b, b"hi");

    let e = |n: i32| Err(n as u32);
    assert_eq!(
        map(&mut c, 0x101000, 0x1000, Some(&mem), 0),
        e(libc::EEXIST)
    );
    assert_eq!(map(&mut c, 0x200000, 0, Some(&mem), 0), e(libc::EINVAL));
    assert_eq!(
        map(&mut c, u64::MAX - 0xfff, 0x2000, None, 0),
        e(libc::EINVAL)
    );
    assert_eq!(
        map(&mut c, 0x200800, 0x1000, Some(&mem), 0),
        e(libc::EINVAL)
    );
    assert_eq!(
        map(&mut c, 0x200000, 0x1000, Some(&mem), 0x10000),
        e(libc::EINVAL)
    );
    // without a descriptor: message-backed
    map(&mut c, 0x300000, 0x800, None, 0).unwrap();
    map(&mut c, 0x400000, 0x1000, None, 0).unwrap();
    assert_eq!(map(&mut c, 0x500000, 0x1000, None, 0), e(libc::ENOSPC));
    // two descriptors on a DMA_MAP
    let (m2, _) = sized_memfd("map2", 0x1000, true);
    let req = Request::DmaMap(proto::DmaMap {
        argsz: 32,
        read: true,
        write: false,
        offset: 0,
        address: 0x600000,
        size: 0x1000,
    });
    assert_eq!(
        c.call_with(&req, &[mem.as_raw_fd(), m2.as_raw_fd()])
            .map(|_| ()),
        e(libc::EINVAL)
    );

    assert_eq!(unmap(&mut c, 0x100000, 0x1000), e(libc::ENOENT));
    unmap(&mut c, 0x100000, 0x4000).unwrap();
    {
        let l = f.log.lock().unwrap();
        assert_eq!(l.unmaps.len(), 1);
        assert_eq!(l.unmaps[0].iova, 0x100000);
    }
    assert_eq!(f.dma.len(), 2);
    c.call(&Request::DmaUnmap(proto::DmaUnmap {
        argsz: 24,
        address: 0,
        size: 0,
        kind: proto::UnmapKind::All,
    }))
    .unwrap();
    assert!(f.dma.is_empty());
    assert_eq!(f.log.lock().unwrap().live_ranges, 0);
}

#[test]
fn set_irqs_arms_eventfds_and_refuses_other_descriptors() {
    let f = Fixture::default();
    let mut c = f.ready();
    let efds: Vec<OwnedFd> = (0..2).map(|_| eventfd()).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let set = |start, count, data| {
        Request::DeviceSetIrqs(proto::SetIrqs {
            argsz: 20,
            index: 2,
            start,
            count,
            action: proto::IrqAction::Trigger,
            data,
        })
    };
    c.call_with(&set(1, 2, proto::IrqData::Eventfd), &raw)
        .unwrap();
    // a client-triggered interrupt reaches the eventfd
    c.call(&Request::DeviceSetIrqs(proto::SetIrqs {
        argsz: 21,
        index: 2,
        start: 2,
        count: 1,
        action: proto::IrqAction::Trigger,
        data: proto::IrqData::Bool(&[1]),
    }))
    .unwrap();
    assert_eq!(eventfd_count(&efds[1]), 1);
    assert_eq!(eventfd_count(&efds[0]), 0);
    // our descriptor was made non-blocking
    // SAFETY: F_GETFL on our own descriptor.
    let fl = unsafe { libc::fcntl(efds[0].as_raw_fd(), libc::F_GETFL) };
    assert!(fl & libc::O_NONBLOCK != 0);

    let (mem, _) = memfd("not-an-eventfd");
    let e = c
        .call_with(&set(0, 1, proto::IrqData::Eventfd), &[mem.as_raw_fd()])
        .unwrap_err();
    assert_eq!(e, libc::EINVAL as u32);
    // wrong count of descriptors
    let e = c
        .call_with(&set(0, 3, proto::IrqData::Eventfd), &raw)
        .unwrap_err();
    assert_eq!(e, libc::EINVAL as u32);
    // beyond the index's vectors
    let e = c.call(&set(3, 2, proto::IrqData::None)).unwrap_err();
    assert_eq!(e, libc::EINVAL as u32);
    // descriptors on a command that takes none
    let e = c
        .call_with(
            &Request::DeviceGetInfo(proto::DeviceInfoRequest { argsz: 16 }),
            &raw[..1],
        )
        .unwrap_err();
    assert_eq!(e, libc::EINVAL as u32);
    // disarm: EVENTFD without descriptors, then disable the index
    c.call(&set(1, 2, proto::IrqData::Eventfd)).unwrap();
    c.call(&set(0, 0, proto::IrqData::None)).unwrap();
    let l = f.log.lock().unwrap();
    let last: Vec<_> = l.irq_sets.iter().rev().take(2).collect();
    assert_eq!(*last[1], (2, 1, 2, IrqAction::Trigger, 0));
    assert_eq!(*last[0], (2, 0, 0, IrqAction::Trigger, 0));
}

#[test]
fn more_fds_than_negotiated_are_refused_and_closed() {
    let options = ServerOptions {
        max_msg_fds: 2,
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    let (mem, name) = memfd("toomany");
    let req = Request::DeviceSetIrqs(proto::SetIrqs {
        argsz: 20,
        index: 2,
        start: 0,
        count: 3,
        action: proto::IrqAction::Trigger,
        data: proto::IrqData::Eventfd,
    });
    let e = c.call_with(&req, &[mem.as_raw_fd(); 3]).unwrap_err();
    assert_eq!(e, libc::EINVAL as u32);
    drop(mem);
    assert_eq!(open_fds_named(&name), 0, "the server closed them");
}

#[test]
fn a_client_that_leaves_loses_its_mappings_and_interrupts() {
    let f = Fixture::default();
    let mut c = f.ready();
    let (mem, name) = sized_memfd("leave", 0x4000, true);
    map(&mut c, 0, 0x2000, Some(&mem), 0).unwrap();
    map(&mut c, 0x2000, 0x2000, Some(&mem), 0x2000).unwrap();
    map(&mut c, 0x10000, 0x1000, None, 0).unwrap();
    let efd = eventfd();
    c.call_with(
        &Request::DeviceSetIrqs(proto::SetIrqs {
            argsz: 20,
            index: 2,
            start: 0,
            count: 1,
            action: proto::IrqAction::Trigger,
            data: proto::IrqData::Eventfd,
        }),
        &[efd.as_raw_fd()],
    )
    .unwrap();
    drop(mem);
    assert!(open_fds_named(&name) >= 1, "the server holds the memfd");
    // Leave without a word.
    drop(c);
    f.wait("close", |l| l.closes == 1);
    assert!(f.dma.is_empty());
    {
        let l = f.log.lock().unwrap();
        assert_eq!(l.unmaps.len(), 3, "the device was told of every unmap");
        assert_eq!(l.live_ranges, 0);
    }
    assert_eq!(open_fds_named(&name), 0, "the memfd was closed");
    // The next client gets a clean device.
    let mut c = f.ready();
    assert_eq!(region_read(&mut c, 0, 0, 2).unwrap(), [0, 0]);
    assert!(f.dma.is_empty());
}

#[test]
fn message_backed_dma_goes_through_the_client_while_it_keeps_being_served() {
    let options = ServerOptions {
        max_data_xfer_size: 4096,
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    map(&mut c, 0x10000, 0x4000, None, 0).unwrap();
    // A device worker writes 10000 bytes and reads them back.
    let dma = f.dma.clone();
    let worker = std::thread::spawn(move || {
        let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
        dma.write(0x10100, &data)?;
        let mut back = vec![0u8; 10000];
        dma.read(0x10100, &mut back)?;
        Ok::<_, vdevd_devices::dma::DmaError>(back == data)
    });
    // Play the client: serve DMA requests from our "guest memory", and
    // issue a region access in the middle of it all.
    let mut guest = vec![0u8; 0x4000];
    let mut served = 0;
    let mut asked = false;
    let mut region_reply = false;
    while served < 6 || !region_reply {
        if served == 1 && !asked {
            let body = Request::RegionRead(proto::RegionAccess {
                offset: 0,
                region: 7,
                count: 4,
            })
            .to_body()
            .unwrap();
            c.send(Command::RegionRead, &body, &[], false);
            asked = true;
        }
        let m = c.recv().unwrap();
        if m.header.is_reply() {
            assert_eq!(m.header.command, Command::RegionRead as u16);
            region_reply = true;
            continue;
        }
        let cmd = m.header.command().unwrap();
        let req = proto::parse_server_request(cmd, &m.body).unwrap();
        let mut body = Vec::new();
        match req {
            proto::ServerRequest::DmaWrite(d) => {
                assert!(d.data.len() <= 4096, "chunked by max_data_xfer_size");
                let a = (d.address - 0x10000) as usize;
                guest[a..a + d.data.len()].copy_from_slice(d.data);
                proto::DmaAccess {
                    address: d.address,
                    count: d.data.len() as u64,
                }
                .encode(&mut body);
            }
            proto::ServerRequest::DmaRead(a) => {
                let o = (a.address - 0x10000) as usize;
                proto::DmaData {
                    address: a.address,
                    data: &guest[o..o + a.count as usize],
                }
                .encode(&mut body);
            }
        }
        let reply = proto::reply_message(&m.header, &body).unwrap();
        c.send_raw(&reply, &[]);
        served += 1;
    }
    assert!(worker.join().unwrap().unwrap());
    assert_eq!(guest[0x100..0x104], [0, 1, 2, 3]);
}

#[test]
fn waiters_fail_promptly_when_the_client_leaves() {
    let f = Fixture::default();
    let mut c = f.ready();
    map(&mut c, 0, 0x1000, None, 0).unwrap();
    let dma = f.dma.clone();
    let worker = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut b = [0u8; 8];
        (dma.read(0, &mut b).is_err(), t0.elapsed())
    });
    // The request arrives; we do not answer and leave.
    let m = c.recv().unwrap();
    assert_eq!(m.header.command, Command::DmaRead as u16);
    drop(c);
    let (failed, took) = worker.join().unwrap();
    assert!(failed);
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn pipelined_requests_are_read_and_answered_in_few_syscalls() {
    let f = Fixture::default();
    let mut c = f.ready();
    let stats = f.stats();
    let (r0, s0) = (
        Stats::get(&stats.recvmsg_calls),
        Stats::get(&stats.sendmsg_calls),
    );
    let mut all = Vec::new();
    for id in 100..164u16 {
        let body = Request::RegionRead(proto::RegionAccess {
            offset: 0,
            region: 7,
            count: 4,
        })
        .to_body()
        .unwrap();
        all.extend(proto::command_message(id, Command::RegionRead, false, &body).unwrap());
    }
    c.write_all(&all);
    for id in 100..164u16 {
        let m = c.recv().unwrap();
        assert_eq!(m.header.msg_id, id);
    }
    let recvs = Stats::get(&stats.recvmsg_calls) - r0;
    let sends = Stats::get(&stats.sendmsg_calls) - s0;
    assert!(recvs <= 4, "{recvs} recvmsg for 64 pipelined requests");
    assert!(sends <= 4, "{sends} sendmsg for 64 pipelined requests");

    // One request in flight: one recvmsg and one sendmsg each.
    let (r0, s0) = (
        Stats::get(&stats.recvmsg_calls),
        Stats::get(&stats.sendmsg_calls),
    );
    for _ in 0..20 {
        region_read(&mut c, 7, 0, 4).unwrap();
    }
    assert_eq!(Stats::get(&stats.recvmsg_calls) - r0, 20);
    assert_eq!(Stats::get(&stats.sendmsg_calls) - s0, 20);
}

#[test]
fn reset_and_migration_round_trip() {
    let f = Fixture::default();
    let mut c = f.ready();
    region_write(&mut c, 0, 0, b"state!").unwrap();
    let feature = |request| Request::DeviceFeature(proto::DeviceFeature { argsz: 64, request });
    let set = |state| {
        feature(proto::FeatureRequest::SetMigDeviceState(
            proto::MigDeviceState { state, data_fd: 0 },
        ))
    };
    // probe and GET MIGRATION
    c.call(&feature(proto::FeatureRequest::Probe {
        feature: vfio::VFIO_DEVICE_FEATURE_MIGRATION,
        get: true,
        set: false,
    }))
    .unwrap();
    let body = c
        .call(&feature(proto::FeatureRequest::GetMigration))
        .unwrap();
    let r = proto::DeviceFeatureReply::parse(&body).unwrap();
    assert!(format!("{r:?}").contains("flags: 1"), "{r:?}");

    c.call(&set(proto::MigState::StopCopy)).unwrap();
    assert!(f.log.lock().unwrap().stopped);
    let mut saved = Vec::new();
    loop {
        let body = c
            .call(&Request::MigDataRead(proto::MigDataRead {
                argsz: 8 + 1000,
                size: 1000,
            }))
            .unwrap();
        let r = proto::MigDataReadReply::parse(&body).unwrap();
        saved.extend_from_slice(r.data);
        if r.size < 1000 {
            break;
        }
    }
    assert_eq!(saved.len(), 0x1000);
    assert_eq!(&saved[..6], b"state!");
    // writing is refused outside RESUMING
    assert_eq!(
        c.call(&Request::MigDataWrite(proto::MigDataWrite {
            argsz: 8,
            data: b"x"
        })),
        Err(libc::EINVAL as u32)
    );
    c.call(&Request::DeviceReset).unwrap();
    assert_eq!(region_read(&mut c, 0, 0, 6).unwrap(), [0; 6]);
    // RUNNING -> RESUMING goes through STOP
    c.call(&set(proto::MigState::Resuming)).unwrap();
    for chunk in saved.chunks(1500) {
        c.call(&Request::MigDataWrite(proto::MigDataWrite {
            argsz: 8,
            data: chunk,
        }))
        .unwrap();
    }
    c.call(&set(proto::MigState::Running)).unwrap();
    assert_eq!(region_read(&mut c, 0, 0, 6).unwrap(), b"state!");
    // a non-migratable device answers ENOTTY
    drop(c);
    let f = Fixture::new(ServerOptions::default(), false);
    let mut c = f.ready();
    assert_eq!(
        c.call(&feature(proto::FeatureRequest::GetMigration)),
        Err(libc::ENOTTY as u32)
    );
}

#[test]
fn dirty_logging_reports_device_writes() {
    let f = Fixture::default();
    let mut c = f.ready();
    let (mem, _) = sized_memfd("dirty", 0x10000, true);
    map(&mut c, 0x100000, 0x10000, Some(&mem), 0).unwrap();
    // GET_DIRTY_BITMAP without logging: EINVAL
    let unmap_dirty = Request::DmaUnmap(proto::DmaUnmap {
        argsz: 24 + 16 + 8,
        address: 0x100000,
        size: 0x10000,
        kind: proto::UnmapKind::DirtyBitmap {
            pgsize: 4096,
            size: 8,
        },
    });
    assert_eq!(c.call(&unmap_dirty), Err(libc::EINVAL as u32));
    let feature = |request| {
        Request::DeviceFeature(proto::DeviceFeature {
            argsz: 256,
            request,
        })
    };
    c.call(&feature(proto::FeatureRequest::DmaLoggingStart(
        proto::DmaLoggingStart {
            page_size: 4096,
            ranges: vec![proto::DmaLoggingRange {
                iova: 0x100000,
                length: 0x10000,
            }],
        },
    )))
    .unwrap();
    f.dma.write(0x100000 + 0x3000, b"x").unwrap();
    let body = c
        .call(&feature(proto::FeatureRequest::DmaLoggingReport(
            proto::DmaLoggingReport {
                iova: 0x100000,
                length: 0x10000,
                page_size: 4096,
            },
        )))
        .unwrap();
    // argsz, flags, iova, length, page_size, then the bitmap
    let bitmap = u64::from_ne_bytes(body[32..40].try_into().unwrap());
    assert_eq!(bitmap, 1 << 3);
    f.dma.write(0x100000 + 0x5000, b"y").unwrap();
    let body = c.call(&unmap_dirty).unwrap();
    let bitmap = u64::from_ne_bytes(body[40..48].try_into().unwrap());
    assert_eq!(bitmap, 1 << 5);
    assert!(f.dma.is_empty());
    c.call(&feature(proto::FeatureRequest::DmaLoggingStop))
        .unwrap();
    assert_eq!(
        c.call(&feature(proto::FeatureRequest::DmaLoggingStop)),
        Err(libc::EINVAL as u32)
    );
}

#[test]
fn stopping_the_server_disconnects_and_removes_the_socket() {
    let mut f = Fixture::default();
    let mut c = f.ready();
    f.server.take().unwrap().stop().unwrap();
    assert!(c.closed());
    assert!(!f.path.exists());
    assert_eq!(f.log.lock().unwrap().closes, 1);
}

#[test]
fn replies_larger_than_the_socket_buffer_wait_for_epollout() {
    let f = Fixture::default();
    let mut c = f.ready();
    let mut all = Vec::new();
    let n = 200u16;
    for id in 0..n {
        let body = Request::RegionRead(proto::RegionAccess {
            offset: 0,
            region: 0,
            count: 4096,
        })
        .to_body()
        .unwrap();
        all.extend(proto::command_message(id, Command::RegionRead, false, &body).unwrap());
    }
    c.write_all(&all);
    // Let the server fill the socket before we read anything.
    std::thread::sleep(Duration::from_millis(100));
    for id in 0..n {
        let m = c.recv().unwrap();
        assert_eq!((m.header.msg_id, m.body.len()), (id, 16 + 4096));
    }
}

#[test]
fn a_client_that_never_reads_is_dropped() {
    let f = Fixture::default();
    let mut c = f.ready();
    let body = Request::RegionRead(proto::RegionAccess {
        offset: 0,
        region: 0,
        count: 4096,
    })
    .to_body()
    .unwrap();
    let one = proto::command_message(1, Command::RegionRead, false, &body).unwrap();
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 512).collect();
    c.sock
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 16 MiB of output is the least the server queues; ask for far more.
    for _ in 0..40 {
        if std::io::Write::write_all(&mut c.sock, &batch).is_err() {
            break;
        }
    }
    f.wait("dropped", |l| l.closes == 1);
}

/// Run `name` alone in a child process of this test binary, so that the
/// descriptor table is not shared with tests running in parallel.
fn run_alone(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--ignored", "--test-threads=1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_descriptor_leaks_across_sessions() {
    run_alone("server::tests::no_descriptor_leaks_across_sessions_alone");
}

#[test]
#[ignore = "run in a child process by no_descriptor_leaks_across_sessions"]
fn no_descriptor_leaks_across_sessions_alone() {
    let count = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let f = Fixture::default();
    let before = count();
    for round in 1..=3u32 {
        let mut c = f.ready();
        let (mem, _) = sized_memfd("leak", 0x4000, true);
        map(&mut c, 0, 0x4000, Some(&mem), 0).unwrap();
        map(&mut c, 0x10000, 0x1000, None, 0).unwrap();
        let efds: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
        let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
        c.call_with(
            &Request::DeviceSetIrqs(proto::SetIrqs {
                argsz: 20,
                index: 2,
                start: 0,
                count: 4,
                action: proto::IrqAction::Trigger,
                data: proto::IrqData::Eventfd,
            }),
            &raw,
        )
        .unwrap();
        // Refused descriptors are closed too.
        let _ = c.call_with(
            &Request::DeviceGetInfo(proto::DeviceInfoRequest { argsz: 16 }),
            &raw,
        );
        let (_, fds) = c
            .call_with(
                &Request::DeviceGetRegionInfo(proto::RegionInfoRequest {
                    argsz: 256,
                    index: 0,
                }),
                &[],
            )
            .unwrap();
        assert_eq!(fds.len(), 1);
        drop(fds);
        drop((mem, efds));
        drop(c);
        f.wait("session end", |l| l.closes == round);
        assert_eq!(count(), before, "descriptors leaked in round {round}");
    }
}

#[test]
fn unmapping_a_range_a_worker_waits_on_does_not_wait_for_the_worker() {
    let options = ServerOptions {
        dma_timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    };
    let f = Fixture::new(options, false);
    let mut c = f.ready();
    map(&mut c, 0x1000, 0x1000, None, 0).unwrap();
    let dma = f.dma.clone();
    let worker = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        dma.read(0x1000, &mut b).is_err()
    });
    let m = c.recv().unwrap();
    assert_eq!(m.header.command, Command::DmaRead as u16);
    // We never answer the DMA_READ; the unmap must still complete at once.
    let t0 = Instant::now();
    unmap(&mut c, 0x1000, 0x1000).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(worker.join().unwrap(), "the worker's read failed");
    // Our late reply is accepted quietly and the session goes on.
    let reply = proto::reply_message(&m.header, &{
        let mut b = Vec::new();
        proto::DmaData {
            address: 0x1000,
            data: &[0; 8],
        }
        .encode(&mut b);
        b
    })
    .unwrap();
    c.send_raw(&reply, &[]);
    assert!(region_read(&mut c, 7, 0, 4).is_ok());
}

/// The sample's DMA engine, on its worker thread, reads client memory
/// that was mapped without a descriptor: the server relays it as
/// DMA_READ messages to us while it keeps answering our region reads.
#[test]
fn sample_dma_through_message_backed_memory() {
    use crate::kinds::DeviceType;
    use crate::kinds::sample::{Sample, SampleOptions};
    use vdevd_devices::sample::regs;

    let dir = TempDir::new("sample-dma");
    let path = dir.path().join("s.sock");
    let server = DeviceServer::serve(&path, ServerOptions::default(), |dma| {
        Sample::build(SampleOptions::default(), dma)
    })
    .unwrap();
    let mut c = Client::connect(&path);
    c.version();
    c.call(&Request::DmaMap(proto::DmaMap {
        argsz: 32,
        read: true,
        write: true,
        offset: 0,
        address: 0x100000,
        size: 0x10000,
    }))
    .unwrap();
    let write = |c: &mut Client, region: u32, offset: u64, data: &[u8]| {
        c.call(&Request::RegionWrite(proto::RegionData {
            offset,
            region,
            data,
        }))
        .unwrap();
    };
    // bus master and memory decode
    write(&mut c, 7, 4, &6u16.to_le_bytes());
    write(&mut c, 0, regs::DMA_SRC, &0x100000u64.to_le_bytes());
    write(&mut c, 0, regs::DMA_DST, &0x10u64.to_le_bytes());
    write(&mut c, 0, regs::DMA_COUNT, &8u32.to_le_bytes());
    let body = Request::RegionWrite(proto::RegionData {
        offset: regs::DMA_CMD,
        region: 0,
        data: &1u32.to_le_bytes(),
    })
    .to_body()
    .unwrap();
    let id = c.send(Command::RegionWrite, &body, &[], false);
    // Answer the engine's DMA_READ; the REGION_WRITE reply comes too, in
    // whichever order.
    let pattern = *b"vdevd-ok";
    let (mut served, mut acked) = (false, false);
    while !(served && acked) {
        let m = c.recv().unwrap();
        if m.header.is_reply() {
            assert_eq!(m.header.msg_id, id);
            acked = true;
            continue;
        }
        let req = proto::parse_server_request(m.header.command().unwrap(), &m.body).unwrap();
        let proto::ServerRequest::DmaRead(a) = req else {
            panic!("unexpected {req:?}");
        };
        assert_eq!((a.address, a.count), (0x100000, 8));
        let mut b = Vec::new();
        proto::DmaData {
            address: a.address,
            data: &pattern,
        }
        .encode(&mut b);
        c.send_raw(&proto::reply_message(&m.header, &b).unwrap(), &[]);
        served = true;
    }
    let read = |c: &mut Client, region: u32, offset: u64, count: u32| {
        let b = c
            .call(&Request::RegionRead(proto::RegionAccess {
                offset,
                region,
                count,
            }))
            .unwrap();
        b[16..].to_vec()
    };
    let t0 = std::time::Instant::now();
    while read(&mut c, 0, regs::DMA_STATUS, 4)[0] != 2 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "DMA not done"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(read(&mut c, 2, 0x10, 8), pattern);
    drop(c);
    server.stop().unwrap();
}

/// The `vfio_user` crate's client (cloud-hypervisor's) against the sample
/// device: negotiation, region discovery with the sparse-mmap retry and
/// its descriptor, region access, DMA map/unmap with a memfd, interrupts.
#[test]
fn the_vfio_user_crates_client_drives_the_sample_device() {
    use crate::kinds::DeviceType;
    use crate::kinds::sample::{Sample, SampleOptions};
    use vdevd_devices::sample::regs;

    let dir = TempDir::new("vfio-user-crate");
    let path = dir.path().join("s.sock");
    let server = DeviceServer::serve(&path, ServerOptions::default(), |dma| {
        Sample::build(SampleOptions::default(), dma)
    })
    .unwrap();
    let mut c = vfio_user::Client::new(&path).unwrap();
    let bar2 = c.region(2).expect("BAR2");
    assert!(bar2.file_offset.is_some(), "BAR2 came with its memfd");
    assert_eq!(bar2.sparse_areas.len(), 1);
    let mut id = [0u8; 4];
    c.region_read(7, 0, &mut id).unwrap();
    assert_eq!(id, [0x34, 0x12, 0x44, 0x53]);
    c.region_write(0, regs::LIVENESS, &0x1234_5678u32.to_le_bytes())
        .unwrap();
    let mut live = [0u8; 4];
    c.region_read(0, regs::LIVENESS, &mut live).unwrap();
    assert_eq!(u32::from_le_bytes(live), !0x1234_5678u32);

    let (mem, name) = sized_memfd("vfio-user-crate", 0x10000, true);
    c.dma_map(0, 0x100000, 0x10000, mem.as_raw_fd()).unwrap();
    let efd = eventfd();
    c.set_irqs(
        vfio::VFIO_PCI_MSIX_IRQ_INDEX,
        vfio::VFIO_IRQ_SET_DATA_EVENTFD | vfio::VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[efd.as_raw_fd()],
    )
    .unwrap();
    c.dma_unmap(0x100000, 0x10000).unwrap();
    drop(mem);
    c.shutdown().unwrap();
    drop(c);
    let t0 = Instant::now();
    while open_fds_named(&name) > 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "memfd still open");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.stop().unwrap();
}

/// Found by the `dispatch` fuzz target: DMA_LOGGING_START of a huge range
/// at a tiny page size made the server allocate a bitmap of terabytes and
/// abort. The bitmaps are now capped and the page size checked.
#[test]
fn dirty_logging_of_a_huge_range_is_refused_not_allocated() {
    let f = Fixture::default();
    let mut c = f.ready();
    let start = |page_size, iova, length| {
        Request::DeviceFeature(proto::DeviceFeature {
            argsz: 256,
            request: proto::FeatureRequest::DmaLoggingStart(proto::DmaLoggingStart {
                page_size,
                ranges: vec![proto::DmaLoggingRange { iova, length }],
            }),
        })
    };
    // The crash's numbers: page size 1, 2^46 bytes.
    assert_eq!(
        c.call(&start(1, 0, 1 << 46)),
        Err(libc::EINVAL as u32),
        "a page size below 4096"
    );
    // 4 KiB pages over 2^62 bytes: 2^50 bits, far above the cap.
    assert_eq!(
        c.call(&start(4096, 0, 1 << 62)),
        Err(libc::E2BIG as u32),
        "a bitmap above the cap"
    );
    assert!(!f.dma.dirty_logging());
    // A sane request still works.
    c.call(&start(4096, 0, 1 << 30)).unwrap();
    assert!(f.dma.dirty_logging());
}
