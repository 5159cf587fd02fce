//! The VFIO constants the vfio-user wire format reuses.
//!
//! Values are those of Linux's `include/uapi/linux/vfio.h` (and, for the
//! region IO fd types, of the vfio-user specification and libvfio-user).
//! They are plain integers, as on the wire; messages convert them to enums
//! only after validation.

// --- PCI region indexes (enum VFIO_PCI_*_REGION_INDEX) ---

/// BAR 0.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// BAR 1.
pub const VFIO_PCI_BAR1_REGION_INDEX: u32 = 1;
/// BAR 2.
pub const VFIO_PCI_BAR2_REGION_INDEX: u32 = 2;
/// BAR 3.
pub const VFIO_PCI_BAR3_REGION_INDEX: u32 = 3;
/// BAR 4.
pub const VFIO_PCI_BAR4_REGION_INDEX: u32 = 4;
/// BAR 5.
pub const VFIO_PCI_BAR5_REGION_INDEX: u32 = 5;
/// Expansion ROM.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// PCI configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// Legacy VGA ranges.
pub const VFIO_PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of fixed PCI regions; device-specific regions follow.
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;

// --- PCI interrupt indexes (enum VFIO_PCI_*_IRQ_INDEX) ---

/// Legacy INTx.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
/// MSI.
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
/// MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
/// Error reporting.
pub const VFIO_PCI_ERR_IRQ_INDEX: u32 = 3;
/// Device request (the device asks to be released).
pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
/// Number of PCI interrupt indexes.
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

// --- struct vfio_device_info flags ---

/// The device supports reset (VFIO_USER_DEVICE_RESET).
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// The device is a PCI device.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

// --- struct vfio_region_info flags ---

/// The client may read the region.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// The client may write the region.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// The region can be mmapped (the reply carries a file descriptor).
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// The reply carries a capability chain at `cap_offset`.
pub const VFIO_REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Every region info flag defined.
pub const VFIO_REGION_INFO_FLAGS_ALL: u32 = VFIO_REGION_INFO_FLAG_READ
    | VFIO_REGION_INFO_FLAG_WRITE
    | VFIO_REGION_INFO_FLAG_MMAP
    | VFIO_REGION_INFO_FLAG_CAPS;

// --- region info capabilities ---

/// Capability id: the mmappable areas of a partly mappable region.
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Version of the sparse mmap capability.
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP_VERSION: u16 = 1;
/// Capability id: the type/subtype of a device-specific region.
pub const VFIO_REGION_INFO_CAP_TYPE: u16 = 2;
/// Version of the region type capability.
pub const VFIO_REGION_INFO_CAP_TYPE_VERSION: u16 = 1;
/// Region type bit: the rest is a PCI vendor id.
pub const VFIO_REGION_TYPE_PCI_VENDOR_TYPE: u32 = 1 << 31;
/// Mask of the vendor id in a vendor region type.
pub const VFIO_REGION_TYPE_PCI_VENDOR_MASK: u32 = 0xffff;

// --- struct vfio_irq_info flags ---

/// The interrupt index can signal eventfds.
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// The index supports the MASK and UNMASK actions.
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// The interrupt masks itself when it fires.
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// Vectors cannot be added without disabling the whole index.
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;

// --- struct vfio_irq_set flags ---

/// No data: act on every vector of the range.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// Data is one byte per vector: act where it is non-zero.
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// Data is eventfds, carried out of band (SCM_RIGHTS).
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// Mask the vectors (or, with eventfds, signal on mask).
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// Unmask the vectors (or, with eventfds, signal on unmask).
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// Trigger the vectors (or, with eventfds, set what triggering signals).
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// All DATA flags.
pub const VFIO_IRQ_SET_DATA_TYPE_MASK: u32 =
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD;
/// All ACTION flags.
pub const VFIO_IRQ_SET_ACTION_TYPE_MASK: u32 =
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER;

// --- DMA map/unmap flags ---

/// The server may read the mapped range.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// The server may write the mapped range.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// Unmap and return the dirty bitmap of the range (a
/// `struct vfio_user_bitmap` follows the unmap body).
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// Unmap every mapping (address and size must be zero).
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

// --- device features (struct vfio_device_feature) ---

/// Mask of the feature index in the flags.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
/// Get the feature's data.
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
/// Set the feature's data.
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// Probe whether the feature (and the given GET/SET) is supported.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;
/// Feature: migration support (GET returns migration flags).
pub const VFIO_DEVICE_FEATURE_MIGRATION: u16 = 1;
/// Feature: the migration state machine (GET the state, SET a new one).
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// Feature: start DMA dirty logging (SET).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u16 = 6;
/// Feature: stop DMA dirty logging (SET).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u16 = 7;
/// Feature: report and clear the dirty bitmap of a range (GET).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u16 = 8;

// --- migration flags and states ---

/// The device supports the STOP_COPY state.
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// The device supports the P2P states (unused by vfio-user).
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// The device supports the PRE_COPY state.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Migration state: failed, must be reset.
pub const VFIO_DEVICE_STATE_ERROR: u32 = 0;
/// Migration state: stopped.
pub const VFIO_DEVICE_STATE_STOP: u32 = 1;
/// Migration state: running.
pub const VFIO_DEVICE_STATE_RUNNING: u32 = 2;
/// Migration state: stopped, state being read out.
pub const VFIO_DEVICE_STATE_STOP_COPY: u32 = 3;
/// Migration state: stopped, state being loaded.
pub const VFIO_DEVICE_STATE_RESUMING: u32 = 4;
/// Migration state: running, peer-to-peer quiesced (unused by vfio-user).
pub const VFIO_DEVICE_STATE_RUNNING_P2P: u32 = 5;
/// Migration state: running, state being read out.
pub const VFIO_DEVICE_STATE_PRE_COPY: u32 = 6;
/// Migration state: pre-copy, peer-to-peer quiesced (unused by vfio-user).
pub const VFIO_DEVICE_STATE_PRE_COPY_P2P: u32 = 7;

// --- VFIO_USER_DEVICE_GET_REGION_IO_FDS sub-region types and flags ---

/// Sub-region type: a KVM ioeventfd (`datamatch` in the data field).
pub const VFIO_USER_IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// Sub-region type: an ioregionfd (`user_data` in the data field).
pub const VFIO_USER_IO_FD_TYPE_IOREGIONFD: u32 = 1;
/// Sub-region type: an ioeventfd with a shadow memory (libvfio-user).
pub const VFIO_USER_IO_FD_TYPE_IOEVENTFD_SHADOW: u32 = 2;
/// ioeventfd flag: only writes of `datamatch` signal.
pub const KVM_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 0;
/// ioeventfd flag: port I/O rather than MMIO.
pub const KVM_IOEVENTFD_FLAG_PIO: u32 = 1 << 1;
/// ioeventfd flag: virtio-ccw notification.
pub const KVM_IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY: u32 = 1 << 3;
/// ioregionfd flag: port I/O rather than MMIO.
pub const KVM_IOREGION_PIO: u32 = 1 << 0;
/// ioregionfd flag: writes are posted.
pub const KVM_IOREGION_POSTED_WRITES: u32 = 1 << 1;
