//! The vhost-user transport: a virtio device model served to a vhost-user
//! front-end (QEMU's `vhost-user-blk-pci`, cloud-hypervisor's
//! `--disk vhost_user=on`) with the `vhost-user-backend` crate.
//!
//! The device model is the same one the vfio-user transport serves
//! (`vdevd_devices::virtio`); only the plumbing differs:
//!
//! * guest memory comes from the front-end's memory table
//!   (`GuestMemoryAtomic<GuestMemoryMmap>`, replaced on every
//!   SET_MEM_TABLE);
//! * each queue has its own worker thread (the crate's epoll handlers, one
//!   queue per thread), which runs [`vdevd_devices::virtio::process_queue`]
//!   on a kick and signals the queue's call eventfd when the driver wants
//!   an interrupt;
//! * the configuration space is read and written with GET_CONFIG /
//!   SET_CONFIG (protocol feature CONFIG), the queue count is reported with
//!   protocol feature MQ.
//!
//! # Reconnection
//!
//! One front-end at a time; when it leaves, the next connection gets a
//! fresh session (memory table, queues, features), so a restarted VMM can
//! connect again. When vdevd itself restarts, QEMU (with
//! `reconnect-ms` on its chardev) connects to the new process and resumes
//! the queues from the used index of each ring. The `vhost-user-backend`
//! crate does not implement the inflight I/O tracking protocol
//! (GET/SET_INFLIGHT_FD answer "not supported"), so vdevd does not offer
//! `INFLIGHT_SHMFD`; this is safe for this device because it completes the
//! requests of a queue in order, so every request after the used index is
//! one vdevd had not completed and the front-end makes it available again.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use vdevd_devices::virtio::{self, VirtioDevice, features};

use crate::error::Error;
use crate::listener::Listener;

/// Chains a worker completes before it looks at its other events.
const BATCH: usize = 256;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The `VhostUserBackend` of one front-end session over a device model.
pub struct Backend<D: VirtioDevice> {
    device: Arc<D>,
    mem: Mutex<Option<Memory>>,
    broken: AtomicBool,
    name: String,
}

impl<D: VirtioDevice> Backend<D> {
    /// A backend for `device`.
    pub fn new(device: Arc<D>) -> Self {
        let name = format!("{} (vhost-user)", device.name());
        Backend {
            device,
            mem: Mutex::new(None),
            broken: AtomicBool::new(false),
            name,
        }
    }

    fn memory(&self) -> Option<Memory> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn service(&self, q: u16, vring: &VringRwLock) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            log::warn!("{}: kick on queue {q} before any memory table", self.name);
            return Ok(());
        };
        loop {
            let guard = mem.memory();
            let result = {
                let mut state = vring.get_mut();
                virtio::process_queue(
                    self.device.as_ref(),
                    q,
                    &*guard,
                    state.get_queue_mut(),
                    BATCH,
                    &|| false,
                )
            };
            drop(guard);
            match result {
                Ok(run) => {
                    if run.notify {
                        vring.signal_used_queue()?;
                    }
                    if !run.more {
                        return Ok(());
                    }
                }
                Err(e) => {
                    // vhost-user has no way to set DEVICE_NEEDS_RESET in the
                    // front-end: stop serving until the next session.
                    self.broken.store(true, Ordering::Release);
                    log::error!(
                        "{}: {e}; no more requests are served until the front-end reconnects",
                        self.name
                    );
                    return Ok(());
                }
            }
        }
    }
}

impl<D: VirtioDevice> VhostUserBackend for Backend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.max_queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features() | features::VHOST_USER_PROTOCOL_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.device
            .set_features(features & !features::VHOST_USER_PROTOCOL_FEATURES);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.device.reset();
        self.broken.store(false, Ordering::Release);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The crate sets it on each queue; the queue loop reads it there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The front-end asks for its own idea of the structure's size; answer
        // exactly that many bytes (zero past the device's end).
        let len = usize::try_from(size).unwrap_or(0).min(4096);
        let mut buf = vec![0u8; len];
        self.device.read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    /// Without an exit event a worker thread never leaves its loop, and the
    /// crate joins the workers when a session's handler is dropped: the
    /// next front-end would never be accepted.
    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!(
                    "{}: exit event for worker {thread_index}: {e}; the session cannot end cleanly",
                    self.name
                );
                None
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues().min(64))
            .map(|q| 1u64 << q)
            .collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "unexpected event set {evset:?} on queue {device_event}"
            )));
        }
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| {
            io::Error::other(format!(
                "event for queue {device_event}, which does not exist"
            ))
        })?;
        self.service(device_event, vring)
    }
}

/// A running vhost-user server for one device. Dropping it stops it.
pub struct VhostUserServer {
    name: String,
    stop: Arc<EventFd>,
    session: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for VhostUserServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserServer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

const TOKEN_LISTENER: u64 = 1;
const TOKEN_STOP: u64 = 2;

impl VhostUserServer {
    /// Serve `device` on `listener` on a thread of its own, one front-end
    /// at a time. `exited`, if given, is signalled when the thread ends.
    pub fn start<D: VirtioDevice>(
        listener: Listener,
        device: Arc<D>,
        exited: Option<Arc<EventFd>>,
    ) -> Result<VhostUserServer, Error> {
        let name = format!("{} (vhost-user)", device.name());
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
        let session = Arc::new(Mutex::new(None));
        let (t_stop, t_session, t_name) = (stop.clone(), session.clone(), name.clone());
        let thread = std::thread::Builder::new()
            .name("vdevd-vhost-user".into())
            .spawn(move || {
                let r = serve(&t_name, listener, device, &t_stop, &t_session);
                if let Err(e) = &r {
                    log::error!("{t_name}: {e}");
                }
                if let Some(ev) = exited {
                    let _ = ev.write(1);
                }
                r
            })
            .map_err(|e| Error::io("spawn vhost-user thread", e))?;
        Ok(VhostUserServer {
            name,
            stop,
            session,
            thread: Some(thread),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the server thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Disconnect the front-end, stop serving and remove the socket.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.stop.write(1);
        if let Some(h) = self
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
        thread
            .join()
            .unwrap_or_else(|_| Err(Error::Config(format!("the {} thread panicked", self.name))))
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("{}: {e}", self.name);
        }
    }
}

fn serve<D: VirtioDevice>(
    name: &str,
    listener: Listener,
    device: Arc<D>,
    stop: &EventFd,
    session: &Mutex<Option<vhost_user_backend::ShutdownHandle>>,
) -> Result<(), Error> {
    // The vhost crate takes its own listener; hand it a duplicate of ours,
    // which keeps the socket file's ownership (and removal) here.
    let dup = listener
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("dup listening socket", e))?;
    let mut vlistener = vhost::vhost_user::Listener::from(UnixListener::from(dup));
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
    let mut events = [EpollEvent::default(); 2];
    let mut sessions = 0u64;
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("epoll_wait", e)),
        };
        if events.iter().take(n).any(|e| e.data() == TOKEN_STOP) {
            return Ok(());
        }
        sessions += 1;
        let backend = Arc::new(Backend::new(device.clone()));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(format!("vdevd-vu{sessions}"), backend, mem)
            .map_err(|e| Error::Config(format!("{name}: vhost-user session: {e}")))?;
        // The listener is readable: accept does not block.
        if let Err(e) = daemon.start(&mut vlistener) {
            log::warn!("{name}: cannot start a vhost-user session: {e}");
            continue;
        }
        log::info!("{name}: front-end connected (session {sessions})");
        *session.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        // A stop that raced with the accept.
        if stop.read().is_ok() {
            let _ = stop.write(1);
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        *session.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        device.reset();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => log::info!("{name}: front-end disconnected (session {sessions})"),
            Err(e) => log::warn!("{name}: session {sessions} ended: {e}"),
        }
    }
}

/// The QEMU options that connect to a vhost-user-blk socket.
pub fn qemu_blk_args(path: &Path, queues: u16) -> String {
    let p = path.display();
    format!(
        "-chardev socket,id=vdevd0,path={p},reconnect-ms=1000 \
         -device vhost-user-blk-pci,chardev=vdevd0,num-queues={queues}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;
    use vdevd_devices::block::{BlockBackend, MemBackend};
    use vdevd_devices::virtio::blk::{Blk, BlkConfig};

    fn blk(queues: u16) -> Arc<Blk> {
        let backend: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(1 << 20, 512).unwrap());
        Arc::new(
            Blk::new(
                backend,
                BlkConfig {
                    num_queues: queues,
                    ..BlkConfig::default()
                },
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_backend_describes_the_model() {
        let dev = blk(3);
        let b = Backend::new(dev.clone());
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), usize::from(dev.max_queue_size()));
        assert_eq!(
            b.features(),
            dev.features() | features::VHOST_USER_PROTOCOL_FEATURES
        );
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        // No inflight tracking is offered: the crate does not implement it.
        assert!(!p.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        // One worker per queue, each with an exit event.
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        for t in 0..3 {
            assert!(b.exit_event(t).is_some());
        }
        // The configuration space is the model's, cut to what is asked.
        let mut want = [0u8; 8];
        dev.read_config(0, &mut want);
        assert_eq!(b.get_config(0, 8), want.to_vec());
        assert_eq!(u64::from_le_bytes(want), (1 << 20) / 512);
        assert_eq!(b.get_config(0, 1 << 20).len(), 4096);
    }

    /// GET_FEATURES over `s`: the features in the reply.
    fn get_features(s: &mut UnixStream) -> io::Result<u64> {
        // Header: request 1 (GET_FEATURES), flags 1 (version 1), size 0.
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&1u32.to_le_bytes());
        msg[4..8].copy_from_slice(&1u32.to_le_bytes());
        s.write_all(&msg)?;
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply)?;
        let mut f = [0u8; 8];
        f.copy_from_slice(&reply[12..20]);
        Ok(u64::from_le_bytes(f))
    }

    /// Front-ends one after the other, then a stop with one connected.
    fn serve_three_then_stop(path: &Path, dev: Arc<Blk>) {
        let server =
            VhostUserServer::start(Listener::bind(path).unwrap(), dev.clone(), None).unwrap();
        for round in 0..3 {
            let mut s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let f = get_features(&mut s)
                .unwrap_or_else(|e| panic!("front-end {round} not served: {e}"));
            assert_eq!(f, dev.features() | features::VHOST_USER_PROTOCOL_FEATURES);
            drop(s);
        }
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        get_features(&mut s).unwrap();
        server.stop().unwrap();
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn a_second_front_end_is_served_after_the_first_leaves_and_stop_returns() {
        let dir = std::env::temp_dir().join(format!("vdevd-vu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vu.sock");
        let dev = blk(2);
        // A hang (a session that never ends) fails the test instead of
        // stalling it.
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            serve_three_then_stop(&p, dev);
            let _ = tx.send(());
        });
        let r = rx.recv_timeout(Duration::from_secs(30));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            r.is_ok(),
            "front-ends not served in turn, or stop() hung (30 s)"
        );
    }
}
