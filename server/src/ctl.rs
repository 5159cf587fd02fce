//! The control socket: external users of devices.
//!
//! A management process (or `vdevd ctl`) connects to the control socket
//! (`--ctl-socket PATH`) and takes references on devices by name. While a
//! reference is held the device stays open, so its state survives the VMM
//! disconnecting and reconnecting (the client's interrupt descriptors and
//! DMA mappings still go with the client). This is vdevd's form of the
//! kernel's external users of a VFIO group or device.
//!
//! The protocol is one line per request, one line per reply:
//!
//! ```text
//! add NAME        take a reference; the device is opened if needed
//! del NAME        drop a reference this connection took
//! status [NAME]   the status of one device, or of all
//!
//! ok JSON                       (the device's status, or an array)
//! error ERRNO MESSAGE           (ERRNO a number, e.g. 2 for no such device)
//! ```
//!
//! Every use starts with `add` and ends with `del`. References belong to
//! the connection: when the holder closes it (or dies), every reference it
//! still holds is dropped and that is logged. Taking a reference opens the
//! device, which fails with the device's own error (for a passthrough
//! device: no IOMMU, a group that is not viable, ...) and then no
//! reference is held.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::error::Error;
use crate::listener::Listener;
use crate::server::{CtlOp, DeviceHandle, DeviceStatus};

/// Longest request line accepted.
pub const MAX_LINE: usize = 512;
/// Control connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// References one connection may hold.
pub const MAX_REFS_PER_CONNECTION: usize = 1024;

/// How long a reply may wait for the holder to read.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_FIRST_CONN: u64 = 2;

struct Conn {
    sock: UnixStream,
    buf: Vec<u8>,
    holder: String,
    /// Device name -> references held through this connection.
    held: HashMap<String, usize>,
}

/// The control socket server, on a thread of its own. Dropping it stops it
/// (held references are dropped).
#[derive(Debug)]
pub struct CtlServer {
    path: Option<PathBuf>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl CtlServer {
    /// Serve the devices of `handles` (by name) on `listener`.
    pub fn start(listener: Listener, handles: Vec<DeviceHandle>) -> Result<CtlServer, Error> {
        let mut devices = HashMap::new();
        for h in handles {
            if devices.contains_key(h.name()) {
                return Err(Error::Config(format!(
                    "two devices are named {:?}; name them (name = \"...\") to use the \
                     control socket",
                    h.name()
                )));
            }
            devices.insert(h.name().to_string(), h);
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (stop.as_raw_fd(), TOKEN_STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| Error::io("epoll_ctl", e))?;
        }
        let path = listener.path().map(Path::to_path_buf);
        let mut state = CtlThread {
            epoll,
            listener,
            devices,
            conns: HashMap::new(),
            next: TOKEN_FIRST_CONN,
        };
        let thread = std::thread::Builder::new()
            .name("vdevd-ctl".into())
            .spawn(move || state.run())
            .map_err(|e| Error::io("spawn the control thread", e))?;
        Ok(CtlServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path, if bound.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct CtlThread {
    epoll: Epoll,
    listener: Listener,
    devices: HashMap<String, DeviceHandle>,
    conns: HashMap<u64, Conn>,
    next: u64,
}

/// The peer's pid, for logs.
fn peer_pid(sock: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred is a writable ucred of `len` bytes; the descriptor is a
    // connected Unix socket owned by `sock`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.pid)
}

impl CtlThread {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("control socket: epoll_wait: {e}");
                    break;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_STOP => {
                        let tokens: Vec<u64> = self.conns.keys().copied().collect();
                        for t in tokens {
                            self.close(t, "vdevd is stopping");
                        }
                        return;
                    }
                    TOKEN_LISTENER => self.accept(),
                    t => self.readable(t),
                }
            }
        }
    }

    fn accept(&mut self) {
        let sock = match self.listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            let mut s = sock;
            let _ = s.write_all(
                format!("error {} too many control connections\n", libc::EMFILE).as_bytes(),
            );
            log::warn!("control socket: refused a connection ({MAX_CONNECTIONS} open)");
            return;
        }
        // A holder that stops reading its replies cannot stall the control
        // thread: a reply that cannot be sent in time ends its connection.
        if let Err(e) = sock.set_write_timeout(Some(REPLY_TIMEOUT)) {
            log::warn!("control socket: SO_SNDTIMEO: {e}");
            return;
        }
        let token = self.next;
        self.next = self.next.wrapping_add(1).max(TOKEN_FIRST_CONN);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            sock.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::warn!("control socket: epoll_ctl: {e}");
            return;
        }
        let holder = match peer_pid(&sock) {
            Some(pid) => format!("ctl#{} (pid {pid})", token - 1),
            None => format!("ctl#{}", token - 1),
        };
        log::debug!("control socket: {holder} connected");
        self.conns.insert(
            token,
            Conn {
                sock,
                buf: Vec::new(),
                holder,
                held: HashMap::new(),
            },
        );
    }

    fn readable(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let mut chunk = [0u8; 1024];
        let n = match c.sock.read(&mut chunk) {
            Ok(0) => {
                self.close(token, "the holder closed the connection");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                self.close(token, &format!("receive: {e}"));
                return;
            }
        };
        c.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        loop {
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            let Some(end) = c.buf.iter().position(|b| *b == b'\n') else {
                if c.buf.len() > MAX_LINE {
                    let _ = c.sock.write_all(
                        format!("error {} request line too long\n", libc::E2BIG).as_bytes(),
                    );
                    self.close(token, "request line too long");
                }
                return;
            };
            let line: Vec<u8> = c.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let reply = self.handle(token, &line);
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            // Control replies are short; the socket blocks for them, up to
            // REPLY_TIMEOUT.
            let _ = c.sock.set_nonblocking(false);
            let r = c.sock.write_all(reply.as_bytes());
            let _ = c.sock.set_nonblocking(true);
            if let Err(e) = r {
                self.close(token, &format!("send: {e}"));
                return;
            }
        }
    }

    fn handle(&mut self, token: u64, line: &str) -> String {
        match self.request(token, line) {
            Ok(json) => format!("ok {json}\n"),
            Err(e) => {
                let text = e.to_string().replace('\n', " ");
                format!("error {} {text}\n", e.errno())
            }
        }
    }

    fn device(&self, name: Option<&str>) -> Result<&DeviceHandle, Error> {
        let name = name.ok_or_else(|| Error::InvalidArgument("a device name is needed".into()))?;
        self.devices
            .get(name)
            .ok_or_else(|| Error::NoSuchDevice(name.to_string()))
    }

    fn request(&mut self, token: u64, line: &str) -> Result<String, Error> {
        let holder = self
            .conns
            .get(&token)
            .map(|c| c.holder.clone())
            .unwrap_or_default();
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or("");
        let name = words.next();
        if words.next().is_some() {
            return Err(Error::InvalidArgument(format!(
                "too many words in {line:?}"
            )));
        }
        let to_json = |s: &DeviceStatus| serde_json::to_string(s).unwrap_or_default();
        match verb {
            "add" => {
                let held: usize = self
                    .conns
                    .get(&token)
                    .map(|c| c.held.values().sum())
                    .unwrap_or(0);
                if held >= MAX_REFS_PER_CONNECTION {
                    return Err(Error::InvalidState(format!(
                        "this connection already holds {held} references"
                    )));
                }
                let h = self.device(name)?;
                let dev = h.name().to_string();
                let status = h.request(CtlOp::AddRef, &holder)?;
                if let Some(c) = self.conns.get_mut(&token) {
                    *c.held.entry(dev).or_insert(0) += 1;
                }
                Ok(to_json(&status))
            }
            "del" => {
                let h = self.device(name)?;
                let dev = h.name().to_string();
                let holds = self
                    .conns
                    .get(&token)
                    .and_then(|c| c.held.get(&dev))
                    .copied()
                    .unwrap_or(0);
                if holds == 0 {
                    return Err(Error::InvalidState(format!(
                        "this connection holds no reference on {dev}"
                    )));
                }
                let status = h.request(CtlOp::DelRef, &holder)?;
                if let Some(c) = self.conns.get_mut(&token) {
                    if holds == 1 {
                        c.held.remove(&dev);
                    } else {
                        c.held.insert(dev, holds - 1);
                    }
                }
                Ok(to_json(&status))
            }
            "status" => match name {
                Some(_) => Ok(to_json(
                    &self.device(name)?.request(CtlOp::Status, &holder)?,
                )),
                None => {
                    let mut names: Vec<&String> = self.devices.keys().collect();
                    names.sort();
                    let mut all = Vec::new();
                    for n in names {
                        if let Some(h) = self.devices.get(n) {
                            all.push(h.request(CtlOp::Status, &holder)?);
                        }
                    }
                    Ok(serde_json::to_string(&all).unwrap_or_default())
                }
            },
            "" => Err(Error::InvalidArgument("empty request".into())),
            other => Err(Error::InvalidArgument(format!(
                "unknown request {other:?} (add NAME, del NAME, status [NAME])"
            ))),
        }
    }

    /// The connection is gone: drop every reference it holds.
    fn close(&mut self, token: u64, why: &str) {
        let Some(c) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.sock.as_raw_fd(),
            EpollEvent::default(),
        );
        let total: usize = c.held.values().sum();
        if total > 0 {
            log::info!(
                "control socket: {} gone ({why}): dropping its {total} reference(s)",
                c.holder
            );
        } else {
            log::debug!("control socket: {} gone ({why})", c.holder);
        }
        for (dev, n) in c.held {
            let Some(h) = self.devices.get(&dev) else {
                continue;
            };
            for _ in 0..n {
                if let Err(e) = h.request(CtlOp::DelRef, &c.holder) {
                    log::warn!("control socket: dropping a reference on {dev}: {e}");
                }
            }
        }
    }
}

/// A client of the control socket (what `vdevd ctl` uses).
#[derive(Debug)]
pub struct CtlClient {
    reader: BufReader<UnixStream>,
}

impl CtlClient {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<CtlClient, Error> {
        let sock = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connect to {}", path.display()), e))?;
        Ok(CtlClient {
            reader: BufReader::new(sock),
        })
    }

    /// Send one request line; the reply's JSON, or the error it carries
    /// (errno and message).
    pub fn request(&mut self, line: &str) -> Result<String, (i32, String)> {
        let io_err = |e: io::Error| (e.raw_os_error().unwrap_or(libc::EIO), e.to_string());
        let sock = self.reader.get_mut();
        sock.write_all(format!("{line}\n").as_bytes())
            .map_err(io_err)?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).map_err(io_err)?;
        if n == 0 {
            return Err((libc::ECONNRESET, "the control socket closed".into()));
        }
        let reply = reply.trim_end();
        if let Some(json) = reply.strip_prefix("ok ") {
            return Ok(json.to_string());
        }
        let rest = reply.strip_prefix("error ").unwrap_or(reply);
        let (errno, text) = rest.split_once(' ').unwrap_or((rest, ""));
        Err((errno.parse().unwrap_or(libc::EIO), text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devset::DeviceSets;
    use crate::options::ServerOptions;
    use crate::server::{DeviceServer, dma_space};
    use crate::testutil::{Client, FakeDevice, FakeLog, TempDir};
    use vdevd_protocol::{self as proto, Request};

    fn status(json: &str) -> serde_json::Value {
        serde_json::from_str(json).unwrap()
    }

    struct Bed {
        _dir: TempDir,
        server: Option<DeviceServer>,
        ctl: Option<CtlServer>,
        dev_sock: PathBuf,
        ctl_sock: PathBuf,
        log: Arc<std::sync::Mutex<FakeLog>>,
    }

    fn bed(open_fails: bool) -> Bed {
        let dir = TempDir::new("ctl");
        let dev_sock = dir.path().join("dev.sock");
        let ctl_sock = dir.path().join("ctl.sock");
        let options = ServerOptions::default();
        let (device, log) = FakeDevice::new(false);
        log.lock().unwrap().fail_open = open_fails;
        let sets = DeviceSets::new();
        let server = DeviceServer::start_in_set(
            Listener::bind(&dev_sock).unwrap(),
            dma_space(&options),
            Box::new(device),
            options,
            None,
            crate::server::Placement {
                set: sets.join("set0"),
                name: "fake".into(),
                shared: None,
            },
        )
        .unwrap();
        let ctl =
            CtlServer::start(Listener::bind(&ctl_sock).unwrap(), vec![server.handle()]).unwrap();
        Bed {
            _dir: dir,
            server: Some(server),
            ctl: Some(ctl),
            dev_sock,
            ctl_sock,
            log,
        }
    }

    fn count(log: &std::sync::Mutex<FakeLog>, what: &str) -> u32 {
        let l = log.lock().unwrap();
        match what {
            "open" => l.opens,
            "close" => l.closes,
            "disconnect" => l.disconnects,
            _ => unreachable!(),
        }
    }

    fn bar0_write(c: &mut Client, data: &[u8]) {
        c.call(&Request::RegionWrite(proto::RegionData {
            offset: 0x10,
            region: 0,
            data,
        }))
        .unwrap();
    }

    fn bar0_read(c: &mut Client, count: u32) -> Vec<u8> {
        let body = c
            .call(&Request::RegionRead(proto::RegionAccess {
                offset: 0x10,
                region: 0,
                count,
            }))
            .unwrap();
        body[16..].to_vec()
    }

    #[test]
    fn add_and_del_open_and_close_the_device() {
        let b = bed(false);
        let mut c = CtlClient::connect(&b.ctl_sock).unwrap();
        let s = status(&c.request("status fake").unwrap());
        assert_eq!(s["open"], false);
        assert_eq!(s["device_set"], "set0");
        let s = status(&c.request("add fake").unwrap());
        assert_eq!(
            (s["open"].clone(), s["external_refs"].clone()),
            (true.into(), 1.into())
        );
        let s = status(&c.request("add fake").unwrap());
        assert_eq!(s["users"], 2);
        assert_eq!(count(&b.log, "open"), 1);
        c.request("del fake").unwrap();
        let s = status(&c.request("del fake").unwrap());
        assert_eq!(s["open"], false);
        assert_eq!(
            (s["opens"].clone(), s["closes"].clone()),
            (1.into(), 1.into())
        );
        assert_eq!(count(&b.log, "close"), 1);
        // every use ends with del: a del without an add is refused
        let (errno, text) = c.request("del fake").unwrap_err();
        assert_eq!(errno, libc::EINVAL);
        assert!(text.contains("no reference"), "{text}");
    }

    #[test]
    fn errors_are_clear() {
        let b = bed(true);
        let mut c = CtlClient::connect(&b.ctl_sock).unwrap();
        let (errno, text) = c.request("add nosuch").unwrap_err();
        assert_eq!(errno, libc::ENOENT);
        assert!(text.contains("nosuch"), "{text}");
        // the device refuses to open: no reference is held
        let (errno, text) = c.request("add fake").unwrap_err();
        assert_eq!(errno, libc::EIO, "{text}");
        let s = status(&c.request("status").unwrap());
        assert_eq!(s[0]["external_refs"], 0);
        assert_eq!(s[0]["open"], false);
        for bad in ["frobnicate fake", "add", "add a b", ""] {
            let (errno, _) = c.request(bad).unwrap_err();
            assert_eq!(errno, libc::EINVAL, "{bad:?}");
        }
        // a request line without an end is cut off
        let mut raw = UnixStream::connect(&b.ctl_sock).unwrap();
        raw.write_all(&[b'x'; MAX_LINE + 10]).unwrap();
        let mut reply = String::new();
        BufReader::new(raw).read_line(&mut reply).unwrap();
        assert!(
            reply.starts_with(&format!("error {}", libc::E2BIG)),
            "{reply}"
        );
    }

    #[test]
    fn a_holder_that_dies_drops_its_references() {
        let b = bed(false);
        let mut holder = CtlClient::connect(&b.ctl_sock).unwrap();
        holder.request("add fake").unwrap();
        holder.request("add fake").unwrap();
        drop(holder); // the process died: its socket closed
        let mut watcher = CtlClient::connect(&b.ctl_sock).unwrap();
        let t0 = std::time::Instant::now();
        loop {
            let s = status(&watcher.request("status fake").unwrap());
            if s["open"] == false {
                assert_eq!(s["external_refs"], 0);
                assert_eq!(s["closes"], 1);
                break;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(count(&b.log, "close"), 1);
    }

    #[test]
    fn a_reference_keeps_the_device_open_across_client_reconnects() {
        let mut b = bed(false);
        let mut ctl = CtlClient::connect(&b.ctl_sock).unwrap();
        let mut client = Client::connect(&b.dev_sock);
        client.version();
        bar0_write(&mut client, b"state");
        let s = status(&ctl.request("status fake").unwrap());
        assert_eq!(
            (s["client"].clone(), s["users"].clone()),
            (true.into(), 1.into())
        );
        ctl.request("add fake").unwrap();
        drop(client);
        // the client left: the device was disconnected, not closed
        let t0 = std::time::Instant::now();
        loop {
            let s = status(&ctl.request("status fake").unwrap());
            if s["client"] == false {
                assert_eq!(s["open"], true);
                break;
            }
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(count(&b.log, "disconnect"), 1);
        assert_eq!(count(&b.log, "close"), 0);
        // a new client finds the device open, with its state: no second open
        let mut client = Client::connect(&b.dev_sock);
        client.version();
        assert_eq!(count(&b.log, "open"), 1);
        assert_eq!(bar0_read(&mut client, 5), b"state");
        ctl.request("del fake").unwrap();
        assert_eq!(count(&b.log, "close"), 0, "the client still uses it");
        drop(client);
        let t0 = std::time::Instant::now();
        while count(&b.log, "close") == 0 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let s = status(&ctl.request("status fake").unwrap());
        assert_eq!(
            (s["opens"].clone(), s["closes"].clone()),
            (1.into(), 1.into())
        );
        // without a reference, the state does not survive a reconnect
        let mut client = Client::connect(&b.dev_sock);
        client.version();
        assert_eq!(bar0_read(&mut client, 5), [0; 5]);
        drop(client);
        let t0 = std::time::Instant::now();
        while count(&b.log, "close") < 2 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // stopping the server with a reference held closes the device once
        ctl.request("add fake").unwrap();
        drop(b.ctl.take());
        b.server.take().unwrap().stop().unwrap();
        assert_eq!(count(&b.log, "open"), 3);
        assert_eq!(count(&b.log, "close"), 3);
    }

    #[test]
    fn two_devices_of_one_name_are_refused() {
        let dir = TempDir::new("ctl2");
        let options = ServerOptions::default();
        let mk = |n: &str| {
            DeviceServer::start(
                Listener::bind(&dir.path().join(n)).unwrap(),
                dma_space(&options),
                Box::new(FakeDevice::new(false).0),
                options.clone(),
                None,
            )
            .unwrap()
        };
        let (a, b) = (mk("a.sock"), mk("b.sock"));
        let e = CtlServer::start(
            Listener::bind(&dir.path().join("ctl.sock")).unwrap(),
            vec![a.handle(), b.handle()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("name them"), "{e}");
    }
}

/// `vdevd ctl`: talk to a running vdevd's control socket.
#[derive(Debug, clap::Parser)]
#[command(name = "vdevd ctl")]
pub struct CtlCli {
    /// The control socket (vdevd --ctl-socket PATH)
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// What to do
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `vdevd ctl` commands.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Print the status of one device or of all (JSON)
    Status {
        /// The device's name
        name: Option<String>,
    },
    /// Take a reference on each device and hold them until this process
    /// ends (kill it to drop them): the devices stay open, and keep their
    /// state, while clients come and go
    Hold {
        /// The devices' names
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Run `vdevd ctl`; the exit status is 0 on success, else the errno.
pub fn run_ctl(cli: CtlCli) -> Result<(), (i32, String)> {
    let mut c = CtlClient::connect(&cli.socket).map_err(|e| (e.errno(), e.to_string()))?;
    match cli.command {
        CtlCommand::Status { name } => {
            let line = match name {
                Some(n) => format!("status {n}"),
                None => "status".into(),
            };
            println!("{}", c.request(&line)?);
            Ok(())
        }
        CtlCommand::Hold { names } => {
            for n in &names {
                let status = c
                    .request(&format!("add {n}"))
                    .map_err(|(errno, text)| (errno, format!("add {n}: {text}")))?;
                println!("holding {n}: {status}");
            }
            let _ = io::stdout().flush();
            loop {
                std::thread::park();
            }
        }
    }
}
