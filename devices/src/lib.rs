//! vdevd device models and the guest-memory interface they use.
//!
//! Devices implement [`device::Device`] and know nothing of the transport
//! that serves them. They reach client memory only through
//! [`dma::DmaSpace`] (and its vm-memory view, [`dma::DmaMemory`]).

pub mod block;
pub mod device;
pub mod dma;
pub mod nvme;
pub mod passthrough;
pub mod pci;
pub mod sample;
pub mod virtio;

pub use device::Device;

use dma::DmaError;

/// Errors a device returns to its transport. The transport chooses the
/// errno that goes on the wire from the variant, in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The region index does not exist.
    #[error("no region {0}")]
    NoSuchRegion(u32),
    /// The interrupt index does not exist.
    #[error("no interrupt index {0}")]
    NoSuchIrq(u32),
    /// An access falls (partly) outside a region.
    #[error(
        "access of {len} bytes at offset {offset:#x} is outside region {region} ({size:#x} bytes)"
    )]
    OutOfRange {
        /// Region index.
        region: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// The region does not allow this kind of access.
    #[error("region {region} does not allow {access}")]
    AccessDenied {
        /// Region index.
        region: u32,
        /// "read" or "write".
        access: &'static str,
    },
    /// The request is malformed for this device.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device does not support what was asked.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The device cannot do this now.
    #[error("device busy: {0}")]
    Busy(String),
    /// The device is in a state that does not allow this.
    #[error("device in a bad state: {0}")]
    BadState(String),
    /// The device cannot be given an IOMMU: the host has no VFIO or iommufd
    /// support, the device has no IOMMU group, or the IOMMU type is missing.
    #[error("no IOMMU: {0}")]
    NoIommu(String),
    /// No further DMA address space (container, IOAS) can be created.
    #[error("address spaces exhausted: {0}")]
    AddressSpacesExhausted(String),
    /// The device cannot join the address space: it uses another IOMMU
    /// type, or its IOMMU would change the page sizes already in use.
    #[error("incompatible address space: {0}")]
    IncompatibleAddressSpace(String),
    /// A host VFIO or iommufd call failed.
    #[error("{what}: {source}")]
    Vfio {
        /// What was being done.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// Client memory could not be reached.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// A host I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
