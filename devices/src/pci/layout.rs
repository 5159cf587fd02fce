//! What a PCI function looks like from the outside: identity, BARs, ROM and
//! the capabilities the core builds for it.
//!
//! A [`PciLayout`] is plain data. [`PciLayout::validate`] checks it once,
//! when the [`super::PciDevice`] is built; after that the core relies on it.

use crate::Error;

/// PCI identity of a function (the read-only part of the type-0 header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID (offset 0x00).
    pub vendor_id: u16,
    /// Device ID (offset 0x02).
    pub device_id: u16,
    /// Subsystem vendor ID (offset 0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (offset 0x2e).
    pub subsystem_id: u16,
    /// Revision ID (offset 0x08).
    pub revision: u8,
    /// Class code, 24 bits: base class << 16 | sub-class << 8 | programming
    /// interface (offsets 0x0b, 0x0a, 0x09).
    pub class_code: u32,
}

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR; it also takes the next BAR slot (the upper half).
    Memory64,
    /// I/O space BAR (at most 256 bytes).
    Io,
}

/// One base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Memory (32/64-bit) or I/O.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O.
    pub size: u64,
    /// Prefetchable memory (ignored for I/O BARs).
    pub prefetchable: bool,
}

impl Bar {
    /// A non-prefetchable 32-bit memory BAR.
    pub const fn memory32(size: u64) -> Bar {
        Bar {
            kind: BarKind::Memory32,
            size,
            prefetchable: false,
        }
    }

    /// A non-prefetchable 64-bit memory BAR.
    pub const fn memory64(size: u64) -> Bar {
        Bar {
            kind: BarKind::Memory64,
            size,
            prefetchable: false,
        }
    }

    /// An I/O BAR.
    pub const fn io(size: u64) -> Bar {
        Bar {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }

    /// The same BAR, marked prefetchable.
    pub const fn prefetchable(self) -> Bar {
        Bar {
            prefetchable: true,
            ..self
        }
    }

    /// Whether this is a memory BAR.
    pub fn is_memory(&self) -> bool {
        !matches!(self.kind, BarKind::Io)
    }
}

/// The power management capability (always present: PCI Express requires
/// it). Only D0 and D3hot are supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmSpec {
    /// PMCSR.No_Soft_Reset: a D3hot to D0 transition keeps the function's
    /// state. When false, that transition resets the function like an FLR.
    pub no_soft_reset: bool,
}

impl Default for PmSpec {
    fn default() -> Self {
        PmSpec {
            no_soft_reset: true,
        }
    }
}

/// The MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiSpec {
    /// Vectors the function can use: 1, 2, 4, 8, 16 or 32.
    pub vectors: u8,
    /// 64-bit message address.
    pub address64: bool,
    /// Per-vector masking (mask and pending registers).
    pub per_vector_mask: bool,
}

/// The MSI-X capability; the table and PBA live in one of the function's
/// memory BARs and are handled by the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixSpec {
    /// Table size, 1..=2048.
    pub vectors: u16,
    /// BAR (0..=5) that holds both the table and the PBA.
    pub bar: u8,
    /// Offset of the table in the BAR (8-byte aligned).
    pub table_offset: u32,
    /// Offset of the pending bit array in the BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixSpec {
    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * 16
    }

    /// Size of the PBA in bytes (whole QWORDs).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// The PCI Express capability (version 2, endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieSpec {
    /// DevCap Max_Payload_Size_Supported encoding: 0 = 128 bytes ... 5 = 4096.
    pub max_payload: u8,
    /// Link speed encoding for LnkCap/LnkSta: 1 = 2.5 GT/s ... 5 = 32 GT/s.
    pub link_speed: u8,
    /// Link width (1, 2, 4, 8, 16, 32).
    pub link_width: u8,
}

impl Default for PcieSpec {
    /// What QEMU's emulated endpoints report: 128-byte payloads, x1 at 2.5 GT/s.
    fn default() -> Self {
        PcieSpec {
            max_payload: 0,
            link_speed: 1,
            link_width: 1,
        }
    }
}

/// A vendor-specific capability (ID 0x09), e.g. virtio's structure
/// descriptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorCapability {
    /// The capability's bytes after its 3-byte header (ID, next pointer and
    /// the length byte, which the core fills in).
    pub data: Vec<u8>,
    /// Bits the guest may write, byte for byte with `data` (shorter: the
    /// rest is read-only). Writes are reported through
    /// [`super::PciFunction::vendor_capability_written`].
    pub writable: Vec<u8>,
}

/// Everything the core needs to present a PCI function.
#[derive(Clone, Debug)]
pub struct PciLayout {
    /// Identity.
    pub ids: PciIds,
    /// BAR0..BAR5. A 64-bit BAR at `i` needs `bars[i + 1]` to be `None`.
    pub bars: [Option<Bar>; 6],
    /// Expansion ROM contents (region 6); `None` means no ROM.
    pub rom: Option<Vec<u8>>,
    /// Interrupt pin: 0 = none, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
    /// Power management capability.
    pub pm: PmSpec,
    /// MSI capability.
    pub msi: Option<MsiSpec>,
    /// MSI-X capability.
    pub msix: Option<MsixSpec>,
    /// PCI Express capability (also enables the ERR interrupt index).
    pub pcie: Option<PcieSpec>,
    /// Vendor-specific capabilities, in chain order after the standard ones.
    pub vendor_capabilities: Vec<VendorCapability>,
    /// The function implements [`super::PciFunction::reset`]: the device
    /// reports reset support to the client and advertises Function Level
    /// Reset in its PCI Express capability.
    pub reset: bool,
}

impl PciLayout {
    /// A layout with the given identity, no BARs, INTA#, power management,
    /// a PCI Express endpoint capability and reset support.
    pub fn new(ids: PciIds) -> PciLayout {
        PciLayout {
            ids,
            bars: [None; 6],
            rom: None,
            interrupt_pin: 1,
            pm: PmSpec::default(),
            msi: None,
            msix: None,
            pcie: Some(PcieSpec::default()),
            vendor_capabilities: Vec::new(),
            reset: true,
        }
    }

    /// Size of the ROM BAR (a power of two, at least 2 KiB), 0 without ROM.
    pub fn rom_size(&self) -> u64 {
        match &self.rom {
            Some(rom) => (rom.len() as u64).max(2048).next_power_of_two(),
            None => 0,
        }
    }

    /// Size of region `bar` (0..=5): 0 for an absent BAR or the upper half
    /// of a 64-bit BAR.
    pub fn bar_size(&self, bar: u8) -> u64 {
        self.bars
            .get(usize::from(bar))
            .copied()
            .flatten()
            .map_or(0, |b| b.size)
    }

    /// Check that the layout is one the core can present.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.ids.class_code > 0xff_ffff {
            return bad(format!(
                "class code {:#x} is wider than 24 bits",
                self.ids.class_code
            ));
        }
        for (i, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let size = bar.size;
            if !size.is_power_of_two() {
                return bad(format!("BAR{i} size {size:#x} is not a power of two"));
            }
            match bar.kind {
                BarKind::Io if !(4..=256).contains(&size) => {
                    return bad(format!("I/O BAR{i} size {size:#x} is not in 4..=256"));
                }
                BarKind::Io if bar.prefetchable => {
                    return bad(format!("I/O BAR{i} cannot be prefetchable"));
                }
                BarKind::Memory32 if !(16..=1 << 31).contains(&size) => {
                    return bad(format!("32-bit BAR{i} size {size:#x} is not in 16..=2 GiB"));
                }
                BarKind::Memory64 => {
                    if !(16..=1 << 62).contains(&size) {
                        return bad(format!("64-bit BAR{i} size {size:#x} is out of range"));
                    }
                    match self.bars.get(i + 1) {
                        None => {
                            return bad(format!("64-bit BAR{i} has no room for its upper half"));
                        }
                        Some(Some(_)) => {
                            return bad(format!(
                                "BAR{} is the upper half of 64-bit BAR{i} and must be None",
                                i + 1
                            ));
                        }
                        Some(None) => {}
                    }
                }
                _ => {}
            }
            if i > 0
                && matches!(
                    self.bars[i - 1],
                    Some(Bar {
                        kind: BarKind::Memory64,
                        ..
                    })
                )
            {
                return bad(format!("BAR{i} overlaps the upper half of BAR{}", i - 1));
            }
        }
        if let Some(rom) = &self.rom {
            if rom.is_empty() || rom.len() > 16 << 20 {
                return bad(format!("ROM of {} bytes (1 byte .. 16 MiB)", rom.len()));
            }
        }
        if !self.reset && !self.pm.no_soft_reset {
            return bad(
                "a function without reset must set No_Soft_Reset (D3hot to D0 resets otherwise)"
                    .into(),
            );
        }
        if self.interrupt_pin > 4 {
            return bad(format!("interrupt pin {} (0..=4)", self.interrupt_pin));
        }
        if let Some(msi) = &self.msi {
            if !msi.vectors.is_power_of_two() || msi.vectors > 32 {
                return bad(format!("MSI vector count {}", msi.vectors));
            }
        }
        if let Some(msix) = &self.msix {
            self.validate_msix(msix)?;
        }
        if let Some(pcie) = &self.pcie {
            if pcie.max_payload > 5 || !(1..=6).contains(&pcie.link_speed) {
                return bad("PCI Express payload or link speed encoding".into());
            }
            if !pcie.link_width.is_power_of_two() || pcie.link_width > 32 {
                return bad(format!("PCI Express link width x{}", pcie.link_width));
            }
        }
        for (i, cap) in self.vendor_capabilities.iter().enumerate() {
            if cap.writable.len() > cap.data.len() {
                return bad(format!(
                    "vendor capability {i}: write mask longer than data"
                ));
            }
        }
        // The capability list must fit in the 192 bytes after the header.
        let total = super::config::capabilities_size(self);
        if total > super::config::CAP_SPACE {
            return bad(format!(
                "capabilities need {total} bytes, only {} fit",
                super::config::CAP_SPACE
            ));
        }
        Ok(())
    }

    fn validate_msix(&self, msix: &MsixSpec) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if !(1..=2048).contains(&msix.vectors) {
            return bad(format!("MSI-X table size {}", msix.vectors));
        }
        let Some(bar) = self.bars.get(usize::from(msix.bar)).copied().flatten() else {
            return bad(format!("MSI-X BAR{} does not exist", msix.bar));
        };
        if !bar.is_memory() {
            return bad(format!("MSI-X BAR{} is not a memory BAR", msix.bar));
        }
        if msix.table_offset % 8 != 0 || msix.pba_offset % 8 != 0 {
            return bad("MSI-X table and PBA offsets must be 8-byte aligned".into());
        }
        let t0 = u64::from(msix.table_offset);
        let t1 = t0 + msix.table_size();
        let p0 = u64::from(msix.pba_offset);
        let p1 = p0 + msix.pba_size();
        if t1 > bar.size || p1 > bar.size {
            return bad(format!(
                "MSI-X table {t0:#x}..{t1:#x} or PBA {p0:#x}..{p1:#x} outside BAR{} ({:#x} bytes)",
                msix.bar, bar.size
            ));
        }
        if t0 < p1 && p0 < t1 {
            return bad("MSI-X table and PBA overlap".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1234,
            device_id: 0x5678,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class_code: 0xff0000,
        }
    }

    fn invalid(l: &PciLayout) -> bool {
        matches!(l.validate(), Err(Error::InvalidArgument(_)))
    }

    #[test]
    fn bar_layout_rules() {
        let mut l = PciLayout::new(ids());
        l.bars[0] = Some(Bar::memory32(0x1000));
        l.bars[2] = Some(Bar::memory64(1 << 33).prefetchable());
        l.bars[4] = Some(Bar::io(0x20));
        l.validate().unwrap();

        l.bars[3] = Some(Bar::memory32(0x1000));
        assert!(invalid(&l), "upper half of a 64-bit BAR used");
        l.bars[3] = None;
        l.bars[5] = Some(Bar::memory64(0x1000));
        assert!(invalid(&l), "64-bit BAR in the last slot");
        l.bars[5] = Some(Bar::memory32(0x1800));
        assert!(invalid(&l), "size not a power of two");
        l.bars[5] = Some(Bar::io(0x200));
        assert!(invalid(&l), "I/O BAR too big");
        l.bars[5] = Some(Bar::io(0x10).prefetchable());
        assert!(invalid(&l), "prefetchable I/O BAR");
        l.bars[5] = Some(Bar::memory32(8));
        assert!(invalid(&l), "memory BAR too small");
        l.bars[5] = None;
        l.validate().unwrap();
    }

    #[test]
    fn msix_layout_rules() {
        let mut l = PciLayout::new(ids());
        l.bars[0] = Some(Bar::memory32(0x1000));
        l.bars[1] = Some(Bar::io(0x10));
        let ok = MsixSpec {
            vectors: 64,
            bar: 0,
            table_offset: 0x800,
            pba_offset: 0xc00,
        };
        l.msix = Some(ok);
        l.validate().unwrap();
        for bad in [
            MsixSpec { vectors: 0, ..ok },
            MsixSpec {
                vectors: 2049,
                ..ok
            },
            MsixSpec { bar: 2, ..ok },
            MsixSpec { bar: 1, ..ok },
            MsixSpec {
                table_offset: 0x804,
                ..ok
            },
            MsixSpec {
                table_offset: 0xc00,
                pba_offset: 0x800,
                vectors: 65,
                ..ok
            },
            MsixSpec {
                pba_offset: 0xff8,
                vectors: 65,
                ..ok
            },
            MsixSpec {
                pba_offset: 0x900,
                ..ok
            },
        ] {
            l.msix = Some(bad);
            assert!(invalid(&l), "{bad:?} accepted");
        }
    }

    #[test]
    fn other_rules() {
        let mut l = PciLayout::new(ids());
        l.interrupt_pin = 5;
        assert!(invalid(&l));
        l.interrupt_pin = 0;
        l.msi = Some(MsiSpec {
            vectors: 3,
            address64: true,
            per_vector_mask: true,
        });
        assert!(invalid(&l));
        l.msi = None;
        l.rom = Some(Vec::new());
        assert!(invalid(&l));
        l.rom = Some(vec![0x55, 0xaa]);
        assert_eq!(l.rom_size(), 2048);
        l.ids.class_code = 0x100_0000;
        assert!(invalid(&l));
        l.ids.class_code = 0x01_0802;
        l.vendor_capabilities.push(VendorCapability {
            data: vec![0; 200],
            writable: Vec::new(),
        });
        assert!(invalid(&l), "capabilities overflow the standard space");
        l.vendor_capabilities[0].data.truncate(13);
        l.validate().unwrap();
        l.reset = false;
        l.validate().unwrap();
        l.pm.no_soft_reset = false;
        assert!(
            invalid(&l),
            "soft reset promised by a function that cannot reset"
        );
    }
}
