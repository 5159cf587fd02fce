//! The passthrough backend: a host PCI device bound to Linux VFIO, served
//! over vfio-user, so that the VMM needs no access to `/dev/vfio`.
//!
//! This module is the only code in vdevd that opens `/dev/vfio` or
//! `/dev/iommu`, and [`host`] the only code that makes their system calls.
//!
//! # Pieces
//!
//! * [`Vfio`]: the host's VFIO as one process sees it: the syscall layer
//!   ([`VfioSys`]: [`host::HostSys`], or a fake in tests), the open IOMMU
//!   groups (a group can be opened once per system, so its devices share
//!   it), the PCI addresses being served, and a bound on the IOMMU address
//!   spaces alive at once.
//! * [`IommuSpace`]: the kernel side of one vdevd DMA address space (a
//!   VFIO container or an iommufd IOAS), mirroring the space's file-backed
//!   mappings. See [`iommu`] for attach, replay and release.
//! * [`Passthrough`]: the [`crate::Device`]. Opening it runs the kernel's
//!   steps one at a time, each with its own error: the group is opened and
//!   checked viable and attached to the space's container (group path), or
//!   the device's cdev is opened, bound to the space's iommufd and attached
//!   to its IOAS (cdev path, where the device refuses every access until
//!   the bind); then the device descriptor is probed. A failure unwinds the
//!   steps already done, in reverse.
//!
//! # What the client gets
//!
//! * Region info as the kernel reports it. A region the kernel lets user
//!   space mmap is offered for mmap with the VFIO device descriptor itself
//!   and the region's offset in it, so the VMM maps the real BAR and MMIO
//!   costs no message (sparse areas relayed; the MSI-X table stays out of
//!   them as the kernel decides). Other accesses are relayed with
//!   `pread`/`pwrite`. The descriptor lets the VMM issue VFIO device ioctls
//!   itself; it never reaches the container or the IOAS, so it cannot map
//!   memory for DMA. `mmap = false` keeps the descriptor in vdevd.
//! * Config space (region 7) relayed to the kernel's vfio-pci, which
//!   virtualises what user space must not own (BAR addresses, the ROM BAR,
//!   the MSI and MSI-X capabilities, parts of the command register), the
//!   same view QEMU gets when it opens a device itself.
//! * SET_IRQS handed to VFIO_DEVICE_SET_IRQS with the client's eventfds:
//!   the kernel signals them directly, no relay thread.
//! * Reset: VFIO_DEVICE_RESET when the device has a function reset, else a
//!   hot reset of its reset domain (VFIO_DEVICE_PCI_HOT_RESET with every
//!   affected group, or through iommufd ownership on the cdev path).
//! * DMA: the client's file-backed grants are mapped into the space's
//!   container or IOAS at the client's IOVA (IOMMU_IOAS_MAP_FILE where the
//!   kernel has it, else through a mapping of this process); the device's
//!   DMA then lands in client memory through the real IOMMU. Grants without
//!   a file cannot be reached by a real device and are not mapped.
//!
//! Pinning client memory for the IOMMU counts against this process's
//! RLIMIT_MEMLOCK (the kernel's locked_vm accounting): vdevd needs a limit
//! of at least the client's RAM, or CAP_IPC_LOCK.

mod device;
pub mod host;
pub mod iommu;
pub mod sys;

#[cfg(any(test, feature = "fake-vfio"))]
pub mod fake;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

pub use device::{Passthrough, PassthroughOptions};
pub use iommu::{Group, IommuKind, IommuSpace, IommuStats};
pub use sys::{PciAddress, VfioSys};

use crate::Error;

/// IOMMU address spaces (containers or IOASes) alive at once, by default.
pub const DEFAULT_MAX_ADDRESS_SPACES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host's VFIO as this process uses it. See the module docs.
pub struct Vfio {
    sys: Arc<dyn VfioSys>,
    groups: Mutex<HashMap<u32, Weak<Group>>>,
    /// PCI addresses served, and by which address space.
    claimed: Mutex<HashMap<PciAddress, String>>,
    backends: Mutex<usize>,
    max_backends: usize,
}

impl std::fmt::Debug for Vfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vfio")
            .field("max_backends", &self.max_backends)
            .finish_non_exhaustive()
    }
}

impl Vfio {
    /// The process's real VFIO (one per process: group descriptors are
    /// exclusive system-wide).
    pub fn host() -> Arc<Vfio> {
        static HOST: OnceLock<Arc<Vfio>> = OnceLock::new();
        HOST.get_or_init(|| Vfio::new(Arc::new(host::HostSys), DEFAULT_MAX_ADDRESS_SPACES))
            .clone()
    }

    /// VFIO through `sys`, with at most `max_address_spaces` IOMMU address
    /// spaces alive at once.
    pub fn new(sys: Arc<dyn VfioSys>, max_address_spaces: usize) -> Arc<Vfio> {
        Arc::new(Vfio {
            sys,
            groups: Mutex::new(HashMap::new()),
            claimed: Mutex::new(HashMap::new()),
            backends: Mutex::new(0),
            max_backends: max_address_spaces,
        })
    }

    /// The syscall layer.
    pub fn sys(&self) -> &dyn VfioSys {
        &*self.sys
    }

    pub(crate) fn groups(&self) -> &Mutex<HashMap<u32, Weak<Group>>> {
        &self.groups
    }

    /// The open group `number`, if a device of this process holds it.
    pub fn open_group(&self, number: u32) -> Option<Arc<Group>> {
        lock(&self.groups).get(&number).and_then(Weak::upgrade)
    }

    /// Count a new IOMMU address space, or refuse it (ENOSPC) at the limit.
    pub(crate) fn backend_acquire(&self, space: &str) -> Result<(), Error> {
        let mut n = lock(&self.backends);
        if *n >= self.max_backends {
            return Err(Error::AddressSpacesExhausted(format!(
                "address space {space} needs an IOMMU address space and {} are in use (the limit)",
                *n
            )));
        }
        *n += 1;
        Ok(())
    }

    pub(crate) fn backend_released(&self) {
        let mut n = lock(&self.backends);
        *n = n.saturating_sub(1);
    }

    /// IOMMU address spaces alive now.
    pub fn address_spaces_in_use(&self) -> usize {
        *lock(&self.backends)
    }

    /// A new iommufd for one address space. One per space keeps a VMM,
    /// which holds device descriptors bound to it, from attaching its
    /// devices to another VM's IOAS.
    pub(crate) fn iommufd_for(&self, space: &str) -> Result<Arc<std::os::fd::OwnedFd>, Error> {
        self.sys
            .open_iommufd()
            .map(Arc::new)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) => Error::NoIommu(format!(
                    "no /dev/iommu ({e}): the host kernel has no IOMMUFD"
                )),
                Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) => {
                    Error::AddressSpacesExhausted(format!(
                        "opening /dev/iommu for address space {space}: {e}"
                    ))
                }
                _ => Error::Vfio {
                    what: "open /dev/iommu".into(),
                    source: e,
                },
            })
    }

    /// Claim `address` for address space `space`: one vdevd device per
    /// PCI device (EBUSY otherwise).
    pub(crate) fn claim(
        self: &Arc<Self>,
        address: PciAddress,
        space: &str,
    ) -> Result<Claim, Error> {
        let mut c = lock(&self.claimed);
        if let Some(owner) = c.get(&address) {
            return Err(Error::Busy(format!(
                "{address} is already served by this vdevd (address space {owner})"
            )));
        }
        c.insert(address, space.to_string());
        Ok(Claim {
            vfio: self.clone(),
            address,
        })
    }
}

/// A served PCI address, released on drop.
pub(crate) struct Claim {
    vfio: Arc<Vfio>,
    address: PciAddress,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.vfio.claimed).remove(&self.address);
    }
}
