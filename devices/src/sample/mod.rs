//! `sample`: a small educational PCI device, and the worked example of how
//! to write a vdevd device.
//!
//! In the spirit of QEMU's `edu` device, it has an identification register,
//! a liveness check, a factorial unit, interrupt status/raise/acknowledge
//! registers and a DMA engine that copies between an on-device buffer and
//! guest memory. It exercises every path of the server: trapped registers,
//! an mmappable buffer beside a trapped page (sparse mmap), a doorbell the
//! client may turn into an ioeventfd, DMA in both directions from a worker
//! thread (fd-backed and message-backed client memory alike), MSI-X with
//! several vectors, MSI, INTx, device reset, FLR and migration.
//!
//! # Identity
//!
//! Vendor 0x1234 (the ID QEMU uses for its own test devices), device 0x5344
//! ("SD"), subsystem 0x1234:0x0001, revision 1, class 0xff0000 ("device
//! does not fit any defined class"). No Linux driver matches these, so the
//! device stays unbound in a guest until a test binds it (e.g. to
//! `vfio-pci` or `uio_pci_generic`) or pokes it through sysfs.
//!
//! # BAR0: registers (4 KiB, 32-bit memory, trapped)
//!
//! Registers take naturally aligned 32-bit accesses (64-bit registers also
//! 64-bit ones); reads of any size work, other writes are ignored.
//!
//! | Offset | Size | Name             | Access | Meaning |
//! |--------|------|------------------|--------|---------|
//! | 0x00   | 4    | `ID`             | RO     | `0x5344_0100`: device ID << 16, major version 1 << 8, minor 0 |
//! | 0x04   | 4    | `LIVENESS`       | RW     | reads the bitwise inverse of the last value written |
//! | 0x08   | 4    | `BUFFER_SIZE`    | RO     | size of the device buffer in bytes |
//! | 0x0c   | 4    | `STATUS`         | RO     | bit 0: factorial busy; bit 1: DMA busy |
//! | 0x10   | 4    | `FACT_INPUT`     | RW     | writing n starts computing n! (ignored while busy); reads n |
//! | 0x18   | 8    | `FACT_RESULT`    | RO     | n! modulo 2^64, valid once `STATUS` bit 0 is clear |
//! | 0x20   | 4    | `IRQ_STATUS`     | RO     | latched causes: bit 0 factorial done, bit 1 DMA finished, bit 2 software |
//! | 0x24   | 4    | `IRQ_ENABLE`     | RW     | causes that interrupt |
//! | 0x28   | 4    | `IRQ_RAISE`      | WO     | sets cause bits (bit 2 is meant for this) |
//! | 0x2c   | 4    | `IRQ_ACK`        | WO     | clears cause bits |
//! | 0x30   | 8    | `DMA_SRC`        | RW     | source: client address, or buffer offset when `FROM_DEVICE` |
//! | 0x38   | 8    | `DMA_DST`        | RW     | destination: buffer offset, or client address when `FROM_DEVICE` |
//! | 0x40   | 4    | `DMA_COUNT`      | RW     | bytes to copy |
//! | 0x44   | 4    | `DMA_CMD`        | RW     | bit 0 `START` (reads 1 while busy), bit 1 `FROM_DEVICE` (buffer to client memory) |
//! | 0x48   | 4    | `DMA_STATUS`     | RO     | bits 7:0 state (0 idle, 1 busy, 2 done, 3 error), bits 15:8 error code |
//! | 0x4c   | 4    | `DOORBELL_COUNT` | RO     | doorbell rings seen (trapped writes and ioeventfd signals) |
//! | 0x800  |      | MSI-X table      |        | served by the PCI core |
//! | 0xc00  |      | MSI-X PBA        |        | served by the PCI core |
//!
//! The DMA registers are ignored while a transfer is running, and so is a
//! start (through `DMA_CMD` or the doorbell); rings that arrive together are
//! counted in `DOORBELL_COUNT` but start one transfer. DMA error
//! codes: 1 the range does not fit in the buffer, 2 the client address is
//! not mapped, 3 the mapping does not allow the access, 4 bus mastering is
//! disabled in the command register, 5 any other I/O failure.
//!
//! Interrupt cause bit *i* uses MSI-X (or MSI) vector *i* (vector 0 if the
//! function has fewer vectors); with neither enabled, INTA# is asserted
//! while `IRQ_STATUS & IRQ_ENABLE` is non-zero.
//!
//! # BAR2: buffer and doorbell (64-bit memory, twice the buffer size)
//!
//! | Offset          | Size        | Name       | Meaning |
//! |-----------------|-------------|------------|---------|
//! | 0               | buffer size | buffer     | the device buffer; mmappable (a sealed memfd), trapped accesses work too |
//! | buffer size     | 4           | `DOORBELL` | any write starts the DMA programmed in BAR0, in the direction last written to `DMA_CMD`; offered as an ioeventfd |
//! | the rest        |             |            | reads as zero, writes ignored |
//!
//! # Threads
//!
//! Register accesses are answered at once on the session thread. The
//! factorial and the DMA engine run on the device's worker thread, which
//! also watches the doorbell eventfd; DMA goes through
//! [`DmaSpace`], so client memory mapped without a file
//! (message-backed) works too without blocking the session. Completion
//! sets the status and raises the interrupt.
//!
//! # Migration
//!
//! [`Migratable::stop`] never waits for the worker (it may be waiting for
//! the client to answer a DMA message, which the session thread has to
//! relay). Instead the worker changes device state only under the register
//! lock and only while the device runs: a transfer interrupted by `stop`
//! keeps its progress, a chunk copied but not yet committed is copied again
//! after `run` or on the destination. The state format is versioned and is
//! checked field by field on load.

mod engine;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::Error;
use crate::device::{IoEventFd, Migratable, MmapArea, RegionMmap};
use crate::dma::DmaSpace;
use crate::pci::regs::COMMAND_MASTER;
use crate::pci::{Bar, Interrupts, MsiSpec, MsixSpec, PciDevice, PciFunction, PciIds, PciLayout};

use engine::Shared;

/// PCI vendor ID (QEMU's test-device vendor).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID ("SD").
pub const DEVICE_ID: u16 = 0x5344;
/// Value of the `ID` register: device ID, major and minor version.
pub const ID_VALUE: u32 = 0x5344_0100;

/// Register offsets and bits. BAR0 offsets unless noted.
pub mod regs {
    /// Identification (RO).
    pub const ID: u64 = 0x00;
    /// Liveness check (RW, reads inverted).
    pub const LIVENESS: u64 = 0x04;
    /// Buffer size (RO).
    pub const BUFFER_SIZE: u64 = 0x08;
    /// Busy flags (RO).
    pub const STATUS: u64 = 0x0c;
    /// Factorial input (RW, a write starts the computation).
    pub const FACT_INPUT: u64 = 0x10;
    /// Factorial result, 64 bits (RO).
    pub const FACT_RESULT: u64 = 0x18;
    /// Latched interrupt causes (RO).
    pub const IRQ_STATUS: u64 = 0x20;
    /// Interrupt enable mask (RW).
    pub const IRQ_ENABLE: u64 = 0x24;
    /// Set interrupt causes (WO).
    pub const IRQ_RAISE: u64 = 0x28;
    /// Clear interrupt causes (WO).
    pub const IRQ_ACK: u64 = 0x2c;
    /// DMA source, 64 bits (RW).
    pub const DMA_SRC: u64 = 0x30;
    /// DMA destination, 64 bits (RW).
    pub const DMA_DST: u64 = 0x38;
    /// DMA byte count (RW).
    pub const DMA_COUNT: u64 = 0x40;
    /// DMA command (RW).
    pub const DMA_CMD: u64 = 0x44;
    /// DMA status (RO).
    pub const DMA_STATUS: u64 = 0x48;
    /// Doorbell rings seen (RO).
    pub const DOORBELL_COUNT: u64 = 0x4c;
    /// Size of the register file; BAR0 reads past it return 0.
    pub const REGS_SIZE: u64 = 0x50;
    /// Offset of the MSI-X table in BAR0.
    pub const MSIX_TABLE: u32 = 0x800;
    /// Offset of the MSI-X PBA in BAR0.
    pub const MSIX_PBA: u32 = 0xc00;
    /// Offset of the doorbell in BAR2, after the buffer.
    pub const fn doorbell(buffer_size: u64) -> u64 {
        buffer_size
    }

    /// `STATUS`: the factorial unit is busy.
    pub const STATUS_COMPUTE_BUSY: u32 = 1 << 0;
    /// `STATUS`: the DMA engine is busy.
    pub const STATUS_DMA_BUSY: u32 = 1 << 1;

    /// Interrupt cause: factorial done (vector 0).
    pub const IRQ_COMPUTE: u32 = 1 << 0;
    /// Interrupt cause: DMA finished, successfully or not (vector 1).
    pub const IRQ_DMA: u32 = 1 << 1;
    /// Interrupt cause: raised by software (vector 2).
    pub const IRQ_SOFTWARE: u32 = 1 << 2;
    /// Every cause.
    pub const IRQ_ALL: u32 = IRQ_COMPUTE | IRQ_DMA | IRQ_SOFTWARE;

    /// `DMA_CMD`: start the transfer.
    pub const DMA_CMD_START: u32 = 1 << 0;
    /// `DMA_CMD`: copy from the buffer to client memory.
    pub const DMA_CMD_FROM_DEVICE: u32 = 1 << 1;

    /// `DMA_STATUS` state: never started.
    pub const DMA_IDLE: u32 = 0;
    /// `DMA_STATUS` state: running.
    pub const DMA_BUSY: u32 = 1;
    /// `DMA_STATUS` state: finished.
    pub const DMA_DONE: u32 = 2;
    /// `DMA_STATUS` state: failed (code in bits 15:8).
    pub const DMA_ERROR: u32 = 3;

    /// DMA error: the range does not fit in the buffer.
    pub const DMA_ERR_RANGE: u32 = 1;
    /// DMA error: the client address is not mapped.
    pub const DMA_ERR_UNMAPPED: u32 = 2;
    /// DMA error: the mapping does not allow the access.
    pub const DMA_ERR_ACCESS: u32 = 3;
    /// DMA error: bus mastering is disabled.
    pub const DMA_ERR_NO_BUS_MASTER: u32 = 4;
    /// DMA error: any other failure.
    pub const DMA_ERR_IO: u32 = 5;
}

/// Options of a sample device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleConfig {
    /// MSI-X table size, 1..=64.
    pub msix_vectors: u16,
    /// Size of the device buffer: a power of two, 4 KiB..=64 MiB.
    pub buffer_size: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            msix_vectors: 4,
            buffer_size: 64 << 10,
        }
    }
}

impl SampleConfig {
    fn validate(&self) -> Result<(), Error> {
        if !(1..=64).contains(&self.msix_vectors) {
            return Err(Error::InvalidArgument(format!(
                "sample: {} MSI-X vectors (1..=64)",
                self.msix_vectors
            )));
        }
        let size = self.buffer_size;
        if !size.is_power_of_two() || !(4096..=64 << 20).contains(&size) {
            return Err(Error::InvalidArgument(format!(
                "sample: buffer size {size:#x} (a power of two, 4 KiB..=64 MiB)"
            )));
        }
        Ok(())
    }

    fn layout(&self) -> PciLayout {
        let mut l = PciLayout::new(PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: 0x0001,
            revision: 1,
            class_code: 0xff_00_00,
        });
        l.bars[0] = Some(Bar::memory32(0x1000));
        // Not prefetchable: the doorbell page must not see merged writes.
        l.bars[2] = Some(Bar::memory64(self.buffer_size * 2));
        l.msi = Some(MsiSpec {
            vectors: 4,
            address64: true,
            per_vector_mask: true,
        });
        l.msix = Some(MsixSpec {
            vectors: self.msix_vectors,
            bar: 0,
            table_offset: regs::MSIX_TABLE,
            pba_offset: regs::MSIX_PBA,
        });
        l
    }
}

/// The sample device as served: the function inside the PCI core.
pub type SampleDevice = PciDevice<Sample>;

/// The sample function. Build it with [`Sample::create`].
pub struct Sample {
    shared: Arc<Shared>,
    /// The buffer's memfd, handed to the client to mmap.
    buffer_fd: Arc<OwnedFd>,
    /// The doorbell eventfd, handed to the client as an ioeventfd.
    doorbell_fd: Arc<OwnedFd>,
    /// Our own handle on the doorbell, to ring it for trapped writes.
    doorbell: File,
    worker: Option<(JoinHandle<()>, mpsc::Receiver<()>)>,
}

/// A sealed memfd of `size` bytes: the client may map it, but cannot
/// shrink it under our mapping.
fn buffer_memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are
    // valid; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vdevd-sample-buffer".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with a valid seal mask.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// A non-blocking eventfd.
fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by eventfd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Sample {
    /// Build a sample device that reaches client memory through `dma`.
    pub fn create(config: SampleConfig, dma: Arc<DmaSpace>) -> Result<SampleDevice, Error> {
        config.validate()?;
        PciDevice::new(config.layout(), |irq| Sample::new(config, dma, irq))
    }

    fn new(
        config: SampleConfig,
        dma: Arc<DmaSpace>,
        irq: Arc<Interrupts>,
    ) -> Result<Sample, Error> {
        let file = buffer_memfd(config.buffer_size)?;
        let buffer_fd = Arc::new(OwnedFd::from(file.try_clone()?));
        let len = usize::try_from(config.buffer_size)
            .map_err(|_| Error::InvalidArgument("buffer size".into()))?;
        let buffer = MmapRegion::from_file(FileOffset::new(file, 0), len)
            .map_err(|e| Error::Io(io::Error::other(e)))?;
        let doorbell_fd = Arc::new(new_eventfd()?);
        let doorbell = File::from(doorbell_fd.try_clone()?);
        let shared = Arc::new(Shared::new(
            buffer,
            config.buffer_size,
            config.msix_vectors,
            irq,
            dma,
            EventFd::new(libc::EFD_NONBLOCK)?,
        ));
        let (done_tx, done_rx) = mpsc::channel();
        let worker_shared = shared.clone();
        let watch = File::from(doorbell_fd.try_clone()?);
        let handle = std::thread::Builder::new()
            .name("sample-worker".into())
            .spawn(move || {
                engine::worker(&worker_shared, &watch);
                drop(done_tx);
            })?;
        Ok(Sample {
            shared,
            buffer_fd,
            doorbell_fd,
            doorbell,
            worker: Some((handle, done_rx)),
        })
    }

    fn ring_doorbell(&self) {
        match (&self.doorbell).write(&1u64.to_ne_bytes()) {
            Ok(_) => {}
            // The counter is full: the worker has rings to process already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("sample: cannot ring the doorbell: {e}"),
        }
    }
}

impl Drop for Sample {
    fn drop(&mut self) {
        self.shared.shutdown();
        if let Some((handle, done)) = self.worker.take() {
            // The worker may be waiting for a client that no longer
            // answers; do not hang the session on it.
            match done.recv_timeout(Duration::from_secs(2)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    log::warn!("sample: worker still busy after 2 s; leaving it behind");
                }
                _ => {
                    if handle.join().is_err() {
                        log::error!("sample: worker panicked");
                    }
                }
            }
        }
    }
}

impl PciFunction for Sample {
    fn name(&self) -> &str {
        "sample"
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        match bar {
            0 => {
                let image = self.shared.register_image();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = offset
                        .checked_add(i as u64)
                        .and_then(|at| usize::try_from(at).ok())
                        .and_then(|at| image.get(at))
                        .copied()
                        .unwrap_or(0);
                }
                Ok(())
            }
            2 if offset < self.shared.buffer_size => self.shared.buffer_read(offset, data),
            _ => {
                data.fill(0);
                Ok(())
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
        let size = self.shared.buffer_size;
        match bar {
            0 => match (offset % 4, data) {
                (0, &[a, b, c, d]) => self
                    .shared
                    .write32(offset, u32::from_le_bytes([a, b, c, d])),
                (0, &[a, b, c, d, e, f, g, h]) if offset % 8 == 0 => {
                    self.shared
                        .write32(offset, u32::from_le_bytes([a, b, c, d]));
                    self.shared
                        .write32(offset + 4, u32::from_le_bytes([e, f, g, h]));
                }
                _ => log::debug!(
                    "sample: {}-byte write at BAR0+{offset:#x} ignored",
                    data.len()
                ),
            },
            2 if offset < size => return self.shared.buffer_write(offset, data),
            2 if offset
                .checked_sub(regs::doorbell(size))
                .is_some_and(|o| o < 4) =>
            {
                self.ring_doorbell();
            }
            _ => {}
        }
        Ok(())
    }

    fn bar_mmap(&self, bar: u8) -> Option<RegionMmap> {
        (bar == 2).then(|| RegionMmap {
            fd: self.buffer_fd.clone(),
            offset: 0,
            areas: vec![MmapArea {
                offset: 0,
                size: self.shared.buffer_size,
            }],
        })
    }

    fn ioeventfds(&mut self, bar: u8) -> Result<Vec<IoEventFd>, Error> {
        if bar != 2 {
            return Ok(Vec::new());
        }
        Ok(vec![IoEventFd {
            offset: regs::doorbell(self.shared.buffer_size),
            size: 4,
            fd: self.doorbell_fd.clone(),
            datamatch: None,
        }])
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.shared.reset();
        Ok(())
    }

    fn command_changed(&mut self, command: u16) {
        self.shared.set_bus_master(command & COMMAND_MASTER != 0);
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for Sample {
    fn stop(&mut self) -> Result<(), Error> {
        self.shared.set_stopped(true);
        Ok(())
    }

    fn run(&mut self) -> Result<(), Error> {
        self.shared.set_stopped(false);
        Ok(())
    }

    fn save(&mut self) -> Result<Vec<u8>, Error> {
        self.shared.save()
    }

    fn load(&mut self, state: &[u8]) -> Result<(), Error> {
        self.shared.load(state)
    }
}
