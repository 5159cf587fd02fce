//! NVM command set: Read, Write, Flush, Write Zeroes, Dataset Management.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::dptr::{self, Seg};
use super::guest::Guest;
use super::spec::{Command, Status, io};
use crate::block::{BlockBackend, BlockError, IoVecStorage};

/// The namespace a controller serves (one, NSID 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Size in logical blocks.
    pub blocks: u64,
    /// log2 of the logical block size.
    pub lba_shift: u32,
}

impl Namespace {
    /// The namespace of a backend.
    pub fn of(backend: &dyn BlockBackend) -> Namespace {
        let lba_shift = backend.block_size().trailing_zeros();
        Namespace {
            blocks: backend.size() >> lba_shift,
            lba_shift,
        }
    }
}

/// The only namespace identifier.
pub const NSID: u32 = 1;
/// "Every namespace".
pub const NSID_ALL: u32 = 0xffff_ffff;

/// Counters for the SMART log, one set per worker thread.
#[derive(Debug, Default)]
pub(crate) struct IoStats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

/// Per-thread buffers reused across commands: no allocation per command
/// once they have grown to the largest transfer.
#[derive(Default)]
pub(crate) struct Scratch {
    pub segs: Vec<Seg>,
    pub iov: IoVecStorage,
    pub bounce: Vec<u8>,
}

/// What an I/O command runs against.
pub(crate) struct IoCtx<'a> {
    pub backend: &'a dyn BlockBackend,
    pub ns: Namespace,
    /// Host memory page size (CC.MPS) in bytes.
    pub page: u64,
    /// Maximum data transfer size in bytes.
    pub mdts: u64,
    pub stats: &'a IoStats,
}

fn block_status(e: &BlockError, write: bool) -> Status {
    match e {
        BlockError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        BlockError::Unaligned { .. } => Status::INVALID_FIELD,
        BlockError::ReadOnly => Status::NS_WRITE_PROTECTED,
        BlockError::NoSpace => Status::CAPACITY_EXCEEDED,
        BlockError::Io(_) if write => Status::WRITE_FAULT,
        BlockError::Io(_) => Status::UNRECOVERED_READ,
    }
}

fn log_block_error(op: &str, e: &BlockError) {
    match e {
        BlockError::Io(_) | BlockError::NoSpace => log::warn!("nvme: {op} failed: {e}"),
        _ => log::debug!("nvme: {op} refused: {e}"),
    }
}

/// Run one NVM command set command. Returns the status and dword 0.
pub(crate) fn execute(
    ctx: &IoCtx<'_>,
    g: &mut Guest<'_>,
    scratch: &mut Scratch,
    cmd: &Command,
) -> (Status, u32) {
    if cmd.fuse != 0 {
        return (Status::INVALID_FIELD, 0);
    }
    let status = match cmd.opcode {
        io::READ => rw(ctx, g, scratch, cmd, false),
        io::WRITE => rw(ctx, g, scratch, cmd, true),
        io::FLUSH => flush(ctx, cmd),
        io::WRITE_ZEROES => write_zeroes(ctx, cmd),
        io::DSM => dsm(ctx, g, scratch, cmd),
        _ => Err(Status::INVALID_OPCODE),
    };
    (status.err().unwrap_or(Status::SUCCESS), 0)
}

/// Check a block range of a command; returns the byte offset and length.
fn lba_range(ctx: &IoCtx<'_>, slba: u64, nlb: u64) -> Result<(u64, u64), Status> {
    match slba.checked_add(nlb) {
        Some(end) if end <= ctx.ns.blocks => {}
        _ => return Err(Status::LBA_OUT_OF_RANGE),
    }
    // blocks << shift <= size, which fits in u64.
    Ok((slba << ctx.ns.lba_shift, nlb << ctx.ns.lba_shift))
}

fn rw(
    ctx: &IoCtx<'_>,
    g: &mut Guest<'_>,
    scratch: &mut Scratch,
    cmd: &Command,
    write: bool,
) -> Result<(), Status> {
    if cmd.nsid != NSID {
        return Err(Status::INVALID_NAMESPACE);
    }
    let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
    let nlb = u64::from(cmd.cdw12 & 0xffff) + 1;
    let fua = cmd.cdw12 & (1 << 30) != 0;
    let len = nlb << ctx.ns.lba_shift;
    if len > ctx.mdts {
        return Err(Status::INVALID_FIELD);
    }
    let (offset, len) = lba_range(ctx, slba, nlb)?;
    if write && ctx.backend.read_only() {
        return Err(Status::NS_WRITE_PROTECTED);
    }
    dptr::segments(g, cmd, len, ctx.page, false, !write, &mut scratch.segs)?;
    transfer(ctx, g, scratch, offset, len, write, fua)?;
    let (n, b) = if write {
        (&ctx.stats.write_cmds, &ctx.stats.write_bytes)
    } else {
        (&ctx.stats.read_cmds, &ctx.stats.read_bytes)
    };
    n.fetch_add(1, Ordering::Relaxed);
    b.fetch_add(len, Ordering::Relaxed);
    Ok(())
}

enum Fast {
    Done,
    /// Some guest memory has no host address: use the bounce path.
    NotMapped,
}

/// Move `len` bytes between the disk at `offset` and the segments in
/// `scratch.segs`: straight between the backend and guest memory when every
/// segment is directly mapped, through a bounce buffer otherwise.
fn transfer(
    ctx: &IoCtx<'_>,
    g: &mut Guest<'_>,
    scratch: &mut Scratch,
    offset: u64,
    len: u64,
    write: bool,
    fua: bool,
) -> Result<(), Status> {
    match zero_copy(ctx, g, scratch, offset, write, fua)? {
        Fast::Done => return Ok(()),
        Fast::NotMapped => {}
    }
    let n = usize::try_from(len).map_err(|_| Status::INVALID_FIELD)?;
    scratch.bounce.resize(n, 0);
    let Scratch {
        segs, iov, bounce, ..
    } = scratch;
    if write {
        let mut at = 0usize;
        for s in segs.iter() {
            let l = s.len as usize;
            g.read(s.iova, &mut bounce[at..at + l])
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            at += l;
        }
        let mut bufs = iov.bufs();
        bufs.push_bytes(&mut bounce[..]);
        ctx.backend.write(offset, &bufs, fua).map_err(|e| {
            log_block_error("write", &e);
            block_status(&e, true)
        })
    } else {
        {
            let mut bufs = iov.bufs();
            bufs.push_bytes(&mut bounce[..]);
            ctx.backend.read(offset, &bufs).map_err(|e| {
                log_block_error("read", &e);
                block_status(&e, false)
            })?;
        }
        let mut at = 0usize;
        for s in segs.iter() {
            let l = s.len as usize;
            if !s.bucket {
                g.write(s.iova, &bounce[at..at + l])
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            }
            at += l;
        }
        Ok(())
    }
}

fn zero_copy(
    ctx: &IoCtx<'_>,
    g: &mut Guest<'_>,
    scratch: &mut Scratch,
    offset: u64,
    write: bool,
    fua: bool,
) -> Result<Fast, Status> {
    // The device reads guest memory for a write command and writes it for
    // a read command.
    let access = if write {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let view = g.view();
    let mut bufs = scratch.iov.bufs();
    let mut run_offset = offset;
    let mut disk = offset;
    let issue = |at: u64, bufs: &crate::block::IoBufs<'_>| -> Result<(), Status> {
        if bufs.is_empty() {
            return Ok(());
        }
        let r = if write {
            ctx.backend.write(at, bufs, fua)
        } else {
            ctx.backend.read(at, bufs)
        };
        r.map_err(|e| {
            log_block_error(if write { "write" } else { "read" }, &e);
            block_status(&e, write)
        })
    };
    for s in scratch.segs.iter() {
        let l = usize::try_from(s.len).map_err(|_| Status::INVALID_FIELD)?;
        if s.bucket {
            issue(run_offset, &bufs)?;
            bufs.clear();
            disk += s.len;
            run_offset = disk;
            continue;
        }
        let it = view
            .get_slices(GuestAddress(s.iova), l, access)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        for slice in it {
            match slice {
                Ok(slice) => bufs.push_slice(slice),
                Err(GuestMemoryError::HostAddressNotAvailable) => return Ok(Fast::NotMapped),
                Err(e) => {
                    log::debug!("nvme: DMA to {:#x}+{:#x} failed: {e}", s.iova, s.len);
                    return Err(Status::DATA_TRANSFER_ERROR);
                }
            }
        }
        disk += s.len;
    }
    issue(run_offset, &bufs)?;
    Ok(Fast::Done)
}

fn flush(ctx: &IoCtx<'_>, cmd: &Command) -> Result<(), Status> {
    if cmd.nsid != NSID && cmd.nsid != NSID_ALL {
        return Err(Status::INVALID_NAMESPACE);
    }
    ctx.backend.flush().map_err(|e| {
        log_block_error("flush", &e);
        match e {
            BlockError::Io(_) => Status::WRITE_FAULT,
            e => block_status(&e, true),
        }
    })
}

fn write_zeroes(ctx: &IoCtx<'_>, cmd: &Command) -> Result<(), Status> {
    if cmd.nsid != NSID {
        return Err(Status::INVALID_NAMESPACE);
    }
    let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
    let nlb = u64::from(cmd.cdw12 & 0xffff) + 1;
    let deac = cmd.cdw12 & (1 << 25) != 0;
    let fua = cmd.cdw12 & (1 << 30) != 0;
    let (offset, len) = lba_range(ctx, slba, nlb)?;
    if ctx.backend.read_only() {
        return Err(Status::NS_WRITE_PROTECTED);
    }
    let r = ctx.backend.write_zeroes(offset, len, deac).and_then(|()| {
        if fua && ctx.backend.write_cache() {
            ctx.backend.flush()
        } else {
            Ok(())
        }
    });
    r.map_err(|e| {
        log_block_error("write zeroes", &e);
        block_status(&e, true)
    })
}

/// Most ranges in one Dataset Management command.
const DSM_MAX_RANGES: usize = 256;

fn dsm(
    ctx: &IoCtx<'_>,
    g: &mut Guest<'_>,
    scratch: &mut Scratch,
    cmd: &Command,
) -> Result<(), Status> {
    if cmd.nsid != NSID {
        return Err(Status::INVALID_NAMESPACE);
    }
    let nr = (cmd.cdw10 & 0xff) as usize + 1;
    let deallocate = cmd.cdw11 & (1 << 2) != 0;
    let len = nr * 16;
    let mut ranges = [0u8; DSM_MAX_RANGES * 16];
    dptr::segments(
        g,
        cmd,
        len as u64,
        ctx.page,
        false,
        false,
        &mut scratch.segs,
    )?;
    let mut at = 0usize;
    for s in scratch.segs.iter() {
        let l = s.len as usize;
        g.read(s.iova, &mut ranges[at..at + l])
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        at += l;
    }
    if !deallocate {
        // Integral read / write hints only: nothing to do.
        return Ok(());
    }
    if ctx.backend.read_only() {
        return Err(Status::NS_WRITE_PROTECTED);
    }
    let range = |i: usize| {
        let r = &ranges[i * 16..i * 16 + 16];
        let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
        let mut s = [0u8; 8];
        s.copy_from_slice(&r[8..16]);
        (u64::from_le_bytes(s), nlb)
    };
    // Check every range before touching any.
    for i in 0..nr {
        let (slba, nlb) = range(i);
        lba_range(ctx, slba, nlb)?;
    }
    for i in 0..nr {
        let (slba, nlb) = range(i);
        if nlb == 0 {
            continue;
        }
        let (offset, len) = lba_range(ctx, slba, nlb)?;
        ctx.backend.discard(offset, len).map_err(|e| {
            log_block_error("deallocate", &e);
            block_status(&e, true)
        })?;
    }
    Ok(())
}
