//! Measures DMA_MAP + DMA_UNMAP round trips through a real server with 16
//! and with 65,536 live mappings (all in one sealed memfd, as QEMU's guest
//! RAM), and prints the cost per pair and the ratio.
//!
//! ```text
//! cargo run --release -p vdevd --example dma_map_scaling [PAIRS]
//! ```

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vdevd::DeviceServer;
use vdevd::options::ServerOptions;
use vdevd_devices::Error as DevError;
use vdevd_devices::device::{
    Device, DeviceInfo, IoEventFd, IrqInfo, IrqSet, Migratable, RegionInfo,
};
use vdevd_devices::dma::DmaRange;
use vdevd_protocol::{self as proto, HEADER_SIZE, Header, Request};

/// A device with nothing but a DMA address space.
struct Null;

impl Device for Null {
    fn name(&self) -> &str {
        "null"
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            num_regions: 9,
            num_irqs: 5,
            reset: false,
        }
    }
    fn region_info(&self, _index: u32) -> Result<RegionInfo, DevError> {
        Ok(RegionInfo::default())
    }
    fn region_read(&mut self, i: u32, _o: u64, _d: &mut [u8]) -> Result<(), DevError> {
        Err(DevError::NoSuchRegion(i))
    }
    fn region_write(&mut self, i: u32, _o: u64, _d: &[u8]) -> Result<(), DevError> {
        Err(DevError::NoSuchRegion(i))
    }
    fn region_io_fds(&mut self, _i: u32) -> Result<Vec<IoEventFd>, DevError> {
        Ok(Vec::new())
    }
    fn irq_info(&self, _i: u32) -> Result<IrqInfo, DevError> {
        Ok(IrqInfo::default())
    }
    fn set_irqs(&mut self, _s: IrqSet) -> Result<(), DevError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), DevError> {
        Ok(())
    }
    fn dma_map(&mut self, _r: &DmaRange) -> Result<(), DevError> {
        Ok(())
    }
    fn dma_unmap(&mut self, _r: &DmaRange) {}
    fn open(&mut self) -> Result<(), DevError> {
        Ok(())
    }
    fn close(&mut self) {}
    fn disconnect(&mut self) {}
    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        None
    }
}

struct Client {
    sock: UnixStream,
    id: u16,
}

impl Client {
    fn call(&mut self, req: &Request<'_>, fd: Option<&OwnedFd>) -> Result<(), u32> {
        let body = req.to_body().expect("encode");
        self.id = self.id.wrapping_add(1);
        let msg = proto::command_message(self.id, req.command(), false, &body).expect("encode");
        send(&self.sock, &msg, fd);
        let mut hdr = [0u8; HEADER_SIZE];
        self.sock.read_exact(&mut hdr).expect("reply");
        let h = Header::parse(&hdr).expect("header");
        let mut rest = vec![0u8; h.body_len()];
        self.sock.read_exact(&mut rest).expect("reply body");
        if h.is_error() { Err(h.error) } else { Ok(()) }
    }
}

fn send(sock: &UnixStream, msg: &[u8], fd: Option<&OwnedFd>) {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr().cast_mut().cast(),
        iov_len: msg.len(),
    };
    let mut cmsg = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        hdr.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: the control buffer (32 bytes, aligned) holds one cmsghdr
        // with one descriptor.
        let c = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
        // SAFETY: CMSG_LEN is arithmetic.
        let cmsg_len = unsafe { libc::CMSG_LEN(4) } as usize;
        let header = libc::cmsghdr {
            cmsg_len,
            cmsg_level: libc::SOL_SOCKET,
            cmsg_type: libc::SCM_RIGHTS,
        };
        // SAFETY: c points to the start of our aligned 32-byte buffer.
        unsafe { c.write(header) };
        // SAFETY: c is the valid header just written.
        let data = unsafe { libc::CMSG_DATA(c) };
        let raw = fd.as_raw_fd().to_ne_bytes();
        // SAFETY: the data area after the header has room for 4 bytes.
        unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), data, 4) };
    }
    // SAFETY: hdr points to valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_fd().as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    assert_eq!(n, msg.len() as isize, "sendmsg");
}

fn map(iova: u64, offset: u64) -> Request<'static> {
    Request::DmaMap(proto::DmaMap {
        argsz: 32,
        read: true,
        write: true,
        offset,
        address: iova,
        size: 4096,
    })
}

fn unmap(iova: u64) -> Request<'static> {
    Request::DmaUnmap(proto::DmaUnmap {
        argsz: 24,
        address: iova,
        size: 4096,
        kind: proto::UnmapKind::Range,
    })
}

/// Microseconds per map + unmap pair with `live` other mappings.
fn measure(live: u64, pairs: u64, mem: &OwnedFd) -> f64 {
    let dir = std::env::temp_dir().join(format!("vdevd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{live}.sock"));
    let options = ServerOptions {
        max_dma_maps: 1 << 17,
        ..ServerOptions::default()
    };
    let server = DeviceServer::serve(&path, options, |_| Ok(Box::new(Null))).expect("server");
    let mut c = Client {
        sock: UnixStream::connect(&path).expect("connect"),
        id: 0,
    };
    c.call(
        &Request::Version(proto::Version {
            major: 0,
            minor: 0,
            capabilities: proto::Capabilities::default(),
        }),
        None,
    )
    .expect("version");
    for i in 0..live {
        c.call(&map(i * 0x2000, i * 0x1000), Some(mem))
            .expect("map");
    }
    let extra = live * 0x2000 + 0x1000;
    let t0 = Instant::now();
    for _ in 0..pairs {
        c.call(&map(extra, 0), Some(mem)).expect("map");
        c.call(&unmap(extra), None).expect("unmap");
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / pairs as f64;
    drop(c);
    server.stop().expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
    us
}

fn main() {
    let pairs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let name = c"vdevd-bench";
    // SAFETY: name is NUL-terminated; flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new descriptor owned by nobody else.
    let mem = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(mem.try_clone().expect("dup"))
        .set_len(65536 * 4096)
        .expect("size");
    // SAFETY: F_ADD_SEALS with a valid seal on our descriptor.
    let rc = unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0, "seal");
    // Warm up (first connection, page cache, allocator), then measure.
    let _ = measure(16, pairs / 4 + 1, &mem);
    let small = measure(16, pairs, &mem);
    let large = measure(65536, pairs, &mem);
    println!("DMA_MAP+DMA_UNMAP round trip, {pairs} pairs, fd-backed 4 KiB ranges:");
    println!("  with 16 live mappings:     {small:8.2} us/pair");
    println!("  with 65536 live mappings:  {large:8.2} us/pair");
    println!("  ratio: {:.2} (target: at most 1.5)", large / small);
}
