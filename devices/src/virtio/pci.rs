//! The virtio-pci transport (virtio 1.2, 4.1): any [`VirtioDevice`] as a
//! modern (non-transitional) PCI function on the PCI core, served over
//! vfio-user.
//!
//! # Layout
//!
//! Vendor 0x1af4, device 0x1040 + the virtio device ID (0x1042 for block),
//! revision 1. Both BARs are trapped unless noted.
//!
//! | BAR | Offset | Size | What |
//! |-----|--------|------|------|
//! | 1   | 0x000  | 16 × vectors | MSI-X table (one vector per queue and one for configuration changes) |
//! | 1   | 0x800  |      | MSI-X PBA |
//! | 4   | 0x0000 | 0x38 | common configuration (`VIRTIO_PCI_CAP_COMMON_CFG`) |
//! | 4   | 0x1000 | 1    | ISR status, cleared by reading (`VIRTIO_PCI_CAP_ISR_CFG`) |
//! | 4   | 0x2000 | device config size | device configuration (`VIRTIO_PCI_CAP_DEVICE_CFG`) |
//! | 4   | 0x3000 | 4 × queues | queue notifications, `notify_off_multiplier` 4 (`VIRTIO_PCI_CAP_NOTIFY_CFG`) |
//!
//! A fifth vendor capability, `VIRTIO_PCI_CAP_PCI_CFG`, is the window onto
//! the BARs through config space that the specification requires (4.1.4.9)
//! and that firmware uses when a BAR is mapped above 4 GiB.
//!
//! # Queue notifications ("kicks")
//!
//! Each queue has a worker thread that waits on the queue's kick eventfd.
//! Three ways lead to it, the first two without a vfio-user message per
//! kick:
//!
//! * [`KickMode::Poll`]: the notify page is offered to the client for
//!   mmap (a sealed memfd, sparse-mmap area of BAR4). The guest's write
//!   lands in shared memory; a poller thread swaps each queue's slot with
//!   a sentinel the guest never writes and kicks the queues whose slot
//!   changed, backing off from 10 µs to 1 ms between scans while the
//!   device is idle. No kick is lost: the swap is atomic, so a write
//!   either is seen by this scan or stays for the next one.
//! * ioeventfds: `DEVICE_GET_REGION_IO_FDS` offers each queue's kick
//!   eventfd at its notify address, for clients that wire them up.
//! * The trapped register: a REGION_WRITE to the notify address writes the
//!   kick eventfd on the session thread ([`KickMode::Trap`] offers no mmap,
//!   so a client may post these writes without waiting for a reply).
//!
//! # Threads and memory
//!
//! Requests never run on the session thread. A worker takes the queue's
//! lock and a [`DmaSpace::memory`] view for one batch (at most
//! [`BATCH`] chains), processes it with [`super::process_queue`], drops
//! both and raises the queue's MSI-X vector (or INTx with the ISR bit) if
//! the driver wants an interrupt. Guest memory must be mapped with a
//! sealed file descriptor (QEMU: `memory-backend-memfd`); other ranges are
//! not reachable through a memory view, and chains there make requests
//! fail or the device broken, never block the session.
//!
//! # Reset
//!
//! Writing 0 to `device_status` (or a device reset / FLR from the client)
//! clears the status first, so workers stop taking new batches, then takes
//! each queue's lock, which waits for a batch in progress to complete, and
//! resets the queue. When the status reads back 0 no request is in flight.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{DeviceBroken, VirtioDevice, features, process_queue, status};
use crate::Error;
use crate::device::{IoEventFd, MmapArea, RegionMmap};
use crate::dma::DmaSpace;
use crate::pci::regs::COMMAND_MASTER;
use crate::pci::{
    Bar, Interrupts, IrqMode, MsixSpec, PciDevice, PciFunction, PciIds, PciLayout, VendorCapability,
};

/// Red Hat's PCI vendor ID, which virtio devices use.
pub const VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device IDs are this plus the virtio device ID.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// "No vector" for `config_msix_vector` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;

/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: u8 = 1;
/// Offset of the PBA in [`MSIX_BAR`].
pub const MSIX_PBA: u32 = 0x800;
/// BAR holding the virtio structures.
pub const VIRTIO_BAR: u8 = 4;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
/// Offset of the common configuration in [`VIRTIO_BAR`].
pub const COMMON_OFFSET: u64 = 0x0000;
/// Size of the common configuration structure.
pub const COMMON_SIZE: u64 = 0x38;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Offset of the notification area (one page).
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Chains a worker completes before it lets go of its queue.
pub const BATCH: usize = 256;

/// The slot value the guest never writes (it writes a 16-bit queue index
/// into the low half).
const SENTINEL: u32 = u32::MAX;
const PAGE: u64 = 4096;

/// `virtio_pci_cap.cfg_type` values.
pub mod cap {
    /// Common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// Notifications.
    pub const NOTIFY_CFG: u8 = 2;
    /// ISR status.
    pub const ISR_CFG: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE_CFG: u8 = 4;
    /// PCI configuration access window.
    pub const PCI_CFG: u8 = 5;
}

/// Offsets in `struct virtio_pci_common_cfg`.
pub mod common {
    /// u32 RW.
    pub const DEVICE_FEATURE_SELECT: u64 = 0;
    /// u32 RO.
    pub const DEVICE_FEATURE: u64 = 4;
    /// u32 RW.
    pub const DRIVER_FEATURE_SELECT: u64 = 8;
    /// u32 RW.
    pub const DRIVER_FEATURE: u64 = 12;
    /// u16 RW.
    pub const CONFIG_MSIX_VECTOR: u64 = 16;
    /// u16 RO.
    pub const NUM_QUEUES: u64 = 18;
    /// u8 RW.
    pub const DEVICE_STATUS: u64 = 20;
    /// u8 RO.
    pub const CONFIG_GENERATION: u64 = 21;
    /// u16 RW.
    pub const QUEUE_SELECT: u64 = 22;
    /// u16 RW.
    pub const QUEUE_SIZE: u64 = 24;
    /// u16 RW.
    pub const QUEUE_MSIX_VECTOR: u64 = 26;
    /// u16 RW.
    pub const QUEUE_ENABLE: u64 = 28;
    /// u16 RO.
    pub const QUEUE_NOTIFY_OFF: u64 = 30;
    /// u64 RW.
    pub const QUEUE_DESC: u64 = 32;
    /// u64 RW.
    pub const QUEUE_DRIVER: u64 = 40;
    /// u64 RW.
    pub const QUEUE_DEVICE: u64 = 48;
}

/// Index of the PCI_CFG capability among the vendor capabilities.
const PCI_CFG_CAP: usize = 4;
/// Offsets in the PCI_CFG capability's data (after its 3-byte header).
const PCI_CFG_BAR: usize = 1;
const PCI_CFG_OFFSET: usize = 5;
const PCI_CFG_LENGTH: usize = 9;
const PCI_CFG_DATA: usize = 13;

/// How queue notifications reach the device when the client does not use
/// ioeventfds. See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KickMode {
    /// Each notification is a trapped REGION_WRITE.
    #[default]
    Trap,
    /// The notify page is mmapped by the client and polled by vdevd.
    Poll,
}

/// Transport options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioPciOptions {
    /// How kicks arrive.
    pub kick: KickMode,
}

/// A virtio device served as a PCI function.
pub type VirtioPciDevice<D> = PciDevice<VirtioPci<D>>;

/// Build the PCI function for `device`, reaching guest memory through
/// `dma`.
pub fn create<D: VirtioDevice>(
    device: Arc<D>,
    dma: Arc<DmaSpace>,
    options: VirtioPciOptions,
) -> Result<VirtioPciDevice<D>, Error> {
    let layout = layout(device.as_ref())?;
    PciDevice::new(layout, |irq| VirtioPci::new(device, dma, irq, options))
}

fn vendor_cap(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
    let mut d = vec![cfg_type, bar, 0, 0, 0];
    d.extend_from_slice(&offset.to_le_bytes());
    d.extend_from_slice(&length.to_le_bytes());
    d.extend_from_slice(extra);
    d
}

/// The PCI layout of a virtio device.
pub fn layout<D: VirtioDevice + ?Sized>(device: &D) -> Result<PciLayout, Error> {
    let queues = u32::from(device.num_queues());
    if queues == 0 || queues * NOTIFY_MULTIPLIER > PAGE as u32 || queues + 1 > 128 {
        return Err(Error::InvalidArgument(format!(
            "virtio-pci: {queues} queues (1..=127)"
        )));
    }
    let config_size = u32::try_from(device.config_size())
        .ok()
        .filter(|s| u64::from(*s) <= PAGE)
        .ok_or_else(|| Error::InvalidArgument("virtio-pci: device config too large".into()))?;
    let mut l = PciLayout::new(PciIds {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID_BASE + device.device_id(),
        subsystem_vendor_id: VENDOR_ID,
        subsystem_id: DEVICE_ID_BASE + device.device_id(),
        revision: 1,
        // Block devices: mass storage, "SCSI" as QEMU reports; others: misc.
        class_code: if device.device_id() == super::blk::DEVICE_ID {
            0x01_00_00
        } else {
            0xff_00_00
        },
    });
    l.bars[usize::from(MSIX_BAR)] = Some(Bar::memory32(0x1000));
    // Not prefetchable: notification writes must not be merged.
    l.bars[usize::from(VIRTIO_BAR)] = Some(Bar::memory64(VIRTIO_BAR_SIZE));
    l.msix = Some(MsixSpec {
        vectors: (queues + 1) as u16,
        bar: MSIX_BAR,
        table_offset: 0,
        pba_offset: MSIX_PBA,
    });
    let bar = VIRTIO_BAR;
    let ro = Vec::new;
    l.vendor_capabilities = vec![
        VendorCapability {
            data: vendor_cap(cap::COMMON_CFG, bar, 0, COMMON_SIZE as u32, &[]),
            writable: ro(),
        },
        VendorCapability {
            data: vendor_cap(cap::ISR_CFG, bar, ISR_OFFSET as u32, 1, &[]),
            writable: ro(),
        },
        VendorCapability {
            data: vendor_cap(cap::DEVICE_CFG, bar, DEVICE_OFFSET as u32, config_size, &[]),
            writable: ro(),
        },
        VendorCapability {
            data: vendor_cap(
                cap::NOTIFY_CFG,
                bar,
                NOTIFY_OFFSET as u32,
                queues * NOTIFY_MULTIPLIER,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            writable: ro(),
        },
        VendorCapability {
            data: vendor_cap(cap::PCI_CFG, 0, 0, 0, &[0; 4]),
            // bar, offset, length and the data window are the driver's
            writable: vec![
                0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff,
            ],
        },
    ];
    Ok(l)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// A sealed memfd as large as the virtio BAR, of which only the notify
/// page is used (so that region and file offsets agree).
fn notify_memfd() -> io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and the flags are
    // valid; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vdevd-virtio-notify".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(VIRTIO_BAR_SIZE)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with a valid seal mask.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

struct Kick {
    /// Handed out as an ioeventfd.
    fd: Arc<OwnedFd>,
    /// Our handle, to write (trapped kicks) and read (the worker).
    file: File,
}

impl Kick {
    fn new() -> io::Result<Kick> {
        let fd = new_eventfd()?;
        let file = File::from(fd.try_clone()?);
        Ok(Kick {
            fd: Arc::new(fd),
            file,
        })
    }

    fn ring(&self) {
        match (&self.file).write(&1u64.to_ne_bytes()) {
            Ok(_) => {}
            // Counter full: the worker has a kick to take already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("virtio-pci: cannot write a kick eventfd: {e}"),
        }
    }

    fn take(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.file).read(&mut b);
    }
}

struct QueueSlot {
    queue: Mutex<Queue>,
    vector: AtomicU16,
    kick: Kick,
}

/// The notify page shared with the client in [`KickMode::Poll`].
struct NotifyPage {
    fd: Arc<OwnedFd>,
    region: MmapRegion<()>,
}

impl NotifyPage {
    fn slot(&self, q: usize) -> Option<&AtomicU32> {
        self.region
            .get_atomic_ref::<AtomicU32>(q * NOTIFY_MULTIPLIER as usize)
            .ok()
    }

    fn clear(&self, queues: usize) {
        for q in 0..queues {
            if let Some(s) = self.slot(q) {
                s.store(SENTINEL, Ordering::SeqCst);
            }
        }
    }
}

struct Shared<D> {
    device: Arc<D>,
    dma: Arc<DmaSpace>,
    irq: Arc<Interrupts>,
    queues: Vec<QueueSlot>,
    status: AtomicU8,
    isr: AtomicU8,
    config_vector: AtomicU16,
    bus_master: AtomicBool,
    shutdown: AtomicBool,
    stop: Kick,
    notify: Option<NotifyPage>,
}

impl<D: VirtioDevice> Shared<D> {
    fn running(&self) -> bool {
        let s = self.status.load(Ordering::Acquire);
        s & status::DRIVER_OK != 0
            && s & status::FEATURES_OK != 0
            && s & status::DEVICE_NEEDS_RESET == 0
            && self.bus_master.load(Ordering::Acquire)
    }

    fn raise(&self, vector: u16, isr_bit: u8) {
        self.isr.fetch_or(isr_bit, Ordering::AcqRel);
        match self.irq.mode() {
            IrqMode::Msix => {
                if vector != NO_VECTOR {
                    self.irq.raise(vector);
                }
            }
            IrqMode::Msi | IrqMode::Intx => {
                self.irq.raise(0);
            }
            IrqMode::None => {}
        }
    }

    fn interrupt_queue(&self, q: usize) {
        if let Some(slot) = self.queues.get(q) {
            self.raise(slot.vector.load(Ordering::Acquire), 1);
        }
    }

    fn interrupt_config(&self) {
        self.raise(self.config_vector.load(Ordering::Acquire), 2);
    }

    fn mark_broken(&self, e: &DeviceBroken) {
        let old = self
            .status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        if old & status::DEVICE_NEEDS_RESET == 0 {
            log::error!(
                "{}: {e}; the device stops until the driver resets it",
                self.device.name()
            );
            self.interrupt_config();
        }
    }

    /// Process queue `q` until it is empty (or the device stops).
    fn service(&self, q: usize) {
        let Some(slot) = self.queues.get(q) else {
            return;
        };
        let index = q as u16;
        loop {
            if !self.running() {
                return;
            }
            let result = {
                let mut queue = lock(&slot.queue);
                // Checked again under the lock: a reset may have run.
                if !self.running() {
                    return;
                }
                let mem = self.dma.memory();
                process_queue(
                    self.device.as_ref(),
                    index,
                    &mem,
                    &mut queue,
                    BATCH,
                    &|| !self.running(),
                )
            };
            match result {
                Ok(run) => {
                    if run.notify {
                        self.interrupt_queue(q);
                    }
                    if !run.more {
                        return;
                    }
                }
                Err(e) => {
                    self.mark_broken(&e);
                    return;
                }
            }
        }
    }

    fn worker(&self, q: usize) {
        let Some(slot) = self.queues.get(q) else {
            return;
        };
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                log::error!("virtio-pci: queue {q} worker: epoll: {e}");
                return;
            }
        };
        for (fd, token) in [
            (slot.kick.file.as_raw_fd(), 0),
            (self.stop.file.as_raw_fd(), 1),
        ] {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                log::error!("virtio-pci: queue {q} worker: epoll_ctl: {e}");
                return;
            }
        }
        let mut events = [EpollEvent::default(); 2];
        while !self.shutdown.load(Ordering::Acquire) {
            match epoll.wait(-1, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-pci: queue {q} worker: epoll_wait: {e}");
                    return;
                }
            }
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            slot.kick.take();
            self.service(q);
        }
    }

    /// Scan the notify page, backing off while nothing happens.
    fn poller(&self, page: &NotifyPage) {
        const FAST: Duration = Duration::from_micros(10);
        const SLOW: Duration = Duration::from_millis(1);
        // Scans at the fast rate after the last kick before backing off.
        const LINGER: u32 = 200;
        let mut idle = 0u32;
        let mut sleep = FAST;
        while !self.shutdown.load(Ordering::Acquire) {
            let mut hit = false;
            for (q, slot) in self.queues.iter().enumerate() {
                if let Some(s) = page.slot(q) {
                    if s.load(Ordering::Relaxed) != SENTINEL
                        && s.swap(SENTINEL, Ordering::AcqRel) != SENTINEL
                    {
                        slot.kick.ring();
                        hit = true;
                    }
                }
            }
            if hit {
                idle = 0;
                sleep = FAST;
            } else {
                idle = idle.saturating_add(1);
                if idle > LINGER {
                    sleep = (sleep * 2).min(SLOW);
                }
            }
            std::thread::sleep(sleep);
        }
    }
}

/// The queue registers as the driver wrote them. Kept beside the queue
/// so that reading them never waits for a worker's batch.
#[derive(Clone, Copy, Debug)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(size: u16) -> Self {
        QueueRegs {
            size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

fn set_half(v: &mut u64, high: bool, half: u32) {
    let shift = if high { 32 } else { 0 };
    *v = (*v & !(0xffff_ffffu64 << shift)) | (u64::from(half) << shift);
}

/// The virtio-pci function. Build it with [`create`].
pub struct VirtioPci<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
    name: String,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    regs: Vec<QueueRegs>,
    vectors: u16,
    /// The PCI_CFG capability's data as last written.
    pci_cfg: Vec<u8>,
    threads: Vec<JoinHandle<()>>,
}

impl<D: VirtioDevice> VirtioPci<D> {
    fn new(
        device: Arc<D>,
        dma: Arc<DmaSpace>,
        irq: Arc<Interrupts>,
        options: VirtioPciOptions,
    ) -> Result<Self, Error> {
        let n = device.num_queues();
        let mut queues = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let queue = Queue::new(device.max_queue_size())
                .map_err(|e| Error::InvalidArgument(format!("virtio-pci: queue: {e}")))?;
            queues.push(QueueSlot {
                queue: Mutex::new(queue),
                vector: AtomicU16::new(NO_VECTOR),
                kick: Kick::new()?,
            });
        }
        let notify = match options.kick {
            KickMode::Trap => None,
            KickMode::Poll => {
                let file = notify_memfd()?;
                let fd = Arc::new(OwnedFd::from(file.try_clone()?));
                let region =
                    MmapRegion::from_file(FileOffset::new(file, NOTIFY_OFFSET), PAGE as usize)
                        .map_err(|e| Error::Io(io::Error::other(e)))?;
                let page = NotifyPage { fd, region };
                page.clear(usize::from(n));
                Some(page)
            }
        };
        let name = format!("{} (virtio-pci)", device.name());
        let shared = Arc::new(Shared {
            device,
            dma,
            irq,
            queues,
            status: AtomicU8::new(0),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            bus_master: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            stop: Kick::new()?,
            notify,
        });
        let mut this = VirtioPci {
            shared: shared.clone(),
            name,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            regs: vec![QueueRegs::new(shared.device.max_queue_size()); usize::from(n)],
            vectors: n + 1,
            pci_cfg: Vec::new(),
            threads: Vec::new(),
        };
        for q in 0..usize::from(n) {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("virtio-q{q}"))
                .spawn(move || s.worker(q))?;
            this.threads.push(t);
        }
        if shared.notify.is_some() {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name("virtio-notify".into())
                .spawn(move || {
                    if let Some(page) = &s.notify {
                        s.poller(page);
                    }
                })?;
            this.threads.push(t);
        }
        Ok(this)
    }

    /// The device model.
    pub fn device(&self) -> &Arc<D> {
        &self.shared.device
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.shared.status.load(Ordering::Acquire)
    }

    fn common_image(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        let mut put = |off: u64, bytes: &[u8]| {
            let off = off as usize;
            c[off..off + bytes.len()].copy_from_slice(bytes);
        };
        let s = &self.shared;
        let half = |v: u64, sel: u32| match sel {
            0 => v as u32,
            1 => (v >> 32) as u32,
            _ => 0,
        };
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            common::DEVICE_FEATURE,
            &half(s.device.features(), self.device_feature_select).to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(
            common::DRIVER_FEATURE,
            &half(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            common::CONFIG_MSIX_VECTOR,
            &s.config_vector.load(Ordering::Acquire).to_le_bytes(),
        );
        put(common::NUM_QUEUES, &(s.queues.len() as u16).to_le_bytes());
        put(common::DEVICE_STATUS, &[s.status.load(Ordering::Acquire)]);
        put(common::CONFIG_GENERATION, &[0]);
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        let q = usize::from(self.queue_select);
        if let (Some(slot), Some(regs)) = (s.queues.get(q), self.regs.get(q)) {
            put(common::QUEUE_SIZE, &regs.size.to_le_bytes());
            put(
                common::QUEUE_MSIX_VECTOR,
                &slot.vector.load(Ordering::Acquire).to_le_bytes(),
            );
            put(common::QUEUE_ENABLE, &u16::from(regs.ready).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &self.queue_select.to_le_bytes());
            put(common::QUEUE_DESC, &regs.desc.to_le_bytes());
            put(common::QUEUE_DRIVER, &regs.driver.to_le_bytes());
            put(common::QUEUE_DEVICE, &regs.device.to_le_bytes());
        }
        c
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        copy_out(&image, offset, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut image = self.common_image();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = start.checked_add(i).and_then(|at| image.get_mut(at)) {
                *slot = b;
            }
        }
        let written = start..start.saturating_add(data.len());
        const FIELDS: [(u64, usize); 15] = [
            (common::DEVICE_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE, 4),
            (common::CONFIG_MSIX_VECTOR, 2),
            (common::DEVICE_STATUS, 1),
            (common::QUEUE_SELECT, 2),
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_DESC, 4),
            (common::QUEUE_DESC + 4, 4),
            (common::QUEUE_DRIVER, 4),
            (common::QUEUE_DRIVER + 4, 4),
            (common::QUEUE_DEVICE, 4),
            (common::QUEUE_DEVICE + 4, 4),
        ];
        for (field, len) in FIELDS {
            let f = field as usize;
            if f >= written.end || written.start >= f + len {
                continue;
            }
            let mut v = [0u8; 4];
            v[..len].copy_from_slice(&image[f..f + len]);
            self.field_write(field, u32::from_le_bytes(v));
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.vectors { v } else { NO_VECTOR }
    }

    fn field_write(&mut self, field: u64, v: u32) {
        let s = self.shared.clone();
        match field {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v,
            common::DRIVER_FEATURE => {
                if s.status.load(Ordering::Acquire) & status::FEATURES_OK != 0 {
                    log::debug!("{}: driver features written after FEATURES_OK", self.name);
                    return;
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            common::CONFIG_MSIX_VECTOR => {
                s.config_vector
                    .store(self.valid_vector(v as u16), Ordering::Release);
            }
            common::DEVICE_STATUS => self.write_status(v as u8),
            common::QUEUE_SELECT => self.queue_select = v as u16,
            _ => self.queue_field_write(field, v),
        }
    }

    fn queue_field_write(&mut self, field: u64, v: u32) {
        let q = usize::from(self.queue_select);
        let shared = self.shared.clone();
        let (Some(slot), Some(regs)) = (shared.queues.get(q), self.regs.get_mut(q)) else {
            log::debug!("{}: write to queue {q}, which does not exist", self.name);
            return;
        };
        if field == common::QUEUE_MSIX_VECTOR {
            let vector = if (v as u16) < self.vectors {
                v as u16
            } else {
                NO_VECTOR
            };
            slot.vector.store(vector, Ordering::Release);
            return;
        }
        if regs.ready {
            log::debug!(
                "{}: queue {q} register {field:#x} written while enabled; ignored",
                self.name
            );
            return;
        }
        match field {
            common::QUEUE_SIZE => {
                let size = v as u16;
                if size == 0 || size > shared.device.max_queue_size() || !size.is_power_of_two() {
                    log::warn!("{}: queue {q} size {size} refused", self.name);
                    return;
                }
                regs.size = size;
            }
            common::QUEUE_ENABLE => {
                if v & 1 == 0 {
                    return;
                }
                regs.ready = true;
                // The queue is idle until now (not ready), so this lock is
                // never held by a batch.
                let mut queue = lock(&slot.queue);
                queue.set_size(regs.size);
                queue
                    .set_desc_table_address(Some(regs.desc as u32), Some((regs.desc >> 32) as u32));
                queue.set_avail_ring_address(
                    Some(regs.driver as u32),
                    Some((regs.driver >> 32) as u32),
                );
                queue.set_used_ring_address(
                    Some(regs.device as u32),
                    Some((regs.device >> 32) as u32),
                );
                queue.set_ready(true);
            }
            common::QUEUE_DESC => set_half(&mut regs.desc, false, v),
            f if f == common::QUEUE_DESC + 4 => set_half(&mut regs.desc, true, v),
            common::QUEUE_DRIVER => set_half(&mut regs.driver, false, v),
            f if f == common::QUEUE_DRIVER + 4 => set_half(&mut regs.driver, true, v),
            common::QUEUE_DEVICE => set_half(&mut regs.device, false, v),
            f if f == common::QUEUE_DEVICE + 4 => set_half(&mut regs.device, true, v),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset_device();
            return;
        }
        let s = self.shared.clone();
        let old = s.status.load(Ordering::Acquire);
        let mut new = (v & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = s.device.features();
            let unknown = self.driver_features & !offered;
            if unknown != 0 || self.driver_features & features::VERSION_1 == 0 {
                log::warn!(
                    "{}: FEATURES_OK refused: driver features {:#x} (not offered: {unknown:#x}, \
                     VERSION_1 {})",
                    self.name,
                    self.driver_features,
                    if self.driver_features & features::VERSION_1 != 0 {
                        "set"
                    } else {
                        "missing"
                    }
                );
                new &= !status::FEATURES_OK;
            } else {
                s.device.set_features(self.driver_features);
                let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
                for slot in &s.queues {
                    lock(&slot.queue).set_event_idx(event_idx);
                }
                log::debug!(
                    "{}: features {:#x} accepted",
                    self.name,
                    self.driver_features
                );
            }
        }
        let prev = s.status.swap(new, Ordering::AcqRel);
        if prev & status::DEVICE_NEEDS_RESET != 0 {
            s.status
                .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            log::info!(
                "{}: driver ready ({} queues, features {:#x})",
                self.name,
                s.queues.len(),
                self.driver_features
            );
            // Buffers may already be waiting.
            for slot in &s.queues {
                slot.kick.ring();
            }
        }
    }

    fn reset_device(&mut self) {
        let s = self.shared.clone();
        s.status.store(0, Ordering::Release);
        for slot in &s.queues {
            // Waits for the chain in progress on this queue.
            lock(&slot.queue).reset();
            slot.vector.store(NO_VECTOR, Ordering::Release);
        }
        let max = s.device.max_queue_size();
        self.regs.iter_mut().for_each(|r| *r = QueueRegs::new(max));
        s.config_vector.store(NO_VECTOR, Ordering::Release);
        s.isr.store(0, Ordering::Release);
        s.irq.set_intx(false);
        if let Some(page) = &s.notify {
            page.clear(s.queues.len());
        }
        s.device.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        log::debug!("{}: reset", self.name);
    }

    fn kick(&self, offset: u64) {
        let q = offset / u64::from(NOTIFY_MULTIPLIER);
        match usize::try_from(q)
            .ok()
            .and_then(|q| self.shared.queues.get(q))
        {
            Some(slot) => slot.kick.ring(),
            None => log::debug!(
                "{}: notification for queue {q}, which does not exist",
                self.name
            ),
        }
    }

    fn pci_cfg_access(&self, data: &[u8]) -> Option<(u8, u64, usize)> {
        let bar = *data.get(PCI_CFG_BAR)?;
        let word = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        let offset = word(PCI_CFG_OFFSET)?;
        let len = word(PCI_CFG_LENGTH)?;
        if !matches!(len, 1 | 2 | 4) || offset % len != 0 || bar != VIRTIO_BAR {
            log::debug!(
                "{}: PCI_CFG window access of {len} bytes at BAR{bar}+{offset:#x} ignored",
                self.name
            );
            return None;
        }
        Some((bar, u64::from(offset), len as usize))
    }
}

fn copy_out(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

fn overlaps(r: &Range<usize>, start: usize, len: usize) -> bool {
    r.start < start + len && start < r.end
}

impl<D: VirtioDevice> Drop for VirtioPci<D> {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.stop.ring();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("{}: a worker thread panicked", self.name);
            }
        }
    }
}

impl<D: VirtioDevice> PciFunction for VirtioPci<D> {
    fn name(&self) -> &str {
        &self.name
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        data.fill(0);
        if bar != VIRTIO_BAR {
            return Ok(());
        }
        match offset {
            o if o < ISR_OFFSET => self.common_read(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                if let Some(b) = data.first_mut() {
                    *b = self.shared.isr.swap(0, Ordering::AcqRel);
                    self.shared.irq.set_intx(false);
                }
            }
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.shared.device.read_config(o - DEVICE_OFFSET, data)
            }
            _ => {}
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), Error> {
        if bar != VIRTIO_BAR {
            return Ok(());
        }
        match offset {
            o if o < ISR_OFFSET => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                self.shared.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if o >= NOTIFY_OFFSET => self.kick(o - NOTIFY_OFFSET),
            _ => {}
        }
        Ok(())
    }

    fn bar_mmap(&self, bar: u8) -> Option<RegionMmap> {
        let page = self.shared.notify.as_ref().filter(|_| bar == VIRTIO_BAR)?;
        Some(RegionMmap {
            fd: page.fd.clone(),
            offset: 0,
            areas: vec![MmapArea {
                offset: NOTIFY_OFFSET,
                size: PAGE,
            }],
        })
    }

    fn ioeventfds(&mut self, bar: u8) -> Result<Vec<IoEventFd>, Error> {
        if bar != VIRTIO_BAR {
            return Ok(Vec::new());
        }
        Ok(self
            .shared
            .queues
            .iter()
            .enumerate()
            .map(|(q, slot)| IoEventFd {
                offset: NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_MULTIPLIER),
                size: 2,
                fd: slot.kick.fd.clone(),
                datamatch: None,
            })
            .collect())
    }

    fn reset(&mut self) -> Result<(), Error> {
        // Config space (and with it the PCI_CFG window) is back at power-on.
        self.pci_cfg.clear();
        self.reset_device();
        Ok(())
    }

    fn command_changed(&mut self, command: u16) {
        let on = command & COMMAND_MASTER != 0;
        let was = self.shared.bus_master.swap(on, Ordering::AcqRel);
        if on && !was {
            for slot in &self.shared.queues {
                slot.kick.ring();
            }
        }
    }

    fn vendor_capability_written(&mut self, index: usize, written: Range<usize>, data: &[u8]) {
        if index != PCI_CFG_CAP {
            return;
        }
        // Remember where the window points, for reads.
        self.pci_cfg = data.to_vec();
        if !overlaps(&written, PCI_CFG_DATA, 4) {
            return;
        }
        let Some((bar, offset, len)) = self.pci_cfg_access(data) else {
            return;
        };
        let mut buf = [0u8; 4];
        if let Some(src) = data.get(PCI_CFG_DATA..PCI_CFG_DATA + len) {
            buf[..len].copy_from_slice(src);
            if let Err(e) = self.bar_write(bar, offset, &buf[..len]) {
                log::debug!("{}: PCI_CFG window write: {e}", self.name);
            }
        }
    }

    fn vendor_capability_read(&mut self, index: usize, offset: usize, data: &mut [u8]) {
        if index != PCI_CFG_CAP || !overlaps(&(offset..offset + data.len()), PCI_CFG_DATA, 4) {
            return;
        }
        let cfg = std::mem::take(&mut self.pci_cfg);
        let access = self.pci_cfg_access(&cfg);
        self.pci_cfg = cfg;
        let Some((bar, bar_offset, len)) = access else {
            return;
        };
        let mut buf = [0u8; 4];
        if let Err(e) = self.bar_read(bar, bar_offset, &mut buf[..len]) {
            log::debug!("{}: PCI_CFG window read: {e}", self.name);
            return;
        }
        // Copy the window's bytes over the part of `data` that covers it.
        for (i, b) in data.iter_mut().enumerate() {
            if let Some(k) = (offset + i).checked_sub(PCI_CFG_DATA) {
                if let Some(&v) = buf.get(k) {
                    *b = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
