//! The configuration space of one function: 4 KiB of bytes with per-bit
//! write semantics.
//!
//! Every byte has a write mask (bits the guest may change) and a
//! write-1-to-clear mask; all other bits are read-only. Register semantics
//! live in these masks, so BAR sizing, RO/RW/RW1C behaviour and accesses of
//! any size or alignment fall out of one byte-wise loop. A few bits are
//! *dynamic* and never stored: Status.Interrupt and the MSI pending bits are
//! filled in from the interrupt state on every read, and DevCtl's Initiate
//! FLR always reads 0. `ConfigSpace::write` reports what a write touched
//! (`WriteEffects`) and the device acts on it.
//!
//! # Passthrough
//!
//! For a real device behind Linux VFIO, the bytes come from the device
//! (region 7 of its VFIO fd) and only some are virtualised: the BARs, the
//! ROM BAR, the MSI and MSI-X capabilities, and whatever the backend hides.
//! That backend adds a third mask, "emulated", beside `wmask`/`w1c`:
//! reads take emulated bits from `data` and the rest from the device; writes
//! apply the masks to emulated bits and forward the rest to the device. The
//! capability offsets (`CapOffsets`) are then found by walking the real
//! device's list instead of being chosen here. The emulated case is the
//! special case "every bit emulated", which is why all register semantics go
//! through the masks and `WriteEffects` rather than through code keyed on
//! this module's own layout.

use crate::Error;

use super::layout::{BarKind, PciLayout};
use super::regs::*;

/// Bytes available to standard capabilities (0x40..0x100).
pub(crate) const CAP_SPACE: usize = EXT_CAP_START - HEADER_SIZE;

/// Size of the PM capability.
const PM_CAP_SIZE: usize = 8;
/// Size of the MSI-X capability.
const MSIX_CAP_SIZE: usize = 12;

/// Where the MSI capability sits and how it is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MsiCap {
    /// Offset of the capability.
    pub offset: usize,
    /// Vectors the function supports.
    pub vectors: u32,
    /// Offset (in the capability) of the mask register, if per-vector
    /// masking is supported.
    pub mask: Option<usize>,
    /// Offset (in the capability) of the pending register.
    pub pending: Option<usize>,
    /// Size of the capability.
    pub size: usize,
}

/// Where each capability was placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapOffsets {
    pub pm: usize,
    pub msi: Option<MsiCap>,
    pub msix: Option<usize>,
    pub pcie: Option<usize>,
    /// (offset, size) of each vendor-specific capability.
    pub vendor: Vec<(usize, usize)>,
}

fn msi_size(address64: bool, mask: bool) -> usize {
    match (address64, mask) {
        (false, false) => 12, // 10 bytes, kept dword aligned
        (true, false) => 16,  // 14 bytes
        (false, true) => 20,
        (true, true) => 24,
    }
}

fn align4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Bytes the layout's capability list needs in standard config space.
pub(crate) fn capabilities_size(layout: &PciLayout) -> usize {
    let mut n = PM_CAP_SIZE;
    if let Some(msi) = &layout.msi {
        n += msi_size(msi.address64, msi.per_vector_mask);
    }
    if layout.msix.is_some() {
        n += MSIX_CAP_SIZE;
    }
    if layout.pcie.is_some() {
        n += EXP_CAP_SIZE;
    }
    for cap in &layout.vendor_capabilities {
        n = n.saturating_add(align4(cap.data.len().saturating_add(3)));
    }
    n
}

/// What a config write touched, for the device to act on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WriteEffects {
    /// The command register was written.
    pub command: bool,
    /// The MSI capability was written.
    pub msi: bool,
    /// The MSI-X message control was written.
    pub msix: bool,
    /// The power state changed: (old, new).
    pub power: Option<(u16, u16)>,
    /// Initiate Function Level Reset was written as 1.
    pub flr: bool,
    /// Indexes of the vendor capabilities that were written.
    pub vendor: Vec<usize>,
}

/// Values that are not stored in config space but read from live state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Dynamic {
    /// The INTx line is asserted (Status.Interrupt).
    pub intx: bool,
    /// MSI pending bits.
    pub msi_pending: u32,
}

/// Configuration space bytes and their masks. See the module docs.
#[derive(Clone)]
pub(crate) struct ConfigSpace {
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    w1c: Box<[u8; CONFIG_SPACE_SIZE]>,
    power_on: Box<[u8; CONFIG_SPACE_SIZE]>,
    caps: CapOffsets,
}

fn overlaps(off: usize, len: usize, reg: usize, reg_len: usize) -> bool {
    off < reg + reg_len && reg < off + len
}

/// Check that `offset`+`len` lies in config space; the offset as usize.
pub(crate) fn check(offset: u64, len: usize) -> Result<usize, Error> {
    let out = || Error::OutOfRange {
        region: super::CONFIG_REGION,
        offset,
        len: len as u64,
        size: CONFIG_SPACE_SIZE as u64,
    };
    let end = offset.checked_add(len as u64).ok_or_else(out)?;
    if end > CONFIG_SPACE_SIZE as u64 {
        return Err(out());
    }
    usize::try_from(offset).map_err(|_| out())
}

impl ConfigSpace {
    /// Build the power-on config space of a validated layout.
    pub fn new(layout: &PciLayout) -> ConfigSpace {
        let mut c = ConfigSpace {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            w1c: Box::new([0; CONFIG_SPACE_SIZE]),
            power_on: Box::new([0; CONFIG_SPACE_SIZE]),
            caps: CapOffsets::default(),
        };
        c.build_header(layout);
        c.build_capabilities(layout);
        *c.power_on = *c.data;
        c
    }

    fn build_header(&mut self, layout: &PciLayout) {
        let ids = &layout.ids;
        self.set16(VENDOR_ID, ids.vendor_id);
        self.set16(DEVICE_ID, ids.device_id);
        self.set8(REVISION_ID, ids.revision);
        let class = ids.class_code.to_le_bytes();
        self.data[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&class[..3]);
        self.set16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        self.set16(SUBSYSTEM_ID, ids.subsystem_id);

        let has_io = layout.bars.iter().flatten().any(|b| !b.is_memory());
        let has_mem = layout.bars.iter().flatten().any(|b| b.is_memory()) || layout.rom.is_some();
        let mut cmd = COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE;
        if has_io {
            cmd |= COMMAND_IO;
        }
        if has_mem {
            cmd |= COMMAND_MEMORY;
        }
        self.set_wmask16(COMMAND, cmd);
        self.set16(STATUS, STATUS_CAP_LIST);
        self.w1c[STATUS..STATUS + 2].copy_from_slice(&STATUS_W1C.to_le_bytes());
        self.set_wmask8(CACHE_LINE_SIZE, 0xff);

        for (i, bar) in layout.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let off = BAR0 + 4 * i;
            let addr_mask = !(bar.size - 1);
            match bar.kind {
                BarKind::Io => {
                    self.set32(off, BAR_IO);
                    self.set_wmask32(off, (addr_mask as u32) & !0b11);
                }
                BarKind::Memory32 => {
                    let pf = if bar.prefetchable { BAR_PREFETCH } else { 0 };
                    self.set32(off, pf);
                    self.set_wmask32(off, (addr_mask as u32) & !0xf);
                }
                BarKind::Memory64 => {
                    let pf = if bar.prefetchable { BAR_PREFETCH } else { 0 };
                    self.set32(off, BAR_MEM_64 | pf);
                    self.set_wmask32(off, (addr_mask as u32) & !0xf);
                    self.set_wmask32(off + 4, (addr_mask >> 32) as u32);
                }
            }
        }
        let rom = layout.rom_size();
        if rom != 0 {
            self.set_wmask32(ROM_ADDRESS, (!(rom - 1) as u32 & !0x7ff) | ROM_ENABLE);
        }
        self.set8(CAPABILITY_LIST, HEADER_SIZE as u8);
        self.set_wmask8(INTERRUPT_LINE, 0xff);
        self.set8(INTERRUPT_PIN, layout.interrupt_pin);
    }

    fn build_capabilities(&mut self, layout: &PciLayout) {
        // Placed one after another from 0x40, dword aligned; validation has
        // checked that they fit below 0x100.
        let mut chain: Vec<(usize, u8)> = Vec::new();
        let mut at = HEADER_SIZE;

        // Power management, version 1.2, D0 and D3hot only.
        let pm = at;
        chain.push((pm, CAP_ID_PM));
        self.set16(pm + PM_PMC, 0b011);
        if layout.pm.no_soft_reset {
            self.set16(pm + PM_CTRL, PM_CTRL_NO_SOFT_RESET);
        }
        self.set_wmask16(pm + PM_CTRL, PM_CTRL_STATE_MASK);
        self.caps.pm = pm;
        at += PM_CAP_SIZE;

        if let Some(msi) = &layout.msi {
            let size = msi_size(msi.address64, msi.per_vector_mask);
            chain.push((at, CAP_ID_MSI));
            let log2 = msi.vectors.trailing_zeros() as u16;
            let mut flags = log2 << 1;
            if msi.address64 {
                flags |= MSI_FLAGS_64BIT;
            }
            if msi.per_vector_mask {
                flags |= MSI_FLAGS_MASKBIT;
            }
            self.set16(at + MSI_FLAGS, flags);
            self.set_wmask16(at + MSI_FLAGS, MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE);
            self.set_wmask32(at + MSI_ADDRESS_LO, !0b11);
            let data = if msi.address64 {
                self.set_wmask32(at + 8, !0);
                12
            } else {
                8
            };
            self.set_wmask16(at + data, 0xffff);
            let (mask, pending) = if msi.per_vector_mask {
                let bits = if msi.vectors >= 32 {
                    u32::MAX
                } else {
                    (1u32 << msi.vectors) - 1
                };
                self.set_wmask32(at + data + 4, bits);
                (Some(data + 4), Some(data + 8))
            } else {
                (None, None)
            };
            self.caps.msi = Some(MsiCap {
                offset: at,
                vectors: u32::from(msi.vectors),
                mask,
                pending,
                size,
            });
            at += size;
        }

        if let Some(msix) = &layout.msix {
            chain.push((at, CAP_ID_MSIX));
            self.set16(at + MSIX_FLAGS, msix.vectors - 1);
            self.set_wmask16(at + MSIX_FLAGS, MSIX_FLAGS_MASKALL | MSIX_FLAGS_ENABLE);
            self.set32(at + MSIX_TABLE, msix.table_offset | u32::from(msix.bar));
            self.set32(at + MSIX_PBA, msix.pba_offset | u32::from(msix.bar));
            self.caps.msix = Some(at);
            at += MSIX_CAP_SIZE;
        }

        if let Some(pcie) = &layout.pcie {
            chain.push((at, CAP_ID_EXP));
            // Version 2, device/port type 0 (PCI Express endpoint).
            self.set16(at + EXP_FLAGS, 0x0002);
            let mut devcap = u32::from(pcie.max_payload) | EXP_DEVCAP_RBER;
            if layout.reset {
                devcap |= EXP_DEVCAP_FLR;
            }
            self.set32(at + EXP_DEVCAP, devcap);
            // Power-on defaults: relaxed ordering and no snoop enabled,
            // 128-byte payloads, 512-byte read requests.
            self.set16(
                at + EXP_DEVCTL,
                EXP_DEVCTL_RELAX_EN | EXP_DEVCTL_NOSNOOP_EN | (0b010 << 12),
            );
            // Error reporting enables, relaxed ordering, MPS, no snoop, MRRS.
            self.set_wmask16(at + EXP_DEVCTL, 0x78ff);
            // Correctable/non-fatal/fatal/unsupported request detected.
            self.w1c[at + EXP_DEVSTA] = 0x0f;
            let speed = u32::from(pcie.link_speed);
            let width = u32::from(pcie.link_width);
            // ASPM optionality compliance (bit 22), no ASPM support.
            self.set32(at + EXP_LNKCAP, speed | (width << 4) | (1 << 22));
            // ASPM control, RCB, common clock, extended synch.
            self.set_wmask16(at + EXP_LNKCTL, 0x00cb);
            self.set16(at + EXP_LNKSTA, (speed | (width << 4)) as u16);
            self.set32(at + EXP_LNKCAP2, ((1u32 << speed) - 1) << 1);
            self.set16(at + EXP_LNKCTL2, speed as u16);
            self.caps.pcie = Some(at);
            at += EXP_CAP_SIZE;
        }

        for cap in &layout.vendor_capabilities {
            let len = cap.data.len() + 3;
            chain.push((at, CAP_ID_VENDOR));
            self.data[at + 2] = len as u8;
            self.data[at + 3..at + len].copy_from_slice(&cap.data);
            self.wmask[at + 3..at + 3 + cap.writable.len()].copy_from_slice(&cap.writable);
            self.caps.vendor.push((at, len));
            at += align4(len);
        }

        // Link the list; the last entry's next pointer stays 0.
        for (i, &(off, id)) in chain.iter().enumerate() {
            self.data[off] = id;
            self.data[off + 1] = chain.get(i + 1).map_or(0, |&(next, _)| next as u8);
        }
        // The extended list at 0x100 stays all zero: "no extended
        // capabilities", which is how PCI Express terminates an empty list.
    }

    /// Where the capabilities are.
    pub fn caps(&self) -> &CapOffsets {
        &self.caps
    }

    /// Read `out.len()` bytes at `offset` (already checked with [`check`]),
    /// with the dynamic bits filled in.
    pub fn read(&self, offset: usize, out: &mut [u8], dynamic: Dynamic) {
        let Some(src) = self.data.get(offset..offset + out.len()) else {
            return;
        };
        out.copy_from_slice(src);
        let len = out.len();
        let mut overlay = |reg: usize, value: &[u8], mask: &[u8]| {
            for (i, (v, m)) in value.iter().zip(mask).enumerate() {
                let at = reg + i;
                if at >= offset && at < offset + len {
                    let b = &mut out[at - offset];
                    *b = (*b & !m) | (v & m);
                }
            }
        };
        let intx = if dynamic.intx { STATUS_INTERRUPT } else { 0 };
        overlay(STATUS, &intx.to_le_bytes(), &STATUS_INTERRUPT.to_le_bytes());
        if let Some(MsiCap {
            offset: cap,
            pending: Some(p),
            ..
        }) = self.caps.msi
        {
            overlay(cap + p, &dynamic.msi_pending.to_le_bytes(), &[0xff; 4]);
        }
    }

    /// Write `data` at `offset` (already checked with [`check`]) with
    /// per-bit semantics, and report what it touched.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> WriteEffects {
        let len = data.len();
        let old_power = self.power_state();
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            let (Some(b), Some(&wm), Some(&w1c)) =
                (self.data.get_mut(at), self.wmask.get(at), self.w1c.get(at))
            else {
                break;
            };
            *b = ((*b & !wm) | (v & wm)) & !(v & w1c);
        }

        let mut fx = WriteEffects {
            command: overlaps(offset, len, COMMAND, 2),
            ..WriteEffects::default()
        };
        if let Some(msi) = self.caps.msi {
            fx.msi = overlaps(offset, len, msi.offset, msi.size);
        }
        if let Some(msix) = self.caps.msix {
            fx.msix = overlaps(offset, len, msix + MSIX_FLAGS, 2);
        }
        let pmcsr = self.caps.pm + PM_CTRL;
        if overlaps(offset, len, pmcsr, 1) {
            let new = self.power_state();
            if new == 1 || new == 2 {
                // D1/D2 are not supported: the write completes, the state
                // does not change (PCI PM 1.2, 5.4.1).
                let v = (self.get16(pmcsr) & !PM_CTRL_STATE_MASK) | old_power;
                self.set16(pmcsr, v);
            } else if new != old_power {
                fx.power = Some((old_power, new));
            }
        }
        if let Some(pcie) = self.caps.pcie {
            let flr_byte = pcie + EXP_DEVCTL + 1;
            if let Some(&b) = flr_byte.checked_sub(offset).and_then(|i| data.get(i)) {
                fx.flr = b & (EXP_DEVCTL_BCR_FLR >> 8) as u8 != 0;
            }
        }
        for (i, &(off, size)) in self.caps.vendor.iter().enumerate() {
            if overlaps(offset, len, off, size) {
                fx.vendor.push(i);
            }
        }
        fx
    }

    /// Back to the power-on contents.
    pub fn reset(&mut self) {
        *self.data = *self.power_on;
    }

    /// The raw bytes (for saving state).
    pub fn image(&self) -> &[u8] {
        &self.data[..]
    }

    /// Replace the bytes with a saved image, refusing one whose read-only
    /// bits differ from this function's (another device, or corruption).
    pub fn load_image(&mut self, image: &[u8]) -> Result<(), Error> {
        if image.len() != CONFIG_SPACE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "config space image of {} bytes",
                image.len()
            )));
        }
        for (i, &b) in image.iter().enumerate() {
            let ro = !(self.wmask[i] | self.w1c[i]);
            if (b ^ self.power_on[i]) & ro != 0 {
                return Err(Error::InvalidArgument(format!(
                    "config space byte {i:#x} ({b:#04x}) differs from this device's \
                     read-only value ({:#04x})",
                    self.power_on[i]
                )));
            }
        }
        let state = u16::from_le_bytes([
            image[self.caps.pm + PM_CTRL],
            image[self.caps.pm + PM_CTRL + 1],
        ]) & PM_CTRL_STATE_MASK;
        if state != PM_D0 && state != PM_D3HOT {
            return Err(Error::InvalidArgument(format!(
                "unsupported power state D{state}"
            )));
        }
        self.data.copy_from_slice(image);
        Ok(())
    }

    /// Current PMCSR power state.
    pub fn power_state(&self) -> u16 {
        self.get16(self.caps.pm + PM_CTRL) & PM_CTRL_STATE_MASK
    }

    /// Whether PMCSR.No_Soft_Reset is set.
    pub fn no_soft_reset(&self) -> bool {
        self.get16(self.caps.pm + PM_CTRL) & PM_CTRL_NO_SOFT_RESET != 0
    }

    /// Read a byte (0 past the end).
    pub fn get8(&self, off: usize) -> u8 {
        self.data.get(off).copied().unwrap_or(0)
    }

    /// Read a little-endian u16.
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.get8(off), self.get8(off + 1)])
    }

    /// Read a little-endian u32.
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.get8(off),
            self.get8(off + 1),
            self.get8(off + 2),
            self.get8(off + 3),
        ])
    }

    fn set_bytes(arr: &mut [u8; CONFIG_SPACE_SIZE], off: usize, v: &[u8]) {
        if let Some(dst) = arr.get_mut(off..off + v.len()) {
            dst.copy_from_slice(v);
        }
    }

    fn set8(&mut self, off: usize, v: u8) {
        Self::set_bytes(&mut self.data, off, &[v]);
    }

    fn set16(&mut self, off: usize, v: u16) {
        Self::set_bytes(&mut self.data, off, &v.to_le_bytes());
    }

    fn set32(&mut self, off: usize, v: u32) {
        Self::set_bytes(&mut self.data, off, &v.to_le_bytes());
    }

    fn set_wmask8(&mut self, off: usize, v: u8) {
        Self::set_bytes(&mut self.wmask, off, &[v]);
    }

    fn set_wmask16(&mut self, off: usize, v: u16) {
        Self::set_bytes(&mut self.wmask, off, &v.to_le_bytes());
    }

    fn set_wmask32(&mut self, off: usize, v: u32) {
        Self::set_bytes(&mut self.wmask, off, &v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::layout::{Bar, MsiSpec, MsixSpec, PciIds, VendorCapability};

    fn layout() -> PciLayout {
        let mut l = PciLayout::new(PciIds {
            vendor_id: 0x1234,
            device_id: 0xabcd,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 3,
            class_code: 0x00ff_0001,
        });
        l.bars[0] = Some(Bar::memory32(0x1000));
        l.bars[1] = Some(Bar::io(0x40));
        l.bars[2] = Some(Bar::memory64(1 << 33).prefetchable());
        l.bars[4] = Some(Bar::memory32(0x100).prefetchable());
        l.rom = Some(vec![0x55, 0xaa, 1]);
        l.msi = Some(MsiSpec {
            vectors: 4,
            address64: true,
            per_vector_mask: true,
        });
        l.msix = Some(MsixSpec {
            vectors: 8,
            bar: 0,
            table_offset: 0x800,
            pba_offset: 0xc00,
        });
        l.vendor_capabilities.push(VendorCapability {
            data: vec![1, 2, 3, 4, 5],
            writable: vec![0, 0xff],
        });
        l.validate().unwrap();
        l
    }

    fn w32(c: &mut ConfigSpace, off: usize, v: u32) -> WriteEffects {
        c.write(off, &v.to_le_bytes())
    }

    #[test]
    fn header_identity_is_read_only() {
        let mut c = ConfigSpace::new(&layout());
        assert_eq!(c.get32(0), 0xabcd_1234);
        assert_eq!(c.get32(REVISION_ID), 0xff00_0103);
        assert_eq!(c.get32(SUBSYSTEM_VENDOR_ID), 0x1100_1af4);
        assert_eq!(c.get8(HEADER_TYPE), 0);
        assert_eq!(c.get8(INTERRUPT_PIN), 1);
        for off in [VENDOR_ID, REVISION_ID, SUBSYSTEM_VENDOR_ID, CAPABILITY_LIST] {
            let before = c.get32(off);
            w32(&mut c, off, 0xdead_beef);
            assert_eq!(c.get32(off), before, "offset {off:#x} is writable");
        }
        // interrupt line is scratch, the pin is not
        c.write(INTERRUPT_LINE, &[0x0b, 0x04]);
        assert_eq!(c.get8(INTERRUPT_LINE), 0x0b);
        assert_eq!(c.get8(INTERRUPT_PIN), 1);
        // latency timer is read-only zero on PCI Express, cache line is RW
        c.write(CACHE_LINE_SIZE, &[0x10, 0x40]);
        assert_eq!(c.get16(CACHE_LINE_SIZE), 0x0010);
    }

    #[test]
    fn command_and_status_semantics() {
        let mut c = ConfigSpace::new(&layout());
        let fx = c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert!(fx.command);
        assert_eq!(
            c.get16(COMMAND),
            COMMAND_IO
                | COMMAND_MEMORY
                | COMMAND_MASTER
                | COMMAND_PARITY
                | COMMAND_SERR
                | COMMAND_INTX_DISABLE
        );
        assert_eq!(c.get16(STATUS), STATUS_CAP_LIST);
        // RW1C: set two error bits behind the guest's back, clear one.
        c.data[STATUS + 1] |= 0xa0; // bits 13 and 15
        c.write(STATUS, &0x2000u16.to_le_bytes());
        assert_eq!(c.get16(STATUS), STATUS_CAP_LIST | 0x8000);
        // writing 0 clears nothing; the capability bit cannot be cleared
        c.write(STATUS, &0x0010u16.to_le_bytes());
        assert_eq!(c.get16(STATUS), STATUS_CAP_LIST | 0x8000);
        // Status.Interrupt comes from live state only
        let mut buf = [0u8; 4];
        c.read(
            COMMAND,
            &mut buf,
            Dynamic {
                intx: true,
                msi_pending: 0,
            },
        );
        assert_eq!(
            u16::from_le_bytes([buf[2], buf[3]]) & STATUS_INTERRUPT,
            STATUS_INTERRUPT
        );
        c.read(COMMAND, &mut buf, Dynamic::default());
        assert_eq!(u16::from_le_bytes([buf[2], buf[3]]) & STATUS_INTERRUPT, 0);
    }

    #[test]
    fn command_without_io_bars_keeps_io_enable_clear() {
        let mut l = layout();
        l.bars[1] = None;
        let mut c = ConfigSpace::new(&l);
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.get16(COMMAND) & COMMAND_IO, 0);
        assert_ne!(c.get16(COMMAND) & COMMAND_MEMORY, 0);
    }

    #[test]
    fn bar_sizing_and_programming() {
        let mut c = ConfigSpace::new(&layout());
        // 32-bit, non-prefetchable, 4 KiB
        w32(&mut c, BAR0, !0);
        assert_eq!(c.get32(BAR0), 0xffff_f000);
        w32(&mut c, BAR0, 0xfebf_1234);
        assert_eq!(c.get32(BAR0), 0xfebf_1000);
        // I/O, 64 bytes
        w32(&mut c, BAR0 + 4, !0);
        assert_eq!(c.get32(BAR0 + 4), 0xffff_ffc1);
        w32(&mut c, BAR0 + 4, 0xc043);
        assert_eq!(c.get32(BAR0 + 4), 0xc041);
        // 64-bit prefetchable, 8 GiB: the low dword has no address bits
        w32(&mut c, BAR0 + 8, !0);
        w32(&mut c, BAR0 + 12, !0);
        assert_eq!(c.get32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.get32(BAR0 + 12), 0xffff_fffe);
        w32(&mut c, BAR0 + 12, 0x0000_0009);
        assert_eq!(c.get32(BAR0 + 12), 0x0000_0008);
        // 32-bit prefetchable, 256 bytes, read as a whole 8-byte access
        w32(&mut c, BAR0 + 16, !0);
        assert_eq!(c.get32(BAR0 + 16), 0xffff_ff08);
        // absent BAR sizes to 0
        w32(&mut c, BAR0 + 20, !0);
        assert_eq!(c.get32(BAR0 + 20), 0);
        // byte writes to a BAR work; bits below the size stay zero
        c.write(BAR0 + 1, &[0xab]);
        assert_eq!(c.get32(BAR0), 0xfebf_a000);
        // ROM: 2 KiB, enable bit writable
        w32(&mut c, ROM_ADDRESS, !0);
        assert_eq!(c.get32(ROM_ADDRESS), 0xffff_f801);
        w32(&mut c, ROM_ADDRESS, 0xfeb0_0000);
        assert_eq!(c.get32(ROM_ADDRESS), 0xfeb0_0000);
    }

    #[test]
    fn no_rom_sizes_to_zero() {
        let mut l = layout();
        l.rom = None;
        let mut c = ConfigSpace::new(&l);
        w32(&mut c, ROM_ADDRESS, !0);
        assert_eq!(c.get32(ROM_ADDRESS), 0);
    }

    /// Walk the capability list the way Linux's pci_find_capability does,
    /// with its loop bound, and the extended list at 0x100.
    fn walk(c: &ConfigSpace) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        assert_ne!(c.get16(STATUS) & STATUS_CAP_LIST, 0);
        let mut pos = usize::from(c.get8(CAPABILITY_LIST));
        let mut ttl = 48;
        while pos >= HEADER_SIZE && ttl > 0 {
            assert_eq!(pos % 4, 0, "capability at unaligned offset {pos:#x}");
            let id = c.get8(pos);
            out.push((id, pos));
            pos = usize::from(c.get8(pos + 1) & !3);
            ttl -= 1;
        }
        assert!(ttl > 0, "capability list loops");
        out
    }

    #[test]
    fn capability_chain_walks_like_a_driver() {
        let c = ConfigSpace::new(&layout());
        let ids: Vec<u8> = walk(&c).iter().map(|&(id, _)| id).collect();
        assert_eq!(
            ids,
            [
                CAP_ID_PM,
                CAP_ID_MSI,
                CAP_ID_MSIX,
                CAP_ID_EXP,
                CAP_ID_VENDOR
            ]
        );
        let caps = c.caps();
        assert_eq!(walk(&c)[0].1, caps.pm);
        assert_eq!(walk(&c)[2].1, caps.msix.unwrap());
        // vendor capability: length byte filled in, data after it
        let (v, len) = caps.vendor[0];
        assert_eq!(len, 8);
        assert_eq!(c.get8(v + 2), 8);
        assert_eq!(c.get8(v + 3), 1);
        assert_eq!(c.get8(v + 7), 5);
        // extended list: empty, properly terminated by a zero header
        assert_eq!(c.get32(EXT_CAP_START), 0);
        // capabilities do not overlap
        let mut spans: Vec<(usize, usize)> = vec![
            (caps.pm, 8),
            (caps.msi.unwrap().offset, caps.msi.unwrap().size),
            (caps.msix.unwrap(), 12),
            (caps.pcie.unwrap(), EXP_CAP_SIZE),
            (v, len),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{spans:x?}");
        }
        assert!(spans.last().map(|s| s.0 + s.1).unwrap() <= EXT_CAP_START);
    }

    #[test]
    fn minimal_layout_chain() {
        let mut l = PciLayout::new(layout().ids);
        l.pcie = None;
        let c = ConfigSpace::new(&l);
        assert_eq!(walk(&c), vec![(CAP_ID_PM, 0x40)]);
        assert_eq!(c.get8(0x41), 0);
    }

    #[test]
    fn vendor_capability_write_mask() {
        let mut c = ConfigSpace::new(&layout());
        let (v, _) = c.caps().vendor[0];
        let fx = c.write(v + 2, &[0xff; 6]);
        assert_eq!(fx.vendor, vec![0]);
        assert_eq!(c.get8(v + 2), 8, "length byte is read-only");
        assert_eq!(c.get8(v + 3), 1, "first data byte is read-only");
        assert_eq!(c.get8(v + 4), 0xff, "second data byte is writable");
        assert_eq!(c.get8(v + 5), 3);
    }

    #[test]
    fn power_management_states() {
        let mut c = ConfigSpace::new(&layout());
        let pm = c.caps().pm;
        assert_eq!(c.get16(pm + PM_PMC) & 7, 3, "PM version 1.2");
        assert!(c.no_soft_reset());
        let fx = c.write(pm + PM_CTRL, &[3, 0]);
        assert_eq!(fx.power, Some((PM_D0, PM_D3HOT)));
        assert_eq!(c.power_state(), PM_D3HOT);
        // D1 and D2 are unsupported: no change
        let fx = c.write(pm + PM_CTRL, &[1, 0]);
        assert_eq!(fx.power, None);
        assert_eq!(c.power_state(), PM_D3HOT);
        c.write(pm + PM_CTRL, &[2]);
        assert_eq!(c.power_state(), PM_D3HOT);
        let fx = c.write(pm + PM_CTRL, &[0xfc]);
        assert_eq!(fx.power, Some((PM_D3HOT, PM_D0)));
        assert!(c.no_soft_reset(), "No_Soft_Reset is read-only");
    }

    #[test]
    fn msi_capability_registers() {
        let mut c = ConfigSpace::new(&layout());
        let msi = c.caps().msi.unwrap();
        let flags = c.get16(msi.offset + MSI_FLAGS);
        assert_eq!(flags & MSI_FLAGS_QMASK, 2 << 1, "4 vectors capable");
        assert_ne!(flags & MSI_FLAGS_64BIT, 0);
        assert_ne!(flags & MSI_FLAGS_MASKBIT, 0);
        let fx = c.write(msi.offset + MSI_FLAGS, &0xffffu16.to_le_bytes());
        assert!(fx.msi);
        assert_eq!(
            c.get16(msi.offset + MSI_FLAGS),
            flags | MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE
        );
        w32(&mut c, msi.offset + MSI_ADDRESS_LO, 0xfee0_0003);
        assert_eq!(c.get32(msi.offset + MSI_ADDRESS_LO), 0xfee0_0000);
        w32(&mut c, msi.offset + 12, 0xffff_ffff);
        assert_eq!(c.get32(msi.offset + 12), 0xffff, "16-bit message data");
        let mask = msi.offset + msi.mask.unwrap();
        w32(&mut c, mask, !0);
        assert_eq!(c.get32(mask), 0xf, "mask bits only for 4 vectors");
        let pending = msi.offset + msi.pending.unwrap();
        w32(&mut c, pending, !0);
        let mut b = [0u8; 4];
        c.read(
            pending,
            &mut b,
            Dynamic {
                intx: false,
                msi_pending: 0b0101,
            },
        );
        assert_eq!(
            u32::from_le_bytes(b),
            0b0101,
            "pending bits are live, not stored"
        );
        // a read that only partly covers the pending register
        let mut b = [0u8; 2];
        c.read(
            pending - 1,
            &mut b,
            Dynamic {
                intx: false,
                msi_pending: 0x0105,
            },
        );
        assert_eq!(
            b,
            [0x00, 0x05],
            "top byte of the mask, then live pending bits"
        );
    }

    #[test]
    fn msi_32bit_without_masking() {
        let mut l = layout();
        l.msi = Some(MsiSpec {
            vectors: 1,
            address64: false,
            per_vector_mask: false,
        });
        let mut c = ConfigSpace::new(&l);
        let msi = c.caps().msi.unwrap();
        assert_eq!((msi.mask, msi.pending, msi.size), (None, None, 12));
        assert_eq!(
            c.get16(msi.offset + MSI_FLAGS),
            0,
            "1 vector, 32-bit, no mask"
        );
        // the next capability follows the 10-byte MSI capability, aligned
        assert_eq!(usize::from(c.get8(msi.offset + 1)), msi.offset + 12);
        w32(&mut c, msi.offset + MSI_ADDRESS_LO, 0xfee0_100c);
        assert_eq!(c.get32(msi.offset + MSI_ADDRESS_LO), 0xfee0_100c);
        // data is at 0x08 for a 32-bit capability; 0x0a..0x0c is padding
        w32(&mut c, msi.offset + 8, 0xffff_ffff);
        assert_eq!(c.get32(msi.offset + 8), 0xffff);
        let mut b = [0u8; 4];
        c.read(
            msi.offset + 8,
            &mut b,
            Dynamic {
                intx: false,
                msi_pending: !0,
            },
        );
        assert_eq!(
            u32::from_le_bytes(b),
            0xffff,
            "no pending register to overlay"
        );
    }

    #[test]
    fn msix_capability_registers() {
        let mut c = ConfigSpace::new(&layout());
        let x = c.caps().msix.unwrap();
        assert_eq!(c.get16(x + MSIX_FLAGS), 7);
        assert_eq!(c.get32(x + MSIX_TABLE), 0x800);
        assert_eq!(c.get32(x + MSIX_PBA), 0xc00);
        let fx = c.write(x + MSIX_FLAGS + 1, &[0xff]);
        assert!(fx.msix);
        assert_eq!(c.get16(x + MSIX_FLAGS), 0xc007);
        let fx = w32(&mut c, x + MSIX_TABLE, 0);
        assert!(!fx.msix);
        assert_eq!(c.get32(x + MSIX_TABLE), 0x800);
    }

    #[test]
    fn pcie_capability_and_flr_bit() {
        let mut c = ConfigSpace::new(&layout());
        let e = c.caps().pcie.unwrap();
        assert_eq!(c.get16(e + EXP_FLAGS), 0x0002, "v2 endpoint");
        let devcap = c.get32(e + EXP_DEVCAP);
        assert_ne!(devcap & EXP_DEVCAP_FLR, 0);
        assert_ne!(devcap & EXP_DEVCAP_RBER, 0);
        assert_eq!(c.get16(e + EXP_LNKSTA), 0x0011, "x1 at 2.5 GT/s");
        let fx = c.write(e + EXP_DEVCTL, &0x8000u16.to_le_bytes());
        assert!(fx.flr);
        assert_eq!(
            c.get16(e + EXP_DEVCTL) & EXP_DEVCTL_BCR_FLR,
            0,
            "FLR reads 0"
        );
        // a write of the low byte only does not initiate FLR
        let fx = c.write(e + EXP_DEVCTL, &[0xff]);
        assert!(!fx.flr);
        // devsta is RW1C
        c.data[e + EXP_DEVSTA] = 0x05;
        c.write(e + EXP_DEVSTA, &[0x04, 0]);
        assert_eq!(c.get8(e + EXP_DEVSTA), 0x01);
        // without reset support, no FLR is advertised
        let mut l = layout();
        l.reset = false;
        let c = ConfigSpace::new(&l);
        assert_eq!(c.get32(e + EXP_DEVCAP) & EXP_DEVCAP_FLR, 0);
    }

    #[test]
    fn extended_space_reads_zero_and_ignores_writes() {
        let mut c = ConfigSpace::new(&layout());
        c.write(0x100, &[0xff; 0xf00]);
        let mut b = vec![0xaau8; 0xf00];
        c.read(0x100, &mut b, Dynamic::default());
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn check_bounds() {
        assert_eq!(check(0, 4096).unwrap(), 0);
        assert_eq!(check(4095, 1).unwrap(), 4095);
        assert!(check(4095, 2).is_err());
        assert!(check(4096, 0).is_ok());
        assert!(check(4097, 0).is_err());
        assert!(check(u64::MAX, 1).is_err());
    }

    #[test]
    fn load_image_refuses_foreign_read_only_bits() {
        let mut c = ConfigSpace::new(&layout());
        w32(&mut c, BAR0, 0xfebf_0000);
        let saved = c.image().to_vec();
        let mut other = ConfigSpace::new(&layout());
        other.load_image(&saved).unwrap();
        assert_eq!(other.get32(BAR0), 0xfebf_0000);
        let mut bad = saved.clone();
        bad[DEVICE_ID] ^= 1;
        assert!(other.load_image(&bad).is_err());
        assert!(other.load_image(&saved[..100]).is_err());
        let mut bad = saved.clone();
        bad[other.caps().pm + PM_CTRL] = 1; // D1
        assert!(other.load_image(&bad).is_err());
        other.reset();
        assert_eq!(other.get32(BAR0), 0);
    }
}
