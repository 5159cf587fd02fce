//! The process: start every planned device server, wait for SIGTERM or
//! SIGINT (or a device thread that dies), stop them all.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::cli::{Plan, SocketSpec};
use crate::error::Error;
use crate::listener::Listener;
use crate::server::{DeviceServer, dma_space};

/// SIGTERM and SIGINT, blocked in every thread and read from a signalfd.
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Block SIGTERM and SIGINT in the calling thread (and so in every
    /// thread it starts afterwards) and open a signalfd for them.
    fn block() -> Result<Signals, Error> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: set is a valid sigset_t and sig a valid signal.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
        // SAFETY: set is valid; the old mask is not wanted (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::io("block signals", io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: set is a valid sigset_t; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::io("signalfd", io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// The pending signal's number, if any.
    fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: info is `size` writable bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut info).cast(), size) };
        (n == size as isize).then_some(info.ssi_signo)
    }
}

fn banner(kind: &str, socket: &SocketSpec) -> String {
    match socket {
        SocketSpec::Path(p) => {
            let path = p.display().to_string();
            let device = serde_json::json!({
                "driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": path},
            });
            format!("vdevd: serving {kind} on {path}\n  QEMU: -device '{device}'")
        }
        SocketSpec::Fd(fd) => format!("vdevd: serving {kind} on inherited socket fd {fd}"),
    }
}

/// Serve everything in `plan` until SIGTERM or SIGINT.
pub fn run(plan: Plan) -> Result<(), Error> {
    let signals = Signals::block()?;
    let exited = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
    // Open everything first, as whoever started us; then drop to --user;
    // then serve.
    let credentials = match &plan.options.user {
        Some(u) => Some(crate::privileges::lookup(u)?),
        None => None,
    };
    let mut opened = Vec::new();
    for d in plan.devices {
        let listener = match &d.socket {
            SocketSpec::Path(p) => {
                Listener::bind_with(p, &crate::listener::BindOptions::from(&plan.options))?
            }
            SocketSpec::Fd(fd) => Listener::from_fd(*fd)?,
        };
        if let (Some(c), Some(path)) = (&credentials, listener.path()) {
            std::os::unix::fs::chown(path, Some(c.uid), Some(c.gid))
                .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
        }
        let dma = dma_space(&plan.options);
        let device = (d.build)(dma.clone())?;
        opened.push((d.kind, d.socket, listener, dma, device));
    }
    if let Some(c) = &credentials {
        crate::privileges::drop_to(c)?;
    }
    let mut servers = Vec::new();
    for (kind, socket, listener, dma, device) in opened {
        let server = DeviceServer::start(
            listener,
            dma,
            device,
            plan.options.clone(),
            Some(exited.clone()),
        )?;
        let text = banner(kind, &socket);
        log::info!("{}", text.replace('\n', ";"));
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
        servers.push(server);
    }

    let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
    for (fd, token) in [(signals.fd.as_raw_fd(), 1u64), (exited.as_raw_fd(), 2)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| Error::io("epoll_ctl", e))?;
    }
    let mut events = vec![EpollEvent::default(); 2];
    let mut result = Ok(());
    'wait: loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("epoll_wait", e)),
        };
        for ev in events.iter().take(n) {
            if ev.data() == 1 {
                if let Some(sig) = signals.read() {
                    let name = if sig == libc::SIGINT as u32 {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    log::info!("{name}: stopping");
                    break 'wait;
                }
            } else {
                let _ = exited.read();
                if let Some(i) = servers.iter().position(|s| s.is_finished()) {
                    let s = servers.swap_remove(i);
                    let name = s.name().to_string();
                    result = match s.stop() {
                        Err(e) => Err(e),
                        Ok(()) => Err(Error::Config(format!(
                            "the {name} device server stopped unexpectedly"
                        ))),
                    };
                    log::error!("stopping every device: a device server failed");
                    break 'wait;
                }
            }
        }
    }
    for s in servers {
        let name = s.name().to_string();
        if let Err(e) = s.stop() {
            log::error!("{name}: {e}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::DevicePlan;
    use crate::options::ServerOptions;
    use crate::testutil::{Client, FakeDevice, TempDir};
    use std::time::{Duration, Instant};

    #[test]
    fn sigterm_stops_every_device_and_removes_the_sockets() {
        let dir = TempDir::new("daemon");
        let paths: Vec<_> = (0..2)
            .map(|i| dir.path().join(format!("d{i}.sock")))
            .collect();
        let devices = paths
            .iter()
            .map(|p| DevicePlan {
                kind: "fake",
                socket: SocketSpec::Path(p.clone()),
                build: Box::new(|_| Ok(Box::new(FakeDevice::new(false).0))),
            })
            .collect();
        let plan = Plan {
            options: ServerOptions::default(),
            devices,
        };
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let helper = {
            let paths = paths.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !paths.iter().all(|p| p.exists()) {
                    assert!(t0.elapsed() < Duration::from_secs(10));
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut clients: Vec<Client> = paths.iter().map(|p| Client::connect(p)).collect();
                for c in &mut clients {
                    c.version();
                }
                // A signal directed at the thread running the daemon (which
                // blocks it and reads it from its signalfd), so that no other
                // test thread can receive it.
                // SAFETY: `me` is alive: it is blocked in run() until this
                // signal arrives.
                let rc = unsafe { libc::pthread_kill(me, libc::SIGTERM) };
                assert_eq!(rc, 0);
                clients.iter_mut().all(|c| c.closed())
            })
        };
        run(plan).unwrap();
        assert!(helper.join().unwrap(), "every client was disconnected");
        for p in &paths {
            assert!(!p.exists(), "{} was removed", p.display());
        }
    }

    #[test]
    fn a_device_that_cannot_start_stops_the_others() {
        let dir = TempDir::new("daemon-fail");
        let good = dir.path().join("good.sock");
        let plan = Plan {
            options: ServerOptions::default(),
            devices: vec![
                DevicePlan {
                    kind: "fake",
                    socket: SocketSpec::Path(good.clone()),
                    build: Box::new(|_| Ok(Box::new(FakeDevice::new(false).0))),
                },
                DevicePlan {
                    kind: "fake",
                    socket: SocketSpec::Path(dir.path().join("bad.sock")),
                    build: Box::new(|_| Err(Error::Config("no such backing file".into()))),
                },
            ],
        };
        let e = run(plan).unwrap_err();
        assert!(e.to_string().contains("no such backing file"), "{e}");
        assert!(!good.exists(), "the started device was stopped");
    }

    #[test]
    fn banner_prints_the_qemu_device_argument() {
        let b = banner(
            "sample",
            &SocketSpec::Path("/run/vdevd/a \"b\".sock".into()),
        );
        assert!(b.starts_with("vdevd: serving sample on /run/vdevd/a \"b\".sock\n"));
        let json = b.split("-device '").nth(1).unwrap().trim_end_matches('\'');
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["driver"], "vfio-user-pci");
        assert_eq!(v["socket"]["type"], "unix");
        assert_eq!(v["socket"]["path"], "/run/vdevd/a \"b\".sock");
        assert_eq!(
            banner("sample", &SocketSpec::Fd(3)),
            "vdevd: serving sample on inherited socket fd 3"
        );
    }
}
