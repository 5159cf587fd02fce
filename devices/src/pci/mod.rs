//! The PCI core shared by every device vdevd serves.
//!
//! A device model implements [`PciFunction`]: its identity and BAR layout
//! (a [`PciLayout`]), BAR register reads and writes, and optionally mmap
//! areas, ioeventfds, reset, DMA map notifications and migration.
//! [`PciDevice`] wraps it into a [`crate::Device`] and does the rest, as a
//! real PCI Express function's hardware would:
//!
//! * **Config space** (region 7, 4 KiB): type-0 header with read-only,
//!   read-write and write-1-to-clear bits, BAR sizing and programming,
//!   command/status, expansion ROM BAR, interrupt line/pin; a capability
//!   list of power management (D0/D3hot), MSI, MSI-X, a PCI Express v2
//!   endpoint capability (with Function Level Reset when the function can
//!   reset) and vendor-specific capabilities; an empty, properly terminated
//!   extended list at 0x100. Accesses of any size and alignment work.
//!   See [`config`] for how a passthrough backend can reuse it
//!   with real hardware underneath.
//! * **BARs** (regions 0..=5): bounds-checked, forwarded to the function,
//!   except the MSI-X table and PBA, which the core serves. mmap areas the
//!   function offers are reported without the MSI-X pages.
//! * **ROM** (region 6): read-only, served from the layout's image.
//! * **Interrupts** (indexes INTx, MSI, MSI-X, ERR, REQ): SET_IRQS with
//!   Linux vfio-pci's semantics, and delivery from any thread through the
//!   [`Interrupts`] handle the function receives when it is built; see
//!   [`irq`] for the rules.
//! * **Migration**: config space and interrupt state are saved around the
//!   function's own state, in a versioned format that is validated on load.
//!
//! # Writing a function
//!
//! ```
//! use std::sync::Arc;
//! use vdevd_devices::pci::{
//!     Bar, CONFIG_REGION, Interrupts, MsixSpec, PciDevice, PciFunction, PciIds, PciLayout,
//! };
//! use vdevd_devices::{Device, Error};
//!
//! /// One 32-bit scratch register at BAR0+0; a write to BAR0+4 raises
//! /// interrupt 0.
//! struct Scratch {
//!     value: u32,
//!     irq: Arc<Interrupts>,
//! }
//!
//! impl PciFunction for Scratch {
//!     fn name(&self) -> &str {
//!         "scratch"
//!     }
//!
//!     fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
//!         // The core checked that the access is inside the BAR; bytes
//!         // without a register read as zero.
//!         let regs = self.value.to_le_bytes();
//!         for (i, b) in data.iter_mut().enumerate() {
//!             let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
//!             *b = at.and_then(|at| regs.get(at)).copied().unwrap_or(0);
//!         }
//!         Ok(())
//!     }
//!
//!     fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
//!         match (offset, data) {
//!             (0, &[a, b, c, d]) => self.value = u32::from_le_bytes([a, b, c, d]),
//!             (4, _) => {
//!                 // MSI-X or MSI if the guest enabled it, INTx otherwise.
//!                 self.irq.raise(0);
//!             }
//!             _ => {} // like hardware, ignore writes to nothing
//!         }
//!         Ok(())
//!     }
//!
//!     fn reset(&mut self) -> Result<(), Error> {
//!         self.value = 0;
//!         self.irq.set_intx(false);
//!         Ok(())
//!     }
//! }
//!
//! let mut layout = PciLayout::new(PciIds {
//!     vendor_id: 0x1234,
//!     device_id: 0x0001,
//!     subsystem_vendor_id: 0x1234,
//!     subsystem_id: 0x0001,
//!     revision: 0,
//!     class_code: 0xff_00_00, // unassigned class: no driver binds
//! });
//! layout.bars[0] = Some(Bar::memory32(0x1000));
//! layout.msix = Some(MsixSpec { vectors: 2, bar: 0, table_offset: 0x800, pba_offset: 0xc00 });
//! let mut dev = PciDevice::new(layout, |irq| Ok(Scratch { value: 0, irq }))?;
//!
//! dev.region_write(0, 0, &7u32.to_le_bytes())?;
//! let mut v = [0u8; 4];
//! dev.region_read(0, 0, &mut v)?;
//! assert_eq!(u32::from_le_bytes(v), 7);
//! dev.region_read(CONFIG_REGION, 0, &mut v)?; // vendor and device ID
//! assert_eq!(v, [0x34, 0x12, 0x01, 0x00]);
//!
//! let served: Box<dyn Device> = Box::new(dev); // what the server takes
//! # drop(served);
//! # Ok::<(), Error>(())
//! ```
//!
//! A function that does background work (a DMA engine, queue processing)
//! runs it on its own threads, reaching client memory through
//! [`crate::dma::DmaSpace`] and raising interrupts through its
//! [`Interrupts`] handle; the `sample` device is the worked example.

pub mod config;
mod function;
pub mod irq;
mod layout;
pub mod regs;
pub mod snapshot;

#[cfg(test)]
pub(crate) mod tests;

pub use function::{PciDevice, PciFunction};
pub use irq::{Delivery, Interrupts, IrqMode};
pub use layout::{
    Bar, BarKind, MsiSpec, MsixSpec, PciIds, PciLayout, PcieSpec, PmSpec, VendorCapability,
};

// VFIO's PCI region and interrupt indexes, under the short names device
// code uses. The values live in one place: the protocol crate.
use vdevd_protocol::vfio;

/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = vfio::VFIO_PCI_ROM_REGION_INDEX;
/// Region index of config space.
pub const CONFIG_REGION: u32 = vfio::VFIO_PCI_CONFIG_REGION_INDEX;
/// Region index of the (never present) VGA region.
pub const VGA_REGION: u32 = vfio::VFIO_PCI_VGA_REGION_INDEX;
/// Number of regions of a PCI device.
pub const NUM_REGIONS: u32 = vfio::VFIO_PCI_NUM_REGIONS;

/// Interrupt index of INTx.
pub const INTX_IRQ: u32 = vfio::VFIO_PCI_INTX_IRQ_INDEX;
/// Interrupt index of MSI.
pub const MSI_IRQ: u32 = vfio::VFIO_PCI_MSI_IRQ_INDEX;
/// Interrupt index of MSI-X.
pub const MSIX_IRQ: u32 = vfio::VFIO_PCI_MSIX_IRQ_INDEX;
/// Interrupt index of error reporting (PCI Express functions only).
pub const ERR_IRQ: u32 = vfio::VFIO_PCI_ERR_IRQ_INDEX;
/// Interrupt index of device release requests.
pub const REQ_IRQ: u32 = vfio::VFIO_PCI_REQ_IRQ_INDEX;
/// Number of interrupt indexes of a PCI device.
pub const NUM_IRQS: u32 = vfio::VFIO_PCI_NUM_IRQS;
