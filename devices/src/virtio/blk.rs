//! The virtio-blk device model (virtio 1.2, 5.2), on a shared
//! [`BlockBackend`].
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES; anything else
//! completes with `VIRTIO_BLK_S_UNSUPP`. Features offered: VERSION_1,
//! RING_EVENT_IDX, RING_INDIRECT_DESC, SEG_MAX, SIZE_MAX, BLK_SIZE, FLUSH,
//! CONFIG_WCE, MQ, and DISCARD and WRITE_ZEROES (or RO for a read-only
//! disk).
//!
//! # Chain layout
//!
//! The model makes no assumption about how the driver splits a request
//! into descriptors (virtio 1.2, 2.7.4): the device-readable bytes of a
//! chain are the 16-byte header followed by the request's payload (data of
//! an OUT, the segments of a DISCARD / WRITE_ZEROES), the device-writable
//! bytes are the data of an IN or GET_ID followed by the one-byte status.
//! Data moves between the backend and guest memory without a copy: the
//! guest's buffers become the backend's `iovec`s.
//!
//! # Durability
//!
//! Without FLUSH negotiated the disk is write-through (virtio 1.2, 5.2.5.1:
//! a driver that cannot flush must see writes as durable). With it, the
//! volatile write cache is on until the driver clears `writeback`
//! (CONFIG_WCE), and FLUSH makes every completed write durable
//! (`fdatasync` on a file).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::{DeviceBroken, VirtioDevice, features as common};
use crate::Error;
use crate::block::{BlockBackend, BlockError, IoBufs, IoVecStorage};

/// Virtio device ID of a block device.
pub const DEVICE_ID: u16 = 2;

/// virtio-blk feature bits.
pub mod features {
    /// `size_max` is valid.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// FLUSH is supported.
    pub const FLUSH: u64 = 1 << 9;
    /// `writeback` is writable.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// `num_queues` is valid.
    pub const MQ: u64 = 1 << 12;
    /// DISCARD is supported.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES is supported.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = 4;
    /// Read the device ID string.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Configuration space offsets (`struct virtio_blk_config`).
pub mod config {
    /// Capacity in 512-byte sectors (u64).
    pub const CAPACITY: usize = 0;
    /// Largest segment, in bytes (u32).
    pub const SIZE_MAX: usize = 8;
    /// Most segments per request (u32).
    pub const SEG_MAX: usize = 12;
    /// Logical block size (u32).
    pub const BLK_SIZE: usize = 20;
    /// Write cache mode, 1 = write back (u8).
    pub const WRITEBACK: usize = 32;
    /// Number of queues (u16).
    pub const NUM_QUEUES: usize = 34;
    /// Largest discard, in sectors (u32).
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// Most discard segments per request (u32).
    pub const MAX_DISCARD_SEG: usize = 40;
    /// Discard alignment, in sectors (u32).
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// Largest write-zeroes, in sectors (u32).
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// Most write-zeroes segments per request (u32).
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// Write-zeroes may deallocate (u8).
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Size of the configuration space the device presents.
    pub const SIZE: usize = 60;
}

/// Sector size of the request protocol (independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Largest segment the driver may use, advertised in `size_max`.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most DISCARD / WRITE_ZEROES segments per request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Largest DISCARD / WRITE_ZEROES segment, in sectors (just under 2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 8;
/// Length of the device ID string (GET_ID).
pub const ID_LEN: usize = 20;
/// Most queues a device may have.
pub const MAX_QUEUES: u16 = 64;
/// Header of every request: type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// A DISCARD / WRITE_ZEROES segment: sector, num_sectors, flags.
const SEGMENT_LEN: u64 = 16;
/// WRITE_ZEROES segment flag: the range may be deallocated.
const SEGMENT_FLAG_UNMAP: u32 = 1;

/// Options of a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Number of request queues, 1..=[`MAX_QUEUES`].
    pub num_queues: u16,
    /// Largest queue size the driver may choose: a power of two, 4..=32768.
    pub queue_size: u16,
    /// Device ID string returned by GET_ID (at most 20 bytes).
    pub serial: String,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            serial: "vdevd-virtio-blk".into(),
        }
    }
}

impl BlkConfig {
    /// Check the options.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("virtio-blk: {m}")));
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return bad(format!("{} queues (1..={MAX_QUEUES})", self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 4 {
            return bad(format!(
                "queue size {} (a power of two, 4..=32768)",
                self.queue_size
            ));
        }
        if self.serial.len() > ID_LEN {
            return bad(format!(
                "serial {:?} is longer than {ID_LEN} bytes",
                self.serial
            ));
        }
        Ok(())
    }
}

/// A contiguous piece of guest memory from one descriptor.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u64,
}

/// Per-thread buffers, reused from request to request.
#[derive(Default)]
struct Scratch {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    iov: IoVecStorage,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Request counters, for logs and tests.
#[derive(Debug, Default)]
pub struct BlkStats {
    /// Requests completed with OK.
    pub ok: AtomicU64,
    /// Requests completed with IOERR.
    pub ioerr: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupp: AtomicU64,
    /// FLUSH requests completed with OK.
    pub flushes: AtomicU64,
}

/// The virtio-blk device. See the module documentation.
pub struct Blk {
    backend: Arc<dyn BlockBackend>,
    config: BlkConfig,
    offered: u64,
    acked: AtomicU64,
    stats: BlkStats,
}

impl std::fmt::Debug for Blk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blk")
            .field("backend", &self.backend.describe())
            .field("config", &self.config)
            .finish()
    }
}

/// What a request came to: its status and how many bytes of data it wrote
/// into the chain (the status byte not included).
struct Outcome {
    status: u8,
    written: u64,
}

impl Outcome {
    fn status(status: u8) -> Outcome {
        Outcome { status, written: 0 }
    }

    fn ok(written: u64) -> Outcome {
        Outcome {
            status: status::OK,
            written,
        }
    }
}

fn ioerr(why: std::fmt::Arguments<'_>) -> Outcome {
    log::debug!("virtio-blk: request failed: {why}");
    Outcome::status(status::IOERR)
}

fn backend_error(what: &str, e: &BlockError) -> Outcome {
    match e {
        BlockError::Io(_) | BlockError::NoSpace => log::warn!("virtio-blk: {what}: {e}"),
        _ => log::debug!("virtio-blk: {what}: {e}"),
    }
    Outcome::status(status::IOERR)
}

fn total(segs: &[Seg]) -> u64 {
    // Each descriptor is at most 4 GiB and a chain has at most 65536 of
    // them, so the sum fits in u64.
    segs.iter().map(|s| s.len).sum()
}

/// Call `f(addr, len)` for the pieces of `[skip, skip + len)` of the byte
/// stream the segments form.
fn pieces(
    segs: &[Seg],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), ()>,
) -> Result<(), ()> {
    for s in segs {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        let addr = s.addr.checked_add(skip).ok_or(())?;
        f(addr, n)?;
        skip = 0;
        len -= n;
    }
    if len == 0 { Ok(()) } else { Err(()) }
}

/// Copy `buf.len()` bytes starting `skip` bytes into the segments.
fn gather<M: GuestMemory>(mem: &M, segs: &[Seg], skip: u64, buf: &mut [u8]) -> Result<(), ()> {
    let mut at = 0usize;
    pieces(segs, skip, buf.len() as u64, |addr, n| {
        let n = usize::try_from(n).map_err(|_| ())?;
        let dst = buf.get_mut(at..at + n).ok_or(())?;
        mem.read_slice(dst, GuestAddress(addr)).map_err(|_| ())?;
        at += n;
        Ok(())
    })
}

/// Copy `data` into the segments starting `skip` bytes in.
fn scatter<M: GuestMemory>(mem: &M, segs: &[Seg], skip: u64, data: &[u8]) -> Result<(), ()> {
    let mut at = 0usize;
    pieces(segs, skip, data.len() as u64, |addr, n| {
        let n = usize::try_from(n).map_err(|_| ())?;
        let src = data.get(at..at + n).ok_or(())?;
        mem.write_slice(src, GuestAddress(addr)).map_err(|_| ())?;
        at += n;
        Ok(())
    })
}

/// Append the guest memory of `[skip, skip + len)` of the segments to
/// `bufs`, checked for `access`.
fn push_guest<'a, M: GuestMemory<Bitmap = ()>>(
    mem: &'a M,
    segs: &[Seg],
    skip: u64,
    len: u64,
    access: Permissions,
    bufs: &mut IoBufs<'a>,
) -> Result<(), ()> {
    pieces(segs, skip, len, |addr, n| {
        let n = usize::try_from(n).map_err(|_| ())?;
        let slices = mem
            .get_slices(GuestAddress(addr), n, access)
            .map_err(|_| ())?;
        for slice in slices {
            bufs.push_slice(slice.map_err(|_| ())?);
        }
        Ok(())
    })
}

impl Blk {
    /// A virtio-blk device on `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>, config: BlkConfig) -> Result<Blk, Error> {
        config.validate()?;
        let mut offered = common::VERSION_1
            | common::RING_EVENT_IDX
            | common::RING_INDIRECT_DESC
            | features::SEG_MAX
            | features::SIZE_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::CONFIG_WCE
            | features::MQ;
        if backend.read_only() {
            offered |= features::RO;
        } else {
            offered |= features::DISCARD | features::WRITE_ZEROES;
        }
        Ok(Blk {
            backend,
            config,
            offered,
            acked: AtomicU64::new(0),
            stats: BlkStats::default(),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// The options the device was built with.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Request counters.
    pub fn stats(&self) -> &BlkStats {
        &self.stats
    }

    fn acked(&self, feature: u64) -> bool {
        self.acked.load(Ordering::Relaxed) & feature != 0
    }

    fn config_image(&self) -> [u8; config::SIZE] {
        let mut c = [0u8; config::SIZE];
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(dst) = c.get_mut(off..off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(
            config::CAPACITY,
            &(self.backend.size() / SECTOR_SIZE).to_le_bytes(),
        );
        put(config::SIZE_MAX, &SIZE_MAX.to_le_bytes());
        let seg_max = u32::from(self.config.queue_size).saturating_sub(2).max(1);
        put(config::SEG_MAX, &seg_max.to_le_bytes());
        put(config::BLK_SIZE, &self.backend.block_size().to_le_bytes());
        put(config::WRITEBACK, &[u8::from(self.backend.write_cache())]);
        put(config::NUM_QUEUES, &self.config.num_queues.to_le_bytes());
        let align = (u64::from(self.backend.block_size()) / SECTOR_SIZE) as u32;
        if !self.backend.read_only() {
            put(
                config::MAX_DISCARD_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(config::MAX_DISCARD_SEG, &MAX_DISCARD_SEGMENTS.to_le_bytes());
            put(config::DISCARD_SECTOR_ALIGNMENT, &align.to_le_bytes());
            put(
                config::MAX_WRITE_ZEROES_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                config::MAX_WRITE_ZEROES_SEG,
                &MAX_DISCARD_SEGMENTS.to_le_bytes(),
            );
            put(config::WRITE_ZEROES_MAY_UNMAP, &[1]);
        }
        c
    }

    /// Byte offset of a request's sector, if it does not overflow.
    fn offset(sector: u64) -> Option<u64> {
        sector.checked_mul(SECTOR_SIZE)
    }

    fn execute<M: GuestMemory<Bitmap = ()>>(
        &self,
        mem: &M,
        scratch: &mut Scratch,
        data_len: u64,
    ) -> Outcome {
        let Scratch {
            readable,
            writable,
            iov,
        } = scratch;
        let mut header = [0u8; HEADER_LEN as usize];
        if gather(mem, readable, 0, &mut header).is_err() {
            return ioerr(format_args!("header unreadable or shorter than 16 bytes"));
        }
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        let payload = total(readable) - HEADER_LEN;
        match kind {
            req::IN => {
                if payload != 0 {
                    return ioerr(format_args!("IN with {payload} device-readable data bytes"));
                }
                if data_len % SECTOR_SIZE != 0 {
                    return ioerr(format_args!("IN of {data_len} bytes"));
                }
                let Some(offset) = Self::offset(sector) else {
                    return ioerr(format_args!("IN at sector {sector:#x}"));
                };
                let mut bufs = iov.bufs();
                if push_guest(mem, writable, 0, data_len, Permissions::Write, &mut bufs).is_err() {
                    return ioerr(format_args!("IN buffer outside guest memory"));
                }
                match self.backend.read(offset, &bufs) {
                    Ok(()) => Outcome::ok(data_len),
                    Err(e) => backend_error("read", &e),
                }
            }
            req::OUT => {
                if data_len != 0 {
                    return ioerr(format_args!(
                        "OUT with {data_len} device-writable data bytes"
                    ));
                }
                if self.backend.read_only() {
                    return ioerr(format_args!("OUT on a read-only disk"));
                }
                if payload % SECTOR_SIZE != 0 {
                    return ioerr(format_args!("OUT of {payload} bytes"));
                }
                let Some(offset) = Self::offset(sector) else {
                    return ioerr(format_args!("OUT at sector {sector:#x}"));
                };
                let mut bufs = iov.bufs();
                if push_guest(
                    mem,
                    readable,
                    HEADER_LEN,
                    payload,
                    Permissions::Read,
                    &mut bufs,
                )
                .is_err()
                {
                    return ioerr(format_args!("OUT buffer outside guest memory"));
                }
                match self.backend.write(offset, &bufs, false) {
                    Ok(()) => Outcome::ok(0),
                    Err(e) => backend_error("write", &e),
                }
            }
            req::FLUSH => match self.backend.flush() {
                Ok(()) => {
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    Outcome::ok(0)
                }
                Err(e) => backend_error("flush", &e),
            },
            req::GET_ID => {
                let mut id = [0u8; ID_LEN];
                let serial = self.config.serial.as_bytes();
                let n = serial.len().min(ID_LEN);
                id[..n].copy_from_slice(&serial[..n]);
                let len = usize::try_from(data_len).unwrap_or(ID_LEN).min(ID_LEN);
                match scatter(mem, writable, 0, &id[..len]) {
                    Ok(()) => Outcome::ok(len as u64),
                    Err(()) => ioerr(format_args!("GET_ID buffer outside guest memory")),
                }
            }
            req::DISCARD | req::WRITE_ZEROES => self.ranges(mem, readable, kind, payload),
            _ => {
                log::debug!("virtio-blk: unsupported request type {kind}");
                Outcome::status(status::UNSUPP)
            }
        }
    }

    /// DISCARD and WRITE_ZEROES: check every segment, then apply them.
    fn ranges<M: GuestMemory>(
        &self,
        mem: &M,
        readable: &[Seg],
        kind: u32,
        payload: u64,
    ) -> Outcome {
        let (feature, name) = if kind == req::DISCARD {
            (features::DISCARD, "DISCARD")
        } else {
            (features::WRITE_ZEROES, "WRITE_ZEROES")
        };
        if !self.acked(feature) {
            log::debug!("virtio-blk: {name} without the feature negotiated");
            return Outcome::status(status::UNSUPP);
        }
        if self.backend.read_only() {
            return ioerr(format_args!("{name} on a read-only disk"));
        }
        let count = payload / SEGMENT_LEN;
        if payload == 0 || payload % SEGMENT_LEN != 0 || count > u64::from(MAX_DISCARD_SEGMENTS) {
            return ioerr(format_args!("{name} with {payload} bytes of segments"));
        }
        let mut segs = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for (i, slot) in segs.iter_mut().take(count as usize).enumerate() {
            let mut raw = [0u8; SEGMENT_LEN as usize];
            if gather(mem, readable, HEADER_LEN + i as u64 * SEGMENT_LEN, &mut raw).is_err() {
                return ioerr(format_args!("{name} segment outside guest memory"));
            }
            let [s @ .., n0, n1, n2, n3, f0, f1, f2, f3] = raw;
            let sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            let allowed = if kind == req::DISCARD {
                0
            } else {
                SEGMENT_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                log::debug!("virtio-blk: {name} segment flags {flags:#x}");
                return Outcome::status(status::UNSUPP);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return ioerr(format_args!("{name} of {sectors} sectors"));
            }
            let Some(offset) = Self::offset(sector) else {
                return ioerr(format_args!("{name} at sector {sector:#x}"));
            };
            let len = u64::from(sectors) * SECTOR_SIZE;
            if let Err(e) = crate::block::check_range(
                offset,
                len,
                self.backend.size(),
                self.backend.block_size(),
            ) {
                return backend_error(name, &e);
            }
            *slot = (offset, len, flags & SEGMENT_FLAG_UNMAP != 0);
        }
        for &(offset, len, unmap) in segs.iter().take(count as usize) {
            let r = if kind == req::DISCARD {
                self.backend.discard(offset, len)
            } else {
                self.backend.write_zeroes(offset, len, unmap)
            };
            if let Err(e) = r {
                return backend_error(name, &e);
            }
        }
        Outcome::ok(0)
    }

    fn chain<M: GuestMemory<Bitmap = ()>>(
        &self,
        mem: &M,
        chain: DescriptorChain<&M>,
        scratch: &mut Scratch,
    ) -> Result<u32, DeviceBroken> {
        scratch.readable.clear();
        scratch.writable.clear();
        let head = chain.head_index();
        let mut count = 0usize;
        let mut truncated = false;
        let mut misordered = false;
        for desc in chain {
            count += 1;
            truncated = desc.has_next();
            let seg = Seg {
                addr: desc.addr().0,
                len: u64::from(desc.len()),
            };
            if desc.is_write_only() {
                scratch.writable.push(seg);
            } else {
                misordered |= !scratch.writable.is_empty();
                scratch.readable.push(seg);
            }
        }
        if count == 0 {
            return Err(DeviceBroken(format!(
                "chain {head}: no descriptor could be read"
            )));
        }
        if truncated {
            return Err(DeviceBroken(format!(
                "chain {head}: loops, is longer than the queue, or has a descriptor \
                 outside guest memory"
            )));
        }
        // The status is the last device-writable byte.
        let Some(status_seg) = scratch.writable.iter().rev().find(|s| s.len != 0) else {
            return Err(DeviceBroken(format!(
                "chain {head}: no device-writable status byte"
            )));
        };
        let status_addr = GuestAddress(status_seg.addr.saturating_add(status_seg.len - 1));
        let data_len = total(&scratch.writable) - 1;
        let outcome = if misordered {
            ioerr(format_args!(
                "chain {head}: device-readable after device-writable descriptors"
            ))
        } else {
            self.execute(mem, scratch, data_len)
        };
        if mem.write_obj(outcome.status, status_addr).is_err() {
            return Err(DeviceBroken(format!(
                "chain {head}: status byte at {:#x} is not writable guest memory",
                status_addr.0
            )));
        }
        let counter = match outcome.status {
            status::OK => &self.stats.ok,
            status::UNSUPP => &self.stats.unsupp,
            _ => &self.stats.ioerr,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(u32::try_from(outcome.written.saturating_add(1)).unwrap_or(u32::MAX))
    }
}

impl VirtioDevice for Blk {
    fn name(&self) -> &str {
        "virtio-blk"
    }

    fn device_id(&self) -> u16 {
        DEVICE_ID
    }

    fn num_queues(&self) -> u16 {
        self.config.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn set_features(&self, features: u64) {
        let features = features & self.offered;
        self.acked.store(features, Ordering::Relaxed);
        // A driver that cannot flush gets a write-through disk.
        self.backend
            .set_write_cache(features & features::FLUSH != 0);
    }

    fn config_size(&self) -> usize {
        config::SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let image = self.config_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| image.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        let wb = config::WRITEBACK as u64;
        let Some(i) = wb.checked_sub(offset).and_then(|i| usize::try_from(i).ok()) else {
            return;
        };
        let Some(&v) = data.get(i) else { return };
        if !self.acked(features::CONFIG_WCE) {
            log::debug!("virtio-blk: writeback written without CONFIG_WCE; ignored");
            return;
        }
        log::debug!(
            "virtio-blk: write cache {}",
            if v != 0 { "on" } else { "off" }
        );
        self.backend.set_write_cache(v != 0);
    }

    fn reset(&self) {
        self.acked.store(0, Ordering::Relaxed);
        self.backend.set_write_cache(true);
    }

    fn process_chain<M: GuestMemory<Bitmap = ()>>(
        &self,
        _queue: u16,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<u32, DeviceBroken> {
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut scratch) => self.chain(mem, chain, &mut scratch),
            // Not reachable (nothing here re-enters), but never panic.
            Err(_) => self.chain(mem, chain, &mut Scratch::default()),
        })
    }
}

#[cfg(test)]
mod tests;
