//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system's temporary directory.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vdevd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A memfd with a name unique in this process, and that name.
pub fn memfd(tag: &str) -> (std::os::fd::OwnedFd, String) {
    use std::os::fd::FromRawFd;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("vdevd-test-{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let c = std::ffi::CString::new(name.clone()).unwrap();
    // SAFETY: c is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a new descriptor owned by nobody else.
    (unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, name)
}

/// Number of descriptors of this process open on the memfd called `name`.
pub fn open_fds_named(name: &str) -> usize {
    let want = format!("/memfd:{name} (deleted)");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.as_os_str() == want.as_str())
                .unwrap_or(false)
        })
        .count()
}

pub use fake::{Client, FakeDevice, FakeLog};

mod fake {
    //! A small device and a wire-level client for the server tests.

    use std::io::{Read, Write};
    use std::os::fd::{AsFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use vdevd_devices::Error as DevError;
    use vdevd_devices::device::{
        Device, DeviceInfo, IoEventFd, IrqAction, IrqData, IrqFd, IrqInfo, IrqSet, Migratable,
        MmapArea, RegionInfo, RegionMmap,
    };
    use vdevd_devices::dma::DmaRange;
    use vdevd_protocol::{self as proto, Command, HEADER_SIZE, Header, Request};

    use crate::wire::{cmsg_buffer, recv_with_fds, send_with_fds};

    /// What the fake device was asked to do.
    #[derive(Debug, Default)]
    pub struct FakeLog {
        pub maps: Vec<DmaRange>,
        pub unmaps: Vec<DmaRange>,
        pub opens: u32,
        pub closes: u32,
        pub disconnects: u32,
        pub resets: u32,
        /// (index, start, count, action, eventfds given)
        pub irq_sets: Vec<(u32, u32, u32, IrqAction, usize)>,
        /// Number of live ranges the device knows when each unmap starts.
        pub live_ranges: usize,
        pub loaded: Option<Vec<u8>>,
        pub stopped: bool,
        /// Make `open` fail (a device in a bad state).
        pub fail_open: bool,
    }

    /// BAR0: 4 KiB read/write, mmappable at [0x800, 0x1000) from a memfd;
    /// BAR1: 16 bytes read-only; config space: 256 bytes. MSI-X: 4 vectors.
    pub struct FakeDevice {
        pub log: Arc<Mutex<FakeLog>>,
        bar0: Vec<u8>,
        config: Vec<u8>,
        msix: Vec<Option<IrqFd>>,
        mmap: Arc<OwnedFd>,
        ioeventfd: Arc<OwnedFd>,
        migratable: bool,
    }

    impl FakeDevice {
        pub fn new(migratable: bool) -> (FakeDevice, Arc<Mutex<FakeLog>>) {
            let log = Arc::new(Mutex::new(FakeLog::default()));
            let (mmap, _) = super::memfd("bar0");
            std::fs::File::from(mmap.try_clone().unwrap())
                .set_len(0x1000)
                .unwrap();
            // SAFETY: eventfd takes no pointers.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(efd >= 0);
            // SAFETY: new descriptor, owned by nobody else.
            let ioeventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
            (
                FakeDevice {
                    log: log.clone(),
                    bar0: vec![0; 0x1000],
                    config: vec![0; 256],
                    msix: (0..4).map(|_| None).collect(),
                    mmap: Arc::new(mmap),
                    ioeventfd: Arc::new(ioeventfd),
                    migratable,
                },
                log,
            )
        }

        fn region(&mut self, index: u32) -> Result<&mut Vec<u8>, DevError> {
            match index {
                0 => Ok(&mut self.bar0),
                7 => Ok(&mut self.config),
                _ => Err(DevError::NoSuchRegion(index)),
            }
        }

        /// Signal MSI-X vector `v` if armed.
        pub fn fire(&self, v: usize) -> bool {
            match self.msix.get(v) {
                Some(Some(fd)) => fd.signal().is_ok(),
                _ => false,
            }
        }
    }

    fn span(
        len: usize,
        offset: u64,
        n: usize,
        region: u32,
    ) -> Result<std::ops::Range<usize>, DevError> {
        let start = usize::try_from(offset).ok().filter(|s| *s <= len);
        match start.and_then(|s| s.checked_add(n).filter(|e| *e <= len).map(|e| s..e)) {
            Some(r) => Ok(r),
            None => Err(DevError::OutOfRange {
                region,
                offset,
                len: n as u64,
                size: len as u64,
            }),
        }
    }

    impl Device for FakeDevice {
        fn name(&self) -> &str {
            "fake"
        }
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                num_regions: 9,
                num_irqs: 5,
                reset: true,
            }
        }
        fn region_info(&self, index: u32) -> Result<RegionInfo, DevError> {
            Ok(match index {
                0 => RegionInfo {
                    size: 0x1000,
                    read: true,
                    write: true,
                    mmap: Some(RegionMmap {
                        fd: self.mmap.clone(),
                        offset: 0,
                        areas: vec![MmapArea {
                            offset: 0x800,
                            size: 0x800,
                        }],
                    }),
                    region_type: None,
                },
                1 => RegionInfo {
                    size: 16,
                    read: true,
                    ..RegionInfo::default()
                },
                7 => RegionInfo {
                    size: 256,
                    read: true,
                    write: true,
                    ..RegionInfo::default()
                },
                i if i < 9 => RegionInfo::default(),
                i => return Err(DevError::NoSuchRegion(i)),
            })
        }
        fn region_read(
            &mut self,
            index: u32,
            offset: u64,
            data: &mut [u8],
        ) -> Result<(), DevError> {
            if index == 1 {
                let r = span(16, offset, data.len(), 1)?;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (r.start + i) as u8;
                }
                return Ok(());
            }
            let reg = self.region(index)?;
            let r = span(reg.len(), offset, data.len(), index)?;
            data.copy_from_slice(&reg[r]);
            Ok(())
        }
        fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), DevError> {
            if index == 1 {
                return Err(DevError::AccessDenied {
                    region: 1,
                    access: "write",
                });
            }
            let reg = self.region(index)?;
            let r = span(reg.len(), offset, data.len(), index)?;
            reg[r].copy_from_slice(data);
            Ok(())
        }
        fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoEventFd>, DevError> {
            Ok(match index {
                0 => vec![
                    IoEventFd {
                        offset: 0x100,
                        size: 4,
                        fd: self.ioeventfd.clone(),
                        datamatch: Some(7),
                    },
                    IoEventFd {
                        offset: 0x104,
                        size: 4,
                        fd: self.ioeventfd.clone(),
                        datamatch: None,
                    },
                ],
                _ => Vec::new(),
            })
        }
        fn irq_info(&self, index: u32) -> Result<IrqInfo, DevError> {
            Ok(match index {
                0 => IrqInfo {
                    count: 1,
                    eventfd: true,
                    maskable: true,
                    automasked: true,
                    noresize: false,
                },
                2 => IrqInfo {
                    count: 4,
                    eventfd: true,
                    maskable: true,
                    automasked: false,
                    noresize: true,
                },
                i if i < 5 => IrqInfo::default(),
                i => return Err(DevError::NoSuchIrq(i)),
            })
        }
        fn set_irqs(&mut self, set: IrqSet) -> Result<(), DevError> {
            let given = match &set.data {
                IrqData::Eventfds(v) => v.iter().filter(|f| f.is_some()).count(),
                _ => 0,
            };
            self.log
                .lock()
                .unwrap()
                .irq_sets
                .push((set.index, set.start, set.count, set.action, given));
            if set.index != 2 || set.action != IrqAction::Trigger {
                return Ok(());
            }
            match set.data {
                IrqData::Eventfds(v) => {
                    if set.count == 0 {
                        self.msix.iter_mut().for_each(|f| *f = None);
                    }
                    for (i, fd) in v.into_iter().enumerate() {
                        if let Some(slot) = self.msix.get_mut(set.start as usize + i) {
                            *slot = fd;
                        }
                    }
                }
                IrqData::None if set.count == 0 => self.msix.iter_mut().for_each(|f| *f = None),
                IrqData::None => {
                    for v in set.start..set.start + set.count {
                        self.fire(v as usize);
                    }
                }
                IrqData::Bool(b) => {
                    for (i, on) in b.iter().enumerate() {
                        if *on {
                            self.fire(set.start as usize + i);
                        }
                    }
                }
            }
            Ok(())
        }
        fn reset(&mut self) -> Result<(), DevError> {
            self.log.lock().unwrap().resets += 1;
            self.bar0.iter_mut().for_each(|b| *b = 0);
            Ok(())
        }
        fn dma_map(&mut self, range: &DmaRange) -> Result<(), DevError> {
            let mut l = self.log.lock().unwrap();
            l.maps.push(*range);
            l.live_ranges += 1;
            Ok(())
        }
        fn dma_unmap(&mut self, range: &DmaRange) {
            let mut l = self.log.lock().unwrap();
            l.unmaps.push(*range);
            l.live_ranges -= 1;
        }
        fn open(&mut self) -> Result<(), DevError> {
            let mut l = self.log.lock().unwrap();
            if l.fail_open {
                return Err(DevError::BadState("the fake cannot open".into()));
            }
            l.opens += 1;
            Ok(())
        }
        fn close(&mut self) {
            self.log.lock().unwrap().closes += 1;
            self.msix.iter_mut().for_each(|f| *f = None);
            self.bar0.iter_mut().for_each(|b| *b = 0);
        }
        fn disconnect(&mut self) {
            self.log.lock().unwrap().disconnects += 1;
            self.msix.iter_mut().for_each(|f| *f = None);
        }
        fn migration(&mut self) -> Option<&mut dyn Migratable> {
            if self.migratable { Some(self) } else { None }
        }
    }

    impl Migratable for FakeDevice {
        fn stop(&mut self) -> Result<(), DevError> {
            self.log.lock().unwrap().stopped = true;
            Ok(())
        }
        fn run(&mut self) -> Result<(), DevError> {
            self.log.lock().unwrap().stopped = false;
            Ok(())
        }
        fn save(&mut self) -> Result<Vec<u8>, DevError> {
            Ok(self.bar0.clone())
        }
        fn load(&mut self, state: &[u8]) -> Result<(), DevError> {
            if state.len() != self.bar0.len() {
                return Err(DevError::InvalidArgument("wrong state size".into()));
            }
            self.bar0.copy_from_slice(state);
            self.log.lock().unwrap().loaded = Some(state.to_vec());
            Ok(())
        }
    }

    /// A received message.
    #[derive(Debug)]
    pub struct Msg {
        pub header: Header,
        pub body: Vec<u8>,
        pub fds: Vec<OwnedFd>,
    }

    /// A blocking wire-level client, reading like QEMU: a header (with any
    /// descriptors), then the body.
    pub struct Client {
        pub sock: UnixStream,
        next_id: u16,
    }

    impl Client {
        pub fn connect(path: &Path) -> Client {
            let sock = UnixStream::connect(path).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Client { sock, next_id: 0 }
        }

        /// Send a command; returns its id.
        pub fn send(
            &mut self,
            command: Command,
            body: &[u8],
            fds: &[RawFd],
            no_reply: bool,
        ) -> u16 {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let bytes = proto::command_message(id, command, no_reply, body).unwrap();
            self.send_raw(&bytes, fds);
            id
        }

        /// Send a command given by number (valid or not); returns its id.
        pub fn send_raw_command(&mut self, command: u16, body: &[u8]) -> u16 {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let h = Header {
                msg_id: id,
                command,
                size: (HEADER_SIZE + body.len()) as u32,
                flags: 0,
                error: 0,
            };
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(body);
            self.send_raw(&bytes, &[]);
            id
        }

        pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) {
            let mut cmsg = cmsg_buffer(fds.len().max(1));
            let n = send_with_fds(
                self.sock.as_fd(),
                &[std::io::IoSlice::new(bytes)],
                fds,
                &mut cmsg,
            )
            .unwrap();
            assert_eq!(n, bytes.len());
        }

        /// The next message, or None at EOF.
        pub fn recv(&mut self) -> Option<Msg> {
            let mut hdr = [0u8; HEADER_SIZE];
            let mut cmsg = cmsg_buffer(16);
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
            assert_eq!(rc, 1, "no message within 10 s");
            let (n, fds, _) = recv_with_fds(self.sock.as_fd(), &mut hdr, &mut cmsg).unwrap();
            if n == 0 {
                return None;
            }
            if n < HEADER_SIZE {
                self.sock.read_exact(&mut hdr[n..]).unwrap();
            }
            let header = Header::parse(&hdr).unwrap();
            let mut body = vec![0u8; header.body_len()];
            self.sock.read_exact(&mut body).unwrap();
            Some(Msg { header, body, fds })
        }

        /// Send a request and wait for its reply: Ok(body, fds) or
        /// Err(errno).
        pub fn call_with(
            &mut self,
            req: &Request<'_>,
            fds: &[RawFd],
        ) -> Result<(Vec<u8>, Vec<OwnedFd>), u32> {
            let body = req.to_body().unwrap();
            let id = self.send(req.command(), &body, fds, false);
            let m = self.recv().expect("connection closed");
            assert_eq!(m.header.msg_id, id, "reply id");
            assert!(m.header.is_reply());
            if m.header.is_error() {
                assert!(m.fds.is_empty());
                return Err(m.header.error);
            }
            Ok((m.body, m.fds))
        }

        pub fn call(&mut self, req: &Request<'_>) -> Result<Vec<u8>, u32> {
            self.call_with(req, &[]).map(|(b, _)| b)
        }

        /// Negotiate like QEMU 11.1.
        pub fn version(&mut self) -> proto::Capabilities {
            let caps = proto::Capabilities::from_json(
                "{\"capabilities\":{\"pgsizes\":4096,\"max_msg_fds\":16,\"max_dma_maps\":65535,\
                 \"max_data_xfer_size\":1048576,\"migration\":{\"max_bitmap_size\":268435456,\
                 \"pgsize\":4096},\"write_multiple\":true}}",
            )
            .unwrap();
            let body = self
                .call(&Request::Version(proto::Version {
                    major: 0,
                    minor: 0,
                    capabilities: caps,
                }))
                .expect("VERSION");
            proto::Version::parse(&body).unwrap().capabilities
        }

        /// Whether the server closed the connection (reads until EOF,
        /// failing on any data).
        pub fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.sock.read(&mut b), Ok(0))
                || matches!(self.sock.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
        }

        pub fn write_all(&mut self, bytes: &[u8]) {
            self.sock.write_all(bytes).unwrap();
        }
    }
}
