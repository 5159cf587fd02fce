//! Interoperability with an independent implementation: the `vfio_user`
//! crate (used by cloud-hypervisor).
//!
//! * Its `Client` talks to a minimal server whose every message is parsed
//!   and encoded by this crate: what the client sends must parse, and what
//!   this crate encodes (capability JSON, region info with a sparse mmap
//!   capability and the argsz retry, the DMA_UNMAP echo, ...) must satisfy
//!   the client, which reads fixed sizes and would hang or fail otherwise.
//! * Its `Server` answers requests encoded by this crate, and this crate
//!   parses its replies.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vdevd_protocol::vfio::*;
use vdevd_protocol::{
    Capabilities, Command, DeviceInfo, DeviceInfoRequest, DmaMap, DmaUnmap, Fit, HEADER_SIZE,
    Header, IrqAction, IrqData, IrqInfo, IrqInfoRequest, RegionAccess, RegionCap, RegionData,
    RegionInfo, RegionInfoRequest, Reply, Request, SetIrqs, SparseArea, UnmapKind, Version,
    command_message, parse_reply, parse_request, reply_message,
};

const TIMEOUT: Duration = Duration::from_secs(30);

fn socket_path(name: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("vdevd-protocol-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Read one whole message; `None` at end of stream.
fn read_message(stream: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_SIZE];
    stream.read_exact(&mut head).ok()?;
    let header = Header::parse(&head).expect("header parses");
    let mut body = vec![0; header.body_len()];
    stream.read_exact(&mut body).expect("body");
    Some((header, body))
}

/// Config space of the fake device: vendor 0x1234, device 0x5678.
fn config_space() -> Vec<u8> {
    let mut config = vec![0u8; 256];
    config[..4].copy_from_slice(&[0x34, 0x12, 0x78, 0x56]);
    config
}

fn region(index: u32) -> RegionInfo {
    match index {
        VFIO_PCI_BAR0_REGION_INDEX => RegionInfo {
            index,
            flags: VFIO_REGION_INFO_FLAG_READ
                | VFIO_REGION_INFO_FLAG_WRITE
                | VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x4000,
            offset: 0,
            caps: vec![RegionCap::SparseMmap(vec![
                SparseArea {
                    offset: 0x1000,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x3000,
                    size: 0x1000,
                },
            ])],
        },
        VFIO_PCI_CONFIG_REGION_INDEX => RegionInfo {
            index,
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            size: 256,
            offset: 0,
            caps: vec![],
        },
        _ => RegionInfo {
            index,
            flags: 0,
            size: 0,
            offset: 0,
            caps: vec![],
        },
    }
}

/// The reply body this crate's encoders produce for `request`.
fn answer(request: Request<'_>) -> Vec<u8> {
    let config = config_space();
    let mut out = Vec::new();
    match request {
        Request::Version(_) => Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities {
                max_msg_fds: 16,
                ..Capabilities::default()
            },
        }
        .encode(&mut out),
        Request::DeviceGetInfo(_) => DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        }
        .encode(&mut out),
        Request::DeviceGetRegionInfo(r) => {
            region(r.index).encode(r.argsz, &mut out).expect("encodes");
        }
        Request::DeviceGetIrqInfo(r) => IrqInfo {
            flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            index: r.index,
            count: if r.index == VFIO_PCI_MSIX_IRQ_INDEX {
                8
            } else {
                1
            },
        }
        .encode(&mut out),
        Request::DmaUnmap(u) => {
            assert_eq!(u.encode_reply(None, &mut out), Ok(Fit::Full));
        }
        Request::RegionRead(a) => {
            let start = a.offset as usize;
            RegionData {
                offset: a.offset,
                region: a.region,
                data: &config[start..start + a.count as usize],
            }
            .encode(&mut out)
            .expect("encodes");
        }
        Request::RegionWrite(w) => RegionAccess {
            offset: w.offset,
            region: w.region,
            count: w.data.len() as u32,
        }
        .encode(&mut out),
        Request::DmaMap(_) | Request::DeviceSetIrqs(_) | Request::DeviceReset => {}
        other => panic!("unexpected request {other:?}"),
    }
    out
}

/// Serve one client; return every request message received.
fn serve(listener: UnixListener) -> Vec<(Header, Vec<u8>)> {
    let (mut stream, _) = listener.accept().expect("accept");
    let mut seen = Vec::new();
    while let Some((header, body)) = read_message(&mut stream) {
        let command = header.command().expect("known command");
        let request = parse_request(command, &body)
            .unwrap_or_else(|e| panic!("{command:?} from the vfio_user client: {e}"));
        let reply = reply_message(&header, &answer(request)).expect("reply");
        stream.write_all(&reply).expect("send reply");
        seen.push((header, body));
    }
    seen
}

#[test]
fn vfio_user_client_against_this_crates_encoders() {
    let path = socket_path("client");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || serve(listener));

    let (tx, rx) = mpsc::channel();
    let client_path = path.clone();
    thread::spawn(move || {
        let result = (|| -> Result<_, vfio_user::Error> {
            let mut client = vfio_user::Client::new(&client_path)?;
            let bar0 = client.region(0).map(|r| {
                (
                    r.flags,
                    r.size,
                    r.sparse_areas
                        .iter()
                        .map(|a| (a.offset, a.size))
                        .collect::<Vec<_>>(),
                )
            });
            let config_size = client.region(7).map(|r| r.size);
            let memory = File::open("/dev/null").expect("/dev/null");
            client.dma_map(0, 0x10_0000, 0x20_0000, memory.as_raw_fd())?;
            let mut id = [0u8; 4];
            client.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)?;
            client.region_write(VFIO_PCI_BAR0_REGION_INDEX, 8, &[0xaa, 0xbb, 0xcc, 0xdd])?;
            let irq = client.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)?;
            client.set_irqs(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                &[memory.as_raw_fd()],
            )?;
            client.dma_unmap(0x10_0000, 0x20_0000)?;
            client.reset()?;
            client.shutdown()?;
            Ok((bar0, config_size, id, (irq.index, irq.flags, irq.count)))
        })();
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });
    let (bar0, config_size, id, irq) = rx
        .recv_timeout(TIMEOUT)
        .expect("the vfio_user client finished in time")
        .expect("the vfio_user client succeeded");
    let seen = server.join().expect("server thread");
    let _ = std::fs::remove_file(&path);

    // What the client understood of this crate's replies.
    assert_eq!(
        bar0,
        Some((
            VFIO_REGION_INFO_FLAGS_ALL,
            0x4000,
            vec![(0x1000, 0x1000), (0x3000, 0x1000)]
        ))
    );
    assert_eq!(config_size, Some(256));
    assert_eq!(id, [0x34, 0x12, 0x78, 0x56]);
    assert_eq!(irq, (2, VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 8));

    // What this crate understood of the client's requests.
    let parsed: Vec<Request<'_>> = seen
        .iter()
        .map(|(h, b)| parse_request(h.command().expect("command"), b).expect("parses"))
        .collect();
    let commands: Vec<Command> = parsed.iter().map(Request::command).collect();
    let mut expected = vec![Command::Version, Command::DeviceGetInfo];
    // BAR0 twice: the first reply is truncated to argsz 32, the client
    // retries with the argsz it was told.
    expected.extend([Command::DeviceGetRegionInfo; 10]);
    expected.extend([
        Command::DmaMap,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::DmaUnmap,
        Command::DeviceReset,
    ]);
    assert_eq!(commands, expected);

    let Request::Version(version) = &parsed[0] else {
        panic!("{:?}", parsed[0]);
    };
    assert_eq!((version.major, version.minor), (0, 1));
    assert_eq!(version.capabilities.max_msg_fds, 1);
    assert_eq!(version.capabilities.max_data_xfer_size, 1 << 20);
    assert!(version.capabilities.migration.is_some());
    assert!(version.capabilities.unknown_keys.is_empty());

    let region_requests: Vec<(u32, u32)> = parsed
        .iter()
        .filter_map(|r| match r {
            Request::DeviceGetRegionInfo(r) => Some((r.index, r.argsz)),
            _ => None,
        })
        .collect();
    assert_eq!(region_requests[..2], [(0, 32), (0, 80)]);
    assert_eq!(
        region_requests[2..],
        (1..9).map(|i| (i, 32)).collect::<Vec<_>>()[..]
    );

    assert!(parsed.contains(&Request::DmaMap(DmaMap {
        argsz: 32,
        read: true,
        write: true,
        offset: 0,
        address: 0x10_0000,
        size: 0x20_0000,
    })));
    assert!(parsed.contains(&Request::DmaUnmap(DmaUnmap {
        argsz: 24,
        address: 0x10_0000,
        size: 0x20_0000,
        kind: UnmapKind::Range,
    })));
    assert!(parsed.contains(&Request::RegionWrite(RegionData {
        offset: 8,
        region: 0,
        data: &[0xaa, 0xbb, 0xcc, 0xdd],
    })));
    assert!(parsed.contains(&Request::DeviceSetIrqs(SetIrqs {
        argsz: 20,
        index: 2,
        start: 0,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::Eventfd,
    })));
    // The crate counts the header in DEVICE_GET_INFO's argsz.
    assert!(parsed.contains(&Request::DeviceGetInfo(DeviceInfoRequest { argsz: 32 })));
}

/// Records what the vfio_user crate's server hands its backend.
#[derive(Default)]
struct Recorder {
    writes: Vec<(u32, u64, Vec<u8>)>,
    maps: Vec<(u64, u64, u64, bool)>,
    unmaps: Vec<(u64, u64)>,
    irqs: Vec<(u32, u32, u32, u32, usize)>,
    resets: usize,
}

struct Backend(Arc<Mutex<Recorder>>);

impl vfio_user::ServerBackend for Backend {
    fn region_read(&mut self, _region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (offset as u8).wrapping_add(i as u8);
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut r = self.0.lock().expect("lock");
        r.writes.push((region, offset, data.to_vec()));
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let mut r = self.0.lock().expect("lock");
        r.maps.push((offset, address, size, fd.is_some()));
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        let mut r = self.0.lock().expect("lock");
        r.unmaps.push((address, size));
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.0.lock().expect("lock").resets += 1;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        let mut r = self.0.lock().expect("lock");
        r.irqs.push((index, flags, start, count, fds.len()));
        Ok(())
    }
}

/// A client built from this crate: one request, one reply.
struct TestClient {
    stream: UnixStream,
    next_id: u16,
}

impl TestClient {
    fn call(&mut self, request: &Request<'_>) -> (Header, Vec<u8>) {
        let body = request.to_body().expect("encodes");
        let msg = command_message(self.next_id, request.command(), false, &body).expect("message");
        self.stream.write_all(&msg).expect("send");
        let (header, body) = read_message(&mut self.stream).expect("a reply");
        assert_eq!(header.msg_id, self.next_id);
        assert_eq!(header.command, u16::from(request.command()));
        assert!(header.is_reply() && !header.is_error(), "{header:?}");
        self.next_id = self.next_id.wrapping_add(1);
        (header, body)
    }
}

fn connect(path: &Path) -> UnixStream {
    for _ in 0..500 {
        if let Ok(stream) = UnixStream::connect(path) {
            return stream;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("cannot connect to {}", path.display());
}

#[test]
fn this_crates_requests_against_the_vfio_user_server() {
    let path = socket_path("server");
    let mut regions = Vec::new();
    for index in 0..VFIO_PCI_NUM_REGIONS {
        let mut region = vfio_user::ServerRegion {
            region_info: Default::default(),
            sparse_areas: Vec::new(),
            mmap_fd: None,
        };
        region.region_info.argsz = 32;
        region.region_info.index = index;
        if index == VFIO_PCI_BAR0_REGION_INDEX {
            region.region_info.flags = VFIO_REGION_INFO_FLAG_READ
                | VFIO_REGION_INFO_FLAG_WRITE
                | VFIO_REGION_INFO_FLAG_MMAP;
            region.region_info.size = 0x2000;
            let mut area = vfio_user::SparseArea {
                area: Default::default(),
            };
            area.area.offset = 0x1000;
            area.area.size = 0x1000;
            region.sparse_areas.push(area);
        }
        regions.push(region);
    }
    let irqs = (0..VFIO_PCI_NUM_IRQS)
        .map(|index| vfio_user::IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 4,
        })
        .collect();
    let server = vfio_user::Server::new(&path, true, irqs, regions).expect("server");
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let backend_recorder = Arc::clone(&recorder);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let result = server.run(&mut Backend(backend_recorder));
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });

    let mut client = TestClient {
        stream: connect(&path),
        next_id: 0,
    };
    client
        .stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("timeout");

    let (_, body) = client.call(&Request::Version(Version {
        major: 0,
        minor: 0,
        capabilities: Capabilities {
            max_msg_fds: 8,
            write_multiple: true,
            ..Capabilities::default()
        },
    }));
    let Ok(Reply::Version(version)) = parse_reply(Command::Version, &body) else {
        panic!("VERSION reply: {body:?}");
    };
    assert_eq!((version.major, version.minor), (0, 0));
    assert_eq!(version.capabilities.max_msg_fds, 1);
    assert_eq!(version.capabilities.max_data_xfer_size, 1 << 20);
    assert!(version.capabilities.migration.is_some());

    let (_, body) = client.call(&Request::DeviceGetInfo(DeviceInfoRequest { argsz: 16 }));
    assert_eq!(
        parse_reply(Command::DeviceGetInfo, &body),
        Ok(Reply::DeviceGetInfo(DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: 5,
        }))
    );

    // Region info: truncated at argsz 32 (this server sets CAPS and a
    // cap_offset in the truncated reply), then complete.
    let (_, body) = client.call(&Request::DeviceGetRegionInfo(RegionInfoRequest {
        argsz: 32,
        index: 0,
    }));
    let Ok(Reply::DeviceGetRegionInfo(reply)) = parse_reply(Command::DeviceGetRegionInfo, &body)
    else {
        panic!("region info reply: {body:?}");
    };
    let needed = reply.needed().expect("truncated");
    assert_eq!(needed, 64);
    let (_, body) = client.call(&Request::DeviceGetRegionInfo(RegionInfoRequest {
        argsz: needed,
        index: 0,
    }));
    let Ok(Reply::DeviceGetRegionInfo(reply)) = parse_reply(Command::DeviceGetRegionInfo, &body)
    else {
        panic!("region info reply: {body:?}");
    };
    assert_eq!(reply.needed(), None);
    assert_eq!(
        reply.info.caps,
        [RegionCap::SparseMmap(vec![SparseArea {
            offset: 0x1000,
            size: 0x1000
        }])]
    );
    assert_eq!(reply.info.size, 0x2000);

    let (_, body) = client.call(&Request::DeviceGetIrqInfo(IrqInfoRequest {
        argsz: 16,
        index: 2,
    }));
    assert_eq!(
        parse_reply(Command::DeviceGetIrqInfo, &body),
        Ok(Reply::DeviceGetIrqInfo(IrqInfo {
            flags: VFIO_IRQ_INFO_EVENTFD,
            index: 2,
            count: 4
        }))
    );

    let map = DmaMap {
        argsz: 32,
        read: true,
        write: true,
        offset: 0,
        address: 0xc_0000,
        size: 0x2_0000,
    };
    let (_, body) = client.call(&Request::DmaMap(map));
    assert_eq!(parse_reply(Command::DmaMap, &body), Ok(Reply::DmaMap));

    let (_, body) = client.call(&Request::RegionRead(RegionAccess {
        offset: 0x10,
        region: 0,
        count: 4,
    }));
    let Ok(Reply::RegionRead(data)) = parse_reply(Command::RegionRead, &body) else {
        panic!("REGION_READ reply: {body:?}");
    };
    assert_eq!(
        (data.offset, data.region, data.data),
        (0x10, 0, &[0x10, 0x11, 0x12, 0x13][..])
    );

    let (_, body) = client.call(&Request::RegionWrite(RegionData {
        offset: 0x20,
        region: 0,
        data: &[1, 2, 3],
    }));
    assert_eq!(
        parse_reply(Command::RegionWrite, &body),
        Ok(Reply::RegionWrite(RegionAccess {
            offset: 0x20,
            region: 0,
            count: 3
        }))
    );

    let (_, body) = client.call(&Request::DeviceSetIrqs(SetIrqs {
        argsz: 20,
        index: 2,
        start: 0,
        count: 0,
        action: IrqAction::Trigger,
        data: IrqData::None,
    }));
    assert_eq!(
        parse_reply(Command::DeviceSetIrqs, &body),
        Ok(Reply::DeviceSetIrqs)
    );

    let unmap = DmaUnmap {
        argsz: 24,
        address: 0xc_0000,
        size: 0x2_0000,
        kind: UnmapKind::Range,
    };
    let (_, body) = client.call(&Request::DmaUnmap(unmap));
    let Ok(Reply::DmaUnmap(reply)) = parse_reply(Command::DmaUnmap, &body) else {
        panic!("DMA_UNMAP reply: {body:?}");
    };
    assert_eq!(
        (reply.address, reply.size, reply.needed()),
        (0xc_0000, 0x2_0000, None)
    );

    let (_, body) = client.call(&Request::DeviceReset);
    assert_eq!(
        parse_reply(Command::DeviceReset, &body),
        Ok(Reply::DeviceReset)
    );

    drop(client);
    rx.recv_timeout(TIMEOUT)
        .expect("server finished")
        .expect("server ran without error");
    let r = recorder.lock().expect("lock");
    assert_eq!(r.writes, [(0, 0x20, vec![1, 2, 3])]);
    assert_eq!(r.maps, [(0, 0xc_0000, 0x2_0000, false)]);
    assert_eq!(r.unmaps, [(0xc_0000, 0x2_0000)]);
    assert_eq!(r.irqs, [(2, 0x21, 0, 0, 0)]);
    assert_eq!(r.resets, 1);
}
