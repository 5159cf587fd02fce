//! One client session: VERSION negotiation and the dispatch of every
//! vfio-user command to the device.
//!
//! A [`Session`] lives while one client is connected; [`DeviceState`]
//! (the device, its DMA address space, its migration state) outlives
//! sessions and belongs to the device thread. [`Session::handle`] takes one
//! complete message with its descriptors and queues the reply; it never
//! waits for the client (see docs/ARCHITECTURE.md).
//!
//! Every error reply carries the errno [`Error::errno`] picks, and every
//! error is logged.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use vdevd_devices::Device;
use vdevd_devices::device::{self as dev, IrqFd};
use vdevd_devices::dma::{DmaLimits, DmaSpace, MapRequest, Prot};
use vdevd_protocol as proto;
use vdevd_protocol::vfio;
use vdevd_protocol::{Command, Fit, HEADER_SIZE, Header, MessageKind, Request};

use crate::aspace::SharedMember;
use crate::devset::Users;
use crate::error::Error;
use crate::messenger::{DmaOp, DmaReply, DmaRequest, Messenger, ReplyMismatch};
use crate::migration::Migration;
use crate::options::ServerOptions;
use crate::wire::{Incoming, OutMessage, SCM_MAX_FD, Writer};

/// Largest VERSION message accepted before negotiation: the header, the
/// versions and 16 KiB of JSON (QEMU sends about 200 bytes).
pub const MAX_VERSION_MESSAGE: usize = HEADER_SIZE + 4 + (16 << 10);

/// The largest body of any valid message except the data transfers, which
/// `max_data_xfer_size` bounds: REGION_WRITE_MULTI with 200 entries is
/// 4808 bytes, DMA_LOGGING_START with 256 ranges 4120.
const MAX_CONTROL_BODY: usize = 8192;

/// Largest message accepted once `max_data_xfer_size` is negotiated:
/// header, a 16-byte access header and the data, or the largest control
/// message.
pub fn max_message(max_data_xfer_size: u32) -> usize {
    HEADER_SIZE + (16 + max_data_xfer_size as usize).max(MAX_CONTROL_BODY)
}

/// The device and what belongs to it beyond one client.
pub struct DeviceState {
    /// The device model.
    pub device: Box<dyn Device>,
    /// Its DMA address space.
    pub dma: Arc<DmaSpace>,
    /// Relays message-backed DMA through the current client.
    pub messenger: Arc<Messenger>,
    /// What the server offers.
    pub options: ServerOptions,
    /// Migration state.
    pub migration: Migration,
    /// The device's users (its client session, external references) and
    /// its device set: the first user opens the device, the last closes
    /// it, under the set lock (see [`crate::devset`]).
    pub users: Users,
    /// The client session is one of the users (it negotiated VERSION and
    /// has not ended).
    pub client_user: bool,
    /// References held by users other than the client session (external
    /// users, see [`crate::ctl`]). While non-zero, a client that leaves
    /// disconnects the device instead of closing it.
    pub external_refs: usize,
    /// The address space is shared with other devices (see
    /// [`crate::aspace`]): grants go through it, counted per device.
    pub shared: Option<SharedMember>,
}

impl DeviceState {
    /// A new user `who` of the device: the first one opens it.
    pub fn add_user(&mut self, who: &str) -> Result<(), Error> {
        let DeviceState { users, device, .. } = self;
        users.get(who, || device.open().map_err(Error::from))
    }

    /// User `who` is gone: the last one closes the device (and migration
    /// returns to RUNNING).
    pub fn drop_user(&mut self, who: &str) {
        let DeviceState {
            users,
            device,
            migration,
            ..
        } = self;
        users.put(who, || {
            device.close();
            migration.reset();
        });
    }
}

impl DeviceState {
    /// The state of `device`, built on `dma`, before any client, alone in
    /// its device set and address space (what the fuzz targets serve).
    pub fn new(
        device: Box<dyn Device>,
        dma: Arc<DmaSpace>,
        options: ServerOptions,
    ) -> Result<DeviceState, Error> {
        let messenger =
            Arc::new(Messenger::new(options.dma_timeout).map_err(|e| Error::io("eventfd", e))?);
        let name = device.name().to_string();
        let set = crate::devset::DeviceSets::new().join(&format!("solo:{name}"));
        Ok(DeviceState {
            device,
            dma,
            messenger,
            options,
            migration: Migration::default(),
            users: Users::new(set, &name),
            client_user: false,
            external_refs: 0,
            shared: None,
        })
    }
}

/// What the session negotiated with VERSION.
#[derive(Clone, Copy, Debug)]
struct Negotiated {
    /// Most descriptors the client accepts in one of our messages.
    client_max_fds: usize,
    /// Our `max_data_xfer_size`: the largest transfer the client may send.
    max_xfer: u32,
    /// The client proposed REGION_WRITE_MULTI.
    write_multiple: bool,
}

/// Whether the connection goes on after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep serving.
    Continue,
    /// Close the connection (after sending what is queued).
    Close,
}

/// A reply being built: 16 bytes reserved for the header, then the body.
struct Reply {
    buf: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
}

impl Reply {
    fn new() -> Reply {
        Reply::with_capacity(0)
    }

    fn with_capacity(body: usize) -> Reply {
        let mut buf = Vec::with_capacity(HEADER_SIZE + body);
        buf.resize(HEADER_SIZE, 0);
        Reply {
            buf,
            fds: Vec::new(),
        }
    }
}

/// One client's session.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: Option<Negotiated>,
    warnings: WarnLimiter,
}

/// Rate limit of the warnings one client can cause: at most `limit` per
/// second; the rest are counted and the count logged once the second is
/// over, so a flood of bad messages cannot flood the log.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    window: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl WarnLimiter {
    /// Whether a warning may be logged now, with `limit` per second (0:
    /// no limit). Logs how many were suppressed in the last window when a
    /// new one starts.
    pub fn allow(&mut self, limit: u32) -> bool {
        if limit == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        let fresh = self
            .window
            .is_none_or(|w| now.duration_since(w) >= std::time::Duration::from_secs(1));
        if fresh {
            if self.suppressed > 0 {
                log::warn!(
                    "{} more warnings about this client suppressed (limit {limit} per second)",
                    self.suppressed
                );
            }
            self.window = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < limit {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Warnings suppressed in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Log a warning through the session's limiter.
macro_rules! warn_limited {
    ($self:expr, $dev:expr, $($arg:tt)+) => {
        if $self.warnings.allow($dev.options.log_warnings_per_sec) {
            log::warn!($($arg)+);
        }
    };
}

fn check_fds(count: usize, max: usize, command: u16) -> Result<(), Error> {
    if count > max {
        if max == 0 {
            return Err(Error::UnexpectedFds { command, count });
        }
        return Err(Error::TooManyFds { count, max });
    }
    Ok(())
}

/// Check that `fd` is an eventfd, make it non-blocking and wrap it.
pub fn irq_fd(fd: OwnedFd) -> Result<IrqFd, Error> {
    let raw = fd.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map_err(|e| Error::io("inspect an interrupt descriptor", e))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(Error::NotEventfd(raw));
    }
    // SAFETY: F_GETFL on a descriptor we own; no pointers.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::io("F_GETFL", std::io::Error::last_os_error()));
    }
    // SAFETY: F_SETFL on a descriptor we own; no pointers.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::io("F_SETFL", std::io::Error::last_os_error()));
    }
    Ok(IrqFd::new(fd))
}

/// Encode a server-to-client request.
pub fn encode_dma_request(req: &DmaRequest) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; HEADER_SIZE];
    let command = match &req.op {
        DmaOp::Read { len } => {
            proto::ServerRequest::DmaRead(proto::DmaAccess {
                address: req.iova,
                count: *len as u64,
            })
            .encode(&mut buf);
            Command::DmaRead
        }
        DmaOp::Write { data } => {
            proto::ServerRequest::DmaWrite(proto::DmaData {
                address: req.iova,
                data,
            })
            .encode(&mut buf);
            Command::DmaWrite
        }
    };
    let header = Header::command_message(req.id, command, buf.len() - HEADER_SIZE, false)?;
    buf[..HEADER_SIZE].copy_from_slice(&header.encode());
    Ok(buf)
}

fn error_reply(header: &Header, errno: i32) -> OutMessage {
    OutMessage {
        bytes: header.error_reply(errno as u32).encode().to_vec(),
        fds: Vec::new(),
    }
}

fn command_name(raw: u16) -> &'static str {
    Command::try_from(raw)
        .map(|c| c.name())
        .unwrap_or("unknown")
}

impl Session {
    /// A new session, before VERSION.
    pub fn new() -> Session {
        Session::default()
    }

    /// VERSION was negotiated.
    pub fn negotiated(&self) -> bool {
        self.negotiated.is_some()
    }

    /// The largest message the client may send now.
    pub fn max_message(&self) -> usize {
        match &self.negotiated {
            None => MAX_VERSION_MESSAGE,
            Some(n) => max_message(n.max_xfer),
        }
    }

    /// Answer a message that broke framing (size below the header or above
    /// the limit), if it is a command; the connection is closed after it.
    pub fn frame_error(&self, header: &[u8; HEADER_SIZE], error: &Error, out: &mut Writer) {
        log::warn!("closing the connection: {error}");
        let h = match Header::parse(header) {
            Ok(h) => h,
            Err(_) => {
                // The protocol crate refuses to decode a header whose size
                // is below 16. Its other fields are still where the
                // specification puts them (id at 0, command at 2, flags at
                // 8); read those so that the client learns why it is cut
                // off.
                Header {
                    msg_id: u16::from_ne_bytes([header[0], header[1]]),
                    command: u16::from_ne_bytes([header[2], header[3]]),
                    size: HEADER_SIZE as u32,
                    flags: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
                    error: 0,
                }
            }
        };
        if !h.is_reply() && !h.no_reply() {
            let _ = out.push(error_reply(&h, error.errno()));
        }
    }

    /// Handle one message and queue its reply. `Err` means the connection
    /// must close because our output cannot be queued.
    pub fn handle(
        &mut self,
        dev: &mut DeviceState,
        msg: Incoming<'_>,
        out: &mut Writer,
    ) -> Result<Flow, Error> {
        let Incoming {
            bytes,
            fds,
            fds_truncated,
        } = msg;
        let header = Header::parse(bytes)?;
        let body = bytes.get(HEADER_SIZE..).unwrap_or_default();
        log::debug!(
            "<- id {} {} ({} bytes, {} fds, flags {:#x})",
            header.msg_id,
            command_name(header.command),
            header.size,
            fds.len(),
            header.flags
        );
        let kind = match header.kind() {
            Ok(k) => k,
            Err(e) => {
                let e = Error::Protocol(e);
                warn_limited!(self, dev, "id {}: {e}", header.msg_id);
                out.push(error_reply(&header, e.errno()))?;
                return Ok(Flow::Continue);
            }
        };
        let no_reply = match kind {
            MessageKind::Reply { error } => {
                return self.handle_reply(dev, &header, body, error, fds, out);
            }
            MessageKind::Command { no_reply } => no_reply,
        };
        let result = self.request(dev, &header, body, fds, fds_truncated);
        let (result, flow) = match result {
            Ok(reply) => (Ok(reply), Flow::Continue),
            Err((e, flow)) => (Err(e), flow),
        };
        match result {
            Ok(mut reply) => {
                let h = header.reply(reply.buf.len() - HEADER_SIZE)?;
                reply.buf[..HEADER_SIZE].copy_from_slice(&h.encode());
                log::debug!(
                    "-> id {} {} ok ({} bytes, {} fds)",
                    header.msg_id,
                    command_name(header.command),
                    reply.buf.len(),
                    reply.fds.len()
                );
                if !no_reply {
                    out.push(OutMessage {
                        bytes: reply.buf,
                        fds: reply.fds,
                    })?;
                }
            }
            Err(e) => {
                let errno = e.errno();
                let level = match e {
                    Error::FeatureNotSupported(_) | Error::NotSupported(_) => log::Level::Info,
                    _ if !self.warnings.allow(dev.options.log_warnings_per_sec) => {
                        log::Level::Debug
                    }
                    _ => log::Level::Warn,
                };
                log::log!(
                    level,
                    "id {} {}: {e} (errno {errno}){}",
                    header.msg_id,
                    command_name(header.command),
                    if no_reply { ", no reply wanted" } else { "" }
                );
                if !no_reply {
                    out.push(error_reply(&header, errno))?;
                }
            }
        }
        Ok(flow)
    }

    /// A reply from the client: to one of our DMA_READ/DMA_WRITE requests.
    fn handle_reply(
        &mut self,
        dev: &mut DeviceState,
        header: &Header,
        body: &[u8],
        error: bool,
        fds: Vec<OwnedFd>,
        out: &mut Writer,
    ) -> Result<Flow, Error> {
        if self.negotiated.is_none() {
            log::warn!("closing the connection: a reply before VERSION");
            return Ok(Flow::Close);
        }
        if !matches!(
            header.command(),
            Ok(Command::DmaRead) | Ok(Command::DmaWrite)
        ) {
            // We only ever send DMA_READ and DMA_WRITE: this is a request
            // with the reply flag set. Answer it, so a confused client does
            // not wait forever.
            let e = Error::UnexpectedReply {
                id: header.msg_id,
                command: header.command,
            };
            warn_limited!(self, dev, "{e}: the reply flag is set on a request");
            let mut h = *header;
            h.flags = 0;
            out.push(error_reply(&h, e.errno()))?;
            return Ok(Flow::Continue);
        }
        if !fds.is_empty() {
            warn_limited!(
                self,
                dev,
                "id {}: closing {} descriptors sent with a reply",
                header.msg_id,
                fds.len()
            );
        }
        drop(fds);
        let parsed = if error {
            Ok(DmaReply::Error(header.error))
        } else {
            header
                .command()
                .and_then(|c| proto::parse_dma_reply(c, body))
                .map(|r| match r {
                    proto::DmaReply::Read(d) => DmaReply::Read {
                        iova: d.address,
                        data: d.data,
                    },
                    proto::DmaReply::Write(a) => DmaReply::Write(a.map(|a| (a.address, a.count))),
                })
        };
        let reply = match parsed {
            Ok(r) => r,
            Err(e) => {
                warn_limited!(self, dev, "id {}: malformed reply: {e}", header.msg_id);
                DmaReply::Error(libc::EINVAL as u32)
            }
        };
        match dev.messenger.complete(header.msg_id, reply) {
            Ok(()) => {}
            Err(ReplyMismatch::UnknownId) => {
                let e = Error::UnexpectedReply {
                    id: header.msg_id,
                    command: header.command,
                };
                warn_limited!(self, dev, "{e}; ignored");
            }
            Err(ReplyMismatch::WrongCommand) => {
                warn_limited!(
                    self,
                    dev,
                    "id {}: reply with command {} does not match our request; ignored",
                    header.msg_id,
                    command_name(header.command)
                );
            }
        }
        Ok(Flow::Continue)
    }

    /// A request from the client; the error carries whether to close.
    fn request(
        &mut self,
        dev: &mut DeviceState,
        header: &Header,
        body: &[u8],
        fds: Vec<OwnedFd>,
        fds_truncated: bool,
    ) -> Result<Reply, (Error, Flow)> {
        let keep = |e: Error| (e, Flow::Continue);
        let command = match header.command() {
            Ok(c) => c,
            Err(_) => {
                let e = Error::UnknownCommand(header.command);
                let flow = if self.negotiated.is_some() {
                    Flow::Continue
                } else {
                    Flow::Close
                };
                return Err((e, flow));
            }
        };
        let Some(negotiated) = self.negotiated else {
            if command != Command::Version {
                return Err((Error::VersionFirst(header.command), Flow::Close));
            }
            if fds_truncated || !fds.is_empty() {
                let e = Error::UnexpectedFds {
                    command: header.command,
                    count: fds.len(),
                };
                return Err((e, Flow::Close));
            }
            return self.version(dev, body).map_err(|e| (e, Flow::Close));
        };
        if command.direction() != proto::Direction::ClientToServer {
            return Err(keep(Error::ServerOnlyCommand(header.command)));
        }
        if command == Command::Version {
            return Err(keep(Error::SecondVersion));
        }
        if fds_truncated {
            return Err(keep(Error::FdsTruncated));
        }
        let max_fds = dev.options.max_msg_fds as usize;
        let request = proto::parse_request(command, body).map_err(|e| keep(e.into()))?;
        match request {
            Request::DmaMap(m) => {
                check_fds(fds.len(), 1, header.command).map_err(keep)?;
                self.dma_map(dev, &m, fds).map_err(keep)
            }
            Request::DeviceSetIrqs(s) => {
                let allowed = match s.data {
                    proto::IrqData::Eventfd => max_fds.min(SCM_MAX_FD),
                    _ => 0,
                };
                check_fds(fds.len(), allowed, header.command).map_err(keep)?;
                self.set_irqs(dev, &s, fds).map_err(keep)
            }
            other => {
                check_fds(fds.len(), 0, header.command).map_err(keep)?;
                drop(fds);
                self.dispatch(dev, negotiated, other).map_err(keep)
            }
        }
    }

    fn dispatch(
        &mut self,
        dev: &mut DeviceState,
        negotiated: Negotiated,
        request: Request<'_>,
    ) -> Result<Reply, Error> {
        match request {
            Request::Version(_) => Err(Error::SecondVersion),
            Request::DmaMap(_) | Request::DeviceSetIrqs(_) => {
                // Handled with their descriptors in `request`.
                Err(Error::InvalidArgument("misrouted request".into()))
            }
            Request::DmaUnmap(u) => self.dma_unmap(dev, negotiated, &u),
            Request::DeviceGetInfo(_) => {
                let info = dev.device.info();
                let mut flags = vfio::VFIO_DEVICE_FLAGS_PCI;
                if info.reset {
                    flags |= vfio::VFIO_DEVICE_FLAGS_RESET;
                }
                let mut r = Reply::with_capacity(16);
                proto::DeviceInfo {
                    flags,
                    num_regions: info.num_regions,
                    num_irqs: info.num_irqs,
                }
                .encode(&mut r.buf);
                Ok(r)
            }
            Request::DeviceGetRegionInfo(q) => self.region_info(dev, negotiated, &q),
            Request::DeviceGetRegionIoFds(q) => self.region_io_fds(dev, negotiated, &q),
            Request::DeviceGetIrqInfo(q) => {
                if q.index >= dev.device.info().num_irqs {
                    return Err(vdevd_devices::Error::NoSuchIrq(q.index).into());
                }
                let i = dev.device.irq_info(q.index)?;
                let mut flags = 0;
                for (set, bit) in [
                    (i.eventfd, vfio::VFIO_IRQ_INFO_EVENTFD),
                    (i.maskable, vfio::VFIO_IRQ_INFO_MASKABLE),
                    (i.automasked, vfio::VFIO_IRQ_INFO_AUTOMASKED),
                    (i.noresize, vfio::VFIO_IRQ_INFO_NORESIZE),
                ] {
                    if set {
                        flags |= bit;
                    }
                }
                let mut r = Reply::with_capacity(16);
                proto::IrqInfo {
                    flags,
                    index: q.index,
                    count: i.count,
                }
                .encode(&mut r.buf);
                Ok(r)
            }
            Request::RegionRead(a) => {
                check_xfer("REGION_READ count", a.count as usize, negotiated)?;
                check_region(dev, a.region)?;
                let count = a.count as usize;
                let mut r = Reply::with_capacity(16 + count);
                a.encode(&mut r.buf);
                let start = r.buf.len();
                r.buf.resize(start + count, 0);
                dev.device
                    .region_read(a.region, a.offset, &mut r.buf[start..])?;
                Ok(r)
            }
            Request::RegionWrite(d) => {
                check_xfer("REGION_WRITE count", d.data.len(), negotiated)?;
                check_region(dev, d.region)?;
                dev.device.region_write(d.region, d.offset, d.data)?;
                let mut r = Reply::with_capacity(16);
                proto::RegionAccess {
                    offset: d.offset,
                    region: d.region,
                    // The data came in a message bounded by max_message.
                    count: d.data.len() as u32,
                }
                .encode(&mut r.buf);
                Ok(r)
            }
            Request::RegionWriteMulti(w) => {
                if !negotiated.write_multiple {
                    return Err(Error::NotSupported(
                        "REGION_WRITE_MULTI was not negotiated".into(),
                    ));
                }
                for d in &w.writes {
                    check_region(dev, d.region)?;
                    dev.device.region_write(d.region, d.offset, d.data)?;
                }
                let mut r = Reply::with_capacity(8);
                proto::WriteMultiReply {
                    wr_cnt: w.writes.len() as u64,
                }
                .encode(&mut r.buf);
                Ok(r)
            }
            Request::DeviceReset => {
                let DeviceState { users, device, .. } = &mut *dev;
                users.set().locked(|| device.reset())?;
                dev.migration.reset();
                Ok(Reply::new())
            }
            Request::DeviceFeature(f) => self.feature(dev, negotiated, &f),
            Request::MigDataRead(m) => {
                require_migratable(dev)?;
                let max = (m.max_data_len() as usize).min(negotiated.max_xfer as usize);
                let data = dev.migration.read(max)?;
                let mut r = Reply::with_capacity(8 + data.len());
                m.encode_reply(data, &mut r.buf)?;
                Ok(r)
            }
            Request::MigDataWrite(m) => {
                require_migratable(dev)?;
                check_xfer("MIG_DATA_WRITE size", m.data.len(), negotiated)?;
                dev.migration.write(m.data)?;
                Ok(Reply::new())
            }
        }
    }

    fn version(&mut self, dev: &mut DeviceState, body: &[u8]) -> Result<Reply, Error> {
        let v = proto::Version::parse(body)?;
        if v.major != proto::version::VFIO_USER_MAJOR {
            return Err(Error::VersionUnsupported {
                major: v.major,
                minor: v.minor,
            });
        }
        let c = &v.capabilities;
        if !c.unknown_keys.is_empty() {
            log::debug!("client capabilities not known here: {:?}", c.unknown_keys);
        }
        let refuse = |name, value, reason| {
            Err(Error::CapabilityRefused {
                name,
                value,
                reason,
            })
        };
        if c.max_data_xfer_size == 0 {
            return refuse("max_data_xfer_size", 0, "must be above zero");
        }
        if c.pgsizes == 0 || c.pgsizes & 0xfff != 0 {
            return refuse("pgsizes", c.pgsizes, "page sizes must be multiples of 4096");
        }
        let o = &dev.options;
        let pgsizes = c.pgsizes & o.pgsizes;
        if pgsizes == 0 {
            return refuse(
                "pgsizes",
                c.pgsizes,
                "no page size in common with the server",
            );
        }
        let page_size = 1u64 << pgsizes.trailing_zeros();
        let migration = match (dev.device.migration().is_some(), c.migration) {
            (true, Some(m)) => Some(proto::MigrationCaps {
                pgsize: page_size,
                max_bitmap_size: m
                    .max_bitmap_size
                    .min(proto::version::DEFAULT_MAX_BITMAP_SIZE),
            }),
            _ => None,
        };
        let caps = proto::Capabilities {
            max_msg_fds: u64::from(o.max_msg_fds),
            max_data_xfer_size: u64::from(o.max_data_xfer_size),
            max_dma_maps: u64::from(o.max_dma_maps),
            pgsizes,
            migration,
            write_multiple: c.write_multiple,
            twin_socket: None,
            unknown_keys: Vec::new(),
        };
        // Our DMA messages must fit both our limit and the client's.
        let dma_chunk = c.max_data_xfer_size.min(u64::from(o.max_data_xfer_size)) as usize;
        let negotiated = Negotiated {
            client_max_fds: c.max_msg_fds.min(SCM_MAX_FD as u64) as usize,
            max_xfer: o.max_data_xfer_size,
            write_multiple: c.write_multiple,
        };
        dev.dma.set_limits(DmaLimits {
            max_maps: o.max_dma_maps,
            max_bytes: o.max_dma_bytes,
            page_size,
        });
        if !dev.client_user {
            dev.add_user("client")?;
            dev.client_user = true;
        }
        dev.messenger.connect(dma_chunk);
        self.negotiated = Some(negotiated);
        log::info!(
            "client negotiated version {}.{} -> 0.0: {}",
            v.major,
            v.minor,
            caps.to_json()
        );
        let mut r = Reply::with_capacity(256);
        proto::Version {
            major: proto::version::VFIO_USER_MAJOR,
            minor: proto::version::VFIO_USER_MINOR,
            capabilities: caps,
        }
        .encode(&mut r.buf);
        Ok(r)
    }

    fn dma_map(
        &mut self,
        dev: &mut DeviceState,
        m: &proto::DmaMap,
        mut fds: Vec<OwnedFd>,
    ) -> Result<Reply, Error> {
        if !m.read && !m.write {
            return Err(Error::InvalidArgument(
                "DMA_MAP without READ or WRITE".into(),
            ));
        }
        let file = fds.pop().map(|fd| (File::from(fd), m.offset));
        let req = MapRequest {
            iova: m.address,
            size: m.size,
            prot: Prot {
                read: m.read,
                write: m.write,
            },
            file,
        };
        let range = match &dev.shared {
            None => dev.dma.map(req)?,
            Some(sh) => {
                let id = match &req.file {
                    Some((f, off)) => {
                        use std::os::unix::fs::MetadataExt;
                        let meta = f
                            .metadata()
                            .map_err(|e| Error::io("fstat of a DMA_MAP descriptor", e))?;
                        Some((meta.dev(), meta.ino(), *off))
                    }
                    None => None,
                };
                sh.space.map(sh.holder, req, id)?
            }
        };
        if let Err(e) = dev.device.dma_map(&range) {
            // Undo: the device refused the range, so the client must not
            // believe it mapped.
            match &dev.shared {
                None => {
                    let _ = dev.dma.unmap(range.iova, range.size);
                }
                Some(sh) => {
                    let _ = sh.space.unmap(sh.holder, range.iova, range.size);
                }
            }
            return Err(e.into());
        }
        log::debug!(
            "mapped {:#x}+{:#x} {} {:?}",
            range.iova,
            range.size,
            range.prot,
            range.kind
        );
        Ok(Reply::new())
    }

    fn dma_unmap(
        &mut self,
        dev: &mut DeviceState,
        negotiated: Negotiated,
        u: &proto::DmaUnmap,
    ) -> Result<Reply, Error> {
        let mut bitmap = None;
        match u.kind {
            proto::UnmapKind::All => {
                let messenger = dev.messenger.clone();
                let _fence = messenger.fence(0, u64::MAX);
                unmap_all(dev);
            }
            proto::UnmapKind::Range => {
                let range = dev.dma.find(u.address, u.size).ok_or(
                    vdevd_devices::dma::DmaError::NotFound {
                        iova: u.address,
                        size: u.size,
                    },
                )?;
                let messenger = dev.messenger.clone();
                let _fence = messenger.fence(range.iova, range.size);
                match &dev.shared {
                    None => {
                        dev.device.dma_unmap(&range);
                        dev.dma.unmap(range.iova, range.size)?;
                    }
                    Some(sh) => {
                        if !sh.held_by_me(&range) {
                            return Err(vdevd_devices::dma::DmaError::NotFound {
                                iova: u.address,
                                size: u.size,
                            }
                            .into());
                        }
                        dev.device.dma_unmap(&range);
                        sh.space.unmap(sh.holder, range.iova, range.size)?;
                    }
                }
            }
            proto::UnmapKind::DirtyBitmap { .. } if dev.shared.is_some() => {
                return Err(Error::NotSupported(
                    "dirty page logging of a shared address space".into(),
                ));
            }
            proto::UnmapKind::DirtyBitmap { pgsize, size } => {
                if !dev.dma.dirty_logging() {
                    return Err(Error::InvalidState(
                        "DMA_UNMAP with a dirty bitmap while dirty logging is not running".into(),
                    ));
                }
                if !pgsize.is_power_of_two() {
                    return Err(Error::InvalidArgument(format!(
                        "dirty bitmap page size {pgsize:#x}"
                    )));
                }
                let needed = u.size.div_ceil(pgsize).div_ceil(64) * 8;
                if size < needed {
                    return Err(Error::InvalidArgument(format!(
                        "dirty bitmap of {size} bytes, {needed} needed"
                    )));
                }
                check_xfer(
                    "dirty bitmap",
                    usize::try_from(size).unwrap_or(usize::MAX),
                    negotiated,
                )?;
                let range = dev.dma.find(u.address, u.size).ok_or(
                    vdevd_devices::dma::DmaError::NotFound {
                        iova: u.address,
                        size: u.size,
                    },
                )?;
                let messenger = dev.messenger.clone();
                let _fence = messenger.fence(range.iova, range.size);
                dev.device.dma_unmap(&range);
                let words = dev.dma.take_dirty_bitmap(range.iova, range.size, pgsize)?;
                dev.dma.unmap(range.iova, range.size)?;
                let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
                // `size` fits in usize: it passed check_xfer.
                bytes.resize(size as usize, 0);
                bitmap = Some(bytes);
            }
        }
        let mut r = Reply::with_capacity(24 + bitmap.as_ref().map_or(0, |b| 16 + b.len()));
        u.encode_reply(bitmap.as_deref(), &mut r.buf)?;
        Ok(r)
    }

    fn region_info(
        &mut self,
        dev: &mut DeviceState,
        negotiated: Negotiated,
        q: &proto::RegionInfoRequest,
    ) -> Result<Reply, Error> {
        check_region(dev, q.index)?;
        let info = dev.device.region_info(q.index)?;
        let mut flags = 0;
        if info.read {
            flags |= vfio::VFIO_REGION_INFO_FLAG_READ;
        }
        if info.write {
            flags |= vfio::VFIO_REGION_INFO_FLAG_WRITE;
        }
        let mut caps = Vec::new();
        let mut offset = 0;
        let mut fd = None;
        // A client that takes no descriptors cannot map anything.
        if let Some(m) = info.mmap.filter(|_| negotiated.client_max_fds > 0) {
            flags |= vfio::VFIO_REGION_INFO_FLAG_MMAP;
            offset = m.offset;
            if !m.areas.is_empty() {
                caps.push(proto::RegionCap::SparseMmap(
                    m.areas
                        .iter()
                        .map(|a| proto::SparseArea {
                            offset: a.offset,
                            size: a.size,
                        })
                        .collect(),
                ));
            }
            fd = Some(m.fd);
        }
        if let Some(t) = info.region_type {
            caps.push(proto::RegionCap::Type {
                kind: t.kind,
                subtype: t.subtype,
            });
        }
        let reply = proto::RegionInfo {
            index: q.index,
            flags,
            size: info.size,
            offset,
            caps,
        };
        let mut r = Reply::with_capacity(64);
        if q.encode_reply(&reply, &mut r.buf)? == Fit::Full {
            // The descriptor goes only with the full reply: a client given
            // a truncated one asks again.
            r.fds.extend(fd);
        }
        Ok(r)
    }

    fn region_io_fds(
        &mut self,
        dev: &mut DeviceState,
        negotiated: Negotiated,
        q: &proto::RegionIoFdsRequest,
    ) -> Result<Reply, Error> {
        check_region(dev, q.index)?;
        let list = dev.device.region_io_fds(q.index)?;
        let mut fds: Vec<Arc<OwnedFd>> = Vec::new();
        let mut subs = Vec::with_capacity(list.len());
        for e in list {
            let index = match fds.iter().position(|f| Arc::ptr_eq(f, &e.fd)) {
                Some(i) => i,
                None => {
                    fds.push(e.fd.clone());
                    fds.len() - 1
                }
            };
            subs.push(proto::SubRegion {
                offset: e.offset,
                size: e.size,
                fd_index: index as u32,
                kind: vfio::VFIO_USER_IO_FD_TYPE_IOEVENTFD,
                flags: if e.datamatch.is_some() {
                    vfio::KVM_IOEVENTFD_FLAG_DATAMATCH
                } else {
                    0
                },
                data: e.datamatch.unwrap_or(0),
            });
        }
        let limit = negotiated.client_max_fds.min(SCM_MAX_FD);
        if fds.len() > limit {
            return Err(Error::TooManyFds {
                count: fds.len(),
                max: limit,
            });
        }
        let mut r = Reply::with_capacity(16 + 40 * subs.len());
        let fit = q.encode_reply(
            &proto::RegionIoFds {
                index: q.index,
                sub_regions: subs,
            },
            &mut r.buf,
        )?;
        if fit == Fit::Full {
            r.fds = fds;
        }
        Ok(r)
    }

    fn set_irqs(
        &mut self,
        dev: &mut DeviceState,
        s: &proto::SetIrqs<'_>,
        fds: Vec<OwnedFd>,
    ) -> Result<Reply, Error> {
        if s.index >= dev.device.info().num_irqs {
            return Err(vdevd_devices::Error::NoSuchIrq(s.index).into());
        }
        let info = dev.device.irq_info(s.index)?;
        let action = match s.action {
            proto::IrqAction::Mask => dev::IrqAction::Mask,
            proto::IrqAction::Unmask => dev::IrqAction::Unmask,
            proto::IrqAction::Trigger => dev::IrqAction::Trigger,
        };
        if s.count == 0 {
            let disable = action == dev::IrqAction::Trigger
                && s.start == 0
                && matches!(s.data, proto::IrqData::None | proto::IrqData::Eventfd)
                && fds.is_empty();
            if !disable {
                return Err(Error::InvalidArgument(
                    "SET_IRQS with count 0 only disables an index (TRIGGER, start 0, no data)"
                        .into(),
                ));
            }
        } else if s
            .start
            .checked_add(s.count)
            .is_none_or(|end| end > info.count)
        {
            return Err(Error::InvalidArgument(format!(
                "vectors {}..{} of index {} which has {}",
                s.start,
                u64::from(s.start) + u64::from(s.count),
                s.index,
                info.count
            )));
        }
        let data = match s.data {
            proto::IrqData::None => dev::IrqData::None,
            proto::IrqData::Bool(b) => dev::IrqData::Bool(b.iter().map(|v| *v != 0).collect()),
            proto::IrqData::Eventfd => {
                if fds.is_empty() {
                    dev::IrqData::Eventfds((0..s.count).map(|_| None).collect())
                } else if fds.len() == s.count as usize {
                    let mut v = Vec::with_capacity(fds.len());
                    for fd in fds {
                        v.push(Some(irq_fd(fd)?));
                    }
                    dev::IrqData::Eventfds(v)
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "{} eventfds for {} vectors",
                        fds.len(),
                        s.count
                    )));
                }
            }
        };
        dev.device.set_irqs(dev::IrqSet {
            index: s.index,
            start: s.start,
            count: s.count,
            action,
            data,
        })?;
        Ok(Reply::new())
    }

    fn feature(
        &mut self,
        dev: &mut DeviceState,
        negotiated: Negotiated,
        f: &proto::DeviceFeature,
    ) -> Result<Reply, Error> {
        use proto::FeatureRequest as F;
        let migratable = dev.device.migration().is_some();
        let mut r = Reply::with_capacity(64);
        let mut bitmap = Vec::new();
        let reply = match &f.request {
            F::Probe { feature, .. } => {
                let supported = match *feature {
                    vfio::VFIO_DEVICE_FEATURE_MIGRATION
                    | vfio::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => migratable,
                    vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START
                    | vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
                    | vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => true,
                    _ => false,
                };
                if !supported {
                    return Err(Error::FeatureNotSupported(*feature));
                }
                proto::FeatureReply::Probe
            }
            F::GetMigration => {
                require_migratable(dev)?;
                proto::FeatureReply::Migration {
                    flags: vfio::VFIO_MIGRATION_STOP_COPY,
                }
            }
            F::GetMigDeviceState => {
                require_migratable(dev)?;
                proto::FeatureReply::MigDeviceState(proto::MigDeviceState {
                    state: dev.migration.state(),
                    data_fd: 0,
                })
            }
            F::SetMigDeviceState(s) => {
                let DeviceState {
                    device, migration, ..
                } = dev;
                let mig = device.migration().ok_or(Error::FeatureNotSupported(
                    vfio::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                ))?;
                migration.set_state(s.state, mig)?;
                proto::FeatureReply::MigDeviceState(*s)
            }
            F::DmaLoggingStart(start) => {
                let ranges: Vec<(u64, u64)> =
                    start.ranges.iter().map(|r| (r.iova, r.length)).collect();
                if dev.shared.is_some() {
                    return Err(Error::NotSupported(
                        "dirty page logging of a shared address space".into(),
                    ));
                }
                check_dirty_log(dev, start.page_size, &ranges)?;
                dev.dma.start_dirty_logging(start.page_size, &ranges)?;
                proto::FeatureReply::DmaLoggingStart(start.clone())
            }
            F::DmaLoggingStop => {
                dev.dma.stop_dirty_logging()?;
                proto::FeatureReply::DmaLoggingStop
            }
            F::DmaLoggingReport(report) => {
                let size = report.bitmap_size()?;
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                check_xfer("dirty bitmap", size, negotiated)?;
                if !dev.dma.dirty_logging() {
                    return Err(Error::InvalidState("dirty logging is not running".into()));
                }
                // Only take (and clear) the bits if the reply can carry them.
                let needed = (proto::feature::FEATURE_SIZE
                    + proto::feature::DMA_LOGGING_REPORT_SIZE)
                    .saturating_add(size);
                if (f.argsz as usize) >= needed && report.length > 0 {
                    let words =
                        dev.dma
                            .take_dirty_bitmap(report.iova, report.length, report.page_size)?;
                    bitmap = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
                }
                bitmap.resize(size, 0);
                proto::FeatureReply::DmaLoggingReport {
                    report: *report,
                    bitmap: &bitmap,
                }
            }
        };
        f.encode_reply(&reply, &mut r.buf)?;
        Ok(r)
    }

    /// The client is gone: drop everything it gave us. The device forgets
    /// each DMA range before the range is unmapped; then it is closed (or,
    /// while an external user holds it, only disconnected).
    pub fn end(self, dev: &mut DeviceState) {
        dev.messenger.disconnect();
        unmap_all(dev);
        if dev.dma.dirty_logging() {
            let _ = dev.dma.stop_dirty_logging();
        }
        if dev.client_user {
            dev.client_user = false;
            if dev.users.count() > 1 {
                log::info!(
                    "{}: client gone, device kept open for {} external reference(s)",
                    dev.device.name(),
                    dev.external_refs
                );
                dev.device.disconnect();
            }
            dev.drop_user("client");
        }
    }
}

fn unmap_all(dev: &mut DeviceState) {
    if let Some(sh) = dev.shared.clone() {
        for range in sh.space.held_by(sh.holder) {
            dev.device.dma_unmap(&range);
            if let Err(e) = sh.space.unmap(sh.holder, range.iova, range.size) {
                log::warn!("address space {}: {e}", sh.space.name());
            }
        }
        return;
    }
    for range in dev.dma.ranges() {
        dev.device.dma_unmap(&range);
    }
    dev.dma.unmap_all();
}

fn check_region(dev: &DeviceState, index: u32) -> Result<(), Error> {
    if index >= dev.device.info().num_regions {
        return Err(vdevd_devices::Error::NoSuchRegion(index).into());
    }
    Ok(())
}

/// Most memory the dirty bitmaps of one DMA_LOGGING_START may take: what
/// one report may carry at most (QEMU's `max_bitmap_size`), 8 TiB of
/// logged memory at 4 KiB pages.
pub const MAX_DIRTY_LOG_BYTES: u64 = proto::version::DEFAULT_MAX_BITMAP_SIZE;

/// Refuse a DMA_LOGGING_START whose bitmaps would be larger than
/// [`MAX_DIRTY_LOG_BYTES`] (a client could otherwise make the server
/// allocate without bound), or whose page size is below the smallest DMA
/// page size offered.
fn check_dirty_log(dev: &DeviceState, page_size: u64, ranges: &[(u64, u64)]) -> Result<(), Error> {
    let min_page = dev.options.page_size();
    if page_size < min_page || !page_size.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "dirty logging page size {page_size:#x} (a power of two of at least {min_page:#x})"
        )));
    }
    let mapped: Vec<(u64, u64)>;
    let ranges = if ranges.is_empty() {
        mapped = dev.dma.ranges().iter().map(|r| (r.iova, r.size)).collect();
        &mapped[..]
    } else {
        ranges
    };
    let mut bytes: u64 = 0;
    for &(_, len) in ranges {
        // One bit per page, in 64-bit words.
        let words = len.div_ceil(page_size).div_ceil(64);
        bytes = bytes.saturating_add(words.saturating_mul(8));
    }
    if bytes > MAX_DIRTY_LOG_BYTES {
        return Err(Error::TransferTooLarge {
            what: "dirty bitmaps",
            value: bytes,
            max: MAX_DIRTY_LOG_BYTES,
        });
    }
    Ok(())
}

fn check_xfer(what: &'static str, len: usize, n: Negotiated) -> Result<(), Error> {
    if len > n.max_xfer as usize {
        return Err(Error::TransferTooLarge {
            what,
            value: len as u64,
            max: u64::from(n.max_xfer),
        });
    }
    Ok(())
}

fn require_migratable(dev: &mut DeviceState) -> Result<(), Error> {
    if dev.device.migration().is_none() {
        return Err(Error::FeatureNotSupported(
            vfio::VFIO_DEVICE_FEATURE_MIGRATION,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod warn_limiter_tests {
    use super::WarnLimiter;

    #[test]
    fn at_most_the_limit_per_window_then_counted() {
        let mut w = WarnLimiter::default();
        let allowed = (0..10).filter(|_| w.allow(3)).count();
        assert_eq!(allowed, 3);
        assert_eq!(w.suppressed(), 7);
        // no limit
        let mut w = WarnLimiter::default();
        assert!((0..1000).all(|_| w.allow(0)));
        assert_eq!(w.suppressed(), 0);
    }
}
