//! PCI configuration space register offsets and bits (PCI Local Bus 3.0,
//! PCI Power Management 1.2, PCI Express Base 4.0), for device models,
//! tests and the passthrough backend.

/// Size of the (extended) configuration space of a PCI Express function.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// First byte after the type-0 header.
pub const HEADER_SIZE: usize = 0x40;
/// Start of the extended capability list.
pub const EXT_CAP_START: usize = 0x100;

/// Vendor ID (16 bits).
pub const VENDOR_ID: usize = 0x00;
/// Device ID (16 bits).
pub const DEVICE_ID: usize = 0x02;
/// Command register (16 bits).
pub const COMMAND: usize = 0x04;
/// Status register (16 bits).
pub const STATUS: usize = 0x06;
/// Revision ID (8 bits).
pub const REVISION_ID: usize = 0x08;
/// Class code: programming interface (8 bits), sub-class, base class.
pub const CLASS_PROG: usize = 0x09;
/// Cache line size (8 bits).
pub const CACHE_LINE_SIZE: usize = 0x0c;
/// Latency timer (8 bits; read-only zero on PCI Express).
pub const LATENCY_TIMER: usize = 0x0d;
/// Header type (8 bits).
pub const HEADER_TYPE: usize = 0x0e;
/// BIST (8 bits).
pub const BIST: usize = 0x0f;
/// BAR0; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID (16 bits).
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// Subsystem ID (16 bits).
pub const SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM base address (32 bits).
pub const ROM_ADDRESS: usize = 0x30;
/// Capabilities pointer (8 bits).
pub const CAPABILITY_LIST: usize = 0x34;
/// Interrupt line (8 bits, read-write scratch for software).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin (8 bits).
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command: I/O space enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command: memory space enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
pub const COMMAND_MASTER: u16 = 1 << 2;
/// Command: parity error response.
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command: SERR# enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Status: INTx asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status bits that are write-1-to-clear (error reporting).
pub const STATUS_W1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);

/// BAR: I/O space indicator.
pub const BAR_IO: u32 = 1 << 0;
/// BAR: 64-bit memory type.
pub const BAR_MEM_64: u32 = 0b10 << 1;
/// BAR: prefetchable memory.
pub const BAR_PREFETCH: u32 = 1 << 3;
/// ROM BAR: address decode enable.
pub const ROM_ENABLE: u32 = 1;

/// Capability ID: power management.
pub const CAP_ID_PM: u8 = 0x01;
/// Capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID: vendor-specific.
pub const CAP_ID_VENDOR: u8 = 0x09;
/// Capability ID: PCI Express.
pub const CAP_ID_EXP: u8 = 0x10;
/// Capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

/// PM: capabilities register (offset in the capability).
pub const PM_PMC: usize = 2;
/// PM: control/status register.
pub const PM_CTRL: usize = 4;
/// PMCSR power state field.
pub const PM_CTRL_STATE_MASK: u16 = 0b11;
/// PMCSR: D3hot to D0 keeps the function's state.
pub const PM_CTRL_NO_SOFT_RESET: u16 = 1 << 3;
/// Power state D0.
pub const PM_D0: u16 = 0;
/// Power state D3hot.
pub const PM_D3HOT: u16 = 3;

/// MSI: message control (offset in the capability).
pub const MSI_FLAGS: usize = 2;
/// MSI: message address (low 32 bits).
pub const MSI_ADDRESS_LO: usize = 4;
/// MSI control: enable.
pub const MSI_FLAGS_ENABLE: u16 = 1 << 0;
/// MSI control: multiple message capable (log2, bits 3:1).
pub const MSI_FLAGS_QMASK: u16 = 0b111 << 1;
/// MSI control: multiple message enable (log2, bits 6:4).
pub const MSI_FLAGS_QSIZE: u16 = 0b111 << 4;
/// MSI control: 64-bit address capable.
pub const MSI_FLAGS_64BIT: u16 = 1 << 7;
/// MSI control: per-vector masking capable.
pub const MSI_FLAGS_MASKBIT: u16 = 1 << 8;

/// MSI-X: message control (offset in the capability).
pub const MSIX_FLAGS: usize = 2;
/// MSI-X: table offset and BIR.
pub const MSIX_TABLE: usize = 4;
/// MSI-X: PBA offset and BIR.
pub const MSIX_PBA: usize = 8;
/// MSI-X control: table size minus one.
pub const MSIX_FLAGS_QSIZE: u16 = 0x7ff;
/// MSI-X control: function mask.
pub const MSIX_FLAGS_MASKALL: u16 = 1 << 14;
/// MSI-X control: enable.
pub const MSIX_FLAGS_ENABLE: u16 = 1 << 15;
/// MSI-X table entry: vector control offset.
pub const MSIX_ENTRY_VECTOR_CTRL: usize = 12;
/// MSI-X vector control: masked.
pub const MSIX_ENTRY_CTRL_MASKBIT: u32 = 1;

/// PCIe: capabilities register (offset in the capability).
pub const EXP_FLAGS: usize = 0x02;
/// PCIe: device capabilities.
pub const EXP_DEVCAP: usize = 0x04;
/// PCIe: device control.
pub const EXP_DEVCTL: usize = 0x08;
/// PCIe: device status.
pub const EXP_DEVSTA: usize = 0x0a;
/// PCIe: link capabilities.
pub const EXP_LNKCAP: usize = 0x0c;
/// PCIe: link control.
pub const EXP_LNKCTL: usize = 0x10;
/// PCIe: link status.
pub const EXP_LNKSTA: usize = 0x12;
/// PCIe: device capabilities 2.
pub const EXP_DEVCAP2: usize = 0x24;
/// PCIe: device control 2.
pub const EXP_DEVCTL2: usize = 0x28;
/// PCIe: link capabilities 2.
pub const EXP_LNKCAP2: usize = 0x2c;
/// PCIe: link control 2.
pub const EXP_LNKCTL2: usize = 0x30;
/// Size of a version 2 endpoint's PCI Express capability.
pub const EXP_CAP_SIZE: usize = 0x3c;
/// DevCap: role-based error reporting.
pub const EXP_DEVCAP_RBER: u32 = 1 << 15;
/// DevCap: function level reset capable.
pub const EXP_DEVCAP_FLR: u32 = 1 << 28;
/// DevCtl: relaxed ordering enable.
pub const EXP_DEVCTL_RELAX_EN: u16 = 1 << 4;
/// DevCtl: no snoop enable.
pub const EXP_DEVCTL_NOSNOOP_EN: u16 = 1 << 11;
/// DevCtl: initiate function level reset (always reads 0).
pub const EXP_DEVCTL_BCR_FLR: u16 = 1 << 15;
