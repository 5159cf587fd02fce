//! Driving the sample device (`vdevd sample`) through a [`Client`], the
//! way a guest driver would: config space, bus mastering, MSI-X, the DMA
//! engine. The register map is the device's documented interface
//! (`vdevd_devices::sample`).

use std::os::fd::AsFd;
use std::time::Duration;

pub use vdevd_devices::pci::regs as pci;
pub use vdevd_devices::sample::{DEVICE_ID, ID_VALUE, VENDOR_ID, regs};
use vdevd_protocol::vfio;

use crate::{Client, Error, EventFd};

/// BAR0: the registers.
pub const BAR0: u32 = vfio::VFIO_PCI_BAR0_REGION_INDEX;
/// BAR2: the buffer and the doorbell.
pub const BAR2: u32 = vfio::VFIO_PCI_BAR2_REGION_INDEX;
/// PCI config space.
pub const CONFIG: u32 = vfio::VFIO_PCI_CONFIG_REGION_INDEX;
/// The default buffer size (`--buffer-size`).
pub const DEFAULT_BUFFER_SIZE: u64 = 64 << 10;
/// The default MSI-X table size (`--msix-vectors`).
pub const DEFAULT_MSIX_VECTORS: u32 = 4;

/// Read `len` (1, 2 or 4) bytes of config space as a little-endian value.
pub fn config_read(c: &mut Client, offset: u64, len: u32) -> Result<u32, Error> {
    let b = c.region_read(CONFIG, offset, len)?;
    let mut v = [0u8; 4];
    v[..b.len().min(4)].copy_from_slice(&b[..b.len().min(4)]);
    Ok(u32::from_le_bytes(v))
}

/// Write the low `len` bytes of `value` to config space.
pub fn config_write(c: &mut Client, offset: u64, value: u32, len: usize) -> Result<(), Error> {
    c.region_write(CONFIG, offset, &value.to_le_bytes()[..len.min(4)])
}

/// The config-space offset of the capability with this id.
pub fn find_capability(c: &mut Client, id: u8) -> Result<u64, Error> {
    let mut pos = config_read(c, pci::CAPABILITY_LIST as u64, 1)? & 0xfc;
    for _ in 0..48 {
        if pos == 0 {
            break;
        }
        if config_read(c, u64::from(pos), 1)? == u32::from(id) {
            return Ok(u64::from(pos));
        }
        pos = config_read(c, u64::from(pos) + 1, 1)? & 0xfc;
    }
    Err(Error::Unexpected(format!("no capability {id:#x}")))
}

/// Turn on memory decoding and bus mastering (the DMA engine needs it).
pub fn enable_bus_master(c: &mut Client) -> Result<(), Error> {
    let cmd = config_read(c, pci::COMMAND as u64, 2)?;
    let want = cmd | u32::from(pci::COMMAND_MEMORY | pci::COMMAND_MASTER);
    config_write(c, pci::COMMAND as u64, want, 2)
}

/// Arm `vectors` MSI-X vectors with new eventfds and enable MSI-X in
/// config space (function mask clear). Returns the eventfds, vector 0
/// first.
pub fn enable_msix(c: &mut Client, vectors: u32) -> Result<Vec<EventFd>, Error> {
    let fds = (0..vectors)
        .map(|_| EventFd::new().map_err(|e| Error::io("eventfd", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&EventFd> = fds.iter().collect();
    c.set_irq_eventfds(vfio::VFIO_PCI_MSIX_IRQ_INDEX, 0, &refs)?;
    let cap = find_capability(c, pci::CAP_ID_MSIX)?;
    let flags = config_read(c, cap + pci::MSIX_FLAGS as u64, 2)?;
    let want = (flags | u32::from(pci::MSIX_FLAGS_ENABLE)) & !u32::from(pci::MSIX_FLAGS_MASKALL);
    config_write(c, cap + pci::MSIX_FLAGS as u64, want, 2)?;
    Ok(fds)
}

/// Program a DMA transfer in BAR0 without starting it.
pub fn program_dma(
    c: &mut Client,
    src: u64,
    dst: u64,
    count: u32,
    from_device: bool,
) -> Result<(), Error> {
    c.write64(BAR0, regs::DMA_SRC, src)?;
    c.write64(BAR0, regs::DMA_DST, dst)?;
    c.write32(BAR0, regs::DMA_COUNT, count)?;
    // The direction the doorbell uses is the one last written to DMA_CMD.
    let dir = if from_device {
        regs::DMA_CMD_FROM_DEVICE
    } else {
        0
    };
    c.write32(BAR0, regs::DMA_CMD, dir)
}

/// Program and start a DMA transfer: client memory at `src` to buffer
/// offset `dst`, or (`from_device`) buffer offset `src` to client memory at
/// `dst`.
pub fn start_dma(
    c: &mut Client,
    src: u64,
    dst: u64,
    count: u32,
    from_device: bool,
) -> Result<(), Error> {
    program_dma(c, src, dst, count, from_device)?;
    let dir = if from_device {
        regs::DMA_CMD_FROM_DEVICE
    } else {
        0
    };
    c.write32(BAR0, regs::DMA_CMD, regs::DMA_CMD_START | dir)
}

/// `DMA_STATUS` as (state, error code).
pub fn dma_status(c: &mut Client) -> Result<(u32, u32), Error> {
    let s = c.read32(BAR0, regs::DMA_STATUS)?;
    Ok((s & 0xff, (s >> 8) & 0xff))
}

/// Wait for an interrupt on `irq`, answering the server's DMA requests
/// meanwhile; returns the eventfd count. Fails after `timeout`.
pub fn wait_irq(c: &mut Client, irq: &EventFd, timeout: Duration) -> Result<u64, Error> {
    let ready = c.serve_until(&[irq.as_fd()], timeout)?;
    if !ready.first().copied().unwrap_or(false) {
        return Err(Error::Timeout {
            timeout,
            what: "an interrupt".into(),
        });
    }
    irq.take().map_err(|e| Error::io("read eventfd", e))
}
