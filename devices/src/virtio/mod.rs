//! Virtio devices, independent of the transport that serves them.
//!
//! A device model implements [`VirtioDevice`]: its identity, features,
//! configuration space and what one descriptor chain means
//! ([`VirtioDevice::process_chain`]). Transports own the virtqueues
//! (`virtio_queue::Queue`) and the guest memory, and drive them through
//! [`process_queue`], the one loop that pops chains, completes them and
//! decides, with `VIRTIO_F_RING_EVENT_IDX` or the driver's
//! `VRING_AVAIL_F_NO_INTERRUPT` flag, whether the driver wants an
//! interrupt. Two transports exist:
//!
//! * [`pci`]: a modern virtio-pci function on the PCI core, served over
//!   vfio-user, with guest memory from the client's DMA mappings
//!   ([`crate::dma::DmaMemory`]).
//! * vhost-user, in the server crate (`vhost-user-backend`), with guest
//!   memory from the front-end's memory table.
//!
//! The model is generic over the guest memory type, so both use the same
//! request parser and executor; nothing about a request is handled twice.
//!
//! # Errors
//!
//! A request the model can answer (bad sector, unknown type, buffers in the
//! wrong direction, unreachable data buffers) completes with an error
//! status. A chain the device cannot even answer (a loop, a descriptor
//! outside guest memory, a chain with no writable status byte, a head index
//! past the queue, an avail index that jumps more than a queue's worth)
//! makes the device *broken* ([`DeviceBroken`]): the transport sets
//! `DEVICE_NEEDS_RESET` and stops using the queues until the driver resets
//! the device, which is what the virtio specification (2.1.2) asks of a
//! device that cannot go on, and what QEMU does.

pub mod blk;
pub mod fuzz;
pub mod pci;

#[cfg(test)]
pub(crate) mod testing;

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Feature bits common to every device (virtio 1.2, 6).
pub mod features {
    /// The driver may use indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// vhost-user: the protocol features are negotiated (never a virtio
    /// feature offered to a driver).
    pub const VHOST_USER_PROTOCOL_FEATURES: u64 = 1 << 30;
    /// A virtio 1.x (non-legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// `VRING_AVAIL_F_NO_INTERRUPT`: without EVENT_IDX, the driver does not
/// want interrupts for now.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The device cannot go on until it is reset: see the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("device needs reset: {0}")]
pub struct DeviceBroken(pub String);

impl DeviceBroken {
    fn queue(index: u16, e: impl std::fmt::Display) -> Self {
        DeviceBroken(format!("queue {index}: {e}"))
    }
}

/// A virtio device model. Every method may run on any thread; queue
/// processing runs concurrently on one thread per queue.
pub trait VirtioDevice: Send + Sync + 'static {
    /// A short name for logs ("virtio-blk").
    fn name(&self) -> &str;
    /// Virtio device ID (2 = block).
    fn device_id(&self) -> u16;
    /// Number of virtqueues.
    fn num_queues(&self) -> u16;
    /// Largest queue size the device accepts (a power of two).
    fn max_queue_size(&self) -> u16;
    /// Features the device offers.
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`VirtioDevice::features`]),
    /// at FEATURES_OK.
    fn set_features(&self, features: u64);
    /// Size of the device-specific configuration space.
    fn config_size(&self) -> usize;
    /// Read device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device configuration space (only its writable fields change).
    fn write_config(&self, offset: u64, data: &[u8]);
    /// Return to the power-on state (features forgotten). Queues are reset
    /// by the transport.
    fn reset(&self);
    /// Execute the request in `chain` (popped from queue `queue`) and write
    /// its result into the chain's device-writable buffers. Returns the
    /// number of bytes written there, for the used ring.
    ///
    /// This is the entry point to fuzz: any chain against any memory must
    /// end in `Ok` (with an error status written) or [`DeviceBroken`],
    /// never in a panic.
    fn process_chain<M: GuestMemory<Bitmap = ()>>(
        &self,
        queue: u16,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<u32, DeviceBroken>;
}

/// What one call of [`process_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains completed.
    pub completed: usize,
    /// The driver wants an interrupt for them.
    pub notify: bool,
    /// The budget ran out with chains left: call again (notifications
    /// stay disabled meanwhile).
    pub more: bool,
}

/// Process the available chains of `queue` (at most `budget`, and none
/// after `stop` returns true: a reset is waiting), complete them in the
/// used ring, and tell whether the driver should be interrupted. With EVENT_IDX, notifications are re-enabled only once the
/// ring is empty, and the ring is checked again afterwards so that a chain
/// added meanwhile is never left behind.
pub fn process_queue<D: VirtioDevice + ?Sized, M: GuestMemory<Bitmap = ()>>(
    device: &D,
    index: u16,
    mem: &M,
    queue: &mut Queue,
    budget: usize,
    stop: &dyn Fn() -> bool,
) -> Result<QueueRun, DeviceBroken> {
    let mut run = QueueRun::default();
    if !queue.ready() {
        return Ok(run);
    }
    let broken = |e: virtio_queue::Error| DeviceBroken::queue(index, e);
    loop {
        queue.disable_notification(mem).map_err(broken)?;
        while run.completed < budget {
            if stop() {
                return Ok(run);
            }
            let chain = queue.iter(mem).map_err(broken)?.next();
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = device.process_chain(index, mem, chain)?;
            queue.add_used(mem, head, len).map_err(broken)?;
            run.completed += 1;
        }
        if run.completed >= budget {
            // Leave notifications off: the caller comes back at once.
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(broken)?;
            run.more = avail != Wrapping(queue.next_avail());
            if run.more {
                break;
            }
        }
        if !queue.enable_notification(mem).map_err(broken)? {
            break;
        }
    }
    if run.completed > 0 {
        run.notify = needs_interrupt(queue, mem).map_err(broken)?;
    }
    Ok(run)
}

/// Whether the driver wants an interrupt for the chains just completed.
fn needs_interrupt<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // Without EVENT_IDX the crate always says yes; honour the driver's
    // VRING_AVAIL_F_NO_INTERRUPT hint (virtio 1.2, 2.7.7.2).
    queue.needs_notification(mem)?;
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .read_obj(GuestAddress(queue.avail_ring()))
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}
