//! The process: start every planned device server, wait for SIGTERM or
//! SIGINT (or a device thread that dies), stop them all.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::aspace::{SharedMember, SharedSpaces};
use crate::cli::{Plan, SocketSpec};
use crate::ctl::CtlServer;
use crate::devset::DeviceSets;
use crate::error::Error;
use crate::kinds::Builder;
use crate::listener::Listener;
use crate::server::{DeviceServer, Placement, dma_space};
use crate::vhost_user::VhostUserServer;

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

fn vhost_user_banner(kind: &str, socket: &SocketSpec, qemu_device: &str, queues: u16) -> String {
    match socket {
        SocketSpec::Path(p) => {
            let path = p.display();
            format!(
                "vdevd: serving {kind} over vhost-user on {path}\n  QEMU: \
                 -chardev socket,id=vdevd0,path={path},reconnect-ms=1000 \
                 -device {qemu_device},chardev=vdevd0,num-queues={queues}"
            )
        }
        SocketSpec::Fd(fd) => {
            format!("vdevd: serving {kind} over vhost-user on inherited socket fd {fd}")
        }
    }
}

fn print_banner(text: &str) {
    log::info!("{}", text.replace('\n', ";"));
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
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

/// Serve everything in `plan` until SIGTERM or SIGINT, every thread under
/// seccomp once everything is open (unless the options turn it off).
pub fn run(plan: Plan) -> Result<(), Error> {
    run_with(plan, Sandbox::Process)
}

/// Where [`run_with`] installs seccomp filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sandbox {
    /// Every thread of the process, once everything is open (the vdevd
    /// binary), and each device thread.
    Process,
    /// Device threads only: for running the daemon inside another program
    /// (the unit tests), whose other threads must stay unfiltered.
    DeviceThreads,
}

/// [`run`], choosing where the seccomp filters go.
pub fn run_with(plan: Plan, sandbox: Sandbox) -> Result<(), Error> {
    let signals = Signals::block()?;
    let exited = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
    // Open everything first, as whoever started us; then drop to --user;
    // then serve.
    let credentials = match &plan.options.user {
        Some(u) => Some(crate::privileges::lookup(u)?),
        None => None,
    };
    let give = |path: Option<&std::path::Path>| -> Result<(), Error> {
        if let (Some(c), Some(path)) = (&credentials, path) {
            std::os::unix::fs::chown(path, Some(c.uid), Some(c.gid))
                .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    };
    // Virtio devices over vhost-user: outside device sets, address spaces
    // and the control socket, which are vfio-user notions. Started after
    // the drop, like the others.
    let mut vhost_pending = Vec::new();
    let mut vhost: Vec<VhostUserServer> = Vec::new();
    let sets = DeviceSets::new();
    let spaces = SharedSpaces::default();
    struct Opened {
        kind: &'static str,
        socket: SocketSpec,
        address_space: Option<String>,
        listener: Listener,
        dma: Arc<vdevd_devices::dma::DmaSpace>,
        device: Box<dyn vdevd_devices::Device>,
        name: String,
        set_name: String,
        shared: Option<SharedMember>,
    }
    let mut opened: Vec<Opened> = Vec::new();
    for d in plan.devices {
        let listener = match &d.socket {
            SocketSpec::Path(p) => {
                Listener::bind_with(p, &crate::listener::BindOptions::from(&plan.options))?
            }
            SocketSpec::Fd(fd) => Listener::from_fd(*fd)?,
        };
        give(listener.path())?;
        let build = match d.build {
            Builder::VfioUser(build) => build,
            Builder::VhostUser(b) => {
                if d.device_set.is_some() || d.address_space.is_some() {
                    return Err(Error::Config(format!(
                        "{}: device_set and address_space apply to vfio-user devices only",
                        d.kind
                    )));
                }
                vhost_pending.push((d.kind, d.socket, listener, b));
                continue;
            }
        };
        let shared = d.address_space.as_deref().map(|a| {
            let space = spaces.get(a, || dma_space(&plan.options));
            SharedMember {
                holder: space.holder(),
                space,
            }
        });
        let dma = match &shared {
            Some(sh) => sh.space.dma().clone(),
            None => dma_space(&plan.options),
        };
        let device = build(dma.clone())?;
        let mut name = d.name.clone().unwrap_or_else(|| device.name().to_string());
        if d.name.is_none() {
            let base = name.clone();
            let mut i = 1;
            while opened.iter().any(|o| o.name == name) {
                i += 1;
                name = format!("{base}-{i}");
            }
        }
        let set_name = d
            .device_set
            .clone()
            .or_else(|| device.reset_domain())
            .unwrap_or_else(|| format!("solo:{name}"));
        opened.push(Opened {
            kind: d.kind,
            socket: d.socket,
            address_space: d.address_space,
            listener,
            dma,
            device,
            name,
            set_name,
            shared,
        });
    }
    let ctl_listener = match &plan.ctl_socket {
        Some(path) => {
            let l = Listener::bind(path)?;
            give(l.path())?;
            Some((path.clone(), l))
        }
        None => None,
    };
    // vhost-user servers open their image when they start: start them
    // before privileges and the sandbox go, like the other devices' opens.
    for (kind, socket, listener, b) in vhost_pending {
        let server = (b.start)(listener, Some(exited.clone()))?;
        print_banner(&vhost_user_banner(kind, &socket, b.qemu_device, b.queues));
        vhost.push(server);
    }
    if let Some(c) = &credentials {
        crate::privileges::drop_to(c)?;
    }
    // Everything is open and privileges are gone: from here on every
    // thread, those devices already started included, runs under seccomp.
    // The filter is the device threads' one (the workers, the vhost-user
    // and control threads do the same kind of work), with VFIO opens and
    // ioctls if any device needs them; device threads narrow it again.
    if sandbox == Sandbox::Process {
        let host_vfio = opened.iter().any(|o| o.device.uses_host_vfio());
        crate::sandbox::apply_all_threads(&crate::sandbox::device_thread_filters(
            plan.options.seccomp,
            crate::record::enabled(),
            host_vfio,
        )?)?;
    }
    let mut servers: Vec<DeviceServer> = Vec::new();
    for o in opened {
        let server = DeviceServer::start_in_set(
            o.listener,
            o.dma,
            o.device,
            plan.options.clone(),
            Some(exited.clone()),
            Placement {
                set: sets.join(&o.set_name),
                name: o.name.clone(),
                shared: o.shared,
            },
        )?;
        log::info!(
            "device {}: device set {}, address space {}",
            o.name,
            o.set_name,
            o.address_space.as_deref().unwrap_or("(its own)")
        );
        print_banner(&banner(o.kind, &o.socket));
        servers.push(server);
    }

    let ctl = match ctl_listener {
        Some((path, listener)) => {
            let handles = servers.iter().map(DeviceServer::handle).collect();
            let c = CtlServer::start(listener, handles)?;
            let names: Vec<&str> = servers.iter().map(DeviceServer::name).collect();
            log::info!(
                "control socket {} for devices {}",
                path.display(),
                names.join(", ")
            );
            Some(c)
        }
        None => None,
    };
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
                if let Some(i) = vhost.iter().position(|s| s.is_finished()) {
                    let s = vhost.swap_remove(i);
                    let name = s.name().to_string();
                    result = match s.stop() {
                        Err(e) => Err(e),
                        Ok(()) => Err(Error::Config(format!(
                            "the {name} vhost-user server stopped unexpectedly"
                        ))),
                    };
                    log::error!("stopping every device: a device server failed");
                    break 'wait;
                }
            }
        }
    }
    drop(ctl);
    for s in servers {
        let name = s.name().to_string();
        if let Err(e) = s.stop() {
            log::error!("{name}: {e}");
        }
    }
    for s in vhost {
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
                build: Builder::VfioUser(Box::new(|_| Ok(Box::new(FakeDevice::new(false).0)))),
                name: None,
                device_set: None,
                address_space: None,
            })
            .collect();
        let plan = Plan {
            options: ServerOptions::default(),
            devices,
            ctl_socket: None,
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
        run_with(plan, Sandbox::DeviceThreads).unwrap();
        assert!(helper.join().unwrap(), "every client was disconnected");
        for p in &paths {
            assert!(!p.exists(), "{} was removed", p.display());
        }
    }

    /// Three emulated devices from a plan: two declared in one device set
    /// and one address space, one unnamed (named after the model, made
    /// unique); the control socket sees them all, and a client's DMA_MAP
    /// on one device of the shared space is visible to the other's.
    #[test]
    fn config_sets_names_and_shared_spaces_reach_the_servers() {
        use crate::ctl::CtlClient;
        let dir = TempDir::new("daemon-sets");
        let ctl = dir.path().join("ctl.sock");
        let mk =
            |i: usize, name: Option<&str>, set: Option<&str>, space: Option<&str>| DevicePlan {
                kind: "fake",
                socket: SocketSpec::Path(dir.path().join(format!("d{i}.sock"))),
                build: Builder::VfioUser(Box::new(|_| Ok(Box::new(FakeDevice::new(false).0)))),
                name: name.map(str::to_string),
                device_set: set.map(str::to_string),
                address_space: space.map(str::to_string),
            };
        let plan = Plan {
            options: ServerOptions::default(),
            devices: vec![
                mk(0, Some("a"), Some("slot3"), Some("vm1")),
                mk(1, Some("b"), Some("slot3"), Some("vm1")),
                mk(2, None, None, None),
                mk(3, None, None, None),
            ],
            ctl_socket: Some(ctl.clone()),
        };
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let helper = {
            let ctl = ctl.clone();
            let sock = |i: usize| dir.path().join(format!("d{i}.sock"));
            let (s0, s1) = (sock(0), sock(1));
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !ctl.exists() {
                    assert!(t0.elapsed() < Duration::from_secs(10));
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut c = CtlClient::connect(&ctl).unwrap();
                let all: serde_json::Value =
                    serde_json::from_str(&c.request("status").unwrap()).unwrap();
                let sets: Vec<(String, String)> = all
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| {
                        (
                            d["name"].as_str().unwrap().to_string(),
                            d["device_set"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                // The shared space: a grant through a is seen through b.
                let mem = crate::testutil::memfd("shared").0;
                std::fs::File::from(mem.try_clone().unwrap())
                    .set_len(0x4000)
                    .unwrap();
                let mut ca = Client::connect(&s0);
                ca.version();
                let mut cb = Client::connect(&s1);
                cb.version();
                let map = |c: &mut Client, address: u64| {
                    c.call_with(
                        &vdevd_protocol::Request::DmaMap(vdevd_protocol::DmaMap {
                            argsz: 32,
                            read: true,
                            write: true,
                            offset: 0,
                            address,
                            size: 0x4000,
                        }),
                        &[std::os::fd::AsRawFd::as_raw_fd(&mem)],
                    )
                };
                let first = map(&mut ca, 0x10000).is_ok();
                // b's own space would take this; the shared one holds a's
                // grant there.
                let conflict = map(&mut cb, 0x12000);
                let second = map(&mut cb, 0x10000).is_ok();
                // SAFETY: `me` is blocked in run() until this signal arrives.
                let rc = unsafe { libc::pthread_kill(me, libc::SIGTERM) };
                assert_eq!(rc, 0);
                (sets, first, conflict, second)
            })
        };
        run_with(plan, Sandbox::DeviceThreads).unwrap();
        let (sets, first, conflict, second) = helper.join().unwrap();
        let set_of = |n: &str| {
            sets.iter()
                .find(|(name, _)| name == n)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| panic!("no device {n} in {sets:?}"))
        };
        assert_eq!(set_of("a"), "slot3");
        assert_eq!(set_of("b"), "slot3");
        assert_eq!(set_of("fake"), "solo:fake");
        assert_eq!(set_of("fake-2"), "solo:fake-2");
        assert!(first && second, "identical grants on one shared space");
        assert_eq!(conflict.unwrap_err(), libc::EEXIST as u32);
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
                    build: Builder::VfioUser(Box::new(|_| Ok(Box::new(FakeDevice::new(false).0)))),
                    name: None,
                    device_set: None,
                    address_space: None,
                },
                DevicePlan {
                    kind: "fake",
                    socket: SocketSpec::Path(dir.path().join("bad.sock")),
                    build: Builder::VfioUser(Box::new(|_| {
                        Err(Error::Config("no such backing file".into()))
                    })),
                    name: None,
                    device_set: None,
                    address_space: None,
                },
            ],
            ctl_socket: None,
        };
        let e = run_with(plan, Sandbox::DeviceThreads).unwrap_err();
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
