//! A device server: one thread per device, with its own epoll loop.
//!
//! The loop watches
//!
//! * the listening socket, only while no client is connected (further
//!   connections wait in the backlog: one client per device, as the
//!   specification says);
//! * the connected client;
//! * the messenger's eventfd, through which worker threads submit
//!   DMA_READ/DMA_WRITE requests (see [`crate::messenger`]);
//! * a stop eventfd.
//!
//! Each time the client is readable the thread makes one `recvmsg`,
//! handles every complete message received, and sends all replies with as
//! few `sendmsg` calls as the descriptors they carry allow. A client that
//! does not send VERSION within the handshake timeout is dropped. When a
//! client leaves, cleanly or not, its DMA mappings and interrupt
//! descriptors are dropped and the next client is accepted.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vdevd_devices::Device;
use vdevd_devices::dma::{DmaLimits, DmaSpace};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::aspace::SharedMember;
use crate::devset::{DeviceSet, DeviceSets, Users};
use crate::error::Error;
use crate::listener::Listener;
use crate::messenger::Messenger;
use crate::migration::Migration;
use crate::options::ServerOptions;
use crate::record::Recorder;
use crate::session::{self, DeviceState, Flow, Session};
use crate::wire::{Fill, OutMessage, Reader, Stats, Writer};

const TOKEN_LISTENER: u64 = 1;
const TOKEN_DMA: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_CTL: u64 = 5;
/// Client tokens carry the connection number above this bit, so that
/// events of a connection that just ended are not taken for its successor.
const TOKEN_CLIENT: u64 = 4;
const TOKEN_SHIFT: u32 = 8;

/// A DMA address space with the limits `options` offer, for building a
/// device before [`DeviceServer::start`].
pub fn dma_space(options: &ServerOptions) -> Arc<DmaSpace> {
    Arc::new(DmaSpace::new(DmaLimits {
        max_maps: options.max_dma_maps,
        max_bytes: options.max_dma_bytes,
        page_size: options.page_size(),
    }))
}

/// Where a device sits among the others of the process.
#[derive(Debug)]
pub struct Placement {
    /// Its device set.
    pub set: Arc<DeviceSet>,
    /// Its name (logs, control socket).
    pub name: String,
    /// The shared address space it uses, if any (its DMA space must be the
    /// shared one).
    pub shared: Option<SharedMember>,
}

/// What an external user (see [`crate::ctl`]) asks of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlOp {
    /// Take a reference: the device is opened if it is not, and stays open
    /// until the reference is dropped.
    AddRef,
    /// Drop a reference taken with [`CtlOp::AddRef`].
    DelRef,
    /// Only report the status.
    Status,
}

/// A device's users and open state, as reported to external users.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceStatus {
    /// The device's name in the control socket.
    pub name: String,
    /// Its device set.
    pub device_set: String,
    /// Whether the device is open.
    pub open: bool,
    /// Users: the client session (if it negotiated) and external references.
    pub users: usize,
    /// External references.
    pub external_refs: usize,
    /// A client session is connected and negotiated.
    pub client: bool,
    /// Times the device was opened (first user came).
    pub opens: u64,
    /// Times the device was closed (last user left).
    pub closes: u64,
}

struct CtlRequest {
    op: CtlOp,
    holder: String,
    reply: mpsc::Sender<Result<DeviceStatus, Error>>,
}

/// How long an external user waits for the device thread (which may be
/// opening a real device).
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends external users' requests to a device thread.
#[derive(Clone, Debug)]
pub struct DeviceHandle {
    name: String,
    tx: mpsc::Sender<CtlRequest>,
    wake: Arc<EventFd>,
}

impl DeviceHandle {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Ask the device thread to apply `op` for `holder` (for logs) and
    /// return the device's status afterwards.
    pub fn request(&self, op: CtlOp, holder: &str) -> Result<DeviceStatus, Error> {
        let (reply, rx) = mpsc::channel();
        let gone = || Error::InvalidState(format!("device {} is not served any more", self.name));
        self.tx
            .send(CtlRequest {
                op,
                holder: holder.to_string(),
                reply,
            })
            .map_err(|_| gone())?;
        self.wake
            .write(1)
            .map_err(|e| Error::io("eventfd write", e))?;
        match rx.recv_timeout(CTL_TIMEOUT) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::io(
                format!("device {} did not answer", self.name),
                std::io::Error::from_raw_os_error(libc::ETIMEDOUT),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
        }
    }
}

/// A running device server. Dropping it stops it.
#[derive(Debug)]
pub struct DeviceServer {
    name: String,
    path: Option<PathBuf>,
    stop: Arc<EventFd>,
    stats: Arc<Stats>,
    handle: DeviceHandle,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl DeviceServer {
    /// Serve `device` (built on `dma`) on `listener`, on a thread of its
    /// own. `exited`, if given, is signalled when the thread ends for any
    /// reason.
    pub fn start(
        listener: Listener,
        dma: Arc<DmaSpace>,
        device: Box<dyn Device>,
        options: ServerOptions,
        exited: Option<Arc<EventFd>>,
    ) -> Result<DeviceServer, Error> {
        let name = device.name().to_string();
        let placement = Placement {
            set: DeviceSets::new().join(&format!("solo:{name}")),
            name,
            shared: None,
        };
        DeviceServer::start_in_set(listener, dma, device, options, exited, placement)
    }

    /// [`DeviceServer::start`], with the device's name, device set and
    /// shared address space given by `placement`.
    pub fn start_in_set(
        listener: Listener,
        dma: Arc<DmaSpace>,
        device: Box<dyn Device>,
        options: ServerOptions,
        exited: Option<Arc<EventFd>>,
        placement: Placement,
    ) -> Result<DeviceServer, Error> {
        options.validate()?;
        let Placement { set, name, shared } = placement;
        if let Some(sh) = &shared {
            if !Arc::ptr_eq(sh.space.dma(), &dma) {
                return Err(Error::InvalidArgument(
                    "the device was not built on its shared address space".into(),
                ));
            }
        }
        let ctl_wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
        let (ctl_tx, ctl_rx) = mpsc::channel();
        let path = listener.path().map(Path::to_path_buf);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
        let stats = Arc::new(Stats::default());
        let messenger =
            Arc::new(Messenger::new(options.dma_timeout).map_err(|e| Error::io("eventfd", e))?);
        let epoll = Epoll::new().map_err(|e| Error::io("epoll_create", e))?;
        let mut thread = DeviceThread {
            epoll,
            listener,
            listening: false,
            stop: stop.clone(),
            stats: stats.clone(),
            dev: DeviceState {
                device,
                dma,
                messenger,
                options,
                migration: Migration::default(),
                users: Users::new(set, &name),
                client_user: false,
                external_refs: 0,
                shared,
            },
            client: None,
            connections: 0,
            ctl_wake: ctl_wake.clone(),
            ctl_rx,
            name: name.clone(),
        };
        thread.register(thread.stop.as_raw_fd(), TOKEN_STOP, EventSet::IN)?;
        thread.register(thread.ctl_wake.as_raw_fd(), TOKEN_CTL, EventSet::IN)?;
        thread.register(thread.dev.messenger.wake_fd(), TOKEN_DMA, EventSet::IN)?;
        thread.listen(true)?;
        let recording = crate::record::enabled();
        let filters = crate::sandbox::device_thread_filters(
            thread.dev.options.seccomp,
            recording,
            thread.dev.device.uses_host_vfio(),
        )?;
        let handle = std::thread::Builder::new()
            .name(format!("vdevd-{name}"))
            .spawn(move || {
                let result = match crate::sandbox::apply_all(&filters) {
                    Err(e) => Err(e),
                    Ok(()) => thread.run(),
                };
                if let Err(e) = &result {
                    log::error!("device {}: {e}", thread.dev.device.name());
                }
                if let Some(ev) = exited {
                    let _ = ev.write(1);
                }
                result
            })
            .map_err(|e| Error::io("spawn device thread", e))?;
        Ok(DeviceServer {
            handle: DeviceHandle {
                name: name.clone(),
                tx: ctl_tx,
                wake: ctl_wake,
            },
            name,
            path,
            stop,
            stats,
            thread: Some(handle),
        })
    }

    /// Bind `path` and serve the device `build` makes, with `options`.
    pub fn serve(
        path: &Path,
        options: ServerOptions,
        build: impl FnOnce(Arc<DmaSpace>) -> Result<Box<dyn Device>, Error>,
    ) -> Result<DeviceServer, Error> {
        options.validate()?;
        let listener = Listener::bind_with(path, &crate::listener::BindOptions::from(&options))?;
        let dma = dma_space(&options);
        let device = build(dma.clone())?;
        DeviceServer::start(listener, dma, device, options, None)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle for external users' requests.
    pub fn handle(&self) -> DeviceHandle {
        self.handle.clone()
    }

    /// The socket path, if the server bound one.
    pub fn socket_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Counters of the server's socket activity.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Whether the server thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stop the server: disconnect its client, close the device, remove
    /// the socket. Returns the error that ended the thread, if any.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let _ = self.stop.write(1);
        match thread.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Config(format!(
                "the {} device thread panicked",
                self.name
            ))),
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Client {
    sock: UnixStream,
    reader: Reader,
    writer: Writer,
    session: Session,
    /// Drop the client if VERSION is not done by then.
    deadline: Option<Instant>,
    /// EPOLLOUT is registered.
    want_out: bool,
    token: u64,
    messages: u64,
    /// Writes the client's messages to the recording directory, if on.
    recorder: Option<Recorder>,
}

struct DeviceThread {
    epoll: Epoll,
    listener: Listener,
    listening: bool,
    stop: Arc<EventFd>,
    stats: Arc<Stats>,
    dev: DeviceState,
    client: Option<Client>,
    connections: u64,
    ctl_wake: Arc<EventFd>,
    ctl_rx: mpsc::Receiver<CtlRequest>,
    name: String,
}

/// The most bytes of unsent output a connection may hold, for a largest
/// message of `max_message` bytes.
pub fn output_limit(max_message: usize) -> usize {
    max_message.saturating_mul(4).max(16 << 20)
}

/// What [`dispatch`] did with the messages buffered in a reader.
#[derive(Debug, Default)]
pub struct Dispatched {
    /// Messages handled.
    pub messages: u64,
    /// Why the connection must close, if it must.
    pub close: Option<String>,
}

/// Handle every complete message buffered in `reader`, queueing replies on
/// `writer`; once VERSION is negotiated, raise the reader's and writer's
/// limits to what was agreed. This is the whole of what a device thread
/// does with client input between `recvmsg` and `sendmsg`, shared with
/// the `dispatch` fuzz target.
pub fn dispatch(
    session: &mut Session,
    dev: &mut DeviceState,
    reader: &mut Reader,
    writer: &mut Writer,
    stats: &Stats,
    mut recorder: Option<&mut Recorder>,
) -> Dispatched {
    let mut done = Dispatched::default();
    loop {
        let msg = match reader.next_message() {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(fe) => {
                session.frame_error(&fe.header, &fe.error, writer);
                done.close = Some(fe.error.to_string());
                break;
            }
        };
        if let Some(r) = recorder.as_deref_mut() {
            r.record(msg.bytes, &msg.fds);
        }
        done.messages += 1;
        Stats::bump(&stats.messages_received);
        let was_negotiated = session.negotiated();
        match session.handle(dev, msg, writer) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Close) => {
                done.close = Some("protocol violation".into());
                break;
            }
            Err(e) => {
                done.close = Some(e.to_string());
                break;
            }
        }
        if !was_negotiated && session.negotiated() {
            Stats::bump(&stats.sessions);
            let max = session.max_message();
            reader.set_max_message(max);
            writer.set_limit(output_limit(max));
        }
    }
    done
}

impl DeviceThread {
    fn register(&self, fd: i32, token: u64, events: EventSet) -> Result<(), Error> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(|e| Error::io("epoll_ctl add", e))
    }

    fn listen(&mut self, on: bool) -> Result<(), Error> {
        if on == self.listening {
            return Ok(());
        }
        let fd = self.listener.as_raw_fd();
        let r = if on {
            self.register(fd, TOKEN_LISTENER, EventSet::IN)
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                .map_err(|e| Error::io("epoll_ctl del", e))
        };
        self.listening = on;
        r
    }

    fn run(&mut self) -> Result<(), Error> {
        // Message-backed DMA from this thread would wait for a reply only
        // this thread can process: DmaSpace refuses it instead.
        // A shared space takes only file-backed grants: no messenger (it
        // would be the last device thread's).
        if self.dev.shared.is_none() {
            self.dev.dma.set_messenger(
                Some(self.dev.messenger.clone()),
                Some(std::thread::current().id()),
            );
        }
        let result = self.event_loop();
        self.end_client("the server is stopping");
        while self.dev.external_refs > 0 {
            self.dev.external_refs -= 1;
            self.dev.drop_user("external user (the server is stopping)");
        }
        if self.dev.shared.is_none() {
            self.dev.dma.set_messenger(None, None);
        }
        result
    }

    fn event_loop(&mut self) -> Result<(), Error> {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout = match self.client.as_ref().and_then(|c| c.deadline) {
                Some(d) => {
                    let ms = d.saturating_duration_since(Instant::now()).as_millis();
                    i32::try_from(ms.saturating_add(1)).unwrap_or(i32::MAX)
                }
                None => -1,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("epoll_wait", e)),
            };
            for ev in events.iter().take(n) {
                let token = ev.data();
                let set = ev.event_set();
                match token {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_LISTENER => self.accept()?,
                    TOKEN_DMA => {
                        self.dev.messenger.clear_wake();
                        self.pump_dma();
                    }
                    TOKEN_CTL => self.control(),
                    t if self.client.as_ref().is_some_and(|c| c.token == t) => {
                        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                            self.readable();
                        }
                        if set.contains(EventSet::OUT) {
                            self.pump_dma();
                        }
                    }
                    _ => {} // an event of a connection that has ended
                }
            }
            if let Some(deadline) = self.client.as_ref().and_then(|c| c.deadline) {
                if Instant::now() >= deadline {
                    let e = Error::HandshakeTimeout(self.dev.options.handshake_timeout.as_millis());
                    self.end_client(&e.to_string());
                }
            }
        }
    }

    /// Serve external users' requests.
    fn control(&mut self) {
        let _ = self.ctl_wake.read();
        while let Ok(req) = self.ctl_rx.try_recv() {
            let result = self.apply(req.op, &req.holder).map(|()| self.status());
            let _ = req.reply.send(result);
        }
    }

    fn apply(&mut self, op: CtlOp, holder: &str) -> Result<(), Error> {
        let who = format!("external user {holder}");
        match op {
            CtlOp::AddRef => {
                self.dev.add_user(&who)?;
                self.dev.external_refs += 1;
                log::info!(
                    "{}: {who} took a reference ({} now)",
                    self.name,
                    self.dev.external_refs
                );
            }
            CtlOp::DelRef => {
                if self.dev.external_refs == 0 {
                    return Err(Error::InvalidState(format!(
                        "{} has no external reference to drop",
                        self.name
                    )));
                }
                self.dev.external_refs -= 1;
                log::info!(
                    "{}: {who} dropped a reference ({} left)",
                    self.name,
                    self.dev.external_refs
                );
                self.dev.drop_user(&who);
            }
            CtlOp::Status => {}
        }
        Ok(())
    }

    fn status(&self) -> DeviceStatus {
        let (opens, closes) = self.dev.users.opens_closes();
        DeviceStatus {
            name: self.name.clone(),
            device_set: self.dev.users.set().name().to_string(),
            open: self.dev.users.is_open(),
            users: self.dev.users.count(),
            external_refs: self.dev.external_refs,
            client: self.dev.client_user,
            opens,
            closes,
        }
    }

    fn accept(&mut self) -> Result<(), Error> {
        if self.client.is_some() {
            // Only one client at a time; the listener should not even be
            // registered now.
            return self.listen(false);
        }
        let sock = match self.listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) => {
                // EMFILE and the like: the connection stays in the backlog
                // and is retried. No client is being served now, so pausing
                // this thread costs nothing and keeps the level-triggered
                // listener from spinning.
                log::warn!("accept: {e}; retrying in 100 ms");
                std::thread::sleep(std::time::Duration::from_millis(100));
                return Ok(());
            }
        };
        self.connections += 1;
        Stats::bump(&self.stats.connections);
        if !self.dev.options.allow_uids.is_empty() {
            match crate::listener::peer_uid(&sock) {
                Ok(uid) if self.dev.options.allow_uids.contains(&uid) => {}
                Ok(uid) => {
                    log::warn!(
                        "{}: refusing a client running as uid {uid} (not in --allow-uid)",
                        self.dev.device.name()
                    );
                    return Ok(());
                }
                Err(e) => {
                    log::warn!(
                        "{}: refusing a client whose credentials cannot be read: {e}",
                        self.dev.device.name()
                    );
                    return Ok(());
                }
            }
        }
        let token = TOKEN_CLIENT | (self.connections << TOKEN_SHIFT);
        self.register(sock.as_raw_fd(), token, EventSet::IN)?;
        self.listen(false)?;
        let session = Session::new();
        let max = session.max_message();
        log::info!(
            "{}: client connected (connection {})",
            self.dev.device.name(),
            self.connections
        );
        self.client = Some(Client {
            sock,
            reader: Reader::new(max),
            writer: Writer::new(output_limit(session::max_message(
                self.dev.options.max_data_xfer_size,
            ))),
            session,
            deadline: Some(Instant::now() + self.dev.options.handshake_timeout),
            want_out: false,
            token,
            messages: 0,
            recorder: Recorder::from_env(self.dev.device.name(), self.connections),
        });
        Ok(())
    }

    fn readable(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        match c.reader.fill(c.sock.as_fd(), &self.stats) {
            Ok(Fill::Data(_)) => {}
            Ok(Fill::WouldBlock) => return,
            Ok(Fill::Eof) => {
                let left = c.reader.buffered();
                let why = if left > 0 {
                    format!("the client closed the connection ({left} bytes of a message unread)")
                } else {
                    "the client closed the connection".to_string()
                };
                self.end_client(&why);
                return;
            }
            Err(e) => {
                self.end_client(&format!("receive: {e}"));
                return;
            }
        }
        let was_negotiated = c.session.negotiated();
        let done = dispatch(
            &mut c.session,
            &mut self.dev,
            &mut c.reader,
            &mut c.writer,
            &self.stats,
            c.recorder.as_mut(),
        );
        c.messages += done.messages;
        if !was_negotiated && c.session.negotiated() {
            c.deadline = None;
        }
        let close = done.close;
        if let Some(why) = close {
            // Best effort: the error reply, then close.
            let _ = c.writer.flush(c.sock.as_fd(), &self.stats);
            self.end_client(&why);
            return;
        }
        self.pump_dma();
    }

    /// Move waiting DMA requests to the client's output and flush, as long
    /// as the output queue has room and the socket takes the data. Called
    /// when requests arrive, when the socket becomes writable and after
    /// each batch of messages.
    fn pump_dma(&mut self) {
        loop {
            let Some(c) = self.client.as_mut() else {
                return;
            };
            let mut moved = 0;
            if c.session.negotiated() {
                // Leave room for replies: take requests only while the
                // output queue is less than half full.
                let room = output_limit(c.session.max_message()) / 2;
                while c.writer.queued_bytes() < room {
                    let Some(r) = self.dev.messenger.take_requests(1).pop() else {
                        break;
                    };
                    let (what, len) = match &r.op {
                        crate::messenger::DmaOp::Read { len } => ("DMA_READ", *len),
                        crate::messenger::DmaOp::Write { data } => ("DMA_WRITE", data.len()),
                    };
                    log::debug!(
                        "-> id {} {what} {:#x}+{len:#x} (server request)",
                        r.id,
                        r.iova
                    );
                    let pushed = session::encode_dma_request(&r).and_then(|bytes| {
                        c.writer.push(OutMessage {
                            bytes,
                            fds: Vec::new(),
                        })
                    });
                    if let Err(e) = pushed {
                        self.end_client(&e.to_string());
                        return;
                    }
                    moved += 1;
                }
            }
            match self.flush() {
                Some(true) if moved > 0 => continue,
                _ => return,
            }
        }
    }

    /// Send what is queued. `Some(true)`: all sent; `Some(false)`: the
    /// socket is full (EPOLLOUT armed); `None`: no client (any more).
    fn flush(&mut self) -> Option<bool> {
        let c = self.client.as_mut()?;
        match c.writer.flush(c.sock.as_fd(), &self.stats) {
            Ok(done) => {
                if c.want_out != done {
                    return Some(done);
                }
                let events = if done {
                    EventSet::IN
                } else {
                    EventSet::IN | EventSet::OUT
                };
                let r = self.epoll.ctl(
                    ControlOperation::Modify,
                    c.sock.as_raw_fd(),
                    EpollEvent::new(events, c.token),
                );
                match r {
                    Ok(()) => {
                        c.want_out = !done;
                        Some(done)
                    }
                    Err(e) => {
                        self.end_client(&format!("epoll_ctl: {e}"));
                        None
                    }
                }
            }
            Err(e) => {
                self.end_client(&format!("send: {e}"));
                None
            }
        }
    }

    /// Drop the client, its DMA mappings and interrupt descriptors, and
    /// listen for the next one.
    fn end_client(&mut self, why: &str) {
        let Some(c) = self.client.take() else {
            return;
        };
        log::info!(
            "{}: client disconnected after {} messages: {why}",
            self.dev.device.name(),
            c.messages
        );
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            c.sock.as_raw_fd(),
            EpollEvent::default(),
        );
        c.session.end(&mut self.dev);
        drop(c.sock);
        if let Err(e) = self.listen(true) {
            log::error!("cannot listen again: {e}");
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
