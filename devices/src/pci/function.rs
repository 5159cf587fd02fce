//! The [`PciFunction`] trait a device model implements, and [`PciDevice`],
//! which wraps one into a [`Device`] the server can serve.

use std::ops::Range;
use std::sync::Arc;

use crate::Error;
use crate::device::{
    Device, DeviceInfo, IoEventFd, IrqInfo, IrqSet, Migratable, MmapArea, RegionInfo, RegionMmap,
};
use crate::dma::DmaRange;

use super::config::{self, ConfigSpace, WriteEffects};
use super::irq::{ConfigMirror, Interrupts};
use super::layout::PciLayout;
use super::regs::*;
use super::snapshot::{StateReader, StateWriter};
use super::{CONFIG_REGION, NUM_IRQS, NUM_REGIONS, ROM_REGION, VGA_REGION};

/// Granularity of client mmaps: sparse areas are page aligned, and the
/// pages that hold the MSI-X table and PBA are never mappable.
const PAGE_SIZE: u64 = 4096;

/// What a PCI device model provides. The core ([`PciDevice`]) owns config
/// space, the MSI-X table and PBA, and interrupt wiring; the function owns
/// its registers and behaviour.
///
/// Every method runs on the session thread that owns the device and must
/// not block on the client (see `docs/ARCHITECTURE.md`): work that touches
/// client memory through message-backed DMA belongs on the function's own
/// threads.
pub trait PciFunction: Send {
    /// A short name for logs ("sample", "nvme", ...).
    fn name(&self) -> &str;

    /// Read `data.len()` bytes at `offset` of BAR `bar`. The core has
    /// checked that the access lies inside the BAR and outside the MSI-X
    /// table and PBA, and that it is not empty.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error>;

    /// Write `data` at `offset` of BAR `bar` (checked like
    /// [`PciFunction::bar_read`]).
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error>;

    /// How the client may mmap BAR `bar`, if at all. Areas must be page
    /// aligned; the core removes the pages holding the MSI-X table and PBA
    /// and drops (with a log line) areas outside the BAR.
    fn bar_mmap(&self, _bar: u8) -> Option<RegionMmap> {
        None
    }

    /// The ioeventfds the client may attach to BAR `bar`: a write there
    /// signals the eventfd instead of reaching [`PciFunction::bar_write`],
    /// so the function must watch the eventfd.
    fn ioeventfds(&mut self, _bar: u8) -> Result<Vec<IoEventFd>, Error> {
        Ok(Vec::new())
    }

    /// Return the function to its power-on state: device reset from the
    /// client, Function Level Reset, or a D3hot to D0 transition without
    /// No_Soft_Reset. The core has already reset config space and
    /// interrupt state (eventfds stay wired). Called only when
    /// [`PciLayout::reset`] is set, except through the default
    /// [`PciFunction::close`].
    fn reset(&mut self) -> Result<(), Error>;

    /// The guest changed the command register (I/O, memory, bus master,
    /// INTx disable). A function must not start DMA without
    /// [`COMMAND_MASTER`]. Also called with 0 after a reset.
    fn command_changed(&mut self, _command: u16) {}

    /// The guest wrote vendor capability `index` of the layout; `data` is
    /// its current contents after the 3-byte header and `written` the
    /// bytes of `data` the write covered (empty if it touched only the
    /// header).
    fn vendor_capability_written(&mut self, _index: usize, _written: Range<usize>, _data: &[u8]) {}

    /// The guest reads vendor capability `index` of the layout: `data`
    /// holds the stored bytes `offset..offset + data.len()` of the
    /// capability (counted after its 3-byte header, like
    /// [`super::VendorCapability::data`]) and the function may replace
    /// them. Virtio's PCI configuration access capability, a window onto a
    /// BAR, needs this.
    fn vendor_capability_read(&mut self, _index: usize, _offset: usize, _data: &mut [u8]) {}

    /// The first user opened the device.
    fn open(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// The last user is gone: stop all activity and return to the power-on
    /// state. The default resets the function.
    fn close(&mut self) {
        if let Err(e) = self.reset() {
            log::warn!("{}: reset on close failed: {e}", self.name());
        }
    }

    /// The client went away while the device stays open. The core has
    /// dropped the client's interrupt eventfds; drop any other descriptor
    /// the client gave.
    fn disconnect(&mut self) {}

    /// A range was added to the DMA address space.
    fn dma_map(&mut self, _range: &DmaRange) -> Result<(), Error> {
        Ok(())
    }

    /// A range is about to be removed from the DMA address space; on
    /// return the function holds no view of it.
    fn dma_unmap(&mut self, _range: &DmaRange) {}

    /// The function's migration interface, if it can be migrated. The core
    /// adds its own state (config space, MSI-X table, pending bits) around
    /// what this saves.
    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        None
    }
}

/// A PCI function served as a VFIO-style [`Device`]: region 7 is config
/// space, regions 0..=5 the BARs (with the MSI-X table and PBA handled
/// here), 6 the expansion ROM and 8 the (absent) VGA region; interrupt
/// indexes INTx, MSI, MSI-X, ERR and REQ. See the [module docs](super) for
/// an example.
pub struct PciDevice<F: PciFunction> {
    function: F,
    layout: PciLayout,
    config: ConfigSpace,
    irqs: Arc<Interrupts>,
    /// The command register as last reported to the function.
    command: u16,
}

/// Check that `offset`+`len` fits in a region of `size` bytes; the end.
fn check_range(region: u32, offset: u64, len: usize, size: u64) -> Result<u64, Error> {
    let len = len as u64;
    offset
        .checked_add(len)
        .filter(|end| *end <= size)
        .ok_or(Error::OutOfRange {
            region,
            offset,
            len,
            size,
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    Function,
    Table,
    Pba,
}

/// Remove `[start, end)` from a list of areas.
fn subtract(areas: Vec<MmapArea>, start: u64, end: u64) -> Vec<MmapArea> {
    let mut out = Vec::with_capacity(areas.len() + 1);
    for a in areas {
        let a_end = a.offset + a.size;
        if end <= a.offset || start >= a_end {
            out.push(a);
            continue;
        }
        if a.offset < start {
            out.push(MmapArea {
                offset: a.offset,
                size: start - a.offset,
            });
        }
        if end < a_end {
            out.push(MmapArea {
                offset: end,
                size: a_end - end,
            });
        }
    }
    out
}

impl<F: PciFunction> PciDevice<F> {
    /// Build the device: check `layout`, create the interrupt state and
    /// hand it to `make`, which builds the function.
    pub fn new(
        layout: PciLayout,
        make: impl FnOnce(Arc<Interrupts>) -> Result<F, Error>,
    ) -> Result<PciDevice<F>, Error> {
        layout.validate()?;
        let irqs = Arc::new(Interrupts::new(&layout));
        let function = make(irqs.clone())?;
        Ok(PciDevice {
            config: ConfigSpace::new(&layout),
            function,
            layout,
            irqs,
            command: 0,
        })
    }

    /// The function.
    pub fn function(&self) -> &F {
        &self.function
    }

    /// The function, mutably.
    pub fn function_mut(&mut self) -> &mut F {
        &mut self.function
    }

    /// The interrupt handle shared with the function.
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }

    /// The layout the device was built with.
    pub fn layout(&self) -> &PciLayout {
        &self.layout
    }

    fn mirror(&self) -> ConfigMirror {
        let c = &self.config;
        let caps = c.caps();
        let mut m = ConfigMirror {
            intx_disabled: c.get16(COMMAND) & COMMAND_INTX_DISABLE != 0,
            ..ConfigMirror::default()
        };
        if let Some(msi) = caps.msi {
            let flags = c.get16(msi.offset + MSI_FLAGS);
            m.msi_enabled = flags & MSI_FLAGS_ENABLE != 0;
            let capable = (flags & MSI_FLAGS_QMASK) >> 1;
            let enabled = (flags & MSI_FLAGS_QSIZE) >> 4;
            m.msi_allocated = 1 << enabled.min(capable);
            m.msi_mask = msi.mask.map_or(0, |o| c.get32(msi.offset + o));
        }
        if let Some(x) = caps.msix {
            let flags = c.get16(x + MSIX_FLAGS);
            m.msix_enabled = flags & MSIX_FLAGS_ENABLE != 0;
            m.msix_masked = flags & MSIX_FLAGS_MASKALL != 0;
        }
        m
    }

    fn notify_command(&mut self) {
        let cmd = self.config.get16(COMMAND);
        if cmd != self.command {
            self.command = cmd;
            self.function.command_changed(cmd);
        }
    }

    /// Reset config space, interrupt state and the function.
    fn reset_all(&mut self, why: &str) -> Result<(), Error> {
        log::debug!("{}: {why}", self.function.name());
        self.config.reset();
        self.irqs.reset();
        self.irqs.update_config(self.mirror(), false);
        let r = self.function.reset();
        self.notify_command();
        r
    }

    /// The part of `[offset, offset + len)` that falls in the data of a
    /// vendor capability at `cap` of `cap_len` bytes (header included),
    /// relative to that data.
    fn vendor_overlap(offset: usize, len: usize, cap: usize, cap_len: usize) -> Range<usize> {
        let data = cap + 3;
        let start = offset.max(data);
        let end = (offset + len).min(cap + cap_len);
        if start < end {
            start - data..end - data
        } else {
            0..0
        }
    }

    fn vendor_read(&mut self, offset: usize, data: &mut [u8]) {
        let caps = self.config.caps().vendor.clone();
        for (i, (cap, cap_len)) in caps.into_iter().enumerate() {
            let r = Self::vendor_overlap(offset, data.len(), cap, cap_len);
            if r.is_empty() {
                continue;
            }
            let at = cap + 3 + r.start - offset;
            if let Some(buf) = data.get_mut(at..at + r.len()) {
                self.function.vendor_capability_read(i, r.start, buf);
            }
        }
    }

    fn after_config_write(&mut self, fx: WriteEffects, offset: usize, len: usize) {
        if fx.flr && self.layout.reset {
            if let Err(e) = self.reset_all("function level reset") {
                log::warn!("{}: FLR failed: {e}", self.function.name());
            }
            return;
        }
        if let Some((old, new)) = fx.power {
            log::debug!("{}: power state D{old} -> D{new}", self.function.name());
            if old == PM_D3HOT && new == PM_D0 && !self.config.no_soft_reset() {
                if let Err(e) = self.reset_all("D3hot to D0 soft reset") {
                    log::warn!("{}: soft reset failed: {e}", self.function.name());
                }
                return;
            }
        }
        if fx.command || fx.msi || fx.msix {
            self.irqs.update_config(self.mirror(), true);
        }
        if fx.command {
            self.notify_command();
        }
        for i in fx.vendor {
            if let Some(&(cap, cap_len)) = self.config.caps().vendor.get(i) {
                let written = Self::vendor_overlap(offset, len, cap, cap_len);
                let data = self
                    .config
                    .image()
                    .get(cap + 3..cap + cap_len)
                    .unwrap_or(&[]);
                self.function.vendor_capability_written(i, written, data);
            }
        }
    }

    /// Split `[offset, end)` of BAR `bar` into function, table and PBA
    /// pieces.
    fn segments(&self, bar: u8, offset: u64, end: u64) -> Vec<(Segment, u64, u64)> {
        let Some(x) = self.layout.msix.filter(|x| x.bar == bar) else {
            return vec![(Segment::Function, offset, end)];
        };
        let t0 = u64::from(x.table_offset);
        let t1 = t0 + x.table_size();
        let p0 = u64::from(x.pba_offset);
        let p1 = p0 + x.pba_size();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (seg, stop) = if (t0..t1).contains(&pos) {
                (Segment::Table, t1)
            } else if (p0..p1).contains(&pos) {
                (Segment::Pba, p1)
            } else {
                let next = [t0, p0].into_iter().filter(|&b| b > pos).min();
                (Segment::Function, next.unwrap_or(end))
            };
            let stop = stop.min(end);
            out.push((seg, pos, stop));
            pos = stop;
        }
        out
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let end = check_range(
            u32::from(bar),
            offset,
            data.len(),
            self.layout.bar_size(bar),
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let (t0, p0) = self
            .layout
            .msix
            .map_or((0, 0), |x| (x.table_offset as usize, x.pba_offset as usize));
        for (seg, s, e) in self.segments(bar, offset, end) {
            let range = (s - offset) as usize..(e - offset) as usize;
            let Some(buf) = data.get_mut(range) else {
                continue;
            };
            match seg {
                Segment::Function => self.function.bar_read(bar, s, buf)?,
                Segment::Table => self.irqs.msix_table_read(s as usize - t0, buf),
                Segment::Pba => self.irqs.msix_pba_read(s as usize - p0, buf),
            }
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
        let end = check_range(
            u32::from(bar),
            offset,
            data.len(),
            self.layout.bar_size(bar),
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let t0 = self.layout.msix.map_or(0, |x| x.table_offset as usize);
        for (seg, s, e) in self.segments(bar, offset, end) {
            let range = (s - offset) as usize..(e - offset) as usize;
            let Some(buf) = data.get(range) else {
                continue;
            };
            match seg {
                Segment::Function => self.function.bar_write(bar, s, buf)?,
                Segment::Table => self.irqs.msix_table_write(s as usize - t0, buf),
                Segment::Pba => {
                    log::debug!("{}: write to the MSI-X PBA ignored", self.function.name())
                }
            }
        }
        Ok(())
    }

    fn bar_mmap(&self, bar: u8, size: u64) -> Option<RegionMmap> {
        let mut m = self.function.bar_mmap(bar)?;
        let whole = MmapArea { offset: 0, size };
        let mut areas = if m.areas.is_empty() {
            vec![whole]
        } else {
            std::mem::take(&mut m.areas)
        };
        areas.retain(|a| {
            let ok = a.size != 0
                && a.offset % PAGE_SIZE == 0
                && a.size % PAGE_SIZE == 0
                && a.offset.checked_add(a.size).is_some_and(|e| e <= size);
            if !ok {
                log::warn!(
                    "{}: BAR{bar} mmap area {:#x}+{:#x} is unaligned or outside the BAR; \
                     not offered",
                    self.function.name(),
                    a.offset,
                    a.size
                );
            }
            ok
        });
        if let Some(x) = self.layout.msix.filter(|x| x.bar == bar) {
            for (s, len) in [
                (u64::from(x.table_offset), x.table_size()),
                (u64::from(x.pba_offset), x.pba_size()),
            ] {
                let start = s / PAGE_SIZE * PAGE_SIZE;
                let end = (s + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                areas = subtract(areas, start, end);
            }
        }
        if areas.is_empty() {
            return None;
        }
        m.areas = if areas == [whole] { Vec::new() } else { areas };
        Some(m)
    }

    fn rom_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        check_range(ROM_REGION, offset, data.len(), self.layout.rom_size())?;
        let rom = self.layout.rom.as_deref().unwrap_or(&[]);
        for (i, b) in data.iter_mut().enumerate() {
            // Past the image, the ROM reads as erased flash.
            *b = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|at| rom.get(at))
                .copied()
                .unwrap_or(0xff);
        }
        Ok(())
    }

    fn function_migration(&mut self) -> Result<&mut dyn Migratable, Error> {
        let name = self.function.name().to_owned();
        self.function
            .migration()
            .ok_or_else(|| Error::Unsupported(format!("{name} cannot be migrated")))
    }
}

impl<F: PciFunction> Device for PciDevice<F> {
    fn name(&self) -> &str {
        self.function.name()
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
            reset: self.layout.reset,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        match index {
            0..=5 => {
                let bar = index as u8;
                let size = self.layout.bar_size(bar);
                if size == 0 {
                    return Ok(RegionInfo::default());
                }
                Ok(RegionInfo {
                    size,
                    read: true,
                    write: true,
                    mmap: self.bar_mmap(bar, size),
                    region_type: None,
                })
            }
            ROM_REGION => {
                let size = self.layout.rom_size();
                Ok(RegionInfo {
                    size,
                    read: size != 0,
                    ..RegionInfo::default()
                })
            }
            CONFIG_REGION => Ok(RegionInfo {
                size: CONFIG_SPACE_SIZE as u64,
                read: true,
                write: true,
                ..RegionInfo::default()
            }),
            VGA_REGION => Ok(RegionInfo::default()),
            _ => Err(Error::NoSuchRegion(index)),
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        match index {
            0..=5 => self.bar_read(index as u8, offset, data),
            ROM_REGION => self.rom_read(offset, data),
            CONFIG_REGION => {
                let off = config::check(offset, data.len())?;
                self.config.read(off, data, self.irqs.dynamic());
                self.vendor_read(off, data);
                Ok(())
            }
            VGA_REGION => check_range(index, offset, data.len(), 0).map(|_| ()),
            _ => Err(Error::NoSuchRegion(index)),
        }
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        match index {
            0..=5 => self.bar_write(index as u8, offset, data),
            ROM_REGION => {
                check_range(index, offset, data.len(), self.layout.rom_size())?;
                Err(Error::AccessDenied {
                    region: index,
                    access: "write",
                })
            }
            CONFIG_REGION => {
                let off = config::check(offset, data.len())?;
                let fx = self.config.write(off, data);
                self.after_config_write(fx, off, data.len());
                Ok(())
            }
            VGA_REGION => check_range(index, offset, data.len(), 0).map(|_| ()),
            _ => Err(Error::NoSuchRegion(index)),
        }
    }

    fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoEventFd>, Error> {
        if index >= NUM_REGIONS {
            return Err(Error::NoSuchRegion(index));
        }
        let Ok(bar) = u8::try_from(index) else {
            return Ok(Vec::new());
        };
        let size = self.layout.bar_size(bar);
        if index > 5 || size == 0 {
            return Ok(Vec::new());
        }
        let msix: Vec<(u64, u64)> = self
            .layout
            .msix
            .filter(|x| x.bar == bar)
            .map(|x| {
                let t = u64::from(x.table_offset);
                let p = u64::from(x.pba_offset);
                vec![(t, t + x.table_size()), (p, p + x.pba_size())]
            })
            .unwrap_or_default();
        let name = self.function.name().to_owned();
        let mut fds = self.function.ioeventfds(bar)?;
        fds.retain(|f| {
            let end = f.offset.checked_add(f.size.max(1));
            let ok = end.is_some_and(|e| e <= size)
                && end.is_some_and(|e| msix.iter().all(|&(s, x)| e <= s || f.offset >= x));
            if !ok {
                log::warn!(
                    "{name}: ioeventfd at BAR{bar}+{:#x} is outside the BAR or on MSI-X; \
                     not offered",
                    f.offset
                );
            }
            ok
        });
        Ok(fds)
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, Error> {
        self.irqs.info(index)
    }

    fn set_irqs(&mut self, set: IrqSet) -> Result<(), Error> {
        self.irqs.set_irqs(set)
    }

    fn reset(&mut self) -> Result<(), Error> {
        if !self.layout.reset {
            return Err(Error::Unsupported(format!(
                "{} cannot be reset",
                self.function.name()
            )));
        }
        self.reset_all("device reset")
    }

    fn dma_map(&mut self, range: &DmaRange) -> Result<(), Error> {
        self.function.dma_map(range)
    }

    fn dma_unmap(&mut self, range: &DmaRange) {
        self.function.dma_unmap(range)
    }

    fn open(&mut self) -> Result<(), Error> {
        self.function.open()
    }

    fn close(&mut self) {
        self.irqs.clear_fds();
        self.config.reset();
        self.irqs.reset();
        self.irqs.update_config(self.mirror(), false);
        self.function.close();
        self.notify_command();
    }

    fn disconnect(&mut self) {
        self.irqs.clear_fds();
        self.function.disconnect();
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        self.function.migration()?;
        Some(self)
    }
}

/// Magic of a saved PCI device.
const STATE_MAGIC: &[u8; 8] = b"VDEVDPCI";
/// Version of the saved format.
const STATE_VERSION: u32 = 1;

impl<F: PciFunction> Migratable for PciDevice<F> {
    fn stop(&mut self) -> Result<(), Error> {
        self.function_migration()?.stop()
    }

    fn run(&mut self) -> Result<(), Error> {
        self.function_migration()?.run()
    }

    /// Format (little endian): magic, version u32, 4096 bytes of config
    /// space, interrupt state (INTx level and mask, MSI pending bits, MSI-X
    /// table entries with their written flags, PBA words), then the
    /// function's own state as a u32-length blob.
    fn save(&mut self) -> Result<Vec<u8>, Error> {
        let function = self.function_migration()?.save()?;
        let mut w = StateWriter::new();
        w.bytes(STATE_MAGIC).u32(STATE_VERSION);
        w.bytes(self.config.image());
        self.irqs.save(&mut w);
        w.blob(&function)?;
        Ok(w.finish())
    }

    /// Everything is parsed and checked before anything changes; state for
    /// another kind of device, another version or layout, or with
    /// impossible values is refused.
    fn load(&mut self, state: &[u8]) -> Result<(), Error> {
        let mut r = StateReader::new(state, "PCI device");
        let version = r.header(STATE_MAGIC)?;
        if version != STATE_VERSION {
            return Err(r.error(format!("unsupported version {version}")));
        }
        let mut config = self.config.clone();
        config.load_image(r.bytes(CONFIG_SPACE_SIZE)?)?;
        let irqs = self.irqs.parse(&mut r)?;
        let function = r.blob()?;
        r.finish()?;
        self.function_migration()?.load(function)?;
        self.config = config;
        self.irqs.apply(irqs);
        self.irqs.update_config(self.mirror(), false);
        self.notify_command();
        Ok(())
    }
}
