//! The NVMe controller as a PCI function.
//!
//! Identity: vendor 0x1234, device 0x4e56 ("NV"), class 0x010802 (NVM
//! Express I/O controller), so the guest's `nvme` driver binds by class.
//!
//! BAR0 (64-bit memory, 32 KiB):
//!
//! | Offset | Size  | What |
//! |--------|-------|------|
//! | 0x0000 | 4 KiB | controller registers (trapped) |
//! | 0x1000 | 4 KiB | doorbells: trapped, or (mmap doorbells) a sparse-mmap area backed by a sealed memfd |
//! | 0x2000 | up to 8 KiB | MSI-X table (one vector per completion queue), served by the PCI core |
//! | 0x4000 | up to 64 B | MSI-X PBA, served by the PCI core |
//!
//! Interrupts: MSI-X (vector = the CQ's interrupt vector), INTA# when MSI-X
//! is off (level: asserted while a CQ holds unconsumed entries). No MSI, as
//! with QEMU's own NVMe device. A PCI Express endpoint capability with
//! Function Level Reset.

use std::sync::Arc;

use super::ctrl::{BAR0_REGS_SIZE, DoorbellMode, InterruptSink, NvmeConfig, NvmeController};
use super::queue::DOORBELL_FILE_OFFSET;
use super::spec::reg;
use crate::Error;
use crate::block::BlockBackend;
use crate::device::{MmapArea, RegionMmap};
use crate::dma::{DmaRange, DmaSpace};
use crate::pci::regs::COMMAND_MASTER;
use crate::pci::{Bar, Interrupts, IrqMode, MsixSpec, PciDevice, PciFunction, PciIds, PciLayout};

/// PCI vendor ID (QEMU's test-device vendor, as the sample device uses).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID ("NV").
pub const DEVICE_ID: u16 = 0x4e56;
/// Class code: mass storage, non-volatile memory, NVM Express.
pub const CLASS_CODE: u32 = 0x01_08_02;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x8000;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE: u32 = 0x2000;
/// Offset of the MSI-X PBA in BAR0.
pub const MSIX_PBA: u32 = 0x4000;

/// The NVMe controller served as a PCI device.
pub type NvmeDevice = PciDevice<NvmeFunction>;

/// Interrupts through the PCI core.
struct PciIrq(Arc<Interrupts>);

impl InterruptSink for PciIrq {
    fn signal(&self, vector: u16) {
        self.0.raise(vector);
    }
    fn msix_enabled(&self) -> bool {
        self.0.mode() == IrqMode::Msix
    }
    fn set_intx(&self, asserted: bool) {
        if self.0.mode() == IrqMode::Intx {
            self.0.set_intx(asserted);
        } else if !asserted {
            self.0.set_intx(false);
        }
    }
}

/// The PCI function around an [`NvmeController`].
pub struct NvmeFunction {
    ctrl: NvmeController,
    irq: Arc<Interrupts>,
}

impl std::fmt::Debug for NvmeFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeFunction")
            .field("ctrl", &self.ctrl)
            .finish()
    }
}

fn layout(cfg: &NvmeConfig) -> PciLayout {
    let mut l = PciLayout::new(PciIds {
        vendor_id: cfg.vendor_id,
        device_id: DEVICE_ID,
        subsystem_vendor_id: cfg.subsystem_vendor_id,
        subsystem_id: 0x0001,
        revision: 0,
        class_code: CLASS_CODE,
    });
    l.bars[0] = Some(Bar::memory64(BAR0_SIZE));
    l.msix = Some(MsixSpec {
        vectors: cfg.msix_vectors(),
        bar: 0,
        table_offset: MSIX_TABLE,
        pba_offset: MSIX_PBA,
    });
    l
}

impl NvmeFunction {
    /// Build the PCI device: layout, interrupts, and the controller with
    /// its threads.
    pub fn create(
        cfg: NvmeConfig,
        backend: Arc<dyn BlockBackend>,
        dma: Arc<DmaSpace>,
    ) -> Result<NvmeDevice, Error> {
        let l = layout(&cfg);
        PciDevice::new(l, |irq| {
            let sink = Arc::new(PciIrq(irq.clone()));
            let ctrl = NvmeController::new(cfg, backend, dma, sink)?;
            // Power-on: bus mastering is off until the guest sets it.
            ctrl.set_bus_master(false);
            Ok(NvmeFunction { ctrl, irq })
        })
    }

    /// The controller.
    pub fn controller(&self) -> &NvmeController {
        &self.ctrl
    }
}

impl PciFunction for NvmeFunction {
    fn name(&self) -> &str {
        "nvme"
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        if bar == 0 && offset < BAR0_REGS_SIZE {
            self.ctrl.bar0_read(offset, data);
        } else {
            data.fill(0);
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
        if bar == 0 && offset < BAR0_REGS_SIZE {
            self.ctrl.bar0_write(offset, data);
        }
        Ok(())
    }

    fn bar_mmap(&self, bar: u8) -> Option<RegionMmap> {
        if bar != 0 || self.ctrl.config().doorbells != DoorbellMode::Mmap {
            return None;
        }
        Some(RegionMmap {
            fd: self.ctrl.doorbell_fd()?,
            offset: 0,
            areas: vec![MmapArea {
                offset: reg::DOORBELLS,
                size: DOORBELL_FILE_OFFSET,
            }],
        })
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.ctrl.reset();
        self.irq.set_intx(false);
        Ok(())
    }

    fn command_changed(&mut self, command: u16) {
        self.ctrl.set_bus_master(command & COMMAND_MASTER != 0);
    }

    fn dma_unmap(&mut self, _range: &DmaRange) {
        // The controller's threads hold a view of guest memory only while
        // they process a batch of commands and keep no host pointers
        // between batches: the unmap's wait for views is all it takes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;
    use crate::block::MemBackend;
    use crate::pci::CONFIG_REGION;

    #[test]
    fn config_space_bars_and_mmap_areas() {
        let backend = Arc::new(MemBackend::new(1 << 20, 512).unwrap());
        let cfg = NvmeConfig {
            doorbells: DoorbellMode::Mmap,
            ..NvmeConfig::default()
        };
        let dma = Arc::new(DmaSpace::default());
        let mut dev = NvmeFunction::create(cfg, backend.clone(), dma.clone()).unwrap();
        let mut id = [0u8; 12];
        dev.region_read(CONFIG_REGION, 0, &mut id).unwrap();
        assert_eq!(id[0..4], [0x34, 0x12, 0x56, 0x4e]);
        assert_eq!(id[9..12], [0x02, 0x08, 0x01], "class 010802");
        let info = dev.region_info(0).unwrap();
        assert_eq!(info.size, BAR0_SIZE);
        let mmap = info.mmap.expect("doorbell page is mappable");
        assert_eq!(mmap.offset, 0);
        assert_eq!(
            mmap.areas,
            vec![MmapArea {
                offset: 0x1000,
                size: 0x1000
            }]
        );
        // registers through the region
        let mut vs = [0u8; 4];
        dev.region_read(0, reg::VS, &mut vs).unwrap();
        assert_eq!(u32::from_le_bytes(vs), 0x0001_0400);
        // MSI-X: one vector per queue pair plus admin
        let irq = dev.irq_info(crate::pci::MSIX_IRQ).unwrap();
        assert_eq!(irq.count, 5);

        let trap = NvmeFunction::create(NvmeConfig::default(), backend, dma).unwrap();
        assert!(trap.region_info(0).unwrap().mmap.is_none());
    }
}
