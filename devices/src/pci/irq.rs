//! Interrupt state of an emulated PCI function: the client's eventfds for
//! each VFIO interrupt index, the MSI-X table and pending bits, MSI pending
//! bits and the INTx line.
//!
//! A function raises interrupts through an [`Interrupts`] handle from any
//! thread. What happens depends on what the guest enabled in config space
//! (the core mirrors those bits here after every config write):
//!
//! * **MSI-X** enabled: vector N is delivered by signalling the client's
//!   eventfd for N, unless the function is masked (MSI-X Function Mask) or
//!   the vector is masked in the table; then its PBA bit is set and it is
//!   delivered when unmasked. QEMU emulates the MSI-X table itself and never
//!   writes ours, so a vector's table mask bit (set at reset) only counts
//!   once the client has written that vector's entry through region
//!   accesses.
//! * **MSI** enabled: vector N (folded to 0 if the guest enabled fewer
//!   vectors, as a single-message function would) is delivered unless its
//!   per-vector mask bit is set, which makes it pending instead.
//! * Otherwise **INTx**: the line is level-triggered. Asserting it while the
//!   client has not masked it (and Command.INTx-disable is clear) signals the
//!   INTx eventfd and masks the line (VFIO's automasking); the client
//!   unmasks it with SET_IRQS once the guest has serviced the interrupt, and
//!   a line still asserted then is signalled again.
//!
//! Signalling never blocks ([`IrqFd::signal`]).

use std::sync::{Mutex, MutexGuard};

use crate::Error;
use crate::device::{IrqAction, IrqData, IrqFd, IrqInfo, IrqSet};

use super::config::Dynamic;
use super::layout::PciLayout;
use super::regs::MSIX_ENTRY_CTRL_MASKBIT;
use super::snapshot::{StateReader, StateWriter};
use super::{ERR_IRQ, INTX_IRQ, MSI_IRQ, MSIX_IRQ, REQ_IRQ};

/// Which interrupt mechanism the guest has enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// MSI-X is enabled.
    Msix,
    /// MSI is enabled.
    Msi,
    /// Neither: the INTx pin is used.
    Intx,
    /// Neither, and the function has no INTx pin.
    None,
}

/// What became of a raised interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The client's eventfd was signalled.
    Signalled,
    /// The vector is masked; it is pending and will be signalled on unmask.
    Pending,
    /// The client has not wired an eventfd to the vector; nothing was sent.
    Unwired,
    /// The INTx line is asserted (and signalled if the client can take it).
    IntxAsserted,
    /// Not deliverable: no such vector, or no mechanism enabled and no pin.
    Dropped,
}

/// Config-space bits that decide delivery, mirrored after each config
/// write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConfigMirror {
    pub intx_disabled: bool,
    pub msi_enabled: bool,
    /// Vectors the guest enabled (MSI Multiple Message Enable).
    pub msi_allocated: u32,
    pub msi_mask: u32,
    pub msix_enabled: bool,
    pub msix_masked: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    bytes: [u8; 16],
    written: bool,
}

impl Entry {
    /// Power-on state: all zero, vector masked (PCI 3.0, 6.8.2.9).
    const RESET: Entry = Entry {
        bytes: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        written: false,
    };

    fn control(&self) -> u32 {
        u32::from_le_bytes([
            self.bytes[12],
            self.bytes[13],
            self.bytes[14],
            self.bytes[15],
        ])
    }

    /// Whether the vector is masked, counting the mask bit only once the
    /// client has written the entry (see the module docs).
    fn masked(&self) -> bool {
        self.written && self.control() & MSIX_ENTRY_CTRL_MASKBIT != 0
    }

    /// Bits the client may write in byte `i` of an entry.
    fn wmask(i: usize) -> u8 {
        match i {
            0 => 0xfc, // message address bits 1:0 are zero
            1..=11 => 0xff,
            12 => MSIX_ENTRY_CTRL_MASKBIT as u8,
            _ => 0, // reserved vector control bits
        }
    }
}

#[derive(Debug)]
struct State {
    cfg: ConfigMirror,
    intx_present: bool,
    intx_level: bool,
    intx_masked: bool,
    intx_fd: Option<IrqFd>,
    msi_per_vector_mask: bool,
    msi_pending: u32,
    msi_fds: Vec<Option<IrqFd>>,
    msix: Vec<Entry>,
    msix_pending: Vec<u64>,
    msix_fds: Vec<Option<IrqFd>>,
    err_present: bool,
    err_fd: Option<IrqFd>,
    req_fd: Option<IrqFd>,
}

fn signal(fd: Option<&IrqFd>, what: &str, vector: usize) -> Delivery {
    match fd {
        Some(fd) => {
            if let Err(e) = fd.signal() {
                log::warn!("cannot signal {what} vector {vector}: {e}");
            }
            Delivery::Signalled
        }
        None => Delivery::Unwired,
    }
}

fn slot(fds: &[Option<IrqFd>], i: usize) -> Option<&IrqFd> {
    fds.get(i).and_then(Option::as_ref)
}

impl State {
    fn intx_deliverable(&self) -> bool {
        self.intx_present
            && !self.cfg.intx_disabled
            && !self.cfg.msi_enabled
            && !self.cfg.msix_enabled
    }

    /// Signal INTx if the line is asserted, deliverable and not masked.
    fn intx_update(&mut self) {
        if self.intx_level && !self.intx_masked && self.intx_deliverable() {
            if let Some(fd) = &self.intx_fd {
                self.intx_masked = true;
                signal(Some(fd), "INTx", 0);
            }
        }
    }

    fn msix_pending(&self, v: usize) -> bool {
        self.msix_pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_msix_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.msix_pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn msix_raise(&mut self, v: usize) -> Delivery {
        let Some(entry) = self.msix.get(v) else {
            log::warn!(
                "MSI-X vector {v} raised, table has {} entries",
                self.msix.len()
            );
            return Delivery::Dropped;
        };
        if self.cfg.msix_masked || entry.masked() {
            self.set_msix_pending(v, true);
            return Delivery::Pending;
        }
        signal(slot(&self.msix_fds, v), "MSI-X", v)
    }

    fn msix_flush(&mut self, v: usize) {
        if self.cfg.msix_enabled
            && !self.cfg.msix_masked
            && self.msix_pending(v)
            && self.msix.get(v).is_some_and(|e| !e.masked())
        {
            self.set_msix_pending(v, false);
            signal(slot(&self.msix_fds, v), "MSI-X", v);
        }
    }

    fn msi_raise(&mut self, v: usize) -> Delivery {
        let v = if v < self.cfg.msi_allocated as usize {
            v
        } else {
            0
        };
        if self.msi_per_vector_mask && self.cfg.msi_mask & (1 << v) != 0 {
            self.msi_pending |= 1 << v;
            return Delivery::Pending;
        }
        signal(slot(&self.msi_fds, v), "MSI", v)
    }

    fn msi_flush(&mut self) {
        if !self.cfg.msi_enabled {
            return;
        }
        let deliver = self.msi_pending & !self.cfg.msi_mask;
        for v in 0..self.msi_fds.len().min(32) {
            if deliver & (1 << v) != 0 {
                self.msi_pending &= !(1 << v);
                signal(slot(&self.msi_fds, v), "MSI", v);
            }
        }
    }

    fn reset(&mut self) {
        self.cfg = ConfigMirror::default();
        self.intx_level = false;
        self.intx_masked = false;
        self.msi_pending = 0;
        self.msix.fill(Entry::RESET);
        self.msix_pending.fill(0);
    }
}

/// The interrupt side of a PCI function, shared between the device (the
/// session thread) and the function's workers. See the module docs.
#[derive(Debug)]
pub struct Interrupts {
    state: Mutex<State>,
}

/// One SET_IRQS request, checked against the index's vector count.
struct Checked<'a> {
    start: usize,
    count: usize,
    action: IrqAction,
    data: &'a mut IrqData,
}

impl Interrupts {
    pub(crate) fn new(layout: &PciLayout) -> Interrupts {
        let msi = layout.msi.map_or(0, |m| usize::from(m.vectors));
        let msix = layout.msix.map_or(0, |m| usize::from(m.vectors));
        Interrupts {
            state: Mutex::new(State {
                cfg: ConfigMirror::default(),
                intx_present: layout.interrupt_pin != 0,
                intx_level: false,
                intx_masked: false,
                intx_fd: None,
                msi_per_vector_mask: layout.msi.is_some_and(|m| m.per_vector_mask),
                msi_pending: 0,
                msi_fds: (0..msi).map(|_| None).collect(),
                msix: vec![Entry::RESET; msix],
                msix_pending: vec![0; msix.div_ceil(64)],
                msix_fds: (0..msix).map(|_| None).collect(),
                err_present: layout.pcie.is_some(),
                err_fd: None,
                req_fd: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raise interrupt `vector`: MSI-X or MSI vector `vector` if the guest
    /// enabled one of them, otherwise assert the INTx line (which the
    /// function must deassert with [`Interrupts::set_intx`] when the guest
    /// has acknowledged the cause).
    pub fn raise(&self, vector: u16) -> Delivery {
        let mut s = self.lock();
        if s.cfg.msix_enabled {
            s.msix_raise(usize::from(vector))
        } else if s.cfg.msi_enabled {
            s.msi_raise(usize::from(vector))
        } else if s.intx_present {
            s.intx_level = true;
            s.intx_update();
            Delivery::IntxAsserted
        } else {
            Delivery::Dropped
        }
    }

    /// Set the level of the INTx line. Asserting it delivers an interrupt
    /// if INTx is the active mechanism and the client has not masked it.
    pub fn set_intx(&self, asserted: bool) {
        let mut s = self.lock();
        if !s.intx_present {
            return;
        }
        s.intx_level = asserted;
        s.intx_update();
    }

    /// The mechanism the guest has enabled.
    pub fn mode(&self) -> IrqMode {
        let s = self.lock();
        if s.cfg.msix_enabled {
            IrqMode::Msix
        } else if s.cfg.msi_enabled {
            IrqMode::Msi
        } else if s.intx_present {
            IrqMode::Intx
        } else {
            IrqMode::None
        }
    }

    /// Whether the INTx line is asserted.
    pub fn intx_asserted(&self) -> bool {
        self.lock().intx_level
    }

    /// Report an uncorrectable error to the client (the ERR index, which
    /// QEMU turns into an AER event). Returns whether an eventfd was wired.
    pub fn signal_error(&self) -> bool {
        let s = self.lock();
        signal(s.err_fd.as_ref(), "ERR", 0) == Delivery::Signalled
    }

    /// Ask the client to release the device (the REQ index, e.g. before
    /// the server removes it). Returns whether an eventfd was wired.
    pub fn request_release(&self) -> bool {
        let s = self.lock();
        signal(s.req_fd.as_ref(), "REQ", 0) == Delivery::Signalled
    }

    // ---- what the PCI core uses ----

    fn count(s: &State, index: u32) -> Result<usize, Error> {
        Ok(match index {
            INTX_IRQ => usize::from(s.intx_present),
            MSI_IRQ => s.msi_fds.len(),
            MSIX_IRQ => s.msix_fds.len(),
            ERR_IRQ => usize::from(s.err_present),
            REQ_IRQ => 1,
            _ => return Err(Error::NoSuchIrq(index)),
        })
    }

    /// VFIO_USER_DEVICE_GET_IRQ_INFO, with the flags Linux vfio-pci reports
    /// except NORESIZE: vectors can be wired one at a time (QEMU does so for
    /// MSI-X), no full re-setup is needed.
    pub(crate) fn info(&self, index: u32) -> Result<IrqInfo, Error> {
        let s = self.lock();
        let count = Self::count(&s, index)?;
        let intx = index == INTX_IRQ;
        Ok(IrqInfo {
            count: count as u32,
            eventfd: true,
            maskable: intx,
            automasked: intx,
            noresize: false,
        })
    }

    /// VFIO_USER_DEVICE_SET_IRQS, with Linux vfio-pci's semantics.
    pub(crate) fn set_irqs(&self, mut set: IrqSet) -> Result<(), Error> {
        let mut s = self.lock();
        let max = Self::count(&s, set.index)?;
        let inval = |msg: String| Err(Error::InvalidArgument(msg));
        let start = set.start as usize;
        let count = set.count as usize;
        let Some(end) = start.checked_add(count) else {
            return inval(format!(
                "start {} + count {} overflows",
                set.start, set.count
            ));
        };
        if start >= max || end > max {
            return inval(format!(
                "vectors {start}..{end} out of range for index {} ({max} vectors)",
                set.index
            ));
        }
        let data_len = match &set.data {
            IrqData::None => None,
            IrqData::Bool(v) => Some(v.len()),
            IrqData::Eventfds(v) => Some(v.len()),
        };
        if data_len.is_some_and(|n| n != count) {
            return inval(format!(
                "{} data items for {count} vectors",
                data_len.unwrap_or(0)
            ));
        }
        let req = Checked {
            start,
            count,
            action: set.action,
            data: &mut set.data,
        };
        match set.index {
            INTX_IRQ => Self::set_intx_irqs(&mut s, req),
            MSI_IRQ | MSIX_IRQ => Self::set_msi_irqs(&mut s, set.index, req),
            _ => Self::set_single_irq(&mut s, set.index, req),
        }
    }

    fn set_intx_irqs(s: &mut State, req: Checked<'_>) -> Result<(), Error> {
        let disable = req.count == 0
            && matches!(req.data, IrqData::None | IrqData::Eventfds(_))
            && req.action == IrqAction::Trigger;
        if disable {
            s.intx_fd = None;
            s.intx_masked = false;
            return Ok(());
        }
        if req.start != 0 || req.count != 1 {
            return Err(Error::InvalidArgument(format!(
                "INTx takes start 0 and count 1, not {}+{}",
                req.start, req.count
            )));
        }
        let act = match req.data {
            IrqData::None => true,
            IrqData::Bool(b) => b.first().copied().unwrap_or(false),
            IrqData::Eventfds(fds) => {
                if req.action != IrqAction::Trigger {
                    return Err(Error::Unsupported(
                        "INTx mask/unmask eventfds (resampling) are not supported".into(),
                    ));
                }
                s.intx_fd = fds.pop().flatten();
                s.intx_update();
                return Ok(());
            }
        };
        if !act {
            return Ok(());
        }
        match req.action {
            IrqAction::Mask => s.intx_masked = true,
            IrqAction::Unmask => {
                s.intx_masked = false;
                s.intx_update();
            }
            IrqAction::Trigger => {
                // Loopback: signal the eventfd as the device would.
                signal(s.intx_fd.as_ref(), "INTx", 0);
            }
        }
        Ok(())
    }

    fn set_msi_irqs(s: &mut State, index: u32, req: Checked<'_>) -> Result<(), Error> {
        let name = if index == MSI_IRQ { "MSI" } else { "MSI-X" };
        if req.action != IrqAction::Trigger {
            return Err(Error::Unsupported(format!(
                "{name} vectors cannot be masked through SET_IRQS"
            )));
        }
        let fds = if index == MSI_IRQ {
            &mut s.msi_fds
        } else {
            &mut s.msix_fds
        };
        match req.data {
            IrqData::None | IrqData::Eventfds(_) if req.count == 0 => {
                fds.iter_mut().for_each(|f| *f = None);
            }
            IrqData::Eventfds(new) => {
                for (i, fd) in new.drain(..).enumerate() {
                    if let Some(slot) = fds.get_mut(req.start + i) {
                        *slot = fd;
                    }
                }
            }
            IrqData::None => {
                for v in req.start..req.start + req.count {
                    signal(slot(fds, v), name, v);
                }
            }
            IrqData::Bool(flags) => {
                for (i, &b) in flags.iter().enumerate() {
                    if b {
                        signal(slot(fds, req.start + i), name, req.start + i);
                    }
                }
            }
        }
        Ok(())
    }

    fn set_single_irq(s: &mut State, index: u32, req: Checked<'_>) -> Result<(), Error> {
        let name = if index == ERR_IRQ { "ERR" } else { "REQ" };
        if req.action != IrqAction::Trigger {
            return Err(Error::Unsupported(format!("{name} cannot be masked")));
        }
        let fd = if index == ERR_IRQ {
            &mut s.err_fd
        } else {
            &mut s.req_fd
        };
        match req.data {
            IrqData::None | IrqData::Eventfds(_) if req.count == 0 => *fd = None,
            IrqData::Eventfds(new) => *fd = new.pop().flatten(),
            IrqData::None => {
                signal(fd.as_ref(), name, 0);
            }
            IrqData::Bool(b) => {
                if b.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "{name}: DATA_BOOL needs count 1"
                    )));
                }
                if b.first().copied().unwrap_or(false) {
                    signal(fd.as_ref(), name, 0);
                }
            }
        }
        Ok(())
    }

    /// Take in new config-space bits; with `deliver`, signal what they
    /// unmasked.
    pub(crate) fn update_config(&self, cfg: ConfigMirror, deliver: bool) {
        let mut s = self.lock();
        s.cfg = cfg;
        if !deliver {
            return;
        }
        if cfg.msix_enabled && !cfg.msix_masked {
            for v in 0..s.msix.len() {
                s.msix_flush(v);
            }
        }
        s.msi_flush();
        s.intx_update();
    }

    /// The live values config space reads show.
    pub(crate) fn dynamic(&self) -> Dynamic {
        let s = self.lock();
        Dynamic {
            intx: s.intx_level,
            msi_pending: s.msi_pending,
        }
    }

    /// Read the MSI-X table at `offset` (relative to the table; the caller
    /// checked that the access lies inside it).
    pub(crate) fn msix_table_read(&self, offset: usize, out: &mut [u8]) {
        let s = self.lock();
        for (i, b) in out.iter_mut().enumerate() {
            let at = offset + i;
            *b = s
                .msix
                .get(at / 16)
                .map_or(0, |e| e.bytes.get(at % 16).copied().unwrap_or(0));
        }
    }

    /// Write the MSI-X table at `offset`; delivers what the write unmasked.
    pub(crate) fn msix_table_write(&self, offset: usize, data: &[u8]) {
        let mut s = self.lock();
        let first = offset / 16;
        let mut last = first;
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            last = at / 16;
            if let Some(e) = s.msix.get_mut(at / 16) {
                let m = Entry::wmask(at % 16);
                if let Some(b) = e.bytes.get_mut(at % 16) {
                    *b = (*b & !m) | (v & m);
                }
                e.written = true;
            }
        }
        for v in first..=last {
            s.msix_flush(v);
        }
    }

    /// Read the pending bit array at `offset` (relative to the PBA).
    pub(crate) fn msix_pba_read(&self, offset: usize, out: &mut [u8]) {
        let s = self.lock();
        for (i, b) in out.iter_mut().enumerate() {
            let at = offset + i;
            *b = s
                .msix_pending
                .get(at / 8)
                .map_or(0, |w| w.to_le_bytes()[at % 8]);
        }
    }

    /// Back to power-on state; the client's eventfds stay wired.
    pub(crate) fn reset(&self) {
        self.lock().reset();
    }

    /// Drop every eventfd the client gave.
    pub(crate) fn clear_fds(&self) {
        let mut s = self.lock();
        s.intx_fd = None;
        s.msi_fds.iter_mut().for_each(|f| *f = None);
        s.msix_fds.iter_mut().for_each(|f| *f = None);
        s.err_fd = None;
        s.req_fd = None;
    }

    /// Append the interrupt state (not the eventfds, which are the client's
    /// wiring, nor the config mirror, which is rebuilt from config space).
    pub(crate) fn save(&self, w: &mut StateWriter) {
        let s = self.lock();
        w.bool(s.intx_level).bool(s.intx_masked).u32(s.msi_pending);
        w.u32(s.msix.len() as u32);
        for e in &s.msix {
            w.bytes(&e.bytes).bool(e.written);
        }
        for p in &s.msix_pending {
            w.u64(*p);
        }
    }

    /// Parse state written by [`Interrupts::save`], checking it fits this
    /// function.
    pub(crate) fn parse(&self, r: &mut StateReader<'_>) -> Result<SavedIrqs, Error> {
        let s = self.lock();
        let intx_level = r.bool()?;
        let intx_masked = r.bool()?;
        let msi_pending = r.u32()?;
        let vectors = s.msi_fds.len();
        if vectors < 32 && msi_pending >> vectors != 0 {
            return Err(r.error(format!("MSI pending bits {msi_pending:#x}")));
        }
        let n = r.u32()? as usize;
        if n != s.msix.len() {
            return Err(r.error(format!(
                "{n} MSI-X vectors, this device has {}",
                s.msix.len()
            )));
        }
        let mut msix = Vec::with_capacity(n);
        for v in 0..n {
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(r.bytes(16)?);
            let written = r.bool()?;
            if bytes
                .iter()
                .enumerate()
                .any(|(i, &b)| b & !Entry::wmask(i) != 0)
            {
                return Err(r.error(format!("MSI-X entry {v} has reserved bits set")));
            }
            msix.push(Entry { bytes, written });
        }
        let mut pending = Vec::with_capacity(s.msix_pending.len());
        for _ in 0..s.msix_pending.len() {
            pending.push(r.u64()?);
        }
        if let Some(last) = pending.last() {
            let used = n % 64;
            if used != 0 && last >> used != 0 {
                return Err(r.error("MSI-X pending bits beyond the table"));
            }
        }
        Ok(SavedIrqs {
            intx_level: intx_level && s.intx_present,
            intx_masked,
            msi_pending,
            msix,
            msix_pending: pending,
        })
    }

    /// Install parsed state (does not signal anything).
    pub(crate) fn apply(&self, saved: SavedIrqs) {
        let mut s = self.lock();
        s.intx_level = saved.intx_level;
        s.intx_masked = saved.intx_masked;
        s.msi_pending = saved.msi_pending;
        s.msix = saved.msix;
        s.msix_pending = saved.msix_pending;
    }
}

/// Interrupt state parsed from a migration stream.
#[derive(Debug)]
pub(crate) struct SavedIrqs {
    intx_level: bool,
    intx_masked: bool,
    msi_pending: u32,
    msix: Vec<Entry>,
    msix_pending: Vec<u64>,
}
