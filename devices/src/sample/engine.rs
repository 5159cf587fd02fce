//! The sample device's state and its worker thread (factorial unit, DMA
//! engine, doorbell watcher). See the module docs of [`super`] for the
//! register map and the rules of stop/reset.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{MmapRegion, VolatileMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::Error;
use crate::dma::{DmaError, DmaSpace};
use crate::pci::snapshot::{StateReader, StateWriter};
use crate::pci::{Interrupts, IrqMode};

use super::ID_VALUE;
use super::regs::*;

/// Bytes moved per step of a transfer: the granularity at which a stopped
/// or reset device abandons a transfer.
const CHUNK: u64 = 64 << 10;

const STATE_MAGIC: &[u8; 8] = b"VDSAMPLE";
const STATE_VERSION: u32 = 1;

const WAKE: u64 = 0;
const DOORBELL: u64 = 1;

/// Guest-visible registers (what migration saves).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Regs {
    liveness: u32,
    fact_input: u32,
    fact_result: u64,
    compute_busy: bool,
    irq_status: u32,
    irq_enable: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u32,
    dma_from_device: bool,
    dma_state: u32,
    dma_error: u32,
    /// Bytes of the running transfer already committed.
    dma_progress: u64,
    doorbells: u32,
}

/// Internal control state, not guest-visible.
#[derive(Debug, Default)]
struct Control {
    bus_master: bool,
    /// Migration stop: the worker changes nothing.
    stopped: bool,
    exit: bool,
    /// Bumped by reset and load: work started before is discarded.
    generation: u64,
    /// The factorial described by the registers is waiting for the worker.
    compute_pending: bool,
    /// The transfer described by the registers is waiting for the worker.
    dma_pending: bool,
}

#[derive(Debug, Default)]
struct State {
    regs: Regs,
    ctl: Control,
}

/// A transfer as the worker runs it.
#[derive(Clone, Copy, Debug)]
struct Job {
    src: u64,
    dst: u64,
    count: u64,
    from_device: bool,
    progress: u64,
    generation: u64,
    bus_master: bool,
}

enum Outcome {
    Done,
    Failed(u32),
    /// Stopped or reset meanwhile; already dealt with.
    Interrupted,
}

/// State shared by the function (session thread) and its worker.
pub(super) struct Shared {
    state: Mutex<State>,
    buffer: MmapRegion<()>,
    pub(super) buffer_size: u64,
    vectors: u16,
    irq: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    wake: EventFd,
}

/// n! modulo 2^64. From 66! on, the product holds at least 64 factors of
/// two, so the loop never needs more than 66 steps whatever the guest asks.
fn factorial(n: u32) -> u64 {
    (1..=u64::from(n.min(66))).fold(1u64, |acc, k| acc.wrapping_mul(k))
}

fn dma_error_code(e: &DmaError) -> u32 {
    match e {
        DmaError::Unmapped { .. } | DmaError::InvalidRange { .. } => DMA_ERR_UNMAPPED,
        DmaError::Permission { .. } => DMA_ERR_ACCESS,
        _ => DMA_ERR_IO,
    }
}

impl Shared {
    pub(super) fn new(
        buffer: MmapRegion<()>,
        buffer_size: u64,
        vectors: u16,
        irq: Arc<Interrupts>,
        dma: Arc<DmaSpace>,
        wake: EventFd,
    ) -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            buffer,
            buffer_size,
            vectors,
            irq,
            dma,
            wake,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data: a panicked holder cannot leave it inconsistent in a
        // way worth aborting the server for.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_worker(&self) {
        if let Err(e) = self.wake.write(1) {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("sample: cannot wake the worker: {e}");
            }
        }
    }

    // ---- interrupts ----

    fn vector(&self, cause: u32) -> u16 {
        let i = cause.trailing_zeros() as u16;
        if i < self.vectors { i } else { 0 }
    }

    /// Latch `bits` and interrupt for the enabled ones.
    fn set_cause(&self, st: &mut State, bits: u32) {
        let bits = bits & IRQ_ALL;
        st.regs.irq_status |= bits;
        self.signal(bits & st.regs.irq_enable);
        self.update_intx(&st.regs);
    }

    /// Message-signalled interrupts for `causes`; INTx follows the level.
    fn signal(&self, causes: u32) {
        if !matches!(self.irq.mode(), IrqMode::Msix | IrqMode::Msi) {
            return;
        }
        let mut bits = causes;
        while bits != 0 {
            let bit = bits & bits.wrapping_neg();
            bits &= !bit;
            self.irq.raise(self.vector(bit));
        }
    }

    fn update_intx(&self, regs: &Regs) {
        self.irq.set_intx(regs.irq_status & regs.irq_enable != 0);
    }

    // ---- registers (session thread) ----

    /// BAR0's register file as the guest reads it.
    pub(super) fn register_image(&self) -> [u8; REGS_SIZE as usize] {
        let st = self.lock();
        let r = &st.regs;
        let mut img = [0u8; REGS_SIZE as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let off = off as usize;
            if let Some(dst) = img.get_mut(off..off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        let mut status = 0;
        if r.compute_busy {
            status |= STATUS_COMPUTE_BUSY;
        }
        if r.dma_state == DMA_BUSY {
            status |= STATUS_DMA_BUSY;
        }
        let mut cmd = 0;
        if r.dma_from_device {
            cmd |= DMA_CMD_FROM_DEVICE;
        }
        if r.dma_state == DMA_BUSY {
            cmd |= DMA_CMD_START;
        }
        put(ID, &ID_VALUE.to_le_bytes());
        put(LIVENESS, &(!r.liveness).to_le_bytes());
        put(BUFFER_SIZE, &(self.buffer_size as u32).to_le_bytes());
        put(STATUS, &status.to_le_bytes());
        put(FACT_INPUT, &r.fact_input.to_le_bytes());
        put(FACT_RESULT, &r.fact_result.to_le_bytes());
        put(IRQ_STATUS, &r.irq_status.to_le_bytes());
        put(IRQ_ENABLE, &r.irq_enable.to_le_bytes());
        put(DMA_SRC, &r.dma_src.to_le_bytes());
        put(DMA_DST, &r.dma_dst.to_le_bytes());
        put(DMA_COUNT, &r.dma_count.to_le_bytes());
        put(DMA_CMD, &cmd.to_le_bytes());
        put(
            DMA_STATUS,
            &(r.dma_state | (r.dma_error << 8)).to_le_bytes(),
        );
        put(DOORBELL_COUNT, &r.doorbells.to_le_bytes());
        img
    }

    /// A 32-bit register write at BAR0 `offset`.
    pub(super) fn write32(&self, offset: u64, v: u32) {
        let mut st = self.lock();
        let dma_busy = st.regs.dma_state == DMA_BUSY;
        let set_lo = |r: &mut u64| *r = (*r & !0xffff_ffff) | u64::from(v);
        let set_hi = |r: &mut u64| *r = (*r & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            LIVENESS => st.regs.liveness = v,
            FACT_INPUT => {
                if st.regs.compute_busy {
                    log::debug!("sample: factorial busy, input {v} ignored");
                } else {
                    st.regs.fact_input = v;
                    st.regs.compute_busy = true;
                    st.ctl.compute_pending = true;
                    self.wake_worker();
                }
            }
            IRQ_ENABLE => {
                let newly = v & IRQ_ALL & !st.regs.irq_enable;
                st.regs.irq_enable = v & IRQ_ALL;
                self.signal(st.regs.irq_status & newly);
                self.update_intx(&st.regs);
            }
            IRQ_RAISE => self.set_cause(&mut st, v),
            IRQ_ACK => {
                st.regs.irq_status &= !v;
                self.update_intx(&st.regs);
            }
            DMA_SRC | 0x34 | DMA_DST | 0x3c | DMA_COUNT | DMA_CMD if dma_busy => {
                log::debug!("sample: DMA register {offset:#x} written while busy; ignored");
            }
            DMA_SRC => set_lo(&mut st.regs.dma_src),
            0x34 => set_hi(&mut st.regs.dma_src),
            DMA_DST => set_lo(&mut st.regs.dma_dst),
            0x3c => set_hi(&mut st.regs.dma_dst),
            DMA_COUNT => st.regs.dma_count = v,
            DMA_CMD => {
                st.regs.dma_from_device = v & DMA_CMD_FROM_DEVICE != 0;
                if v & DMA_CMD_START != 0 {
                    self.request_dma(&mut st);
                }
            }
            _ => {} // read-only or nothing there
        }
    }

    fn request_dma(&self, st: &mut State) {
        if st.regs.dma_state == DMA_BUSY {
            log::debug!("sample: DMA already running; start ignored");
            return;
        }
        st.regs.dma_state = DMA_BUSY;
        st.regs.dma_error = 0;
        st.regs.dma_progress = 0;
        st.ctl.dma_pending = true;
        self.wake_worker();
    }

    /// The doorbell rang `rings` times (coalesced into one start).
    fn doorbell_rang(&self, rings: u64) {
        let mut st = self.lock();
        st.regs.doorbells = st.regs.doorbells.wrapping_add(rings as u32);
        self.request_dma(&mut st);
    }

    /// Read the buffer at `offset` (bytes past its end read as zero).
    pub(super) fn buffer_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let n = (self.buffer_size.saturating_sub(offset) as usize).min(data.len());
        let (head, tail) = data.split_at_mut(n);
        self.buffer
            .get_slice(offset as usize, n)
            .map_err(|e| Error::Io(io::Error::other(e)))?
            .copy_to(head);
        tail.fill(0);
        Ok(())
    }

    /// Write the buffer at `offset` (bytes past its end are dropped).
    pub(super) fn buffer_write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let n = (self.buffer_size.saturating_sub(offset) as usize).min(data.len());
        self.buffer
            .get_slice(offset as usize, n)
            .map_err(|e| Error::Io(io::Error::other(e)))?
            .copy_from(&data[..n]);
        Ok(())
    }

    fn zero_buffer(&self) {
        let zeros = vec![0u8; CHUNK as usize];
        let mut at = 0u64;
        while at < self.buffer_size {
            let n = (self.buffer_size - at).min(CHUNK) as usize;
            if let Ok(s) = self.buffer.get_slice(at as usize, n) {
                s.copy_from(&zeros[..n]);
            }
            at += n as u64;
        }
    }

    pub(super) fn reset(&self) {
        let mut st = self.lock();
        st.ctl.generation = st.ctl.generation.wrapping_add(1);
        st.ctl.compute_pending = false;
        st.ctl.dma_pending = false;
        st.ctl.bus_master = false;
        st.regs = Regs::default();
        self.zero_buffer();
        self.irq.set_intx(false);
    }

    pub(super) fn set_bus_master(&self, on: bool) {
        self.lock().ctl.bus_master = on;
    }

    pub(super) fn set_stopped(&self, stopped: bool) {
        self.lock().ctl.stopped = stopped;
        if !stopped {
            self.wake_worker();
        }
    }

    pub(super) fn shutdown(&self) {
        self.lock().ctl.exit = true;
        self.wake_worker();
    }

    // ---- migration ----

    pub(super) fn save(&self) -> Result<Vec<u8>, Error> {
        let st = self.lock();
        if !st.ctl.stopped {
            return Err(Error::BadState(
                "sample: save needs a stopped device".into(),
            ));
        }
        let r = &st.regs;
        let mut w = StateWriter::new();
        w.bytes(STATE_MAGIC)
            .u32(STATE_VERSION)
            .u64(self.buffer_size);
        w.u32(r.liveness)
            .u32(r.fact_input)
            .u64(r.fact_result)
            .bool(r.compute_busy);
        w.u32(r.irq_status).u32(r.irq_enable);
        w.u64(r.dma_src)
            .u64(r.dma_dst)
            .u32(r.dma_count)
            .bool(r.dma_from_device);
        w.u32(r.dma_state).u32(r.dma_error).u64(r.dma_progress);
        w.u32(r.doorbells);
        let mut buf = vec![0u8; self.buffer_size as usize];
        self.buffer_read(0, &mut buf)?;
        w.bytes(&buf);
        Ok(w.finish())
    }

    pub(super) fn load(&self, state: &[u8]) -> Result<(), Error> {
        let mut st = self.lock();
        if !st.ctl.stopped {
            return Err(Error::BadState(
                "sample: load needs a stopped device".into(),
            ));
        }
        let mut rd = StateReader::new(state, "sample");
        let version = rd.header(STATE_MAGIC)?;
        if version != STATE_VERSION {
            return Err(rd.error(format!("unsupported version {version}")));
        }
        let size = rd.u64()?;
        if size != self.buffer_size {
            return Err(rd.error(format!(
                "buffer of {size:#x} bytes, this device has {:#x}",
                self.buffer_size
            )));
        }
        let r = Regs {
            liveness: rd.u32()?,
            fact_input: rd.u32()?,
            fact_result: rd.u64()?,
            compute_busy: rd.bool()?,
            irq_status: rd.u32()?,
            irq_enable: rd.u32()?,
            dma_src: rd.u64()?,
            dma_dst: rd.u64()?,
            dma_count: rd.u32()?,
            dma_from_device: rd.bool()?,
            dma_state: rd.u32()?,
            dma_error: rd.u32()?,
            dma_progress: rd.u64()?,
            doorbells: rd.u32()?,
        };
        let buffer = rd.bytes(self.buffer_size as usize)?;
        rd.finish()?;
        let bad = |msg: &str| Err(Error::InvalidArgument(format!("sample state: {msg}")));
        if (r.irq_status | r.irq_enable) & !IRQ_ALL != 0 {
            return bad("undefined interrupt cause bits");
        }
        if r.dma_state > DMA_ERROR || r.dma_error > DMA_ERR_IO {
            return bad("invalid DMA state or error code");
        }
        if (r.dma_error != 0) != (r.dma_state == DMA_ERROR) {
            return bad("DMA error code does not match the DMA state");
        }
        if r.dma_progress > u64::from(r.dma_count)
            || (r.dma_progress != 0 && r.dma_state != DMA_BUSY)
        {
            return bad("DMA progress beyond the transfer");
        }
        self.buffer_write(0, buffer)?;
        st.ctl.generation = st.ctl.generation.wrapping_add(1);
        st.ctl.compute_pending = r.compute_busy;
        st.ctl.dma_pending = r.dma_state == DMA_BUSY;
        st.regs = r;
        // The INTx level is part of the PCI core's state, restored there.
        Ok(())
    }

    // ---- worker ----

    fn run_pending(&self) {
        {
            let mut st = self.lock();
            if st.ctl.compute_pending && !st.ctl.stopped {
                st.ctl.compute_pending = false;
                st.regs.fact_result = factorial(st.regs.fact_input);
                st.regs.compute_busy = false;
                self.set_cause(&mut st, IRQ_COMPUTE);
            }
        }
        loop {
            let job = {
                let mut st = self.lock();
                if !st.ctl.dma_pending || st.ctl.stopped || st.ctl.exit {
                    return;
                }
                st.ctl.dma_pending = false;
                let r = &st.regs;
                Job {
                    src: r.dma_src,
                    dst: r.dma_dst,
                    count: u64::from(r.dma_count),
                    from_device: r.dma_from_device,
                    progress: r.dma_progress,
                    generation: st.ctl.generation,
                    bus_master: st.ctl.bus_master,
                }
            };
            match self.transfer(&job) {
                Outcome::Done => self.finish(&job, DMA_DONE, 0),
                Outcome::Failed(code) => self.finish(&job, DMA_ERROR, code),
                Outcome::Interrupted => {}
            }
        }
    }

    /// Whether `job` may still change device state; if not, leave it to be
    /// resumed (stopped) or forgotten (reset, load).
    fn still_current(st: &mut State, job: &Job) -> bool {
        if st.ctl.generation != job.generation {
            return false;
        }
        if st.ctl.stopped {
            st.ctl.dma_pending = true;
            return false;
        }
        true
    }

    fn transfer(&self, job: &Job) -> Outcome {
        if !job.bus_master {
            return Outcome::Failed(DMA_ERR_NO_BUS_MASTER);
        }
        let (buf_off, iova) = if job.from_device {
            (job.src, job.dst)
        } else {
            (job.dst, job.src)
        };
        if buf_off
            .checked_add(job.count)
            .is_none_or(|end| end > self.buffer_size)
        {
            return Outcome::Failed(DMA_ERR_RANGE);
        }
        if iova.checked_add(job.count).is_none() {
            return Outcome::Failed(DMA_ERR_UNMAPPED);
        }
        let mut done = job.progress.min(job.count);
        let mut tmp = vec![0u8; job.count.min(CHUNK) as usize];
        while done < job.count {
            let n = (job.count - done).min(CHUNK) as usize;
            let Some(chunk) = tmp.get_mut(..n) else {
                return Outcome::Failed(DMA_ERR_IO);
            };
            let at = buf_off + done;
            let addr = iova + done;
            // Client memory is touched without the lock held: a
            // message-backed range waits for the client's reply.
            if job.from_device {
                {
                    let mut st = self.lock();
                    if !Self::still_current(&mut st, job) {
                        return Outcome::Interrupted;
                    }
                    if self.buffer_read(at, chunk).is_err() {
                        return Outcome::Failed(DMA_ERR_IO);
                    }
                }
                if let Err(e) = self.dma.write(addr, chunk) {
                    log::debug!("sample: DMA write to {addr:#x} failed: {e}");
                    return Outcome::Failed(dma_error_code(&e));
                }
            } else if let Err(e) = self.dma.read(addr, chunk) {
                log::debug!("sample: DMA read from {addr:#x} failed: {e}");
                return Outcome::Failed(dma_error_code(&e));
            }
            let mut st = self.lock();
            if !Self::still_current(&mut st, job) {
                return Outcome::Interrupted;
            }
            if !job.from_device && self.buffer_write(at, chunk).is_err() {
                return Outcome::Failed(DMA_ERR_IO);
            }
            done += n as u64;
            st.regs.dma_progress = done;
        }
        Outcome::Done
    }

    fn finish(&self, job: &Job, state: u32, code: u32) {
        let mut st = self.lock();
        if !Self::still_current(&mut st, job) {
            return;
        }
        st.regs.dma_state = state;
        st.regs.dma_error = code;
        st.regs.dma_progress = 0;
        self.set_cause(&mut st, IRQ_DMA);
    }
}

/// Read and reset an eventfd counter (0 if it was not signalled).
fn take_count(f: &File) -> u64 {
    let mut b = [0u8; 8];
    match (&*f).read(&mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        Ok(_) => 0,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => {
            log::warn!("sample: cannot read the doorbell: {e}");
            0
        }
    }
}

/// The worker thread: waits for work (a wake from the session thread or a
/// doorbell ring) and runs it.
pub(super) fn worker(shared: &Shared, doorbell: &File) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            log::error!("sample: worker cannot create an epoll: {e}");
            return;
        }
    };
    for (fd, token) in [
        (shared.wake.as_raw_fd(), WAKE),
        (doorbell.as_raw_fd(), DOORBELL),
    ] {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::error!("sample: worker cannot watch fd {fd}: {e}");
            return;
        }
    }
    let mut events = [EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("sample: worker epoll failed: {e}");
                return;
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                WAKE => {
                    // Only the wake-up matters, not the count.
                    let _ = shared.wake.read();
                }
                DOORBELL => {
                    let rings = take_count(doorbell);
                    if rings != 0 {
                        shared.doorbell_rang(rings);
                    }
                }
                _ => {}
            }
        }
        if shared.lock().ctl.exit {
            return;
        }
        shared.run_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::factorial;

    #[test]
    fn factorial_wraps_and_stays_cheap() {
        assert_eq!(factorial(0), 1);
        assert_eq!(factorial(1), 1);
        assert_eq!(factorial(10), 3_628_800);
        assert_eq!(factorial(20), 2_432_902_008_176_640_000);
        // 21! overflows: the register holds it modulo 2^64
        assert_eq!(factorial(21), 2_432_902_008_176_640_000u64.wrapping_mul(21));
        assert_ne!(factorial(65), 0);
        assert_eq!(factorial(66), 0);
        assert_eq!(factorial(u32::MAX), 0);
    }
}
